"""LC-checkpoint quantizer (Chen et al. 2020, report §5.2.1), vectorised, on the tensor's own device.

Given a delta δ (a flat float32 vector, split into S segments: one per tensor, or one for all),

1. **Exponent buckets.** Every entry goes to the bucket keyed by its (sign, binary exponent):
   key(δ_i) = the top 9 bits of its IEEE-754 float32 pattern (1 sign bit + 8 exponent bits), so
   bucket (s, e) holds the entries with sign s and |δ_i| ∈ [2^(e−127), 2^(e−126)). Zero and
   denormals (exponent field 0) never form a bucket: they quantize to 0.
2. **Bucket value.** v_b = mean of the bucket's members (default), or (max + min)/2 ("midrange",
   as in the paper).
3. **Priority promotion.** Per segment, keep the L − 1 = 2^bits − 1 buckets of largest |v_b|;
   every entry of any other bucket becomes 0.
4. **Symbols.** Entry i gets symbol 0 (zero) or j ∈ 1..L−1 (the j-th kept bucket of its
   segment, by decreasing |v|), and Q(δ)_i = T[seg(i), sym_i] with T[·, 0] = 0.

Error bound, entry by entry: a kept entry and its bucket value share sign and binade, so
|δ_i − v_b| < 2^(e−127) ≤ |δ_i| (less than the binade's width); an entry of a promoted-away
bucket is off by exactly |δ_i|, below the upper edge of the largest promoted-away bucket. Taking δ against
the previous *reconstruction* (see :mod:`raybranch.codec.delta`) feeds that error into the next
delta instead of letting it accumulate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NonFiniteError, RaybranchError

NUM_KEYS = 512  # 2 signs × 256 exponent-field values of float32
_ZERO_KEYS = (0, 256)  # exponent field 0 (zero, denormals) of each sign
_NONFINITE_KEYS = [255, 511]  # exponent field 255 (Inf, NaN) of each sign
VALUE_MODES = ("mean", "midrange")
GRANULARITIES = ("tensor", "global")


@dataclass(frozen=True)
class LCParams:
    """Parameters of the lossy delta codec.

    bits: symbols per entry take values 0..2^bits − 1; 1 ≤ bits ≤ 8 (default 3, as the report).
    granularity: "tensor" = one bucket table per tensor; "global" = one for the whole model (seed).
    value: "mean" of the bucket's members, or "midrange" = (max + min)/2 as in the paper.
    """

    bits: int = 3
    granularity: str = "tensor"
    value: str = "mean"

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise RaybranchError(f"bits must be an integer in 1..8, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise RaybranchError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.value not in VALUE_MODES:
            raise RaybranchError(f"value must be one of {VALUE_MODES}, got {self.value!r}")

    @property
    def levels(self) -> int:
        return 1 << self.bits

    def to_json(self) -> dict:
        return {"bits": self.bits, "granularity": self.granularity, "value": self.value}

    @classmethod
    def from_json(cls, d: dict) -> "LCParams":
        return cls(bits=int(d["bits"]), granularity=str(d["granularity"]), value=str(d["value"]))


class SegmentLayout:
    """Where each segment (tensor) sits in the flat vector; cached per model layout.

    ``key_offset[i] = seg(i) · NUM_KEYS`` lets one bincount serve every segment at once.
    """

    def __init__(self, sizes: list[int], device: torch.device):
        self.sizes = list(sizes)
        self.num_segments = len(self.sizes)
        self.numel = sum(self.sizes)
        self.device = device
        if self.num_segments > 1:
            seg = torch.repeat_interleave(
                torch.arange(self.num_segments, device=device, dtype=torch.int32),
                torch.tensor(self.sizes, device=device),
            )
            self.key_offset = seg * NUM_KEYS
        else:
            self.key_offset = None


def quantize(x: torch.Tensor, layout: SegmentLayout, params: LCParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a flat float32 delta.

    Returns ``(symbols, tables, q)``: uint8 symbols [N], float32 tables [S, L] with column 0 = 0,
    and the dequantized delta q = Q(x) [N] (what the decoder will rebuild, bit for bit), all on
    ``x.device``. Raises :class:`NonFiniteError` (naming the segment) when x holds NaN or Inf:
    their exponent field is 255, so the bucket counts already tell, at no extra pass.

    Bucket sums are accumulated in float32: a rounding error there only moves a bucket's value
    within its binade; the stored table is what the decoder uses, so encoder and decoder agree
    exactly whatever it is.
    """
    assert x.dtype == torch.float32 and x.dim() == 1
    S, L = layout.num_segments, params.levels
    key = (x.view(torch.int32) >> 23) + 256  # 0..511: (sign, exponent field)
    if layout.key_offset is not None:
        key = key + layout.key_offset
    nkeys = S * NUM_KEYS
    count = torch.bincount(key, minlength=nkeys).view(S, NUM_KEYS)
    bad = (count[:, _NONFINITE_KEYS] > 0).any(dim=1)
    if bool(bad.any()):
        raise NonFiniteError(f"segment {int(torch.nonzero(bad)[0])} holds NaN or Inf")
    if params.value == "mean":
        value = torch.bincount(key, weights=x, minlength=nkeys) / count.view(-1).clamp_min(1)
    else:
        k64 = key.long()
        hi = torch.full((nkeys,), float("-inf"), device=x.device).scatter_reduce(0, k64, x, "amax")
        lo = torch.full((nkeys,), float("inf"), device=x.device).scatter_reduce(0, k64, x, "amin")
        value = torch.where(count.view(-1) > 0, hi * 0.5 + lo * 0.5, torch.zeros_like(hi))
    value = _into_binade(value.float(), S, x.device)
    mag = torch.where(count > 0, value.view(S, NUM_KEYS).abs(), torch.full((), -1.0, device=x.device))
    mag[:, list(_ZERO_KEYS)] = -1.0
    top = mag.topk(L - 1, dim=1)
    chosen = top.indices + (torch.arange(S, device=x.device) * NUM_KEYS)[:, None]  # [S, L-1] global keys
    kept = torch.where(top.values >= 0, value[chosen], torch.zeros((), device=x.device))
    tables = torch.cat([torch.zeros(S, 1, device=x.device), kept], dim=1)
    lut = torch.zeros(nkeys, dtype=torch.uint8, device=x.device)
    lut[chosen.reshape(-1)] = torch.arange(1, L, device=x.device, dtype=torch.uint8).repeat(S)
    keyval = torch.zeros(nkeys, device=x.device, dtype=torch.float32)
    keyval[chosen.reshape(-1)] = kept.reshape(-1)
    return lut.index_select(0, key), tables, keyval.index_select(0, key)  # index_select: ~8x faster than lut[key] on CPU


