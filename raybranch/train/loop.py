"""One data slice of training, in plain PyTorch: ``train_slice`` (what a Ray Train worker calls).

Per optimizer step t = step0 + 1, step0 + 2, …:

    loss_t = CE(f(x_b), y_b)                       batch b of a seeded permutation of the slice
    loss_t not finite  →  roll back (below), no step
    θ ← optimizer step;  W ← W_a + λ·s·(B A − B_a A_a) for Delta-LoRA layers (``delta_lora_step``)
    checkpoint every ``checkpoint_every`` steps, and always at the slice end

Batch order. Epoch e of slice k draws its permutation from ``torch.Generator`` seeded with
``batch_seed(seed, k, e)``: the order depends only on (seed, slice, epoch), never on global RNG
state, so a resumed or replayed slice sees the same batches and checkpoints need no RNG state.

Early stopping (report §7.3, "early stopping based on accuracy improvement"). With
``eval_fn`` and ``patience`` p, the metric m_e = eval_fn(model) (higher is better) is taken
after every epoch; training stops after epoch e when max(m_1..m_e) was last improved p epochs
ago. Default (``restore_best=False``): the slice ends on its last trained step. We do not
rewind silently: the branch's checkpoints are a monotone history, and the slice-end checkpoint
is the model that training actually left. ``restore_best=True`` loads an in-memory copy of the
best epoch's model and records it as one more checkpoint (step last + 1, no optimizer step),
so the rewind is visible in the log.

Settling the slice end (``settle`` = n > 0). An LC checkpoint restores ũ_t = u_t − e_t, where
e_t is the quantization error of the last delta (error feedback keeps it from piling up, but
it is about one SGD step's size: enough to flip a few test predictions). After the slice's last
step the loop writes n more checkpoints of the *same* state at steps last + 1 … last + n
(tag ``settle``, no optimizer step): each codes δ = u − ũ = e, so the error shrinks by the
codec's factor per round (3–4× measured on LeNet-5/digits at 3 bits) for one small delta each.
The slice-end tag goes on the last of them. Report them apart from training checkpoints.
``end_snapshot=True`` instead writes the slice end as an exact key frame (no settle needed; it
restores bit for bit in one decode from the previous exact state — what serving a branch's head
at once asks for — at about half a snapshot's size). Experiments choose it with ``slice_end``
(``exact``, their default, or ``lossy``); settle is kept for comparison.

Non-finite loss (``nan_policy="rollback"``, the report's first motivation for checkpoints).
A NaN/Inf loss, or a NaN/Inf parameter after a step, at step t: restore the branch head
(its last good checkpoint, step m ≤ t − 1) into model and optimizer, set lr ← lr · ``lr_factor``
in every parameter group, log ``step t: non-finite loss, rolled back to step m, lr → x`` and
continue with the next batch (the offending batch is skipped; step ids keep counting, so a
gap in the branch's steps marks the steps rolled back). If the loss is non-finite again before
any new checkpoint was written, the head itself is suspect (finite but exploded weights): that
rollback goes one checkpoint further back. Without a checkpointer the loop keeps
an in-memory copy of the last good state at each would-be checkpoint instead.
``nan_policy="raise"`` raises :class:`NonFiniteLossError` instead. More than ``max_rollbacks``
rollbacks in one slice raise as well.

Data-parallel. A model wrapped in ``DistributedDataParallel`` trains rank r on its shard of each
batch and checkpoints the plain module (:mod:`raybranch.train.ddp` has the rule and the math).

Delta-LoRA checkpoints. For a model with Delta-LoRA layers the checkpoint's model state is
``lora_state(model)`` (A, B, biases, non-LoRA tensors: no dense W) and
``extra={"lora_anchor": lora_anchor(model)}``; the engine stores an unchanged extra tensor
once, so the anchor costs one exact copy per anchor (branch point, merge). ``load_checkpoint``
rebuilds the live model from it with ``load_lora_state`` (W = W_a + λ·s·(B A − B_a A_a) by the
same operations training ran).
"""
from __future__ import annotations

import copy
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.checkpointer import Checkpointer
from ..errors import NonFiniteError, NonFiniteLossError, RaybranchError
from ..lora import delta_lora_layers, delta_lora_step, load_lora_state, lora_anchor, lora_state
from .ddp import agree, data_parallel, shard, unwrap

NAN_POLICIES = ("rollback", "raise")
SETTLE_TAG = "settle"



