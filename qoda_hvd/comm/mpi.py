"""Communicator over mpi4py: ``Allgatherv`` / ``Alltoallv`` on the system MPI.

For jobs launched with ``mpirun`` that use plain MPI rather than Horovod's controller. Each
collective first exchanges the lengths (a few integers), then the bytes.

:meth:`MPICommunicator.allgather_async` (the overlapped exchange's buckets) is point to point
on a duplicate of the communicator: the payload's length and then its bytes go to every other
rank with ``Isend``, matched by a tag derived from the bucket's name, so buckets may start in
any order on each rank (MPI's nonblocking collectives would have to start in the same order
everywhere). MPI moves bytes only inside MPI calls (Open MPI's TCP transport has no progress
thread of its own), so while transfers are in flight a progress thread calls
:meth:`MPICommunicator.progress` every ``progress_interval`` seconds and sleeps in between
(a sleeping poll, not a spinning one: it takes little of the core backward runs on); the
exchange also calls it from the gradient hooks. ``progress`` posts the receives whose lengths
have arrived and lets MPI write and read what the sockets take.
"""
from __future__ import annotations

import atexit
import threading
import time
import weakref
import zlib

import numpy as np
import torch
from mpi4py import MPI

from qoda_hvd.comm.base import Communicator

__all__ = ["MPICommunicator"]


class _Transfer:
    """One allgather in flight: sends of the length and bytes to every peer, receives of each
    peer's length, then (once known) of its bytes."""

    __slots__ = ("tag", "payload", "sends", "lengths", "length_reqs", "bufs", "recvs")

    def __init__(self, tag: int, payload: np.ndarray, size: int) -> None:
        self.tag = tag
        self.payload = payload
        self.sends: list = []
        self.lengths = [np.zeros(1, dtype=np.int64) for _ in range(size)]
        self.length_reqs: dict[int, "MPI.Request"] = {}
        self.bufs: dict[int, np.ndarray] = {}
        self.recvs: dict[int, "MPI.Request"] = {}


