"""Byte streams: LC symbol streams and lossless (byte-grouped + zstd) tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as hs

from raybranch.checkpoint import state as st
from raybranch.codec.streams import (
    COMPACT_LEVEL,
    FAST_LEVEL,
    decode_exact,
    decode_positions,
    encode_exact,
    encode_symbols,
    pack_symbols,
    recompress,
)

torch.set_num_threads(1)


# -- symbol streams --------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(
    seed=hs.integers(0, 2**32 - 1),
    n=hs.one_of(hs.integers(0, 17), hs.integers(18, 5000)),
    levels=hs.sampled_from([2, 4, 8, 16, 256]),
    p_zero=hs.sampled_from([0.0, 0.5, 0.95, 1.0]),
)
def test_symbol_stream_round_trip(seed, n, levels, p_zero):
    rng = np.random.default_rng(seed)
    sym = rng.integers(1, levels, n).astype(np.uint8)
    sym[rng.random(n) < p_zero] = 0
    payload = encode_symbols(torch.from_numpy(sym))
    idx, vals = decode_positions(payload, n)
    assert np.array_equal(idx, np.flatnonzero(sym))
    assert np.array_equal(vals, sym[sym != 0].astype(np.intp))
    # the stronger compaction level decodes to the same symbols
    idx2, vals2 = decode_positions(recompress(payload, (n + 7) // 8 + n, COMPACT_LEVEL), n)
    assert np.array_equal(idx2, idx) and np.array_equal(vals2, vals)


def test_pack_symbols_layout():
    sym = torch.tensor([0, 3, 0, 0, 0, 0, 0, 1, 2], dtype=torch.uint8)
    mask, values = pack_symbols(sym)
    assert mask.tolist() == [0b01000001, 0b10000000]
    assert values.tolist() == [2, 0, 1]


def _payload(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    sym = rng.integers(1, 8, n).astype(np.uint8)
    sym[rng.random(n) < 0.8] = 0
    return sym, encode_symbols(torch.from_numpy(sym))


@pytest.mark.parametrize("cut", [1, 5, 0.5])
def test_truncated_symbol_stream_raises(cut):
    sym, payload = _payload()
    k = int(len(payload) * cut) if isinstance(cut, float) else len(payload) - cut
    with pytest.raises((ValueError, zstandard.ZstdError)):
        decode_positions(payload[:k], sym.size)


def test_symbol_stream_of_another_length_raises():
    sym, payload = _payload()
    for n in (sym.size - 8, sym.size + 8, sym.size * 2):
        with pytest.raises((ValueError, zstandard.ZstdError)):
            decode_positions(payload, n)


def test_symbol_stream_bomb_is_bounded():
    # a frame that inflates far past ⌈n/8⌉ + n bytes must not be decoded in full
    bomb = zstandard.ZstdCompressor(level=FAST_LEVEL).compress(b"\x00" * (1 << 24))
    with pytest.raises((ValueError, zstandard.ZstdError)):
        decode_positions(bomb, 100)


def test_garbage_symbol_stream_raises():
    with pytest.raises((ValueError, zstandard.ZstdError)):
        decode_positions(b"not a zstd frame at all", 100)


# -- lossless tensors ------------------------------------------------------------------------
DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
] + [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]


def _random_tensor(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if dtype.is_floating_point:
        t = (torch.randn(shape, generator=g, dtype=torch.float64) * 10 ** torch.randint(-6, 4, shape, generator=g)).to(dtype)
        if t.numel() >= 3:
            flat = t.view(-1)
            flat[0], flat[1] = -0.0, 0.0
        return t
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**62)), min(info.max, 2**62), shape, generator=g, dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (3, 5, 2)])
def test_exact_round_trip_bitwise(dtype, shape):
    t = _random_tensor(dtype, shape, seed=len(shape) * 31 + DTYPES.index(dtype))
    name = st.dtype_name(t.dtype)
    for level in (FAST_LEVEL, COMPACT_LEVEL):
        payload = encode_exact(st.to_numpy(t), level)
        arr = decode_exact(payload, st.numpy_storage_dtype(name), tuple(t.shape))
        back = st.from_numpy(arr, name, tuple(t.shape))
        assert back.dtype == t.dtype and tuple(back.shape) == tuple(t.shape)
        if t.dtype.itemsize > 1 or t.dtype.is_floating_point:
            view = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.dtype.itemsize]
            assert torch.equal(back.view(view), t.view(view))  # bitwise: −0, NaN payloads included
        else:
            assert torch.equal(back, t)


def test_exact_is_byte_grouped():
    # the stream stores every element's byte k together: check by decoding the raw zstd frame
    a = np.arange(6, dtype=np.uint16) * 257 + 1  # bytes (lo, hi) = (k+1, k)
    raw = zstandard.ZstdDecompressor().decompress(encode_exact(a))
    assert raw == a.view(np.uint8).reshape(-1, 2).T.tobytes()


def test_exact_wrong_size_raises():
    payload = encode_exact(np.arange(10, dtype=np.float32))
    with pytest.raises((ValueError, zstandard.ZstdError)):
        decode_exact(payload, np.float32, (11,))
    with pytest.raises((ValueError, zstandard.ZstdError)):
        decode_exact(payload, np.float32, (9,))
    with pytest.raises((ValueError, zstandard.ZstdError)):
        decode_exact(payload[:-3], np.float32, (10,))
