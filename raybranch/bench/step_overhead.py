"""Training-step time with an asynchronous checkpoint every step vs none, in one run.

    python -m raybranch.bench.step_overhead --steps 300 [--optimizer] [--store URI]

The run: LeNet-5 on scikit-learn's digits (28×28), SGD(lr 0.01, momentum 0.9), batch 32, one
torch thread, inside a Ray task (1 CPU) on a local Ray with ``num_cpus`` CPUs; the branch's
:class:`~raybranch.cluster.actor.CheckpointActor` encodes and writes on another core.

After ``warmup`` steps the run goes through three phases of the same training:
``steps/2`` steps without checkpoints, ``steps`` steps with ``AsyncCheckpointer.save`` after every
optimizer step, ``steps/2`` steps without again (the two plain phases bracket the checkpointed one,
so slow drift in machine speed cancels). The checkpointed phase ends with ``flush()`` and its time
is added to that phase, so saves the actor had not finished are paid for. For scale, ``steps/2``
more steps then save inline with a plain Checkpointer (branch "inline"). A step's time is
``perf_counter`` around forward + backward + optimizer step (+ save):

    overhead % = 100 · (mean step time with checkpoints ÷ mean step time without − 1)

The actor's own time per save (encode, write, commit, compaction) is printed alongside: the
overhead stays small as long as it is below the step time, since the two run in parallel.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import ray


def _train(steps: int, warmup: int, uri: str, with_optimizer: bool, max_pending: int, batch: int, seed: int, ckpt_kwargs: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from ..checkpoint.checkpointer import Checkpointer
    from ..cluster.actor import AsyncCheckpointer
    from ..store.store import open_store
    from .codec.trajectory import setup

    torch.set_num_threads(1)
    model, opt, train, _ = setup("lenet5", seed)
    X, Y = train.images, train.labels
    g = torch.Generator().manual_seed(seed)
    ckpt = AsyncCheckpointer(uri, "bench", "main", max_pending=max_pending, batch=batch, **ckpt_kwargs)
    step = 0

    cpu = {True: 0.0, False: 0.0}  # CPU seconds of this process (training + sender threads)

    def run(n: int, save: bool, tally: bool = True) -> list[float]:
        nonlocal step
        times = []
        c0 = time.process_time()
        for _ in range(n):
            t0 = time.perf_counter()
            idx = torch.randint(0, len(Y), (32,), generator=g)
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if save:
                ckpt.save(step, model, opt if with_optimizer else None)
            times.append(time.perf_counter() - t0)
            step += 1
        if tally:
            cpu[save] += time.process_time() - c0
        return times

    run(warmup, False)
    ckpt.save(step - 1, model, opt if with_optimizer else None)  # the branch's first snapshot, outside the timing
    ckpt.flush()
    before = run(steps // 2, False)
    with_ckpt = run(steps, True)
    t0, c0 = time.perf_counter(), time.process_time()
    ckpt.flush()
    flush_s = time.perf_counter() - t0
    cpu[True] += time.process_time() - c0
    actor = ckpt.actor_stats()
    client = dict(ckpt.stats)
    ckpt.close()
    after = run(steps - steps // 2, False)
    # for scale: the same saves made inline by a Checkpointer in this process (its own branch)
    sync = Checkpointer(open_store(uri), "bench", "inline", **ckpt_kwargs)
    sync.save(step - 1, model, opt if with_optimizer else None)
    inline = []
    for _ in range(steps // 2):
        t0 = time.perf_counter()
        run(1, False, tally=False)
        sync.save(step - 1, model, opt if with_optimizer else None)
        inline.append(time.perf_counter() - t0)
    none = before + after
    return {
        "steps": steps,
        "optimizer": with_optimizer,
        "step_ms_none": 1e3 * statistics.mean(none),
        "step_ms_ckpt": 1e3 * (sum(with_ckpt) + flush_s) / len(with_ckpt),
        "step_ms_inline": 1e3 * statistics.mean(inline),
        "median_ms_none": 1e3 * statistics.median(none),
        "median_ms_ckpt": 1e3 * statistics.median(with_ckpt),
        "final_flush_ms": 1e3 * flush_s,
        "handoff_ms": 1e3 * client["handoff_s"] / client["saves"],
        "blocked": client["blocked"],
        "blocked_ms": 1e3 * client["blocked_s"],
        "cpu_ms_none": 1e3 * cpu[False] / len(none),
        "cpu_ms_ckpt": 1e3 * cpu[True] / len(with_ckpt),
        "actor_ms_per_save": 1e3 * actor["busy_s"] / max(1, actor["saves"]),
        "actor_cpu_ms_per_save": 1e3 * actor["cpu_s"] / max(1, actor["saves"]),
        "retries": actor["retries"],
    }


def bench_step_overhead(steps: int = 300, *, warmup: int = 30, store: str | None = None, with_optimizer: bool = False,
                        max_pending: int = 4, batch: int = 1, seed: int = 0, num_cpus: int = 2, verbose: bool = True,
                        **ckpt_kwargs) -> dict:
    """Mean training-step time without checkpoints and with an async checkpoint every step (see module doc)."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    tmp = None
    if store is None:
        tmp = tempfile.mkdtemp(prefix="raybranch-bench-")
        store = "file://" + tmp
    try:
        task = ray.remote(num_cpus=1)(_train)
        res = ray.get(task.remote(steps, warmup, store, with_optimizer, max_pending, batch, seed, ckpt_kwargs))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        if started:
            ray.shutdown()
    res["overhead_pct"] = 100.0 * (res["step_ms_ckpt"] / res["step_ms_none"] - 1.0)
    if verbose:
        what = "model + optimizer" if with_optimizer else "model"
        print(f"LeNet-5/digits, batch 32, {steps} steps each way, checkpoint of the {what} every step, store {store}, "
              f"max_pending {max_pending}, {batch} save(s) per actor call")
        print(f"  step without checkpoint : {res['step_ms_none']:.3f} ms (median {res['median_ms_none']:.3f})")
        print(f"  step with checkpoint    : {res['step_ms_ckpt']:.3f} ms (median {res['median_ms_ckpt']:.3f}, final flush {res['final_flush_ms']:.1f} ms included)")
        print(f"  overhead                : {res['overhead_pct']:+.1f} %")
        print(f"  (for scale: a synchronous Checkpointer.save after every step: {res['step_ms_inline']:.3f} ms per step, "
              f"{100.0 * (res['step_ms_inline'] / res['step_ms_none'] - 1.0):+.1f} %)")
        print(f"  hand-over {res['handoff_ms']:.3f} ms/save on the training path; client blocked {res['blocked']}× "
              f"for {res['blocked_ms']:.0f} ms in all; store retries {res['retries']}")
        print(f"  CPU of the training process per step: {res['cpu_ms_none']:.3f} ms without, {res['cpu_ms_ckpt']:.3f} ms with "
              f"(pack + ray.put + actor call in its sender thread)")
        print(f"  actor per save: {res['actor_ms_per_save']:.3f} ms wall, {res['actor_cpu_ms_per_save']:.3f} ms CPU "
              f"(all its threads, background compaction included)")
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--store", default=None, help="store URI (default: a temporary file:// directory)")
    p.add_argument("--optimizer", action="store_true", help="checkpoint the SGD momentum too")
    p.add_argument("--optimizer-codec", choices=["exact", "lc"], default="exact")
    p.add_argument("--max-pending", type=int, default=4)
    p.add_argument("--batch", type=int, default=1, help="saves per actor call (AsyncCheckpointer batch)")
    p.add_argument("--num-cpus", type=int, default=2)
    a = p.parse_args(argv)
    kwargs = {"optimizer_codec": a.optimizer_codec} if a.optimizer else {}
    bench_step_overhead(a.steps, warmup=a.warmup, store=a.store, with_optimizer=a.optimizer,
                        max_pending=a.max_pending, batch=a.batch, num_cpus=a.num_cpus, **kwargs)


if __name__ == "__main__":
    main()