class MPICommunicator(Communicator):
    """Collectives over an mpi4py communicator (default ``MPI.COMM_WORLD``).

    Making one is collective over ``comm`` (it duplicates it for the overlapped buckets).

    Example::

        >>> comm = MPICommunicator()                       # doctest: +SKIP
        >>> parts = comm.allgather(payload)                # doctest: +SKIP
    """

    def __init__(self, comm: "MPI.Comm | None" = None, progress_interval: float = 5e-4) -> None:
        if (isinstance(progress_interval, bool) or not isinstance(progress_interval, (int, float))
                or not 0 < progress_interval <= 1):
            raise ValueError(f"progress_interval must be seconds in (0, 1], got "
                             f"{progress_interval!r}")
        self.progress_interval = float(progress_interval)
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        super().__init__(self.comm.Get_rank(), self.comm.Get_size())
        # The worker thread starts buckets while the hooks call progress() and synchronize()
        # waits: MPI calls from several threads (mpi4py asks for MPI_THREAD_MULTIPLE).
        self.asynchronous = MPI.Query_thread() >= MPI.THREAD_MULTIPLE
        # its own tag space for the overlapped buckets (no clash with the user's traffic);
        # Dup is collective: every rank of ``comm`` makes its communicator, as with any MPI code
        self._p2p = self.comm.Dup() if self.asynchronous and self.size > 1 else None
        self._inflight: dict[int, _Transfer] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopped = False
        self._progress_thread: "threading.Thread | None" = None

    def _tag(self, tag: str) -> int:
        """The MPI tag of a name, the same on every rank (even: the length, odd: the bytes).
        The exchange's bucket names ``b<i>`` get distinct tags; other names a CRC-32 (a name
        colliding with one in flight raises)."""
        ub = int(self.comm.Get_attr(MPI.TAG_UB) or 32767)
        half = ub // 2
        if tag[:1] == "b" and tag[1:].isdigit() and int(tag[1:]) < half // 2:
            return 2 * int(tag[1:])
        return 2 * (half // 2 + zlib.crc32(tag.encode()) % (half - half // 2))

    def _allgather_start(self, payload, tag):
        if self._p2p is None:
            return None  # runs in wait(), like the base class
        data = np.ascontiguousarray(payload.numpy())
        with self._lock:
            t = self._tag(tag)
            if t in self._inflight:
                raise RuntimeError(f"allgather {tag!r} started twice, or its tag collides with "
                                   "one in flight; wait for it first")
            x = self._inflight[t] = _Transfer(t, data, self.size)
            x.lengths[self.rank][0] = data.size
            for peer in range(self.size):
                if peer == self.rank:
                    continue
                x.sends.append(self._p2p.Isend(x.lengths[self.rank], dest=peer, tag=t))
                x.sends.append(self._p2p.Isend(data, dest=peer, tag=t + 1))
                x.length_reqs[peer] = self._p2p.Irecv(x.lengths[peer], source=peer, tag=t)
            self._post_known(x)
            if self._progress_thread is None:
                self._start_progress_thread()
            self._wake.notify()
        return t

    def _start_progress_thread(self) -> None:
        ref = weakref.ref(self)  # the thread must not keep the communicator alive
        thread = threading.Thread(target=_progress_loop, args=(ref,), daemon=True,
                                  name="qoda-mpi-progress")
        self._progress_thread = thread
        _LIVE.add(self)
        thread.start()

    def close(self) -> None:
        """Stop the progress thread (before MPI is finalized; done at exit by itself)."""
        with self._lock:
            self._stopped = True
            self._wake.notify()
        thread = self._progress_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _post_known(self, x: _Transfer) -> None:
        """Post the byte receives of the peers whose lengths have arrived (lock held)."""
        for peer, req in list(x.length_reqs.items()):
            if req.Test():
                del x.length_reqs[peer]
                x.bufs[peer] = np.empty(int(x.lengths[peer][0]), dtype=np.uint8)
                x.recvs[peer] = self._p2p.Irecv(x.bufs[peer], source=peer, tag=x.tag + 1)

    def progress(self) -> None:
        with self._lock:
            for x in self._inflight.values():
                self._post_known(x)
                MPI.Request.Testall(x.sends)
                MPI.Request.Testall(list(x.recvs.values()))

    def _allgather_finish(self, handle):
        if handle.state is None:
            return self._allgather(handle.payload)
        with self._lock:  # from here on only this thread touches it
            x = self._inflight.pop(handle.state)
        # Blocking waits outside the lock: a rank may wait here for a bucket its peer has not
        # started yet, and the peer's start must not wait for a lock this rank holds.
        for peer, req in x.length_reqs.items():
            req.Wait()
            x.bufs[peer] = np.empty(int(x.lengths[peer][0]), dtype=np.uint8)
            x.recvs[peer] = self._p2p.Irecv(x.bufs[peer], source=peer, tag=x.tag + 1)
        MPI.Request.Waitall(list(x.recvs.values()))
        MPI.Request.Waitall(x.sends)
        x.bufs[self.rank] = x.payload
        return [torch.from_numpy(x.bufs[r]) for r in range(self.size)]

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


#: Communicators with a progress thread; stopped at exit, before mpi4py finalizes MPI (atexit
#: runs last-registered first, and mpi4py registered its finalizer when it was imported).
_LIVE: "weakref.WeakSet[MPICommunicator]" = weakref.WeakSet()


@atexit.register
def _stop_progress_threads() -> None:
    for comm in list(_LIVE):
        comm.close()


def _progress_loop(ref) -> None:
    """While transfers are in flight: progress, then sleep ``progress_interval``; otherwise wait
    to be woken by the next start."""
    while True:
        comm = ref()
        if comm is None:
            return
        with comm._lock:
            if comm._stopped:
                return
            busy = bool(comm._inflight)
            if not busy:  # (at most a second, so a dropped communicator is let go)
                comm._wake.wait(timeout=1.0)
            interval = comm.progress_interval
        if busy:
            comm.progress()
        del comm
        if busy:
            time.sleep(interval)
