"""``types="auto"``: the layer types found from the first step's gradients, agreed by all ranks.

The paper sets the number of layer types M by hand; here, on the first call, every rank
histograms each parameter's normalised coordinates, the histograms are summed in ONE allreduce
(that step only), and :func:`qoda_hvd.quant.auto_layer_typing` groups the parameters, choosing M
itself. Every rank gets the same aggregate, hence the same typing; then the real exchange is
built for it and this object delegates to it. The typing is part of :meth:`state_dict`, so a
resumed run (or a rank that receives the root's state) rebuilds the same exchange.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from qoda_hvd.comm.base import Communicator
from qoda_hvd.comm.buckets import bucket_cap_bytes
from qoda_hvd.comm.stats import ExchangeStats
from qoda_hvd.quant import LayerTyping

__all__ = ["AutoTypedExchange"]


class AutoTypedExchange:
    """A :class:`~qoda_hvd.comm.exchange.LayerwiseExchange` whose layer types come from the
    first step's gradients (module doc).

    Args:
        named_parameters: ``(name, parameter)`` pairs.
        communicator: the collectives.
        build: makes the exchange for a typing (the overlap settings given here are then set
            on it).
        num_levels: levels the types will be quantized with (the grouping's cost model).
        min_numel, bucket_size, norm: as in :class:`qoda_hvd.config.LayerwiseConfig`.
        bins: histogram bins per parameter (a multiple of 256).

    Example::

        >>> from qoda_hvd.comm import LocalGroup
        >>> from qoda_hvd.comm.exchange import LayerwiseExchange
        >>> from qoda_hvd.quant import LayerwiseQuantizer
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
        >>> named, comm = list(model.named_parameters()), LocalGroup(1)[0]
        >>> ex = AutoTypedExchange(named, comm, lambda t: LayerwiseExchange(
        ...     t, named, LayerwiseQuantizer(t, bits=4), comm), 8, 1024, 1024, "l2")
        >>> model(torch.randn(4, 64)).sum().backward()
        >>> ex(); ex.state_dict()["typing"] is not None
        True
    """

    def __init__(self, named_parameters, communicator: Communicator,
                 build: Callable[..., Any], num_levels: int, min_numel: int, bucket_size: int,
                 norm: str, bins: int = 256, *, overlap: bool = False,
                 overlap_probe: bool = False, bucket_cap_mb: Optional[float] = None) -> None:
        self._named = list(named_parameters)
        self.comm = communicator
        self._build = build
        self._num_levels = num_levels
        self._min_numel = min_numel
        self._bucket_size = bucket_size
        self._norm = norm
        self._bins = bins
        self.inner = None
        self._idle_stats = ExchangeStats()
        self._overlap = bool(overlap)
        self._probe = bool(overlap_probe)
        if bucket_cap_mb is not None:
            bucket_cap_bytes(bucket_cap_mb)  # checked now, not at the first step
        self._cap_mb = bucket_cap_mb

    def _make(self, typing: LayerTyping):
        inner = self._build(typing)
        inner.overlap = self._overlap
        inner.overlap_probe = self._probe
        inner.bucket_cap_mb = self._cap_mb
        return inner

    @property
    def overlap(self) -> bool:
        """Overlap with backward (see :meth:`LayerwiseExchange.grad_ready`); from the second
        step on, once the types are known."""
        return self.inner.overlap if self.inner is not None else self._overlap

    @overlap.setter
    def overlap(self, on: bool) -> None:
        self._overlap = bool(on)
        if self.inner is not None:
            self.inner.overlap = self._overlap

    @property
    def overlap_probe(self) -> bool:
        """Measure overlap against one block (see :attr:`LayerwiseExchange.overlap_probe`)."""
        return self.inner.overlap_probe if self.inner is not None else self._probe

    @overlap_probe.setter
    def overlap_probe(self, on: bool) -> None:
        self._probe = bool(on)
        if self.inner is not None:
            self.inner.overlap_probe = self._probe

    @property
    def bucket_cap_mb(self) -> Optional[float]:
        """The overlapped buckets' cap (see :attr:`LayerwiseExchange.bucket_cap_mb`)."""
        return self.inner.bucket_cap_mb if self.inner is not None else self._cap_mb

    @bucket_cap_mb.setter
    def bucket_cap_mb(self, mb: Optional[float]) -> None:
        if mb is not None:
            bucket_cap_bytes(mb)  # checked now, not at the first step
        self._cap_mb = mb
        if self.inner is not None:
            self.inner.bucket_cap_mb = mb

    @property
    def stats(self) -> ExchangeStats:
        return self.inner.stats if self.inner is not None else self._idle_stats

    @property
    def strategy(self) -> str:
        return self.inner.strategy if self.inner is not None else "auto-typed"

    @property
    def typing(self) -> Optional[LayerTyping]:
        """The found typing (None before the first exchange)."""
        return self.inner.typing if self.inner is not None else None

    def grad_ready(self, p: torch.Tensor) -> None:
        """Forwarded to the layer-wise exchange once the types are known (a no-op before)."""
        if self.inner is not None:
            self.inner.grad_ready(p)

    def abort_round(self) -> None:
        if self.inner is not None:
            self.inner.abort_round()

    def adopt_progress(self, old) -> None:
        if self.inner is not None and hasattr(self.inner, "adopt_progress"):
            self.inner.adopt_progress(old)

    def restart_probes(self) -> None:
        if self.inner is not None:
            self.inner.restart_probes()

    def __getattr__(self, name):
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(f"{name!r}: the layer types are found at the first exchange")
        return getattr(inner, name)

    def _find_typing(self) -> LayerTyping:
        from qoda_hvd.quant import auto_layer_typing, normalized_histogram

        small = {n for n, p in self._named if p.dim() <= 1 or p.numel() < self._min_numel}
        typed = [(n, p) for n, p in self._named if n not in small]
        hists = [normalized_histogram(p.grad if p.grad is not None else torch.zeros_like(p),
                                      bins=self._bins, bucket_size=self._bucket_size,
                                      norm=self._norm).cpu()
                 for _, p in typed]
        flat = torch.cat(hists) if hists else torch.zeros(0, dtype=torch.float64)
        total = self.comm.allreduce_sum(flat).reshape(len(typed), self._bins)
        return auto_layer_typing({n: total[i] for i, (n, _) in enumerate(typed)}, self._num_levels,
                                 uncompressed=small, numels={n: p.numel() for n, p in self._named})

    def __call__(self) -> None:
        if self.inner is None:
            self.inner = self._make(self._find_typing())
        self.inner()

    def typing_state(self) -> Optional[dict]:
        """The found typing as plain data (None before the first exchange)."""
        if self.inner is None:
            return None
        t = self.inner.typing
        return {"type_ids": dict(t.type_ids), "type_names": list(t.type_names),
                "uncompressed": sorted(t.uncompressed), "numels": dict(t.numels)}

    def load_typing_state(self, state: Optional[dict]) -> None:
        """Rebuild the exchange with a saved typing (from :meth:`typing_state`; None: the types
        are found again at the next exchange)."""
        self.inner = None if state is None else self._make(LayerTyping(
            state["type_ids"], tuple(state["type_names"]), frozenset(state["uncompressed"]),
            state["numels"]))

    def state_dict(self) -> dict[str, Any]:
        """The typing and, once found, the layer-wise exchange's state."""
        state = self.inner.state_dict() if self.inner is not None else {}
        state["typing"] = self.typing_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_typing_state(state.get("typing"))
        if self.inner is not None and "step" in state:
            self.inner.load_state_dict(state)
