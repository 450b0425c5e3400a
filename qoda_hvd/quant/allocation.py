"""Bit allocation across layer types (L-GreCo style): fewest bits under a variance budget.

For each type ``m`` the options are, for each candidate level count ``L``, the MQV-optimal levels
(one dynamic program per type gives every ``L``, see
:func:`~qoda_hvd.quant.levels.optimal_levels_sweep`) and the uniform levels (MQV levels minimise
variance at fixed ``L``, not bits: uniform levels round more coordinates to 0 and can be the
cheaper point on the bits/variance curve). Each option has

* variance ``V[m, L] = n_m * E[sigma^2]`` (``n_m`` the type's element count), and
* bits ``B[m, L] = n_m * bits_per_coordinate`` with ``bits="entropy"`` (the signed-symbol
  entropy, what an entropy coder spends) or ``bits="fixed"`` (``ceil(log2(2L - 1))``).

Minimise ``sum_m B[m, L_m]`` subject to ``sum_m V[m, L_m] <= budget``. The budget defaults to
the variance of uniform levels with ``2^(bits-1)`` levels for every type. Dynamic programming
over types with the budget discretised into ``resolution`` units: each ``V[m, L]`` is rounded
*up* to whole units, so any allocation the program accepts is truly within the budget. If the
rounding makes the reference allocation (uniform levels at ``reference_bits`` for every type)
unrepresentable and the program finds nothing cheaper, the reference itself is returned, so the
result never spends more bits than the reference under the default budget. Time
O(M * |candidates| * resolution), vectorised over the budget axis.

Example::

    >>> import torch
    >>> hists = torch.stack([torch.exp(-torch.linspace(0, 40, 256)), torch.ones(256)])
    >>> res = allocate_levels(hists, [10_000, 10_000], reference_bits=4)
    >>> res.variance <= res.budget
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from qoda_hvd.quant.levels import (
    _as_hist,
    expected_variance,
    num_levels_for_bits,
    optimal_levels_sweep,
    symbol_entropy_bits,
    uniform_levels,
    validate_num_levels,
)

__all__ = ["Allocation", "allocate_levels", "BIT_MODELS"]

BIT_MODELS = ("entropy", "fixed")


@dataclass(frozen=True)
class Allocation:
    """Chosen level count and levels per type, with the totals the choice achieves.

    Attributes:
        num_levels: ``L_m`` per type.
        levels: float32 levels per type.
        bits: total expected bits (coordinates only, norms excluded).
        variance: total expected variance (normalised units, see module docstring).
        budget: the variance budget used.
        reference_bits: total bits of the reference (uniform levels at ``reference_bits``).
    """

    num_levels: tuple[int, ...]
    levels: tuple[torch.Tensor, ...]
    bits: float
    variance: float
    budget: float
    reference_bits: float


def _bits_per_coord(levels: torch.Tensor, hist: np.ndarray, model: str) -> float:
    if model == "entropy":
        return symbol_entropy_bits(levels, hist)
    return float(math.ceil(math.log2(2 * levels.numel() - 1)))


def allocate_levels(
    histograms: torch.Tensor | np.ndarray | Sequence,
    numels: Sequence[int],
    *,
    reference_bits: int = 4,
    candidates: Sequence[int] | None = None,
    budget: float | None = None,
    bits: str = "entropy",
    resolution: int = 4096,
) -> Allocation:
    """Choose levels per type minimising expected bits under a total variance budget.

    Args:
        histograms: ``(M, B)`` histograms of normalised coordinates, one row per type.
        numels: element count of each type (weights of bits and variance).
        reference_bits: bits of the uniform reference that sets the default budget, in [2, 8].
        candidates: level counts to choose from; default ``2^(b-1)`` for ``b`` in 2..8.
        budget: total variance budget; default: the uniform reference's variance.
        bits: ``"entropy"`` or ``"fixed"`` bit model.
        resolution: budget units for the dynamic program, in [16, 2^20].
    """
    ref_l = num_levels_for_bits(reference_bits)
    if bits not in BIT_MODELS:
        raise ValueError(f"bits must be one of {list(BIT_MODELS)}, got {bits!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 16 <= resolution <= 1 << 20:
        raise ValueError(f"resolution must be in [16, {1 << 20}], got {resolution!r}")
    if budget is not None and not (isinstance(budget, (int, float)) and budget >= 0 and math.isfinite(budget)):
        raise ValueError(f"budget must be a finite non-negative float, got {budget!r}")
    h = histograms.detach().cpu().double().numpy() if isinstance(histograms, torch.Tensor) else np.asarray(histograms, np.float64)
    if h.ndim != 2:
        raise ValueError(f"histograms must be (types, bins), got shape {h.shape}")
    m, nbins = h.shape
    if candidates is None:
        candidates = [2 ** (b - 1) for b in range(2, 9) if 2 ** (b - 1) - 1 <= nbins]
    cands = sorted({validate_num_levels(c) for c in candidates})
    w = np.asarray(numels, dtype=np.float64)
    if w.shape != (m,) or np.any(w < 0):
        raise ValueError(f"numels must be {m} non-negative counts, got {list(numels)}")
    # Options per type: (L, optimal levels) and (L, uniform levels) for every candidate L.
    option_counts = [c for c in cands for _ in (0, 1)]
    var = np.zeros((m, 2 * len(cands)))
    nbits = np.zeros_like(var)
    levels: list[list[torch.Tensor]] = []
    ref_var = ref_bits = 0.0
    for i in range(m):
        hi = _as_hist(h[i], "histograms row")
        sweep = optimal_levels_sweep(hi, cands)
        row = []
        for c in cands:
            row += [sweep[c][0], uniform_levels(c)]
        levels.append(row)
        for j, lv in enumerate(row):
            var[i, j] = w[i] * expected_variance(lv, hi)
            nbits[i, j] = w[i] * _bits_per_coord(lv, hi, bits)
        uni = uniform_levels(ref_l)
        ref_var += w[i] * expected_variance(uni, hi)
        ref_bits += w[i] * _bits_per_coord(uni, hi, bits)
    if budget is None:
        budget = ref_var
    usable = range(var.shape[1])
    reference = Allocation(
        tuple([ref_l] * m), tuple(uniform_levels(ref_l) for _ in range(m)), float(ref_bits), float(ref_var),
        float(budget), float(ref_bits),
    )

    def result(choice: Sequence[int]) -> Allocation:
        out = Allocation(
            tuple(option_counts[j] for j in choice),
            tuple(levels[i][j] for i, j in enumerate(choice)),
            float(sum(nbits[i, j] for i, j in enumerate(choice))),
            float(sum(var[i, j] for i, j in enumerate(choice))),
            float(budget),
            float(ref_bits),
        )
        if reference.variance <= budget and reference.bits < out.bits:
            return reference
        return out

    if m == 0:
        return result([])
    if budget == 0:  # only exact options (none in general): the finest optimal levels
        return result([int(np.argmin(var[i])) for i in range(m)])
    units = np.ceil(var / budget * resolution - 1e-9).astype(np.int64)  # round up: stay in budget
    inf = np.inf
    best = np.zeros(resolution + 1)  # best[r]: min bits of types so far using <= r units
    picks = []
    for i in range(m):
        new = np.full(resolution + 1, inf)
        arg = np.full(resolution + 1, -1, dtype=np.int64)
        for j in usable:
            u = units[i, j]
            if u > resolution:
                continue
            cand = np.full(resolution + 1, inf)
            cand[u:] = best[: resolution + 1 - u] + nbits[i, j]
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        best = new
        picks.append(arg)
    if not np.isfinite(best[resolution]):
        return reference if reference.variance <= budget else result([int(np.argmin(var[i])) for i in range(m)])
    choice = []
    r = resolution
    for i in range(m - 1, -1, -1):
        j = int(picks[i][r])
        choice.append(j)
        r -= int(units[i, j])
    return result(choice[::-1])
