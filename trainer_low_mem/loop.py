"""The training loop: `train(config) -> TrainResult`.

Order of work: launch sanity checks (before anything touches a GPU) -> Accelerator and rank
context -> dataset -> model -> plan (ranks agree on it) -> optimizer and schedule -> resume ->
accelerate/DeepSpeed prepare -> loader + prefetcher -> optimizer steps until --max_steps or
--epochs -> final state and weights.

One optimizer step takes `accumulation` micro-batches per rank. Its loss is the mean over every
counted target token of the step, on all ranks and micro-batches: each micro-batch's summed loss
is scaled by `accumulation * world_size / tokens_in_step` before backward, which cancels the
`1/accumulation` of accelerate (or DeepSpeed) and the `1/world_size` of the gradient all-reduce.
The loss and the gradients therefore do not depend on how the global batch is split.

Robustness:
- a CUDA out-of-memory error in a micro-batch (or an injected one, LOWMEM_INJECT_OOM_AT_STEP=k
  [LOWMEM_INJECT_OOM_RANK=r], for tests) is agreed on by all ranks; the step is dropped, the
  micro-batch halved and accumulation doubled (global batch unchanged), and the loader rebuilt at
  the data position of the last completed optimizer step. Ranks can agree wherever no gradient
  collective is in flight: after every forward, and after the backward of non-final micro-batches
  under DDP. An OOM inside the gradient all-reduce (the final backward; any DeepSpeed backward) or
  after DeepSpeed has reduced part of a step stops the run with MemoryLimitError instead;
- SIGTERM / SIGINT set a flag; at the next step boundary every rank saves the state and the job
  exits with 143 (SIGTERM) or 130 (SIGINT), without asking anything.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from pipeline import open_dataset, sizer
from lowmem_core.errors import CheckpointError, ConfigError, MemoryLimitError, PipelineError
from pipeline.loader import Loader
from lowmem_core.memory import effective_host_limit_bytes, format_bytes, process_memory, torch_cuda_memory
from pipeline.prefetch import Prefetcher
from trainer_low_mem import sanity
from trainer_low_mem.checkpoint import (MANIFEST_NAME, Checkpointer, TrainingState,
                                        save_final_weights)
from trainer_low_mem.config import JobConfig, config_hash
from trainer_low_mem.distributed import RankContext, create_accelerator, deepspeed_requested
from trainer_low_mem.model import IGNORE_INDEX, build_model, resolve_preset, shift_labels
from trainer_low_mem.watchdog import HostRamWatchdog, WatchdogAction, job_memory_bytes

EXIT_CODE_SIGINT = 130  # 128 + SIGINT, the shell's convention
EXIT_CODE_SIGTERM = 143  # 128 + SIGTERM
INJECT_OOM_ENV = "LOWMEM_INJECT_OOM_AT_STEP"
INJECT_OOM_RANK_ENV = "LOWMEM_INJECT_OOM_RANK"
_EXIT_CODES = {signal.SIGINT: EXIT_CODE_SIGINT, signal.SIGTERM: EXIT_CODE_SIGTERM}


class InjectedOutOfMemory(RuntimeError):
    """Stands in for a CUDA out-of-memory error when LOWMEM_INJECT_OOM_AT_STEP is set."""


_OOM_ERRORS = (torch.cuda.OutOfMemoryError, InjectedOutOfMemory)


@dataclass
class TrainResult:
    """What a finished (or signalled) run reports."""

    final_step: int
    total_steps: int
    losses: list[float]  # global token-mean loss of each optimizer step this process ran
    tokens_seen: int  # counted target tokens over the whole run, resumed part included
    loader_state: dict[str, Any]  # data position after the last completed optimizer step
    plan: dict[str, Any]
    world_size: int
    state_dir: Path | None
    weights_path: Path | None
    exit_code: int = 0
    backoffs: list[str] = field(default_factory=list)  # one reason per OOM backoff


class _StopSignals:
    """SIGTERM/SIGINT record the signal; a second one interrupts at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in _EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """LR factor of optimizer step s: linear warmup to 1, then cosine down to min_lr_ratio."""
    warmup = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Matrices decay; norm gains (1-D) do not.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _uses_cpu_offload(accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    zero = plugin.deepspeed_config.get("zero_optimization", {}) if plugin is not None else {}
    return zero.get("offload_optimizer", {}).get("device") == "cpu"


def _optimizer_chain(optimizer) -> list[str]:
    """Class names from the outer wrapper to the optimizer doing the update (for the start line)."""
    names = []
    while optimizer is not None and len(names) < 4:
        names.append(type(optimizer).__name__)
        optimizer = getattr(optimizer, "optimizer", None)
    return names


def _fill_deepspeed_config(accelerator, micro: int, accum: int, world_size: int, max_grad_norm: float) -> None:
    """Put the plan's sizes into the DeepSpeed config's "auto" fields; refuse hard-coded ones that differ."""
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
              "train_batch_size": micro * accum * world_size, "gradient_clipping": max_grad_norm}
    for key, value in wanted.items():
        current = ds_config.get(key, "auto")
        if current != "auto" and current != value:
            raise ConfigError(
                f"the DeepSpeed config sets {key}={current} but this run needs {value} (from the plan and "
                f"--max_grad_norm); set it to \"auto\" in the DeepSpeed JSON")
        ds_config[key] = value
    accelerator.gradient_accumulation_steps = accum


