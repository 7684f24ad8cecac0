"""The operations on a run that lives in the store: init, a slice's arrival, marks, quarantine.

Every operation reads the run's state from the store, does what is left to do and records it,
so an operation that is killed resumes when it is run again (each step is idempotent: create-only
records, branches trained from their heads, refs moved by compare-and-swap).

- :func:`init_run`: run.json (create-only; the same config again resumes, another one is an
  error); the branch point — trained on the warm-up part, or a given model — as ``main`` step 0
  (tag ``branch-point``) with its plain weights kept in ``records/``; ``clean`` forked at step 0;
  the ``served`` link on main's step 0.
- :func:`train_slice`: slice k arrives and ``main`` trains it; then ``clean`` catches up.
  Slices arrive in order: k is main's next slice (or one it has trained: then only clean moves).
- :func:`mark_slice`: the decision on slice k (``verified`` / ``poisoned``; create-only, a
  contradiction is an error); then ``clean`` catches up.
- :func:`quarantine`: slice k is poisoned. Instant recovery: the ``served`` link moves to clean's
  head (restored from the store, timed; exported as safetensors into ``reports/``). Replay:
  ``replay-<k>`` forks main at the end of slice k−1 and trains main's later slices without k
  (and without any other slice marked poisoned); then it becomes ``main`` and the old main is
  kept as ``main-poisoned-<k>``.

Clean's rule (:func:`clean_plan`): the arrived slices in order, training the verified ones it has
not trained, skipping the poisoned ones, stopping at the first slice not yet decided.

``served`` follows a branch (its target names it in ``follows``): when that branch trains on, the link moves to its new
head (main until a quarantine, clean after one).
"""
from __future__ import annotations

import time

import torch

from ..branches.data import Hooks
from ..branches.slices import BRANCH_POINT_TAG, slice_ends, step_before_slice
from ..checkpoint.restore import Reader
from ..config.classes import ExperimentConfig
from ..errors import RunError
from ..export import safetensors_bytes
from ..ledger.lineage import Lineage
from ..ledger.refs import live_id, move_link, read_link
from ..store.store import Store
from ..train.loop import checkpoint_state, load_checkpoint
from .context import RunContext
from .runner import LocalRunner, Runner
from .spec import RunSpec, content_hash, read_json_or_none, record_key, write_record
from .swap import swap_in_replay

MAIN, CLEAN, SERVED = "main", "clean", "served"
BRANCH_POINT_RECORD = "branch-point"


def branch_point_file(run: str) -> str:
    return f"{run}/records/branch-point.safetensors"


def _ends(store: Store, run: str, branch: str) -> dict[int, int]:
    return slice_ends(Lineage(store, run, branch))


# -- init ----------------------------------------------------------------------------------------
def init_run(store: Store, run: str, cfg: ExperimentConfig, mechanism: str | None = None,
             start: dict[str, torch.Tensor] | None = None, start_source: str | None = None,
             ray: dict | None = None, hooks: Hooks | None = None) -> dict:
    """Create (or finish creating) run ``run``; ``start``: the branch point's weights (a plain
    state_dict of the run's model) instead of training one. Returns what it did."""
    from .baselines import train_branch_point

    t0 = time.perf_counter()
    cfg.validate()
    mechanism = mechanism or cfg.mechanisms[0]
    origin = {"source": "trained"} if start is None else {"source": start_source or "file", "sha256": content_hash(
        *[start[k] for k in sorted(start)])}
    ctx = RunContext.for_config(store, run, cfg, mechanism, hooks, start=origin)
    spec = ctx.spec
    if ray:
        spec.doc["ray"] = dict(ray)
    created = spec.create(store)
    ctx = RunContext(store, run, hooks=hooks, data=ctx.data)  # the same config: the same data
    out = {"run": run, "created": created, "mechanism": mechanism, "slices": ctx.spec.n_dataset_slices}
    main_head = Lineage(store, run, MAIN).head_step if live_id(store, run, MAIN) else None
    if main_head is None:
        if start is None:
            bp, info = train_branch_point(ctx)
        else:
            bp = ctx.base_model()
            try:
                bp.load_state_dict(start, strict=True)
            except RuntimeError as exc:
                raise RunError(f"--from: the model file does not fit {cfg.model}: {' '.join(str(exc).split())[:300]}") from None
            info = {"epochs": 0, "val_acc": ctx.val_acc(bp), "acc": ctx.acc(bp), "seconds": 0.0, "reached_target": None,
                    "source": origin["source"]}
        store.write_bytes(branch_point_file(run), safetensors_bytes(bp.state_dict()))
        write_record(store, run, BRANCH_POINT_RECORD, info, replace=True)
        template = ctx.with_lora(bp) if ctx.spec.lora else bp
        ck = ctx.checkpointer(MAIN)
        state, extra = checkpoint_state(template, ctx.spec.lora)
        # with the optimizer, so that the training checkpoints share its layout
        ck.save(0, state, ctx.optimizer(template), extra, tags=[BRANCH_POINT_TAG])
        ck.close()
        out["branch_point"] = info
    if live_id(store, run, CLEAN) is None:
        ctx.checkpointer(MAIN).fork(CLEAN, step=0).close()
    if read_link(store, run, SERVED) is None:
        move_link(store, run, SERVED, served_target(ctx, MAIN, 0), expect=None)
    out["seconds"] = time.perf_counter() - t0
    return out


