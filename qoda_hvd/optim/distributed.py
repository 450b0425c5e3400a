"""``qoda_hvd.DistributedOptimizer``: Horovod's factory, with ONE compressed exchange per step.

Like ``horovod.torch.DistributedOptimizer`` it returns an instance of a subclass of the user's
optimizer class (so ``isinstance``, ``param_groups``, ``state_dict()``, lr schedulers and
``hvd.broadcast_optimizer_state`` keep working), counts backward passes with gradient hooks,
and keeps Horovod's keyword arguments, defaults and misuse errors
(:mod:`~qoda_hvd.optim.parity`). Unlike it, the gradients are not allreduced tensor by tensor:
at ``synchronize()`` they are fused, quantized per layer type, entropy coded, exchanged in one
collective (see :mod:`qoda_hvd.comm.exchange`), decoded and averaged, identically on every rank.

This module is the step protocol: hooks, ``synchronize()``, ``step()``, ``zero_grad()``. The
rest has a module each: the exchange's state and its broadcast (:mod:`~qoda_hvd.optim.state`),
re-forming after a ring change (:mod:`~qoda_hvd.optim.elastic`), sparse gradients
(:mod:`~qoda_hvd.optim.sparse`), and the exchange itself (:func:`qoda_hvd.comm.factory.make_exchange`).

What one ``step()`` costs, by wrapped optimizer:

- :class:`~qoda_hvd.optim.qoda.QODA`, an optimizer made :func:`~qoda_hvd.optimistic`, or any
  plain optimizer: one exchange;
- :class:`~qoda_hvd.optim.extragradient.ExtraGradient`: ``extrapolation()`` and ``step()``
  exchange once each, two per iteration (the baseline QODA improves on).

A ``step()`` never starts a collective on one rank alone: ``broadcast_optimizer_state`` calls
``step()`` on the ranks whose optimizer state is empty (to create it); ours creates the state
locally and puts the parameters back.

Every optimizer names its overlapped collectives ``qoda<n>.b<bucket>``, n counting the
optimizers this thread built: two optimizers whose hooks fire in one backward (a GAN's generator
and critic) never share a name, and the ranks check at the first exchange that they agree.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any, Iterable, Optional

import torch

from qoda_hvd.comm.base import Communicator
from qoda_hvd.comm.exchange import AutoTypedExchange, LayerwiseExchange
from qoda_hvd.comm.factory import compression_kind, make_exchange
from qoda_hvd.comm.stats import ExchangeStats
from qoda_hvd.compression import Compression
from qoda_hvd.config import EXCHANGES
from qoda_hvd.optim.elastic import ElasticReforming
from qoda_hvd.optim.parity import (check_backward_passes, check_groups, check_named_parameters,
                                   check_predivide, reduce_op)
from qoda_hvd.optim.sparse import SparseGradients
from qoda_hvd.optim.state import (STATE_KEY, exchange_state, horovod_state_broadcast_root,
                                  load_exchange_state)

__all__ = ["DistributedOptimizer"]

# Optimizers built by this thread (fake ranks are threads; real ranks build in their main
# thread in the same order on every rank): the n of each optimizer's collective names.
_built = threading.local()


def _next_name() -> str:
    n = getattr(_built, "count", 0)
    _built.count = n + 1
    return f"qoda{n}"


class _NoExchange:
    """A rank outside the optimizer's process set trains on its own gradients (Horovod's
    semantics): nothing is sent, nothing counted."""

    strategy = "local"

    def __init__(self) -> None:
        self.stats = ExchangeStats()

    def __call__(self) -> None:
        pass


class _DistributedOptimizer(ElasticReforming):
    """Mixin placed before the user's optimizer class (see :func:`DistributedOptimizer`)."""

    def __init__(self, params, named_parameters, compression, backward_passes_per_step, op,
                 gradient_predivide_factor, groups, sparse_as_dense, process_set, exchange,
                 communicator: Optional[Communicator], overlap: Optional[bool],
                 bucket_cap_mb: Optional[float]) -> None:
        super().__init__(params)
        named_parameters = check_named_parameters(named_parameters, self.param_groups)
        all_ids = {id(v) for group in self.param_groups for v in group["params"]}
        check_backward_passes(backward_passes_per_step)
        if not isinstance(sparse_as_dense, bool):
            raise TypeError(f"sparse_as_dense must be a bool, got {type(sparse_as_dense).__name__}")
        if communicator is not None and not isinstance(communicator, Communicator):
            raise TypeError(f"communicator must be a qoda_hvd.comm.Communicator, got {type(communicator).__name__}")
        if communicator is not None and process_set is not None:
            raise ValueError("process_set chooses the ranks of the default (Horovod) communicator; "
                             "pass either process_set or communicator, not both")
        if overlap is not None and not isinstance(overlap, bool):
            raise TypeError(f"overlap must be a bool or None, got {type(overlap).__name__}")
        op_name = reduce_op(op)
        self.gradient_predivide_factor = check_predivide(gradient_predivide_factor, op_name)
        kind = compression_kind(compression)  # TypeError for an unknown compression, early
        self._name = _next_name()

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
        # overlap: layer-wise only, and not with gradient_predivide_factor (it scales the
        # gradients at synchronize()); None: measured where collectives run in the background
        self._overlap_wanted = overlap
        self._bucket_cap_mb = bucket_cap_mb
        self._exchange = _NoExchange() if local else self._new_exchange(communicator)
        self._passes = {p: 0 for _, p in named}
        # Horovod registers no hooks on a rank outside the process set: no pass counting there.
        self._hooks = [] if local else [p.register_post_accumulate_grad_hook(self._count_pass)
                                        for _, p in named]
        self._sparse = SparseGradients()
        self._synchronized = False
        self._should_synchronize = True
        self._state_made_locally = False
        self._broadcast_root: Optional[int] = None  # set inside broadcast_optimizer_state
        # Elastic: re-form the exchange before this round's first collective if the ring changed
        # or a collective of the old ring failed (its handles and buffers are not to be reused).
        self._ring_checked = False
        self._broken = False

    def _new_exchange(self, comm: Communicator):
        """The exchange over ``comm`` (:func:`qoda_hvd.comm.factory.make_exchange`)."""
        on = self._overlap_wanted
        probe = on is None
        if on is None:
            on = comm.asynchronous
        overlapping = (on and self._kind == "layerwise" and self.gradient_predivide_factor == 1.0)
        return make_exchange(self._compression, self._named, comm, self._exchange_arg,
                             self._average, overlap=overlapping,
                             overlap_probe=probe and overlapping,
                             bucket_cap_mb=self._bucket_cap_mb, name=self._name)

    @property
    def _overlap(self) -> bool:
        return bool(getattr(self._exchange, "overlap", False))

    # -- hooks and call order (Horovod's rules and sentences) ---------------------------

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
        self.backward_passes_per_step = check_backward_passes(passes)
        for p in self._passes:
            self._passes[p] = 0

    def _scale_grads(self, factor: float) -> None:
        grads = [p.grad for _, p in self._named if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)

    def synchronize(self) -> None:
        """Exchange the gradients now (ONE exchange); ``step()`` then skips its own.

        Every rank of the process set must call it the same number of times: it is a
        collective. On a rank outside the set it does nothing (the gradients stay local).
        """
        if not self._ring_checked:
            self._reform_if_needed()
        try:
            if not self._local:
                densified = self._sparse.densify() if self._sparse else ()
                factor = self.gradient_predivide_factor
                if factor != 1.0:  # Horovod's split of the average: 1/f before, f/K after
                    self._scale_grads(1.0 / factor)
                with self._failing_marks_broken():
                    self._exchange()
                if factor != 1.0:
                    self._scale_grads(factor)
                self._sparse.resparsify(densified)  # the optimizer gets sparse gradients again
            self._synchronized = True
        finally:  # a failed round too: the next backward starts a new one
            for p in self._passes:
                self._passes[p] = 0
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

    def _state_broadcast_root(self) -> Optional[int]:
        """The root of the state broadcast we are inside of, if any (explicit, or Horovod's
        function recognised 2 frames up)."""
        if self._broadcast_root is not None:
            return self._broadcast_root
        return horovod_state_broadcast_root(2)

    def step(self, closure=None):
        if self._state_broadcast_root() is not None:
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
            else:
                self._refuse_unrecognised_state_step()
            self.synchronize()
        self._synchronized = False
        return super().step(closure)

    # Step hooks of torch.optim fire in the wrapped optimizer's step, once per step.
    step.hooked = True  # type: ignore[attr-defined]

    def _refuse_unrecognised_state_step(self) -> None:
        """A ``step()`` with no backward since the last exchange, on an empty state, with every
        gradient zero, is what ``hvd.broadcast_optimizer_state`` makes on the ranks whose state
        is empty: exchanging there would start a collective the root never joins (a stall).
        Raise instead, on every such rank."""
        if self._local or any(self._passes.values()) or len(self.state) != 0:
            return
        grads = [p.grad for _, p in self._named]
        if not grads or any(g is None or bool((g.coalesce().values() if g.is_sparse else g).any())
                            for g in grads):
            return
        raise RuntimeError(
            "optimizer.step() was called with all-zero gradients, no backward pass and an empty "
            "optimizer state: this is hvd.broadcast_optimizer_state creating the state, called "
            "through a wrapper qoda_hvd could not recognise, and exchanging here would stall "
            "the job. Call qoda_hvd.broadcast_optimizer_state(optimizer, root_rank) instead.")

    def _make_state_locally(self, closure):
        """``broadcast_optimizer_state``'s state-creating ``step()`` (zero gradients, on the
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
        topology = getattr(ex, "topology_stats", None)
        if callable(topology):  # the topology found, why this exchange, bytes in/between nodes
            out.update(topology())
        layerwise = ex.inner if isinstance(ex, AutoTypedExchange) else ex
        if isinstance(layerwise, LayerwiseExchange):
            out["types"] = {name: int(layerwise.lq.levels(t).numel())
                            for t, name in enumerate(layerwise.typing.type_names)}
            out["sends"] = layerwise.sends
            out["overlap"] = layerwise.overlap_state
            out["overlap_measured"] = layerwise.overlap_measured
        return out

    @contextlib.contextmanager
    def _state_broadcast(self, root_rank: int):
        """Inside :func:`qoda_hvd.broadcast_optimizer_state`: ``state_dict()`` and ``step()``
        know they serve a broadcast from ``root_rank``."""
        self._broadcast_root = root_rank
        try:
            yield
        finally:
            self._broadcast_root = None

    def _receive_extra_state(self, root_rank: int) -> None:
        """Inside a state broadcast (which every rank calls, and which sends only the torch
        part of ``state_dict()``): the root's exchange state to every rank, in ONE
        ``broadcast_object`` over the same (global) ranks; undecided probes restart on every
        rank at once, and the settings are agreed again at the next exchange."""
        from qoda_hvd.comm.horovod import broadcast_object

        self._reform_if_needed()  # hvd.elastic's sync after a reset: the new ring from here on
        self._ring_checked = False
        extra, is_root = broadcast_object(exchange_state(self._exchange), root_rank,
                                          "qoda_hvd.exchange_state")
        if not is_root and extra is not None:
            load_exchange_state(self._exchange, extra)
        restart = getattr(self._exchange, "restart_probes", None)
        if callable(restart):
            restart()

    def state_dict(self) -> dict[str, Any]:
        root = self._state_broadcast_root()
        if root is not None:
            if self._state_made_locally:  # the second call, right after the state-making step
                self._state_made_locally = False
            else:
                self._receive_extra_state(root)
        state = super().state_dict()
        extra = exchange_state(self._exchange)
        if extra is not None:
            state[STATE_KEY] = extra
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop(STATE_KEY, None)
        super().load_state_dict(state_dict)
        # As Horovod's optimizer: a loaded state starts a new accumulation.
        for p in self._passes:
            self._passes[p] = 0
        self._synchronized = False
        self._should_synchronize = True
        self._ring_checked = False
        if extra is not None:
            load_exchange_state(self._exchange, extra)


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
        exchange: ``"auto"``, ``"allgather"``, ``"scatter_gather"`` or ``"hierarchical"``
            (layer-wise only; ``QODA_EXCHANGE`` fills ``"auto"``). ``"auto"``: two levels
            (float32 inside a node, compressed between nodes) with several ranks on each of
            several nodes; flat with one rank per node (allgather up to 2 ranks,
            scatter_gather beyond); one float32 allreduce on a single node of GPUs.
            ``compression_stats()`` says which and why (``topology``).
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
    groups = check_groups(groups, num_groups)
    base = type(optimizer)
    cls = type(base.__name__, (_DistributedOptimizer, base), {"__module__": __name__})
    if bucket_cap_mb is not None:
        from qoda_hvd.comm.buckets import bucket_cap_bytes

        bucket_cap_bytes(bucket_cap_mb)  # TypeError / ValueError now, naming the argument
    wrapped = cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step,
                  op, gradient_predivide_factor, groups, sparse_as_dense, process_set, exchange,
                  communicator, overlap, bucket_cap_mb)
    # Rebuilding from param_groups keeps every per-group hyperparameter; QODA's and
    # ExtraGradient's step-size rule is an attribute of the optimizer, so it is carried over too.
    if hasattr(optimizer, "step_size_policy"):
        wrapped.step_size_policy = optimizer.step_size_policy
    return wrapped
