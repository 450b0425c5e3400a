"""qoda_hvd.DistributedOptimizer as a drop-in for hvd.DistributedOptimizer, on real ranks.

- Horovod's checkpoint-resume recipe (restore on some ranks, ``broadcast_parameters``,
  ``broadcast_optimizer_state``) for each optimizer x compression, with the state on rank 0
  only, on no rank, on every rank: it ends (a hang is a failure: thread timeout), starts no
  exchange, and every rank then holds rank 0's parameters and optimizer state and continues
  bit-identically (and, resumed from a checkpoint, exactly as the uninterrupted run).
- Horovod's keyword arguments, as a table of (keyword, value, expected effect), with Horovod's
  own optimizer as the reference where results must match.
- Sparse gradients (``nn.Embedding(sparse=True)`` + ``torch.optim.SparseAdam``).
- The ``DistributedOptimizer`` scenarios of Horovod's ``test/parallel/test_torch.py``
  (broadcast_state for every torch.optim optimizer, broadcast_state_options,
  broadcast_state_no_grad, force_allreduce, dynamic_requires_grad).
- ``process_set=`` on 3 ranks (set {0, 1}; rank 2 trains alone), each compression.
"""
from __future__ import annotations

import copy
import io
import os
import warnings

import pytest
import torch
from torch import nn

import qoda_hvd
from qoda_hvd.optim import QODA, ExtraGradient, optimistic

# Process sets must be enabled before hvd.init() (the session fixture runs after collection);
# only the 3-rank run, the one that tests them, asks for it.
if "3" in (os.environ.get("OMPI_COMM_WORLD_SIZE"), os.environ.get("HOROVOD_SIZE")):
    os.environ.setdefault("HOROVOD_DYNAMIC_PROCESS_SETS", "1")

#: A hang (a rank waiting in a collective its peer never starts) fails the test in bounded time.
pytestmark = pytest.mark.timeout(90, method="thread")

LAYERWISE = dict(bits=4, min_numel=256, schedule=(0, 2), coding="ans")

OPTIMIZERS = {
    "sgd_momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=0.01),
    "qoda": lambda m: QODA(m.parameters(), lr=0.05),
    "optimistic_adam": lambda m: optimistic(torch.optim.Adam(m.parameters(), lr=0.01)),
    "extragradient": lambda m: ExtraGradient(m.parameters(), lr=0.05),
}

COMPRESSIONS = {
    "none": lambda: dict(compression=qoda_hvd.Compression.none),
    "fp16": lambda: dict(compression=qoda_hvd.Compression.fp16),
    "layerwise_allgather": lambda: dict(compression=qoda_hvd.Compression.layerwise(**LAYERWISE),
                                        exchange="allgather"),
    "layerwise_scatter_gather": lambda: dict(
        compression=qoda_hvd.Compression.layerwise(**LAYERWISE), exchange="scatter_gather"),
}


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def batch(rank, step, n=16):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(n, 16, generator=g)
    return x, (x[:, :4] * 2 + x[:, 4:8]).argmax(dim=1)


