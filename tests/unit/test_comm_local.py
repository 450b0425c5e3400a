"""The in-process communicator: the collectives' semantics and their counts."""
from __future__ import annotations

import threading

import pytest
import torch

from qoda_hvd.comm import LocalGroup
from fake_ranks import run_ranks


def payload(rank, n):
    return torch.full((n,), rank, dtype=torch.uint8)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_allgather_varying_lengths_and_counts(size):
    out = run_ranks(size, lambda r, c: (c.allgather(payload(r, r + 2)), c.stats))
    for r in range(size):
        parts, st = out[r]
        assert [p.tolist() for p in parts] == [[i] * (i + 2) for i in range(size)]
        assert (st.collectives, st.allgathers) == (1, 1)
        assert st.bytes_received == sum(i + 2 for i in range(size) if i != r)
        assert st.bytes_sent == (r + 2) * (size - 1)


@pytest.mark.parametrize("size", [2, 3])
def test_alltoall(size):
    def fn(r, c):
        return c.alltoall([torch.full((r + j + 1,), 10 * r + j, dtype=torch.uint8)
                           for j in range(size)]), c.stats.alltoalls

    for r, (parts, alltoalls) in enumerate(run_ranks(size, fn)):
        assert [p.tolist() for p in parts] == [[10 * i + r] * (i + r + 1) for i in range(size)]
        assert alltoalls == 1


def test_allreduce_sum():
    out = run_ranks(3, lambda r, c: c.allreduce_sum(torch.tensor([1.0, r], dtype=torch.float64)))
    assert all(o.tolist() == [3.0, 3.0] for o in out)
    inplace = run_ranks(3, lambda r, c: c.allreduce_sum_(torch.tensor([1.0, r], dtype=torch.float32)))
    assert all(o.tolist() == [3.0, 3.0] for o in inplace)


@pytest.mark.parametrize("call, error, match", [
    (lambda c: c.allgather(torch.zeros(3)), TypeError, r"payload must be a 1-D torch.uint8"),
    (lambda c: c.allgather([1, 2]), TypeError, r"payload must be a torch.Tensor, got list"),
    (lambda c: c.alltoall([]), ValueError, r"one chunk per rank \(1\), got 0"),
    (lambda c: c.allreduce_sum(torch.zeros(2, dtype=torch.int32)), TypeError, r"float16, float32 or float64"),
    (lambda c: c.allreduce_sum_(torch.zeros(4, 2)[:, 0]), ValueError, r"needs a contiguous tensor"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(LocalGroup(1)[0])


def test_dead_rank_breaks_barrier_instead_of_hanging():
    def fn(r, c):
        if r == 1:
            raise RuntimeError("rank 1 died")
        return c.allgather(payload(0, 1))

    with pytest.raises((RuntimeError, threading.BrokenBarrierError)):
        run_ranks(2, fn, timeout=1.0)


def test_group_size_validated():
    with pytest.raises(ValueError, match=r"size must be an integer >= 1, got 0"):
        LocalGroup(0)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_reduce_scatter_sum_uneven_chunks_and_counts(size):
    lengths = [j + 1 for j in range(size)]  # chunk j has j + 1 values on every rank

    def fn(r, c):
        chunks = [torch.full((n,), float(10 * r + j)) for j, n in enumerate(lengths)]
        return c.reduce_scatter_sum(chunks), c.stats

    for r, (out, st) in enumerate(run_ranks(size, fn)):
        assert out.tolist() == [float(sum(10 * i + r for i in range(size)))] * lengths[r]
        assert (st.collectives, st.reducescatters) == (1, 1)
        assert st.bytes_sent == 4 * sum(n for j, n in enumerate(lengths) if j != r)
        assert st.bytes_received == 4 * lengths[r] * (size - 1)


def test_reduce_scatter_sum_bad_input():
    with pytest.raises(ValueError, match=r"one chunk per rank \(1\), got 2"):
        LocalGroup(1)[0].reduce_scatter_sum([torch.zeros(1), torch.zeros(1)])
    with pytest.raises(TypeError, match=r"1-D float16, float32 or float64 tensors of one dtype"):
        LocalGroup(1)[0].reduce_scatter_sum([torch.zeros(1, dtype=torch.int32)])


def test_agree_is_a_setup_collective():
    out = run_ranks(2, lambda r, c: (c.agree(payload(r, 3)), c.stats))
    for r, (parts, st) in enumerate(out):
        assert [p.tolist() for p in parts] == [[0] * 3, [1] * 3]
        assert (st.collectives, st.setup_collectives, st.bytes_sent) == (0, 1, 3)


def test_fake_nodes_are_validated():
    assert LocalGroup(4, ranks_per_node=2)[3].node_of == (0, 0, 1, 1)
    assert LocalGroup(3, node_of=[7, 7, 2])[0].node_of == (0, 0, 1)
    with pytest.raises(ValueError, match=r"ranks_per_node or node_of, not both"):
        LocalGroup(2, ranks_per_node=1, node_of=[0, 1])
    with pytest.raises(ValueError, match=r"node_of must give a node number >= 0 for each of the 2"):
        LocalGroup(2, node_of=[0])
