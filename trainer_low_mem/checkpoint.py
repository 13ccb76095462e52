"""Atomic, verifiable training state: `OUTPUT_DIR/train_latest_state`, and the final weights.

`accelerator.save_state` writes the content: weights (model.safetensors, from the unwrapped
module through a save hook, so a state of N ranks loads with any number), optimizer
(optimizer.bin; under DeepSpeed each rank's ZeRO shard in pytorch_model/), grad scaler and each
rank's RNG (random_states_<rank>.pkl). The objects registered here by name (`register`: the
learning-rate schedule) are saved as <name>.pt; states written before they had names hold them
as accelerate's custom_checkpoint_<i>.pkl, read in `LEGACY_OBJECT_ORDER`. training_state.json is
the readable record of the same save (step, data position, watchdog, plan, config), checked
before anything is loaded; each of these states is saved once, in one of these files.

Save (collective), atomic around `save_state`: rank 0 creates `train_latest_state.tmp-<pid>`;
every rank runs `save_state` into it and rank 0 adds training_state.json; once every rank reports
its writes done (one all-reduce, doubling as the barrier) rank 0 fsyncs every file, writes
`manifest.json` last (files, sizes, sha256, step, config hash, dataset fingerprint, plan), fsyncs
the directory, renames the old state to `.prev`, the temp dir to `train_latest_state`, fsyncs the
parent and removes `.prev`. A crash at any point leaves the old or the new state complete. A
write that fails on any rank stops every rank with one CheckpointError naming the file, the
cause, the free space and the intact previous state. Loading picks the newest state whose
manifest verifies (`.prev` when `latest` is incomplete or corrupt) and says what is wrong when
none does. Resume cost does not depend on the step count: the loader seeks, nothing is replayed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file

from lowmem_core.durable import (
    file_sha256,
    fsync_path,
    fsync_tree,
    swap_in_folder,
    write_atomic,
)
from lowmem_core.errors import CheckpointError, ConfigError
from lowmem_core.memory import format_bytes
from lowmem_core.stateful import Stateful
from trainer_low_mem import zero3
from trainer_low_mem.distributed import RankContext
from trainer_low_mem.export import is_quantised_linear
from trainer_low_mem.state_files import (
    FORMAT,
    MANIFEST_NAME,
    TRAINING_STATE_NAME,
    TrainingState,
    _verifies,
    check_compatible,
    read_training_state,
    verify_state_dir,
)

STATE_DIR_NAME = "train_latest_state"
MODEL_NAME = "model.safetensors"  # accelerate's name for the first model's weights
DEEPSPEED_TAG = "pytorch_model"  # accelerate's tag for the first DeepSpeed engine
# What accelerate's custom_checkpoint_<i>.pkl held, by i, in states written before objects were
# saved by name (the progress and watchdog entries are read from training_state.json instead).
LEGACY_OBJECT_ORDER = ("scheduler", "progress", "watchdog")


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """What training changes of the module, as safetensors: every tensor but frozen parameters
    (a LoRA run saves its adapters, not a copy of the base it loads again from the model
    folder), each tied parameter once, each copied out of any shared buffer (ZeRO keeps
    parameters as views of one flat buffer, which safetensors refuses). Entries that are
    neither a parameter nor a buffer are left out too: the statistics bitsandbytes adds for its
    frozen quantised weights, which are quantised again from the model folder at resume."""
    seen: set[int] = set()
    tensors = {}
    module_tensors = {id(t) for t in (*model.parameters(), *model.buffers())}
    for name, tensor in model.state_dict(keep_vars=True).items():
        frozen = isinstance(tensor, torch.nn.Parameter) and not tensor.requires_grad
        if id(tensor) in seen or frozen or id(tensor) not in module_tensors:
            continue
        seen.add(id(tensor))
        tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
    save_file(tensors, str(path))


class Checkpointer:
    """Saves and loads `OUTPUT_DIR/train_latest_state` for one job (see the module docstring).

    `accelerator` (needed to save and load, not to find or verify states) gets two hooks that
    save and load the weights of the unwrapped module.
    """

    def __init__(self, output_dir: Path, ctx: RankContext, accelerator=None):
        self.output_dir = Path(output_dir)
        self.ctx = ctx
        self.accelerator = accelerator
        # True when train_latest_state is known complete (saved or resumed by this run): only
        # then may it become .prev and the older .prev go; otherwise .prev is the state to keep.
        self._latest_good = False
        self._objects: dict[str, Stateful] = {}
        # The model and optimizer when the trainer shards them itself (trainer_low_mem/fsdp.py):
        # saved and loaded as one distributed checkpoint beside accelerate's files.
        self.sharded_state = None
        if accelerator is not None:
            accelerator.register_save_state_pre_hook(self._save_weights_hook)
            accelerator.register_load_state_pre_hook(self._load_weights_hook)

    @property
    def latest_dir(self) -> Path:
        return self.output_dir / STATE_DIR_NAME

    @property
    def prev_dir(self) -> Path:
        return self.output_dir / f"{STATE_DIR_NAME}.prev"

    def has_state(self) -> bool:
        """True when a latest or previous state directory exists (complete or not)."""
        return self.latest_dir.exists() or self.prev_dir.exists()

    def register(self, name: str, obj: Stateful) -> None:
        """Save `obj.state_dict()` with every state as <name>.pt, and restore it on load."""
        if name in self._objects:
            raise ValueError(f"a checkpoint object named {name!r} is registered already")
        self._objects[name] = obj

    # -- save -------------------------------------------------------------------------------
    def save(self, record: TrainingState) -> Path:
        """Write the state atomically (collective: every rank calls it). Returns the latest dir."""
        ctx = self.ctx
        # Every rank must name the same temp dir: rank 0's pid, spread by a max-reduce.
        token = ctx.all_reduce_max(os.getpid() if ctx.is_main else 0)
        tmp = self.output_dir / f"{STATE_DIR_NAME}.tmp-{token}"
        with ctx.main_process_first():
            if ctx.is_main:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                for stale in self.output_dir.glob(f"{STATE_DIR_NAME}.tmp-*"):
                    if not _pid_alive(stale.name.rsplit("-", 1)[-1]):  # never a live run's
                        shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir()
        failure = None
        try:
            # DeepSpeed's own "latest" pointer file is not wanted: the manifest names the state.
            kwargs = {"save_latest": False} if ctx.uses_deepspeed else {}
            self.accelerator.save_state(str(tmp), **kwargs)
            if self.sharded_state is not None:
                self.sharded_state.save(tmp)
            if ctx.is_main:
                for name, obj in self._objects.items():
                    torch.save(obj.state_dict(), tmp / f"{name}.pt")
                (tmp / TRAINING_STATE_NAME).write_text(
                    json.dumps(record.to_dict(), indent=1, sort_keys=True)
                )
        # A full disk surfaces as OSError, as RuntimeError from torch's zip writer, or as
        # SafetensorError from the weights writer.
        except (OSError, RuntimeError, SafetensorError) as exc:
            failure = exc
        # A collective in place of a barrier: no rank waits for one that failed; all stop together.
        self._raise_if_any_failed(failure, tmp)
        if ctx.is_main:
            try:
                self._finalise(tmp, record)
            except OSError as exc:
                failure = exc
        self._raise_if_any_failed(failure, tmp)
        self._latest_good = True
        return self.latest_dir

    def _save_weights_hook(self, models: list, weights: list, output_dir: str) -> None:
        # accelerate would save the wrapper's state dict ("module."-prefixed under DDP); the
        # unwrapped module's loads with any number of ranks. DeepSpeed engines save themselves.
        if not weights:
            return
        if self.ctx.is_main:
            for i, model in enumerate(models):
                save_weights(
                    self.accelerator.unwrap_model(model), Path(output_dir) / _weights_name(i)
                )
        weights.clear()

    def _load_weights_hook(self, models: list, input_dir: str) -> None:
        for i, model in enumerate(models):
            path = Path(input_dir) / _weights_name(i)
            module = self.accelerator.unwrap_model(model)
            missing, unexpected = load_model(module, str(path), strict=False)
            # Frozen parameters are not saved (see save_weights): they come from the model
            # folder, whose fingerprint the resume compares (TrainingState.frozen_weights).
            params = module.named_parameters(remove_duplicate=False)
            frozen = {n for n, p in params if not p.requires_grad}
            missing = set(missing) - frozen
            if missing or unexpected:
                raise CheckpointError(
                    f"{path} does not fit the model: missing {sorted(missing)}, unexpected "
                    f"{sorted(unexpected)}; resume with the model settings it was saved with"
                )
        models.clear()

    @property
    def _sharding(self) -> str | None:
        """The engine that sharded the saved parameters, for the manifest: the trainer's own
        (FSDP2), DeepSpeed's ZeRO-3, or None when every rank held the whole model."""
        if self.sharded_state is not None:
            return self.sharded_state.engine
        return zero3.ENGINE if zero3.zero_stage(self.accelerator) == 3 else None

    def _raise_if_any_failed(self, failure: BaseException | None, tmp: Path) -> None:
        """Collective: when any rank's write failed, remove the temp dir and raise on every rank."""
        if not self.ctx.all_reduce_max(int(failure is not None)):
            return
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is None:
            raise CheckpointError(
                f"another rank could not write the training state to {tmp} (see its error); "
                "free disk space or choose another --output_dir"
            )
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
            f"cannot write the training state: {where} ({cause}; {free}); {previous}; free disk "
            "space or choose another --output_dir, then resume with --is_keep_training=True"
        ) from failure

    def _finalise(self, tmp: Path, state: TrainingState) -> None:
        fsync_tree(tmp)
        files = [
            {
                "name": str(file_path.relative_to(tmp)),
                "bytes": file_path.stat().st_size,
                "sha256": file_sha256(file_path),
            }
            for file_path in sorted(p for p in tmp.rglob("*") if p.is_file())
        ]
        manifest = {
            "format": FORMAT,
            "step": state.step,
            "config_hash": state.config_hash,
            "dataset_fingerprint": state.compat.get("dataset_fingerprint"),
            "world_size": state.world_size,
            "deepspeed": self.ctx.uses_deepspeed,
            "sharding": self._sharding,
            "plan": state.plan,
            "files": files,
        }
        write_atomic(tmp / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True))
        latest, prev = self.latest_dir, self.prev_dir
        known_good = self._latest_good or not prev.exists()
        if latest.exists() and not (known_good or _verifies(latest)):
            # latest is damaged and .prev is the last good state: keep .prev until the new
            # state is in place, drop the damaged one.
            shutil.rmtree(latest)
            fsync_path(self.output_dir)
        # A complete latest is the state to keep until the new one lands: it becomes .prev (an
        # older .prev goes), and is removed once the new state is in place.
        swap_in_folder(tmp, latest, prev)

    # -- load -------------------------------------------------------------------------------
    def locate_resume(self, keep_training: bool) -> tuple[Path, dict[str, Any]] | None:
        """Collective: the state to resume (latest, else prev) and its manifest, or None.

        Without `keep_training` an existing state is an error (a new run would overwrite it).
        Rank 0 verifies (hashes every file once); the other ranks learn its choice.
        """
        if not keep_training:
            if self.has_state():
                raise ConfigError(
                    f"{self.latest_dir} already exists; pass --is_keep_training=True to resume "
                    "it, or choose another --output_dir for a new run"
                )
            return None
        choice, manifest, problem = -1, None, None  # choice: 0 latest, 1 prev
        if self.ctx.is_main:
            try:
                path, manifest = self.find_resumable()
                choice = 0 if path == self.latest_dir else 1
            except CheckpointError as exc:
                problem = exc
        choice = self.ctx.all_reduce_max(choice)
        if choice < 0:
            if problem is not None:
                raise problem
            raise CheckpointError(
                f"rank 0 found no usable training state in {self.output_dir} (see its message)"
            )
        path = (self.latest_dir, self.prev_dir)[choice]
        self._latest_good = choice == 0
        if manifest is None:
            manifest = json.loads((path / MANIFEST_NAME).read_text())
        return path, manifest

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
            raise CheckpointError(
                f"no usable training state in {self.output_dir}: {' | '.join(problems)}"
            )
        raise CheckpointError(
            f"--is_keep_training=True but {self.latest_dir} does not exist; start without it for a "
            "new run, or point --output_dir at the run to resume"
        )

    def load(
        self,
        path: Path,
        manifest: dict[str, Any],
        *,
        compat: dict[str, Any],
        frozen_weights: str | None = None,
    ) -> TrainingState:
        """Restore the state in `path` through `accelerator.load_state`; returns its record.

        Raises CheckpointError when the saved run's model/dataset/batch settings differ from
        `compat`, when the state left out frozen weights other than this run's
        (`frozen_weights`, see TrainingState), or when ZeRO shards would have to be re-sharded
        for another world size.
        """
        ctx = self.ctx
        state = read_training_state(path)
        check_compatible(state.compat, compat, path)
        if state.frozen_weights is not None and state.frozen_weights != frozen_weights:
            raise CheckpointError(
                f"{path} holds only the weights training changed, and the frozen weights it "
                f"trained on (fingerprint {state.frozen_weights}) are not the ones this run "
                f"loaded ({frozen_weights}): --model or --init_from changed; resume with the "
                "weights it was trained on, or start a new run in another --output_dir"
            )
        saved_deepspeed = bool(manifest.get("deepspeed"))
        if saved_deepspeed != ctx.uses_deepspeed:
            raise CheckpointError(
                f"{path} was saved {'with' if saved_deepspeed else 'without'} DeepSpeed but this "
                f"run is {'with' if ctx.uses_deepspeed else 'without'} it; resume with the same "
                "accelerate config"
            )
        saved_sharding = manifest.get("sharding")
        if saved_sharding != self._sharding:
            raise CheckpointError(
                f"{path} was saved with {saved_sharding or 'whole-model ranks'} but this run uses "
                f"{self._sharding or 'whole-model ranks'}; resume with the accelerate config it "
                "was saved with"
            )
        kwargs = {}
        if ctx.uses_deepspeed:
            if state.world_size != ctx.world_size:
                raise CheckpointError(
                    f"{path} holds ZeRO-{zero3.zero_stage(self.accelerator)} "
                    f"{'parameter and ' if self._sharding else ''}optimizer shards of "
                    f"{state.world_size} ranks and cannot "
                    f"be re-sharded for {ctx.world_size}; resume with --num_processes "
                    f"{state.world_size} (plain DDP and CPU runs resume with any number of "
                    "processes)"
                )
            if not (path / DEEPSPEED_TAG).is_dir():
                raise CheckpointError(
                    f"{path} lacks {DEEPSPEED_TAG}/ (the DeepSpeed engine's "
                    "state); the state is corrupt"
                )
            kwargs = {
                "load_optimizer_states": True,
                "load_lr_scheduler_states": False,
                # bitsandbytes' statistics (absmax, quant_map, SCB) are in the saved module state
                # but are quantised again from the model folder: the rest must still match.
                "load_module_strict": not _holds_quantised_layers(self.accelerator),
            }
        try:
            with _without_positional_objects(path) as view:
                self.accelerator.load_state(str(view), **kwargs)
            if self.sharded_state is not None:
                self.sharded_state.load(path)
            for name, obj in self._objects.items():
                obj.load_state_dict(torch.load(_object_file(path, name), weights_only=True))
        except CheckpointError:
            raise
        except Exception as exc:  # unpickling a foreign or damaged file fails in many ways
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(
                f"cannot load the training state in {path} ({first}); it was written by another "
                "version of the trainer or is damaged: resume from another --output_dir or start "
                "a new run"
            ) from exc
        return state


