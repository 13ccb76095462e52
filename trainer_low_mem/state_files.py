"""The files of a training state that are read before anything loads: the manifest (file list,
sizes, sha256) and training_state.json (what must match to resume), and their checks."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowmem_core.durable import file_sha256
from lowmem_core.errors import CheckpointError

MANIFEST_NAME = "manifest.json"
TRAINING_STATE_NAME = "training_state.json"
FORMAT = "lowmem-train-state/2"


@dataclass
class TrainingState:
    """The readable record of a checkpoint (stored as training_state.json).

    `compat` holds what must be equal to resume (model architecture, vocabulary, sequence
    length, packing, seed, global batch, dataset fingerprint); `plan` and `config` are the run's
    as saved, for the record.
    """

    step: int
    total_steps: int
    tokens_seen: int
    loader_state: dict[str, Any]
    world_size: int
    compat: dict[str, Any]
    plan: dict[str, Any]
    config: dict[str, Any]
    config_hash: str
    watchdog: dict[str, Any]  # HostRamWatchdog.state_dict(): the actions taken so far
    # The frozen weights the run started from (weights_fingerprint), when it has any: a state
    # holds only what training changes, so a resume must load the same frozen weights. None in
    # states that hold every weight.
    frozen_weights: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainingState:
        return cls(**d)


def verify_state_dir(path: Path) -> dict[str, Any]:
    """The manifest of a complete, intact state directory; else CheckpointError saying what is
    wrong."""
    manifest_path = path / MANIFEST_NAME
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist")
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{path} has no {MANIFEST_NAME}: the save did not finish (incomplete state)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest_path} is not valid JSON ({exc}): corrupt state") from exc
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_path} holds no JSON object: corrupt state")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"{manifest_path} has format {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    files = manifest.get("files")
    if (
        not isinstance(files, list)
        or not isinstance(manifest.get("step"), int)
        or not all(
            isinstance(e, dict)
            and isinstance(e.get("name"), str)
            and isinstance(e.get("bytes"), int)
            and isinstance(e.get("sha256"), str)
            for e in files
        )
    ):
        raise CheckpointError(
            f"{manifest_path} lacks a step or a well-formed file list: corrupt state"
        )
    for entry in files:
        file_path = path / entry["name"]
        if not file_path.is_file():
            raise CheckpointError(
                f"{path} lacks {entry['name']} listed in its manifest: incomplete state"
            )
        size = file_path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"{file_path} has {size} bytes, the manifest says {entry['bytes']}: truncated state"
            )
        if file_sha256(file_path) != entry["sha256"]:
            raise CheckpointError(
                f"{file_path} does not match its sha256 in the manifest: corrupt state"
            )
    read_training_state(path)
    return manifest


def read_training_state(path: Path) -> TrainingState:
    """The training_state.json of the state in `path`; CheckpointError when malformed."""
    try:
        return TrainingState.from_dict(json.loads((path / TRAINING_STATE_NAME).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{path / TRAINING_STATE_NAME} is missing or malformed ({exc}): corrupt state"
        ) from None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Raise CheckpointError listing every field where the saved run and this run differ."""
    a, b = _flatten(saved), _flatten(current)
    diffs = [
        f"{k}: saved {a.get(k)!r}, now {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    if diffs:
        raise CheckpointError(
            f"{where} was saved with other model, data or batch settings ({'; '.join(diffs)}); "
            "resume with the saved settings, or start a new run in another --output_dir"
        )


def _verifies(path: Path) -> bool:
    try:
        verify_state_dir(path)
    except CheckpointError:
        return False
    return True


def config_hash(d: dict[str, Any]) -> str:
    """A short stable hash of a JSON-ready dict (sorted keys)."""
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


SAMPLES_PER_FILE = 16
SAMPLE_BYTES = 64 << 10


def weights_fingerprint(files: Sequence[Path]) -> str:
    """A cheap fingerprint of weight files: names, sizes and 16 blocks of 64 KiB spread over
    each file (first and last included). It tells one checkpoint from another in a second
    whatever their size; it is not a check against bit flips."""
    digest = hashlib.sha256()
    for path in sorted(Path(f) for f in files):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as fh:
            for i in range(SAMPLES_PER_FILE):
                fh.seek(max(0, (size - SAMPLE_BYTES) * i // (SAMPLES_PER_FILE - 1)))
                digest.update(fh.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]
