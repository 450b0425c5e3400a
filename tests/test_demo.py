"""The README's main job on 2 real ranks: Horovod fp32 and qoda_hvd side by side, one table.

(The default launch, on the emulated link where the machine allows it, is run by
tests/test_readme.py against the README's own copy of the output.)
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

# horovodrun --gloo prefixes each line with "[rank]<stdout>:", mpirun does not.
SUMMARY = re.compile(r"demo: (?P<opt>\S+), 2 ranks, (?P<steps>\d+) steps, final loss (?P<loss>[\d.]+), "
                     r"[\d.]+ s, (?P<mb>[\d.]+) MB sent per rank \((?P<how>[^)]*)\)")
ROW = re.compile(r"^(?P<label>\S.*?)\s+(?P<loss>\d+\.\d{4})\s+(?P<mb>\d+\.\d{2})\s+"
                 r"(?P<ms>\d+\.\d{2})\s+(?P<speedup>\d+\.\d{2})x$", re.M)
PARAMS = 76_296  # the demo's default MLP (build_model's doctest checks it)


def run_demo(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "qoda_hvd", "demo", *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def table_rows(out: str) -> dict[str, dict]:
    """The comparison table's rows by method label."""
    return {m["label"]: m.groupdict() for m in ROW.finditer(out)}


@pytest.mark.timeout(360)
def test_demo_compares_horovod_fp32_with_qoda_on_local_ranks(tmp_path):
    out = run_demo("--bandwidth", "none", "--steps", "60", "--json", str(tmp_path / "demo.json"))
    rows = table_rows(out)
    assert list(rows) == ["Horovod fp32 allreduce", "qoda_hvd layer-wise 4-bit"], out[-3000:]
    fp32, qoda = rows.values()
    # Local ranks: Horovod's bytes are computed (a ring allreduce of every float32, each step),
    # qoda_hvd's counted by its communicator.
    assert float(fp32["mb"]) == pytest.approx(2 * (2 - 1) / 2 * PARAMS * 4 * 60 / 1e6, abs=0.01)
    # 4-bit symbols at most (coding="auto" may keep them fixed-width on a fast link), plus
    # bucket norms and the float32 biases: at most ~4.3 bits per coordinate.
    assert float(fp32["mb"]) / float(qoda["mb"]) >= 7.0
    assert fp32["speedup"] == "1.00"
    # Same model, data and optimizer: both learn (the loss starts near ln 8 = 2.08), alike.
    assert float(fp32["loss"]) < 2.0 and float(qoda["loss"]) < 2.0
    assert abs(float(qoda["loss"]) - float(fp32["loss"])) < 0.1
    assert "link: none shaped (local ranks, Open MPI shared memory)" in out
    flat = " ".join(out.split())  # the closing note is wrapped
    assert "No shaped link was available (asked for with --bandwidth none)" in flat
    assert "so the time column favours fp32" in flat
    runs = [m.groupdict() for m in SUMMARY.finditer(out)]
    assert [(r["opt"], r["steps"]) for r in runs] == [("horovod-fp32", "60"), ("qoda", "60")]
    assert "computed as a ring allreduce" in runs[0]["how"]
    assert "counted by qoda_hvd's communicator" in runs[1]["how"]

    # --json: every run with rank 0's per-step curves, which `qoda-hvd plot` draws.
    data = json.loads((tmp_path / "demo.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["horovod-fp32", "qoda"]
    for r, row in zip(data["runs"], rows.values()):
        series = r["series"]
        assert series["step"] == list(range(1, 61)) and len(series["loss"]) == 60
        assert series["loss"][0] > series["loss"][-1] - 0.5  # a noisy per-batch loss, falling
        # Cumulative MB: non-decreasing, ending where the table's logical count ends.
        assert all(a <= b for a, b in zip(series["mb_sent"], series["mb_sent"][1:]))
    assert data["runs"][0]["series"]["mb_sent"][-1] == pytest.approx(float(rows["Horovod fp32 allreduce"]["mb"]), abs=0.01)
    assert data["runs"][1]["series"]["mb_sent"][-1] == pytest.approx(
        data["runs"][1]["extra"]["logical_bytes"] / 1e6, rel=0.05)
    pytest.importorskip("matplotlib")
    proc = subprocess.run([sys.executable, "-m", "qoda_hvd", "plot", str(tmp_path / "demo.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and (tmp_path / "demo.png").stat().st_size > 10_000, proc.stderr


@pytest.mark.timeout(360)
def test_demo_one_method_under_gloo():
    out = run_demo("--launcher", "gloo", "--steps", "30", "--methods", "horovod-fp16")
    m = SUMMARY.search(out)
    assert m, f"no summary line in:\n{out[-2000:]}"
    assert m["opt"] == "horovod-fp16" and "16-bit values" in m["how"]
    assert "[qoda-hvd] no shaped link (--launcher gloo runs local ranks only)" in out


def test_demo_refuses_a_method_named_twice():
    proc = subprocess.run([sys.executable, "-m", "qoda_hvd.demo", "--methods", "qoda", "qoda"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "names a method twice" in proc.stderr