LOCK_NAME = ".train.lock"


def _pid_alive(text: str) -> bool:
    """Whether the process whose pid is `text` still runs (a non-number counts as gone)."""
    try:
        pid = int(text)
        if pid == os.getpid():  # this run's own leftover
            return False
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _without_positional_objects(state_dir: Path) -> Iterator[Path]:
    """`state_dir` as accelerate's load_state must see it: without the positional objects of an
    older state (it refuses files that no registered object matches). Those are hidden behind a
    temporary folder of links to everything else."""
    positional = {p.name for p in state_dir.glob("custom_checkpoint_*.pkl")}
    if not positional:
        yield state_dir
        return
    with tempfile.TemporaryDirectory(prefix="state-view-") as view:
        for entry in state_dir.iterdir():
            if entry.name not in positional:
                (Path(view) / entry.name).symlink_to(entry.resolve())
        yield Path(view)


def _object_file(state_dir: Path, name: str) -> Path:
    """Where a registered object's state is: <name>.pt, or in a state written before objects
    had names, accelerate's positional custom_checkpoint_<i>.pkl."""
    named = state_dir / f"{name}.pt"
    if named.is_file() or name not in LEGACY_OBJECT_ORDER:
        return named
    return state_dir / f"custom_checkpoint_{LEGACY_OBJECT_ORDER.index(name)}.pkl"


def _holds_quantised_layers(accelerator) -> bool:
    """Whether a model the accelerator prepared has bitsandbytes-quantised layers."""
    return any(
        is_quantised_linear(sub)
        for model in accelerator._models
        for sub in accelerator.unwrap_model(model).modules()
    )


def _weights_name(index: int) -> str:
    return MODEL_NAME if index == 0 else MODEL_NAME.replace(".", f"_{index}.")
