"""Gradient compression algorithms, as a Horovod-style ``Compression`` namespace.

``Compression.none`` and ``Compression.fp16`` are Horovod's. ``Compression.layerwise(...)`` is
the layer-wise unbiased quantizer with entropy coding. Two ways to use it:

- with :func:`qoda_hvd.DistributedOptimizer` (the real path): gradients are quantized per layer
  type, entropy coded, exchanged as bytes in ONE collective per step, decoded and averaged;
- with Horovod's own ``hvd.DistributedOptimizer``: Horovod can only *allreduce* what a
  compressor returns, and entropy-coded bytes cannot be summed, so :meth:`compress` returns the
  dequantized, still unbiased ``Q(g)`` as float. Training is correct (the average of ``Q(g_k)``
  is what the theory aggregates), but nothing is saved on the wire.

.. warning::
    Handed to ``hvd.DistributedOptimizer``, ``Compression.layerwise`` saves no bandwidth: the
    saving needs ``qoda_hvd.DistributedOptimizer``.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from qoda_hvd.config import (QODA_BITS, QODA_BUCKET_SIZE, QODA_CODING, QODA_SEED, LayerwiseConfig,
                             PowerSGDConfig, env_default)

__all__ = ["Compressor", "NoneCompressor", "FP16Compressor", "LayerwiseCompressor",
           "LowRankCompressor", "Compression"]


class Compressor:
    """Interface of Horovod's compressors: ``compress`` then ``decompress`` around a collective."""

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Compresses a tensor and returns it with the context needed to decompress it."""
        raise NotImplementedError

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Decompress the tensor with the given context."""
        raise NotImplementedError


class NoneCompressor(Compressor):
    """Default no-op compression."""

    @staticmethod
    def compress(tensor):
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor


class FP16Compressor(Compressor):
    """Compress all floating point gradients to 16-bit."""

    @staticmethod
    def compress(tensor):
        if tensor.dtype.is_floating_point:
            return tensor.type(torch.float16), tensor.dtype
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor.type(ctx) if ctx is not None and ctx.is_floating_point else tensor


def _launcher_rank() -> int:
    # The compressor may run before (or without) hvd.init(): read the rank the launcher set.
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


class LayerwiseCompressor(Compressor):
    """Layer-wise unbiased stochastic quantization with entropy coding.

    Holds the configuration; :func:`qoda_hvd.DistributedOptimizer` builds the per-layer-type
    state from it once it knows the named parameters. As a Horovod compressor (no names) every
    compressed tensor uses one level sequence of the configured family (``optimal`` starts from
    uniform levels there, since adaptation needs the ranks to agree).

    .. warning::
        Handed to ``hvd.DistributedOptimizer`` it returns dequantized floats (a summable, lossy,
        unbiased form): training works, but the bandwidth saving needs
        ``qoda_hvd.DistributedOptimizer``.

    Args:
        config: a validated :class:`~qoda_hvd.config.LayerwiseConfig`.

    Example::

        >>> comp = Compression.layerwise(bits=3, coding="ans")
        >>> g = torch.randn(64, 64)
        >>> q, ctx = comp.compress(g)
        >>> comp.decompress(q, ctx).shape
        torch.Size([64, 64])
    """

    def __init__(self, config: LayerwiseConfig) -> None:
        if not isinstance(config, LayerwiseConfig):
            raise TypeError(f"config must be a LayerwiseConfig, got {type(config).__name__}")
        self.config = config
        self._quantizer = None
        self._generator: Optional[torch.Generator] = None

    def __repr__(self) -> str:
        c = self.config
        return (f"Compression.layerwise(bits={c.bits}, levels={c.levels!r}, coding={c.coding!r}, "
                f"bucket_size={c.bucket_size}, min_numel={c.min_numel})")

    def _horovod_quantizer(self, device: torch.device):
        from qoda_hvd.quant import Quantizer, exponential_levels, num_levels_for_bits, uniform_levels
        from qoda_hvd.quant.quantizer import rank_generator

        if self._quantizer is None:
            n = num_levels_for_bits(self.config.bits)
            levels = exponential_levels(n) if self.config.levels == "exponential" else uniform_levels(n)
            self._quantizer = Quantizer(levels, bucket_size=self.config.bucket_size, norm=self.config.norm)
        if self._generator is None or self._generator.device.type != device.type:
            self._generator = rank_generator(self.config.seed, _launcher_rank(), device)
        return self._quantizer, self._generator

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Horovod contract: ``Q(tensor)`` dequantized (small or 1-D tensors pass unchanged)."""
        if (not tensor.dtype.is_floating_point or tensor.dim() <= 1
                or tensor.numel() < self.config.min_numel):
            return tensor, None
        quantizer, generator = self._horovod_quantizer(tensor.device)
        return quantizer.dequantize(quantizer.quantize(tensor, generator)), None

    def decompress(self, tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Horovod contract: the identity (``compress`` already returned values)."""
        return tensor


