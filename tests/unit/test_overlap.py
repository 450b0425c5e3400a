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
    # sizes that are not multiples of the norm bucket (1024): with a small bucket cap, cuts
    # round up into the next parameter, which then belongs to two buckets
    m = nn.Sequential(nn.Embedding(300, 30), nn.Flatten(), nn.Linear(30 * 4, 50), nn.ReLU(),
                      nn.Linear(50, 70), nn.ReLU(), nn.Linear(70, 9))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def aggregate(rank, comm, overlap, order, steps=4, coding="auto", schedule=(0, 2), cap=None,
              device="cpu"):
    m = model().to(device)
    typing = classify_parameters(m, min_numel=256)
    named = list(m.named_parameters())
    ex = LayerwiseExchange(typing, named, LayerwiseQuantizer(typing, bits=4, schedule=schedule),
                           comm, "allgather", coding, seed=3)
    ex.overlap = overlap
    ex.bucket_cap_mb = cap
    grads, started = [], []
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * rank + step)
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=g).to(device)
        started_before = ex.rounds.started
        if order == "reverse":
            ready = list(reversed(named))
        elif order == "shuffled":
            ready = [named[i] for i in torch.randperm(len(named), generator=g).tolist()]
        else:
            ready = named[:-1]  # the last parameter's gradient never arrives: zeros at sync
            named[-1][1].grad = None
        for _, p in ready:
            ex.grad_ready(p)
        started.append(ex.rounds.started - started_before)  # by the hooks, before ex()
        ex()
        grads.append(torch.cat([p.grad.reshape(-1) for _, p in named]).cpu())
    return grads, comm.stats.collectives, ex.stats.exchanges, len(ex.buckets.buckets), started


@pytest.mark.parametrize("order", ["reverse", "shuffled", "missing"])
@pytest.mark.parametrize("coding", ["auto", "fixed", "rans"])
@pytest.mark.parametrize("cap", [None, 0.0, 0.02])
def test_overlap_gives_the_block_aggregate_bit_for_bit(order, coding, cap):
    block = run_ranks(2, lambda r, c: aggregate(r, c, False, order, coding=coding))
    over = run_ranks(2, lambda r, c: aggregate(r, c, True, order, coding=coding, cap=cap))
    for rank in range(2):
        for a, b in zip(block[rank][0], over[rank][0]):
            assert torch.equal(a, b)
        assert torch.equal(over[rank][0][-1], over[0][0][-1])  # identical across ranks
        # one round per call either way; the overlapped one uses one allgather per bucket on
        # steps without a level update (1 and 3); the block one allgather + one level
        # allreduce on steps 0 and 2, one allgather on 1 and 3
        assert block[rank][2] == over[rank][2] == 4
        buckets = over[rank][3]
        assert buckets == {None: 4, 0.0: 7, 0.02: 6}[cap]  # 3 types + raw, split by the cap
        assert block[rank][1] == 6
        assert over[rank][1] == 4 + 2 * buckets
        # the hooks started buckets on steps 1 and 3 (all of them, or all but the last
        # parameter's), none on level-update steps and none without overlap
        started = over[rank][4]
        assert started[0] == started[2] == 0 and started[1] == started[3] > 0
        assert started[1] == buckets or order == "missing"
        assert block[rank][4] == [0, 0, 0, 0]


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cap", [None, 0.02])
def test_overlap_on_cuda_side_stream_matches_the_cpu_block(cap):
    """Buckets started on the worker's side stream (after the backward stream's event) give the
    aggregate the one-block exchange gives on the CPU, bit for bit."""
    cpu = run_ranks(2, lambda r, c: aggregate(r, c, False, "reverse"))
    gpu = run_ranks(2, lambda r, c: aggregate(r, c, True, "reverse", cap=cap, device="cuda"))
    for rank in range(2):
        for a, b in zip(cpu[rank][0], gpu[rank][0]):
            assert torch.equal(a, b)