# -- slices and marks ----------------------------------------------------------------------------
def clean_plan(ctx: RunContext) -> list[int]:
    """The slices clean trains now (see the module docstring)."""
    marks = ctx.spec.marks(ctx.store)
    done = _ends(ctx.store, ctx.run, CLEAN)
    out = []
    for s in sorted(ctx.spec.arrived(ctx.store)):
        decision = marks.get(s)
        if decision is None:
            break
        if decision == "verified" and s not in done:
            out.append(s)
    return out


def served_target(ctx: RunContext, branch: str, step: int | None = None, lin: Lineage | None = None) -> dict:
    """A ``served`` link target: ``branch`` at ``step`` (its head if None). ``branch_id`` is the
    id that holds that checkpoint (the parent's for a fork point), ``follows`` the branch's own id."""
    lin = lin or Lineage(ctx.store, ctx.run, branch)
    step = lin.head_step if step is None else step
    return {"branch": branch, "branch_id": lin.entry(step)["branch_id"], "step": int(step), "follows": lin.log.bid}


def _follow_served(ctx: RunContext) -> dict | None:
    """Move ``served`` to the head of the branch it follows, if that head moved."""
    link = read_link(ctx.store, ctx.run, SERVED)
    if link is None:
        return None
    target = link.doc["target"]
    names = {live_id(ctx.store, ctx.run, b): b for b in (MAIN, CLEAN)}
    name = names.get(target.get("follows", target["branch_id"]))
    if name is None:
        return target
    head = Lineage(ctx.store, ctx.run, name).head_step
    if head is not None and head != target["step"]:
        target = served_target(ctx, name, head)
        move_link(ctx.store, ctx.run, SERVED, target, expect=link)
    return target


def _heads(ctx: RunContext) -> dict:
    return {b: Lineage(ctx.store, ctx.run, b).head_step for b in (MAIN, CLEAN)}


def _check_arrival_order(spec: RunSpec, store: Store, k: int, main_ends: dict[int, int]) -> None:
    """RunError unless main can train slice k now: slices arrive in order, and every slice that
    arrived before k (and is not poisoned) has been trained by main."""
    arrived, marks = spec.arrived(store), spec.marks(store)
    if marks.get(k) == "poisoned":
        raise RunError(f"slice {k} of run {spec.run!r} is marked poisoned; main does not train it")
    nxt = 1 + max(arrived, default=0)
    if k not in arrived and k != nxt:
        raise RunError(f"slice {k} of run {spec.run!r} cannot arrive before slice {nxt}: train --slice {nxt} first")
    behind = [s for s in sorted(arrived) if s < k and s not in main_ends and marks.get(s) != "poisoned"]
    if behind:
        raise RunError(f"slice {behind[0]} of run {spec.run!r} arrived but main has not trained it: train --slice {behind[0]} first")


def train_slice(store: Store, run: str, k: int, runner: Runner | None = None, data: tuple | None = None,
                hooks: Hooks | None = None) -> dict:
    """Slice ``k`` arrives: main trains it, clean catches up. ``data``: (uint8 pixels, labels)
    of a slice read from files (``--data``), for a slice after the dataset's."""
    t0 = time.perf_counter()
    runner = runner or LocalRunner()
    ctx = RunContext(store, run, hooks=hooks)
    spec = ctx.spec
    spec.check_slice_id(k, store, arriving=True, files=data is not None)
    main_ends = _ends(store, run, MAIN)
    if k not in main_ends:
        _check_arrival_order(spec, store, k, main_ends)
    if data is not None:
        spec.store_file_slice(store, k, *data)
    elif k <= spec.n_dataset_slices:
        rec = spec.dataset_slices[k - 1]
        spec.record_arrival(store, k, "dataset", rec["images"], rec["sha256"])
    plan = [(MAIN, [] if k in main_ends else [k]), (CLEAN, clean_plan(ctx))]
    results = runner.train(ctx, plan)
    served = _follow_served(ctx)
    return {"run": run, "slice": k, "runner": runner.name, "trained": {b: [r["slice"] for r in v["trained"]] for b, v in results.items()},
            "heads": _heads(ctx), "served": served, "seconds": time.perf_counter() - t0}


