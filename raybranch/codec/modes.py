"""The lossy delta codecs by name, and the row kinds they write.

=========  ============================  ======================================  =========
mode       row kind                      table                                   module
=========  ============================  ======================================  =========
uniform    ``uq``: sparse integer q      the steps Δ, one float32 per tensor     uniform
lc         ``lc``: LC bucket symbols     bucket values [S × 2^bits]              lc, delta
=========  ============================  ======================================  =========

Exact states are rows of kind ``recon`` (standalone, :func:`raybranch.codec.streams.encode_exact`)
or ``key`` (coded against the previous exact state, :mod:`raybranch.codec.exact`).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import RaybranchError
from .delta import DeltaEncoder, apply_delta
from .lc import LCParams
from .sparse import sparse_bound
from .uniform import UniformEncoder, UniformParams, apply_uniform

MODES = ("uniform", "lc")
ROW_KIND = {"uniform": "uq", "lc": "lc"}
LOSSY_KINDS = frozenset(ROW_KIND.values())

Params = LCParams | UniformParams


def params_from_json(d: dict) -> Params:
    """Codec parameters as an entry stores them (entries before the mode field are LC)."""
    mode = d.get("mode", "lc")
    if mode == "uniform":
        return UniformParams.from_json(d)
    if mode == "lc":
        return LCParams.from_json(d)
    raise RaybranchError(f"unknown codec mode {mode!r} (this raybranch reads {', '.join(MODES)})")


def params_to_json(p: Params) -> dict:
    return p.to_json() if isinstance(p, UniformParams) else {"mode": "lc", **p.to_json()}


def make_params(mode: str, *, residual: float, bits: int, granularity: str, value: str) -> Params:
    """The parameters of codec ``mode``; every argument is checked, whichever mode uses it."""
    if mode not in MODES:
        raise RaybranchError(f"codec must be one of {MODES}, got {mode!r}")
    lc = LCParams(bits=bits, granularity=granularity, value=value)
    uniform = UniformParams(residual=residual)
    return uniform if mode == "uniform" else lc


def new_encoder(names: list[str], sizes: list[int], params: Params, device: torch.device | str):
    if isinstance(params, UniformParams):
        return UniformEncoder(names, sizes, params, device)
    return DeltaEncoder(names, sizes, params, device)


def seg_offsets(sizes: list[int], params: Params) -> np.ndarray | None:
    """Start offsets of the table segments of a group (None: one segment)."""
    if (isinstance(params, LCParams) and params.granularity != "tensor") or len(sizes) < 2:
        return None
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def apply_rows(acc: np.ndarray, rows: list[tuple[str, bytes, np.ndarray, Params]], sizes: list[int]) -> None:
    """acc ← acc + every decoded delta of ``rows`` (kind, payload, table, params), in order,
    bit-exact with their encoders; runs of uniform rows decode in one pass."""
    if not rows:
        return
    acc += np.float32(0.0)  # the encoder's first dense add onto an exact state turns −0 into +0
    i = 0
    while i < len(rows):
        kind, _, _, params = rows[i]
        if kind == "uq":
            j = i
            while j < len(rows) and rows[j][0] == "uq":
                j += 1
            apply_uniform(acc, [r[1] for r in rows[i:j]], [r[2] for r in rows[i:j]], seg_offsets(sizes, params))
            i = j
        elif kind == "lc":
            apply_delta(acc, rows[i][1], rows[i][2].reshape(-1, params.levels), seg_offsets(sizes, params), first=False)
            i += 1
        else:
            raise ValueError(f"row kind {kind!r} is not a lossy delta")


def stream_bound(kind: str, n: int) -> int:
    """Largest decompressed size of a lossy row's stream over n entries (for recompression)."""
    return sparse_bound(n) if kind == "uq" else (n + 7) // 8 + n
