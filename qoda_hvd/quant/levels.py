"""Level sequences for unbiased stochastic quantization, and their variance theory.

A level sequence is a float32 1-D tensor ``0 = l_0 < l_1 < ... < l_{L-1} = 1`` of ``L`` levels
(``L`` counts 0 and 1; ``2 <= L <= 128``). A normalised coordinate ``u in [0, 1]`` between
``l_j <= u <= l_{j+1}`` is rounded up with probability ``(u - l_j) / (l_{j+1} - l_j)``, so its
rounding variance is ``sigma^2(u) = (l_{j+1} - u)(u - l_j)`` (ALGORITHM.md section 3).

Families:

* :func:`uniform_levels` (QSGD): ``l_j = j / (L - 1)``.
* :func:`exponential_levels` (NUQSGD): ``{0, p^(L-2), ..., p, 1}``, ``p = 1/2`` by default.
* :func:`validate_levels`: any user-given sequence, checked.
* :func:`optimal_levels` (MQV): the sequence minimising the expected rounding variance over a
  histogram of normalised coordinates, solved exactly by dynamic programming.

Histogram model. A histogram is ``B`` non-negative weights over ``B`` equal bins of ``[0, 1]``.
Each bin's mass is taken as spread *uniformly* inside the bin (a piecewise-constant density),
so :func:`expected_variance` is exact for any levels under that density, and interval costs
come in O(1) from prefix sums of ``w``, ``w c`` and ``w (c^2 + h^2 / 12)`` (``c`` bin centre,
``h = 1 / B`` bin width).

Optimal levels. Candidates are the ``B + 1`` bin edges, plus (by default) the uniform and
exponential sequences of the same count, so the optimum can never be worse than either family.
Candidates above the histogram's support are dropped (at most one level above the last
non-empty bin can carry mass, and the bin edge right above it is always a candidate), which
keeps the program small for L2-normalised buckets whose coordinates rarely exceed 0.2. With
``N`` candidates the program is ``D_k[e] = min_{e' < e} D_{k-1}[e'] + cost(e', e)`` for
``k = 1 .. L - 1`` intervals: O(L N^2) time, O(N^2) memory, each step one vectorised torch
float64 min over an ``N x N`` matrix (no loop over bins; measured 0.4 s single-threaded for
``B = 1024``, ``L = 128``, full support, 0.05 s for ``L = 8``). The
result is the exact optimum over the candidate set (verified against brute force in the tests),
computed in float64 numpy, so the same histogram gives bit-identical levels on every rank.

Example::

    >>> import torch
    >>> from qoda_hvd.quant.levels import uniform_levels, optimal_levels, expected_variance
    >>> hist = torch.exp(-torch.linspace(0, 8, 1024))     # most mass near 0
    >>> opt = optimal_levels(hist, 8)
    >>> bool(expected_variance(opt, hist) <= expected_variance(uniform_levels(8), hist))
    True
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

__all__ = [
    "MIN_BITS",
    "MAX_BITS",
    "MIN_LEVELS",
    "MAX_LEVELS",
    "num_levels_for_bits",
    "validate_num_levels",
    "uniform_levels",
    "exponential_levels",
    "validate_levels",
    "is_uniform",
    "level_candidates",
    "optimal_levels",
    "optimal_levels_sweep",
    "expected_variance",
    "level_probabilities",
    "symbol_entropy_bits",
    "eps_q",
]

MIN_BITS = 2
MAX_BITS = 8
MIN_LEVELS = 2
MAX_LEVELS = 128

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float]]


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= int(value) <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return int(value)


def num_levels_for_bits(bits: int) -> int:
    """Default level count for ``bits`` bits per symbol: ``2 ** (bits - 1)`` (one sign bit).

    Args:
        bits: bits per coordinate, in [2, 8].

    Example::

        >>> num_levels_for_bits(4)
        8
    """
    bits = _check_int("bits", bits, MIN_BITS, MAX_BITS)
    return 2 ** (bits - 1)


def validate_num_levels(num_levels: int) -> int:
    """Return ``num_levels`` as an int after checking it is in [2, 128].

    Example::

        >>> validate_num_levels(16)
        16
    """
    return _check_int("num_levels", num_levels, MIN_LEVELS, MAX_LEVELS)


def uniform_levels(num_levels: int) -> torch.Tensor:
    """QSGD levels ``j / (L - 1)``, ``j = 0 .. L-1``, as float32.

    Args:
        num_levels: ``L`` including 0 and 1, in [2, 128].

    Example::

        >>> uniform_levels(3).tolist()
        [0.0, 0.5, 1.0]
    """
    n = validate_num_levels(num_levels)
    return (torch.arange(n, dtype=torch.float64) / (n - 1)).to(torch.float32)


def exponential_levels(num_levels: int, base: float = 0.5) -> torch.Tensor:
    """NUQSGD levels ``{0, base^(L-2), ..., base, 1}`` as float32.

    Args:
        num_levels: ``L`` including 0 and 1, in [2, 128].
        base: ratio between consecutive non-zero levels, in (0, 1).

    Example::

        >>> exponential_levels(4).tolist()
        [0.0, 0.25, 0.5, 1.0]
    """
    n = validate_num_levels(num_levels)
    if not isinstance(base, (float, int)) or not 0.0 < float(base) < 1.0:
        raise ValueError(f"base must be in (0, 1), got {base}")
    powers = float(base) ** np.arange(n - 2, -1, -1, dtype=np.float64)
    levels = torch.from_numpy(np.concatenate([[0.0], powers])).to(torch.float32)
    # Deep powers of a base near 1 can collide (or underflow) in float32.
    if not bool((levels[1:] > levels[:-1]).all()):
        raise ValueError(
            f"base={base} with num_levels={n} gives levels that are not distinct in float32; "
            "use fewer levels or a smaller base"
        )
    return levels


def validate_levels(levels: ArrayLike) -> torch.Tensor:
    """Check a user-given level sequence and return it as a contiguous float32 CPU tensor.

    Args:
        levels: 1-D sequence with ``levels[0] == 0``, ``levels[-1] == 1``, strictly increasing
            (in float32), finite, of length in [2, 128].

    Example::

        >>> validate_levels([0.0, 0.1, 0.4, 1.0]).shape
        torch.Size([4])
    """
    if isinstance(levels, torch.Tensor):
        t = levels.detach().to("cpu")
    else:
        try:
            t = torch.as_tensor(np.asarray(levels, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise TypeError(f"levels must be a 1-D sequence of floats, got {type(levels).__name__}") from e
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"levels must be real floats, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"levels must be 1-D, got shape {tuple(t.shape)}")
    if not MIN_LEVELS <= t.numel() <= MAX_LEVELS:
        raise ValueError(f"len(levels) must be in [{MIN_LEVELS}, {MAX_LEVELS}], got {t.numel()}")
    t = t.to(torch.float32).contiguous()
    if not bool(torch.isfinite(t).all()):
        raise ValueError("levels must be finite")
    if float(t[0]) != 0.0 or float(t[-1]) != 1.0:
        raise ValueError(f"levels must start at 0 and end at 1, got {float(t[0])} .. {float(t[-1])}")
    if not bool((t[1:] > t[:-1]).all()):
        raise ValueError("levels must be strictly increasing (in float32)")
    return t


def is_uniform(levels: torch.Tensor) -> bool:
    """True when ``levels`` equals :func:`uniform_levels` of its length bit for bit.

    Example::

        >>> is_uniform(uniform_levels(8)), is_uniform(exponential_levels(8))
        (True, False)
    """
    return bool(torch.equal(levels.detach().to("cpu", torch.float32), uniform_levels(levels.numel())))


# ----------------------------------------------------------------------------- histograms


def _as_hist(hist: ArrayLike, name: str = "hist") -> np.ndarray:
    if isinstance(hist, torch.Tensor):
        h = hist.detach().to("cpu", torch.float64).numpy()
    else:
        h = np.asarray(hist, dtype=np.float64)
    if h.ndim != 1 or h.size < 1:
        raise ValueError(f"{name} must be a non-empty 1-D array of bin weights, got shape {h.shape}")
    if not np.all(np.isfinite(h)) or np.any(h < 0):
        raise ValueError(f"{name} must hold finite, non-negative weights")
    return h


class _Moments:
    """Cumulative moments ``M_k(x) = int_0^x f(u) u^k du`` of a piecewise-uniform density."""

    def __init__(self, hist: np.ndarray):
        b = hist.size
        self.bins = b
        self.w = hist
        edges = np.arange(b + 1, dtype=np.float64) / b
        lo, hi = edges[:-1], edges[1:]
        # Integrals of u^k over each bin, times the bin density w * B.
        self.p = [
            np.concatenate([[0.0], np.cumsum(hist)]),
            np.concatenate([[0.0], np.cumsum(hist * (hi**2 - lo**2) * b / 2.0)]),
            np.concatenate([[0.0], np.cumsum(hist * (hi**3 - lo**3) * b / 3.0)]),
        ]

    def at(self, x: np.ndarray) -> list[np.ndarray]:
        """``[M_0(x), M_1(x), M_2(x)]`` for points ``x`` in [0, 1]."""
        x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
        j = np.minimum((x * self.bins).astype(np.int64), self.bins - 1)
        a = j / self.bins
        dens = self.w[j] * self.bins
        return [self.p[k][j] + dens * (x ** (k + 1) - a ** (k + 1)) / (k + 1) for k in range(3)]


def _interval_costs(m_a: list[np.ndarray], m_b: list[np.ndarray], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``int_a^b f(u) (b - u)(u - a) du`` from cumulative moments (broadcasting)."""
    d0, d1, d2 = (m_b[k] - m_a[k] for k in range(3))
    cost = -d2 + (a + b) * d1 - a * b * d0
    return np.maximum(cost, 0.0)  # float64 cancellation can leave -1e-18


