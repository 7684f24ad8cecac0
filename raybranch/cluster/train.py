"""Branches as Ray Train (V2) worker groups: ``main`` and ``clean`` train at once, each in its own
``TorchTrainer``, checkpointing every step into the same store.

    result = run_on_ray(ExperimentConfig.quick(), RayJobConfig(store="s3://bucket/runs"), out_dir="out/x")

Per mechanism (see :mod:`raybranch.branches.experiment` for what the experiment measures):

1. driver: branch point → ``main`` step 0 (tag ``branch-point``); ``clean`` = a fork of main at 0;
2. one ``TorchTrainer`` per branch, launched together (``fit()`` in a thread each; the trainers'
   controllers and workers are Ray actors), ``ScalingConfig(num_workers=1, use_gpu=<cluster has
   GPUs>)``, ``RunConfig(name=<branch>, storage_path=<store>/<run>/_ray, storage_filesystem=<the
   store's>)``, ``FailureConfig(max_failures)``. The worker (:func:`branch_train_loop`) rebuilds
   the data from the config (deterministic from the seed), opens the branch's checkpointer,
   restores the branch head from the store and trains the branch's slices not yet ended;
3. at each slice end it calls ``ray.train.report(metrics, checkpoint=...)`` with a checkpoint
   directory holding one small JSON (:data:`RAY_CHECKPOINT_FILE`) that names the raybranch
   checkpoint — store URI, run, branch, step — so every Ray checkpoint resolves to a committed
   raybranch checkpoint (:mod:`.pointers`: :func:`resolve_ray_checkpoint`, :func:`restore_ray_checkpoint`);
4. driver: per-slice accuracies of the slice-end checkpoints restored from the store, quarantine
   (instant recovery, replay, oracle) and the report, as the single-process experiment does.

Resume. A worker restarted by ``FailureConfig`` finds the branch's last committed checkpoint (the
store is the truth; a save in flight when the worker died is not committed and does not exist)
and the slices already ended (``slice-end:<k>`` tags). Its checkpointer registers as the
branch's writer (a new epoch), so a writer of the failed attempt that is not quite dead yet is
refused from then on (:class:`~raybranch.errors.FencedError`) instead of interleaving. It restores model and optimizer from that
head and goes on: slices ended are skipped; a slice cut short is trained again from its first
epoch, starting from the head's weights, with step ids continuing after the head — so the
branch's chain keeps consecutive steps, no gap, no duplicate. (Restarting the slice, not the
exact batch, keeps :func:`raybranch.train.loop.train_slice` unchanged; the cut slice is trained
a little longer than it would have been without the failure.)

Ray's bookkeeping for a run (``<run>/_ray/<branch>/``: reported checkpoints, metrics) lives in
the run's directory of the store; its bytes are left out of the run's compression figures
(reported apart as ``ray_bytes``).

Checkpointer in the worker (``RayJobConfig.checkpointer``): ``sync`` (the default) — a plain
:class:`~raybranch.Checkpointer` in the worker, whose pipeline thread encodes and group-commits
behind the training thread; ``async`` — the branch's
:class:`~raybranch.cluster.actor.AsyncCheckpointer` (checkpoint actor, the same pipeline in its
own process). On CPU nodes ``sync`` costs less: LeNet-5 step +14–23 % against +32 % with the
actor (``python -m raybranch.bench.step_overhead [--actor]``, docs/DECISIONS.md), since the actor
copies the state once more and pays Ray per call. On GPU nodes neither has been measured yet;
``sync`` stays the default there too.

Scale. Each ``TorchTrainer`` costs ~10 s to start on 2 CPUs (controller, worker process,
process group), so on the bundled digits the Ray run of ``jobs/configs/quick.yaml`` takes ~1 min
where ``raybranch demo --quick`` takes ~11 s; the branches' parallelism pays once a branch trains
for longer than its trainer takes to start.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable

import ray
import torch

from ..branches.experiment import (
    Experiment,
    ExperimentConfig,
    Hooks,
    _slice_summary,
    _summary_lines,
    prepare_data,
    torch_save_bytes,
)
from ..branches.slices import BRANCH_POINT_TAG, slice_ends
from ..checkpoint.checkpointer import Checkpointer
from ..config import RayJobConfig
from ..errors import RaybranchError
from ..ledger.lineage import Lineage
from ..lora import merge_and_reinit_
from ..models import build_model
from ..store.store import Store, open_store
from ..train.loop import checkpoint_state, load_checkpoint
from .pointers import (
    RAY_CHECKPOINT_FILE,
    RAY_CHECKPOINT_FORMAT,
    RAY_DIR,
    ray_storage,
    resolve_ray_checkpoint,
    restore_ray_checkpoint,
    write_ray_checkpoint,
)


class BranchTrainingError(RaybranchError):
    """A branch's Ray Train run failed for good (its FailureConfig budget spent)."""


