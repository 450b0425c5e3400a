"""Faults a real cluster throws, kept short for the suite (the full set: ``bench/faults.py``).

- :meth:`EmulatedCluster.impair` really drops the fraction of packets asked for, and restores
  the link;
- a 2-node job (our layer-wise 4-bit DistributedOptimizer and Horovod fp32 side by side) on a
  link that drops 1% of its packets finishes with both ranks bit-identical;
- the same job with one rank stopped (SIGSTOP) for 2 s and continued finishes bit-identical.

Every test needs root and network namespaces (skipped with the reason otherwise). The packet
loss is ``cls_bpf`` + ``act_mirred`` (not ``sch_netem``, which many kernels lack).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qoda_hvd.cluster.emulator import EmulatedCluster, emulator_unavailable_reason

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

REASON = emulator_unavailable_reason()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=str(REASON)),
              pytest.mark.timeout(240)]

# node 1 counts the UDP datagrams node 0 sends it for 1 s after the last one
_RECEIVER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], 9999)); s.settimeout(3.0); print("ready", flush=True)
    n = 0
    try:
        while True:
            s.recv(64); n += 1; s.settimeout(1.0)
    except socket.timeout:
        pass
    print(n, flush=True)
""")
_SENDER = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(int(sys.argv[2])):
        s.sendto(b"x" * 32, (sys.argv[1], 9999)); time.sleep(0.0005)
""")


def _delivered(cluster: EmulatedCluster, count: int) -> int:
    dst = cluster.nodes[1].address
    recv = subprocess.Popen(cluster.exec_command(1, [sys.executable, "-c", _RECEIVER, dst]),
                            stdout=subprocess.PIPE, text=True)
    assert recv.stdout.readline().strip() == "ready"
    subprocess.run(cluster.exec_command(0, [sys.executable, "-c", _SENDER, dst, str(count)]),
                   check=True, timeout=120)
    out, _ = recv.communicate(timeout=60)
    return int(out.split()[-1])


def test_impair_drops_the_fraction_asked_for_and_restores_the_link():
    with EmulatedCluster(nodes=2, bandwidth="1gbit") as cluster:
        assert _delivered(cluster, 400) == 400
        cluster.impair(1, 1.0)  # link down: nothing passes
        assert cluster.loss == [0.0, 1.0]
        assert _delivered(cluster, 200) == 0
        cluster.impair(1, 0.3)  # 30% each way; one way here: ~280 of 400 (binomial sd ~9)
        assert 230 <= _delivered(cluster, 400) <= 330
        cluster.impair(1, 0.0)
        assert _delivered(cluster, 400) == 400
        with pytest.raises(ValueError, match="loss must be a fraction in"):
            cluster.impair(1, 1.5)
        with pytest.raises(ValueError, match="node must be in"):
            cluster.impair(2, 0.1)


def test_a_job_on_a_lossy_link_with_a_stopped_rank_finishes_bit_identical():
    """1% of node 1's packets dropped for the whole run, and rank 1 SIGSTOPped for 2 s mid-run
    (then SIGCONT): our layer-wise 4-bit optimizer (overlap on) finishes, both ranks
    bit-identical, and rank 0 waited through the stop (a step of >= 2 s)."""
    import faults

    row = faults.run_emulated("stop", "ours", 20, stop_s=2.0, loss=0.01, timeout=180)
    shutil.rmtree(row["log_dir"], ignore_errors=True)
    assert row["finished"], row
    assert row["bit_identical"], row
    assert row["steps_done_rank0"] == 20
    assert row["longest_step_s"] >= 1.9, row  # the stop really happened while it trained
