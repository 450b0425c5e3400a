"""Communicator over mpi4py: ``Allgatherv`` / ``Alltoallv`` on the system MPI.

For jobs launched with ``mpirun`` that use plain MPI rather than Horovod's controller. Each
collective first exchanges the lengths (a few integers), then the bytes. A length received
from a peer is checked before anything is allocated for it: it must lie in ``[0,
max_payload_bytes]`` (see :meth:`MPICommunicator.limit_payloads`), else
:class:`qoda_hvd.PayloadError` names the sender and the length.

Device tensors (CUDA) travel through reusable host buffers (pinned, so the copies are DMA):
``Compression.none`` / ``fp16``, the fallback's float32 path and PowerSGD's allreduces run on
GPU models too. MPI itself only ever sees host memory (a CUDA-aware MPI is not required, nor
used).

:meth:`MPICommunicator.allgather_async` (the overlapped exchange's buckets) is point to point
on a duplicate of the communicator: the payload's length (with the round's number for its
tag) and then its bytes go to every other rank with ``Isend``, matched by a tag derived from
the bucket's name, so buckets may start in any order on each rank (MPI's nonblocking
collectives would have to start in the same order everywhere). MPI moves bytes only inside MPI
calls (Open MPI's TCP transport has no progress thread of its own), so while transfers are in
flight a progress thread calls :meth:`MPICommunicator.progress` every ``progress_interval``
seconds and sleeps in between (a sleeping poll, not a spinning one: it takes little of the core
backward runs on); the exchange also calls it from the gradient hooks. ``progress`` posts the
receives whose lengths have arrived and lets MPI write and read what the sockets take.

Failures. A round that fails half way hands its unfinished handles to
:meth:`MPICommunicator.abandon`: their transfers are then completed in the background and
their data dropped (their receives stay posted, so a later round's messages cannot match them
out of order), and the next round may start the same names at once. An exception in the
progress thread ends the thread; it is raised at the next :meth:`~MPICommunicator.wait`,
:meth:`~MPICommunicator.progress` or start, and the next start runs a new thread. Every length
message carries the round's number for its name; a peer out of step (a round failed on some
ranks only) or announcing an impossible length leaves the point-to-point stream with it
unusable, and every later overlapped call raises saying so (make a new communicator).
"""
from __future__ import annotations

import atexit
import threading
import time
import weakref
import zlib
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from qoda_hvd.coding.format import MAX_NUMEL
from qoda_hvd.comm.base import AllgatherHandle, Communicator
from qoda_hvd.errors import PayloadError

__all__ = ["MPICommunicator", "payload_bytes_bound"]

#: Most bytes any peer's payload may announce unless :meth:`MPICommunicator.limit_payloads`
#: says less: the decoder's own cap on one segment's coordinates (``coding.format.MAX_NUMEL``).
DEFAULT_MAX_PAYLOAD_BYTES = MAX_NUMEL


