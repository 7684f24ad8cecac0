"""Two branches on two Ray Train workers at once vs the same two branches one after the other.

    python -m raybranch.cluster.bench.branches_parallel [--branches experiment|equal] [--checkpointer sync|async]
                                                       [--quick] [key=value ...]

On a local Ray with ``--num-cpus`` CPUs (default 2), LeNet-5 on digits, the LC mechanism: the
branch point is trained once on the driver (:func:`~raybranch.runs.baselines.train_branch_point`);
then, for each mode, a fresh run ``<name>-<mode>`` is created with it as ``main`` step 0
(:func:`~raybranch.runs.ops.init_run`, ``clean`` forked there) and a
:class:`~raybranch.cluster.runner.RayRunner` trains the plan ``main``: every slice, ``clean``: its
slices, each branch in its own ``TorchTrainer`` (``num_workers=1``, 1 CPU, one torch thread, a
checkpoint every step):

* ``sequential``: ``parallel=False``, ``fit()`` of one trainer, then of the other;
* ``parallel``: ``parallel=True``, both ``fit()`` at once (a thread each).

``--branches experiment``: main trains every slice, clean every slice but the poisoned one (as
the experiment does: clean has (n−1)/n of main's work, so the speed-up cannot pass 1 + (n−1)/n,
1.75× for 4 slices). ``--branches equal``: both branches train every slice (two equal workers).

    speed-up = wall(sequential) ÷ wall(parallel)

Wall times are those of ``RayRunner.train`` (not the run's creation) and include each trainer's
start (controller, worker process, process group: ~10 s on 2 CPUs, and they overlap in parallel
mode but contend for the same two cores); per branch, the seconds of its ``fit()``. The modes
run in the order given by ``--order`` (default: sequential first), each on its own run of the
same store. Experiment keys (``epochs=…`` etc.) go after the options; the default is the demo's
configuration (≤ 30 epochs per slice, early stopping patience 6).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

import ray


def measure(cfg, job, store_uri: str, branches: str = "experiment", order: tuple[str, ...] = ("sequential", "parallel"),
            log=print) -> dict:
    """{mode: wall seconds, ..., "speedup": …, per-branch fit seconds} (see the module docstring)."""
    from ...ledger.lineage import Lineage
    from ...runs.baselines import train_branch_point
    from ...runs.context import RunContext
    from ...runs.ops import init_run
    from ...store.store import open_store
    from ..runner import RayRunner

    store = open_store(store_uri)
    ctx = RunContext.for_config(store, "bp", cfg, "lc")
    bp, info = train_branch_point(ctx)
    bp_state = bp.state_dict()
    n = len(ctx.data.slices)
    everything = list(range(1, n + 1))
    plan = [("main", everything), ("clean", everything if branches == "equal" else [k for k in everything if k != cfg.poison_slice])]
    out: dict = {"branches": branches, "slices": n, "checkpointer": job.checkpointer, "branch_point": info}
    for mode in order:
        run = f"{cfg.name}-{mode}"
        init_run(store, run, cfg, "lc", start=bp_state)
        runner = RayRunner(dataclasses.replace(job, parallel=mode == "parallel"))
        t0 = time.perf_counter()
        runner.train(RunContext(store, run), plan)
        wall = time.perf_counter() - t0
        fit_s = {f["branch"]: f["seconds"] for f in runner.fits}
        fit_s = {b: fit_s[b] for b, _ in plan if b in fit_s}
        steps = {b: Lineage(store, run, b).head_step for b, _ in plan}
        out[mode] = {"wall_s": wall, "fit_s": fit_s, "head_step": steps}
        log(f"{mode:10s} {wall:7.1f} s   (fit: " + ", ".join(f"{b} {s:.1f} s" for b, s in fit_s.items()) + f"; head steps {steps})")
    out["speedup"] = out["sequential"]["wall_s"] / out["parallel"]["wall_s"]
    log(f"speed-up   {out['speedup']:.2f}×  (target ≥ 1.7×; {branches} branches, {job.checkpointer} checkpointer)")
    return out


def main(argv: list[str] | None = None) -> int:
    from ...config import RayJobConfig, load_branches_config

    p = argparse.ArgumentParser(prog="python -m raybranch.cluster.bench.branches_parallel", description=__doc__.split("\n")[0])
    p.add_argument("--branches", choices=["experiment", "equal"], default="experiment")
    p.add_argument("--checkpointer", choices=["sync", "async"], default="sync")
    p.add_argument("--order", default="sequential,parallel", help="modes in the order to run them")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="the quick demo's epochs (8) and patience (2)")
    p.add_argument("--store", default=None, help="store URI (default: a temporary directory, removed after)")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="experiment keys")
    args = p.parse_args(argv)
    base = ["epochs=8", "patience=2", "branch_point_max_epochs=20"] if args.quick else []
    cfg, _ = load_branches_config(None, [*base, "mechanisms=lc", "name=bench", *args.overrides])
    job = RayJobConfig(checkpointer=args.checkpointer)
    tmp = None
    uri = args.store
    if uri is None:
        tmp = tempfile.mkdtemp(prefix="raybranch-bench-par-")
        uri = "file://" + os.path.join(tmp, "store")
    if not ray.is_initialized():
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        out = measure(cfg, job, uri, args.branches, tuple(args.order.split(",")), log=(lambda m: None) if args.json else print)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