def cluster_has_gpu() -> bool:
    """Whether the Ray cluster offers any GPU (decides ``ScalingConfig(use_gpu=...)``)."""
    return float(ray.cluster_resources().get("GPU", 0)) > 0


# -- the worker -----------------------------------------------------------------------------------
def experiment_config(d: dict) -> ExperimentConfig:
    """ExperimentConfig from its ``as_dict()`` (lists back to tuples)."""
    d = dict(d)
    for k in ("mechanisms", "serve_snapshot"):
        d[k] = tuple(d[k])
    return ExperimentConfig(**d)


def _device() -> torch.device:
    try:
        import ray.train.torch as rtt

        return rtt.get_device()
    except Exception:  # noqa: BLE001 - outside a Train worker: CPU
        return torch.device("cpu")


def _open_checkpointer(c: dict):
    if c["checkpointer"] == "async":
        from .actor import AsyncCheckpointer

        return AsyncCheckpointer(c["store"], c["run"], c["branch"], **c["ck_kwargs"])
    return Checkpointer(open_store(c["store"]), c["run"], c["branch"], **c["ck_kwargs"])


def branch_train_loop(c: dict) -> dict:
    """``train_loop_per_worker`` of one branch: resume from the branch head in the store, train
    the branch's slices not yet ended, report every slice end. ``c`` (built by
    :func:`branch_loop_config`): experiment (``as_dict``), store, run, branch, mechanism,
    slices, merge, end_snapshot, ck_kwargs, checkpointer, threads, step_hook (optional
    ``fn(branch, step)`` called after every optimizer step — fault injection in tests)."""
    torch.set_num_threads(int(c.get("threads") or 1))
    cfg = experiment_config(c["experiment"])
    hook = c.get("step_hook")
    exp = Experiment(cfg, c["store"], Hooks(step=(lambda s: hook(c["branch"], s)) if hook else (lambda s: None)))
    exp.data = prepare_data(cfg)
    lora = c["mechanism"] == "lc+dlora"
    dev = _device()
    meta = exp.data.meta
    base = build_model(cfg.model, meta.num_classes, meta.in_channels, meta.image_size)
    template = exp.with_lora(base) if lora else base
    ck = _open_checkpointer(c)
    try:
        model = copy.deepcopy(template)
        opt = exp.optimizer(model, lora)
        head = ck.head()
        load_checkpoint(model, ck.restore(), opt)  # the branch head: the fork point, or where a failed attempt got to
        model.to(dev)
        for state in opt.state.values():  # optimizer tensors follow the model
            for k, v in state.items():
                if torch.is_tensor(v):
                    state[k] = v.to(dev)
        ends = slice_ends(Lineage(ck.store, c["run"], c["branch"]))
        step = int(head["step"])
        done = [k for k in c["slices"] if k in ends]
        todo = [k for k in c["slices"] if k not in ends]
        resumed = step > 0 or bool(done)
        _report_missed_slice_ends(exp, template, ck, c, {k: ends[k] for k in done})
        if c["merge"] == "slice-end" and done and ends[done[-1]] == step:
            merge_and_reinit_(model, exp.merge_generator(done[-1]))  # the merge that followed that slice end
        for k in todo:
            res = exp.train(model, opt, k, ck, step, c["merge"], end_snapshot=c["end_snapshot"])
            step = res.last_step
            ck.flush()  # the slice end is committed before Ray records it
            metrics = {"slice": k, "step": step, "acc_live": exp.acc(model), "resumed": resumed,
                       "summary": json.dumps(_slice_summary(res))}
            with tempfile.TemporaryDirectory(prefix="raybranch-ray-ckpt-") as d:
                write_ray_checkpoint(d, c["store"], c["run"], c["branch"], step, k)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        ck.close()
        if isinstance(ck, Checkpointer):
            timings = dict(ck.timings)
        else:
            timings = {"handoff_s": ck.stats["handoff_s"], "blocked_s": ck.stats["blocked_s"]}
        ck = None
        return {"branch": c["branch"], "step": step, "acc_live": exp.acc(model), "timings": timings,
                "resumed": resumed, "slices_done_before": done}
    finally:
        if ck is not None and not isinstance(ck, Checkpointer):
            try:
                ck.close()
            except Exception:  # noqa: BLE001 - the loop's own error is the one to see
                pass


