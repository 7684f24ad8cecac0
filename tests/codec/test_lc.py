"""LC quantizer and delta coder: exact decode, the per-entry error bound, priority promotion,
error feedback, NaN/Inf refusal.

Notation as in :mod:`raybranch.codec.lc`: an entry x lands in the bucket keyed by (sign,
exponent field e) of its float32 pattern, i.e. |x| ∈ [2^(e−127), 2^(e−126)); a bucket's value v
is the mean (or midrange) of its members, so it lies in the same binade; per segment the
L − 1 = 2^bits − 1 buckets of largest |v| are kept. Hence, for a dropped bucket d and the kept
bucket k of smallest |v|:

    |x_d| < 2^(e_d − 126) = 2 · 2^(e_d − 127) ≤ 2 |v_d| ≤ 2 |v_k|

so max |dropped x| < 2 · min |kept v|, segment by segment. That is the bound tested below.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from raybranch.codec.delta import DeltaEncoder, apply_delta
from raybranch.codec.lc import LCParams, SegmentLayout, dequantize, quantize
from raybranch.codec.streams import decode_positions
from raybranch.errors import NonFiniteError, RaybranchError

torch.set_num_threads(1)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- random deltas -----------------------------------------------------------------------------
def make_delta(seed: int, n: int, exp_lo: int, exp_hi: int, p_zero: float, p_denormal: float, mirror: bool) -> np.ndarray:
    """float32 entries ±m·2^k, m ∈ [1, 2), k uniform in [exp_lo, exp_hi], with ±0 and denormals mixed in.

    ``mirror`` makes the second half the negation of the first, so ± buckets tie in |v|.
    """
    rng = np.random.default_rng(seed)
    mant = rng.uniform(1.0, 2.0, n)
    k = rng.integers(exp_lo, exp_hi + 1, n)
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    x = (sign * np.ldexp(mant, k)).astype(np.float32)
    u = rng.random(n)
    x[u < p_zero] = np.where(rng.random(int((u < p_zero).sum())) < 0.5, np.float32(0.0), np.float32(-0.0))
    den = (u >= p_zero) & (u < p_zero + p_denormal)
    x[den] = (rng.integers(1, 1 << 23, int(den.sum())).astype(np.uint32) | np.where(rng.random(int(den.sum())) < 0.5, np.uint32(1 << 31), np.uint32(0))).view(np.float32)
    if mirror and n >= 2:
        h = n // 2
        x[n - h :] = -x[:h]
    return x


@hs.composite
def delta_cases(draw):
    sizes = draw(hs.lists(hs.integers(0, 400), min_size=1, max_size=5).filter(lambda s: sum(s) > 0))
    if draw(hs.booleans()):
        sizes = [1] * len(sizes)  # single-entry segments
    exp_lo = draw(hs.integers(-126, 60))
    exp_hi = draw(hs.integers(exp_lo, min(exp_lo + 40, 100)))
    return dict(
        seed=draw(hs.integers(0, 2**32 - 1)),
        sizes=sizes,
        exp_lo=exp_lo,
        exp_hi=exp_hi,
        p_zero=draw(hs.sampled_from([0.0, 0.1, 0.6])),
        p_denormal=draw(hs.sampled_from([0.0, 0.05, 0.3])),
        mirror=draw(hs.booleans()),
        params=LCParams(
            bits=draw(hs.integers(1, 8)),
            granularity=draw(hs.sampled_from(["tensor", "global"])),
            value=draw(hs.sampled_from(["mean", "midrange"])),
        ),
    )


def segment_ids(sizes: list[int], params: LCParams) -> np.ndarray:
    n = sum(sizes)
    if params.granularity == "global":
        return np.zeros(n, np.int64)
    return np.repeat(np.arange(len(sizes)), sizes)


def seg_starts(sizes: list[int], params: LCParams) -> np.ndarray | None:
    if params.granularity == "global":
        return None
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def bits_of(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


def encode_case(case):
    x = make_delta(case["seed"], sum(case["sizes"]), case["exp_lo"], case["exp_hi"], case["p_zero"], case["p_denormal"], case["mirror"])
    params = case["params"]
    seg_sizes = case["sizes"] if params.granularity == "tensor" else [sum(case["sizes"])]
    layout = SegmentLayout(seg_sizes, torch.device("cpu"))
    symbols, tables, q = quantize(torch.from_numpy(x), layout, params)
    return x, layout, symbols, tables, q


# -- decode = encoder's q, bit for bit -----------------------------------------------------------
@SETTINGS
@given(delta_cases())
def test_decoded_stream_equals_encoder_q_bitwise(case):
    params = case["params"]
    names = [f"t{i}" for i in range(len(case["sizes"]))]
    x = make_delta(case["seed"], sum(case["sizes"]), case["exp_lo"], case["exp_hi"], case["p_zero"], case["p_denormal"], case["mirror"])
    enc = DeltaEncoder(names, case["sizes"], params)
    enc.reset(torch.zeros(x.size))
    payload, tables, q = enc.encode(torch.from_numpy(x))
    q = q.numpy()
    assert tables.shape == (len(case["sizes"]) if params.granularity == "tensor" else 1, params.levels)
    assert np.all(bits_of(tables[:, 0]) == 0)

    acc = np.zeros(x.size, np.float32)
    apply_delta(acc, payload, tables, seg_starts(case["sizes"], params), first=True)
    assert np.array_equal(bits_of(acc), bits_of(q))

    # sparse form: positions + symbols index the tables to the same values
    idx, sym = decode_positions(payload, x.size)
    dense = np.zeros(x.size, np.float32)
    dense[idx] = tables[segment_ids(case["sizes"], params)[idx], sym]
    assert np.array_equal(bits_of(dense), bits_of(q))

    # the encoder's reconstruction advances by exactly q
    enc.advance(torch.from_numpy(q))
    assert np.array_equal(bits_of(enc.recon.numpy()), bits_of(q))


@SETTINGS
@given(delta_cases())
def test_dequantize_matches_quantize_and_symbols_fit_bits(case):
    x, layout, symbols, tables, q = encode_case(case)
    assert symbols.dtype == torch.uint8
    assert int(symbols.max()) <= case["params"].levels - 1
    assert torch.equal(dequantize(symbols, tables, layout).view(torch.int32), q.view(torch.int32))


# -- error bound, binades, promotion ---------------------------------------------------------------
@SETTINGS
@given(delta_cases())
def test_error_bound_binade_and_promotion(case):
    params = case["params"]
    x, _, _, _, q = encode_case(case)
    q = q.numpy()
    xb, qb = bits_of(x), bits_of(q)
    expo = (xb >> 23) & 0xFF
    sign = xb >> 31
    seg = segment_ids(case["sizes"], params)
    normal = expo != 0

    # zeros and denormals never form a bucket: they quantize to +0
    assert np.all(qb[~normal] == 0)
    # |x − q| ≤ |x| for every entry (float64: exact for float32 inputs)
    assert np.all(np.abs(x.astype(np.float64) - q.astype(np.float64)) <= np.abs(x.astype(np.float64)))
    # a kept entry's value has its sign and its binade
    kept = q != 0
    assert np.all(kept <= normal)
    assert np.array_equal(qb[kept] >> 31, sign[kept])
    assert np.array_equal((qb[kept] >> 23) & 0xFF, expo[kept])

    L1 = params.levels - 1
    bucket = seg * 512 + sign.astype(np.int64) * 256 + expo
    for s in np.unique(seg):
        in_seg = (seg == s) & normal
        if not in_seg.any():
            continue
        keys = np.unique(bucket[in_seg])
        qs = q[in_seg]
        # one value per bucket: all of a bucket's members are kept with one value, or all dropped
        per_bucket = {int(k): np.unique(bits_of(q[bucket == k])) for k in keys}
        assert all(v.size == 1 for v in per_bucket.values())
        kept_keys = [k for k, v in per_bucket.items() if v[0] != 0]
        dropped_keys = [k for k, v in per_bucket.items() if v[0] == 0]
        # at most 2^bits − 1 distinct nonzero values; exactly min(L − 1, #buckets) buckets kept
        assert np.unique(qs[qs != 0]).size <= L1
        assert len(kept_keys) == min(L1, keys.size)
        # each kept value is its bucket's mean / midrange (float64 reference, float32 rounding slack)
        for k in kept_keys:
            members = x[bucket == k].astype(np.float64)
            ref = members.mean() if params.value == "mean" else (members.max() + members.min()) / 2
            v = float(q[bucket == k][0])
            assert abs(v - ref) <= 1e-5 * abs(ref)
        if dropped_keys:
            min_kept = min(abs(float(q[bucket == k][0])) for k in kept_keys)
            max_dropped = max(float(np.abs(x[bucket == k]).max()) for k in dropped_keys)
            # the bound derived in the module docstring
            assert max_dropped < 2 * min_kept
            # and promotion itself: no dropped bucket's value beats the smallest kept one
            for k in dropped_keys:
                members = x[bucket == k].astype(np.float64)
                ref = members.mean() if params.value == "mean" else (members.max() + members.min()) / 2
                assert abs(ref) <= min_kept * (1 + 1e-5)


def test_promotion_keeps_largest_buckets_example():
    # buckets (by value): +8 (×3), −4, +2, +1, −0.5; bits=2 keeps 3 of them
    x = np.array([8, 8.5, 9, -4.5, 2, 1, -0.5], np.float32)
    symbols, tables, q = quantize(torch.from_numpy(x), SegmentLayout([7], torch.device("cpu")), LCParams(bits=2))
    assert q.tolist() == [8.5, 8.5, 8.5, -4.5, 2.0, 0.0, 0.0]
    assert tables.tolist() == [[0.0, 8.5, -4.5, 2.0]]
    assert symbols.tolist() == [1, 1, 1, 2, 3, 0, 0]
    # midrange of the top bucket {8, 8.5, 9} is 8.5 as well; {8, 9.5} would differ
    x2 = np.array([8, 9.5, 9.5], np.float32)
    _, _, qm = quantize(torch.from_numpy(x2), SegmentLayout([3], torch.device("cpu")), LCParams(bits=1, value="midrange"))
    _, _, qa = quantize(torch.from_numpy(x2), SegmentLayout([3], torch.device("cpu")), LCParams(bits=1, value="mean"))
    assert qm.tolist() == [8.75] * 3
    assert qa.tolist() == [9.0] * 3


def test_per_tensor_tables_are_independent():
    # tensor a: big entries, tensor b: tiny ones; global bits=1 keeps only a's bucket
    a = np.full(4, 3.0, np.float32)
    b = np.full(4, 1e-3, np.float32)
    x = torch.from_numpy(np.concatenate([a, b]))
    _, _, qg = quantize(x, SegmentLayout([8], torch.device("cpu")), LCParams(bits=1, granularity="global"))
    _, _, qt = quantize(x, SegmentLayout([4, 4], torch.device("cpu")), LCParams(bits=1, granularity="tensor"))
    assert qg.tolist() == [3.0] * 4 + [0.0] * 4
    assert np.array_equal(qt.numpy(), x.numpy())


@pytest.mark.parametrize("value", ["mean", "midrange"])
def test_bucket_values_near_float32_max_stay_finite(value):
    """Finite deltas in the top binade (|x| ≥ 2^127) must quantize to finite values.

    Summing (mean) or adding max + min (midrange) in float32 overflows there; q = ±inf would
    poison the reconstruction without any error.
    """
    x = np.array([3.0e38, 3.3e38, 2.0e38, -1e-3], np.float32)
    enc = DeltaEncoder(["w"], [4], LCParams(bits=2, value=value))
    enc.reset(torch.zeros(4))
    payload, tables, q = enc.encode(torch.from_numpy(x))
    assert np.all(np.isfinite(tables)), tables
    assert torch.isfinite(q).all(), q
    assert np.all(np.abs(x.astype(np.float64) - q.numpy().astype(np.float64)) <= np.abs(x.astype(np.float64)))


# -- NaN / Inf ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), -float("nan")])
@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_nonfinite_names_the_tensor(bad, granularity):
    names, sizes = ["conv.weight", "fc.weight", "fc.bias"], [3, 4, 5]
    enc = DeltaEncoder(names, sizes, LCParams(bits=3, granularity=granularity))
    enc.reset(torch.zeros(12))
    recon_before = enc.recon.clone()
    owner = np.repeat(np.arange(3), sizes)
    for pos in range(12):  # every position, tensor boundaries included
        flat = torch.linspace(-1, 1, 12)
        flat[pos] = bad
        with pytest.raises(NonFiniteError) as ei:
            enc.encode(flat)
        msg = str(ei.value)
        assert repr(names[owner[pos]]) in msg and "\n" not in msg
        assert all(repr(n) not in msg for i, n in enumerate(names) if i != owner[pos])
    assert torch.equal(enc.recon, recon_before)


def test_delta_overflow_of_finite_tensor_is_nonfinite_error():
    """u_t and ũ_{t−1} finite but δ = u_t − ũ_{t−1} overflows to inf: still a NonFiniteError naming the tensor."""
    enc = DeltaEncoder(["a", "b"], [2, 2], LCParams())
    enc.reset(torch.tensor([0.0, 0.0, -3e38, 0.0]))
    with pytest.raises(NonFiniteError, match="'b'"):
        enc.encode(torch.tensor([0.0, 0.0, 3e38, 0.0]))


@pytest.mark.parametrize("kw", [dict(bits=0), dict(bits=9), dict(bits=2.0), dict(granularity="layer"), dict(value="median")])
def test_bad_params_one_line_error(kw):
    with pytest.raises(RaybranchError) as ei:
        LCParams(**kw)
    assert "\n" not in str(ei.value)
    assert repr(next(iter(kw.values()))) in str(ei.value)


# -- error feedback ------------------------------------------------------------------------------
def test_error_feedback_keeps_error_bounded():
    """Random walk u_t = u_{t−1} + η_t over 50 steps, bits=2, global buckets.

    With feedback (δ_t = u_t − ũ_{t−1}) the error u_t − ũ_t = e_t stays at the size of one
    step's quantization error; without it (ũ'_t = ũ'_{t−1} + Q(u_t − u_{t−1})) the dropped
    parts add up like a random walk themselves and grow with t.
    """
    rng = np.random.default_rng(7)
    n, T = 20000, 50
    scale = np.exp(rng.uniform(np.log(1e-5), np.log(1e-2), n))  # mixed magnitudes per coordinate
    u = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    params = LCParams(bits=2, granularity="global")
    fb = DeltaEncoder(["w"], [n], params)
    fb.reset(u)
    nofb = DeltaEncoder(["w"], [n], params)
    nofb.reset(u)
    ref_prev = u.clone()
    err_fb, err_nofb = [], []
    for _ in range(T):
        u = u + torch.from_numpy((rng.standard_normal(n) * scale).astype(np.float32))
        _, _, q = fb.encode(u)
        fb.advance(q)
        # no feedback: quantize the true step u_t − u_{t−1}
        _, _, q2 = nofb.encode(nofb.recon + (u - ref_prev))
        nofb.advance(q2)
        ref_prev = u.clone()
        err_fb.append(float((u - fb.recon).norm()))
        err_nofb.append(float((u - nofb.recon).norm()))
    early, late = max(err_fb[:10]), max(err_fb[-10:])
    assert late <= 1.5 * early, (early, late)
    assert err_nofb[-1] >= 3 * err_nofb[4]  # the no-feedback error grows with t …
    assert err_nofb[-1] >= 3 * err_fb[-1]  # … and ends far above the feedback error
