"""The training loop: `train(config) -> TrainResult`.

Order of work: the launch read and checked (before anything touches a GPU) -> Accelerator and
rank context -> `_Run`'s start-up phases (dataset, the job built as `plan` builds it, model,
plan, loader, optimizer and prepare, resume) -> optimizer steps until --max_steps or --epochs ->
final state and weights.

Components: `data` (dataset opened once; loader + prefetcher), `planner`, `optim` (optimizer and
schedule), `step` (one optimizer step, accumulation driven explicitly), `oom` (agreement and
backoff), `metrics` (log line, trackers), `checkpoint` (atomic state around accelerate's
save_state), `watchdog` (host RAM).

Out-of-memory errors are agreed on and backed off by every rank together (see `oom`). SIGTERM /
SIGINT set a flag; at the next step boundary every rank saves the state and the job exits with
143 (SIGTERM) or 130 (SIGINT).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lowmem_core.errors import (
    ConfigError,
    LowMemError,
    MemoryLimitError,
    RankLostError,
    StoppedError,
    require_extra,
)
from lowmem_core.memory import effective_host_limit_bytes, format_bytes
from pipeline import open_dataset
from trainer_low_mem import fsdp, oom, sanity, zero3
from trainer_low_mem.checkpoint import (
    Checkpointer,
    TrainingState,
)
from trainer_low_mem.config import JobConfig
from trainer_low_mem.data import TrainData, check_shard_sizes, verify_dataset
from trainer_low_mem.distributed import RankContext, create_accelerator, peer_lost
from trainer_low_mem.evaluate import evaluate
from trainer_low_mem.export import EXPORT_DIR_NAME, export_model
from trainer_low_mem.job import FlagChecks, build_job, check_flags
from trainer_low_mem.launch import Launch, detect_cpu_multiprocess
from trainer_low_mem.metrics import Metrics
from trainer_low_mem.models import trainable_parameter_count
from trainer_low_mem.models.init_weights import load_initial_weights
from trainer_low_mem.optim import (
    build_optimizer,
    build_scheduler,
    fill_deepspeed_config,
    optimizer_chain,
)
from trainer_low_mem.planner.load_memory import rank0_loads_alone
from trainer_low_mem.progress import RunProgress, TrainResult, check_resume_settings, total_steps
from trainer_low_mem.run_lock import lock_output_dir
from trainer_low_mem.signals import EXIT_CODES, StopSignals
from trainer_low_mem.state_files import config_hash, read_training_state, weights_fingerprint
from trainer_low_mem.step import StepOutcome, Stepper
from trainer_low_mem.stop import stop_when_parent_dies
from trainer_low_mem.watchdog import HostRamWatchdog, WatchdogAction, job_memory_bytes


class _Run:
    """One training job on this rank; `train()` builds it and calls `run()`.

    Start-up runs in this order, each phase a method (a later one reads what the earlier ones
    set): `_open_data` (the dataset, its checksums, the state to resume) -> `_build_job` (every
    check, shared with `plan`) -> `_build_model` (weights, --init_from, LoRA, placed on the
    device) -> `_make_plan` (ranks agree) -> `_configure_data` (loader for the plan, steps of the
    run) -> `_prepare` (optimizer, schedule, accelerate/DeepSpeed) -> `_restore` (resume, then
    the prefetcher starts at the restored position).
    """

    def __init__(
        self,
        config: JobConfig,
        launch: Launch,
        flags: FlagChecks,
        accelerator,
        ctx: RankContext,
        stop: StopSignals,
    ):
        self.config, self.launch, self.flags, self.accelerator = config, launch, flags, accelerator
        self.ctx, self.stop = ctx, stop
        self.checkpointer = Checkpointer(config.checkpoint.output_dir, ctx, accelerator)
        self._open_data()
        self._build_job()
        with zero3.whole_model_build(accelerator):
            self._build_model()
            self._make_plan()
        self._configure_data()
        self._prepare()
        self._restore()
        self.backoffs: list[str] = []
        self.metrics = Metrics(
            ctx,
            accelerator,
            wait_s_total=lambda: self.data.wait_s_total,
            grad_norm=lambda: self.stepper.last_grad_norm,
            use_trackers=self.config.log.log_with is not None,
            pad_id=self.data.dataset.pad_id,
        )

    # -- start-up phases --------------------------------------------------------------------
    def _open_data(self) -> None:
        d, t, ctx = self.config.data, self.config.training, self.ctx
        self.resume = self.checkpointer.locate_resume(self.config.checkpoint.is_keep_training)
        self.data = TrainData(
            d.data, seed=t.seed, rank=ctx.rank, world_size=ctx.world_size, device=ctx.device
        )
        if not d.no_verify:
            verify_dataset(d.data, ctx)
        e = self.config.eval
        self.eval_dataset = open_dataset(e.eval_data) if e.eval_data is not None else None

    def _build_job(self) -> None:
        saved = read_training_state(self.resume[0]).loader_state if self.resume else None
        self.job = build_job(
            self.config,
            self.launch,
            self.data.dataset,
            saved,
            eval_dataset=self.eval_dataset,
            flags=self.flags,
        )
        self.global_batch = self.job.global_batch

    def _build_model(self) -> None:
        torch.manual_seed(self.config.training.seed)
        job, m = self.job, self.config.model
        # Under FSDP2 only rank 0 reads the weights; the others build the model on the meta
        # device and get rank 0's weights as `shard_model` shards it.
        rank0_alone = rank0_loads_alone(
            self.launch.sharding_engine, self.launch.param_offload == "cpu"
        )
        on_meta = rank0_alone and not self.ctx.is_main
        if on_meta:
            with torch.device("meta"):
                self.module = job.kind.build(
                    job.vocab_size, document_masking=job.document_masking, weights=False
                )
        else:
            self.module = job.build_model()
        if rank0_alone:
            # The generator as rank 0's build left it (meta tensors draw nothing), as every
            # rank had it when all built the weights: LoRA dropout and the rest draw the same.
            torch.set_rng_state(self.ctx.gather(torch.get_rng_state())[0])
        self.built_bytes = fsdp.materialised_bytes(self.module)
        description = job.kind.describe(self.module)
        weight_files = job.kind.weight_files()
        if m.init_from is not None:
            if not on_meta:
                load_initial_weights(job.kind, self.module, m.init_from)
            description += f", weights from {m.init_from}"
            weight_files += tuple(Path(m.init_from).glob("*.safetensors"))
        frozen = any(not p.requires_grad for p in self.module.parameters())
        # States hold what training changes; the frozen weights are read again at resume.
        self.frozen_weights = weights_fingerprint(weight_files) if frozen else None
        self._print(f"model: {description}")
        trainable, total = trainable_parameter_count(self.module)
        self._print(
            f"trainable parameters: {trainable:,} of {total:,} "
            f"({100.0 * trainable / max(total, 1):.2f}%)"
        )
        if not self.launch.deepspeed and self.launch.sharding_engine != fsdp.ENGINE:
            # Where it trains, before planning: a GPU plan probes it there. DeepSpeed places
            # the model itself in `prepare`; FSDP2 moves one block at a time in `shard_model`,
            # so no rank ever holds the whole model on its device.
            self.module.to(self.ctx.device)

    def _make_plan(self) -> None:
        ctx = self.ctx
        self.plan = self.job.plan(
            device=ctx.device.type, model=self.module, all_reduce_min=ctx.all_reduce_min
        )
        self._print(self.plan.table())
        # The watchdog guards the job's own limit (no planning margin): --host_ram_limit, else
        # the cgroup's, else the machine's. Its reading is a collective, taken by every rank.
        self.watchdog = HostRamWatchdog(
            effective_host_limit_bytes(self.config.memory.host_ram_limit_bytes, safety_frac=0.0),
            read_used_bytes=lambda: job_memory_bytes(ctx.gather, self.plan.ranks_per_node),
        )

    def _configure_data(self) -> None:
        c = self.config
        self.data.configure(self.plan, self.job.batch_spec)
        self.total_steps = total_steps(c, self.data.rows_per_epoch, self.global_batch)
        self._print(self.data.summary())
        self.compat = {
            "model": self.job.identity,
            "dataset_fingerprint": self.data.dataset.fingerprint,
            "max_seq_len": c.data.max_seq_len,
            "packing": c.data.packing,
            "seed": c.training.seed,
            "global_batch": self.global_batch,
        }

    def _prepare(self) -> None:
        o, launch, accelerator = self.config.optim, self.launch, self.accelerator
        if launch.offloads_optimizer:
            self._print(
                "optimizer: DeepSpeed's CPU Adam (its C++ op is compiled on first use: a few "
                "minutes, once per machine)"
            )
        fsdp2 = launch.sharding_engine == fsdp.ENGINE
        if fsdp2:  # before the optimizer, which must hold the shards
            whole_bytes = fsdp.local_parameter_bytes(self.module)
            built_bytes = self.ctx.gather(self.built_bytes)
            fsdp.shard_model(
                self.module,
                mixed_precision=launch.mixed_precision,
                offload_params=launch.param_offload == "cpu",
                device=self.ctx.device,
            )
            self._print(
                f"FSDP2: parameters sharded over {self.ctx.world_size} ranks: "
                f"{format_bytes(fsdp.local_parameter_bytes(self.module))} on rank 0 of "
                f"{format_bytes(whole_bytes)}"
                + (", resting in host RAM" if launch.param_offload == "cpu" else "")
                + f"; bytes of model built before sharding, by rank: {built_bytes}"
            )
        optimizer = build_optimizer(
            self.module, o, cpu_offload=launch.offloads_optimizer, optimizer=self.plan.optimizer
        )
        self.scheduler = build_scheduler(optimizer, o, self.total_steps)
        if launch.deepspeed:
            fill_deepspeed_config(
                accelerator,
                self.plan.micro_batch_per_rank,
                self.plan.grad_accum_steps,
                launch.world_size,
                o.max_grad_norm,
            )
        if fsdp2:  # sharded above: accelerate would wrap it again (DDP on CPU ranks)
            model = self.module
            self.checkpointer.sharded_state = fsdp.ShardedState(model, optimizer)
        else:
            model, optimizer = accelerator.prepare(self.module, optimizer)
        if launch.zero_stage == 3:
            zero3.gather_loss_head(self.module)
            local_bytes, whole_bytes = zero3.parameter_bytes(self.module)
            self._print(
                f"ZeRO-3: parameters partitioned over {self.ctx.world_size} ranks: "
                f"{format_bytes(local_bytes)} on rank 0 of {format_bytes(whole_bytes)}"
                + (", resting in host RAM" if launch.param_offload == "cpu" else "")
            )
        self.stepper = Stepper(
            accelerator,
            self.ctx,
            model,
            optimizer,
            self.scheduler,
            labels_shifted=self.job.batch_spec.labels_shifted,
            max_grad_norm=o.max_grad_norm,
            max_bad_steps=o.max_bad_steps,
            offload_activations=self.plan.offload_activations,
            memory_advice=self.plan.memory_advice(),
            fsdp2=fsdp2,
        )
        self._apply_plan_sizes()

    def _restore(self) -> None:
        # Model, optimizer and RNG are accelerate's; the schedule is saved by name; progress,
        # data position and watchdog live in the state's record (training_state.json).
        self.progress = RunProgress()
        self.checkpointer.register("scheduler", self.scheduler)
        if self.resume is not None:
            self._resume(*self.resume)
        self.data.start(self.progress.loader_state)
        self.progress.loader_state = self.data.state_dict()

    def _apply_plan_sizes(self) -> None:
        plan = self.plan
        self.stepper.set_sizes(plan.micro_batch_per_rank, plan.grad_accum_steps, self.global_batch)

    def _resume(self, path: Path, manifest: dict[str, Any]) -> None:
        """Restore model, optimizer and every registered object from the state in `path`."""
        if path == self.checkpointer.prev_dir:
            self._print(
                f"warning: {self.checkpointer.latest_dir} is incomplete or corrupt; "
                f"resuming from {path}"
            )
        record = self.checkpointer.load(
            path, manifest, compat=self.compat, frozen_weights=self.frozen_weights
        )
        self.progress.load_state_dict(
            {
                "step": record.step,
                "tokens_seen": record.tokens_seen,
                "loader_state": record.loader_state,
            }
        )
        self.watchdog.load_state_dict(record.watchdog)
        if record.world_size != self.ctx.world_size:
            self._print(
                f"resuming a {record.world_size}-rank state with {self.ctx.world_size} "
                "ranks: the data position and global batch carry over"
            )
        p = self.progress
        check_resume_settings(record.config, self.config.to_dict(), p.step, self.total_steps)
        self._print(
            f"resumed from {path} at step {p.step} (epoch {p.loader_state['epoch']}, "
            f"row {p.loader_state['consumed_rows']} of the epoch)"
        )

    # -- output -----------------------------------------------------------------------------
    def _print(self, line: str) -> None:
        if self.ctx.is_main:
            tqdm.write(line)

    def _save_due(self) -> bool:
        """Collective: a save is due by steps (--save_every) or by time (--save_every_minutes)
        on any rank, so every rank saves at the same step."""
        c, step = self.config.checkpoint, self.progress.step
        due = bool(c.save_every) and step % c.save_every == 0
        if c.save_every_minutes:
            due = due or time.monotonic() - self._saved_at_s >= 60.0 * c.save_every_minutes
            if self.ctx.world_size > 1:
                due = bool(self.ctx.all_reduce_max(int(due)))
        return due

    def _save(self) -> Path:
        started = time.monotonic()
        check_shard_sizes(self.config.data.data)
        p = self.progress
        record = TrainingState(
            step=p.step,
            total_steps=self.total_steps,
            tokens_seen=p.tokens_seen,
            loader_state=p.loader_state,
            world_size=self.ctx.world_size,
            compat=self.compat,
            plan=self.plan.to_dict(),
            config=self.config.to_dict(),
            config_hash=config_hash(self.compat),
            watchdog=self.watchdog.state_dict(),
            frozen_weights=self.frozen_weights,
        )
        path = self.checkpointer.save(record)
        self._saved_at_s = time.monotonic()
        self._print(
            f"saved the state at step {p.step} to {path} ({self._saved_at_s - started:.1f} s)"
        )
        return path

    # -- one optimizer step -----------------------------------------------------------------
    def _train_step(self) -> StepOutcome | str:
        """The next optimizer step: its outcome, or the agreed out-of-memory reason."""
        micro_batches = [self.data.next_batch() for _ in range(self.plan.grad_accum_steps)]
        self.metrics.count_batches(micro_batches)
        return self.stepper.run(micro_batches, self.progress.step + 1)

    def _back_off(self, reason: str) -> None:
        """Halve the micro-batch (global batch unchanged); retry from the last completed step."""
        self.data.close()
        self.stepper.reset_after_oom()
        old, self.plan = self.plan, self.plan.backoff()  # MemoryLimitError at a micro-batch of 1
        self._apply_plan_sizes()
        self.data.restart(self.plan, self.progress.loader_state)
        message = oom.backoff_message(
            self.progress.step + 1, reason, old, self.plan, self.global_batch
        )
        self.backoffs.append(message)
        self._print(message)

    def _apply_watchdog(self) -> bool:
        """Let the host-RAM watchdog act after a completed step; True when the run must stop."""
        decision = self.watchdog.check(
            self.progress.step,
            prefetch_depth=self.plan.prefetch_depth,
            ultra_low_mem=self.data.dataset.ultra_low_mem,
        )
        if decision is None:
            return False
        self._print(f"host-RAM watchdog: {decision.message}")
        if decision.action is WatchdogAction.SAVE_AND_STOP:
            return True
        if decision.action is WatchdogAction.SHRINK_PREFETCH:
            self.plan = self.plan.with_prefetch_depth(decision.prefetch_depth, "host-RAM watchdog")
        else:
            self.plan = self.plan.with_ultra_low_mem("host-RAM watchdog")
        # Rebuilt at the last completed step, so no batch is lost.
        self.data.restart(self.plan, self.progress.loader_state)
        return False

    # -- the loop ---------------------------------------------------------------------------
    def _signalled_exit_code(self) -> int:
        """Collective: the exit code of a stop signal received by any rank, else 0."""
        ctx = self.ctx
        signum = ctx.all_reduce_max(self.stop.signum) if ctx.world_size > 1 else self.stop.signum
        if not signum:
            return 0
        code = EXIT_CODES.get(signum, 128 + signum)
        self._print(
            f"received {signal.Signals(signum).name}: saving the state at step "
            f"{self.progress.step} and exiting with code {code}"
        )
        return code

    def run(self) -> TrainResult:
        c, ctx, p = self.config, self.ctx, self.progress
        self._print(
            f"world_size: {ctx.world_size}, device: {ctx.device}, distributed: "
            f"{self.accelerator.distributed_type}, deepspeed: {ctx.uses_deepspeed}, optimizer: "
            f"{' > '.join(optimizer_chain(self.stepper.optimizer))}, global batch: "
            f"{self.global_batch} rows x {c.data.max_seq_len} tokens, "
            f"steps: {p.step}/{self.total_steps}"
        )
        self.metrics.start_trackers(c.flat_dict())
        bar = self.metrics.progress_bar(
            self.total_steps, p.step, enabled=ctx.is_main and c.log.progress_bar
        )
        exit_code = 0
        last_eval = -1
        self._saved_at_s = time.monotonic()
        try:
            if p.step == 0 and self.eval_dataset is not None:
                last_eval = self._evaluate()
            while p.step < self.total_steps:
                exit_code = self._signalled_exit_code()
                if exit_code:
                    break
                t0 = time.perf_counter()
                outcome = self._train_step()
                if isinstance(outcome, str):
                    self._back_off(outcome)
                    continue
                loss_sum, global_tokens, forward_s = outcome
                if self.stepper.skipped:
                    self._print(
                        f"warning: step {p.step + 1} had a non-finite loss or gradient norm and "
                        "was skipped (no update)"
                    )
                p.step += 1
                p.tokens_seen += global_tokens
                p.loader_state = self.data.state_dict()
                self.metrics.add_step(loss_sum, global_tokens, time.perf_counter() - t0, forward_s)
                done = p.step == self.total_steps
                if p.step % c.log.log_every == 0 or done:
                    line = self.metrics.log(
                        p.step,
                        self.total_steps,
                        self.plan.host_limit_bytes,
                        self.scheduler.get_last_lr()[0],
                    )
                    if line is not None:
                        self._print(line)
                if self._apply_watchdog():
                    exit_code = MemoryLimitError.exit_code
                    break
                if done:
                    break  # the final state is saved, then evaluated, below
                # Saved before an eval, so a crash during the eval loses no step.
                if self._save_due():
                    self._save()
                every = c.eval.eval_every
                if self.eval_dataset is not None and every and p.step % every == 0:
                    last_eval = self._evaluate()
                export_every = c.checkpoint.export_every
                if export_every and p.step % export_every == 0:
                    self._export()
        finally:
            bar.close()
            self.data.close()  # joins the reader threads, also when a step raised
        self.metrics.flush_losses()
        state_dir = self._save()
        if self.eval_dataset is not None and exit_code == 0 and last_eval != p.step:
            self._evaluate()
        export_dir = self._export() if exit_code == 0 else None
        self.metrics.end_trackers()
        return TrainResult(
            final_step=p.step,
            total_steps=self.total_steps,
            losses=self.metrics.losses,
            tokens_seen=p.tokens_seen,
            loader_state=p.loader_state,
            plan=self.plan.to_dict(),
            world_size=ctx.world_size,
            state_dir=state_dir,
            export_dir=export_dir,
            exit_code=exit_code,
            backoffs=self.backoffs,
        )

    def _evaluate(self) -> int:
        """Collective: score the eval set once (document masking on), log it; returns the step."""
        c, ctx, step = self.config, self.ctx, self.progress.step
        loader = self.data.make_loader(self.eval_dataset, self.plan.micro_batch_per_rank)
        with self.job.kind.eval_mode(self.module):
            result = evaluate(
                self.stepper.model, loader, device=ctx.device, sum_over_ranks=ctx.sum_over_ranks
            )
        self._print(f"step: {step}/{self.total_steps}, eval_loss: {result.loss:.4f}")
        if c.log.log_with is not None:
            self.accelerator.log(result.to_dict(), step=step)
        return step

    def _export(self) -> Path:
        """Collective: rank 0 writes OUTPUT_DIR/final, a folder transformers loads."""
        out = self.config.checkpoint.output_dir / EXPORT_DIR_NAME
        # ZeRO-3 and FSDP2: every rank gathers, rank 0 writes.
        with zero3.gathered(self.module), fsdp.gathered(self.module):
            if self.ctx.is_main:
                export_model(
                    self.job.kind,
                    self.module,
                    out,
                    self.job.data,
                    adapter_only=self.config.checkpoint.export_adapter_only,
                )
                self._print(f"exported step {self.progress.step} to {out}")
        self.ctx.barrier()
        return out


def train(config: JobConfig) -> TrainResult:
    """Run the job described by `config` on this process's rank; see the module docstring."""
    sanity.set_cuda_alloc_conf()  # before anything can initialise CUDA
    if "LOCAL_RANK" in os.environ:  # started by a launcher: stop with it, even after kill -9
        stop_when_parent_dies()
    t = config.training
    launch = Launch.from_env(t.mixed_precision)
    # Before any GPU work, process group or file: what the flags alone decide.
    flags = check_flags(config, launch)
    if launch.config_is_deepspeed_json:
        # Resolved from the project root too: accelerate would open it from the working folder.
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = launch.config_file
    if config.log.log_with == "tensorboard":
        require_extra("tensorboard", "tensorboard", "--log_with tensorboard")
    accelerator = create_accelerator(
        mixed_precision=launch.mixed_precision,
        cpu_multiprocess=detect_cpu_multiprocess(),
        deepspeed=launch.deepspeed,
        log_with=config.log.log_with,
        project_dir=config.checkpoint.output_dir / "runs",
    )
    ctx = RankContext.from_accelerator(accelerator)
    if launch.deepspeed and not ctx.uses_deepspeed:
        raise ConfigError(
            "the accelerate config asks for DeepSpeed but accelerate did not enable "
            "it; check that deepspeed is installed and the config's "
            "deepspeed_config_file exists"
        )
    lock = lock_output_dir(config.checkpoint.output_dir, ctx)
    try:
        with StopSignals() as stop:
            try:
                return _Run(config, launch, flags, accelerator, ctx, stop).run()
            except Exception as exc:
                lost = "" if stop.signum else peer_lost(exc)
                if lost:
                    # A killed rank or node: every survivor's next collective fails at once
                    # (its sockets closed), where a traceback would hide the cause.
                    raise RankLostError(
                        f"another rank of the job is gone ({lost}): a process or a "
                        "node died, see its log; the last saved state is intact: resume every "
                        "node with --is_keep_training=True"
                    ) from exc
                if not stop.signum or isinstance(exc, LowMemError):
                    raise
                # A stopped job's collectives fail once a rank is gone: say so in one line.
                name = signal.Signals(stop.signum).name
                raise StoppedError(
                    f"stopped by {name} before the job could save ({type(exc).__name__} once "
                    "a rank had gone); the last saved state, if any, is unchanged: resume "
                    "with --is_keep_training=True",
                    EXIT_CODES.get(stop.signum, 128 + stop.signum),
                ) from exc
    finally:
        if lock is not None:
            lock.release()
