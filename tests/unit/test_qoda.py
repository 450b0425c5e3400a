"""QODA against hand-computed steps (ALGORITHM.md section 2), its state, schedulers and errors."""
from __future__ import annotations

import io
import math

import pytest
import torch

from qoda_hvd.optim import QODA, AdaptiveStepSize, ConstantStepSize, StepSizePolicy, optimistic
from qoda_hvd.problems import AbsoluteNoise, BilinearGame

torch.set_num_threads(1)
F64 = torch.float64


def _field(a: torch.Tensor, b: torch.Tensor) -> None:
    """Operator F(a, b) = (b + 1/2, -a) written into the grads (a monotone 2-D field)."""
    a.grad = (b.detach() + 0.5).clone()
    b.grad = (-a.detach()).clone()


def test_first_three_steps_match_hand_computation():
    # Two 1-element tensors in one group, X_1 = (1, 2), lr = 1/2, qhat = 1/4 (gamma != eta).
    a = torch.tensor([1.0], dtype=F64, requires_grad=True)
    b = torch.tensor([2.0], dtype=F64, requires_grad=True)
    opt = QODA([a, b], lr=0.5, qhat=0.25)

    # Step t = 1 at X_{3/2} = X_1 = (1, 2): V_{3/2} = (2.5, -1), V_{1/2} = 0.
    # D_1 = 2.5^2 + 1^2 = 7.25, S_1 = 7.25; eta_2 = 8.25^(-1/2), gamma_2 = 8.25^(-1/4).
    # Y_2 = (-2.5, 1); X_2 = X_1 + 0.5 eta_2 Y_2; X_{5/2} = X_2 - 0.5 gamma_2 V_{3/2}.
    _field(a, b)
    opt.step()
    e2, g2 = 8.25 ** -0.5, 8.25 ** -0.25
    x52 = (1 - 1.25 * e2 - 1.25 * g2, 2 + 0.5 * e2 + 0.5 * g2)
    assert (a.item(), b.item()) == pytest.approx(x52, abs=1e-14)
    assert x52 == pytest.approx((-0.17275, 2.46910), abs=1e-5)  # 8.25^-.5 = .348155, 8.25^-.25 = .590047

    # Step t = 2 at X_{5/2}: V_{5/2} = (x52_b + 0.5, -x52_a); D_2 = ||V_{5/2} - V_{3/2}||^2.
    v52 = (x52[1] + 0.5, -x52[0])
    s2 = 7.25 + (v52[0] - 2.5) ** 2 + (v52[1] + 1.0) ** 2
    e3, g3 = (1 + s2) ** -0.5, (1 + s2) ** -0.25
    y3 = (-2.5 - v52[0], 1.0 - v52[1])
    x72 = (1 + 0.5 * e3 * y3[0] - 0.5 * g3 * v52[0], 2 + 0.5 * e3 * y3[1] - 0.5 * g3 * v52[1])
    _field(a, b)
    opt.step()
    assert (a.item(), b.item()) == pytest.approx(x72, abs=1e-14)

    # Step t = 3 at X_{7/2}.
    v72 = (x72[1] + 0.5, -x72[0])
    s3 = s2 + (v72[0] - v52[0]) ** 2 + (v72[1] - v52[1]) ** 2
    e4, g4 = (1 + s3) ** -0.5, (1 + s3) ** -0.25
    y4 = (y3[0] - v72[0], y3[1] - v72[1])
    x92 = (1 + 0.5 * e4 * y4[0] - 0.5 * g4 * v72[0], 2 + 0.5 * e4 * y4[1] - 0.5 * g4 * v72[1])
    _field(a, b)
    opt.step()
    assert (a.item(), b.item()) == pytest.approx(x92, abs=1e-14)

    # The state holds what the docstring says.
    state_a = opt.state[a]
    assert state_a["anchor"].item() == 1.0
    assert state_a["dual_sum"].item() == pytest.approx(y4[0], abs=1e-14)
    assert state_a["prev_aggregate"].item() == pytest.approx(v72[0], abs=1e-14)
    assert state_a["step"].item() == 3.0
    assert state_a["group_sq_diff_sum"].item() == pytest.approx(s3, abs=1e-12)
    # X_4 = X_1 + lr eta_4 Y_4, and the parameter is X_4 - lr gamma_4 V_{7/2}.
    x4 = (1 + 0.5 * e4 * y4[0], 2 + 0.5 * e4 * y4[1])
    assert [t.item() for t in opt.base_iterates()] == pytest.approx(x4, abs=1e-14)


