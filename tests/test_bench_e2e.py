"""Smoke test of bench/e2e.py: one real 2-node run on the emulated cluster (1gbit, tiny models).

Needs root and network namespaces (skipped with the reason otherwise). It checks what the
benchmark reports, not how fast anything is: every method has positive step times and bytes,
QODA-layerwise sends fewer bytes per rank than fp32 allreduce, and the time-to-target rows are
there. About 15 s on an idle 2-core machine, 40 s under load.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qoda_hvd.cluster.emulator import emulator_unavailable_reason

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "e2e.py"

_REASON = emulator_unavailable_reason()

STEP_METHODS = ("compute", "hvd_fp32", "hvd_fp16", "eg_global", "qoda_allgather",
                "qoda_overlap", "qoda_overlap_mpi", "qoda_probed", "qoda_scatter_gather",
                "qoda_fallback")
VI_METHODS = ("hvd_fp32", "eg_global", "qoda_layerwise")


@pytest.fixture(scope="module")
def smoke_result(tmp_path_factory):
    if _REASON is not None:
        pytest.skip(f"cluster emulator unavailable: {_REASON}")
    out = tmp_path_factory.mktemp("e2e") / "e2e.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(out),
                           "--plot", str(out.with_suffix(".png"))],
                          capture_output=True, text=True, timeout=170, cwd=str(ROOT))
    assert proc.returncode == 0, f"bench/e2e.py --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.timeout(200)
def test_smoke_run_reports_every_method_with_positive_times_and_bytes(smoke_result):
    result, stdout = smoke_result
    (run,) = result["runs"]
    assert (run["nodes"], run["bandwidth"]) == (2, "1gbit")
    assert set(run["models"]) == {"wgan_gp", "lm"}
    for model, m in run["models"].items():
        methods = m["methods"]
        assert tuple(methods) == STEP_METHODS, model
        for name, r in methods.items():
            assert r["step_s"] > 0, (model, name)
            assert r["steps_timed"] == 2, (model, name)
            if name == "compute":
                continue
            assert r["bytes_sent"] > 0 and r["bytes_received"] > 0, (model, name)
            # Emulated nodes own their eth0: real bytes crossed the shaped link.
            assert r["wire_tx_bytes"] > 0, (model, name)
        fp32 = methods["hvd_fp32"]["bytes_sent"]
        assert fp32 == 4 * m["params"]  # ring allreduce at K = 2 moves the whole fp32 gradient
        for name in ("qoda_allgather", "qoda_overlap", "qoda_overlap_mpi", "qoda_probed",
                     "qoda_scatter_gather"):
            assert methods[name]["bytes_sent"] < fp32, (model, name)
            assert methods[name]["wire_tx_bytes"] < methods["hvd_fp32"]["wire_tx_bytes"], (model, name)
        assert methods["eg_global"]["exchanges_per_iteration"] == 2
        assert methods["qoda_allgather"]["exchanges_per_iteration"] == 1
        assert methods["qoda_scatter_gather"]["strategy"] == "scatter_gather"
        # overlap=None has decided within its warm-up; overlap=True stays on
        assert methods["qoda_probed"]["overlap"] in ("on", "off"), model
        assert methods["qoda_overlap"]["overlap"] == methods["qoda_overlap_mpi"]["overlap"] == "on"
        # The fallback row says what it kept; its timed bytes and bits match that choice.
        fb = methods["qoda_fallback"]
        assert fb["sends"] in ("quantized", "fp32"), model
        if fb["sends"] == "fp32":
            assert fb["bytes_sent"] == fp32 and fb["bits_per_coordinate"] == 32.0, model
        else:
            assert fb["bytes_sent"] < fp32 and fb["bits_per_coordinate"] < 8.0, model
    assert "(1) Horovod fp32 allreduce" in stdout and "goals" in stdout


@pytest.mark.timeout(200)
def test_smoke_run_has_time_to_target_rows(smoke_result):
    result, _ = smoke_result
    vi = result["runs"][0]["vi"]["methods"]
    assert tuple(vi) == VI_METHODS
    for name, r in vi.items():
        assert r["iterations"] >= 1 and r["seconds"] > 0, name
        assert r["bytes_sent_per_iteration"] > 0, name
        assert r["final_distance"] < r["initial_distance"], name
    assert vi["qoda_layerwise"]["bytes_sent_per_iteration"] < vi["hvd_fp32"]["bytes_sent_per_iteration"]


def test_bad_bandwidth_is_refused_before_anything_starts():
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--bandwidths", "1gbps"],
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert proc.returncode != 0
    assert "bandwidth must be a number followed by one of" in proc.stderr
