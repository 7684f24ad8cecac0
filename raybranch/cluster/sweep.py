"""Ray Tune sweeps of split × seed × LoRA rank × bits × snapshot policy × mechanism × any
experiment keys (the ``grid``), in the report's table shapes (Tables 3, 8, 9, 12, 14).

    result = run_sweep(load_sweep_config("jobs/configs/sweep-quick.yaml"))   # after ray.init()

The grid, trial tags and configs are :mod:`raybranch.sweep.grid`'s; the tables and the plot
:mod:`raybranch.sweep.tables`'s (both Ray-free).

A trial (:func:`sweep_trial`, a Tune function trainable with ``cpus_per_trial`` CPUs) is a run in
the store, ``<name>-<trial tag>`` (run.json from the base ``experiment`` keys, the model's
Delta-LoRA defaults for the keys it leaves out, and the trial's own; no poison): ``init`` trains
the branch point, then ``main`` trains every slice of its split as it arrives, a checkpoint
every step (:mod:`raybranch.runs.ops`). After each slice it reports ``data_percent`` (share of
the slices trained, %), ``acc`` (test accuracy of main's head restored from the store) and
``gap_pp`` = 100 · (acc − the baseline's accuracy after the same slice); the last report adds

    compression_ratio = checkpoints × bytes(torch.save(state_dict)) ÷ bytes stored for main
    space_savings     = 1 − bytes stored ÷ (checkpoints × bytes(torch.save(state_dict)))
    acc_restored      = test accuracy of main's head restored from the store

and ``acc_full``, the same schedule trained without raybranch (plain model, no Delta-LoRA; one
Ray task per split, seed and plain-training knobs before the trials start). With ``scheduler:
asha`` an ASHA scheduler (time attribute ``data_percent``, metric ``gap_pp``: how far a trial
lags its own baseline, so trials of different splits and seeds compare fairly; max 100 %)
stops trials that lag; their rows say so.

Output: ``results.csv``, ``results.md`` and ``ratio_vs_accuracy.png`` (:mod:`raybranch.sweep.tables`)
in the output directory and in the store under ``_reports/<name>/``. Tune's own records go to
``<store>/<name>/_ray/tune``.
"""
from __future__ import annotations

import os
import time

import ray

from ..branches.accounting import attribute_bytes, torch_save_bytes
from ..config.classes import ExperimentConfig, SweepConfig
from ..config.files import build
from ..errors import RaybranchError
from ..runs.baselines import train_branch_point, train_plain
from ..runs.context import RunContext
from ..runs.ops import MAIN, init_run, train_slice
from ..runs.reports import shared_reports, upload_dir
from ..store.store import open_store
from ..sweep.grid import full_config, full_key, trial_config, trial_grid, trial_tag
from ..sweep.tables import CSV_COLUMNS, RESULT_FILES, write_results
from .pointers import ray_storage


def full_training(exp: dict) -> dict:
    """Plain training (no raybranch, no Delta-LoRA) of main's schedule for the experiment dict
    of :func:`raybranch.sweep.grid.full_config`: acc_full."""
    import torch

    torch.set_num_threads(1)
    cfg = build(ExperimentConfig, exp, where="sweep baseline")
    ctx = RunContext.for_config(None, "full", cfg, "lc")  # plain training never touches a store
    bp, _ = train_branch_point(ctx)
    n = len(ctx.data.slices)
    r = train_plain(ctx, bp, list(range(1, n + 1)), n, False, "full")
    return {"acc": r["acc"], "per_slice_acc": r["per_slice_acc"], "seconds": r["seconds"]}


def sweep_trial(config: dict) -> None:
    """The Tune trainable: one trial's run in the store — init, then main trains every slice as it
    arrives (the run operations, in this process) — reporting after each slice."""
    import torch
    from ray import tune

    torch.set_num_threads(max(1, int(config.get("threads") or 1)))
    p = config["params"]
    cfg = trial_config(config["base"], p, config["name"])
    run = cfg.name
    store = open_store(config["store"])
    if store.list(run, recursive=True):  # a trial restarted by Tune: start its run again (ASHA saw its reports)
        for info in store.list(run, recursive=True):
            store.delete(info.rel)
    init_run(store, run, cfg, p["mechanism"])
    ctx = RunContext(store, run)
    ts_bytes = torch_save_bytes(ctx.template())
    n = ctx.spec.n_dataset_slices
    t0 = time.perf_counter()
    full = config["acc_full"][full_key(p)]
    for k in range(1, n + 1):
        out = train_slice(store, run, k)
        acc = ctx.acc(ctx.restored(MAIN))
        metrics = {"data_percent": 100.0 * k / n, "slice": k, "acc": acc, "step": out["heads"][MAIN],
                   "gap_pp": 100.0 * (acc - full["per_slice_acc"][k - 1])}
        if k == n:
            a = attribute_bytes(store, run, [MAIN])[0][MAIN]
            metrics.update(
                compression_ratio=a["checkpoints"] * ts_bytes / a["bytes_stored"],
                space_savings=1.0 - a["bytes_stored"] / (a["checkpoints"] * ts_bytes),
                checkpoints=a["checkpoints"], bytes_stored=a["bytes_stored"],
                acc_restored=acc, acc_full=full["acc"], train_seconds=time.perf_counter() - t0,
            )
        tune.report(metrics)