def iterate(model, opt, rank, start, stop):
    extragradient = isinstance(opt, ExtraGradient)
    for step in range(start, stop):
        x, y = batch(rank, step)
        if extragradient:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.extrapolation()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b) -> bool:
    """Exact equality of nested state (tensors bit for bit)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def optimizer_state(opt):
    """Everything a resumed rank must agree on: torch state, hyperparameters, exchange state."""
    sd = copy.deepcopy(opt.state_dict())
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return {"state": sd["state"], "param_groups": groups, "qoda_hvd": sd.get("qoda_hvd")}


def assert_everyone_has_rank0s(hvd, value, what):
    everyone = hvd.allgather_object(value)
    for r in range(1, hvd.size()):
        assert same(everyone[0], everyone[r]), f"rank {r}'s {what} differs from rank 0's"


def save(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load(data):
    return torch.load(io.BytesIO(data), weights_only=False)


# -- Horovod's resume recipe ---------------------------------------------------------------


@pytest.mark.parametrize("comp", list(COMPRESSIONS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_resume_recipe_ends_and_every_rank_continues_from_rank0(multi, opt_name, comp):
    """For the optimizer state on rank 0 only, on no rank, on every rank (the others holding an
    older one): the recipe ends, starts no exchange, leaves every rank with rank 0's parameters
    and optimizer state, and the ranks go on bit-identically (resumed from the checkpoint:
    exactly as the uninterrupted run)."""
    if "OMPI_COMM_WORLD_SIZE" not in os.environ:  # alike on every rank of the launch
        pytest.skip("the matrix runs under mpirun; under horovodrun --gloo the recipe is covered "
                    "by the tests below (auto types + fallback, every torch optimizer, SparseAdam)")
    hvd, rank = multi, multi.rank()
    make_opt = OPTIMIZERS[opt_name]

    def build(seed):
        model = make_model(seed)
        return model, qoda_hvd.DistributedOptimizer(make_opt(model), model.named_parameters(),
                                                    **COMPRESSIONS[comp]())

    # The uninterrupted run: 2 steps, checkpoint, 2 more (levels re-optimised at steps 0 and 2).
    model, opt = build(0)
    iterate(model, opt, rank, 0, 1)
    older = save({"model": model.state_dict(), "optimizer": opt.state_dict()})
    iterate(model, opt, rank, 1, 2)
    ckpt = save({"model": model.state_dict(), "optimizer": opt.state_dict()})
    iterate(model, opt, rank, 2, 4)
    uninterrupted = params_of(model)
    saved = load(ckpt)

    for where in ("rank0", "none", "all"):
        # Horovod's recipe; every rank starts from different parameters.
        model, opt = build(1 + rank)
        if where == "rank0" and rank == 0 or where == "all":
            state = load(ckpt if rank == 0 else older)  # "all": the others hold an older state
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        collectives = opt._communicator.stats.collectives
        hvd.broadcast_optimizer_state(opt, root_rank=0)
        assert opt._communicator.stats.collectives == collectives, f"{where}: the broadcast exchanged"

        assert_everyone_has_rank0s(hvd, params_of(model), f"{where}: parameters")
        assert_everyone_has_rank0s(hvd, optimizer_state(opt), f"{where}: optimizer state")
        if where != "none":
            assert all(torch.equal(a, b) for a, b in zip(params_of(model), saved["model"].values()))
            restored = optimizer_state(opt)
            assert same(restored["state"], saved["optimizer"]["state"]), where
            assert same(restored["qoda_hvd"], saved["optimizer"].get("qoda_hvd")), where

        iterate(model, opt, rank, 2, 4)
        assert_everyone_has_rank0s(hvd, params_of(model), f"{where}: parameters after resuming")
        if where != "none":
            for a, b in zip(params_of(model), uninterrupted):
                assert torch.equal(a, b), f"{where}: the resumed run left the uninterrupted run's path"


def test_resume_recipe_carries_automatic_types_and_the_fallback_probe(multi):
    """types="auto" (found at the first exchange) and fallback=True (decided at call 7 from all
    ranks' timings): rank 1 never exchanged before the broadcast, so both must come from rank 0,
    or its first step would join a different collective than rank 0's."""
    hvd, rank = multi, multi.rank()
    comp = qoda_hvd.Compression.layerwise(types="auto", fallback=True, **LAYERWISE)

    def build():
        model = make_model()
        return model, qoda_hvd.DistributedOptimizer(QODA(model.parameters(), lr=0.05),
                                                    model.named_parameters(), compression=comp)

    model, opt = build()
    iterate(model, opt, rank, 0, 3)
    ckpt = save({"model": model.state_dict(), "optimizer": opt.state_dict()})
    model, opt = build()
    if rank == 0:
        state = load(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    assert opt._exchange.inner is not None, "the typing did not reach this rank"
    assert_everyone_has_rank0s(hvd, optimizer_state(opt), "optimizer state")
    iterate(model, opt, rank, 3, 12)  # through the fallback's decision
    assert opt._exchange.fallback_decided
    assert_everyone_has_rank0s(hvd, params_of(model), "parameters")
    assert_everyone_has_rank0s(hvd, opt.compression_stats()["sends"], "fallback choice")


def test_broadcast_object_of_the_state_dict(multi):
    """Horovod's other recipe: ``broadcast_object(opt.state_dict())`` + ``load_state_dict``."""
    hvd, rank = multi, multi.rank()
    comp = qoda_hvd.Compression.layerwise(**LAYERWISE)

    def build():
        model = make_model()
        return model, qoda_hvd.DistributedOptimizer(QODA(model.parameters(), lr=0.05),
                                                    model.named_parameters(), compression=comp)

    model, opt = build()
    iterate(model, opt, rank, 0, 3)
    ckpt = save({"model": model.state_dict(), "optimizer": opt.state_dict()})
    iterate(model, opt, rank, 3, 5)
    model2, opt2 = build()
    if rank == 0:
        state = load(ckpt)
        model2.load_state_dict(state["model"])
        opt2.load_state_dict(state["optimizer"])
    hvd.broadcast_parameters(model2.state_dict(), root_rank=0)
    state = hvd.broadcast_object(opt2.state_dict(), root_rank=0)
    if rank != 0:
        opt2.load_state_dict(state)
    assert_everyone_has_rank0s(hvd, optimizer_state(opt2), "optimizer state")
    iterate(model2, opt2, rank, 3, 5)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


# -- Horovod's DistributedOptimizer tests, with ours ----------------------------------------


def _torch_optimizers():
    """Every torch.optim optimizer (Horovod's broadcast_state test takes the direct subclasses;
    AdamW is Adam's), not LBFGS nor SparseAdam, sorted by name so every rank runs the same list."""
    found, todo = set(), list(torch.optim.Optimizer.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if (cls.__module__.startswith("torch.optim") and not cls.__name__.startswith("_")
                and cls not in (torch.optim.LBFGS, torch.optim.SparseAdam)):
            found.add(cls)
    return sorted(found, key=lambda c: c.__name__)


def test_broadcast_state_every_torch_optimizer(multi, comp="none"):
    hvd, rank = multi, multi.rank()
    ran = []
    for cls in _torch_optimizers():
        model = make_model()
        try:
            base = cls(model.parameters(), lr=0.01)
        except (TypeError, ValueError):  # needs other arguments or other parameter shapes
            continue
        opt = qoda_hvd.DistributedOptimizer(base, model.named_parameters(), **COMPRESSIONS[comp]())
        iterate(model, opt, rank, 0, 1)
        ckpt = save(opt.state_dict())
        model2 = make_model(1 + rank)
        opt2 = qoda_hvd.DistributedOptimizer(cls(model2.parameters(), lr=0.01),
                                             model2.named_parameters(), **COMPRESSIONS[comp]())
        if rank == 0:
            model2.load_state_dict(model.state_dict())
            opt2.load_state_dict(load(ckpt))
        hvd.broadcast_parameters(model2.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(opt2, root_rank=0)
        assert_everyone_has_rank0s(hvd, optimizer_state(opt2), f"{cls.__name__} state")
        iterate(model, opt, rank, 1, 2)
        iterate(model2, opt2, rank, 1, 2)
        for a, b in zip(model.parameters(), model2.parameters()):
            assert torch.equal(a, b), f"{cls.__name__}: resumed run differs"
        ran.append(cls.__name__)
    assert {"SGD", "Adam", "AdamW", "Adagrad", "RMSprop"} <= set(ran), ran


def test_broadcast_state_options(multi):
    """Rank-dependent hyperparameters end as rank 0's (Horovod's test_broadcast_state_options)."""
    hvd, rank = multi, multi.rank()
    options = [dict(lr=0.1, momentum=0.8, weight_decay=0.2, nesterov=True),
               dict(lr=0.2, momentum=0.9, weight_decay=0.1, nesterov=False)]
    for cls, opts in [(torch.optim.SGD, options), (torch.optim.Adam, [dict(lr=0.1, betas=(0.9, 0.999)),
                                                                        dict(lr=0.2, betas=(0.8, 0.9))]),
                      (QODA, [dict(lr=0.1, qhat=0.1), dict(lr=0.3, qhat=0.2)])]:
        model = make_model()
        opt = qoda_hvd.DistributedOptimizer(cls(model.parameters(), **opts[min(rank, 1)]),
                                            model.named_parameters(),
                                            compression=qoda_hvd.Compression.layerwise(**LAYERWISE))
        iterate(model, opt, rank, 0, 1)
        hvd.broadcast_optimizer_state(opt, root_rank=0)
        for k, v in opts[0].items():
            assert opt.param_groups[0][k] == v and type(opt.param_groups[0][k]) is type(v)
        iterate(model, opt, rank, 1, 2)  # the options still work as arguments of the math


def test_broadcast_state_no_grad(multi):
    """A parameter without gradient (an int index) is left alone (Horovod's test)."""
    hvd = multi

    class ModelNoGrad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor([1, 3]).int(), requires_grad=False)
            self.b = nn.Parameter(torch.rand(4))

        def forward(self, x):
            return torch.index_select(self.b, 0, self.a.long()) * x

    model = ModelNoGrad()
    opt = qoda_hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.001, weight_decay=1e-6, momentum=0.9, nesterov=True),
        named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    b = model.b.detach().clone()
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    assert model.a.grad is None
    assert torch.equal(model.b, b), "the state-making step moved the parameters"
    assert_everyone_has_rank0s(hvd, optimizer_state(opt), "optimizer state")


@pytest.mark.parametrize("comp", list(COMPRESSIONS))
def test_force_allreduce_when_ranks_use_different_parameters(multi, comp):
    """Rank 0's loss uses one head, the others' another: gradients missing on a rank count
    as zeros and every rank still joins the one exchange (Horovod's test_force_allreduce)."""
    hvd, rank = multi, multi.rank()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            y1 = self.fc2(h)
            return y1, self.fc3(torch.relu(y1))

    torch.manual_seed(0)
    model = Net()
    opt = qoda_hvd.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01),
                                        model.named_parameters(), **COMPRESSIONS[comp]())
    for step in range(3):
        x, _ = batch(rank, step)
        y1, y2 = model(x)
        opt.zero_grad()
        (y1 if rank == 0 else y2).square().mean().backward()
        opt.step()
    assert_everyone_has_rank0s(hvd, params_of(model), "parameters")


