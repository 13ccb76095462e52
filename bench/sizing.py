"""`bench sizing`: the users' models on the users' machines, planned by `plan` itself.

It writes each model's config.json (dimensions from the model cards; no weights: `plan` builds
them on the meta device), runs `plan_from_config` (the code path of `train_low_mem.py plan`) for
every machine and method, and prints one row per run: the chosen micro-batch and accumulation,
the device peak and its terms, host RAM per process and per node, and a published figure beside
it (LLaMA-Factory's hardware table, DeepSpeed's ZeRO-2 and ZeRO-3 estimators) with the reason
they differ. The sharded rows (`SHARDED_ROWS`) plan a few of the jobs again under FSDP2 and
ZeRO-3 on the three 20 GB cards. `--markdown PATH` writes the table as docs/SIZING.md holds it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lowmem_core.errors import ConfigError, LowMemError, MemoryLimitError

GiB = 1 << 30
SEQ_LEN = 1024  # LLaMA-Factory's figures use cutoff_len 1024
GLOBAL_BATCH = 16  # on one GPU; on three, 18 (16 rows do not split evenly over 3 ranks)
LORA_RANK = 16

_DECODER = {"max_position_embeddings": 32768, "dtype": "bfloat16", "hidden_act": "silu"}
# config.json of each model, from its model card (dimensions that decide memory).
MODEL_CONFIGS: dict[str, dict] = {
    "Qwen1.5-7B": {
        **_DECODER,
        "model_type": "qwen2",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
        "eos_token_id": 151643,
    },
    "Qwen3-1.7B": {
        **_DECODER,
        "model_type": "qwen3",
        "hidden_size": 2048,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 6144,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "eos_token_id": 151645,
    },
    "Qwen2.5-0.5B": {
        **_DECODER,
        "model_type": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "eos_token_id": 151643,
    },
    "Llama-3.2-1B": {
        **_DECODER,
        "model_type": "llama",
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "intermediate_size": 8192,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "eos_token_id": 128001,
    },
    "T5-base": {
        "model_type": "t5",
        "d_model": 768,
        "d_kv": 64,
        "d_ff": 3072,
        "num_layers": 12,
        "num_decoder_layers": 12,
        "num_heads": 12,
        "vocab_size": 32128,
        "is_encoder_decoder": True,
        "tie_word_embeddings": True,
        "feed_forward_proj": "relu",
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": 1,
    },
}
PRESETS = ("small", "medium")
# Planned only in the sharded rows: the size that three 20 GB cards full fine-tune only sharded.
SHARDED_ONLY_CONFIGS: dict[str, dict] = {
    "Qwen2.5-3B": {
        **_DECODER,
        "model_type": "qwen2",
        "hidden_size": 2048,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "intermediate_size": 11008,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "eos_token_id": 151643,
    },
}


@dataclass(frozen=True)
class Machine:
    name: str
    gpus: int
    gpu_bytes: int
    host_bytes: int


MACHINES = (
    Machine("1x12GB, 16GB RAM", 1, 12 * GiB, 16 * GiB),
    Machine("1x16GB, 32GB RAM", 1, 16 * GiB, 32 * GiB),
    Machine("3x20GB, 32GB RAM", 3, 20 * GiB, 32 * GiB),
)
METHODS = ("full", "lora", "qlora")
# The `plan` flags of each parameter-sharding launch, and the jobs planned under each of them on
# the three 20 GB cards (the machine where every rank holding the whole model runs out first).
SHARDED_LAUNCHES = {
    "FSDP2": ["--fsdp"],
    "FSDP2 offload": ["--fsdp", "--offload_params"],
    "ZeRO-3": ["--zero_stage", "3"],
    "ZeRO-3 offload": ["--zero_stage", "3", "--offload_optimizer"],
    "ZeRO-3 offload+params": ["--zero_stage", "3", "--offload_optimizer", "--offload_params"],
}
SHARDED_ROWS = (
    ("Qwen2.5-3B", "full", tuple(SHARDED_LAUNCHES)),
    ("Qwen1.5-7B", "lora", ("FSDP2", "ZeRO-3")),
)
SHARDED_MACHINE = MACHINES[2]


@dataclass
class Row:
    model: str
    method: str
    machine: Machine
    fits: bool
    launch: str = ""  # "DDP", "ZeRO-2 offload"
    micro: int = 0
    accum: int = 0
    device_peak_bytes: int = 0
    terms: dict[str, int] = field(default_factory=dict)
    activations_bytes: int = 0
    host_per_process_bytes: int = 0
    host_node_bytes: int = 0
    params: int = 0
    published: str = ""
    difference: str = ""
    note: str = ""  # why it does not fit, or why it could not be planned

    @property
    def peak_gib(self) -> float:
        return self.device_peak_bytes / GiB


def write_model_folder(root: Path, name: str) -> Path:
    """The folder `plan --model` reads: config.json alone."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    config = {**MODEL_CONFIGS, **SHARDED_ONLY_CONFIGS}[name]
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def global_batch(machine: Machine) -> int:
    """GLOBAL_BATCH, rounded up to a multiple of the machine's GPUs."""
    return -(-GLOBAL_BATCH // machine.gpus) * machine.gpus


def plan_config(
    model: str,
    folder: Path | None,
    method: str,
    machine: Machine,
    offload: bool,
    sharded: str | None = None,
):
    """The `plan` flags of one row; `sharded` names a `SHARDED_LAUNCHES` entry."""
    from trainer_low_mem.cli import parse_plan_config

    argv = [
        "--max_seq_len", str(SEQ_LEN),
        "--global_batch", str(global_batch(machine)),
        "--mixed_precision", "bf16",
        "--device_budget", str(machine.gpu_bytes),
        "--host_ram_limit", str(machine.host_bytes),
        "--world_size", str(machine.gpus),
        "--ranks_per_node", str(machine.gpus),
        "--num_cores", "8",
        "--grad_checkpointing", "True",
    ]  # fmt: skip
    argv += ["--model", str(folder)] if folder is not None else ["--model_preset", model]
    if method != "full":
        argv += ["--lora_rank", str(LORA_RANK)]
    if method == "qlora":
        argv += ["--load_in_4bit"]
    if offload:
        argv += ["--zero_stage", "2", "--offload_optimizer"]
    if sharded is not None:
        argv += SHARDED_LAUNCHES[sharded]
    return parse_plan_config(argv)


def sharded_row(model: str, folder: Path | None, method: str, launch: str) -> Row:
    """Plan one job under a parameter-sharding launch on `SHARDED_MACHINE`."""
    from trainer_low_mem.cli import plan_from_config

    row = Row(model, method, SHARDED_MACHINE, fits=False, launch=launch)
    config = plan_config(model, folder, method, SHARDED_MACHINE, False, sharded=launch)
    try:
        result = plan_from_config(config)
    except MemoryLimitError as exc:
        row.note = str(exc).split(". ")[0][:160]
        return row
    except (ConfigError, LowMemError) as exc:
        row.note = f"not planned: {str(exc).replace(str(folder), model)[:160]}"
        return row
    _fill(row, result.to_dict(), launch)
    return row


def sharded_rows() -> list[Row]:
    """The `SHARDED_ROWS` jobs under each of their launches, with DeepSpeed's ZeRO-3 figure."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowmem-sizing-") as tmp:
        for model, method, launches in SHARDED_ROWS:
            folder = write_model_folder(Path(tmp), model)
            params = param_count(model, folder)
            largest = largest_layer_params(folder)
            for launch in launches:
                row = sharded_row(model, folder, method, launch)
                row.params = params
                add_sharded_published(row, largest)
                rows.append(row)
    return rows


def plan_row(model: str, folder: Path | None, method: str, machine: Machine) -> Row:
    """Plan one row: DDP first; full fine-tuning that does not fit tries ZeRO-2 with the
    optimizer offloaded to host RAM."""
    from trainer_low_mem.cli import plan_from_config

    row = Row(model, method, machine, fits=False)
    attempts = [False, True] if method == "full" else [False]
    for offload in attempts:
        try:
            result = plan_from_config(plan_config(model, folder, method, machine, offload))
        except MemoryLimitError as exc:
            row.note = str(exc).split(". ")[0][:160]
            continue
        except (ConfigError, LowMemError) as exc:
            # The row's folder is a temporary one: name the model instead.
            row.note = f"not planned: {str(exc).replace(str(folder), model)[:160]}"
            return row
        _fill(row, result.to_dict(), "ZeRO-2 offload" if offload else "DDP")
        return row
    return row


def _fill(row: Row, d: dict, launch: str) -> None:
    fp = d["footprint"]
    row.fits = True
    extras = [d.get("optimizer", "adamw")]
    extras += ["activation offload"] if d.get("offload_activations") else []
    row.launch = f"{launch}, {', '.join(extras)}"
    row.micro, row.accum = d["micro_batch_per_rank"], d["grad_accum_steps"]
    row.device_peak_bytes = d["device_peak_bytes_planned"]
    row.activations_bytes = fp["activation_bytes_per_token"] * fp["seq_len"] * row.micro
    row.terms = _parse_states(fp["states"])
    row.host_node_bytes = d["host_bytes_planned"]
    # The load copy is freed before the offloaded states exist (the planner's Footprint).
    load_or_offloaded = max(fp.get("load_bytes", 0), fp["offloaded_bytes"])
    row.host_per_process_bytes = fp["process_bytes"] + load_or_offloaded


def _parse_states(states: str) -> dict[str, int]:
    """`weights 3.27 GiB + gradients 66.50 MiB + ...` as bytes by kind."""
    units = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
    terms = {}
    for part in states.split(" (")[0].split(" + "):
        words = part.split()
        if len(words) >= 3 and words[-1] in units:
            terms[" ".join(words[:-2])] = int(float(words[-2]) * units[words[-1]])
    return terms


def largest_layer_params(folder: Path) -> int:
    """The largest module's own parameters, as DeepSpeed's `model_to_params` counts them."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        module = transformers.AutoModelForCausalLM.from_config(config)
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules())


