"""Settings that shape collectives are agreed at the first exchange: the same on every rank, or
the same clear error on every rank (never a stall). Fake ranks; each test fails on the code
before the agreement (the ranks ran mismatched collectives)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import qoda_hvd
from fake_ranks import run_ranks
from qoda_hvd.comm.agreement import check_agreed, settings_digest

LAYERWISE = dict(bits=4, min_numel=256)


def _model():
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def _step(model, opt, rank):
    g = torch.Generator().manual_seed(rank)
    opt.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(8, 16, generator=g)),
                                torch.randint(0, 4, (8,), generator=g)).backward()
    opt.step()


def _errors(size, fn):
    """Each rank's error message (None where it passed)."""
    def wrapped(r, c):
        try:
            fn(r, c)
        except ValueError as e:
            return str(e)
        return None

    return run_ranks(size, wrapped, timeout=20.0)


def test_a_strategy_that_differs_by_rank_is_the_same_error_everywhere():
    # as QODA_EXCHANGE set on one node only: rank 2 would alltoall while the others allgather
    def fn(r, c):
        m = _model()
        opt = qoda_hvd.DistributedOptimizer(
            torch.optim.SGD(m.parameters(), lr=0.1), m.named_parameters(), communicator=c,
            compression=qoda_hvd.Compression.layerwise(**LAYERWISE),
            exchange="scatter_gather" if r == 2 else "allgather")
        _step(m, opt, r)

    errors = _errors(3, fn)
    assert all(e is not None and "disagree on strategy" in e for e in errors), errors


def test_a_bucket_cap_that_differs_by_rank_is_the_same_error_everywhere():
    # as HOROVOD_FUSION_THRESHOLD differing between nodes: buckets would not match
    def fn(r, c):
        m = _model()
        opt = qoda_hvd.DistributedOptimizer(
            torch.optim.SGD(m.parameters(), lr=0.1), m.named_parameters(), communicator=c,
            compression=qoda_hvd.Compression.layerwise(**LAYERWISE), overlap=True,
            bucket_cap_mb=0.001 * (r + 1))
        for _ in range(3):
            _step(m, opt, r)

    errors = _errors(2, fn)
    assert all(e is not None and "bucket_cap_bytes" in e for e in errors), errors


def test_optimizers_built_in_another_order_are_the_same_error_everywhere():
    # two optimizers (a GAN's generator and critic): their collectives are named by the order
    # they were built in, which must be the same on every rank
    def fn(r, c):
        g, d = _model(), _model()
        def make(m):
            return qoda_hvd.DistributedOptimizer(
                torch.optim.SGD(m.parameters(), lr=0.1), m.named_parameters(), communicator=c,
                compression=qoda_hvd.Compression.layerwise(**LAYERWISE))
        opt_g, opt_d = (make(g), make(d)) if r == 0 else reversed((make(d), make(g)))
        _step(g, opt_g, r)

    errors = _errors(2, fn)
    assert all(e is not None and "disagree on name" in e for e in errors), errors


def test_agreed_settings_pass_and_a_resumed_step_is_checked_too():
    def fn(r, c):
        m = _model()
        opt = qoda_hvd.DistributedOptimizer(
            torch.optim.SGD(m.parameters(), lr=0.1), m.named_parameters(), communicator=c,
            compression=qoda_hvd.Compression.layerwise(**LAYERWISE))
        _step(m, opt, r)
        state = opt.state_dict()
        if r == 1:  # a checkpoint of another step loaded on one rank only
            state["qoda_hvd"]["step"] = 5
        opt.load_state_dict(state)
        _step(m, opt, r)

    assert _errors(2, lambda r, c: None) == [None, None]
    errors = _errors(2, fn)
    assert all(e is not None and "disagree on step" in e for e in errors), errors


def test_check_agreed_names_the_ranks_that_differ():
    s = {"a": "x" * 100, "b": 2 ** 40, "c": None}
    check_agreed([settings_digest(s)] * 64, s)
    other = settings_digest({"a": "y", "b": 2 ** 40, "c": None})
    with pytest.raises(ValueError, match=r"disagree on a \(this rank: 'x+'; rank\(s\) 5, 9 differ"):
        check_agreed([other if r in (5, 9) else settings_digest(s) for r in range(16)], s)
