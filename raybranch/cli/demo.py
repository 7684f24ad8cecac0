"""``raybranch demo --out DIR [--store URI] [--quick] [--seed N]``: the offline demo.

LeNet-5 on scikit-learn's digits, 4×25 % slices, a backdoor in slice 3 (slices count from 1, as
``raybranch restore --before-slice K`` does), the LC and LC + Delta-LoRA mechanisms: per
mechanism a run in the store driven by the same operations as ``raybranch init``, ``train``,
``mark`` and ``quarantine`` (:mod:`raybranch.runs.experiment`) — slices 1–4 arrive one by one,
slice 3 is marked poisoned after slice 4 has trained, then quarantined (instant recovery and
replay) — and each run's report with the oracle and plain full training. Writes the combined
report (report.json, report.md, PNG plots) to DIR and to the store's ``_reports/<name>/``;
progress goes to stderr.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def add_parser(subparsers) -> None:
    s = subparsers.add_parser(
        "demo", help="run the offline demo and write a report",
        description="Branching incremental training with a poisoned slice, end to end (LeNet-5 on digits); "
                    "writes DIR/report.json, DIR/report.md and plots.",
    )
    s.add_argument("--out", required=True, metavar="DIR", help="report directory (created)")
    s.add_argument("--store", default=None, metavar="URI", help="checkpoint store (default: file://DIR/store)")
    s.add_argument("--quick", action="store_true", help="short run (≤ 2 minutes on 2 cores)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=run_demo)


class _Bar:
    """A tqdm bar on stderr counting optimizer steps; phases go to its description."""

    def __init__(self):
        from tqdm import tqdm

        self.tqdm = tqdm
        self.bar = tqdm(total=None, unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def phase(self, name: str) -> None:
        self.bar.set_description_str(name[:40])

    def step(self, _step: int) -> None:
        self.bar.update(1)

    def log(self, msg: str) -> None:
        self.tqdm.write(msg, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def run_demo(args) -> int:
    import torch

    from ..branches.data import Hooks
    from ..config.classes import ExperimentConfig
    from ..runs.experiment import run_experiment

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = args.store or (out / "store").as_uri()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cfg = ExperimentConfig.quick(seed=args.seed) if args.quick else ExperimentConfig(seed=args.seed, compare_lora_merge=True)
    bar = _Bar()
    t0 = time.perf_counter()
    try:
        result = run_experiment(cfg, store, str(out), Hooks(phase=bar.phase, step=bar.step, log=bar.log))
    finally:
        bar.close()
    print(f"report: {out / 'report.md'} (and report.json, plots) in {time.perf_counter() - t0:.1f} s; store {store}")
    print(f"runs: {', '.join(result['runs'])}; in the store: {result['reports']['store'][0].rsplit('/', 1)[0]}/")
    return 0


__all__ = ["add_parser", "run_demo"]
