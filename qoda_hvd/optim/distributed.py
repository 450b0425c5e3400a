"""``qoda_hvd.DistributedOptimizer``: Horovod's factory, with ONE compressed exchange per step.

Like ``horovod.torch.DistributedOptimizer`` it returns an instance of a subclass of the user's
optimizer class (so ``isinstance``, ``param_groups``, ``state_dict()``, lr schedulers and
``hvd.broadcast_optimizer_state`` keep working), counts backward passes with gradient hooks,
and keeps Horovod's keyword arguments, defaults and misuse errors. Unlike it, the gradients are
not allreduced tensor by tensor: at ``synchronize()`` they are fused, quantized per layer type,
entropy coded, exchanged in one collective (see :mod:`qoda_hvd.comm.exchange`), decoded and
averaged, identically on every rank.

What one ``step()`` costs, by wrapped optimizer:

- :class:`~qoda_hvd.optim.qoda.QODA`, an optimizer made :func:`~qoda_hvd.optimistic`, or any
  plain optimizer: one exchange;
- :class:`~qoda_hvd.optim.extragradient.ExtraGradient`: ``extrapolation()`` and ``step()``
  exchange once each, two per iteration (the baseline QODA improves on).

A ``step()`` never starts a collective on one rank alone: ``hvd.broadcast_optimizer_state``
calls ``step()`` on the ranks whose optimizer state is empty (to create it) and skips the
gradient exchange only for Horovod's own optimizer class. Ours recognises that call, creates
the state locally and puts the parameters back; the exchange's own state (its step, level
tables, typing, fallback choice) then goes from the root to every rank with the optimizer
state, so every rank continues from the root's state, bit-identically.
"""
from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections import Counter
from typing import Any, Iterable, Optional

import torch

from qoda_hvd.comm.base import Communicator
from qoda_hvd.comm.exchange import (AllreduceExchange, AutoTypedExchange, ExchangeStats,
                                    LayerwiseExchange, choose_strategy)
from qoda_hvd.compression import Compression, FP16Compressor, LayerwiseCompressor, NoneCompressor
from qoda_hvd.config import EXCHANGES, QODA_EXCHANGE, env_default

__all__ = ["DistributedOptimizer"]

_STATE_KEY = "qoda_hvd"

#: Frames above ``step()`` / ``state_dict()`` searched for Horovod's broadcast_optimizer_state
#: (an lr scheduler wraps ``step`` in one more frame).
_CALLER_DEPTH = 3


def _horovod_state_broadcast_root(skip: int) -> Optional[int]:
    """``root_rank`` if ``hvd.broadcast_optimizer_state`` is our caller, else ``None``.

    Recognised by identity of its code object, so no other caller can be mistaken for it; read
    from ``sys.modules``, so nothing imports Horovod for a job that does not use it.
    """
    functions = sys.modules.get("horovod.torch.functions")
    code = getattr(getattr(functions, "broadcast_optimizer_state", None), "__code__", None)
    if code is None:
        return None
    frame = sys._getframe(skip + 1)
    for _ in range(_CALLER_DEPTH):
        if frame is None:
            return None
        if frame.f_code is code:
            return int(frame.f_locals["root_rank"])
        frame = frame.f_back
    return None


def _layer_typing(compressor: LayerwiseCompressor, named: list[tuple[str, torch.Tensor]]):
    from qoda_hvd.quant import classify_parameters
    from qoda_hvd.quant import classify_named_parameters

    types, min_numel = compressor.config.types, compressor.config.min_numel
    if isinstance(types, torch.nn.Module):
        typing = classify_parameters(types, min_numel=min_numel)
        missing = [n for n, _ in named if n not in typing.numels]
        if missing:
            raise ValueError(f"types is a module whose parameters do not include {missing[:5]}: "
                             "pass the model whose named_parameters() you gave")
        return typing
    return classify_named_parameters(named, overrides=types, min_numel=min_numel)


def _compression_kind(compression) -> str:
    """``"none"``, ``"fp16"``, ``"layerwise"`` or ``"custom"`` (has ``make_exchange``)."""
    if callable(getattr(compression, "make_exchange", None)):
        return "custom"
    cls = compression if isinstance(compression, type) else type(compression)
    if issubclass(cls, FP16Compressor):
        return "fp16"
    if issubclass(cls, NoneCompressor):
        return "none"
    if isinstance(compression, LayerwiseCompressor):
        return "layerwise"
    if getattr(cls, "__module__", "").startswith("horovod."):
        # hvd.Compression.none / .fp16: the same meaning as ours (checked on Horovod's classes).
        from qoda_hvd.comm.horovod import horovod_compression_name

        name = horovod_compression_name(compression)
        if name is not None:
            return name
    raise TypeError("compression must be qoda_hvd.Compression.none, .fp16 or .layerwise(...) "
                    f"(or Horovod's hvd.Compression.none / .fp16), got {compression!r}")


