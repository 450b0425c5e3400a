"""Optimism for any torch optimizer: the OGD recursion, identity, state and schedulers."""
from __future__ import annotations

import io

import pytest
import torch

from qoda_hvd.optim import Optimistic, optimistic
from qoda_hvd.optim.optimistic import BASE_ITERATE
from qoda_hvd.problems import AbsoluteNoise, BilinearGame, QuadraticGame

torch.set_num_threads(1)
F64 = torch.float64


def test_sgd_becomes_optimistic_gradient_descent():
    # Half-iterates must follow x_{t+3/2} = x_{t+1/2} - 2 lr g_{t+1/2} + lr g_{t-1/2}, g_{1/2} = 0.
    game = QuadraticGame.random(3, mu=0.2, generator=torch.Generator().manual_seed(0),
                                noise=AbsoluteNoise(0.1))
    lr = 0.15
    opt = optimistic(torch.optim.SGD(game.parameters(), lr=lr))
    gen = torch.Generator().manual_seed(1)
    expected = game.z.detach().clone()
    g_prev = torch.zeros_like(expected)
    for _ in range(25):
        opt.zero_grad()
        g = game.write_grad(gen).clone()
        opt.step()
        expected = expected - 2 * lr * g + lr * g_prev
        g_prev = g
        torch.testing.assert_close(game.z.detach(), expected, rtol=0, atol=1e-13)


def test_base_iterate_is_the_plain_sgd_iterate():
    x = torch.tensor([1.0, -2.0], dtype=F64, requires_grad=True)
    opt = Optimistic(torch.optim.SGD([x], lr=0.5))
    x.grad = torch.tensor([1.0, 1.0], dtype=F64)
    opt.step()
    # x_2 = x_1 - 0.5 g = (0.5, -2.5); model holds x_2 + (x_2 - x_1) = (0, -3).
    assert opt.state[x][BASE_ITERATE].tolist() == [0.5, -2.5]
    assert opt.base_iterates()[0] is opt.state[x][BASE_ITERATE]
    assert x.tolist() == [0.0, -3.0]


def test_conversion_keeps_identity_and_isinstance():
    x = torch.zeros(2, requires_grad=True)
    adam = torch.optim.Adam([x], lr=0.1, betas=(0.5, 0.9))
    opt = Optimistic(adam)
    assert opt is adam
    assert isinstance(opt, torch.optim.Adam) and isinstance(opt, Optimistic)
    assert isinstance(opt, torch.optim.Optimizer)
    assert type(opt).__name__ == "OptimisticAdam"
    assert opt.param_groups[0]["betas"] == (0.5, 0.9)
    assert type(optimistic(torch.optim.Adam([x]))) is type(opt)  # one class per base class
    # A Horovod-style factory rebuilds the optimizer from its groups: still optimistic.
    rebuilt = type(opt)(opt.param_groups)
    assert isinstance(rebuilt, Optimistic) and isinstance(rebuilt, torch.optim.Adam)


@pytest.mark.parametrize("rebuild", [False, True], ids=["converted", "constructed"])
def test_step_hooks_fire_once_per_step(rebuild):
    x = torch.zeros(2, requires_grad=True)
    opt = optimistic(torch.optim.SGD([x], lr=0.1))
    if rebuild:  # built from params, so Optimizer.__init__ patches the class's step
        opt = type(opt)([x], lr=0.1)
    calls = []
    opt.register_step_post_hook(lambda *args: calls.append(1))
    x.grad = torch.ones(2)
    opt.step()
    opt.step()
    assert len(calls) == 2
    assert torch.allclose(x, torch.full((2,), -0.3))  # x_3 = -0.2, model at x_3 + u = -0.3


def _adam_run(steps, stop_at=None):
    def fresh():
        game = BilinearGame.random(3, generator=torch.Generator().manual_seed(2), noise=AbsoluteNoise(0.3))
        opt = optimistic(torch.optim.Adam(game.parameters(), lr=0.05, betas=(0.5, 0.9)))
        return game, opt

    game, opt = fresh()
    gen = torch.Generator().manual_seed(4)
    for t in range(steps):
        if t == stop_at:
            buf = io.BytesIO()
            torch.save({"model": game.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state()}, buf)
            buf.seek(0)
            ckpt = torch.load(buf)
            game, opt = fresh()
            game.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            gen = torch.Generator()
            gen.set_state(ckpt["gen"])
        opt.zero_grad()
        game.write_grad(gen)
        opt.step()
    return game, opt


def test_state_dict_round_trip_of_optimistic_adam_is_bit_exact():
    ref_game, ref_opt = _adam_run(15)
    game, opt = _adam_run(15, stop_at=6)
    assert torch.equal(game.z, ref_game.z)
    (p_ref,), (p,) = list(ref_game.parameters()), list(game.parameters())
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq", BASE_ITERATE}
    for key, value in ref_opt.state[p_ref].items():
        assert torch.equal(opt.state[p][key], value), key


def test_lr_scheduler_changes_the_step():
    # Constant gradient c with SGD: u_t = -lr_t c and the model holds x_{t+1} - lr_t c.
    x = torch.zeros(2, dtype=F64, requires_grad=True)
    opt = optimistic(torch.optim.SGD([x], lr=0.4))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    c = torch.tensor([1.0, -1.0], dtype=F64)
    base = torch.zeros(2, dtype=F64)
    for lr_t in (0.4, 0.2, 0.1):
        x.grad = c.clone()
        opt.step()
        sched.step()
        base = base - lr_t * c
        torch.testing.assert_close(x.detach(), base - lr_t * c, rtol=0, atol=1e-15)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_params_without_grad_stay_put():
    a = torch.ones(2, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    opt = optimistic(torch.optim.SGD([a, b], lr=0.1))
    a.grad = torch.ones(2)
    opt.step()
    assert torch.equal(b, torch.ones(2)) and BASE_ITERATE not in opt.state[b]


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: optimistic("sgd"), TypeError, r"optimizer must be a torch.optim.Optimizer instance, got str"),
        (lambda: Optimistic(optimistic(torch.optim.SGD([torch.zeros(1, requires_grad=True)]))),
         ValueError, r"optimizer is already optimistic \(OptimisticSGD\)"),
        (lambda: optimistic(_with_scheduler()), RuntimeError, r"convert the optimizer with optimistic\(\) before"),
    ],
)
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def _with_scheduler():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    return opt
