"""PowerSGDExchange on in-process fake ranks (threads + LocalGroup).

The real-rank versions (Horovod under mpirun / horovodrun) are in
tests/distributed/test_powersgd.py.
"""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import qoda_hvd
from fake_ranks import run_ranks
from qoda_hvd.comm import LocalGroup
from qoda_hvd.comm.lowrank import PowerSGDExchange

torch.set_num_threads(1)

_INIT_LOCK = threading.Lock()


class Net(nn.Module):
    """Two same-shaped hidden layers (one batched group), a conv, a head, biases."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 16, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean(dim=(2, 3), keepdim=True).flatten(1)
        h = torch.relu(self.fc1(h.repeat(1, 16)))
        h = torch.relu(self.fc2(h))
        return self.head(torch.relu(self.fc3(h)))


def make_model(seed=0):
    with _INIT_LOCK:
        torch.manual_seed(seed)
        return Net()


def batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 4, 4, 4, generator=g), torch.randint(0, 10, (8,), generator=g)


def train(rank, comm, steps, comp, model=None, opt=None, exchange=None, first=0):
    model = model or make_model()
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    exchange = exchange or comp.make_exchange(list(model.named_parameters()), comm, True)
    for step in range(first, first + steps):
        x, y = batch(rank, step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        exchange()
        opt.step()
    return model, opt, exchange


PSGD = dict(rank=2, min_numel=256)


@pytest.mark.parametrize("layerwise", [False, True])
def test_ranks_bit_identical_and_two_collectives_per_round(layerwise):
    comp = qoda_hvd.Compression.powersgd(layerwise=layerwise, every=3, **PSGD)

    def work(r, c):
        model, _, ex = train(r, c, 7, comp)
        return [p.detach().clone() for p in model.parameters()], ex, c.stats.collectives

    out = run_ranks(3, work)
    for params, _, _ in out[1:]:
        for a, b in zip(out[0][0], params):
            assert torch.equal(a, b)
    ex = out[0][1]
    agreements = 3 if layerwise else 0  # steps 0, 3, 6
    assert ex.stats.exchanges == 7
    assert ex.rank_updates == agreements
    assert ex.collectives == 2 * 7 + agreements == out[0][2]
    assert ex.strategy == "powersgd"
    assert all(o[1].ranks == ex.ranks for o in out)
    start = list(make_model().parameters())
    assert any(not torch.equal(a, b) for a, b in zip(out[0][0], start)), "training did not move"


def test_aggregate_is_the_mean_when_gradients_are_exactly_low_rank():
    """Rank-2 gradients at rank 2: PowerSGD is exact, so every rank gets the plain mean."""
    def work(r, c):
        g = torch.Generator().manual_seed(7)  # a shared column space, rank-dependent rows
        u = torch.randn(96, 2, generator=g)
        v = torch.randn(2, 80, generator=torch.Generator().manual_seed(100 + r))
        w = nn.Parameter(torch.zeros(96, 80))
        b = nn.Parameter(torch.zeros(5))
        w.grad, b.grad = u @ v, torch.full((5,), float(r))
        ex = qoda_hvd.Compression.powersgd(rank=2, min_numel=0).make_exchange(
            [("w", w), ("b", b)], c, True)
        ex()
        return w.grad.clone(), b.grad.clone(), u, v

    out = run_ranks(2, work)
    mean = (out[0][2] @ out[0][3] + out[1][2] @ out[1][3]) / 2
    for wg, bg, _, _ in out:
        torch.testing.assert_close(wg, mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(bg, torch.full((5,), 0.5))


def test_zero_gradients_stay_finite_on_fake_ranks():
    comp = qoda_hvd.Compression.powersgd(layerwise=True, **PSGD)

    def work(r, c):
        model = make_model()
        ex = comp.make_exchange(list(model.named_parameters()), c, True)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            ex()
        return [p.grad for p in model.parameters()], ex

    for grads, ex in run_ranks(2, work):
        assert all(torch.isfinite(g).all() and not g.any() for g in grads)
        # An all-zero error table decides nothing: the agreement waits for real gradients.
        assert ex.rank_updates == 0 and ex._deferred


@pytest.mark.parametrize("layerwise", [False, True])
def test_checkpoint_resume_repeats_the_uninterrupted_run(layerwise):
    comp = qoda_hvd.Compression.powersgd(layerwise=layerwise, every=2, **PSGD)

    def straight(r, c):
        model, _, _ = train(r, c, 8, comp)
        return [p.detach().clone() for p in model.parameters()]

    def resumed(r, c):
        model, opt, ex = train(r, c, 5, comp)
        saved = {"model": model.state_dict(), "opt": opt.state_dict(), "ex": ex.extra_state()}
        saved = torch.serialization.pickle.loads(torch.serialization.pickle.dumps(saved))
        model2 = make_model(seed=1)  # different weights: everything must come from the checkpoint
        model2.load_state_dict(saved["model"])
        opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
        opt2.load_state_dict(saved["opt"])
        ex2 = comp.make_exchange(list(model2.named_parameters()), c, True)
        ex2.load_extra_state(saved["ex"])
        assert ex2.ranks == ex.ranks and ex2.step == 5
        train(r, c, 3, comp, model2, opt2, ex2, first=5)
        return [p.detach().clone() for p in model2.parameters()]

    ref = run_ranks(2, straight)
    got = run_ranks(2, resumed)
    for a, b in zip(ref[0], got[0]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("metric", ["absolute", "relative"])
def test_layerwise_ranks_use_less_than_uniform_within_the_error_budget(metric):
    comp = qoda_hvd.Compression.powersgd(rank=4, layerwise=True, granularity="layer",
                                         min_numel=256, error_metric=metric)

    def work(r, c):
        _, _, ex = train(r, c, 1, comp)
        return ex

    out = run_ranks(2, work)
    ex = out[0]
    assert out[1].ranks == ex.ranks
    choice = ex.last_choice
    assert choice["error"] <= choice["budget"] * (1 + 1e-12)
    assert choice["size"] <= choice["uniform_size"]
    assert set(ex.ranks) == {"conv.weight", "fc1.weight", "fc2.weight", "fc3.weight",
                            "head.weight"}
    assert all(2 <= r <= 8 for r in ex.ranks.values())


def test_bytes_per_rank_per_step_do_not_depend_on_k():
    comp = qoda_hvd.Compression.powersgd(**PSGD)
    sent = {}
    for k in (2, 3, 4):
        def work(r, c):
            _, _, ex = train(r, c, 2, comp)
            return ex.stats.encoded_bytes / ex.stats.exchanges

        sent[k] = run_ranks(k, work)
    assert len({v for per_rank in sent.values() for v in per_rank}) == 1


def test_start_iter_sends_float32_first_then_compresses():
    comp = qoda_hvd.Compression.powersgd(start_iter=2, **PSGD)

    def work(r, c):
        _, _, ex = train(r, c, 4, comp)
        return ex

    ex = run_ranks(2, work)[0]
    assert ex.stats.exchanges == 4 and ex.collectives == 1 + 1 + 2 + 2
    assert ex.stats.encoded_bytes < 4 * 4 * ex.core.numel  # 2 float32 rounds + 2 compressed


def test_auto_types_agree_and_checkpoint():
    comp = qoda_hvd.Compression.powersgd(types="auto", layerwise=True, **PSGD)

    def work(r, c):
        _, _, ex = train(r, c, 2, comp)
        return ex.ranks, ex.collectives, ex.extra_state()

    out = run_ranks(2, work)
    assert out[0][0] == out[1][0]
    assert out[0][1] == 1 + 2 * 2 + 1  # typing, two rounds, one agreement
    assert out[0][2]["typing"] is not None and out[0][2]["inner"]["step"] == 2


def test_load_extra_state_rejects_foreign_state():
    model = make_model()
    ex = qoda_hvd.Compression.powersgd(**PSGD).make_exchange(list(model.named_parameters()),
                                                             LocalGroup(1)[0], True)
    with pytest.raises(ValueError, match="PowerSGD state must be a dict of version 1"):
        ex.load_extra_state({"version": 99})
    with pytest.raises(TypeError, match="communicator must be a qoda_hvd.comm.Communicator"):
        qoda_hvd.Compression.powersgd().make_exchange(list(model.named_parameters()), None, True)
    assert isinstance(ex, PowerSGDExchange)


# ------------------------------------------------------------------ through DistributedOptimizer
def _seam() -> bool:
    import inspect

    import qoda_hvd.optim.distributed as dist

    return "make_exchange" in inspect.getsource(dist)


needs_seam = pytest.mark.skipif(not _seam(), reason="DistributedOptimizer has no make_exchange seam")


def train_qoda(rank, comm, steps, comp, first=0, state=None):
    model = make_model()
    opt = qoda_hvd.DistributedOptimizer(qoda_hvd.QODA(model.parameters(), lr=0.05),
                                        model.named_parameters(), compression=comp,
                                        communicator=comm)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    for step in range(first, first + steps):
        x, y = batch(rank, step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


@needs_seam
def test_distributed_optimizer_qoda_one_round_per_step_bit_identical():
    comp = qoda_hvd.Compression.powersgd(layerwise=True, every=4, **PSGD)

    def work(r, c):
        model, opt = train_qoda(r, c, 5, comp)
        return [p.detach().clone() for p in model.parameters()], opt.compression_stats(), c.stats

    out = run_ranks(2, work)
    for a, b in zip(out[0][0], out[1][0]):
        assert torch.equal(a, b)
    stats, comm = out[0][1], out[0][2]
    assert stats["exchanges"] == 5 and stats["strategy"] == "powersgd"
    assert comm.collectives == 2 * 5 + 2  # two allreduces per round, agreements at steps 0 and 4
    assert stats["ratio"] > 4


@needs_seam
def test_distributed_optimizer_state_dict_resume_repeats_the_run():
    comp = qoda_hvd.Compression.powersgd(layerwise=True, every=2, **PSGD)

    def straight(r, c):
        return [p.detach().clone() for p in train_qoda(r, c, 7, comp)[0].parameters()]

    def resumed(r, c):
        model, opt = train_qoda(r, c, 4, comp)
        state = {"model": model.state_dict(), "opt": opt.state_dict()}
        assert "exchange" in state["opt"]["qoda_hvd"]
        state = torch.serialization.pickle.loads(torch.serialization.pickle.dumps(state))
        model2, _ = train_qoda(r, c, 3, comp, first=4, state=state)
        return [p.detach().clone() for p in model2.parameters()]

    ref, got = run_ranks(2, straight), run_ranks(2, resumed)
    for a, b in zip(ref[0], got[0]):
        assert torch.equal(a, b)


def test_a_foreign_state_sets_q_and_ranks_but_keeps_own_errors():
    comp = qoda_hvd.Compression.powersgd(layerwise=True, **PSGD)

    def work(r, c):
        _, _, ex = train(r, c, 3, comp)
        return ex.extra_state()

    s0, s1 = run_ranks(2, work)
    assert s0["rank"] == 0 and s1["rank"] == 1
    assert any(not torch.equal(s0["errors"][k], s1["errors"][k]) for k in s0["errors"])
    model = make_model()
    ex = comp.make_exchange(list(model.named_parameters()), LocalGroup(2)[1], True)
    ex.load_extra_state(s1)               # its own: errors restored
    ex.load_extra_state(s0)               # the root's: Q and ranks from it, errors kept
    got = ex.extra_state()
    assert got["ranks"] == s0["ranks"] and got["step"] == 3
    assert all(torch.equal(got["q"][k], s0["q"][k]) for k in s0["q"])
    assert all(torch.equal(got["errors"][k], s1["errors"][k]) for k in s1["errors"])


def test_the_same_worker_keeps_its_errors_under_a_new_rank():
    """An elastic re-form rebuilds the exchange in the same process with a new rank: the state
    it saved is still its own."""
    comp = qoda_hvd.Compression.powersgd(**PSGD)
    model = make_model()
    group = LocalGroup(1)
    ex = comp.make_exchange(list(model.named_parameters()), group[0], True)
    for step in range(2):
        x, y = batch(0, step)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        ex()
    saved = ex.extra_state()
    assert any(e.any() for e in saved["errors"].values())
    saved["rank"] = 5  # as if this worker had been rank 5 before the ring re-formed
    again = comp.make_exchange(list(model.named_parameters()), group[0], True)
    again.load_extra_state(saved)
    got = again.extra_state()
    assert all(torch.equal(got["errors"][k], saved["errors"][k]) for k in saved["errors"])


# ------------------------------------------------------------------ the DP's measurement window
class Windowed:
    """``Compression.powersgd(**kw)`` whose exchange measures the DP's errors on ``window``."""

    def __init__(self, window, **kw):
        self.config = qoda_hvd.Compression.powersgd(**kw).config
        self.window = window

    def make_exchange(self, named, comm, average=True):
        from qoda_hvd.comm.lowrank import make_powersgd_exchange

        return make_powersgd_exchange(self.config, named, comm, average, error_window=self.window)


