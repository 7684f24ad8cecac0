"""Training-step time with a checkpoint every step vs none, in one run, blocks interleaved.

    python -m raybranch.bench.step_overhead [--steps 300] [--blocks 6] [--optimizer | --both] [--store URI] [--json]

The run: LeNet-5 on scikit-learn's digits (28×28), SGD(lr 0.01, momentum 0.9), batch 32, one
torch thread, default Checkpointer settings. After a warm-up, blocks of ``steps / blocks`` steps
alternate between no checkpoints and a save after every optimizer step (N C C N N C …, so slow
drift in machine speed cancels). Each checkpointed block ends with ``flush()`` (the pipeline's
backlog and the open group's commit) and its time is counted in the block; ``close()`` at the end
is spread over the checkpointed steps. Figures, all from this one run:

    overhead %          = 100 · (wall time per step with checkpoints ÷ without − 1)
    pipeline CPU / save = CPU time of the process per step with checkpoints − without
                          (every thread: capture, encode, write, commit; plus another process's,
                          e.g. a checkpoint actor's)
    efficiency          = pipeline CPU / save ÷ the encoder's own CPU per save (thread time of
                          the codec call alone)
    MB/s per core       = state bytes per save ÷ pipeline CPU per save

This module is Ray-free. The same loop through the branch's checkpoint actor, in a 1-CPU Ray
task: ``python -m raybranch.cluster.bench.step_overhead`` (it passes its own
:class:`CheckpointerKind` to :func:`bench_step_overhead`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable


class CheckpointerKind:
    """What the loop checkpoints through; this one: the plain Checkpointer on branch ``plain`` of
    run ``bench``. Another kind (the Ray layer's checkpoint actor) overrides both methods and
    ``name``: the branch and the result's ``checkpointer``."""

    name = "plain"

    def open(self, uri: str, **ckpt_kwargs):
        from ..checkpoint.checkpointer import Checkpointer

        return Checkpointer(uri, "bench", self.name, **ckpt_kwargs)

    def stats(self, ckpt) -> tuple[float, dict]:
        """(CPU seconds spent on saves outside this process so far, the pipeline's timings)."""
        return 0.0, dict(ckpt.timings)


PLAIN = CheckpointerKind()


def _loop(steps: int, blocks: int, warmup: int, uri: str, with_optimizer: bool, kind: CheckpointerKind, seed: int,
          ckpt_kwargs: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from .codec.trajectory import setup

    torch.set_num_threads(1)
    model, opt, train, _ = setup("lenet5", seed)
    X, Y = train.images, train.labels
    g = torch.Generator().manual_seed(seed)
    ckpt = kind.open(uri, **ckpt_kwargs)
    opt_or_none = opt if with_optimizer else None
    step = 0

    def train_step() -> None:
        idx = torch.randint(0, len(Y), (32,), generator=g)
        loss = F.cross_entropy(model(X[idx]), Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()

    def block(n: int, save: bool) -> tuple[float, float]:
        nonlocal step
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            train_step()
            if save:
                ckpt.save(step, model, opt_or_none)
            step += 1
        if save:
            ckpt.flush()
        return time.perf_counter() - t0, time.process_time() - c0

    for _ in range(warmup):
        train_step()
    ckpt.save(step, model, opt_or_none)  # the branch's first snapshot, outside the timing
    ckpt.flush()
    step += 1
    actor_cpu0, _ = kind.stats(ckpt)
    per = max(1, steps // blocks)
    order = [(b // 2 + b) % 2 == 1 for b in range(2 * blocks)]  # N C C N N C …
    wall = {False: [], True: []}
    cpu = {False: 0.0, True: 0.0}
    n_ckpt = sum(order)
    for save in order:
        w, c = block(per, save)
        wall[save].append(w / per)
        cpu[save] += c
    actor_cpu, timings = kind.stats(ckpt)
    actor_cpu -= actor_cpu0
    c0, t0 = time.process_time(), time.perf_counter()
    ckpt.close()  # spread over the checkpointed steps
    close_s = time.perf_counter() - t0
    cpu[True] += time.process_time() - c0
    saves = per * n_ckpt
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if with_optimizer:
        state_bytes += sum(t.numel() * t.element_size() for s in opt.state_dict()["state"].values()
                           for t in s.values() if isinstance(t, torch.Tensor))
    pipeline_cpu = (cpu[True] - cpu[False] + actor_cpu) / saves
    encode_cpu = timings["encode_cpu_s"] / (saves + 1)
    none, with_ = statistics.mean(wall[False]), statistics.mean(wall[True]) + close_s / saves
    return {
        "checkpointer": kind.name, "optimizer": with_optimizer, "steps_each_way": saves,
        "step_ms_none": 1e3 * none, "step_ms_ckpt": 1e3 * with_, "overhead_pct": 100.0 * (with_ / none - 1.0),
        "blocks_ms_none": [round(1e3 * x, 3) for x in wall[False]], "blocks_ms_ckpt": [round(1e3 * x, 3) for x in wall[True]],
        "pipeline_cpu_ms": 1e3 * pipeline_cpu, "encode_cpu_ms": 1e3 * encode_cpu,
        "efficiency": pipeline_cpu / encode_cpu if encode_cpu > 0 else float("nan"),
        "mb_per_s_per_core": state_bytes / pipeline_cpu / 1e6 if pipeline_cpu > 0 else float("inf"),
        "capture_ms": 1e3 * timings.get("capture_s", 0.0) / (saves + 1), "state_bytes": state_bytes,
        "actor_cpu_ms": 1e3 * actor_cpu / saves, "retries": int(timings.get("retries", 0)), "close_ms": 1e3 * close_s,
    }


def run_here(args: tuple) -> dict:
    """:func:`_loop` in this process."""
    return _loop(*args)


def bench_step_overhead(steps: int = 300, *, blocks: int = 6, warmup: int = 30, store: str | None = None,
                        with_optimizer: bool = False, seed: int = 0, verbose: bool = True,
                        kind: CheckpointerKind = PLAIN, run_loop: Callable[[tuple], dict] = run_here,
                        **ckpt_kwargs) -> dict:
    """One run of :func:`_loop` through ``kind``, by ``run_loop`` (given :func:`_loop`'s
    arguments; default: in this process); see the module docstring."""
    if steps < 2 * blocks:
        raise ValueError(f"steps must be at least 2 per block ({2 * blocks}), got {steps}")
    tmp = None
    if store is None:
        tmp = tempfile.mkdtemp(prefix="raybranch-bench-")
        store = "file://" + tmp
    try:
        res = run_loop((steps, blocks, warmup, store, with_optimizer, kind, seed, ckpt_kwargs))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(report(res))
    return res


def report(r: dict) -> str:
    what = "model + SGD momentum" if r["optimizer"] else "model"
    return (f"{r['checkpointer']:5s} {what:21s} step {r['step_ms_none']:.3f} → {r['step_ms_ckpt']:.3f} ms "
            f"({r['overhead_pct']:+.1f} %, {r['steps_each_way']} steps each way, close() included) | pipeline CPU "
            f"{r['pipeline_cpu_ms']:.3f} ms/save = {r['efficiency']:.2f}× encode alone ({r['encode_cpu_ms']:.3f} ms), "
            f"{r['mb_per_s_per_core']:.0f} MB/s per core; capture {r['capture_ms']:.3f} ms on the training thread"
            + (f"; actor CPU {r['actor_cpu_ms']:.3f} ms/save" if r["checkpointer"] == "actor" else ""))


def cli(argv: list[str] | None, prog: str, description: str, bench: Callable[..., dict] = bench_step_overhead) -> None:
    """The command line of this benchmark and of the Ray layer's (``bench``: the function that runs one)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--steps", type=int, default=300, help="checkpointed steps (and as many without)")
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--store", default=None, help="store URI (default: a temporary file:// directory)")
    p.add_argument("--optimizer", action="store_true", help="checkpoint the SGD momentum too (lossless)")
    p.add_argument("--both", action="store_true", help="model alone, then with the SGD momentum")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    out = []
    for opt in ((False, True) if a.both else (a.optimizer,)):
        out.append(bench(a.steps, blocks=a.blocks, warmup=a.warmup, store=a.store, with_optimizer=opt, verbose=not a.json))
    if a.json:
        print(json.dumps(out, indent=1))


def main(argv: list[str] | None = None) -> None:
    cli(argv, "python -m raybranch.bench.step_overhead", __doc__.split("\n")[0])


if __name__ == "__main__":
    main()
