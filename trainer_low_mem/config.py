"""The training job's configuration: small dataclasses composed into `JobConfig`.

Defaults and help text live here and nowhere else; `trainer_low_mem.cli` generates the flags from
these classes with tyro. Flags are flat (`--max_steps`, not `--training.max_steps`) and use the
seed's spellings (`--is_keep_training=True`, `--batch_size_per_gpu`,
`--gradient_accumulation_steps`, `--max_seq_len`), so field names are unique across the classes.
Each class validates itself in `__post_init__` and raises `ConfigError` with one line naming the
field, what was found and what to use instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from lowmem_core.errors import ConfigError
from lowmem_core.units import parse_byte_size

DEFAULT_GLOBAL_BATCH_ROWS = 32


def _require_positive(name: str, value: int | float | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--{name} must be a finite number greater than 0, got {value!r}")


def _require_finite(name: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise ConfigError(f"--{name} must be a finite number, got {value!r}")


@dataclass(kw_only=True)
class DataConfig:
    """Where the tokens come from and how rows are cut."""

    data: Path = Path("data/tokens")
    """Dataset directory written by `python -m pipeline build` (index.json + shard-*.arrow)."""

    max_seq_len: int = 512
    """Tokens per row (sequence length); must not exceed the model preset's context length."""

    packing: bool = True
    """True: concatenate documents (EOS-separated) into full rows; False: one document per row,
    padded."""

    num_readers: int | None = None
    """Reader threads that fill batches; default: chosen by the sizer (or 1 without --auto_plan)."""

    no_verify: bool = False
    """Skip the shard checksum check at the start of training (it is cached per dataset)."""

    def __post_init__(self) -> None:
        _require_positive("max_seq_len", self.max_seq_len, allow_none=False)
        _require_positive("num_readers", self.num_readers)
        self.data = Path(self.data)


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA flags of a job as one object: what builds the adapters and what a resumed run
    must match."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...] | None  # None: every linear layer but the output head

    def identity(self) -> dict[str, Any]:
        """The adapters' identity, as training states have recorded it since LoRA was added."""
        targets = None if self.target_modules is None else list(self.target_modules)
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "targets": str(targets),
        }


