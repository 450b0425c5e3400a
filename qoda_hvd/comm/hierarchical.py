"""The two-level exchange: float32 inside a node, compressed only between nodes.

K = L M ranks on M nodes of L ranks each (:mod:`qoda_hvd.comm.topology`). One call::

    typed + raw buffers (this rank's gradient)
      -> [node]  reduce-scatter in float32 (sum): local rank i gets shard i, the node's sum of it
      -> [cross] shard i quantized + coded on this rank only, reduced with the ranks of local
                 index i on the other nodes by a flat strategy (:mod:`qoda_hvd.comm.strategies`):
                 allgather for M = 2, scatter-reduce-allgather for M >= 3
      -> [node]  allgather of the reduced shards in float32
    = the aggregate, in place, bit-identical on every rank

- Shards: each layer type's buffer is cut into L slices at its norm-bucket boundaries (the
  quantizer's buckets and per-type levels stay as in the flat exchange; a shard's noise counter
  is its coordinates' index in the type's buffer, keyed by this rank), the raw float32 values
  anywhere; shard i of every type travels together, so each stage is ONE collective.
- Unbiased: shard i of node n is quantized once by one rank with its own noise (and, with
  scatter-reduce-allgather, the reduced chunk again with independent noise), so
  ``E[aggregate] = (1/K) sum_k g_k``. The node's float32 sum adds no error beyond float32
  rounding.
- Bit-identical: the cross stage leaves the same bits on every rank of a cross group (rank
  order, owners use their own decoded values), and the node stage copies each owner's shard to
  its node exactly.
- Inter-node bytes per node: ``(M-1) N b/8`` (allgather) or ``2 (M-1)/M N b/8``
  (scatter-reduce-allgather) against ``2 L (M-1)/M N b/8`` for the flat scatter_gather over all
  K ranks; the intra-node stages move ``2 (L-1) 4N`` bytes per node over the fast link.
- One communication round per call: reduce-scatter, the cross strategy's one or two collectives,
  allgather (3-4 collectives on the sub-communicators, each counted in its own stats).

:class:`TwoLevelReduction` is the reduction (the same call as the flat strategies),
:func:`plan_exchange` the choice between it, the flat exchange and float32 that
``exchange="auto"`` makes from the agreed topology, and :func:`hierarchical_exchange` the
layer-wise exchange built on it.
"""
from __future__ import annotations

import time
import warnings
from typing import Optional, Sequence

import torch

from qoda_hvd.comm.base import Communicator, as_bytes, from_bytes
from qoda_hvd.comm.topology import Topology, node_communicators

__all__ = ["TwoLevelPlan", "TwoLevelReduction", "hierarchical_exchange", "plan_exchange",
           "shard_bounds", "two_level_allreduce_"]