def test_dynamic_requires_grad(multi):
    """Two optimizers, their parameters' requires_grad switched on and off (Horovod's test)."""
    hvd = multi
    gen, disc = nn.Conv2d(1, 10, 1), nn.Conv2d(10, 1, 1)
    hvd.broadcast_parameters(gen.state_dict(), root_rank=0)
    hvd.broadcast_parameters(disc.state_dict(), root_rank=0)
    inp = torch.rand([1, 1, 20, 20])
    gen_opt = qoda_hvd.DistributedOptimizer(torch.optim.SGD(gen.parameters(), lr=0.1),
                                            named_parameters=gen.named_parameters())
    disc_opt = qoda_hvd.DistributedOptimizer(torch.optim.SGD(disc.parameters(), lr=0.1),
                                             named_parameters=disc.named_parameters())
    for _ in range(3):
        for train_gen in (True, False):
            for p in gen.parameters():
                p.requires_grad_(train_gen)
            for p in disc.parameters():
                p.requires_grad_(not train_gen)
            gen_opt.zero_grad()
            disc_opt.zero_grad()
            disc(gen(inp)).sum().backward()
            (gen_opt if train_gen else disc_opt).step()
    assert_everyone_has_rank0s(hvd, params_of(gen) + params_of(disc), "parameters")