def layerwise(bits: Optional[int] = None, levels: str = "optimal", coding: Optional[str] = None,
              types: Any = None, bucket_size: Optional[int] = None, min_numel: int = 1024,
              norm: str = "l2", schedule: tuple = (0, 200, 1000, 5000), every: int = 10_000,
              allocate: bool = False, bandwidth: Optional[float] = None,
              fallback: bool = False, seed: Optional[int] = None,
              threads: Optional[int] = None) -> LayerwiseCompressor:
    """Layer-wise quantization with entropy coding (see :class:`~qoda_hvd.config.LayerwiseConfig`).

    Args:
        bits: bits per symbol before coding, in [2, 8] (default 4, or ``QODA_BITS``).
        levels: ``"optimal"`` (adapted, MQV), ``"uniform"`` or ``"exponential"``.
        coding: ``"auto"`` (``fixed`` or ``rans`` by the link rate, measured when no
            ``bandwidth`` is given), ``"rans"``, ``"fixed"``, ``"ans"``, ``"elias"`` or ``"zstd"``
            (default ``"auto"``, or ``QODA_CODING``).
        types: ``None`` (rules on names and shapes), an ``nn.Module`` (module classes too),
            ``{pattern: type}`` overrides, or ``"auto"`` (grouped by gradient statistics at the
            first step; the number of types is chosen too).
        bucket_size: coordinates per norm (default 1024, or ``QODA_BUCKET_SIZE``).
        min_numel: smaller or 1-D tensors travel uncompressed.
        norm: ``"l2"`` or ``"linf"``.
        schedule, every: when levels are re-optimised.
        allocate: pick the number of levels per type under a variance budget.
        bandwidth: link bytes/s, lets ``coding="auto"`` weigh codec speed against size.
        fallback: time exchanges 1-3 quantized and 5-7 as one float32 allreduce, then all
            ranks keep the faster (compression does not pay on a fast link or a slow codec).
        seed: seed of the rounding noise (default 0, or ``QODA_SEED``); mixed with the rank.
        threads: CPU threads of the codec's kernels (default: torch's setting, capped by the cores per rank on the node).

    Example::

        >>> Compression.layerwise(bits=3, coding="ans")
        Compression.layerwise(bits=3, levels='optimal', coding='ans', bucket_size=1024, min_numel=1024)
    """
    def given(value, env, default, cast=int):
        value = env_default(value, env, cast)
        return default if value is None else value

    config = LayerwiseConfig(
        bits=given(bits, QODA_BITS, 4), levels=levels, coding=given(coding, QODA_CODING, "auto", str),
        types=types, bucket_size=given(bucket_size, QODA_BUCKET_SIZE, 1024), min_numel=min_numel,
        norm=norm, schedule=tuple(schedule), every=every, allocate=allocate, bandwidth=bandwidth,
        fallback=fallback, seed=given(seed, QODA_SEED, 0), threads=threads)
    return LayerwiseCompressor(config)


