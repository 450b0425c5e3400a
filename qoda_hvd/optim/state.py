"""The exchange's state inside the optimizer's ``state_dict()``, and broadcasting it.

The exchange's state (its step, level tables, typing, measured decisions, a compressor's own
state) is kept under ``state_dict()["qoda_hvd"]`` so checkpoints resume bit-identically, and it
goes from the root to every rank whenever the optimizer state is broadcast, so every rank
continues from the root's state.

Broadcasting needs care: ``hvd.broadcast_optimizer_state`` calls ``state_dict()`` and, on ranks
whose state is empty, a ``step()`` on zero gradients to create the state; for a
``DistributedOptimizer`` of ours that ``step()`` must not start a collective (the root does
not call it). :func:`broadcast_optimizer_state` says so explicitly, and is the call to use;
Horovod's own function called directly is recognised as a fallback (by its code object, a few
frames up); a ``step()`` that looks like it but was not recognised raises a clear error rather
than starting a collective only some ranks join.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Optional

__all__ = ["STATE_KEY", "broadcast_optimizer_state", "exchange_state", "load_exchange_state"]

#: Key of the exchange's state in the optimizer's ``state_dict()``.
STATE_KEY = "qoda_hvd"

#: Frames above ``step()`` / ``state_dict()`` searched for Horovod's broadcast_optimizer_state
#: (an lr scheduler wraps ``step`` in one more frame).
_CALLER_DEPTH = 3


def horovod_state_broadcast_root(skip: int) -> Optional[int]:
    """``root_rank`` if ``hvd.broadcast_optimizer_state`` is our caller, else ``None``.

    Recognised by identity of its code object, so no other caller can be mistaken for it; read
    from ``sys.modules``, so nothing imports Horovod for a job that does not use it.
    """
    functions = sys.modules.get("horovod.torch.functions")
    code = getattr(getattr(functions, "broadcast_optimizer_state", None), "__code__", None)
    if code is None:
        return None
    frame = sys._getframe(skip + 1)
    for _ in range(_CALLER_DEPTH):
        if frame is None:
            return None
        if frame.f_code is code:
            return int(frame.f_locals["root_rank"])
        frame = frame.f_back
    return None


def exchange_state(exchange) -> Optional[dict[str, Any]]:
    """The exchange's state as plain data (``state_dict()`` of ours, ``extra_state()`` of a
    custom one under ``"exchange"``), or None when it has none."""
    get = getattr(exchange, "state_dict", None)
    extra: dict[str, Any] = dict(get()) if callable(get) else {}
    get = getattr(exchange, "extra_state", None)
    if callable(get):
        extra["exchange"] = get()
    return extra or None


def load_exchange_state(exchange, extra: dict[str, Any]) -> None:
    """Restore :func:`exchange_state` into ``exchange``."""
    load = getattr(exchange, "load_state_dict", None)
    if callable(load) and ("step" in extra or "typing" in extra):
        load(extra)
    load = getattr(exchange, "load_extra_state", None)
    if callable(load) and extra.get("exchange") is not None:
        load(extra["exchange"])


def broadcast_optimizer_state(optimizer, root_rank: int, model=None) -> None:
    """``hvd.broadcast_optimizer_state`` for a ``qoda_hvd.DistributedOptimizer``: the torch
    state and the exchange's state from ``root_rank`` to every rank. A collective: every rank
    calls it. The recommended call (any optimizer works; for ours it needs no guessing of who
    the caller is).

    Args:
        optimizer: the optimizer (ours, Horovod's or a plain torch one).
        root_rank: the rank whose state every rank takes.
        model: passed on to Horovod (its LBFGS path).

    Example::

        >>> qoda_hvd.broadcast_optimizer_state(opt, root_rank=0)    # doctest: +SKIP
    """
    from qoda_hvd.comm.horovod import horovod_broadcast_optimizer_state

    if isinstance(root_rank, bool) or not isinstance(root_rank, int) or root_rank < 0:
        raise ValueError(f"root_rank must be an int >= 0, got {root_rank!r}")
    enter = getattr(optimizer, "_state_broadcast", None)
    scope = enter(root_rank) if callable(enter) else contextlib.nullcontext()
    with scope:
        horovod_broadcast_optimizer_state(optimizer, root_rank, model)
