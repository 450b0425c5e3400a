"""The one place an exchange is made from a compression: used by the optimizer and by PowerSGD.

:func:`make_exchange` turns ``Compression.none`` / ``fp16`` / ``layerwise(...)`` (or a compression
with its own ``make_exchange``, e.g. PowerSGD) into the exchange object the optimizer calls once
per step; :func:`layer_typing` resolves a config's ``types`` (a module, rules, overrides) for
every compression that types layers.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from qoda_hvd.comm.base import Communicator
from qoda_hvd.config import EXCHANGES, QODA_EXCHANGE, env_default

__all__ = ["compression_kind", "layer_typing", "make_exchange"]


def layer_typing(types: Any, min_numel: int, named: Sequence[tuple[str, torch.Tensor]]):
    """The :class:`~qoda_hvd.quant.LayerTyping` of ``types`` (a module, or name patterns /
    overrides) for ``named``.

    Example::

        >>> layer_typing(None, 64, list(torch.nn.Linear(16, 16).named_parameters())).type_id("weight")
        0
    """
    from qoda_hvd.quant import classify_named_parameters, classify_parameters

    if isinstance(types, torch.nn.Module):
        typing = classify_parameters(types, min_numel=min_numel)
        missing = [n for n, _ in named if n not in typing.numels]
        if missing:
            raise ValueError(f"types is a module whose parameters do not include {missing[:5]}: "
                             "pass the model whose named_parameters() you gave")
        return typing
    return classify_named_parameters(named, overrides=types, min_numel=min_numel)


def compression_kind(compression) -> str:
    """``"none"``, ``"fp16"``, ``"layerwise"`` or ``"custom"`` (has ``make_exchange``); a
    ``TypeError`` naming the argument for anything else.

    Example::

        >>> from qoda_hvd import Compression
        >>> compression_kind(Compression.fp16), compression_kind(Compression.layerwise(bits=4))
        ('fp16', 'layerwise')
    """
    from qoda_hvd.compression import FP16Compressor, LayerwiseCompressor, NoneCompressor

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


def resolve_exchange(exchange: str) -> str:
    """The strategy asked for: ``exchange``, or ``QODA_EXCHANGE`` where it is ``"auto"`` (a
    setting of each rank's environment: the exchange agrees it with the others at its first
    call)."""
    strategy = env_default(None if exchange == "auto" else exchange, QODA_EXCHANGE, str) or "auto"
    if strategy not in EXCHANGES:
        raise ValueError(f"exchange must be one of {', '.join(EXCHANGES)}, got {strategy!r}")
    return strategy


def make_exchange(compression, named: Sequence[tuple[str, torch.Tensor]], comm: Communicator,
                  exchange: str = "auto", average: bool = True, *, overlap: bool = False,
                  overlap_probe: bool = False, bucket_cap_mb: Optional[float] = None,
                  name: str = "qoda"):
    """The exchange object for ``compression``.

    A compression object with a callable ``make_exchange(named, communicator, average)``
    builds its own exchange (e.g. low-rank compression): any callable that aggregates every
    rank's ``p.grad`` into every rank's ``p.grad`` and has ``stats``
    (:class:`~qoda_hvd.comm.stats.ExchangeStats`); optional ``strategy``,
    ``extra_state()`` / ``load_extra_state(dict)`` (kept in the optimizer's ``state_dict()`` and
    sent by ``broadcast_optimizer_state``) and ``stats.rounds``.

    Args:
        compression: ``Compression.none`` / ``.fp16`` / ``.layerwise(...)`` / a custom one.
        named: the ``(name, parameter)`` pairs to exchange.
        comm: the collectives.
        exchange: ``"auto"``, ``"allgather"``, ``"scatter_gather"`` or ``"hierarchical"``
            (layer-wise only; ``"auto"`` and ``"hierarchical"`` read the topology, see
            :func:`qoda_hvd.comm.hierarchical.plan_exchange`).
        average: divide the sum by the number of ranks.
        overlap, overlap_probe, bucket_cap_mb: the overlapped rounds (layer-wise only; see
            :class:`~qoda_hvd.comm.exchange.LayerwiseExchange`).
        name: the exchange's collective-name prefix (unique per optimizer).

    Example::

        >>> from qoda_hvd import Compression
        >>> from qoda_hvd.comm import LocalGroup
        >>> ex = make_exchange(Compression.none, list(torch.nn.Linear(2, 2).named_parameters()),
        ...                    LocalGroup(1)[0])
        >>> type(ex).__name__
        'AllreduceExchange'
    """
    from qoda_hvd.comm.exchange import AllreduceExchange, LayerwiseExchange
    from qoda_hvd.comm.strategies import choose_strategy

    kind = compression_kind(compression)
    named = list(named)
    if kind == "custom":
        return compression.make_exchange(named, comm, average)
    params = [p for _, p in named]
    if kind in ("none", "fp16"):
        return AllreduceExchange(params, comm, average, fp16=kind == "fp16")
    from qoda_hvd.comm.autotype import AutoTypedExchange
    from qoda_hvd.quant import LayerwiseQuantizer, num_levels_for_bits

    cfg = compression.config
    requested, plan = resolve_exchange(exchange), None
    if requested in ("auto", "hierarchical") and comm.size > 1:
        # which ranks share a node (one set-up allgather) decides between two levels, flat
        # and, on one node of GPUs, float32 (see qoda_hvd.comm.hierarchical.plan_exchange)
        from qoda_hvd.comm.hierarchical import plan_exchange

        plan = plan_exchange(requested, comm, any(p.is_cuda for p in params))
        if plan.kind == "fp32":
            plain = AllreduceExchange(params, comm, average)
            plain.topology_stats = plan.stats
            return plain
    two_level = plan is not None and plan.kind == "hierarchical"
    strategy = "hierarchical" if two_level else choose_strategy(
        "auto" if requested == "hierarchical" else requested, comm.size)

    def build(typing):
        quantizer = LayerwiseQuantizer(typing, bits=cfg.bits, family=cfg.levels,
                                       bucket_size=cfg.bucket_size, norm=cfg.norm,
                                       schedule=cfg.schedule, every=cfg.every,
                                       allocate=cfg.allocate)
        if two_level:
            from qoda_hvd.comm.hierarchical import hierarchical_exchange

            return hierarchical_exchange(plan, typing, named, quantizer, comm, cfg.coding,
                                         average, cfg.seed, cfg.bandwidth, cfg.fallback,
                                         cfg.threads, overlap=overlap, overlap_probe=overlap_probe,
                                         bucket_cap_mb=bucket_cap_mb, name=name)
        ex = LayerwiseExchange(typing, named, quantizer, comm, strategy, cfg.coding, average,
                               cfg.seed, cfg.bandwidth, cfg.fallback, cfg.threads,
                               overlap=overlap, overlap_probe=overlap_probe,
                               bucket_cap_mb=bucket_cap_mb, name=name)
        if plan is not None:
            ex.topology_stats = plan.stats
        return ex

    if cfg.types == "auto":
        return AutoTypedExchange(named, comm, build, num_levels_for_bits(cfg.bits),
                                 cfg.min_numel, cfg.bucket_size, cfg.norm, overlap=overlap,
                                 overlap_probe=overlap_probe, bucket_cap_mb=bucket_cap_mb)
    return build(layer_typing(cfg.types, cfg.min_numel, named))
