"""Exact coding against a reference: bit for bit (NaN, ±0, Inf, sign flips included), and small
when the reference is close."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from raybranch.codec.exact import decode_against, encode_against
from raybranch.codec.streams import encode_exact


@settings(max_examples=60, deadline=None)
@given(seed=hs.integers(0, 2**31), n=hs.integers(0, 2000), dtype=hs.sampled_from([np.float16, np.float32, np.float64]),
       spread=hs.sampled_from([0.0, 1e-6, 1e-2, 10.0]))
def test_round_trip_bit_for_bit(seed, n, dtype, spread):
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal(n).astype(dtype)
    a = (ref + spread * rng.standard_normal(n)).astype(dtype)
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0], dtype)
    if n >= 10:
        a[:5] = specials
        ref[5:10] = specials
    back = decode_against(encode_against(a, ref), ref)
    assert back.dtype == a.dtype and np.array_equal(back.view(np.uint8), a.view(np.uint8))


def test_close_reference_codes_small():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(100_000).astype(np.float32)
    a = (ref * (1 + 1e-5 * rng.standard_normal(ref.size))).astype(np.float32)
    assert len(encode_against(a, ref)) < len(encode_exact(a)) / 2


def test_mismatched_reference_is_refused():
    with pytest.raises(ValueError):
        encode_against(np.zeros(3, np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError):
        decode_against(encode_against(np.zeros(3, np.float32), np.zeros(3, np.float32)), np.zeros(4, np.float32))