def payload_bytes_bound(max_numel: int, segments: int = 1) -> int:
    """Most bytes an honest payload of at most ``max_numel`` coordinates (symbols plus raw
    values, the decoder's ``max_numel``) in at most ``segments`` segments takes, with room.

    Per coordinate at most 4 bytes of norm (buckets of 1) plus 2 of code (``elias``; ``fixed``
    and ``rans`` take at most 1), or 4 bytes raw; per segment its table entries, level table and
    codec side information (under 8 KiB); plus the header.

    Example::

        >>> payload_bytes_bound(1000, segments=2)
        89920
    """
    for name, v in (("max_numel", max_numel), ("segments", segments)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    return 8 * max_numel + 8192 * segments + 65536


class _Transfer:
    """One allgather in flight: sends of the header (length, round) and bytes to every peer,
    receives of each peer's header, then (once known) of its bytes."""

    __slots__ = ("tag", "round", "payload", "sends", "headers", "length_reqs", "bufs", "recvs",
                 "error")

    def __init__(self, tag: int, round_: int, payload: np.ndarray, size: int) -> None:
        self.tag = tag
        self.round = round_
        self.payload = payload
        self.sends: list = []
        self.headers = [np.zeros(2, dtype=np.int64) for _ in range(size)]
        self.length_reqs: dict[int, "MPI.Request"] = {}
        self.bufs: dict[int, np.ndarray] = {}
        self.recvs: dict[int, "MPI.Request"] = {}
        self.error: "BaseException | None" = None


class _Staging:
    """Reusable host buffers for device tensors: pinned when CUDA is there, grown as needed,
    one per dtype. A buffer is reused only after the device has read what was last copied
    from it (an event per buffer)."""

    def __init__(self) -> None:
        self._bufs: dict[torch.dtype, torch.Tensor] = {}
        self._events: dict[torch.dtype, Any] = {}

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of ``tensor`` (flat) in the reused buffer, complete on return."""
        n = tensor.numel()
        buf = self._bufs.get(tensor.dtype)
        if buf is None or buf.numel() < n:
            pin = torch.cuda.is_available()
            buf = torch.empty(max(n, 1), dtype=tensor.dtype, pin_memory=pin)
            self._bufs[tensor.dtype] = buf
            self._events.pop(tensor.dtype, None)
        event = self._events.pop(tensor.dtype, None)
        if event is not None:
            event.synchronize()  # the last copy out of this buffer has been read
        host = buf[:n]
        if tensor.is_cuda:
            host.copy_(tensor.detach().reshape(-1), non_blocking=True)
            torch.cuda.current_stream(tensor.device).synchronize()
        else:
            host.copy_(tensor.detach().reshape(-1))
        return host

    def to_device(self, host: torch.Tensor, out: torch.Tensor) -> None:
        """Copy ``host`` (a buffer of :meth:`to_host`) into ``out``; no wait for the device."""
        out.view(-1).copy_(host, non_blocking=out.is_cuda)
        if out.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(out.device))
            self._events[host.dtype] = event


class MPICommunicator(Communicator):
    """Collectives over an mpi4py communicator (default ``MPI.COMM_WORLD``).

    Making one is collective over ``comm``: its ranks agree on the thread level (one
    ``Allreduce``, so all of them take the same branch) and, when every rank has
    ``MPI_THREAD_MULTIPLE``, duplicate it for the overlapped buckets.

    Args:
        comm: the mpi4py communicator (default ``MPI.COMM_WORLD``).
        progress_interval: seconds the progress thread sleeps between polls, in (0, 1].
        max_payload_bytes: most bytes a peer may announce for one payload or chunk (default
            :data:`DEFAULT_MAX_PAYLOAD_BYTES`; see :meth:`limit_payloads`).

    Example::

        >>> comm = MPICommunicator()                       # doctest: +SKIP
        >>> parts = comm.allgather(payload)                # doctest: +SKIP
        >>> comm.limit_payloads(model_numel, segments=4)   # doctest: +SKIP
    """

    def __init__(self, comm: "MPI.Comm | None" = None, progress_interval: float = 5e-4,
                 max_payload_bytes: int | None = None) -> None:
        if (isinstance(progress_interval, bool) or not isinstance(progress_interval, (int, float))
                or not 0 < progress_interval <= 1):
            raise ValueError(f"progress_interval must be seconds in (0, 1], got "
                             f"{progress_interval!r}")
        if max_payload_bytes is None:
            max_payload_bytes = DEFAULT_MAX_PAYLOAD_BYTES
        self._check_budget(max_payload_bytes)
        self.max_payload_bytes = int(max_payload_bytes)
        self.progress_interval = float(progress_interval)
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        super().__init__(self.comm.Get_rank(), self.comm.Get_size())
        # The worker thread starts buckets while the hooks call progress() and synchronize()
        # waits: MPI calls from several threads (mpi4py asks for MPI_THREAD_MULTIPLE). The
        # level may differ per rank (each process's own MPI initialisation): the lowest one
        # decides for all, since only some ranks calling the collective Dup would stall.
        level = np.array([MPI.Query_thread()], dtype=np.int32)
        if self.size > 1:
            self.comm.Allreduce(MPI.IN_PLACE, level, op=MPI.MIN)
        self.thread_level = int(level[0])
        self.asynchronous = self.thread_level >= MPI.THREAD_MULTIPLE
        # its own tag space for the overlapped buckets (no clash with the user's traffic);
        # Dup is collective: every rank of ``comm`` makes its communicator, as with any MPI code
        self._p2p = self.comm.Dup() if self.asynchronous and self.size > 1 else None
        self._inflight: dict[int, _Transfer] = {}
        self._draining: list[_Transfer] = []  # abandoned, completing, in start order
        self._rounds: dict[int, int] = {}  # tag -> transfers started with it
        self._broken: "str | None" = None
        self._thread_error: "BaseException | None" = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopped = False
        self._progress_thread: "threading.Thread | None" = None
        self._staging = _Staging()
        self._stage_host_tensors = False  # tests: stage CPU tensors as if they were on a device

    # -- limits ---------------------------------------------------------------------------

    @staticmethod
    def _check_budget(nbytes: Any) -> None:
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) \
                or not 0 <= nbytes <= DEFAULT_MAX_PAYLOAD_BYTES:
            raise ValueError(f"max_payload_bytes must be an int in [0, "
                             f"{DEFAULT_MAX_PAYLOAD_BYTES}], got {nbytes!r}")

    def limit_payloads(self, max_numel: int, segments: int = 1) -> None:
        """Accept from peers only payloads an honest sender of at most ``max_numel``
        coordinates in ``segments`` segments makes (:func:`payload_bytes_bound`): the
        decoder's budget (``decode(max_numel=...)``), applied before the bytes are allocated.
        The exchange calls it with its model's size; the same value on every rank. Several
        exchanges over one communicator (a GAN's two optimizers) get the largest of their
        bounds."""
        bound = min(payload_bytes_bound(max_numel, segments), DEFAULT_MAX_PAYLOAD_BYTES)
        self._check_budget(bound)
        self._limits_asked = max(getattr(self, "_limits_asked", 0), bound)
        self.max_payload_bytes = self._limits_asked

    def _check_length(self, length: int, peer: int) -> int:
        if not 0 <= length <= self.max_payload_bytes:
            raise PayloadError(f"rank {peer} announced a payload of {length} bytes; accepted: 0 "
                               f"to {self.max_payload_bytes} (max_payload_bytes)")
        return int(length)

    def _check_counts(self, counts: np.ndarray) -> None:
        for peer in range(self.size):
            if peer != self.rank:
                self._check_length(int(counts[peer]), peer)

    # -- device tensors ---------------------------------------------------------------------

    def _staged(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type != "cpu" or self._stage_host_tensors

    def _host_bytes(self, payload: torch.Tensor, own: bool = False) -> np.ndarray:
        """A payload's bytes on the host; ``own``: in memory no later call reuses (a device
        payload is then copied out of the staging buffer)."""
        if self._staged(payload):
            host = self._staging.to_host(payload).numpy()
            return host.copy() if own else host
        return np.ascontiguousarray(payload.detach().numpy())

    # -- overlapped allgathers (point to point) ---------------------------------------------

    def _tag(self, tag: str) -> int:
        """The MPI tag of a name, the same on every rank (even: the header, odd: the bytes).
        The exchange's bucket names ``b<i>`` get distinct tags; other names a CRC-32 (a name
        colliding with one in flight raises)."""
        ub = int(self.comm.Get_attr(MPI.TAG_UB) or 32767)
        half = ub // 2
        if tag[:1] == "b" and tag[1:].isdigit() and int(tag[1:]) < half // 2:
            return 2 * int(tag[1:])
        return 2 * (half // 2 + zlib.crc32(tag.encode()) % (half - half // 2))

    def _raise_pending(self) -> None:
        """Raise what the progress thread or an earlier round left (lock held)."""
        if self._thread_error is not None:
            err, self._thread_error = self._thread_error, None
            raise RuntimeError(f"the MPI progress thread failed ({type(err).__name__}: {err}); "
                               "it runs again from the next start") from err
        if self._broken is not None:
            raise RuntimeError(f"this communicator's point-to-point stream is out of step: "
                               f"{self._broken}; make a new MPICommunicator (on every rank)")

    def _allgather_start(self, payload, tag):
        if self._p2p is None:
            return None  # runs in wait(), like the base class
        data = self._host_bytes(payload, own=True)
        with self._lock:
            self._raise_pending()
            t = self._tag(tag)
            if t in self._inflight:
                raise RuntimeError(f"allgather {tag!r} started twice, or its tag collides with "
                                   "one in flight; wait for it first")
            round_ = self._rounds.get(t, 0) + 1
            x = _Transfer(t, round_, data, self.size)
            x.headers[self.rank][:] = (data.size, round_)
            self._rounds[t] = round_
            self._inflight[t] = x
            try:
                for peer in range(self.size):
                    if peer == self.rank:
                        continue
                    x.sends.append(self._p2p.Isend(x.headers[self.rank], dest=peer, tag=t))
                    x.sends.append(self._p2p.Isend(data, dest=peer, tag=t + 1))
                    x.length_reqs[peer] = self._p2p.Irecv(x.headers[peer], source=peer, tag=t)
                self._post_known(x, self._draining)
            except BaseException:
                # what was posted completes in the background; the round's caller sees the error
                self._draining.append(self._inflight.pop(t))
                raise
            if self._progress_thread is None:
                self._start_progress_thread()
            self._wake.notify()
        return x

    def abandon(self, handle: AllgatherHandle) -> None:
        """Give up an :meth:`allgather_async` that will not be waited for (its round failed).

        Its transfer completes in the background (its sends and posted receives stay, so
        nothing of it can match a later round's receives) and its data is dropped; the name
        may be started again at once. Call it for every unfinished handle of a failed round,
        on every rank that started them. Abandoning a finished or abandoned handle does
        nothing.
        """
        if handle.done is not None:
            return
        handle.done = False
        if handle.state is None:
            return
        x = handle.state
        with self._lock:
            if self._inflight.get(x.tag) is x:
                del self._inflight[x.tag]
                self._draining.append(x)

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

    def _post_known(self, x: _Transfer, earlier: "list[_Transfer]") -> None:
        """Post the byte receives of the peers whose headers have arrived (lock held or ``x``
        owned by the caller). A bad header is recorded in ``x.error`` and breaks the stream.

        A peer's bytes for a name are received in the order its transfers started: not while
        an ``earlier`` (abandoned) transfer of the name still waits for that peer's header."""
        for peer, req in list(x.length_reqs.items()):
            if any(d.tag == x.tag and peer in d.length_reqs for d in earlier):
                continue
            if req.Test():
                del x.length_reqs[peer]
                self._post_bytes(x, peer)

    def _post_bytes(self, x: _Transfer, peer: int) -> None:
        length, round_ = (int(v) for v in x.headers[peer])
        try:
            if round_ != x.round:
                raise PayloadError(f"rank {peer} sent round {round_} of this name, this rank "
                                   f"expects round {x.round}: a round failed on some ranks only")
            self._check_length(length, peer)
        except PayloadError as e:
            if x.error is None:
                x.error = e
            # the peer's bytes message is not received: later ones with this tag would
            # match it, so nothing more may travel on this stream
            self._broken = self._broken or str(e)
            return
        x.bufs[peer] = np.empty(length, dtype=np.uint8)
        x.recvs[peer] = self._p2p.Irecv(x.bufs[peer], source=peer, tag=x.tag + 1)

    def progress(self) -> None:
        with self._lock:
            self._raise_pending_thread_error()
            self._progress_locked()

    def _raise_pending_thread_error(self) -> None:
        if self._thread_error is not None:
            self._raise_pending()

    def _progress_locked(self) -> None:
        for i, x in enumerate(self._draining):  # first: their receives were posted first
            self._post_known(x, self._draining[:i])
            MPI.Request.Testall(x.sends)
            MPI.Request.Testall(list(x.recvs.values()))
        self._draining = [x for x in self._draining if not _complete(x)]
        for x in self._inflight.values():
            self._post_known(x, self._draining)
            MPI.Request.Testall(x.sends)
            MPI.Request.Testall(list(x.recvs.values()))

    def _allgather_finish(self, handle):
        if handle.state is None:
            return self._allgather(handle.payload)
        x = handle.state
        with self._lock:  # from here on only this thread touches it
            self._raise_pending_thread_error()
            if self._inflight.get(x.tag) is not x:
                raise RuntimeError(f"allgather {handle.tag!r} failed or was abandoned; it "
                                   "cannot be waited for")
            del self._inflight[x.tag]
            # abandoned transfers of this name are ahead of it on every stream: their
            # byte receives must be posted before this one's (taken here, given back below)
            ahead = [d for d in self._draining if d.tag == x.tag and d.length_reqs]
            self._draining = [d for d in self._draining if not (d.tag == x.tag and d.length_reqs)]
        try:
            # Blocking waits outside the lock: a rank may wait here for a bucket its peer has
            # not started yet, and the peer's start must not wait for a lock this rank holds.
            for d in ahead:
                for peer, req in list(d.length_reqs.items()):
                    req.Wait()
                    del d.length_reqs[peer]
                    self._post_bytes(d, peer)
            for peer, req in list(x.length_reqs.items()):
                req.Wait()
                del x.length_reqs[peer]
                self._post_bytes(x, peer)
            if x.error is not None:
                raise x.error
            MPI.Request.Waitall(list(x.recvs.values()))
            MPI.Request.Waitall(x.sends)
        except BaseException:
            with self._lock:
                self._draining[:0] = ahead
                self._draining.append(x)
            raise
        with self._lock:
            self._draining[:0] = ahead
        x.bufs[self.rank] = x.payload
        return [torch.from_numpy(x.bufs[r]) for r in range(self.size)]

    # -- blocking collectives -----------------------------------------------------------------

    def _allgather(self, payload):
        send = self._host_bytes(payload)
        counts = np.empty(self.size, dtype=np.int64)
        self.comm.Allgather(np.array([send.size], dtype=np.int64), counts)
        self._check_counts(counts)
        recv = np.empty(int(counts.sum()), dtype=np.uint8)
        self.comm.Allgatherv(send, [recv, counts, MPI.BYTE])
        return list(torch.split(torch.from_numpy(recv), counts.tolist()))

    def _alltoall(self, chunks):
        joined = torch.cat(chunks)
        send = self._host_bytes(joined)
        send_counts = np.array([c.numel() for c in chunks], dtype=np.int64)
        recv_counts = np.empty(self.size, dtype=np.int64)
        self.comm.Alltoall(send_counts, recv_counts)
        self._check_counts(recv_counts)
        recv = np.empty(int(recv_counts.sum()), dtype=np.uint8)
        self.comm.Alltoallv([send, send_counts, MPI.BYTE], [recv, recv_counts, MPI.BYTE])
        return list(torch.split(torch.from_numpy(recv), recv_counts.tolist()))

    def _allreduce_sum(self, tensor):
        if tensor.dtype == torch.float16:
            # MPI has no half-precision sum; mpi4py's path sums in float32 and rounds back (the
            # Horovod communicator sends float16 on the wire).
            return self._allreduce_sum(tensor.float()).half()
        if self._staged(tensor):
            host = self._staging.to_host(tensor)
            self.comm.Allreduce(MPI.IN_PLACE, host.numpy(), op=MPI.SUM)
            out = torch.empty_like(tensor, memory_format=torch.contiguous_format)
            self._staging.to_device(host, out)
            return out
        send = tensor.detach().contiguous().numpy()
        recv = np.empty_like(send)
        self.comm.Allreduce(send, recv, op=MPI.SUM)
        return torch.from_numpy(recv)

    def _allreduce_sum_(self, tensor):
        if tensor.dtype == torch.float16:
            return super()._allreduce_sum_(tensor)
        if self._staged(tensor):
            host = self._staging.to_host(tensor)
            self.comm.Allreduce(MPI.IN_PLACE, host.numpy(), op=MPI.SUM)
            self._staging.to_device(host, tensor.detach())
            return
        self.comm.Allreduce(MPI.IN_PLACE, tensor.detach().numpy(), op=MPI.SUM)


def _complete(x: _Transfer) -> bool:
    """All of a transfer's requests are done (an errored one waits for nothing more)."""
    if x.length_reqs and x.error is None:
        return False
    return all(r == MPI.REQUEST_NULL for r in x.sends) and \
        all(r == MPI.REQUEST_NULL for r in x.recvs.values())


#: Communicators with a progress thread; stopped at exit, before mpi4py finalizes MPI (atexit
#: runs last-registered first, and mpi4py registered its finalizer when it was imported).
_LIVE: "weakref.WeakSet[MPICommunicator]" = weakref.WeakSet()


@atexit.register
def _stop_progress_threads() -> None:
    for comm in list(_LIVE):
        comm.close()


def _progress_loop(ref) -> None:
    """While transfers are in flight: progress, then sleep ``progress_interval``; otherwise wait
    to be woken by the next start. An exception ends the thread and is kept for the next
    wait / progress / start to raise (the next start runs a new thread)."""
    while True:
        comm = ref()
        if comm is None:
            return
        with comm._lock:
            if comm._stopped:
                return
            busy = bool(comm._inflight or comm._draining)
            if not busy:  # (at most a second, so a dropped communicator is let go)
                comm._wake.wait(timeout=1.0)
            interval = comm.progress_interval
            if busy:
                try:
                    comm._progress_locked()
                except BaseException as e:  # kept for the caller; the thread ends
                    comm._thread_error = e
                    comm._progress_thread = None
                    return
        del comm
        if busy:
            time.sleep(interval)
