"""GPU kernels (Triton): the same two passes as :mod:`.cpu`, the same bits.

Three kernels, each a plain 1-D grid:

- ``_norms``: one program per bucket; the L2 norm is the pairwise tree of :mod:`.cpu` (squares
  padded to a power of two, adjacent pairs first) written out level by level with
  ``reshape``/``split``, so the float32 result equals the CPU's; L-inf is a max. A bucket
  wider than ``_NORM_TILE`` is read in aligned tiles of that size: each tile's tree is a subtree
  of the bucket's, so the tiles' sums, combined by the same pairwise tree, give the same bits,
  and no block exceeds Triton's limit of 2**20 elements whatever ``bucket_size``.
- ``_quantize_pack``: one program per ``GROUPS * 8`` coordinates: read each coordinate's bucket
  norm, hash its noise (:mod:`.rng`), round, and pack eight ``width``-bit values into ``width``
  bytes (MSB first, as the wire format's ``fixed`` body).
- ``_dequantize``: one program per block of coordinates: unpack, look the value up, scale by the
  norm, add into the output, and add the count of packed values outside the alphabet to a
  device counter (read by the caller when it chooses: no host sync here).

Index arithmetic is 64-bit wherever it can pass 2**31: program offsets (``program_id`` widened
before the multiply), coordinate, bit and byte indices, and the packed byte count
(:func:`_packed_bytes`; Triton types an int argument below 2**31 as int32, so ``n * WIDTH``
in int32 would wrap from ``2**31 / WIDTH`` coordinates on: 537M at 4 bits).

Exactness across devices: divisions and square roots are the IEEE-rounded ones
(``tl.div_rn``, ``tl.sqrt_rn``, never the approximate defaults), and kernels launch with
``enable_fp_fusion=False`` so no multiply-add is contracted into an FMA (numba does not contract
either).

Where the data is: these functions take and return device tensors and never synchronize with
the host. The exchange around them (:mod:`.dispatch`) copies the packed bytes and norms (the
payload's content, ``width / 32`` of the gradient plus one float per bucket) to the host for the
entropy stage and the collective, and a received payload's bytes and norms back to the device
for decoding; the gradient itself does not leave the device.

Without a GPU, ``TRITON_INTERPRET=1`` (set before this module is imported) runs the same kernels
on CPU tensors with numpy; the tests compare them with :mod:`.cpu` bit for bit that way.

Example (on a GPU)::

    >>> from qoda_hvd.kernels import level_table, stream_key              # doctest: +SKIP
    >>> from qoda_hvd.kernels.gpu import quantize_pack, dequantize_into   # doctest: +SKIP
    >>> t = level_table(torch.linspace(0, 1, 8))                          # doctest: +SKIP
    >>> x = torch.randn(4096, device="cuda")                              # doctest: +SKIP
    >>> packed, norms, bad = quantize_pack(x, t, 1024, "l2", stream_key(0, 0, 0))  # doctest: +SKIP
    >>> out = torch.zeros_like(x)                                         # doctest: +SKIP
    >>> int(dequantize_into(packed, norms, t, 1024, out, accumulate=False))  # doctest: +SKIP
    0
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qoda_hvd.kernels.tables import TINY_NORM, LevelTable, packed_size

__all__ = ["quantize_pack", "dequantize_into", "packed_size", "grids", "MAX_GRID"]

_GROUPS = 128  # 8-coordinate groups per quantize program (1024 coordinates)
_DEQ_BLOCK = 1024
#: Elements a norm program reads at once (a power of two; wider buckets loop over tiles).
_NORM_TILE = 1 << 12
#: CUDA's limit on a grid's x dimension (programs of one launch).
MAX_GRID = (1 << 31) - 1
# compiled Triton kernels may read only constexpr globals (the interpreter does not check)
_TINY_NORM = tl.constexpr(TINY_NORM)


@triton.jit
def _mix32(x):
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _packed_bytes(n, WIDTH: tl.constexpr):
    """Bytes of ``n`` packed ``WIDTH``-bit fields, in int64."""
    # tl.cast, not .to: Triton turns an int argument equal to 1 into a constexpr
    return (tl.cast(n, tl.int64) * WIDTH + 7) // 8


@triton.jit
def _program_start(BLOCK: tl.constexpr):
    """First index of this program's block, in int64 (``program_id`` is int32)."""
    return tl.program_id(0).to(tl.int64) * BLOCK


