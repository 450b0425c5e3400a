"""Bit allocation across types: within budget, and optimal against brute force."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from qoda_hvd.quant import allocate_levels, expected_variance, symbol_entropy_bits, uniform_levels
from qoda_hvd.quant.levels import optimal_levels_sweep


def test_allocation_matches_brute_force():
    rng = np.random.default_rng(0)
    bins = 128
    hists = np.stack([np.histogram(np.clip(np.abs(rng.standard_normal(5000)) * s, 0, 1), bins=bins, range=(0, 1))[0]
                      for s in (0.02, 0.1, 0.4)]).astype(float)
    numels = [30_000, 5_000, 1_000]
    cands = [2, 4, 8, 16]
    res = allocate_levels(hists, numels, reference_bits=3, candidates=cands, resolution=4096)
    assert res.variance <= res.budget
    assert res.bits <= res.reference_bits
    # Brute force over all (4 counts x 2 families)^3 choices; anything within
    # budget * (1 - M / resolution) is representable after rounding up, so the program can be
    # no worse than the best of those.
    options = []
    for h in hists:
        sweep = optimal_levels_sweep(h, cands)
        options.append([lv for c in cands for lv in (sweep[c][0], uniform_levels(c))])
    best = np.inf
    for choice in itertools.product(range(2 * len(cands)), repeat=3):
        lvs = [options[i][j] for i, j in enumerate(choice)]
        var = sum(w * expected_variance(lv, h) for w, lv, h in zip(numels, lvs, hists))
        bits = sum(w * symbol_entropy_bits(lv, h) for w, lv, h in zip(numels, lvs, hists))
        if var <= res.budget * (1 - 3 / 4096):
            best = min(best, bits)
    assert res.bits <= best + 1e-6
    # The reported totals are what the levels give.
    assert res.variance == pytest.approx(sum(w * expected_variance(lv, h) for w, lv, h in zip(numels, res.levels, hists)))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"reference_bits": 9}, ValueError, r"bits must be in \[2, 8\], got 9"),
        ({"bits": "huffman"}, ValueError, r"bits must be one of \['entropy', 'fixed'\]"),
        ({"resolution": 3}, ValueError, r"resolution must be in \[16,"),
        ({"numels": [1]}, ValueError, r"numels must be 2 non-negative counts"),
        ({"budget": -1.0}, ValueError, r"budget must be a finite non-negative float"),
        ({"candidates": [300]}, ValueError, r"num_levels must be in \[2, 128\], got 300"),
    ],
)
def test_bad_input(kwargs, err, match):
    args = {"histograms": np.ones((2, 16)), "numels": [10, 10]}
    args.update(kwargs)
    with pytest.raises(err, match=match):
        allocate_levels(args.pop("histograms"), args.pop("numels"), **args)