def _report_missed_slice_ends(exp: Experiment, template, ck, c: dict, ended: dict[int, int]) -> None:
    """Report to Ray the slice ends the store holds but Ray never recorded.

    ``ray.train.report`` hands its record to the controller asynchronously: a worker killed
    right after a slice end may have committed the slice (the store has it) while Ray lost the
    report. A restarted worker compares Ray's latest checkpoint with the store's slice ends and
    reports the missing ones (metrics from the restored checkpoint, ``recovered: true``).
    """
    latest = ray.train.get_checkpoint()
    known = resolve_ray_checkpoint(latest)["step"] if latest is not None else -1
    for k, step in sorted(ended.items(), key=lambda kv: kv[1]):
        if step <= known:
            continue
        model = exp.restored(template, ck, step)
        summary = {"slice": k, "last_step": step, "recovered_from_store": True}
        metrics = {"slice": k, "step": step, "acc_live": exp.acc(model), "resumed": True, "summary": json.dumps(summary)}
        with tempfile.TemporaryDirectory(prefix="raybranch-ray-ckpt-") as d:
            write_ray_checkpoint(d, c["store"], c["run"], c["branch"], step, k)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


# -- the driver -----------------------------------------------------------------------------------
def branch_loop_config(cfg: ExperimentConfig, store_uri: str, run: str, branch: str, mech: str, slices: list[int],
                       merge: str, end_snapshot: bool, ck_kwargs: dict, job: RayJobConfig,
                       step_hook: Callable[[str, int], None] | None = None) -> dict:
    """The ``train_loop_config`` of :func:`branch_train_loop` for one branch."""
    return {"experiment": cfg.as_dict(), "store": store_uri, "run": run, "branch": branch, "mechanism": mech,
            "slices": list(slices), "merge": merge, "end_snapshot": bool(end_snapshot), "ck_kwargs": dict(ck_kwargs),
            "checkpointer": job.checkpointer, "threads": max(1, int(job.cpus_per_worker)), "step_hook": step_hook}


def make_trainer(loop_config: dict, store: Store, job: RayJobConfig, use_gpu: bool | None = None):
    """The TorchTrainer of one branch (not started)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    gpu = cluster_has_gpu() if use_gpu is None else use_gpu
    path, fs = ray_storage(store, loop_config["run"])
    return TorchTrainer(
        branch_train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": job.cpus_per_worker, **({"GPU": 1} if gpu else {})}),
        run_config=RunConfig(name=loop_config["branch"], storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=job.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=None)),
    )


def fit_branches(loop_configs: list[dict], store: Store, job: RayJobConfig, parallel: bool = True) -> dict[str, dict]:
    """Run one TorchTrainer per branch — all at once (``parallel``) or one after the other.
    Returns {branch: {"result": ray.train.Result, "seconds": wall time of its fit()}}; raises
    :class:`BranchTrainingError` naming the first branch that failed for good."""
    use_gpu = job.use_gpu if job.use_gpu is not None else cluster_has_gpu()
    out: dict[str, dict] = {}
    errors: dict[str, BaseException] = {}

    def fit(c: dict) -> None:
        t0 = time.perf_counter()
        try:
            out[c["branch"]] = {"result": make_trainer(c, store, job, use_gpu).fit(), "seconds": time.perf_counter() - t0}
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread below
            errors[c["branch"]] = exc

    if parallel:
        threads = [threading.Thread(target=fit, args=(c,), name=f"raybranch-fit-{c['branch']}") for c in loop_configs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for c in loop_configs:
            fit(c)
    for b, exc in errors.items():
        msg = " ".join(str(exc).split())[:500]
        raise BranchTrainingError(f"branch {b!r} failed on Ray Train: {type(exc).__name__}: {msg}") from exc
    return out


def reported(result) -> list[tuple[dict, dict]]:
    """[(raybranch checkpoint doc, metrics)] of every checkpoint a branch's run reported, by step."""
    pairs = [(resolve_ray_checkpoint(ck), m) for ck, m in (result.best_checkpoints or [])]
    return sorted(pairs, key=lambda p: p[0]["step"])


