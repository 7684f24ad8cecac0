"""Flatten what a checkpoint holds (model, optimizer, RNG states, extra) into named tensors + JSON.

Every tensor gets a flat name: model tensors keep their ``state_dict`` key, the rest are prefixed
``optim/``, ``rng/`` and ``extra/``. Everything that is not a tensor goes to a JSON ``meta`` dict
(optimizer hyper-parameters, scalar RNG fields, JSON-able extras). Nothing is pickled.
"""
from __future__ import annotations

import random
import re
from typing import Any

import numpy as np
import torch

from ..errors import RaybranchError

_NUMPY_VIEW = {torch.bfloat16: torch.int16}  # dtypes numpy lacks travel as same-width ints
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _NUMPY_VIEW[getattr(torch, _name)] = torch.uint8


_STAT_BUFFER = re.compile(r"(^|\.)running_(mean|var)$")


def is_stat_buffer(name: str) -> bool:
    """A BatchNorm-style running statistic (how a plain state_dict's float buffers are known)."""
    return _STAT_BUFFER.search(name) is not None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise RaybranchError(f"unknown tensor dtype {name!r} in checkpoint")
    return dt


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    view = _NUMPY_VIEW.get(t.dtype)
    return (t.view(view) if view is not None else t).numpy()


def from_numpy(a: np.ndarray, dtype: str, shape) -> torch.Tensor:
    dt = dtype_from_name(dtype)
    t = torch.from_numpy(np.array(a, copy=True)).reshape(tuple(shape))
    return t.view(dt) if dt in _NUMPY_VIEW else t.to(dt)


def numpy_storage_dtype(dtype: str) -> np.dtype:
    dt = dtype_from_name(dtype)
    return torch.empty(0, dtype=_NUMPY_VIEW.get(dt, dt)).numpy().dtype


def model_tensors(model: torch.nn.Module | dict) -> dict[str, torch.Tensor]:
    sd = model.state_dict() if isinstance(model, torch.nn.Module) else model
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise RaybranchError(f"model state entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v.detach()
    return out


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in sd["state"].items():
        for key, val in entry.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim/state/{pid}/{key}"] = val.detach()
            else:
                scalars.setdefault(str(pid), {})[key] = _jsonable(val, f"optimizer state {pid}/{key}")
    meta = {"param_groups": _jsonable(sd["param_groups"], "optimizer param_groups"), "scalars": scalars}
    return tensors, meta


def optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, _, pid, key = name.split("/", 3)
        state.setdefault(int(pid), {})[key] = t
    for pid, entry in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_tensors() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["rng/python"] = torch.from_numpy(np.fromiter(internal, np.int64, len(internal)))
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, gauss_next]}
    return tensors, meta


def set_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Put the generators back where a restored checkpoint had them."""
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, gauss_next = meta["python"]
    random.setstate((version, tuple(int(x) for x in tensors["rng/python"].tolist()), gauss_next))


def extra_tensors(extra: dict | None) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors anywhere in ``extra`` (nested dicts) become ``extra/<path>``; the rest stays JSON."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj, path):
        if isinstance(obj, torch.Tensor):
            tensors["extra/" + path] = obj.detach()
            return {"__tensor__": path}
        if isinstance(obj, dict):
            for k in obj:
                if not isinstance(k, str) or "/" in k:
                    raise RaybranchError(f"extra key {k!r} at {path or '<root>'} must be a string without '/'")
            return {k: walk(v, f"{path}/{k}" if path else k) for k, v in obj.items()}
        return _jsonable(obj, f"extra[{path}]")

    meta = walk(extra or {}, "")
    return tensors, meta


def extra_from(tensors: dict[str, torch.Tensor], meta: Any) -> Any:
    if isinstance(meta, dict):
        if set(meta) == {"__tensor__"}:
            return tensors["extra/" + meta["__tensor__"]]
        return {k: extra_from(tensors, v) for k, v in meta.items()}
    return meta


def _jsonable(obj: Any, what: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [_jsonable(x, what) for x in obj]
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, what) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise RaybranchError(f"{what} holds a {type(obj).__name__}, which raybranch stores only as JSON or tensors")
