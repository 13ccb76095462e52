"""One path from flags to a job, shared by `plan` and `train`: `build_job(...) -> Job`.

Every check that decides whether a job can run is made here once, in this order: the launch
(sanity.py), the batch split (planner/batch.py), the model kind (models/), the row length against
the model, the dataset against the model, and, for `train` (the command that writes), its output
folder: --model and --init_from outside it, and its final/ holding nothing but an earlier export
(export.py). The `Job` then holds what the rest needs: the model kind (exporting in
--export_dtype), the dataset's facts, the batches the model takes, and how to plan it, so `plan`
and `train` cannot decide differently on the same flags.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lowmem_core.errors import ConfigError, LowMemError
from pipeline.batch_spec import BatchSpec
from trainer_low_mem.checkpoint import STATE_DIR_NAME
from trainer_low_mem.config import JobConfig, PlanConfig
from trainer_low_mem.export import EXPORT_DIR_NAME, check_export_folder
from trainer_low_mem.launch import Launch
from trainer_low_mem.models import DataFacts, ModelKind, resolve_model_kind
from trainer_low_mem.planner import Plan, plan_for_job
from trainer_low_mem.planner.batch import check_split
from trainer_low_mem.planner.job import loss_chunk_for_job
from trainer_low_mem.sanity import check_launch


@dataclass(frozen=True)
class Job:
    """A checked job: what `plan` prints and what `train` runs."""

    config: JobConfig | PlanConfig
    launch: Launch
    kind: ModelKind
    data: DataFacts | None  # None: `plan` without --data
    batch_spec: BatchSpec
    vocab_size: int  # the dataset's, else --vocab_size, else the model's own
    document_masking: bool
    global_batch: int

    @property
    def identity(self) -> dict[str, Any]:
        """The model's identity: what resume compares and the planner's trace cache keys."""
        return self.kind.identity(self.vocab_size)

    def build_model(self) -> nn.Module:
        """The model to train, with its weights (seed torch first for reproducible ones)."""
        return self.kind.build(
            self.vocab_size, document_masking=self.document_masking, weights=True
        )

    def plan(
        self, *, device: str | None = None, model: nn.Module | None = None, all_reduce_min=None
    ) -> Plan:
        """The plan of this job. `model`: the live model, probed where it sits on the GPU (the
        trainer places it first); the planner never moves it, and gives it the plan's loss chunk
        before probing it, as it gives the model it traces. `all_reduce_min`: ranks agree."""
        launch, m = self.launch, self.config.model
        shape = self._shape()
        chunk = loss_chunk_for_job(
            self.config,
            shape.vocab_size,
            world_size=launch.world_size,
            device=device,
            ranks_per_node=launch.ranks_per_node,
            host_from_flags=launch.host_from_flags,
            all_reduce_min=all_reduce_min,
        )
        if model is not None:
            _use_loss_chunk(model, chunk.value)
        key = {
            "model": self.identity,
            "grad_checkpointing": m.grad_checkpointing,
            "document_masking": self.document_masking,
            "load_in_4bit": m.load_in_4bit,
            "loss_chunk_tokens": chunk.value,
        }
        return plan_for_job(
            self.config,
            shape,
            world_size=launch.world_size,
            device=device,
            zero_stage=launch.zero_stage,
            offload_optimizer=launch.offload_to_host_ram,
            deepspeed=launch.deepspeed,
            model=model,
            model_factory=functools.partial(self._meta_factory, chunk.value),
            dataset_bytes=None if self.data is None else self.data.token_bytes,
            index_bytes=None if self.data is None else self.data.index_bytes,
            all_reduce_min=all_reduce_min,
            ranks_per_node=launch.ranks_per_node,
            num_cores=launch.num_cores,
            host_from_flags=launch.host_from_flags,
            model_key=json.dumps(key, sort_keys=True, default=str),
            batch_spec=self.batch_spec,
            levers=launch.levers(m.grad_checkpointing),
            loss_chunk=chunk,
            sharding=launch.sharding_engine,
            offload_params=launch.param_offload == "cpu",
        )

    def _meta_factory(self, loss_chunk_tokens: int) -> nn.Module:
        """The model without weights, LoRA included: the planner builds it on the meta device."""
        model = self.kind.build(
            self.vocab_size, document_masking=self.document_masking, weights=False
        )
        return _use_loss_chunk(model, loss_chunk_tokens)

    def _shape(self):
        """What the analytic count reads: the kind's dimensions and parameter counts."""
        try:
            return self.kind.shape(self.vocab_size)
        except LowMemError:
            raise
        except Exception as exc:  # noqa: BLE001 (the architecture's own code; one line)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ConfigError(
                f"{self.kind.what} cannot be built from its config.json on the meta device "
                f"({type(exc).__name__}: {first}); plan on a machine where `train` builds it, "
                "or check the folder's config"
            ) from exc


def _use_loss_chunk(model: nn.Module, loss_chunk_tokens: int) -> nn.Module:
    """`model` computing its loss `loss_chunk_tokens` positions at a time (every model kind's
    module reads `loss_chunk_tokens` at each forward)."""
    model.loss_chunk_tokens = loss_chunk_tokens
    return model


