"""qoda_hvd.DistributedOptimizer on real ranks (Horovod's collectives, and mpi4py's)."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import qoda_hvd
from qoda_hvd.optim import QODA, ExtraGradient

LAYERWISE = dict(bits=4, min_numel=256)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def batch(rank, step, n=32):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(n, 16, generator=g)
    return x, (x[:, :4] * 2 + x[:, 4:8]).argmax(dim=1)  # a learnable rule


def train(hvd, opt_factory, steps, communicator=None, **kwargs):
    model = make_model()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = qoda_hvd.DistributedOptimizer(opt_factory(model), model.named_parameters(),
                                        communicator=communicator, **kwargs)
    losses = []
    for step in range(steps):
        x, y = batch(hvd.rank(), step)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


def assert_identical_across_ranks(hvd, model):
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = hvd.allgather(flat.unsqueeze(0), name="check.identical")
    for r in range(1, hvd.size()):
        assert torch.equal(everyone[0], everyone[r]), f"rank {r} differs from rank 0"


@pytest.mark.parametrize("exchange", ["allgather", "scatter_gather"])
@pytest.mark.parametrize("coding", ["ans", "elias", "fixed", "zstd", "auto"])
def test_parameters_bit_identical_after_training(multi, exchange, coding):
    comp = qoda_hvd.Compression.layerwise(coding=coding, **LAYERWISE)
    model, opt, _ = train(multi, lambda m: QODA(m.parameters(), lr=0.05), 8,
                          compression=comp, exchange=exchange)
    assert_identical_across_ranks(multi, model)
    assert opt.compression_stats()["exchanges"] == 8


def test_mpi4py_communicator_gives_the_same_training(multi):
    if "OMPI_COMM_WORLD_SIZE" not in os.environ:
        pytest.skip("mpi4py needs an MPI launcher (horovodrun --gloo starts no MPI job)")
    from qoda_hvd.comm import MPICommunicator

    comp = qoda_hvd.Compression.layerwise(coding="ans", **LAYERWISE)
    factory = lambda m: QODA(m.parameters(), lr=0.05)  # noqa: E731
    m_hvd, _, _ = train(multi, factory, 5, compression=comp)
    m_mpi, _, _ = train(multi, factory, 5, communicator=MPICommunicator(), compression=comp)
    for a, b in zip(m_hvd.parameters(), m_mpi.parameters()):
        assert torch.equal(a, b)


def test_one_exchange_per_qoda_step_two_per_extragradient_iteration(multi):
    comp = qoda_hvd.Compression.layerwise(levels="uniform", **LAYERWISE)
    _, opt, _ = train(multi, lambda m: QODA(m.parameters(), lr=0.05), 4, compression=comp,
                      exchange="allgather", overlap=False)
    assert opt._communicator.stats.collectives == 4
    # overlapped: still one round per step, one allgather per bucket
    _, opt, _ = train(multi, lambda m: QODA(m.parameters(), lr=0.05), 4, compression=comp,
                      exchange="allgather", overlap=True)
    assert opt._overlap and opt.compression_stats()["rounds"] == 4
    assert opt._communicator.stats.collectives > 4

    model = make_model()
    opt = qoda_hvd.DistributedOptimizer(ExtraGradient(model.parameters(), lr=0.05),
                                        model.named_parameters(), compression=comp,
                                        exchange="allgather", overlap=False)
    for step in range(3):
        x, y = batch(multi.rank(), step)
        for phase in (opt.extrapolation, opt.step):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            phase()
    assert opt.compression_stats()["exchanges"] == 6
    assert opt._communicator.stats.collectives == 6
    assert_identical_across_ranks(multi, model)


def test_layerwise_training_reaches_uncompressed_loss(multi):
    """QODA with 4-bit layer-wise compression ends within 0.05 nats (15%) of uncompressed QODA
    on the same data and seeds, averaged over the last 20 steps."""
    factory = lambda m: QODA(m.parameters(), lr=0.5)  # noqa: E731
    steps = 150
    _, _, plain = train(multi, factory, steps)
    _, opt, comp = train(multi, factory, steps,
                         compression=qoda_hvd.Compression.layerwise(coding="ans", **LAYERWISE))
    tail = lambda xs: sum(xs[-20:]) / 20  # noqa: E731
    assert tail(plain) < 0.6 * sum(plain[:5]) / 5, "uncompressed run did not learn"
    assert tail(comp) <= tail(plain) + max(0.05, 0.15 * tail(plain)), (tail(comp), tail(plain))
    assert opt.compression_stats()["ratio"] > 4


def test_layerwise_inside_horovods_own_distributed_optimizer_trains(multi):
    hvd = multi
    model = make_model()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.2),
                                   named_parameters=model.named_parameters(),
                                   compression=qoda_hvd.Compression.layerwise(**LAYERWISE))
    losses = []
    for step in range(100):
        x, y = batch(hvd.rank(), step)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    assert_identical_across_ranks(hvd, model)


def test_broadcast_optimizer_state_and_resume(multi, tmp_path_factory):
    hvd = multi
    comp = qoda_hvd.Compression.layerwise(**LAYERWISE)
    model = make_model()
    opt = qoda_hvd.DistributedOptimizer(QODA(model.parameters(), lr=0.05),
                                        model.named_parameters(), compression=comp)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)

    def run(m, o, start, stop):
        for step in range(start, stop):
            x, y = batch(hvd.rank(), step)
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()

    run(model, opt, 0, 4)
    path = os.path.join(str(tmp_path_factory.getbasetemp()), f"ckpt{hvd.rank()}.pt")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    run(model, opt, 4, 7)

    ckpt = torch.load(path, weights_only=False)
    model2 = make_model()
    model2.load_state_dict(ckpt["model"])
    opt2 = qoda_hvd.DistributedOptimizer(QODA(model2.parameters(), lr=0.05),
                                         model2.named_parameters(), compression=comp)
    opt2.load_state_dict(ckpt["opt"])
    hvd.broadcast_optimizer_state(opt2, root_rank=0)
    run(model2, opt2, 4, 7)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert_identical_across_ranks(hvd, model2)


def _deep(fn, depth, *args):
    """``fn(*args)`` called ``depth`` frames down (a user's wrappers around it)."""
    return fn(*args) if depth == 0 else _deep(fn, depth - 1, *args)


def test_state_broadcast_through_deep_wrappers(multi):
    """qoda_hvd.broadcast_optimizer_state works however deep the optimizer's step() is
    wrapped; with Horovod's own, a step() wrapped too deep to recognise the caller is a clear
    error on every rank instead of a stall."""
    hvd = multi
    comp = qoda_hvd.Compression.layerwise(**LAYERWISE)
    model = make_model()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = qoda_hvd.DistributedOptimizer(QODA(model.parameters(), lr=0.05),
                                        model.named_parameters(), compression=comp)
    plain_step = opt.step
    opt.step = lambda *a, **k: _deep(plain_step, 5, *a)  # e.g. a framework's step wrappers
    qoda_hvd.broadcast_optimizer_state(opt, 0)
    opt.step = plain_step
    assert len(opt.state_dict()["state"]) > 0 and opt.compression_stats()["exchanges"] == 0
    for step in range(3):
        x, y = batch(hvd.rank(), step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert_identical_across_ranks(hvd, model)

    fresh = make_model()
    opt2 = qoda_hvd.DistributedOptimizer(QODA(fresh.parameters(), lr=0.05),
                                         fresh.named_parameters(), compression=comp)
    plain_step2 = opt2.step
    opt2.step = lambda *a, **k: _deep(plain_step2, 5, *a)
    with pytest.raises(RuntimeError, match=r"qoda_hvd.broadcast_optimizer_state\(optimizer"):
        hvd.broadcast_optimizer_state(opt2, 0)
    assert opt2.compression_stats()["exchanges"] == 0  # nothing was started


def test_automatic_layer_types_agree_across_ranks(multi):
    comp = qoda_hvd.Compression.layerwise(types="auto", **LAYERWISE)
    model, opt, _ = train(multi, lambda m: QODA(m.parameters(), lr=0.05), 4, compression=comp)
    typing = opt._exchange.inner.typing
    names = [f"{n}={t}" for n, t in sorted(typing.type_ids.items())]
    everyone = multi.allgather_object(names)
    assert all(e == names for e in everyone)
    assert_identical_across_ranks(multi, model)