@dataclass(kw_only=True)
class ModelConfig:
    """Which model to train: a built-in preset or your own Hugging Face folder, optionally LoRA."""

    model_preset: str = "small"
    """Built-in decoder preset name (see trainer_low_mem/model.py MODEL_PRESETS), e.g. tiny or
    small."""

    model: Path | None = None
    """A local Hugging Face model folder (config.json, weights, tokenizer files); replaces
    --model_preset. Fine-tunes from its weights (model.safetensors, shards with or without their
    index, consolidated.safetensors, pytorch_model*.bin), every one of which must fit the
    config; a folder without weights needs --from_scratch. Nothing is downloaded."""

    from_scratch: bool = False
    """With --model: random initialisation from the folder's config.json, ignoring its weights."""

    init_from: Path | None = None
    """Start from the weights of an export (OUTPUT_DIR/final) or a training state
    (OUTPUT_DIR/train_latest_state), with a fresh optimizer, schedule and data position: e.g.
    pretraining, then SFT on another dataset."""

    grad_checkpointing: bool = False
    """Recompute block activations in the backward pass: less GPU memory, about 30% more compute."""

    document_masking: bool | None = None
    """Packed documents attend only to themselves (block-diagonal causal attention). Default: on
    for prompt/response (SFT) datasets and for eval, off for plain-text pretraining."""

    lora_rank: int | None = None
    """Train LoRA adapters of this rank instead of all weights (needs the `lora` extra: peft)."""

    lora_alpha: float = 16.0
    """LoRA scaling numerator: the adapter's update is scaled by lora_alpha / lora_rank."""

    lora_dropout: float = 0.0
    """Dropout on the LoRA adapters' input (0 keeps runs bit-reproducible)."""

    lora_target_modules: list[str] | None = None
    """Names of the linear layers that get adapters (e.g. q_proj v_proj); default: every linear
    layer but the output head (the head and weights tied to another layer are refused)."""

    load_in_4bit: bool = False
    """QLoRA: load --model's weights as 4-bit NF4 with double quantisation (bitsandbytes: the
    `qlora` extra; CPU or CUDA), computed in --mixed_precision's dtype; needs --lora_rank."""

    load_in_8bit: bool = False
    """Load --model's weights as 8-bit integers (bitsandbytes LLM.int8: the `qlora` extra) and
    train LoRA adapters on them; needs --lora_rank."""

    @property
    def lora(self) -> LoraSettings | None:
        """The LoRA settings, or None when the whole model trains."""
        if self.lora_rank is None:
            return None
        targets = self.lora_target_modules
        return LoraSettings(
            self.lora_rank,
            self.lora_alpha,
            self.lora_dropout,
            None if targets is None else tuple(targets),
        )

    def __post_init__(self) -> None:
        self.model = None if self.model is None else Path(self.model)
        self.init_from = None if self.init_from is None else Path(self.init_from)
        if self.from_scratch and self.model is None:
            raise ConfigError("--from_scratch needs --model DIR (a Hugging Face folder's config)")
        if self.lora_rank is not None:
            if self.lora_rank < 1:
                raise ConfigError(f"--lora_rank must be 1 or greater, got {self.lora_rank}")
            _require_positive("lora_alpha", self.lora_alpha, allow_none=False)
            if not 0.0 <= self.lora_dropout < 1.0:
                raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("--load_in_4bit and --load_in_8bit exclude each other: keep one")
        for flag in ("load_in_4bit", "load_in_8bit"):
            if getattr(self, flag) and (self.model is None or self.lora_rank is None):
                raise ConfigError(
                    f"--{flag} needs --model DIR and --lora_rank R: quantised weights are frozen, "
                    "so only LoRA adapters on them can train"
                )

    @property
    def quantisation(self) -> Literal["4bit", "8bit"] | None:
        """How --model's frozen weights are stored, or None for their own dtype."""
        if self.load_in_4bit:
            return "4bit"
        return "8bit" if self.load_in_8bit else None


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay, and gradient clipping."""

    lr: float = 3e-4
    """Peak learning rate, reached after --warmup_steps optimizer steps."""

    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio."""

    warmup_steps: int = 100
    """Optimizer steps of linear warmup from 0 to --lr (capped at the run's total steps)."""

    weight_decay: float = 0.1
    """Decoupled AdamW weight decay (not applied to norms and biases)."""

    adam_beta1: float = 0.9
    """AdamW beta1."""

    adam_beta2: float = 0.95
    """AdamW beta2."""

    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    max_bad_steps: int = 3
    """Stop with an error after this many consecutive steps with a non-finite loss or gradient
    norm (each one is skipped: no update, no schedule step)."""

    def __post_init__(self) -> None:
        _require_positive("lr", self.lr, allow_none=False)
        _require_positive("max_bad_steps", self.max_bad_steps, allow_none=False)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup_steps must be 0 or greater, got {self.warmup_steps}")
        for name in ("weight_decay", "max_grad_norm"):
            _require_finite(name, getattr(self, name))
        if self.weight_decay < 0:
            raise ConfigError(f"--weight_decay must be 0 or greater, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.max_grad_norm < 0:
            raise ConfigError(
                f"--max_grad_norm must be 0 (off) or greater, got {self.max_grad_norm}"
            )


@dataclass(kw_only=True)
class TrainingConfig:
    """Batch sizes, length of the run, precision and seed."""

    global_batch: int | None = None
    """Rows per optimizer step over all ranks and accumulation (tokens = rows * max_seq_len); kept
    fixed whatever the micro-batch. Default: batch_size_per_gpu * gradient_accumulation_steps *
    world size when both are given, else 32."""

    batch_size_per_gpu: int | None = None
    """Micro-batch rows per rank; with --auto_plan the sizer chooses it when not given."""

    gradient_accumulation_steps: int | None = None
    """Micro-batches per optimizer step; derived from the global batch when not given."""

    max_steps: int | None = None
    """Stop after this many optimizer steps (the smaller of this and --epochs wins)."""

    epochs: float | None = None
    """Stop after this many passes over the data (fractions allowed); default 1 when --max_steps is
    unset."""

    seed: int = 0
    """Seeds the data order and the model initialisation; resume keeps the saved seed."""

    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision for forward/backward (master weights stay fp32); under DeepSpeed the
    DeepSpeed config decides."""

    optimizer: Literal["auto", "adamw", "adamw_8bit"] = "auto"
    """adamw: fp32 states (8 bytes per trained parameter); adamw_8bit: bitsandbytes' blockwise
    8-bit states (2 bytes; the `qlora` extra; not under DeepSpeed); auto: adamw unless the plan
    needs the 8-bit states to fit. Under ZeRO optimizer offload DeepSpeed's CPU Adam steps the
    states in host RAM (auto and adamw)."""

    offload_activations: Literal["auto", "on", "off"] = "auto"
    """Keep the activations saved for backward in pinned host RAM instead of device memory (same
    losses, more host RAM and copies; parameters and tensors under 1 KiB stay); auto: on only
    with a GPU, when the plan needs it to fit and the host RAM limit leaves room."""

    def __post_init__(self) -> None:
        for name in (
            "global_batch",
            "batch_size_per_gpu",
            "gradient_accumulation_steps",
            "max_steps",
            "epochs",
        ):
            _require_positive(name, getattr(self, name))
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed must be in [0, 2**63), got {self.seed}")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Where the run's state and final weights go, and when they are written."""

    output_dir: Path = Path("model_save")
    """Holds train_latest_state/ (the resumable state) and final/ (the exported model, a folder
    transformers loads); --model and --init_from must lie outside it."""

    is_keep_training: Annotated[bool, tyro.conf.arg(aliases=("--resume",))] = False
    """Resume from OUTPUT_DIR/train_latest_state: same data position, optimizer and schedule."""

    save_every: int = 1000
    """Write train_latest_state every this many optimizer steps (also at the end and on
    SIGTERM/SIGINT); 0 saves only then."""

    save_every_minutes: float = 10.0
    """Also write train_latest_state once this many minutes have passed since the last save, so
    a crash loses at most about this much work whatever the step time; 0 turns it off."""

    export_every: int = 0
    """Also write OUTPUT_DIR/final (a folder transformers loads) every this many optimizer steps;
    0 exports only at the end."""

    export_adapter_only: bool = False
    """With LoRA on a Hugging Face --model: export the adapters alone (peft format) instead of
    merging them into the weights."""

    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The dtype of the exported weights; auto: the source's (--model's config.json dtype, else
    its weights'; float32 for a built-in preset). Training stays float32 whatever it is."""

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        if self.export_adapter_only and self.export_dtype != "auto":
            raise ConfigError(
                f"--export_dtype {self.export_dtype} applies to merged weights, but "
                "--export_adapter_only writes the adapters as they trained; drop one of the two"
            )
        for name in ("save_every", "export_every", "save_every_minutes"):
            _require_finite(name, getattr(self, name))
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"--{name} must be 0 (only at the end) or greater, got {getattr(self, name)}"
                )


