"""Agreement of the settings that shape collectives: the same on every rank, or the same error.

A setting read from each rank's own environment (``QODA_EXCHANGE``, ``HOROVOD_FUSION_THRESHOLD``)
or state restored per rank (a probe's outcome, the step) decides which collectives a rank runs.
If two ranks differ, one waits in a collective the other never starts: a stall. So an exchange
folds every such setting into a small vector that rides along one allreduce at its first call
(the level agreement's when there is one): each setting as a 20-bit hash ``h`` and its square.
Summed over K ranks (exact in float64 for K < 2^12), ``K * sum(h^2) == sum(h)^2`` holds,
in integer arithmetic, if and only if every rank sent the same ``h``; otherwise every rank,
holding the same sums, raises the same error naming the settings that differ.
"""
from __future__ import annotations

import zlib
from typing import Any, Mapping

import torch

__all__ = ["settings_vector", "check_agreed"]

_BITS = 20


def _hash(value: Any) -> int:
    return zlib.crc32(repr(value).encode()) & ((1 << _BITS) - 1)


def settings_vector(settings: Mapping[str, Any]) -> torch.Tensor:
    """``[h_1..h_n, h_1^2..h_n^2]`` (float64) of the settings, in key order.

    Example::

        >>> settings_vector({"exchange": "allgather"}).shape
        torch.Size([2])
    """
    h = torch.tensor([_hash(settings[k]) for k in settings], dtype=torch.float64)
    return torch.cat([h, h * h])


def check_agreed(total: torch.Tensor, size: int, settings: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` (on every rank alike) unless the summed :func:`settings_vector` of
    ``size`` ranks says that all of them sent the same settings.

    Example::

        >>> s = {"exchange": "allgather", "bucket_cap_bytes": 1024}
        >>> check_agreed(2 * settings_vector(s), 2, s)          # two ranks, the same
        >>> other = settings_vector({"exchange": "scatter_gather", "bucket_cap_bytes": 1024})
        >>> check_agreed(settings_vector(s) + other, 2, s)
        Traceback (most recent call last):
        ...
        ValueError: the ranks disagree on exchange (this rank: 'allgather'): ...
    """
    n = len(settings)
    sums, squares = total[:n], total[n:2 * n]
    # the sums are exact integers in float64; compared as Python integers, exactly
    differ = [k for i, k in enumerate(settings)
              if int(squares[i]) * size != int(sums[i]) ** 2]
    if differ:
        shown = ", ".join(f"{k} (this rank: {settings[k]!r})" for k in differ)
        raise ValueError(
            f"the ranks disagree on {shown}: settings that shape the collectives must be the "
            "same on every rank (set the same arguments and environment variables, e.g. "
            "QODA_EXCHANGE, HOROVOD_FUSION_THRESHOLD, everywhere; build the optimizers in the "
            "same order on every rank)")
