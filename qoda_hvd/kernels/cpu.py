"""CPU kernels (numba): quantize + pack in one pass, unpack + dequantize + accumulate in one pass.

Why numba: the quantizer is memory-bound (it reads 4 bytes and writes half a byte per
coordinate), so what counts is touching each coordinate once. Written in torch ops it makes a
pass per operation (norm, divide, noise, floor, compare, pack: 7.3 ns/coordinate measured;
``torch.compile`` of the same math 6.7 ns and it cannot take an explicit generator), while one
numba loop per bucket, with the bucket in L1 cache, runs near the memory floor (see
``bench/bench_codec.py``). numba is a well-kept JIT made for exactly this, CPU only, ~50 MB.

Work is split into contiguous ranges of buckets, one per thread (``threads``), each range a
whole number of 8-symbol groups so no two threads write the same packed byte. Inside a range a
bucket is: (1) its norm, (2) its symbols into an L1-resident scratch, (3) packing. The L2 norm is
a pairwise tree over the squares padded to a power of two (adjacent pairs first), the order the
GPU kernels use too, so both get the same float32 norm; the noise is :mod:`.rng`'s.

Packed layout (the wire format's ``fixed`` body): value ``v = symbol + L - 1`` in ``[0, 2L-2]``,
``width`` bits each, MSB first; the last byte is padded with 1 bits.

Example::

    >>> import numpy as np
    >>> from qoda_hvd.kernels import level_table, stream_key
    >>> from qoda_hvd.kernels.cpu import quantize_pack, dequantize_into
    >>> from qoda_hvd.quant import uniform_levels
    >>> t = level_table(uniform_levels(8))
    >>> x = np.linspace(-1, 1, 3000).astype(np.float32)
    >>> packed, norms, bad = quantize_pack(x, t, 1024, "l2", stream_key(0, 0, 0))
    >>> packed.size, norms.size
    (1500, 3)
    >>> out = np.zeros_like(x)
    >>> dequantize_into(packed, norms, t, 1024, out, accumulate=False)  # invalid values found
    0
    >>> gap = np.repeat(norms, 1024)[:3000] / 7   # one level step, per coordinate
    >>> bool((np.abs(out - x) <= gap * 1.0001).all())
    True
"""
from __future__ import annotations

import math
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from qoda_hvd.kernels.tables import TINY_NORM as _TINY_NORM
from qoda_hvd.kernels.tables import LevelTable, packed_size

__all__ = ["quantize_pack", "dequantize_into", "packed_size", "work_ranges", "default_threads"]

# numba types mixed signed/unsigned 64-bit arithmetic as float64: every constant of the hash is
# a uint64 so the whole hash stays in unsigned integers.
_M32 = np.uint64(0xFFFFFFFF)
_MIX1 = np.uint64(0x7FEB352D)
_MIX2 = np.uint64(0x846CA68B)
_S15, _S16, _S32, _S8 = np.uint64(15), np.uint64(16), np.uint64(32), np.uint64(8)
_U2 = np.uint64(2)


def _group_buckets(bucket: int) -> int:
    """Buckets per work unit: the fewest whole buckets holding a multiple of 8 symbols."""
    return 8 // math.gcd(bucket, 8)


