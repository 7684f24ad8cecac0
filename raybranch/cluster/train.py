"""The branching experiment on Ray: :func:`raybranch.runs.experiment.run_experiment` with the
:class:`~raybranch.cluster.runner.RayRunner` (every branch a Ray Train worker group), and the
driver's connection to a cluster.

    connect()
    result = run_on_ray(ExperimentConfig.quick(), RayJobConfig(store="s3://bucket/runs"), out_dir="out/x")

The orchestration is the local run's (one script over the run operations); only where branches
train differs, so both produce the same report fields — and the same checkpoint bytes where the
seeds and thread counts agree. Ray's bookkeeping for a run (``<run>/_ray/``: reported
checkpoints, metrics) lives in the run's directory of the store; its bytes are left out of the
run's compression figures (``run_total.excluded_bytes``).
"""
from __future__ import annotations

import os
from collections.abc import Callable

import ray

from ..branches.data import Hooks
from ..config.classes import ExperimentConfig, RayJobConfig
from ..errors import RaybranchError
from ..runs.experiment import run_experiment
from .runner import RayRunner


def run_on_ray(config: ExperimentConfig, job: RayJobConfig, out_dir: str | None = None, hooks: Hooks | None = None,
               store_uri: str | None = None, step_hook: Callable[[str, int], None] | None = None) -> dict:
    """Run the branching experiment with Ray Train branches into ``store_uri`` (default
    ``job.store``, else ``$RAYBRANCH_STORE``, else ``file://<out_dir>/store``); with ``out_dir``
    also write the report there. Needs ``ray.init()`` (or a Ray job's driver)."""
    if not ray.is_initialized():
        raise RaybranchError("run_on_ray needs Ray: call ray.init() first, or submit it as a Ray job")
    uri = resolve_store(store_uri or job.store, out_dir)
    runner = RayRunner(job, step_hook)
    result = run_experiment(config, uri, out_dir, hooks, runner)
    result["ray"] = {"fits": runner.fits}
    return result


def resolve_store(uri: str | None, out_dir: str | None) -> str:
    """The store a job writes to: ``uri``, else ``$RAYBRANCH_STORE``, else ``file://<out_dir>/store``."""
    uri = uri or os.environ.get("RAYBRANCH_STORE")
    if uri:
        return uri
    if out_dir is None:
        raise RaybranchError("no store: set store= in the config, $RAYBRANCH_STORE, or give an output directory")
    return "file://" + os.path.join(os.path.abspath(out_dir), "store")


def connect(num_cpus: int | None = None) -> None:
    """``ray.init()`` for a job or CLI driver: the cluster a ``ray job submit`` runs it on (Ray sets
    ``RAY_ADDRESS`` for the job), else a local in-process Ray (``num_cpus``). An ``http://``
    ``RAY_ADDRESS`` is the Jobs API of a cluster, which a driver cannot join: a one-line error."""
    if ray.is_initialized():
        return
    addr = os.environ.get("RAY_ADDRESS", "")
    if addr.startswith(("http://", "https://")):
        raise RaybranchError(f"RAY_ADDRESS={addr} is a cluster's Jobs API: submit this with `ray job submit --working-dir . -- python ...`, "
                             "or unset RAY_ADDRESS to run on a local Ray")
    ray.init(**({} if addr else {"num_cpus": num_cpus}), log_to_driver=True)


__all__ = ["connect", "resolve_store", "run_on_ray"]
