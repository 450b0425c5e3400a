"""Which ranks share a node, agreed by every rank, and the groups that follow from it.

The two-level exchange (:mod:`qoda_hvd.comm.hierarchical`) reduces in float32 among the ranks
of a node (shared memory, NVLink) and compresses only what crosses the slow link between nodes.
That needs, on every rank, the same answer to "which ranks share a node", and two
sub-communicators: this rank's node (``local``) and the ranks with the same local index on the
other nodes (``cross``).

Where the answer comes from, first match wins:

1. an override, for tests and odd schedulers: ``ranks_per_node=L`` / ``node_of=[...]``
   (arguments), else the environment variables ``QODA_RANKS_PER_NODE`` (ranks ``0..L-1`` on
   node 0, the next ``L`` on node 1, ...) and ``QODA_NODE_OF_RANK`` (``"0,0,1,1"``: the node of
   each rank);
2. the backend: Horovod's ``local_rank()`` / ``local_size()`` (its own node split: host names
   under Gloo, ``MPI_Comm_split_type(SHARED)`` under MPI), checked against the ranks' numbers;
   mpi4py's ``Split_type(COMM_TYPE_SHARED)``; the fake ranks' ``LocalGroup(ranks_per_node=...)``;
3. otherwise every rank is its own node (the flat exchange, as before).

Agreed: every rank sends what it found (and its raw override values) in ONE small set-up
allgather (:meth:`~qoda_hvd.comm.base.Communicator.agree`), and every rank computes the topology
from the same list with the same function, so either all ranks get the same topology or all
raise the same ``ValueError`` (an override set differently on two ranks, a node list of the
wrong length). A stall is never the failure mode.

Heterogeneous nodes (different numbers of ranks per node, or a placement the backend's numbers
do not explain): :attr:`Topology.homogeneous` is False and the two-level exchange falls back to
the flat one over all ranks (still correct, no saving on the link), with one warning on rank 0.

Sub-communicators (:func:`node_communicators`), each counting its own bytes (and adding them to
the parent's totals): fake ranks get sub-groups of their :class:`~qoda_hvd.comm.LocalGroup`;
mpi4py gets ``comm.Split``; Horovod gets process sets when they can be had (registered at
``hvd.init(process_sets=[...])`` with exactly these ranks, or added now when Horovod runs with
dynamic process sets: ``hvd.init(process_sets="dynamic")`` / ``HOROVOD_DYNAMIC_PROCESS_SETS=1``),
else groups that run over the global set's ``alltoall`` with zero-length splits for the ranks
outside the group (nothing to pass to ``hvd.init``; each group's bytes still go only to its
members). Any other communicator gets the same alltoall-based groups.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from qoda_hvd.comm.base import Communicator, as_bytes, from_bytes

__all__ = ["QODA_NODE_OF_RANK", "QODA_RANKS_PER_NODE", "SubsetCommunicator", "Topology",
           "detect_topology", "node_communicators", "nodes_from_ranks_per_node",
           "parse_node_list", "validate_node_of"]

#: Environment override: ranks per node, nodes filled in rank order.
QODA_RANKS_PER_NODE = "QODA_RANKS_PER_NODE"
#: Environment override: the node of each rank, comma separated ("0,0,1,1").
QODA_NODE_OF_RANK = "QODA_NODE_OF_RANK"


def _renumber(nodes: Sequence[int]) -> tuple[int, ...]:
    """Node ids 0, 1, ... in the order of each node's lowest rank."""
    ids: dict[int, int] = {}
    return tuple(ids.setdefault(n, len(ids)) for n in nodes)


