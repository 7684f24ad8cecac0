"""The experiment's report: ``report.json``, ``report.md`` (report Table 1 / Figure 7.1 shapes)
and PNG plots (matplotlib, Agg backend).

``report.json``: ``mechanisms.<mech>.branches.<branch>`` holds ``compression_ratio``,
``space_savings``, ``bytes_stored``, ``bytes_torch_save``, ``checkpoints``, ``acc_restored``,
``acc_full``, ``per_slice_acc``, ``attack_success_rate`` (and a few more fields), and
``mechanisms.<mech>.recovery`` holds ``instant_seconds``, ``replay_seconds``,
``retrain_from_scratch_seconds``, ``acc_replay``, ``acc_oracle``, ``asr_before``, ``asr_after``.
Accuracies are shares in [0, 1]; the Markdown prints percentages and ratios as ×.
"""
from __future__ import annotations

import json
import math
import os

from ..config.classes import ExperimentConfig
from .metrics import BRANCH_KEYS, RECOVERY_KEYS, targets

PLOTS = ("accuracy_per_slice.png", "bytes_per_branch.png")


def _lora_s(cfg: dict) -> float:
    """The Delta-LoRA scale s of a run's config dict (lora_scale, or α/r, α/√r)."""
    return ExperimentConfig.from_dict(cfg).lora_s()


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def markdown(result: dict) -> str:
    cfg = result["config"]
    d = result["data"]
    lines = [
        f"# raybranch demo: {cfg['model']} on {cfg['dataset']}, {cfg['split']} slices",
        "",
        f"Training set {d['train']} images: warm-up {d['warmup']}, validation {d['val']}, slices {d['slices']}; test {d['test']}.",
        f"Slices count from 1. Poison: {cfg['poison']} in slice {cfg['poison_slice']} "
        f"({d['poisoned']} images, rate {cfg['poison_rate']}, target class {cfg['poison_target']}); it is the slice quarantined.",
        f"Branch point: {result['branch_point']['epochs']} epochs on the warm-up part → validation "
        f"{_pct(result['branch_point']['val_acc'])}, test {_pct(result['branch_point']['acc'])} (target {_pct(cfg['branch_point_target'])}).",
        f"SGD lr {cfg['lr']} (Delta-LoRA models {cfg['lora_lr']}), batch {cfg['batch_size']}, ≤ {cfg['epochs']} epochs per slice, "
        f"early stopping patience {cfg['patience']}, a checkpoint every {cfg['checkpoint_every']} step(s), LC {cfg['bits']} bits "
        f"({cfg['granularity']} buckets), Delta-LoRA on `{cfg['lora_pattern']}` r={cfg['lora_rank']} s={_lora_s(cfg):g} "
        f"λ={cfg.get('lora_lam', 1.0)} init {cfg.get('lora_init', 'lora')} (B's lr × {cfg.get('lora_b_ratio', 1.0)}, "
        f"dense lr {cfg.get('lora_dense_lr') or cfg['lora_lr']}), "
        f"merge at slice end: {cfg['lora_merge']}.",
        "",
        "## Table 1 shape: compression and final accuracy (model state; plain SGD has no optimizer tensors)",
        "",
        "| model | mechanism | branch | checkpoints | compression ratio | space savings | stored | torch.save × checkpoints | final accuracy (restored / full) | ASR |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for mech, r in result["mechanisms"].items():
        for b, v in r["branches"].items():
            diff = 100 * (v["acc_restored"] - v["acc_full"])
            lines.append(
                f"| {cfg['model']} | {mech} | {b} | {v['checkpoints']} | {v['compression_ratio']:.1f}× | {100 * v['space_savings']:.2f} % | "
                f"{_fmt_bytes(v['bytes_stored'])} | {_fmt_bytes(v['bytes_torch_save'])} | {_pct(v['acc_restored'])} / {_pct(v['acc_full'])} ({diff:+.2f} pp) | "
                f"{_pct(v['attack_success_rate'])} |"
            )
        t = r["run_total"]
        lines.append(f"| {cfg['model']} | {mech} | *whole run* | {t['checkpoints']} | {t['compression_ratio']:.1f}× | "
                     f"{100 * (1 - 1 / t['compression_ratio']):.2f} % | {_fmt_bytes(t['bytes_stored'])} | – | – | – |")
    n = len(d["slices"])
    lines += [
        "",
        "Per branch, bytes are those of its own checkpoints (shared history is charged once, to the branch that wrote it; "
        "layout documents are charged to the whole run only). `full` is the same schedule trained without raybranch "
        "(plain model, no Delta-LoRA); for clean and replay that is training on every slice but the quarantined one.",
        "",
        "## Figure 7.1 shape: test accuracy after each slice (restored from the slice-end checkpoint)",
        "",
        "| mechanism | branch | " + " | ".join(f"slice {k}" for k in range(1, n + 1)) + " | final restored / full |",
        "| --- | --- | " + " | ".join("---:" for _ in range(n)) + " | --- |",
    ]
    for mech, r in result["mechanisms"].items():
        for b, v in r["branches"].items():
            cells = " | ".join(_pct(a) for a in v["per_slice_acc"])
            lines.append(f"| {mech} | {b} | {cells} | {_pct(v['acc_restored'])} / {_pct(v['acc_full'])} |")
    for b, f in result["full"].items():
        cells = " | ".join(_pct(a) for a in f["per_slice_acc"])
        lines.append(f"| nothing (full) | {b} | {cells} | {_pct(f['acc'])} |")
    lines += ["", "A branch that does not train a slice (clean: unverified slices; replay: the quarantined one) keeps its "
              "model, so its accuracy after that slice is the previous one.", "",
              "## Quarantine and recovery", "",
              "| mechanism | slice | instant recovery | replay | retrain from scratch (oracle) | instant / retrain | acc instant | acc replay | acc oracle | ASR before | ASR after (replay) | ASR instant |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mech, r in result["mechanisms"].items():
        rec = r.get("recovery")
        if not rec:
            continue
        lines.append(
            f"| {mech} | {rec['quarantined_slice']} | {1000 * rec['instant_seconds']:.1f} ms | {rec['replay_seconds']:.2f} s | "
            f"{rec['retrain_from_scratch_seconds']:.2f} s | {100 * rec['instant_seconds'] / rec['retrain_from_scratch_seconds']:.2f} % | "
            f"{_pct(rec['acc_instant'])} | {_pct(rec['acc_replay'])} | {_pct(rec['acc_oracle'])} | {_pct(rec['asr_before'])} | "
            f"{_pct(rec['asr_after'])} | {_pct(rec['asr_instant'])} |"
        )
    lines += ["", "Instant recovery = restore clean's head from the store (cold reader). Replay = fork main at the end of "
              "slice k−1 and train slices k+1…. Retrain = the oracle: the same mechanism trained from the branch point on every "
              "slice but k, no checkpoints (branch-point training not included). Wall times on a shared machine move with "
              "its load; the targets also give the ratio in CPU time of this process (summed over its threads, so a multi-threaded retrain counts more than its wall time).", ""]
    if "lora_merge_comparison" in result:
        c = result["lora_merge_comparison"]
        lines += ["## Delta-LoRA: merge & re-initialise at each slice end vs no merge (main branch)", "",
                  "| policy | compression ratio | acc restored | stored | checkpoints |", "| --- | ---: | ---: | ---: | ---: |"]
        for pol in ("none", "slice-end"):
            if pol in c:
                v = c[pol]
                lines.append(f"| {pol}{' (chosen)' if pol == c['chosen'] else ''} | {v['compression_ratio']:.1f}× | {_pct(v['acc_restored'])} | "
                             f"{_fmt_bytes(v['bytes_stored'])} | {v['checkpoints']} |")
        lines += ["", "Merging at a slice end folds s·BA into W and re-initialises A (B = 0): the anchor (every dense W) "
                  "changes and is stored again, exactly, and the next delta codes a freshly drawn A. Without a merge the "
                  "anchor is stored once per branch and W keeps following W_a + λ·s·(BA − B_aA_a). Chosen here: "
                  f"`{c['chosen']}` (ratio and accuracy above; one run, so an accuracy difference of a few test images "
                  "is within the noise of early stopping).", ""]
    lines += ["## Targets", "", "| what | measured | target | met |", "| --- | ---: | --- | --- |"]
    for t in targets(result):
        lines.append(f"| {t['what']} | {t['value']:.3f} | {t['target']} | {'yes' if t['met'] else '**no**'} |")
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in PLOTS), "",
              f"Total time {result['seconds']:.1f} s. Store: `{result['store']}`.", ""]
    return "\n".join(lines)


