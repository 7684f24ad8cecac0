"""Encoder speed on a GPU: ResNet-50 and ViT-B/16 step deltas, quantized on the device.

    python -m raybranch.bench.gpu_encode [--steps 12] [--batch 64] [--json]

Trains each model a few SGD-momentum steps on random 224×224 data (bf16 autocast) and, after every
step, LC-encodes the delta against the reconstruction on the GPU (:class:`DeltaEncoder`): the
quantizer runs on the device and only the packed symbols (⌈N/8⌉ + nnz bytes) cross to the host
for zstd. Prints, per model and bucket granularity, the median times of the step, the on-device
quantize+pack, the host transfer + zstd, ``torch.save`` of the state dict to memory, and the
encoder's throughput in GB/s of fp32 state. Needs no Ray and no store.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

from ..codec.delta import DeltaEncoder
from ..codec.lc import LCParams, quantize
from ..codec.streams import pack_symbols, zstd_compress


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_model(name: str, steps: int, batch: int, granularity: str, device: str = "cuda") -> dict:
    dev = torch.device(device)
    model = getattr(torchvision.models, name)(num_classes=1000).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    params = [(n, p) for n, p in model.state_dict().items() if p.is_floating_point() and p.numel() >= 8]
    names = [n for n, _ in params]
    enc = DeltaEncoder(names, [p.numel() for _, p in params], LCParams(granularity=granularity), dev)
    flat = lambda: torch.cat([p.reshape(-1).float() for _, p in params])  # noqa: E731
    enc.reset(flat())
    x = torch.randn(batch, 3, 224, 224, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    t_step, t_quant, t_host, t_save, sizes = [], [], [], [], []
    for i in range(steps):
        _sync()
        a = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync()
        b = time.perf_counter()
        u = flat()
        delta = u - enc.recon
        sym, tables, q = quantize(delta, enc.layout, enc.params)
        enc.advance(q)
        _sync()
        c = time.perf_counter()
        mask, values = pack_symbols(sym)  # packs on the GPU, copies ⌈N/8⌉ + nnz bytes
        payload = zstd_compress(mask.tobytes() + values.tobytes())
        d = time.perf_counter()
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        e = time.perf_counter()
        if i >= 2:  # warm-up
            t_step.append(b - a)
            t_quant.append(c - b)
            t_host.append(d - c)
            t_save.append(e - d)
            sizes.append(len(payload))
    n = enc.numel
    med = statistics.median
    return {
        "model": name,
        "granularity": granularity,
        "params": n,
        "step_ms": med(t_step) * 1e3,
        "quantize_ms": med(t_quant) * 1e3,
        "pack_transfer_zstd_ms": med(t_host) * 1e3,
        "encode_ms": (med(t_quant) + med(t_host)) * 1e3,
        "encode_GBps": n * 4 / (med(t_quant) + med(t_host)) / 1e9,
        "quantize_GBps": n * 4 / med(t_quant) / 1e9,
        "torch_save_ms": med(t_save) * 1e3,
        "delta_bytes_median": med(sizes),
        "delta_ratio_vs_fp32": n * 4 / med(sizes),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
    }


def bench_checkpoint_overhead(name: str, steps: int, batch: int, store_dir: str, device: str = "cuda",
                              encode_on: str | None = None, blocks: int = 4) -> dict:
    """Training-step time with the default Checkpointer pipeline saving every step vs none, in
    one run: blocks of ``steps // blocks`` steps alternate (N C C N …), each checkpointed block
    ends with ``flush()`` (counted in it), the last with ``close()``. ``encode_on``: None encodes
    on the CPU from pinned copies, "cuda" on the device (behind the training thread either way)."""
    from ..checkpoint.checkpointer import Checkpointer
    from ..store.store import open_store

    dev = torch.device(device)
    model = getattr(torchvision.models, name)(num_classes=1000).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 224, 224, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    ck = Checkpointer(open_store("file://" + store_dir, check=False), name, f"main-{encode_on or 'cpu'}", device=encode_on)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    ck.save(0, model)
    ck.flush()
    per, i = max(1, steps // blocks), 1
    order = [(b // 2 + b) % 2 == 1 for b in range(2 * blocks)]
    times = {False: [], True: []}
    for k, save in enumerate(order):
        _sync()
        a = time.perf_counter()
        for _ in range(per):
            step()
            if save:
                ck.save(i, model)
            i += 1
        if save:
            ck.close() if k == max(j for j, s in enumerate(order) if s) else ck.flush()
        _sync()
        times[save].append((time.perf_counter() - a) / per)
    none, save = statistics.mean(times[False]), statistics.mean(times[True])
    return {"model": name, "encode_on": encode_on or "cpu", "step_ms": none * 1e3, "step_with_save_ms": save * 1e3,
            "overhead_pct": (save / none - 1) * 100, "capture_ms": ck.timings["capture_s"] / (per * blocks + 1) * 1e3,
            "encode_s": ck.timings["encode_s"], "write_s": ck.timings["write_s"], "blocked_s": ck.timings["blocked_s"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--store-dir", default=None, help="also measure step time with a checkpoint every step into file://DIR")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark measures the on-device encoder")
        return 1
    out = []
    for name in ("resnet50", "vit_b_16"):
        for gran in ("global", "tensor"):
            r = bench_model(name, args.steps, args.batch, gran)
            out.append(r)
            if not args.json:
                print(
                    f"{r['model']:<9} {r['granularity']:<7} params {r['params'] / 1e6:.1f}M  step {r['step_ms']:.1f} ms  "
                    f"quantize {r['quantize_ms']:.2f} ms ({r['quantize_GBps']:.0f} GB/s)  pack+copy+zstd {r['pack_transfer_zstd_ms']:.2f} ms  "
                    f"encode {r['encode_GBps']:.1f} GB/s  torch.save {r['torch_save_ms']:.1f} ms  delta {r['delta_bytes_median'] / 1e3:.0f} kB "
                    f"({r['delta_ratio_vs_fp32']:.0f}x vs fp32)",
                    flush=True,
                )
    if args.store_dir:
        for name in ("resnet50", "vit_b_16"):
            for encode_on in (None, "cuda"):
                r = bench_checkpoint_overhead(name, args.steps, args.batch, f"{args.store_dir}/{name}", encode_on=encode_on)
                out.append(r)
                if not args.json:
                    print(f"{name:<9} encode on {r['encode_on']:<4} step {r['step_ms']:.1f} ms, with a checkpoint every step "
                          f"{r['step_with_save_ms']:.1f} ms ({r['overhead_pct']:+.1f} %; capture {r['capture_ms']:.2f} ms/save on the "
                          f"training thread; encode {r['encode_s']:.2f} s, write {r['write_s']:.2f} s, blocked {r['blocked_s']:.2f} s in all)", flush=True)
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
