"""A sweep's results as files (Ray-free): ``results.csv`` (one row per trial), ``results.md``
(per trial, then means over seeds in the report's table shapes) and ``ratio_vs_accuracy.png``.

Per setting (every trial parameter but the seed) and split, over the n seeds that finished:

    Δ̄ = mean of Δ_i,   Δ_i = 100 · (acc_restored_i − acc_full_i)   (pp; paired: same seed and split)
    95 % interval = Δ̄ ± t_{0.975, n−1} · sd(Δ) / √n                  (none for n = 1)

and the mean compression ratio. A setting *meets the target* when on every split of the sweep
Δ̄ ≥ −1 pp and the mean ratio ≥ 100× (issue 12's target; :data:`TARGET_PP`, :data:`TARGET_RATIO`).
"""
from __future__ import annotations

import csv
import math
import os
import statistics
from collections import defaultdict

from ..checkpoint.checkpointer import DEFAULT_KEY_EVERY
from .grid import knob_label

RESULT_FILES = ("results.csv", "results.md", "ratio_vs_accuracy.png")
CSV_COLUMNS = ("split", "seed", "rank", "bits", "snapshot_every", "mechanism", "compression_ratio", "space_savings",
               "acc_restored", "acc_full", "acc_diff_pp", "checkpoints", "bytes_stored", "status", "run", "model",
               "lora_pattern")
TARGET_PP = -1.0
TARGET_RATIO = 100.0
PLOT_FLOOR_PP = -12.0  # the plot's lowest y (pp): means below it are marked on the edge
# The report's table shapes: which trial parameter leads each one.
SHAPES = (("model", "Table 3 (by model)"), ("lora_pattern", "Table 8 (by target layers)"),
          ("split", "Table 9 (by split)"), ("rank", "Tables 12 and 14 (by rank)"))


def t_quantile(df: int) -> float:
    """t_{0.975, df} (scipy's Student t)."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def setting_of(row: dict) -> str:
    """A row's setting without its split and seed, e.g. ``lc+dlora r8 b3 lr=0.2``."""
    parts = [row["mechanism"], "" if row["rank"] is None else f"r{row['rank']}", f"b{row['bits']}"]
    if row["snapshot_every"] is not None:
        parts.append(f"key every {row['snapshot_every']}")
    return " ".join(p for p in [*parts, knob_label(row.get("knobs") or {})] if p)


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per (setting, split): n, mean Δ pp and its 95 % half-width, mean ratio and
    savings, mean accuracies; in the rows' order."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(setting_of(r), r["split"])].append(r)
    out = []
    for (setting, split), rs in groups.items():
        done = [r for r in rs if r["acc_diff_pp"] is not None and r["compression_ratio"] is not None]
        d = [r["acc_diff_pp"] for r in done]
        n = len(d)
        half = t_quantile(n - 1) * statistics.stdev(d) / math.sqrt(n) if n > 1 else None
        mean = (lambda k: statistics.fmean(r[k] for r in done) if done else None)
        out.append({"setting": setting, "split": split, "n": n, "trials": len(rs), "first": rs[0],
                    "diff_pp": statistics.fmean(d) if d else None, "ci_pp": half,
                    "ratio": mean("compression_ratio"), "savings": mean("space_savings"),
                    "acc_restored": mean("acc_restored"), "acc_full": mean("acc_full")})
    return out


def verdicts(agg: list[dict], splits: list[str]) -> list[dict]:
    """Per setting: the worst split's mean Δ pp, the lowest mean ratio, and whether every split
    of the sweep meets both targets; best first (met, then worst Δ)."""
    by: dict[str, dict[str, dict]] = defaultdict(dict)
    for a in agg:
        by[a["setting"]][a["split"]] = a
    out = []
    for setting, per in by.items():
        done = [per[s] for s in splits if s in per and per[s]["n"]]
        worst = min((a["diff_pp"] for a in done), default=None)
        low = min((a["ratio"] for a in done), default=None)
        met = len(done) == len(splits) and worst >= TARGET_PP and low >= TARGET_RATIO
        out.append({"setting": setting, "worst_pp": worst, "min_ratio": low, "splits": len(done), "met": met})
    out.sort(key=lambda v: (not v["met"], -(v["worst_pp"] if v["worst_pp"] is not None else -1e9)))
    return out