def train_cuda(rank, comm, overlap, cap=None, steps=4):
    """A real backward on CUDA (hooks on autograd's device thread), the device held back by a
    sleep kernel first, so the hooks run far ahead of the gradients they announce: a side stream
    that did not wait for them would read stale gradients."""
    import qoda_hvd
    from qoda_hvd.optim import QODA

    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 80), nn.ReLU(), nn.Linear(80, 8))
    with torch.no_grad():  # Linear only: deterministic kernels, so on and off are comparable
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    m = m.cuda()
    opt = qoda_hvd.DistributedOptimizer(
        QODA(m.parameters(), lr=0.05), m.named_parameters(),
        compression=qoda_hvd.Compression.layerwise(bits=4, min_numel=256, schedule=(0,)),
        communicator=comm, overlap=overlap, bucket_cap_mb=cap)
    for step in range(steps):
        x = torch.randn(32, 64, generator=torch.Generator().manual_seed(10 * rank + step)).cuda()
        opt.zero_grad()
        loss = m(x).pow(2).mean()
        torch.cuda._sleep(50_000_000)  # ~ tens of ms of device time before backward's kernels
        loss.backward()
        opt.step()
    return [p.detach().cpu() for p in m.parameters()]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cap", [None, 0.01])
def test_overlap_on_cuda_waits_for_the_gradients_of_a_real_backward(cap):
    on = run_ranks(2, lambda r, c: train_cuda(r, c, True, cap))
    off = run_ranks(2, lambda r, c: train_cuda(r, c, False))
    for rank in range(2):
        for a, b in zip(on[rank], off[rank]):
            assert torch.equal(a, b)


def test_bucket_cap_mb_is_checked_by_the_optimizer():
    import qoda_hvd
    from qoda_hvd.comm import LocalGroup

    m = model()
    for bad, err in [(-1, ValueError), ("25", TypeError), (float("nan"), ValueError)]:
        with pytest.raises(err, match="bucket_cap_mb"):
            qoda_hvd.DistributedOptimizer(
                torch.optim.SGD(m.parameters(), lr=0.1), m.named_parameters(),
                compression=qoda_hvd.Compression.layerwise(bits=4, min_numel=256),
                communicator=LocalGroup(1)[0], overlap=True, bucket_cap_mb=bad)
    opt = qoda_hvd.DistributedOptimizer(
        torch.optim.SGD(m.parameters(), lr=0.1), m.named_parameters(),
        compression=qoda_hvd.Compression.layerwise(bits=4, min_numel=256),
        communicator=LocalGroup(1)[0], overlap=True, bucket_cap_mb=0.01)
    assert opt._exchange.bucket_cap_mb == pytest.approx(0.01)


def probed(rank, comm, steps, sums=None):
    m = model()
    typing = classify_parameters(m, min_numel=256)
    named = list(m.named_parameters())
    ex = LayerwiseExchange(typing, named, LayerwiseQuantizer(typing, bits=4, schedule=(0, 5)),
                           comm, "allgather", "auto", seed=3)
    ex.overlap, ex.overlap_probe = True, True
    modes, grads = [], []
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * rank + step)
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=g)
        modes.append(ex._overlap_now())
        if sums is not None and ex.overlap_choice.calls == 13:  # the last timed call: planted
            ex.overlap_choice._sums = list(sums[rank])            # totals
        for _, p in reversed(named):
            ex.grad_ready(p)
        ex()
        grads.append(torch.cat([p.grad.reshape(-1) for _, p in named]).clone())
    return modes, grads, ex.overlap_state == "on", ex.overlap_decided, ex.overlap_measured, \
        comm.stats.allreduces


