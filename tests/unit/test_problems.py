"""VI test problems: operators against autograd, solutions, the restricted gap, noise models."""
from __future__ import annotations

import math

import pytest
import torch

from qoda_hvd.problems import (
    AbsoluteNoise,
    BilinearGame,
    LinearGame,
    NoNoise,
    QuadraticGame,
    RelativeNoise,
    make_noise,
)

torch.set_num_threads(1)
F64 = torch.float64


def _objective(game: QuadraticGame, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n = game.n
    m = game.matrix
    p, b, q = m[:n, :n], m[:n, n:], m[n:, n:]
    xs, ys = game.split(game.solution)
    dx, dy = x - xs, y - ys
    return 0.5 * dx @ p @ dx + dx @ b @ dy - 0.5 * dy @ q @ dy


@pytest.mark.parametrize("kind", ["bilinear", "bilinear_reg", "quadratic"])
def test_operator_is_the_game_field(kind):
    gen = torch.Generator().manual_seed(0)
    if kind == "quadratic":
        game = QuadraticGame.random(3, 2, mu=0.3, generator=gen)
    else:
        game = BilinearGame.random(3, 2, mu=0.5 if kind == "bilinear_reg" else 0.0, generator=gen)
    x, y = (t.detach().clone().requires_grad_(True) for t in game.split())
    gx, gy = torch.autograd.grad(_objective(game, x, y), (x, y))
    torch.testing.assert_close(game.operator(), torch.cat([gx, -gy]), rtol=0, atol=1e-12)
    assert game.operator(game.solution).abs().max().item() == 0.0


def test_bilinear_game_matches_its_definition():
    a = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]], dtype=F64)
    z = torch.arange(5, dtype=F64)
    game = BilinearGame(a, mu=0.5, init=z)
    x, y = z[:3], z[3:]
    torch.testing.assert_close(game.operator(), torch.cat([a @ y + 0.5 * x, -a.T @ x + 0.5 * y]))


def test_gap_of_bilinear_game_is_radius_times_operator_norm():
    game = BilinearGame.random(4, generator=torch.Generator().manual_seed(1))
    assert game.gap(radius=2.0) == pytest.approx(2.0 * game.operator().norm().item(), rel=1e-12)
    assert game.gap(game.solution) == 0.0


@pytest.mark.parametrize("offset", [0.05, 3.0], ids=["interior", "boundary"])
def test_gap_of_quadratic_game_matches_dense_search(offset):
    # d = 2: search the disk on a fine polar grid; the exact value must bound the grid maximum
    # from above and be within its discretisation error.
    p, b, q = (torch.tensor([[v]], dtype=F64) for v in (0.7, 1.3, 0.4))
    game = QuadraticGame(p, b, q, solution=torch.tensor([0.2, -0.1], dtype=F64))
    z = game.solution + torch.tensor([offset, -0.5 * offset], dtype=F64)
    r = 1.0
    radii = torch.linspace(0, r, 801, dtype=F64)
    angles = torch.linspace(0, 2 * math.pi, 2001, dtype=F64)
    w = torch.stack([torch.outer(radii, angles.cos()), torch.outer(radii, angles.sin())], -1).reshape(-1, 2)
    values = ((w @ game.matrix.T) * ((z - game.solution) - w)).sum(-1)  # <M w, v - w>
    exact = game.gap(z, radius=r)
    best = values.max().item()
    assert best <= exact + 1e-12
    assert exact - best < 1e-5
    assert exact > 0


def test_noise_models_have_the_stated_moments():
    n_samples = 20000
    gen = torch.Generator().manual_seed(5)
    value = torch.tensor([3.0, -4.0, 0.0, 0.0], dtype=F64)  # ||A|| = 5, d = 4
    for model, var in ((AbsoluteNoise(0.3), 4 * 0.3 ** 2), (RelativeNoise(0.2), (0.2 * 5.0) ** 2)):
        samples = torch.stack([model.sample(value, gen) for _ in range(n_samples)])
        sq = samples.pow(2).sum(-1)
        # E||noise||^2 = var; the sample mean of ||noise||^2 (chi-square, 4 dof, std var/sqrt 2)
        # is within 5 standard errors; the mean of each coordinate is 0 within 5 standard errors.
        assert abs(sq.mean().item() - var) < 5 * var / math.sqrt(2) / math.sqrt(n_samples)
        assert samples.mean(0).abs().max().item() < 5 * math.sqrt(var / 4 / n_samples)
    assert RelativeNoise(0.5).sample(torch.zeros(3), gen).abs().max().item() == 0.0
    assert NoNoise().sample(value, gen).abs().max().item() == 0.0


def test_oracle_uses_only_the_given_generator():
    game = BilinearGame.random(3, generator=torch.Generator().manual_seed(0), noise=AbsoluteNoise(1.0))
    global_state = torch.random.get_rng_state()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = game.oracle(g1)
    assert torch.equal(a, game.oracle(g2))
    assert not torch.equal(a, game.oracle(g1))
    assert torch.equal(torch.random.get_rng_state(), global_state)
    assert not torch.equal(a, game.operator())


def test_write_grad_feeds_any_optimizer():
    game = BilinearGame.random(2, mu=0.5, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(game.parameters(), lr=0.2)
    d0 = game.distance_to_solution()
    for _ in range(200):
        opt.zero_grad()
        written = game.write_grad()
        assert written is game.z.grad
        opt.step()
    # mu = 0.5 strongly monotone: plain gradient descent contracts.
    assert game.distance_to_solution() < 1e-6 * d0
    game.write_grad()
    game.write_grad()  # accumulates like backward()
    torch.testing.assert_close(game.z.grad, 2 * game.operator())


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: LinearGame(torch.tensor([[-1.0]])), ValueError, r"matrix is not monotone: .* eigenvalue -1 < 0"),
        (lambda: LinearGame(torch.ones(2, 3)), ValueError, r"matrix must be square \(d, d\) with d >= 1, got shape \(2, 3\)"),
        (lambda: LinearGame([[1.0]]), TypeError, r"matrix must be a Tensor, got list"),
        (lambda: LinearGame(torch.eye(2), solution=torch.zeros(3)), ValueError, r"solution must be a tensor of shape \(2,\), got \(3,\)"),
        (lambda: BilinearGame(torch.eye(2), mu=-1.0), ValueError, r"mu must be >= 0, got -1.0"),
        (lambda: QuadraticGame(torch.eye(2), torch.ones(2, 3), torch.eye(2)), ValueError, r"p must be \(2, 2\) and q \(3, 3\)"),
        (lambda: QuadraticGame.random(2, mu=0.0, generator=torch.Generator()), ValueError, r"mu must be > 0"),
        (lambda: BilinearGame.random(0, generator=torch.Generator()), ValueError, r"n must be an integer >= 1, got 0"),
        (lambda: AbsoluteNoise(-0.1), ValueError, r"sigma must be finite and >= 0, got -0.1"),
        (lambda: RelativeNoise("big"), TypeError, r"sigma must be a float, got str"),
        (lambda: make_noise("gaussian"), ValueError, r"Unknown noise 'gaussian'; choose one of \['absolute', 'none', 'relative'\]"),
        (lambda: BilinearGame(torch.eye(1)).gap(radius=0.0), ValueError, r"radius must be > 0, got 0.0"),
    ],
)
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()
