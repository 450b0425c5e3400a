"""qoda_hvd.DistributedOptimizer over in-process fake ranks (threads + LocalGroup).

The real-Horovod versions of these checks live in tests/distributed/test_distributed_optimizer.py.
"""
from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from torch import nn

import qoda_hvd
from qoda_hvd.coding import decode
from qoda_hvd.comm import LocalGroup
from fake_ranks import run_ranks
from qoda_hvd.optim import QODA, ExtraGradient, optimistic

torch.set_num_threads(1)


_INIT_LOCK = threading.Lock()


def make_model(seed=0):
    """The same initial model on every fake rank (the global RNG is shared by the threads)."""
    with _INIT_LOCK:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                             nn.Linear(64, 4))


def batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)


def train(rank, comm, steps=6, make_opt=lambda m: QODA(m.parameters(), lr=0.05), **kwargs):
    model = make_model()
    opt = qoda_hvd.DistributedOptimizer(make_opt(model), model.named_parameters(),
                                        communicator=comm, **kwargs)
    for step in range(steps):
        x, y = batch(rank, step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


LAYERWISE = dict(bits=4, min_numel=256)


@pytest.mark.parametrize("exchange", ["allgather", "scatter_gather"])
@pytest.mark.parametrize("coding", ["ans", "elias", "fixed", "zstd", "auto"])
def test_parameters_bit_identical_across_ranks(exchange, coding):
    comp = qoda_hvd.Compression.layerwise(coding=coding, **LAYERWISE)
    out = run_ranks(3, lambda r, c: train(r, c, compression=comp, exchange=exchange))
    ref = [p.detach() for p in out[0][0].parameters()]
    for model, _ in out[1:]:
        for a, b in zip(ref, model.parameters()):
            assert torch.equal(a, b)
    start = [p.detach() for p in make_model().parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(ref, start)), "training did not move"


def test_one_exchange_per_qoda_step_two_per_extragradient_iteration():
    comp = qoda_hvd.Compression.layerwise(levels="uniform", **LAYERWISE)

    def qoda(r, c):
        _, opt = train(r, c, steps=5, compression=comp, exchange="allgather")
        return opt.compression_stats()["exchanges"], c.stats.collectives

    assert run_ranks(2, qoda) == [(5, 5), (5, 5)]  # (the settings' agreement is set-up)

    def extragradient(r, c):
        model = make_model()
        opt = qoda_hvd.DistributedOptimizer(ExtraGradient(model.parameters(), lr=0.05),
                                            model.named_parameters(), compression=comp,
                                            communicator=c, exchange="allgather")
        for step in range(4):
            x, y = batch(r, step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.extrapolation()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return opt.compression_stats()["exchanges"], c.stats.collectives

    assert run_ranks(2, extragradient) == [(8, 8), (8, 8)]


def test_scatter_gather_is_two_collectives_per_exchange():
    comp = qoda_hvd.Compression.layerwise(levels="uniform", **LAYERWISE)
    stats = run_ranks(3, lambda r, c: (train(r, c, steps=3, compression=comp,
                                             exchange="scatter_gather")[1].compression_stats(),
                                       c.stats.as_dict()))
    for s, cs in stats:
        assert s["exchanges"] == 3 and cs["alltoalls"] == 3 and cs["allgathers"] == 3


class _Recording:
    """Wraps a communicator's allgather to keep the payloads it saw."""

    def __init__(self, comm):
        self.payloads = []
        inner = comm._allgather

        def allgather(payload):
            out = inner(payload)
            self.payloads.append(out)
            return out

        comm._allgather = allgather


def test_aggregate_is_mean_of_decoded_payloads():
    comp = qoda_hvd.Compression.layerwise(levels="uniform", coding="ans", **LAYERWISE)

    def fn(r, c):
        rec = _Recording(c)
        model = make_model()
        opt = qoda_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                            model.named_parameters(), compression=comp,
                                            communicator=c, exchange="allgather")
        x, y = batch(r, 0)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.synchronize()
        # the last allgather: the payloads (the first is the set-up agreement of settings)
        return {n: p.grad.clone() for n, p in model.named_parameters()}, rec.payloads[-1], opt

    out = run_ranks(2, fn)
    grads, payloads, opt = out[0]
    ex = opt._exchange
    # Independently: decode each payload, dequantize with its own levels, average.
    decoded = [decode(p) for p in payloads]
    means = []
    for tid in range(ex.num_types):
        vals = []
        for d in decoded:
            seg = d.segments[tid]
            lv = torch.from_numpy(d.levels[seg.type_id])
            norms = torch.from_numpy(seg.norms).repeat_interleave(seg.bucket_size)[:seg.numel]
            sym = torch.from_numpy(seg.symbols).long()
            vals.append(norms * torch.sign(sym.float()) * lv[sym.abs()])
        means.append(sum(vals) / 2)
    raw_mean = sum(torch.from_numpy(d.raw[0].values) for d in decoded) / 2
    for tid, params in enumerate(ex.fused.groups[:-1]):
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        torch.testing.assert_close(flat, means[tid], rtol=1e-6, atol=1e-7)
    flat_raw = torch.cat([p.grad.reshape(-1) for p in ex.fused.groups[-1]])
    torch.testing.assert_close(flat_raw, raw_mean, rtol=0, atol=0)
    assert grads.keys() == out[1][0].keys()


@pytest.mark.parametrize("exchange", ["allgather", "scatter_gather"])
def test_exchange_is_unbiased(exchange):
    """E[aggregate] = mean of the ranks' gradients.

    Under unbiasedness E||mean_of_draws - target||^2 = sum_i Var_i / reps; the ratio of the two
    (variances estimated from the draws) concentrates near 1 over 256 coordinates, while a
    rounding bias of even 1% of the values would push it far above 2.
    """
    comp = qoda_hvd.Compression.layerwise(bits=2, levels="uniform", coding="fixed",
                                          bucket_size=64, min_numel=16)
    size, reps = 3, 300
    grads = [torch.randn(8, 32, generator=torch.Generator().manual_seed(r)) for r in range(size)]

    def fn(r, c):
        w = nn.Parameter(torch.zeros(8, 32))
        opt = qoda_hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.0), [("w", w)],
                                            compression=comp, communicator=c, exchange=exchange)
        draws = []
        for _ in range(reps):
            w.grad = grads[r].clone()
            opt.synchronize()
            draws.append(w.grad.clone())
            opt._synchronized = False
        return torch.stack(draws).double()

    draws = run_ranks(size, fn)[0]
    target = (sum(grads) / size).double()
    sq_bias = (draws.mean(0) - target).pow(2).sum()
    expected = draws.var(0).sum() / reps
    assert expected > 0, "no quantization noise at all: the test would not see a bias"
    ratio = (sq_bias / expected).item()
    assert ratio < 2.0, f"squared error of the mean is {ratio:.2f}x what unbiasedness allows"


