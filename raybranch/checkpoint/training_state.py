"""TrainingState: what one save holds, as one value, built where the training runs.

    state = collect(model, optimizer, extra)         # in the training process
    ckpt.save_state(step, state)                      # Checkpointer.save = collect + save_state

Its tensors have flat names by group: ``model`` (the ``state_dict`` keys), ``optim/state/<id>/<key>``,
``rng/<generator>`` and ``extra/<path>``; ``buffers`` names the model's float buffers (BatchNorm
statistics, coded apart from the weights); ``meta`` is JSON only (optimizer hyper-parameters,
scalar RNG fields, extras that are not tensors). The RNG states are those of the process that
called :func:`collect`, so a checkpoint actor saving a worker's state never touches its own
generators. :func:`to_buffer` / :func:`from_buffer` carry a state across a process boundary as
one byte buffer and a JSON string (nothing pickled).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..errors import RaybranchError
from . import state as st

GROUPS = ("model", "optim", "rng", "extra")
_ALIGN = 64  # every tensor starts on a 64-byte boundary of a buffer
_READ_ONLY_WARNING = "The given NumPy array is not writable"


@dataclass
class TrainingState:
    tensors: dict[str, torch.Tensor]
    buffers: frozenset[str] = frozenset()
    meta: dict = field(default_factory=dict)

    @property
    def groups(self) -> dict[str, list[str]]:
        """{group: tensor names} over :data:`GROUPS`."""
        out: dict[str, list[str]] = {}
        for n in self.tensors:
            g = n.split("/", 1)[0]
            out.setdefault(g if g in GROUPS[1:] else "model", []).append(n)
        return out

    def model_state(self) -> dict[str, torch.Tensor]:
        return {n: self.tensors[n] for n in self.groups.get("model", [])}


def collect(model, optimizer=None, extra: dict | None = None, *, rng: bool | None = None) -> TrainingState:
    """The state of a save: ``model`` (module or state_dict), ``optimizer`` state, ``extra``
    (nested dicts of tensors and JSON), and the RNG states of this process when ``rng`` (default:
    when an optimizer is given, i.e. a resumable checkpoint). Tensors are not copied."""
    tensors = st.model_tensors(model)
    for k in tensors:
        if k.split("/", 1)[0] in GROUPS[1:]:
            raise RaybranchError(f"model state key {k!r} clashes with raybranch's reserved prefixes")
    buffers = frozenset(n for n, _ in model.named_buffers()) if isinstance(model, torch.nn.Module) else frozenset(
        n for n in tensors if st.is_stat_buffer(n))
    meta: dict = {}
    if optimizer is not None:
        ot, meta["optimizer"] = st.optimizer_tensors(optimizer)
        tensors.update(ot)
    if rng if rng is not None else optimizer is not None:
        rt, meta["rng"] = st.rng_tensors()
        tensors.update(rt)
    if extra:
        et, meta["extra"] = st.extra_tensors(extra)
        tensors.update(et)
    return TrainingState(tensors, buffers, meta)


def to_buffer(state: TrainingState, alloc: Callable[[int, bool], torch.Tensor] | None = None) -> tuple[torch.Tensor, str]:
    """(uint8 buffer, JSON) holding a copy of every tensor of ``state``, each 64-byte aligned.

    ``alloc(n, pinned)`` supplies the buffer (to reuse one). With CUDA tensors the buffer is
    pinned and the copies are asynchronous on the current stream: wait for a CUDA event recorded
    after this call before reading it (kernels queued later, the next optimizer step, run after
    the copies, so the buffer holds the state at this call)."""
    layout, total = [], 0
    for n, t in state.tensors.items():
        layout.append([n, st.dtype_name(t.dtype), list(t.shape), total])
        total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    cuda = any(t.is_cuda for t in state.tensors.values())
    buf = alloc(total, cuda) if alloc is not None else torch.empty(total, dtype=torch.uint8, pin_memory=cuda)
    for n, _, _, off in layout:
        t = state.tensors[n]
        if t.numel():
            buf[off : off + t.numel() * t.element_size()].view(t.dtype).copy_(t.detach().reshape(-1), non_blocking=cuda)
    doc = {"tensors": layout, "buffers": sorted(state.buffers), "meta": state.meta}
    return buf, json.dumps(doc)


def from_buffer(buf: np.ndarray, doc_json: str) -> TrainingState:
    """The state of a :func:`to_buffer` buffer, every tensor a view of ``buf`` (which may be a
    read-only object-store view: the Checkpointer copies what it keeps)."""
    doc = json.loads(doc_json)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_READ_ONLY_WARNING)
        whole = torch.from_numpy(buf)
    tensors = {}
    for n, dtype, shape, off in doc["tensors"]:
        dt = st.dtype_from_name(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dt).element_size()
        if off < 0 or off + size > whole.numel():
            raise RaybranchError(f"tensor {n!r} lies outside its {whole.numel()}-byte buffer")
        tensors[n] = whole[off : off + size].view(dt).reshape(shape)
    return TrainingState(tensors, frozenset(doc["buffers"]), doc["meta"])


__all__ = ["GROUPS", "TrainingState", "collect", "from_buffer", "to_buffer"]
