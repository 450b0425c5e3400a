"""Communicator over Horovod's own collectives (MPI, Gloo or NCCL controller).

- allgather: ONE ``hvd.grouped_allgather([payload, length])`` (payload lengths differ by rank);
  ``allgather_async``: the same through ``hvd.grouped_allgather_async``, named by its tag;
- alltoall: ONE ``hvd.alltoall(cat(chunks), splits)``;
- allreduce_sum: ``hvd.allreduce(op=hvd.Sum)``;
- reduce_scatter_sum: ONE ``hvd.reducescatter(op=hvd.Sum)`` of the chunks stacked as rows
  (padded to the longest; the two-level exchange's node-local stage).

Node-local and cross-node groups (:func:`qoda_hvd.comm.topology.node_communicators`):
:meth:`HorovodCommunicator.node_info` gives Horovod's own node numbers, and
:meth:`HorovodCommunicator.subgroup` a communicator per group: a Horovod process set when one
with exactly those ranks is registered (``hvd.init(process_sets=[...])``) or can be added
(dynamic process sets: ``hvd.init(process_sets="dynamic")`` or
``HOROVOD_DYNAMIC_PROCESS_SETS=1``), else a group over this set's ``alltoall`` with zero-length
splits outside the group (:class:`qoda_hvd.comm.topology.SubsetCommunicator`), which needs
nothing at ``hvd.init``.

And the few Horovod facts :func:`qoda_hvd.DistributedOptimizer` needs: whether this rank is in
a process set, Horovod's own compressors, and ``broadcast_object`` for the exchange's state.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import horovod.torch as hvd
import torch

from qoda_hvd.comm.base import Communicator

__all__ = ["HorovodCommunicator", "broadcast_object", "horovod_broadcast_optimizer_state",
           "horovod_compression_name",
           "process_set_included", "reduce_op_name"]


class HorovodCommunicator(Communicator):
    """Collectives of an initialised Horovod job (``hvd.init()`` first).

    Args:
        process_set: Horovod process set (default: all ranks).
        prefix: name prefix of the collectives (Horovod matches ops across ranks by name).

    Example::

        >>> hvd.init()                                     # doctest: +SKIP
        >>> comm = HorovodCommunicator()                   # doctest: +SKIP
        >>> parts = comm.allgather(payload)                # doctest: +SKIP
    """

    def __init__(self, process_set=None, prefix: str = "qoda") -> None:
        if not hvd.is_initialized():
            raise RuntimeError("Horovod has not been initialized; use hvd.init().")
        self.process_set = process_set if process_set is not None else hvd.global_process_set
        super().__init__(self.process_set.rank(), self.process_set.size())
        self.prefix = prefix

    def changed(self) -> bool:
        """Whether Horovod was initialised again into another ring since this communicator was
        made (``hvd.elastic`` after a lost or added worker): another size or another rank here.

        Example::

            >>> comm.changed()                             # doctest: +SKIP
            False
        """
        return (self.process_set.rank(), self.process_set.size()) != (self.rank, self.size)

    def _allgather(self, payload):
        length = torch.tensor([payload.numel()], dtype=torch.int64)
        data, lengths = hvd.grouped_allgather([payload, length], name=f"{self.prefix}.allgather",
                                              process_set=self.process_set)
        return list(torch.split(data, lengths.tolist()))

    asynchronous = True

    def _allgather_start(self, payload, tag):
        # Horovod's background thread runs it while backward goes on; ranks match it by name,
        # so buckets may start in a different order on each rank.
        length = torch.tensor([payload.numel()], dtype=torch.int64)
        return hvd.grouped_allgather_async([payload, length], name=f"{self.prefix}.ag.{tag}",
                                           process_set=self.process_set)

    def _allgather_finish(self, handle):
        data, lengths = hvd.synchronize(handle.state)
        return list(torch.split(data, lengths.tolist()))

    def abandon(self, handle) -> None:
        """Give up an :meth:`allgather_async` whose round failed: wait for it here and drop its
        data, so its name may be started again (Horovod refuses a name still in flight). Its
        error, if any, was the round's and is not raised again. A no-op for a handle already
        waited for."""
        if handle.done is not None or handle.state is None:
            return
        handle.done = False
        try:
            hvd.synchronize(handle.state)
        except Exception:  # noqa: BLE001 - the round already failed with its own error
            pass

    def _alltoall(self, chunks):
        splits = torch.tensor([c.numel() for c in chunks], dtype=torch.int32)
        data, received = hvd.alltoall(torch.cat(chunks), splits=splits,
                                      name=f"{self.prefix}.alltoall", process_set=self.process_set)
        return list(torch.split(data, received.tolist()))

    def _allreduce_sum(self, tensor):
        return hvd.allreduce(tensor, op=hvd.Sum, name=f"{self.prefix}.allreduce",
                             process_set=self.process_set)

    def _allreduce_sum_(self, tensor):
        hvd.allreduce_(tensor, op=hvd.Sum, name=f"{self.prefix}.allreduce",
                       process_set=self.process_set)

    def _reduce_scatter_sum(self, chunks):
        width = max(c.numel() for c in chunks)
        if width == 0:
            return chunks[self.rank].clone()
        if all(c.numel() == width for c in chunks):
            rows = torch.stack(chunks)
        else:  # Horovod splits the first dimension evenly: pad every chunk to the longest
            rows = chunks[0].new_zeros(self.size, width)
            for j, c in enumerate(chunks):
                rows[j, :c.numel()] = c
        out = hvd.reducescatter(rows, op=hvd.Sum, name=f"{self.prefix}.reducescatter",
                                process_set=self.process_set)
        return out.reshape(-1)[:chunks[self.rank].numel()]

    def node_info(self) -> dict:
        """Horovod's view of this rank's node: ``hvd_rank``, ``local_rank``, ``local_size``,
        ``cross_rank``, ``cross_size``, ``homogeneous`` and ``whole_job`` (whether this
        communicator spans every rank of the job)."""
        return {"hvd_rank": hvd.rank(), "local_rank": hvd.local_rank(),
                "local_size": hvd.local_size(), "cross_rank": hvd.cross_rank(),
                "cross_size": hvd.cross_size(), "homogeneous": bool(_is_homogeneous()),
                "whole_job": self.size == hvd.size()}

    def subgroup(self, groups, name: str) -> Communicator:
        """This rank's communicator in a partition of this set's ranks into ``groups``.

        Collective: every rank calls it with the same ``groups`` (ranks of this communicator).
        Process sets when every group has one (registered, or added now with dynamic process
        sets), else :class:`~qoda_hvd.comm.topology.SubsetCommunicator`; the choice depends only
        on state every rank shares, so all ranks make the same one.

        Args:
            groups: lists of this communicator's ranks, each rank in exactly one.
            name: the groups' name in the collectives' names (``"node"``, ``"cross"``).
        """
        from horovod.common import process_sets as hvd_ps

        from qoda_hvd.comm.topology import SubsetCommunicator

        base = self.process_set.ranks or list(range(hvd.size()))
        wanted = [sorted(base[r] for r in g) for g in groups]
        mine = next(i for i, g in enumerate(groups) if self.rank in g)
        registered = {tuple(sorted(r)): i for i, r in
                      hvd_ps._basics._get_process_set_ids_and_ranks().items()}

        def known(ranks: list[int]):
            ps = hvd.ProcessSet(ranks)
            ps.process_set_id = registered[tuple(ranks)]
            return ps

        sets = None
        if all(tuple(w) in registered for w in wanted):
            sets = [known(w) for w in wanted]
        elif os.environ.get("HOROVOD_DYNAMIC_PROCESS_SETS", "0") not in ("", "0"):
            # the same adds in the same order on every rank, as Horovod requires
            sets = [known(w) if tuple(w) in registered else hvd.add_process_set(w)
                    for w in wanted]
        if sets is None:
            return SubsetCommunicator(self, list(groups[mine]))
        # (a process set orders its ranks by global rank: every member sees the same order)
        sub = HorovodCommunicator(sets[mine], prefix=f"{self.prefix}.{name}")
        sub.parent_stats = (self.stats, *self.parent_stats)
        return sub


def _is_homogeneous() -> bool:
    # horovod.torch does not re-export it (0.28); its mpi_ops module has it
    from horovod.torch.mpi_ops import is_homogeneous

    return is_homogeneous()


def reduce_op_name(op) -> str:
    """``"average"`` or ``"sum"`` for Horovod's ``hvd.Average`` / ``hvd.Sum`` (or those strings).

    Other Horovod ops (Adasum, Min, Max, Product) do not fit an exchange of quantized gradients.

    Example::

        >>> reduce_op_name(hvd.Sum)
        'sum'
    """
    if isinstance(op, str) and op.lower() in ("average", "sum"):
        return op.lower()
    names = {hvd.Average: "average", hvd.Sum: "sum"}
    if op in names:
        return names[op]
    others = {getattr(hvd, n, None): n for n in ("Adasum", "Min", "Max", "Product")}
    shown = f"hvd.{others[op]}" if op in others else repr(op)
    raise ValueError(f"op must be hvd.Average or hvd.Sum (or 'average' / 'sum'), got {shown}")


def process_set_included(process_set=None) -> bool:
    """Whether this rank belongs to ``process_set`` (default: all ranks).

    Example::

        >>> process_set_included(hvd.global_process_set)    # doctest: +SKIP
        True
    """
    if not hvd.is_initialized():
        raise RuntimeError("Horovod has not been initialized; use hvd.init().")
    ps = process_set if process_set is not None else hvd.global_process_set
    if not isinstance(ps, hvd.ProcessSet):
        raise TypeError(f"process_set must be a hvd.ProcessSet, got {type(ps).__name__}")
    if ps.process_set_id is None or ps.ranks is None:
        raise ValueError(f"{ps} is not registered with Horovod: pass it to "
                         "hvd.init(process_sets=[...]) or add it with hvd.add_process_set(...) "
                         "(HOROVOD_DYNAMIC_PROCESS_SETS=1) before building the optimizer")
    return bool(ps.included())


def horovod_compression_name(compression) -> Optional[str]:
    """``"none"`` / ``"fp16"`` for Horovod's ``hvd.Compression.none`` / ``.fp16`` (the classes,
    subclasses or instances), else ``None``.

    Example::

        >>> horovod_compression_name(hvd.Compression.fp16)
        'fp16'
    """
    from horovod.torch.compression import FP16Compressor, NoneCompressor

    cls = compression if isinstance(compression, type) else type(compression)
    if issubclass(cls, FP16Compressor):
        return "fp16"
    if issubclass(cls, NoneCompressor):
        return "none"
    return None


def broadcast_object(obj: Any, root_rank: int, name: str) -> tuple[Any, bool]:
    """``(root's obj, whether this rank is the root)``: ``hvd.broadcast_object`` over all ranks
    (the ranks of ``hvd.broadcast_optimizer_state``). A collective: every rank calls it.

    Example::

        >>> state, is_root = broadcast_object({"step": 3}, 0, "example")   # doctest: +SKIP
    """
    return hvd.broadcast_object(obj, root_rank=root_rank, name=name), hvd.rank() == root_rank


def horovod_broadcast_optimizer_state(optimizer, root_rank: int, model=None) -> None:
    """``hvd.broadcast_optimizer_state(optimizer, root_rank, model)`` (Horovod's own; see
    :func:`qoda_hvd.broadcast_optimizer_state`, which wraps it). A collective.

    Example::

        >>> horovod_broadcast_optimizer_state(opt, 0)                      # doctest: +SKIP
    """
    hvd.broadcast_optimizer_state(optimizer, root_rank=root_rank, model=model)