def test_matches_uncompressed_average_with_compression_none():
    def fn(r, c):
        model = make_model()
        opt = qoda_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                            model.named_parameters(), communicator=c)
        x, y = batch(r, 0)
        nn.functional.cross_entropy(model(x), y).backward()
        local = [p.grad.clone() for p in model.parameters()]
        opt.synchronize()
        return local, [p.grad.clone() for p in model.parameters()]

    out = run_ranks(2, fn)
    for i, avg in enumerate(out[0][1]):
        torch.testing.assert_close(avg, (out[0][0][i] + out[1][0][i]) / 2)


def test_fp16_through_the_wrapper_sends_half_the_bytes_of_none():
    def fn(r, c, compression):
        model = make_model()
        opt = qoda_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                            model.named_parameters(), compression=compression,
                                            communicator=c)
        x, y = batch(r, 0)
        nn.functional.cross_entropy(model(x), y).backward()
        local = [p.grad.clone() for p in model.parameters()]
        opt.synchronize()
        return c.stats.bytes_sent, local, [p.grad.clone() for p in model.parameters()]

    full = run_ranks(2, lambda r, c: fn(r, c, qoda_hvd.Compression.none))
    half = run_ranks(2, lambda r, c: fn(r, c, qoda_hvd.Compression.fp16))
    assert half[0][0] * 2 == full[0][0] > 0
    for i, avg in enumerate(half[0][2]):
        assert avg.dtype == torch.float32
        expected = ((half[0][1][i].half() + half[1][1][i].half()) / 2).float()
        torch.testing.assert_close(avg, expected, rtol=1e-3, atol=1e-4)


