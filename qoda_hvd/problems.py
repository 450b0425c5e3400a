r"""Monotone variational-inequality test problems: bilinear and quadratic min-max games.

Each problem is an affine monotone operator on the stacked point :math:`z = (x, y)`,

.. math::
    A(z) = M (z - z^\star), \qquad M = \begin{pmatrix} P & B \\ -B^\top & Q \end{pmatrix},

the game field :math:`(\nabla_x f, -\nabla_y f)` of
:math:`f(x, y) = \tfrac12 \tilde x^\top P \tilde x + \tilde x^\top B \tilde y
- \tfrac12 \tilde y^\top Q \tilde y` with :math:`\tilde x = x - x^\star`,
:math:`\tilde y = y - y^\star`. :math:`P, Q \succeq 0` make it monotone (:math:`z^\star` solves the
VI); :math:`P, Q \succeq \mu I` with :math:`\mu > 0` make it :math:`\mu`-strongly monotone.

The problems are ``nn.Module``\ s with one parameter ``z``, so any optimizer can run on them
without a loss: :meth:`LinearGame.write_grad` puts a (noisy) operator value into ``z.grad``.
Noise is drawn from an explicit ``torch.Generator`` only:

- :class:`AbsoluteNoise` ``(sigma)``: :math:`A(z) + \sigma \xi`, :math:`\xi \sim N(0, I_d)`
  (variance :math:`d\sigma^2`, does not vanish at the solution: rates :math:`O(1/\sqrt T)`);
- :class:`RelativeNoise` ``(sigma)``: :math:`A(z) + \sigma \lVert A(z) \rVert \xi/\sqrt d`
  (variance :math:`\sigma^2 \lVert A(z) \rVert^2`, vanishes at the solution: rates :math:`O(1/T)`
  for the ergodic gap, linear for strongly monotone or bilinear games with full-rank :math:`B`).

Quality measures: :meth:`LinearGame.distance_to_solution` and the restricted gap
:meth:`LinearGame.gap` (Nesterov's merit function for monotone VIs, exact for these problems).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "NoiseModel",
    "NoNoise",
    "AbsoluteNoise",
    "RelativeNoise",
    "NOISE_MODELS",
    "make_noise",
    "LinearGame",
    "BilinearGame",
    "QuadraticGame",
]


class NoiseModel:
    """Noise added to the exact operator value by a stochastic oracle."""

    def sample(self, value: Tensor, generator: torch.Generator) -> Tensor:
        """Return a noise vector for the exact operator ``value`` (same shape), drawn from
        ``generator``."""
        raise NotImplementedError(f"{type(self).__name__} must implement sample()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


def _check_sigma(sigma: float) -> float:
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool):
        raise TypeError(f"sigma must be a float, got {type(sigma).__name__}")
    if not (sigma >= 0.0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    return float(sigma)


class NoNoise(NoiseModel):
    """Exact oracle."""

    def sample(self, value: Tensor, generator: torch.Generator) -> Tensor:
        return torch.zeros_like(value)


class AbsoluteNoise(NoiseModel):
    r"""Additive Gaussian noise :math:`\sigma \xi`, :math:`\xi \sim N(0, I_d)` (per-coordinate
    standard deviation ``sigma``).

    Args:
        sigma: per-coordinate standard deviation, >= 0.

    Example::

        >>> game = BilinearGame.random(4, noise=AbsoluteNoise(0.1), generator=g)
    """

    def __init__(self, sigma: float) -> None:
        self.sigma = _check_sigma(sigma)

    def sample(self, value: Tensor, generator: torch.Generator) -> Tensor:
        noise = torch.randn(value.shape, generator=generator, dtype=value.dtype, device=value.device)
        return noise.mul_(self.sigma)


class RelativeNoise(NoiseModel):
    r"""Gaussian noise proportional to the operator: :math:`\sigma \lVert A(z) \rVert \xi/\sqrt d`,
    so :math:`E\lVert\text{noise}\rVert^2 = \sigma^2 \lVert A(z) \rVert^2`.

    Args:
        sigma: relative noise level, >= 0.

    Example::

        >>> game = BilinearGame.random(4, noise=RelativeNoise(0.5), generator=g)
    """

    def __init__(self, sigma: float) -> None:
        self.sigma = _check_sigma(sigma)

    def sample(self, value: Tensor, generator: torch.Generator) -> Tensor:
        noise = torch.randn(value.shape, generator=generator, dtype=value.dtype, device=value.device)
        return noise.mul_(self.sigma * value.norm() / math.sqrt(max(value.numel(), 1)))


#: Names accepted by :func:`make_noise`.
NOISE_MODELS: dict[str, Callable[..., NoiseModel]] = {
    "none": lambda sigma=0.0: NoNoise(),
    "absolute": AbsoluteNoise,
    "relative": RelativeNoise,
}


def make_noise(noise: str | NoiseModel | None, sigma: float = 0.0) -> NoiseModel:
    """Resolve ``noise`` (a :data:`NOISE_MODELS` name, an instance, or None for exact)."""
    if noise is None:
        return NoNoise()
    if isinstance(noise, NoiseModel):
        return noise
    if isinstance(noise, str):
        try:
            factory = NOISE_MODELS[noise]
        except KeyError:
            raise ValueError(f"Unknown noise {noise!r}; choose one of {sorted(NOISE_MODELS)}") from None
        return factory(sigma)
    raise TypeError(f"noise must be a str, a NoiseModel or None, got {type(noise).__name__}")


class LinearGame(nn.Module):
    r"""Affine monotone VI :math:`A(z) = M(z - z^\star)` with a trainable point ``z``.

    Args:
        matrix: :math:`M`, ``(d, d)``; its symmetric part must be positive semidefinite
            (monotonicity), checked up to rounding.
        solution: :math:`z^\star`, ``(d,)``; defaults to zeros.
        noise: noise model of :meth:`oracle` (default exact).
        init: starting point of the parameter ``z``; defaults to zeros.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> game = BilinearGame.random(3, noise=AbsoluteNoise(0.1), generator=g)
        >>> opt = QODA(game.parameters(), lr=0.5)
        >>> for _ in range(100):
        ...     _ = opt.zero_grad(); _ = game.write_grad(g); _ = opt.step()
        >>> bool(game.distance_to_solution() < 1.0)
        True
    """

    def __init__(
        self,
        matrix: Tensor,
        solution: Tensor | None = None,
        noise: NoiseModel | str | None = None,
        init: Tensor | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(matrix, Tensor):
            raise TypeError(f"matrix must be a Tensor, got {type(matrix).__name__}")
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
            raise ValueError(f"matrix must be square (d, d) with d >= 1, got shape {tuple(matrix.shape)}")
        if not matrix.is_floating_point():
            raise TypeError(f"matrix must be floating point, got {matrix.dtype}")
        d = matrix.shape[0]
        sym = 0.5 * (matrix + matrix.T)
        eigs = torch.linalg.eigvalsh(sym.double())
        tol = 1e-10 * max(1.0, float(matrix.abs().max()))
        if float(eigs.min()) < -tol:
            raise ValueError(
                f"matrix is not monotone: its symmetric part has eigenvalue {float(eigs.min()):.3g} < 0"
            )
        solution = torch.zeros(d, dtype=matrix.dtype) if solution is None else solution
        init = torch.zeros(d, dtype=matrix.dtype) if init is None else init
        for name, vec in (("solution", solution), ("init", init)):
            if not isinstance(vec, Tensor) or vec.shape != (d,):
                shape = tuple(vec.shape) if isinstance(vec, Tensor) else type(vec).__name__
                raise ValueError(f"{name} must be a tensor of shape ({d},), got {shape}")
        self.register_buffer("matrix", matrix.detach().clone())
        self.register_buffer("solution", solution.detach().clone().to(matrix.dtype))
        self.noise = make_noise(noise)
        self.z = nn.Parameter(init.detach().clone().to(matrix.dtype))

    @property
    def dim(self) -> int:
        """Dimension d of the stacked point z."""
        return self.matrix.shape[0]

    def operator(self, z: Tensor | None = None) -> Tensor:
        """Exact operator :math:`A(z) = M(z - z^\\star)` (at the parameter when ``z`` is None)."""
        z = self.z.detach() if z is None else z
        return self.matrix @ (z - self.solution)

    def oracle(self, generator: torch.Generator, z: Tensor | None = None) -> Tensor:
        """Stochastic operator value: :meth:`operator` plus the noise model's sample."""
        value = self.operator(z)
        return value + self.noise.sample(value, generator)

    @torch.no_grad()
    def write_grad(self, generator: torch.Generator | None = None) -> Tensor:
        """Write the oracle at the current parameter into ``z.grad`` (the exact operator when
        ``generator`` is None) and return it. Accumulates like ``backward()`` if a grad exists."""
        if generator is None:
            value = self.operator()
        else:
            value = self.oracle(generator)
        if self.z.grad is None:
            self.z.grad = value.clone()
        else:
            self.z.grad.add_(value)
        return self.z.grad

    @torch.no_grad()
    def distance_to_solution(self, z: Tensor | None = None) -> float:
        """:math:`\\lVert z - z^\\star \\rVert`."""
        z = self.z if z is None else z
        return float((z - self.solution).norm())

    @torch.no_grad()
    def gap(self, z: Tensor | None = None, radius: float = 1.0) -> float:
        r"""Restricted gap :math:`\max_{\lVert z' - z^\star\rVert \le r} \langle A(z'), z - z'\rangle`.

        Zero exactly at the solution and positive elsewhere (for :math:`M \ne 0`); the standard
        merit function of monotone VIs, whose ergodic (averaged-iterate) value the
        :math:`O(1/\sqrt T)` and :math:`O(1/T)` rates bound. With :math:`w = z' - z^\star`,
        :math:`v = z - z^\star`, :math:`S = (M + M^\top)/2`: maximise :math:`(M^\top v)^\top w
        - w^\top S w` over :math:`\lVert w \rVert \le r`, a trust-region problem solved exactly
        here (eigenbasis of :math:`S`, bisection on the multiplier).

        Args:
            z: point to evaluate (default: the parameter).
            radius: :math:`r > 0`.
        """
        if not radius > 0:
            raise ValueError(f"radius must be > 0, got {radius}")
        z = self.z if z is None else z
        m = self.matrix.double()
        v = (z.double() - self.solution.double())
        lin = m.T @ v
        sym = 0.5 * (m + m.T)
        evals, evecs = torch.linalg.eigh(sym)
        evals = evals.clamp_min(0.0)
        c = evecs.T @ lin  # coordinates of the linear term

        def w_of(lam: float) -> Tensor:
            denom = 2.0 * (evals + lam)
            return torch.where(denom > 0, c / denom.clamp_min(1e-300), torch.zeros_like(c))

        # Interior optimum (lam = 0) when it exists and fits in the ball.
        zero_curv = (evals <= 0) & (c.abs() > 0)
        if not bool(zero_curv.any()):
            w = w_of(0.0)
            if float(w.norm()) <= radius:
                return float(c @ w - (evals * w * w).sum())
        # Boundary: ||w(lam)|| = r, decreasing in lam; bracket then bisect.
        lo, hi = 0.0, float(c.norm()) / (2.0 * radius) + 1.0
        while float(w_of(hi).norm()) > radius:
            hi *= 2.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if float(w_of(mid).norm()) > radius:
                lo = mid
            else:
                hi = mid
        w = w_of(hi)
        return float(c @ w - (evals * w * w).sum())


