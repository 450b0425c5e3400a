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
