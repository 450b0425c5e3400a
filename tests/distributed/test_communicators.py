"""Horovod and mpi4py communicators on real ranks: same results, one collective each."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(params=["horovod", "mpi4py"])
def comm(request, multi):
    if request.param == "horovod":
        from qoda_hvd.comm import HorovodCommunicator

        return HorovodCommunicator()
    import os

    if "OMPI_COMM_WORLD_SIZE" not in os.environ:
        pytest.skip("mpi4py needs an MPI launcher (horovodrun --gloo starts no MPI job)")
    from qoda_hvd.comm import MPICommunicator

    return MPICommunicator()


def test_allgather_varying_lengths(comm):
    size, rank = comm.size, comm.rank
    parts = comm.allgather(torch.full((rank * 3 + 1,), rank, dtype=torch.uint8))
    assert [p.tolist() for p in parts] == [[r] * (r * 3 + 1) for r in range(size)]
    assert comm.stats.collectives == 1


def test_alltoall_splits(comm):
    size, rank = comm.size, comm.rank
    chunks = [torch.full((rank + j + 1,), 10 * rank + j, dtype=torch.uint8) for j in range(size)]
    got = comm.alltoall(chunks)
    assert [g.tolist() for g in got] == [[10 * r + rank] * (r + rank + 1) for r in range(size)]
    assert comm.stats.alltoalls == 1


def test_allreduce_sum(comm):
    out = comm.allreduce_sum(torch.tensor([1.0, float(comm.rank)], dtype=torch.float64))
    assert out.tolist() == [float(comm.size), float(sum(range(comm.size)))]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_allreduce_sum_in_place(comm, dtype):
    t = torch.tensor([0.5, float(comm.rank), -1.0], dtype=dtype)
    before = comm.stats.allreduces
    assert comm.allreduce_sum_(t) is t
    assert t.dtype == dtype
    assert t.tolist() == [0.5 * comm.size, float(sum(range(comm.size))), -float(comm.size)]
    assert comm.stats.allreduces == before + 1


def test_allreduce_sum_float16(comm):
    out = comm.allreduce_sum(torch.tensor([0.5, float(comm.rank)], dtype=torch.float16))
    assert out.dtype == torch.float16
    assert out.tolist() == [0.5 * comm.size, float(sum(range(comm.size)))]


# --- mpi4py: thread level, failed rounds, the progress thread, hostile lengths, device staging --

def mpi4py_communicator(**kwargs):
    import os

    if "OMPI_COMM_WORLD_SIZE" not in os.environ:
        pytest.skip("mpi4py needs an MPI launcher (horovodrun --gloo starts no MPI job)")
    from qoda_hvd.comm import MPICommunicator

    return MPICommunicator(**kwargs)


def bucket_payload(rank: int, round_: int, bucket: int) -> torch.Tensor:
    """Bytes that say whose, which round and which bucket they are (the sizes differ per round:
    a stale message would not even have the right length). Bucket 1 passes Open MPI's eager
    limit (the rendezvous protocol)."""
    n = 100 + 13 * round_ + rank + (200_000 if bucket == 1 else 37 * bucket)
    return torch.full((n,), (7 * rank + 3 * round_ + bucket) % 256, dtype=torch.uint8)


def start_round(comm, round_: int, buckets: int = 3):
    return [comm.allgather_async(bucket_payload(comm.rank, round_, b), f"b{b}")
            for b in range(buckets)]


def check_bucket(parts, size: int, round_: int, bucket: int) -> None:
    assert [torch.equal(p, bucket_payload(r, round_, bucket)) for r, p in enumerate(parts)] \
        == [True] * size, (round_, bucket)


def drained(comm, seconds: float = 60.0) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while comm._draining and time.monotonic() < deadline:
        comm.progress()
        time.sleep(0.005)
    return not comm._draining


def test_mpi4py_ranks_agree_on_the_thread_level(multi, monkeypatch):
    """A rank whose MPI grants less than MPI_THREAD_MULTIPLE makes every rank skip the
    collective Dup (before: the others called it alone and stalled)."""
    from mpi4py import MPI

    if multi.rank() == 1:
        monkeypatch.setattr(MPI, "Query_thread", lambda: MPI.THREAD_SERIALIZED)
    comm = mpi4py_communicator()
    assert comm.thread_level == MPI.THREAD_SERIALIZED
    assert not comm.asynchronous and comm._p2p is None
    handle = comm.allgather_async(bucket_payload(comm.rank, 1, 0), "b0")  # runs at wait
    check_bucket(comm.wait(handle), comm.size, 1, 0)


def test_mpi4py_failed_round_then_clean_rounds(multi):
    """Round 1 fails on rank 0 after its first bucket (it abandons the other two while its
    peers finish theirs); round 3 fails everywhere before any wait. The rounds after each get
    exactly their own bytes (before: "started twice")."""
    comm = mpi4py_communicator()
    assert comm.asynchronous
    size, rank = comm.size, comm.rank
    handles = start_round(comm, 1)
    if rank == 0:
        check_bucket(comm.wait(handles[0]), size, 1, 0)
        for h in handles[1:]:
            comm.abandon(h)
        comm.abandon(handles[1])  # twice: nothing
    else:
        for b, h in enumerate(handles):
            check_bucket(comm.wait(h), size, 1, b)
    for b, h in enumerate(start_round(comm, 2)):
        check_bucket(comm.wait(h), size, 2, b)
    for h in start_round(comm, 3):
        comm.abandon(h)
    handles = start_round(comm, 4)
    for b in (2, 0, 1):  # any order
        check_bucket(comm.wait(handles[b]), size, 4, b)
    assert drained(comm) and not comm._inflight
    with pytest.raises(RuntimeError, match="already waited for"):
        comm.wait(handles[0])
    comm.close()


def test_mpi4py_progress_thread_error_is_raised_at_the_next_wait(multi):
    """The progress thread fails on rank 0: its error is raised by the next wait (before: the
    thread died silently), the handle can then be waited for, and the next start runs a new
    thread."""
    import threading
    import time

    comm = mpi4py_communicator()
    size, rank = comm.size, comm.rank
    if rank == 0:
        real = comm._progress_locked

        def failing():
            if threading.current_thread().name == "qoda-mpi-progress":
                raise OSError("injected progress failure")
            real()

        comm._progress_locked = failing
    handle = comm.allgather_async(bucket_payload(rank, 1, 1), "b1")
    if rank == 0:
        deadline = time.monotonic() + 30
        while comm._progress_thread is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert comm._progress_thread is None, "the progress thread did not end"
        with pytest.raises(RuntimeError, match=r"MPI progress thread failed \(OSError: injected "
                                               r"progress failure\)"):
            comm.wait(handle)
        del comm._progress_locked
    check_bucket(comm.wait(handle), size, 1, 1)
    for b, h in enumerate(start_round(comm, 2)):
        check_bucket(comm.wait(h), size, 2, b)
    assert comm._progress_thread is not None and comm._progress_thread.is_alive()
    comm.close()


def test_mpi4py_hostile_lengths_raise_payload_error(multi):
    """A peer announcing 2**50 bytes (point to point) or -5 bytes (a collective) gets a
    PayloadError naming it and the length, before anything is allocated; the point-to-point
    stream is then refused (its bytes message was never taken)."""
    import numpy as np

    from qoda_hvd import PayloadError

    if multi.size() != 2:
        pytest.skip("the hostile rank talks to one peer")
    comm = mpi4py_communicator()
    rank, tag = comm.rank, comm._tag("b0")
    payload = bucket_payload(rank, 1, 0)
    if rank == 1:
        comm._p2p.Send(np.array([2**50, 1], dtype=np.int64), dest=0, tag=tag)
        header = np.empty(2, dtype=np.int64)  # take rank 0's transfer: nothing left in flight
        comm._p2p.Recv(header, source=0, tag=tag)
        comm._p2p.Recv(np.empty(int(header[0]), dtype=np.uint8), source=0, tag=tag + 1)
    else:
        handle = comm.allgather_async(payload, "b0")
        with pytest.raises(PayloadError, match=r"^rank 1 announced a payload of "
                                               r"1125899906842624 bytes; accepted: 0 to"):
            comm.wait(handle)
        with pytest.raises(RuntimeError, match="out of step: rank 1 announced"):
            comm.allgather_async(payload, "b1")
    comm.close()
    comm = mpi4py_communicator()
    if rank == 1:
        comm.comm.Allgather(np.array([-5], dtype=np.int64), np.empty(2, dtype=np.int64))
    else:
        with pytest.raises(PayloadError, match=r"^rank 1 announced a payload of -5 bytes"):
            comm.allgather(payload)
    comm.comm.Barrier()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_mpi4py_device_tensors_go_through_host_staging(multi, dtype):
    """The path of CUDA tensors (reused host buffers), run here on CPU tensors: the same sums."""
    comm = mpi4py_communicator()
    comm._stage_host_tensors = True
    size, rank = comm.size, comm.rank
    total = float(sum(range(size)))
    for n in (5, 3, 7):  # the buffer grows, then is reused for a shorter tensor
        t = torch.arange(n, dtype=dtype) + rank
        expect = (torch.arange(n, dtype=torch.float64) * size + total).to(dtype)
        assert torch.equal(comm.allreduce_sum(t), expect)
        assert comm.allreduce_sum_(t) is t and torch.equal(t, expect)
    parts = comm.allgather(torch.full((rank + 2,), rank, dtype=torch.uint8))
    assert [p.tolist() for p in parts] == [[r] * (r + 2) for r in range(size)]
    for b, h in enumerate(start_round(comm, 1)):
        check_bucket(comm.wait(h), size, 1, b)
    # they went through the reused host buffers: one per dtype, as long as the longest tensor
    used = {dt: buf.numel() for dt, buf in comm._staging._bufs.items()}
    assert used[torch.uint8] >= 200_000 and used[torch.float32 if dtype == torch.float16
                                                   else dtype] == 7
    comm.close()


def test_mpi4py_payload_limit_follows_the_decoders_budget(multi):
    from qoda_hvd.coding.format import MAX_NUMEL
    from qoda_hvd.comm.mpi import payload_bytes_bound

    with pytest.raises(ValueError, match=r"max_payload_bytes must be an int in \[0, "):
        mpi4py_communicator(max_payload_bytes=-1)  # checked before anything collective
    comm = mpi4py_communicator()
    assert comm.max_payload_bytes == MAX_NUMEL
    comm.limit_payloads(10_000, segments=3)
    assert comm.max_payload_bytes == payload_bytes_bound(10_000, 3) == 80_000 + 3 * 8192 + 65536
    # an honest payload at the limit passes
    parts = comm.allgather(torch.zeros(comm.max_payload_bytes, dtype=torch.uint8))
    assert [p.numel() for p in parts] == [comm.max_payload_bytes] * comm.size
    with pytest.raises(ValueError, match="max_numel must be an int >= 0, got -1"):
        comm.limit_payloads(-1)