@triton.jit
def _tree_sum(s, LOG2: tl.constexpr):
    """Sum of ``2**LOG2`` values, adjacent pairs first (the CPU kernel's tree); shape [1]."""
    for _ in tl.static_range(LOG2):
        s = tl.reshape(s, (s.shape[0] // 2, 2))
        lo, hi = tl.split(s)
        s = lo + hi
    return s


@triton.jit
def _norms_kernel(x_ptr, norms_ptr, n, bucket, LINF: tl.constexpr, TILE: tl.constexpr,
                  LOG2_TILE: tl.constexpr, TILES: tl.constexpr, LOG2_TILES: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    start = b * bucket
    offs = tl.arange(0, TILE)
    if LINF:
        m = tl.zeros((1,), tl.float32)
        bad = tl.zeros((1,), tl.int32)
        for t in range(TILES):
            o = t * TILE + offs
            idx = start + o
            x = tl.load(x_ptr + idx, mask=(o < bucket) & (idx < n), other=0.0)
            a = tl.abs(x)
            bad += tl.sum((a != a).to(tl.int32), axis=0)
            m = tl.maximum(m, tl.max(tl.where(a == a, a, 0.0), axis=0))
        m = tl.where(bad > 0, float("nan"), m)
        tl.store(norms_ptr + b + tl.arange(0, 1), m)
    else:
        tid = tl.arange(0, TILES)
        part = tl.zeros((TILES,), tl.float32)
        for t in range(TILES):  # aligned subtrees of the bucket's tree, left to right
            o = t * TILE + offs
            idx = start + o
            x = tl.load(x_ptr + idx, mask=(o < bucket) & (idx < n), other=0.0)
            part = tl.where(tid == t, _tree_sum(x * x, LOG2_TILE), part)
        tl.store(norms_ptr + b + tl.arange(0, 1), tl.sqrt_rn(_tree_sum(part, LOG2_TILES)))


@triton.jit
def _quantize_pack_kernel(x_ptr, norms_ptr, out_ptr, n, base, bucket, k0, k1, L,
                          bounds_ptr, slope_ptr, offset_ptr, shift, last_cell, leaves,
                          term_lo_ptr, term_scale_ptr,
                          WIDTH: tl.constexpr, UNIFORM: tl.constexpr, STEPS: tl.constexpr,
                          TERMS: tl.constexpr, GROUPS: tl.constexpr):
    g = _program_start(GROUPS) + tl.arange(0, GROUPS)
    i = g[:, None] * 8 + tl.arange(0, 8)[None, :]  # [GROUPS, 8] coordinate indices
    valid = i < n
    x = tl.load(x_ptr + i, mask=valid, other=0.0)
    nrm = tl.load(norms_ptr + i // bucket, mask=valid, other=1.0)
    top = (L - 1).to(tl.float32)
    ok = (nrm == nrm) & (nrm != float("inf")) & (nrm >= _TINY_NORM)
    safe = tl.where(ok, nrm, 1.0)
    if UNIFORM:
        t = tl.minimum(tl.abs(x) * tl.div_rn(top, safe), top)
    elif TERMS > 0:  # the interval sum, terms added in the CPU kernel's order
        u = tl.abs(x) * tl.div_rn(tl.full(x.shape, 1.0, tl.float32), safe)
        t = tl.zeros(x.shape, tl.float32)
        for q in tl.static_range(TERMS):
            lo = tl.load(term_lo_ptr + q)
            sc = tl.load(term_scale_ptr + q)
            t += tl.minimum(tl.maximum((u - lo) * sc, 0.0), 1.0)
        t = tl.minimum(t, top)
    else:
        u = tl.abs(x) * tl.div_rn(tl.full(x.shape, 1.0, tl.float32), safe)
        c = tl.minimum(u.to(tl.int32, bitcast=True) >> shift, last_cell)
        for k in tl.static_range(STEPS):
            c = 2 * c + (u >= tl.load(bounds_ptr + k * leaves + c, mask=valid, other=0.0)).to(tl.int32)
        t = tl.minimum(u * tl.load(slope_ptr + c, mask=valid, other=0.0)
                       + tl.load(offset_ptr + c, mask=valid, other=0.0), top)
    # the noise of coordinate base + i (rng.py's definition)
    gi = base + i
    lo = (gi & 0xFFFFFFFF).to(tl.uint32)
    hi = (gi >> 32).to(tl.uint32)
    # tl.cast, not .to: Triton turns an int argument equal to 1 into a constexpr
    h = _mix32(lo ^ tl.cast(k0, tl.uint32))
    h = _mix32((h + hi) ^ tl.cast(k1, tl.uint32))
    r = (h >> 8).to(tl.float32) * 5.9604644775390625e-08
    f = tl.floor(t)
    m = f.to(tl.int32) + (r < t - f).to(tl.int32)
    m = tl.where(ok, m, 0)
    v = tl.where(x >= 0, L - 1 + m, L - 1 - m)
    v = tl.where(valid, v, (1 << WIDTH) - 1)  # padding fields are all ones
    shifts = (WIDTH * (7 - tl.arange(0, 8))).to(tl.uint64)
    acc = tl.sum(v.to(tl.uint64) << shifts[None, :], axis=1)  # disjoint bits: sum == or
    nbytes = _packed_bytes(n, WIDTH)
    for k in tl.static_range(WIDTH):
        byte = ((acc >> (8 * (WIDTH - 1 - k))) & 0xFF).to(tl.uint8)
        pos = g * WIDTH + k
        tl.store(out_ptr + pos, byte, mask=pos < nbytes)


@triton.jit
def _dequantize_kernel(packed_ptr, norms_ptr, values_ptr, out_ptr, n, bucket, bad_ptr,
                       WIDTH: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    i = _program_start(BLOCK) + tl.arange(0, BLOCK)
    valid = i < n
    bit = i * WIDTH
    byte = bit >> 3
    sh = bit & 7
    nbytes = _packed_bytes(n, WIDTH)
    w = tl.load(packed_ptr + byte, mask=valid, other=0).to(tl.int32) << 8
    w |= tl.load(packed_ptr + byte + 1, mask=valid & (byte + 1 < nbytes), other=0).to(tl.int32)
    v = (w >> (16 - sh - WIDTH)) & ((1 << WIDTH) - 1)
    y = tl.load(values_ptr + v, mask=valid, other=0.0)
    nrm = tl.load(norms_ptr + i // bucket, mask=valid, other=0.0)
    # int64: a count over more than 2**31 coordinates must not wrap (to 0)
    tl.atomic_add(bad_ptr, tl.sum(((y != y) & (nrm == nrm) & valid).to(tl.int64), axis=0))
    y = y * nrm
    if ACCUMULATE:
        y = tl.load(out_ptr + i, mask=valid, other=0.0) + y
    tl.store(out_ptr + i, y, mask=valid)


_TABLES: dict = {}


def _device_tables(table: LevelTable, device: torch.device):
    key = (id(table), device)
    hit = _TABLES.get(key)
    if hit is None or hit[0] is not table:
        hit = (table, torch.from_numpy(table.bounds.reshape(-1)).to(device),
               torch.from_numpy(table.slope).to(device), torch.from_numpy(table.offset).to(device),
               torch.from_numpy(table.term_lo).to(device),
               torch.from_numpy(table.term_scale).to(device),
               torch.from_numpy(table.values).to(device))
        _TABLES[key] = hit
    return hit[1:]


def grids(n: int, bucket_size: int) -> dict[str, int]:
    """Programs each kernel launches for ``n`` coordinates in buckets of ``bucket_size``.

    Raises:
        ValueError: a grid would exceed CUDA's :data:`MAX_GRID` programs (``n`` above about
            ``2**35`` at the smallest bucket size).

    Example::

        >>> grids(5000, 1024)
        {'norms': 5, 'quantize': 5, 'dequantize': 5}
    """
    g = {"norms": -(-n // bucket_size), "quantize": -(-n // (8 * _GROUPS)),
         "dequantize": -(-n // _DEQ_BLOCK)}
    worst = max(g, key=g.get)
    if g[worst] > MAX_GRID:
        raise ValueError(f"n={n} coordinates in buckets of bucket_size={bucket_size} need "
                         f"{g[worst]} {worst} programs, above CUDA's limit of {MAX_GRID}; split "
                         "the tensor")
    return g


def _norm_tiling(bucket_size: int) -> dict[str, int]:
    p2 = 1 << max(0, (bucket_size - 1).bit_length())  # the bucket's tree, padded
    tile = min(p2, _NORM_TILE)
    tiles = p2 // tile
    return dict(TILE=tile, LOG2_TILE=tile.bit_length() - 1, TILES=tiles,
                LOG2_TILES=tiles.bit_length() - 1)


def _launch_norms(x, norms, n, bucket_size, norm, programs):
    _norms_kernel[(programs,)](x, norms, n, bucket_size, LINF=norm == "linf",
                               **_norm_tiling(bucket_size), enable_fp_fusion=False)


def _launch_quantize(x, norms, out, n, table, bucket_size, key, base, programs):
    bounds, slope, offset, term_lo, term_scale, _ = _device_tables(table, x.device)
    _quantize_pack_kernel[(programs,)](x, norms, out, n, base, bucket_size, key[0], key[1],
                                       table.num_levels, bounds, slope, offset, table.shift,
                                       table.last_cell, table.bounds.shape[1], term_lo,
                                       term_scale, WIDTH=table.width, UNIFORM=table.uniform,
                                       STEPS=table.steps, TERMS=table.terms, GROUPS=_GROUPS,
                                       enable_fp_fusion=False)


def _launch_dequantize(packed, norms, table, bucket_size, out, n, bad, accumulate, programs):
    *_, values = _device_tables(table, out.device)
    _dequantize_kernel[(programs,)](packed, norms, values, out, n, bucket_size, bad,
                                    WIDTH=table.width, ACCUMULATE=accumulate, BLOCK=_DEQ_BLOCK,
                                    enable_fp_fusion=False)


def quantize_pack(x: torch.Tensor, table: LevelTable, bucket_size: int, norm: str,
                  key: tuple[int, int], *, base: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize float32 ``x`` (1-D, contiguous, on the GPU) and pack it, on the device.

    Args as :func:`qoda_hvd.kernels.cpu.quantize_pack`.

    Returns:
        ``(packed, norms, bad)``, all on ``x``'s device: ``bad`` is a 0-d int64 tensor, the
        count of buckets whose norm is NaN/Inf (not read back: no host sync).
    """
    n = x.numel()
    g = grids(n, bucket_size)
    out = torch.empty(packed_size(n, table.width), dtype=torch.uint8, device=x.device)
    norms = torch.empty(g["norms"], dtype=torch.float32, device=x.device)
    if n == 0:
        return out, norms, torch.zeros((), dtype=torch.int64, device=x.device)
    _launch_norms(x, norms, n, bucket_size, norm, g["norms"])
    _launch_quantize(x, norms, out, n, table, bucket_size, key, base, g["quantize"])
    return out, norms, (~torch.isfinite(norms)).sum()


def dequantize_into(packed: torch.Tensor, norms: torch.Tensor, table: LevelTable,
                    bucket_size: int, out: torch.Tensor, *, accumulate: bool,
                    bad: torch.Tensor | None = None) -> torch.Tensor:
    """``out (+)= sign * level * norm`` on the device, without a host sync.

    Args:
        packed, norms: device tensors (uint8, float32).
        table, bucket_size: the sender's levels and buckets.
        out: float32, 1-D, contiguous, on the device (written in place).
        accumulate: add instead of overwrite.
        bad: an int64 device tensor of one element the count of packed values outside the
            alphabet is added to (default: a new zero one).

    Returns:
        ``bad`` (not read back: ``int(bad)`` synchronizes when the caller chooses).
    """
    n = out.numel()
    if bad is None:
        bad = torch.zeros(1, dtype=torch.int64, device=out.device)
    if n == 0:
        return bad
    _launch_dequantize(packed, norms, table, bucket_size, out, n, bad, accumulate,
                       grids(n, bucket_size)["dequantize"])
    return bad