def test_overlap_probe_times_both_modes_then_every_rank_keeps_the_same_choice():
    out = run_ranks(2, lambda r, c: probed(r, c, 20))
    block = run_ranks(2, lambda r, c: aggregate(r, c, False, "reverse", steps=20,
                                               schedule=(0, 5)))
    for rank in range(2):
        modes, grads, on, decided, measured, allreduces = out[rank]
        # steps 0 and 5 update levels (one block); of the others, eligible calls 0-1 warm up
        # overlapped, then pairs alternate overlapped / one block; decided after 14 of them
        assert modes[:16] == [False, True, True, True, True, False, False, False, True, True,
                              False, False, True, True, False, False]
        assert decided and set(measured) == {"block_s", "overlapped_s"}
        assert modes[16:] == [on] * 4
        assert out[rank][2:5] == out[0][2:5]  # same decision and figures on every rank
        assert allreduces == 2 + 1  # two level agreements + the decision
        for a, b in zip(grads, block[rank][0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("sums, keep", [
    (([1.0, 2.0], [1.0, 0.1]), False),  # one block faster over all ranks (2.0 < 2.1)
    (([1.0, 0.5], [1.0, 1.2]), True),   # overlapped faster (1.7 < 2.0)
])
def test_overlap_probe_keeps_the_faster_mode_over_all_ranks(sums, keep):
    out = run_ranks(2, lambda r, c: probed(r, c, 17, sums=sums))
    for rank in range(2):
        modes, _, on, decided, measured, _ = out[rank]
        assert decided and on is keep and modes[16] is keep
        assert measured == pytest.approx({"block_s": (sums[0][0] + sums[1][0]) / 12,
                                          "overlapped_s": (sums[0][1] + sums[1][1]) / 12},
                                         abs=0.01)  # + the last timed call itself


def test_a_failing_bucket_start_raises_at_synchronize_and_the_next_round_is_clean(monkeypatch):
    def run(rank, comm):
        m = model()
        typing = classify_parameters(m, min_numel=256)
        named = list(m.named_parameters())
        ex = LayerwiseExchange(typing, named, LayerwiseQuantizer(typing, bits=4, schedule=(0,)),
                               comm, "allgather", "fixed", seed=3)
        ex.overlap = True
        real = ex.codec.quantize
        errors, grads = [], []
        for step in range(4):
            g = torch.Generator().manual_seed(100 * rank + step)
            for _, p in named:
                p.grad = torch.randn(p.shape, generator=g)
            if step == 2:  # every rank fails the same bucket, as a NaN gradient would
                def boom(tid, *a, **k):
                    if tid == 0:
                        raise ValueError("tensor contains NaN or Inf values")
                    return real(tid, *a, **k)
                ex.codec.quantize = boom
            for _, p in reversed(named):
                ex.grad_ready(p)
            try:
                ex()
            except ValueError as e:
                errors.append((step, str(e)))
            ex.codec.quantize = real
            assert not ex.rounds.in_flight and ex.buckets._remaining == [len(b.params)
                                                                  for b in ex.buckets.buckets]
            grads.append(torch.cat([p.grad.reshape(-1) for _, p in named]).clone())
        return errors, grads

    out = run_ranks(2, run)
    for rank in range(2):
        errors, grads = out[rank]
        assert [s for s, _ in errors] == [2] and "NaN" in errors[0][1]
        assert torch.equal(grads[3], out[0][1][3])  # step 3 overlapped again, ranks agree


def test_overlap_state_says_off_where_overlap_cannot_happen():
    from qoda_hvd.comm import LocalGroup

    def state(rank, comm, strategy):
        m = model()
        typing = classify_parameters(m, min_numel=256)
        ex = LayerwiseExchange(typing, list(m.named_parameters()),
                               LayerwiseQuantizer(typing, bits=4), comm, strategy)
        ex.overlap, ex.overlap_probe = True, True
        return ex.overlap_state

    assert run_ranks(2, lambda r, c: state(r, c, "allgather")) == ["probing"] * 2
    assert run_ranks(2, lambda r, c: state(r, c, "scatter_gather")) == ["off"] * 2
    assert state(0, LocalGroup(1)[0], "allgather") == "off"


def test_a_probed_overlap_choice_travels_in_the_state_dict():
    import qoda_hvd
    from qoda_hvd.comm import LocalGroup

    def make():
        m = model()
        return qoda_hvd.DistributedOptimizer(
            torch.optim.SGD(m.parameters(), lr=0.1), m.named_parameters(),
            compression=qoda_hvd.Compression.layerwise(bits=4, min_numel=256, types=m),
            communicator=LocalGroup(1)[0], overlap=True)

    src = make()
    src._exchange.overlap_choice.load_state_dict(
        {"decided": True, "choice": 0, "measured": {"block_s": 1.0, "overlapped_s": 1.2}})
    # the receiving exchange does not probe (as one rebuilt by an elastic re-form before its
    # overlap settings were applied): the decision loads all the same, so no rank probes alone
    dst = make()
    assert not dst._exchange.overlap_probe
    dst.load_state_dict(src.state_dict())
    assert dst._exchange.overlap_decided and dst._exchange.overlap_choice.choice == 0
    assert dst._exchange.overlap_measured == {"block_s": 1.0, "overlapped_s": 1.2}
