"""PowerSGD (Compression.powersgd) on real ranks, through qoda_hvd.DistributedOptimizer.

Launched by tests/test_distributed.py under ``mpirun -np 2`` and ``horovodrun --gloo -np 2``.
"""
from __future__ import annotations

import inspect
import os

import pytest
import torch
from torch import nn

import qoda_hvd
import qoda_hvd.optim.distributed as _dist
from qoda_hvd.optim import QODA

pytestmark = pytest.mark.skipif("make_exchange" not in inspect.getsource(_dist),
                                reason="DistributedOptimizer has no make_exchange seam")

PSGD = dict(rank=2, min_numel=256, layerwise=True, every=3)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 3, padding=1)
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


def make_model():
    torch.manual_seed(0)
    return Net()


def run(hvd, model, opt, start, stop):
    for step in range(start, stop):
        g = torch.Generator().manual_seed(1000 * hvd.rank() + step)
        x, y = torch.randn(8, 4, 6, 6, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def make(hvd, comp):
    model = make_model()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = qoda_hvd.DistributedOptimizer(QODA(model.parameters(), lr=0.05),
                                        model.named_parameters(), compression=comp)
    return model, opt


def assert_identical_across_ranks(hvd, model):
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = hvd.allgather(flat.unsqueeze(0), name="powersgd.check.identical")
    for r in range(1, hvd.size()):
        assert torch.equal(everyone[0], everyone[r]), f"rank {r} differs from rank 0"


def test_powersgd_bit_identical_two_allreduces_per_round(multi):
    hvd = multi
    model, opt = make(hvd, qoda_hvd.Compression.powersgd(**PSGD))
    before = opt._communicator.stats.collectives
    run(hvd, model, opt, 0, 7)
    assert_identical_across_ranks(hvd, model)
    stats = opt.compression_stats()
    assert stats["exchanges"] == 7 and stats["strategy"] == "powersgd"
    # Two dependent allreduces per round; the rank agreement at steps 0, 3, 6 adds one each.
    assert opt._communicator.stats.collectives - before == 2 * 7 + 3
    ranks = opt._exchange.ranks
    assert all(r == ranks for r in hvd.allgather_object(ranks))


def test_powersgd_state_broadcast_and_resume(multi, tmp_path_factory):
    """Each rank saves its own checkpoint; resumed, every rank loads its own and
    ``hvd.broadcast_optimizer_state`` sends rank 0's exchange state: Q, iteration and ranks are
    global, the errors stay each rank's own, so the resumed run repeats the uninterrupted one."""
    hvd = multi
    comp = qoda_hvd.Compression.powersgd(**PSGD)
    model, opt = make(hvd, comp)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    run(hvd, model, opt, 0, 4)
    path = os.path.join(str(tmp_path_factory.getbasetemp()), f"psgd{hvd.rank()}.pt")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    run(hvd, model, opt, 4, 7)

    model2, opt2 = make(hvd, comp)
    ckpt = torch.load(path, weights_only=False)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    hvd.broadcast_optimizer_state(opt2, root_rank=0)
    state = opt2._exchange.extra_state()
    assert state["step"] == 4
    root = hvd.broadcast_object(state, root_rank=0, name="powersgd.check.state")
    assert state["ranks"] == root["ranks"]
    assert all(torch.equal(state["q"][k], root["q"][k]) for k in root["q"])
    run(hvd, model2, opt2, 4, 7)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert_identical_across_ranks(hvd, model2)


def test_powersgd_fresh_ranks_get_the_roots_ranks_and_q(multi):
    """Only rank 0 has state: the broadcast gives every rank its Q, iteration and ranks (and
    zero errors of their own), and training goes on in step."""
    hvd = multi
    comp = qoda_hvd.Compression.powersgd(**PSGD)
    model, opt = make(hvd, comp)
    run(hvd, model, opt, 0, 4)
    saved = {"model": model.state_dict(), "opt": opt.state_dict()}
    model2, opt2 = make(hvd, comp)
    if hvd.rank() == 0:
        model2.load_state_dict(saved["model"])
        opt2.load_state_dict(saved["opt"])
    hvd.broadcast_parameters(model2.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt2, root_rank=0)
    state = opt2._exchange.extra_state()
    root = hvd.broadcast_object(state, root_rank=0, name="powersgd.check.fresh")
    assert state["step"] == root["step"] == 4 and state["ranks"] == root["ranks"]
    if hvd.rank() != 0:
        assert all(not e.any() for e in state["errors"].values())
    run(hvd, model2, opt2, 4, 6)
    assert_identical_across_ranks(hvd, model2)
