"""The Ray runner: each branch of a plan trains as a Ray Train (V2) worker group, all branches
at once, checkpointing every step into the run's store.

    runner = RayRunner(RayJobConfig(num_workers=1))
    train_slice(store, run, 3, runner)          # or any operation of raybranch.runs.ops

Per branch one ``TorchTrainer``: ``ScalingConfig(num_workers=N, use_gpu=<cluster has GPUs>)``,
``RunConfig(name=<branch>-<time>, storage_path=<store>/<run>/_ray, storage_filesystem=<the
store's>)``, ``FailureConfig(max_failures)``. Its worker (:func:`branch_worker`) opens the run
from the store and calls :func:`raybranch.runs.branch_training.train_branch` — the same function
the local runner calls, so a plan trains the same checkpoints on either.

At each slice end the worker calls ``ray.train.report(metrics, checkpoint=...)`` with a Ray
checkpoint holding one small JSON that names the raybranch checkpoint (:mod:`.pointers`), so
every Ray checkpoint resolves to a committed raybranch checkpoint.

Resume. A worker restarted by ``FailureConfig`` (or the same command run again) resumes the
branch from the store, as ``train_branch`` does. ``ray.train.report`` hands its record to the
controller asynchronously, so a worker killed right after a slice end may have committed the
slice while Ray lost the report: a restarted worker reports the slice ends the store holds
beyond Ray's latest checkpoint (``recovered: true``).

Data-parallel branches (``num_workers`` N > 1). Ray Train starts the process group (gloo on CPU,
NCCL on GPU); each rank wraps the model with ``prepare_model`` (DDP), trains its shard of every
batch and writes its part of every checkpoint through a :class:`~raybranch.checkpoint.parts.TorchParts`
Checkpointer; rank 0's commit names all N parts. Every rank calls ``ray.train.report`` (Ray Train
requires it); rank 0's carries the checkpoint. After a worker dies, ``FailureConfig`` restarts
the whole group and every rank resumes from the branch's last commit (the slice is restarted).

Checkpointer in the worker (``RayJobConfig.checkpointer``): ``sync`` (the default) — a plain
Checkpointer, whose pipeline thread encodes and group-commits behind training; ``async`` — the
branch's checkpoint actor (:class:`~raybranch.cluster.actor.AsyncCheckpointer`). On CPU nodes
``sync`` costs less (``python -m raybranch.bench.step_overhead`` vs ``python -m raybranch.cluster.bench.step_overhead``).

Scale. A ``TorchTrainer`` costs ~10 s to start on 2 CPUs (controller, worker process, process
group); the branches' parallelism pays once a branch trains for longer than that.
"""
from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
from collections.abc import Callable

import ray
import torch

from ..branches.slices import slice_ends
from ..checkpoint.checkpointer import Checkpointer
from ..checkpoint.parts import TorchParts
from ..config.classes import RayJobConfig
from ..errors import BranchTrainingError
from ..ledger.lineage import Lineage
from ..runs.branch_training import train_branch
from ..runs.context import RunContext
from ..runs.runner import Plan
from ..store.store import Store, open_store
from .pointers import ray_storage, resolve_ray_checkpoint, write_ray_checkpoint


def cluster_has_gpu() -> bool:
    """Whether the Ray cluster offers any GPU (decides ``ScalingConfig(use_gpu=...)``)."""
    return float(ray.cluster_resources().get("GPU", 0)) > 0


def _device() -> torch.device:
    try:
        import ray.train.torch as rtt

        return rtt.get_device()
    except Exception:  # noqa: BLE001 - outside a Train worker: CPU
        return torch.device("cpu")


def _report(c: dict, k: int, step: int, metrics: dict) -> None:
    """Every rank reports (Ray Train's rule); rank 0's report carries the checkpoint pointer."""
    scalars = {k_: v for k_, v in metrics.items() if not isinstance(v, (list, dict))}
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(scalars, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="raybranch-ray-ckpt-") as d:
        write_ray_checkpoint(d, c["store"], c["run"], c["branch"], step, k, c.get("branch_id"))
        ray.train.report(scalars, checkpoint=ray.train.Checkpoint.from_directory(d))


