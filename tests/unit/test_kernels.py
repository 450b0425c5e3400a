"""The CPU kernels against the definition: noise, symbols, packing, unbiasedness, decode."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qoda_hvd.coding import bits
from qoda_hvd.kernels import PHASE_QUANTIZE, PHASE_REQUANTIZE, level_table, stream_key, uniform_reference
from qoda_hvd.kernels import cpu
from qoda_hvd.kernels.dispatch import NonFiniteError, dequantize_into, quantize_pack
from qoda_hvd.quant import exponential_levels, optimal_levels, uniform_levels

FAMILIES = {
    "uniform": uniform_levels,
    "exponential": exponential_levels,
    # MQV-optimal levels of a Gaussian-like histogram of normalised coordinates
    "optimal": lambda n: optimal_levels(np.histogram(np.abs(np.random.default_rng(0).standard_normal(20000)) / 4, bins=256, range=(0, 1))[0].astype(np.float64), n),
}


def reference_quantize(x, levels, bucket, norm, key, base=0):
    """The definition, in float64 where it does not matter and float32 where it does."""
    lv = np.asarray(levels, np.float32)
    n_lv = lv.size
    out = np.empty(x.size, np.int64)
    norms = []
    r_all = uniform_reference(key, base, x.size)
    for s in range(0, x.size, bucket):
        v = x[s:s + bucket]
        if norm == "linf":
            nrm = np.float32(np.abs(v).max())
        else:
            p2 = 1 << max(0, (bucket - 1).bit_length())
            sq = np.zeros(p2, np.float32)
            sq[:v.size] = v * v
            while sq.size > 1:
                sq = sq[0::2] + sq[1::2]
            nrm = np.float32(np.sqrt(np.float64(sq[0])))
        norms.append(nrm)
        u = np.abs(v).astype(np.float64) / float(nrm)
        j = np.clip(np.searchsorted(lv.astype(np.float64), u, side="right") - 1, 0, n_lv - 2)
        p = (u - lv[j]) / (lv[j + 1] - lv[j])
        m = j + (r_all[s:s + bucket] < p)
        out[s:s + bucket] = np.where(v >= 0, m, -m)
    return out, np.array(norms, np.float32)


def unpack(packed, n, table):
    return bits.unpack_fixed(packed, n, table.width).astype(np.int64) - (table.num_levels - 1)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("bits_", [2, 3, 4, 8])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_symbols_follow_the_definition(family, bits_, norm):
    levels = FAMILIES[family](2 ** (bits_ - 1))
    table = level_table(levels)
    x = np.random.default_rng(bits_).standard_normal(5000).astype(np.float32)
    key = stream_key(3, 1, 7)
    packed, norms, bad = cpu.quantize_pack(x, table, 512, norm, key, base=11)
    assert bad == 0
    sym = unpack(packed, x.size, table)
    ref, ref_norms = reference_quantize(x, table.levels, 512, norm, key, base=11)
    np.testing.assert_array_equal(norms, ref_norms)
    # The kernel computes the position by float32 tables; rounding at a level boundary may
    # differ from the float64 reference by one level in rare coordinates, never more.
    diff = np.abs(sym - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    # padding and alphabet
    assert np.abs(sym).max() <= table.num_levels - 1


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_unbiased_and_within_one_level(family, norm):
    table = level_table(FAMILIES[family](8))
    x = np.random.default_rng(5).standard_normal(2048).astype(np.float32)
    x[:100] *= 20  # heavy coordinates
    draws = 400
    acc = np.zeros(x.size, np.float64)
    out = np.zeros(x.size, np.float32)
    var = np.zeros(x.size, np.float64)
    for step in range(draws):
        packed, norms, _ = cpu.quantize_pack(x, table, 1024, norm, stream_key(0, 0, step))
        cpu.dequantize_into(packed, norms, table, 1024, out, accumulate=False)
        # within eps_Q: each coordinate lands on one of its two neighbouring levels
        nrm = np.repeat(norms, 1024)[: x.size].astype(np.float64)
        u, q = np.abs(x) / nrm, np.abs(out) / nrm
        j = np.clip(np.searchsorted(table.levels, u, side="right") - 1, 0, table.num_levels - 2)
        lo, hi = table.levels[j].astype(np.float64), table.levels[j + 1].astype(np.float64)
        assert np.all((np.isclose(q, lo, atol=1e-6)) | (np.isclose(q, hi, atol=1e-6)))
        acc += out
        var = nrm ** 2 * (hi - u) * (u - lo)  # the rounding variance, from the theory
    err = acc / draws - x
    # all coordinates together: a standard normal if unbiased
    total = err.sum() / np.sqrt(var.sum() / draws)
    assert abs(total) < 5, f"biased overall: z = {total:.1f}"
    # coordinate by coordinate where both outcomes are frequent enough for a normal limit
    p = (u - lo) / (hi - lo)
    ok = (np.minimum(p, 1 - p) * draws > 20)
    z = np.abs(err[ok]) / np.sqrt(var[ok] / draws)
    assert ok.sum() > 500 and z.max() < 5.5, f"biased coordinate: z = {z.max():.1f}"


def test_same_stream_same_bytes_and_streams_differ():
    table = level_table(uniform_levels(8))
    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32)
    a = cpu.quantize_pack(x, table, 1024, "l2", stream_key(1, 0, 5))[0]
    b = cpu.quantize_pack(x, table, 1024, "l2", stream_key(1, 0, 5))[0]
    assert np.array_equal(a, b)
    for other in (stream_key(1, 1, 5), stream_key(1, 0, 6), stream_key(2, 0, 5),
                  stream_key(1, 0, 5, PHASE_REQUANTIZE)):
        assert not np.array_equal(a, cpu.quantize_pack(x, table, 1024, "l2", other)[0])
    assert PHASE_QUANTIZE != PHASE_REQUANTIZE


@pytest.mark.parametrize("bucket", [1024, 100, 16])
def test_chunks_and_threads_draw_what_the_whole_draws(bucket):
    table = level_table(exponential_levels(8))
    x = np.random.default_rng(1).standard_normal(40 * bucket + 3).astype(np.float32)
    key = stream_key(0, 2, 9)
    whole, norms, _ = cpu.quantize_pack(x, table, bucket, "l2", key, threads=1)
    two, norms2, _ = cpu.quantize_pack(x, table, bucket, "l2", key, threads=2)
    assert np.array_equal(whole, two) and np.array_equal(norms, norms2)
    cut = 8 * bucket  # a multiple of 8 symbols and of the bucket: byte-aligned in the packing
    first = cpu.quantize_pack(x[:cut], table, bucket, "l2", key)[0]
    rest = cpu.quantize_pack(x[cut:], table, bucket, "l2", key, base=cut)[0]
    assert np.array_equal(np.concatenate([first, rest]), whole)


@pytest.mark.parametrize("bits_", [2, 3, 4, 5, 8])
def test_dequantize_equals_reference_and_accumulates(bits_):
    table = level_table(uniform_levels(2 ** (bits_ - 1)))
    x = np.random.default_rng(2).standard_normal(3001).astype(np.float32)
    packed, norms, _ = cpu.quantize_pack(x, table, 256, "l2", stream_key(0, 0, 0))
    sym = unpack(packed, x.size, table)
    ref = np.sign(sym) * table.levels[np.abs(sym)] * np.repeat(norms, 256)[: x.size]
    out = np.full(x.size, 7.0, np.float32)
    assert cpu.dequantize_into(packed, norms, table, 256, out, accumulate=False) == 0
    np.testing.assert_array_equal(out, ref.astype(np.float32))
    base = np.random.default_rng(3).standard_normal(x.size).astype(np.float32)
    acc = base.copy()
    cpu.dequantize_into(packed, norms, table, 256, acc, accumulate=True)
    np.testing.assert_array_equal(acc, base + ref.astype(np.float32))


def test_invalid_packed_values_are_counted():
    table = level_table(uniform_levels(4))  # 7 values in 3 bits: value 7 is invalid
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    packed, norms, _ = cpu.quantize_pack(x, table, 64, "l2", stream_key(0, 0, 0))
    packed = packed.copy()
    packed[0] = 0xFF  # values 7, 7 and part of a third
    out = np.zeros(64, np.float32)
    assert cpu.dequantize_into(packed, norms, table, 64, out, accumulate=False) >= 2


def test_nonfinite_buckets():
    table = level_table(uniform_levels(8))
    x = torch.randn(3000)
    x[1500] = float("nan")
    with pytest.raises(NonFiniteError, match="bucket 1 of size 1024"):
        quantize_pack(x, table, 1024, "l2", stream_key(0, 0, 0))
    packed, norms = quantize_pack(x, table, 1024, "l2", stream_key(0, 0, 0), nonfinite="propagate")
    assert np.isnan(norms[1]) and np.isfinite(norms[[0, 2]]).all()
    out = torch.zeros(3000)
    assert dequantize_into(packed, norms, table, 1024, out, accumulate=False) == 0
    assert out[1024:2048].isnan().all() and out[:1024].isfinite().all()


def test_zero_and_tiny_buckets_quantize_to_zero():
    table = level_table(exponential_levels(8))
    x = np.zeros(2048, np.float32)
    x[1024:] = 1e-38
    packed, norms, bad = cpu.quantize_pack(x, table, 1024, "l2", stream_key(0, 0, 0))
    assert bad == 0 and (unpack(packed, x.size, table) == 0).all()


def test_invalid_values_gathered_over_a_round_and_checked_once():
    from qoda_hvd import PayloadError
    from qoda_hvd.kernels.dispatch import InvalidValues

    table = level_table(uniform_levels(4))  # 7 values in 3 bits: value 7 is invalid
    x = torch.randn(64)
    packed, norms = quantize_pack(x, table, 64, "l2", stream_key(0, 0, 0))
    bad = packed.copy()
    bad[0] = 0xFF
    iv = InvalidValues()
    out = torch.zeros(64)
    assert dequantize_into(packed, norms, table, 64, out, accumulate=False, invalid=iv,
                           label="payload from rank 0, segment of type 0") is None
    iv.check()  # nothing invalid: no error, and the record is gone
    for rank, p in enumerate((packed, bad, bad)):
        dequantize_into(p, norms, table, 64, out, accumulate=True, invalid=iv,
                        label=f"payload from rank {rank}, segment of type 0")
    with pytest.raises(PayloadError, match=r"^payload from rank 1, segment of type 0: [2-9] "
                                           r"packed value\(s\) outside the alphabet of 7$"):
        iv.check()
    iv.check()  # started over empty after raising


def test_serial_twins_have_cache_files_of_their_own():
    # numba's on-disk cache is keyed by qualified name and line: twins compiled from the
    # parallel kernels' own functions shared one cache file, so a process could load the
    # parallel variant for threads=1 (or the serial one for threads=2), whichever was cached first
    from qoda_hvd.kernels import cpu

    for serial, parallel in [(cpu._quantize_pack_serial, cpu._quantize_pack_kernel),
                             (cpu._dequantize_serial, cpu._dequantize_kernel)]:
        assert serial.py_func.__qualname__ != parallel.py_func.__qualname__
        assert serial._cache._cache_file._index_name != parallel._cache._cache_file._index_name
