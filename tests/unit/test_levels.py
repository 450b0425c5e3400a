"""Level sequences: families, validation, exact MQV optimum, variance theory."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from qoda_hvd.quant.levels import (
    eps_q,
    expected_variance,
    exponential_levels,
    is_uniform,
    level_candidates,
    level_probabilities,
    num_levels_for_bits,
    optimal_levels,
    optimal_levels_sweep,
    symbol_entropy_bits,
    uniform_levels,
    validate_levels,
)


def brute_force_cost(hist, candidates, num_levels):
    """Smallest expected variance over ALL level sets drawn from the candidates."""
    inner = [c for c in candidates if 0.0 < c < 1.0]
    best = math.inf
    for combo in itertools.combinations(inner, num_levels - 2):
        best = min(best, expected_variance([0.0, *combo, 1.0], hist))
    return best


def numeric_variance(levels, hist, points=200_000):
    """Midpoint-rule integral of sigma^2(u) under the piecewise-uniform histogram density."""
    lv = np.asarray(levels, np.float64)
    h = np.asarray(hist, np.float64)
    u = (np.arange(points) + 0.5) / points
    dens = h[np.minimum((u * h.size).astype(int), h.size - 1)] * h.size
    j = np.clip(np.searchsorted(lv, u, side="right") - 1, 0, lv.size - 2)
    sig = (lv[j + 1] - u) * (u - lv[j])
    return float((dens * sig).mean() / h.sum())


def test_families():
    assert num_levels_for_bits(2) == 2 and num_levels_for_bits(8) == 128
    assert uniform_levels(5).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert exponential_levels(5).tolist() == [0.0, 0.125, 0.25, 0.5, 1.0]
    for n in (2, 3, 64, 128):
        for lv in (uniform_levels(n), exponential_levels(n)):
            assert lv.dtype == torch.float32 and lv.numel() == n
            assert validate_levels(lv) is not None
    assert is_uniform(uniform_levels(8)) and not is_uniform(exponential_levels(8))


@pytest.mark.parametrize(
    "fn, kwargs, err, match",
    [
        (num_levels_for_bits, {"bits": 12}, ValueError, r"bits must be in \[2, 8\], got 12"),
        (num_levels_for_bits, {"bits": 1}, ValueError, r"bits must be in \[2, 8\], got 1"),
        (num_levels_for_bits, {"bits": 4.0}, TypeError, r"bits must be an int, got float"),
        (uniform_levels, {"num_levels": 1}, ValueError, r"num_levels must be in \[2, 128\], got 1"),
        (uniform_levels, {"num_levels": 129}, ValueError, r"num_levels must be in \[2, 128\], got 129"),
        (exponential_levels, {"num_levels": 4, "base": 1.5}, ValueError, r"base must be in \(0, 1\), got 1.5"),
        (validate_levels, {"levels": [0.0, 0.5]}, ValueError, r"start at 0 and end at 1"),
        (validate_levels, {"levels": [0.0, 0.6, 0.5, 1.0]}, ValueError, r"strictly increasing"),
        (validate_levels, {"levels": [0.0, float("nan"), 1.0]}, ValueError, r"finite"),
        (validate_levels, {"levels": [[0.0, 1.0]]}, ValueError, r"1-D"),
        (validate_levels, {"levels": [0.0]}, ValueError, r"len\(levels\) must be in \[2, 128\], got 1"),
        (validate_levels, {"levels": list(np.linspace(0, 1, 130))}, ValueError, r"got 130"),
        (optimal_levels, {"hist": [1.0, -1.0], "num_levels": 2}, ValueError, r"non-negative"),
        (optimal_levels, {"hist": [1.0] * 4, "num_levels": 8}, ValueError, r"needs at least 7 histogram bins"),
        (eps_q, {"levels": [0.0, 1.0], "d": 0}, ValueError, r"d must be in \[1,"),
        (eps_q, {"levels": [0.0, 1.0], "d": 4, "q": 0.5}, ValueError, r"q must be in \[1, inf\]"),
    ],
)
def test_bad_input(fn, kwargs, err, match):
    with pytest.raises(err, match=match):
        fn(**kwargs)


def test_expected_variance_closed_forms_and_quadrature():
    # u ~ U[0,1], levels {0,1}: E[u(1-u)] = 1/6; levels {0,1/2,1}: 1/24.
    assert expected_variance([0.0, 1.0], [1.0]) == pytest.approx(1 / 6, rel=1e-12)
    assert expected_variance([0.0, 0.5, 1.0], [3.0, 3.0]) == pytest.approx(1 / 24, rel=1e-12)
    rng = np.random.default_rng(0)
    hist = rng.random(37) ** 3
    for lv in ([0.0, 0.013, 0.2, 0.21, 0.7, 1.0], exponential_levels(6), uniform_levels(9)):
        # midpoint rule on 2e5 points: error O(h^2) plus the density jumps, well below 1e-4 rel.
        assert expected_variance(lv, hist) == pytest.approx(numeric_variance(lv, hist), rel=1e-4)


def test_level_probabilities_preserve_the_mean():
    # Unbiased rounding: sum_j p_j l_j = E[u], and the probabilities sum to 1.
    rng = np.random.default_rng(1)
    hist = rng.random(64)
    centres_mean = float((hist * (np.arange(64) + 0.5) / 64).sum() / hist.sum())
    for lv in (uniform_levels(4), exponential_levels(8), optimal_levels(hist, 5)):
        p = level_probabilities(lv, hist)
        assert p.sum() == pytest.approx(1.0, abs=1e-12)
        assert float(p @ lv.double().numpy()) == pytest.approx(centres_mean, rel=1e-9)
    assert symbol_entropy_bits([0.0, 1.0], [0.0, 1.0]) > 1.0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_levels", [2, 3, 4, 5])
def test_optimal_equals_brute_force(seed, num_levels):
    rng = np.random.default_rng(seed)
    bins = 9
    hist = rng.random(bins) ** 2
    if seed % 2:  # sparse: mass only in the lower bins (exercises candidate truncation)
        hist[rng.integers(2, bins):] = 0.0
    edges = level_candidates(bins, num_levels, include_reference=False)
    got = optimal_levels(hist, num_levels, include_reference=False)
    assert set(got.double().numpy()) <= set(edges)
    assert expected_variance(got, hist) == pytest.approx(brute_force_cost(hist, edges, num_levels), rel=1e-12, abs=1e-15)
    # Default candidate set (edges + uniform + exponential levels of that count).
    cand = level_candidates(bins, num_levels)
    got = optimal_levels(hist, num_levels)
    assert expected_variance(got, hist) == pytest.approx(brute_force_cost(hist, cand, num_levels), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("num_levels", [2, 3, 8, 16, 64])
def test_optimal_never_worse_than_families(num_levels):
    rng = np.random.default_rng(num_levels)
    u = np.abs(rng.standard_normal(20000)) / 32.0  # L2-normalised-like coordinates
    for hist in (np.histogram(np.clip(u, 0, 1), bins=1024, range=(0, 1))[0], rng.random(256)):
        if hist.size + 1 < num_levels:
            continue
        opt = expected_variance(optimal_levels(hist, num_levels), hist)
        assert opt <= expected_variance(uniform_levels(num_levels), hist)
        assert opt <= expected_variance(exponential_levels(num_levels), hist)


def test_sweep_matches_single_and_is_monotone():
    rng = np.random.default_rng(3)
    hist = rng.random(128)
    sweep = optimal_levels_sweep(hist, [2, 4, 8, 16])
    prev = math.inf
    for n, (lv, var) in sweep.items():
        assert torch.equal(lv, optimal_levels(hist, n))
        assert var == pytest.approx(expected_variance(lv, hist), rel=1e-9)
        assert var <= prev  # more levels never hurt
        prev = var


def test_optimal_levels_deterministic_and_degenerate():
    rng = np.random.default_rng(4)
    h64 = rng.random(1024)
    a = optimal_levels(h64, 16)
    b = optimal_levels(torch.from_numpy(h64.copy()), 16)
    assert torch.equal(a, b)
    validate_levels(a)
    assert torch.equal(optimal_levels(np.zeros(64), 8), uniform_levels(8))
    # All mass in one bin: a level lands in/at it, and the variance is tiny.
    one = np.zeros(1024)
    one[100] = 1.0
    lv = optimal_levels(one, 4)
    assert expected_variance(lv, one) < 1e-6


def test_eps_q_theory():
    for s in (1, 2, 7, 127):
        for d in (1, 16, 1024):
            # Q-GenX form evaluated on uniform levels (s intervals).
            first = 1 / 8 if s > 1 else 0.0
            assert eps_q(uniform_levels(s + 1), d) == pytest.approx(first + min(d / (4 * s * s), math.sqrt(d) / s))
    # NUQSGD levels {0, 2^-s, ..., 1/2, 1}: 1/8 + min(d 2^-2s / 4, 2^-s sqrt d).
    for s in (2, 5):
        d = 256
        assert eps_q(exponential_levels(s + 2), d) == pytest.approx(1 / 8 + min(d * 2 ** (-2 * s) / 4, 2**-s * math.sqrt(d)))
    # q >= 2 gives the same bound; q = 1 uses d^2 and d.
    assert eps_q(uniform_levels(4), 64, math.inf) == eps_q(uniform_levels(4), 64, 2)
    assert eps_q(uniform_levels(2), 16, 1) == pytest.approx(min(16**2 / 4, 16))