def _fmt(x, kind: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if kind == "ratio":
        return f"{x:.1f}×"
    if kind == "pct":
        return f"{100 * x:.2f} %"
    if kind == "pp":
        return f"{x:+.2f}"
    return str(x)


def _diff(a: dict) -> str:
    if a["diff_pp"] is None:
        return "–"
    return f"{a['diff_pp']:+.2f}" + ("" if a["ci_pp"] is None else f" ± {a['ci_pp']:.2f}")


def _lead(a: dict, key: str) -> str:
    r = a["first"]
    if key == "lora_pattern" and r["mechanism"] == "lc":
        return "–"
    return _fmt(r.get(key, (r.get("knobs") or {}).get(key)), "")


def markdown(rows: list[dict], title: str, splits: list[str]) -> str:
    """results.md: per trial, the verdict per setting, means over seeds, the report's shapes."""
    agg = aggregate(rows)
    lines = [
        f"# {title}", "",
        "Compression ratio = checkpoints × bytes of torch.save(state_dict) ÷ bytes stored (model state; a checkpoint "
        "every step); space savings = 1 − stored ÷ torch.save bytes; final accuracy = test accuracy of main's head "
        "restored from the store / the same schedule trained without raybranch (plain model, same seed and split); "
        "Δ in pp. Means are over the seeds that finished, ± the 95 % t-interval.", "",
        f"## Settings against the target (every split: Δ ≥ {TARGET_PP:+.0f} pp and ratio ≥ {TARGET_RATIO:.0f}×)", "",
        "| setting | splits | worst split Δ̄ (pp) | lowest mean ratio | meets target |", "| --- | ---: | ---: | ---: | --- |",
    ]
    for v in verdicts(agg, splits):
        lines.append(f"| {v['setting']} | {v['splits']}/{len(splits)} | {_fmt(v['worst_pp'], 'pp')} | "
                     f"{_fmt(v['min_ratio'], 'ratio')} | {'yes' if v['met'] else 'no'} |")
    lines += ["", "## Means over seeds", "",
              "| setting | split | seeds | compression ratio | space savings | accuracy restored / full | Δ̄ ± 95 % (pp) |",
              "| --- | --- | ---: | ---: | ---: | --- | ---: |"]
    for a in agg:
        lines.append(f"| {a['setting']} | {a['split']} | {a['n']}/{a['trials']} | {_fmt(a['ratio'], 'ratio')} | "
                     f"{_fmt(a['savings'], 'pct')} | {_fmt(a['acc_restored'], 'pct')} / {_fmt(a['acc_full'], 'pct')} | {_diff(a)} |")
    for key, name in SHAPES:
        values = {_lead(a, key) for a in agg}
        if len(values) < 2 and key != "split":
            continue
        lines += ["", f"## Shape of the report's {name}", "",
                  f"| {key} | mechanism | setting | split | compression ratio | space savings | final accuracy (restored / full) | Δ̄ ± 95 % (pp) |",
                  "| --- | --- | --- | --- | ---: | ---: | --- | ---: |"]
        for a in sorted(agg, key=lambda a: (_lead(a, key), a["first"]["mechanism"], a["setting"])):
            lines.append(f"| {_lead(a, key)} | {a['first']['mechanism']} | {a['setting']} | {a['split']} | "
                         f"{_fmt(a['ratio'], 'ratio')} | {_fmt(a['savings'], 'pct')} | "
                         f"{_fmt(a['acc_restored'], 'pct')} / {_fmt(a['acc_full'], 'pct')} | {_diff(a)} |")
    lines += ["", "## Every trial", "",
              "| split | seed | setting | compression ratio | space savings | final accuracy (restored / full) | status |",
              "| --- | ---: | --- | ---: | ---: | --- | --- |"]
    for r in rows:
        acc = "–" if r["acc_restored"] is None else (
            f"{_fmt(r['acc_restored'], 'pct')} / {_fmt(r['acc_full'], 'pct')} ({r['acc_diff_pp']:+.2f} pp)")
        lines.append(f"| {r['split']} | {_fmt(r.get('seed'), '')} | {setting_of(r)} | {_fmt(r['compression_ratio'], 'ratio')} | "
                     f"{_fmt(r['space_savings'], 'pct')} | {acc} | {r['status']} |")
    lines += ["", f"Key frames: every {DEFAULT_KEY_EVERY} checkpoints unless the setting says otherwise. "
              "Plot: [ratio_vs_accuracy.png](ratio_vs_accuracy.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> str:
    """Mean ratio (log x) against mean Δ pp (y, 95 % bars): one colour per setting, one marker per
    split, the legend beside the axes, the targets as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    agg = [a for a in aggregate(rows) if a["n"] and a["ratio"]]
    settings = list(dict.fromkeys(a["setting"] for a in agg))
    splits = list(dict.fromkeys(a["split"] for a in agg))
    markers = "o^sDvP*X<>"
    colours = plt.get_cmap("tab20" if len(settings) > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(10, 5.5))
    # the y window shows the region that matters: a diverged setting (−30 pp) would squash it;
    # points below the window are drawn on its lower edge as ▼ and counted in the caption
    lo = max(PLOT_FLOOR_PP, min(a["diff_pp"] for a in agg) - 1) if agg else TARGET_PP - 1
    hi = max(2.0, max((a["diff_pp"] for a in agg), default=0) + 1)
    below = 0
    for a in agg:
        i, j = settings.index(a["setting"]), splits.index(a["split"])
        colour = colours(i % colours.N)
        if a["diff_pp"] < lo:
            below += 1
            ax.plot(a["ratio"], lo, marker="v", color=colour, ms=7, clip_on=False)
            continue
        ax.errorbar(a["ratio"], a["diff_pp"], yerr=a["ci_pp"] or 0, fmt=markers[j % len(markers)],
                    color=colour, ms=6, capsize=2, lw=0.8)
    ax.set_ylim(lo, hi)
    ax.axhline(TARGET_PP, color="grey", ls="--", lw=1)
    ax.axvline(TARGET_RATIO, color="grey", ls="--", lw=1)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "2468" else ""))
    if below:
        title += f"  (▼: {below} mean(s) below {lo:.0f} pp)"
    ax.set_xlabel("compression ratio (×, log scale; mean over seeds)")
    ax.set_ylabel("restored − full accuracy (pp; mean, 95 % bars)")
    ax.set_title(title, fontsize=10)
    handles = [plt.Line2D([], [], color=colours(i % colours.N), marker="o", ls="", label=s) for i, s in enumerate(settings)]
    handles += [plt.Line2D([], [], color="black", marker=markers[j % len(markers)], ls="", label=f"split {s}")
                for j, s in enumerate(splits)]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(rows: list[dict], out_dir: str, title: str, splits: list[str], grid_keys: list[str]) -> dict[str, str]:
    """results.csv (one column per grid key too), results.md, ratio_vs_accuracy.png in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in zip(("csv", "md", "png"), RESULT_FILES)}
    grid_keys = [k for k in grid_keys if k not in CSV_COLUMNS]
    columns = [*CSV_COLUMNS, *grid_keys]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            cells = {**{k: r[k] for k in CSV_COLUMNS}, **{k: (r.get("knobs") or {}).get(k) for k in grid_keys}}
            w.writerow({k: ("" if v is None else v) for k, v in cells.items()})
    with open(paths["md"], "w") as f:
        f.write(markdown(rows, title, splits))
    plot(rows, paths["png"], title)
    return paths


__all__ = ["CSV_COLUMNS", "RESULT_FILES", "SHAPES", "TARGET_PP", "TARGET_RATIO", "aggregate", "markdown", "plot",
           "setting_of", "t_quantile", "verdicts", "write_results"]