def test_keeps_the_step_size_rule_of_qoda():
    opt = qoda_hvd.DistributedOptimizer(QODA(make_model().parameters(), step_size="constant"),
                                        communicator=LocalGroup(1)[0])
    assert type(opt.step_size_policy).__name__ == "ConstantStepSize"


def test_wraps_optimistic_adam_and_keeps_class():
    def fn(r, c):
        model, opt = train(r, c, steps=3,
                           make_opt=lambda m: optimistic(torch.optim.Adam(m.parameters(), lr=1e-3)),
                           compression=qoda_hvd.Compression.layerwise(**LAYERWISE))
        return opt

    for opt in run_ranks(2, fn):
        assert isinstance(opt, torch.optim.Adam) and isinstance(opt, qoda_hvd.Optimistic)


def test_compression_stats():
    comp = qoda_hvd.Compression.layerwise(coding="ans", **dict(LAYERWISE, bits=3))
    (stats, comm_stats), _ = run_ranks(2, lambda r, c: (train(r, c, steps=4, compression=comp)[1]
                                                          .compression_stats(), c.stats.as_dict()))
    assert stats["exchanges"] == 4
    assert 1.0 < stats["bits_per_coordinate"] < 8.0
    assert stats["ratio"] == pytest.approx(32.0 / stats["bits_per_coordinate"])
    assert stats["bytes_sent"] == comm_stats["bytes_sent"] > 0
    for k in ("time_quantize_s", "time_encode_s", "time_exchange_s", "time_decode_s"):
        assert stats[k] >= 0
    assert set(stats["types"]) == {"feedforward", "output"}


@pytest.mark.parametrize("exchange", ["allgather", "scatter_gather"])
def test_checkpoint_resume_reproduces_the_uninterrupted_run_bit_for_bit(exchange):
    comp = qoda_hvd.Compression.layerwise(**dict(LAYERWISE, schedule=(0, 2)))

    def steps(model, opt, rank, start, stop):
        for step in range(start, stop):
            x, y = batch(rank, step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    def fn(r, c):
        model, opt = train(r, c, steps=3, compression=comp, exchange=exchange)
        saved_model = {k: v.clone() for k, v in model.state_dict().items()}
        saved_opt = copy.deepcopy(opt.state_dict())
        steps(model, opt, r, 3, 6)
        model2 = make_model(seed=1)
        model2.load_state_dict(saved_model)
        opt2 = qoda_hvd.DistributedOptimizer(QODA(model2.parameters(), lr=0.05),
                                             model2.named_parameters(), compression=comp,
                                             communicator=c, exchange=exchange)
        opt2.load_state_dict(saved_opt)
        steps(model2, opt2, r, 3, 6)
        return model, model2, saved_opt

    for model, model2, saved in run_ranks(2, fn):
        assert saved["qoda_hvd"]["step"] == 3
        for a, b in zip(model.parameters(), model2.parameters()):
            assert torch.equal(a, b)


class TestMisuse:
    def test_zero_grad_between_backward_and_step(self):
        model = make_model()
        opt = qoda_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                            model.named_parameters(), communicator=LocalGroup(1)[0])
        model(torch.randn(2, 16)).sum().backward()
        with pytest.raises(RuntimeError, match="zero_grad\\(\\) was called after loss.backward"):
            opt.zero_grad()

    def test_too_many_backward_passes(self):
        model = make_model()
        opt = qoda_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                            model.named_parameters(), communicator=LocalGroup(1)[0])
        model(torch.randn(2, 16)).sum().backward()
        with pytest.raises(RuntimeError, match="more than backward_passes_per_step times"):
            model(torch.randn(2, 16)).sum().backward()

    def test_accumulates_with_backward_passes_per_step(self):
        model = make_model()
        opt = qoda_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                            model.named_parameters(), backward_passes_per_step=2,
                                            communicator=LocalGroup(1)[0])
        for _ in range(2):
            model(torch.randn(2, 16)).sum().backward()
        opt.step()
        assert opt.compression_stats()["exchanges"] == 1

    def test_step_after_synchronize_warns(self):
        model = make_model()
        opt = qoda_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                            model.named_parameters(), communicator=LocalGroup(1)[0])
        model(torch.randn(2, 16)).sum().backward()
        opt.synchronize()
        with pytest.warns(UserWarning, match="skip_synchronize"):
            opt.step()
        model(torch.randn(2, 16)).sum().backward()
        opt.synchronize()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with opt.skip_synchronize():
                opt.step()
        assert opt.compression_stats()["exchanges"] == 3

    @pytest.mark.parametrize("kwargs, error, match", [
        ({"named_parameters": [1, 2]}, ValueError, r"named_parameters should be a sequence of tuples"),
        ({"named_parameters": "dup"}, ValueError, r"must be unique. Found duplicates: a"),
        ({"named_parameters": "partial"}, ValueError, r"one or more model parameters were not named"),
        ({"backward_passes_per_step": 0}, ValueError, r"backward_passes_per_step must be an int >= 1, got 0"),
        ({"exchange": "ring"}, ValueError, r"exchange must be one of auto, allgather, scatter_gather, hierarchical, got 'ring'"),
        ({"op": "max"}, ValueError, r"op must be hvd.Average or hvd.Sum"),
        ({"compression": "fp8"}, TypeError, r"compression must be qoda_hvd.Compression.none"),
        ({"communicator": object()}, TypeError, r"communicator must be a qoda_hvd.comm.Communicator"),
    ])
    def test_bad_arguments(self, kwargs, error, match):
        model = make_model()
        params = list(model.named_parameters())
        if kwargs.get("named_parameters") == "dup":
            kwargs["named_parameters"] = [("a", p) for _, p in params]
        elif kwargs.get("named_parameters") == "partial":
            kwargs["named_parameters"] = params[:2]
        kwargs.setdefault("communicator", LocalGroup(1)[0])
        with pytest.raises(error, match=match):
            qoda_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)

    def test_not_an_optimizer(self):
        with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got list"):
            qoda_hvd.DistributedOptimizer([])