def _block_matrix(p: Tensor, b: Tensor, q: Tensor) -> Tensor:
    top = torch.cat([p, b], dim=1)
    bottom = torch.cat([-b.T, q], dim=1)
    return torch.cat([top, bottom], dim=0)


class QuadraticGame(LinearGame):
    r"""Quadratic game :math:`\min_x \max_y \tfrac12 \tilde x^\top P \tilde x + \tilde x^\top B
    \tilde y - \tfrac12 \tilde y^\top Q \tilde y`; strongly monotone when :math:`P, Q \succ 0`.

    Args:
        p: :math:`P`, ``(n, n)`` symmetric PSD.
        b: :math:`B`, ``(n, m)`` coupling.
        q: :math:`Q`, ``(m, m)`` symmetric PSD.
        solution: :math:`z^\star = (x^\star, y^\star)`, ``(n + m,)``; zeros by default.
        noise: oracle noise model.
        init: starting point.

    Example::

        >>> game = QuadraticGame.random(4, mu=0.1, generator=torch.Generator().manual_seed(0))
    """

    def __init__(
        self,
        p: Tensor,
        b: Tensor,
        q: Tensor,
        solution: Tensor | None = None,
        noise: NoiseModel | str | None = None,
        init: Tensor | None = None,
    ) -> None:
        if b.dim() != 2:
            raise ValueError(f"b must be a matrix (n, m), got shape {tuple(b.shape)}")
        n, m = b.shape
        if p.shape != (n, n) or q.shape != (m, m):
            raise ValueError(
                f"p must be ({n}, {n}) and q ({m}, {m}) for b of shape ({n}, {m}), "
                f"got {tuple(p.shape)} and {tuple(q.shape)}"
            )
        self.n, self.m = n, m
        super().__init__(_block_matrix(p, b, q), solution=solution, noise=noise, init=init)

    def split(self, z: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x, y)`` parts of the stacked point."""
        z = self.z if z is None else z
        return z[: self.n], z[self.n:]

    @classmethod
    def random(
        cls,
        n: int,
        m: int | None = None,
        *,
        mu: float = 0.1,
        generator: torch.Generator,
        noise: NoiseModel | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> "QuadraticGame":
        """Random :math:`\\mu`-strongly monotone game: :math:`P = G G^\\top/n + \\mu I`,
        :math:`Q` alike, :math:`B` Gaussian / sqrt(n); random :math:`z^\\star` and start, all
        from ``generator``."""
        m = n if m is None else m
        _check_dims(n, m)
        if not mu > 0:
            raise ValueError(f"mu must be > 0 for a strongly monotone game, got {mu}")
        gp = torch.randn(n, n, generator=generator, dtype=dtype)
        gq = torch.randn(m, m, generator=generator, dtype=dtype)
        b = torch.randn(n, m, generator=generator, dtype=dtype) / math.sqrt(n)
        p = gp @ gp.T / n + mu * torch.eye(n, dtype=dtype)
        q = gq @ gq.T / m + mu * torch.eye(m, dtype=dtype)
        solution = torch.randn(n + m, generator=generator, dtype=dtype)
        init = solution + torch.randn(n + m, generator=generator, dtype=dtype)
        return cls(p, b, q, solution=solution, noise=noise, init=init)


class BilinearGame(QuadraticGame):
    r"""Bilinear game :math:`\min_x \max_y \tilde x^\top A \tilde y + \tfrac{\mu}2 \lVert\tilde
    x\rVert^2 - \tfrac{\mu}2 \lVert \tilde y\rVert^2` (:math:`\mu = 0`: the pure bilinear game,
    monotone but not strongly; simultaneous gradient descent-ascent diverges on it).

    Args:
        a: coupling matrix :math:`A`, ``(n, m)``.
        mu: regularisation >= 0.
        solution: :math:`z^\star`; zeros by default.
        noise: oracle noise model.
        init: starting point.

    Example::

        >>> game = BilinearGame(torch.eye(2, dtype=torch.float64), init=torch.ones(4, dtype=torch.float64))
    """

    def __init__(
        self,
        a: Tensor,
        mu: float = 0.0,
        solution: Tensor | None = None,
        noise: NoiseModel | str | None = None,
        init: Tensor | None = None,
    ) -> None:
        if not (isinstance(mu, (int, float)) and mu >= 0):
            raise ValueError(f"mu must be >= 0, got {mu}")
        if not isinstance(a, Tensor) or a.dim() != 2:
            raise ValueError("a must be a matrix tensor (n, m)")
        n, m = a.shape
        self.mu = float(mu)
        super().__init__(
            mu * torch.eye(n, dtype=a.dtype), a, mu * torch.eye(m, dtype=a.dtype),
            solution=solution, noise=noise, init=init,
        )

    @classmethod
    def random(  # type: ignore[override]
        cls,
        n: int,
        m: int | None = None,
        *,
        mu: float = 0.0,
        generator: torch.Generator,
        noise: NoiseModel | str | None = None,
        dtype: torch.dtype = torch.float64,
        condition: float = 4.0,
    ) -> "BilinearGame":
        """Random game whose square coupling :math:`A = U\\,\\mathrm{diag}(s)\\,V^\\top` has
        singular values evenly spaced in ``[1/condition, 1]`` (so the solution is unique and the
        problem's conditioning is fixed); random :math:`z^\\star` and start from ``generator``."""
        m = n if m is None else m
        _check_dims(n, m)
        if not condition >= 1:
            raise ValueError(f"condition must be >= 1, got {condition}")
        k = min(n, m)
        u, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=dtype))
        v, _ = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=dtype))
        s = torch.linspace(1.0 / condition, 1.0, k, dtype=dtype)
        a = u[:, :k] @ torch.diag(s) @ v[:, :k].T
        solution = torch.randn(n + m, generator=generator, dtype=dtype)
        init = solution + torch.randn(n + m, generator=generator, dtype=dtype)
        return cls(a, mu=mu, solution=solution, noise=noise, init=init)


def _check_dims(n: int, m: int) -> None:
    for name, value in (("n", n), ("m", m)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
