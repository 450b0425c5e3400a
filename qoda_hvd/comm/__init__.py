"""Collectives behind one seam: Horovod, mpi4py, or in-process fake ranks (tests).

Only this package imports ``horovod`` or ``mpi4py``. Every implementation counts what it does
(:class:`CommStats`), so tests can assert exactly how many exchanges a step makes.
"""
from __future__ import annotations

from qoda_hvd.comm.base import CommStats, Communicator
from qoda_hvd.comm.local import LocalGroup

__all__ = ["CommStats", "Communicator", "HorovodCommunicator", "LocalGroup", "MPICommunicator"]


def __getattr__(name: str):
    # Imported lazily: horovod and mpi4py initialise native libraries on import.
    if name == "HorovodCommunicator":
        from qoda_hvd.comm.horovod import HorovodCommunicator

        return HorovodCommunicator
    if name == "MPICommunicator":
        from qoda_hvd.comm.mpi import MPICommunicator

        return MPICommunicator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
