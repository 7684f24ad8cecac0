"""Large exact arrays are stored in chunks (several zstd frames, decoded on threads): the same
bytes back, for every dtype width, and a damaged chunk table is refused."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from raybranch.codec import streams
from raybranch.codec.exact import decode_against, encode_against
from raybranch.codec.streams import decode_exact, encode_exact


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(streams, "CHUNK_ELEMENTS", 64)


@settings(max_examples=40, deadline=None)
@given(n=hs.integers(0, 700), dtype=hs.sampled_from([np.uint8, np.float16, np.float32, np.int64]), seed=hs.integers(0, 2**31))
def test_chunked_round_trip(n, dtype, seed):
    old = streams.CHUNK_ELEMENTS
    streams.CHUNK_ELEMENTS = 64
    try:
        a = (np.random.default_rng(seed).standard_normal(n) * 100).astype(dtype)
        p = encode_exact(a)
        assert p[:4] == (b"RBXC" if n > 64 else p[:4])
        back = decode_exact(p, dtype, (n,))
        assert back.flags.writeable and np.array_equal(back.view(np.uint8), a.view(np.uint8))
        if a.dtype.kind == "f":
            ref = (a * 1.001).astype(dtype)
            assert np.array_equal(decode_against(encode_against(a, ref), ref).view(np.uint8), a.view(np.uint8))
    finally:
        streams.CHUNK_ELEMENTS = old


def test_single_frame_payloads_still_decode(small_chunks):
    a = np.arange(50, dtype=np.float32)
    assert encode_exact(a)[:4] != b"RBXC" and np.array_equal(decode_exact(encode_exact(a), np.float32, (50,)), a)


def test_damaged_chunk_table_is_refused(small_chunks):
    a = np.arange(300, dtype=np.float32)
    p = encode_exact(a)
    with pytest.raises(ValueError, match="chunk"):
        decode_exact(p[:-3], np.float32, (300,))
    with pytest.raises(ValueError, match="chunks"):
        decode_exact(p, np.float32, (1000,))