def mark_slice(store: Store, run: str, k: int, decision: str, runner: Runner | None = None, hooks: Hooks | None = None,
               catch_up: bool = True) -> dict:
    """Record the decision on slice ``k``; clean then trains what it now can (``catch_up=False``:
    leave that to the next command, e.g. to train it beside main's next slice)."""
    t0 = time.perf_counter()
    runner = runner or LocalRunner()
    ctx = RunContext(store, run, hooks=hooks)
    new = ctx.spec.mark(store, k, decision)
    results = runner.train(ctx, [(CLEAN, clean_plan(ctx) if catch_up else [])])
    served = _follow_served(ctx)
    return {"run": run, "slice": k, "decision": decision, "new": new, "runner": runner.name,
            "trained": {b: [r["slice"] for r in v["trained"]] for b, v in results.items()},
            "heads": _heads(ctx), "served": served, "seconds": time.perf_counter() - t0}


# -- quarantine ----------------------------------------------------------------------------------
def quarantine_record_name(k: int) -> str:
    return f"quarantine-{int(k):06d}"


def instant_recovery(ctx: RunContext) -> dict:
    """Serve clean's head now: a cold restore from the store, then the ``served`` link (timed;
    the model's class is built before, as a server that serves it has it)."""
    model = ctx.template()
    t0, c0 = time.perf_counter(), time.process_time()
    reader = Reader(ctx.store, ctx.run)  # cold: nothing cached
    lin = reader.lineage(CLEAN)
    state = reader.restore(CLEAN, lin.head_step)
    load_checkpoint(model, state)
    target = served_target(ctx, CLEAN, int(state["step"]), lin)
    move_link(ctx.store, ctx.run, SERVED, target)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    export = f"{ctx.run}/reports/served-{CLEAN}-{target['step']}.safetensors"
    ctx.store.write_bytes(export, safetensors_bytes(model.state_dict()))
    return {"served": target, "id": f"{ctx.run}/{CLEAN}/{target['step']}", "instant_seconds": secs,
            "instant_cpu_seconds": cpu, "export": export, "model": model}


def quarantine(store: Store, run: str, k: int, runner: Runner | None = None, hooks: Hooks | None = None) -> dict:
    """Quarantine slice ``k`` (see the module docstring); returns the quarantine record."""
    t0 = time.perf_counter()
    runner = runner or LocalRunner()
    ctx = RunContext(store, run, hooks=hooks)
    spec = ctx.spec
    q = read_json_or_none(store, record_key(run, quarantine_record_name(k)))
    if q is None:  # checked before anything is written
        spec.check_slice_id(k, store)
        if spec.marks(store).get(k) == "verified":
            raise RunError(f"slice {k} of run {run!r} is already marked verified; a mark cannot be changed")
        main_ends = _ends(store, run, MAIN)
        if k not in main_ends:
            raise RunError(f"main of run {run!r} has not trained slice {k}: nothing to quarantine")
        spec.mark(store, k, "poisoned")
        ctx.hooks.phase(f"quarantine slice {k}: instant recovery")
        inst = instant_recovery(ctx)
        inst.pop("model")
        marks = spec.marks(store)
        q = {"slice": k, **inst, "from_step": step_before_slice(Lineage(store, run, MAIN), k),
             "replay": f"replay-{k}", "old_main": f"main-poisoned-{k}", "main_bid_before": live_id(store, run, MAIN),
             "replay_slices": sorted(s for s in main_ends if s > k and marks.get(s) != "poisoned"), "state": "replaying"}
        write_record(store, run, quarantine_record_name(k), q)
    if q["state"] != "done":
        if live_id(store, run, q["replay"]) is None and live_id(store, run, MAIN) == q["main_bid_before"]:
            ctx.checkpointer(MAIN).fork(q["replay"], step=q["from_step"]).close()
        ctx.hooks.phase(f"quarantine slice {k}: replay without it")
        plan = [(q["replay"], q["replay_slices"]), (CLEAN, clean_plan(ctx))] if live_id(store, run, q["replay"]) else [(CLEAN, clean_plan(ctx))]
        tr = time.perf_counter()
        results = runner.train(ctx, plan)
        replay_bid = swap_in_replay(store, run, k, q, MAIN)
        rp = results.get(q["replay"])
        q.update(state="done", replay_bid=replay_bid, replay_step=Lineage(store, run, MAIN).head_step,
                 replay_seconds=rp["seconds"] if rp else q.get("replay_seconds"), replay_wall_seconds=time.perf_counter() - tr)
        write_record(store, run, quarantine_record_name(k), q, replace=True)
    _follow_served(ctx)
    return {**q, "run": run, "runner": runner.name, "seconds": time.perf_counter() - t0}


def quarantines(store: Store, run: str) -> list[dict]:
    """The run's quarantine records, oldest slice first."""
    from .spec import read_records

    return read_records(store, run, "quarantine-")


__all__ = ["CLEAN", "MAIN", "SERVED", "branch_point_file", "clean_plan", "init_run", "instant_recovery", "mark_slice",
           "quarantine", "quarantines", "train_slice"]
