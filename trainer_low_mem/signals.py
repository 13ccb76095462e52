"""Stop on SIGTERM / SIGINT at a step boundary, after saving: the second signal does not abort
the save (launchers often forward SIGINT then SIGTERM), a third interrupts at once."""

from __future__ import annotations

import signal
import threading
from typing import Any

EXIT_CODE_SIGINT = 130  # 128 + SIGINT, the shell's convention
EXIT_CODE_SIGTERM = 143  # 128 + SIGTERM
EXIT_CODES = {signal.SIGINT: EXIT_CODE_SIGINT, signal.SIGTERM: EXIT_CODE_SIGTERM}


class StopSignals:
    """SIGTERM/SIGINT record the signal (save and stop at the next step boundary); a second one
    (launchers forward SIGINT then SIGTERM) is ignored so the save finishes; a third interrupts."""

    def __init__(self) -> None:
        self.signum = 0
        self.count = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        self.count += 1
        if self.count >= 3:
            raise KeyboardInterrupt
        if not self.signum:
            self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
