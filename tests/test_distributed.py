"""Runs ``tests/distributed`` on real ranks: 2 under ``mpirun`` and ``horovodrun --gloo``, 3 under ``mpirun``.

One ``pytest`` thus covers both suites. Each launch has a timeout, every rank's tests have
pytest-timeout, and a failure shows the failing rank's own log.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qoda_hvd.launcher import run_local

HERE = Path(__file__).parent
LAUNCH_TIMEOUT = 900  # the whole distributed suite on one launcher
TEST_TIMEOUT = 240    # one test on one rank (pytest-timeout inside the ranks)


#: (launcher, ranks, pytest selection): the whole suite on 2 ranks under each launcher, and the
#: exchange's core checks on 3 ranks (where allgather and scatter_gather really differ), with the
#: process-set checks (a set of 2 ranks and one rank outside it) and the overlapped exchange.
RUNS = [
    ("mpirun", 2, []),
    ("gloo", 2, []),
    ("mpirun", 3, ["-k", "test_distributed_optimizer and (bit_identical or one_exchange) "
                         "or test_horovod_parity and process_set or test_overlap_ranks"]),
]


@pytest.mark.timeout(LAUNCH_TIMEOUT + 60)
@pytest.mark.parametrize("launcher, ranks, select", RUNS, ids=[f"{l}-np{n}" for l, n, _ in RUNS])
def test_distributed_suite(launcher, ranks, select, tmp_path):
    argv = [sys.executable, str(HERE / "distributed" / "run_rank.py"), str(tmp_path),
            str(HERE / "distributed"), "-x", "-q", "-p", "no:cacheprovider",
            f"--timeout={TEST_TIMEOUT}", "-rs", *select]
    env = dict(os.environ, QODA_EXPECTED_SIZE=str(ranks), PYTHONUNBUFFERED="1")
    try:
        proc = run_local(ranks, argv, launcher, timeout=LAUNCH_TIMEOUT, capture_output=True,
                         text=True, env=env, cwd=HERE.parent)
        rc, launcher_out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, launcher_out = "timeout", f"{e.stdout or ''}{e.stderr or ''}"
    logs = {p.name: p.read_text(errors="replace") for p in sorted(tmp_path.glob("rank*.log"))}
    for name, text in logs.items():  # shown by pytest -rA or on failure
        print(f"===== {launcher} {name} (last lines) =====\n" + "\n".join(text.splitlines()[-15:]))
    if rc != 0:
        failing = [n for n, t in logs.items() if " failed" in t or "Error" in t or "Timeout" in t]
        shown = "\n".join(f"===== {n} =====\n{logs[n][-6000:]}" for n in (failing or logs))
        pytest.fail(f"{launcher} -np {ranks}: exit {rc}\n----- launcher output -----\n"
                    f"{launcher_out[-4000:]}\n{shown}", pytrace=False)
    assert len(logs) == ranks, f"expected {ranks} rank logs, got {sorted(logs)}"
    for name, text in logs.items():
        assert " passed" in text, f"{name} ran no test:\n{text[-3000:]}"


@pytest.mark.timeout(LAUNCH_TIMEOUT + 60)
def test_two_nodes_of_two_ranks_gloo(tmp_path):
    """4 ranks as 2 "nodes" x 2 on this machine: horovodrun --gloo keys Horovod's node by the
    host name, so localhost and 127.0.0.1 make two nodes (local_size 2, cross_size 2)."""
    from qoda_hvd.launcher import _tool, rank_environment

    argv = [_tool("horovodrun"), "--gloo", "-np", "4", "-H", "localhost:2,127.0.0.1:2",
            sys.executable, str(HERE / "distributed" / "run_rank.py"), str(tmp_path),
            str(HERE / "distributed" / "test_two_level_ranks.py"), "-x", "-q",
            "-p", "no:cacheprovider", f"--timeout={TEST_TIMEOUT}", "-rs"]
    env = rank_environment(dict(os.environ, QODA_EXPECTED_SIZE="4", PYTHONUNBUFFERED="1",
                                HOROVOD_DYNAMIC_PROCESS_SETS="1"))  # node groups: process sets
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=HERE.parent,
                              timeout=LAUNCH_TIMEOUT)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", f"{e.stdout or ''}{e.stderr or ''}"
    logs = {p.name: p.read_text(errors="replace") for p in sorted(tmp_path.glob("rank*.log"))}
    if rc != 0:
        shown = "\n".join(f"===== {n} =====\n{t[-4000:]}" for n, t in logs.items())
        pytest.fail(f"horovodrun --gloo 2x2: exit {rc}\n{out[-3000:]}\n{shown}", pytrace=False)
    assert len(logs) == 4
    for name, text in logs.items():
        assert " passed" in text and " failed" not in text, f"{name}:\n{text[-3000:]}"
