"""The overlapped exchange (buckets started from the gradient hooks) on fake ranks: the same
aggregate, bit for bit, as one block, whatever order the buckets become ready in."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fake_ranks import run_ranks
from qoda_hvd.comm.exchange import LayerwiseExchange
from qoda_hvd.quant import LayerwiseQuantizer, classify_parameters


def model():
    """The same weights in every call, from a generator of its own: fake ranks are threads,
    and the global RNG would be shared (and raced) by them."""
    m = nn.Sequential(nn.Embedding(300, 32), nn.Flatten(), nn.Linear(32 * 4, 64), nn.ReLU(),
                      nn.Linear(64, 8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def aggregate(rank, comm, overlap, order, steps=4, coding="auto", schedule=(0, 2)):
    m = model()
    typing = classify_parameters(m, min_numel=256)
    named = list(m.named_parameters())
    ex = LayerwiseExchange(typing, named, LayerwiseQuantizer(typing, bits=4, schedule=schedule),
                           comm, "allgather", coding, seed=3)
    ex.overlap = overlap
    grads = []
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * rank + step)
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=g)
        if order == "reverse":
            ready = list(reversed(named))
        elif order == "shuffled":
            ready = [named[i] for i in torch.randperm(len(named), generator=g).tolist()]
        else:
            ready = named[:-1]  # the last parameter's gradient never arrives: zeros at sync
            named[-1][1].grad = None
        for _, p in ready:
            ex.grad_ready(p)
        ex()
        grads.append(torch.cat([p.grad.reshape(-1) for _, p in named]).clone())
    return grads, comm.stats.collectives, ex.stats.exchanges


@pytest.mark.parametrize("order", ["reverse", "shuffled", "missing"])
@pytest.mark.parametrize("coding", ["auto", "fixed", "rans"])
def test_overlap_gives_the_block_aggregate_bit_for_bit(order, coding):
    block = run_ranks(2, lambda r, c: aggregate(r, c, False, order, coding=coding))
    over = run_ranks(2, lambda r, c: aggregate(r, c, True, order, coding=coding))
    for rank in range(2):
        for a, b in zip(block[rank][0], over[rank][0]):
            assert torch.equal(a, b)
        assert torch.equal(over[rank][0][-1], over[0][0][-1])  # identical across ranks
        # one round per call either way; the overlapped one uses one allgather per bucket
        # (3 types + raw) on steps without a level update (1 and 3)
        assert block[rank][2] == over[rank][2] == 4
        assert over[rank][1] > block[rank][1]


def train_wrapped(rank, comm, overlap, exchange="allgather", steps=5, bpps=1):
    import qoda_hvd
    from qoda_hvd.optim import QODA

    m = model()
    opt = qoda_hvd.DistributedOptimizer(
        QODA(m.parameters(), lr=0.05), m.named_parameters(),
        compression=qoda_hvd.Compression.layerwise(bits=4, min_numel=256, schedule=(0, 2)),
        backward_passes_per_step=bpps, exchange=exchange, communicator=comm, overlap=overlap)
    for step in range(steps):
        opt.zero_grad()
        for micro in range(bpps):
            g = torch.Generator().manual_seed(100 * rank + 10 * step + micro)
            idx = torch.randint(0, 300, (8, 4), generator=g)
            m(idx).pow(2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in m.parameters()], opt.compression_stats()


@pytest.mark.parametrize("exchange, bpps", [("allgather", 1), ("allgather", 2), ("scatter_gather", 1)])
def test_distributed_optimizer_overlap_matches_block(exchange, bpps):
    on = run_ranks(2, lambda r, c: train_wrapped(r, c, True, exchange, bpps=bpps))
    off = run_ranks(2, lambda r, c: train_wrapped(r, c, False, exchange, bpps=bpps))
    for rank in range(2):
        for a, b in zip(on[rank][0], off[rank][0]):
            assert torch.equal(a, b)
        for a, b in zip(on[rank][0], on[0][0]):
            assert torch.equal(a, b)
        assert on[rank][1]["rounds"] == off[rank][1]["rounds"] == 5
    if exchange == "allgather":  # steps 1, 3, 4 overlapped: one allgather per bucket
        assert on[0][1]["collectives"] > off[0][1]["collectives"]
    else:  # scatter_gather does not overlap (yet): the same collectives
        assert on[0][1]["collectives"] == off[0][1]["collectives"]


def test_overlap_is_a_bool():
    import qoda_hvd
    from qoda_hvd.comm import LocalGroup

    m = model()
    with pytest.raises(TypeError, match="overlap must be a bool or None"):
        qoda_hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m.named_parameters(),
                                      communicator=LocalGroup(1)[0], overlap="yes")