def param_count(model: str, folder: Path | None) -> int:
    """Parameters of the model, counted on the meta device (tied weights once)."""
    import torch

    if folder is None:
        from trainer_low_mem.model import build_model, resolve_preset

        with torch.device("meta"):
            module = build_model(resolve_preset(model))
    else:
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        auto = (
            transformers.AutoModelForSeq2SeqLM
            if config.is_encoder_decoder
            else transformers.AutoModelForCausalLM
        )
        with torch.device("meta"):
            module = auto.from_config(config)
    return sum(p.numel() for p in module.parameters())


# LLaMA-Factory's README, "Hardware Requirement" (hiyouga/LLaMA-Factory README.md, checked at
# commit 00409ff28a30): GB of GPU memory per billion parameters by method (its `x`B column:
# Full (bf16 or fp16) 18x, Freeze/LoRA 2x, QLoRA 4-bit x/2), and its 7B column (120, 16, 6 GB).
LLAMA_FACTORY_GB_PER_B = {"full": 18.0, "lora": 2.0, "qlora": 0.5}
LLAMA_FACTORY_7B_GB = {"full": 120, "lora": 16, "qlora": 6}
LLAMA_FACTORY_WHAT = {
    "full": "Full (bf16 AMP, 32-bit)",
    "lora": "LoRA (16-bit)",
    "qlora": "QLoRA (4-bit)",
}


