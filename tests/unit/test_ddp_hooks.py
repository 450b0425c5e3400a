"""qoda_hvd.ddp: the layer-wise and PowerSGD DDP communication hooks, under real gloo processes.

Two ranks are spawned ONCE for the module (``torch.multiprocessing`` spawn, gloo over
loopback, one thread each) and run every scenario below in turn; each test then checks its
scenario's results from both ranks. Gradients are set exactly through a probe module whose
loss is ``sum_p <p, c_p>`` (so ``p.grad = c_p``), which makes the exact, unbiased and
accumulation checks possible. Argument checks run in this process (no group needed).
"""
from __future__ import annotations

import math
import os
import pickle
import socket
import sys
import time
import traceback

import numpy as np
import pytest
import torch
from torch import nn

K = 2
pytestmark = pytest.mark.timeout(600)


# ------------------------------------------------------------------------------ models
class Probe(nn.Module):
    """Typed like a small LM (embedding, feedforward, output; biases uncompressed); its loss
    ``sum_p <p, c_p>`` makes each gradient exactly ``c_p``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 64), nn.Linear(64, 16))

    def forward(self, cs):
        return sum((p * c).sum() for p, c in zip(self.parameters(), cs))


class SmallLM(nn.Module):
    def __init__(self, vocab: int = 200, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.block = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=64, dropout=0.0,
                                                batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        return self.head(self.block(self.embed(tokens)))


def _seeded(cls, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return cls()


def _pow2_pattern(shape, seed: int) -> torch.Tensor:
    """Signed powers of two in [2^-8, 1] and zeros: exact at 8 bits with exponential levels."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 9, shape, generator=g).float()
    sign = torch.randint(0, 2, shape, generator=g).float() * 2 - 1
    zero = torch.rand(shape, generator=g) < 0.1
    return torch.where(zero, torch.zeros(shape), sign * torch.exp2(-k))


def _flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _lm_batch(rank: int, step: int, vocab: int = 200):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randint(vocab, (4, 9), generator=g)


def _lm_step(ddp, opt, tokens, vocab=200):
    opt.zero_grad()
    logits = ddp(tokens[:, :-1])
    nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1)).backward()
    opt.step()


# --------------------------------------------------------------------------- scenarios
# Each runs on both ranks and returns plain data (tensors allowed) for the tests.

