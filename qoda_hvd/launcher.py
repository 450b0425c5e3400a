"""Build and run local ``horovodrun`` / ``mpirun`` command lines.

One concept: turning "run this Python module on N local ranks" into the exact launcher command,
with the environment a rank needs (one thread per rank, Open MPI's root permission when run as
root). The multi-node cluster launchers live in ``launch/``; this module serves the demo, the
test runner and the benchmarks on one machine.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Mapping, Sequence

__all__ = ["LAUNCHERS", "local_command", "rank_environment", "run_local"]

#: Launchers a local job can use; ``gloo`` is ``horovodrun --gloo``.
LAUNCHERS = ("horovodrun", "gloo", "mpirun")


def rank_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for local ranks: one compute thread each, Open MPI yielding the core when it
    waits, and root allowed for Open MPI.

    Args:
        base: environment to start from (default ``os.environ``).

    Example::

        >>> env = rank_environment({})
        >>> env["OMP_NUM_THREADS"]
        '1'
    """
    env = dict(os.environ if base is None else base)
    # Ranks share the machine's cores: more than one thread each oversubscribes them.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    # ... and each rank runs Horovod's background thread beside its training thread. Open MPI
    # busy-polls unless it knows the cores are shared; spinning through every negotiation cycle
    # it took most of a core from the rank's own codec and backward (measured: the codec 3-7x
    # slower). Yielding is what Open MPI does by itself on an oversubscribed node.
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def _tool(name: str) -> str:
    # Prefer the tool next to this interpreter (the venv's horovodrun), then PATH.
    here = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(here):
        return here
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"{name} not found on PATH or next to {sys.executable}; run `make setup` first")
    return found


def local_command(np: int, argv: Sequence[str], launcher: str = "horovodrun") -> list[str]:
    """The command line that runs ``argv`` on ``np`` local ranks.

    Args:
        np: number of ranks, at least 1.
        argv: the per-rank command, e.g. ``[sys.executable, "-m", "qoda_hvd.demo"]``.
        launcher: one of :data:`LAUNCHERS`: ``horovodrun`` (MPI controller), ``gloo``
            (``horovodrun --gloo``) or ``mpirun``.

    Example::

        >>> local_command(2, ["python", "train.py"], "mpirun")[:3]  # doctest: +ELLIPSIS
        ['.../mpirun', '-np', '2']
    """
    if not isinstance(np, int) or np < 1:
        raise ValueError(f"np must be an integer >= 1, got {np!r}")
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    cores = os.cpu_count() or 1
    if launcher == "mpirun":
        cmd = [_tool("mpirun"), "-np", str(np), "--bind-to", "none"]
        if np > cores:
            cmd.append("--oversubscribe")
        # Local ranks inherit mpirun's environment; remote ones would need -x (see launch/).
        return cmd + list(argv)
    cmd = [_tool("horovodrun"), "-np", str(np), "-H", f"localhost:{np}"]
    if launcher == "gloo":
        cmd.append("--gloo")
    else:
        cmd.append("--mpi")
        if np > cores:
            cmd += ["--mpi-args=--oversubscribe"]
    return cmd + list(argv)


def run_local(np: int, argv: Sequence[str], launcher: str = "horovodrun",
              timeout: float | None = None, **popen_kwargs) -> subprocess.CompletedProcess:
    """Run ``argv`` on ``np`` local ranks and wait for it.

    Args:
        np: number of ranks.
        argv: the per-rank command.
        launcher: see :func:`local_command`.
        timeout: seconds before the whole job is killed (``subprocess.TimeoutExpired``).
        **popen_kwargs: passed to :func:`subprocess.run` (``capture_output``, ``cwd``, ...).

    Example::

        >>> run_local(2, [sys.executable, "-c", "print('hi')"]).returncode  # doctest: +SKIP
        0
    """
    env = rank_environment(popen_kwargs.pop("env", None))
    return subprocess.run(local_command(np, argv, launcher), env=env, timeout=timeout,
                          **popen_kwargs)