class LowRankCompressor(Compressor):
    """Low-rank (PowerSGD) compression with optional layer-wise ranks (L-GreCo).

    Holds the configuration; :func:`qoda_hvd.DistributedOptimizer` asks it for its exchange
    (:meth:`make_exchange`): per matrix ``P = M Q``, allreduce P (with the uncompressed tensors),
    orthonormalise, ``Q = M^T P``, allreduce Q, ``M ~ P Q^T / K``; error feedback and warm start.
    Low-rank factors are summable, so bytes per rank do not grow with the number of ranks and
    nothing is entropy coded.

    .. warning::
        Handed to Horovod's own ``hvd.DistributedOptimizer`` it is the identity (float32 goes
        on the wire, training is exact): PowerSGD needs two dependent allreduces per step, which
        a Horovod compressor cannot express. The saving needs ``qoda_hvd.DistributedOptimizer``.

    Args:
        config: a validated :class:`~qoda_hvd.config.PowerSGDConfig`.

    Example::

        >>> comp = Compression.powersgd(rank=4, layerwise=True)
        >>> comp.config.rank, comp.config.layerwise
        (4, True)
    """

    def __init__(self, config: PowerSGDConfig) -> None:
        if not isinstance(config, PowerSGDConfig):
            raise TypeError(f"config must be a PowerSGDConfig, got {type(config).__name__}")
        self.config = config

    def __repr__(self) -> str:
        c = self.config
        return (f"Compression.powersgd(rank={c.rank}, layerwise={c.layerwise}, "
                f"granularity={c.granularity!r}, error_feedback={c.error_feedback}, "
                f"warm_start={c.warm_start}, start_iter={c.start_iter}, "
                f"min_compression_rate={c.min_compression_rate:g})")

    def make_exchange(self, named_parameters, communicator, average: bool = True):
        """The per-step exchange over ``communicator`` for ``(name, parameter)`` pairs.

        Returns a callable (one round: two allreduces) with ``stats``, ``strategy``,
        ``extra_state()`` and ``load_extra_state(state)``.
        """
        from qoda_hvd.comm.lowrank import make_powersgd_exchange

        return make_powersgd_exchange(self.config, named_parameters, communicator, average)

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Horovod contract: the tensor itself (see the warning)."""
        return tensor, None

    def decompress(self, tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Horovod contract: the identity."""
        return tensor


def powersgd(rank: int = 4, types: Any = None, layerwise: bool = False, granularity: str = "type",
             rank_range: tuple = (0.5, 2.0), every: int = 100, buckets: int = 10_000,
             error_metric: str = "absolute", error_feedback: bool = True, warm_start: bool = True, start_iter: int = 0,
             min_compression_rate: float = 2.0, min_numel: int = 1024,
             orthogonalization_epsilon: float = 1e-8,
             seed: Optional[int] = None) -> LowRankCompressor:
    """PowerSGD low-rank compression (see :class:`~qoda_hvd.config.PowerSGDConfig` for each knob).

    Args:
        rank: approximation rank per matrix, in [1, 1024] (torch's ``matrix_approximation_rank``).
        types: layer typing: ``None``, an ``nn.Module``, ``{pattern: type}`` or ``"auto"``.
        layerwise: ranks per unit by L-GreCo's DP, under the total error of ``rank`` everywhere.
        granularity: ``"type"`` (one rank per layer type) or ``"layer"`` (per parameter).
        rank_range: DP candidates as factors ``(low, high)`` of ``rank``.
        every: re-run the DP every ``every`` compressed steps (0: once).
        buckets: error discretisation of the DP.
        error_metric: ``"absolute"`` (L-GreCo's summed squared errors) or ``"relative"``
            (each unit's error over its gradient's squared norm).
        error_feedback: torch's ``use_error_feedback``.
        warm_start: torch's ``warm_start``.
        start_iter: plain allreduce for the first exchanges (torch's ``start_powerSGD_iter``).
        min_compression_rate: compress only if ``(n + m) r * rate < n m`` (torch's).
        min_numel: smaller or 1-D tensors travel uncompressed.
        orthogonalization_epsilon: Gram-Schmidt epsilon (zero gradients stay finite).
        seed: seed of the initial Q, shared by all ranks (default 0, or ``QODA_SEED``).

    Example::

        >>> Compression.powersgd(rank=8)
        Compression.powersgd(rank=8, layerwise=False, granularity='type', error_feedback=True, warm_start=True, start_iter=0, min_compression_rate=2)
    """
    seed = env_default(seed, QODA_SEED, int)
    config = PowerSGDConfig(rank=rank, types=types, layerwise=layerwise, granularity=granularity,
                            rank_range=tuple(rank_range) if isinstance(rank_range, list) else rank_range,
                            every=every, buckets=buckets, error_metric=error_metric,
                            error_feedback=error_feedback,
                            warm_start=warm_start, start_iter=start_iter,
                            min_compression_rate=min_compression_rate, min_numel=min_numel,
                            orthogonalization_epsilon=orthogonalization_epsilon,
                            seed=0 if seed is None else seed)
    return LowRankCompressor(config)


class Compression:
    """Optional gradient compression algorithms used during allreduce / exchange.

    Example::

        >>> Compression.none.compress(torch.ones(2))[0].dtype
        torch.float32
    """

    none = NoneCompressor
    fp16 = FP16Compressor
    layerwise = staticmethod(layerwise)
    powersgd = staticmethod(powersgd)
