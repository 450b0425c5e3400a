"""Re-forming the exchange when Horovod's ring changes (``hvd.elastic``) or a round failed.

``hvd.elastic`` re-initialises Horovod after a lost or added worker: the size, this rank,
``exchange="auto"``'s strategy, the chunking and the rank-keyed noise all change. Once per round,
before its first collective (and inside a broadcast of the state), the optimizer checks whether
the ring changed or one of its collectives failed, and if so re-forms the communicator and the
exchange, keeping ALL of the exchange's state: the step, levels, typing, both measured decisions
and their probes' progress, so a rank that re-formed alone still runs the same collectives as
the others. Re-forming is local (no collective), so it may also serve as an elastic reset
callback. Statistics restart with the new exchange.
"""
from __future__ import annotations

import contextlib

from qoda_hvd.comm.base import Communicator
from qoda_hvd.optim.state import exchange_state, load_exchange_state

__all__ = ["ElasticReforming", "horovod_communicator"]


def horovod_communicator(process_set) -> tuple[Communicator, bool]:
    """Horovod's collectives over ``process_set``, or (outside the set) a rank of its own and
    True: Horovod's semantics, that rank trains locally."""
    from qoda_hvd.comm.horovod import HorovodCommunicator, process_set_included

    if process_set_included(process_set):
        return HorovodCommunicator(process_set), False
    from qoda_hvd.comm.local import LocalGroup

    return LocalGroup(1)[0], True


class ElasticReforming:
    """Mixin of the distributed optimizer: the ring check and the re-forming (module doc).

    Needs ``_owns_communicator``, ``_communicator``, ``_exchange``, ``_local``, ``process_set``,
    and ``_new_exchange(comm)`` of the optimizer.
    """

    _ring_checked = False
    _broken = False

    @staticmethod
    def _horovod_communicator(process_set) -> tuple[Communicator, bool]:
        return horovod_communicator(process_set)

    def _ring_changed(self) -> bool:
        changed = getattr(self._communicator, "changed", None)
        return self._owns_communicator and callable(changed) and changed()

    def _reform_if_needed(self) -> None:
        """Once per round, before its first collective: re-form if Horovod's ring changed or
        one of this rank's collectives failed."""
        if self._owns_communicator and not self._local and (self._broken or self._ring_changed()):
            self._rebuild_exchange()
        self._broken = False
        self._ring_checked = True

    def _rebuild_exchange(self) -> None:
        """Re-form the communicator and the exchange for Horovod's current ring (module doc)."""
        if not self._owns_communicator:
            raise RuntimeError("the exchange runs over a communicator passed to "
                               "DistributedOptimizer, which it cannot re-form; elastic training "
                               "needs the default (Horovod) communicator")
        old = self._exchange
        abort = getattr(old, "abort_round", None)
        if callable(abort):  # what the failed round started must not outlive it
            abort()
        state = exchange_state(old)
        comm, self._local = self._horovod_communicator(self.process_set)
        self._communicator = comm
        self._exchange = self._new_exchange(comm)
        if state is not None:
            load_exchange_state(self._exchange, state)
        adopt = getattr(self._exchange, "adopt_progress", None)
        if callable(adopt):
            adopt(old)

    @contextlib.contextmanager
    def _failing_marks_broken(self):
        try:
            yield
        except BaseException:
            self._broken, self._ring_checked = True, False
            raise