def _check_groups(groups, num_groups):
    """Horovod's ``num_groups`` / ``groups`` checks and deprecation (same sentences)."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
        raise ValueError(f"num_groups must be an int >= 0, got {num_groups!r}")
    if num_groups != 0:
        warnings.warn("Parameter `num_groups` has been replaced by `groups` and will be removed "
                      "in v0.23.0.", DeprecationWarning, stacklevel=3)
        if groups is None:
            groups = num_groups
    if groups is None:
        return None
    if isinstance(groups, list):
        seen: set[int] = set()
        for group in groups:
            for p in group:
                if not isinstance(p, torch.Tensor):
                    raise ValueError("groups must consist of torch.Tensor.")
                if id(p) in seen:
                    raise ValueError("A parameter can only appear once in groups.")
                seen.add(id(p))
    elif isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError("groups should be a non-negative integer or a list of list of "
                         f"torch.Tensor, got {groups!r}.")
    return groups


class _NoExchange:
    """A rank outside the optimizer's process set trains on its own gradients (Horovod's
    semantics): nothing is sent, nothing counted."""

    strategy = "local"

    def __init__(self) -> None:
        self.stats = ExchangeStats()

    def __call__(self) -> None:
        pass


class _DistributedOptimizer:
    """Mixin placed before the user's optimizer class (see :func:`DistributedOptimizer`)."""

    def __init__(self, params, named_parameters, compression, backward_passes_per_step, op,
                 gradient_predivide_factor, groups, sparse_as_dense, process_set, exchange,
                 communicator: Optional[Communicator]) -> None:
        super().__init__(params)
        if named_parameters is not None:
            named_parameters = list(named_parameters)
        else:
            named_parameters = [(f"allreduce.noname.{i}.{j}", v)
                                for i, group in enumerate(self.param_groups)
                                for j, v in enumerate(group["params"])]
        if any(not isinstance(p, tuple) or len(p) != 2 for p in named_parameters):
            raise ValueError("named_parameters should be a sequence of tuples (name, parameter), "
                             "usually produced by model.named_parameters().")
        dups = [k for k, c in Counter(k for k, _ in named_parameters).items() if c > 1]
        if dups:
            raise ValueError("Parameter names in named_parameters must be unique. "
                             f"Found duplicates: {', '.join(dups)}")
        all_ids = {id(v) for group in self.param_groups for v in group["params"]}
        unnamed = all_ids - {id(v) for _, v in named_parameters}
        if unnamed:
            raise ValueError("named_parameters was specified, but one or more model parameters "
                             f"were not named. Python object ids: {', '.join(map(str, unnamed))}")
        if (isinstance(backward_passes_per_step, bool) or not isinstance(backward_passes_per_step, int)
                or backward_passes_per_step < 1):
            raise ValueError(f"backward_passes_per_step must be an int >= 1, got {backward_passes_per_step!r}")
        if not isinstance(sparse_as_dense, bool):
            raise TypeError(f"sparse_as_dense must be a bool, got {type(sparse_as_dense).__name__}")
        if communicator is not None and not isinstance(communicator, Communicator):
            raise TypeError(f"communicator must be a qoda_hvd.comm.Communicator, got {type(communicator).__name__}")
        if communicator is not None and process_set is not None:
            raise ValueError("process_set chooses the ranks of the default (Horovod) communicator; "
                             "pass either process_set or communicator, not both")
        if isinstance(op, str) and op.lower() in ("average", "sum"):
            op_name = op.lower()
        else:
            from qoda_hvd.comm.horovod import reduce_op_name

            op_name = reduce_op_name(op)
        if (isinstance(gradient_predivide_factor, bool)
                or not isinstance(gradient_predivide_factor, (int, float))
                or not math.isfinite(gradient_predivide_factor) or gradient_predivide_factor <= 0):
            raise ValueError("gradient_predivide_factor must be a finite number > 0, got "
                             f"{gradient_predivide_factor!r}")
        if gradient_predivide_factor != 1.0 and op_name != "average":
            raise ValueError("gradient_predivide_factor not supported with op != Average")
        kind = _compression_kind(compression)  # TypeError for an unknown compression, early

        self._owns_communicator = communicator is None
        local = False
        if communicator is None:
            communicator, local = self._horovod_communicator(process_set)

        seen: set[int] = set()
        named = []
        for name, p in named_parameters:  # the optimizer's trainable parameters, once each
            if p.requires_grad and id(p) in all_ids and id(p) not in seen:
                seen.add(id(p))
                named.append((name, p))
        #: Parameter -> name, as Horovod's optimizer exposes it.
        self._parameter_names = {v: k for k, v in sorted(named_parameters, key=lambda t: t[0])}
        self.op = op
        self.gradient_predivide_factor = float(gradient_predivide_factor)
        self.sparse_as_dense = sparse_as_dense
        self.process_set = process_set
        # Horovod batches its per-tensor allreduces by these groups; here every gradient
        # already travels in ONE fused exchange, so they are checked and kept, with no effect.
        self._groups = groups
        self._communicator = communicator
        self._compression = compression
        self._named = named
        self._local = local
        self.backward_passes_per_step = backward_passes_per_step
        self._exchange_arg, self._average, self._kind = exchange, op_name == "average", kind
        self._exchange = (_NoExchange() if local else
                          self._make_exchange(compression, named, communicator, exchange,
                                              self._average, kind))
        self._passes = {p: 0 for _, p in named}
        # Horovod registers no hooks on a rank outside the process set: no pass counting there.
        self._hooks = [] if local else [p.register_post_accumulate_grad_hook(self._count_pass)
                                        for _, p in named]
        self._sparse: set[torch.Tensor] = set()       # parameters whose gradient came sparse
        self._dense: dict[torch.Tensor, torch.Tensor] = {}  # their dense buffers, reused
        self._synchronized = False
        self._should_synchronize = True
        self._state_made_locally = False
        # Elastic: re-form the exchange before this round's first collective if the ring changed
        # or a collective of the old ring failed (its handles and buffers are not to be reused).
        self._ring_checked = False
        self._broken = False

    @staticmethod
    def _horovod_communicator(process_set) -> tuple[Communicator, bool]:
        """Horovod's collectives over ``process_set``, or (outside it) a rank of its own."""
        from qoda_hvd.comm.horovod import HorovodCommunicator, process_set_included

        if process_set_included(process_set):
            return HorovodCommunicator(process_set), False
        from qoda_hvd.comm.local import LocalGroup  # Horovod's semantics: train locally

        return LocalGroup(1)[0], True

    def _rebuild_exchange(self) -> None:
        """Re-form the communicator and the exchange for Horovod's current ring, keeping the
        exchange's state (step, levels, typing, fallback choice, a compressor's extra state).

        ``hvd.elastic`` re-initialises Horovod after a lost or added worker: the size, this
        rank, ``exchange="auto"``'s strategy, the chunking and the rank-keyed noise all change.
        :meth:`synchronize` calls this by itself when the ring has changed (every rank then
        rebuilds, and a rank whose size and rank stayed keeps a still valid exchange); it is
        local (no collective), so it may also serve as an elastic reset callback. Statistics
        restart with the new exchange.
        """
        if not self._owns_communicator:
            raise RuntimeError("the exchange runs over a communicator passed to "
                               "DistributedOptimizer, which it cannot re-form; elastic training "
                               "needs the default (Horovod) communicator")
        extra = self._extra_state()
        comm, self._local = self._horovod_communicator(self.process_set)
        self._communicator = comm
        self._exchange = (_NoExchange() if self._local else
                          self._make_exchange(self._compression, self._named, comm,
                                              self._exchange_arg, self._average, self._kind))
        if extra is not None:
            self._load_extra_state(extra)
        self._set_overlap(getattr(self, "_overlap_wanted", None))

    def _ring_changed(self) -> bool:
        changed = getattr(self._communicator, "changed", None)
        return self._owns_communicator and callable(changed) and changed()

    def _reform_if_needed(self) -> None:
        """Once per round, before its first collective (and in the broadcast of the state):
        rebuild the exchange if Horovod's ring changed or one of its collectives failed."""
        if self._owns_communicator and not self._local and (self._broken or self._ring_changed()):
            self._rebuild_exchange()
        self._broken = False
        self._ring_checked = True

    @contextlib.contextmanager
    def _failing_marks_broken(self):
        try:
            yield
        except BaseException:
            self._broken, self._ring_checked = True, False
            raise

    @staticmethod
    def _make_exchange(compression, named, comm, exchange, average, kind=None):
        """The exchange object for ``compression`` (see :mod:`qoda_hvd.comm.exchange`).

        A compression object with a callable ``make_exchange(named, communicator, average)``
        builds its own exchange (e.g. low-rank compression): any callable that aggregates every
        rank's ``p.grad`` into every rank's ``p.grad`` and has ``stats``
        (:class:`~qoda_hvd.comm.exchange.ExchangeStats`); optional ``strategy``,
        ``extra_state()`` / ``load_extra_state(dict)`` (kept in ``state_dict()`` and sent by
        ``hvd.broadcast_optimizer_state``) and ``stats.rounds``.
        """
        kind = kind or _compression_kind(compression)
        if kind == "custom":
            return compression.make_exchange(list(named), comm, average)
        params = [p for _, p in named]
        if kind == "none":
            return AllreduceExchange(params, comm, average)
        if kind == "fp16":
            return AllreduceExchange(params, comm, average, fp16=True)
        from qoda_hvd.quant import LayerwiseQuantizer, num_levels_for_bits

        cfg = compression.config
        strategy = env_default(None if exchange == "auto" else exchange, QODA_EXCHANGE, str) or "auto"
        if strategy not in EXCHANGES:
            raise ValueError(f"exchange must be one of {', '.join(EXCHANGES)}, got {strategy!r}")

        def build(typing):
            quantizer = LayerwiseQuantizer(typing, bits=cfg.bits, family=cfg.levels,
                                           bucket_size=cfg.bucket_size, norm=cfg.norm,
                                           schedule=cfg.schedule, every=cfg.every,
                                           allocate=cfg.allocate)
            return LayerwiseExchange(typing, named, quantizer, comm,
                                     choose_strategy(strategy, comm.size), cfg.coding, average,
                                     cfg.seed, cfg.bandwidth, cfg.fallback, cfg.threads)

        if cfg.types == "auto":
            return AutoTypedExchange(named, comm, build, num_levels_for_bits(cfg.bits),
                                     cfg.min_numel, cfg.bucket_size, cfg.norm)
        return build(_layer_typing(compression, named))

    # -- hooks and call order (Horovod's rules and sentences) ---------------------------

    _overlap = False
    _bucket_cap_mb: Optional[float] = None

    def _set_overlap(self, on: Optional[bool]) -> None:
        """Start each bucket's collective from the hooks (layer-wise compression only; not with
        ``gradient_predivide_factor``, which scales the gradients at ``synchronize()``).
        ``None``: with a communicator that runs collectives in the background (Horovod's,
        mpi4py's), measured: overlapped and one-block iterations are timed in turn over the first steps
        where overlap is possible and every rank keeps the faster (one small allreduce);
        off with communicators that only run collectives at ``synchronize()``."""
        if on is not None and not isinstance(on, bool):
            raise TypeError(f"overlap must be a bool or None, got {type(on).__name__}")
        self._overlap_wanted = on
        probe = on is None
        if on is None:
            on = bool(getattr(self._communicator, "asynchronous", False))
        self._overlap = bool(on and hasattr(self._exchange, "grad_ready")
                             and self.gradient_predivide_factor == 1.0)
        if hasattr(self._exchange, "overlap"):
            self._exchange.overlap = self._overlap
        if hasattr(self._exchange, "overlap_probe"):
            self._exchange.overlap_probe = probe and self._overlap
        if hasattr(self._exchange, "bucket_cap_mb"):
            self._exchange.bucket_cap_mb = self._bucket_cap_mb

    def _count_pass(self, p: torch.Tensor) -> None:
        if self._passes[p] >= self.backward_passes_per_step:
            raise RuntimeError(
                "Gradients were computed more than backward_passes_per_step times before call "
                "to step(). Increase backward_passes_per_step to accumulate gradients locally.")
        self._passes[p] += 1
        if p.grad.is_sparse:
            self._sparse.add(p)
        elif self._overlap and self._passes[p] == self.backward_passes_per_step:
            # final for this round: its bucket may start while backward goes on
            if not self._ring_checked:
                self._reform_if_needed()
            with self._failing_marks_broken():
                self._exchange.grad_ready(p)

    def _exchange_pending(self) -> bool:
        return any(n >= self.backward_passes_per_step for n in self._passes.values())

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Horovod's setter: a new number of local passes per exchange, counts restarted."""
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
            raise ValueError(f"backward_passes_per_step must be an int >= 1, got {passes!r}")
        self.backward_passes_per_step = passes
        for p in self._passes:
            self._passes[p] = 0

    def _scale_grads(self, factor: float) -> None:
        grads = [p.grad for _, p in self._named if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)

    def _densify(self) -> list[torch.Tensor]:
        """Sparse gradients -> dense buffers (made once, reused) for the fused exchange."""
        dense = []
        for p in self._sparse:
            if p.grad is None or not p.grad.is_sparse:
                continue
            buf = self._dense.get(p)
            if buf is None:
                buf = self._dense[p] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            else:
                buf.zero_()
            buf.add_(p.grad)  # sums repeated indices, as coalescing would
            p.grad = buf
            dense.append(p)
        return dense

    @staticmethod
    def _to_row_sparse(dense: torch.Tensor) -> torch.Tensor:
        """The rows of ``dense`` with a nonzero entry, as a coalesced sparse tensor (the layout
        of an embedding's gradient)."""
        rows = dense.reshape(dense.shape[0], -1).ne(0).any(dim=1).nonzero().squeeze(1)
        return torch.sparse_coo_tensor(rows.unsqueeze(0), dense.index_select(0, rows),
                                       dense.shape, check_invariants=False, is_coalesced=True)

    def synchronize(self) -> None:
        """Exchange the gradients now (ONE exchange); ``step()`` then skips its own.

        Every rank of the process set must call it the same number of times: it is a
        collective. On a rank outside the set it does nothing (the gradients stay local).
        """
        if not self._ring_checked:
            self._reform_if_needed()
        if not self._local:
            densified = self._densify() if self._sparse else ()
            factor = self.gradient_predivide_factor
            if factor != 1.0:  # Horovod's split of the average: 1/f before the sum, f/K after
                self._scale_grads(1.0 / factor)
            with self._failing_marks_broken():
                self._exchange()
            if factor != 1.0:
                self._scale_grads(factor)
            for p in densified:  # the optimizer gets a sparse gradient again, as in Horovod
                p.grad = self._to_row_sparse(p.grad)
        for p in self._passes:
            self._passes[p] = 0
        self._synchronized = True
        self._ring_checked = False

    @contextlib.contextmanager
    def skip_synchronize(self):
        """A context in which ``step()`` does not exchange (after a manual ``synchronize()``,
        e.g. to clip the averaged gradients)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if _horovod_state_broadcast_root(1) is not None:
            loss = self._make_state_locally(closure)
            self._state_made_locally = True
            return loss
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() "
                              "context after optimizer.synchronize(). This can cause training "
                              "slowdown. You may want to consider using "
                              "optimizer.skip_synchronize() context if you use "
                              "optimizer.synchronize() in your code.")
            self.synchronize()
        self._synchronized = False
        return super().step(closure)

    # Step hooks of torch.optim fire in the wrapped optimizer's step, once per step.
    step.hooked = True  # type: ignore[attr-defined]

    def _make_state_locally(self, closure):
        """``hvd.broadcast_optimizer_state``'s state-creating ``step()`` (zero gradients, on the
        ranks with empty state only): the wrapped optimizer's step, without any collective, and
        the parameters put back, since the parameters were broadcast before and a step that
        moves them on some ranks only (QODA, optimism, weight decay) would desynchronise them."""
        params = [p for group in self.param_groups for p in group["params"]]
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
        if getattr(self, "_extrapolated", True) is False:
            super().extrapolation()  # ExtraGradient creates its state in extrapolation()
        loss = super().step(closure)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        return loss

    def extrapolation(self) -> None:
        """Extra-gradient only: exchange the gradient at x_t, then move to x_{t+1/2}."""
        if not hasattr(super(), "extrapolation"):
            raise AttributeError(f"{type(self).__name__} has no extrapolation(): only extra-gradient "
                                 "optimizers take two steps per iteration")
        self.synchronize()
        self._synchronized = False
        super().extrapolation()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._exchange_pending() and not self._synchronized:
            raise RuntimeError("optimizer.zero_grad() was called after loss.backward() but "
                                 "before optimizer.step() or optimizer.synchronize(). This is "
                                 "prohibited as it can cause a race condition.")
        return super().zero_grad(set_to_none)

    # -- introspection and checkpoints --------------------------------------------------

    def compression_stats(self) -> dict[str, Any]:
        """What the exchange has cost so far on this rank.

        Keys: ``exchanges``, ``rounds`` (communication rounds; one per exchange unless the
        compression says otherwise), ``bits_per_coordinate`` (encoded bits of this rank's
        gradient per coordinate, everything in the payload included), ``ratio`` (32 / bits, vs
        fp32), ``bytes_sent`` / ``bytes_received`` (logical, this rank, all collectives), their
        ``*_per_exchange`` means, ``collectives``, ``time_quantize_s`` / ``time_encode_s`` /
        ``time_exchange_s`` / ``time_decode_s``, ``strategy`` (``"local"`` on a rank outside
        the process set), ``level_updates``, and for layer-wise compression ``types`` (name ->
        number of levels), ``sends`` (``"quantized"``, or ``"fp32"`` once ``fallback`` has
        switched), ``overlap`` (``"on"``, ``"off"``, or ``"probing"`` while the default
        ``overlap=None`` is timing both modes) and ``overlap_measured`` (mean seconds per
        iteration of each mode over all ranks, once probed).

        Example::

            >>> opt.compression_stats()["ratio"]   # doctest: +SKIP
            9.8
        """
        ex, comm = self._exchange, self._communicator
        st = ex.stats
        n = max(st.exchanges, 1)
        bits = 8.0 * st.encoded_bytes / st.coordinates if st.coordinates else float("nan")
        out = {
            "exchanges": st.exchanges,
            "rounds": getattr(st, "rounds", st.exchanges),
            "bits_per_coordinate": bits,
            "ratio": 32.0 / bits if st.coordinates else float("nan"),
            "bytes_sent": comm.stats.bytes_sent,
            "bytes_received": comm.stats.bytes_received,
            "bytes_sent_per_exchange": comm.stats.bytes_sent / n,
            "bytes_received_per_exchange": comm.stats.bytes_received / n,
            "collectives": comm.stats.collectives,
            "time_quantize_s": st.quantize_s,
            "time_encode_s": st.encode_s,
            "time_exchange_s": st.exchange_s,
            "time_decode_s": st.decode_s,
            "level_updates": st.level_updates,
            "strategy": getattr(ex, "strategy", "allreduce"),
        }
        layerwise = ex.inner if isinstance(ex, AutoTypedExchange) else ex
        if isinstance(layerwise, LayerwiseExchange):
            out["types"] = {name: int(layerwise.lq.levels(t).numel())
                            for t, name in enumerate(layerwise.typing.type_names)}
            out["sends"] = layerwise.sends
            out["overlap"] = layerwise.overlap_state
            out["overlap_measured"] = layerwise.overlap_measured
        return out

    def _extra_state(self) -> Optional[dict[str, Any]]:
        """The exchange's state (``state_dict()[_STATE_KEY]``), or None when it has none."""
        ex = self._exchange
        auto = isinstance(ex, AutoTypedExchange)
        layerwise = ex.inner if auto else ex
        extra: dict[str, Any] = {}
        if isinstance(layerwise, LayerwiseExchange):
            extra = {"step": layerwise.step, "levels": layerwise.lq.state_dict(),
                     "typing": ex.typing_state() if auto else None,
                     "sends": layerwise.sends,
                     "fallback_decided": layerwise.fallback_decided,
                     # the overlap probe's outcome (every rank must keep the same one)
                     "overlap_decided": layerwise.overlap_decided,
                     "overlap": layerwise.overlap,
                     "overlap_measured": layerwise.overlap_measured,
                     # a level update postponed by an all-zero gradient happens at the next step
                     "update_deferred": bool(getattr(layerwise, "_update_deferred", False))}
        elif auto:
            extra = {"typing": None}  # the types are still to be found at the first exchange
        get = getattr(ex, "extra_state", None)
        if callable(get):
            extra["exchange"] = get()
        return extra or None

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        ex = self._exchange
        if isinstance(ex, AutoTypedExchange):
            if extra.get("typing") is None:
                ex.inner = None
            else:
                ex.load_typing_state(extra["typing"])
            ex = ex.inner
        if isinstance(ex, LayerwiseExchange) and "step" in extra:
            ex.step = int(extra["step"])
            ex.lq.load_state_dict(extra["levels"])
            ex._update_deferred = bool(extra.get("update_deferred", False))
            if ex.fallback:  # a run without fallback=True quantizes, whatever the checkpoint chose
                ex.sends = extra.get("sends", "quantized")
                ex.fallback_decided = bool(extra.get("fallback_decided", False))
            if ex.overlap_probe and extra.get("overlap_decided"):  # probed: keep its choice
                ex.overlap_decided = True
                ex.overlap = bool(extra.get("overlap", False))
                ex.overlap_measured = extra.get("overlap_measured")
        load = getattr(self._exchange, "load_extra_state", None)
        if callable(load) and extra.get("exchange") is not None:
            load(extra["exchange"])

    def _receive_extra_state(self, root_rank: int) -> None:
        """Inside ``hvd.broadcast_optimizer_state`` (which every rank calls, and which sends only
        the torch part of ``state_dict()``): the root's exchange state to every rank, in ONE
        ``broadcast_object`` over the same (global) ranks."""
        from qoda_hvd.comm.horovod import broadcast_object

        self._reform_if_needed()  # hvd.elastic's sync after a reset: the new ring from here on
        self._ring_checked = False
        extra, is_root = broadcast_object(self._extra_state(), root_rank, "qoda_hvd.exchange_state")
        if not is_root and extra is not None:
            self._load_extra_state(extra)
        # An undecided fallback probe counts calls in this process: restart it on every rank,
        # so all ranks time the same calls and decide at the same one.
        ex = self._exchange
        ex = ex.inner if isinstance(ex, AutoTypedExchange) else ex
        if isinstance(ex, LayerwiseExchange) and ex.fallback and not ex.fallback_decided:
            ex._probe_calls, ex._probe_sums = 0, [0.0, 0.0]
        # The overlap probe likewise (a survivor of an elastic reset keeps its exchange while a
        # new worker starts a fresh one; with types="auto" the other ranks rebuild theirs).
        if isinstance(ex, LayerwiseExchange) and ex.overlap_probe and not ex.overlap_decided:
            ex.restart_overlap_probe()

    def state_dict(self) -> dict[str, Any]:
        root = _horovod_state_broadcast_root(1)
        if root is not None:
            if self._state_made_locally:  # the second call, right after the state-making step
                self._state_made_locally = False
            else:
                self._receive_extra_state(root)
        state = super().state_dict()
        extra = self._extra_state()
        if extra is not None:
            state[_STATE_KEY] = extra
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop(_STATE_KEY, None)
        super().load_state_dict(state_dict)
        # As Horovod's optimizer: a loaded state starts a new accumulation.
        for p in self._passes:
            self._passes[p] = 0
        self._synchronized = False
        self._should_synchronize = True
        self._ring_checked = False
        if extra is not None:
            self._load_extra_state(extra)


