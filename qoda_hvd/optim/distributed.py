"""``qoda_hvd.DistributedOptimizer``: Horovod's factory, with ONE compressed exchange per step.

Like ``horovod.torch.DistributedOptimizer`` it returns an instance of a subclass of the user's
optimizer class (so ``isinstance``, ``param_groups``, ``state_dict()``, lr schedulers and
``hvd.broadcast_optimizer_state`` keep working), counts backward passes with gradient hooks,
and keeps Horovod's names, defaults and misuse errors. Unlike it, the gradients are not
allreduced tensor by tensor: at ``synchronize()`` they are fused, quantized per layer type,
entropy coded, exchanged in one collective (see :mod:`qoda_hvd.comm.exchange`), decoded and
averaged, identically on every rank.

What one ``step()`` costs, by wrapped optimizer:

- :class:`~qoda_hvd.optim.qoda.QODA`, an optimizer made :func:`~qoda_hvd.optimistic`, or any
  plain optimizer: one exchange;
- :class:`~qoda_hvd.optim.extragradient.ExtraGradient`: ``extrapolation()`` and ``step()``
  exchange once each, two per iteration (the baseline QODA improves on).
"""
from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from typing import Any, Iterable, Optional

import torch

from qoda_hvd.comm.base import Communicator
from qoda_hvd.comm.exchange import (AllreduceExchange, AutoTypedExchange, LayerwiseExchange,
                                    choose_strategy)
from qoda_hvd.compression import Compression, FP16Compressor, LayerwiseCompressor, NoneCompressor
from qoda_hvd.config import EXCHANGES, QODA_EXCHANGE, env_default

__all__ = ["DistributedOptimizer"]

_STATE_KEY = "qoda_hvd"


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


class _DistributedOptimizer:
    """Mixin placed before the user's optimizer class (see :func:`DistributedOptimizer`)."""

    def __init__(self, params, named_parameters, compression, backward_passes_per_step, op,
                 exchange, communicator: Optional[Communicator], process_set) -> None:
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

        if communicator is None:
            from qoda_hvd.comm.horovod import HorovodCommunicator

            communicator = HorovodCommunicator(process_set)
        elif not isinstance(communicator, Communicator):
            raise TypeError(f"communicator must be a qoda_hvd.comm.Communicator, got {type(communicator).__name__}")
        if isinstance(op, str) and op.lower() in ("average", "sum"):
            op_name = op.lower()
        else:
            from qoda_hvd.comm.horovod import reduce_op_name

            op_name = reduce_op_name(op)

        seen: set[int] = set()
        named = []
        for name, p in named_parameters:  # the optimizer's trainable parameters, once each
            if p.requires_grad and id(p) in all_ids and id(p) not in seen:
                seen.add(id(p))
                named.append((name, p))
        self._communicator = communicator
        self._compression = compression
        self._named = named
        self.backward_passes_per_step = backward_passes_per_step
        self._exchange = self._make_exchange(compression, named, communicator, exchange,
                                             op_name == "average")
        self._passes = {p: 0 for _, p in named}
        self._hooks = [p.register_post_accumulate_grad_hook(self._count_pass) for _, p in named]
        self._synchronized = False
        self._should_synchronize = True

    @staticmethod
    def _make_exchange(compression, named, comm, exchange, average):
        params = [p for _, p in named]
        if compression is Compression.none or isinstance(compression, NoneCompressor):
            return AllreduceExchange(params, comm, average)
        if compression is Compression.fp16 or isinstance(compression, FP16Compressor):
            return AllreduceExchange(params, comm, average, fp16=True)
        if not isinstance(compression, LayerwiseCompressor):
            raise TypeError("compression must be qoda_hvd.Compression.none, .fp16 or .layerwise(...), "
                            f"got {compression!r}")
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
                                     cfg.seed, cfg.bandwidth, cfg.fallback)

        if cfg.types == "auto":
            return AutoTypedExchange(named, comm, build, num_levels_for_bits(cfg.bits),
                                     cfg.min_numel, cfg.bucket_size, cfg.norm)
        return build(_layer_typing(compression, named))

    # -- hooks and call order (Horovod's rules and sentences) ---------------------------

    def _count_pass(self, p: torch.Tensor) -> None:
        if self._passes[p] >= self.backward_passes_per_step:
            raise RuntimeError(
                "Gradients were computed more than backward_passes_per_step times before call "
                "to step(). Increase backward_passes_per_step to accumulate gradients locally.")
        self._passes[p] += 1

    def _exchange_pending(self) -> bool:
        return any(n >= self.backward_passes_per_step for n in self._passes.values())

    def synchronize(self) -> None:
        """Exchange the gradients now (ONE exchange); ``step()`` then skips its own.

        Every rank must call it the same number of times: it is a collective.
        """
        self._exchange()
        for p in self._passes:
            self._passes[p] = 0
        self._synchronized = True

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

        Keys: ``exchanges``, ``bits_per_coordinate`` (encoded bits of this rank's gradient per
        coordinate, everything in the payload included), ``ratio`` (32 / bits, vs fp32),
        ``bytes_sent`` / ``bytes_received`` (logical, this rank, all collectives), their
        ``*_per_exchange`` means, ``time_quantize_s`` / ``time_encode_s`` /
        ``time_exchange_s`` / ``time_decode_s``, ``strategy``, ``level_updates``, and for
        layer-wise compression ``types`` (name -> number of levels) and ``sends``
        (``"quantized"``, or ``"fp32"`` once ``fallback`` has switched).

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
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        ex = self._exchange
        auto = isinstance(ex, AutoTypedExchange)
        layerwise = ex.inner if auto else ex
        if isinstance(layerwise, LayerwiseExchange):
            state[_STATE_KEY] = {"step": layerwise.step, "levels": layerwise.lq.state_dict(),
                                 "typing": ex.typing_state() if auto else None,
                                 "sends": layerwise.sends,
                                 "fallback_decided": layerwise.fallback_decided}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop(_STATE_KEY, None)
        super().load_state_dict(state_dict)
        if extra is None:
            return
        ex = self._exchange
        if isinstance(ex, AutoTypedExchange):
            ex.load_typing_state(extra.get("typing"))
            ex = ex.inner
        if isinstance(ex, LayerwiseExchange):
            ex.step = int(extra["step"])
            ex.lq.load_state_dict(extra["levels"])
            if ex.fallback:  # a run without fallback=True quantizes, whatever the checkpoint chose
                ex.sends = extra.get("sends", "quantized")
                ex.fallback_decided = bool(extra.get("fallback_decided", False))