def expected_variance(levels: ArrayLike, hist: ArrayLike) -> float:
    """Expected rounding variance ``E_{u ~ hist}[sigma^2(u)]`` per coordinate.

    Exact for the piecewise-uniform density of the histogram (module docstring). The
    quantization error of a bucket is ``E||Q(v) - v||^2 = ||v||^2 sum_i sigma^2(u_i)``, so this
    times the coordinate count estimates the error per unit squared norm.

    Args:
        levels: a level sequence (see :func:`validate_levels`).
        hist: ``B`` non-negative bin weights over [0, 1]; a zero histogram gives 0.

    Example::

        >>> expected_variance([0.0, 1.0], [1.0])      # u ~ U[0,1]: E[(1-u)u] = 1/6
        0.16666666666666669
    """
    lv = validate_levels(levels).to(torch.float64).numpy()
    h = _as_hist(hist)
    total = h.sum()
    if total == 0.0:
        return 0.0
    mom = _Moments(h)
    m = mom.at(lv)
    cost = _interval_costs([x[:-1] for x in m], [x[1:] for x in m], lv[:-1], lv[1:])
    return float(cost.sum() / total)


def level_probabilities(levels: ArrayLike, hist: ArrayLike) -> np.ndarray:
    """Probability of each level index ``0 .. L-1`` after stochastic rounding of ``u ~ hist``.

    Example::

        >>> level_probabilities([0.0, 1.0], [1.0]).tolist()   # u ~ U[0,1]
        [0.5, 0.5]
    """
    lv = validate_levels(levels).to(torch.float64).numpy()
    h = _as_hist(hist)
    total = h.sum()
    if total == 0.0:
        p = np.zeros(lv.size)
        p[0] = 1.0
        return p
    m0, m1, _ = _Moments(h).at(lv)
    gap = lv[1:] - lv[:-1]
    mass = m0[1:] - m0[:-1]
    up = ((m1[1:] - m1[:-1]) - lv[:-1] * mass) / gap  # E[(u - l_j)/gap] mass on [l_j, l_j+1]
    p = np.zeros(lv.size)
    p[1:] += up
    p[:-1] += mass - up
    return np.clip(p, 0.0, None) / total


