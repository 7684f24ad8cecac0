"""Capture: the only part of a save that runs on the training thread.

A capture takes what the encoder needs out of a :class:`~raybranch.checkpoint.training_state.TrainingState`
before the training loop changes it again:

* each lossy group flattened into one float32 vector u_t, copied into a buffer reused from
  save to save (:class:`BufferPool`; no fresh pages to fault in);
* the exact tensors (integer buffers, tiny tensors, lossless optimizer state, RNG, extras),
  copied;
* the NaN/Inf check, with the error naming the tensor: a step that fails it is not queued, and
  nothing is written.

On a CUDA state the copies go to pinned host memory asynchronously (or, when the encoder runs on
the device, to device buffers) and a CUDA event marks their end: the pipeline waits on the event,
the training thread does not. The NaN/Inf check of a CUDA state then runs on the pipeline thread
(a check on the training thread would wait for the GPU) and its error comes with the next call.

Part-wise (a layout with ``owners``, :mod:`raybranch.checkpoint.parts`): only the rank's own
chunks and exact tensors are copied, but the NaN/Inf check covers the whole replicated state, by
one sum per float tensor (a tensor is taken as non-finite when its sum is), so every rank of the
group takes the same decision on the same state. The tensors DDP leaves unequal (buffers), which
rank 0 writes, are checked by rank 0 alone; a NaN there is not raised at capture but kept as
``refusal``, which the pipeline turns into a refusal all ranks agree on.
"""
from __future__ import annotations

import hashlib
import time

import torch

from ..errors import NonFiniteError
from ..store.store import json_bytes
from .parts import owned_exact, rank0_only


class BufferPool:
    """Reusable flat buffers by (group, numel, device, pinned): a buffer goes back with :meth:`give`
    once the pipeline is done with it."""

    def __init__(self):
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._layouts: dict[tuple, tuple] = {}

    def layout(self, rules, state) -> tuple:
        """(layout, lossy groups, exact names, layout bytes, its sha256) of a state, cached by
        its names, shapes and dtypes (a layout changes rarely; hashing it every step costs)."""
        key = (rules, state.buffers, tuple((n, t.shape, t.dtype) for n, t in state.tensors.items()))
        hit = self._layouts.get(key)
        if hit is None:
            layout, groups, exact = rules.layout(state.tensors, state.buffers)
            doc = json_bytes(layout)
            hit = self._layouts[key] = (layout, groups, exact, doc, hashlib.sha256(doc).hexdigest())
            while len(self._layouts) > 8:
                self._layouts.pop(next(iter(self._layouts)))
        return hit

    def take(self, key: str, n: int, device: torch.device, pinned: bool) -> torch.Tensor:
        free = self._free.get((key, n, device, pinned))
        if free:
            return free.pop()
        return torch.empty(n, dtype=torch.float32, device=device, pin_memory=pinned)

    def give(self, key: str, buf: torch.Tensor) -> None:
        self._free.setdefault((key, buf.numel(), buf.device, buf.is_pinned()), []).append(buf)


class Capture:
    """One save on its way to the store."""

    __slots__ = ("step", "flats", "exact", "exact_flats", "groups", "layout", "layout_hash", "layout_bytes", "meta", "slices",
                 "tags", "want_exact", "time", "ready", "pool", "sums", "refusal")

    def release(self) -> None:
        """Hand the flat buffers back to the pool (the encoder copies what it keeps)."""
        if self.pool is not None:
            for g, buf in self.flats.items():
                self.pool.give(g, buf)
            self.pool = None

    def check_finite(self) -> None:
        """NonFiniteError naming the first tensor that holds NaN/Inf (a finite sum of a vector
        means every entry is finite: one reduction per group on the common path). Part-wise:
        the per-tensor sums of the whole state."""
        if self.sums is not None:
            names, sums, shared = self.sums
            bad = [int(i) for i in torch.nonzero(~torch.isfinite(sums.cpu())).flatten()]
            for i in (i for i in bad if shared[i]):
                self._nonfinite(names[i])
            if bad:  # only rank 0's own (unreplicated) tensors: refused at the step, by every rank
                self.refusal = nonfinite_message(names[bad[0]], self.step)
            return
        for g, flat in self.flats.items():
            if not _finite(flat):
                sizes = self.layout["groups"][g]["sizes"]
                bad = int(torch.nonzero(~torch.isfinite(flat))[0])
                i = 0
                while bad >= sizes[i]:
                    bad, i = bad - sizes[i], i + 1
                self._nonfinite(self.groups[g][i])
        for names, flat in self.exact_flats:
            if flat.is_floating_point() and not _finite(flat):
                self._nonfinite(next(n for n in names if not bool(torch.isfinite(self.exact[n]).all())))

    def _nonfinite(self, name: str) -> None:
        raise NonFiniteError(nonfinite_message(name, self.step))


