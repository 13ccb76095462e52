"""`Stateful`: an object a checkpoint saves with `state_dict()` and restores with
`load_state_dict()`.

The same protocol as `torch.distributed.checkpoint.stateful.Stateful` (any object with the two
methods satisfies both), defined here because importing that module costs ~0.6 s and ~700 modules.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]:
        """What `load_state_dict` needs to continue exactly where this object is now."""
        ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from `state_dict`; refuse (CheckpointError) one this object cannot read."""
        ...