@dataclass(frozen=True)
class FlagChecks:
    """What the flags and the launch alone decide: checked before any process group, GPU work
    or file write, so a mistake there costs nothing."""

    kind: ModelKind
    global_batch: int


def check_flags(config: JobConfig | PlanConfig, launch: Launch) -> FlagChecks:
    """The checks that need no dataset: the launch, the batch split, the model kind (its
    config.json), the row length against the model."""
    check_launch(launch)
    quantisation = config.model.quantisation
    if quantisation is not None and launch.sharding_engine == "fsdp2":
        # fully_shard turns every parameter into a DTensor, and bitsandbytes' packed 4-bit/8-bit
        # weights (uint8/int8 codes with their statistics beside them) do not survive it.
        raise ConfigError(
            f"--load_in_{quantisation} cannot run under FSDP2 (bitsandbytes' quantised weights "
            "are not sharded); launch QLoRA with accelerate_configs/multi_gpu_3.yaml or "
            "zero2_offload_3gpu.yaml, or drop the flag to shard a bf16 LoRA base"
        )
    t, d = config.training, config.data
    global_batch = config.resolve_global_batch(launch.world_size)
    check_split(
        global_batch, launch.world_size, t.batch_size_per_gpu, t.gradient_accumulation_steps
    )
    kind = resolve_model_kind(config.model, launch.mixed_precision)
    if d.max_seq_len > kind.max_seq_len:
        raise ConfigError(
            f"--max_seq_len {d.max_seq_len} exceeds {kind.what}'s max_seq_len "
            f"{kind.max_seq_len}; lower --max_seq_len to at most {kind.max_seq_len} or choose a "
            "model with a longer context"
        )
    return FlagChecks(kind, global_batch)


def build_job(
    config: JobConfig | PlanConfig,
    launch: Launch,
    dataset=None,
    saved_loader_state: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    eval_dataset=None,
    flags: FlagChecks | None = None,
) -> Job:
    """Check `config` on `launch` (and `dataset`, opened by the caller) and return the job.

    `saved_loader_state`: the data position a resumed run continues from; an encoder-decoder
    keeps the row layout it was saved with. `vocab_size`: the vocabulary without a dataset
    (`plan --vocab_size`; default the model's own). Raises ConfigError (one line) for the first
    check that fails. `eval_dataset` (train's --eval_data) is checked as the dataset is, and
    must hold the same tokenizer's ids. `flags`: `check_flags`' result when the caller made
    those checks already (train, before its process group exists).
    """
    flags = flags or check_flags(config, launch)
    kind, global_batch, d = flags.kind, flags.global_batch, config.data
    data = None if dataset is None else DataFacts.of(d.data, dataset)
    if data is not None:
        kind.check_data(data)
    if eval_dataset is not None:
        held_out = DataFacts.of(config.eval.eval_data, eval_dataset)
        kind.check_data(held_out)
        _check_same_tokenizer(held_out, data)
    if isinstance(config, JobConfig):  # `train`: `plan` writes nothing
        _check_output_dir(config, data)
        kind = kind.with_export_dtype(config.checkpoint.export_dtype)
    masking = config.model.document_masking
    if masking is None:
        masking = data is not None and data.is_sft
    return Job(
        config=config,
        launch=launch,
        kind=kind,
        data=data,
        batch_spec=kind.batch_spec(dataset, d.max_seq_len, d.packing, saved_loader_state),
        vocab_size=data.vocab_size if data is not None else vocab_size or kind.vocab_size,
        document_masking=masking,
        global_batch=global_batch,
    )


def _check_same_tokenizer(held_out: DataFacts, data: DataFacts) -> None:
    """The eval set's ids mean what the training set's mean (a preset takes its vocabulary from
    the training set, so nothing else would catch another tokenizer's ids)."""
    ours = (data.tokenizer_id, data.vocab_size, data.eos_id)
    theirs = (held_out.tokenizer_id, held_out.vocab_size, held_out.eos_id)
    if ours != theirs:
        raise ConfigError(
            f"--eval_data {held_out.path} was built with tokenizer {held_out.tokenizer_id} "
            f"(vocabulary {held_out.vocab_size}, EOS {held_out.eos_id}) but --data {data.path} "
            f"with {data.tokenizer_id} (vocabulary {data.vocab_size}, EOS {data.eos_id}); "
            "rebuild the eval split with the same --tokenizer"
        )


def _check_output_dir(config: JobConfig, data: DataFacts | None) -> None:
    """`train` writes OUTPUT_DIR/train_latest_state and replaces OUTPUT_DIR/final: refuse a
    model or initial weights inside it (they would be replaced), and a final/ holding files no
    export wrote (they would be deleted), before any training time is spent."""
    out = config.checkpoint.output_dir
    for flag, path in (("--model", config.model.model), ("--init_from", config.model.init_from)):
        if path is not None and _is_within(path, out):
            raise ConfigError(
                f"{flag} {path} is inside --output_dir {out}, whose {EXPORT_DIR_NAME}/ and "
                f"{STATE_DIR_NAME}/ this run replaces; copy it out of {out} or choose another "
                "--output_dir"
            )
    check_export_folder(out / EXPORT_DIR_NAME, None if data is None else data.tokenizer_dir)


def _is_within(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies under it, links resolved."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents
