"""Validated configuration of layer-wise compression, and the ``QODA_*`` environment names.

Explicit keyword arguments always win; an environment variable only fills a keyword the caller
left at ``None`` (so a launcher can set ``QODA_BITS=3`` for a whole job without code changes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

__all__ = ["LayerwiseConfig", "PowerSGDConfig", "EXCHANGES", "CODINGS", "RANK_GRANULARITIES",
           "ERROR_METRICS", "QODA_BITS", "QODA_CODING", "QODA_EXCHANGE", "QODA_BUCKET_SIZE",
           "QODA_SEED", "env_default"]

QODA_BITS = "QODA_BITS"
QODA_CODING = "QODA_CODING"
QODA_EXCHANGE = "QODA_EXCHANGE"
QODA_BUCKET_SIZE = "QODA_BUCKET_SIZE"
QODA_SEED = "QODA_SEED"

#: Exchange strategies of :func:`qoda_hvd.DistributedOptimizer`.
EXCHANGES = ("auto", "allgather", "scatter_gather", "hierarchical")
#: Codecs a payload segment may use (see :mod:`qoda_hvd.coding`).
CODINGS = ("auto", "ans", "elias", "fixed", "zstd", "rans")
#: Level families (see :mod:`qoda_hvd.quant.levels`).
LEVEL_FAMILIES = ("optimal", "uniform", "exponential")


def env_default(value: Any, env: str, cast=int) -> Any:
    """``value`` if given, else ``cast(os.environ[env])`` if set, else ``None``.

    Example::

        >>> env_default(3, "QODA_BITS")
        3
    """
    if value is not None or env not in os.environ:
        return value
    raw = os.environ[env]
    try:
        return cast(raw)
    except ValueError:
        raise ValueError(f"environment variable {env}={raw!r} is not a valid {cast.__name__}") from None


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")


def _check_types(types: Any) -> None:
    if isinstance(types, str) and types != "auto":
        raise ValueError(f"types must be None, 'auto', an nn.Module or {{pattern: type}} "
                         f"overrides, got {types!r}")
    if types is not None and not isinstance(types, (str, dict, list, tuple)):
        import torch.nn as nn

        if not isinstance(types, nn.Module):
            raise TypeError("types must be None, 'auto', an nn.Module or {pattern: type} "
                            f"overrides, got {type(types).__name__}")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class LayerwiseConfig:
    """Everything :class:`qoda_hvd.compression.LayerwiseCompressor` needs, validated once.

    Attributes:
        bits: bits per symbol before entropy coding, in [2, 8]: ``2^(bits-1)`` levels per type
            (sign + level index). Default 4 (``QODA_BITS``).
        levels: level family: ``"optimal"`` (MQV, adapted on the schedule), ``"uniform"``
            (QSGD) or ``"exponential"`` (NUQSGD).
        coding: codec of the symbols: ``"auto"`` (cheapest per segment), ``"ans"``,
            ``"elias"``, ``"fixed"``, ``"zstd"`` or ``"rans"`` (``QODA_CODING``).
        types: layer typing: ``None`` (rules on names and shapes), an ``nn.Module`` (rules on
            module classes too), ordered ``{pattern: type}`` overrides on top of the rules, or
            ``"auto"`` (types and their number found from the first step's gradient statistics).
        bucket_size: coordinates per norm, in [16, 2^24] (``QODA_BUCKET_SIZE``).
        min_numel: tensors with fewer elements, or 1-D, travel uncompressed (float32).
        norm: bucket normalisation, ``"l2"`` or ``"linf"``.
        schedule: steps at which levels are re-optimised (all ranks agree in one allreduce).
        every: and every ``every`` steps after the schedule (0: never).
        allocate: choose the number of levels per type under a variance budget (L-GreCo style).
        bandwidth: link bandwidth in bytes/s, for ``coding="auto"`` to weigh codec speed.
        fallback: time the first exchanges both ways (quantized, then float32) and keep the
            faster for the rest of training, all ranks alike; see
            :mod:`qoda_hvd.comm.exchange`.
        seed: seed of the rounding noise, mixed with the rank (``QODA_SEED``).
        threads: CPU threads of the codec's kernels, in [1, 1024]; ``None``: torch's
            ``get_num_threads()``, capped by the cores per rank on the node (launchers'
            local size), so co-located ranks never oversubscribe.
    """

    bits: int = 4
    levels: str = "optimal"
    coding: str = "auto"
    types: Any = None
    bucket_size: int = 1024
    min_numel: int = 1024
    norm: str = "l2"
    schedule: tuple = (0, 200, 1000, 5000)
    every: int = 10_000
    allocate: bool = False
    bandwidth: Optional[float] = None
    fallback: bool = False
    seed: int = 0
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        _check_int("bits", self.bits, 2, 8)
        if self.threads is not None:
            _check_int("threads", self.threads, 1, 1024)
        _check_choice("levels", self.levels, LEVEL_FAMILIES)
        _check_choice("coding", self.coding, CODINGS)
        _check_int("bucket_size", self.bucket_size, 16, 1 << 24)
        _check_int("min_numel", self.min_numel, 0, 1 << 31)
        _check_choice("norm", self.norm, ("l2", "linf"))
        _check_int("every", self.every, 0, 1 << 40)
        _check_int("seed", self.seed, 0, (1 << 63) - 1)
        if self.bandwidth is not None and not (isinstance(self.bandwidth, (int, float))
                                               and self.bandwidth > 0):
            raise ValueError(f"bandwidth must be a positive number of bytes/s, got {self.bandwidth!r}")
        if not isinstance(self.fallback, bool):
            raise TypeError(f"fallback must be a bool, got {type(self.fallback).__name__}")
        sched = tuple(self.schedule)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sched):
            raise ValueError(f"schedule must be non-negative step numbers, got {list(sched)}")
        object.__setattr__(self, "schedule", tuple(sorted(set(sched))))
        _check_types(self.types)


#: Granularity of the layer-wise ranks of :class:`PowerSGDConfig`.
RANK_GRANULARITIES = ("type", "layer")
#: How :class:`PowerSGDConfig`'s DP adds up the units' approximation errors.
ERROR_METRICS = ("absolute", "relative")


@dataclass(frozen=True)
class PowerSGDConfig:
    """Everything :class:`qoda_hvd.compression.LowRankCompressor` needs, validated once.

    Names follow torch's ``PowerSGDState`` where the meaning is the same.

    Attributes:
        rank: the (global) approximation rank ``r`` per matrix, in [1, 1024] (torch's
            ``matrix_approximation_rank``). Lower compresses more; 1-4 is typical, up to 32 for
            language models. Default 4.
        types: layer typing, as in :class:`LayerwiseConfig` (``None`` rules on names and
            shapes, an ``nn.Module``, ``{pattern: type}`` overrides, or ``"auto"``); the
            ``"uncompressed"`` type travels as float32.
        layerwise: choose a rank per unit by L-GreCo's dynamic program (least total size with
            total approximation error at most that of ``rank`` everywhere); ``False``: ``rank``
            everywhere.
        granularity: the unit of the layer-wise ranks: ``"type"`` (one rank per layer type) or
            ``"layer"`` (one per parameter, as L-GreCo).
        rank_range: candidate ranks of the DP, as factors of ``rank``: ``(low, high)`` with
            ``0 < low <= 1 <= high <= 16`` (L-GreCo: ``(0.5, 2)``).
        every: re-run the DP every ``every`` compressed steps (0: only at the first), in
            [0, 2^40]; each run costs one small allreduce of the error table on that step.
        buckets: error discretisation of the DP, in [100, 10^6] (L-GreCo: 10,000).
        error_metric: what the DP adds up: ``"absolute"`` (L-GreCo's: squared Frobenius errors,
            so units with large gradients dominate the budget) or ``"relative"`` (each unit's
            error divided by its gradient's squared norm: scale-free, for optimizers such as
            Adam that rescale each coordinate).
        error_feedback: add last step's approximation error to the gradient (torch's
            ``use_error_feedback``). Default on.
        warm_start: start the power iteration from last step's Q (torch's ``warm_start``).
        start_iter: plain float32 allreduce for the first ``start_iter`` exchanges, then
            PowerSGD (torch's ``start_powerSGD_iter``, which defaults to 1000; here 0), in
            [0, 2^40].
        min_compression_rate: a matrix is compressed only if ``(n + m) r *
            min_compression_rate < n m`` (torch's, default 2), in (0, 10^6].
        min_numel: tensors with fewer elements, or 1-D, always travel uncompressed.
        orthogonalization_epsilon: added to column norms when orthonormalising with
            Gram-Schmidt (ranks <= 2), so an all-zero gradient gives zeros, not NaN; in [0, 1].
            torch defaults to 0; here 1e-8.
        seed: seed of the initial Q, the same on every rank, in [0, 2^63 - 1].
    """

    rank: int = 4
    types: Any = None
    layerwise: bool = False
    granularity: str = "type"
    rank_range: tuple = (0.5, 2.0)
    every: int = 100
    buckets: int = 10_000
    error_metric: str = "absolute"
    error_feedback: bool = True
    warm_start: bool = True
    start_iter: int = 0
    min_compression_rate: float = 2.0
    min_numel: int = 1024
    orthogonalization_epsilon: float = 1e-8
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("rank", self.rank, 1, 1024)
        for name in ("layerwise", "error_feedback", "warm_start"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        _check_choice("granularity", self.granularity, RANK_GRANULARITIES)
        _check_choice("error_metric", self.error_metric, ERROR_METRICS)
        rr = self.rank_range
        if (not isinstance(rr, (tuple, list)) or len(rr) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in rr)):
            raise ValueError(f"rank_range must be a pair (low, high) of numbers, got {rr!r}")
        if not (0 < rr[0] <= 1 <= rr[1] <= 16):
            raise ValueError(f"rank_range must satisfy 0 < low <= 1 <= high <= 16, got {tuple(rr)}")
        object.__setattr__(self, "rank_range", (float(rr[0]), float(rr[1])))
        _check_int("every", self.every, 0, 1 << 40)
        _check_int("buckets", self.buckets, 100, 1_000_000)
        _check_int("start_iter", self.start_iter, 0, 1 << 40)
        _check_int("min_numel", self.min_numel, 0, 1 << 31)
        _check_int("seed", self.seed, 0, (1 << 63) - 1)
        _check_real("min_compression_rate", self.min_compression_rate, 0.0, 1e6, low_open=True)
        _check_real("orthogonalization_epsilon", self.orthogonalization_epsilon, 0.0, 1.0)
        _check_types(self.types)


def _check_real(name: str, value: Any, lo: float, hi: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = (lo < value if low_open else lo <= value) and value <= hi
    if not ok or value != value:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{lo:g}, {hi:g}], got {value}")
