"""Validated configuration of layer-wise compression, and the ``QODA_*`` environment names.

Explicit keyword arguments always win; an environment variable only fills a keyword the caller
left at ``None`` (so a launcher can set ``QODA_BITS=3`` for a whole job without code changes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

__all__ = ["LayerwiseConfig", "EXCHANGES", "CODINGS", "QODA_BITS", "QODA_CODING", "QODA_EXCHANGE",
           "QODA_BUCKET_SIZE", "QODA_SEED", "env_default"]

QODA_BITS = "QODA_BITS"
QODA_CODING = "QODA_CODING"
QODA_EXCHANGE = "QODA_EXCHANGE"
QODA_BUCKET_SIZE = "QODA_BUCKET_SIZE"
QODA_SEED = "QODA_SEED"

#: Exchange strategies of :func:`qoda_hvd.DistributedOptimizer`.
EXCHANGES = ("auto", "allgather", "scatter_gather")
#: Codecs a payload segment may use (see :mod:`qoda_hvd.coding`).
CODINGS = ("auto", "ans", "elias", "fixed", "zstd")
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
            ``"elias"``, ``"fixed"`` or ``"zstd"`` (``QODA_CODING``).
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

    def __post_init__(self) -> None:
        _check_int("bits", self.bits, 2, 8)
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
        if isinstance(self.types, str) and self.types != "auto":
            raise ValueError(f"types must be None, 'auto', an nn.Module or {{pattern: type}} "
                             f"overrides, got {self.types!r}")
        if self.types is not None and not isinstance(self.types, (str, dict, list, tuple)):
            import torch.nn as nn

            if not isinstance(self.types, nn.Module):
                raise TypeError("types must be None, 'auto', an nn.Module or {pattern: type} "
                                f"overrides, got {type(self.types).__name__}")
