"""``raybranch bench codec``: LC checkpoints of every step of a real training run, raybranch vs the seed.

The run: LeNet-5 on scikit-learn's digits (upsampled to 28×28), SGD(lr 0.01, momentum 0.9),
batch 32, ``steps`` steps, a checkpoint after every step (step 0 = the initial model). Every
state is kept in memory so each scheme sees the same trajectory. Figures (model state only):

* storage ratio = (checkpoints × bytes of ``torch.save(state_dict)``) ÷ every byte in the store
  (blobs, manifests, segments, layouts; the seed: its zlib deltas + its torch.save snapshots);
* encode / decode MB/s per core (torch and numpy limited to one thread; fp32 bytes of the state);
* restore time of random checkpoints ÷ ``torch.load`` of the same state stored whole;
* accuracy of the restored model − accuracy of the true model at those steps (pp);
* the ratio/restore frontier of raybranch's snapshot policies.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import statistics
import tempfile
import time
import zlib

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint.checkpointer import Checkpointer
from ..checkpoint.restore import Reader
from ..codec.lc import LCParams, SegmentLayout, quantize
from ..store.store import open_store

RESTORE_SAMPLES = 20
POLICIES = [None, 500, 250, 100, 50, 20]  # snapshot_every (None = only the first checkpoint)


def _torch_save_bytes(sd: dict) -> int:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return len(buf.getvalue())


def lenet_on_digits(seed: int = 0):
    """The benchmarks' training setup: (LeNet-5, SGD lr 0.01 momentum 0.9, train set, test set)."""
    from ..data import load_dataset
    from ..models import build_model

    train, test, meta = load_dataset("digits")
    torch.manual_seed(seed)
    model = build_model("lenet5", num_classes=meta.num_classes, in_channels=meta.in_channels, image_size=meta.image_size)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), train, test