class TestAutomaticTypes:
    """``types="auto"``: the layer types are found from the first step's gradients."""

    comp = qoda_hvd.Compression.layerwise(types="auto", **LAYERWISE)

    def test_ranks_agree_on_the_typing_and_stay_identical(self):
        out = run_ranks(3, lambda r, c: train(r, c, compression=self.comp))
        typings = [opt._exchange.inner.typing for _, opt in out]
        assert all(t == typings[0] for t in typings)
        assert 1 <= typings[0].num_types <= 3  # three compressible weights
        assert set(typings[0].type_ids) == {"0.weight", "2.weight", "4.weight"}
        assert typings[0].uncompressed == {"0.bias", "2.bias", "4.bias"}
        for a, b in zip(out[0][0].parameters(), out[2][0].parameters()):
            assert torch.equal(a, b)
        assert set(out[0][1].compression_stats()["types"]) == set(typings[0].type_names)

    def test_one_extra_collective_on_the_first_step_only(self):
        def fn(r, c):
            _, opt = train(r, c, steps=4, compression=qoda_hvd.Compression.layerwise(
                types="auto", levels="uniform", **LAYERWISE), exchange="allgather")
            return c.stats.allreduces, c.stats.allgathers, c.stats.setup_collectives

        # the typing's histograms, then one allgather per step; the settings' agreement is
        # set-up, counted apart
        assert run_ranks(2, fn) == [(1, 4, 1), (1, 4, 1)]

    def test_resume_keeps_the_typing(self):
        def fn(r, c):
            model, opt = train(r, c, steps=2, compression=self.comp)
            saved = copy.deepcopy(opt.state_dict())
            model2 = make_model()
            opt2 = qoda_hvd.DistributedOptimizer(QODA(model2.parameters(), lr=0.05),
                                                 model2.named_parameters(), compression=self.comp,
                                                 communicator=c)
            opt2.load_state_dict(saved)
            return opt._exchange.inner.typing, opt2._exchange.inner.typing, opt2._exchange.step

        for t1, t2, step in run_ranks(2, fn):
            assert t1 == t2 and step == 2

    def test_bad_types_string(self):
        with pytest.raises(ValueError, match=r"types must be None, 'auto', .* got 'manual'"):
            qoda_hvd.Compression.layerwise(types="manual")