@pytest.mark.parametrize("window", ["accumulated", "sum"])
def test_error_windows_agree_once_per_decision_bit_identical(window):
    comp = Windowed(window, layerwise=True, granularity="layer", every=3, **PSGD)

    def work(r, c):
        model, _, ex = train(r, c, 7, comp)
        return [p.detach().clone() for p in model.parameters()], ex

    out = run_ranks(3, work)
    for params, ex in out[1:]:
        assert ex.ranks == out[0][1].ranks
        for a, b in zip(out[0][0], params):
            assert torch.equal(a, b)
    ex = out[0][1]
    assert ex.error_window == window and ex.rank_updates == 3  # steps 0, 3, 6
    assert ex.collectives == 2 * 7 + 3  # the same collectives as the one-step window


def test_accumulated_window_holds_the_inputs_summed_since_the_last_decision():
    comp = Windowed("accumulated", layerwise=True, granularity="layer", every=3, **PSGD)
    model = make_model()
    ex = comp.make_exchange(list(model.named_parameters()), LocalGroup(1)[0], True)
    names = list(ex._window_views)
    expected = {n: torch.zeros_like(ex._window_views[n]) for n in names}
    for step in range(3):  # decision at step 0 (window reset), then steps 1 and 2 summed
        x, y = batch(0, step)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        errors = ex.core.matrix_state()["errors"]
        params = dict(model.named_parameters())
        inputs = {n: params[n].grad + (errors[n].reshape(params[n].shape) if n in errors else 0.0)
                  for n in names}
        ex()
        if step > 0:
            for n in names:
                expected[n] += inputs[n]
    assert names and ex.rank_updates == 1
    for n in names:
        torch.testing.assert_close(ex._window_views[n], expected[n], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window", ["accumulated", "sum"])
def test_checkpoint_resume_with_a_window_repeats_the_uninterrupted_run(window):
    comp = Windowed(window, layerwise=True, every=3, **PSGD)

    def straight(r, c):
        model, _, _ = train(r, c, 8, comp)
        return [p.detach().clone() for p in model.parameters()]

    def resumed(r, c):
        model, opt, ex = train(r, c, 5, comp)  # the window holds step 4 (decision at 3)
        saved = {"model": model.state_dict(), "opt": opt.state_dict(), "ex": ex.extra_state()}
        assert saved["ex"]["window"]["kind"] == window
        saved = torch.serialization.pickle.loads(torch.serialization.pickle.dumps(saved))
        model2 = make_model(seed=1)
        model2.load_state_dict(saved["model"])
        opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
        opt2.load_state_dict(saved["opt"])
        ex2 = comp.make_exchange(list(model2.named_parameters()), c, True)
        ex2.load_extra_state(saved["ex"])
        train(r, c, 3, comp, model2, opt2, ex2, first=5)  # decision at 6 reads the window
        return [p.detach().clone() for p in model2.parameters()], ex2.ranks

    ref = run_ranks(2, straight)
    got = run_ranks(2, resumed)
    for a, b in zip(ref[0], got[0][0]):
        assert torch.equal(a, b)


def test_a_bad_error_window_is_named():
    from qoda_hvd.comm.lowrank import make_powersgd_exchange

    model = make_model()
    with pytest.raises(ValueError, match="error_window must be one of step, accumulated, sum, got 'week'"):
        make_powersgd_exchange(qoda_hvd.Compression.powersgd(**PSGD).config,
                               list(model.named_parameters()), LocalGroup(1)[0], True,
                               error_window="week")


@pytest.mark.parametrize("layerwise", [False, True])
def test_two_nodes_of_two_reduce_p_and_q_in_two_levels(layerwise):
    """4 fake ranks on 2 fake nodes: P and Q are summed inside each node in float32, and only
    each local rank's 1/2 shard crosses between nodes; every rank ends bit-identical, with the
    flat exchange's training to float32 rounding."""
    comp = qoda_hvd.Compression.powersgd(layerwise=layerwise, every=3, **PSGD)

    def work(r, c):
        model, _, ex = train(r, c, 4, comp)
        return [p.detach().clone() for p in model.parameters()], ex.topology_stats(), \
            c.stats.bytes_sent

    two = run_ranks(4, work, ranks_per_node=2)
    flat = run_ranks(4, work)
    for params, _, _ in two[1:]:
        for a, b in zip(two[0][0], params):
            assert torch.equal(a, b)
    for a, b in zip(two[0][0], flat[0][0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    stats = two[0][1]
    assert "inter_node_bytes_sent" not in flat[0][1]  # one node: one allreduce, as before
    if not layerwise:  # (layer-wise ranks may differ by a rounding between the two runs)
        # a flat allreduce sends 2 (K-1)/K = 1.5 of the floats per rank; two levels send
        # 2 (M-1)/M of a 1/L shard = 0.5 of them between nodes: a third
        assert stats["inter_node_bytes_sent"] / flat[0][2] == pytest.approx(1 / 3, rel=0.02)
