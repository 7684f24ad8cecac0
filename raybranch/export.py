"""Write a restored state_dict for use outside raybranch: safetensors (no pickle) or torch .pt."""
from __future__ import annotations

import json
import os
import struct

import torch

from .checkpoint.state import dtype_name, to_numpy

_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


def save_safetensors(state: dict[str, torch.Tensor], path: str) -> None:
    """The safetensors layout: u64 header length, JSON header (dtype, shape, data_offsets), raw bytes."""
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
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def save_state_dict(state: dict[str, torch.Tensor], path: str) -> None:
    if path.endswith(".safetensors"):
        save_safetensors(state, path)
    else:
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(dict(state), tmp)
        os.replace(tmp, path)
