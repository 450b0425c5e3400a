"""PowerSGD exchange: ONE communication round of two dependent allreduces per step.

Per step (see :mod:`qoda_hvd.lowrank.powersgd` for the math):

1. every ``p.grad`` is copied into fixed buffers (one ``torch._foreach_copy_``), the error of
   last step is added, ``P = M Q`` per group of same-shaped matrices;
2. allreduce #1: every P and every uncompressed tensor (1-D, small, or a matrix that low rank
   would not shrink by ``min_compression_rate``) in ONE grouped buffer;
3. P orthonormalised, ``Q = M^T P``; allreduce #2: every Q;
4. ``P Q^T / K`` into ``p.grad`` on every rank, bit-identical (same sums, same kernels).

Both allreduces are one round (``stats.exchanges`` counts rounds, :attr:`PowerSGDExchange.collectives`
counts collectives). Bytes per rank per step are those of an allreduce of ``P + raw + Q``
floats: independent of the number of ranks in the logical count, ``2 (K-1)/K`` of it on a ring.

Layer-wise ranks (``layerwise=True``): on the first compressed step and every ``every``
compressed steps after, each rank measures the approximation error of every unit (layer type,
or layer) at every candidate rank on its own input, the ``units x candidates`` tables are
summed in ONE small allreduce (those steps only), and every rank runs the same L-GreCo DP on
the same sums: the same ranks everywhere, no rank decides alone.

What the errors are measured on (``error_window``, see :data:`ERROR_WINDOWS`): ``"step"``
(default) the decision step's own input; ``"accumulated"`` (L-GreCo's recipe) the inputs summed
over the period since the last decision, so persistent directions weigh more than one step's
noise (one matrix-sized buffer and one ``_foreach_add_`` per step); ``"sum"`` each step's
errors measured and summed over the period (the measurement on every step: costly, for
comparison). Every window agrees in the same one small allreduce on the decision steps.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
import torch

from qoda_hvd.comm.base import Communicator
from qoda_hvd.comm.autotype import AutoTypedExchange
from qoda_hvd.comm.exchange import AllreduceExchange, ExchangeStats
from qoda_hvd.config import PowerSGDConfig
from qoda_hvd.lowrank import LowRankCore, MatrixSpec, candidate_ranks, lgreco_dp, mix_seed
from qoda_hvd.quant import LayerTyping

__all__ = ["ERROR_WINDOWS", "PowerSGDExchange", "make_powersgd_exchange", "powersgd_typing"]

_STATE_VERSION = 1
#: What the layer-wise DP measures its errors on (module doc).
ERROR_WINDOWS = ("step", "accumulated", "sum")


def _worker() -> str:
    """Who is training here: host, process and thread (fake ranks are threads of one process)."""
    import os
    import socket
    import threading

    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


class PowerSGDExchange:
    """PowerSGD over a :class:`~qoda_hvd.comm.base.Communicator` (module doc).

    Args:
        named_parameters: ``(name, parameter)`` pairs, every name known to ``typing``.
        communicator: the collectives.
        config: a validated :class:`~qoda_hvd.config.PowerSGDConfig`.
        typing: parameter name -> layer type; ``uncompressed`` names travel as float32.
        average: divide the sum by K (``op=Average``) or not (``op=Sum``).
        error_window: what the DP's errors are measured on, one of :data:`ERROR_WINDOWS`
            (default: ``config.error_window`` when the config has one, else ``"step"``).

    Attributes:
        stats: :class:`~qoda_hvd.comm.exchange.ExchangeStats` (``exchanges`` = rounds;
            ``quantize_s`` holds the compression matmuls, ``decode_s`` the decompression).
        collectives: collectives started by this exchange (2 per compressed round, 1 per
            plain round before ``start_iter``, +1 on each rank agreement).
        rank_updates: L-GreCo runs (each one small allreduce).
        step: exchanges done (checkpointed).

    Example::

        >>> from qoda_hvd.comm import LocalGroup
        >>> from qoda_hvd.quant import classify_parameters
        >>> model = torch.nn.Linear(256, 128)
        >>> cfg = PowerSGDConfig(rank=2)
        >>> ex = PowerSGDExchange(list(model.named_parameters()), LocalGroup(1)[0], cfg,
        ...                       classify_parameters(model))
        >>> model(torch.randn(4, 256)).sum().backward()
        >>> ex()
        >>> ex.collectives, ex.ranks
        (2, {'output': 2})
    """

    strategy = "powersgd"

    def __init__(self, named_parameters, communicator: Communicator, config: PowerSGDConfig,
                 typing: LayerTyping, average: bool = True,
                 error_window: Optional[str] = None) -> None:
        if not isinstance(config, PowerSGDConfig):
            raise TypeError(f"config must be a PowerSGDConfig, got {type(config).__name__}")
        if error_window is None:
            error_window = getattr(config, "error_window", "step")
        if error_window not in ERROR_WINDOWS:
            raise ValueError(f"error_window must be one of {', '.join(ERROR_WINDOWS)}, got "
                             f"{error_window!r}")
        self.error_window = error_window
        self.named = list(named_parameters)
        self.comm = communicator
        self.config = config
        self.typing = typing
        self.average = average
        self.stats = ExchangeStats()
        self.collectives = 0
        self.rank_updates = 0
        self.step = 0
        self._plain: Optional[AllreduceExchange] = None
        self._deferred = False
        # P and Q in two levels where ranks share nodes (float32 sum inside the node, an
        # allreduce of each 1/L shard between nodes): per node 2 (M-1)/M of them cross the slow
        # link instead of a ring's 2 (K-1)/K; planned at the first call (a collective: the
        # layer-wise exchange's agreed topology), not when the exchange is made
        self._groups = None
        self._planned = communicator.size == 1

        specs, raw, unit_names = [], [], []
        unit_of: dict = {}
        for name, p in self.named:
            if name in typing.uncompressed or p.dim() < 2 or p.numel() < config.min_numel:
                raw.append((name, tuple(p.shape)))
                continue
            key = name if config.granularity == "layer" else typing.type_id(name)
            if key not in unit_of:
                unit_of[key] = len(unit_names)
                unit_names.append(name if config.granularity == "layer" else typing.type_names[key])
            specs.append(MatrixSpec(name, tuple(p.shape), unit_of[key]))
        self.unit_names = unit_names
        self._specs, self._raw = specs, raw
        self._params = dict(self.named)
        self.device = self.named[0][1].device if self.named else torch.device("cpu")
        self.candidates = (candidate_ranks(config.rank, *config.rank_range)
                           if config.layerwise else [config.rank])
        self.core = self._build([config.rank] * len(unit_names))
        # The DP's measurement window (layer-wise only): the inputs summed since the last
        # decision ("accumulated", one flat buffer in parameter order, independent of the
        # layout), or the per-step tables summed ("sum").
        windowed = config.layerwise and error_window != "step" and bool(specs)
        self._window_acc = torch.zeros(sum(int(np.prod(sp.shape)) for sp in specs)
                                       if windowed and error_window == "accumulated" else 0,
                                       dtype=torch.float32, device=self.device)
        self._window_views: dict[str, torch.Tensor] = {}
        offset = 0
        for sp in specs if self._window_acc.numel() else ():
            k = int(np.prod(sp.shape))
            self._window_views[sp.name] = self._window_acc[offset:offset + k].view(sp.shape)
            offset += k
        self._window_names = list(self._window_views)
        self._window_tables: Optional[np.ndarray] = None  # "sum": errors and energy so far
        self._window_sizes: Optional[np.ndarray] = None

    # -- layout ------------------------------------------------------------------------

    def _build(self, ranks: Sequence[int]) -> LowRankCore:
        c = self.config
        core = LowRankCore(self._specs, self._raw, ranks, c.min_compression_rate,
                           c.error_feedback, c.warm_start, c.orthogonalization_epsilon, c.seed,
                           self.device)
        names = [n for n, _ in self.named]
        self._dst = [core.views[n] for n in names]
        self._src_params = [self._params[n] for n in names]
        return core

    @property
    def ranks(self) -> dict[str, int]:
        """Current rank per unit (layer type, or parameter name with ``granularity="layer"``)."""
        return dict(zip(self.unit_names, self.core.ranks))

    def _relayout(self, ranks: Sequence[int]) -> None:
        """New ranks mid-step: carry this step's inputs (error already added) and the Q memory."""
        old = self.core
        state = old.matrix_state()
        new = self._build(ranks)
        torch._foreach_copy_([new.views[n] for n, _ in self.named],
                             [old.views[n] for n, _ in self.named])
        new.load_matrix_state({"q": state["q"]}, self.step, old.q_ready)
        self.core = new

    # -- the step ----------------------------------------------------------------------

    def __call__(self) -> None:
        """Aggregate every rank's ``p.grad`` into every rank's ``p.grad`` (one round)."""
        if self.step < self.config.start_iter:
            if self._plain is None:
                self._plain = AllreduceExchange([p for _, p in self.named], self.comm,
                                                self.average, stats=self.stats)
            self._plain()
            self.collectives += 1
            self.step += 1
            return
        self._plain = None
        st = self.stats
        t0 = time.perf_counter()
        for p in self._src_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        core = self.core
        if self._dst:
            torch._foreach_copy_(self._dst, [p.grad for p in self._src_params])
        core.add_error()
        if self.config.layerwise:
            self._measure_window()
            if self._due():
                self._agree_ranks()
                core = self.core
        core.start(self.step)
        t1 = time.perf_counter()
        if core.send_p.numel():
            self._allreduce_(core.send_p)
        t2 = time.perf_counter()
        core.project()
        t3 = time.perf_counter()
        if core.send_q.numel():
            self._allreduce_(core.send_q)
        t4 = time.perf_counter()
        core.finish(self.comm.size, self.average)
        if self._dst:
            torch._foreach_copy_([p.grad for p in self._src_params], self._dst)
        t5 = time.perf_counter()
        st.quantize_s += (t1 - t0) + (t3 - t2)
        st.exchange_s += (t2 - t1) + (t4 - t3)
        st.decode_s += t5 - t4
        st.exchanges += 1
        st.coordinates += core.numel
        st.encoded_bytes += 4 * core.sent_floats
        self.step += 1

    def _due(self) -> bool:
        since = self.step - self.config.start_iter
        every = self.config.every
        return self._deferred or since == 0 or (every > 0 and since % every == 0)

    def _tables(self, inputs=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.core.unit_tables(self.candidates, len(self.unit_names),
                                     seed=mix_seed(self.config.seed, self.step), inputs=inputs)

    def _measure_window(self) -> None:
        """Add this step's input (or its error table) to the window of the next decision."""
        if self.error_window == "accumulated" and self._window_names:
            views = self.core.views
            torch._foreach_add_([self._window_views[n] for n in self._window_names],
                                [views[n] for n in self._window_names])
        elif self.error_window == "sum" and self.unit_names:
            errors, self._window_sizes, energy = self._tables()
            table = np.concatenate([errors.reshape(-1), energy])
            self._window_tables = table if self._window_tables is None else self._window_tables + table

    def _agree_ranks(self) -> None:
        """L-GreCo: ONE allreduce of the error tables, then the same DP on every rank."""
        units = len(self.unit_names)
        if units == 0:
            return
        if self.error_window == "accumulated" and self._window_names:
            errors, sizes, energy = self._tables(self._window_views)
            self._window_acc.zero_()
            table = np.concatenate([errors.reshape(-1), energy])
        elif self.error_window == "sum" and self._window_tables is not None:
            table, sizes = self._window_tables, self._window_sizes
            errors = np.empty(sizes.shape)  # the shape; the values are in the table
            self._window_tables = None
        else:
            errors, sizes, energy = self._tables()
            table = np.concatenate([errors.reshape(-1), energy])
        total = self.comm.allreduce_sum(torch.from_numpy(table)).numpy()
        self.collectives += 1
        errors, energy = total[:errors.size].reshape(errors.shape), total[errors.size:]
        base = self.candidates.index(self.config.rank)
        # All ranks see the same sums, so they take the same branch: an all-zero table (e.g. the
        # zero-gradient step of hvd.broadcast_optimizer_state) says nothing about the ranks.
        self._deferred = not bool(energy.sum() > 0)
        if self._deferred:
            return
        if self.config.error_metric == "relative":
            errors = errors / np.where(energy > 0, energy, 1.0)[:, None]
        budget = float(errors[:, base].sum())
        choice = lgreco_dp(errors, sizes, budget, self.config.buckets,
                           fallback=[base] * units)
        ranks = [self.candidates[int(c)] for c in choice]
        self.rank_updates += 1
        self.last_choice = {"budget": budget, "error": float(errors[np.arange(units), choice].sum()),
                            "size": float(sizes[np.arange(units), choice].sum()),
                            "uniform_size": float(sizes[:, base].sum())}
        if ranks != self.core.ranks:
            self._relayout(ranks)

    # -- checkpoints ---------------------------------------------------------------------

    def _allreduce_(self, buf: torch.Tensor) -> None:
        """Sum ``buf`` over the ranks in place: one allreduce, or two levels (reduce-scatter
        inside the node, allreduce between nodes, allgather inside the node)."""
        if not self._planned:
            from qoda_hvd.comm.hierarchical import plan_exchange

            plan = plan_exchange("auto", self.comm, self.device.type == "cuda")
            if plan.kind == "hierarchical":
                self._groups = (plan.local, plan.cross)
            self.topology_stats = plan.stats
            self._planned = True
        if self._groups is None:
            self.comm.allreduce_sum_(buf)
            self.collectives += 1
            return
        from qoda_hvd.comm.hierarchical import two_level_allreduce_

        local, cross = self._groups
        two_level_allreduce_(buf, local, cross)
        self.collectives += 2 + (cross.size > 1)

    def extra_state(self) -> dict:
        """Errors, Q, iteration and ranks as plain data (tensors on the CPU).

        Q, the iteration and the ranks are the same on every rank; the errors are this rank's
        own (``"rank"`` and ``"worker"`` say whose).
        """
        ms = self.core.matrix_state()
        return {"version": _STATE_VERSION, "rank": self.comm.rank, "worker": _worker(),
                "step": self.step,
                "ranks": list(self.core.ranks),
                "q_ready": self.core.q_ready, "deferred": self._deferred,
                "rank_updates": self.rank_updates,
                "errors": {k: v.cpu() for k, v in ms["errors"].items()},
                "q": {k: v.cpu() for k, v in ms["q"].items()},
                "window": self._window_state()}

    def _window_state(self) -> Optional[dict]:
        """This rank's own measurement window (``error_window`` other than ``"step"``)."""
        if self.error_window == "accumulated" and self._window_names:
            return {"kind": "accumulated",
                    "inputs": {n: v.detach().cpu().clone() for n, v in self._window_views.items()}}
        if self.error_window == "sum":
            return {"kind": "sum",
                    "tables": None if self._window_tables is None else self._window_tables.copy(),
                    "sizes": None if self._window_sizes is None else self._window_sizes.copy()}
        return None

    def _load_window_state(self, window: Optional[dict]) -> None:
        if self._window_acc.numel():
            self._window_acc.zero_()
        self._window_tables = self._window_sizes = None
        if not isinstance(window, dict) or window.get("kind") != self.error_window:
            return
        if self.error_window == "accumulated":
            for name, v in window.get("inputs", {}).items():
                if name in self._window_views:
                    self._window_views[name].copy_(v.reshape(self._window_views[name].shape))
        elif self.error_window == "sum" and window.get("tables") is not None:
            self._window_tables = np.array(window["tables"], dtype=np.float64)
            self._window_sizes = np.array(window["sizes"], dtype=np.float64)

    def load_extra_state(self, state: dict) -> None:
        """Restore :meth:`extra_state` (same parameters and configuration).

        The errors are taken only from this rank's own state: saved by the same worker
        (process and thread: an elastic re-form, whatever its new rank) or at the same rank (a
        resumed job). A state saved by another rank (``hvd.broadcast_optimizer_state`` sends
        the root's) sets Q, the iteration and the ranks, and this rank keeps its own errors
        (zero on a rank that has none), since error feedback owes each rank its own residual.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"PowerSGD state must be a dict of version {_STATE_VERSION}, got "
                             f"{type(state).__name__} of version "
                             f"{state.get('version') if isinstance(state, dict) else None!r}")
        ranks = [int(r) for r in state["ranks"]]
        if len(ranks) != len(self.unit_names):
            raise ValueError(f"the saved state has ranks for {len(ranks)} units; this exchange has "
                             f"{len(self.unit_names)} ({', '.join(self.unit_names)})")
        own = state.get("worker") == _worker() or state.get("rank") == self.comm.rank
        errors = state["errors"] if own else self.core.matrix_state()["errors"]
        # The measurement window is each rank's own inputs, as the errors are.
        window = state.get("window") if own else self._window_state()
        self.step = int(state["step"])
        self._deferred = bool(state.get("deferred", False))
        self.rank_updates = int(state.get("rank_updates", 0))
        self.core = self._build(ranks)
        dev = self.device
        self.core.load_matrix_state({"errors": {k: v.to(dev) for k, v in errors.items()},
                                     "q": {k: v.to(dev) for k, v in state["q"].items()}},
                                    self.step, bool(state["q_ready"]))
        self._load_window_state(window)


class _AutoTypedPowerSGD:
    """``types="auto"``: the typing found at the first step (one allreduce, that step only), by
    :class:`~qoda_hvd.comm.exchange.AutoTypedExchange`'s grouping; then a
    :class:`PowerSGDExchange` over it. Composition, not a subclass: the optimizer's special
    handling of the quantizer's auto typing does not apply here."""

    strategy = "powersgd"

    def __init__(self, named, communicator: Communicator, build, min_numel: int) -> None:
        # The grouping's cost model is the quantizer's (8 levels); it only groups the types.
        self._auto = AutoTypedExchange(named, communicator, build, 8, min_numel, 1024, "l2")
        self._found = 0
        self._idle = ExchangeStats()

    @property
    def inner(self) -> Optional[PowerSGDExchange]:
        return self._auto.inner

    @property
    def stats(self) -> ExchangeStats:
        return self.inner.stats if self.inner is not None else self._idle

    @property
    def collectives(self) -> int:
        return (self.inner.collectives if self.inner is not None else 0) + self._found

    def __getattr__(self, name):
        inner = self.__dict__.get("_auto").inner if "_auto" in self.__dict__ else None
        if inner is None:
            raise AttributeError(f"{name!r}: the layer types are found at the first exchange")
        return getattr(inner, name)

    def __call__(self) -> None:
        self._found += self.inner is None
        self._auto()

    def extra_state(self) -> dict:
        return {"typing": self._auto.typing_state(),
                "inner": self.inner.extra_state() if self.inner is not None else None}

    def load_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "typing" not in state:
            raise ValueError(f"PowerSGD state with types='auto' must be a dict with 'typing', got "
                             f"{type(state).__name__}")
        if state["typing"] is None:
            self._auto.inner = None
            return
        self._auto.load_typing_state(state["typing"])
        if state.get("inner") is not None:
            self.inner.load_extra_state(state["inner"])


def powersgd_typing(config: PowerSGDConfig, named) -> LayerTyping:
    """The layer typing of ``config.types`` (rules, a module, or overrides) for ``named``: the
    layer-wise quantizer's (:func:`qoda_hvd.comm.factory.layer_typing`)."""
    from qoda_hvd.comm.factory import layer_typing

    return layer_typing(config.types, config.min_numel, named)


def make_powersgd_exchange(config: PowerSGDConfig, named_parameters, communicator: Communicator,
                           average: bool = True, error_window: Optional[str] = None):
    """The exchange for :meth:`qoda_hvd.compression.LowRankCompressor.make_exchange`.

    ``error_window`` is :class:`PowerSGDExchange`'s (default: the config's, else ``"step"``).

    Example::

        >>> from qoda_hvd.comm import LocalGroup
        >>> model = torch.nn.Linear(256, 128)
        >>> ex = make_powersgd_exchange(PowerSGDConfig(rank=2), model.named_parameters(),
        ...                             LocalGroup(1)[0])
        >>> ex.strategy
        'powersgd'
    """
    named = list(named_parameters)
    if not isinstance(communicator, Communicator):
        raise TypeError(f"communicator must be a qoda_hvd.comm.Communicator, got "
                        f"{type(communicator).__name__}")

    def build(typing: LayerTyping) -> PowerSGDExchange:
        return PowerSGDExchange(named, communicator, config, typing, average, error_window)

    if config.types == "auto":
        return _AutoTypedPowerSGD(named, communicator, build, config.min_numel)
    return build(powersgd_typing(config, named))
