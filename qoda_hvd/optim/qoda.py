"""QODA: (quantized) optimistic dual averaging with adaptive step sizes, as a torch optimizer.

Pure math: nothing here communicates. When the optimizer is wrapped by
``qoda_hvd.DistributedOptimizer``, ``p.grad`` holds the aggregate of the quantized worker gradients
at step time; alone, it is the plain gradient. See ../shared/docs/ALGORITHM.md section 2.

The step-size rule is a swappable :class:`StepSizePolicy`. The paper's exact rule (its Eq. (6))
was not available to us; the default :class:`AdaptiveStepSize` is our reconstruction from the
predecessor literature (OptDA+ learning-rate separation, Q-GenX), as written in ALGORITHM.md.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "QODA",
    "StepSizePolicy",
    "AdaptiveStepSize",
    "ConstantStepSize",
    "STEP_SIZE_POLICIES",
    "make_step_size_policy",
]

ScalarLike = Union[float, Tensor]

#: State keys. The group-wide accumulator lives in the state of the group's first parameter so
#: that ``state_dict()`` and ``hvd.broadcast_optimizer_state`` carry it like any other state.
_GROUP_SUM = "group_sq_diff_sum"
_TENSOR_SUM = "sq_diff_sum"
_SCOPES = ("group", "tensor")


class StepSizePolicy:
    """Maps the accumulated squared differences of successive dual vectors to ``(eta, gamma)``.

    ``eta`` scales the dual-averaging step (the anchor-to-iterate distance) and ``gamma`` the
    optimistic extrapolation; the group's ``lr`` multiplies both. Subclass and override
    :meth:`step_sizes` to plug in another rule.

    Attributes:
        scope: ``"group"``: one accumulated sum per parameter group, built from the norm over all
            of the group's tensors (one step size per group). ``"tensor"``: one sum, hence one
            step size, per parameter tensor (AdaGrad-norm per layer).
        uses_differences: whether :meth:`step_sizes` reads ``sq_diff_sum``; when False the
            optimizer skips computing the norms.
    """

    scope: str = "group"
    uses_differences: bool = True

    def step_sizes(self, sq_diff_sum: Tensor, qhat: float) -> tuple[ScalarLike, ScalarLike]:
        """Return ``(eta, gamma)`` (before multiplication by ``lr``).

        Args:
            sq_diff_sum: ``S_t = sum_{s<=t} D_s``, a 0-dim tensor (see :class:`QODA`).
            qhat: the learning-rate separation exponent of the parameter group.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement step_sizes()")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class AdaptiveStepSize(StepSizePolicy):
    r"""Default adaptive rule (our reconstruction, ALGORITHM.md section 2).

    .. math::
        \eta_{t+1} = (1 + S_t)^{-1/2}, \qquad \gamma_{t+1} = (1 + S_t)^{\hat q - 1/2},
        \qquad S_t = \sum_{s=1}^{t} \lVert V_{s+1/2} - V_{s-1/2} \rVert^2 .

    With ``qhat = 0`` both are equal; ``qhat in (0, 1/4]`` makes the extrapolation step decay more
    slowly than the dual-averaging step (OptDA+ "learning-rate separation").

    Args:
        scope: ``"group"`` (default: the norm is taken over all tensors of the parameter group)
            or ``"tensor"`` (one sum and step size per parameter tensor).

    Example::

        >>> opt = QODA(model.parameters(), lr=0.1, step_size=AdaptiveStepSize(scope="tensor"))
    """

    def __init__(self, scope: str = "group") -> None:
        if scope not in _SCOPES:
            raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")
        self.scope = scope

    def step_sizes(self, sq_diff_sum: Tensor, qhat: float) -> tuple[Tensor, Tensor]:
        base = sq_diff_sum + 1.0
        return base.pow(-0.5), base.pow(qhat - 0.5)


class ConstantStepSize(StepSizePolicy):
    """Constant ``eta`` and ``gamma`` (times ``lr``): for tests and for schedules driven only by
    an ``lr_scheduler``. ``qhat`` is ignored.

    Args:
        eta: dual-averaging step before ``lr``; must be > 0.
        gamma: extrapolation step before ``lr``; must be >= 0 (0 disables optimism: plain dual
            averaging). Defaults to ``eta``.

    Example::

        >>> opt = QODA(model.parameters(), lr=0.05, step_size=ConstantStepSize())
    """

    uses_differences = False

    def __init__(self, eta: float = 1.0, gamma: float | None = None) -> None:
        if not eta > 0.0:
            raise ValueError(f"eta must be > 0, got {eta}")
        gamma = eta if gamma is None else gamma
        if not gamma >= 0.0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.eta = float(eta)
        self.gamma = float(gamma)

    def step_sizes(self, sq_diff_sum: Tensor, qhat: float) -> tuple[float, float]:
        return self.eta, self.gamma