def nonfinite_message(name: str, step: int) -> str:
    return f"tensor {name!r} holds NaN or Inf at step {step}; nothing was saved"


def check_state_finite(state, step: int) -> None:
    """NonFiniteError naming the first float tensor of a CPU state that holds NaN/Inf (what a
    worker checks before handing a state to its checkpoint actor; CUDA tensors are left to the
    actor's capture, as a check here would wait for the GPU)."""
    for n, t in state.tensors.items():
        if t.is_floating_point() and not t.is_cuda and not _finite(t):
            raise NonFiniteError(nonfinite_message(n, step))


def _finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``: a finite sum says so in one reduction (the entry-wise check only when
    the sum is not finite, which an overflowing sum of finite entries can also make)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def capture(step: int, state, rules, pool: BufferPool, device: torch.device | None, *, slices=None, tags=None,
            snapshot: bool | None = None, rank: int = 0) -> Capture:
    """A :class:`Capture` of ``state`` at ``step`` under the Checkpointer's ``rules``; ``device``
    is where the encoder runs (None: the CPU); ``rank``: whose part (with ``rules.parts`` > 1)."""
    tensors = state.tensors
    c = Capture()
    c.layout, c.groups, exact_names, c.layout_bytes, c.layout_hash = pool.layout(rules, state)
    c.sums, c.refusal = None, None
    if "owners" in c.layout:
        c.groups = {g: names for g, names in c.groups.items() if c.layout["owners"][g] == rank}
        exact_names = owned_exact(c.layout, exact_names, rank)
        shared = {n: not rank0_only(n, state.buffers) for n, t in tensors.items() if t.is_floating_point()}
        floats = [n for n, sh in shared.items() if sh or rank == 0]
        if floats:
            c.sums = (floats, torch.stack([tensors[n].detach().float().sum() for n in floats]), [shared[n] for n in floats])
    c.step, c.meta = step, state.meta
    c.slices, c.tags = list(slices or []), list(tags or [])
    c.want_exact = bool(tags) if snapshot is None else bool(snapshot)
    c.time = round(time.time(), 3)
    c.pool, c.flats, c.exact, c.exact_flats, c.ready = pool, {}, {}, [], None
    cuda = False
    for g, names in c.groups.items():
        parts = [tensors[n].detach().reshape(-1) for n in names]
        src = parts[0].device
        dst = device if device is not None else torch.device("cpu")
        cuda |= src.type == "cuda" or dst.type == "cuda"  # a copy onto or off a GPU: the pipeline waits for its event
        buf = pool.take(g, sum(p.numel() for p in parts), dst, pinned=src.type == "cuda" and dst.type == "cpu")
        if src == dst and all(p.dtype == torch.float32 for p in parts):
            torch.cat(parts, out=buf)
        else:
            buf.copy_(torch.cat([p.float() for p in parts]), non_blocking=True)
        c.flats[g] = buf
    by_kind: dict[tuple, list[str]] = {}  # exact tensors copied into one flat buffer per dtype and device
    for n in exact_names:
        t = tensors[n]
        by_kind.setdefault((t.dtype, t.device), []).append(n)
    for (dtype, dev), names in by_kind.items():
        flat = torch.cat([tensors[n].detach().reshape(-1) for n in names])  # a copy
        if dev.type == "cuda":
            cuda = True
            flat = torch.empty(flat.shape, dtype=dtype, pin_memory=True).copy_(flat, non_blocking=True)
        c.exact_flats.append((names, flat))
        off = 0
        for n in names:
            t = tensors[n]
            c.exact[n] = flat[off : off + t.numel()].view(t.shape)
            off += t.numel()
    if cuda:
        c.ready = torch.cuda.Event()
        c.ready.record()
    else:
        try:
            c.check_finite()
        except NonFiniteError:
            c.release()
            raise
    return c


__all__ = ["BufferPool", "Capture", "capture", "check_state_finite"]
