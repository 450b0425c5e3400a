"""Bucketed stochastic quantizer: unbiasedness, variance bound, dtypes, shapes, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from qoda_hvd import PayloadError
from qoda_hvd.quant import (
    NORMS,
    QuantizedTensor,
    Quantizer,
    dequantize,
    eps_q,
    exponential_levels,
    optimal_levels,
    quantize,
    rank_generator,
    uniform_levels,
)

torch.set_num_threads(1)

FAMILIES = {
    "uniform8": uniform_levels(8),
    "ternary": uniform_levels(2),
    "exp8": exponential_levels(8),
    "custom": torch.tensor([0.0, 0.01, 0.05, 0.3, 1.0]),
    # Two levels inside one cell of every cell grid: the CPU cell table needs 2 tree steps.
    "dense": torch.tensor([0.0, 0.3, 0.5, 0.5 + 2.0**-13, 0.5 + 2.0**-12, 1.0]),
    # Three levels inside one cell of every grid: the CPU path falls back to bucketize.
    "crowded": torch.tensor([0.0, 0.5, 0.5 + 2.0**-20, 0.5 + 2.0**-19, 0.5 + 3 * 2.0**-20, 1.0]),
}
# CPU noise uses 16-bit draws: rounding probabilities are exact to 2^-17 (quantizer docstring).
PROB_RESOLUTION = 2.0**-16


def exact_moments(x: torch.Tensor, levels: torch.Tensor, bucket_size: int, norm: str):
    """Per-coordinate E[Q(x)] = x and Var[Q(x)_i] = norm^2 (l_{j+1} - u)(u - l_j), in float64."""
    flat = x.double().reshape(-1)
    n = flat.numel()
    nb = -(-n // bucket_size)
    padded = torch.cat([flat, flat.new_zeros(nb * bucket_size - n)]).view(nb, bucket_size)
    nrm = padded.norm(dim=1) if norm == "l2" else padded.abs().amax(dim=1)
    nrm_i = nrm.repeat_interleave(bucket_size)[:n]
    u = torch.where(nrm_i > 0, flat.abs() / nrm_i, torch.zeros_like(flat))
    lv = levels.double()
    j = (torch.searchsorted(lv, u, right=True) - 1).clamp(0, lv.numel() - 2)
    lo, hi = lv[j], lv[j + 1]
    var = (nrm_i**2) * (hi - u).clamp_min(0) * (u - lo).clamp_min(0)
    gap = nrm_i * (hi - lo)
    return var, gap


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_unbiased_within_k_sigma(family, norm):
    levels = FAMILIES[family]
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2500, generator=g) * torch.linspace(0.1, 3, 2500)
    x[::97] = 0.0
    q = Quantizer(levels, bucket_size=256, norm=norm)
    n_draws = 400
    acc = torch.zeros(x.numel(), dtype=torch.float64)
    for _ in range(n_draws):
        acc += q.dequantize(q.quantize(x, g)).double()
    mean = acc / n_draws
    var, gap = exact_moments(x, levels, 256, norm)
    # k = 6 sigma per coordinate (2500 coordinates: a false alarm has probability < 1e-5),
    # plus the documented 2^-17 rounding-probability resolution and float32 reconstruction.
    tol = 6.0 * var.sqrt() / math.sqrt(n_draws) + PROB_RESOLUTION * gap + 1e-6 * x.double().abs()
    assert bool(((mean - x.double()).abs() <= tol).all())
    # Coordinates on a level (here: the zeros) have zero variance and are exact.
    assert bool((mean[::97] == 0).all())


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_variance_matches_theory_and_bound(family, norm):
    levels = FAMILIES[family]
    g = torch.Generator().manual_seed(5)
    bs = 128
    x = torch.randn(20 * bs + 37, generator=g) ** 3  # heavy tails, partial last bucket
    q = Quantizer(levels, bucket_size=bs, norm=norm)
    draws = 200
    errs = torch.stack([(q.dequantize(q.quantize(x, g)).double() - x.double()).pow(2).sum() for _ in range(draws)])
    var, _ = exact_moments(x, levels, bs, norm)
    expected = var.sum()
    # The mean of the squared error is within 5 standard errors of its exact expectation ...
    assert abs(errs.mean() - expected) <= 5 * errs.std() / math.sqrt(draws) + 1e-3 * expected
    # ... and the exact expectation is below the eps_Q bound (ALGORITHM.md 3), per bucket d = bs.
    assert expected <= eps_q(levels, bs, NORMS[norm]) * x.double().pow(2).sum()


def test_same_seed_same_result_and_rank_independence():
    x = torch.randn(5000)
    for levels in (uniform_levels(16), exponential_levels(16)):
        a = quantize(x, levels, torch.Generator().manual_seed(3))
        b = quantize(x, levels, torch.Generator().manual_seed(3))
        c = quantize(x, levels, torch.Generator().manual_seed(4))
        assert torch.equal(a.symbols, b.symbols) and torch.equal(a.norms, b.norms)
        assert not torch.equal(a.symbols, c.symbols)
    r0 = quantize(x, uniform_levels(16), rank_generator(1, 0))
    r1 = quantize(x, uniform_levels(16), rank_generator(1, 1))
    assert not torch.equal(r0.symbols, r1.symbols)


def test_chunking_does_not_change_the_result_distribution_or_norms():
    x = torch.randn(3 * 65536 + 1000)
    small = Quantizer(uniform_levels(8), chunk_size=4096).quantize(x, torch.Generator().manual_seed(0))
    big = Quantizer(uniform_levels(8), chunk_size=1 << 20).quantize(x, torch.Generator().manual_seed(0))
    assert torch.equal(small.norms, big.norms)
    assert torch.equal(small.symbols, big.symbols)  # same draws in the same order


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(7, 13, 5), (1,), (1023,), (1025,), (3, 1024)])
def test_dtypes_and_shapes(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    for levels in (uniform_levels(8), exponential_levels(8)):
        q = Quantizer(levels)
        qt = q.quantize(x, g)
        assert qt.symbols.dtype == torch.int8 and qt.norms.dtype == torch.float32
        assert qt.shape == x.shape and qt.dtype == dtype
        assert qt.num_buckets == math.ceil(x.numel() / 1024)
        assert int(qt.symbols.abs().max()) <= 7
        y = q.dequantize(qt)
        assert y.shape == x.shape and y.dtype == dtype
        # Every output is a level times the bucket norm, on the same side as the input.
        assert bool(((y.float() * x.float()) >= 0).all())
        torch.testing.assert_close(qt.norms[:1], x.float().reshape(-1)[:1024].norm().reshape(1))


def test_bucket_size_one_and_linf_hits_levels_exactly():
    x = torch.tensor([3.0, -2.0, 0.0, 5.0])
    qt = quantize(x, uniform_levels(4), torch.Generator().manual_seed(0), bucket_size=1)
    # Every bucket has one element: u = 1 -> symbol +-(L-1), norm = |x|.
    assert qt.symbols.tolist() == [3, -3, 0, 3]
    assert torch.equal(dequantize(qt, uniform_levels(4)), x)
    qt = quantize(torch.tensor([4.0, -2.0, 1.0, 0.0]), uniform_levels(5), torch.Generator(), norm="linf")
    assert qt.symbols.tolist() == [4, -2, 1, 0]


def test_empty_and_zero_buckets():
    g = torch.Generator().manual_seed(0)
    qt = quantize(torch.empty(0, 3), uniform_levels(8), g)
    assert qt.numel == 0 and qt.num_buckets == 0 and qt.shape == (0, 3)
    assert dequantize(qt, uniform_levels(8)).shape == (0, 3)
    x = torch.cat([torch.zeros(1024), torch.randn(1024), torch.zeros(10)])
    for levels in (uniform_levels(8), exponential_levels(8)):
        qt = quantize(x, levels, g)
        assert qt.norms[0] == 0 and qt.norms[2] == 0
        assert not bool(qt.symbols[:1024].any()) and not bool(qt.symbols[2048:].any())
        y = dequantize(qt, levels)
        assert bool(torch.isfinite(y).all()) and not bool(y[:1024].any())


def test_tiny_norm_buckets_quantize_to_zero_without_nan():
    x = torch.full((64,), 1e-38)  # (L-1)/norm overflows float32
    qt = quantize(x, uniform_levels(8), torch.Generator(), bucket_size=64)
    y = dequantize(qt, uniform_levels(8))
    assert bool(torch.isfinite(y).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_policy(bad):
    x = torch.randn(3000)
    x[1500] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf values \(bucket 1 of size 1024"):
        quantize(x, uniform_levels(8), torch.Generator())
    for levels in (uniform_levels(8), exponential_levels(8)):
        qt = quantize(x, levels, torch.Generator(), nonfinite="propagate")
        assert not math.isfinite(float(qt.norms[1])) and not bool(qt.symbols[1024:2048].any())
        y = dequantize(qt, levels)
        assert bool(torch.isnan(y[1024:2048]).all())
        assert bool(torch.isfinite(y[:1024]).all()) and bool(torch.isfinite(y[2048:]).all())


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"tensor": torch.arange(10)}, TypeError, r"floating dtype .* got torch.int64"),
        ({"tensor": [1.0, 2.0]}, TypeError, r"tensor must be a torch.Tensor, got list"),
        ({"generator": None}, TypeError, r"generator must be a torch.Generator, got NoneType"),
        ({"bucket_size": 0}, ValueError, r"bucket_size must be in \[1, 1073741824\], got 0"),
        ({"bucket_size": 2.5}, TypeError, r"bucket_size must be an int, got float"),
        ({"norm": "l3"}, ValueError, r"norm must be one of \['l2', 'linf'\], got 'l3'"),
        ({"nonfinite": "ignore"}, ValueError, r"nonfinite must be one of \['raise', 'propagate'\]"),
        ({"levels": [0.0, 0.7, 0.2, 1.0]}, ValueError, r"strictly increasing"),
        ({"levels": list(range(200))}, ValueError, r"len\(levels\) must be in \[2, 128\], got 200"),
    ],
)
def test_bad_input_table(kwargs, err, match):
    args = {"tensor": torch.randn(10), "levels": uniform_levels(4), "generator": torch.Generator()}
    args.update(kwargs)
    with pytest.raises(err, match=match):
        quantize(args.pop("tensor"), args.pop("levels"), args.pop("generator"), **args)


def test_dequantize_rejects_corrupt_input():
    good = quantize(torch.randn(100), uniform_levels(4), torch.Generator())
    bad = QuantizedTensor(torch.full((100,), 9, dtype=torch.int8), good.norms, good.shape, good.dtype, 1024, 4)
    with pytest.raises(PayloadError, match=r"symbols must be in \[-3, 3\], got \[9, 9\]"):
        dequantize(bad, uniform_levels(4))
    with pytest.raises(PayloadError, match=r"num_levels=4 but 8 levels"):
        dequantize(good, uniform_levels(8))
    with pytest.raises(ValueError, match=r"need 1 norms, got 2"):
        QuantizedTensor(good.symbols, torch.zeros(2), good.shape, good.dtype, 1024, 4)
    with pytest.raises(TypeError, match=r"symbols must be an int8 tensor"):
        QuantizedTensor(good.symbols.int(), good.norms, good.shape, good.dtype, 1024, 4)


@pytest.mark.parametrize("levels", [uniform_levels(4), exponential_levels(8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dequantize_accumulate_adds_into_out(levels, dtype):
    g = torch.Generator().manual_seed(4)
    q = Quantizer(levels, bucket_size=100, chunk_size=300)  # several chunks, a partial bucket
    qt = q.quantize(torch.randn(1050, generator=g), g)
    base = torch.randn(1050, generator=g, dtype=dtype)
    want = base + q.dequantize(qt).to(dtype)
    out = base.clone()
    assert q.dequantize(qt, out=out, accumulate=True) is out
    torch.testing.assert_close(out, want)
    strided = torch.zeros(1050, 2, dtype=dtype)[:, 0]  # non-contiguous out keeps its values too
    strided.copy_(base)
    q.dequantize(qt, out=strided, accumulate=True)
    torch.testing.assert_close(strided, want)
    with pytest.raises(ValueError, match="accumulate=True needs out="):
        q.dequantize(qt, accumulate=True)


@pytest.mark.parametrize("levels", [uniform_levels(4), exponential_levels(8)])
def test_mostly_zero_chunks_round_only_live_buckets(levels):
    # An embedding-like gradient: 3 of 64 buckets per chunk non-zero (the sparse path), one chunk
    # dense, a partial last bucket. Buckets holding one non-zero value quantize exactly to
    # +-(L-1); the others stay unbiased; zero buckets give zero symbols.
    bs, lv_n = 64, len(levels)
    q = Quantizer(levels, bucket_size=bs, chunk_size=64 * bs)
    g = torch.Generator().manual_seed(7)
    x = torch.zeros(4 * 64 * bs + 40)
    live = torch.tensor([3, 17, 60, 64 + 5, 128 + 33, 3 * 64 + 2, 4 * 64])
    for b, v in zip(live[:3].tolist(), (1.5, -2.5, 0.75)):
        x[b * bs + 7] = v  # single spikes: deterministic symbols
    for b in live[3:].tolist():
        x[b * bs : (b + 1) * bs] = torch.randn(bs, generator=g)[: x[b * bs : (b + 1) * bs].numel()]
    x[2 * 64 * bs : 3 * 64 * bs] = torch.randn(64 * bs, generator=g)  # a dense chunk
    qt = q.quantize(x, g)
    sym = qt.symbols
    assert sym[[3 * bs + 7, 17 * bs + 7, 60 * bs + 7]].tolist() == [lv_n - 1, -(lv_n - 1), lv_n - 1]
    nonzero_x = (x != 0)
    assert not sym[~nonzero_x].any()
    # Dequantize (sparse chunks take their own path too) against norm * sign * level[|symbol|].
    lv = torch.as_tensor(levels, dtype=torch.float32)
    ref = torch.sign(sym.float()) * lv[sym.abs().long()] * qt.norms.repeat_interleave(bs)[: x.numel()]
    torch.testing.assert_close(q.dequantize(qt), ref)
    base = torch.randn(x.shape, generator=g)
    torch.testing.assert_close(q.dequantize(qt, out=base.clone(), accumulate=True), base + ref)
    mean = torch.zeros_like(x, dtype=torch.float64)
    draws = 400
    for _ in range(draws):
        mean += q.dequantize(q.quantize(x, g)).double()
    mean /= draws
    # Unbiased: each coordinate's mean is within 5 sigma, sigma <= gap * norm / 2 / sqrt(draws).
    gap = float(torch.diff(torch.as_tensor(levels, dtype=torch.float64)).max())
    norm = qt.norms.double().repeat_interleave(bs)[: x.numel()]
    sigma = gap * norm / 2 / draws**0.5
    assert bool(((mean - x.double()).abs() <= 5 * sigma + 1e-6).all())


def test_optimal_levels_reduce_measured_error():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64 * 1024, generator=g)
    u = (x.view(-1, 1024).abs() / x.view(-1, 1024).norm(dim=1, keepdim=True)).reshape(-1)
    hist = torch.histc(u, bins=1024, min=0, max=1)
    lv = optimal_levels(hist, 8)
    err = {}
    for name, levels in (("uniform", uniform_levels(8)), ("optimal", lv)):
        qt = quantize(x, levels, g)
        err[name] = float((dequantize(qt, levels) - x).pow(2).sum())
    assert err["optimal"] < err["uniform"]


def _bucketize_quantizer(levels: torch.Tensor, **kwargs) -> Quantizer:
    """A quantizer forced onto the torch.bucketize interval search (the reference path)."""
    q = Quantizer(levels, **kwargs)
    q._cells, q._cells_built = None, True
    return q


def _random_levels(num_levels: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    inner = torch.rand(num_levels - 2, generator=g, dtype=torch.float64) ** 3  # crowd towards 0
    lv = torch.cat([torch.zeros(1, dtype=torch.float64), inner.sort().values, torch.ones(1, dtype=torch.float64)])
    lv = torch.unique(lv.float())
    assert lv.numel() == num_levels  # float32 collisions are improbable for these seeds
    return lv


CELL_LEVELS = {
    "exp8": exponential_levels(8),
    "exp128": exponential_levels(128),
    "random3": _random_levels(3, 0),
    "random8": _random_levels(8, 1),
    "random128": _random_levels(128, 2),
    "optimal128": optimal_levels(torch.exp(-torch.linspace(0, 8, 1024)), 128),
    "dense": FAMILIES["dense"],
    "crowded": FAMILIES["crowded"],
    "denormal": torch.tensor([0.0, 1e-40, 2e-40, 1e-38, 0.5, 1.0]),
}


def _probes(levels: torch.Tensor) -> torch.Tensor:
    """u values where an interval search can go wrong: each level and its float32 neighbours,
    cell edges of every grid, 0, 1, just above 1, and uniform draws."""
    lv = levels.float()
    near = torch.cat([lv, torch.nextafter(lv, torch.tensor(2.0)), torch.nextafter(lv, torch.tensor(-1.0)).clamp_min(0)])
    edges = torch.cat([(torch.arange(1 << 10, dtype=torch.int32) << s).view(torch.float32) for s in range(13, 24)])
    edges = edges[(edges >= 0) & (edges <= 1)]
    extra = torch.tensor([0.0, 1.0, 1.0 + 2.0**-23, 1.0 + 2.0**-22])
    return torch.cat([near, edges, torch.nextafter(edges, torch.tensor(-1.0)).clamp_min(0), extra,
                      torch.rand(20_000, generator=torch.Generator().manual_seed(0))])


@pytest.mark.parametrize("name", sorted(CELL_LEVELS))
def test_cell_table_finds_the_bucketize_interval(name):
    levels = CELL_LEVELS[name]
    q = Quantizer(levels)
    table = q._cell_table()
    if name == "crowded":
        assert table is None  # needs 3 steps: bucketize is used
        return
    assert table is not None
    expected_steps = {"dense": 2, "exp8": 0, "exp128": 0}.get(name)
    if expected_steps is not None:
        assert len(table.bounds) == expected_steps
    _, slope, offset, _ = q._tables_on(torch.device("cpu"))
    u = _probes(levels)
    j = torch.bucketize(u, levels[1:-1], right=True)
    # The lookup as the quantizer does it, step by step.
    r = (u.view(torch.int32) >> table.shift).clamp(0, table.last_cell).long()
    for bound in table.bounds:
        r = 2 * r + (u >= bound[r]).long()
    assert torch.equal(table.slope[r], slope[j]) and torch.equal(table.offset[r], offset[j])


@pytest.mark.parametrize("name", sorted(CELL_LEVELS))
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_cell_table_path_matches_bucketize_path_bit_for_bit(name, norm):
    levels = CELL_LEVELS[name]
    bs = 256
    x = torch.randn(40 * bs + 77, generator=torch.Generator().manual_seed(4)) ** 3
    # Buckets whose max is 1 (linf: u is the value itself), filled with levels and their neighbours.
    probes = _probes(levels)[: 8 * bs]
    probes = probes[torch.randperm(probes.numel(), generator=torch.Generator().manual_seed(5))]
    probes[::bs] = 1.0
    x[: probes.numel()] = probes * torch.where(torch.arange(probes.numel()) % 3 == 0, -1.0, 1.0)
    x[9 * bs + 3] = float("nan")  # a non-finite bucket goes through the lookup too
    fast = Quantizer(levels, bucket_size=bs, norm=norm, nonfinite="propagate", chunk_size=4 * bs)
    ref = _bucketize_quantizer(levels, bucket_size=bs, norm=norm, nonfinite="propagate", chunk_size=4 * bs)
    for seed in range(3):
        a = fast.quantize(x, torch.Generator().manual_seed(seed))
        b = ref.quantize(x, torch.Generator().manual_seed(seed))
        assert torch.equal(a.symbols, b.symbols)
        torch.testing.assert_close(a.norms, b.norms, rtol=0, atol=0, equal_nan=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_theory(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(10_000, device="cuda") * 2).to(dtype)
    for levels in (uniform_levels(8), exponential_levels(8)):
        q = Quantizer(levels, bucket_size=512)
        n_draws = 200
        acc = torch.zeros(x.numel(), dtype=torch.float64, device="cuda")
        for _ in range(n_draws):
            qt = q.quantize(x, g)
            assert qt.symbols.is_cuda and qt.norms.is_cuda
            # float32 output so the comparison is not limited by float16/bfloat16 output rounding
            acc += q.dequantize(qt, out=torch.empty(x.shape, device="cuda")).double()
        var, gap = exact_moments(x.float().cpu(), levels, 512, "l2")
        tol = 6.0 * var.sqrt() / math.sqrt(n_draws) + 1e-6 * (1 + x.float().cpu().double().abs())
        assert bool(((acc.cpu() / n_draws - x.double().cpu()).abs() <= tol).all())
        # Same seed, same symbols.
        a = q.quantize(x, torch.Generator(device="cuda").manual_seed(1))
        b = q.quantize(x, torch.Generator(device="cuda").manual_seed(1))
        assert torch.equal(a.symbols, b.symbols)