@dataclass
class SliceResult:
    """What one call of :func:`train_slice` did."""

    slice_id: int
    step0: int                      # the branch head before the slice
    last_step: int                  # step of the slice-end checkpoint (or last step without one)
    steps: int                      # optimizer steps taken
    epochs: int                     # epochs run (possibly cut by early stopping)
    stopped_early: bool
    metric_history: list[float] = field(default_factory=list)  # eval_fn after each epoch
    best_metric: float | None = None
    best_epoch: int | None = None
    restored_best: bool = False
    checkpoints: int = 0            # checkpoints written (settle ones included)
    settle_checkpoints: int = 0     # of which settle checkpoints (no optimizer step)
    rollbacks: list[dict] = field(default_factory=list)  # {"step", "rolled_back_to", "lr"}
    lr: float = 0.0                 # learning rate at the end (after rollbacks)
    seconds: float = 0.0
    log: list[str] = field(default_factory=list)


def batch_seed(seed: int, slice_id: int, epoch: int) -> int:
    """Seed of epoch ``epoch``'s permutation of slice ``slice_id`` (a fixed mix, < 2⁶³)."""
    return (int(seed) * 1_000_003 + int(slice_id) * 10_007 + int(epoch) * 101 + 17) % (2**63 - 1)


def batch_order(n: int, seed: int, slice_id: int, epoch: int) -> torch.Tensor:
    """The permutation of ``range(n)`` used in that epoch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(batch_seed(seed, slice_id, epoch)))


def has_lora(model: nn.Module) -> bool:
    return bool(delta_lora_layers(model))


def checkpoint_state(model: nn.Module, lora: bool, anchor: dict | None = None) -> tuple[dict, dict | None]:
    """(model state, extra) to hand to ``Checkpointer.save``: plain ``state_dict`` or, for a
    Delta-LoRA model, ``lora_state`` plus ``{"lora_anchor": …}``."""
    if not lora:
        return model.state_dict(), None
    return lora_state(model), {"lora_anchor": anchor if anchor is not None else lora_anchor(model)}


def load_checkpoint(model: nn.Module, restored: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Put a restored checkpoint (``Checkpointer.restore`` / ``Reader.restore``) into the live
    model (Delta-LoRA aware) and, when both exist, the optimizer."""
    dev = _device(model)
    state = {k: v.to(dev) for k, v in restored["model"].items()}
    anchor = (restored.get("extra") or {}).get("lora_anchor") if isinstance(restored.get("extra"), dict) else None
    if anchor is not None:
        load_lora_state(model, {k: v.to(dev) for k, v in anchor.items()}, state)
    else:
        if has_lora(model):
            raise RaybranchError("the model has Delta-LoRA layers but the checkpoint holds no 'lora_anchor'")
        model.load_state_dict(state, strict=True)
    if optimizer is not None and restored.get("optimizer") is not None:
        optimizer.load_state_dict(restored["optimizer"])


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Share of ``images`` classified as ``labels`` (eval mode, restored afterwards)."""
    was = model.training
    model.eval()
    dev = _device(model)
    hits = 0
    try:
        for i in range(0, images.shape[0], batch_size):
            out = model(images[i : i + batch_size].to(dev))
            hits += int((out.argmax(1).cpu() == labels[i : i + batch_size]).sum())
    finally:
        model.train(was)
    return hits / max(1, images.shape[0])


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """lr ← lr · factor in every parameter group; returns the first group's new lr."""
    for g in optimizer.param_groups:
        g["lr"] = g["lr"] * factor
    return float(optimizer.param_groups[0]["lr"])


