"""Command line of the trainer: `train` runs the loop, `plan` prints the plan a run would use.

`train_low_mem.py` and the `train-low-mem` console script both call `main`; `python -m pipeline
plan` delegates to `plan_main`, which plans the model `train` would build (a preset or `--model
DIR`, LoRA included) and says which memory estimate it used. Flags are generated from
`trainer_low_mem.config` by tyro: flat names with underscores; a boolean is a flag (`--json`,
`--no_json` or `--no-json`) or takes true/false as its value (`--is_keep_training=True`,
`--auto_plan False`), as the seed's users type it; `plan` takes the same names as `train`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import io
import json
import sys

import tyro

from lowmem_core.errors import ConfigError, LowMemError, run_cli
from lowmem_core.flags import parse_flags
from trainer_low_mem.config import JobConfig, PlanConfig

PROG = "train_low_mem.py"
SUBCOMMANDS = ("train", "plan")
_TYRO_MARKERS = (tyro.conf.OmitArgPrefixes,)


def parse_job_config(argv: list[str]) -> JobConfig:
    """Parse the flags of the `train` subcommand (without the word `train`) into a JobConfig."""
    return parse_flags(
        lambda args: tyro.cli(
            JobConfig,
            args=args,
            prog=f"{PROG} train",
            use_underscores=True,
            config=_TYRO_MARKERS,
            description=JobConfig.__doc__,
        ),
        argv,
        f"{PROG} train",
        JobConfig,
    )


def parse_plan_config(argv: list[str], prog: str = f"{PROG} plan") -> PlanConfig:
    """Parse the flags of the `plan` subcommand (without the word `plan`) into a PlanConfig."""
    return parse_flags(
        lambda args: tyro.cli(
            PlanConfig,
            args=args,
            prog=prog,
            use_underscores=True,
            config=_TYRO_MARKERS,
            description=PlanConfig.__doc__,
        ),
        argv,
        prog,
        PlanConfig,
    )


def plan_from_config(cfg: PlanConfig):
    """The plan of the run `cfg` describes: a built-in preset or a Hugging Face folder, with or
    without LoRA, its memory traced on fake tensors (analytic count when the trace fails)."""
    import torch

    from pipeline.dataset import open_dataset
    from pipeline.pair_layout import pair_row_lens
    from trainer_low_mem.hf_model import (
        check_dataset_matches_model,
        check_model_folder,
        is_encoder_decoder,
    )
    from trainer_low_mem.model import resolve_preset
    from trainer_low_mem.model_setup import job_model_factory
    from trainer_low_mem.planner import plan_for_job

    m = cfg.model
    vocab_size, dataset_bytes, is_sft = cfg.vocab_size, None, False
    index_bytes, special_ids, pair_lens = None, None, None
    if cfg.data.data is not None:
        with open_dataset(cfg.data.data, ultra_low_mem=True) as ds:
            vocab_size, dataset_bytes = vocab_size or ds.vocab_size, ds.token_bytes
            special_ids = {"vocab_size": ds.vocab_size, "eos_id": ds.eos_id, "bos_id": ds.bos_id}
            index_bytes = ds.shared_index_bytes
            is_sft = ds.prompt_lengths is not None
            if is_sft and m.model is not None and is_encoder_decoder(check_model_folder(m.model)):
                pair_lens = pair_row_lens(ds, cfg.data.max_seq_len)  # the rows its pairs take
    if m.model is None:
        shape = resolve_preset(m.model_preset, vocab_size)
        what, vocab_size = f"preset {m.model_preset!r}", shape.vocab_size
    else:
        # The folder's dimensions and parameter counts (LoRA included), from a meta-device build.
        what = f"--model {m.model}"
        try:
            with torch.device("meta"):
                shape = job_model_factory(dataclasses.replace(m, load_in_4bit=False), 1)()
        except LowMemError:
            raise
        except Exception as exc:  # noqa: BLE001 (the architecture's own code; one line)
            raise ConfigError(
                f"{what} cannot be built from its config.json on the meta device "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}); plan on a "
                "machine where `train` builds it, or check the folder's config"
            ) from exc
    if pair_lens is not None:
        shape.row_lens = pair_lens
    if special_ids is not None and m.model is not None and hasattr(shape, "vocab_rows"):
        check_dataset_matches_model(**special_ids, model=shape, data=cfg.data.data)
    if cfg.data.max_seq_len > shape.max_seq_len:
        raise ConfigError(
            f"--max_seq_len {cfg.data.max_seq_len} exceeds {what}'s max_seq_len "
            f"{shape.max_seq_len}; lower --max_seq_len"
        )
    launch = cfg.launch
    return plan_for_job(
        cfg,
        shape,
        world_size=launch.world_size,
        zero_stage=launch.zero_stage,
        offload_optimizer=launch.offload_optimizer,
        model_factory=job_model_factory(m, vocab_size, is_sft, pair_lens),
        dataset_bytes=dataset_bytes,
        index_bytes=index_bytes,
        ranks_per_node=launch.ranks_per_node,
        num_cores=launch.num_cores,
    )


def plan_main(argv: list[str], prog: str = f"{PROG} plan") -> int:
    """`plan [FLAGS]`: print the plan as a table (or JSON with --json=True)."""
    cfg = parse_plan_config(argv, prog)
    result = plan_from_config(cfg)
    print(json.dumps(result.to_dict(), indent=2) if cfg.json else result.table())
    return 0


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(
            f"usage: {PROG} {{train,plan}} [FLAGS]   (see `{PROG} train --help`, "
            f"`{PROG} plan --help`)"
        )
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        raise ConfigError(
            f"unknown subcommand {command!r}; choose one of "
            f"{', '.join(SUBCOMMANDS)} (`{PROG} train --help`)"
        )
    if command == "plan":
        return plan_main(rest)
    config = parse_job_config(rest)
    # A mapped shard truncated between two checks ends in SIGBUS: name the stack that read it.
    with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
        faulthandler.enable(file=sys.__stderr__)  # no usable stderr: nothing to print to
    # Imported here so that `--help` and flag errors do not pay for torch and accelerate.
    from trainer_low_mem.loop import train

    return train(config).exit_code


def main(argv: list[str] | None = None) -> int:
    """Console entry (`train-low-mem`); returns the process exit code."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
