"""Horovod argument parity: ``hvd.DistributedOptimizer``'s checks, defaults and sentences.

A user swapping ``hvd.DistributedOptimizer`` for ``qoda_hvd.DistributedOptimizer`` gets the
same errors for the same mistakes (the sentences are Horovod 0.28's where it has one), and ours
name the argument, the value and what is allowed where Horovod has none.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from typing import Any, Optional

import torch

__all__ = ["check_backward_passes", "check_groups", "check_named_parameters",
           "check_predivide", "reduce_op"]


def check_named_parameters(named_parameters, param_groups) -> list[tuple[str, torch.Tensor]]:
    """``named_parameters`` as a list, checked as Horovod does (tuples, unique names, every
    optimizer parameter named); Horovod's ``allreduce.noname.i.j`` names when None.

    Example::

        >>> lin = torch.nn.Linear(2, 2)
        >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1)
        >>> [n for n, _ in check_named_parameters(None, opt.param_groups)]
        ['allreduce.noname.0.0', 'allreduce.noname.0.1']
    """
    if named_parameters is not None:
        named_parameters = list(named_parameters)
    else:
        named_parameters = [(f"allreduce.noname.{i}.{j}", v)
                            for i, group in enumerate(param_groups)
                            for j, v in enumerate(group["params"])]
    if any(not isinstance(p, tuple) or len(p) != 2 for p in named_parameters):
        raise ValueError("named_parameters should be a sequence of tuples (name, parameter), "
                         "usually produced by model.named_parameters().")
    dups = [k for k, c in Counter(k for k, _ in named_parameters).items() if c > 1]
    if dups:
        raise ValueError("Parameter names in named_parameters must be unique. "
                         f"Found duplicates: {', '.join(dups)}")
    all_ids = {id(v) for group in param_groups for v in group["params"]}
    unnamed = all_ids - {id(v) for _, v in named_parameters}
    if unnamed:
        raise ValueError("named_parameters was specified, but one or more model parameters "
                         f"were not named. Python object ids: {', '.join(map(str, unnamed))}")
    return named_parameters


def check_backward_passes(passes: Any) -> int:
    """``backward_passes_per_step``: an int >= 1."""
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"backward_passes_per_step must be an int >= 1, got {passes!r}")
    return passes


def reduce_op(op) -> str:
    """``"average"`` or ``"sum"`` for ``hvd.Average`` / ``hvd.Sum`` or those strings.

    Example::

        >>> reduce_op("Average")
        'average'
    """
    if isinstance(op, str) and op.lower() in ("average", "sum"):
        return op.lower()
    from qoda_hvd.comm.horovod import reduce_op_name

    return reduce_op_name(op)


def check_predivide(factor: Any, op_name: str) -> float:
    """``gradient_predivide_factor``: a finite number > 0, and 1 unless ``op`` is Average."""
    if (isinstance(factor, bool) or not isinstance(factor, (int, float))
            or not math.isfinite(factor) or factor <= 0):
        raise ValueError(f"gradient_predivide_factor must be a finite number > 0, got {factor!r}")
    if factor != 1.0 and op_name != "average":
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    return float(factor)


def check_groups(groups, num_groups) -> Optional[Any]:
    """Horovod's ``num_groups`` / ``groups`` checks and deprecation (same sentences).

    Example::

        >>> check_groups(None, 0) is None
        True
    """
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 0:
        raise ValueError(f"num_groups must be an int >= 0, got {num_groups!r}")
    if num_groups != 0:
        warnings.warn("Parameter `num_groups` has been replaced by `groups` and will be removed "
                      "in v0.23.0.", DeprecationWarning, stacklevel=3)
        if groups is None:
            groups = num_groups
    if groups is None:
        return None
    if isinstance(groups, list):
        seen: set[int] = set()
        for group in groups:
            for p in group:
                if not isinstance(p, torch.Tensor):
                    raise ValueError("groups must consist of torch.Tensor.")
                if id(p) in seen:
                    raise ValueError("A parameter can only appear once in groups.")
                seen.add(id(p))
    elif isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError("groups should be a non-negative integer or a list of list of "
                         f"torch.Tensor, got {groups!r}.")
    return groups
