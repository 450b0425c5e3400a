"""Communicator over mpi4py: ``Allgatherv`` / ``Alltoallv`` on the system MPI.

For jobs launched with ``mpirun`` that use plain MPI rather than Horovod's controller. Each
collective first exchanges the lengths (a few integers), then the bytes.
"""
from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

from qoda_hvd.comm.base import Communicator

__all__ = ["MPICommunicator"]


class MPICommunicator(Communicator):
    """Collectives over an mpi4py communicator (default ``MPI.COMM_WORLD``).

    Example::

        >>> comm = MPICommunicator()                       # doctest: +SKIP
        >>> parts = comm.allgather(payload)                # doctest: +SKIP
    """

    def __init__(self, comm: "MPI.Comm | None" = None) -> None:
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        super().__init__(self.comm.Get_rank(), self.comm.Get_size())

    def _allgather(self, payload):
        send = payload.contiguous().numpy()
        counts = np.array(self.comm.allgather(send.size), dtype=np.int64)
        recv = np.empty(int(counts.sum()), dtype=np.uint8)
        self.comm.Allgatherv(send, [recv, counts, MPI.BYTE])
        return list(torch.split(torch.from_numpy(recv), counts.tolist()))

    def _alltoall(self, chunks):
        send = torch.cat(chunks).contiguous().numpy()
        send_counts = np.array([c.numel() for c in chunks], dtype=np.int64)
        recv_counts = np.empty(self.size, dtype=np.int64)
        self.comm.Alltoall(send_counts, recv_counts)
        recv = np.empty(int(recv_counts.sum()), dtype=np.uint8)
        self.comm.Alltoallv([send, send_counts, MPI.BYTE], [recv, recv_counts, MPI.BYTE])
        return list(torch.split(torch.from_numpy(recv), recv_counts.tolist()))

    def _allreduce_sum(self, tensor):
        if tensor.dtype == torch.float16:
            # MPI has no half-precision sum; mpi4py's path sums in float32 and rounds back (the
            # Horovod communicator sends float16 on the wire).
            return self._allreduce_sum(tensor.float()).half()
        send = tensor.detach().contiguous().numpy()
        recv = np.empty_like(send)
        self.comm.Allreduce(send, recv, op=MPI.SUM)
        return torch.from_numpy(recv)

    def _allreduce_sum_(self, tensor):
        if tensor.dtype == torch.float16 or tensor.device.type != "cpu":
            return super()._allreduce_sum_(tensor)
        self.comm.Allreduce(MPI.IN_PLACE, tensor.detach().numpy(), op=MPI.SUM)
