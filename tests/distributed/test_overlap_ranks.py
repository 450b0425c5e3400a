"""The overlapped exchange on real ranks: buckets started from the gradient hooks give the
parameters one block gives, bit for bit, on every rank."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import qoda_hvd
from qoda_hvd.optim import QODA

LAYERWISE = dict(bits=4, min_numel=256, schedule=(0, 3))


class OddOrder(nn.Module):
    """Backward reaches its parameters in an unusual order: the head's input branch is used
    last in forward, an unused layer never gets a gradient, a frozen one never asks for it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(64, 16)
        self.side = nn.Linear(16, 64)
        self.body = nn.Linear(16 * 4, 64)
        self.unused = nn.Linear(64, 64)
        self.frozen = nn.Linear(64, 64)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(64, 4)

    def forward(self, idx):
        e = self.emb(idx)
        h = torch.relu(self.body(e.flatten(1))) + self.frozen(torch.relu(self.side(e.mean(1))))
        return self.head(h)


def batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    idx = torch.randint(0, 64, (16, 4), generator=g)
    return idx, (idx[:, 0] % 4)


def train(hvd, overlap, exchange, steps=6, coding="auto", cap=None, communicator=None):
    model = OddOrder()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = qoda_hvd.DistributedOptimizer(
        QODA([p for p in model.parameters() if p.requires_grad], lr=0.05),
        [(n, p) for n, p in model.named_parameters() if p.requires_grad],
        compression=qoda_hvd.Compression.layerwise(coding=coding, **LAYERWISE),
        exchange=exchange, overlap=overlap, bucket_cap_mb=cap, communicator=communicator)
    for step in range(steps):
        x, y = batch(hvd.rank(), step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


#: exchange x codec x bucket cap (MiB; 0.005 cuts the 4096-coordinate layers in pieces, 0 puts
#: every parameter alone, None is the default: one bucket per layer type here). scatter_gather
#: runs as one block whatever overlap says: its cases check that asking for overlap keeps it
#: correct, not that it overlaps.
CASES = [("allgather", "auto", None), ("allgather", "fixed", 0.005), ("allgather", "rans", 0.0),
         ("allgather", "ans", 0.005), ("allgather", "zstd", None), ("scatter_gather", "auto", None),
         ("scatter_gather", "rans", 0.005)]


@pytest.mark.parametrize("exchange, coding, cap", CASES)
def test_overlap_on_and_off_give_identical_parameters(multi, exchange, coding, cap):
    on, opt_on = train(multi, True, exchange, coding=coding, cap=cap)
    off, opt_off = train(multi, False, exchange, coding=coding)
    for a, b in zip(on.parameters(), off.parameters()):
        assert torch.equal(a, b)
    flat = torch.cat([p.detach().reshape(-1) for p in on.parameters()])
    everyone = multi.allgather(flat.unsqueeze(0), name="overlap.identical")
    for r in range(1, multi.size()):
        assert torch.equal(everyone[0], everyone[r])
    st_on, st_off = opt_on.compression_stats(), opt_off.compression_stats()
    assert st_on["exchanges"] == st_off["exchanges"] == st_on["rounds"] == 6
    if exchange == "allgather":  # one allgather per bucket on overlapped steps
        assert st_on["collectives"] > st_off["collectives"]
        ex = opt_on._exchange
        sizes = [b.numel for b in ex.buckets.buckets]
        if cap is None:  # one bucket per layer type (and the raw tensors)
            assert len(sizes) == sum(1 for buf in ex.fused.buffers if buf.numel())
        elif cap == 0:  # every parameter alone (all sizes here are whole norm buckets)
            assert len(sizes) == len([p for p in on.parameters() if p.requires_grad])
        else:  # a bucket closes once it reaches the cap (as DDP's); 4096-coordinate layers
            # are cut in pieces of 1024 (1310 coordinates is the cap)
            assert max(sizes) < 2 * cap * 2 ** 20 / 4 and sizes.count(1024) >= 8


@pytest.mark.parametrize("cap", [None, 0.005])
def test_mpi4py_overlap_point_to_point_gives_the_same_parameters(multi, cap):
    """mpi4py's communicator overlaps with Isend/Irecv matched by the bucket's tag, progressed
    from the hooks: the parameters of Horovod's one-block exchange, bit for bit."""
    if "OMPI_COMM_WORLD_SIZE" not in os.environ:
        pytest.skip("mpi4py needs an MPI launcher (horovodrun --gloo starts no MPI job)")
    from qoda_hvd.comm import MPICommunicator

    comm = MPICommunicator()
    assert comm.asynchronous, "mpi4py asks for MPI_THREAD_MULTIPLE; Open MPI grants it"
    on, opt_on = train(multi, True, "allgather", cap=cap, communicator=comm)
    off, _ = train(multi, False, "allgather")
    for a, b in zip(on.parameters(), off.parameters()):
        assert torch.equal(a, b)
    st = opt_on.compression_stats()
    assert st["overlap"] == "on" and st["rounds"] == 6
    assert comm.stats.allgathers > 6 and not comm._inflight  # a bucket each, all finished
    thread = comm._progress_thread
    assert thread is not None and thread.is_alive()  # sleeping while nothing is in flight
    comm.close()
    assert not thread.is_alive()
    with pytest.raises(ValueError, match="progress_interval must be seconds in"):
        MPICommunicator(progress_interval=0)  # checked before anything collective


class _Reverse(torch.autograd.Function):
    """Gradient reversal: the critic ascends what the generator descends, in ONE backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def train_gan(hvd, overlap, steps=5):
    """A generator and a critic, each with its own DistributedOptimizer, whose gradients come
    from one joint loss: both optimizers' hooks fire in the same backward, so both start
    overlapped buckets at once (the case that collided on collective names)."""
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64))
    critic = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    for m in (gen, critic):
        hvd.broadcast_parameters(m.state_dict(), root_rank=0)

    def make(m):
        return qoda_hvd.DistributedOptimizer(
            torch.optim.SGD(m.parameters(), lr=0.01), m.named_parameters(),
            compression=qoda_hvd.Compression.layerwise(**LAYERWISE), overlap=overlap)

    opt_g, opt_c = make(gen), make(critic)
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * hvd.rank() + step)
        z, real = torch.randn(16, 8, generator=g), torch.randn(16, 64, generator=g)
        opt_g.zero_grad()
        opt_c.zero_grad()
        fake = _Reverse.apply(gen(z))
        (critic(fake).mean() - critic(real).mean()).backward()
        opt_c.step()
        opt_g.step()
    return torch.cat([p.detach().reshape(-1) for m in (gen, critic) for p in m.parameters()])


@pytest.mark.parametrize("overlap", [True, None])
def test_two_optimizers_in_one_backward_overlap_without_name_clashes(multi, overlap):
    got = train_gan(multi, overlap)
    ref = train_gan(multi, False)
    assert torch.equal(got, ref)  # overlapped or probed: the one-block parameters, bit for bit
    everyone = multi.allgather(got.unsqueeze(0), name=f"overlap.gan.{overlap}")
    for r in range(1, multi.size()):
        assert torch.equal(everyone[0], everyone[r])


@pytest.mark.parametrize("backend", ["horovod", "mpi4py"])
def test_a_failed_overlapped_round_leaves_the_next_one_clean(multi, backend):
    """Every rank fails the same bucket's start in round 2 (as a NaN gradient would) after
    other buckets' allgathers started: the round raises on every rank, its started collectives
    are abandoned, and round 3 reuses their names without "started twice" / name clashes."""
    communicator = None
    if backend == "mpi4py":
        if "OMPI_COMM_WORLD_SIZE" not in os.environ:
            pytest.skip("mpi4py needs an MPI launcher (horovodrun --gloo starts no MPI job)")
        from qoda_hvd.comm import MPICommunicator

        communicator = MPICommunicator()
    model = OddOrder()
    multi.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = qoda_hvd.DistributedOptimizer(
        QODA([p for p in model.parameters() if p.requires_grad], lr=0.05),
        [(n, p) for n, p in model.named_parameters() if p.requires_grad],
        compression=qoda_hvd.Compression.layerwise(**LAYERWISE), overlap=True, bucket_cap_mb=0.0,
        communicator=communicator)
    codec = opt._exchange.codec
    real = codec.quantize
    errors = []
    for step in range(5):
        if step == 2:  # (steps 0 and 3 update levels: one block; 1, 2, 4 overlap)
            def boom(tid, *a, **k):
                if tid == 0:
                    raise ValueError("tensor contains NaN or Inf values")
                return real(tid, *a, **k)
            codec.quantize = boom
        x, y = batch(multi.rank(), step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        try:
            opt.step()
        except ValueError as e:
            errors.append((step, str(e)))  # and the optimizer takes the next round as usual
        codec.quantize = real
    assert [s for s, _ in errors] == [2], errors
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = multi.allgather(flat.unsqueeze(0), name=f"overlap.failed.{backend}")
    for r in range(1, multi.size()):
        assert torch.equal(everyone[0], everyone[r])
