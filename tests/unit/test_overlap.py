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
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(300, 32), nn.Flatten(), nn.Linear(32 * 4, 64), nn.ReLU(),
                         nn.Linear(64, 8))


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
