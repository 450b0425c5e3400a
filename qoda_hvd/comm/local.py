"""In-process fake ranks: K communicators that meet through barriers, one thread per rank.

For tests of the exchange and the distributed optimizer without launching processes. A rank
that stops calling (an exception in its thread) breaks the barrier for the others after
``timeout`` seconds instead of hanging them.
"""
from __future__ import annotations

import threading

import torch

from qoda_hvd.comm.base import Communicator

__all__ = ["LocalGroup"]


class _Rendezvous:
    def __init__(self, size: int, timeout: float) -> None:
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots: list = [None] * size

    def exchange(self, rank: int, value, read):
        """Post ``value``; return ``read(all posted values)``, computed while every peer is
        still waiting, so no peer can reuse or overwrite its tensor before it has been read."""
        self.slots[rank] = value
        self.barrier.wait()
        out = read(list(self.slots))
        self.barrier.wait()
        return out


class _LocalCommunicator(Communicator):
    def __init__(self, rank: int, size: int, rendezvous: _Rendezvous) -> None:
        super().__init__(rank, size)
        self._rv = rendezvous

    def _allgather(self, payload):
        return self._rv.exchange(self.rank, payload, lambda parts: [p.clone() for p in parts])

    def _alltoall(self, chunks):
        me = self.rank
        return self._rv.exchange(self.rank, chunks, lambda rows: [r[me].clone() for r in rows])

    def _allreduce_sum(self, tensor):
        return self._rv.exchange(self.rank, tensor, lambda parts: torch.stack(parts).sum(dim=0))


class LocalGroup(list):
    """``size`` communicators for fake ranks in one process; use each from its own thread.

    Args:
        size: number of fake ranks, at least 1.
        timeout: seconds a rank waits for the others before ``threading.BrokenBarrierError``.

    Example::

        >>> import threading
        >>> group = LocalGroup(2)
        >>> out = [None, None]
        >>> def work(r):
        ...     out[r] = group[r].allreduce_sum(torch.tensor([float(r + 1)]))
        >>> ts = [threading.Thread(target=work, args=(r,)) for r in range(2)]
        >>> _ = [t.start() for t in ts]; _ = [t.join() for t in ts]
        >>> [o.item() for o in out]
        [3.0, 3.0]
    """

    def __init__(self, size: int, timeout: float = 60.0) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an integer >= 1, got {size!r}")
        rv = _Rendezvous(size, timeout)
        super().__init__(_LocalCommunicator(r, size, rv) for r in range(size))
