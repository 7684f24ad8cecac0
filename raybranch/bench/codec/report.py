"""The grid of ``raybranch bench codec`` and its printout."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from .measure import prepare, run_setting
from .trajectory import MODELS, train

BASELINE = {"codec": "lc", "bits": 3, "granularity": "tensor"}  # per-tensor 3-bit LC-checkpoint
# (label, Checkpointer settings): the default first, then the ratio/fidelity/restore frontier
SETTINGS = [
    ("default", {}),
    ("residual 0.5", {"residual": 0.5}),
    ("residual 0.7", {"residual": 0.7}),
    ("key_every 64", {"key_every": 64}),
    ("key_every 128", {"key_every": 128}),
    ("key_every 1024", {"key_every": 1024}),
    ("restore budget 5 ms", {"restore_budget_s": 0.005}),
    ("LC global 3-bit", {"codec": "lc", "bits": 3, "granularity": "global"}),
]
SAMPLES = 20


def run(steps: int = 1000, models=MODELS, out: str | None = None, settings=SETTINGS, large: bool = True) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-core figures
    workdir = out or tempfile.mkdtemp(prefix="raybranch-bench-")
    res = {"recipe": {"data": "digits 28x28", "optimizer": "SGD lr=0.01 momentum=0.9", "batch": 32, "seed": 0,
                      "steps": steps, "eval_images": None}, "models": {}}
    try:
        for name in models:
            traj = train(name, steps)
            res["recipe"]["eval_images"] = len(traj.eval_labels)
            sample, load_s, true_acc = prepare(traj, workdir, SAMPLES)
            rows = {"baseline": run_setting(traj, os.path.join(workdir, f"{name}-base"), sample, load_s, true_acc, **BASELINE)}
            for label, kw in settings:
                rows[label] = run_setting(traj, os.path.join(workdir, f"{name}-{len(rows)}"), sample, load_s, true_acc, **kw)
            for r in rows.values():
                r["ratio_vs_baseline"] = r["ratio"] / rows["baseline"]["ratio"]
            res["models"][name] = {"torch_load_ms_median": sorted(load_s.values())[len(load_s) // 2] * 1e3, "rows": rows}
        if large:
            from .large import run_large

            res["large"] = run_large(os.path.join(workdir, "large"))
        return res
    finally:
        torch.set_num_threads(threads)
        if out is None:
            shutil.rmtree(workdir, ignore_errors=True)


COLS = [("ratio", "ratio", "{:.1f}x"), ("ratio_vs_baseline", "vs base", "{:.2f}x"), ("residual_median", "res med", "{:.2f}"),
        ("residual_max", "res max", "{:.2f}"), ("worst_tensor_residual_median", "worst t", "{:.2f}"),
        ("acc_gap_pp_max", "acc gap", "{:.2f}"), ("restore_vs_torch_load_median", "restore", "{:.1f}x"),
        ("restore_vs_torch_load_max", "rst max", "{:.1f}x"), ("save_ms_per_step", "save ms", "{:.2f}")]


def render(res: dict) -> str:
    r = res["recipe"]
    lines = [f"{r['data']}, {r['optimizer']}, batch {r['batch']}, seed {r['seed']}, {r['steps']} steps, a checkpoint after every step",
             "ratio: checkpoints x torch.save bytes / every byte in the store; res: |u_t - u~_t| / |u_t - u_t-1| over the parameters;",
             "worst t: the worst tensor's own residual (median over steps); acc gap: |acc restored - acc true| max over "
             f"{SAMPLES} random steps on all {r['eval_images']} digits (pp); restore: median over those steps, from a new Reader, / torch.load",
             "targets: default residual <= 1 at every step, ratio >= 2x the baseline (per-tensor 3-bit LC), restore <= 5x torch.load", ""]
    for name, m in res["models"].items():
        lines.append(f"{name} (torch.load {m['torch_load_ms_median']:.2f} ms)")
        lines.append(f"  {'setting':<18}" + "".join(f"{h:>9}" for _, h, _ in COLS) + "  exact  worst tensor")
        for label, row in m["rows"].items():
            lines.append(f"  {label:<18}" + "".join(f"{f.format(row[k]):>9}" for k, _, f in COLS)
                         + f"  {'yes' if row['restore_bit_exact'] else 'NO':>5}  {row['worst_tensor']}")
        d = m["rows"]["default"]
        if d["key_frame_bytes"]:
            lines.append(f"  exact checkpoints (default): a key frame {d['key_frame_bytes'] / 1e3:.1f} kB vs a standalone snapshot "
                         f"{d['snapshot_bytes'] / 1e3:.1f} kB ({d['snapshot_bytes'] / d['key_frame_bytes']:.2f}x smaller); "
                         f"{d['key_frame_count']} key frames, {d['snapshot_count']} snapshot(s)")
        lines.append("")
    if "large" in res:
        g = res["large"]
        lines.append(f"ResNet-50-sized state ({g['params'] / 1e6:.1f} M parameters, {g['steps']} real steps, CPU): restore of the last step "
                     f"{g['restore_s']:.2f} s vs torch.load {g['torch_load_s']:.2f} s = {g['restore_vs_torch_load']:.2f}x (target <= 2x)")
        lines.append(f"  exact checkpoint: key frame {g['key_bytes'] / 1e6:.1f} MB vs standalone snapshot {g['snapshot_bytes'] / 1e6:.1f} MB "
                     f"({g['snapshot_bytes'] / g['key_bytes']:.2f}x smaller); a delta {g['delta_bytes'] / 1e6:.2f} MB")
    return "\n".join(lines)


def main(steps: int = 1000, as_json: bool = False, out: str | None = None, models=MODELS, large: bool = True) -> int:
    res = run(steps=steps, models=models, out=out, large=large)
    print(json.dumps(res, indent=1) if as_json else render(res))
    return 0