def nodes_from_ranks_per_node(size: int, ranks_per_node, what: str = "ranks_per_node"
                              ) -> tuple[int, ...]:
    """Node of each rank when ranks ``0..L-1`` share node 0, the next ``L`` node 1, and so on.

    Args:
        size: number of ranks.
        ranks_per_node: ``L``, an integer >= 1 that divides ``size`` (or its decimal text).
        what: the argument's name in errors (e.g. the environment variable's).

    Example::

        >>> nodes_from_ranks_per_node(6, 3)
        (0, 0, 0, 1, 1, 1)
    """
    value = ranks_per_node
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{what} must be an integer >= 1 that divides the {size} ranks, got "
                             f"{ranks_per_node!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or size % value:
        raise ValueError(f"{what} must be an integer >= 1 that divides the {size} ranks, got "
                         f"{ranks_per_node!r}")
    return tuple(r // value for r in range(size))


def validate_node_of(node_of: Sequence[int], size: int, what: str = "node_of") -> tuple[int, ...]:
    """Check a rank -> node list and number the nodes 0, 1, ... by their lowest rank.

    Args:
        node_of: ``size`` integers >= 0; equal integers mean the same node.
        size: number of ranks.
        what: the argument's name in errors.

    Example::

        >>> validate_node_of([5, 5, 2, 2], 4)
        (0, 0, 1, 1)
    """
    if isinstance(node_of, (str, bytes)) or not isinstance(node_of, Sequence):
        raise TypeError(f"{what} must be a sequence of {size} node numbers, got "
                        f"{type(node_of).__name__}")
    values = list(node_of)
    if len(values) != size or any(isinstance(v, bool) or not isinstance(v, int) or v < 0
                                  for v in values):
        raise ValueError(f"{what} must give a node number >= 0 for each of the {size} ranks, "
                         f"got {node_of!r}")
    return _renumber(values)


def parse_node_list(text: str, size: int, what: str = QODA_NODE_OF_RANK) -> tuple[int, ...]:
    """``"0,0,1,1"`` -> the node of each rank (see :func:`validate_node_of`).

    Example::

        >>> parse_node_list("0, 0, 1, 1", 4)
        (0, 0, 1, 1)
    """
    try:
        values = [int(v) for v in text.split(",")]
    except (ValueError, AttributeError):
        raise ValueError(f"{what} must be {size} comma-separated node numbers (e.g. "
                         f"'0,0,1,1'), got {text!r}") from None
    if len(values) != size or min(values) < 0:
        raise ValueError(f"{what} must be {size} comma-separated node numbers >= 0 (one per "
                         f"rank), got {text!r}")
    return _renumber(values)


@dataclass(frozen=True)
class Topology:
    """The node of every rank, as all ranks agreed (see the module doc).

    Attributes:
        node_of: node index of each rank (nodes numbered by their lowest rank).
        rank: this rank.
        source: where it came from (``"override"``, ``"horovod"``, ``"mpi"``, ``"local"``,
            ``"single"`` or ``"unknown"``: one rank per node).
        note: why the backend's answer was not used, if it was not ('' otherwise).

    Example::

        >>> t = Topology((0, 0, 1, 1), rank=3, source="override")
        >>> t.num_nodes, t.ranks_per_node, t.local_rank, t.cross_ranks, t.two_level
        (2, 2, 1, [1, 3], True)
    """

    node_of: tuple[int, ...]
    rank: int
    source: str
    note: str = ""

    @property
    def size(self) -> int:
        return len(self.node_of)

    @property
    def num_nodes(self) -> int:
        return max(self.node_of) + 1

    def node_ranks(self, node: int) -> list[int]:
        """The ranks on ``node``, in rank order."""
        return [r for r, n in enumerate(self.node_of) if n == node]

    @property
    def node(self) -> int:
        return self.node_of[self.rank]

    @property
    def local_ranks(self) -> list[int]:
        """The ranks on this rank's node."""
        return self.node_ranks(self.node)

    @property
    def local_rank(self) -> int:
        return self.local_ranks.index(self.rank)

    @property
    def local_size(self) -> int:
        return len(self.local_ranks)

    @property
    def homogeneous(self) -> bool:
        """Every node has the same number of ranks."""
        return len({len(self.node_ranks(n)) for n in range(self.num_nodes)}) == 1

    @property
    def ranks_per_node(self) -> Optional[int]:
        """``L`` when homogeneous, else None."""
        return self.local_size if self.homogeneous else None

    @property
    def cross_ranks(self) -> list[int]:
        """The ranks with this rank's local index, one per node, in node order (homogeneous)."""
        if not self.homogeneous:
            raise ValueError(f"nodes of different sizes have no cross-node groups: {self.describe()}")
        return [self.node_ranks(n)[self.local_rank] for n in range(self.num_nodes)]

    @property
    def two_level(self) -> bool:
        """Whether a two-level exchange fits: homogeneous, more than one node, more than one
        rank per node."""
        return self.homogeneous and self.num_nodes > 1 and self.local_size > 1

    def local_groups(self) -> list[list[int]]:
        """The ranks of each node, node by node."""
        return [self.node_ranks(n) for n in range(self.num_nodes)]

    def cross_groups(self) -> list[list[int]]:
        """For each local index, its rank on each node (homogeneous only)."""
        if not self.homogeneous:
            raise ValueError(f"nodes of different sizes have no cross-node groups: {self.describe()}")
        nodes = self.local_groups()
        return [[ranks[i] for ranks in nodes] for i in range(self.local_size)]

    def describe(self) -> str:
        """One line, e.g. ``"2 nodes x 2 ranks (horovod)"``."""
        if self.homogeneous:
            text = f"{self.num_nodes} nodes x {self.local_size} ranks"
        else:
            sizes = [len(self.node_ranks(n)) for n in range(self.num_nodes)]
            text = f"{self.num_nodes} nodes of {sizes} ranks (heterogeneous)"
        return f"{text} ({self.source}{': ' + self.note if self.note else ''})"

    def as_dict(self) -> dict:
        """Plain data for stats and logs."""
        return {"nodes": self.num_nodes, "ranks_per_node": self.ranks_per_node,
                "node": self.node, "local_rank": self.local_rank, "source": self.source,
                "homogeneous": self.homogeneous, "node_of": list(self.node_of),
                "note": self.note}


# -- what each rank finds -------------------------------------------------------------------

def _backend_view(comm: Communicator) -> dict:
    """What this rank's backend says about its node (plain data, sent to every rank)."""
    from qoda_hvd.comm.local import _LocalCommunicator

    if isinstance(comm, _LocalCommunicator):
        return {"backend": "local",
                "key": None if comm.node_of is None else comm.node_of[comm.rank]}
    try:
        from qoda_hvd.comm.horovod import HorovodCommunicator
    except ImportError:  # horovod not installed
        HorovodCommunicator = ()  # type: ignore[assignment]
    if HorovodCommunicator and isinstance(comm, HorovodCommunicator):
        return {"backend": "horovod", **comm.node_info(),
                "host": os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()}
    comm_mpi = getattr(comm, "comm", None)
    if comm_mpi is not None and hasattr(comm_mpi, "Split_type"):
        from mpi4py import MPI

        shared = comm_mpi.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
        try:  # the node's key: its lowest rank of this communicator
            leader = shared.allreduce(comm.rank, op=MPI.MIN)
        finally:
            shared.Free()
        return {"backend": "mpi", "key": leader}
    return {"backend": type(comm).__name__, "key": None}


def _horovod_nodes(views: list[dict]) -> tuple[Optional[tuple[int, ...]], str]:
    """Nodes from Horovod's numbers: contiguous ranks per host (what horovodrun and mpirun's
    default mapping do), else host names; each checked against every rank's local_rank and
    local_size. ``(None, why)`` when neither explains them."""
    def consistent(keys) -> bool:
        groups: dict = {}
        for i, k in enumerate(keys):
            groups.setdefault(k, []).append(i)
        for members in groups.values():
            local = [views[i]["local_rank"] for i in members]
            sizes = {views[i]["local_size"] for i in members}
            if len(sizes) != 1 or local != sorted(local) or len(set(local)) != len(local):
                return False
            if views[0]["whole_job"] and (sizes.pop() != len(members)
                                          or local != list(range(len(members)))):
                return False
        return True

    contiguous = [v["hvd_rank"] - v["local_rank"] for v in views]
    if consistent(contiguous):
        return _renumber(contiguous), ""
    hosts = [v["host"] for v in views]
    if consistent(hosts):
        ids: dict = {}
        return tuple(ids.setdefault(h, len(ids)) for h in hosts), ""
    return None, ("Horovod's local_rank/local_size fit neither contiguous ranks per node nor "
                  "the host names")


def _same_everywhere(views: list[dict], field: str, name: str):
    values = [v.get(field) for v in views]
    if any(x != values[0] for x in values):
        shown = ", ".join(f"rank {r} has {x!r}" for r, x in enumerate(values)
                          if x != values[0] or r == 0)
        raise ValueError(f"{name} differs between ranks ({shown}); every rank must see the same "
                         f"value (export it to all ranks, e.g. mpirun -x {name})")
    return values[0]


def resolve_topology(views: Sequence[Mapping], rank: int) -> Topology:
    """The topology from every rank's view (the same list on every rank: the same result or
    the same ``ValueError`` everywhere). Used by :func:`detect_topology`."""
    views = [dict(v) for v in views]
    size = len(views)
    rpn = _same_everywhere(views, "ranks_per_node", "ranks_per_node / " + QODA_RANKS_PER_NODE)
    listed = _same_everywhere(views, "node_of", "node_of / " + QODA_NODE_OF_RANK)
    rpn_name = views[0].get("ranks_per_node_from") or QODA_RANKS_PER_NODE
    list_name = views[0].get("node_of_from") or QODA_NODE_OF_RANK
    if listed is not None:
        nodes = (parse_node_list(listed, size, list_name) if isinstance(listed, str)
                 else validate_node_of(listed, size, list_name))
        if rpn is not None:
            by_rpn = nodes_from_ranks_per_node(size, rpn, rpn_name)
            if by_rpn != nodes:
                raise ValueError(f"{rpn_name}={rpn!r} and {list_name}={listed!r} disagree; set "
                                 "one of them")
        return Topology(nodes, rank, "override")
    if rpn is not None:
        return Topology(nodes_from_ranks_per_node(size, rpn, rpn_name), rank, "override")
    backend = views[0]["backend"]
    if any(v["backend"] != backend for v in views):
        raise ValueError(f"the ranks run different communicators: {[v['backend'] for v in views]}")
    if size == 1:
        return Topology((0,), rank, "single")
    if backend == "horovod":
        nodes, why = _horovod_nodes(views)
        if nodes is not None:
            return Topology(nodes, rank, "horovod")
        return Topology(tuple(range(size)), rank, "unknown", why)
    keys = [v.get("key") for v in views]
    if all(k is not None for k in keys):
        return Topology(_renumber_keys(keys), rank, backend)
    return Topology(tuple(range(size)), rank, "unknown" if backend != "local" else "local")


def _renumber_keys(keys: Sequence) -> tuple[int, ...]:
    ids: dict = {}
    return tuple(ids.setdefault(k, len(ids)) for k in keys)


def detect_topology(comm: Communicator, ranks_per_node: Optional[int] = None,
                    node_of: Optional[Sequence[int]] = None,
                    environ: Optional[Mapping[str, str]] = None) -> Topology:
    """Find which ranks of ``comm`` share a node; every rank gets the same answer.

    A collective over ``comm`` (one set-up allgather, :meth:`Communicator.agree`; none on one
    rank): call it on every rank.

    Args:
        comm: the communicator of the exchange.
        ranks_per_node: override: ranks per node, filled in rank order (beats the environment).
        node_of: override: the node of each rank (beats the environment).
        environ: where ``QODA_RANKS_PER_NODE`` / ``QODA_NODE_OF_RANK`` are read (default
            ``os.environ``).

    Raises:
        ValueError: an override that is malformed, does not fit the number of ranks, or differs
            between ranks (the same error on every rank).

    Example::

        >>> from qoda_hvd.comm import LocalGroup
        >>> detect_topology(LocalGroup(1)[0]).describe()
        '1 nodes x 1 ranks (single)'
    """
    env = os.environ if environ is None else environ
    view = _backend_view(comm)
    if ranks_per_node is not None:
        view["ranks_per_node"], view["ranks_per_node_from"] = ranks_per_node, "ranks_per_node"
    elif env.get(QODA_RANKS_PER_NODE, "").strip():
        view["ranks_per_node"] = env[QODA_RANKS_PER_NODE].strip()
    if node_of is not None:
        view["node_of"], view["node_of_from"] = list(node_of) if not isinstance(
            node_of, str) else node_of, "node_of"
    elif env.get(QODA_NODE_OF_RANK, "").strip():
        view["node_of"] = env[QODA_NODE_OF_RANK].strip()
    if comm.size == 1:
        views = [view]
    else:
        raw = json.dumps(view, sort_keys=True, default=repr).encode()
        payload = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        views = [json.loads(bytes(p.tolist()).decode()) for p in comm.agree(payload)]
    return resolve_topology(views, comm.rank)


# -- sub-communicators ----------------------------------------------------------------------

class SubsetCommunicator(Communicator):
    """The ranks ``members`` of ``parent`` as a communicator, over the parent's ``alltoall``.

    Every collective is ONE alltoall of the parent in which this rank sends only to the
    group's members (zero-length chunks to every other rank). So every rank of the parent must
    make the same sequence of calls at the same time, each in its own group (the two-level
    exchange does: all nodes run their node-local stage together, all local indices their
    cross-node stage); what a group sends reaches only its members.

    Args:
        parent: the whole job's communicator.
        members: the parent ranks of this group, in this group's rank order; must contain the
            parent's own rank.

    Example::

        >>> from qoda_hvd.comm import LocalGroup
        >>> sub = SubsetCommunicator(LocalGroup(1)[0], [0])
        >>> sub.allreduce_sum(torch.tensor([2.0])).tolist()
        [2.0]
    """

    def __init__(self, parent: Communicator, members: Sequence[int]) -> None:
        members = tuple(int(m) for m in members)
        if parent.rank not in members or len(set(members)) != len(members) or any(
                not 0 <= m < parent.size for m in members):
            raise ValueError(f"members must be distinct ranks of the parent (0..{parent.size - 1})"
                             f" including this rank {parent.rank}, got {list(members)}")
        super().__init__(members.index(parent.rank), len(members))
        self.parent = parent
        self.members = members
        self.parent_stats = (parent.stats, *parent.parent_stats)

    def _route(self, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        empty = chunks[0].new_empty(0)
        full = [empty] * self.parent.size
        for i, m in enumerate(self.members):
            if i != self.rank:  # this rank's own chunk stays here: no copy through the backend
                full[m] = chunks[i]
        received = self.parent._alltoall(full)
        out = [received[m] for m in self.members]
        out[self.rank] = chunks[self.rank]
        return out

    def _allgather(self, payload):
        return self._route([payload] * self.size)

    def _alltoall(self, chunks):
        return self._route(chunks)

    def _allreduce_sum(self, tensor):
        parts = self._route([as_bytes(tensor)] * self.size)
        out = from_bytes(parts[0], tensor.dtype).clone()
        for p in parts[1:]:  # group rank order on every member: the same sum everywhere
            out.add_(from_bytes(p, tensor.dtype))
        return out.view(tensor.shape)


def node_communicators(comm: Communicator, topology: Topology
                       ) -> tuple[Communicator, Communicator]:
    """``(local, cross)``: this rank's node, and the ranks with its local index on every node.

    Collective over ``comm`` (every rank calls it with the same topology). Each counts its own
    :class:`~qoda_hvd.comm.base.CommStats` and adds to ``comm``'s.

    Args:
        comm: the whole job's communicator (what ``topology`` was detected on).
        topology: a homogeneous topology (:attr:`Topology.homogeneous`).

    Example::

        >>> from qoda_hvd.comm import LocalGroup
        >>> local, cross = node_communicators(LocalGroup(1)[0], Topology((0,), 0, "single"))
        >>> local.size, cross.size
        (1, 1)
    """
    if topology.size != comm.size or topology.rank != comm.rank:
        raise ValueError(f"the topology is for rank {topology.rank} of {topology.size}, the "
                         f"communicator is rank {comm.rank} of {comm.size}")
    if not topology.homogeneous:
        raise ValueError(f"node-local and cross-node groups need nodes of one size: "
                         f"{topology.describe()}")
    local_groups, cross_groups = topology.local_groups(), topology.cross_groups()
    from qoda_hvd.comm.local import _LocalCommunicator

    if isinstance(comm, _LocalCommunicator):
        return comm.subgroup(local_groups), comm.subgroup(cross_groups)
    mpi_comm = getattr(comm, "comm", None)
    if mpi_comm is not None and hasattr(mpi_comm, "Split"):
        from qoda_hvd.comm.mpi import MPICommunicator

        out = []
        for color, key in ((topology.node, topology.local_rank),
                           (topology.local_rank, topology.node)):
            sub = MPICommunicator(mpi_comm.Split(color, key))
            sub.parent_stats = (comm.stats, *comm.parent_stats)
            out.append(sub)
        return out[0], out[1]
    split = getattr(comm, "subgroup", None)  # Horovod: process sets where it can have them
    if callable(split):
        local = split(local_groups, "node")
        cross = split(cross_groups, "cross")
        return local, cross
    return (SubsetCommunicator(comm, topology.local_ranks),
            SubsetCommunicator(comm, topology.cross_ranks))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m qoda_hvd.comm.topology [--mpi4py]`` under ``horovodrun`` / ``mpirun``: every
    rank prints the topology it agreed on (what the two-level exchange will use).

    Example::

        horovodrun -np 4 -H node1:2,node2:2 python -m qoda_hvd.comm.topology
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qoda_hvd.comm.topology",
                                     description="Print the node topology every rank agrees on "
                                                 "(run it under horovodrun or mpirun).")
    parser.add_argument("--mpi4py", action="store_true",
                        help="detect through mpi4py (Split_type) instead of Horovod")
    args = parser.parse_args(argv)
    if args.mpi4py:
        from qoda_hvd.comm.mpi import MPICommunicator

        comm: Communicator = MPICommunicator()
    else:
        import horovod.torch as hvd

        from qoda_hvd.comm.horovod import HorovodCommunicator

        hvd.init()
        comm = HorovodCommunicator()
    topo = detect_topology(comm)
    what = ("two-level exchange (exchange='auto' picks it)" if topo.two_level else
            "float32 inside the node (exchange='auto' does not compress on one node of GPUs)"
            if topo.num_nodes == 1 and topo.size > 1 else "flat exchange")
    print(f"rank {comm.rank}/{comm.size}: {topo.describe()}; node {topo.node}, local rank "
          f"{topo.local_rank} of {topo.local_size} -> {what}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