@dataclass(kw_only=True)
class EvalConfig:
    """A held-out dataset evaluated exactly once per eval: at step 0, every N steps, at the end."""

    eval_data: Path | None = None
    """A dataset built by `python -m pipeline build` (e.g. the held-out split); each sample is
    evaluated exactly once across ranks, attention within documents."""

    eval_every: int = 0
    """Evaluate every this many optimizer steps (and before the first and after the last);
    0 evaluates only before the first and after the last."""

    def __post_init__(self) -> None:
        self.eval_data = None if self.eval_data is None else Path(self.eval_data)
        if self.eval_every < 0:
            raise ConfigError(f"--eval_every must be 0 or greater, got {self.eval_every}")
        if self.eval_every and self.eval_data is None:
            raise ConfigError("--eval_every needs --eval_data DIR (a built dataset)")


@dataclass(kw_only=True)
class MemoryConfig:
    """The host-RAM budget and whether the sizer plans the batch layout."""

    host_ram_limit: str | None = None
    """Host RAM the job may use, in bytes or with a unit (24GB, 16GiB); default: the machine's or
    cgroup's limit as the sizer reads it."""

    device_budget: str | None = None
    """Memory each rank may use on its device, in bytes or with a unit (20GiB); default: the least
    free memory over the visible GPUs, or without a GPU this rank's share of host RAM."""

    auto_plan: bool = True
    """Let the sizer choose micro-batch, accumulation, readers, prefetch depth and pinning (the
    global batch stays fixed); False uses --batch_size_per_gpu and --gradient_accumulation_steps as
    given."""

    def __post_init__(self) -> None:
        if self.host_ram_limit is not None:
            parse_byte_size(self.host_ram_limit, flag="--host_ram_limit")
        if self.device_budget is not None:
            parse_byte_size(self.device_budget, flag="--device_budget")

    @property
    def host_ram_limit_bytes(self) -> int | None:
        """--host_ram_limit in bytes, or None for the detected limit."""
        if self.host_ram_limit is None:
            return None
        return parse_byte_size(self.host_ram_limit, flag="--host_ram_limit")

    @property
    def device_budget_bytes(self) -> int | None:
        """--device_budget in bytes, or None for the detected budget."""
        if self.device_budget is None:
            return None
        return parse_byte_size(self.device_budget, flag="--device_budget")


