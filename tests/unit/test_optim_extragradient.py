"""Extra-gradient baseline: hand-computed iteration, call order, adaptive policy, state."""
from __future__ import annotations

import pytest
import torch

from qoda_hvd.optim import ExtraGradient

torch.set_num_threads(1)
F64 = torch.float64


def _field(x: torch.Tensor) -> torch.Tensor:
    """F(x) = (x_2 + 1/2, -x_1), written into x.grad."""
    v = torch.stack([x.detach()[1] + 0.5, -x.detach()[0]])
    x.grad = v.clone()
    return v


def test_one_constant_iteration_by_hand():
    x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    opt = ExtraGradient([x], lr=0.5)
    _field(x)                       # g(x_1) = (2.5, -1)
    opt.extrapolation()
    assert x.tolist() == [1 - 0.5 * 2.5, 2 + 0.5 * 1.0]      # x_{3/2} = (-0.25, 2.5)
    _field(x)                       # g(x_{3/2}) = (3.0, 0.25)
    opt.step()
    assert x.tolist() == [1 - 0.5 * 3.0, 2 - 0.5 * 0.25]     # x_2 = x_1 - 0.5 g(x_{3/2})


def test_adaptive_step_sizes_use_past_differences_only():
    x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    opt = ExtraGradient([x], lr=0.5, qhat=0.25, step_size="adaptive")
    # Iteration 1: S_0 = 0, so eta_1 = gamma_1 = 1: same as the constant case.
    _field(x)
    opt.extrapolation()
    _field(x)
    opt.step()
    assert x.tolist() == [-0.5, 1.875]
    # D_1 = ||(2.5, -1) - (3.0, 0.25)||^2 = 0.25 + 1.5625; iteration 2 uses S_1 = D_1.
    s1 = 0.25 + 1.5625
    eta2, gamma2 = (1 + s1) ** -0.5, (1 + s1) ** -0.25
    g1 = (1.875 + 0.5, 0.5)                                   # g(x_2)
    half = (-0.5 - 0.5 * gamma2 * g1[0], 1.875 - 0.5 * gamma2 * g1[1])
    _field(x)
    opt.extrapolation()
    assert x.tolist() == pytest.approx(half, abs=1e-15)
    g2 = (half[1] + 0.5, -half[0])                            # g(x_{5/2})
    _field(x)
    opt.step()
    assert x.tolist() == pytest.approx((-0.5 - 0.5 * eta2 * g2[0], 1.875 - 0.5 * eta2 * g2[1]), abs=1e-15)
    s2 = s1 + (g1[0] - g2[0]) ** 2 + (g1[1] - g2[1]) ** 2
    assert opt.state[x]["group_sq_diff_sum"].item() == pytest.approx(s2, abs=1e-14)


def test_call_order_misuse_is_a_runtime_error():
    x = torch.zeros(2, requires_grad=True)
    opt = ExtraGradient([x], lr=0.1)
    x.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match=r"step\(\) called without extrapolation\(\)"):
        opt.step()
    opt.extrapolation()
    with pytest.raises(RuntimeError, match=r"extrapolation\(\) called twice in a row"):
        opt.extrapolation()
    opt.step()
    with pytest.raises(RuntimeError, match=r"without extrapolation"):
        opt.step()


def test_state_dict_round_trip_between_iterations():
    def run(stop):
        x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
        opt = ExtraGradient([x], lr=0.3, step_size="adaptive")
        for t in range(6):
            if t == stop:
                sd = opt.state_dict()
                x2 = x.detach().clone().requires_grad_(True)
                opt = ExtraGradient([x2], lr=0.3, step_size="adaptive")
                opt.load_state_dict(sd)
                x = x2
            _field(x)
            opt.extrapolation()
            _field(x)
            opt.step()
        return x

    assert torch.equal(run(None), run(3))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(lr=-0.5), ValueError, r"Invalid learning rate: -0.5"),
        (dict(qhat=1.0), ValueError, r"Invalid qhat: 1.0"),
        (dict(step_size="sgd"), ValueError, r"Unknown step_size 'sgd'"),
        (dict(maximize="no"), TypeError, r"maximize must be a bool, got str"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ExtraGradient([torch.zeros(1, requires_grad=True)], **kwargs)


def test_maximize_negates_the_operator():
    x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    y = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    opt_x = ExtraGradient([x], lr=0.3, step_size="adaptive")
    opt_y = ExtraGradient([y], lr=0.3, step_size="adaptive", maximize=True)
    for _ in range(3):
        for opt_call in ("extrapolation", "step"):
            _field(x)
            y.grad = -_field(y)
            getattr(opt_x, opt_call)()
            getattr(opt_y, opt_call)()
    assert torch.equal(x, y)
