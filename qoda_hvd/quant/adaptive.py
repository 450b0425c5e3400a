"""Per-type level state that adapts during training, without any communication.

:class:`LayerwiseQuantizer` holds one level sequence per layer type, accumulates per-type
histograms of normalised coordinates, and re-optimises the levels on a schedule. Encoder and
decoder agree on levels on every rank by construction:

1. on an update step, each rank calls :meth:`~LayerwiseQuantizer.observe` for its gradients and
   hands :meth:`~LayerwiseQuantizer.histograms` (ONE flat float64 tensor, ``M * bins``) to the
   communication layer, which allreduces (sums) it once;
2. every rank calls :meth:`~LayerwiseQuantizer.set_histograms` with the same aggregate, which
   recomputes the levels deterministically (float64 numpy/torch CPU, exact dynamic program): the
   same input gives bit-identical levels on every rank;
3. the levels also travel in each payload (the codec's level table), so decoding never depends
   on this state.

Histograms are cheap: each observed tensor contributes a subsample of at most ``sample_size``
coordinates (strided, no randomness needed), binned with :func:`torch.bincount` on the tensor's
device and weighted by ``numel / sample`` so a type's histogram estimates its coordinate counts.

Example::

    >>> import torch, torch.nn as nn
    >>> from qoda_hvd.quant import classify_parameters
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10))
    >>> lq = LayerwiseQuantizer(classify_parameters(model, min_numel=100), bits=3)
    >>> g = torch.Generator().manual_seed(0)
    >>> if lq.should_update(0):
    ...     for name, p in model.named_parameters():
    ...         lq.observe(name, torch.randn_like(p))
    ...     lq.set_histograms(lq.histograms())      # a real run allreduces this first
    >>> qt = lq.quantize_named("0.weight", torch.randn(64, 64), g)
    >>> qt.num_levels
    4
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from qoda_hvd.quant.allocation import allocate_levels
from qoda_hvd.quant.layers import UNCOMPRESSED_TYPE_ID, LayerTyping
from qoda_hvd.quant.levels import (
    exponential_levels,
    num_levels_for_bits,
    optimal_levels,
    uniform_levels,
    validate_num_levels,
)
from qoda_hvd.quant.quantizer import DEFAULT_BUCKET_SIZE, NORMS, QuantizedTensor, Quantizer

__all__ = ["LayerwiseQuantizer", "normalized_histogram", "DEFAULT_SCHEDULE", "LEVEL_FAMILIES"]

DEFAULT_SCHEDULE = (0, 200, 1000, 5000)
DEFAULT_EVERY = 10_000
LEVEL_FAMILIES = ("optimal", "uniform", "exponential")


def normalized_histogram(
    tensor: torch.Tensor,
    *,
    bins: int = 1024,
    bucket_size: int = DEFAULT_BUCKET_SIZE,
    norm: str = "l2",
    sample_size: int = 65536,
) -> torch.Tensor:
    """Histogram (float64, on ``tensor``'s device) of ``|v_i| / ||bucket(i)||`` over [0, 1].

    Bucket norms are computed exactly; the coordinates are a strided subsample of at most
    ``sample_size``, each counted ``numel / sample`` times. Non-finite values are not counted.

    Example::

        >>> h = normalized_histogram(torch.ones(4096), bins=32, bucket_size=1024)
        >>> int(h.argmax()), float(h.sum())     # every u = 1/32
        (1, 4096.0)
    """
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise TypeError(f"tensor must be a floating torch.Tensor, got {getattr(tensor, 'dtype', type(tensor).__name__)}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= 1 << 16:
        raise ValueError(f"bins must be in [1, 65536], got {bins!r}")
    n = tensor.numel()
    hist = torch.zeros(bins, dtype=torch.float64, device=tensor.device)
    if n == 0:
        return hist
    flat = tensor.detach().reshape(-1)
    nb = -(-n // bucket_size)
    pad = nb * bucket_size - n
    x = flat.float()
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    xb = x.view(nb, bucket_size)
    nrm = torch.linalg.vector_norm(xb, dim=1) if norm == "l2" else xb.abs().amax(dim=1)
    step = max(1, n // sample_size)
    idx = torch.arange(step // 2, n, step, device=tensor.device)
    u = x[idx].abs() / nrm[idx // bucket_size]
    u = u[torch.isfinite(u)]
    b = (u * bins).clamp_(0, bins - 1).to(torch.int64)
    hist += torch.bincount(b, minlength=bins).to(torch.float64) * (n / max(idx.numel(), 1))
    return hist


class LayerwiseQuantizer:
    """Per-type levels, their statistics and update schedule, and per-name quantization.

    Args:
        typing: the :class:`~qoda_hvd.quant.layers.LayerTyping` (names -> type ids).
        bits: bits per coordinate, in [2, 8]; ``L = 2^(bits-1)`` levels per type unless
            ``allocate`` is on.
        num_levels: explicit ``L`` in [2, 128] (overrides ``bits``).
        family: ``"optimal"`` (MQV, adapted), ``"uniform"`` or ``"exponential"`` (fixed).
        bucket_size, norm: passed to :class:`~qoda_hvd.quant.quantizer.Quantizer`.
        bins: histogram bins over [0, 1].
        sample_size: coordinates sampled per observed tensor.
        schedule: steps at which levels are re-optimised; default (0, 200, 1000, 5000).
        every: and every ``every`` steps after that (0 disables); default 10000.
        allocate: choose ``L`` per type by :func:`~qoda_hvd.quant.allocation.allocate_levels`
            (variance budget = uniform levels at ``bits``) on each update.
        nonfinite: non-finite policy of the quantizers (``"raise"`` or ``"propagate"``).

    Before the first update every type uses uniform levels (``family="optimal"``).
    """

    def __init__(
        self,
        typing: LayerTyping,
        *,
        bits: int = 4,
        num_levels: Optional[int] = None,
        family: str = "optimal",
        bucket_size: int = DEFAULT_BUCKET_SIZE,
        norm: str = "l2",
        bins: int = 1024,
        sample_size: int = 16384,
        schedule: Sequence[int] = DEFAULT_SCHEDULE,
        every: int = DEFAULT_EVERY,
        allocate: bool = False,
        nonfinite: str = "raise",
    ):
        if not isinstance(typing, LayerTyping):
            raise TypeError(f"typing must be a LayerTyping, got {type(typing).__name__}")
        if family not in LEVEL_FAMILIES:
            raise ValueError(f"family must be one of {list(LEVEL_FAMILIES)}, got {family!r}")
        self.bits = bits
        self.num_levels = validate_num_levels(num_levels) if num_levels is not None else num_levels_for_bits(bits)
        if isinstance(bins, bool) or not isinstance(bins, int) or not self.num_levels - 1 <= bins <= 1 << 16:
            raise ValueError(f"bins must be in [{self.num_levels - 1}, 65536], got {bins!r}")
        if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1:
            raise ValueError(f"sample_size must be a positive int, got {sample_size!r}")
        steps = sorted({int(s) for s in schedule})
        if any(s < 0 for s in steps):
            raise ValueError(f"schedule steps must be >= 0, got {list(schedule)}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be a non-negative int, got {every!r}")
        self.typing = typing
        self.family = family
        self.bucket_size = bucket_size
        self.norm = norm
        self.bins = bins
        self.sample_size = sample_size
        self.schedule = tuple(steps)
        self.every = every
        self.allocate = bool(allocate)
        self.nonfinite = nonfinite
        start = exponential_levels(self.num_levels) if family == "exponential" else uniform_levels(self.num_levels)
        self._quantizers: list[Quantizer] = []
        self._set_levels([start] * typing.num_types)
        self._hist: dict[int, torch.Tensor] = {}

    # -- levels -------------------------------------------------------------------------

    def _set_levels(self, levels: Sequence[torch.Tensor]) -> None:
        self._quantizers = [
            Quantizer(lv, bucket_size=self.bucket_size, norm=self.norm, nonfinite=self.nonfinite) for lv in levels
        ]

    @property
    def num_types(self) -> int:
        return self.typing.num_types

    def levels(self, type_id: int) -> torch.Tensor:
        """The current float32 levels of ``type_id``."""
        return self._quantizers[type_id].levels

    def level_table(self) -> dict[int, torch.Tensor]:
        """``{type_id: levels}``: what the payload carries so it decodes alone."""
        return {t: q.levels for t, q in enumerate(self._quantizers)}

    def quantizer(self, type_id: int) -> Quantizer:
        return self._quantizers[type_id]

    # -- schedule and statistics --------------------------------------------------------

    def should_update(self, step: int) -> bool:
        """True on scheduled steps (levels are re-optimised there); False for fixed families."""
        if self.family != "optimal" and not self.allocate:
            return False
        if step in self.schedule:
            return True
        return self.every > 0 and step > 0 and step % self.every == 0

    def observe(self, name_or_type: str | int, tensor: torch.Tensor) -> None:
        """Accumulate ``tensor``'s normalised coordinates into its type's histogram.

        Uncompressed names are ignored. Accumulation stays on the tensor's device (no sync).
        """
        tid = self.typing.type_id(name_or_type) if isinstance(name_or_type, str) else int(name_or_type)
        if tid == UNCOMPRESSED_TYPE_ID:
            return
        if not 0 <= tid < self.num_types:
            raise ValueError(f"type id must be in [0, {self.num_types - 1}], got {tid}")
        h = normalized_histogram(
            tensor, bins=self.bins, bucket_size=self.bucket_size, norm=self.norm, sample_size=self.sample_size
        )
        acc = self._hist.get(tid)
        self._hist[tid] = h if acc is None else acc.add_(h.to(acc.device))

    def histograms(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """All accumulated histograms as ONE flat float64 tensor of ``num_types * bins`` (sum me)."""
        out = torch.zeros(self.num_types * self.bins, dtype=torch.float64, device=device)
        for tid, h in self._hist.items():
            out[tid * self.bins : (tid + 1) * self.bins] = h.to(device)
        return out

    def set_histograms(self, aggregated: torch.Tensor) -> None:
        """Recompute levels from the (allreduced) flat histograms; clears the accumulators.

        Deterministic: the same ``aggregated`` gives bit-identical levels on every rank. Types
        with an all-zero histogram keep their levels.
        """
        if not isinstance(aggregated, torch.Tensor):
            raise TypeError(f"aggregated must be a torch.Tensor, got {type(aggregated).__name__}")
        expect = self.num_types * self.bins
        if aggregated.numel() != expect:
            raise ValueError(f"aggregated must have num_types * bins = {expect} elements, got {aggregated.numel()}")
        h = aggregated.detach().to("cpu", torch.float64).reshape(self.num_types, self.bins).numpy().copy()
        self._hist.clear()
        current = [q.levels for q in self._quantizers]
        if self.allocate:
            alloc = allocate_levels(h, self.typing.type_numels() if self.typing.numels else h.sum(1),
                                    reference_bits=self.bits)
            new = [lv if h[t].sum() > 0 else current[t] for t, lv in enumerate(alloc.levels)]
        elif self.family == "optimal":
            new = [optimal_levels(h[t], self.num_levels) if h[t].sum() > 0 else current[t] for t in range(self.num_types)]
        else:
            new = current
        self._set_levels(new)

    # -- quantization -------------------------------------------------------------------

    def quantize_named(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> Optional[QuantizedTensor]:
        """Quantize a parameter's gradient with its type's levels; ``None`` if it is uncompressed."""
        tid = self.typing.type_id(name)
        if tid == UNCOMPRESSED_TYPE_ID:
            return None
        return self._quantizers[tid].quantize(tensor, generator)

    def dequantize_named(self, name: str, qt: QuantizedTensor) -> torch.Tensor:
        tid = self.typing.type_id(name)
        if tid == UNCOMPRESSED_TYPE_ID:
            raise ValueError(f"{name!r} travels uncompressed; there is nothing to dequantize")
        return self._quantizers[tid].dequantize(qt)

    # -- checkpointing ------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"levels": [q.levels.clone() for q in self._quantizers]}

    def load_state_dict(self, state: Mapping) -> None:
        levels = list(state["levels"])
        if len(levels) != self.num_types:
            raise ValueError(f"state has {len(levels)} level sequences, expected {self.num_types}")
        self._set_levels(levels)
