"""Device dispatch of the two passes: torch tensors in, the CPU or GPU kernels underneath.

On CPU the kernels work on the tensors' memory through numpy views (no copies). On CUDA the
Triton kernels run on the device and only the packed bytes and norms, which are the payload's
content, are copied to the host for the entropy stage and the collective.

Example::

    >>> import torch
    >>> from qoda_hvd.kernels import level_table, stream_key
    >>> from qoda_hvd.kernels.dispatch import quantize_pack, dequantize_into
    >>> t = level_table(torch.linspace(0, 1, 8))
    >>> x = torch.randn(5000)
    >>> packed, norms = quantize_pack(x, t, 1024, "l2", stream_key(0, 0, 0))
    >>> out = torch.zeros(5000)
    >>> dequantize_into(packed, norms, t, 1024, out, accumulate=False)  # invalid values found
    0
    >>> gap = torch.from_numpy(norms).repeat_interleave(1024)[:5000] / 7  # one level step
    >>> bool(((out - x).abs() <= gap * 1.0001).all())
    True
"""
from __future__ import annotations

import numpy as np
import torch

from qoda_hvd.kernels import cpu
from qoda_hvd.kernels.tables import LevelTable

__all__ = ["quantize_pack", "dequantize_into", "NonFiniteError"]


class NonFiniteError(ValueError):
    """A bucket's norm is NaN or Inf (the tensor holds NaN/Inf, or its L2 sum overflows)."""


def quantize_pack(x: torch.Tensor, table: LevelTable, bucket_size: int, norm: str,
                  key: tuple[int, int], *, base: int = 0, nonfinite: str = "raise",
                  threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Quantize + pack a flat float32 tensor; host numpy ``(packed, norms)``.

    Args:
        x: float32, 1-D, contiguous, CPU or CUDA.
        table, bucket_size, norm, key, base: see :func:`qoda_hvd.kernels.cpu.quantize_pack`.
        nonfinite: ``"raise"`` (:class:`NonFiniteError`) or ``"propagate"`` (NaN/Inf norms
            travel, their buckets' symbols are zero, so the receiver sees NaN there).
        threads: CPU threads (default: torch's setting, capped by the cores per rank on the node).
    """
    if x.is_cuda:
        from qoda_hvd.kernels import gpu

        packed_d, norms_d, bad = gpu.quantize_pack(x, table, bucket_size, norm, key, base=base)
        packed, norms = packed_d.cpu().numpy(), norms_d.cpu().numpy()
    else:
        packed, norms, bad = cpu.quantize_pack(x.detach().numpy(), table, bucket_size, norm, key,
                                               base=base, threads=threads)
    if bad and nonfinite == "raise":
        first = int(np.flatnonzero(~np.isfinite(norms))[0])
        raise NonFiniteError(
            f"tensor contains NaN or Inf values (bucket {first} of size {bucket_size}, {bad} bad "
            "bucket(s)); pass nonfinite='propagate' to send them as NaN instead (e.g. under AMP "
            "loss scaling)" + ("; with norm='l2' this also happens when a bucket's sum of squares "
                               "overflows float32 (|values| above ~1e19)" if norm == "l2" else ""))
    return packed, norms


def dequantize_into(packed: np.ndarray, norms: np.ndarray, table: LevelTable, bucket_size: int,
                    out: torch.Tensor, *, accumulate: bool, threads: int | None = None) -> int:
    """``out (+)= sign * level * norm``; returns the count of packed values outside the alphabet.

    Args:
        packed, norms: host numpy arrays (a payload's content).
        table, bucket_size: the sender's levels and buckets.
        out: float32, 1-D, contiguous, CPU or CUDA (written in place).
        accumulate: add instead of overwrite.
        threads: CPU threads (default: torch's setting, capped by the cores per rank on the node).
    """
    if out.is_cuda:
        from qoda_hvd.kernels import gpu

        dev = out.device
        return gpu.dequantize_into(torch.from_numpy(np.ascontiguousarray(packed)).to(dev),
                                   torch.from_numpy(np.ascontiguousarray(norms)).to(dev),
                                   table, bucket_size, out, accumulate=accumulate)
    return cpu.dequantize_into(packed, norms, table, bucket_size, out.numpy(),
                               accumulate=accumulate, threads=threads)