def run_sweep(sweep: SweepConfig, store_uri: str | None = None, out_dir: str | None = None, log=print) -> dict:
    """Run the Tune sweep and write its tables (see the module docstring); needs ``ray.init()``.
    Returns {"rows": [...], "files": {...}, "seconds": …}."""
    from ray import tune

    if not ray.is_initialized():
        raise RaybranchError("run_sweep needs Ray: call ray.init() first, or submit it as a Ray job")
    sweep.validate()
    out_dir = os.path.abspath(out_dir or sweep.out)
    os.makedirs(out_dir, exist_ok=True)
    uri = store_uri or sweep.store or os.environ.get("RAYBRANCH_STORE") or "file://" + os.path.join(out_dir, "store")
    store = open_store(uri)
    grid = trial_grid(sweep)
    base = dict(sweep.experiment)
    configs = [trial_config(base, p, sweep.name) for p in grid]
    runs = [c.name for c in configs]
    taken = [r for r in runs if store.list(r, recursive=True)]
    if taken:
        raise RaybranchError(f"run {taken[0]!r} already exists in {store.uri}; use a fresh store or another sweep name")
    t0 = time.perf_counter()
    log(f"sweep {sweep.name}: {len(grid)} trials, store {store.uri}, results in {out_dir}")

    task = ray.remote(num_cpus=sweep.cpus_per_trial)(full_training)
    baselines = {full_key(p): full_config(base, p) for p in grid}
    refs = {k: task.remote(exp) for k, exp in baselines.items()}
    acc_full = {k: ray.get(r) for k, r in refs.items()}
    for k, f in acc_full.items():
        log(f"full training (no raybranch) on {k.rstrip('|')}: acc {f['acc']:.4f} in {f['seconds']:.1f} s")

    scheduler, metric, mode = None, None, None
    if sweep.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        metric, mode = "gap_pp", "max"
        scheduler = ASHAScheduler(time_attr="data_percent", max_t=100, grace_period=sweep.asha_grace_percent,
                                  reduction_factor=sweep.asha_reduction_factor)
    path, fs = ray_storage(store, sweep.name)
    tuner = tune.Tuner(
        tune.with_resources(sweep_trial, {"cpu": sweep.cpus_per_trial}),
        param_space={"params": tune.grid_search(grid), "base": base, "store": uri, "name": sweep.name,
                     "acc_full": acc_full, "threads": max(1, int(sweep.cpus_per_trial))},
        tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler,
                                    max_concurrent_trials=sweep.max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name="tune", storage_path=path, storage_filesystem=fs, verbose=0),
    )
    results = tuner.fit()
    rows = []
    for res in results:
        p = res.config["params"]
        m = res.metrics or {}
        if res.error is not None:
            status = f"error: {' '.join(str(res.error).split())[:120]}"
        elif "compression_ratio" in m:
            status = "done"
        else:
            status = f"stopped by ASHA at {m.get('data_percent', 0):.0f} % of the slices"
        i = grid.index(p)
        rows.append(_row(p, m, acc_full[full_key(p)]["acc"], status, configs[i]))
    order = {tag: i for i, tag in enumerate(trial_tag(p) for p in grid)}
    rows.sort(key=lambda r: order[r["tag"]])
    knob_keys = list(dict.fromkeys([*(k for s in sweep.settings for k in s), *sweep.grid]))
    files = write_results(rows, out_dir, _title(sweep), list(sweep.splits), knob_keys)
    files["store"] = store.path(shared_reports(sweep.name))
    upload_dir(store, shared_reports(sweep.name), out_dir)
    seconds = time.perf_counter() - t0
    log(f"sweep {sweep.name}: {len(rows)} rows in {seconds:.1f} s → " + ", ".join(files.values()))
    return {"rows": rows, "files": files, "seconds": seconds, "store": uri, "acc_full": acc_full}


def _title(sweep: SweepConfig) -> str:
    base = sweep.base_experiment()
    return f"raybranch sweep `{sweep.name}`: {base.model} on {base.dataset}, main branch, no poison"


def _row(p: dict, m: dict, acc_full: float, status: str, cfg: ExperimentConfig) -> dict:
    acc = m.get("acc_restored")
    return {
        "split": p["split"], "seed": cfg.seed, "rank": p["rank"], "bits": p["bits"], "snapshot_every": p["snapshot_every"],
        "mechanism": p["mechanism"], "knobs": p.get("knobs") or {}, "tag": trial_tag(p),
        "compression_ratio": m.get("compression_ratio"), "space_savings": m.get("space_savings"),
        "acc_restored": acc, "acc_full": acc_full, "acc_diff_pp": None if acc is None else 100.0 * (acc - acc_full),
        "checkpoints": m.get("checkpoints"), "bytes_stored": m.get("bytes_stored"), "status": status, "run": cfg.name,
        "model": cfg.model, "lora_pattern": cfg.lora_pattern,
    }


__all__ = ["CSV_COLUMNS", "RESULT_FILES", "full_training", "run_sweep", "sweep_trial", "trial_config", "trial_grid",
           "trial_tag", "write_results"]