class RayExperiment(Experiment):
    """The experiment of :class:`~raybranch.branches.experiment.Experiment` with each mechanism's
    branches trained as Ray Train worker groups; ``run()`` returns the same report dict (plus,
    per mechanism, ``ray``: trainer wall times, reported checkpoints, resumes)."""

    def __init__(self, config: ExperimentConfig, store_uri: str, job: RayJobConfig | None = None,
                 hooks: Hooks | None = None, step_hook: Callable[[str, int], None] | None = None):
        super().__init__(config, store_uri, hooks)
        self.store_uri = store_uri
        self.job = job or RayJobConfig()
        self.job.validate()
        self.step_hook = step_hook

    def setup_branches(self, mech: str, bp, run: str, plan: dict[str, list[int]], merge: str) -> list[dict]:
        """Write the branch point as ``main`` step 0 of ``run``, fork every other branch of
        ``plan`` ({branch: slices}) from it, and return their ``train_loop_config``s."""
        cfg = self.cfg
        if self.store.list(run, recursive=True):
            raise RaybranchError(f"run {run!r} already exists in {self.store.uri}; use a fresh store or another name")
        lora = mech == "lc+dlora"
        template = self.with_lora(bp) if lora else copy.deepcopy(bp)
        self.hooks.phase(f"{mech} branch point → store")
        main_ck = Checkpointer(self.store, run, "main", **self.ck_kwargs())
        state, extra = checkpoint_state(template, lora)
        # with the optimizer, so that the training checkpoints share its layout
        main_ck.save(0, state, self.optimizer(template, lora), extra, tags=[BRANCH_POINT_TAG])
        for b in plan:
            if b != "main":
                main_ck.fork(b, step=0)
        return [branch_loop_config(cfg, self.store_uri, run, b, mech, slices, merge,
                                   cfg.exact_slice_end(mech, b), self.ck_kwargs(), self.job, self.step_hook)
                for b, slices in plan.items()]

    def ck_kwargs(self) -> dict:
        return self.cfg.checkpointer_kwargs()

    def run_mechanism(self, mech: str, bp, full: dict, lora_merge: str | None = None,
                      branches_only: tuple[str, ...] | None = None) -> dict:
        """As :meth:`Experiment.run_mechanism`, with main and clean trained by Ray Train."""
        cfg = self.cfg
        lora, merge, run = self.run_name(mech, lora_merge)
        n = len(self.data.slices)
        k_bad = cfg.poison_slice
        verified = [k for k in range(1, n + 1) if k != k_bad]
        ck_kwargs = self.ck_kwargs()
        template = self.with_lora(bp) if lora else copy.deepcopy(bp)
        ts_bytes = torch_save_bytes(template)
        plan = {"main": list(range(1, n + 1))}
        if branches_only is None or "clean" in branches_only:
            plan["clean"] = verified
        configs = self.setup_branches(mech, bp, run, plan, merge)
        self.hooks.phase(f"{mech} {' + '.join(plan)} on Ray Train")
        t0 = time.perf_counter()
        fits = fit_branches(configs, self.store, self.job, parallel=self.job.parallel)
        wall = time.perf_counter() - t0
        self.log(f"{mech}: {' and '.join(plan)} trained on Ray Train in {wall:.1f} s "
                 f"({'at once' if self.job.parallel else 'one after the other'})")

        main_ck = Checkpointer(self.store, run, "main", **ck_kwargs)  # fresh: the workers wrote the rest
        branches: dict[str, dict] = {}
        ray_info: dict = {"wall_seconds": wall, "branches": {}}
        for b, slices in plan.items():
            res = fits[b]["result"]
            reps = reported(res)
            summaries = {m["slice"]: json.loads(m["summary"]) for _, m in reps}
            ck = Checkpointer(self.store, run, b, **ck_kwargs)
            ends = slice_ends(Lineage(self.store, run, b))
            per_slice, results = [], []
            for k in range(1, n + 1):
                if k in slices:
                    per_slice.append(self.acc(self.restored(template, ck, ends[k])))
                    results.append(summaries.get(k) or {"slice": k, "last_step": ends[k], "recovered_from_store": True})
                else:
                    per_slice.append(per_slice[-1] if per_slice else self.acc(self.restored(template, ck, 0)))
            rv = res.return_value or {}
            branches[b] = {"ck": ck, "slices": slices, "per_slice": per_slice, "results": results,
                           "acc_live": rv.get("acc_live"), "timings": rv.get("timings", {})}
            ray_info["branches"][b] = {
                "fit_seconds": fits[b]["seconds"], "path": res.path,
                "reported": [{"id": d["id"], "slice": d["slice"], "resumed": m.get("resumed", False)} for d, m in reps],
                "resumed": bool(rv.get("resumed")),
            }

        rep = {} if branches_only is not None else self.quarantine(mech, run, template, main_ck, merge, lora, verified, ck_kwargs)
        for br in branches.values():
            br["train_seconds"] = sum(r.get("seconds", 0.0) for r in br["results"])
        out = self.summarize(run, mech, merge if lora else None, template, main_ck, branches, rep, full, k_bad, n, ts_bytes, exclude=RAY_DIR)
        out["run_total"]["ray_bytes"] = out["run_total"].pop("excluded_bytes")
        out["timings"] = {b: br["timings"] for b, br in branches.items()}
        out["ray"] = ray_info
        if rep:
            out["recovery"] = rep
        return out