# -- keyword parity, against Horovod's optimizer ---------------------------------------------


def _train_pair(hvd, ours_kwargs, hvd_kwargs, steps=4, passes=1, make=None):
    """The same 4 steps with ours and with Horovod's optimizer; parameters of both."""
    out = []
    for factory, kwargs in ((qoda_hvd.DistributedOptimizer, ours_kwargs),
                            (hvd.DistributedOptimizer, hvd_kwargs)):
        model = make_model()
        opt = factory(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5),
                      named_parameters=model.named_parameters(), **kwargs(model))
        for step in range(steps):
            opt.zero_grad()
            for k in range(passes):
                x, y = batch(hvd.rank(), 10 * step + k)
                nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        out.append((model, opt))
    return out


def _first_two(model):
    return [[p for _, p in list(model.named_parameters())[:2]]]


#: (keyword, value, expected effect). Values that need the model are built from it.
KEYWORDS = [
    ("defaults", lambda m: {}, "averages as Horovod"),
    ("op", lambda m: {"op": _hvd().Sum}, "sums as Horovod"),
    ("gradient_predivide_factor", lambda m: {"gradient_predivide_factor": 2.0},
     "1/f before the sum, f/K after: the same average as Horovod's"),
    ("backward_passes_per_step", lambda m: {"backward_passes_per_step": 2},
     "two local passes accumulated, then one exchange, as Horovod"),
    ("num_groups", lambda m: {"num_groups": 2}, "DeprecationWarning; no effect on results"),
    ("groups", lambda m: {"groups": 2}, "no effect on results (everything is one exchange)"),
    ("groups", lambda m: {"groups": _first_two(m)}, "no effect on results"),
    ("compression", lambda m: {"compression": _hvd().Compression.none}, "hvd's none = ours"),
    ("compression", lambda m: {"compression": _hvd().Compression.fp16}, "hvd's fp16 = ours"),
]