def symbol_entropy_bits(levels: ArrayLike, hist: ArrayLike) -> float:
    """Entropy in bits per coordinate of the signed symbol: ``H(level index) + P(index != 0)``.

    The sign of a non-zero symbol is taken as one fair bit. This is what an ideal entropy coder
    spends per coordinate (norms excluded).

    Example::

        >>> round(symbol_entropy_bits([0.0, 1.0], [1.0]), 3)   # H = 1 bit, sign half the time
        1.5
    """
    p = level_probabilities(levels, hist)
    nz = p[p > 0]
    return float(-(nz * np.log2(nz)).sum() + (1.0 - p[0]))


# ----------------------------------------------------------------------------- optimal levels


def level_candidates(bins: int, num_levels: int | Sequence[int] = (), include_reference: bool = True) -> np.ndarray:
    """Candidate level positions for :func:`optimal_levels`, sorted, as float64 of float32 values.

    Args:
        bins: histogram bin count ``B``; the ``B + 1`` bin edges are candidates.
        num_levels: level count(s) whose uniform and exponential sequences are added.
        include_reference: add those reference sequences (so the optimum is never worse).

    Example::

        >>> level_candidates(4, 3).tolist()
        [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    b = _check_int("bins", bins, 1, 1 << 16)
    counts = [num_levels] if isinstance(num_levels, (int, np.integer)) else list(num_levels)
    parts = [np.arange(b + 1, dtype=np.float64) / b]
    if include_reference:
        for n in counts:
            parts.append(uniform_levels(n).double().numpy())
            parts.append(exponential_levels(n).double().numpy())
    # Go through float32 so the returned levels are exactly these values after the cast.
    cand = np.unique(np.concatenate(parts).astype(np.float32)).astype(np.float64)
    return cand


class _LevelProgram:
    """The min-plus dynamic program over candidate levels for one histogram."""

    def __init__(self, hist: np.ndarray, candidates: np.ndarray, max_levels: int):
        self.hist = hist
        mom = _Moments(hist)
        nz = np.nonzero(hist)[0]
        top = (nz[-1] + 1) / hist.size if nz.size else 0.0
        # Drop candidates above the support (see module docstring), keeping at least L - 1 below 1.
        inner = candidates[candidates < 1.0]
        # Candidates are float32-rounded; compare in the same rounding, and keep one spare above.
        top32 = float(np.float32(top))
        keep = max(min(int(np.searchsorted(inner, top32, side="right")) + 1, inner.size), max_levels - 1)
        cand = np.concatenate([inner[:keep], [1.0]])
        self.cand = cand
        n = cand.size
        m = mom.at(cand)
        cost = _interval_costs(
            [x[:, None] for x in m], [x[None, :] for x in m], cand[:, None], cand[None, :]
        )
        cost[np.tril_indices(n)] = np.inf  # only a < b
        self.cost = cost
        # d[e]: best cost of k intervals covering [0, cand[e]] with a level at cand[e]. The min-plus
        # step runs in torch float64 over rows of cost^T (contiguous, one fused min+argmin pass);
        # min is exact, and ties resolve to the first index, so results are deterministic.
        cost_t = torch.from_numpy(np.ascontiguousarray(cost.T))
        d = cost_t[:, 0].clone()
        self.finals = [np.inf, float(d[-1])]  # index = number of intervals = levels - 1
        self.choices: list[np.ndarray] = []
        total = torch.empty_like(cost_t)
        for _ in range(2, max_levels):
            torch.add(cost_t, d[None, :], out=total)
            d, arg = torch.min(total, dim=1)
            self.choices.append(arg.to(torch.int32).numpy())
            self.finals.append(float(d[-1]))

    def cost_of(self, num_levels: int) -> float:
        return float(self.finals[num_levels - 1])

    def levels(self, num_levels: int) -> torch.Tensor:
        idx = [self.cand.size - 1]
        for step in range(num_levels - 3, -1, -1):  # choices[k] chose the level before interval k+2
            idx.append(int(self.choices[step][idx[-1]]))
        idx.append(0)
        out = torch.from_numpy(self.cand[idx[::-1]].astype(np.float32))
        return out


def optimal_levels_sweep(
    hist: ArrayLike, level_counts: Sequence[int], *, include_reference: bool = True
) -> dict[int, tuple[torch.Tensor, float]]:
    """Optimal levels for several counts from ONE dynamic program (used by bit allocation).

    Returns ``{L: (levels, expected_variance)}``; the variance is per coordinate as in
    :func:`expected_variance`.

    Example::

        >>> out = optimal_levels_sweep(torch.ones(64), [2, 4, 8])
        >>> [round(float(v), 4) for _, v in out.values()]
        [0.1667, 0.0185, 0.0034]
    """
    counts = sorted({validate_num_levels(n) for n in level_counts})
    if not counts:
        raise ValueError("level_counts must not be empty")
    h = _as_hist(hist)
    total = h.sum()
    if total == 0.0:  # nothing observed: nothing to optimise, fall back to uniform
        return {n: (uniform_levels(n), 0.0) for n in counts}
    if h.size + 1 < counts[-1]:
        raise ValueError(f"num_levels={counts[-1]} needs at least {counts[-1] - 1} histogram bins, got {h.size}")
    cand = level_candidates(h.size, counts, include_reference)
    prog = _LevelProgram(h, cand, counts[-1])
    return {n: (prog.levels(n), float(prog.cost_of(n) / total)) for n in counts}


def optimal_levels(
    hist: ArrayLike,
    num_levels: int,
    *,
    candidates: ArrayLike | None = None,
    include_reference: bool = True,
) -> torch.Tensor:
    """MQV levels: minimise the expected rounding variance over ``hist``, exactly.

    Args:
        hist: ``B`` non-negative bin weights of normalised coordinates over [0, 1].
        num_levels: ``L`` including 0 and 1, in [2, 128].
        candidates: explicit candidate positions (must contain 0 and 1); default: the bin edges
            plus, with ``include_reference``, the uniform and exponential sequences of ``L``.
        include_reference: see ``candidates``.

    Returns:
        float32 levels; bit-identical for the same histogram on any machine with the same numpy.
        A zero histogram gives :func:`uniform_levels`.

    Example::

        >>> optimal_levels(torch.tensor([1.0, 0, 0, 0]), 3, include_reference=False).tolist()
        [0.0, 0.25, 1.0]
    """
    n = validate_num_levels(num_levels)
    h = _as_hist(hist)
    if candidates is None:
        return optimal_levels_sweep(h, [n], include_reference=include_reference)[n][0]
    cand = np.unique(np.asarray(candidates, dtype=np.float64).astype(np.float32)).astype(np.float64)
    if cand.size == 0 or cand[0] != 0.0 or cand[-1] != 1.0:
        raise ValueError("candidates must contain 0 and 1 and lie in [0, 1]")
    if cand.size < n:
        raise ValueError(f"num_levels={n} needs at least {n} distinct candidates, got {cand.size}")
    if h.sum() == 0.0:
        return uniform_levels(n)
    return _LevelProgram(h, cand, n).levels(n)


# ----------------------------------------------------------------------------- theory


def eps_q(levels: ArrayLike, d: int, q: float = 2.0) -> float:
    """Variance bound ``eps_Q`` with ``E||Q(v) - v||^2 <= eps_Q ||v||_2^2`` (ALGORITHM.md section 3).

    ``eps_Q = max_{j>=1} (l_{j+1}-l_j)^2 / (4 l_j l_{j+1})
    + min(l_1^2 d^{2/min(q,2)} / 4, l_1 d^{1/min(q,2)})`` for a bucket of dimension ``d``
    normalised by its L_q norm (``q = inf`` for max-normalisation). The first term bounds
    coordinates at or above ``l_1`` (``sigma^2(u) <= u^2 (b-a)^2/(4ab)`` on ``[a, b]``), the
    second those below ``l_1`` (``sigma^2(u) <= min(l_1^2/4, l_1 u)``). With ``L = 2`` there is
    no first term.

    For uniform levels with ``s = L - 1`` intervals this is
    ``1/8 + min(d / (4 s^2), sqrt(d) / s)``; QSGD's own Lemma 3.1 bound
    ``min(d / s^2, sqrt(d) / s)`` (its ``s`` is also the number of intervals, i.e. ``s - 1``
    interior levels) is a different bound for that family, and neither dominates the other.

    Args:
        levels: a level sequence.
        d: bucket dimension (``min(bucket_size, numel)``), >= 1.
        q: normalisation norm, ``q >= 1`` or ``math.inf``.

    Example::

        >>> s, d = 4, 1024
        >>> eps_q(uniform_levels(s + 1), d) == 1 / 8 + min(d / (4 * s * s), d ** 0.5 / s)
        True
        >>> eps_q(exponential_levels(5), 16) == 1 / 8 + min(16 * 2**-6 / 4, 2**-3 * 4)  # NUQSGD
        True
    """
    lv = validate_levels(levels).to(torch.float64).numpy()
    d = _check_int("d", d, 1, 1 << 62)
    if not (isinstance(q, (int, float)) and (q >= 1.0)):
        raise ValueError(f"q must be in [1, inf], got {q}")
    p = min(float(q), 2.0)
    lo, hi = lv[1:-1], lv[2:]
    first = float(np.max((hi - lo) ** 2 / (4.0 * lo * hi))) if lo.size else 0.0
    l1 = float(lv[1])
    second = min(l1 * l1 * d ** (2.0 / p) / 4.0, l1 * d ** (1.0 / p))
    return first + second

