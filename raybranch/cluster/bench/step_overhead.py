"""Training-step time with a checkpoint every step vs none, through the branch's checkpoint actor.

    python -m raybranch.cluster.bench.step_overhead [--steps 300] [--blocks 6] [--optimizer | --both] [--store URI] [--json]

The loop, the figures and the printed line of :mod:`raybranch.bench.step_overhead` (see its
docstring), run in a Ray task (1 CPU, on a local Ray of ``num_cpus`` CPUs started for the run
unless one is already up) with the branch's checkpoint actor
(:class:`~raybranch.cluster.actor.AsyncCheckpointer`, branch ``actor`` of run ``bench``) in place
of the plain Checkpointer. The actor's CPU time, read from the actor, is added to the pipeline
CPU and printed on its own.
"""
from __future__ import annotations

import ray

from ...bench.step_overhead import CheckpointerKind, _loop, bench_step_overhead, cli
from ..actor import AsyncCheckpointer


class ActorCheckpointer(CheckpointerKind):
    """The loop's checkpoints through :class:`AsyncCheckpointer` (its CPU and timings from the actor)."""

    name = "actor"

    def open(self, uri: str, **ckpt_kwargs):
        return AsyncCheckpointer(uri, "bench", self.name, **ckpt_kwargs)

    def stats(self, ckpt) -> tuple[float, dict]:
        stats = ckpt.actor_stats()
        return stats["cpu_s"], stats["timings"]


ACTOR = ActorCheckpointer()


def in_ray_task(args: tuple, num_cpus: int = 2) -> dict:
    """The core benchmark's loop in a 1-CPU Ray task (Ray started for it, and shut down after,
    when none is running)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    try:
        return ray.get(ray.remote(num_cpus=1)(_loop).remote(*args))
    finally:
        if started:
            ray.shutdown()


def bench_actor_step_overhead(steps: int = 300, *, num_cpus: int = 2, **kwargs) -> dict:
    """:func:`~raybranch.bench.step_overhead.bench_step_overhead` through the checkpoint actor, in
    a Ray task (same keywords; see the module docstring)."""
    return bench_step_overhead(steps, kind=ACTOR, run_loop=lambda args: in_ray_task(args, num_cpus), **kwargs)


def main(argv: list[str] | None = None) -> None:
    cli(argv, "python -m raybranch.cluster.bench.step_overhead", __doc__.split("\n")[0], bench_actor_step_overhead)


if __name__ == "__main__":
    main()