#: Names accepted by ``QODA(step_size=...)`` and ``ExtraGradient(step_size=...)``.
STEP_SIZE_POLICIES: dict[str, Callable[[], StepSizePolicy]] = {
    "adaptive": AdaptiveStepSize,
    "adaptive_per_tensor": lambda: AdaptiveStepSize(scope="tensor"),
    "constant": ConstantStepSize,
}


def make_step_size_policy(step_size: str | StepSizePolicy) -> StepSizePolicy:
    """Resolve a policy name from :data:`STEP_SIZE_POLICIES` or pass a policy instance through."""
    if isinstance(step_size, StepSizePolicy):
        if step_size.scope not in _SCOPES:
            raise ValueError(f"step_size.scope must be one of {_SCOPES}, got {step_size.scope!r}")
        return step_size
    if isinstance(step_size, str):
        try:
            return STEP_SIZE_POLICIES[step_size]()
        except KeyError:
            raise ValueError(
                f"Unknown step_size {step_size!r}; choose one of {sorted(STEP_SIZE_POLICIES)} "
                "or pass a StepSizePolicy instance"
            ) from None
    raise TypeError(
        f"step_size must be a str or a StepSizePolicy, got {type(step_size).__name__}"
    )


def validate_lr(lr: Any) -> None:
    """Shared check for ``lr`` (a float or a 0-dim tensor, >= 0)."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element, got {lr.numel()} elements")
    if not isinstance(lr, (int, float, Tensor)) or isinstance(lr, bool):
        raise TypeError(f"lr must be a float or a 1-element Tensor, got {type(lr).__name__}")
    if not 0.0 <= float(lr):
        raise ValueError(f"Invalid learning rate: {lr}")


def validate_qhat(qhat: Any) -> None:
    """Shared check for ``qhat`` in [0, 1/4]."""
    if not isinstance(qhat, (int, float)) or isinstance(qhat, bool):
        raise TypeError(f"qhat must be a float, got {type(qhat).__name__}")
    if not 0.0 <= qhat <= 0.25:
        raise ValueError(f"Invalid qhat: {qhat} (must be in [0, 0.25])")


def accumulate_sq_diffs(
    optimizer: Optimizer,
    group: dict[str, Any],
    params: Sequence[Tensor],
    diffs: Sequence[Tensor],
    policy: StepSizePolicy,
) -> list[Tensor]:
    """Add ``||diff||^2`` to the policy's accumulator(s); return the new sums, one per param.

    Group scope: one sum for the group (all returned entries are the same tensor); tensor scope:
    one sum per parameter. Vectorised: one ``_foreach_norm`` over the list, no host sync.
    """
    norms = torch._foreach_norm(list(diffs))
    if policy.scope == "tensor":
        sums = []
        for p in params:
            state = optimizer.state[p]
            if _TENSOR_SUM not in state:
                state[_TENSOR_SUM] = torch.zeros((), dtype=_acc_dtype(p), device=p.device)
            sums.append(state[_TENSOR_SUM])
        norms = [n if n.dtype == s.dtype else n.to(s.dtype) for n, s in zip(norms, sums)]
        torch._foreach_addcmul_(sums, norms, norms)
        return sums
    holder = optimizer.state[group["params"][0]]
    acc = holder.get(_GROUP_SUM)
    if acc is None:
        acc = torch.zeros((), dtype=_acc_dtype(params[0]), device=params[0].device)
    increment = torch.stack([n.to(device=acc.device, dtype=acc.dtype) for n in norms])
    acc = acc + increment.square().sum()
    holder[_GROUP_SUM] = acc
    return [acc] * len(params)


def read_sq_diff_sums(
    optimizer: Optimizer, group: dict[str, Any], params: Sequence[Tensor], policy: StepSizePolicy
) -> list[Tensor]:
    """The current accumulator(s) without adding anything (zeros before the first update)."""
    if policy.scope == "tensor":
        return [
            optimizer.state[p].get(_TENSOR_SUM, torch.zeros((), dtype=_acc_dtype(p), device=p.device))
            for p in params
        ]
    holder = optimizer.state[group["params"][0]]
    acc = holder.get(_GROUP_SUM)
    if acc is None:
        acc = torch.zeros((), dtype=_acc_dtype(params[0]), device=params[0].device)
    return [acc] * len(params)


def step_sizes_per_param(
    policy: StepSizePolicy, sums: Sequence[Tensor], qhat: float, lr: ScalarLike, uniform: bool
) -> tuple[list[ScalarLike], list[ScalarLike]]:
    """``lr * eta`` and ``lr * gamma`` for each parameter (computed once when ``uniform``)."""
    if uniform:
        eta, gamma = policy.step_sizes(sums[0], qhat)
        return [lr * eta] * len(sums), [lr * gamma] * len(sums)
    etas, gammas = [], []
    for s in sums:
        eta, gamma = policy.step_sizes(s, qhat)
        etas.append(lr * eta)
        gammas.append(lr * gamma)
    return etas, gammas


def restore_accumulator_dtypes(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    """Undo ``Optimizer.load_state_dict``'s cast of the step-size sums to the parameter dtype.

    torch casts every floating state tensor except ``step`` to the parameter's dtype; for
    float16/bfloat16 parameters that would round the sums, and resuming would no longer
    reproduce the uninterrupted run.
    """
    saved_state = state_dict["state"]
    for saved_group, group in zip(state_dict["param_groups"], optimizer.param_groups):
        for pid, p in zip(saved_group["params"], group["params"]):
            saved = saved_state.get(pid, {})
            for key in (_GROUP_SUM, _TENSOR_SUM):
                if key in saved and isinstance(saved[key], Tensor):
                    optimizer.state[p][key] = saved[key].to(device=p.device, copy=True)


def _acc_dtype(p: Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)


def _scale(tensors: list[Tensor], factors: list[ScalarLike]) -> list[Tensor]:
    """``[t * f for t, f in zip(...)]`` vectorised; a shared factor uses the scalar overload."""
    first = factors[0]
    if all(f is first for f in factors):
        return torch._foreach_mul(tensors, first)
    if not any(isinstance(f, Tensor) for f in factors):
        return torch._foreach_mul(tensors, [float(f) for f in factors])
    return torch._foreach_mul(
        tensors,
        [f if isinstance(f, Tensor) else torch.tensor(f, device=t.device) for t, f in zip(tensors, factors)],
    )


def qoda_update(
    params: list[Tensor],
    aggregates: list[Tensor],
    anchors: list[Tensor],
    dual_sums: list[Tensor],
    prev_aggregates: list[Tensor],
    *,
    lr_eta: list[ScalarLike],
    lr_gamma: list[ScalarLike],
) -> None:
    r"""Functional QODA kernel (in place): given ``V = aggregates`` (:math:`V_{t+1/2}`),

    ``Y <- Y - V``; ``params <- X_1 + lr_eta * Y - lr_gamma * V``; ``prev_aggregates <- V``.

    All lists hold tensors of one device and dtype (``torch._foreach_*`` fast path).
    """
    torch._foreach_sub_(dual_sums, aggregates)                       # Y_{t+1}
    torch._foreach_copy_(params, anchors)                            # X_1
    torch._foreach_add_(params, _scale(dual_sums, lr_eta))           # X_{t+1}
    torch._foreach_sub_(params, _scale(aggregates, lr_gamma))        # X_{t+3/2}
    torch._foreach_copy_(prev_aggregates, aggregates)                # V_{t+1/2} for D_{t+1}


class StepSizeOptimizer(Optimizer):
    """What QODA and ExtraGradient share: ``lr``/``qhat``/``maximize`` checks (also for added
    param groups), the step-size policy, and float32 accumulators across ``load_state_dict``."""

    def __init__(self, params, lr, qhat, step_size, maximize) -> None:
        validate_lr(lr)
        validate_qhat(qhat)
        if not isinstance(maximize, bool):
            raise TypeError(f"maximize must be a bool, got {type(maximize).__name__}")
        self.step_size_policy = make_step_size_policy(step_size)
        super().__init__(params, dict(lr=lr, qhat=qhat, maximize=maximize))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, check in (("lr", validate_lr), ("qhat", validate_qhat)):
            if key in param_group:
                check(param_group[key])
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        restore_accumulator_dtypes(self, state_dict)


class QODA(StepSizeOptimizer):
    r"""Optimistic dual averaging with adaptive step sizes (the math of QODA, no communication).

    The parameters always hold the *half-iterate* :math:`X_{t+1/2}`, the point where the next
    gradient is taken. ``p.grad`` at step time is the dual vector :math:`V_{t+1/2}`: wrapped by
    ``qoda_hvd.DistributedOptimizer`` it is the aggregate
    :math:`\frac1K\sum_k Q(g_k(X_{t+1/2}))`; single-process it is just the gradient.

    .. math::
        \begin{aligned}
        &\textbf{input}: X_1 \text{ (params)},\ \text{lr},\ \hat q \in [0, 1/4],
            \text{ policy } (\eta, \gamma) \\
        &\textbf{initialize}: Y_1 = 0,\ V_{1/2} = 0,\ S_0 = 0,
            \text{ hence } X_{3/2} = X_1 \\
        &\textbf{for}\ t = 1, 2, \ldots \ \textbf{do} \\
        &\quad V_{t+1/2} \leftarrow \texttt{p.grad}
            \quad (\text{evaluated at } X_{t+1/2};\ -\texttt{p.grad} \text{ if maximize}) \\
        &\quad D_t = \lVert V_{t+1/2} - V_{t-1/2} \rVert^2, \qquad S_t = S_{t-1} + D_t \\
        &\quad \eta_{t+1} = (1 + S_t)^{-1/2}, \qquad \gamma_{t+1} = (1 + S_t)^{\hat q - 1/2} \\
        &\quad Y_{t+1} = Y_t - V_{t+1/2} \\
        &\quad X_{t+1} = X_1 + \text{lr}\,\eta_{t+1}\, Y_{t+1} \\
        &\quad X_{t+3/2} = X_{t+1} - \text{lr}\,\gamma_{t+1}\, V_{t+1/2}
            \quad (\text{written into the parameters})
        \end{aligned}

    Index bookkeeping: :math:`S_t = \sum_{s<t+1} D_s` includes :math:`D_t`, built from the
    aggregate received in this very step, so :math:`\eta_{t+1}` and :math:`\gamma_{t+1}` use every
    dual vector up to :math:`V_{t+1/2}` (ALGORITHM.md: :math:`\eta_t = (1+\sum_{s<t} D_s)^{-1/2}`).
    With :math:`V_{1/2} = 0`, :math:`D_1 = \lVert V_{3/2} \rVert^2`, and :math:`\eta_1 = 1` is
    never needed because the first extrapolation multiplies :math:`V_{1/2} = 0`.

    By default the norm in :math:`D_t` runs over all tensors of the parameter group (one step
    size per group); ``step_size="adaptive_per_tensor"`` keeps one sum per tensor. The rule is a
    :class:`StepSizePolicy`: the paper's exact Eq. (6) was not available, so this default is our
    reconstruction (ALGORITHM.md section 2) and can be swapped.

    Variational inequalities: pass the operator :math:`A(X_{t+1/2})` as ``p.grad`` (for a game
    :math:`\min_x\max_y f`, that is :math:`(\nabla_x f, -\nabla_y f)`); the method *descends* along
    it. ``maximize=True`` negates ``p.grad`` (ascent on an objective).

    State per parameter (``self.state[p]``): ``anchor`` (:math:`X_1`), ``dual_sum`` (:math:`Y`),
    ``prev_aggregate`` (:math:`V_{t-1/2}`), ``step`` (float tensor); the group accumulator
    :math:`S` is kept as ``group_sq_diff_sum`` in the state of the group's first parameter
    (``sq_diff_sum`` per parameter with tensor scope): three parameter-sized buffers, one more
    than Adam. Parameters whose ``grad`` is None are skipped, as in ``torch.optim``.
    :meth:`base_iterates` returns :math:`X_{t+1}`. Every step is a few ``torch._foreach_*``
    kernels per (device, dtype) bucket and never synchronises with the host.

    .. warning::
        ``lr`` multiplies :math:`\eta` on the whole dual sum: lowering ``lr`` (an
        ``lr_scheduler``) moves :math:`X_{t+1}` towards the anchor :math:`X_1` at once, as dual
        averaging prescribes; it is not a smaller step from the current point.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: base scale multiplying both :math:`\eta` and :math:`\gamma` (default 0.1); what an
            ``lr_scheduler`` changes.
        qhat: learning-rate separation exponent in [0, 1/4] (default 0: :math:`\gamma = \eta`).
        step_size: a name from :data:`STEP_SIZE_POLICIES` (``"adaptive"`` default,
            ``"adaptive_per_tensor"``, ``"constant"``) or a :class:`StepSizePolicy`.
        maximize: ascend on ``p.grad`` instead of descending (default False).

    Example::

        >>> opt = QODA(model.parameters(), lr=0.1, qhat=0.0)
        >>> for batch in loader:
        ...     opt.zero_grad()
        ...     loss_fn(model(batch)).backward()   # gradient at the half-iterate X_{t+1/2}
        ...     opt.step()                         # writes X_{t+3/2} into the parameters
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 0.1,
        qhat: float = 0.0,
        step_size: str | StepSizePolicy = "adaptive",
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, lr, qhat, step_size, maximize)

    def _init_group(self, group: dict[str, Any]) -> tuple[list[Tensor], ...]:
        params, grads, anchors, duals, prevs, steps = [], [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("QODA does not support sparse gradients")
            state = self.state[p]
            if "anchor" not in state:
                state["step"] = torch.tensor(0.0)
                state["anchor"] = p.detach().clone(memory_format=torch.preserve_format)
                state["dual_sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["prev_aggregate"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            anchors.append(state["anchor"])
            duals.append(state["dual_sum"])
            prevs.append(state["prev_aggregate"])
            steps.append(state["step"])
        return params, grads, anchors, duals, prevs, steps

    @torch.no_grad()
    def base_iterates(self) -> list[Tensor]:
        r"""The dual-averaging iterates :math:`X_{t+1} = X_1 + \text{lr}\,\eta_{t+1} Y_{t+1}`
        (the parameters hold :math:`X_{t+3/2}`), one new tensor per parameter that has taken a
        step, in ``param_groups`` order; uses each group's current ``lr``. For evaluation or
        checkpoint averaging at the non-extrapolated point.
        """
        policy = self.step_size_policy
        out = []
        for group in self.param_groups:
            params = [p for p in group["params"] if "anchor" in self.state[p]]
            if not params:
                continue
            sums = read_sq_diff_sums(self, group, params, policy)
            lr_eta, _ = step_sizes_per_param(
                policy, sums, group["qhat"], group["lr"], uniform=policy.scope == "group"
            )
            for p, c in zip(params, lr_eta):
                state = self.state[p]
                out.append(state["anchor"] + c * state["dual_sum"])
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one QODA step from the dual vector in ``p.grad`` (see the class docstring).

        Args:
            closure: optional; re-evaluates the model and returns the loss (called before the
                update, with gradients enabled).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        policy = self.step_size_policy
        for group in self.param_groups:
            params, grads, anchors, duals, prevs, steps = self._init_group(group)
            if not params:
                continue
            if group["maximize"]:
                grads = torch._foreach_neg(grads)
            torch._foreach_add_(steps, 1.0)
            if policy.uses_differences:
                diffs = torch._foreach_sub(grads, prevs)
                sums = accumulate_sq_diffs(self, group, params, diffs, policy)
                del diffs
            else:
                sums = read_sq_diff_sums(self, group, params, policy)
            lr_eta, lr_gamma = step_sizes_per_param(
                policy, sums, group["qhat"], group["lr"], uniform=policy.scope == "group"
            )
            # One kernel per (device, dtype) bucket so the foreach fast path applies.
            buckets = Optimizer._group_tensors_by_device_and_dtype(
                [params, grads, anchors, duals, prevs], with_indices=True
            )
            for (device, _), ((b_params, b_grads, b_anchors, b_duals, b_prevs), idx) in buckets.items():
                qoda_update(
                    b_params, b_grads, b_anchors, b_duals, b_prevs,
                    lr_eta=[_on(lr_eta[i], device) for i in idx],
                    lr_gamma=[_on(lr_gamma[i], device) for i in idx],
                )
        return loss


def _on(value: ScalarLike, device: torch.device | None) -> ScalarLike:
    if isinstance(value, Tensor) and device is not None and value.device != device:
        return value.to(device)
    return value