def branch_worker(c: dict) -> dict:
    """``train_loop_per_worker`` of one branch: ``c`` = {store, run, branch, slices, checkpointer,
    threads, step_hook (optional ``fn(branch, step)`` after every optimizer step: fault
    injection in tests)}."""
    torch.set_num_threads(int(c.get("threads") or 1))
    tc = ray.train.get_context()
    rank, world = tc.get_world_rank(), tc.get_world_size()
    parts = TorchParts() if world > 1 else None  # collective: every rank creates it here
    hook = c.get("step_hook")
    ctx = RunContext(c["store"], c["run"])
    c = {**c, "branch_id": Lineage(ctx.store, c["run"], c["branch"]).log.bid}
    if hook:
        ctx.hooks.step = lambda s: hook(c["branch"], s)
    _report_missed_slice_ends(ctx, c)

    def open_ck():
        if c["checkpointer"] == "async":
            from .actor import AsyncCheckpointer

            return AsyncCheckpointer(c["store"], c["run"], c["branch"], **ctx.ck_kwargs())
        return Checkpointer(ctx.store, c["run"], c["branch"], **ctx.ck_kwargs(), parts=parts)

    wrap = None
    if world > 1:
        import ray.train.torch as rtt

        wrap = rtt.prepare_model
    return train_branch(ctx, c["branch"], c["slices"], open_ck, on_slice_end=lambda k, s, m: _report(c, k, s, m),
                        device=_device(), wrap=wrap, rank=rank)


def _report_missed_slice_ends(ctx: RunContext, c: dict) -> None:
    """Report to Ray the slice ends of this plan the store holds beyond Ray's latest checkpoint."""
    latest = ray.train.get_checkpoint()
    if latest is None:
        return
    known = resolve_ray_checkpoint(latest)["step"]
    ends = slice_ends(Lineage(ctx.store, c["run"], c["branch"]))
    for k in sorted((k for k in c["slices"] if k in ends and ends[k] > known), key=ends.get):
        _report(c, k, ends[k], {"slice": k, "step": ends[k], "recovered": True})


def make_trainer(loop_config: dict, store: Store, job: RayJobConfig, use_gpu: bool):
    """The TorchTrainer of one branch (not started)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    path, fs = ray_storage(store, loop_config["run"])
    return TorchTrainer(
        branch_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": job.cpus_per_worker, **({"GPU": 1} if use_gpu else {}),
                                                             **job.worker_resources}),
        run_config=RunConfig(name=f"{loop_config['branch']}-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}",
                             storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=job.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=None)),
    )


class RayRunner:
    """The branches of a plan as Ray Train worker groups, at once (``job.parallel``) or in turn."""

    name = "ray"

    def __init__(self, job: RayJobConfig | None = None, step_hook: Callable[[str, int], None] | None = None):
        self.job = job or RayJobConfig()
        self.job.validate()
        self.step_hook = step_hook
        self.fits: list[dict] = []  # per branch trained: {"branch", "seconds", "path", "reported"}

    @classmethod
    def for_run(cls, ctx: RunContext, **overrides) -> "RayRunner":
        """A runner with the Ray settings stored in the run's run.json (``init --ray``'s), then ``overrides``."""
        known = {f.name for f in dataclasses.fields(RayJobConfig)}
        stored = {k: v for k, v in (ctx.spec.doc.get("ray") or {}).items() if k in known}
        return cls(RayJobConfig(**{**stored, **overrides}))

    def train(self, ctx: RunContext, plan: Plan) -> dict[str, dict]:
        if not ray.is_initialized():
            from .train import connect

            connect()
        todo = [(b, list(s)) for b, s in plan if s]
        job = self.job
        use_gpu = job.use_gpu if job.use_gpu is not None else cluster_has_gpu()
        out: dict[str, dict] = {}
        errors: dict[str, BaseException] = {}

        def fit(branch: str, slices: list[int]) -> None:
            c = {"store": ctx.store.source, "run": ctx.run, "branch": branch, "slices": slices,
                 "checkpointer": job.checkpointer, "threads": max(1, int(job.cpus_per_worker)), "step_hook": self.step_hook}
            ctx.hooks.phase(f"{branch} slices {','.join(map(str, slices))} on Ray Train")
            t0 = time.perf_counter()
            try:
                res = make_trainer(c, ctx.store, job, use_gpu).fit()
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread below
                errors[branch] = exc
                return
            out[branch] = res.return_value
            self.fits.append({"branch": branch, "seconds": time.perf_counter() - t0, "path": res.path,
                              "reported": [resolve_ray_checkpoint(ck)["id"] for ck, _ in (res.best_checkpoints or [])]})

        if job.parallel:
            threads = [threading.Thread(target=fit, args=p, name=f"raybranch-fit-{p[0]}") for p in todo]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for p in todo:
                fit(*p)
        for b, exc in errors.items():
            msg = " ".join(str(exc).split())[:500]
            raise BranchTrainingError(f"branch {b!r} failed on Ray Train: {type(exc).__name__}: {msg}") from exc
        return out


__all__ = ["RayRunner", "branch_worker", "cluster_has_gpu", "make_trainer", "open_store"]