class TestFallback:
    """``fallback=True``: exchanges 1-3 timed quantized, 5-7 as float32; one allreduce of every
    rank's sums decides for all. Each test makes one path slower in the probe's clock (planted
    times, not sleeps: a busy machine cannot flip the choice), so the choice is known."""

    @staticmethod
    def slow(monkeypatch, path, ranks=(0, 1), seconds=0.05):
        from qoda_hvd.comm.decision import AgreedChoice

        slowed = {"quantized": 0, "fp32": 1}[path]
        original = AgreedChoice.record

        def record(self, _measured, comm):
            option = self.schedule[min(self.calls, len(self.schedule) - 1)][0]
            planted = 0.01 + (seconds if option == slowed and comm.rank in ranks else 0.0)
            return original(self, planted, comm)

        monkeypatch.setattr(AgreedChoice, "record", record)

    @staticmethod
    def build(comm, fallback=True):
        model = make_model()
        comp = qoda_hvd.Compression.layerwise(fallback=fallback, **LAYERWISE)
        return model, qoda_hvd.DistributedOptimizer(QODA(model.parameters(), lr=0.05),
                                                    model.named_parameters(), compression=comp,
                                                    communicator=comm)

    @staticmethod
    def run(steps=10, state=None):
        def fn(r, c):
            model, opt = TestFallback.build(c)
            if state is not None:
                opt.load_state_dict(state)
            calls = []
            for step in range(steps):
                x, y = batch(r, step)
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                before = (c.stats.allgathers, c.stats.allreduces)
                local = [p.grad.clone() for p in model.parameters()]
                opt.synchronize()
                calls.append(("allgather" if c.stats.allgathers > before[0] else "allreduce",
                              c.stats.allreduces - before[1], opt.compression_stats()["sends"]))
                with opt.skip_synchronize():
                    opt.step()
            return model, opt, local, [p.grad.clone() for p in model.parameters()], calls

        return run_ranks(2, fn)

    # call 0: quantized + level agreement (1 allreduce); 1-3 quantized; 4-7 float32 (1 allreduce
    # each), 7 also the decision's allreduce; then the chosen path.
    PROBE = [("allgather", 1, "quantized")] + [("allgather", 0, "quantized")] * 3 + \
        [("allreduce", 1, "quantized")] * 3

    def test_keeps_float32_when_quantizing_is_slower(self, monkeypatch):
        self.slow(monkeypatch, "quantized")
        out = self.run()
        for model, opt, _, _, calls in out:
            assert calls == self.PROBE + [("allreduce", 2, "fp32")] + [("allreduce", 1, "fp32")] * 2
            measured = opt._exchange.fallback_measured
            assert measured["fp32_s"] < measured["quantized_s"]
        for a, b in zip(out[0][0].parameters(), out[1][0].parameters()):
            assert torch.equal(a, b)
        # The last aggregate is the exact mean of the float32 gradients: nothing quantized.
        for i, avg in enumerate(out[0][3]):
            torch.testing.assert_close(avg, (out[0][2][i] + out[1][2][i]) / 2)

    def test_keeps_quantizing_when_float32_is_slower(self, monkeypatch):
        self.slow(monkeypatch, "fp32")
        out = self.run()
        for _, opt, _, _, calls in out:
            assert calls == self.PROBE + [("allreduce", 2, "quantized")] + \
                [("allgather", 0, "quantized")] * 2
            assert opt._exchange._plain is None  # the float32 buffer is released
        for a, b in zip(out[0][0].parameters(), out[1][0].parameters()):
            assert torch.equal(a, b)

    @pytest.mark.parametrize("sums, chosen", [
        ([[1.0, 0.5], [1.0, 2.0]], "quantized"),  # rank 0 alone would send float32
        ([[1.0, 0.1], [1.0, 1.5]], "fp32"),       # rank 1 alone would keep quantizing
    ])
    def test_ranks_decide_together_from_summed_times(self, sums, chosen):
        def fn(r, c):
            ex = self.build(c)[1]._exchange
            probe = ex.fallback_choice
            probe.calls = len(probe.schedule) - 1  # the last timed call, with planted totals:
            probe._sums = list(sums[r])  # [quantized seconds, float32 seconds] of this rank
            assert probe.record(0.0, c)  # decides
            return ex.sends, ex.fallback_measured

        out = run_ranks(2, fn)
        assert [o[0] for o in out] == [chosen, chosen]
        assert out[0][1] == out[1][1] == {"quantized_s": 2.0 / 6, "fp32_s": sum(s[1] for s in sums) / 6}

    def test_resume_keeps_the_choice_without_probing_again(self, monkeypatch):
        self.slow(monkeypatch, "quantized")
        saved = copy.deepcopy(self.run(steps=9)[0][1].state_dict())
        assert saved["qoda_hvd"]["sends"] == "fp32" and saved["qoda_hvd"]["fallback_decided"]
        for _, _, _, _, calls in self.run(steps=2, state=saved):
            assert calls == [("allreduce", 1, "fp32")] * 2
        # Loaded into a run without fallback=True, the checkpoint's choice does not apply.
        def fn(r, c):
            opt = self.build(c, fallback=False)[1]
            opt.load_state_dict(saved)
            return opt.compression_stats()["sends"]

        assert run_ranks(2, fn) == ["quantized", "quantized"]

    def test_fallback_must_be_a_bool(self):
        with pytest.raises(TypeError, match="fallback must be a bool, got str"):
            qoda_hvd.Compression.layerwise(fallback="yes")