def DistributedOptimizer(optimizer: torch.optim.Optimizer,
                         named_parameters: Optional[Iterable[tuple[str, torch.Tensor]]] = None,
                         compression=Compression.none, backward_passes_per_step: int = 1,
                         op="average", exchange: str = "auto",
                         communicator: Optional[Communicator] = None, process_set=None):
    """Wrap ``optimizer`` so that ``step()`` first averages gradients over ranks in ONE exchange.

    Args:
        optimizer: any ``torch.optim.Optimizer`` instance: :class:`qoda_hvd.QODA`, one made
            :func:`qoda_hvd.optimistic`, :class:`qoda_hvd.ExtraGradient`, SGD, Adam, ...
            (rebuilt from its ``param_groups``, like Horovod does; its state starts empty).
        named_parameters: ``model.named_parameters()``; names drive the layer typing.
        compression: ``qoda_hvd.Compression.none`` (fused allreduce), ``.fp16`` or
            ``.layerwise(...)`` (quantized, entropy coded).
        backward_passes_per_step: backward passes accumulated locally before each exchange.
        op: ``hvd.Average`` (default) or ``hvd.Sum``, or ``"average"`` / ``"sum"``.
        exchange: ``"auto"``, ``"allgather"`` or ``"scatter_gather"`` (layer-wise only;
            ``QODA_EXCHANGE`` fills ``"auto"``).
        communicator: collectives to use; default Horovod's (``hvd.init()`` first). Pass
            ``qoda_hvd.comm.MPICommunicator()`` for plain mpi4py, or a
            :class:`~qoda_hvd.comm.LocalGroup` member in tests.
        process_set: Horovod process set of the default communicator.

    Example::

        >>> hvd.init()                                                   # doctest: +SKIP
        >>> opt = qoda_hvd.DistributedOptimizer(
        ...     qoda_hvd.QODA(model.parameters(), lr=0.1),
        ...     named_parameters=model.named_parameters(),
        ...     compression=qoda_hvd.Compression.layerwise(bits=4, coding="ans"))  # doctest: +SKIP
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, _DistributedOptimizer):
        raise ValueError("optimizer is already a qoda_hvd.DistributedOptimizer")
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {', '.join(EXCHANGES)}, got {exchange!r}")
    base = type(optimizer)
    cls = type(base.__name__, (_DistributedOptimizer, base), {"__module__": __name__})
    wrapped = cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step,
                  op, exchange, communicator, process_set)
    # Rebuilding from param_groups keeps every per-group hyperparameter; QODA's and
    # ExtraGradient's step-size rule is an attribute of the optimizer, so it is carried over too.
    if hasattr(optimizer, "step_size_policy"):
        wrapped.step_size_policy = optimizer.step_size_policy
    return wrapped
