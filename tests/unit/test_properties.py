"""Property-based round trips (Hypothesis) where the other unit tests hand-roll random cases.

- encode -> decode gives back every segment and raw value, for every codec, any alphabet,
  bucket size and length (including 0), symbols drawn with any skew; ``packed=True`` decodes to
  the same symbols packed;
- fixed-width pack -> unpack and rANS bytes -> bytes are identities;
- the quantize+pack kernel -> the unpack+dequantize kernel gives, per coordinate, one of the two
  levels around ``|x| / norm`` times the norm with ``x``'s sign, and ``accumulate`` adds;
- the level DP's answer is optimal: as low as a brute force over every level set of the
  candidates, never worse than the uniform or exponential levels, 0 and 1 at the ends.

Kept fast (a few seconds): few examples, small sizes, no deadline (the first call of a numba
kernel compiles or loads it).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the test extra")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qoda_hvd.coding import (  # noqa: E402
    CODECS,
    PackedSegment,
    RawSegment,
    Segment,
    decode,
    encode_bytes,
)
from qoda_hvd.coding import bits, rans  # noqa: E402
from qoda_hvd.kernels import level_table, stream_key  # noqa: E402
from qoda_hvd.kernels.dispatch import dequantize_into, quantize_pack  # noqa: E402
from qoda_hvd.quant.levels import (  # noqa: E402
    expected_variance,
    exponential_levels,
    level_candidates,
    optimal_levels,
    uniform_levels,
)

FAST = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def segments(draw, layer_id=0, type_id=0, num_levels=None):
    """A Segment: any length (0 included), bucket size, alphabet and skew of the symbols."""
    L = num_levels if num_levels is not None else draw(st.integers(2, 16))
    n = draw(st.integers(0, 700))
    bucket = draw(st.sampled_from([1, 3, 16, 64, 1024]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    skew = draw(st.floats(0.05, 5.0))
    p = rng.dirichlet(np.full(2 * L - 1, skew))
    s = rng.choice(np.arange(-(L - 1), L, dtype=np.int8), n, p=p)
    scale = draw(st.sampled_from([0.0, 1e-30, 1.0, 3e30]))
    norms = rng.random(-(-n // bucket), dtype=np.float32) * np.float32(scale)
    return Segment(layer_id, type_id, n, bucket, s, norms, L)


@FAST
@given(st.data(), st.sampled_from(sorted(CODECS)))
def test_encode_decode_round_trip_every_codec(data, codec):
    n_types = data.draw(st.integers(1, 3))
    levels, segs = {}, []
    for t in range(n_types):
        L = data.draw(st.integers(2, 12))
        levels[t] = np.concatenate([[0.0], np.sort(np.random.default_rng(t).random(L - 2)),
                                    [1.0]]).astype(np.float32)
        if L > 2:
            levels[t][1:-1] = np.linspace(0.1, 0.9, L - 2, dtype=np.float32)
        segs.append(data.draw(segments(layer_id=t, type_id=t, num_levels=L)))
    raws = [RawSegment(100 + i, np.asarray(data.draw(st.lists(
        st.floats(width=32, allow_nan=False), max_size=20)), np.float32))
        for i in range(data.draw(st.integers(0, 2)))]
    payload = encode_bytes(segs, levels, codec, raw=raws)

    out = decode(payload)
    assert [s.numel for s in out.segments] == [s.numel for s in segs]
    for a, b in zip(out.segments, segs):
        assert np.array_equal(a.symbols, b.symbols) and np.array_equal(a.norms, b.norms)
        assert (a.layer_id, a.type_id, a.bucket_size, a.num_levels) == \
               (b.layer_id, b.type_id, b.bucket_size, b.num_levels)
    for a, b in zip(out.raw, raws):
        assert a.layer_id == b.layer_id and np.array_equal(a.values, b.values)
    for t, lv in levels.items():
        assert np.array_equal(np.asarray(out.levels[t], np.float32), lv)

    packed = decode(payload, packed=True)
    for a, b in zip(packed.segments, segs):
        assert isinstance(a, PackedSegment)
        assert np.array_equal(a.to_segment().symbols, b.symbols)


@FAST
@given(st.integers(1, 8), st.lists(st.integers(0, 255), max_size=300))
def test_pack_unpack_fixed_is_an_identity(width, raw):
    values = np.asarray(raw, np.uint8) & np.uint8((1 << width) - 1)
    packed = bits.pack_fixed(values, width)
    assert packed.size == -(-values.size * width // 8)
    assert np.array_equal(bits.unpack_fixed(packed, values.size, width), values)


@FAST
@given(st.binary(max_size=3000), st.integers(1, 256))
def test_rans_bytes_round_trip(data, alphabet):
    x = np.frombuffer(data, np.uint8) % np.uint8(alphabet) if alphabet < 256 else \
        np.frombuffer(data, np.uint8)
    body = rans.encode_bytes(x)
    assert np.array_equal(rans.decode_bytes(body, x.size), x)
    if x.size:
        with pytest.raises(rans.RansError):
            rans.decode_bytes(body, x.size + 1)


@FAST
@given(st.data())
def test_quantize_pack_then_dequantize_lands_on_a_neighbouring_level(data):
    L = data.draw(st.integers(2, 16))
    lv = uniform_levels(L) if data.draw(st.booleans()) else exponential_levels(L)
    table = level_table(lv)
    n = data.draw(st.integers(1, 600))
    bucket = data.draw(st.sampled_from([1, 7, 32, 128, 512]))
    norm = data.draw(st.sampled_from(["l2", "linf"]))
    seed = data.draw(st.integers(0, 2**31 - 1))
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal(n).astype(np.float32))
    x *= data.draw(st.sampled_from([1e-3, 1.0, 1e3]))
    packed, norms = quantize_pack(x, table, bucket, norm, stream_key(seed, 0, 0), threads=1)
    assert packed.size == -(-n * table.width // 8) and norms.size == -(-n // bucket)

    out = torch.full((n,), 7.0)
    assert dequantize_into(packed, norms, table, bucket, out, accumulate=False, threads=1) == 0
    nrm = torch.from_numpy(np.repeat(norms, bucket)[:n]).double()
    levels = lv.double()
    got = out.double()
    u = (x.double().abs() / nrm).clamp(max=1.0)
    k = torch.searchsorted(levels, u, right=True).clamp(1, L - 1)
    lo, hi = levels[k - 1] * nrm, levels[k] * nrm
    mag = got.abs()
    tol = 1e-6 * nrm
    assert bool(((mag - lo).abs() <= tol).logical_or((mag - hi).abs() <= tol).all())
    assert bool((got * x.double() >= 0).all())  # the sign is kept (or the value is 0)

    again = out.clone()
    dequantize_into(packed, norms, table, bucket, again, accumulate=True, threads=1)
    assert torch.equal(again, out + out)


def _brute_force(hist, candidates, num_levels):
    inner = [c for c in candidates if 0.0 < c < 1.0]
    return min(expected_variance([0.0, *combo, 1.0], hist)
               for combo in itertools.combinations(inner, num_levels - 2))


@FAST
@given(st.lists(st.floats(0.0, 1.0), min_size=3, max_size=9), st.integers(2, 4),
       st.booleans())
def test_level_dp_is_optimal(hist, num_levels, reference):
    hist = np.asarray(hist)
    if hist.size + 1 < num_levels or hist.sum() == 0:
        return
    got = optimal_levels(hist, num_levels, include_reference=reference)
    g = got.double().numpy()
    assert got.numel() == num_levels and g[0] == 0.0 and g[-1] == 1.0 and (np.diff(g) > 0).all()
    cand = level_candidates(hist.size, num_levels, include_reference=reference)
    assert set(g) <= set(np.asarray(cand, np.float32).astype(np.float64))
    best = _brute_force(hist, cand, num_levels)
    cost = expected_variance(got, hist)
    assert cost == pytest.approx(best, rel=1e-9, abs=1e-15)
    if reference:  # the uniform and exponential levels are candidates then
        assert cost <= expected_variance(uniform_levels(num_levels), hist) * (1 + 1e-12)
        assert cost <= expected_variance(exponential_levels(num_levels), hist) * (1 + 1e-12)
    assert math.isfinite(cost) and cost >= 0
