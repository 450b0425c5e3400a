"""Bucketed, normalised, unbiased stochastic quantization of torch tensors (CPU and CUDA).

A tensor of ``n`` elements is flattened and cut into buckets of ``bucket_size`` (the last one may
be partial: it is padded with zeros virtually). Each bucket ``v`` is normalised by its L2 norm
(default) or its max-abs (``norm="linf"``); ``u_i = |v_i| / ||v||`` is rounded to one of its two
neighbouring levels ``l_j <= u_i <= l_{j+1}``, up with probability ``(u_i - l_j)/(l_{j+1} - l_j)``,
so ``E[Q(v)] = v``. The output (:class:`QuantizedTensor`) holds int8 symbols
``sign(v_i) * level_index`` and one float32 norm per bucket.

How it is computed (one code path for CPU and CUDA, float32/float16/bfloat16 input):

* Rounding is ``floor(t + r)`` with ``r ~ U[0, 1)`` and ``t`` the position of ``u`` on the level
  index axis (``t = u (L - 1)`` for uniform levels, by arithmetic; for other levels
  ``t = j + (u - l_j)/(l_{j+1} - l_j)`` with ``j`` the interval of ``u`` and two table
  lookups). ``floor(t + r)`` is ``floor(t) + 1`` with probability ``frac(t)``: exactly stochastic
  rounding. Uniform levels round the signed value ``v_i (L - 1)/||v||`` directly (stochastic
  rounding is symmetric), shifted by ``L`` so float-to-uint8 truncation is the floor; the uint8
  result minus ``L`` is the int8 symbol in two's complement.
* On CPU, non-uniform levels find ``j`` without a binary search (:func:`torch.bucketize` costs
  ~2 ns per element and level of search depth; a table gather ~0.6 ns). The float32 bit pattern
  of ``u >= 0`` is monotone in ``u``, so ``cell = bits(u) >> s`` cuts ``[0, 1]`` into
  ``2^(23-s)`` cells per binade: log-spaced near 0, where non-uniform levels crowd, linear inside
  a binade. With ``K`` the most levels strictly inside one cell, ``K`` steps
  ``r = 2 r + (u >= c_k[r])`` walk a per-cell binary tree of those levels (``+inf`` where a cell
  has fewer), and the leaf ``r`` indexes slope and offset tables equal, entry for entry, to those
  of ``j``: the symbols are bit-for-bit those of the bucketize path. ``s`` is chosen once per
  level set (fewest steps, then fewest cells): powers of two (exponential levels) and dyadic bin
  edges ``k / 2^b`` (``b <= 10``) need ``K = 0``; relative gaps above ``2^-10`` at most
  ``K = 1``. Level sets needing ``K > 2``, and CUDA, use :func:`torch.bucketize`.
* Randomness comes only from the caller's :class:`torch.Generator`. On CPU one 64-bit draw feeds
  four coordinates (16 random bits each, used at their bin midpoints ``(k + 1/2)/2^16``): the
  rounding probability is then exact to within ``2^-17``, i.e. a bias of at most
  ``2^-17 * gap * norm`` per coordinate, far below what any number of training steps can
  resolve, for 4x less generator work than ``torch.rand``. On CUDA ``uniform_`` (Philox) is used.
* On CPU the tensor is processed in chunks of whole buckets (64K elements by default) whose
  float32 intermediates stay in the L2 cache and are reused across chunks and calls
  (per thread, per device); on CUDA one chunk covers the tensor. There is no Python loop over
  elements or buckets. A CPU chunk with at most a quarter of its buckets non-zero (an embedding's
  gradient: only the batch's tokens have non-zero rows) rounds, and dequantizes, only those
  buckets, gathered; the others are zero symbols without drawing noise.

Non-finite input policy (``nonfinite=``): ``"raise"`` (default) raises :class:`ValueError` naming
the first bad bucket; ``"propagate"`` sends those buckets with a NaN/Inf norm and zero symbols, so
the dequantized bucket is NaN and an AMP ``GradScaler`` downstream still sees the overflow and
skips the step. The check is free: a bucket's norm is NaN/Inf exactly when the bucket holds
NaN/Inf (or, for L2, when its sum of squares overflows float32, ``|v_i| >~ 1e19``; use
``norm="linf"`` for such data). Buckets whose norm is zero, or so small that ``(L-1)/norm``
overflows float32 (``< 4e-37``), quantize to zero symbols.

Example::

    >>> import torch
    >>> from qoda_hvd.quant import quantize, dequantize, uniform_levels
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(3000)
    >>> levels = uniform_levels(8)
    >>> qt = quantize(x, levels, g, bucket_size=1024)
    >>> qt.symbols.dtype, qt.norms.shape
    (torch.int8, torch.Size([3]))
    >>> dequantize(qt, levels).shape
    torch.Size([3000])
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional

import torch

from qoda_hvd.errors import PayloadError
from qoda_hvd.quant.levels import ArrayLike, is_uniform, validate_levels

__all__ = [
    "NORMS",
    "NONFINITE_POLICIES",
    "DEFAULT_BUCKET_SIZE",
    "QuantizedTensor",
    "Quantizer",
    "quantize",
    "dequantize",
    "rank_generator",
]

DEFAULT_BUCKET_SIZE = 1024
MAX_BUCKET_SIZE = 1 << 30
#: Bucket normalisations and the q of their L_q norm (for :func:`~qoda_hvd.quant.levels.eps_q`).
NORMS = {"l2": 2.0, "linf": float("inf")}
NONFINITE_POLICIES = ("raise", "propagate")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_CPU_CHUNK = 1 << 16  # elements; ~11 bytes/element of working set -> ~0.7 MB, fits in L2
_SPARSE_SHARE = 4  # a CPU chunk with at most 1/4 of its buckets non-zero rounds only those
_ONE_BITS = 0x3F800000  # float32 bit pattern of 1.0
_CELL_SHIFTS = range(23, 12, -1)  # cell grids tried, coarsest first: 1 .. 2^10 cells per binade
_MAX_CELL_STEPS = 2  # more steps cost as much as bucketize's search
_MAX_LEAVES = 1 << 18  # cells * 2^steps: bounds the slope/offset tables to 1 MB each


@dataclass(frozen=True)
class _CellTable:
    """CPU interval lookup for non-uniform levels (see the module docstring).

    Attributes:
        shift: ``r = clamp(bits(u) >> shift, 0, last_cell)``.
        last_cell: the cell holding 1.0; it also takes everything above (and NaN).
        bounds: ``steps`` float32 tables; ``bounds[k]`` has ``(last_cell + 1) * 2^k`` entries,
            the ``(k+1)``-th level inside cell ``r >> k`` (``+inf`` if the cell has fewer).
        slope, offset: float32 ``[(last_cell + 1) * 2^steps]``: the interval tables at
            ``j = first_interval(cell) + popcount(leaf bits)``.
    """

    shift: int
    last_cell: int
    bounds: tuple[torch.Tensor, ...]
    slope: torch.Tensor
    offset: torch.Tensor

    @staticmethod
    def build(levels: torch.Tensor, slope: torch.Tensor, offset: torch.Tensor,
              max_steps: int = _MAX_CELL_STEPS) -> Optional["_CellTable"]:
        """The table with the fewest steps (then fewest cells), or None if every grid needs more
        than ``max_steps`` steps. ``levels``: validated float32 CPU levels, ``L >= 3``;
        ``slope``/``offset``: the CPU float32 interval tables."""
        inner = levels[1:-1].contiguous()
        best = None
        for shift in _CELL_SHIFTS:
            last = _ONE_BITS >> shift
            cells = torch.arange(last + 1, dtype=torch.int64)
            lo = (cells << shift).to(torch.int32).view(torch.float32)
            hi = (((cells + 1) << shift) - 1).to(torch.int32).view(torch.float32)
            first = torch.searchsorted(inner, lo, right=True)  # j at the cell's lowest value
            # Levels in (lo, hi]. The last cell's hi is >= 1 > every interior level, so it also
            # counts right for the values above 1 (and NaN) that the clamp sends there.
            count = torch.searchsorted(inner, hi, right=True) - first
            steps = int(count.max())
            if steps <= max_steps and (last + 1) << steps <= _MAX_LEAVES:
                if best is None or steps < best[0]:
                    best = (steps, shift, last, first, count)
                if steps == 0:
                    break
        if best is None:
            return None
        steps, shift, last, first, count = best
        inner_ext = torch.cat([inner, torch.full((steps,), float("inf"))])
        bounds = []
        for k in range(steps):
            kth = torch.where(count > k, inner_ext[first + k], torch.tensor(float("inf")))
            bounds.append(kth.repeat_interleave(1 << k).contiguous())
        leaves = torch.arange((last + 1) << steps, dtype=torch.int64)
        j = first.repeat_interleave(1 << steps)
        for b in range(steps):
            j = j + ((leaves >> b) & 1)
        j = j.clamp_(max=levels.numel() - 2)  # unreachable leaves (flags are monotone)
        return _CellTable(shift, last, tuple(bounds), slope[j].contiguous(), offset[j].contiguous())


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized tensor: int8 symbols ``sign * level_index`` and per-bucket float32 norms.

    Attributes:
        symbols: int8, flat, ``numel`` entries in ``[-(L-1), L-1]``.
        norms: float32, ``ceil(numel / bucket_size)`` entries.
        shape: the original shape.
        dtype: the original dtype (what :func:`dequantize` returns).
        bucket_size: elements per bucket (the last bucket may be partial).
        num_levels: ``L``, the number of levels including 0 and 1.

    Example::

        >>> import torch
        >>> qt = QuantizedTensor(torch.zeros(5, dtype=torch.int8), torch.zeros(1),
        ...                      torch.Size([5]), torch.float32, 1024, 8)
        >>> qt.numel, qt.num_buckets
        (5, 1)
    """

    symbols: torch.Tensor
    norms: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    bucket_size: int
    num_levels: int

    def __post_init__(self) -> None:
        if not isinstance(self.symbols, torch.Tensor) or self.symbols.dtype != torch.int8:
            raise TypeError(f"symbols must be an int8 tensor, got {getattr(self.symbols, 'dtype', type(self.symbols).__name__)}")
        if not isinstance(self.norms, torch.Tensor) or self.norms.dtype != torch.float32:
            raise TypeError(f"norms must be a float32 tensor, got {getattr(self.norms, 'dtype', type(self.norms).__name__)}")
        if self.symbols.dim() != 1 or self.norms.dim() != 1:
            raise ValueError("symbols and norms must be 1-D")
        if not 1 <= int(self.bucket_size) <= MAX_BUCKET_SIZE:
            raise ValueError(f"bucket_size must be in [1, {MAX_BUCKET_SIZE}], got {self.bucket_size}")
        if not 2 <= int(self.num_levels) <= 128:
            raise ValueError(f"num_levels must be in [2, 128], got {self.num_levels}")
        n = self.symbols.numel()
        if torch.Size(self.shape).numel() != n:
            raise ValueError(f"shape {tuple(self.shape)} does not match {n} symbols")
        if self.norms.numel() != -(-n // self.bucket_size):
            raise ValueError(
                f"{n} symbols in buckets of {self.bucket_size} need {-(-n // self.bucket_size)} norms, "
                f"got {self.norms.numel()}"
            )

    @property
    def numel(self) -> int:
        return self.symbols.numel()

    @property
    def num_buckets(self) -> int:
        return self.norms.numel()


def rank_generator(seed: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from ``(seed, rank)`` so each rank draws independent rounding noise.

    The seed is mixed with the rank by numpy's ``SeedSequence`` (not ``seed + rank``, whose
    streams would overlap between runs with neighbouring seeds).

    Example::

        >>> g0, g1 = rank_generator(7, 0), rank_generator(7, 1)
        >>> bool(torch.rand(3, generator=g0).ne(torch.rand(3, generator=g1)).all())
        True
    """
    import numpy as np

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
    mixed = int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0]) & ((1 << 63) - 1)
    return torch.Generator(device=device).manual_seed(mixed)


class _Workspace:
    """Reusable chunk buffers for one (thread, device)."""

    def __init__(self, chunk: int, device: torch.device):
        self.chunk = chunk
        self.x = torch.empty(chunk, dtype=torch.float32, device=device)
        self.buf = torch.empty(chunk, dtype=torch.float32, device=device)
        self.rand = torch.empty(chunk if device.type != 'cpu' else 0, dtype=torch.float32, device=device)
        self.sel = torch.empty(chunk, dtype=torch.float32, device=device)
        self.bits = torch.empty(-(-chunk // 4), dtype=torch.int64, device=device)
        self.u8 = torch.empty(chunk, dtype=torch.uint8, device=device)
        self.idx = torch.empty(chunk, dtype=torch.int32, device=device)


class Quantizer:
    """Quantizes and dequantizes tensors with a fixed level sequence.

    Holds validated levels, the lookup tables derived from them (per device) and reusable chunk
    buffers (per thread and device), so repeated calls allocate only their outputs.

    Args:
        levels: the level sequence (see :func:`~qoda_hvd.quant.levels.validate_levels`).
        bucket_size: elements per bucket, in [1, 2^30]; default 1024.
        norm: ``"l2"`` (default) or ``"linf"`` bucket normalisation.
        nonfinite: ``"raise"`` (default) or ``"propagate"``; see the module docstring.
        chunk_size: CPU elements per chunk (rounded to whole buckets); default 65536.

    Example::

        >>> import torch
        >>> from qoda_hvd.quant import Quantizer, exponential_levels
        >>> q = Quantizer(exponential_levels(8), bucket_size=512)
        >>> g = torch.Generator().manual_seed(1)
        >>> x = torch.randn(10, 100)
        >>> q.dequantize(q.quantize(x, g)).shape
        torch.Size([10, 100])
    """

    def __init__(
        self,
        levels: ArrayLike,
        *,
        bucket_size: int = DEFAULT_BUCKET_SIZE,
        norm: str = "l2",
        nonfinite: str = "raise",
        chunk_size: int = _CPU_CHUNK,
    ):
        self.levels = validate_levels(levels)
        if isinstance(bucket_size, bool) or not isinstance(bucket_size, int):
            raise TypeError(f"bucket_size must be an int, got {type(bucket_size).__name__}")
        if not 1 <= bucket_size <= MAX_BUCKET_SIZE:
            raise ValueError(f"bucket_size must be in [1, {MAX_BUCKET_SIZE}], got {bucket_size}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {list(NONFINITE_POLICIES)}, got {nonfinite!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.bucket_size = bucket_size
        self.norm = norm
        self.nonfinite = nonfinite
        self.num_levels = self.levels.numel()
        self.uniform = is_uniform(self.levels)
        self._cpu_chunk = max(1, chunk_size // bucket_size) * bucket_size
        self._tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self._cells: Optional[_CellTable] = None
        self._cells_built = self.uniform  # built on first CPU use; uniform levels need none
        self._local = threading.local()

    # -- per-device state ---------------------------------------------------------------

    def _tables_on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``(shift, slope, offset, lut)`` on ``device``.

        Uniform levels: ``shift`` is the 0-dim constant ``L + c``; otherwise it is the interior
        levels for :func:`torch.bucketize`, and ``slope``/``offset`` map ``u`` in interval ``j``
        to ``t = j + (u - l_j) / (l_{j+1} - l_j) + c``. ``c`` re-centres the CPU noise
        ``k / 2^16 - 1/2`` (``k`` uniform in ``[0, 2^16)``) onto ``(k + 1/2) / 2^16``; it is 0 on
        CUDA. ``lut`` maps a symbol's uint8 bit pattern to ``sign * level``.
        """
        tables = self._tables.get(device)
        if tables is None:
            c = (2.0**15 + 0.5) / 2.0**16 if device.type == "cpu" else 0.0
            lv = self.levels.double()
            gap = lv[1:] - lv[:-1]
            slope = 1.0 / gap
            offset = torch.arange(self.num_levels - 1, dtype=torch.float64) - lv[:-1] * slope + c
            shift = torch.tensor(self.num_levels + c, dtype=torch.float64) if self.uniform else lv[1:-1]
            lut = torch.zeros(256, dtype=torch.float64)
            idx = torch.arange(self.num_levels)
            lut[idx] = lv
            lut[(-idx[1:]) % 256] = -lv[1:]
            tables = tuple(t.to(device=device, dtype=torch.float32) for t in (shift, slope, offset, lut))
            self._tables[device] = tables
        return tables

    def _cell_table(self) -> Optional[_CellTable]:
        """The CPU :class:`_CellTable` of non-uniform levels, or None (use bucketize)."""
        if not self._cells_built:
            _, slope, offset, _ = self._tables_on(torch.device("cpu"))
            self._cells = _CellTable.build(self.levels, slope, offset)
            self._cells_built = True
        return self._cells

    def _workspace(self, device: torch.device, n: int) -> _Workspace:
        cache = getattr(self._local, "ws", None)
        if cache is None:
            cache = self._local.ws = {}
        if device.type == "cpu":
            chunk = self._cpu_chunk
        else:  # one chunk for the whole tensor; keep the largest seen
            chunk = -(-max(n, 1) // self.bucket_size) * self.bucket_size
        ws = cache.get(device)
        if ws is None or ws.chunk < chunk:
            ws = cache[device] = _Workspace(chunk, device)
        return ws

    # -- quantize -----------------------------------------------------------------------

    def quantize(self, tensor: torch.Tensor, generator: torch.Generator) -> QuantizedTensor:
        """Quantize ``tensor`` (any shape, floating dtype, CPU or CUDA) with ``generator``'s noise.

        Args:
            tensor: the values; float32, float16, bfloat16 or float64.
            generator: a :class:`torch.Generator` on ``tensor``'s device.

        Returns:
            :class:`QuantizedTensor` with symbols and norms on ``tensor``'s device.
        """
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"tensor must have a floating dtype (float32/float16/bfloat16/float64), got {tensor.dtype}")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        device = tensor.device
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but tensor is on {device}")
        n = tensor.numel()
        bs = self.bucket_size
        nbuckets = -(-n // bs)
        symbols = torch.empty(n, dtype=torch.int8, device=device)
        norms = torch.empty(nbuckets, dtype=torch.float32, device=device)
        if n:
            flat = tensor.detach().reshape(-1)
            ws = self._workspace(device, n)
            for start in range(0, n, ws.chunk):
                self._quantize_chunk(flat, start, min(ws.chunk, n - start), symbols, norms, ws, generator)
            bad = ~torch.isfinite(norms)
            if bool(bad.any()):  # one reduction over the norms; rare branch
                self._handle_nonfinite(bad, symbols)
        return QuantizedTensor(symbols, norms, tensor.shape, tensor.dtype, bs, self.num_levels)

    def _quantize_chunk(self, flat, start, m, symbols, norms, ws, generator) -> None:
        bs, lv_n = self.bucket_size, self.num_levels
        nb = -(-m // bs)
        mp = nb * bs
        src = flat[start : start + m]
        if src.dtype != torch.float32 or mp != m:
            x = ws.x[:mp]
            x[:m].copy_(src)
            if mp != m:
                x[m:].zero_()  # virtual padding of the last bucket
        else:
            x = src
        xb = x.view(nb, bs)
        buf = ws.buf[:mp].view(nb, bs)
        b0 = start // bs
        nrm = norms[b0 : b0 + nb]
        if self.norm == "l2":
            torch.linalg.vector_norm(xb, dim=1, out=nrm)
        else:
            torch.amax(torch.abs(xb, out=buf), dim=1, out=nrm)
        # Per-bucket scale 1/norm (uniform: (L-1)/norm); zero, tiny and non-finite norms -> 0.
        scale = torch.reciprocal(nrm)
        if self.uniform:
            scale.mul_(lv_n - 1)
        scale = scale.nan_to_num_(0.0, 0.0, 0.0).view(nb, 1)
        dst = symbols[start : start + m]
        if x.device.type == "cpu":  # on CUDA the count would cost a device sync per call
            live = int(torch.count_nonzero(scale))
            if live * _SPARSE_SHARE <= nb:
                self._round_sparse(xb, scale, live, dst, ws, generator)
                return
        self._round(xb, scale, dst, ws, generator)

    def _round_sparse(self, xb, scale, live, dst, ws, generator) -> None:
        """Round only the buckets with a non-zero scale; the others are zero symbols.

        Mostly-zero chunks are common: an embedding's gradient has non-zero rows only for the
        tokens of the batch. Rounding the few live buckets gathered together costs a fraction of
        rounding the whole chunk (the noise of zero buckets is never needed)."""
        nb, bs = xb.shape
        sub = None
        if live:
            rows = scale.view(-1).nonzero().view(-1)
            sub = torch.empty(live * bs, dtype=torch.int8)
            self._round(xb.index_select(0, rows), scale.index_select(0, rows), sub, ws, generator)
        pad = ws.u8[: nb * bs].view(torch.int8)  # free again once _round is done with it
        pad.zero_()
        if sub is not None:
            pad.view(nb, bs).index_copy_(0, rows, sub.view(live, bs))
        dst.copy_(pad[: dst.numel()])

    def _round(self, xb, scale, dst, ws, generator) -> None:
        """Stochastically round the buckets ``xb`` [nb, bs] scaled by ``scale`` [nb, 1] into the
        int8 symbols ``dst`` (its length may stop short of ``nb * bs``: a padded last bucket)."""
        lv_n = self.num_levels
        nb, bs = xb.shape
        mp, m = nb * bs, dst.numel()
        buf = ws.buf[:mp].view(nb, bs)
        cpu = xb.device.type == "cpu"
        shift, slope, offset, _ = self._tables_on(xb.device)
        u8 = ws.u8[:mp]
        if self.uniform:
            # z = v (L-1)/||v|| + L + r in (0, 2L); trunc(z) - L = floor(v (L-1)/||v|| + r).
            torch.addcmul(shift, xb, scale, out=buf)  # shift = L (+ midpoint offset on CPU)
            self._add_noise(buf, ws, generator)
            buf.clamp_(1.0, 2.0 * lv_n - 1.0)
            u8.copy_(buf.view(-1))
            torch.sub(u8[:m], lv_n, out=dst.view(torch.uint8))
            return
        torch.abs(xb, out=buf)
        buf.mul_(scale)  # u in [0, 1] (up to rounding)
        flat_buf = buf.view(-1)
        idx = ws.idx[:mp]
        sel = ws.sel[:mp]
        cells = self._cell_table() if cpu else None
        if cells is not None:
            # Cell, then one tree step per level inside it; slope/offset are indexed by the leaf.
            torch.bitwise_right_shift(flat_buf.view(torch.int32), cells.shift, out=idx)
            idx.clamp_(0, cells.last_cell)  # u > 1 by rounding; NaN (also with the sign bit set)
            flag = sel.view(torch.int32)  # sel is free until the slope lookup
            for bound in cells.bounds:
                torch.index_select(bound, 0, idx, out=sel)
                torch.ge(flat_buf, sel, out=flag)
                torch.add(flag, idx, alpha=2, out=idx)
            slope, offset = cells.slope, cells.offset
        else:
            torch.bucketize(flat_buf, shift, right=True, out_int32=True, out=idx)  # shift = interior levels
        # t = u * slope[j] + offset[j]: position on the level-index axis (offset holds the
        # CPU noise midpoint too).
        torch.index_select(slope, 0, idx, out=sel)
        flat_buf.mul_(sel)
        torch.index_select(offset, 0, idx, out=sel)
        flat_buf.add_(sel)
        self._add_noise(buf, ws, generator)
        buf.clamp_(0.0, lv_n - 1.0)
        torch.copysign(buf, xb, out=buf)
        # Float -> int8 truncates toward zero: sign * floor(t + r).
        dst.copy_(flat_buf[:m])

    @staticmethod
    def _add_noise(buf: torch.Tensor, ws: _Workspace, generator: torch.Generator) -> None:
        """``buf += r`` with ``r ~ U[0, 1)``; on CPU ``r = k / 2^16 - 1/2 + ...`` (midpoint in the
        tables), from four 16-bit lanes per 64-bit draw."""
        mp = buf.numel()
        if buf.device.type == "cpu":
            # Full 64-bit draws: random_() without bounds would leave the top bit 0.
            bits = ws.bits[: -(-mp // 4)].random_(-(2**63), None, generator=generator)
            r16 = bits.view(torch.int16)[:mp].view(buf.shape)  # k - 2^15, k uniform in [0, 2^16)
            torch.add(buf, r16, alpha=2.0**-16, out=buf)
        else:
            buf.add_(ws.rand[:mp].view(buf.shape).uniform_(generator=generator))

    def _handle_nonfinite(self, bad: torch.Tensor, symbols: torch.Tensor) -> None:
        if self.nonfinite == "raise":
            first = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"tensor contains NaN or Inf values (bucket {first} of size {self.bucket_size}, "
                f"{int(bad.sum())} bad bucket(s)); pass nonfinite='propagate' to send them as NaN "
                "instead (e.g. under AMP loss scaling)"
                + ("; with norm='l2' this also happens when a bucket's sum of squares overflows "
                   "float32 (|values| above ~1e19)" if self.norm == "l2" else "")
            )
        # propagate: keep the NaN/Inf norm, zero the symbols of those buckets.
        bs, n = self.bucket_size, symbols.numel()
        nfull = n // bs
        sym_full = symbols[: nfull * bs].view(nfull, bs)
        sym_full.masked_fill_(bad[:nfull, None], 0)
        if nfull < bad.numel():
            symbols[nfull * bs :].masked_fill_(bad[nfull], 0)

    # -- dequantize ---------------------------------------------------------------------

    def dequantize(self, qt: QuantizedTensor, *, out: Optional[torch.Tensor] = None,
                   accumulate: bool = False) -> torch.Tensor:
        """Reconstruct ``norm * sign * levels[index]`` in ``qt``'s shape and dtype.

        Args:
            qt: a :class:`QuantizedTensor` made with these levels and bucket size.
            out: optional output tensor of ``qt.shape`` (any floating dtype, same device).
            accumulate: add into ``out`` (required then) instead of overwriting it, chunk by
                chunk, with no full-size temporary.

        Raises:
            PayloadError: a symbol is outside ``[-(L-1), L-1]`` or the level count differs.
        """
        if not isinstance(qt, QuantizedTensor):
            raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
        if qt.num_levels != self.num_levels:
            raise PayloadError(f"quantized with {qt.num_levels} levels, but this quantizer has {self.num_levels}")
        if qt.bucket_size != self.bucket_size:
            raise ValueError(f"qt.bucket_size={qt.bucket_size} differs from bucket_size={self.bucket_size}")
        return dequantize(qt, self.levels, out=out, accumulate=accumulate, _quantizer=self)


def quantize(
    tensor: torch.Tensor,
    levels: ArrayLike,
    generator: torch.Generator,
    *,
    bucket_size: int = DEFAULT_BUCKET_SIZE,
    norm: str = "l2",
    nonfinite: str = "raise",
) -> QuantizedTensor:
    """Quantize ``tensor`` to ``levels``; a one-shot :class:`Quantizer` (see it for arguments).

    Example::

        >>> import torch
        >>> from qoda_hvd.quant import uniform_levels
        >>> g = torch.Generator().manual_seed(0)
        >>> quantize(torch.tensor([0.0, 3.0, -4.0]), uniform_levels(2), g).norms.tolist()
        [5.0]
    """
    q = Quantizer(levels, bucket_size=bucket_size, norm=norm, nonfinite=nonfinite)
    return q.quantize(tensor, generator)


def dequantize(
    qt: QuantizedTensor,
    levels: ArrayLike,
    *,
    out: Optional[torch.Tensor] = None,
    accumulate: bool = False,
    _quantizer: Optional[Quantizer] = None,
) -> torch.Tensor:
    """Reconstruct a tensor from :class:`QuantizedTensor` and the levels it was made with.

    Args:
        qt: the quantized tensor.
        levels: its level sequence (``len(levels) == qt.num_levels``).
        out: optional output of ``qt.shape`` on the symbols' device.
        accumulate: add the values into ``out`` (which must be given) instead of overwriting it.

    Raises:
        PayloadError: symbols outside ``[-(L-1), L-1]``, or ``len(levels) != qt.num_levels``.

    Example::

        >>> import torch
        >>> from qoda_hvd.quant import uniform_levels
        >>> qt = QuantizedTensor(torch.tensor([1, -2, 0], dtype=torch.int8), torch.tensor([3.0]),
        ...                      torch.Size([3]), torch.float32, 1024, 3)
        >>> dequantize(qt, uniform_levels(3)).tolist()
        [1.5, -3.0, 0.0]
    """
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
    q = _quantizer or Quantizer(levels, bucket_size=qt.bucket_size)
    if q.num_levels != qt.num_levels:
        raise PayloadError(f"qt has num_levels={qt.num_levels} but {q.num_levels} levels were given")
    device = qt.symbols.device
    n, bs, lv_n = qt.numel, qt.bucket_size, qt.num_levels
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs out= (the tensor to add into)")
        out = torch.empty(qt.shape, dtype=qt.dtype, device=device)
    elif out.shape != qt.shape or out.device != device or not out.is_floating_point():
        raise ValueError(f"out must be a floating tensor of shape {tuple(qt.shape)} on {device}")
    if n == 0:
        return out
    lo, hi = torch.aminmax(qt.symbols)
    if int(lo) < -(lv_n - 1) or int(hi) > lv_n - 1:
        raise PayloadError(f"symbols must be in [{-(lv_n - 1)}, {lv_n - 1}], got [{int(lo)}, {int(hi)}]")
    flat_out = out.view(-1) if out.is_contiguous() else None
    if flat_out is not None:
        target = flat_out
    else:  # a non-contiguous out: work on a flat copy (holding its values when accumulating)
        target = (out.reshape(-1).clone() if accumulate
                  else torch.empty(n, dtype=out.dtype, device=device))
    ws = q._workspace(device, n)
    lut = q._tables_on(device)[3]
    step = 1.0 / (lv_n - 1)
    cpu = device.type == "cpu"
    for start in range(0, n, ws.chunk):
        m = min(ws.chunk, n - start)
        if cpu and m % bs == 0 and _dequantize_sparse(qt, start, m, target, lut, step, q.uniform,
                                                      accumulate):
            continue
        sym = qt.symbols[start : start + m]
        direct = target.dtype == torch.float32 and not accumulate
        buf = target[start : start + m] if direct else ws.buf[:m]
        if q.uniform:
            buf.copy_(sym)
            scale_mul = step
        else:
            idx = ws.idx[:m]
            idx.copy_(sym.view(torch.uint8))
            torch.index_select(lut, 0, idx, out=buf)
            scale_mul = 1.0
        b0 = start // bs
        nfull = m // bs
        if nfull:
            nrm = qt.norms[b0 : b0 + nfull]
            if scale_mul != 1.0:
                nrm = nrm * scale_mul
            buf[: nfull * bs].view(nfull, bs).mul_(nrm.view(nfull, 1))
        if nfull * bs < m:  # partial last bucket
            buf[nfull * bs :].mul_(qt.norms[b0 + nfull] * scale_mul)
        if accumulate:
            target[start : start + m].add_(buf)
        elif not direct:
            target[start : start + m].copy_(buf)
    if flat_out is None:
        out.copy_(target.view(qt.shape))
    return out


def _dequantize_sparse(qt: QuantizedTensor, start: int, m: int, target: torch.Tensor,
                       lut: torch.Tensor, step: float, uniform: bool, accumulate: bool) -> bool:
    """Dequantize one CPU chunk of whole buckets through its non-zero-norm buckets only, when
    at most 1/4 of them are (zero-norm buckets hold zeros: nothing to add). False: not sparse."""
    bs = qt.bucket_size
    nb = m // bs
    nrm = qt.norms[start // bs : start // bs + nb]
    live = int(torch.count_nonzero(nrm))
    if live * _SPARSE_SHARE > nb:
        return False
    out = target[start : start + m].view(nb, bs)
    if not accumulate:
        out.zero_()
    if live:
        rows = nrm.nonzero().view(-1)
        sym = qt.symbols[start : start + m].view(nb, bs).index_select(0, rows)
        if uniform:
            vals = sym.to(torch.float32).mul_(step)
        else:
            vals = lut.index_select(0, sym.view(torch.uint8).view(-1).to(torch.int32)).view(live, bs)
        vals.mul_(nrm.index_select(0, rows).view(live, 1))
        out.index_add_(0, rows, vals.to(out.dtype))
    return True