def _micro_batch_stream(prefetcher: Prefetcher) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of pass after pass (epoch after epoch) of the prefetcher."""
    while True:
        yielded = False
        for batch in prefetcher:
            yielded = True
            yield batch
        if not yielded:
            raise PipelineError("the loader produced an empty epoch; check the dataset and --max_seq_len")


def _total_steps(config: JobConfig, rows_per_epoch: int, global_batch: int) -> int:
    """--max_steps, or ceil(epochs * rows per epoch / global batch), whichever is smaller."""
    t = config.training
    epochs = t.epochs if t.epochs is not None else (None if t.max_steps is not None else 1.0)
    candidates = [t.max_steps] if t.max_steps is not None else []
    if epochs is not None:
        candidates.append(max(1, math.ceil(epochs * rows_per_epoch / global_batch)))
    return min(candidates)


class _Run:
    """One training job on this rank; `train()` builds it and calls `run()`."""

    def __init__(self, config: JobConfig, accelerator, ctx: RankContext, stop: _StopSignals):
        self.config, self.accelerator, self.ctx, self.stop = config, accelerator, ctx, stop
        self.checkpointer = Checkpointer(config.checkpoint.output_dir, ctx)
        self.step = 0
        self.tokens_seen = 0
        self.losses: list[float] = []
        self.backoffs: list[str] = []
        self._pending: list[tuple[torch.Tensor, int]] = []  # (local loss sum, global tokens) per step
        self._injected_oom = False
        resume = self._locate_resume_state()

        self.dataset = open_dataset(config.data.data)
        self.preset = resolve_preset(config.model.model_preset, self.dataset.vocab_size)
        torch.manual_seed(config.training.seed)
        self.model = build_model(self.preset, grad_checkpointing=config.model.grad_checkpointing)
        self.global_batch = config.resolve_global_batch(ctx.world_size)
        self.plan = self._make_plan()
        # The watchdog guards the job's own limit (no planning margin): --host_ram_limit, else the
        # cgroup's, else the machine's. Its reading is a collective, taken by every rank at once.
        self.watchdog = HostRamWatchdog(
            effective_host_limit_bytes(config.memory.host_ram_limit_bytes, safety_frac=0.0),
            read_used_bytes=lambda: job_memory_bytes(ctx.gather, self.plan.ranks_per_node))
        if self.plan.ultra_low_mem:
            self.dataset = self.dataset.reopen(ultra_low_mem=True)
        layout = Loader(self.dataset, batch_size=1, seq_len=config.data.max_seq_len, seed=config.training.seed,
                        packing=config.data.packing)
        self.rows_per_epoch = layout.state_dict()["total_rows"]  # the same in every epoch
        self.total_steps = _total_steps(config, self.rows_per_epoch, self.global_batch)
        self.compat = {
            "model": {"preset": config.model.model_preset, **self.preset.__dict__},
            "dataset_fingerprint": self.dataset.fingerprint, "max_seq_len": config.data.max_seq_len,
            "packing": config.data.packing, "seed": config.training.seed, "global_batch": self.global_batch,
        }

        o = config.optim
        self.uses_deepspeed = ctx.uses_deepspeed
        groups = _param_groups(self.model, o.weight_decay)
        if self.uses_deepspeed and _uses_cpu_offload(accelerator):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2))
        # Stepped by the loop once per optimizer step; not given to accelerate, which would step it
        # once per process.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(o.warmup_steps, self.total_steps, o.min_lr_ratio))

        loader_state = None
        if resume is not None and not self.uses_deepspeed:
            loader_state = self._load_state(*resume, model=self.model, optimizer=optimizer, engine=None)
        if self.uses_deepspeed:
            _fill_deepspeed_config(accelerator, self.plan.micro_batch_per_gpu, self.plan.grad_accum_steps,
                                   ctx.world_size, o.max_grad_norm)
        else:
            accelerator.gradient_accumulation_steps = self.plan.grad_accum_steps
        self.wrapped_model, self.optimizer = accelerator.prepare(self.model, optimizer)
        self.engine = self.wrapped_model if self.uses_deepspeed else None
        if resume is not None and self.uses_deepspeed:
            loader_state = self._load_state(*resume, model=self.model, optimizer=self.optimizer, engine=self.engine)

        self._build_data(loader_state)
        self.completed_loader_state = self.prefetcher.state_dict()

    # -- setup ------------------------------------------------------------------------------
    def _locate_resume_state(self) -> tuple[Path, dict[str, Any]] | None:
        ctx, ckpt = self.ctx, self.checkpointer
        if not self.config.checkpoint.is_keep_training:
            if ckpt.has_state():
                raise ConfigError(
                    f"{ckpt.latest_dir} already exists; pass --is_keep_training=True to resume it, or choose "
                    "another --output_dir for a new run")
            return None
        # Rank 0 verifies (hashes every file once); the others learn its choice: 0 latest, 1 prev.
        choice, manifest, problem = -1, None, None
        if ctx.is_main:
            try:
                path, manifest = ckpt.find_resumable()
                choice = 0 if path == ckpt.latest_dir else 1
            except CheckpointError as exc:
                problem = exc
        choice = ctx.all_reduce_max(choice)
        if choice < 0:
            if problem is not None:
                raise problem
            raise CheckpointError(f"rank 0 found no usable training state in {ckpt.output_dir} (see its message)")
        path = (ckpt.latest_dir, ckpt.prev_dir)[choice]
        if choice == 1 and ctx.is_main:
            self._print(f"warning: {ckpt.latest_dir} is incomplete or corrupt; resuming from {path}")
        if manifest is None:
            manifest = json.loads((path / MANIFEST_NAME).read_text())
        return path, manifest

    def _load_state(self, path: Path, manifest: dict[str, Any], *, model, optimizer, engine) -> dict[str, Any]:
        state = self.checkpointer.load(path, manifest, compat=self.compat, model=model, optimizer=optimizer,
                                       scheduler=self.scheduler, scaler=self.accelerator.scaler, engine=engine)
        self.step, self.tokens_seen = state.step, state.tokens_seen
        self.watchdog.load_state_dict(state.watchdog)
        if state.world_size != self.ctx.world_size:
            self._print(f"resuming a {state.world_size}-rank state with {self.ctx.world_size} ranks: the data "
                        "position and global batch carry over")
        self._print(f"resumed from {path} at step {state.step} (epoch {state.loader_state['epoch']}, "
                    f"row {state.loader_state['consumed_rows']} of the epoch)")
        return state.loader_state

    def _make_plan(self) -> sizer.Plan:
        c, ctx = self.config, self.ctx
        t = c.training
        seq_len = c.data.max_seq_len
        if ctx.device.type == "cuda" and not ctx.uses_deepspeed:
            # Measured on this GPU at the training precision (weights stay fp32 under autocast).
            autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.mixed_precision)
            memory_model = sizer.probe_model_memory(self.model.to(ctx.device), seq_len, ctx.device,
                                                    autocast_dtype=autocast)
        else:
            p = self.preset
            memory_model = sizer.analytic_model_memory(
                p.param_count(), p.n_layers, p.d_model, p.n_heads, p.vocab_size, seq_len,
                grad_checkpointing=c.model.grad_checkpointing, dtype_bytes=4 if t.mixed_precision == "no" else 2,
                d_ff=p.d_ff)
        zero_stage, offload = 0, False
        if ctx.uses_deepspeed:
            zero = self.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
            zero_stage, offload = int(zero.get("stage", 0)), _uses_cpu_offload(self.accelerator)
        # --auto_plan=False fixes the micro-batch; the sizer still checks it fits and sizes the data path.
        plan = sizer.plan(
            global_batch=self.global_batch, seq_len=seq_len, world_size=ctx.world_size, model=memory_model,
            zero_stage=zero_stage, offload_optimizer=offload, host_ram_limit_bytes=c.memory.host_ram_limit_bytes,
            dataset_bytes=sizer.dataset_size_bytes(c.data.data),
            micro_batch_per_gpu=t.batch_size_per_gpu)
        readers = c.data.num_readers if (c.data.num_readers or c.memory.auto_plan) else 1
        if readers is not None:
            plan = dataclasses.replace(plan, num_readers=readers, reasons={
                **plan.reasons, "num_readers": "given (--num_readers, or 1 with --auto_plan=False)"})
        plan = sizer.agree_across_ranks(plan, ctx.all_reduce_min)
        accum = t.gradient_accumulation_steps
        if accum is not None and accum != plan.grad_accum_steps:
            raise ConfigError(
                f"micro-batch {plan.micro_batch_per_gpu} x accumulation {accum} x {ctx.world_size} processes = "
                f"{plan.micro_batch_per_gpu * accum * ctx.world_size} rows, not the global batch "
                f"{self.global_batch}; give two of --batch_size_per_gpu, --gradient_accumulation_steps and "
                "--global_batch, or make the three agree")
        self._print(plan.table())
        return plan

    def _build_data(self, loader_state: dict[str, Any] | None) -> None:
        c, ctx, plan = self.config, self.ctx, self.plan
        loader = Loader(self.dataset, batch_size=plan.micro_batch_per_gpu, seq_len=c.data.max_seq_len, rank=ctx.rank,
                        world_size=ctx.world_size, seed=c.training.seed, packing=c.data.packing,
                        num_readers=plan.num_readers)
        if loader_state is not None:
            loader.load_state_dict(loader_state)
        self.prefetcher = Prefetcher(loader, device=ctx.device, depth=plan.prefetch_depth,
                                     pinned_pool_bytes=plan.pinned_pool_bytes, num_readers=plan.num_readers)
        self._stream = _micro_batch_stream(self.prefetcher)

    def _close_data(self) -> None:
        self._stream.close()
        self.prefetcher.close()

    # -- output -----------------------------------------------------------------------------
    def _print(self, line: str) -> None:
        if self.ctx.is_main:
            tqdm.write(line)

    def _training_state(self) -> TrainingState:
        return TrainingState(step=self.step, total_steps=self.total_steps, tokens_seen=self.tokens_seen,
                             loader_state=self.completed_loader_state, world_size=self.ctx.world_size,
                             compat=self.compat, plan=self.plan.to_dict(), config=self.config.to_dict(),
                             config_hash=config_hash(self.compat), watchdog=self.watchdog.state_dict())

    def _save(self) -> Path:
        return self.checkpointer.save(self._training_state(), model=self.model, optimizer=self.optimizer,
                                      scheduler=self.scheduler, scaler=self.accelerator.scaler, engine=self.engine)

    # -- one optimizer step -----------------------------------------------------------------
    def _agreed_failure(self, where: str, detail: str | None) -> str | None:
        """Collective: None when no rank failed at `where`, else the reason every rank reports."""
        if self.ctx.world_size == 1:
            ranks = [0] if detail is not None else []
        else:
            ranks = [r for r, failed in enumerate(self.ctx.gather(float(detail is not None))) if failed]
        if not ranks:
            return None
        return f"rank {', '.join(map(str, ranks))}, {where}" + (f": {detail}" if detail is not None else "")

    def _maybe_inject_oom(self, micro_index: int) -> None:
        at_step = os.environ.get(INJECT_OOM_ENV)
        if at_step is None or self._injected_oom or micro_index != 0 or self.step + 1 != int(at_step):
            return
        only_rank = os.environ.get(INJECT_OOM_RANK_ENV)
        if only_rank is not None and int(only_rank) != self.ctx.rank:
            return
        self._injected_oom = True
        raise InjectedOutOfMemory(f"injected out-of-memory error at step {at_step} ({INJECT_OOM_ENV})")

    def _train_step(self) -> tuple[torch.Tensor, int, float] | str:
        """Run one optimizer step; returns (local loss sum, global tokens, forward seconds) or the OOM reason."""
        ctx, accelerator, model = self.ctx, self.accelerator, self.wrapped_model
        accum = self.plan.grad_accum_steps
        # The prefetcher recycles its buffers, so the step's micro-batches are copied (3 x B x L int64
        # each: kilobytes) to count the step's target tokens before the first backward.
        micro_batches = [{k: v.clone() for k, v in next(self._stream).items()} for _ in range(accum)]
        counts = torch.stack([(shift_labels(mb["labels"]) != IGNORE_INDEX).sum() for mb in micro_batches])
        global_tokens = int(ctx.all_reduce_sum(int(counts.sum().item())))
        scale = accum * ctx.world_size / max(global_tokens, 1)
        loss_sum = torch.zeros((), dtype=torch.float32, device=ctx.device)
        forward_s = 0.0
        for i, mb in enumerate(micro_batches):
            last = i == accum - 1
            with accelerator.accumulate(model):
                detail = None
                try:
                    self._maybe_inject_oom(i)
                    t0 = time.perf_counter()
                    out = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], labels=mb["labels"])
                    forward_s += time.perf_counter() - t0
                    token_loss_sum = out.loss * out.n_loss_tokens
                except _OOM_ERRORS as exc:
                    detail = str(exc).splitlines()[0]
                failure = self._agreed_failure(f"micro-batch {i} forward", detail)
                if failure is not None:
                    if self.uses_deepspeed and i > 0:
                        # DeepSpeed has already reduced this step's earlier micro-batches into its
                        # gradient partitions, which cannot be rolled back from here.
                        raise MemoryLimitError(
                            f"out of memory in a DeepSpeed step ({failure}); restart with a smaller "
                            "--batch_size_per_gpu or --grad_checkpointing=True")
                    return failure
                try:
                    accelerator.backward(token_loss_sum * scale)
                except _OOM_ERRORS as exc:
                    detail = str(exc).splitlines()[0]
                # Backward passes of non-final micro-batches run no collectives under DDP, so ranks can
                # still agree; the final one (and every DeepSpeed one) is inside the gradient
                # all-reduce, where one rank cannot back off alone.
                if ctx.world_size == 1 or (not last and not self.uses_deepspeed):
                    failure = self._agreed_failure(f"micro-batch {i} backward", detail)
                    if failure is not None:
                        return failure
                elif detail is not None:
                    raise MemoryLimitError(
                        f"out of GPU memory inside the gradient all-reduce (rank {ctx.rank}, micro-batch {i} "
                        f"backward: {detail}); the ranks cannot back off together there: restart with a smaller "
                        "--batch_size_per_gpu or --grad_checkpointing=True")
                loss_sum += token_loss_sum.detach()
        if not accelerator.sync_gradients:
            raise RuntimeError("gradient accumulation is out of step with the plan; this is a bug")
        max_norm = self.config.optim.max_grad_norm
        if max_norm > 0 and not self.uses_deepspeed:  # DeepSpeed clips inside its step (gradient_clipping)
            accelerator.clip_grad_norm_(model.parameters(), max_norm)
        self.optimizer.step()
        if not self.optimizer.step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, global_tokens, forward_s

    def _back_off(self, reason: str) -> None:
        """Halve the micro-batch (global batch unchanged) and restart the step from the last completed position."""
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.wrapped_model, torch.nn.parallel.DistributedDataParallel):
            # A rank whose forward succeeded left its DDP reducer armed for a backward that never ran;
            # its next no_sync backward would then start a gradient all-reduce that the other ranks
            # never join. Every rank resets its reducer (as DDP does when its process group changes).
            self.wrapped_model._has_rebuilt_buckets = False
            self.wrapped_model.reducer._reset_state()
        self._close_data()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        old = self.plan
        self.plan = old.backoff()  # MemoryLimitError at a micro-batch of 1
        if self.uses_deepspeed:
            self.engine.set_train_micro_batch_size(self.plan.micro_batch_per_gpu)
            self.engine.set_train_batch_size(self.global_batch)
        self.accelerator.gradient_accumulation_steps = self.plan.grad_accum_steps
        self.accelerator.step = 0
        self._build_data(self.completed_loader_state)
        message = (f"out of memory at step {self.step + 1} ({reason}): micro-batch {old.micro_batch_per_gpu} -> "
                   f"{self.plan.micro_batch_per_gpu}, accumulation {old.grad_accum_steps} -> "
                   f"{self.plan.grad_accum_steps}, global "
                   f"batch {self.global_batch} unchanged; retrying the step from the same data position")
        self.backoffs.append(message)
        self._print(message)

    def _apply_watchdog(self) -> bool:
        """Let the host-RAM watchdog act after a completed step; True when the run must stop."""
        decision = self.watchdog.check(self.step, prefetch_depth=self.plan.prefetch_depth,
                                       ultra_low_mem=self.dataset.ultra_low_mem)
        if decision is None:
            return False
        self._print(f"host-RAM watchdog: {decision.message}")
        if decision.action is WatchdogAction.SAVE_AND_STOP:
            return True
        # Both remedies rebuild the data path at the last completed step, so no batch is lost.
        self._close_data()
        if decision.action is WatchdogAction.SHRINK_PREFETCH:
            self.plan = dataclasses.replace(self.plan, prefetch_depth=decision.prefetch_depth)
        else:
            self.dataset = self.dataset.reopen(ultra_low_mem=True)
            self.plan = dataclasses.replace(self.plan, ultra_low_mem=True)
        self._build_data(self.completed_loader_state)
        return False

    # -- logging ----------------------------------------------------------------------------
    def _flush_losses(self) -> list[float]:
        """Global loss of each step since the last flush (one collective for all of them)."""
        if not self._pending:
            return []
        sums = self.ctx.sum_over_ranks([float(s.item()) for s, _ in self._pending])
        losses = [s / max(n, 1) for s, (_, n) in zip(sums, self._pending)]
        self._pending.clear()
        self.losses.extend(losses)
        return losses

    def _log(self, window: dict[str, float], losses: list[float], window_tokens: int) -> None:
        ctx = self.ctx
        wall_s = max(window["wall_s"], 1e-9)
        # Per-rank numbers in one collective: mean step time, mean forward time, data-wait fraction, USS.
        steps = max(window["steps"], 1)
        mine = [window["step_s"] / steps, window["forward_s"] / steps, window["wait_s"] / wall_s,
                float(process_memory().uss_bytes)]
        slots = [0.0] * (4 * ctx.world_size)
        slots[4 * ctx.rank: 4 * ctx.rank + 4] = mine
        per_rank = ctx.sum_over_ranks(slots)
        step_s = per_rank[0::4]
        forward_s = per_rank[1::4]
        wait_frac = max(per_rank[2::4])
        job_uss_bytes = int(sum(per_rank[3::4]))
        if not ctx.is_main:
            return
        loss = sum(losses) / len(losses)
        spread = (max(step_s) - min(step_s)) / (sum(step_s) / len(step_s)) if min(step_s) > 0 else 0.0
        cuda = torch_cuda_memory(ctx.device)
        if cuda is not None:
            total = torch.cuda.get_device_properties(cuda.device_index).total_memory
            gpu = (f"gpu mem: {format_bytes(cuda.allocated_bytes)}/{format_bytes(cuda.peak_allocated_bytes)}/"
                   f"{format_bytes(total)} (alloc/peak/total)")
        else:
            gpu = "gpu mem: cpu"
        line = (f"step: {self.step}/{self.total_steps}, loss: {loss:.4f}, tokens/s: {window_tokens / wall_s:,.0f}, "
                f"data-wait: {100 * wait_frac:.1f}%, {gpu}, host RAM: {format_bytes(job_uss_bytes)} job USS "
                f"(limit {format_bytes(self.plan.host_limit_bytes)})")
        if ctx.world_size > 1:
            line += (f", rank step s: {' '.join(f'{s:.4f}' for s in step_s)} (spread {100 * spread:.1f}%), "
                     f"rank forward s: {' '.join(f'{s:.4f}' for s in forward_s)}")
        self._print(line)
        if self.config.log.log_with is not None:
            self.accelerator.log({"loss": loss, "tokens_per_s": window_tokens / wall_s, "data_wait_frac": wait_frac,
                                  "lr": self.scheduler.get_last_lr()[0], "job_uss_bytes": job_uss_bytes,
                                  "step_time_spread_frac": spread}, step=self.step)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        c, ctx = self.config, self.ctx
        self._print(f"world_size: {ctx.world_size}, device: {ctx.device}, distributed: "
                    f"{self.accelerator.distributed_type}, deepspeed: {self.uses_deepspeed}, optimizer: "
                    f"{' > '.join(_optimizer_chain(self.optimizer))}, global batch: "
                    f"{self.global_batch} rows x {c.data.max_seq_len} tokens, steps: {self.step}/{self.total_steps}")
        if c.log.log_with is not None:
            self.accelerator.init_trackers("train_low_mem", config=c.flat_dict())
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (ctx.is_main and c.log.progress_bar),
                   unit="step", dynamic_ncols=True)
        window = dict(wall_s=0.0, step_s=0.0, forward_s=0.0, wait_s=0.0, steps=0)
        window_tokens, window_start = 0, time.perf_counter()
        wait_at_start = self.prefetcher.wait_s_total
        exit_code = 0
        try:
            while self.step < self.total_steps:
                signum = ctx.all_reduce_max(self.stop.signum) if ctx.world_size > 1 else self.stop.signum
                if signum:
                    exit_code = _EXIT_CODES.get(signum, 128 + signum)
                    self._print(f"received {signal.Signals(signum).name}: saving the state at step {self.step} "
                                f"and exiting with code {exit_code}")
                    break
                t0 = time.perf_counter()
                outcome = self._train_step()
                if isinstance(outcome, str):
                    window["wait_s"] += self.prefetcher.wait_s_total - wait_at_start
                    self._back_off(outcome)
                    wait_at_start = self.prefetcher.wait_s_total
                    continue
                loss_sum, global_tokens, forward_s = outcome
                self.step += 1
                self.tokens_seen += global_tokens
                window_tokens += global_tokens
                self.completed_loader_state = self.prefetcher.state_dict()
                self._pending.append((loss_sum, global_tokens))
                window["step_s"] += time.perf_counter() - t0
                window["forward_s"] += forward_s
                window["steps"] += 1
                bar.update(1)
                done = self.step == self.total_steps
                if self.step % c.log.log_every == 0 or done:
                    losses = self._flush_losses()
                    now = time.perf_counter()
                    window["wall_s"] = now - window_start
                    window["wait_s"] += self.prefetcher.wait_s_total - wait_at_start
                    self._log(window, losses, window_tokens)
                    window = dict(wall_s=0.0, step_s=0.0, forward_s=0.0, wait_s=0.0, steps=0)
                    window_tokens, window_start = 0, time.perf_counter()
                    wait_at_start = self.prefetcher.wait_s_total
                prefetcher = self.prefetcher
                if self._apply_watchdog():
                    exit_code = MemoryLimitError.exit_code
                    break
                if self.prefetcher is not prefetcher:
                    # Rebuilt by the watchdog: bank the old prefetcher's wait, the new one counts from 0.
                    window["wait_s"] += prefetcher.wait_s_total - wait_at_start
                    wait_at_start = self.prefetcher.wait_s_total
                if c.checkpoint.save_every and self.step % c.checkpoint.save_every == 0 and not done:
                    self._save()
        finally:
            bar.close()
            self._close_data()  # joins the reader threads, also when a step raised
        self._flush_losses()
        state_dir = self._save()
        weights_path = None
        if exit_code == 0:
            if ctx.is_main:
                model_config = {"preset": c.model.model_preset, **self.preset.__dict__,
                                "tokenizer_id": self.dataset.tokenizer_id, "step": self.step}
                weights_path = save_final_weights(c.checkpoint.output_dir, self.model, model_config)
                self._print(f"saved {state_dir} and final weights {weights_path}")
            ctx.barrier()
        if c.log.log_with is not None:
            self.accelerator.end_training()
        return TrainResult(final_step=self.step, total_steps=self.total_steps, losses=self.losses,
                           tokens_seen=self.tokens_seen, loader_state=self.completed_loader_state,
                           plan=self.plan.to_dict(), world_size=ctx.world_size, state_dir=state_dir,
                           weights_path=weights_path, exit_code=exit_code, backoffs=self.backoffs)


def train(config: JobConfig) -> TrainResult:
    """Run the job described by `config` on this process's rank; see the module docstring."""
    sanity.set_cuda_alloc_conf()  # before anything can initialise CUDA
    t = config.training
    sanity.check_launch(sanity.launch_facts_from_env(
        global_batch=t.global_batch, micro_batch_per_gpu=t.batch_size_per_gpu or 1,
        grad_accum_steps=t.gradient_accumulation_steps, seq_len=config.data.max_seq_len,
        model_max_seq_len=resolve_preset(config.model.model_preset).max_seq_len))
    if config.log.log_with == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--log_with tensorboard needs the tensorboard package: "
                          "pip install lowmem-pipeline[tensorboard]")
    accelerator = create_accelerator(mixed_precision=t.mixed_precision,
                                     cpu_multiprocess=sanity.detect_cpu_multiprocess(),
                                     log_with=config.log.log_with, project_dir=config.checkpoint.output_dir / "runs")
    ctx = RankContext.from_accelerator(accelerator)
    if deepspeed_requested() and not ctx.uses_deepspeed:
        raise ConfigError("the accelerate config asks for DeepSpeed but accelerate did not enable it; "
                          "check that deepspeed is installed and the config's deepspeed_config_file exists")
    with _StopSignals() as stop:
        return _Run(config, accelerator, ctx, stop).run()