def _hvd():
    import horovod.torch as hvd

    return hvd


@pytest.mark.parametrize("keyword, value, effect", KEYWORDS,
                         ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(KEYWORDS)])
def test_keyword_parity_with_horovods_optimizer(multi, keyword, value, effect):
    hvd = multi
    passes = 2 if keyword == "backward_passes_per_step" else 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (ours, opt), (ref, ref_opt) = _train_pair(hvd, value, value, passes=passes)
    if keyword == "num_groups":
        assert any(issubclass(w.category, DeprecationWarning) and "num_groups" in str(w.message)
                   for w in caught)
    fp16 = "fp16" in effect
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-3 if fp16 else 1e-5, atol=1e-4 if fp16 else 1e-6)
    assert_everyone_has_rank0s(hvd, params_of(ours), "parameters")
    if keyword in ("num_groups", "groups", "compression"):
        # Exactly what ours gives without the keyword / with our own compressor.
        plain = {"compression": qoda_hvd.Compression.fp16} if fp16 else {}
        (again, _), _ = _train_pair(hvd, lambda m: plain, lambda m: {}, steps=4)
        assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), again.parameters()))
    # _parameter_names: parameter -> name, in Horovod's order, over this optimizer's model.
    assert list(opt._parameter_names.values()) == list(ref_opt._parameter_names.values())
    assert {id(p) for p in opt._parameter_names} == {id(p) for p in ours.parameters()}


@pytest.mark.parametrize("kwargs, match", [
    (dict(gradient_predivide_factor=2.0, op="sum"), "gradient_predivide_factor not supported with op != Average"),
    (dict(groups=-1), "groups should be a non-negative integer or a list of list of torch.Tensor"),
    (dict(groups=[[1.0]]), "groups must consist of torch.Tensor."),
    (dict(groups="dup"), "A parameter can only appear once in groups."),
])
def test_keyword_errors_match_horovods(multi, kwargs, match):
    hvd = multi
    for factory in (qoda_hvd.DistributedOptimizer, hvd.DistributedOptimizer):
        model = make_model()
        kw = dict(kwargs)
        if kw.get("op") == "sum":
            kw["op"] = hvd.Sum
        if kw.get("groups") == "dup":
            p = next(model.parameters())
            kw["groups"] = [[p], [p]]
        with pytest.raises(ValueError, match=match.replace(".", r"\.")):
            factory(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters(), **kw)


# -- sparse gradients -----------------------------------------------------------------------


class _Embedding(nn.Module):
    def __init__(self, rows=64, dim=32):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(rows, dim, sparse=True)

    def forward(self, x):
        return self.embedding(x)


def _sparse_batch(rank, step):
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randint(0, 48, (6, 5), generator=g)  # rows 48..63 never touched


@pytest.mark.parametrize("sparse_as_dense", [False, True])
@pytest.mark.parametrize("comp", ["none", "fp16", "layerwise_allgather"])
def test_sparse_embeddings_with_sparse_adam(multi, comp, sparse_as_dense):
    """Sparse gradients are aggregated (densified in the one exchange) and SparseAdam gets a
    sparse gradient again; with Compression.none the result is Horovod's (which allgathers)."""
    hvd, rank = multi, multi.rank()
    runs = []
    # Horovod as the reference where it has the same numbers (not layer-wise); its own sparse
    # path cannot take Compression.fp16 (FP16Compressor.decompress gets ctx None for sparse).
    reference = comp == "none" or comp == "fp16" and sparse_as_dense
    factories = [qoda_hvd.DistributedOptimizer] + ([hvd.DistributedOptimizer] if reference else [])
    for factory in factories:
        model = _Embedding()
        kwargs = COMPRESSIONS[comp]() if factory is qoda_hvd.DistributedOptimizer else \
            {"compression": hvd.Compression.fp16 if comp == "fp16" else hvd.Compression.none}
        opt = factory(torch.optim.SparseAdam(list(model.parameters()), lr=0.1),
                      named_parameters=model.named_parameters(), sparse_as_dense=sparse_as_dense,
                      **kwargs)
        for step in range(3):
            opt.zero_grad()
            (model(_sparse_batch(rank, step)) * torch.linspace(-1, 1, 32)).sum().backward()
            opt.step()
            assert model.embedding.weight.grad.is_sparse
        runs.append(model.embedding.weight.detach().clone())
    ours = runs[0]
    assert_everyone_has_rank0s(hvd, ours, "embedding")
    assert torch.equal(ours[48:], _Embedding().embedding.weight[48:]), "untouched rows moved"
    if len(runs) == 2:
        tol = dict(rtol=1e-3, atol=1e-3) if comp == "fp16" else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours, runs[1], **tol)


