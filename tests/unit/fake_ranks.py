"""Run a function on K in-process fake ranks (threads + :class:`qoda_hvd.comm.LocalGroup`)."""
from __future__ import annotations

import threading

import torch

from qoda_hvd.comm import LocalGroup


def run_ranks(size, fn, timeout=60.0, **placement):
    """Run ``fn(rank, comm)`` on ``size`` fake ranks, one thread each; results by rank.

    ``placement``: ``ranks_per_node`` / ``node_of`` of :class:`~qoda_hvd.comm.LocalGroup`
    (fake nodes).

    The first exception of any rank is re-raised here; a rank that dies breaks the others'
    barrier after ``timeout`` seconds instead of hanging them.
    """
    group = LocalGroup(size, timeout=timeout, **placement)
    out, errors = [None] * size, []

    def work(r):
        try:
            torch.set_num_threads(1)
            out[r] = fn(r, group[r])
        except BaseException as e:  # collected and re-raised in the calling thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out
