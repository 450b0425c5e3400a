"""The rounding noise: ONE counter-based generator, defined here and nowhere else.

Stochastic rounding needs one uniform number per coordinate. It is a pure function of
``(seed, rank, step, phase)`` (the *stream*) and the coordinate's index ``i`` in its buffer (the
*counter*), so:

- the CPU kernels (numba), the GPU kernels (Triton) and the numpy reference below compute the
  same bits for the same coordinate, whatever the threads, blocks or chunking;
- a run resumed at step ``t`` draws what the uninterrupted run drew;
- a buffer quantized in K chunks draws what it draws whole (the counter is the global index).

Definition (all arithmetic modulo 2**32 on unsigned 32-bit words)::

    k0, k1 = stream_key(seed, rank, step, phase)          # host side, splitmix64 chain
    h      = mix32(mix32((i mod 2**32) XOR k0) + floor(i / 2**32)) XOR k1)
    r      = (h >> 8) / 2**24                             # in [0, 1), 24 bits, exact in float32

``mix32`` is the ``lowbias32`` integer hash (C. Wellons' hash prospector: two xor-shift-multiply
rounds, one of the least biased 32-bit hashes of that cost). A coordinate rounds up exactly when
``r < p`` with ``p`` its fractional position between two levels, so the rounding probability is
exact up to ``2**-24`` (24 bits, the float32 mantissa), a bias far below anything training can
resolve.

Why not Philox (Triton's ``tl.rand``, curand)? Its 10 rounds of 32x32->64 products cost more
than the rest of the quantizer on a CPU core, and what it buys (crypto-grade independence) is
not needed for rounding noise; two hash rounds keyed per stream pass the statistical tests this
project cares about (unbiasedness, decorrelation across ranks and steps; see the tests).

Example::

    >>> k = stream_key(0, 1, 5)
    >>> r = uniform_reference(k, 0, 4)
    >>> r.dtype, bool(((r >= 0) & (r < 1)).all())
    (dtype('float32'), True)
"""
from __future__ import annotations

import numpy as np

__all__ = ["PHASE_QUANTIZE", "PHASE_REQUANTIZE", "stream_key", "mix32_reference",
           "uniform_reference", "MIX_M1", "MIX_M2"]

#: Multipliers of ``mix32`` (lowbias32).
MIX_M1 = 0x7FEB352D
MIX_M2 = 0x846CA68B
#: Phases: the first quantization of a step, and scatter_gather's re-quantization of the sum
#: (its noise must be independent of the first one's).
PHASE_QUANTIZE = 0
PHASE_REQUANTIZE = 1

_M64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def stream_key(seed: int, rank: int, step: int, phase: int = PHASE_QUANTIZE) -> tuple[int, int]:
    """The two 32-bit key words of the stream ``(seed, rank, step, phase)``.

    Args:
        seed: the run's noise seed (``Compression.layerwise(seed=...)``), any int >= 0.
        rank: the rank quantizing.
        step: the exchange step.
        phase: :data:`PHASE_QUANTIZE` or :data:`PHASE_REQUANTIZE`.

    Example::

        >>> stream_key(0, 0, 0) != stream_key(0, 1, 0)
        True
    """
    for name, v in (("seed", seed), ("rank", rank), ("step", step), ("phase", phase)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    z = _splitmix64(int(seed) & _M64)
    for v in (rank, step, phase):
        z = _splitmix64(z ^ (int(v) & _M64))
    return z & 0xFFFFFFFF, z >> 32


def mix32_reference(x: np.ndarray) -> np.ndarray:
    """``lowbias32`` on a uint32 array (numpy reference of the kernels' hash)."""
    x = x.astype(np.uint32, copy=True)
    x ^= x >> np.uint32(16)
    x *= np.uint32(MIX_M1)
    x ^= x >> np.uint32(15)
    x *= np.uint32(MIX_M2)
    x ^= x >> np.uint32(16)
    return x


def uniform_reference(key: tuple[int, int], start: int, n: int) -> np.ndarray:
    """The noise ``r`` of coordinates ``start .. start + n - 1`` (float32), by the definition.

    Example::

        >>> k = stream_key(3, 0, 0)
        >>> bool((uniform_reference(k, 10, 5) == uniform_reference(k, 0, 15)[10:]).all())
        True
    """
    i = np.arange(start, start + n, dtype=np.uint64)
    lo = (i & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    hi = (i >> np.uint64(32)).astype(np.uint32)
    h = mix32_reference(lo ^ np.uint32(key[0]))
    h = mix32_reference((h + hi) ^ np.uint32(key[1]))
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)
