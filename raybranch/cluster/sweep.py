"""Ray Tune sweeps of split × LoRA rank × bits × snapshot policy × mechanism (report Tables 9, 12, 14).

    result = run_sweep(load_sweep_config("jobs/configs/sweep-quick.yaml"))   # after ray.init()

Grid (:func:`trial_grid`): every combination of the config's ``splits``, ``bits``,
``snapshot_every`` and ``mechanisms``, and for ``lc+dlora`` every ``ranks`` value (``lc`` has no
rank: with ``dedupe_lc`` it runs once per combination, shown with rank "–").

A trial (:func:`sweep_trial`, a Tune function trainable with ``cpus_per_trial`` CPUs) is a run in
the store, ``<name>-<trial tag>`` (run.json from the base ``experiment`` keys plus its own, no
poison): ``init`` trains the branch point, then ``main`` trains every slice of its split as it
arrives, a checkpoint every step (:mod:`raybranch.runs.ops`). After each slice it reports
``data_percent`` (share of the slices trained, %) and ``acc`` (test accuracy of main's head
restored from the store); the last report adds

    compression_ratio = checkpoints × bytes(torch.save(state_dict)) ÷ bytes stored for main
    space_savings     = 1 − bytes stored ÷ (checkpoints × bytes(torch.save(state_dict)))
    acc_restored      = test accuracy of main's head restored from the store

and ``acc_full``, the same schedule trained without raybranch (plain model, no Delta-LoRA; one
Ray task per split before the trials start). With ``scheduler: asha`` an ASHA scheduler
(time attribute ``data_percent``, metric ``acc``, max 100 %) stops trials that lag; their rows
say so.

Output (:func:`write_results`): ``results.csv`` and ``results.md`` (split | rank | bits | snapshot
| mechanism | compression ratio | space savings | final accuracy restored / full) and
``ratio_vs_accuracy.png`` (compression ratio, log scale, against restored accuracy), in the
output directory and in the store under ``_reports/<name>/``. Tune's own records go to
``<store>/<name>/_ray/tune``.
"""
from __future__ import annotations

import csv
import math
import os
import time

import ray

from ..branches.accounting import attribute_bytes, torch_save_bytes
from ..checkpoint.checkpointer import DEFAULT_KEY_EVERY
from ..config.classes import ExperimentConfig, SweepConfig
from ..errors import RaybranchError
from ..runs.baselines import train_branch_point, train_plain
from ..runs.context import RunContext
from ..runs.ops import MAIN, init_run, train_slice
from ..runs.reports import shared_reports, upload_dir
from ..store.store import open_store
from .pointers import ray_storage

RESULT_FILES = ("results.csv", "results.md", "ratio_vs_accuracy.png")
CSV_COLUMNS = ("split", "rank", "bits", "snapshot_every", "mechanism", "compression_ratio", "space_savings",
               "acc_restored", "acc_full", "acc_diff_pp", "checkpoints", "bytes_stored", "status", "run")


def trial_grid(sweep: SweepConfig) -> list[dict]:
    """Every trial's parameters: split, bits, snapshot_every, mechanism, rank (None for lc when deduped)."""
    grid = []
    for split in sweep.splits:
        for bits in sweep.bits:
            for snap in sweep.snapshot_every:
                for mech in sweep.mechanisms:
                    ranks = [None] if mech == "lc" and sweep.dedupe_lc else list(sweep.ranks)
                    for r in ranks:
                        grid.append({"split": split, "bits": bits, "snapshot_every": snap, "mechanism": mech, "rank": r})
    return grid


def trial_tag(p: dict) -> str:
    """A run-name-safe tag of a trial's parameters, e.g. ``4x25-lc-dlora-r8-b3-snone``."""
    split = p["split"].replace("/", "-").replace("%", "").replace(" ", "")
    rank = "" if p["rank"] is None else f"-r{p['rank']}"
    return f"{split}-{p['mechanism'].replace('+', '-')}{rank}-b{p['bits']}-s{p['snapshot_every'] or 'none'}"


def trial_config(base: dict, p: dict, name: str) -> ExperimentConfig:
    """The ExperimentConfig of one trial: the base, the trial's parameters, no poison."""
    d = {**base, "split": p["split"], "bits": p["bits"], "snapshot_every": p["snapshot_every"],
         "mechanisms": [p["mechanism"]], "poison": "none", "name": f"{name}-{trial_tag(p)}"}
    if p["rank"] is not None:
        d["lora_rank"] = p["rank"]
    cfg = ExperimentConfig.from_dict(d)
    cfg.validate()
    return cfg


