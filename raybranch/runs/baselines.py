"""Training without raybranch: the branch point, and plain training of a branch's schedule
(the "full training" baseline and the oracle of a quarantine).

Branch point (report §7): a model trained from scratch on the warm-up part, one epoch at a
time, until its validation accuracy reaches ``branch_point_target`` or
``branch_point_max_epochs`` pass.

Plain training: a copy of the branch point (with the run's Delta-LoRA layers when asked) trained
on ``slices`` in order with the same seeds, batch order and early stopping as a branch, but no
checkpoints. Trained on a quarantined branch's schedule it is the oracle, "retrain from scratch
without slice k", against which replay is compared (accuracy) and instant recovery is timed.
"""
from __future__ import annotations

import copy
import time

from torch import nn

from ..train.loop import train_slice
from .context import RunContext


def train_branch_point(ctx: RunContext) -> tuple[nn.Module, dict]:
    """(model, {"epochs", "val_acc", "acc", "seconds", "reached_target"})."""
    cfg = ctx.cfg
    ctx.hooks.phase("branch point")
    model = ctx.base_model()
    opt = ctx.optimizer(model, False)
    t0 = time.perf_counter()
    epochs, val = 0, ctx.val_acc(model)
    while val < cfg.branch_point_target and epochs < cfg.branch_point_max_epochs:
        train_slice(model, opt, ctx.data.warmup, epochs=1, batch_size=cfg.batch_size, ckpt=None,
                    step0=0, slice_id=0, seed=cfg.seed + 1000 * epochs, on_step=ctx.hooks.step)
        epochs += 1
        val = ctx.val_acc(model)
    info = {"epochs": epochs, "val_acc": val, "acc": ctx.acc(model), "seconds": time.perf_counter() - t0,
            "reached_target": val >= cfg.branch_point_target}
    ctx.hooks.log(f"branch point: {epochs} epochs on the warm-up part, val {val:.3f}, test {info['acc']:.3f}")
    return model, info


def train_plain(ctx: RunContext, start: nn.Module, slices: list[int], n: int, lora: bool, label: str) -> dict:
    """Train a copy of ``start`` on ``slices`` (of 1..n) without checkpoints.

    Returns {"acc", "per_slice_acc" (after each of 1..n; unchanged after a slice not trained),
    "seconds", "cpu_seconds", "asr", "steps"}.
    """
    ctx.hooks.phase(label)
    model = ctx.with_lora(start) if lora else copy.deepcopy(start)
    opt = ctx.optimizer(model, lora)
    merge = ctx.cfg.lora_merge if lora else "none"
    t0, c0 = time.perf_counter(), time.process_time()
    per_slice, step, prev = [], 0, ctx.acc(model)
    for k in range(1, n + 1):
        if k in slices:
            step = ctx.train(model, opt, k, None, step, merge).last_step
            prev = ctx.acc(model)
        per_slice.append(prev)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"acc": per_slice[-1], "per_slice_acc": per_slice, "seconds": secs, "cpu_seconds": cpu,
            "asr": ctx.asr(model), "steps": step}


__all__ = ["train_branch_point", "train_plain"]