def test_sparse_adam_resume_recipe(multi):
    hvd, rank = multi, multi.rank()

    def build():
        model = _Embedding()
        return model, qoda_hvd.DistributedOptimizer(torch.optim.SparseAdam(list(model.parameters()), lr=0.1),
                                                    named_parameters=model.named_parameters())

    model, opt = build()
    for step in range(2):
        opt.zero_grad()
        model(_sparse_batch(rank, step)).sum().backward()
        opt.step()
    ckpt = save(opt.state_dict())
    model2, opt2 = build()
    if rank == 0:
        model2.load_state_dict(model.state_dict())
        opt2.load_state_dict(load(ckpt))
    hvd.broadcast_parameters(model2.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt2, root_rank=0, model=model2)
    assert_everyone_has_rank0s(hvd, optimizer_state(opt2), "optimizer state")
    assert same(optimizer_state(opt2)["state"], load(ckpt)["state"])


# -- process sets (3 ranks) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def pair_set(hvd):
    """Process set {0, 1} of a 3-rank job (skips alike on every rank otherwise)."""
    if hvd.size() != 3 or os.environ.get("HOROVOD_DYNAMIC_PROCESS_SETS") != "1":
        pytest.skip("needs 3 ranks launched with HOROVOD_DYNAMIC_PROCESS_SETS=1 (the mpirun -np 3 run)")
    ps = hvd.add_process_set([0, 1])
    yield ps
    hvd.remove_process_set(ps)


@pytest.mark.parametrize("comp", list(COMPRESSIONS))
def test_process_set_inside_exchanges_outside_trains_locally(hvd, pair_set, comp):
    rank = hvd.rank()
    model = make_model()
    opt = qoda_hvd.DistributedOptimizer(QODA(model.parameters(), lr=0.05), model.named_parameters(),
                                        process_set=pair_set, **COMPRESSIONS[comp]())
    iterate(model, opt, rank, 0, 4)
    stats = opt.compression_stats()
    everyone = hvd.allgather_object((params_of(model), stats["exchanges"], stats["strategy"]))
    assert all(torch.equal(a, b) for a, b in zip(everyone[0][0], everyone[1][0])), "the set's ranks differ"
    assert everyone[0][1] == everyone[1][1] == 4 and everyone[2][1] == 0 and everyone[2][2] == "local"
    if rank == 2:  # exactly a local QODA run on this rank's gradients
        alone = make_model()
        iterate(alone, QODA(alone.parameters(), lr=0.05), rank, 0, 4)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), alone.parameters()))
    if comp == "none":  # and the set's average is Horovod's
        ref = make_model()
        ref_opt = hvd.DistributedOptimizer(QODA(ref.parameters(), lr=0.05),
                                           named_parameters=ref.named_parameters(),
                                           process_set=pair_set)
        iterate(ref, ref_opt, rank, 0, 4)
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_process_set_resume_recipe(hvd, pair_set):
    """broadcast_optimizer_state (a global collective) with an optimizer on a process set."""
    rank = hvd.rank()
    comp = qoda_hvd.Compression.layerwise(**LAYERWISE)
    model = make_model()
    opt = qoda_hvd.DistributedOptimizer(QODA(model.parameters(), lr=0.05), model.named_parameters(),
                                        compression=comp, process_set=pair_set)
    iterate(model, opt, rank, 0, 3)
    ckpt = save({"model": model.state_dict(), "optimizer": opt.state_dict()})
    model2 = make_model(5 + rank)
    opt2 = qoda_hvd.DistributedOptimizer(QODA(model2.parameters(), lr=0.05), model2.named_parameters(),
                                         compression=comp, process_set=pair_set)
    if rank == 0:
        state = load(ckpt)
        model2.load_state_dict(state["model"])
        opt2.load_state_dict(state["optimizer"])
    hvd.broadcast_parameters(model2.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt2, root_rank=0)
    iterate(model2, opt2, rank, 3, 5)
    everyone = hvd.allgather_object(params_of(model2))
    assert all(torch.equal(a, b) for a, b in zip(everyone[0], everyone[1]))