def summary_lines(result: dict) -> list[str]:
    """The one-line-per-branch summary the single-process experiment logs."""
    return [line for m, r in result["mechanisms"].items() for line in _summary_lines(m, r)]


def run_on_ray(config: ExperimentConfig, job: RayJobConfig, out_dir: str | None = None, hooks: Hooks | None = None,
               store_uri: str | None = None, step_hook: Callable[[str, int], None] | None = None) -> dict:
    """Run the branching experiment with Ray Train branches into ``store_uri`` (default
    ``job.store``, else ``$RAYBRANCH_STORE``, else ``file://<out_dir>/store``); with ``out_dir``
    also write the report there. Needs ``ray.init()`` (or a Ray job's driver)."""
    if not ray.is_initialized():
        raise RaybranchError("run_on_ray needs Ray: call ray.init() first, or submit it as a Ray job")
    uri = store_uri or job.store or os.environ.get("RAYBRANCH_STORE")
    if not uri:
        if out_dir is None:
            raise RaybranchError("no store: set store= in the config, $RAYBRANCH_STORE, or give an output directory")
        uri = "file://" + os.path.join(os.path.abspath(out_dir), "store")
    result = RayExperiment(config, uri, job, hooks, step_hook).run()
    if out_dir is not None:
        from ..branches.report import write_report

        write_report(result, out_dir)
    return result


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


__all__ = [
    "RAY_CHECKPOINT_FILE",
    "RAY_CHECKPOINT_FORMAT",
    "BranchTrainingError",
    "RayExperiment",
    "branch_loop_config",
    "branch_train_loop",
    "cluster_has_gpu",
    "connect",
    "fit_branches",
    "make_trainer",
    "ray_storage",
    "reported",
    "resolve_ray_checkpoint",
    "restore_ray_checkpoint",
    "run_on_ray",
    "summary_lines",
    "write_ray_checkpoint",
]

