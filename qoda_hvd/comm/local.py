"""In-process fake ranks: K communicators that meet through barriers, one thread per rank.

For tests of the exchange and the distributed optimizer without launching processes. A rank
that stops calling (an exception in its thread) breaks the barrier for the others after
``timeout`` seconds instead of hanging them.

Fake ranks may be placed on fake nodes (``ranks_per_node`` or ``node_of``), which
:func:`qoda_hvd.comm.topology.detect_topology` reads, and split into sub-groups
(:meth:`LocalGroup` communicators' ``subgroup``: the node-local and cross-node groups). The
group can record who sent how many bytes to whom (``record_traffic``), so the benchmarks count
what would cross each node's link.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Sequence

import numpy as np
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


class _Shared:
    """What every fake rank of one :class:`LocalGroup` (and its sub-groups) shares."""

    def __init__(self, size: int, timeout: float, record_traffic: bool) -> None:
        self.timeout = timeout
        self.lock = threading.Lock()
        self.subgroups: dict = {}
        #: bytes sent from rank i to rank j (logical: ring for allreduce), or None
        self.traffic = np.zeros((size, size), dtype=np.int64) if record_traffic else None


class _LocalCommunicator(Communicator):
    def __init__(self, rank: int, size: int, rendezvous: _Rendezvous, shared: _Shared,
                 global_ranks: Sequence[int], node_of: Optional[tuple[int, ...]] = None) -> None:
        super().__init__(rank, size)
        self._rv = rendezvous
        self._shared = shared
        #: this group's ranks as ranks of the whole :class:`LocalGroup`
        self.global_ranks = tuple(global_ranks)
        #: fake node of each rank of this group (None: not placed)
        self.node_of = node_of
        self._splits = 0

    def _send(self, to: int, nbytes: int) -> None:
        if self._shared.traffic is not None and to != self.rank and nbytes:
            self._shared.traffic[self.global_ranks[self.rank], self.global_ranks[to]] += nbytes

    def _allgather(self, payload):
        for j in range(self.size):
            self._send(j, payload.numel())
        return self._rv.exchange(self.rank, payload, lambda parts: [p.clone() for p in parts])

    def _alltoall(self, chunks):
        for j, c in enumerate(chunks):
            self._send(j, c.numel())
        me = self.rank
        return self._rv.exchange(self.rank, chunks, lambda rows: [r[me].clone() for r in rows])

    def _allreduce_sum(self, tensor):
        # recorded as a ring allreduce: 2 (K-1)/K of the tensor to the next rank
        nbytes = tensor.numel() * tensor.element_size()
        self._send((self.rank + 1) % self.size, 2 * (self.size - 1) * nbytes // self.size)
        return self._rv.exchange(self.rank, tensor, lambda parts: torch.stack(parts).sum(dim=0))

    def subgroup(self, groups: Sequence[Sequence[int]]) -> "_LocalCommunicator":
        """This rank's communicator in a partition of this group's ranks into ``groups``.

        Collective in the MPI sense: every rank calls it with the same ``groups`` (ranks of
        this group, each in exactly one group); rank order inside a group is the list's order.
        The sub-group counts into its own stats and into this communicator's.
        """
        groups = [tuple(int(r) for r in g) for g in groups]
        flat = sorted(r for g in groups for r in g)
        if flat != list(range(self.size)) or not all(groups):
            raise ValueError(f"groups must partition the ranks 0..{self.size - 1} into non-empty "
                             f"groups, got {groups}")
        key = (id(self._rv), self._splits, tuple(groups))
        self._splits += 1  # the same sequence of splits on every rank: the same keys
        with self._shared.lock:
            rvs = self._shared.subgroups.get(key)
            if rvs is None:
                rvs = self._shared.subgroups[key] = [_Rendezvous(len(g), self._shared.timeout)
                                                     for g in groups]
        index = next(i for i, g in enumerate(groups) if self.rank in g)
        members = groups[index]
        node_of = None if self.node_of is None else tuple(self.node_of[r] for r in members)
        sub = _LocalCommunicator(members.index(self.rank), len(members), rvs[index],
                                 self._shared, [self.global_ranks[r] for r in members], node_of)
        sub.parent_stats = (self.stats, *self.parent_stats)
        return sub


class LocalGroup(list):
    """``size`` communicators for fake ranks in one process; use each from its own thread.

    Args:
        size: number of fake ranks, at least 1.
        timeout: seconds a rank waits for the others before ``threading.BrokenBarrierError``.
        ranks_per_node: place ranks ``0..L-1`` on fake node 0, the next ``L`` on node 1, ...
            (must divide ``size``); what :func:`qoda_hvd.comm.topology.detect_topology` finds.
        node_of: or the fake node of each rank (``size`` integers); neither: one rank per node.
        record_traffic: keep :attr:`traffic`, bytes sent from each rank to each other rank.

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

    def __init__(self, size: int, timeout: float = 60.0, ranks_per_node: Optional[int] = None,
                 node_of: Optional[Sequence[int]] = None, record_traffic: bool = False) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an integer >= 1, got {size!r}")
        from qoda_hvd.comm.topology import nodes_from_ranks_per_node, validate_node_of

        if ranks_per_node is not None and node_of is not None:
            raise ValueError("pass ranks_per_node or node_of, not both")
        if ranks_per_node is not None:
            node_of = nodes_from_ranks_per_node(size, ranks_per_node, "ranks_per_node")
        elif node_of is not None:
            node_of = validate_node_of(node_of, size, "node_of")
        self.shared = _Shared(size, timeout, record_traffic)
        rv = _Rendezvous(size, timeout)
        super().__init__(_LocalCommunicator(r, size, rv, self.shared, range(size), node_of)
                         for r in range(size))

    def run(self, fn: Callable[[int, Communicator], Any]) -> list:
        """``fn(rank, communicator)`` on every fake rank, one thread each (one torch thread
        each); the results by rank. The first exception of any rank is raised here; a rank that
        dies breaks the others' waits after ``timeout`` instead of hanging them.

        Example::

            >>> LocalGroup(2).run(lambda r, c: c.allreduce_sum(torch.tensor([1.0])).item())
            [2.0, 2.0]
        """
        out: list = [None] * len(self)
        errors: list = []

        def work(r: int) -> None:
            try:
                torch.set_num_threads(1)
                out[r] = fn(r, self[r])
            except BaseException as e:  # collected and re-raised in the calling thread
                errors.append(e)

        threads = [threading.Thread(target=work, args=(r,)) for r in range(len(self))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out

    @property
    def traffic(self) -> Optional[np.ndarray]:
        """``traffic[i, j]``: bytes rank ``i`` sent to rank ``j`` (with ``record_traffic``)."""
        return self.shared.traffic