def test_per_tensor_scope_uses_each_tensors_own_sum():
    a = torch.tensor([1.0], dtype=F64, requires_grad=True)
    b = torch.tensor([2.0], dtype=F64, requires_grad=True)
    opt = QODA([a, b], lr=0.5, step_size="adaptive_per_tensor")
    _field(a, b)
    opt.step()
    # D_1 per tensor: 2.5^2 for a, 1 for b; qhat = 0 so gamma = eta.
    ea, eb = (1 + 6.25) ** -0.5, (1 + 1.0) ** -0.5
    assert a.item() == pytest.approx(1 - 0.5 * ea * 2.5 - 0.5 * ea * 2.5, abs=1e-14)
    assert b.item() == pytest.approx(2 + 0.5 * eb * 1.0 + 0.5 * eb * 1.0, abs=1e-14)
    assert opt.state[a]["sq_diff_sum"].item() == 6.25
    assert opt.state[b]["sq_diff_sum"].item() == 1.0


def test_param_groups_have_separate_sums_and_lrs():
    a = torch.tensor([1.0], dtype=F64, requires_grad=True)
    b = torch.tensor([2.0], dtype=F64, requires_grad=True)
    opt = QODA([{"params": [a]}, {"params": [b], "lr": 0.1}], lr=0.5)
    _field(a, b)
    opt.step()
    ea, eb = 7.25 ** -0.5, 2.0 ** -0.5
    assert a.item() == pytest.approx(1 - 2 * 0.5 * ea * 2.5, abs=1e-14)
    assert b.item() == pytest.approx(2 + 2 * 0.1 * eb * 1.0, abs=1e-14)


def test_constant_policy_equals_optimistic_sgd():
    # Dual averaging with a constant step is gradient descent, so QODA with eta = gamma = 1 must
    # trace exactly the half-iterates of optimistic SGD with the same lr.
    gen = torch.Generator().manual_seed(3)
    game = BilinearGame.random(3, generator=gen, noise=AbsoluteNoise(0.3))
    twin = BilinearGame.random(3, generator=torch.Generator().manual_seed(3), noise=AbsoluteNoise(0.3))
    opt_q = QODA(game.parameters(), lr=0.2, step_size=ConstantStepSize())
    opt_o = optimistic(torch.optim.SGD(twin.parameters(), lr=0.2))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for _ in range(50):
        for opt, problem, g in ((opt_q, game, g1), (opt_o, twin, g2)):
            opt.zero_grad()
            problem.write_grad(g)
            opt.step()
        torch.testing.assert_close(game.z, twin.z, rtol=0, atol=1e-12)


def test_maximize_negates_the_dual_vector():
    x = torch.tensor([0.5, -1.0], dtype=F64, requires_grad=True)
    y = torch.tensor([0.5, -1.0], dtype=F64, requires_grad=True)
    opt_x, opt_y = QODA([x], lr=0.3), QODA([y], lr=0.3, maximize=True)
    for _ in range(3):
        x.grad = torch.stack([x.detach()[1], -x.detach()[0]]) + 0.1
        y.grad = -(torch.stack([y.detach()[1], -y.detach()[0]]) + 0.1)
        opt_x.step()
        opt_y.step()
    assert torch.equal(x, y)


def test_params_without_grad_are_skipped():
    a = torch.ones(2, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    opt = QODA([a, b], lr=1.0)
    a.grad = torch.ones(2)
    opt.step()
    assert torch.equal(b, torch.ones(2)) and b not in opt.state
    assert not torch.equal(a, torch.ones(2))


def _noisy_run(opt_factory, steps, stop_at=None, dtype=F64):
    """Run ``steps`` QODA steps on a noisy game; optionally checkpoint and restart at ``stop_at``."""
    def fresh():
        game = BilinearGame.random(2, generator=torch.Generator().manual_seed(5), noise=AbsoluteNoise(0.2))
        game = game.to(dtype)
        return game, opt_factory(game.parameters())

    game, opt = fresh()
    gen = torch.Generator().manual_seed(11)
    for t in range(steps):
        if t == stop_at:
            buf = io.BytesIO()
            torch.save({"model": game.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state()}, buf)
            del game, opt
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


@pytest.mark.parametrize(
    "factory",
    [
        lambda p: QODA(p, lr=0.7, qhat=0.25),
        lambda p: QODA(p, lr=0.7, step_size="adaptive_per_tensor"),
    ],
    ids=["group", "per_tensor"],
)
def test_state_dict_round_trip_is_bit_exact(factory):
    ref_game, ref_opt = _noisy_run(factory, 12)
    game, opt = _noisy_run(factory, 12, stop_at=5)
    assert torch.equal(game.z, ref_game.z)
    for p_ref, p in zip(ref_game.parameters(), game.parameters()):
        for key, value in ref_opt.state[p_ref].items():
            assert torch.equal(opt.state[p][key], value), key


def test_low_precision_params_keep_float32_sums_across_load():
    factory = lambda p: QODA(p, lr=0.5)  # noqa: E731
    ref_game, ref_opt = _noisy_run(factory, 8, dtype=torch.bfloat16)
    game, opt = _noisy_run(factory, 8, stop_at=3, dtype=torch.bfloat16)
    (p,) = game.parameters()
    assert opt.state[p]["group_sq_diff_sum"].dtype == torch.float32
    assert torch.equal(game.z, ref_game.z)


def test_lr_scheduler_scales_eta_and_gamma():
    # Constant operator V = c and constant policy: Y_{t+1} = -t c and the parameter after step t
    # is X_1 - lr_t (t + 1) c, where lr_t is the lr in force at step t.
    x = torch.zeros(3, dtype=F64, requires_grad=True)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    opt = QODA([x], lr=0.4, step_size="constant")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lrs = [0.4, 0.4, 0.2, 0.2, 0.1]
    for t, lr_t in enumerate(lrs, start=1):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_t)
        x.grad = c.clone()
        opt.step()
        sched.step()
        torch.testing.assert_close(x.detach(), -lr_t * (t + 1) * c, rtol=0, atol=1e-15)