def train_slice(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    ckpt: Checkpointer | None,
    step0: int,
    slice_id: int,
    eval_fn: Callable[[nn.Module], float] | None = None,
    patience: int | None = None,
    lora: bool | None = None,
    nan_policy: str = "rollback",
    lr_factor: float = 0.5,
    max_rollbacks: int = 8,
    checkpoint_every: int = 1,
    restore_best: bool = False,
    settle: int = 0,
    end_snapshot: bool = False,
    seed: int = 0,
    loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    on_step: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
    clip_grad: float | None = None,
) -> SliceResult:
    """Train ``model`` on one slice ``data = (images, labels)``; see the module docstring.

    ``step0`` is the branch head's step (the first optimizer step is ``step0 + 1``); ``ckpt``
    the branch's checkpointer (None: no checkpoints, e.g. the oracle or plain full training);
    ``lora`` None detects Delta-LoRA layers. Checkpoints carry ``slices=[slice_id]``; the last
    one also ``tags=["slice-end:<slice_id>"]``. ``loss_hook(step, loss) -> loss`` may replace the
    loss before the finiteness check (fault injection in tests); ``on_step(step)`` is called
    after each step (progress bars). ``clip_grad`` c > 0 rescales the gradient to ‖g‖ ≤ c (the norm
    over all parameters) before each step. Returns a :class:`SliceResult`.
    """
    images, labels = data
    net, model = model, unwrap(model)  # forward through the DDP wrapper; state, checks and restores on the module
    dp = data_parallel(net)
    n = int(labels.shape[0])
    if images.shape[0] != n or n == 0:
        raise RaybranchError(f"slice {slice_id}: need as many images as labels (> 0), got {images.shape[0]} and {n}")
    if dp is not None and n < dp[1]:
        raise RaybranchError(f"slice {slice_id}: {n} images cannot be shared by {dp[1]} data-parallel ranks")
    if settle < 0:
        raise RaybranchError(f"settle must be ≥ 0 checkpoints, got {settle}")
    if epochs < 1 or batch_size < 1 or checkpoint_every < 1:
        raise RaybranchError(f"epochs, batch_size and checkpoint_every must be ≥ 1, got {epochs}, {batch_size}, {checkpoint_every}")
    if nan_policy not in NAN_POLICIES:
        raise RaybranchError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if not 0.0 < lr_factor <= 1.0:
        raise RaybranchError(f"lr_factor must lie in (0, 1], got {lr_factor}")
    if patience is not None and (patience < 1 or eval_fn is None):
        raise RaybranchError(f"patience needs an eval_fn and must be ≥ 1, got {patience}")
    lora = has_lora(model) if lora is None else lora
    if lora and not has_lora(model):
        raise RaybranchError("lora=True but the model has no Delta-LoRA layer")
    say = log or (lambda msg: None)
    dev = _device(model)
    t_start = time.perf_counter()
    res = SliceResult(slice_id=slice_id, step0=step0, last_step=step0, steps=0, epochs=0, stopped_early=False)
    anchor = lora_anchor(model) if lora else None
    # without a checkpointer: the last few good states in memory (a rollback that fails again
    # before any progress goes one further back)
    good: deque[dict] = deque([_snapshot(model, optimizer, step0)] if ckpt is None else [], maxlen=4)
    progressed, last_target = True, None
    step = step0
    since_ckpt = 0
    best_state = None
    model.train()

    n_settle = 0 if end_snapshot else settle

    def save(step_: int, end: bool) -> None:
        nonlocal since_ckpt, step, progressed
        state, extra = checkpoint_state(model, lora, anchor)
        last_tags = [f"slice-end:{slice_id}"] if end else []
        ckpt.save(step_, state, optimizer, extra, slices=[slice_id], tags=[] if end and n_settle else last_tags,
                  snapshot=end and end_snapshot)  # a lossy slice end unless asked: tags alone would make it exact
        res.checkpoints += 1
        since_ckpt = 0
        progressed = True
        if end:
            for i in range(1, n_settle + 1):
                tags = ([SETTLE_TAG] + last_tags) if i == n_settle else [SETTLE_TAG]
                ckpt.save(step_ + i, state, optimizer, extra, slices=[slice_id], tags=tags, snapshot=False)
                res.checkpoints += 1
                res.settle_checkpoints += 1
            step = step_ + n_settle

    def rollback(bad_step: int, why: str) -> None:
        nonlocal progressed, last_target, since_ckpt
        if nan_policy == "raise":
            raise NonFiniteLossError(f"slice {slice_id} step {bad_step}: {why}")
        if len(res.rollbacks) >= max_rollbacks:
            raise NonFiniteLossError(f"slice {slice_id} step {bad_step}: {why} after {max_rollbacks} rollbacks; giving up")
        lr_now = [float(g["lr"]) for g in optimizer.param_groups]  # per group (Delta-LoRA: A, B, dense)
        if ckpt is not None:
            to_step = int(ckpt.head()["step"])
            if not progressed and last_target is not None:  # the head itself led to this: go further back
                earlier = [r["step"] for r in ckpt.log() if r["step"] < last_target]
                to_step = max(earlier) if earlier else last_target
            restored = ckpt.restore(to_step)
        else:
            if not progressed and len(good) > 1:
                good.pop()
            restored = good[-1]
            to_step = restored["step"]
        last_target, progressed, since_ckpt = to_step, False, 0
        load_checkpoint(model, restored, optimizer)
        for g, lr in zip(optimizer.param_groups, lr_now):
            g["lr"] = lr
        new_lr = set_lr(optimizer, lr_factor)
        msg = f"step {bad_step}: {why}, rolled back to step {to_step}, lr → {new_lr:g}"
        res.rollbacks.append({"step": bad_step, "rolled_back_to": to_step, "lr": new_lr})
        res.log.append(msg)
        say(msg)

    stop = False
    starts = [s for s in range(0, n, batch_size) if dp is None or min(batch_size, n - s) >= dp[1]]
    for epoch in range(epochs):
        order = batch_order(n, seed, slice_id, epoch)
        for bi, start in enumerate(starts):
            idx = order[start : start + batch_size]
            mine = idx if dp is None else shard(idx, *dp)
            x, y = images[mine].to(dev), labels[mine].to(dev)
            step += 1
            optimizer.zero_grad(set_to_none=True)
            if dp is None:
                loss = F.cross_entropy(net(x), y)
            else:  # this rank's share of the batch mean; DDP's average of the gradients makes it whole
                loss = F.cross_entropy(net(x), y, reduction="sum") * (dp[1] / idx.numel())
            if loss_hook is not None:
                loss = loss_hook(step, loss)
            if dp is None and not bool(torch.isfinite(loss.detach())):
                rollback(step, "non-finite loss")
                continue
            loss.backward()
            if clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip_grad)
            optimizer.step()
            if lora:
                delta_lora_step(model)
            res.steps += 1
            if not _params_finite(model):
                rollback(step, "non-finite parameters after the step")
                continue
            since_ckpt += 1
            # the epoch's last step is checkpointed after the epoch's evaluation, when we know
            # whether it ends the slice (and so carries the slice-end tag)
            if since_ckpt >= checkpoint_every and bi + 1 < len(starts):
                if ckpt is not None:
                    try:
                        save(step, end=False)
                    except NonFiniteError:
                        rollback(step, "non-finite state at checkpoint")
                        continue
                else:
                    good.append(_snapshot(model, optimizer, step))
                    since_ckpt, progressed = 0, True
            if on_step is not None:
                on_step(step)
        res.epochs = epoch + 1
        if eval_fn is not None:
            m = agree(float(eval_fn(model)), net)
            res.metric_history.append(m)
            if res.best_metric is None or m > res.best_metric:
                res.best_metric, res.best_epoch = m, epoch + 1
                if restore_best:
                    best_state = _snapshot(model, optimizer, step)
            elif patience is not None and (epoch + 1) - res.best_epoch >= patience:
                res.stopped_early = True
                stop = True
        end = stop or epoch + 1 == epochs
        rewind = end and restore_best and best_state is not None and res.best_epoch != res.epochs
        # after a rollback on the epoch's last batch the live state is the restored one; saving
        # it at the current step id still gives the slice end a checkpoint of its own
        if end or since_ckpt >= checkpoint_every:
            if ckpt is not None:
                save(step, end=end and not rewind)
            else:
                good.append(_snapshot(model, optimizer, step))
                since_ckpt, progressed = 0, True
        if rewind:
            load_checkpoint(model, best_state)  # the optimizer keeps its state (and reduced lr)
            step += 1
            res.restored_best = True
            res.log.append(f"slice {slice_id}: restored the best epoch ({res.best_epoch}) as step {step}")
            say(res.log[-1])
            if ckpt is not None:
                save(step, end=True)
        if stop:
            break

    res.last_step = step
    res.lr = float(optimizer.param_groups[0]["lr"])
    res.seconds = time.perf_counter() - t_start
    return res


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _params_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int) -> dict:
    """An in-memory copy in the shape ``load_checkpoint`` takes."""
    lora = has_lora(model)
    state, extra = checkpoint_state(model, lora)
    return {
        "model": {k: v.detach().clone() for k, v in state.items()},
        "extra": None if extra is None else {"lora_anchor": {k: v.clone() for k, v in extra["lora_anchor"].items()}},
        "optimizer": None if optimizer is None else copy.deepcopy(optimizer.state_dict()),
        "step": step,
    }


__all__ = [
    "NAN_POLICIES",
    "SETTLE_TAG",
    "NonFiniteLossError",
    "SliceResult",
    "batch_order",
    "batch_seed",
    "checkpoint_state",
    "evaluate_accuracy",
    "has_lora",
    "load_checkpoint",
    "set_lr",
    "train_slice",
]
