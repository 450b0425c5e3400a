"""exchange="hierarchical" / "auto" through qoda_hvd.DistributedOptimizer on fake nodes."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch import nn

import qoda_hvd
from fake_ranks import run_group
from qoda_hvd.comm import LocalGroup
from qoda_hvd.optim import QODA

torch.set_num_threads(1)
_INIT_LOCK = threading.Lock()
LAYERWISE = dict(bits=4, min_numel=256, bucket_size=128)


def make_model():
    with _INIT_LOCK:  # the same initial model on every fake rank
        torch.manual_seed(0)
        # sizes that divide neither by the ranks per node nor by the bucket
        return nn.Sequential(nn.Linear(17, 61), nn.ReLU(), nn.Linear(61, 37), nn.ReLU(),
                             nn.Linear(37, 3))


def train(rank, comm, steps=4, **kwargs):
    model = make_model()
    opt = qoda_hvd.DistributedOptimizer(QODA(model.parameters(), lr=0.05),
                                        model.named_parameters(), communicator=comm,
                                        overlap=False, **kwargs)
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * rank + step)
        x, y = torch.randn(16, 17, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("L, M", [(2, 2), (2, 3), (3, 2), (4, 2)])
def test_two_level_training_is_bit_identical_on_every_rank(L, M):
    comp = qoda_hvd.Compression.layerwise(**LAYERWISE)
    out = run_group(LocalGroup(L * M, ranks_per_node=L),
                    lambda r, c: train(r, c, compression=comp, exchange="hierarchical"))
    assert not any(isinstance(o, BaseException) for o in out), out
    ref = [p.detach() for p in out[0][0].parameters()]
    for model, opt in out[1:]:
        assert all(torch.equal(a, b) for a, b in zip(ref, model.parameters()))
    stats = out[0][1].compression_stats()
    assert stats["strategy"] == "hierarchical" and stats["exchanges"] == 4
    extra = out[0][1]._exchange.topology_stats()
    assert extra["topology"] == f"{M} nodes x {L} ranks (local)"
    assert extra["inter_node_bytes_sent"] > 0 and extra["intra_node_bytes_sent"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(ref, make_model().parameters()))


def test_auto_picks_two_levels_only_where_they_fit():
    comp = qoda_hvd.Compression.layerwise(**LAYERWISE)

    def strategy(group):
        out = run_group(group, lambda r, c: train(r, c, steps=1, compression=comp)[1])
        assert not any(isinstance(o, BaseException) for o in out), out
        return {o.compression_stats()["strategy"] for o in out}

    assert strategy(LocalGroup(4, ranks_per_node=2)) == {"hierarchical"}
    assert strategy(LocalGroup(4)) == {"scatter_gather"}            # one rank per node
    assert strategy(LocalGroup(2)) == {"allgather"}
    # one node of CPU ranks: the flat exchange (float32 is auto's choice for GPUs only)
    assert strategy(LocalGroup(3, ranks_per_node=3)) == {"scatter_gather"}


def test_heterogeneous_nodes_fall_back_to_flat_with_one_warning():
    comp = qoda_hvd.Compression.layerwise(**LAYERWISE)
    group = LocalGroup(4, node_of=[0, 0, 0, 1])

    # (warning filters are process-wide: caught around all four fake ranks at once)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run_group(group, lambda r, c: train(r, c, steps=2, compression=comp,
                                                  exchange="hierarchical")[1])
    assert not any(isinstance(o, BaseException) for o in out), out
    mine = [str(w.message) for w in caught if "different numbers of ranks" in str(w.message)]
    assert len(mine) == 1 and "[3, 1]" in mine[0]  # once, from rank 0, naming the sizes
    assert {o.compression_stats()["strategy"] for o in out} == {"scatter_gather"}


def test_bad_override_is_a_value_error_on_every_rank(monkeypatch):
    monkeypatch.setenv("QODA_RANKS_PER_NODE", "3")
    comp = qoda_hvd.Compression.layerwise(**LAYERWISE)
    out = run_group(LocalGroup(4), lambda r, c: train(r, c, steps=1, compression=comp))
    assert all(isinstance(o, ValueError) for o in out), out
    assert "QODA_RANKS_PER_NODE must be an integer >= 1 that divides the 4 ranks, got '3'" in str(out[2])


def test_override_places_fake_ranks_on_nodes(monkeypatch):
    monkeypatch.setenv("QODA_NODE_OF_RANK", "0,1,0,1")
    comp = qoda_hvd.Compression.layerwise(**LAYERWISE)
    out = run_group(LocalGroup(4), lambda r, c: train(r, c, steps=2, compression=comp))
    assert not any(isinstance(o, BaseException) for o in out), out
    ex = out[0][1]._exchange
    assert ex.strategy == "hierarchical" and ex.topology_stats()["topology"].startswith(
        "2 nodes x 2 ranks (override)")
    ref = [p.detach() for p in out[0][0].parameters()]
    assert all(torch.equal(a, b) for m, _ in out[1:] for a, b in zip(ref, m.parameters()))


def test_checkpoint_round_trip_resumes_identically():
    comp = qoda_hvd.Compression.layerwise(**LAYERWISE)
    group = LocalGroup(4, ranks_per_node=2)

    def fn(r, c):
        model, opt = train(r, c, steps=2, compression=comp, exchange="hierarchical")
        state = opt.state_dict()
        assert opt._exchange.state_dict()["step"] == 2
        opt.load_state_dict(state)
        return opt._exchange.step

    assert run_group(group, fn) == [2, 2, 2, 2]
