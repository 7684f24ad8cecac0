"""The branching experiment on a Ray cluster: branch point, then main and clean as Ray Train
workers (one TorchTrainer each, at once), a checkpoint every step into the store, quarantine of
the poisoned slice (instant recovery, replay), the report.

    ray job submit --working-dir . -- python jobs/branches.py --config jobs/configs/quick.yaml [key=value ...]

Without a cluster it runs on a local in-process Ray:  python jobs/branches.py --config jobs/configs/quick.yaml
Keys: every field of ExperimentConfig and RayJobConfig
(raybranch/config/classes.py), e.g. ``epochs=2 mechanisms=[lc] store=s3://bucket/runs out=/abs/dir``.
Store: ``store=`` or $RAYBRANCH_STORE, else file://<out>/store. The reports land in the store
(each run's under ``<run>/reports/``, the combined one under ``_reports/<name>/``) and in ``out``
(relative paths are taken from the job's working directory, a copy on the head node that goes
away with the job); it prints where.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from raybranch.branches.metrics import summary_lines
from raybranch.cluster.train import connect, run_on_ray
from raybranch.config import load_branches_config
from raybranch.errors import RaybranchError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="raybranch branching experiment on Ray Train")
    p.add_argument("--config", required=True, help="YAML config, e.g. jobs/configs/quick.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    try:
        cfg, job = load_branches_config(args.config, args.overrides)
        torch.set_num_threads(1)
        connect()
        out = os.path.abspath(job.out)
        t0 = time.perf_counter()
        result = run_on_ray(cfg, job, out_dir=out, hooks=None)
    except RaybranchError as exc:
        print(f"raybranch: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(result)))
    print(f"store: {result['store']}")
    print(f"runs: {', '.join(r['run'] for r in result['mechanisms'].values())}")
    print(f"report: {result['reports']['store'][0]} (and report.json, plots; copy in {out}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
