"""What crosses the process boundary from a training worker to its checkpoint actor: one byte
buffer and a JSON string. No torch object is pickled; the actor reads every tensor back as a
zero-copy view of the buffer (:func:`unpack_state`), and hands the Checkpointer thin stand-ins
for a module and an optimizer (:class:`ModuleState`, :class:`OptimizerState`)."""
from __future__ import annotations

import json
import warnings
from typing import Callable

import numpy as np
import torch

from ..checkpoint import state as st

_READ_ONLY_WARNING = "The given NumPy array is not writable"

_ALIGN = 64  # every tensor starts on a 64-byte boundary of the buffer


def pack_state(model, optimizer=None, extra: dict | None = None, rng: bool = False,
               alloc: Callable[[int, bool], torch.Tensor] | None = None) -> tuple[torch.Tensor, str]:
    """(buffer, meta JSON) of a training state, ready for ``ray.put``.

    The buffer is one contiguous uint8 array holding a copy of every tensor (model, optimizer
    state, RNG states, tensors in ``extra``), each at a 64-byte-aligned offset; a GPU tensor is
    copied straight into it. ``meta`` lists [group, name, dtype, shape, offset] per tensor
    (group ∈ model, optim, rng, extra) and holds the JSON parts (optimizer hyper-parameters, RNG
    scalars, non-tensor extras). One array is the cheapest thing to put in the object store, and
    the reader gets every tensor back as a zero-copy view (:func:`unpack_state`). ``alloc(n, pinned)``
    supplies the uint8 buffer (to reuse buffers); the buffer is returned as a tensor
    (``.numpy()`` is a view of it).

    With CUDA tensors the buffer is pinned and the copies are asynchronous on the current stream:
    the caller must wait for them (a CUDA event recorded after this call) before reading the
    buffer. Kernels queued later on that stream (the next optimizer step) run after the copies,
    so the snapshot is the state at this call.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {"model": st.model_tensors(model)}
    meta: dict = {}
    if isinstance(model, torch.nn.Module):  # the Checkpointer groups a module's buffers apart
        meta["buffers"] = [n for n, _ in model.named_buffers()]
    if optimizer is not None:
        groups["optim"], meta["optimizer"] = st.optimizer_tensors(optimizer)
    if rng:
        groups["rng"], meta["rng"] = st.rng_tensors()
    if extra:
        groups["extra"], meta["extra"] = st.extra_tensors(extra)
    layout, total = [], 0
    for g, ts in groups.items():
        for k, t in ts.items():
            layout.append([g, k, st.dtype_name(t.dtype), list(t.shape), total])
            total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    cuda = any(t.is_cuda for ts in groups.values() for t in ts.values())
    buf = alloc(total, cuda) if alloc is not None else torch.empty(total, dtype=torch.uint8, pin_memory=cuda)
    for (g, k, _, _, off) in layout:
        t = groups[g][k]
        if t.numel():
            buf[off : off + t.numel() * t.element_size()].view(t.dtype).copy_(t.detach().reshape(-1), non_blocking=cuda)
    meta["tensors"] = layout
    return buf, json.dumps(meta)


def unpack_state(buf: np.ndarray, meta: dict) -> dict[str, dict[str, torch.Tensor]]:
    """{group: {name: tensor}} as views of ``buf`` (which may be a read-only object-store view)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_READ_ONLY_WARNING)
        whole = torch.from_numpy(buf)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for g, k, dtype, shape, off in meta["tensors"]:
        dt = st.dtype_from_name(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dt).element_size()
        out.setdefault(g, {})[k] = whole[off : off + n].view(dt).reshape(shape)
    return out


class ModuleState(torch.nn.Module):
    """A module as far as Checkpointer.save reads one: its state_dict and its buffers' names."""

    def __init__(self, sd: dict[str, torch.Tensor], buffers: list[str]):
        super().__init__()
        self._rb_sd, self._rb_buffers = sd, buffers

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self._rb_sd

    def named_buffers(self, *args, **kwargs):
        return ((n, self._rb_sd.get(n)) for n in self._rb_buffers)


class OptimizerState:
    """What Checkpointer.save needs of an optimizer: its state_dict."""

    def __init__(self, sd: dict):
        self._sd = sd

    def state_dict(self) -> dict:
        return self._sd


def save_arguments(buf: np.ndarray, meta_json: str) -> tuple:
    """(model, optimizer, extra, rng) for ``Checkpointer.save`` from a :func:`pack_state` buffer:
    the model as a :class:`ModuleState` when a module was packed (its buffers keep their own
    lossy group), else a state_dict; ``rng`` is ``(tensors, meta)`` or None."""
    meta = json.loads(meta_json)
    tensors = unpack_state(buf, meta)
    model = tensors["model"] if "buffers" not in meta else ModuleState(tensors["model"], meta["buffers"])
    optimizer = None
    if "optim" in tensors:
        optimizer = OptimizerState(st.optimizer_state_dict(tensors["optim"], meta["optimizer"]))
    extra = st.extra_from(tensors.get("extra", {}), meta["extra"]) if "extra" in meta else None
    rng = (tensors["rng"], meta["rng"]) if "rng" in tensors else None
    return model, optimizer, extra, rng


__all__ = ["ModuleState", "OptimizerState", "pack_state", "save_arguments", "unpack_state"]