def sc_identical(rank):
    """A small transformer LM trained with QODA for 4 steps through each hook, several
    buckets, gradient_as_bucket_view / static_graph; parameters gathered from both ranks."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import qoda_hvd
    from qoda_hvd.ddp import (LayerwiseHookState, PowerSGDHookState, layerwise_hook,
                              powersgd_hook)

    out = {}
    variants = {
        "layerwise": dict(view=True, static=False,
                          make=lambda m: (LayerwiseHookState(model=m, bits=4, coding="rans",
                                                             min_numel=256), layerwise_hook)),
        "layerwise_static": dict(view=False, static=True,
                                 make=lambda m: (LayerwiseHookState(model=m, bits=3,
                                                                    coding="auto",
                                                                    bandwidth=1e8,
                                                                    min_numel=256),
                                                 layerwise_hook)),
        "layerwise_auto": dict(view=True, static=False,
                               make=lambda m: (LayerwiseHookState(model=m, bits=4, types="auto",
                                                                  min_numel=256),
                                               layerwise_hook)),
        "powersgd": dict(view=True, static=True,
                         make=lambda m: (PowerSGDHookState(model=m, rank=2, layerwise=True,
                                                           min_numel=256, every=2),
                                         powersgd_hook)),
    }
    for name, v in variants.items():
        model = _seeded(SmallLM)
        ddp = DDP(model, bucket_cap_mb=0.02, gradient_as_bucket_view=v["view"],
                  static_graph=v["static"])
        state, hook = v["make"](model)
        state.trace = []
        ddp.register_comm_hook(state, hook)
        opt = qoda_hvd.QODA(model.parameters(), lr=0.05)
        for step in range(4):
            _lm_step(ddp, opt, _lm_batch(rank, step))
        flat = _flat_params(model)
        both = [torch.empty_like(flat) for _ in range(K)]
        dist.all_gather(both, flat)
        out[name] = {"params": both, "trace": list(state.trace),
                     "stats": state.compression_stats().as_dict(),
                     "ranks": getattr(state, "ranks", None),
                     "types": (list(state.typing.type_names)
                               if getattr(state, "typing", None) is not None else None)}
        state.close()
    return out


def _probe_ddp(state_factory, **ddp_kw):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _seeded(Probe)
    ddp = DDP(model, **ddp_kw)
    state, hook = state_factory(model)
    ddp.register_comm_hook(state, hook)
    return model, ddp, state


def _lossless_state(model):
    from qoda_hvd.ddp import LayerwiseHookState, layerwise_hook

    return LayerwiseHookState(model=model, bits=8, levels="exponential", norm="linf",
                              coding="rans", min_numel=1024), layerwise_hook


def sc_exact(rank):
    """8 bits, exponential levels, linf norms, powers of two: the hook's average must be the
    exact mean, on both ranks, for typed and uncompressed parameters."""
    model, ddp, state = _probe_ddp(_lossless_state, bucket_cap_mb=0.005)
    shapes = [p.shape for p in model.parameters()]
    out = {"grads": [], "expected": []}
    for step in range(2):
        cs = [[_pow2_pattern(s, 100 * r + 10 * step + i) for i, s in enumerate(shapes)]
              for r in range(K)]
        model.zero_grad()
        ddp(cs[rank]).backward()
        out["grads"].append([p.grad.clone() for p in model.parameters()])
        out["expected"].append([(a + b) / 2 for a, b in zip(cs[0], cs[1])])
    out["buckets"] = state.stats.buckets
    state.close()
    return out


def sc_unbiased(rank):
    """4 bits, the same Gaussian gradients for 64 steps: the steps' noise is independent, so
    the mean of the aggregates converges to the exact mean like 1/sqrt(steps)."""
    from qoda_hvd.ddp import LayerwiseHookState, layerwise_hook

    def factory(model):
        return LayerwiseHookState(model=model, bits=4, levels="optimal", schedule=(0,),
                                  coding="fixed", bucket_size=128, min_numel=1024,
                                  seed=11), layerwise_hook

    model, ddp, state = _probe_ddp(factory, bucket_cap_mb=0.005)
    shapes = [p.shape for p in model.parameters()]
    cs = [[torch.randn(s, generator=torch.Generator().manual_seed(7 * r + i))
           for i, s in enumerate(shapes)] for r in range(K)]
    exact = torch.cat([((a + b) / 2).reshape(-1) for a, b in zip(cs[0], cs[1])])
    steps, total, single = 64, torch.zeros_like(exact, dtype=torch.float64), []
    for _ in range(steps):
        model.zero_grad()
        ddp(cs[rank]).backward()
        agg = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        single.append(float((agg - exact).norm()))
        total += agg.double()
    mean_err = float((total / steps - exact.double()).norm())
    typed = sum(p.numel() for n, p in model.named_parameters() if p.dim() > 1)
    state.close()
    return {"mean_err": mean_err, "single_err": float(np.mean(single)), "steps": steps,
            "typed": typed, "level_updates": state.stats.level_updates}


def sc_bytes(rank):
    """Counted bytes against payload sizes computed independently from the buckets DDP
    handed over (fixed coding: a payload's size depends only on its segments' sizes); and
    with rans (sizes vary), what a rank received is what the other sent."""
    import torch.distributed as dist

    from qoda_hvd.coding import PackedSegment, RawSegment, encode
    from qoda_hvd.ddp import LayerwiseHookState, layerwise_hook
    from qoda_hvd.kernels.tables import packed_size
    from qoda_hvd.quant import classify_parameters, uniform_levels

    out = {}
    for coding in ("fixed", "rans"):
        model = _seeded(Probe)
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, bucket_cap_mb=0.005)
        state = LayerwiseHookState(model=model, bits=4, coding=coding, min_numel=1024)
        typing = classify_parameters(model, min_numel=1024)
        names = {id(p): n for n, p in model.named_parameters()}
        expected = []

        def recording(st, bucket):
            sizes, raw = {}, 0
            for p in bucket.parameters():
                tid = typing.type_id(names[id(p)])
                if tid < 0:
                    raw += p.numel()
                else:
                    sizes[tid] = sizes.get(tid, 0) + p.numel()
            segs = [PackedSegment(t, t, n, 1024, np.zeros(packed_size(n, 4), np.uint8),
                                  np.zeros(-(-n // 1024), np.float32), 8)
                    for t, n in sorted(sizes.items())]
            lv = {t: uniform_levels(8) for t in range(typing.num_types)}
            raws = [RawSegment(typing.num_types, np.zeros(raw, np.float32))] if raw else []
            expected.append(encode(segs, lv, "fixed", raw=raws).numel())
            return layerwise_hook(st, bucket)

        ddp.register_comm_hook(state, recording)
        shapes = [p.shape for p in model.parameters()]
        for step in range(3):
            model.zero_grad()
            ddp([torch.randn(s, generator=torch.Generator().manual_seed(31 * rank + step + i))
                 for i, s in enumerate(shapes)]).backward()
        st = state.stats
        mine = torch.tensor([st.payload_bytes, st.bytes_received, st.wire_bytes_received],
                            dtype=torch.int64)
        both = [torch.empty_like(mine) for _ in range(K)]
        dist.all_gather(both, mine)
        out[coding] = {"counted": st.payload_bytes, "expected": sum(expected),
                       "all": [b.tolist() for b in both], "buckets": st.buckets,
                       "stats": state.compression_stats().as_dict()}
        state.close()
    return out


def sc_resume(rank):
    """6 steps straight vs 3 steps, pickle the hook state (and the model / optimizer), a new
    DDP, 3 more steps: the same parameters bit for bit, for both hooks."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import qoda_hvd
    from qoda_hvd.ddp import (LayerwiseHookState, PowerSGDHookState, layerwise_hook,
                              powersgd_hook)

    makers = {
        "layerwise": (lambda m: LayerwiseHookState(model=m, bits=4, coding="rans",
                                                   schedule=(0, 2, 4), every=0,
                                                   min_numel=256), layerwise_hook),
        "powersgd": (lambda m: PowerSGDHookState(model=m, rank=2, layerwise=True, every=2,
                                                 start_iter=1, min_numel=256), powersgd_hook),
    }
    out = {}
    for name, (make, hook) in makers.items():
        def run(model, state):
            ddp = DDP(model, bucket_cap_mb=25)
            ddp.register_comm_hook(state, hook)
            opt = qoda_hvd.QODA(model.parameters(), lr=0.05)
            return ddp, opt

        model = _seeded(SmallLM)
        state = make(model)
        ddp, opt = run(model, state)
        for step in range(6):
            _lm_step(ddp, opt, _lm_batch(rank, step))
        straight = _flat_params(model)
        state.close()

        model = _seeded(SmallLM)
        state = make(model)
        ddp, opt = run(model, state)
        for step in range(3):
            _lm_step(ddp, opt, _lm_batch(rank, step))
        blob = pickle.dumps({"hook": state, "model": model.state_dict(),
                             "opt": opt.state_dict()})
        state.close()
        del ddp, opt, model, state
        saved = pickle.loads(blob)
        model = _seeded(SmallLM, seed=5)  # other weights: the checkpoint must restore them
        model.load_state_dict(saved["model"])
        state = saved["hook"].bind(model)
        ddp, opt = run(model, state)
        opt.load_state_dict(saved["opt"])
        for step in range(3, 6):
            _lm_step(ddp, opt, _lm_batch(rank, step))
        out[name] = {"straight": straight, "resumed": _flat_params(model), "step": state.step}
        state.close()
    return out