class TestHorovodKeywords:
    """Horovod 0.28's keywords with its meaning (real-rank parity: tests/distributed/test_horovod_parity.py)."""

    @staticmethod
    def build(comm=None, make_opt=lambda m: torch.optim.SGD(m.parameters(), lr=0.1), **kwargs):
        model = make_model()
        return model, qoda_hvd.DistributedOptimizer(make_opt(model), model.named_parameters(),
                                                    communicator=comm or LocalGroup(1)[0], **kwargs)

    @pytest.mark.parametrize("kwargs, error, match", [
        (dict(gradient_predivide_factor=2.0, op="sum"), ValueError,
         "gradient_predivide_factor not supported with op != Average"),
        (dict(gradient_predivide_factor=0.0), ValueError, "gradient_predivide_factor must be a finite number > 0, got 0.0"),
        (dict(gradient_predivide_factor=float("nan")), ValueError, "gradient_predivide_factor must be a finite"),
        (dict(groups=0), ValueError, "groups should be a non-negative integer or a list of list of torch.Tensor"),
        (dict(groups=[[1]]), ValueError, r"groups must consist of torch.Tensor\."),
        (dict(num_groups=-1), ValueError, "num_groups must be an int >= 0, got -1"),
        (dict(sparse_as_dense=1), TypeError, "sparse_as_dense must be a bool, got int"),
        (dict(process_set="set"), ValueError, "pass either process_set or communicator, not both"),
    ])
    def test_bad_keywords(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            self.build(**kwargs)

    def test_a_parameter_twice_in_groups(self):
        model = make_model()
        p = next(model.parameters())
        with pytest.raises(ValueError, match=r"A parameter can only appear once in groups\."):
            qoda_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                          model.named_parameters(), groups=[[p], [p]],
                                          communicator=LocalGroup(1)[0])

    def test_num_groups_is_deprecated_and_fills_groups(self):
        with pytest.warns(DeprecationWarning, match="`num_groups` has been replaced by `groups`"):
            _, opt = self.build(num_groups=2)
        assert opt._groups == 2

    def test_parameter_names_as_horovod(self):
        model, opt = self.build()
        assert opt._parameter_names == {p: n for n, p in sorted(model.named_parameters())}

    def test_positional_order_is_horovods(self):
        model = make_model()
        opt = qoda_hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                            model.named_parameters(), qoda_hvd.Compression.none,
                                            1, "average", 4.0, 0, None, True,
                                            communicator=LocalGroup(1)[0])
        assert opt.gradient_predivide_factor == 4.0 and opt.sparse_as_dense is True

    @pytest.mark.parametrize("comp", [qoda_hvd.Compression.none, qoda_hvd.Compression.fp16,
                                      qoda_hvd.Compression.layerwise(**LAYERWISE)])
    def test_predivide_keeps_the_average(self, comp):
        """Scaling by 1/f before the exchange and f after is the plain average (up to rounding;
        layer-wise quantization is scale-equivariant, so the same noise gives the same result)."""
        def fn(factor):
            return run_ranks(2, lambda r, c: [p.detach() for p in train(
                r, c, steps=3, compression=comp, gradient_predivide_factor=factor)[0].parameters()])

        tol = dict(rtol=1e-2, atol=1e-3) if comp is qoda_hvd.Compression.fp16 else dict(rtol=1e-4, atol=1e-5)
        for a, b in zip(fn(1.0)[0], fn(8.0)[0]):
            torch.testing.assert_close(a, b, **tol)

    @pytest.mark.parametrize("comp", [qoda_hvd.Compression.none,
                                      qoda_hvd.Compression.layerwise(**LAYERWISE)])
    def test_sparse_gradients_average_and_come_back_sparse(self, comp):
        def fn(r, c):
            with _INIT_LOCK:  # the same weights on both fake ranks (shared global RNG)
                torch.manual_seed(0)
                emb = nn.Embedding(64, 32, sparse=True)
            opt = qoda_hvd.DistributedOptimizer(torch.optim.SparseAdam(list(emb.parameters()), lr=0.1),
                                                emb.named_parameters(), compression=comp,
                                                communicator=c)
            idx = torch.tensor([[1, 2, 2, 5]]) if r == 0 else torch.tensor([[2, 7]])
            (emb(idx) * torch.arange(32.0)).sum().backward()
            local = emb.weight.grad.to_dense()
            opt.synchronize()
            grad = emb.weight.grad
            with opt.skip_synchronize():
                opt.step()
            return local, grad, emb.weight.detach()

        out = run_ranks(2, fn)
        for _, grad, _ in out:
            assert grad.is_sparse and grad._indices().tolist() == [[1, 2, 5, 7]]
        if comp is qoda_hvd.Compression.none:
            torch.testing.assert_close(out[0][1].to_dense(), (out[0][0] + out[1][0]) / 2)
        assert torch.equal(out[0][2], out[1][2])

    def test_horovods_own_compressors_mean_ours(self):
        hvd_compression = pytest.importorskip("horovod.torch.compression").Compression
        for theirs, ours in ((hvd_compression.none, qoda_hvd.Compression.none),
                             (hvd_compression.fp16, qoda_hvd.Compression.fp16)):
            a = run_ranks(2, lambda r, c: [p.detach() for p in train(r, c, steps=2, compression=theirs)[0].parameters()])
            b = run_ranks(2, lambda r, c: [p.detach() for p in train(r, c, steps=2, compression=ours)[0].parameters()])
            assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))


