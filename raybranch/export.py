"""Model files: a state_dict as safetensors (no pickle) or torch .pt, written and read back.

``safetensors_bytes``/``read_safetensors`` are the format itself — an 8-byte little-endian
header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw tensor bytes —
written here with numpy so that the format needs no extra package; ``load_state_dict`` reads
either kind of file (``.pt`` through ``torch.load(weights_only=True)``)."""
from __future__ import annotations

import json
import os
import struct

import torch

import numpy as np

from .checkpoint.state import dtype_name, from_numpy, numpy_storage_dtype, to_numpy

_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
_FROM_CODE = {code: name for name, code in _SAFETENSORS_DTYPES.items()}


def safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """The safetensors bytes of ``state`` (see the module docstring)."""
    header, blobs, off = {}, [], 0
    for name, t in state.items():
        code = _SAFETENSORS_DTYPES.get(dtype_name(t.dtype))
        if code is None:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold")
        data = to_numpy(t).tobytes()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((-len(hb)) % 8)
    return b"".join([struct.pack("<Q", len(hb)), hb, *blobs])


def read_safetensors(data: bytes, what: str = "safetensors data") -> dict[str, torch.Tensor]:
    """The tensors of safetensors ``data``; a ValueError naming ``what`` when it is not that format."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        body = memoryview(data)[8 + n :]
        out = {}
        for name, h in header.items():
            if name == "__metadata__":
                continue
            dtype = _FROM_CODE[h["dtype"]]
            a, b = h["data_offsets"]
            if not 0 <= a <= b <= len(body):
                raise ValueError
            arr = np.frombuffer(body[a:b], dtype=numpy_storage_dtype(dtype))
            out[name] = from_numpy(arr, dtype, h["shape"])
        return out
    except (ValueError, KeyError, TypeError, struct.error):
        raise ValueError(f"{what} is not a valid safetensors file") from None


def save_safetensors(state: dict[str, torch.Tensor], path: str) -> None:
    """Write ``state`` to ``path`` as safetensors (atomically: a temporary, then a rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(safetensors_bytes(state))
    os.replace(tmp, path)


def save_state_dict(state: dict[str, torch.Tensor], path: str) -> None:
    if path.endswith(".safetensors"):
        save_safetensors(state, path)
    else:
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(dict(state), tmp)
        os.replace(tmp, path)


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state_dict from a ``.safetensors`` or ``.pt`` file (``torch.load(weights_only=True)``);
    a ValueError naming the file when it is neither or unreadable."""
    if path.endswith(".safetensors"):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
        return read_safetensors(data, path)
    if path.endswith(".pt"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is one line
            raise ValueError(f"cannot read {path} as a torch state_dict: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(f"{path} does not hold a state_dict of tensors")
        return dict(state)
    raise ValueError(f"a model file must end in .safetensors or .pt, got {path!r}")
