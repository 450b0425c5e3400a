"""ONE measured, agreed A/B decision: two ways of doing a step, timed in turns, kept the faster.

Whether quantizing pays against sending float32 (``fallback``), or overlapping the exchange
with backward pays against one block (``overlap=None``), depends on the machine, the link and
the model, so it is measured rather than modelled. Both use this one mechanism:

- a fixed schedule says, for each of the first calls, which option runs and whether its time
  counts (warm-up calls do not); the schedule is a function of the call count alone, which
  every rank shares, so all ranks run the same option on the same call;
- at the end of the schedule every rank's two sums go into ONE small allreduce: every rank
  gets the same totals and takes the same branch (one slow rank cannot decide alone);
- option 1 is kept only if it was strictly faster; the outcome is part of the exchange's
  state (checkpoints, ``broadcast_optimizer_state``, elastic re-forms), restored identically on
  every rank; an undecided probe restarts from zero on every rank at once.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from qoda_hvd.comm.base import Communicator

__all__ = ["AgreedChoice"]


class AgreedChoice:
    """A decision between option 0 and option 1, measured over a schedule of calls.

    Args:
        names: the two options' names (the keys of :attr:`measured`, with ``_s``).
        schedule: per call from the first, ``(option, timed)``: which option that call runs
            and whether its time counts. The decision ends the last scheduled call.

    Attributes:
        decided: whether the decision has been taken (then :attr:`choice` holds).
        choice: the option kept (0 until decided).
        measured: mean seconds per timed call of each option over all ranks, once decided.

    Example::

        >>> from qoda_hvd.comm import LocalGroup
        >>> d = AgreedChoice(("a", "b"), [(0, True), (1, True)])
        >>> comm = LocalGroup(1)[0]
        >>> d.option(), d.record(2.0, comm), d.option(), d.record(1.0, comm)
        (0, False, 1, True)
        >>> d.choice, d.measured
        (1, {'a_s': 2.0, 'b_s': 1.0})
    """

    def __init__(self, names: tuple[str, str], schedule: Sequence[tuple[int, bool]]) -> None:
        if not schedule or any(o not in (0, 1) for o, _ in schedule):
            raise ValueError(f"schedule must be non-empty (option 0 or 1, timed) pairs, got {schedule!r}")
        self.names = names
        self.schedule = list(schedule)
        self._timed = [sum(1 for o, t in self.schedule if t and o == k) for k in (0, 1)]
        self.decided = False
        self.choice = 0
        self.measured: Optional[dict[str, float]] = None
        self.restart()

    def restart(self) -> None:
        """Time from the first scheduled call again (every rank at once)."""
        self.calls = 0
        self._sums = [0.0, 0.0]

    def option(self) -> int:
        """The option this call runs: the schedule's while undecided, then the choice."""
        if self.decided:
            return self.choice
        return self.schedule[min(self.calls, len(self.schedule) - 1)][0]

    def record(self, seconds: float, comm: Communicator) -> bool:
        """Count one call that took ``seconds``; at the schedule's end, decide (ONE allreduce
        over ``comm``, which every rank reaches on the same call). Returns whether this call
        decided."""
        if self.decided:
            return False
        option, timed = self.schedule[self.calls]
        if timed:
            self._sums[option] += seconds
        self.calls += 1
        if self.calls < len(self.schedule):
            return False
        total = comm.allreduce_sum(torch.tensor(self._sums, dtype=torch.float64))
        means = [float(total[k]) / (comm.size * max(self._timed[k], 1)) for k in (0, 1)]
        self.measured = {f"{self.names[0]}_s": means[0], f"{self.names[1]}_s": means[1]}
        self.choice = 1 if means[1] < means[0] else 0
        self.decided = True
        return True

    def state_dict(self) -> dict[str, Any]:
        """The outcome (an undecided probe's partial sums are not kept: it restarts)."""
        return {"decided": self.decided, "choice": self.choice, "measured": self.measured}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decided = bool(state.get("decided", False))
        self.choice = int(state.get("choice", 0)) if self.decided else 0
        self.measured = state.get("measured") if self.decided else None
        self.restart()