class TestExchangeSeam:
    """``compression.make_exchange(named, communicator, average)`` builds the exchange; its
    ``extra_state()`` travels in ``state_dict()``; ``stats.rounds`` is reported."""

    class _Compression:
        def __init__(self):
            self.made = None

        def make_exchange(self, named, communicator, average):
            from qoda_hvd.comm.exchange import AllreduceExchange

            ex = AllreduceExchange([p for _, p in named], communicator, average)
            ex.strategy, ex.stats.rounds, ex.loaded = "custom", 0, None
            ex.extra_state = lambda: {"error_feedback": torch.ones(2)}
            ex.load_extra_state = lambda state: setattr(ex, "loaded", state)
            self.made = (named, communicator, average)
            return ex

    def test_make_exchange_extra_state_and_rounds(self):
        comp = self._Compression()
        model, opt = TestHorovodKeywords.build(compression=comp, op="sum")
        assert [n for n, _ in comp.made[0]] == [n for n, _ in model.named_parameters()]
        assert comp.made[1] is opt._communicator and comp.made[2] is False
        state = opt.state_dict()
        assert torch.equal(state["qoda_hvd"]["exchange"]["error_feedback"], torch.ones(2))
        opt.load_state_dict(state)
        assert torch.equal(opt._exchange.loaded["error_feedback"], torch.ones(2))
        stats = opt.compression_stats()
        assert stats["strategy"] == "custom" and stats["rounds"] == 0


