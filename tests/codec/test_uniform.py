"""The uniform codec: its sparse stream, the residual bound its rate control keeps, bit-exact
decoding (one stream or many at once), part-wise encoding, NaN/Inf refusal."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from raybranch.codec.modes import apply_rows, seg_offsets
from raybranch.codec.sparse import MAX_MAGNITUDE, decode_sparse, decode_sparse_many, encode_sparse, escape_decode, escape_encode
from raybranch.codec.uniform import UniformEncoder, UniformParams
from raybranch.errors import NonFiniteError, RaybranchError

torch.set_num_threads(1)
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@hs.composite
def sparse_vectors(draw):
    n = draw(hs.integers(1, 3000))
    rng = np.random.default_rng(draw(hs.integers(0, 2**31)))
    q = np.zeros(n, np.int64)
    k = draw(hs.integers(0, n))
    where = rng.choice(n, size=k, replace=False)
    big = draw(hs.booleans())
    q[where] = rng.integers(1, MAX_MAGNITUDE + 1 if big else 4, k) * rng.choice([-1, 1], k)
    if draw(hs.booleans()):  # long zero runs (gaps ≥ 255 need escapes)
        q[: n // 2] = 0
    return q


@SETTINGS
@given(sparse_vectors())
def test_sparse_stream_round_trip(q):
    idx, vals = decode_sparse(encode_sparse(q), q.size)
    back = np.zeros_like(q)
    back[idx] = vals
    assert np.array_equal(back, q) and np.all(np.diff(idx) > 0)


@SETTINGS
@given(hs.lists(hs.integers(0, 10**6), max_size=200))
def test_escape_code_round_trip(values):
    v = np.array(values, np.int64)
    assert np.array_equal(escape_decode(escape_encode(v)), v)


@SETTINGS
@given(hs.lists(sparse_vectors(), min_size=1, max_size=4))
def test_many_streams_decode_as_one_after_another(qs):
    n = min(q.size for q in qs)
    qs = [q[:n] for q in qs]
    idx, vals, counts = decode_sparse_many([encode_sparse(q) for q in qs], n)
    assert list(counts) == [int(np.count_nonzero(q)) for q in qs]
    at = 0
    for q, k in zip(qs, counts):
        i, v = decode_sparse(encode_sparse(q), n)
        assert np.array_equal(idx[at : at + k], i) and np.array_equal(vals[at : at + k], v)
        at += k


def test_damaged_stream_is_refused():
    p = encode_sparse(np.array([0, 3, 0, -2]))
    with pytest.raises(ValueError):
        decode_sparse(p, 2)  # addresses entries beyond the vector


def trajectory(seed: int, sizes: list[int], steps: int, scales: list[float]) -> list[torch.Tensor]:
    """A momentum-like random walk per tensor, tensors on very different scales."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(sum(sizes), generator=g)
    v = torch.zeros_like(u)
    per = torch.repeat_interleave(torch.tensor(scales), torch.tensor(sizes))
    out = [u.clone()]
    for _ in range(steps):
        v = 0.9 * v + per * torch.randn(u.numel(), generator=g) * torch.rand(u.numel(), generator=g).pow(3)
        u = u + v
        out.append(u.clone())
    return out


@SETTINGS
@given(seed=hs.integers(0, 2**31), sizes=hs.lists(hs.integers(0, 300), min_size=1, max_size=4).filter(lambda s: sum(s) > 0),
       residual=hs.sampled_from([0.1, 0.5, 0.9, 2.0]), steps=hs.integers(1, 12))
def test_every_step_within_the_residual_bound_and_decoded_bit_for_bit(seed, sizes, residual, steps):
    scales = [10.0 ** (-3 * i) for i in range(len(sizes))]  # 1, 1e-3, 1e-6, …: no tensor may starve
    us = trajectory(seed, sizes, steps, scales)
    params = UniformParams(residual=residual)
    enc = UniformEncoder([f"t{i}" for i in range(len(sizes))], sizes, params)
    enc.reset(us[0])
    acc = us[0].numpy().copy()
    rows = []
    for t in range(1, len(us)):
        payload, steps_t, qv = enc.encode(us[t])
        enc.advance(qv)
        rows.append(("uq", payload, steps_t, params))
        step = float((us[t] - us[t - 1]).norm())
        assert float((us[t] - enc.recon).norm()) <= residual * step * (1 + 1e-5) + 1e-30
    apply_rows(acc, rows, sizes)
    assert np.array_equal(acc.view(np.int32), enc.recon.numpy().view(np.int32))


def test_part_wise_encoding_equals_what_the_decoder_rebuilds():
    """Two ranks each encode their part of one state; each part decodes on its own."""
    sizes = [500, 40, 300]
    us = trajectory(3, sizes, 10, [1.0, 0.01, 0.1])
    cut = 540
    parts = [(slice(0, cut), [500, 40]), (slice(cut, None), [300])]
    params = UniformParams()
    for sl, psizes in parts:
        enc = UniformEncoder([str(i) for i in range(len(psizes))], psizes, params)
        enc.reset(us[0][sl])
        acc = us[0][sl].numpy().copy()
        rows = []
        for u in us[1:]:
            payload, st, qv = enc.encode(u[sl])
            enc.advance(qv)
            rows.append(("uq", payload, st, params))
        apply_rows(acc, rows, psizes)
        assert np.array_equal(acc.view(np.int32), enc.recon.numpy().view(np.int32))
    assert seg_offsets([300], params) is None and list(seg_offsets(sizes, params)) == [0, 500, 540]


def test_unchanged_state_codes_nothing():
    enc = UniformEncoder(["w"], [64], UniformParams())
    u = torch.randn(64)
    enc.reset(u)
    payload, steps, qv = enc.encode(u.clone())
    assert not qv.any() and decode_sparse(payload, 64)[0].size == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_names_the_tensor(bad):
    enc = UniformEncoder(["a", "b"], [3, 3], UniformParams())
    enc.reset(torch.zeros(6))
    u = torch.ones(6)
    u[4] = bad
    with pytest.raises(NonFiniteError, match="'b'"):
        enc.encode(u)
    big = torch.full((6,), 3e38)
    enc.reset(-big)
    with pytest.raises(NonFiniteError, match="overflows"):
        enc.encode(big)


@pytest.mark.parametrize("r", [0, -1, 5, "x"])
def test_bad_residual(r):
    with pytest.raises(RaybranchError, match="residual"):
        UniformParams(residual=r)