_BINADES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _into_binade(value: torch.Tensor, S: int, device: torch.device) -> torch.Tensor:
    """Clamp each bucket value into its own binade, keeping its sign.

    A float32 sum can round the mean of a bucket onto the next power of two, or overflow to ±inf
    in the top binade; the clamp keeps Q(δ)_i finite, with δ_i's sign and binade.
    """
    if device not in _BINADES:
        e = torch.arange(256, dtype=torch.float64) - 127.0
        lo = torch.exp2(e).float()
        hi = torch.nextafter(torch.exp2(e + 1).float(), torch.zeros(()))
        _BINADES[device] = (torch.cat([lo, lo]).to(device), torch.cat([hi, hi]).to(device))
    lo, hi = _BINADES[device]
    mag = torch.minimum(torch.maximum(value.view(S, NUM_KEYS).abs(), lo), hi)
    neg = torch.arange(NUM_KEYS, device=device) < 256
    return torch.where(neg, -mag, mag).reshape(-1)


def dequantize(symbols: torch.Tensor, tables: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
    """Q(x)_i = T[seg(i), sym_i] (torch; the decoder applies the same table lookup in numpy, :func:`raybranch.codec.delta.apply_delta`)."""
    L = tables.shape[1]
    idx = symbols.long()
    if layout.key_offset is not None:
        idx = idx + (layout.key_offset // NUM_KEYS).long() * L
    return tables.reshape(-1)[idx]
