"""The branch worker's training function without Ray: one branch of a run trained data-parallel
by a process group of its own, part-wise checkpoints, the checkpoint pipeline on the training
device. What a Ray Train worker runs (:func:`raybranch.cluster.runner.branch_worker`), for
machines without Ray and for checking the GPU path.

    python -m raybranch.runs.ddp_worker [--store URI --run R] [--config F] [key=value …]
        [--branch main] [--slices 1] [--world 1] [--device auto|cpu|cuda] [--no-baseline] [--json]

Without ``--store`` the run lives in a temporary ``file://`` store, deleted afterwards; a run
that does not exist yet is created first (``init``: the branch point, from the config). World W:
W processes (``torch.multiprocessing``; one process trains in this one) with a process group
on loopback: NCCL on CUDA (one GPU per rank), gloo on CPU. Each rank restores the branch head,
wraps the model in DDP, trains its shard of every batch and writes its part of every step.

Baselines (unless ``--no-baseline``), in the same run: the same DDP training with no checkpoint
at all (nothing written: overhead % = 100·(ms/step with a checkpoint every step ÷ without − 1),
over the slices' training loops), and the same slices trained in this process without DDP on a
fork of the branch's head (``<branch>-solo``), checkpointing every step.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time

import torch

from ..checkpoint.checkpointer import Checkpointer
from ..checkpoint.parts import TorchParts
from ..errors import RaybranchError
from ..ledger.lineage import Lineage
from ..ledger.refs import live_id
from ..store.store import open_store
from ..train import ddp
from .branch_training import state_digest, train_branch
from .context import RunContext


def _device(name: str, rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RaybranchError("--device cuda: this machine has no CUDA device")
        return torch.device("cuda", rank)
    return torch.device(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _without_checkpoints(ctx: RunContext, branch: str, slices: list[int], dev: torch.device) -> dict:
    """The same training from the branch head, DDP-wrapped, with no checkpoint at all: the baseline."""
    from ..train.loop import load_checkpoint, train_slice
    from .branch_training import _to_device

    model = ctx.template()
    opt = ctx.optimizer(model)
    load_checkpoint(model, ctx.reader().restore(branch), opt)
    _to_device(model, opt, dev)
    net, cfg, trained = ddp.wrap(model, dev), ctx.cfg, []
    for k in slices:
        r = train_slice(net, opt, ctx.slice_data(k), epochs=cfg.epochs, batch_size=cfg.batch_size, ckpt=None, step0=0, slice_id=k,
                        eval_fn=ctx.val_acc, patience=cfg.patience or None, checkpoint_every=10**9, seed=cfg.seed)
        trained.append({"steps": r.steps, "seconds": r.seconds})
    return {"trained": trained}


def train_ddp(rank: int, world: int, port: int, uri: str, run: str, branch: str, slices: list[int], device: str,
              out_path: str | None = None, checkpoints: bool = True) -> dict:
    """One rank: join the group, train ``branch`` on ``slices`` (``checkpoints=False``: the
    baseline, nothing written); rank 0's result (and ``out_path``)."""
    import torch.distributed as dist

    dev = _device(device, rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:  # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    try:
        parts = TorchParts()
        ctx = RunContext(uri, run)
        on_device = dev if dev.type == "cuda" else None  # the encoder on the GPU; on CPU hosts it is the CPU anyway

        def open_ck():
            return Checkpointer(ctx.store, run, branch, **{**ctx.ck_kwargs(), "device": on_device}, parts=parts)

        if checkpoints:
            res = train_branch(ctx, branch, slices, open_ck, device=dev, wrap=lambda m: ddp.wrap(m, dev), rank=rank)
        else:
            res = _without_checkpoints(ctx, branch, slices, dev)
        res["backend"] = dist.get_backend()  # (after the baseline, too)
        if out_path is not None and rank == 0:
            with open(out_path, "w") as f:
                json.dump(res, f, default=str)
        return res
    finally:
        dist.destroy_process_group()


def _figures(store, run: str, branch: str, res: dict, ctx: RunContext, after: int) -> dict:
    lin = Lineage(store, run, branch)
    steps = sum(t["steps"] for t in res["trained"])
    own = lin.entries_between(after + 1, lin.head_step)  # what this training wrote
    restored = ctx.restored(branch)
    blobs = dict(tuple(p["blob"]) for e in own for p in e["parts"])  # each blob once (a group's steps share it)
    train_s = sum(t["seconds"] for t in res["trained"])  # the slices' training loops, without restores and evaluation
    return {"steps": steps, "checkpoints": len(own), "seconds": res["seconds"], "s_per_step": train_s / max(1, steps),
            "blobs": len(blobs), "commits": len({e["seq"] for e in own}),
            "world_size": lin.log.head["world_size"], "parts": sorted({len(e["parts"]) for e in own}),
            "bytes": sum(blobs.values()),
            "timings": res["timings"], "acc_live": res["acc_live"],
            "restored_equals_live": state_digest(restored.state_dict()) == res["state_sha256"]}


def run_check(uri: str, run: str, branch: str, slices: list[int], world: int, device: str, baseline: bool,
              config: str | None = None, overrides: list[str] | None = None) -> dict:
    from ..config.files import load_branches_config
    from .ops import init_run

    store = open_store(uri)
    if live_id(store, run, "main") is None:
        cfg, _ = load_branches_config(config, overrides)
        init_run(store, run, cfg)
    ctx = RunContext(store, run)
    head = Lineage(store, run, branch).head_step
    if baseline:
        ctx.checkpointer(branch).fork(f"{branch}-solo", step=head).close()
    def group(checkpoints: bool) -> dict:
        if world == 1:
            return train_ddp(0, 1, _free_port(), store.source, run, branch, slices, device, None, checkpoints)
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "rank0.json")
            mp.spawn(train_ddp, args=(world, _free_port(), store.source, run, branch, slices, device, path, checkpoints), nprocs=world)
            with open(path) as f:
                return json.load(f)

    plain = group(False) if baseline else None  # first: the store is not written to
    res = group(True)
    out = {"run": run, "branch": branch, "slices": slices, "world": world, "device": str(_device(device, 0)),
           "backend": res["backend"], "ddp": _figures(store, run, branch, res, ctx, head)}
    if baseline:
        steps, secs = (sum(t[k] for t in plain["trained"]) for k in ("steps", "seconds"))
        out["ddp_without_checkpoints"] = {"steps": steps, "s_per_step": secs / max(1, steps)}
        out["checkpoint_overhead_pct"] = 100 * (out["ddp"]["s_per_step"] / out["ddp_without_checkpoints"]["s_per_step"] - 1)
        dev = _device(device, 0)
        solo = train_branch(ctx, f"{branch}-solo", slices, lambda: ctx.checkpointer(f"{branch}-solo", device=dev if dev.type == "cuda" else None),
                            device=dev)
        out["solo"] = _figures(store, run, f"{branch}-solo", solo, ctx, head)
        out["step_time_ratio"] = out["ddp"]["s_per_step"] / out["solo"]["s_per_step"]
    return out


