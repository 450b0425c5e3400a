"""Level tables of the kernels: what a level sequence turns into before any coordinate is seen.

Both kernel families (:mod:`.cpu`, :mod:`.gpu`) read the same float32 tables, so they do the same
float32 operations in the same order and produce the same symbols bit for bit.

A coordinate's position on the level axis is ``t = u * slope[c] + offset[c]`` with ``u = |x| /
norm`` and ``c`` the *leaf* of ``u``: ``c = min(bits(u) >> shift, last_cell)`` (the float32 bit
pattern of ``u >= 0`` is monotone in ``u``, so this cuts ``[0, 1]`` into cells that are
log-spaced near 0, where non-uniform levels crowd), then ``steps`` times ``c = 2 c + (u >=
bounds[k, c])`` to walk the levels inside the cell. ``slope = 1 / (l_{j+1} - l_j)`` and
``offset = j - l_j * slope`` of the leaf's interval ``j``. Uniform levels skip all of it:
``t = |x| * ((L - 1) / norm)``.

Up to 16 non-uniform levels (5 bits, the common case) use no table lookup at all: ``t`` is the
piecewise-linear sum ``sum_k min(max((u - l_k) * s_k, 0), 1)`` over the intervals in order,
padded to ``terms`` = 7 or 15 intervals with ``l_k = +inf`` (a zero term). A fixed number of
compare-free terms vectorizes where per-coordinate table gathers do not (3-4x faster on a CPU
core); the float32 sum is exact in its integer part, and both kernel families add the terms in
the same order.

Example::

    >>> from qoda_hvd.quant import exponential_levels, uniform_levels
    >>> level_table(uniform_levels(8)).uniform, level_table(exponential_levels(8)).steps
    (True, 0)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qoda_hvd.quant.levels import is_uniform, validate_levels

__all__ = ["LevelTable", "level_table", "value_table", "packed_size", "TINY_NORM"]

#: Most walking steps a table may need; 2**7 = 128 levels fit in one cell at worst.
MAX_STEPS = 7
#: Buckets with a smaller norm quantize to zero ((L-1)/norm would overflow float32).
TINY_NORM = 4e-37


def packed_size(numel: int, width: int) -> int:
    """Bytes of ``numel`` packed symbols of ``width`` bits.

    Example::

        >>> packed_size(3, 4), packed_size(8, 3)
        (2, 3)
    """
    return -(-numel * width // 8)


@dataclass(frozen=True, eq=False)
class LevelTable:
    """float32 tables for one level sequence (see the module docstring).

    Attributes:
        levels: float32 ``[L]``, ``0 = l_0 < ... < l_{L-1} = 1``.
        num_levels: ``L``.
        width: bits per packed symbol, ``ceil(log2(2L - 1))``.
        uniform: levels are ``j / (L - 1)``.
        shift, last_cell, steps: the cell grid (unused when uniform).
        bounds: float32 ``[max(steps, 1), (last_cell + 1) << steps]``; row ``k`` holds
            ``(last_cell + 1) << k`` entries (the rest is padding).
        slope, offset: float32 ``[(last_cell + 1) << steps]``.
        values: float32 ``[2**width]``: packed value -> ``sign * level`` (NaN where invalid).
        terms: 7 or 15 when ``t`` is the interval sum (non-uniform, ``L <= 16``), else 0.
        term_lo, term_scale: float32 ``[15]``: ``l_k`` (``+inf`` past the last interval) and
            ``1 / (l_{k+1} - l_k)`` (1 past it).
    """

    levels: np.ndarray
    num_levels: int
    width: int
    uniform: bool
    shift: int
    last_cell: int
    steps: int
    bounds: np.ndarray
    slope: np.ndarray
    offset: np.ndarray
    values: np.ndarray
    terms: int = 0
    term_lo: np.ndarray = None  # type: ignore[assignment]
    term_scale: np.ndarray = None  # type: ignore[assignment]


def _terms(levels: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    n = levels.size
    lo = np.full(15, np.inf, np.float32)
    scale = np.ones(15, np.float32)
    if n > 16:
        return 0, lo, scale
    d = levels.astype(np.float64)
    lo[:n - 1] = levels[:-1]
    scale[:n - 1] = (1.0 / (d[1:] - d[:-1])).astype(np.float32)
    return (7 if n <= 8 else 15), lo, scale


def value_table(levels: np.ndarray, width: int) -> np.ndarray:
    """Packed value ``v`` -> ``sign * l_|v - (L-1)|`` as float32; NaN for ``v > 2L - 2``."""
    n = levels.size
    out = np.full(1 << width, np.nan, dtype=np.float32)
    out[n - 1:2 * n - 1] = levels
    out[:n - 1] = -levels[:0:-1]
    return out


def level_table(levels) -> LevelTable:
    """Build the :class:`LevelTable` of ``levels`` (anything :func:`validate_levels` takes).

    Args:
        levels: the level sequence, ``L`` in [2, 128].
    """
    from qoda_hvd.quant.quantizer import _CellTable  # the cell grid search is shared with it

    lv = validate_levels(levels).cpu()
    n = lv.numel()
    width = (2 * n - 2).bit_length()
    values = value_table(lv.numpy().astype(np.float32), width)
    if is_uniform(lv) or n == 2:
        one = np.zeros((1, 1), np.float32)
        return LevelTable(lv.numpy().astype(np.float32), n, width, True, 0, 0, 0, one,
                          np.zeros(1, np.float32), np.zeros(1, np.float32), values, 0,
                          *_terms(np.zeros(17, np.float32))[1:])
    d = lv.double()
    slope = 1.0 / (d[1:] - d[:-1])
    offset = torch.arange(n - 1, dtype=torch.float64) - d[:-1] * slope
    cells = _CellTable.build(lv.float(), slope.float(), offset.float(), max_steps=MAX_STEPS)
    if cells is None:  # cannot happen for L <= 128 (a cell holds at most L - 2 levels)
        raise ValueError(f"levels need more than {MAX_STEPS} steps per cell: {lv.tolist()}")
    steps = len(cells.bounds)
    leaves = (cells.last_cell + 1) << steps
    bounds = np.full((max(steps, 1), leaves), np.inf, dtype=np.float32)
    for k, b in enumerate(cells.bounds):  # row k is read at the partially walked index
        bounds[k, :b.numel()] = b.numpy()
    return LevelTable(lv.numpy().astype(np.float32), n, width, False, cells.shift, cells.last_cell,
                      steps, np.ascontiguousarray(bounds), cells.slope.numpy().astype(np.float32),
                      cells.offset.numpy().astype(np.float32), values,
                      *_terms(lv.numpy().astype(np.float32)))