def llama_factory_gb(method: str, params: int) -> float:
    billions = params / 1e9
    if 6.5 <= billions <= 8.5:
        return float(LLAMA_FACTORY_7B_GB[method])
    return LLAMA_FACTORY_GB_PER_B[method] * billions


def deepspeed_zero2_bytes(params: int, gpus: int, offload: bool) -> tuple[int, int]:
    """(host, per GPU) bytes of DeepSpeed's ZeRO-2 model-states estimate (the function its
    `estimate_zero2_model_states_mem_needs_all_cold` prints), buffer factor 1.5."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    host, gpu = estimate_zero2_model_states_mem_needs(
        params, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=offload
    )
    return int(host), int(gpu)


def add_published(row: Row) -> None:
    """The published figure beside the row and why ours differs."""
    lf = llama_factory_gb(row.method, row.params)
    figure = f"LLaMA-Factory {LLAMA_FACTORY_WHAT[row.method]}: {lf:.1f} GB"
    if row.method == "full":
        offload = row.launch.startswith("ZeRO-2 offload") or not row.fits
        host, gpu = deepspeed_zero2_bytes(row.params, row.machine.gpus, offload)
        figure += (
            f"; DeepSpeed ZeRO-2{' offload' if offload else ''}: {gpu / GiB:.1f} GiB/GPU, "
            f"host {host / GiB:.1f} GiB"
        )
    row.published = figure
    row.difference = _difference(row, lf)


def deepspeed_zero3_bytes(
    params: int, largest_layer: int, gpus: int, offload: bool, offload_params: bool
) -> tuple[int, int]:
    """(host per node, per GPU) bytes of DeepSpeed's ZeRO-3 model-states estimate (what its
    `estimate_zero3_model_states_mem_needs_all_cold` prints), buffer factor 1.5."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    host, gpu, _ = estimate_zero3_model_states_mem_needs(
        params,
        largest_layer,
        num_gpus_per_node=gpus,
        num_nodes=1,
        cpu_offload=offload,
        cpu_offload_params=offload_params,
    )
    return int(host), int(gpu)


