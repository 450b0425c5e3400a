"""Optimism for any torch optimizer: extrapolation from the past, one gradient per step.

ALGORITHM.md section 2 (Gidel et al., 2019, "A variational inequality perspective on generative
adversarial networks"): keep the base iterate ``x_t`` in the optimizer state; after the base
optimizer's step ``x_t -> x_{t+1}`` with update ``u_t = x_{t+1} - x_t``, put ``x_{t+1} + u_t`` in
the model, where the next gradient is taken. For SGD this is optimistic gradient descent
(``x_{t+3/2} = x_{t+1/2} - 2 lr g_{t+1/2} + lr g_{t-1/2}``); for Adam it is optimistic Adam.

The optimistic optimizer *is* an instance of the wrapped class (a subclass built on the fly, as
``horovod.torch.DistributedOptimizer`` does), so ``isinstance(opt, torch.optim.Adam)``,
``param_groups``, ``state_dict()`` and ``torch.optim.lr_scheduler`` keep working, and a factory
that rebuilds the optimizer as ``type(opt)(opt.param_groups)`` gets an optimistic one again.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["Optimistic", "optimistic"]

#: State key of the base iterate x_t; prefixed so it cannot clash with the base optimizer's keys.
BASE_ITERATE = "optimistic_base_iterate"

_CLASS_CACHE: dict[type, type] = {}


class _OptimisticMeta(type):
    """Lets ``Optimistic(optimizer)`` convert an optimizer while ``OptimisticAdam(params, ...)``
    still constructs one from parameters like ``Adam`` does."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is Optimistic:
            return optimistic(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class Optimistic(metaclass=_OptimisticMeta):
    r"""Optimistic ("extrapolation from the past") form of a wrapped torch optimizer.

    ``Optimistic(optimizer)`` converts ``optimizer`` *in place* and returns it: its class becomes
    ``Optimistic<Base>``, a subclass of both :class:`Optimistic` and the base class, so the object
    keeps its identity, ``isinstance`` relations, state and any reference held by a scheduler.

    .. math::
        \begin{aligned}
        &\text{model holds } x_{t+1/2};\ g_{t+1/2} = \texttt{p.grad} \text{ taken there} \\
        &x_{t+1} = \mathrm{BaseStep}(x_t, g_{t+1/2}), \qquad u_t = x_{t+1} - x_t \\
        &x_{t+3/2} = x_{t+1} + u_t \quad (\text{written into the model}),
            \qquad x_{1/2} = x_1
        \end{aligned}

    State: the base iterate :math:`x_t` is ``state[p]["optimistic_base_iterate"]``, next to the
    base optimizer's own state, so ``state_dict()`` covers it. Parameters without ``grad`` are
    left where they are, as the base optimizer leaves them.

    .. warning::
        A ``closure`` passed to :meth:`step` runs inside the base step, with the model moved to
        the base iterate :math:`x_t`, not to the half-iterate; it exists for API compatibility
        (e.g. to report a loss), and closure-driven optimizers such as LBFGS lose optimism.
        Convert the optimizer *before* creating its ``lr_scheduler``: a scheduler patches the
        instance's ``step`` and would otherwise keep calling the non-optimistic one.

    Args:
        optimizer: a ``torch.optim.Optimizer`` instance (not already optimistic).

    Example::

        >>> opt = Optimistic(torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.5, 0.9)))
        >>> isinstance(opt, torch.optim.Adam), isinstance(opt, Optimistic)
        (True, True)
        >>> opt.zero_grad(); loss_fn(model(batch)).backward(); opt.step()
    """

    @torch.no_grad()
    def _optimistic_gather(self) -> tuple[list[Tensor], list[Tensor], list[tuple[Tensor, Tensor]]]:
        """Params with a grad, their base iterates, and (param, base) for first-time params."""
        params, bases, fresh = [], [], []
        for group in self.param_groups:  # type: ignore[attr-defined]
            for p in group["params"]:
                if p.grad is None:
                    continue
                base = self.state[p].get(BASE_ITERATE)  # type: ignore[attr-defined]
                if base is None:
                    # First step: x_{1/2} = x_1, so the model already holds the base iterate.
                    # The copy enters the state only after the base step: optimizers such as
                    # Adam initialise their own state when state[p] is empty.
                    base = p.detach().clone(memory_format=torch.preserve_format)
                    fresh.append((p, base))
                params.append(p)
                bases.append(base)
        return params, bases, fresh

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """Base step from the stored base iterate with the gradient of the half-iterate, then
        extrapolate from the past. Returns what the base step returns."""
        params, bases, fresh = self._optimistic_gather()
        with torch.no_grad():
            if params:
                torch._foreach_copy_(params, bases)                   # model <- x_t
        loss = super().step(closure)  # type: ignore[misc]         # model <- x_{t+1}
        with torch.no_grad():
            if params:
                update = torch._foreach_sub(params, bases)            # u_t = x_{t+1} - x_t
                torch._foreach_copy_(bases, params)                   # base <- x_{t+1}
                torch._foreach_add_(params, update)                   # model <- x_{t+1} + u_t
            for p, base in fresh:
                self.state[p][BASE_ITERATE] = base  # type: ignore[attr-defined]
        return loss

    # The base class's step is already wrapped by Optimizer's profiling/hook machinery; marking
    # ours as hooked keeps step pre/post hooks from firing twice per step.
    step.hooked = True  # type: ignore[attr-defined]

    def base_iterates(self) -> list[Tensor]:
        """The base iterates :math:`x_t` (one per parameter that has taken a step), e.g. to
        evaluate or checkpoint the non-extrapolated point."""
        return [
            self.state[p][BASE_ITERATE]  # type: ignore[attr-defined]
            for group in self.param_groups  # type: ignore[attr-defined]
            for p in group["params"]
            if BASE_ITERATE in self.state[p]  # type: ignore[attr-defined]
        ]


def _optimistic_class(base: type) -> type:
    cls = _CLASS_CACHE.get(base)
    if cls is None:
        if not getattr(base.step, "hooked", False):
            # What Optimizer.__init__ does for a plain instance; ours is marked hooked, so the
            # hooks must live on the base step.
            base.step = Optimizer.profile_hook_step(base.step)  # type: ignore[method-assign]
            base.step.hooked = True  # type: ignore[attr-defined]
        cls = _OptimisticMeta(
            f"Optimistic{base.__name__}",
            (Optimistic, base),
            {"__module__": __name__, "__doc__": f"Optimistic form of {base.__qualname__}. "
             + (Optimistic.__doc__ or "")},
        )
        _CLASS_CACHE[base] = cls
    return cls


def optimistic(optimizer: Optimizer) -> Optimizer:
    """Convert ``optimizer`` in place into its optimistic form and return it (see
    :class:`Optimistic`; ``Optimistic(optimizer)`` is the same call).

    Args:
        optimizer: a ``torch.optim.Optimizer`` instance.

    Example::

        >>> opt = qoda_hvd.optimistic(torch.optim.SGD(model.parameters(), lr=0.1))
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer instance, got {type(optimizer).__name__}"
        )
    if isinstance(optimizer, Optimistic):
        raise ValueError(f"optimizer is already optimistic ({type(optimizer).__name__})")
    if "step" in vars(optimizer):
        raise RuntimeError(
            "optimizer.step has been patched on the instance (usually by an lr_scheduler created "
            "earlier); convert the optimizer with optimistic() before creating its scheduler"
        )
    optimizer.__class__ = _optimistic_class(type(optimizer))
    return optimizer