def work_ranges(num_buckets: int, bucket: int, threads: int) -> np.ndarray:
    """``threads + 1`` bucket bounds splitting the buckets into per-thread ranges whose starts
    are multiples of 8 symbols (the packing's group)."""
    g = _group_buckets(bucket)
    units = -(-num_buckets // g)
    t = max(1, min(int(threads), units))
    b = (np.arange(t + 1, dtype=np.int64) * units // t) * g
    b[-1] = num_buckets
    return np.minimum(b, num_buckets)


@intrinsic
def _f32_bits(typingctx, val):
    """The int32 bit pattern of a float32 (a bitcast LLVM can vectorize)."""
    if val != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@njit(inline="always")
def _mix32(x):
    x ^= x >> _S16
    x = (x * _MIX1) & _M32
    x ^= x >> _S15
    x = (x * _MIX2) & _M32
    x ^= x >> _S16
    return x


@njit(inline="always")
def _noise(i, k0, k1):
    h = _mix32((i & _M32) ^ k0)
    h = _mix32(((h + (i >> _S32)) & _M32) ^ k1)
    return np.float32(h >> _S8) * np.float32(5.9604644775390625e-08)  # 2**-24


@njit(cache=True, nogil=True)
def _bucket_norm(x, s, e, linf, sq, p2):
    if linf:
        m = np.float32(0.0)
        for i in range(s, e):
            a = abs(x[i])
            if a > m or a != a:  # NaN wins, like the L2 sum
                m = a
        return m
    xs = x[s:e]
    k = xs.size
    for i in range(k):
        sq[i] = xs[i] * xs[i]
    for i in range(k, p2):
        sq[i] = np.float32(0.0)
    m = p2
    while m > 1:  # pairwise tree, adjacent pairs first (the GPU kernels' order)
        m //= 2
        for i in range(m):
            sq[i] = sq[2 * i] + sq[2 * i + 1]
    return np.float32(math.sqrt(sq[0]))


@njit(inline="always")
def _cell(u, shift):
    """``bits(u) >> shift`` as an unsigned index (u >= 0): unsigned indices need no negative
    wrap-around check, which keeps the table lookups vectorizable."""
    return np.uint64(np.uint32(_f32_bits(u))) >> shift


@njit(inline="always")
def _round_value(v, t, top, counter, k0, k1, L):
    """Stochastic rounding of position ``t`` (clamped to the top level), as a packed value."""
    t = min(t, top)
    f = np.floor(t)
    m = np.int32(f) + np.int32(_noise(counter, k0, k1) < t - f)
    return np.uint8(L - 1 + m) if v >= 0 else np.uint8(L - 1 - m)


@njit(cache=True, nogil=True)
def _symbols(xs, nrm, first, k0, k1, L, uniform, shift, last_cell, steps, bounds, slope, offset,
             terms, term_lo, term_scale, vals):
    """Values ``symbol + L - 1`` of the bucket ``xs`` into ``vals`` (same length); ``first`` is
    the counter of ``xs[0]``. Returns 1 if the norm is NaN/Inf. (Slices, not offsets: indices
    from ``range`` are provably non-negative, which lets LLVM vectorize the loops.)"""
    zero = np.uint8(L - 1)
    k = xs.size
    if not (nrm == nrm) or nrm == np.inf or nrm < _TINY_NORM:
        for i in range(k):
            vals[i] = zero
        return 0 if nrm < _TINY_NORM else 1
    top = np.float32(L - 1)
    first = np.uint64(first)
    if uniform:
        scale = top / nrm
        for i in range(k):
            v = xs[i]
            t = min(abs(v) * scale, top)
            f = np.floor(t)
            up = _noise(first + np.uint64(i), k0, k1) < t - f
            m = np.int32(f) + np.int32(up)
            vals[i] = np.uint8(L - 1 + m) if v >= 0 else np.uint8(L - 1 - m)
    else:
        inv = np.float32(1.0) / nrm
        if terms == 7:
            for i in range(k):
                v = xs[i]
                u = abs(v) * inv
                t = np.float32(0.0)
                for q in range(7):  # fixed count: unrolled and vectorized
                    t += min(max((u - term_lo[q]) * term_scale[q], np.float32(0.0)), np.float32(1.0))
                vals[i] = _round_value(v, t, top, first + np.uint64(i), k0, k1, L)
            return 0
        if terms == 15:
            for i in range(k):
                v = xs[i]
                u = abs(v) * inv
                t = np.float32(0.0)
                for q in range(15):
                    t += min(max((u - term_lo[q]) * term_scale[q], np.float32(0.0)), np.float32(1.0))
                vals[i] = _round_value(v, t, top, first + np.uint64(i), k0, k1, L)
            return 0
        # the walk inside a cell unrolled by its (table-wide) depth: a loop of variable trip
        # count inside the coordinate loop keeps LLVM from vectorizing it
        if steps == 0:
            for i in range(k):
                v = xs[i]
                u = abs(v) * inv
                c = min(_cell(u, shift), last_cell)
                vals[i] = _round_value(v, u * slope[c] + offset[c], top, first + np.uint64(i),
                                       k0, k1, L)
        elif steps == 1:
            b0 = bounds[0]
            for i in range(k):
                v = xs[i]
                u = abs(v) * inv
                c = min(_cell(u, shift), last_cell)
                c = _U2 * c + np.uint64(u >= b0[c])
                vals[i] = _round_value(v, u * slope[c] + offset[c], top, first + np.uint64(i),
                                       k0, k1, L)
        elif steps == 2:
            b0 = bounds[0]
            b1 = bounds[1]
            for i in range(k):
                v = xs[i]
                u = abs(v) * inv
                c = min(_cell(u, shift), last_cell)
                c = _U2 * c + np.uint64(u >= b0[c])
                c = _U2 * c + np.uint64(u >= b1[c])
                vals[i] = _round_value(v, u * slope[c] + offset[c], top, first + np.uint64(i),
                                       k0, k1, L)
        else:
            for i in range(k):
                v = xs[i]
                u = abs(v) * inv
                c = min(_cell(u, shift), last_cell)
                for j in range(steps):
                    c = _U2 * c + np.uint64(u >= bounds[j, c])
                vals[i] = _round_value(v, u * slope[c] + offset[c], top, first + np.uint64(i),
                                       k0, k1, L)
    return 0


@njit(cache=True, nogil=True)
def _pack(vals, count, width, out, byte0):
    """Pack vals[:count] (count a multiple of 8, or the tail) at out[byte0:], MSB first."""
    if width == 8:
        for i in range(count):
            out[byte0 + i] = vals[i]
        return
    if width == 4:
        half = count // 2
        for j in range(half):
            out[byte0 + j] = (vals[2 * j] << 4) | vals[2 * j + 1]
        if count & 1:
            out[byte0 + half] = (vals[count - 1] << 4) | 0x0F
        return
    if width == 2:
        q = count // 4
        for j in range(q):
            out[byte0 + j] = ((vals[4 * j] << 6) | (vals[4 * j + 1] << 4)
                              | (vals[4 * j + 2] << 2) | vals[4 * j + 3])
        r = count - 4 * q
        if r:
            acc = 0
            for k in range(4):
                acc = (acc << 2) | (vals[4 * q + k] if k < r else 3)
            out[byte0 + q] = acc
        return
    full = count // 8
    for g in range(full):
        acc = np.uint64(0)
        for k in range(8):
            acc = (acc << np.uint64(width)) | np.uint64(vals[8 * g + k])
        for b in range(width):
            out[byte0 + g * width + b] = np.uint8((acc >> np.uint64(8 * (width - 1 - b))) & np.uint64(0xFF))
    r = count - 8 * full
    if r:
        acc = np.uint64(0)
        pad = np.uint64((1 << width) - 1)
        for k in range(8):
            acc = (acc << np.uint64(width)) | (np.uint64(vals[8 * full + k]) if k < r else pad)
        nbytes = (r * width + 7) // 8
        for b in range(nbytes):
            out[byte0 + full * width + b] = np.uint8((acc >> np.uint64(8 * (width - 1 - b))) & np.uint64(0xFF))


@njit(cache=True, nogil=True, parallel=True)
def _quantize_pack_kernel(x, n, base, bucket, linf, k0, k1, L, width, uniform, shift, last_cell,
                          steps, bounds, slope, offset, terms, term_lo, term_scale, ranges, out,
                          norms):
    nthreads = ranges.size - 1
    bad = np.zeros(nthreads, dtype=np.int64)
    p2 = 1
    while p2 < bucket:
        p2 *= 2
    g8 = 1
    while (g8 * bucket) % 8:
        g8 += 1
    for t in prange(nthreads):
        sq = np.empty(p2, dtype=np.float32)
        vals = np.empty(g8 * bucket, dtype=np.uint8)
        b = ranges[t]
        while b < ranges[t + 1]:
            nb = min(g8, ranges[t + 1] - b)
            o = 0
            for j in range(nb):
                s = (b + j) * bucket
                e = min(s + bucket, n)
                nrm = _bucket_norm(x, s, e, linf, sq, p2)
                norms[b + j] = nrm
                bad[t] += _symbols(x[s:e], nrm, base + s, k0, k1, L, uniform, shift,
                                   last_cell, steps, bounds, slope, offset, terms, term_lo,
                                   term_scale, vals[o:o + e - s])
                o += e - s
            _pack(vals, o, width, out, (b * bucket * width) // 8)
            b += nb
    return bad.sum()


@njit(cache=True, nogil=True)
def _dequantize_bucket(packed, s, e, width, values, vmax, nrm, out, accumulate):
    """out[s:e] (+)= values[v_i] * nrm; returns the count of values above ``vmax`` (invalid).
    The loops index slices from 0 and keep the accumulate branch outside them, so LLVM can
    vectorize them; invalid values are counted branch-free."""
    bad = 0
    o = out[s:e]
    k = e - s
    if width == 4 and (s & 1) == 0:
        pb = packed[s >> 1:(e + 1) >> 1]
        half = k >> 1
        if accumulate:
            for q in range(half):
                byte = np.int64(pb[q])
                hi = byte >> 4
                lo = byte & 0x0F
                bad += np.int64(hi > vmax) + np.int64(lo > vmax)
                o[2 * q] += values[hi] * nrm
                o[2 * q + 1] += values[lo] * nrm
        else:
            for q in range(half):
                byte = np.int64(pb[q])
                hi = byte >> 4
                lo = byte & 0x0F
                bad += np.int64(hi > vmax) + np.int64(lo > vmax)
                o[2 * q] = values[hi] * nrm
                o[2 * q + 1] = values[lo] * nrm
        if k & 1:
            v = np.int64(pb[half]) >> 4
            bad += np.int64(v > vmax)
            o[k - 1] = (o[k - 1] + values[v] * nrm) if accumulate else values[v] * nrm
        return bad
    if width == 8:
        pb = packed[s:e]
        if accumulate:
            for q in range(k):
                v = np.int64(pb[q])
                bad += np.int64(v > vmax)
                o[q] += values[v] * nrm
        else:
            for q in range(k):
                v = np.int64(pb[q])
                bad += np.int64(v > vmax)
                o[q] = values[v] * nrm
        return bad
    mask = (1 << width) - 1
    full = 0
    if (s & 7) == 0:  # whole 8-value groups: ``width`` bytes -> one word -> eight values
        groups = k >> 3
        b0 = (s >> 3) * width
        for g in range(groups):
            word = np.int64(0)
            for b in range(width):
                word = (word << 8) | np.int64(packed[b0 + g * width + b])
            for j in range(8):
                v = (word >> (width * (7 - j))) & mask
                bad += np.int64(v > vmax)
                y = values[v] * nrm
                o[8 * g + j] = o[8 * g + j] + y if accumulate else y
        full = groups << 3
    for q in range(full, k):
        bit = (s + q) * width
        byte = bit >> 3
        sh = bit & 7
        word = np.int64(packed[byte]) << 8
        if sh + width > 8:
            word |= np.int64(packed[byte + 1])
        v = (word >> (16 - sh - width)) & mask
        bad += np.int64(v > vmax)
        y = values[v] * nrm
        o[q] = o[q] + y if accumulate else y
    return bad


@njit(cache=True, nogil=True, parallel=True)
def _dequantize_kernel(packed, norms, n, bucket, width, values, vmax, ranges, out, accumulate):
    """out[i] (+)= values[v_i] * norm; returns the count of invalid values (> vmax)."""
    nthreads = ranges.size - 1
    bad = np.zeros(nthreads, dtype=np.int64)
    for t in prange(nthreads):
        for bk in range(ranges[t], ranges[t + 1]):
            s = bk * bucket
            e = min(s + bucket, n)
            bad[t] += _dequantize_bucket(packed, s, e, width, values, vmax, norms[bk], out,
                                         accumulate)
    return bad.sum()


# One thread (the default under a launcher): the same kernels compiled without the threading
# layer, which costs a pool hand-off per call and, when numba falls back to its "workqueue"
# layer (no OpenMP/TBB runtime), may not be entered from two threads at once.
def _twin(fn, name: str):
    """``fn`` under another name: numba's on-disk cache is keyed by the function's qualified
    name and line, so a serial twin compiled from the parallel kernel's own function would share
    its cache file and load whichever variant was cached first."""
    import types as pytypes

    code = fn.__code__.replace(co_name=name, co_qualname=name) if hasattr(
        fn.__code__, "co_qualname") else fn.__code__.replace(co_name=name)
    twin = pytypes.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    twin.__qualname__ = name
    return twin


_quantize_pack_serial = njit(cache=True, nogil=True)(
    _twin(_quantize_pack_kernel.py_func, "_quantize_pack_serial"))
_dequantize_serial = njit(cache=True, nogil=True)(
    _twin(_dequantize_kernel.py_func, "_dequantize_serial"))
_PARALLEL_LOCK = threading.Lock()


def _parallel(kernel, *args):
    """Run a parallel kernel; serialised only under numba's thread-unsafe workqueue layer."""
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        layer = None
    if layer == "workqueue":
        with _PARALLEL_LOCK:
            return kernel(*args)
    return kernel(*args)


_LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "HOROVOD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                    "PMI_LOCAL_SIZE", "LOCAL_WORLD_SIZE")


def default_threads() -> int:
    """Threads a rank's kernels use by default: torch's intra-op setting, capped by the cores
    this rank has to itself (cores / ranks on this node, from the launcher's environment), so
    ranks sharing a node never oversubscribe it (spinning OpenMP threads fighting over cores
    made a 4-bit exchange take seconds)."""
    import os

    import torch

    local = 1
    for var in _LOCAL_SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            local = max(1, int(os.environ[var]))
            break
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores // local))


def _threads(threads: int | None) -> int:
    if threads is None:
        threads = default_threads()
    return max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))


def quantize_pack(x: np.ndarray, table: LevelTable, bucket_size: int, norm: str,
                  key: tuple[int, int], *, base: int = 0, threads: int | None = None,
                  out: np.ndarray | None = None, norms: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """Quantize float32 ``x`` and pack its symbols in one pass.

    Args:
        x: float32, 1-D, contiguous.
        table: the levels' :class:`~qoda_hvd.kernels.tables.LevelTable`.
        bucket_size: coordinates per norm.
        norm: ``"l2"`` or ``"linf"``.
        key: the noise stream (:func:`~qoda_hvd.kernels.rng.stream_key`).
        base: counter of ``x[0]`` (its index in the whole buffer, when ``x`` is a chunk).
        threads: worker threads (default: :func:`default_threads`).
        out, norms: optional outputs (uint8 ``packed_size``, float32 buckets).

    Returns:
        ``(packed, norms, bad)``: ``bad`` counts buckets whose norm is NaN/Inf (their symbols
        are zero, their norm is kept).
    """
    n = x.size
    nb = -(-n // bucket_size)
    if out is None:
        out = np.empty(packed_size(n, table.width), dtype=np.uint8)
    if norms is None:
        norms = np.empty(nb, dtype=np.float32)
    if n == 0:
        return out, norms, 0
    nthreads = _threads(threads)
    ranges = work_ranges(nb, bucket_size, nthreads)
    if ranges.size > 2:
        numba.set_num_threads(nthreads)
        kernel = lambda *a: _parallel(_quantize_pack_kernel, *a)  # noqa: E731
    else:
        kernel = _quantize_pack_serial
    bad = kernel(x, n, base, bucket_size, norm == "linf", np.uint64(key[0]),
                                np.uint64(key[1]),
                                table.num_levels, table.width, table.uniform,
                                np.uint64(table.shift), np.uint64(table.last_cell), table.steps,
                                table.bounds, table.slope, table.offset, table.terms,
                                table.term_lo, table.term_scale, ranges, out, norms)
    return out, norms, int(bad)


def dequantize_into(packed: np.ndarray, norms: np.ndarray, table: LevelTable, bucket_size: int,
                    out: np.ndarray, *, accumulate: bool, threads: int | None = None) -> int:
    """``out (+)= sign * level * norm`` from packed symbols, in one pass, no temporaries.

    Args:
        packed: uint8, ``packed_size(out.size, table.width)`` bytes.
        norms: float32 per bucket.
        table: the sender's levels.
        bucket_size: coordinates per norm.
        out: float32, 1-D, contiguous; written in place.
        accumulate: add into ``out`` instead of overwriting it.
        threads: worker threads (default: :func:`default_threads`).

    Returns:
        The number of invalid packed values (``> 2L - 2``); 0 for an honest payload.
    """
    n = out.size
    if n == 0:
        return 0
    nthreads = _threads(threads)
    ranges = work_ranges(norms.size, bucket_size, nthreads)
    args = (packed, norms, n, bucket_size, table.width, table.values, 2 * table.num_levels - 2,
            ranges, out, accumulate)
    if ranges.size > 2:
        numba.set_num_threads(nthreads)
        return int(_parallel(_dequantize_kernel, *args))
    return int(_dequantize_serial(*args))
