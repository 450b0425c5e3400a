"""Run a function on K in-process fake ranks (threads + :class:`qoda_hvd.comm.LocalGroup`)."""
from __future__ import annotations

from qoda_hvd.comm import LocalGroup


def run_ranks(size, fn, timeout=60.0, **placement):
    """Run ``fn(rank, comm)`` on ``size`` fake ranks, one thread each; results by rank.

    The first exception of any rank is re-raised here; a rank that dies breaks the others'
    barrier after ``timeout`` seconds instead of hanging them. ``placement``:
    ``ranks_per_node`` / ``node_of`` of :class:`~qoda_hvd.comm.LocalGroup` (fake nodes).
    """
    return LocalGroup(size, timeout=timeout, **placement).run(fn)


def run_group(group, fn):
    """Like :func:`run_ranks`, over a given LocalGroup; each rank's result or its exception
    (for tests that check every rank's outcome, e.g. the same error everywhere)."""
    def outcome(r, comm):
        try:
            return fn(r, comm)
        except BaseException as e:  # every rank's outcome is checked by the caller
            return e

    return group.run(outcome)