@dataclass(kw_only=True)
class LogConfig:
    """What is printed and tracked."""

    log_every: int = 10
    """Print the step line (loss, train and label tokens/s, padding, data wait, GPU and host
    memory) every this many optimizer steps."""

    log_with: Literal["tensorboard"] | None = None
    """Also send the metrics to an accelerate tracker (tensorboard writes under OUTPUT_DIR/runs)."""

    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0."""

    def __post_init__(self) -> None:
        _require_positive("log_every", self.log_every, allow_none=False)


@dataclass(kw_only=True)
class JobConfig:
    """One training job: `train_low_mem.py train --data DIR --model_preset small ...`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        t, m = self.training, self.model
        if self.checkpoint.export_adapter_only and (m.lora_rank is None or m.model is None):
            raise ConfigError(
                "--export_adapter_only writes LoRA adapters in peft's format, which needs "
                "--lora_rank and a Hugging Face --model; drop it to export merged weights"
            )
        if not self.memory.auto_plan and t.batch_size_per_gpu is None:
            raise ConfigError(
                "--auto_plan=False needs --batch_size_per_gpu (and --gradient_accumulation_steps "
                "or --global_batch); or keep --auto_plan=True to let the sizer choose"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict (paths as strings)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobConfig:
        """Inverse of `to_dict`; unknown keys raise ConfigError."""
        parts = {}
        for f in dataclasses.fields(cls):
            sub_cls = f.default_factory  # type: ignore[misc]
            values = dict(d.get(f.name, {}))
            known = {sf.name for sf in dataclasses.fields(sub_cls)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise ConfigError(f"unknown {f.name} config keys {unknown}; known: {sorted(known)}")
            parts[f.name] = sub_cls(**values)
        return cls(**parts)

    def flat_dict(self) -> dict[str, Any]:
        """Flag name -> value, as the user types them (for trackers and logs)."""
        return {k: v for part in self.to_dict().values() for k, v in part.items()}

    def resolve_global_batch(self, world_size: int) -> int:
        """The global batch in rows for this world size (see --global_batch)."""
        t = self.training
        if t.global_batch is not None:
            return t.global_batch
        if t.batch_size_per_gpu is not None and t.gradient_accumulation_steps is not None:
            return t.batch_size_per_gpu * t.gradient_accumulation_steps * world_size
        if not self.memory.auto_plan and t.batch_size_per_gpu is not None:
            return t.batch_size_per_gpu * world_size
        return DEFAULT_GLOBAL_BATCH_ROWS


@dataclass(kw_only=True)
class PlanDataConfig(DataConfig):
    """The data as a plan sees it: the dataset is optional."""

    data: Path | None = None
    """A built dataset (optional): its vocabulary, and its size, which decides between
    memory-mapped and ultra-low-mem reading."""

    def __post_init__(self) -> None:
        _require_positive("max_seq_len", self.max_seq_len, allow_none=False)
        _require_positive("num_readers", self.num_readers)
        self.data = None if self.data is None else Path(self.data)


@dataclass(kw_only=True)
class LaunchConfig:
    """The launch a plan is made for (`train` reads these from accelerate and the machine)."""

    world_size: int = 1
    """Training processes (one per GPU) over all nodes."""

    ranks_per_node: int | None = None
    """Processes sharing one host's RAM; default: min(world size, visible GPUs), or the world size
    without GPUs."""

    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (plain DDP), 1 (optimizer states partitioned), 2 (gradients too),
    3 (parameters too)."""

    offload_optimizer: bool = False
    """ZeRO CPU offload: fp32 master weights and Adam states live in host RAM (needs --zero_stage
    1, 2 or 3)."""

    fsdp: bool = False
    """FSDP2 (accelerate's fsdp_version: 2): parameters, gradients and optimizer states sharded
    over the ranks, one transformer block gathered at a time."""

    offload_params: bool = False
    """Sharded parameters rest in host RAM between uses (FSDP2's fsdp_offload_params, ZeRO-3's
    offload_param; needs --fsdp or --zero_stage 3)."""

    num_cores: int | None = None
    """CPU cores of the host; default: this process's affinity, capped by the cgroup's cpu.max."""

    def __post_init__(self) -> None:
        for name in ("world_size", "ranks_per_node", "num_cores"):
            _require_positive(name, getattr(self, name), allow_none=name != "world_size")
        # The ZeRO rules are the launch's, checked for `plan` and `train` alike (sanity.py).


@dataclass(kw_only=True)
class PlanConfig:
    """The plan a run would use: the flags of `train` that shape memory, and the launch's."""

    data: PlanDataConfig = field(default_factory=PlanDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    vocab_size: int | None = None
    """The vocabulary size without --data (e.g. 259 for the byte tokenizer); default: the
    preset's."""

    json: bool = False
    """Print the plan as JSON instead of a table."""

    def __post_init__(self) -> None:
        _require_positive("vocab_size", self.vocab_size)

    def resolve_global_batch(self, world_size: int) -> int:
        """The global batch in rows, by the job's rule (see --global_batch)."""
        return JobConfig.resolve_global_batch(self, world_size)  # type: ignore[arg-type]
