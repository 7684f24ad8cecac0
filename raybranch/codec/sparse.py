"""Byte stream of a sparse integer vector q ∈ ℤ^N (the symbols of :mod:`raybranch.codec.uniform`).

Layout, one zstd frame::

    header   3 × uint32: nonzeros k, bytes of the gap stream, bytes of the magnitude stream
    gaps     k escape-coded values: zeros before each nonzero entry (run lengths)
    mags     k escape-coded values: |q_i| − 1 of each nonzero entry
    signs    packbits(q_i < 0), ⌈k/8⌉ bytes

Escape code: a value v is (v div 255) bytes 255, then the byte v mod 255, so small values are one
byte and any value fits. Run lengths instead of a bit mask: a mask of a sparse vector is a skewed
binary source, which zstd's Huffman stage codes at ≥ 1 bit per byte of mask whatever its entropy;
run lengths spread over many byte values, where Huffman is close to the order-0 entropy. Measured
on LeNet-5/digits deltas: 4 % smaller than mask + values, within 2 % of the order-0 entropy of
the symbols (docs/DECISIONS.md).
"""
from __future__ import annotations

import numpy as np

from .streams import zstd_compress, zstd_decompress

_HEADER = np.dtype("<u4")


def escape_encode(v: np.ndarray) -> np.ndarray:
    """Non-negative integers → escape-coded bytes (vectorised)."""
    v = np.asarray(v, np.int64)
    if not v.size or int(v.max()) < 255:  # the common case: one byte each
        return v.astype(np.uint8)
    reps = v // 255
    out = np.full(v.size + int(reps.sum()), 255, np.uint8)
    out[np.cumsum(reps + 1) - 1] = (v % 255).astype(np.uint8)
    return out


def escape_decode(b: np.ndarray) -> np.ndarray:
    """Inverse of :func:`escape_encode`. Escapes are rare (runs of ≥ 255 zeros, magnitudes
    ≥ 256): drop the 255 bytes and add 255 to the value each one precedes."""
    esc = np.flatnonzero(b == 255)
    out = b.astype(np.int32)
    if not esc.size:
        return out
    if esc[-1] == b.size - 1:
        raise ValueError("escape-coded stream ends inside a value")
    out = np.delete(out, esc)
    np.add.at(out, esc - np.arange(esc.size), 255)  # the value after escape j sits at esc[j] − j once they are gone
    return out


SPARSE_LEVEL = 1  # zstd level of these frames: smaller than level 3 on them and as fast (levels 2–9 gain < 1 %, 19 +6 % at 3× the encode time)


def encode_sparse(q: np.ndarray, level: int = SPARSE_LEVEL) -> bytes:
    """A vector of integers (mostly 0) → one zstd frame."""
    idx = np.flatnonzero(q != 0)  # on a bool mask: ~4× faster than on the integers
    return encode_nonzeros(idx, q[idx], level)


def encode_nonzeros(idx: np.ndarray, vals: np.ndarray, level: int = SPARSE_LEVEL) -> bytes:
    """The frame of :func:`encode_sparse` from the nonzero entries' ascending indices and values
    (what a GPU hands over instead of the whole vector)."""
    gaps = np.empty(idx.size, np.int64)
    if idx.size:
        gaps[0] = idx[0]
        np.subtract(idx[1:], idx[:-1], out=gaps[1:])
        gaps[1:] -= 1
    g, m = escape_encode(gaps), escape_encode(np.abs(vals) - 1)
    head = np.array([idx.size, g.size, m.size], _HEADER).view(np.uint8)
    return zstd_compress(np.concatenate([head, g, m, np.packbits(vals < 0)]).data, level)


MAX_MAGNITUDE = 1 << 16  # |q_i| ≤ this (the quantizer clips; error feedback carries the rest)


def sparse_bound(n: int) -> int:
    """Largest decompressed size of the stream of an n-entry vector (gaps sum to < n)."""
    return 12 + (2 * n + n // 255 + 1) + n * (MAX_MAGNITUDE // 255 + 1) + (n + 7) // 8


def decode_sparse(payload: bytes, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the nonzero entries, their integer values) of an n-entry vector."""
    idx, vals, _ = decode_sparse_many([payload], n)
    return idx, vals


def decode_sparse_many(payloads: list[bytes], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Many streams of n-entry vectors at once: (indices, values, nonzeros per stream), the
    streams' entries concatenated in order."""
    p = decode_parts(payloads, n)
    return p.idx, np.where(p.neg, -1 - p.mag, p.mag + 1), p.counts


class SparseParts:
    """Decoded streams: ``idx`` (entry of each nonzero), ``mag`` (|q| − 1, int32), ``neg``
    (q < 0), ``counts`` (nonzeros per stream), ``key`` (idx + the stream's offset ``base``:
    ascending over all streams together, so one search finds any stream's index ranges)."""

    __slots__ = ("idx", "mag", "neg", "counts", "key", "base")

    def __init__(self, idx, mag, neg, counts, key, base):
        self.idx, self.mag, self.neg, self.counts, self.key, self.base = idx, mag, neg, counts, key, base


def decode_parts(payloads: list[bytes], n: int) -> SparseParts:
    """One decompression per stream; everything else is a handful of vectorised passes over all
    of the streams together."""
    gaps, mags, signs, counts = [], [], [], []
    for payload in payloads:
        raw = np.frombuffer(zstd_decompress(payload, sparse_bound(n)), np.uint8)
        if raw.size < 12:
            raise ValueError("sparse stream shorter than its header")
        k, lg, lm = (int(x) for x in raw[:12].view(_HEADER))
        if k > n or 12 + lg + lm + (k + 7) // 8 != raw.size:
            raise ValueError(f"sparse stream of {raw.size} bytes does not match its header ({k} nonzeros)")
        g, m = raw[12 : 12 + lg], raw[12 + lg : 12 + lg + lm]
        if (lg and g[-1] == 255) or (lm and m[-1] == 255) or (k and not (lg and lm)):
            raise ValueError("escape-coded stream ends inside a value")
        gaps.append(g)
        mags.append(m)
        signs.append(np.unpackbits(raw[12 + lg + lm :], count=k))
        counts.append(k)
    counts = np.array(counts, np.int64)
    gap = escape_decode(np.concatenate(gaps)) if gaps else np.zeros(0, np.int32)
    mag = escape_decode(np.concatenate(mags)) if mags else np.zeros(0, np.int32)
    if gap.size != counts.sum() or mag.size != counts.sum():
        raise ValueError(f"sparse streams hold {gap.size} gaps and {mag.size} magnitudes for {counts.sum()} nonzeros")
    key = np.cumsum(gap + 1, dtype=np.int64)
    key -= 1
    starts = np.cumsum(counts) - counts
    base = np.where(starts > 0, key[np.maximum(starts - 1, 0)] + 1, 0) if key.size else np.zeros(counts.size, np.int64)
    idx = key - np.repeat(base, counts)
    ends = starts + counts - 1
    if idx.size and int(idx[ends[counts > 0]].max(initial=-1)) >= n:
        raise ValueError(f"sparse stream addresses an entry beyond {n}")
    neg = np.concatenate(signs).view(bool) if signs else np.zeros(0, bool)
    return SparseParts(idx, mag, neg, counts, key, base)