def plot(result: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    n = len(result["data"]["slices"])
    xs = list(range(1, n + 1))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"main": "-", "clean": "--", "replay": ":"}
    for mech, r in result["mechanisms"].items():
        for b, v in r["branches"].items():
            ax.plot(xs, [100 * a for a in v["per_slice_acc"]], styles.get(b, "-"), marker="o", label=f"{mech} {b}")
    for b, f in result["full"].items():
        ax.plot(xs, [100 * a for a in f["per_slice_acc"]], styles.get(b, "-"), color="grey", alpha=0.6, marker="x", label=f"full (no raybranch) {b}")
    ax.axvline(result["config"]["poison_slice"], color="red", alpha=0.2, lw=8, label="poisoned slice")
    ax.set_xticks(xs)
    ax.set_xlabel("after slice")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy after each slice (models restored from the store)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = os.path.join(out_dir, PLOTS[0])
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    labels, stored, baseline = [], [], []
    for mech, r in result["mechanisms"].items():
        for b, v in r["branches"].items():
            labels.append(f"{mech}\n{b}")
            stored.append(v["bytes_stored"] / 2**20)
            baseline.append(v["bytes_torch_save"] / 2**20)
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], baseline, width=0.4, label="torch.save × checkpoints")
    ax.bar([i + 0.2 for i in x], stored, width=0.4, label="raybranch store")
    for i, (s, t) in enumerate(zip(stored, baseline)):
        ax.text(i + 0.2, s, f"{t / s:.0f}×" if s > 0 else "", ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("MiB (log scale)")
    ax.set_title("Bytes stored per branch vs torch.save of every checkpoint")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = os.path.join(out_dir, PLOTS[1])
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def _clean(obj):
    """JSON-safe: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def check_keys(result: dict) -> None:
    """ValueError naming the first missing key of the report.json contract."""
    for mech, r in result["mechanisms"].items():
        for b, v in r["branches"].items():
            missing = [k for k in BRANCH_KEYS if k not in v]
            if missing:
                raise ValueError(f"report: mechanisms.{mech}.branches.{b} lacks {missing}")
        if "recovery" in r:
            missing = [k for k in RECOVERY_KEYS if k not in r["recovery"]]
            if missing:
                raise ValueError(f"report: mechanisms.{mech}.recovery lacks {missing}")


def write_report(result: dict, out_dir: str) -> dict[str, str]:
    """Write report.json, report.md and the plots into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    check_keys(result)
    doc = _clean({**result, "targets": targets(result)})
    pj = os.path.join(out_dir, "report.json")
    with open(pj, "w") as f:
        json.dump(doc, f, indent=1)
    pm = os.path.join(out_dir, "report.md")
    with open(pm, "w") as f:
        f.write(markdown(result))
    plots = plot(result, out_dir)
    return {"json": pj, "md": pm, "plots": plots}


__all__ = ["PLOTS", "check_keys", "markdown", "plot", "targets", "write_report"]
