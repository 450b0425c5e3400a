"""Multi-node launch command lines and the bandwidth-shaped cluster emulator.

- :mod:`qoda_hvd.cluster.launch`: ``mpirun`` / ``horovodrun`` command lines for GPU clusters
  (``launch/qoda-mpirun``, ``launch/qoda-horovodrun``, ``qoda-hvd launch``).
- :mod:`qoda_hvd.cluster.emulator`: N network namespaces on a bridge behind tc-shaped links, with
  ``mpirun`` starting one rank per namespace (``launch/emulate-cluster``, ``qoda-hvd emulate``).
- :mod:`qoda_hvd.cluster.rsh_agent`: the emulator's ``plm_rsh_agent`` (a standalone script).
- :mod:`qoda_hvd.cluster.bandwidth`: point-to-point goodput between MPI ranks (mpi4py).

Only the standard library is imported here, so the launchers start fast.
"""
from __future__ import annotations

from qoda_hvd.cluster.emulator import EmulatedCluster, EmulatedNode, EmulatorError
from qoda_hvd.cluster.launch import (Host, LaunchError, LaunchSpec, horovodrun_command,
                                     mpirun_command, parse_hosts, read_hostfile)

__all__ = [
    "EmulatedCluster", "EmulatedNode", "EmulatorError", "Host", "LaunchError", "LaunchSpec",
    "horovodrun_command", "mpirun_command", "parse_hosts", "read_hostfile",
]
