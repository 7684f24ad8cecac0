"""Delta coding with error feedback (report §5.2.1; docs/DECISIONS.md).

For checkpoint t of a group of lossy tensors flattened to u_t ∈ ℝ^N (float32):

    δ_t = u_t − ũ_{t−1}          (against the previous *reconstruction*, not u_{t−1})
    ũ_t = ũ_{t−1} + Q(δ_t)       (Q: :func:`raybranch.codec.lc.quantize`)

so the quantization error e_t = δ_t − Q(δ_t) is carried into δ_{t+1} instead of piling up:
u_t − ũ_t = e_t, whatever t is. The decoder rebuilds ũ_t bit for bit by the same float32 adds in
the same order (entries with Q = 0 are skipped: x + 0 = x for every x but −0, and −0 cannot
survive the first applied delta, see :func:`apply_delta`).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import NonFiniteError
from .lc import LCParams, SegmentLayout, quantize
from .streams import FAST_LEVEL, decode_positions, encode_symbols


class DeltaEncoder:
    """Holds ũ for one group of lossy tensors, on the tensors' device.

    ``sizes`` are the group's tensor sizes in order, ``names`` name them in errors. With
    granularity "tensor" every tensor has its own bucket table; with "global" the group has one.
    """

    def __init__(self, names: list[str], sizes: list[int], params: LCParams, device: torch.device | str = "cpu"):
        self.names = list(names)
        self.sizes = list(sizes)
        self.params = params
        self.device = torch.device(device)
        seg_sizes = self.sizes if params.granularity == "tensor" else [sum(self.sizes)]
        self.layout = SegmentLayout(seg_sizes, self.device)
        self.recon: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return self.layout.numel

    def reset(self, flat: torch.Tensor) -> None:
        """Start (or restart) the chain at a stored state: ũ = ``flat``."""
        self.recon = flat.detach().to(self.device, torch.float32, copy=True)

    def encode(self, flat: torch.Tensor, level: int = FAST_LEVEL) -> tuple[bytes, np.ndarray, torch.Tensor]:
        """Encode u_t → (zstd symbol stream, bucket tables [S, L], Q(δ_t)).

        ũ does not move until :meth:`advance` (called once the checkpoint is committed), so a
        failed write leaves the encoder where the store is.
        """
        assert self.recon is not None, "reset() first"
        delta = flat.detach().to(self.device, torch.float32) - self.recon
        try:
            symbols, tables, q = quantize(delta, self.layout, self.params)
        except NonFiniteError:
            name = self._first_nonfinite(delta)
            if bool(torch.isfinite(flat).all()):
                raise NonFiniteError(f"the delta of tensor {name!r} overflows float32; nothing was saved") from None
            raise NonFiniteError(f"tensor {name!r} holds NaN or Inf; nothing was saved") from None
        payload = encode_symbols(symbols, level)
        return payload, tables.cpu().numpy(), q

    def advance(self, q: torch.Tensor) -> None:
        """ũ_t = ũ_{t−1} + Q(δ_t)."""
        self.recon += q

    def _first_nonfinite(self, flat: torch.Tensor) -> str:
        bad = torch.nonzero(~torch.isfinite(flat.detach().float()))[0].item()
        offsets = np.cumsum(self.sizes)
        return self.names[int(np.searchsorted(offsets, bad, side="right"))]


def apply_delta(acc: np.ndarray, payload: bytes, tables: np.ndarray, seg_offsets: np.ndarray | None, first: bool) -> None:
    """acc ← acc + Q(δ) in place (float32, sequential, bit-exact with the encoder).

    ``seg_offsets`` are the start offsets of the bucket segments (None for one segment);
    ``first`` marks the first delta applied onto an exactly stored state (it turns −0 into +0,
    as the encoder's dense add does).
    """
    if first:
        acc += np.float32(0.0)
    idx, sym = decode_positions(payload, acc.size)
    if seg_offsets is None:
        vals = tables[0, sym]
    else:
        seg = np.searchsorted(seg_offsets, idx, side="right") - 1
        vals = tables[seg, sym]
    acc[idx] += vals