def training_run(steps: int, seed: int = 0):
    """States after every step of LeNet-5/digits SGD training (CPU, one thread)."""
    model, opt, train, test = lenet_on_digits(seed)
    X, Y = train.images, train.labels
    g = torch.Generator().manual_seed(seed)
    states = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    for _ in range(steps):
        idx = torch.randint(0, len(Y), (32,), generator=g)
        loss = F.cross_entropy(model(X[idx]), Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return model, states, test


@torch.no_grad()
def accuracy(model, sd, test) -> float:
    model.load_state_dict(sd)
    return float((model(test.images).argmax(1) == test.labels).float().mean())


def _timed_torch_load(sd: dict, path: str, repeats: int = 5) -> float:
    torch.save(sd, path)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.load(path, weights_only=True)
        best = min(best, time.perf_counter() - t)
    return best


def run_raybranch(states, root: str, sample_steps, load_times, snapshot_every=None, granularity="global", restore_repeats=3):
    uri = "file://" + root
    shutil.rmtree(root, ignore_errors=True)
    store = open_store(uri, check=False)
    ck = Checkpointer(store, "bench", "main", granularity=granularity, snapshot_every=snapshot_every)
    t0 = time.perf_counter()
    for t, sd in enumerate(states):
        ck.save(t, sd)
    ck.close()
    save_s = time.perf_counter() - t0
    stored = store.total_bytes("bench")
    reader = Reader(store, "bench")
    reader.lineage("main")  # the branch is opened once; restores below read its pages and blobs
    restore_s, restored = [], {}
    for s in sample_steps:
        best = float("inf")
        for _ in range(restore_repeats):
            reader.blobs._rows.clear()  # cold blob cache: every blob on the chain is read and parsed
            t = time.perf_counter()
            out = reader.restore("main", s)
            best = min(best, time.perf_counter() - t)
        restore_s.append(best)
        restored[s] = out["model"]
    ratios = [r / load_times[s] for r, s in zip(restore_s, sample_steps)]
    # decode throughput: the whole chain to the head, deltas only
    head_depth = reader.lineage("main").entry()["depth"]
    reader.blobs._rows.clear()
    t = time.perf_counter()
    reader.restore("main")
    decode_s = time.perf_counter() - t
    numel = sum(v.numel() for v in states[0].values() if v.is_floating_point())
    return {
        "snapshot_every": snapshot_every,
        "granularity": granularity,
        "stored_bytes": stored,
        "encode_MBps": ck.timings["lossy_bytes"] / ck.timings["encode_s"] / 1e6,
        "decode_MBps": head_depth * numel * 4 / decode_s / 1e6 if head_depth else None,
        "save_ms_per_step": save_s / len(states) * 1e3,
        "compact_ms_per_step": ck.timings["compact_s"] / len(states) * 1e3,
        "restore_ms_median": statistics.median(restore_s) * 1e3,
        "restore_ms_max": max(restore_s) * 1e3,
        "restore_vs_torch_load_median": statistics.median(ratios),
        "restore_vs_torch_load_max": max(ratios),
    }, restored


def run_seed_scheme(states, sample_steps, load_times, every: int = 10, bits: int = 3):
    """The seed's scheme: global buckets, (max+min)/2 values, the *dequantized* float32 delta
    through zlib, and a full ``torch.save`` snapshot every ``every`` steps (chain restarts there)."""
    names = list(states[0])
    params = LCParams(bits=bits, granularity="global", value="midrange")
    lossy = [n for n in names if states[0][n].is_floating_point()]
    layout = SegmentLayout([sum(states[0][n].numel() for n in lossy)], torch.device("cpu"))
    flat = lambda sd: torch.cat([sd[n].reshape(-1).float() for n in lossy])  # noqa: E731
    blobs: list[tuple[str, bytes]] = []
    recon = None
    enc_s = 0.0
    lossy_bytes = 0
    for t, sd in enumerate(states):
        if t % every == 0:
            buf = io.BytesIO()
            torch.save(sd, buf)
            blobs.append(("snap", buf.getvalue()))
            recon = flat(sd).clone()
        else:
            u = flat(sd)
            a = time.perf_counter()
            _, _, q = quantize(u - recon, layout, params)
            recon += q
            payload = zlib.compress(q.numpy().tobytes())
            enc_s += time.perf_counter() - a
            lossy_bytes += u.numel() * 4
            blobs.append(("delta", payload))
    stored = sum(len(b) for _, b in blobs)

    def restore(s):
        base = s - s % every
        sd = torch.load(io.BytesIO(blobs[base][1]), weights_only=True)
        acc = torch.cat([sd[n].reshape(-1).float() for n in lossy]).numpy().copy()
        for i in range(base + 1, s + 1):
            acc += np.frombuffer(zlib.decompress(blobs[i][1]), dtype=np.float32)
        out, off = {}, 0
        for n in names:
            if n in lossy:
                k = sd[n].numel()
                out[n] = torch.from_numpy(acc[off : off + k].copy()).reshape(sd[n].shape).to(sd[n].dtype)
                off += k
            else:
                out[n] = sd[n]
        return out

    restore_s, restored = [], {}
    for s in sample_steps:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            out = restore(s)
            best = min(best, time.perf_counter() - t)
        restore_s.append(best)
        restored[s] = out
    # decode: zlib + add for 9 deltas
    t = time.perf_counter()
    n_dec = 0
    for i in range(1, min(len(blobs), 200)):
        if blobs[i][0] == "delta":
            np.frombuffer(zlib.decompress(blobs[i][1]), dtype=np.float32)
            n_dec += 1
    dec_s = time.perf_counter() - t
    ratios = [r / load_times[s] for r, s in zip(restore_s, sample_steps)]
    return {
        "stored_bytes": stored,
        "encode_MBps": lossy_bytes / enc_s / 1e6,
        "decode_MBps": n_dec * layout.numel * 4 / dec_s / 1e6,
        "restore_ms_median": statistics.median(restore_s) * 1e3,
        "restore_ms_max": max(restore_s) * 1e3,
        "restore_vs_torch_load_median": statistics.median(ratios),
        "restore_vs_torch_load_max": max(ratios),
    }, restored


def run(steps: int = 1000, out: str | None = None, seed: int = 0, policies=POLICIES) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # "per core" figures
    workdir = out or tempfile.mkdtemp(prefix="raybranch-bench-")
    try:
        model, states, test = training_run(steps, seed)
        n = len(states)
        tsave = _torch_save_bytes(states[0])
        rng = np.random.default_rng(seed)
        sample = sorted(int(s) for s in rng.choice(np.arange(1, n), size=min(RESTORE_SAMPLES, n - 1), replace=False))
        load_times = {s: _timed_torch_load(states[s], os.path.join(workdir, "whole.pt")) for s in sample}
        true_acc = {s: accuracy(model, states[s], test) for s in sample}

        def acc_gap(restored):
            return max(abs(accuracy(model, restored[s], test) - true_acc[s]) * 100 for s in sample)

        def acc_gap_median(restored):
            return statistics.median(abs(accuracy(model, restored[s], test) - true_acc[s]) * 100 for s in sample)

        # context for the 0.1 pp target: one test image is 100/len(test) pp, and the true model's
        # own accuracy moves by that much between consecutive steps
        churn = [abs(accuracy(model, states[s], test) - accuracy(model, states[s - 1], test)) * 100 for s in sample]

        result = {
            "run": {"model": "lenet5", "data": "digits 28x28", "optimizer": "SGD lr=0.01 momentum=0.9", "batch": 32,
                    "steps": steps, "checkpoints": n, "torch_save_bytes": tsave, "state": "model only",
                    "restore_samples": sample, "torch_load_ms_median": statistics.median(load_times.values()) * 1e3,
                    "test_images": len(test), "pp_per_test_image": 100 / len(test),
                    "true_step_to_step_acc_change_pp_max": max(churn),
                    "true_step_to_step_acc_change_pp_mean": statistics.mean(churn)},
            "raybranch": {},
            "frontier": [],
        }
        default, restored = run_raybranch(states, os.path.join(workdir, "rb-default"), sample, load_times)
        default.update(ratio=n * tsave / default["stored_bytes"], acc_gap_pp_max=acc_gap(restored), acc_gap_pp_median=acc_gap_median(restored))
        result["raybranch"] = default
        seed_res, seed_restored = run_seed_scheme(states, sample, load_times)
        seed_res.update(ratio=n * tsave / seed_res["stored_bytes"], acc_gap_pp_max=acc_gap(seed_restored), acc_gap_pp_median=acc_gap_median(seed_restored))
        result["seed"] = seed_res
        for pol in policies:
            for gran in (["global", "tensor"] if pol is None else ["global"]):
                if pol is None and gran == "global":
                    r = default
                else:
                    r, rest = run_raybranch(states, os.path.join(workdir, f"rb-{pol}-{gran}"), sample, load_times, pol, gran, restore_repeats=1)
                    r.update(ratio=n * tsave / r["stored_bytes"], acc_gap_pp_max=acc_gap(rest))
                result["frontier"].append({k: r[k] for k in ("snapshot_every", "granularity", "ratio", "restore_ms_median", "restore_vs_torch_load_median", "restore_vs_torch_load_max", "acc_gap_pp_max")})
        return result
    finally:
        torch.set_num_threads(threads)
        if out is None:
            shutil.rmtree(workdir, ignore_errors=True)


def render(res: dict) -> str:
    r, rb, sd = res["run"], res["raybranch"], res["seed"]
    lines = [
        f"LeNet-5 on digits, SGD momentum, batch {r['batch']}, {r['steps']} steps, {r['checkpoints']} checkpoints "
        f"({r['state']}; torch.save = {r['torch_save_bytes']} B; torch.load median {r['torch_load_ms_median']:.2f} ms)",
        "",
        f"{'':<34}{'raybranch':>14}{'seed scheme':>14}   target",
        f"{'storage ratio vs torch.save':<34}{rb['ratio']:>13.1f}x{sd['ratio']:>13.1f}x   >= 50x",
        f"{'space savings':<34}{(1 - 1 / rb['ratio']) * 100:>13.2f}%{(1 - 1 / sd['ratio']) * 100:>13.2f}%",
        f"{'encode MB/s per core':<34}{rb['encode_MBps']:>14.0f}{sd['encode_MBps']:>14.0f}   >= 300",
        f"{'decode MB/s per core':<34}{(rb['decode_MBps'] or 0):>14.0f}{sd['decode_MBps']:>14.0f}",
        f"{'restore ms (median of random)':<34}{rb['restore_ms_median']:>14.2f}{sd['restore_ms_median']:>14.2f}",
        f"{'restore / torch.load (median)':<34}{rb['restore_vs_torch_load_median']:>13.1f}x{sd['restore_vs_torch_load_median']:>13.1f}x   <= 5x",
        f"{'restore / torch.load (max)':<34}{rb['restore_vs_torch_load_max']:>13.1f}x{sd['restore_vs_torch_load_max']:>13.1f}x   <= 5x",
        f"{'|acc restored - true| max, pp':<34}{rb['acc_gap_pp_max']:>14.2f}{sd['acc_gap_pp_max']:>14.2f}   <= 0.1",
        f"{'|acc restored - true| median, pp':<34}{rb['acc_gap_pp_median']:>14.2f}{sd['acc_gap_pp_median']:>14.2f}",
        f"(one test image = {r['pp_per_test_image']:.2f} pp; the true model itself moves by up to "
        f"{r['true_step_to_step_acc_change_pp_max']:.2f} pp, mean {r['true_step_to_step_acc_change_pp_mean']:.2f} pp, between consecutive steps)",
        "",
        "raybranch ratio / restore frontier (snapshot policy, bucket granularity):",
        f"{'snapshot_every':>15}{'buckets':>9}{'ratio':>9}{'restore ms':>12}{'vs load med':>13}{'vs load max':>13}{'acc gap pp':>12}",
    ]
    for f in res["frontier"]:
        lines.append(
            f"{str(f['snapshot_every'] or 'first only'):>15}{f['granularity']:>9}{f['ratio']:>8.1f}x{f['restore_ms_median']:>12.2f}"
            f"{f['restore_vs_torch_load_median']:>12.1f}x{f['restore_vs_torch_load_max']:>12.1f}x{f['acc_gap_pp_max']:>12.2f}"
        )
    return "\n".join(lines)


def main(steps: int = 1000, as_json: bool = False, out: str | None = None) -> int:
    res = run(steps=steps, out=out)
    print(json.dumps(res, indent=1) if as_json else render(res))
    return 0
