"""A rank that raises ends the whole job, under each launcher, well before any timeout."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qoda_hvd.launcher import run_local

WORKER = Path(__file__).parent / "distributed" / "crash_worker.py"
LIMIT = 120  # seconds; a hang would run into it


@pytest.mark.timeout(LIMIT + 30)
@pytest.mark.parametrize("launcher, mode", [("mpirun", "plain"), ("gloo", "plain"),
                                            ("mpirun", "overlap")])
def test_a_failing_rank_does_not_leave_the_other_hanging(launcher, mode):
    start = time.monotonic()
    try:
        proc = run_local(2, [sys.executable, str(WORKER), mode], launcher, timeout=LIMIT,
                         capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{launcher}: the job still ran after {LIMIT} s: rank 0 was left hanging")
    elapsed = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "rank 1 fails on purpose" in out, out[-3000:]
    if mode == "overlap":  # the failure came while a bucket's allgather was in flight
        assert re.search(r"\(mid-backward, [1-9]\d* bucket\(s\) in flight\)", out), out[-3000:]
    assert elapsed < LIMIT / 2, f"{launcher} took {elapsed:.0f} s to stop the job"