def DistributedOptimizer(optimizer: torch.optim.Optimizer,
                         named_parameters: Optional[Iterable[tuple[str, torch.Tensor]]] = None,
                         compression=Compression.none, backward_passes_per_step: int = 1,
                         op="average", gradient_predivide_factor: float = 1.0,
                         num_groups: int = 0, groups=None, sparse_as_dense: bool = False,
                         process_set=None, *, exchange: str = "auto",
                         communicator: Optional[Communicator] = None,
                         overlap: Optional[bool] = None,
                         bucket_cap_mb: Optional[float] = None):
    """Wrap ``optimizer`` so that ``step()`` first averages gradients over ranks in ONE exchange.

    Positional arguments and defaults are those of Horovod 0.28's
    ``hvd.DistributedOptimizer``, with the same meaning; ``exchange`` and ``communicator``
    are ours (keyword only).

    Args:
        optimizer: any ``torch.optim.Optimizer`` instance: :class:`qoda_hvd.QODA`, one made
            :func:`qoda_hvd.optimistic`, :class:`qoda_hvd.ExtraGradient`, SGD, Adam,
            SparseAdam, ... (rebuilt from its ``param_groups``, like Horovod does; its state
            starts empty).
        named_parameters: ``model.named_parameters()``; names drive the layer typing.
            ``opt._parameter_names`` maps each parameter to its name, as in Horovod.
        compression: ``qoda_hvd.Compression.none`` (fused allreduce), ``.fp16`` or
            ``.layerwise(...)`` (quantized, entropy coded); Horovod's ``hvd.Compression.none``
            / ``.fp16`` mean the same as ours.
        backward_passes_per_step: backward passes accumulated locally before each exchange.
        op: ``hvd.Average`` (default) or ``hvd.Sum``, or ``"average"`` / ``"sum"``.
        gradient_predivide_factor: with ``op=Average``, gradients are scaled by ``1/f`` before
            the exchange and by ``f / size`` after it (Horovod's split of the average);
            ``ValueError`` with another op.
        num_groups: deprecated by Horovod (``DeprecationWarning``); fills ``groups``.
        groups: Horovod's grouping of its per-tensor allreduces: an int > 0 or a list of lists
            of parameters, checked as Horovod does. Every gradient here already travels in ONE
            fused exchange, so the grouping changes nothing.
        sparse_as_dense: accepted with Horovod's meaning. Sparse gradients (e.g.
            ``nn.Embedding(sparse=True)``) always travel densified inside the one fused exchange
            (the quantizer skips all-zero buckets), and, as Horovod does in both modes, the
            optimizer then gets a sparse gradient again (the rows whose average is nonzero),
            so ``torch.optim.SparseAdam`` works.
        process_set: Horovod process set of the default communicator (default: all ranks). A
            rank outside it trains on its own gradients without communicating, as in Horovod.
        exchange: ``"auto"``, ``"allgather"`` or ``"scatter_gather"`` (layer-wise only;
            ``QODA_EXCHANGE`` fills ``"auto"``).
        communicator: collectives to use; default Horovod's (``hvd.init()`` first). Pass
            ``qoda_hvd.comm.MPICommunicator()`` for plain mpi4py, or a
            :class:`~qoda_hvd.comm.LocalGroup` member in tests. Not together with
            ``process_set``.
        overlap: layer-wise compression with ``exchange="allgather"``: quantize, encode and
            start each bucket's allgather from the gradient hooks, while backward goes on
            (Horovod's way of hiding communication); ``synchronize()`` then waits and decodes.
            Same aggregate, bit for bit; one communication round, one collective per bucket.
            The starts run on a worker thread (on CUDA on a side stream after an event of the
            backward's stream), so the hook returns at once. ``True``: always; ``False``:
            never. ``None`` (default), with Horovod's communicator or mpi4py's: measured, as
            ``fallback`` is: over the first 14 steps where overlap is possible, overlapped and one-block
            iterations are timed in turn and every rank keeps the faster (ONE small allreduce;
            ``compression_stats()["overlap"]`` says which). Whether overlap pays depends on
            what it hides (wire time behind backward) against what it costs (the codec and the
            collectives' progress sharing the cores with backward): on the emulated CPU
            cluster, one core per rank, it ranged from 0.83x to 1.15x. Off with communicators
            that only run collectives at ``synchronize()``.
        bucket_cap_mb: with ``overlap``, MiB of float32 gradient at which a bucket closes
            (DDP's ``bucket_cap_mb``): each layer type is cut at parameter ends into buckets of
            about this size, and a larger parameter into near-equal pieces, so the first
            collectives start sooner. ``None`` (default): Horovod's
            ``HOROVOD_FUSION_THRESHOLD`` (bytes) when set, else 25; ``0``: one bucket per
            parameter; ``math.inf``: one per layer type.

    Example::

        >>> hvd.init()                                                   # doctest: +SKIP
        >>> opt = qoda_hvd.DistributedOptimizer(
        ...     qoda_hvd.QODA(model.parameters(), lr=0.1),
        ...     named_parameters=model.named_parameters(),
        ...     compression=qoda_hvd.Compression.layerwise(bits=4, coding="ans"))  # doctest: +SKIP
        >>> hvd.broadcast_parameters(model.state_dict(), root_rank=0)   # doctest: +SKIP
        >>> hvd.broadcast_optimizer_state(opt, root_rank=0)             # doctest: +SKIP
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, _DistributedOptimizer):
        raise ValueError("optimizer is already a qoda_hvd.DistributedOptimizer")
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {', '.join(EXCHANGES)}, got {exchange!r}")
    groups = _check_groups(groups, num_groups)
    base = type(optimizer)
    cls = type(base.__name__, (_DistributedOptimizer, base), {"__module__": __name__})
    if bucket_cap_mb is not None:
        from qoda_hvd.comm.buckets import bucket_cap_bytes

        bucket_cap_bytes(bucket_cap_mb)  # TypeError / ValueError now, naming the argument
    wrapped = cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step,
                  op, gradient_predivide_factor, groups, sparse_as_dense, process_set, exchange,
                  communicator)
    wrapped._bucket_cap_mb = bucket_cap_mb
    wrapped._set_overlap(overlap)
    # Rebuilding from param_groups keeps every per-group hyperparameter; QODA's and
    # ExtraGradient's step-size rule is an attribute of the optimizer, so it is carried over too.
    if hasattr(optimizer, "step_size_policy"):
        wrapped.step_size_policy = optimizer.step_size_policy
    return wrapped
