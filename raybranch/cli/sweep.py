"""``raybranch sweep CONFIG [key=value ...]``: the Ray Tune sweep of :mod:`raybranch.cluster.sweep`.

Runs on the Ray cluster a ``ray job submit`` started it on, else on a local in-process Ray.
Writes results.csv, results.md and ratio_vs_accuracy.png to ``out`` (config key) and prints where.
"""
from __future__ import annotations


def add_parser(subparsers) -> None:
    s = subparsers.add_parser(
        "sweep", help="Ray Tune sweep of splits, LoRA ranks, bits, snapshot policies",
        description="A Ray Tune grid over split × LoRA rank × bits × snapshot policy × mechanism (main branch); "
                    "writes results.csv, results.md (report Tables 9/12/14 shape) and ratio_vs_accuracy.png.",
    )
    s.add_argument("config", metavar="CONFIG", help="YAML sweep config, e.g. jobs/configs/sweep-quick.yaml")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (experiment.KEY=value for the base experiment)")
    s.set_defaults(fn=run_sweep_command)


def run_sweep_command(args) -> int:
    import torch

    from ..cluster.sweep import run_sweep
    from ..cluster.train import connect
    from ..config import load_sweep_config

    cfg = load_sweep_config(args.config, args.overrides)
    torch.set_num_threads(1)
    connect()
    result = run_sweep(cfg)
    print(f"results: {result['files']['md']} (and {result['files']['csv']}, {result['files']['png']}); store {result['store']}")
    return 0


__all__ = ["add_parser", "run_sweep_command"]