def _bounds(total: int, parts: int) -> list[int]:
    return [(j * total) // parts for j in range(parts + 1)]


def shard_bounds(type_sizes: Sequence[int], bucket_sizes: Sequence[int], raw_size: int,
                 parts: int) -> tuple[list[list[int]], list[int]]:
    """Element bounds of ``parts`` shards of each type (cut at its bucket boundaries) and of the
    raw values (cut anywhere): ``(per type [b_0 = 0, ..., b_parts = size], raw bounds)``.

    Args:
        type_sizes: coordinates of each type's buffer.
        bucket_sizes: each type's norm-bucket size.
        raw_size: float32 values that travel uncompressed.
        parts: shards (the ranks of a node).

    Example::

        >>> shard_bounds([5000], [1024], 3, 2)
        ([[0, 2048, 5000]], [0, 1, 3])
    """
    typed = []
    for n, bs in zip(type_sizes, bucket_sizes):
        buckets = -(-n // bs)
        typed.append([min(x * bs, n) for x in _bounds(buckets, parts)])
    return typed, _bounds(raw_size, parts)


class TwoLevelReduction:
    """The two-level reduction over a node-local and a cross-node communicator.

    Called like the flat strategies of :mod:`qoda_hvd.comm.strategies`
    (``reduction(codec, comm, typed, raw, stats, divisor)``), it reduces the typed buffers and
    the raw values in place. The float32 staging buffer of the reduce-scatter is made once.

    Args:
        local: this rank's node (size L).
        cross: the ranks with this rank's local index on every node (size M).
        type_sizes: coordinates of each type's fused buffer.
        bucket_sizes: each type's norm-bucket size.
        raw_size: float32 values that travel uncompressed.
        cross_strategy: ``"allgather"`` / ``"scatter_gather"`` between nodes, or ``"auto"``
            (allgather for M <= 2, else scatter_gather).
        device: where the staging buffer lives (the gradients' device).

    Example::

        >>> from qoda_hvd.comm import LocalGroup
        >>> from qoda_hvd.comm.codec import LayerwiseCodec
        >>> from qoda_hvd.comm.stats import ExchangeStats
        >>> from qoda_hvd.quant import LayerwiseQuantizer, LayerTyping
        >>> typing = LayerTyping({"w": 0}, ("dense",), frozenset(), {"w": 1024})
        >>> codec = LayerwiseCodec(LayerwiseQuantizer(typing, bits=8), [1024], rank=0)
        >>> one = LocalGroup(1)[0]
        >>> reduce = TwoLevelReduction(one, LocalGroup(1)[0], [1024], [1024], 1)
        >>> g, raw = torch.ones(1024), torch.tensor([2.0])
        >>> reduce(codec, one, [g], raw, ExchangeStats(), divisor=1)
        >>> raw.tolist(), g[:3].tolist()          # one node: float32 only, nothing quantized
        ([2.0], [1.0, 1.0, 1.0])
    """

    def __init__(self, local: Communicator, cross: Communicator, type_sizes: Sequence[int],
                 bucket_sizes: Sequence[int], raw_size: int, cross_strategy: str = "auto",
                 device: Optional[torch.device] = None) -> None:
        from qoda_hvd.comm.strategies import choose_strategy

        self.local, self.cross = local, cross
        self.cross_strategy = choose_strategy(cross_strategy, cross.size)
        self.elem_b, self.raw_b = shard_bounds(type_sizes, bucket_sizes, raw_size, local.size)
        # per shard j: the lengths of its slices (types, then raw) and its total
        self.slice_sizes = [[e[j + 1] - e[j] for e in self.elem_b] +
                            [self.raw_b[j + 1] - self.raw_b[j]] for j in range(local.size)]
        self.shard_sizes = [sum(s) for s in self.slice_sizes]
        self._stage = torch.empty(sum(self.shard_sizes), dtype=torch.float32,
                                  device=device if device is not None else "cpu")

    def _slices(self, typed: Sequence[torch.Tensor], raw: torch.Tensor, j: int
                ) -> list[torch.Tensor]:
        """Shard ``j``'s slices of the buffers: one per type, then the raw values."""
        out = [buf[e[j]:e[j + 1]] for buf, e in zip(typed, self.elem_b)]
        return out + [raw[self.raw_b[j]:self.raw_b[j + 1]]]

    @staticmethod
    def _copy(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
        pairs = [(d, s) for d, s in zip(dst, src) if d.numel()]
        if pairs:
            torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])

    def __call__(self, codec, comm: Communicator, typed: Sequence[torch.Tensor],
                 raw: torch.Tensor, stats, divisor: Optional[int] = None) -> None:
        """Reduce ``typed`` and ``raw`` over all ranks of ``comm`` (= the nodes of ``local`` x
        ``cross``), in place; the sum divided by ``divisor`` (None: the sum)."""
        from qoda_hvd.comm.strategies import REDUCTIONS

        local, me = self.local, self.local.rank
        t0 = time.perf_counter()
        # [node] reduce-scatter in float32: shard j of this rank's gradient goes to local rank j
        chunks = list(self._stage.split(self.shard_sizes))
        for j, chunk in enumerate(chunks):
            self._copy(chunk.split(self.slice_sizes[j]), self._slices(typed, raw, j))
        shard = local.reduce_scatter_sum(chunks)
        mine = self._slices(typed, raw, me)
        self._copy(mine, shard.split(self.slice_sizes[me]))
        t1 = time.perf_counter()
        stats.exchange_s += t1 - t0
        # [cross] this shard, compressed, with the same shard of every other node
        if self.cross.size > 1:
            bases = [e[me] for e in self.elem_b]
            REDUCTIONS[self.cross_strategy](codec, self.cross, mine[:-1], mine[-1], stats,
                                            None, bases)
        if divisor is not None and divisor != 1:
            for s in mine:
                s.div_(divisor)
        t2 = time.perf_counter()
        # [node] allgather of the reduced shards in float32 (the owners' bits, copied)
        self._copy(shard.split(self.slice_sizes[me]), mine)
        parts = local.allgather(as_bytes(shard))
        for j, part in enumerate(parts):
            if j != me:
                values = from_bytes(part, torch.float32).to(self._stage.device)
                self._copy(self._slices(typed, raw, j), values.split(self.slice_sizes[j]))
        stats.exchange_s += time.perf_counter() - t2


def two_level_allreduce_(tensor: torch.Tensor, local: Communicator,
                         cross: Communicator) -> torch.Tensor:
    """In-place float sum over all ranks in two levels, as Horovod's hierarchical allreduce:
    reduce-scatter inside the node, allreduce of each 1/L shard between nodes (all local ranks
    at once), allgather inside the node. Per node, ``2 (M-1)/M`` of the tensor crosses the
    inter-node link against ``2 (K-1)/K`` for a ring over all K ranks (e.g. 1.0 vs 1.9 at
    L = 8, M = 2): for float32 payloads that are summed as they are (PowerSGD's P and Q). The
    same bits on every rank. Returns ``tensor``.

    Example::

        >>> from qoda_hvd.comm import LocalGroup
        >>> t = torch.tensor([1.0, 2.0, 3.0])
        >>> two_level_allreduce_(t, LocalGroup(1)[0], LocalGroup(1)[0]).tolist()
        [1.0, 2.0, 3.0]
    """
    if not tensor.is_contiguous():
        raise ValueError("two_level_allreduce_ needs a contiguous tensor")
    flat = tensor.view(-1)
    b = _bounds(flat.numel(), local.size)
    shard = local.reduce_scatter_sum([flat[b[j]:b[j + 1]] for j in range(local.size)])
    if cross.size > 1:
        cross.allreduce_sum_(shard)
    for j, part in enumerate(local.allgather(as_bytes(shard))):
        flat[b[j]:b[j + 1]].copy_(from_bytes(part, tensor.dtype).view(-1).to(tensor.device))
    return tensor


class TwoLevelPlan:
    """What ``exchange="auto"`` / ``"hierarchical"`` runs on a topology (see :func:`plan_exchange`).

    Attributes:
        kind: ``"hierarchical"``, ``"flat"`` or ``"fp32"``.
        topology: the agreed :class:`~qoda_hvd.comm.topology.Topology`.
        reason: why (for ``compression_stats()`` and the warning).
        local, cross: the sub-communicators (``"hierarchical"`` only).
    """

    __slots__ = ("kind", "topology", "reason", "local", "cross", "comm")

    def __init__(self, kind: str, topology: Topology, reason: str,
                 local: Optional[Communicator] = None, cross: Optional[Communicator] = None):
        self.kind, self.topology, self.reason = kind, topology, reason
        self.local, self.cross = local, cross
        self.comm: Optional[Communicator] = None  # the communicator it was made on

    def stats(self) -> dict:
        """``topology`` (one line), ``exchange_plan`` (the reason) and, with two levels, the
        bytes this rank sent and received inside its node and between nodes."""
        out = {"topology": self.topology.describe(), "exchange_plan": self.reason}
        if self.local is not None and self.cross is not None:
            out.update(intra_node_bytes_sent=self.local.stats.bytes_sent,
                       intra_node_bytes_received=self.local.stats.bytes_received,
                       inter_node_bytes_sent=self.cross.stats.bytes_sent,
                       inter_node_bytes_received=self.cross.stats.bytes_received)
        return out


def plan_exchange(requested: str, comm: Communicator, on_gpu: bool,
                  topology: Optional[Topology] = None) -> TwoLevelPlan:
    """Decide what ``exchange="auto"`` or ``"hierarchical"`` runs, and make its groups.

    The first time for a ring, a collective over ``comm`` (the topology's set-up allgather,
    then the sub-communicators); after that the plan is reused, with no collective (an exchange
    rebuilt on one rank only stays in step with the others). Every rank gets the same plan (the
    topology is agreed, the rest depends on it and on ``requested``, which the exchange's
    settings agreement checks).

    - several nodes of the same size with several ranks each: ``"hierarchical"``;
    - ``"auto"`` on ONE node of several GPUs (CUDA parameters): ``"fp32"``, one float32
      allreduce (NVLink / PCIe inside a box is faster than any codec); CPU ranks on one machine
      (tests, demos) keep the flat compressed exchange, which they are there to exercise;
    - ``"hierarchical"`` on one node: the two levels with nothing between nodes, i.e. float32;
    - one rank per node: ``"flat"`` (two levels would be the flat exchange);
    - nodes of different sizes: ``"flat"``, with one warning on rank 0.

    Args:
        requested: ``"auto"`` or ``"hierarchical"``.
        comm: the job's communicator.
        on_gpu: whether the gradients are CUDA tensors.
        topology: an agreed topology (default: :func:`~qoda_hvd.comm.topology.detect_topology`).

    Example::

        >>> from qoda_hvd.comm import LocalGroup
        >>> plan_exchange("auto", LocalGroup(1)[0], on_gpu=False).kind
        'flat'
    """
    if requested not in ("auto", "hierarchical"):
        raise ValueError(f"requested must be 'auto' or 'hierarchical', got {requested!r}")
    key = (_ring_key(comm), requested, bool(on_gpu))
    if topology is None and key in _PLANS:
        return _PLANS[key]
    plan = _plan(requested, comm, on_gpu, topology)
    plan.comm = comm
    if topology is None:
        _PLANS[key] = plan
    return plan


#: Plans made per ring: rebuilding an exchange over the same ranks (an elastic re-form of one
#: rank after a failed collective) must not start a collective the others will not join, so the
#: topology and its groups are found once per ring and reused.
_PLANS: dict = {}


def _ring_key(comm: Communicator):
    """The same for every communicator object over the same ranks of the same ring."""
    info = getattr(comm, "node_info", None)
    if callable(info):  # Horovod: a re-made communicator over the same set and ring
        d = info()
        ps = getattr(comm, "process_set", None)
        return ("horovod", getattr(ps, "process_set_id", None), comm.rank, comm.size,
                d["local_rank"], d["local_size"], d["cross_rank"], d["cross_size"])
    # other backends: this communicator object (kept alive by the plan that holds it)
    return ("object", id(comm), comm.rank, comm.size)


def _plan(requested: str, comm: Communicator, on_gpu: bool,
          topology: Optional[Topology]) -> TwoLevelPlan:
    from qoda_hvd.comm.topology import detect_topology

    topo = topology if topology is not None else detect_topology(comm)
    if topo.two_level:
        local, cross = node_communicators(comm, topo)
        return TwoLevelPlan("hierarchical", topo, "float32 inside each node, compressed between "
                            "nodes", local, cross)
    if not topo.homogeneous:
        if comm.rank == 0:
            warnings.warn(f"exchange={requested!r}: the nodes hold different numbers of ranks "
                          f"({topo.describe()}); using the flat exchange over all ranks "
                          f"(correct, but every compressed byte crosses the inter-node link)",
                          stacklevel=2)
        return TwoLevelPlan("flat", topo, "nodes of different sizes: flat exchange")
    if topo.num_nodes == 1 and topo.size > 1:
        if requested == "hierarchical":
            local, cross = node_communicators(comm, topo)
            return TwoLevelPlan("hierarchical", topo, "one node: float32 only (no inter-node "
                                "link to compress for)", local, cross)
        if on_gpu:
            return TwoLevelPlan("fp32", topo, "one node of GPUs: float32 allreduce (no "
                                "inter-node link to compress for)")
        return TwoLevelPlan("flat", topo, "one node of CPU ranks: flat compressed exchange")
    return TwoLevelPlan("flat", topo, "one rank per node: flat exchange")


def hierarchical_exchange(plan: TwoLevelPlan, typing, named, quantizer, communicator, *args,
                          **kwargs):
    """A :class:`~qoda_hvd.comm.exchange.LayerwiseExchange` whose reduction is the two-level
    one of ``plan`` (arguments after ``plan`` as the exchange's, strategy left out). Its
    ``strategy`` is ``"hierarchical"``; it runs as one block (no overlapped buckets)."""
    from qoda_hvd.comm.exchange import LayerwiseExchange

    ex = LayerwiseExchange(typing, named, quantizer, communicator, "allgather", *args, **kwargs)
    ex.strategy = "hierarchical"
    buffers = ex.fused.buffers
    device = next((b.device for b in buffers if b.numel()), None)
    ex.reduction = TwoLevelReduction(
        plan.local, plan.cross, [b.numel() for b in buffers[:-1]],
        [quantizer.quantizer(t).bucket_size for t in range(len(buffers) - 1)],
        buffers[-1].numel(), device=device)
    ex.topology_stats = plan.stats
    return ex