def sc_no_sync(rank):
    """Two micro-batches under no_sync(), the third synchronised: the hook runs once, on the
    accumulated gradients (c + c + 2c = 4c, exact), and averages them exactly."""
    model, ddp, state = _probe_ddp(_lossless_state, bucket_cap_mb=0.005,
                                   gradient_as_bucket_view=True)
    shapes = [p.shape for p in model.parameters()]
    cs = [[_pow2_pattern(s, 500 + 10 * r + i) for i, s in enumerate(shapes)] for r in range(K)]
    model.zero_grad()
    with ddp.no_sync():
        ddp(cs[rank]).backward()
        ddp(cs[rank]).backward()
    steps_before = state.stats.steps
    ddp([2 * c for c in cs[rank]]).backward()
    out = {"grads": [p.grad.clone() for p in model.parameters()],
           "expected": [2 * (a + b) for a, b in zip(cs[0], cs[1])],
           "steps_before": steps_before, "steps_after": state.stats.steps}
    state.close()
    return out


def sc_nan(rank):
    """Rank 0's gradients hold NaN (typed) and Inf (uncompressed); both ranks must end with
    the same bits (NaN in the same places), for both hooks, and the next step is finite again
    (PowerSGD drops the poisoned error and Q memory, on every rank alike)."""
    import torch.distributed as dist

    from qoda_hvd.ddp import PowerSGDHookState, powersgd_hook

    def psgd(model):
        return PowerSGDHookState(model=model, rank=2, min_numel=1024), powersgd_hook

    out = {}
    for name, factory in (("layerwise", _lossless_state), ("powersgd", psgd)):
        model, ddp, state = _probe_ddp(factory, bucket_cap_mb=0.005)
        shapes = [p.shape for p in model.parameters()]
        res = []
        for step in range(2):
            cs = [_pow2_pattern(s, 900 + 10 * rank + i) for i, s in enumerate(shapes)]
            if rank == 0 and step == 0:
                cs[0].view(-1)[5] = float("nan")   # embedding weight
                cs[2].view(-1)[3] = float("inf")   # a bias (uncompressed)
            model.zero_grad()
            ddp(cs).backward()
            bits = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).view(torch.int32)
            both = [torch.empty_like(bits) for _ in range(K)]
            dist.all_gather(both, bits)
            res.append(both)
        out[name] = res
        state.close()
    return out


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.unused, self.b = nn.Linear(64, 128), nn.Linear(64, 64), nn.Linear(128, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def sc_unused(rank):
    """find_unused_parameters=True: DDP allreduces its map of used parameters from the
    autograd thread while buckets are in flight; the hooks' own group keeps the two apart."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from qoda_hvd.ddp import (LayerwiseHookState, PowerSGDHookState, layerwise_hook,
                              powersgd_hook)

    out = {}
    for name in ("layerwise", "powersgd"):
        model = _seeded(WithUnused)
        ddp = DDP(model, find_unused_parameters=True, bucket_cap_mb=0.01)
        state = (LayerwiseHookState(model=model, min_numel=100) if name == "layerwise"
                 else PowerSGDHookState(model=model, rank=2, min_numel=100))
        ddp.register_comm_hook(state, layerwise_hook if name == "layerwise" else powersgd_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(4):
            x = torch.randn(8, 64, generator=torch.Generator().manual_seed(10 * rank + step))
            opt.zero_grad()
            ddp(x).square().mean().backward()
            opt.step()
        flat = _flat_params(model)
        both = [torch.empty_like(flat) for _ in range(K)]
        dist.all_gather(both, flat)
        out[name] = {"params": both, "buckets": state.stats.buckets}
        state.close()
    return out


SCENARIOS = {f.__name__[3:]: f for f in (sc_identical, sc_exact, sc_unbiased, sc_bytes,
                                         sc_resume, sc_no_sync, sc_nan, sc_unused)}


def _entry(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["LOCAL_WORLD_SIZE"] = str(K)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=K)
    for name, fn in SCENARIOS.items():
        t0 = time.perf_counter()
        try:
            res = {"ok": fn(rank)}
        except Exception:
            res = {"error": traceback.format_exc()}
        res["seconds"] = time.perf_counter() - t0
        torch.save(res, os.path.join(out_dir, f"{name}.{rank}.pt"))
        if "error" in res:  # the other rank may be stuck in a collective: stop here
            os._exit(1)
        dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    ctx = mp.start_processes(_entry, args=(_free_port(), str(out)), nprocs=K, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 420
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                break
    except Exception:
        pass  # a rank failed: its scenario's file says why
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()

    def get(name):
        per_rank = []
        for r in range(K):
            path = out / f"{name}.{r}.pt"
            if not path.exists():
                pytest.fail(f"scenario {name} left no result on rank {r} (a hang or a crash "
                            "in an earlier scenario)")
            res = torch.load(path, weights_only=False)
            if "error" in res:
                pytest.fail(f"scenario {name} failed on rank {r}:\n{res['error']}")
            per_rank.append(res["ok"])
        return per_rank

    return get


# ------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("variant", ["layerwise", "layerwise_static", "layerwise_auto",
                                     "powersgd"])
def test_parameters_bit_identical_after_training(results, variant):
    for res in results("identical"):
        r = res[variant]
        a, b = r["params"]
        assert torch.equal(a, b), f"{variant}: parameters differ across ranks"
        assert torch.isfinite(a).all()
        assert r["stats"]["steps"] == 4 and r["stats"]["buckets"] > 4  # several buckets/step


@pytest.mark.parametrize("hook", ["layerwise", "powersgd"])
def test_find_unused_parameters(results, hook):
    for res in results("unused"):
        a, b = res[hook]["params"]
        assert torch.equal(a, b) and res[hook]["buckets"] >= 4


def test_auto_types_found_alike(results):
    """``types="auto"``: found at the first step from ONE allreduce, the same on both ranks."""
    a, b = (res["layerwise_auto"]["types"] for res in results("identical"))
    assert a == b and a and all(t.startswith("auto") for t in a)


def test_compression_figures(results):
    r = results("identical")[0]
    lw = r["layerwise"]["stats"]
    assert lw["compress_rate"] > 6, lw  # 4 bits + entropy coding against float32
    assert 2.0 < lw["bits_per_coordinate"] < 5.0
    ps = r["powersgd"]["stats"]
    assert ps["compress_rate"] > 2 and ps["rank_updates"] == 2  # steps 0 and 2
    assert set(r["powersgd"]["ranks"]) <= {"embedding", "attention", "feedforward", "output"}


def test_buckets_start_while_backward_runs(results):
    """The worker takes up bucket 0 before DDP hands over the last bucket of the same step
    (on at least one ordinary step): the per-bucket work overlaps the backward pass."""
    trace = results("identical")[0]["layerwise"]["trace"]
    overlapped = 0
    for step in range(1, 4):
        ev = [e for e in trace if e[2] == step]
        last = max(e[1] for e in ev)
        start0 = min(t for kind, i, _, t in ev if kind == "start" and i == 0)
        ready_last = max(t for kind, i, _, t in ev if kind == "ready" and i == last)
        overlapped += start0 < ready_last
    assert overlapped >= 1, trace


def test_exact_mean_lossless_levels(results):
    for res in results("exact"):
        for got, want in zip(res["grads"], res["expected"]):
            for g, w in zip(got, want):
                assert torch.equal(g, w)
        assert res["buckets"] >= 3  # one bucket at DDP's first step, several after


def test_unbiased_over_steps(results):
    for res in results("unbiased"):
        s = res["steps"]
        assert res["single_err"] > 0.05  # 4 bits is lossy: a draw is off
        # independent unbiased draws: the mean's error shrinks like 1/sqrt(steps); a bias
        # would keep it near a single draw's
        assert res["mean_err"] < 1.6 * res["single_err"] / math.sqrt(s), res
        assert res["level_updates"] == 1


@pytest.mark.parametrize("coding", ["fixed", "rans"])
def test_bytes_counted_match_payloads(results, coding):
    per_rank = results("bytes")
    for r, res in enumerate(per_rank):
        c = res[coding]
        if coding == "fixed":
            assert c["counted"] == c["expected"]
        sent, received, wire = c["all"][r]
        other_sent = c["all"][1 - r][0]
        assert received == other_sent  # what this rank got is what the other encoded
        assert wire >= received
        assert c["stats"]["numel_after_compression"] == c["counted"] / 4


@pytest.mark.parametrize("hook", ["layerwise", "powersgd"])
def test_checkpoint_resume_repeats_the_run(results, hook):
    for res in results("resume"):
        r = res[hook]
        assert r["step"] == 6
        assert torch.equal(r["straight"], r["resumed"])


def test_no_sync_accumulates(results):
    for res in results("no_sync"):
        assert res["steps_before"] == 0 and res["steps_after"] == 1
        for g, w in zip(res["grads"], res["expected"]):
            assert torch.equal(g, w)


@pytest.mark.parametrize("hook", ["layerwise", "powersgd"])
def test_nan_gradients_rank_consistent(results, hook):
    for res in results("nan"):
        first, second = res[hook]
        a, b = first
        assert torch.equal(a, b)  # the same bits, NaN included
        assert torch.isnan(a.view(torch.float32)).any()
        c, d = second
        assert torch.equal(c, d) and torch.isfinite(c.view(torch.float32)).all()
    if hook == "layerwise":  # NaN stays in its norm bucket, the rest is finite
        vals = first[0].view(torch.float32)
        assert torch.isfinite(vals).sum() > vals.numel() // 2


# ----------------------------------------------------------------- arguments, imports
def _lw(**kw):
    from qoda_hvd.ddp import LayerwiseHookState

    return LayerwiseHookState(model=nn.Linear(64, 64), **kw)


def _ps(**kw):
    from qoda_hvd.ddp import PowerSGDHookState

    return PowerSGDHookState(model=nn.Linear(64, 64), **kw)


@pytest.mark.parametrize("make, kwargs, err, word", [
    (_lw, {"bits": 9}, ValueError, "bits"),
    (_lw, {"bits": 4.0}, TypeError, "bits"),
    (_lw, {"levels": "cubic"}, ValueError, "levels"),
    (_lw, {"coding": "lz4"}, ValueError, "coding"),
    (_lw, {"norm": "l1"}, ValueError, "norm"),
    (_lw, {"bucket_size": 8}, ValueError, "bucket_size"),
    (_lw, {"types": 3}, TypeError, "types"),
    (_lw, {"types": "manual"}, ValueError, "types"),
    (_lw, {"seed": -1}, ValueError, "seed"),
    (_lw, {"average": 1}, TypeError, "average"),
    (_lw, {"process_group": "world"}, TypeError, "process_group"),
    (_ps, {"rank": 0}, ValueError, "rank"),
    (_ps, {"layerwise": "yes"}, TypeError, "layerwise"),
    (_ps, {"start_iter": -1}, ValueError, "start_iter"),
    (_ps, {"types": "auto"}, ValueError, "types"),
    (_ps, {"rank_range": (2.0, 4.0)}, ValueError, "rank_range"),
    (_ps, {"min_compression_rate": 0}, ValueError, "min_compression_rate"),
])
def test_bad_arguments_named(make, kwargs, err, word):
    with pytest.raises(err, match=word):
        make(**kwargs)


def test_bad_model_and_state():
    from qoda_hvd.ddp import LayerwiseHookState, PowerSGDHookState, layerwise_hook, powersgd_hook

    with pytest.raises(TypeError, match="model"):
        LayerwiseHookState(model=3)
    with pytest.raises(TypeError, match="model"):
        PowerSGDHookState(model="net")
    with pytest.raises(TypeError, match="LayerwiseHookState"):
        layerwise_hook(object(), None)
    with pytest.raises(TypeError, match="PowerSGDHookState"):
        powersgd_hook(_lw(), None)
    with pytest.raises(ValueError, match="types"):  # overrides of another model's names
        LayerwiseHookState(model=nn.Linear(64, 64), types=nn.Sequential(nn.Linear(8, 8)))


def test_unbound_state_says_bind():
    state = pickle.loads(pickle.dumps(_lw()))
    with pytest.raises(RuntimeError, match="bind"):
        state.hook(None)


def test_no_horovod_mpi_or_exchange_imports():
    """The package's own modules import none of them (statically), and importing it in a
    fresh process loads neither horovod nor mpi4py."""
    import ast
    import pathlib
    import subprocess

    import qoda_hvd.ddp

    banned = ("horovod", "mpi4py", "qoda_hvd.optim.distributed", "qoda_hvd.comm.exchange")
    for path in pathlib.Path(qoda_hvd.ddp.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for m in mods:
                assert not m.startswith(banned), f"{path.name} imports {m}"
    code = ("import sys, qoda_hvd.ddp; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('horovod', 'mpi4py')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nccl_device_buffers_single_rank(tmp_path):
    """NCCL with device-resident buckets (one rank: NCCL needs a GPU per rank): the layer-wise
    hook quantizes on the device and the aggregate equals the lossless input."""
    code = r"""
import os, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import sys; sys.path.insert(0, sys.argv[1])
from test_ddp_hooks import Probe, _pow2_pattern, _lossless_state
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:%d" % int(sys.argv[2]), rank=0,
                        world_size=1)
torch.cuda.set_device(0)
model = Probe().cuda()
ddp = DDP(model, device_ids=[0], bucket_cap_mb=0.005)
state, hook = _lossless_state(model)
ddp.register_comm_hook(state, hook)
cs = [_pow2_pattern(p.shape, i).cuda() for i, p in enumerate(model.parameters())]
ddp(cs).backward()
assert all(torch.equal(p.grad, c) for p, c in zip(model.parameters(), cs))
print("ok", state.stats.buckets)
"""
    out = subprocess_run(code, os.path.dirname(__file__), _free_port())
    assert out.startswith("ok")


def subprocess_run(code: str, *args) -> str:
    import subprocess

    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.strip()