def full_training(base: dict, split: str) -> dict:
    """Plain training (no raybranch, no Delta-LoRA) of main's schedule on ``split``: acc_full."""
    import torch

    torch.set_num_threads(1)
    cfg = ExperimentConfig.from_dict({**base, "split": split, "poison": "none"})
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
    full = config["acc_full"][p["split"]]
    for k in range(1, n + 1):
        out = train_slice(store, run, k)
        metrics = {"data_percent": 100.0 * k / n, "slice": k, "acc": ctx.acc(ctx.restored(MAIN)), "step": out["heads"][MAIN]}
        if k == n:
            a = attribute_bytes(store, run, [MAIN])[0][MAIN]
            metrics.update(
                compression_ratio=a["checkpoints"] * ts_bytes / a["bytes_stored"],
                space_savings=1.0 - a["bytes_stored"] / (a["checkpoints"] * ts_bytes),
                checkpoints=a["checkpoints"], bytes_stored=a["bytes_stored"],
                acc_restored=metrics["acc"], acc_full=full["acc"], train_seconds=time.perf_counter() - t0,
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
    base = sweep.base_experiment().as_dict()
    runs = [trial_config(base, p, sweep.name).name for p in grid]
    taken = [r for r in runs if store.list(r, recursive=True)]
    if taken:
        raise RaybranchError(f"run {taken[0]!r} already exists in {store.uri}; use a fresh store or another sweep name")
    t0 = time.perf_counter()
    log(f"sweep {sweep.name}: {len(grid)} trials, store {store.uri}, results in {out_dir}")

    task = ray.remote(num_cpus=sweep.cpus_per_trial)(full_training)
    refs = {s: task.remote(base, s) for s in sweep.splits}
    acc_full = {s: ray.get(r) for s, r in refs.items()}
    for s, f in acc_full.items():
        log(f"full training (no raybranch) on {s}: acc {f['acc']:.4f} in {f['seconds']:.1f} s")

    scheduler, metric, mode = None, None, None
    if sweep.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        metric, mode = "acc", "max"
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
        rows.append(_row(p, m, acc_full[p["split"]]["acc"], status, runs[grid.index(p)]))
    order = {s: i for i, s in enumerate(sweep.splits)}
    rows.sort(key=lambda r: (order[r["split"]], r["bits"], r["snapshot_every"] or 0, r["mechanism"] != "lc", r["rank"] or 0))
    files = write_results(rows, out_dir, sweep)
    files["store"] = store.path(shared_reports(sweep.name))
    upload_dir(store, shared_reports(sweep.name), out_dir)
    seconds = time.perf_counter() - t0
    log(f"sweep {sweep.name}: {len(rows)} rows in {seconds:.1f} s → " + ", ".join(files.values()))
    return {"rows": rows, "files": files, "seconds": seconds, "store": uri, "acc_full": acc_full}


def _row(p: dict, m: dict, acc_full: float, status: str, run: str) -> dict:
    acc = m.get("acc_restored")
    return {
        "split": p["split"], "rank": p["rank"], "bits": p["bits"], "snapshot_every": p["snapshot_every"], "mechanism": p["mechanism"],
        "compression_ratio": m.get("compression_ratio"), "space_savings": m.get("space_savings"),
        "acc_restored": acc, "acc_full": acc_full, "acc_diff_pp": None if acc is None else 100.0 * (acc - acc_full),
        "checkpoints": m.get("checkpoints"), "bytes_stored": m.get("bytes_stored"), "status": status, "run": run,
    }


def _fmt(x, kind: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if kind == "ratio":
        return f"{x:.1f}×"
    if kind == "pct":
        return f"{100 * x:.2f} %"
    return str(x)


def markdown(rows: list[dict], sweep: SweepConfig) -> str:
    base = sweep.base_experiment()
    lines = [
        f"# raybranch sweep `{sweep.name}`: {base.model} on {base.dataset}, main branch, no poison",
        "",
        "Shape of the report's Tables 9, 12 and 14. Compression ratio = checkpoints × bytes of torch.save(state_dict) ÷ "
        "bytes stored (model state; a checkpoint every step); space savings = 1 − stored ÷ torch.save bytes; "
        "final accuracy = test accuracy of main's head restored from the store / the same schedule trained without "
        "raybranch (plain model).",
        "",
        "| split | rank | bits | key frames | mechanism | compression ratio | space savings | final accuracy (restored / full) | status |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        acc = "–" if r["acc_restored"] is None else (
            f"{_fmt(r['acc_restored'], 'pct')} / {_fmt(r['acc_full'], 'pct')} ({r['acc_diff_pp']:+.2f} pp)")
        snap = f"every {r['snapshot_every'] or DEFAULT_KEY_EVERY}"
        lines.append(f"| {r['split']} | {_fmt(r['rank'], '')} | {r['bits']} | {snap} | {r['mechanism']} | "
                     f"{_fmt(r['compression_ratio'], 'ratio')} | {_fmt(r['space_savings'], 'pct')} | {acc} | {r['status']} |")
    lines += ["", "Plot: [ratio_vs_accuracy.png](ratio_vs_accuracy.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"lc": "o", "lc+dlora": "^"}
    for mech in sorted({r["mechanism"] for r in rows}):
        pts = [r for r in rows if r["mechanism"] == mech and r["compression_ratio"] and r["acc_restored"] is not None]
        ax.scatter([r["compression_ratio"] for r in pts], [100 * r["acc_restored"] for r in pts],
                   marker=markers.get(mech, "s"), label=mech, s=40)
        for r in pts:
            label = r["split"] + ("" if r["rank"] is None else f" r{r['rank']}")
            ax.annotate(label, (r["compression_ratio"], 100 * r["acc_restored"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    fulls = sorted({(r["split"], r["acc_full"]) for r in rows})
    for split, acc in fulls:
        ax.axhline(100 * acc, color="grey", alpha=0.3, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (×, log scale)")
    ax.set_ylabel("final test accuracy, restored (%)")
    ax.set_title("Compression ratio vs accuracy (grey: full training without raybranch)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(rows: list[dict], out_dir: str, sweep: SweepConfig) -> dict[str, str]:
    """results.csv, results.md, ratio_vs_accuracy.png in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in zip(("csv", "md", "png"), RESULT_FILES)}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in CSV_COLUMNS})
    with open(paths["md"], "w") as f:
        f.write(markdown(rows, sweep))
    plot(rows, paths["png"])
    return paths


__all__ = ["CSV_COLUMNS", "RESULT_FILES", "full_training", "markdown", "plot", "run_sweep", "sweep_trial",
           "trial_config", "trial_grid", "trial_tag", "write_results"]
