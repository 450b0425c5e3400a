"""PowerSGD math (qoda_hvd.lowrank): orthonormalisation, spectrum errors, the core step, L-GreCo."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import qoda_hvd
from qoda_hvd.config import PowerSGDConfig
from qoda_hvd.lowrank import (LowRankCore, MatrixSpec, candidate_ranks, lgreco_dp, orthonormalize_,
                              should_compress, spectrum_errors)

torch.set_num_threads(1)


def low_rank(b, n, m, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, r, generator=g) @ torch.randn(b, r, m, generator=g)


# ------------------------------------------------------------------ orthonormalisation
@pytest.mark.parametrize("rank", [1, 2, 5])
def test_orthonormalize_gives_orthonormal_columns(rank):
    x = torch.randn(4, 40, rank, generator=torch.Generator().manual_seed(rank))
    q = orthonormalize_(x.clone())
    eye = torch.eye(rank).expand(4, rank, rank)
    torch.testing.assert_close(q.transpose(1, 2) @ q, eye, atol=1e-5, rtol=0)
    # Same column space: projecting x onto q loses nothing.
    torch.testing.assert_close(q @ (q.transpose(1, 2) @ x), x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_orthonormalize_all_zero_stays_finite(rank):
    q = orthonormalize_(torch.zeros(3, 16, rank), epsilon=1e-8)
    assert torch.isfinite(q).all()


def test_orthonormalize_rejects_wide_matrices():
    with pytest.raises(ValueError, match=r"r <= n"):
        orthonormalize_(torch.zeros(1, 2, 3))


# ------------------------------------------------------------------ spectrum errors
def test_spectrum_errors_match_svd():
    g = torch.Generator().manual_seed(1)
    # A decaying spectrum, so 2 power steps of width 8 resolve the top singular values well.
    u, _ = torch.linalg.qr(torch.randn(3, 60, 30, generator=g))
    v, _ = torch.linalg.qr(torch.randn(3, 40, 30, generator=g))
    s = 0.5 ** torch.arange(30.0)
    mats = u @ torch.diag_embed(s.expand(3, 30)) @ v.transpose(1, 2)
    errs = spectrum_errors(mats, [1, 2, 4, 8], seed=3)
    sv = torch.linalg.svdvals(mats.double()).square()
    exact = torch.stack([sv[:, r:].sum(dim=1) for r in (1, 2, 4, 8)], dim=1)
    torch.testing.assert_close(errs, exact, rtol=0.05, atol=1e-7)


def test_spectrum_errors_of_exact_rank_are_zero():
    errs = spectrum_errors(low_rank(2, 30, 20, 3), [3, 4, 40])
    assert errs.abs().max().item() < 1e-4


# ------------------------------------------------------------------ the core step (one rank)
def run_core(core, mats, steps=1, size=1):
    """Drive a core on one rank (the allreduces are identities at K = 1)."""
    outs = []
    for step in range(steps):
        core.mat.copy_(mats[step % len(mats)].reshape(-1))
        core.add_error()
        core.start(step)
        core.project()
        core.finish(size)
        outs.append(core.mat.clone())
    return outs


def test_rank_r_matrix_is_recovered_exactly():
    mats = low_rank(3, 48, 32, 4, seed=5)
    specs = [MatrixSpec(f"w{i}", (48, 32), 0) for i in range(3)]
    core = LowRankCore(specs, [], ranks=[4], error_feedback=False, warm_start=False)
    (out,) = run_core(core, [mats])
    err = (out.view(3, 48, 32) - mats).norm() / mats.norm()
    assert err.item() < 1e-5


def test_conv_kernels_are_matrices_out_by_in_khkw():
    core = LowRankCore([MatrixSpec("conv", (64, 32, 3, 3), 0)], [], ranks=[4])
    assert core.groups[0].rows == 64 and core.groups[0].cols == 32 * 9
    assert core.views["conv"].shape == (64, 32, 3, 3)


def test_same_shapes_are_batched_and_small_ones_travel_raw():
    specs = [MatrixSpec("a", (64, 64), 0), MatrixSpec("b", (64, 64), 0),
             MatrixSpec("c", (8, 8), 0), MatrixSpec("d", (32, 64), 0)]
    core = LowRankCore(specs, [("bias", (64,))], ranks=[4])
    assert [(g.rows, g.cols, g.rank, len(g.members)) for g in core.groups] == [(64, 64, 4, 2),
                                                                               (32, 64, 4, 1)]
    assert [n for n, _ in core.raw] == ["bias", "c"]  # 8x8 at rank 4 would not shrink 2x
    assert core.send_p.numel() == 2 * 64 * 4 + 32 * 4 + 64 + 64
    assert core.send_q.numel() == 2 * 64 * 4 + 64 * 4
    assert not should_compress(8, 8, 4, 2.0) and should_compress(64, 64, 4, 2.0)


def test_zero_gradients_stay_finite():
    core = LowRankCore([MatrixSpec("w", (64, 32), 0)], [("b", (8,))], ranks=[4])
    outs = run_core(core, [torch.zeros(64, 32)], steps=3)
    assert all(torch.isfinite(o).all() and o.abs().max() == 0 for o in outs)
    assert torch.isfinite(core.send_q).all() and torch.isfinite(core.err).all()


def test_error_feedback_makes_sent_updates_track_gradients():
    g = torch.Generator().manual_seed(0)
    signal = low_rank(1, 64, 64, 4, seed=9)[0]  # a persistent rank-4 direction, plus noise
    grads = [signal + 0.1 * torch.randn(64, 64, generator=g) for _ in range(40)]
    sums = {}
    for ef in (True, False):
        core = LowRankCore([MatrixSpec("w", (64, 64), 0)], [], ranks=[1], error_feedback=ef)
        sent = sum(run_core(core, grads, steps=40)).view(64, 64)
        sums[ef] = (sent - sum(grads)).norm().item()
        if ef:  # exactly: sum of sent = sum of gradients - the error left over
            torch.testing.assert_close(sent + core.err.view(64, 64), sum(grads), atol=1e-3,
                                       rtol=1e-4)
    # Without feedback the dropped mass accumulates; with it only the last error remains.
    assert sums[True] < 0.2 * sums[False]


def test_warm_start_converges_to_the_top_subspace_of_a_fixed_matrix():
    g = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(80, 80, generator=g))
    v, _ = torch.linalg.qr(torch.randn(60, 60, generator=g))
    s = torch.cat([torch.tensor([10.0, 9.0]), torch.full((58,), 0.5)])
    mat = u[:, :60] @ torch.diag(s) @ v.T
    best = (s[2:] ** 2).sum().sqrt()
    errs = {}
    for warm in (True, False):
        core = LowRankCore([MatrixSpec("w", (80, 60), 0)], [], ranks=[2], error_feedback=False,
                           warm_start=warm)
        out = run_core(core, [mat], steps=8)[-1].view(80, 60)
        errs[warm] = (out - mat).norm().item()
    assert errs[True] < 1.05 * best.item() < errs[False]


def test_matrix_state_round_trip_and_rank_growth():
    core = LowRankCore([MatrixSpec("w", (64, 32), 0)], [], ranks=[2], seed=4)
    run_core(core, [torch.randn(64, 32)], steps=2)
    state = core.matrix_state()
    bigger = LowRankCore([MatrixSpec("w", (64, 32), 0)], [], ranks=[4], seed=4)
    bigger.load_matrix_state(state, step=2, q_ready=True)
    q = bigger.matrix_state()["q"]["w"]
    assert q.shape == (32, 4)
    torch.testing.assert_close(q[:, :2], state["q"]["w"])
    torch.testing.assert_close(bigger.matrix_state()["errors"]["w"], state["errors"]["w"])


# ------------------------------------------------------------------ L-GreCo DP
def brute_force(errors, sizes, budget):
    units, cands = errors.shape
    best = None
    for choice in itertools.product(range(cands), repeat=units):
        e = sum(errors[u, c] for u, c in enumerate(choice))
        s = sum(sizes[u, c] for u, c in enumerate(choice))
        if e <= budget and (best is None or s < best[0] or (s == best[0] and e < best[1])):
            best = (s, e, choice)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_dp_equals_brute_force_and_never_exceeds_budget(seed):
    rng = np.random.default_rng(seed)
    units, cands = rng.integers(1, 5), rng.integers(2, 5)
    # Integer errors with budget = buckets (step width 1): the DP's rounding is exact, so it
    # must find the brute-force optimum.
    budget = int(rng.integers(20, 120))
    errors = np.sort(rng.integers(0, 80, size=(units, cands)), axis=1)[:, ::-1].astype(float)
    sizes = np.sort(rng.integers(1, 50, size=(units, cands)), axis=1).astype(float)
    ref = brute_force(errors, sizes, budget)
    if ref is None:
        with pytest.raises(ValueError, match="fits the error budget"):
            lgreco_dp(errors, sizes, float(budget), buckets=budget)
        return
    got = lgreco_dp(errors, sizes, float(budget), buckets=budget)
    assert sizes[np.arange(units), got].sum() == ref[0]
    assert errors[np.arange(units), got].sum() <= budget


@pytest.mark.parametrize("seed", range(6))
def test_dp_with_real_errors_fits_budget_and_beats_uniform(seed):
    rng = np.random.default_rng(100 + seed)
    units, r0 = 5, 8
    cands = candidate_ranks(r0)
    dims = rng.integers(64, 4096, size=(units, 2))
    sizes = np.array([[r * (n + m) for r in cands] for n, m in dims], dtype=float)
    decay = rng.uniform(0.5, 0.99, size=units)
    scale = rng.uniform(0.1, 100.0, size=units)
    errors = np.array([[scale[u] * decay[u] ** r for r in cands] for u in range(units)])
    base = cands.index(r0)
    budget = float(errors[:, base].sum())
    got = lgreco_dp(errors, sizes, budget, fallback=[base] * units)
    assert errors[np.arange(units), got].sum() <= budget * (1 + 1e-12)
    assert sizes[np.arange(units), got].sum() <= sizes[:, base].sum()
    ref = brute_force(errors, sizes, budget)
    # Rounding errors up costs at most a little against the exact optimum.
    assert sizes[np.arange(units), got].sum() <= 1.1 * ref[0]


def test_dp_spends_error_where_size_is_big():
    errors = np.array([[4.0, 1.0, 0.0], [4.0, 1.0, 0.0]])
    sizes = np.array([[1, 2, 3], [10, 20, 30]])
    assert lgreco_dp(errors, sizes, budget=5.0).tolist() == [1, 0]
    assert lgreco_dp(errors, sizes, budget=0.0).tolist() == [2, 2]


def test_candidate_ranks():
    assert candidate_ranks(16) == list(range(8, 33))
    assert candidate_ranks(3, 1.0, 1.0) == [3]


@pytest.mark.parametrize("args, match", [
    (dict(errors=[[1.0]], sizes=[[1.0, 2.0]], budget=1.0), "one shape"),
    (dict(errors=[[-1.0]], sizes=[[1.0]], budget=1.0), "non-negative"),
    (dict(errors=[[1.0]], sizes=[[1.0]], budget=-1.0), r"budget must be a finite number >= 0, got -1.0"),
    (dict(errors=[[1.0]], sizes=[[1.0]], budget=1.0, buckets=0), r"buckets must be an int >= 1, got 0"),
])
def test_dp_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        lgreco_dp(**args)


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rank=0), ValueError, r"rank must be in \[1, 1024\], got 0"),
    (dict(rank=2000), ValueError, r"rank must be in \[1, 1024\], got 2000"),
    (dict(rank=2.5), TypeError, r"rank must be an int, got float"),
    (dict(granularity="block"), ValueError, r"granularity must be one of type, layer, got 'block'"),
    (dict(error_metric="l1"), ValueError, r"error_metric must be one of absolute, relative, got 'l1'"),
    (dict(rank_range=(2.0, 4.0)), ValueError, r"rank_range must satisfy 0 < low <= 1 <= high <= 16, got \(2.0, 4.0\)"),
    (dict(rank_range=(0.5,)), ValueError, r"rank_range must be a pair"),
    (dict(every=-1), ValueError, r"every must be in \[0, \d+\], got -1"),
    (dict(buckets=10), ValueError, r"buckets must be in \[100, 1000000\], got 10"),
    (dict(start_iter=-3), ValueError, r"start_iter must be in \[0, \d+\], got -3"),
    (dict(min_compression_rate=0), ValueError, r"min_compression_rate must be in \(0, 1e\+06\], got 0"),
    (dict(min_compression_rate=float("nan")), ValueError, r"min_compression_rate must be in"),
    (dict(orthogonalization_epsilon=-1e-8), ValueError, r"orthogonalization_epsilon must be in \[0, 1\], got -1e-08"),
    (dict(min_numel=-1), ValueError, r"min_numel must be in \[0, \d+\], got -1"),
    (dict(seed=-1), ValueError, r"seed must be in \[0, \d+\], got -1"),
    (dict(layerwise="yes"), TypeError, r"layerwise must be a bool, got str"),
    (dict(error_feedback=1), TypeError, r"error_feedback must be a bool, got int"),
    (dict(types="magic"), ValueError, r"types must be None, 'auto'"),
    (dict(types=3), TypeError, r"types must be None, 'auto', an nn.Module"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        qoda_hvd.Compression.powersgd(**kwargs)
    with pytest.raises(error, match=match):
        PowerSGDConfig(**kwargs)


def test_compressor_is_identity_for_horovod_and_repr():
    comp = qoda_hvd.Compression.powersgd(rank=8, layerwise=True)
    t = torch.randn(16, 16)
    out, ctx = comp.compress(t)
    assert out is t and comp.decompress(out, ctx) is t
    assert "rank=8" in repr(comp) and "layerwise=True" in repr(comp)
    assert callable(comp.make_exchange)
    assert comp.config.rank_range == (0.5, 2.0) and math.isclose(comp.config.min_compression_rate, 2)
