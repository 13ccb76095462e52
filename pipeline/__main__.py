"""`python -m pipeline {build,tokenize-distributed,demo,show,plan}`: parse the subcommand's flags
and delegate.

`plan` is the trainer's (`train_low_mem.py plan`), with the same flags: listed in this help,
parsed and run by trainer_low_mem/cli.py.
"""

from __future__ import annotations

import tyro

from lowmem_core.errors import run_cli
from lowmem_core.flags import parse_flags
from pipeline.config import BuildConfig, DemoConfig, ShowConfig, TokenizeDistributedConfig
from trainer_low_mem.config import PlanConfig


def build(cfg: BuildConfig) -> None:
    from pipeline.build import build_dataset

    report = build_dataset(cfg)
    for line in report.notes(cfg.text_field):
        print(line)
    print(
        f"built {report.out_dir}: {report.num_documents} documents, {report.num_tokens} tokens, "
        f"{report.num_shards} shard(s) in {report.seconds:.2f} s ({report.tokens_per_s / 1e6:.2f} "
        "M tokens/s)"
    )


def tokenize_distributed(cfg: TokenizeDistributedConfig) -> None:
    from pipeline.ray_tokenize import tokenize_distributed as run

    report = run(cfg)
    for line in report.notes(cfg.text_field):
        print(line)
    eos = f" --eos-token {cfg.eos_token}" if cfg.eos_token else ""
    print(
        f"tokenised {report.num_documents} documents, {report.num_tokens} tokens into "
        f"{report.num_shards} Parquet file(s) in {report.out_dir} in {report.seconds:.2f} s; make "
        f"the dataset with `python -m pipeline build {report.out_dir} --out DIR --text-field "
        f"input_ids --tokenizer {cfg.tokenizer}{eos}`"
    )


def demo(cfg: DemoConfig) -> None:
    from pipeline.demo import run_demo

    run_demo(cfg)


def show(cfg: ShowConfig) -> None:
    from pipeline.show import show as run

    print("\n\n".join(run(cfg)))


# subcommand name -> (config dataclass, handler)
SUBCOMMANDS = {
    "build": (BuildConfig, build),
    "tokenize-distributed": (TokenizeDistributedConfig, tokenize_distributed),
    "demo": (DemoConfig, demo),
    "show": (ShowConfig, show),
}


def parse_args(
    argv: list[str],
) -> BuildConfig | TokenizeDistributedConfig | DemoConfig | ShowConfig:
    """The config of the subcommand `argv` names (`plan` is listed, but `_main` hands it to the
    trainer before this parse)."""
    configs = {name: cls for name, (cls, _) in SUBCOMMANDS.items()} | {"plan": PlanConfig}
    return parse_flags(
        lambda args: tyro.extras.subcommand_cli_from_dict(
            configs,
            prog="python -m pipeline",
            args=args,
            description="build: tokenise inputs; tokenize-distributed: tokenise on a Ray "
            "cluster into Parquet shards that build ingests; demo: the quick start; show: print "
            "stored samples with their labelled spans marked; plan: size a run (`python -m "
            "pipeline plan --help`)",
        ),
        argv,
        "python -m pipeline",
        configs,
    )


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "plan":
        from trainer_low_mem.cli import plan_main

        return plan_main(argv[1:], prog="python -m pipeline plan")
    cfg = parse_args(argv)
    handler = next(fn for cls, fn in SUBCOMMANDS.values() if isinstance(cfg, cls))
    handler(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
