"""Extra-gradient (Q-GenX-style baseline): two gradients, hence two exchanges, per iteration.

The baseline QODA is measured against (ALGORITHM.md section 2): where QODA reuses last round's
aggregate for the extrapolation, extra-gradient takes a fresh gradient at ``x_t`` for it. Pure
math: wrapped by the distributed optimizer each of the two gradients is one quantized exchange.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from qoda_hvd.optim.qoda import (
    StepSizeOptimizer,
    StepSizePolicy,
    accumulate_sq_diffs,
    read_sq_diff_sums,
    step_sizes_per_param,
)

__all__ = ["ExtraGradient"]


class ExtraGradient(StepSizeOptimizer):
    r"""Extra-gradient: :meth:`extrapolation` with :math:`g(x_t)`, then :meth:`step` with
    :math:`g(x_{t+1/2})`.

    .. math::
        \begin{aligned}
        &\textbf{for}\ t = 1, 2, \ldots \ \textbf{do} \\
        &\quad \eta_t, \gamma_t \text{ from the policy at } S_{t-1}
            = \textstyle\sum_{s<t} D_s \quad (S_0 = 0) \\
        &\quad \texttt{extrapolation()}:\ x_{t+1/2} = x_t - \text{lr}\,\gamma_t\, g(x_t)
            \quad (\text{saves } x_t \text{ and } g(x_t)) \\
        &\quad \texttt{step()}:\ x_{t+1} = x_t - \text{lr}\,\eta_t\, g(x_{t+1/2}), \qquad
            D_t = \lVert g(x_t) - g(x_{t+1/2}) \rVert^2
        \end{aligned}

    With the default ``step_size="constant"`` (:math:`\eta = \gamma = 1`) this is the classical
    extra-gradient method with step ``lr``. ``step_size="adaptive"`` uses QODA's policy
    (:class:`~qoda_hvd.optim.qoda.AdaptiveStepSize`: :math:`\eta_t = (1+S_{t-1})^{-1/2}`,
    :math:`\gamma_t = (1+S_{t-1})^{\hat q-1/2}`) with the Q-GenX difference
    :math:`D_t` between the two gradients of one iteration; both steps of iteration :math:`t`
    use only :math:`D_s, s < t`, so they are known before the iteration starts.

    Variational inequalities: ``p.grad`` is the operator :math:`A(x)`, descended upon;
    ``maximize=True`` negates it. Calling :meth:`step` without a preceding
    :meth:`extrapolation` (or :meth:`extrapolation` twice) raises ``RuntimeError``.

    State per parameter: ``base_iterate`` (:math:`x_t`), ``extrapolation_grad``
    (:math:`g(x_t)`), ``step``; the adaptive sums as in :class:`~qoda_hvd.optim.qoda.QODA`.
    Checkpoint between full iterations (after :meth:`step`): which phase comes next is not part
    of ``state_dict()``.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: base step size (multiplies :math:`\eta` and :math:`\gamma`; default 0.1).
        qhat: learning-rate separation exponent in [0, 1/4] (adaptive policy only; default 0).
        step_size: ``"constant"`` (default), ``"adaptive"``, ``"adaptive_per_tensor"`` or a
            :class:`~qoda_hvd.optim.qoda.StepSizePolicy`.
        maximize: ascend on ``p.grad`` (default False).

    Example::

        >>> opt = ExtraGradient(model.parameters(), lr=0.1)
        >>> opt.zero_grad(); loss_fn(model(batch)).backward(); opt.extrapolation()
        >>> opt.zero_grad(); loss_fn(model(batch)).backward(); opt.step()
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 0.1,
        qhat: float = 0.0,
        step_size: str | StepSizePolicy = "constant",
        *,
        maximize: bool = False,
    ) -> None:
        self._extrapolated = False
        super().__init__(params, lr, qhat, step_size, maximize)

    def _gather(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("ExtraGradient does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
        if group["maximize"] and grads:
            grads = list(torch._foreach_neg(grads))
        return params, grads

    @torch.no_grad()
    def extrapolation(self) -> None:
        """Save :math:`x_t` and :math:`g(x_t)`; move the parameters to
        :math:`x_{t+1/2} = x_t - \\mathrm{lr}\\,\\gamma_t\\, g(x_t)`."""
        if self._extrapolated:
            raise RuntimeError(
                "extrapolation() called twice in a row; call step() with the gradient at the "
                "extrapolated point before extrapolating again"
            )
        policy = self.step_size_policy
        for group in self.param_groups:
            params, grads = self._gather(group)
            if not params:
                continue
            bases, saved_grads = [], []
            for p in params:
                state = self.state[p]
                if "base_iterate" not in state:
                    state["step"] = torch.tensor(0.0)
                    state["base_iterate"] = torch.empty_like(p, memory_format=torch.preserve_format)
                    state["extrapolation_grad"] = torch.empty_like(p, memory_format=torch.preserve_format)
                bases.append(state["base_iterate"])
                saved_grads.append(state["extrapolation_grad"])
            torch._foreach_copy_(bases, params)
            torch._foreach_copy_(saved_grads, grads)
            sums = read_sq_diff_sums(self, group, params, policy)
            _, lr_gamma = step_sizes_per_param(
                policy, sums, group["qhat"], group["lr"], uniform=policy.scope == "group"
            )
            _sub_scaled_(params, grads, lr_gamma)
        self._extrapolated = True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Update from the saved :math:`x_t` with the gradient at the extrapolated point:
        :math:`x_{t+1} = x_t - \\mathrm{lr}\\,\\eta_t\\, g(x_{t+1/2})`.

        Args:
            closure: optional; re-evaluates the model at :math:`x_{t+1/2}` and returns the loss.
        """
        if not self._extrapolated:
            raise RuntimeError(
                "ExtraGradient.step() called without extrapolation(): each iteration is "
                "backward at x_t, extrapolation(), backward at x_{t+1/2}, step()"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        policy = self.step_size_policy
        for group in self.param_groups:
            params, grads = self._gather(group)
            params_grads = [(p, g) for p, g in zip(params, grads) if "base_iterate" in self.state[p]]
            if not params_grads:
                continue
            params, grads = [p for p, _ in params_grads], [g for _, g in params_grads]
            states = [self.state[p] for p in params]
            sums = read_sq_diff_sums(self, group, params, policy)
            lr_eta, _ = step_sizes_per_param(
                policy, sums, group["qhat"], group["lr"], uniform=policy.scope == "group"
            )
            torch._foreach_copy_(params, [s["base_iterate"] for s in states])
            _sub_scaled_(params, grads, lr_eta)
            torch._foreach_add_([s["step"] for s in states], 1.0)
            if policy.uses_differences:
                diffs = torch._foreach_sub([s["extrapolation_grad"] for s in states], grads)
                accumulate_sq_diffs(self, group, params, diffs, policy)
        self._extrapolated = False
        return loss


def _sub_scaled_(params: list[Tensor], grads: list[Tensor], factors: list[Any]) -> None:
    """``p -= f * g`` for each triple, vectorised over the list."""
    first = factors[0]
    if all(f is first for f in factors):
        torch._foreach_sub_(params, torch._foreach_mul(grads, first))
    else:
        torch._foreach_sub_(params, torch._foreach_mul(grads, list(factors)))