class TestLocalStateInit:
    """The step hvd.broadcast_optimizer_state makes on ranks with empty state: recognised by
    the caller's code object; the wrapped optimizer's step, no collective, parameters kept."""

    @pytest.mark.parametrize("make_opt", [
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda m: QODA(m.parameters(), lr=0.1),
        lambda m: optimistic(torch.optim.Adam(m.parameters(), lr=0.1, weight_decay=0.1)),
        lambda m: ExtraGradient(m.parameters(), lr=0.1),
    ], ids=["sgd", "qoda", "optimistic_adam", "extragradient"])
    def test_state_made_locally_without_moving_parameters(self, make_opt, monkeypatch):
        functions = pytest.importorskip("horovod.torch.functions")
        # A broadcast that sends nothing (one process): only the state-making path runs.
        monkeypatch.setattr(functions, "broadcast_parameters", lambda params, root_rank: None)
        monkeypatch.setattr(functions, "broadcast_object", lambda obj, root_rank=0, **kw: obj)
        from qoda_hvd.comm import horovod as comm_horovod

        monkeypatch.setattr(comm_horovod, "broadcast_object", lambda obj, root, name: (obj, True))
        comm = LocalGroup(1)[0]
        model, opt = TestHorovodKeywords.build(comm, make_opt,
                                               compression=qoda_hvd.Compression.layerwise(**LAYERWISE))
        before = [p.detach().clone() for p in model.parameters()]
        functions.broadcast_optimizer_state(opt, root_rank=0)
        assert comm.stats.collectives == 0 and opt.compression_stats()["exchanges"] == 0
        assert len(opt.state_dict()["state"]) > 0
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert not opt._state_made_locally  # consumed by the broadcast's second state_dict()
        x, y = batch(0, 0)
        opt.zero_grad()
        if isinstance(opt, ExtraGradient):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.extrapolation()
            opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()  # a real step exchanges again
        assert opt.compression_stats()["exchanges"] >= 1


def test_rebuild_needs_the_default_communicator():
    """Elastic re-forming builds a new Horovod communicator; a passed-in one cannot be."""
    _, opt = TestHorovodKeywords.build()
    assert not opt._ring_changed()  # a LocalGroup member never changes ring
    with pytest.raises(RuntimeError, match="cannot re-form; elastic training needs the default"):
        opt._rebuild_exchange()


@pytest.mark.parametrize("comp, overlap, ranks", [
    (qoda_hvd.Compression.layerwise(**LAYERWISE), False, (0, 1)),
    (qoda_hvd.Compression.layerwise(**LAYERWISE), True, (0, 1)),
    (qoda_hvd.Compression.layerwise(types="auto", **LAYERWISE), True, (0, 1)),
    (qoda_hvd.Compression.none, False, (0, 1)),
    # one rank alone re-forms while the fallback's probe is under way (calls 1-3 quantized,
    # 4-7 float32): it must go on with the others' probe, not start its own again
    (qoda_hvd.Compression.layerwise(fallback=True, **LAYERWISE), False, (0,)),
    (qoda_hvd.Compression.layerwise(fallback=True, **LAYERWISE), True, (1,)),
], ids=["layerwise", "overlap", "auto-overlap", "none", "one-rank-probing",
        "one-rank-probing-overlap"])
def test_rebuilt_exchange_keeps_its_state_and_the_run_bit_identical(comp, overlap, ranks):
    """After a failed collective (elastic), the next round re-forms the exchange (here over the
    same fake ranks) from the old one's state: the run goes on exactly as without it."""
    def fn(r, c, rebuild):
        model = make_model()
        opt = qoda_hvd.DistributedOptimizer(QODA(model.parameters(), lr=0.05),
                                            model.named_parameters(), compression=comp,
                                            communicator=c, overlap=overlap)
        for step in range(8):  # the fallback probe's calls: its timing decides nothing here
            rebuild = rebuild and r in ranks
            if rebuild and step in (2, 3):
                old = opt._exchange
                opt._owns_communicator = True  # as with Horovod's communicator
                opt._horovod_communicator = lambda process_set: (c, False)
                opt._broken = True
            x, y = batch(r, step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if rebuild and step in (2, 3):
                assert opt._exchange is not old and not opt._broken
        return [p.detach() for p in model.parameters()]

    plain = run_ranks(2, lambda r, c: fn(r, c, False))
    rebuilt = run_ranks(2, lambda r, c: fn(r, c, True))
    for a, b in zip(plain[0], rebuilt[0]):
        assert torch.equal(a, b)