def report(r: dict) -> str:
    lines = [f"{r['branch']} slices {r['slices']}: {r['world']} rank(s), {r['backend']} on {r['device']}"]
    for k in ("ddp", "solo"):
        if k in r:
            f, t = r[k], r[k]["timings"]
            lines.append(f"  {k:4s}: {f['steps']} steps, {f['checkpoints']} checkpoints ({f['parts']} part(s), world {f['world_size']}), "
                         f"{1e3 * f['s_per_step']:.1f} ms/step, capture {1e3 * t['capture_s'] / max(1, f['checkpoints']):.2f} ms/save, "
                         f"encode {1e3 * t['encode_s'] / max(1, f['checkpoints']):.2f} ms/save, {f['bytes'] / 1e6:.2f} MB, "
                         f"acc {f['acc_live']:.4f}, restored head = live: {f['restored_equals_live']}")
    if "step_time_ratio" in r:
        base = r["ddp_without_checkpoints"]
        lines.append(f"  DDP without checkpoints: {base['steps']} steps, {1e3 * base['s_per_step']:.1f} ms/step; "
                     f"checkpoint every step costs {r['checkpoint_overhead_pct']:+.1f} %")
        lines.append(f"  step time DDP ÷ single process (both checkpointing): {r['step_time_ratio']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raybranch.runs.ddp_worker", description=__doc__.split("\n")[0])
    ap.add_argument("--store", default=None, help="store URI (default: a temporary file:// store)")
    ap.add_argument("--run", default="ddp-check")
    ap.add_argument("--config", default=None, help="experiment config for a new run (default: the embedded one)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--branch", default="main")
    ap.add_argument("--slices", default="1", help="comma-separated slice ids")
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    tmp = None if a.store else tempfile.mkdtemp(prefix="raybranch-ddp-")
    t0 = time.perf_counter()
    try:
        if a.world < 1:
            raise RaybranchError(f"--world must be ≥ 1, got {a.world}")
        slices = [int(s) for s in a.slices.split(",") if s]
        r = run_check(a.store or f"file://{tmp}", a.run, a.branch, slices, a.world, a.device, not a.no_baseline,
                      a.config, a.overrides)
    except (RaybranchError, ValueError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    r["wall_s"] = time.perf_counter() - t0
    print(json.dumps(r, indent=1, default=str) if a.json else report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
