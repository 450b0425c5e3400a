"""Communicator over Horovod's own collectives (MPI, Gloo or NCCL controller).

- allgather: ONE ``hvd.grouped_allgather([payload, length])`` (payload lengths differ by rank);
- alltoall: ONE ``hvd.alltoall(cat(chunks), splits)``;
- allreduce_sum: ``hvd.allreduce(op=hvd.Sum)``.
"""
from __future__ import annotations

import horovod.torch as hvd
import torch

from qoda_hvd.comm.base import Communicator

__all__ = ["HorovodCommunicator"]


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

    def _allgather(self, payload):
        length = torch.tensor([payload.numel()], dtype=torch.int64)
        data, lengths = hvd.grouped_allgather([payload, length], name=f"{self.prefix}.allgather",
                                              process_set=self.process_set)
        return list(torch.split(data, lengths.tolist()))

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