def test_custom_policy_is_used():
    class Halving(StepSizePolicy):
        uses_differences = False

        def step_sizes(self, sq_diff_sum, qhat):
            return 0.5, 0.0  # no optimism: plain dual averaging with half the lr

    x = torch.zeros(2, dtype=F64, requires_grad=True)
    opt = QODA([x], lr=1.0, step_size=Halving())
    x.grad = torch.tensor([2.0, 4.0], dtype=F64)
    opt.step()
    assert x.tolist() == [-1.0, -2.0]


def test_per_tensor_custom_policy_with_float_step_sizes():
    class PerTensorHalf(StepSizePolicy):
        scope = "tensor"
        uses_differences = False

        def step_sizes(self, sq_diff_sum, qhat):
            return 0.5, 0.25

    a = torch.zeros(2, dtype=F64, requires_grad=True)
    b = torch.zeros(3, dtype=F64, requires_grad=True)
    opt = QODA([a, b], lr=2.0, step_size=PerTensorHalf())
    a.grad, b.grad = torch.ones(2, dtype=F64), torch.full((3,), 2.0, dtype=F64)
    opt.step()
    # X = -lr (eta + gamma) V = -2 * 0.75 * V
    assert a.tolist() == [-1.5, -1.5] and b.tolist() == [-3.0, -3.0, -3.0]


def _param():
    return [torch.zeros(2, requires_grad=True)]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(lr=-1), ValueError, r"Invalid learning rate: -1"),
        (dict(lr="0.1"), TypeError, r"lr must be a float or a 1-element Tensor, got str"),
        (dict(lr=torch.ones(2)), ValueError, r"Tensor lr must be 1-element, got 2"),
        (dict(qhat=0.3), ValueError, r"Invalid qhat: 0.3 \(must be in \[0, 0.25\]\)"),
        (dict(qhat=-0.01), ValueError, r"Invalid qhat: -0.01"),
        (dict(qhat=None), TypeError, r"qhat must be a float, got NoneType"),
        (dict(step_size="adagrad"), ValueError, r"Unknown step_size 'adagrad'; choose one of \['adaptive', "),
        (dict(step_size=3), TypeError, r"step_size must be a str or a StepSizePolicy, got int"),
        (dict(maximize=1), TypeError, r"maximize must be a bool, got int"),
        (dict(params=[]), ValueError, r"optimizer got an empty parameter list"),
        (dict(params=torch.zeros(2)), TypeError, r"params argument given to the optimizer should be an iterable"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    kwargs = dict(kwargs)
    params = kwargs.pop("params", None)
    with pytest.raises(error, match=match):
        QODA(_param() if params is None else params, **kwargs)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: ConstantStepSize(eta=0.0), ValueError, r"eta must be > 0, got 0.0"),
        (lambda: ConstantStepSize(gamma=-1.0), ValueError, r"gamma must be >= 0, got -1.0"),
        (lambda: AdaptiveStepSize(scope="layer"), ValueError, r"scope must be one of \('group', 'tensor'\), got 'layer'"),
        (lambda: QODA(_param()).add_param_group({"params": _param(), "lr": -2.0}), ValueError,
         r"Invalid learning rate: -2.0"),
    ],
)
def test_bad_policy_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_sparse_gradient_is_rejected():
    x = torch.zeros(3, requires_grad=True)
    opt = QODA([x])
    x.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="QODA does not support sparse gradients"):
        opt.step()


def test_closure_runs_and_returns_loss():
    x = torch.tensor([1.0, -1.0], requires_grad=True)
    opt = QODA([x], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (x ** 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(2.0)
    assert math.isfinite(x.sum().item()) and x.abs().max().item() < 1.0
