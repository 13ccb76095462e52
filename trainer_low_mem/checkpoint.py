"""Atomic, verifiable training state: `OUTPUT_DIR/train_latest_state`, and the final weights.

Save (every rank calls `Checkpointer.save`; only the paths named below are written):
1. rank 0 creates the sibling `train_latest_state.tmp-<pid of rank 0>`;
2. each rank writes its own files there (`rng/rank-<r>.pt`; under DeepSpeed its ZeRO shard), and
   rank 0 writes the shared ones (model.safetensors, optimizer.pt, scheduler.pt, scaler.pt,
   training_state.json);
3. once every rank reports its writes done (one all-reduce, which doubles as the barrier) rank 0
   fsyncs every file, writes `manifest.json` last (file list, sizes, sha256, step, config hash,
   dataset fingerprint, plan), fsyncs the directory, renames the old state to
   `train_latest_state.prev`, renames the temp dir to `train_latest_state`, fsyncs the parent and
   removes `.prev`.
A crash at any point leaves either the old or the new state complete, and a temp dir that loading
ignores. A write that fails on any rank (disk full, I/O error) stops every rank with one
CheckpointError naming the file, the cause, the free space and the previous state, which stays as
it was; the temp dir is removed. Loading picks the newest state whose manifest verifies (`.prev`
when `latest` is incomplete or corrupt) and says exactly what is wrong when none does.

Resume cost does not depend on the step count: the loader state is a few integers and the loader
seeks; nothing is replayed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file

from lowmem_core.durable import file_sha256, fsync_path
from lowmem_core.errors import CheckpointError
from lowmem_core.memory import format_bytes
from trainer_low_mem.distributed import RankContext

STATE_DIR_NAME = "train_latest_state"
MANIFEST_NAME = "manifest.json"
TRAINING_STATE_NAME = "training_state.json"
MODEL_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
SCALER_NAME = "scaler.pt"
DEEPSPEED_TAG = "deepspeed"
FORMAT = "lowmem-train-state/1"
FINAL_CONFIG_NAME = "config.json"


@dataclass
class TrainingState:
    """The scalar part of a checkpoint (stored as training_state.json).

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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainingState":
        return cls(**d)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """The module's tensors as safetensors: each tied parameter once, each tensor copied out of any
    shared buffer (ZeRO keeps parameters as views of one flat buffer, which safetensors refuses)."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
    save_file(tensors, str(path))


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        # As plain lists so that torch.load(weights_only=True) can read it back.
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, gauss_value = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss_value))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file fails in many ways inside unpickling
        raise CheckpointError(f"cannot read {path}: {exc}; the checkpoint is corrupt, "
                              "delete it or resume from another output dir") from exc


def verify_state_dir(path: Path) -> dict[str, Any]:
    """The manifest of a complete, intact state directory; CheckpointError saying what is wrong otherwise."""
    manifest_path = path / MANIFEST_NAME
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist")
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST_NAME}: the save did not finish (incomplete state)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest_path} is not valid JSON ({exc}): corrupt state") from exc
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    for entry in manifest["files"]:
        file_path = path / entry["name"]
        if not file_path.is_file():
            raise CheckpointError(f"{path} lacks {entry['name']} listed in its manifest: incomplete state")
        size = file_path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{file_path} has {size} bytes, the manifest says {entry['bytes']}: "
                                  "truncated state")
        if file_sha256(file_path) != entry["sha256"]:
            raise CheckpointError(f"{file_path} does not match its sha256 in the manifest: corrupt state")
    return manifest


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
    diffs = [f"{k}: saved {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k)]
    if diffs:
        raise CheckpointError(
            f"{where} was saved with other model, data or batch settings ({'; '.join(diffs)}); resume with the "
            "saved settings, or start a new run in another --output_dir")


class Checkpointer:
    """Saves and loads `OUTPUT_DIR/train_latest_state` for one job (see the module docstring)."""

    def __init__(self, output_dir: Path, ctx: RankContext):
        self.output_dir = Path(output_dir)
        self.ctx = ctx

    @property
    def latest_dir(self) -> Path:
        return self.output_dir / STATE_DIR_NAME

    @property
    def prev_dir(self) -> Path:
        return self.output_dir / f"{STATE_DIR_NAME}.prev"

    def has_state(self) -> bool:
        """True when a latest or previous state directory exists (complete or not)."""
        return self.latest_dir.exists() or self.prev_dir.exists()

    # -- save -------------------------------------------------------------------------------
    def save(self, state: TrainingState, *, model: torch.nn.Module, optimizer, scheduler,
             scaler=None, engine=None) -> Path:
        """Write the state atomically (collective: every rank calls it). Returns the latest dir.

        `model` is the unwrapped module; `engine` the DeepSpeed engine when DeepSpeed runs, which
        writes each rank's ZeRO optimizer shard itself.
        """
        ctx = self.ctx
        # Every rank must name the same temp dir: rank 0's pid, spread by a max-reduce.
        token = ctx.all_reduce_max(os.getpid() if ctx.is_main else 0)
        tmp = self.output_dir / f"{STATE_DIR_NAME}.tmp-{token}"
        with ctx.main_process_first():
            if ctx.is_main:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                for stale in self.output_dir.glob(f"{STATE_DIR_NAME}.tmp-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                (tmp / "rng").mkdir(parents=True)
        failure = None
        try:
            torch.save(_rng_state(), tmp / "rng" / f"rank-{ctx.rank}.pt")
            if engine is not None:
                engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, save_latest=False)
            if ctx.is_main:
                if engine is None:
                    save_weights(model, tmp / MODEL_NAME)
                    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_NAME)
                torch.save(scheduler.state_dict(), tmp / SCHEDULER_NAME)
                if scaler is not None:
                    torch.save(scaler.state_dict(), tmp / SCALER_NAME)
                (tmp / TRAINING_STATE_NAME).write_text(json.dumps(state.to_dict(), indent=1, sort_keys=True))
        # A full disk surfaces as OSError, as RuntimeError from torch's zip writer, or as
        # SafetensorError from the weights writer.
        except (OSError, RuntimeError, SafetensorError) as exc:
            failure = exc
        # A collective in place of a barrier: no rank waits for one that failed; all stop together.
        self._raise_if_any_failed(failure, tmp)
        if ctx.is_main:
            try:
                self._finalise(tmp, state)
            except OSError as exc:
                failure = exc
        self._raise_if_any_failed(failure, tmp)
        return self.latest_dir

    def _raise_if_any_failed(self, failure: BaseException | None, tmp: Path) -> None:
        """Collective: when any rank's write failed, remove the temp dir and raise on every rank."""
        if not self.ctx.all_reduce_max(int(failure is not None)):
            return
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is None:
            raise CheckpointError(f"another rank could not write the training state to {tmp} (see its error); "
                                  "free disk space or choose another --output_dir")
        if isinstance(failure, OSError) and failure.strerror:
            where, cause = failure.filename or tmp, failure.strerror
        else:
            where, cause = tmp, (str(failure).strip().splitlines() or [type(failure).__name__])[0]
        try:
            free = f"{format_bytes(shutil.disk_usage(self.output_dir).free)} free on that disk"
        except OSError:
            free = "free space unknown"
        previous = "no earlier state exists"
        for candidate in (self.latest_dir, self.prev_dir):
            try:
                step = json.loads((candidate / MANIFEST_NAME).read_text())["step"]
            except (OSError, ValueError, KeyError):
                continue
            previous = f"the previous state {candidate} (step {step}) is intact"
            break
        raise CheckpointError(
            f"cannot write the training state: {where} ({cause}; {free}); {previous}; free disk space or choose "
            "another --output_dir, then resume with --is_keep_training=True") from failure

    def _finalise(self, tmp: Path, state: TrainingState) -> None:
        files = []
        for file_path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            fsync_path(file_path)
            files.append({"name": str(file_path.relative_to(tmp)), "bytes": file_path.stat().st_size,
                          "sha256": file_sha256(file_path)})
        for sub in sorted({p.parent for p in tmp.rglob("*") if p.is_file()}):
            fsync_path(sub)
        manifest = {"format": FORMAT, "step": state.step, "config_hash": state.config_hash,
                    "dataset_fingerprint": state.compat.get("dataset_fingerprint"),
                    "world_size": state.world_size, "deepspeed": self.ctx.uses_deepspeed,
                    "plan": state.plan, "files": files}
        _write_json_atomic(tmp / MANIFEST_NAME, manifest)
        fsync_path(tmp)
        latest, prev = self.latest_dir, self.prev_dir
        if latest.exists():
            # latest came from a completed rename, so it is the state to keep until the new one lands;
            # a .prev still present then is older and goes.
            shutil.rmtree(prev, ignore_errors=True)
            os.rename(latest, prev)
        os.rename(tmp, latest)
        fsync_path(self.output_dir)
        shutil.rmtree(prev, ignore_errors=True)
        fsync_path(self.output_dir)

    # -- load -------------------------------------------------------------------------------
    def find_resumable(self) -> tuple[Path, dict[str, Any]]:
        """(directory, manifest) of the newest state that verifies; CheckpointError if none does."""
        problems = []
        for candidate in (self.latest_dir, self.prev_dir):
            if not candidate.exists():
                continue
            try:
                return candidate, verify_state_dir(candidate)
            except CheckpointError as exc:
                problems.append(str(exc))
        if problems:
            raise CheckpointError(f"no usable training state in {self.output_dir}: {' | '.join(problems)}")
        raise CheckpointError(
            f"--is_keep_training=True but {self.latest_dir} does not exist; start without it for a "
            "new run, or point --output_dir at the run to resume")

    def load(self, path: Path, manifest: dict[str, Any], *, compat: dict[str, Any],
             model: torch.nn.Module, optimizer, scheduler, scaler=None, engine=None) -> TrainingState:
        """Restore everything saved in `path` into the given objects; returns the scalar state.

        Raises CheckpointError when the saved run's model/dataset/batch settings differ from
        `compat`, or when ZeRO shards would have to be re-sharded for another world size.
        """
        ctx = self.ctx
        state = TrainingState.from_dict(json.loads((path / TRAINING_STATE_NAME).read_text()))
        check_compatible(state.compat, compat, path)
        saved_deepspeed = bool(manifest.get("deepspeed"))
        if saved_deepspeed != (engine is not None):
            raise CheckpointError(
                f"{path} was saved {'with' if saved_deepspeed else 'without'} DeepSpeed but this run is "
                f"{'with' if engine is not None else 'without'} it; resume with the same accelerate config")
        if engine is not None:
            if state.world_size != ctx.world_size:
                raise CheckpointError(
                    f"{path} holds ZeRO-2 optimizer shards of {state.world_size} ranks and cannot be "
                    f"re-sharded for {ctx.world_size}; resume with --num_processes {state.world_size} "
                    "(plain DDP and CPU runs resume with any number of processes)")
            load_path, _ = engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
            if load_path is None:
                raise CheckpointError(f"DeepSpeed could not load {path / DEEPSPEED_TAG}; the state is corrupt")
        else:
            missing, unexpected = load_model(model, str(path / MODEL_NAME), strict=False)
            if missing or unexpected:
                raise CheckpointError(f"{path / MODEL_NAME} does not fit the model: missing {sorted(missing)}, "
                                      f"unexpected {sorted(unexpected)}")
            optimizer.load_state_dict(_torch_load(path / OPTIMIZER_NAME))
        scheduler.load_state_dict(_torch_load(path / SCHEDULER_NAME))
        if scaler is not None and (path / SCALER_NAME).is_file():
            scaler.load_state_dict(_torch_load(path / SCALER_NAME))
        rng_path = path / "rng" / f"rank-{ctx.rank}.pt"
        if rng_path.is_file():
            _set_rng_state(_torch_load(rng_path))
        return state


def save_final_weights(output_dir: Path, model: torch.nn.Module, model_config: dict[str, Any]) -> Path:
    """Write OUTPUT_DIR/model.safetensors and config.json atomically (rank 0 only calls this)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    weights = output_dir / MODEL_NAME
    tmp = output_dir / f".{MODEL_NAME}.tmp-{os.getpid()}"
    save_weights(model, tmp)
    fsync_path(tmp)
    os.replace(tmp, weights)
    _write_json_atomic(output_dir / FINAL_CONFIG_NAME, model_config)
    fsync_path(output_dir)
    return weights
