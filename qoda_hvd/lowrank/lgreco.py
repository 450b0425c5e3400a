"""L-GreCo's dynamic program: per-unit ranks of least total size under a total-error budget.

L-GreCo (Markov et al., MLSys 2024) picks each layer's compression parameter so that the sum
of the layers' compression errors stays within the error of a uniform setting (here: one
global rank ``r0``) while the total transmitted size is smallest. For low rank, a unit ``u``
(a layer type, or a single layer) at rank ``r`` sends ``sum r (n + m)`` floats (or ``n m`` for a
matrix that low rank would not shrink enough) with squared error
``sum ||M - M_r||_F^2``; candidates range over ``[r0 / 2, 2 r0]`` by default.

The errors are discretised into ``buckets`` steps of width ``budget / buckets`` and rounded
*up*, so the chosen total error never exceeds the budget in real terms. A knapsack over units
then minimises the total size; ties go to the lower error. Rounding up can cost the DP the
uniform choice itself (whose error *is* the budget), so a ``fallback`` (the uniform choice)
is returned when it is smaller than what the DP found. Pure numpy, deterministic: ranks that
feed it the same table get the same answer.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

__all__ = ["candidate_ranks", "lgreco_dp", "DEFAULT_BUCKETS"]

#: Error discretisation of the L-GreCo reference implementation.
DEFAULT_BUCKETS = 10_000


def candidate_ranks(rank: int, low: float = 0.5, high: float = 2.0) -> list[int]:
    """Integer ranks in ``[ceil(low * rank), floor(high * rank)]`` (at least 1), ``rank`` included.

    Example::

        >>> candidate_ranks(4)
        [2, 3, 4, 5, 6, 7, 8]
        >>> candidate_ranks(1)
        [1, 2]
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if not (0 < low <= 1 <= high):
        raise ValueError(f"rank range must satisfy 0 < low <= 1 <= high, got ({low}, {high})")
    lo, hi = max(1, math.ceil(low * rank)), max(1, math.floor(high * rank))
    return sorted(set(range(lo, hi + 1)) | {rank})


def lgreco_dp(errors, sizes, budget: float, buckets: int = DEFAULT_BUCKETS,
              fallback: Optional[Sequence[int]] = None) -> np.ndarray:
    """Choose one candidate per unit: least total size with total error <= ``budget``.

    Args:
        errors: ``(units, candidates)`` non-negative errors (``inf`` marks a missing candidate).
        sizes: ``(units, candidates)`` sizes (floats sent).
        budget: total error allowed, >= 0.
        buckets: error discretisation steps, >= 1.
        fallback: a candidate index per unit known to fit (the uniform rank, whose error is
            the budget): returned when the DP finds nothing smaller.

    Returns:
        int64 ``(units,)`` candidate indices.

    Example::

        >>> errs = np.array([[4.0, 1.0, 0.0], [4.0, 1.0, 0.0]])
        >>> sizes = np.array([[1, 2, 3], [10, 20, 30]])
        >>> lgreco_dp(errs, sizes, budget=5.0).tolist()   # spend the error where size is big
        [1, 0]
    """
    errors = np.asarray(errors, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    if errors.ndim != 2 or errors.shape != sizes.shape:
        raise ValueError(f"errors and sizes must be (units, candidates) arrays of one shape, got "
                         f"{errors.shape} and {sizes.shape}")
    units, cands = errors.shape
    if units == 0:
        return np.zeros(0, dtype=np.int64)
    if np.isnan(errors).any() or (errors < 0).any():
        raise ValueError("errors must be non-negative numbers (inf marks a missing candidate)")
    if not (isinstance(budget, (int, float, np.floating)) and budget >= 0 and math.isfinite(budget)):
        raise ValueError(f"budget must be a finite number >= 0, got {budget!r}")
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"buckets must be an int >= 1, got {buckets!r}")
    if budget == 0:
        # Only exact candidates fit: the smallest error-free one per unit.
        masked = np.where(errors == 0, sizes, np.inf)
        if np.isinf(masked.min(axis=1)).any():
            return _fallback(fallback, units)
        return masked.argmin(axis=1).astype(np.int64)
    width = budget / buckets
    with np.errstate(over="ignore", invalid="ignore"):
        steps = np.ceil(errors / width)
    feasible = np.isfinite(steps) & (steps <= buckets)
    steps = np.where(feasible, steps, 0).astype(np.int64)
    best = np.full(buckets + 1, np.inf)
    best[0] = 0.0
    choice = np.full((units, buckets + 1), -1, dtype=np.int64)
    for u in range(units):  # units x candidates vector ops over the error axis
        new = np.full(buckets + 1, np.inf)
        for c in range(cands):
            if not feasible[u, c]:
                continue
            e = steps[u, c]
            cand = best[: buckets + 1 - e] + sizes[u, c]
            better = cand < new[e:]
            new[e:][better] = cand[better]
            choice[u, e:][better] = c
        best = new
    if not np.isfinite(best).any():
        return _fallback(fallback, units)
    e = int(np.argmin(best))  # the first minimum: least size, then least error
    out = np.empty(units, dtype=np.int64)
    for u in range(units - 1, -1, -1):
        c = int(choice[u, e])
        out[u] = c
        e -= int(steps[u, c])
    if fallback is not None:
        fb = np.asarray(fallback, dtype=np.int64).reshape(units)
        if sizes[np.arange(units), fb].sum() < sizes[np.arange(units), out].sum():
            return fb
    return out


def _fallback(fallback, units: int) -> np.ndarray:
    if fallback is None:
        raise ValueError("no choice of candidates fits the error budget and no fallback was given")
    return np.asarray(fallback, dtype=np.int64).reshape(units)
