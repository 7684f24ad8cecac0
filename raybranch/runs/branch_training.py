"""Train one branch of a run on a list of slices, resuming from the store: the function both
runners call (in this process, or inside a Ray Train worker).

    result = train_branch(ctx, "clean", [1, 2, 4])

The store is the truth. The branch head is restored (model and optimizer); the slices whose
``slice-end:<k>`` checkpoint is already on the branch's lineage are skipped; the others are
trained in order, each from the head's weights with step ids continuing after the head. So a
run killed in the middle of a slice, started again, trains that slice again from its first
epoch and the chain keeps consecutive steps — no gap, no duplicate. (The rule is "restart the
slice", not "restart at the exact batch": the cut slice is trained a little longer than it
would have been without the failure, and the resumed branch is not bit-identical to an
uninterrupted one.) A new Checkpointer on the branch registers as its writer (a new epoch), so
a writer of the killed attempt that is not quite dead yet is fenced off.

With the ``slice-end`` merge policy, the Delta-LoRA merge that followed a slice end is redone
when the head is that slice end (the merge is not a checkpoint; its generator is seeded by the
slice id, so it is the same merge).

After each slice end is committed, a record ``records/slices-<branch id>-<k>.json`` keeps the
slice's summary (steps, epochs, early stopping, seconds, live accuracy) for the report;
``on_slice_end(k, step, metrics)`` is then called (the Ray runner reports to Ray Train there).
A slice end the store holds without its record — the process died between the two — gets a
record marked ``recovered_from_store``.

Data-parallel (``wrap``: e.g. Ray Train's ``prepare_model``; ``rank`` of the group): every rank
restores the head, wraps the model and trains its shard of each batch (:mod:`raybranch.train.ddp`);
``open_ck`` gives each rank a part-wise Checkpointer (:mod:`raybranch.checkpoint.parts`). A
restarted group resumes as one process does, every rank from the same commit: the rule is "restart
the slice" on every rank. Only rank 0 writes records; ``on_slice_end`` is called on every rank.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import torch

from ..branches.slices import slice_ends
from ..checkpoint.checkpointer import Checkpointer
from ..ledger.lineage import Lineage
from ..lora import merge_and_reinit_
from ..train.loop import load_checkpoint
from .context import RunContext
from .spec import read_json_or_none, record_key

SliceEndHook = Callable[[int, int, dict], None]


def slice_record_name(bid: str, k: int) -> str:
    return f"slices-{bid}-{int(k):06d}"


def slice_summary(res) -> dict:
    """The JSON summary of a :class:`~raybranch.train.loop.SliceResult`."""
    return {"slice": res.slice_id, "first_step": res.step0 + 1, "last_step": res.last_step, "steps": res.steps,
            "epochs": res.epochs, "stopped_early": res.stopped_early, "best_val_acc": res.best_metric,
            "rollbacks": res.rollbacks, "seconds": res.seconds}


def _to_device(model: torch.nn.Module, opt: torch.optim.Optimizer, dev: torch.device) -> None:
    model.to(dev)
    for state in opt.state.values():  # optimizer tensors follow the model
        for k, v in state.items():
            if torch.is_tensor(v):
                state[k] = v.to(dev)


def train_branch(ctx: RunContext, branch: str, slices: list[int], open_ck: Callable[[], object] | None = None,
                 on_slice_end: SliceEndHook | None = None, device: torch.device | None = None,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None, rank: int = 0) -> dict:
    """Train ``branch`` on those of ``slices`` not yet ended (see the module docstring).

    Returns {"branch", "branch_id", "step" (head after), "trained": [slice summaries],
    "done_before": [slices already ended], "resumed", "acc_live", "timings", "state_sha256" (of the live
    model's state dict, :func:`state_digest`), "seconds"}.
    """
    t0 = time.perf_counter()
    ck = open_ck() if open_ck is not None else ctx.checkpointer(branch)
    try:
        model = ctx.template()
        opt = ctx.optimizer(model)
        head = ck.head()
        load_checkpoint(model, ck.restore(), opt)  # the head: the fork point, or where a killed attempt got to
        if device is not None:
            _to_device(model, opt, device)
        net = wrap(model) if wrap is not None else model  # DDP: the same parameters, wrapped
        lin = Lineage(ctx.store, ctx.run, branch)
        bid = lin.log.bid
        ends = slice_ends(lin)
        step = int(head["step"])
        done = [k for k in slices if k in ends]
        todo = [k for k in slices if k not in ends]
        for k in done if rank == 0 else ():
            _ensure_record(ctx, bid, branch, k, ends[k])
        at_end = [s for s, st in ends.items() if st == step]
        if ctx.spec.merge == "slice-end" and at_end:
            merge_and_reinit_(model, ctx.merge_generator(max(at_end)))  # the merge that followed that slice end
        trained = []
        for k in todo:
            res = ctx.train(net, opt, k, ck, step, ctx.spec.merge, end_snapshot=ctx.end_snapshot(branch))
            step = res.last_step
            ck.flush()  # the slice end is committed before anything records it
            summary = {**slice_summary(res), "branch": branch, "acc_live": ctx.acc(model), "resumed": bool(done) or head["step"] > 0}
            if rank == 0:
                ctx.store.write_json(record_key(ctx.run, slice_record_name(bid, k)), summary)
            trained.append(summary)
            if on_slice_end is not None:
                on_slice_end(k, step, summary)
        ck.close()
        timings = dict(ck.timings) if isinstance(ck, Checkpointer) else {
            "handoff_s": ck.stats["handoff_s"], "blocked_s": ck.stats["blocked_s"]}
        ck = None
        return {"branch": branch, "branch_id": bid, "step": step, "trained": trained, "done_before": done,
                "resumed": bool(done) and bool(todo), "acc_live": ctx.acc(model), "timings": timings,
                "state_sha256": state_digest(model.state_dict()), "seconds": time.perf_counter() - t0}
    finally:
        if ck is not None and not isinstance(ck, Checkpointer):  # an actor client: end it; its error stays second
            try:
                ck.close()
            except Exception:  # noqa: BLE001 - the loop's own error is the one to see
                pass


def state_digest(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes, in order (live vs restored)."""
    h = hashlib.sha256()
    for k, v in sd.items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _ensure_record(ctx: RunContext, bid: str, branch: str, k: int, step: int) -> None:
    rel = record_key(ctx.run, slice_record_name(bid, k))
    if read_json_or_none(ctx.store, rel) is None:
        model = ctx.restored(branch, step)
        ctx.store.write_json(rel, {"slice": k, "last_step": step, "branch": branch, "acc_live": ctx.acc(model),
                                   "recovered_from_store": True})


__all__ = ["slice_record_name", "slice_summary", "state_digest", "train_branch"]
