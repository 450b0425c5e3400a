"""The in-process communicator: the collectives' semantics and their counts."""
from __future__ import annotations

import threading

import pytest
import torch

from qoda_hvd.comm import LocalGroup


def run_ranks(size, fn, timeout=30.0):
    """Run ``fn(comm)`` on ``size`` fake ranks, one thread each; return the results by rank."""
    group = LocalGroup(size, timeout=timeout)
    out, errors = [None] * size, []

    def work(r):
        try:
            out[r] = fn(group[r])
        except BaseException as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out, group


def payload(rank, n):
    return torch.full((n,), rank, dtype=torch.uint8)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_allgather_varying_lengths_and_counts(size):
    out, group = run_ranks(size, lambda c: c.allgather(payload(c.rank, c.rank + 2)))
    for r in range(size):
        assert [p.tolist() for p in out[r]] == [[i] * (i + 2) for i in range(size)]
        st = group[r].stats
        assert (st.collectives, st.allgathers) == (1, 1)
        assert st.bytes_received == sum(i + 2 for i in range(size) if i != r)
        assert st.bytes_sent == (r + 2) * (size - 1)


@pytest.mark.parametrize("size", [2, 3])
def test_alltoall(size):
    def fn(c):
        return c.alltoall([torch.full((c.rank + j + 1,), 10 * c.rank + j, dtype=torch.uint8)
                           for j in range(size)])

    out, group = run_ranks(size, fn)
    for r in range(size):
        assert [p.tolist() for p in out[r]] == [[10 * i + r] * (i + r + 1) for i in range(size)]
        assert group[r].stats.alltoalls == 1


def test_allreduce_sum():
    out, _ = run_ranks(3, lambda c: c.allreduce_sum(torch.tensor([1.0, c.rank], dtype=torch.float64)))
    assert all(o.tolist() == [3.0, 3.0] for o in out)


@pytest.mark.parametrize("call, error, match", [
    (lambda c: c.allgather(torch.zeros(3)), TypeError, r"payload must be a 1-D torch.uint8"),
    (lambda c: c.allgather([1, 2]), TypeError, r"payload must be a torch.Tensor, got list"),
    (lambda c: c.alltoall([]), ValueError, r"one chunk per rank \(1\), got 0"),
    (lambda c: c.allreduce_sum(torch.zeros(2, dtype=torch.int32)), TypeError, r"float32 or float64"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(LocalGroup(1)[0])


def test_dead_rank_breaks_barrier_instead_of_hanging():
    def fn(c):
        if c.rank == 1:
            raise RuntimeError("rank 1 died")
        return c.allgather(payload(0, 1))

    with pytest.raises((RuntimeError, threading.BrokenBarrierError)):
        run_ranks(2, fn, timeout=1.0)


def test_group_size_validated():
    with pytest.raises(ValueError, match=r"size must be an integer >= 1, got 0"):
        LocalGroup(0)
