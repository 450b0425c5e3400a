"""Agreement of the settings that shape collectives: the same on every rank, or the same error.

A setting read from each rank's own environment (``QODA_EXCHANGE``, ``HOROVOD_FUSION_THRESHOLD``)
or state restored per rank (a probe's outcome, the step) decides which collectives a rank runs.
If two ranks differ, one waits in a collective the other never starts: a stall. So an exchange
digests every such setting (8 bytes of BLAKE2b each) and, at its first call in a process,
allgathers the digests in ONE set-up collective (:meth:`~qoda_hvd.comm.base.Communicator.agree`,
counted apart from the per-step collectives). Every rank then holds every rank's digests, so
every rank takes the same branch: on, or the same ``ValueError`` naming the settings and the
ranks that differ.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import numpy as np
import torch

__all__ = ["check_agreed", "settings_digest"]


def settings_digest(settings: Mapping[str, Any]) -> torch.Tensor:
    """8 bytes per setting (in key order), as one uint8 tensor.

    Example::

        >>> settings_digest({"exchange": "allgather", "bucket_cap_bytes": 1024}).shape
        torch.Size([16])
    """
    raw = b"".join(hashlib.blake2b(repr(settings[k]).encode(), digest_size=8).digest()
                   for k in settings)
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy())


def check_agreed(gathered: Sequence[torch.Tensor], settings: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` (on every rank alike: every rank holds the same ``gathered``) unless
    every rank's :func:`settings_digest` equals rank 0's.

    Example::

        >>> s = {"exchange": "allgather", "bucket_cap_bytes": 1024}
        >>> check_agreed([settings_digest(s)] * 2, s)                  # two ranks, the same
        >>> other = settings_digest({"exchange": "scatter_gather", "bucket_cap_bytes": 1024})
        >>> check_agreed([settings_digest(s), other], s)
        Traceback (most recent call last):
        ...
        ValueError: the ranks disagree on exchange (this rank: 'allgather'; rank(s) 1 differ from rank 0): ...
    """
    keys = list(settings)
    rows = [g.reshape(-1).numpy().reshape(-1, 8) if g.numel() == 8 * len(keys) else None
            for g in gathered]
    differ: dict[str, list[int]] = {}
    for rank, row in enumerate(rows[1:], start=1):
        for i, key in enumerate(keys):
            if row is None or rows[0] is None or not np.array_equal(row[i], rows[0][i]):
                differ.setdefault(key, []).append(rank)
    if differ:
        shown = ", ".join(f"{k} (this rank: {settings[k]!r}; rank(s) "
                          f"{', '.join(map(str, r))} differ from rank 0)" for k, r in differ.items())
        raise ValueError(
            f"the ranks disagree on {shown}: settings that shape the collectives must be the "
            "same on every rank (set the same arguments and environment variables, e.g. "
            "QODA_EXCHANGE, HOROVOD_FUSION_THRESHOLD, everywhere; build the optimizers in the "
            "same order on every rank)")
