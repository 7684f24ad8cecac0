"""The Ray Tune sweep: split × seed × LoRA rank × bits × snapshot policy × mechanism × any experiment
keys (``grid``, ``settings``) on the main branch; writes results.csv, results.md (means over seeds
with 95 % intervals, in the shapes of the report's Tables 3, 8, 9, 12, 14) and ratio_vs_accuracy.png.

    ray job submit --working-dir . -- python jobs/sweep.py --config jobs/configs/sweep.yaml [key=value ...]

Same as ``raybranch sweep CONFIG [key=value ...]``. Keys: the fields of SweepConfig
(raybranch/config/classes.py): splits, seeds, ranks, bits, snapshot_every, mechanisms, grid, settings,
scheduler (none | asha), max_concurrent, cpus_per_trial, store, out, name; ``experiment.KEY=value`` sets a key of the base
experiment (e.g. ``experiment.epochs=2``). Store: ``store=`` or $RAYBRANCH_STORE, else
file://<out>/store; Tune's records go to <store>/<name>/_ray/tune.
"""
from __future__ import annotations

import argparse
import sys

from raybranch.cli.main import main as raybranch_main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="raybranch Ray Tune sweep")
    p.add_argument("--config", required=True, help="YAML sweep config, e.g. jobs/configs/sweep-quick.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    return raybranch_main(["sweep", args.config, *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