def add_sharded_published(row: Row, largest_layer: int) -> None:
    """DeepSpeed's ZeRO-3 estimate beside a ZeRO-3 row (its model states only); an FSDP2 row
    has no published figure, so its states are named instead."""
    if not row.launch.startswith("ZeRO-3"):
        row.published = "none published (FSDP2: torch documents no estimator)"
        row.difference = (
            "per rank: fp32 shards of weights, gradients and AdamW moments (16 B/param / N for "
            "full fine-tuning; host RAM with parameter offload), two bf16 blocks and the root "
            "gathered, and the activations"
        )
        return
    offload = "offload" in row.launch
    host, gpu = deepspeed_zero3_bytes(
        row.params, largest_layer, row.machine.gpus, offload, "params" in row.launch
    )
    row.published = f"DeepSpeed ZeRO-3: {gpu / GiB:.1f} GiB/GPU, host {host / GiB:.1f} GiB"
    row.difference = (
        "DeepSpeed counts 18 B/param / N (2 with optimizer offload) plus the largest layer in "
        "fp32; ours adds the 16-bit gradient partition, the reduce bucket, the gathered "
        "parameters (block + prefetch bucket) and the output head, the activations and CUDA's "
        "reserve; its host figure has a 1.5 buffer factor"
    )
    if row.method != "full":
        row.difference += "; it counts every parameter as trained, so it is a full fine-tune's"


def _difference(row: Row, lf_gb: float) -> str:
    if row.method == "full":
        return (
            "LLaMA-Factory's 18 B/param counts fp32 master weights, fp32 Adam states and 16-bit "
            "weights and gradients on the GPU with no offload; DeepSpeed's estimate counts model "
            "states only (no activations, CUDA context or loss); ours adds the micro-batch's "
            "activations and moves the states to host RAM under offload"
        )
    if row.method == "qlora":
        return (
            "LLaMA-Factory's x/2 GB is the 4-bit weights at batch 1; ours adds the 16-bit "
            "embeddings and head, which stay unquantised, and the micro-batch's activations"
        )
    return (
        "LLaMA-Factory's 2 B/param is the 16-bit frozen weights at batch 1; the trainer keeps "
        "the frozen base in bf16 too (--mixed_precision bf16), and ours adds the fp32 adapters "
        "and their states and the chosen micro-batch's activations"
    )


def size_all(
    models: tuple[str, ...] | None = None,
    methods: tuple[str, ...] = METHODS,
    machines: tuple[Machine, ...] = MACHINES,
) -> list[Row]:
    """Every row of the table (`models` None: the real configs and the presets)."""
    models = models or (*MODEL_CONFIGS, *PRESETS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowmem-sizing-") as tmp:
        for model in models:
            folder = write_model_folder(Path(tmp), model) if model in MODEL_CONFIGS else None
            params = param_count(model, folder)
            for method in methods:
                for machine in machines:
                    row = plan_row(model, folder, method, machine)
                    row.params = params
                    add_published(row)
                    rows.append(row)
    return rows


HEADER = (
    "| model | params | method | machine | fits | launch | micro x accum | device peak | "
    "weights / grads / optimizer / activations | host per process | host per node | "
    "published | why they differ |"
)


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def markdown_row(row: Row) -> str:
    params = f"{row.params / 1e9:.2f}B"
    if not row.fits:
        # A sharded row names the launch it was refused under.
        cells = [row.model, params, row.method, row.machine.name, "no", row.launch, "", ""]
        cells.append(row.note)
        cells += ["", "", row.published, row.difference]
        return "| " + " | ".join(cells) + " |"
    t = row.terms
    terms = " / ".join(
        _gib(v)
        for v in (
            t.get("weights", 0),
            t.get("gradients", 0),
            t.get("optimizer", 0),
            row.activations_bytes,
        )
    )
    cells = [
        row.model,
        params,
        row.method,
        row.machine.name,
        "yes",
        row.launch,
        f"{row.micro} x {row.accum}",
        _gib(row.device_peak_bytes),
        terms,
        _gib(row.host_per_process_bytes),
        _gib(row.host_node_bytes),
        row.published,
        row.difference,
    ]
    return "| " + " | ".join(cells) + " |"


def table(rows: list[Row]) -> str:
    sep = "|" + "---|" * HEADER.count(" | ") + "---|"
    return "\n".join([HEADER, sep, *(markdown_row(r) for r in rows)])


def run_sizing(markdown: Path | None, models: tuple[str, ...] | None) -> int:
    """Print the table; with `markdown`, write it between the markers of that file."""
    rows: list[Row] = []
    for model in models or (*MODEL_CONFIGS, *PRESETS):
        rows += size_all((model,))
        if markdown is not None:  # after each model: an interrupted run keeps what it planned
            write_into(markdown, table(rows))
    if models is None:
        rows += sharded_rows()
        if markdown is not None:
            write_into(markdown, table(rows))
    print(table(rows))
    return 0


BEGIN, END = "<!-- sizing table: begin -->", "<!-- sizing table: end -->"


def write_into(path: Path, text: str) -> None:
    """Replace the table between BEGIN and END in `path` (the file's prose stays)."""
    old = path.read_text(encoding="utf-8") if path.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in old or END not in old:
        raise ConfigError(f"{path} has no {BEGIN} ... {END} markers; add them where the table goes")
    head, rest = old.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}", encoding="utf-8")
