"""The README's main job, on 2 real ranks, ends with its one-line summary."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

# horovodrun --gloo prefixes each line with "[rank]<stdout>:", mpirun does not.
SUMMARY = re.compile(r"demo: (?P<opt>\S+), 2 ranks, (?P<steps>\d+) steps, final loss (?P<loss>[\d.]+), "
                     r"[\d.]+ s, (?P<mb>[\d.]+) MB sent per rank \((?P<how>[^)]*)\)")


def run_demo(*args):
    proc = subprocess.run([sys.executable, "-m", "qoda_hvd", "demo", *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    m = SUMMARY.search(proc.stdout)
    assert m, f"no summary line in:\n{proc.stdout[-2000:]}"
    return m


@pytest.mark.timeout(360)
def test_demo_trains_qoda_with_layerwise_compression():
    m = run_demo("--steps", "60")
    assert m["opt"] == "qoda" and int(m["steps"]) == 60
    assert float(m["loss"]) < 2.0  # starts near ln(8) = 2.08
    bits = float(re.search(r"([\d.]+) bits/coordinate", m["how"]).group(1))
    ratio = float(re.search(r"([\d.]+)x smaller than fp32", m["how"]).group(1))
    assert 0 < bits < 8 and ratio == pytest.approx(32 / bits, rel=0.02)


@pytest.mark.timeout(360)
def test_demo_horovod_baseline_under_gloo():
    m = run_demo("--launcher", "gloo", "--steps", "30", "--optimizer", "horovod-sgd",
                 "--compression", "fp16")
    assert m["opt"] == "horovod-sgd" and "fp16 ring allreduce" in m["how"]
