"""One codec setting over one trajectory: what the user gets from the store.

* ratio: (checkpoints × bytes of ``torch.save(state_dict)``) ÷ every byte in the store;
* residual r_t = ‖u_t − ũ_t‖ / ‖u_t − u_{t−1}‖ over the parameters, at every step that changes
  them (ũ_t read from the writer's encoders, which restores equal bit for bit: checked on the
  sampled steps); the worst tensor's own r (median over steps);
* restore of random steps, each from a new store handle and Reader (index reads included),
  against ``torch.load`` of the same state from a file; and the accuracy gap there on all
  1797 digits.
"""
from __future__ import annotations

import io
import os
import shutil
import statistics
import time

import numpy as np
import torch

from ...checkpoint.checkpointer import Checkpointer
from ...checkpoint.restore import Reader
from ...store.blob import read_blob
from ...store.store import open_store
from .trajectory import Trajectory, accuracy


def torch_save_bytes(sd: dict) -> int:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return len(buf.getvalue())


def timed_torch_load(sd: dict, path: str, repeats: int = 5) -> float:
    torch.save(sd, path)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.load(path, weights_only=True)
        best = min(best, time.perf_counter() - t)
    return best


def run_setting(traj: Trajectory, root: str, sample: list[int], load_s: dict[int, float], true_acc: dict[int, float], **ck_kwargs) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    uri = "file://" + root
    store = open_store(uri, check=False)
    # inline: the encoder's reconstruction is read right after each save (the pipeline's cost is
    # what python -m raybranch.bench.step_overhead measures)
    ck = Checkpointer(store, "bench", "main", background=False, **ck_kwargs)
    residual, per_tensor, recon_at = [], [], {}
    t0 = time.perf_counter()
    for t, sd in enumerate(traj.states):
        ck.save(t, sd)
        enc = ck._enc.encoders["model"]
        if t in sample:
            recon_at[t] = enc.recon.clone()
        step = float(_all_param_step(traj, t)) if t else 0.0
        if step == 0:  # steps that change nothing are skipped
            continue
        keep = [n in traj.params for n in enc.names]
        u = torch.cat([sd[n].reshape(-1).float() for n in enc.names])
        prev = torch.cat([traj.states[t - 1][n].reshape(-1).float() for n in enc.names])
        en = torch.stack([x.norm() for x, k in zip((u - enc.recon).split(enc.sizes), keep) if k])
        dn = torch.stack([x.norm() for x, k in zip((u - prev).split(enc.sizes), keep) if k])
        residual.append(float(en.norm()) / step)
        per_tensor.append(torch.where(dn > 0, en / dn.clamp_min(1e-38), torch.full_like(en, float("nan"))).numpy())
    ck.close()
    save_s = time.perf_counter() - t0
    names = [n for n in ck._enc.encoders["model"].names if n in traj.params]
    stored = store.total_bytes("bench")
    restore_s, gaps, exact_ok = [], [], True
    for s in sample:
        t = time.perf_counter()
        out = Reader(open_store(uri, check=False), "bench").restore("main", s)
        restore_s.append(time.perf_counter() - t)
        flat = torch.cat([out["model"][n].reshape(-1).float() for n in ck._enc.encoders["model"].names])
        exact_ok &= bool(torch.equal(flat.view(torch.int32), recon_at[s].view(torch.int32)))
        gaps.append(abs(accuracy(traj, out["model"]) - true_acc[s]) * 100)
    exact_sizes = _exact_sizes(store)
    pt = np.array(per_tensor)
    worst = np.nanmedian(pt, axis=0) if len(pt) else np.zeros(1)
    n = len(traj.states)
    ratios = [r / load_s[s] for r, s in zip(restore_s, sample)]
    return {
        "ratio": n * torch_save_bytes(traj.states[0]) / stored,
        "stored_bytes": stored,
        "residual_median": statistics.median(residual),
        "residual_max": max(residual),
        "worst_tensor": names[int(np.nanargmax(worst))],
        "worst_tensor_residual_median": float(np.nanmax(worst)),
        "acc_gap_pp_max": max(gaps),
        "restore_ms_median": statistics.median(restore_s) * 1e3,
        "restore_vs_torch_load_median": statistics.median(ratios),
        "restore_vs_torch_load_max": max(ratios),
        "restore_bit_exact": exact_ok,
        "save_ms_per_step": save_s / n * 1e3,
        **exact_sizes,
    }


def _exact_sizes(store) -> dict:
    """Mean bytes of a key frame's rows and of a standalone snapshot's rows (payload and tables)."""
    by_step: dict[tuple[str, int], int] = {}
    for info in store.list("bench/blobs"):
        for r in read_blob(store.read_bytes(info.rel))[0]:
            if r.kind in ("key", "recon"):
                by_step[(r.kind, r.step)] = by_step.get((r.kind, r.step), 0) + len(r.payload)
    out = {}
    for kind, label in (("key", "key_frame_bytes"), ("recon", "snapshot_bytes")):
        sizes = [v for (k, _), v in by_step.items() if k == kind]
        out[label] = statistics.mean(sizes) if sizes else None
        out[label.replace("bytes", "count")] = len(sizes)
    return out


def _all_param_step(traj: Trajectory, t: int) -> torch.Tensor:
    return torch.cat([(traj.states[t][n].float() - traj.states[t - 1][n].float()).reshape(-1) for n in traj.params]).norm()


def prepare(traj: Trajectory, workdir: str, samples: int, seed: int = 0):
    """(sampled steps, torch.load seconds, true accuracy) for a trajectory."""
    n = len(traj.states)
    rng = np.random.default_rng(seed)
    sample = sorted(int(s) for s in rng.choice(np.arange(1, n), size=min(samples, n - 1), replace=False))
    path = os.path.join(workdir, "whole.pt")
    load_s = {s: timed_torch_load(traj.states[s], path) for s in sample}
    true_acc = {s: accuracy(traj, traj.states[s]) for s in sample}
    return sample, load_s, true_acc
