"""Smoke tests of bench/quality_gan.py and bench/quality_lm.py: one ``--quick`` run each on 2 real
ranks under ``mpirun`` (tiny models, one seed; ~30-60 s each on a loaded 2-core machine).

They check what the benchmarks report, not the quality figures: every method ran on both ranks
with bit-identical parameters, the byte counts are consistent (compressed runs send less than
fp32; extra-gradient exchanges twice per iteration), the FID analogue and its companions are
finite and in range, the plots and grids are written, and a report can be rebuilt from the JSON.
"""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None,
                                  reason="mpirun is not on PATH (Open MPI: `make setup` installs it)")
needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None,
    reason="scikit-learn is not installed (the `examples` extra; "
           "`make setup` installs it): quality_gan.py trains on its bundled digits")


def run_bench(script: str, *args: str, timeout: float = 280) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=str(ROOT))
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@needs_mpirun
@needs_sklearn
@pytest.mark.timeout(300)
def test_quality_gan_quick(tmp_path):
    out = tmp_path / "gan.json"
    proc = run_bench("quality_gan.py", "--quick", "--out", str(out), "--cache-dir",
                     str(tmp_path / "cache"))
    data = json.loads(out.read_text())
    methods = ["fp32", "qoda_lw4", "qoda_global4", "qoda_lw3", "qgenx_global4", "oadam_lw4"]
    assert list(data["summary"]) == methods
    assert 0.9 < data["classifier_accuracy"] <= 1.0
    fp32_bytes = data["summary"]["fp32"]["bytes_sent_per_iteration"][0]
    for name, s in data["summary"].items():
        fid = s["fid"][0]
        assert math.isfinite(fid) and fid > 0, name
        assert 0.0 <= s["label_entropy"][0] <= math.log(10) + 1e-9, name
        assert 0.0 <= s["coverage"][0] <= 1.0, name
        assert s["identical_across_ranks"], name
        assert len(s["fid_curve"]) == len(s["steps"]) == 2, name
        if name != "fp32":
            assert s["bits_per_coordinate"][0] < 8, name
            assert s["bytes_sent_per_iteration"][0] < fp32_bytes / 2 * s["exchanges_per_iteration"][0], name
        assert (tmp_path / f"gan_grid_{name}.png").stat().st_size > 100
    assert data["summary"]["qgenx_global4"]["exchanges_per_iteration"][0] == 2
    assert data["summary"]["qoda_lw4"]["exchanges_per_iteration"][0] == 1
    # Global 4-bit: one quantized type; layer-wise: the model's types.
    assert list(data["summary"]["qoda_global4"]["types"]) == ["global"]
    assert len(data["summary"]["qoda_lw4"]["types"]) >= 2
    assert "FID analogue" in proc.stdout and (tmp_path / "gan.png").stat().st_size > 1000
    again = run_bench("quality_gan.py", "--report", str(out), "--out", str(tmp_path / "again.json"))
    assert "qgenx_global4" in again.stdout


@needs_mpirun
@pytest.mark.timeout(300)
def test_quality_lm_quick(tmp_path):
    out = tmp_path / "lm.json"
    proc = run_bench("quality_lm.py", "--quick", "--ranks", "2", "--global-ranks", "1", "2", "4",
                     "--variants", "acc+layer", "--out", str(out))
    data = json.loads(out.read_text())
    s = data["summary"]
    assert set(s) == {"fp32", "global_r1", "global_r2", "global_r4", "layerwise_r2",
                      "layerwise+acc+layer_r2"}
    assert all(v["identical_across_ranks"] for v in s.values())
    sent = {k: v["bytes_sent_per_step"][0] for k, v in s.items()}
    assert sent["global_r1"] < sent["global_r2"] < sent["global_r4"] < sent["fp32"]
    runs = {r["method"]: r for r in data["results"]}
    assert runs["layerwise+acc+layer_r2"]["error_window"] == "accumulated"
    assert "lm_head.weight" in runs["layerwise+acc+layer_r2"]["ranks"]  # one rank per layer
    assert runs["layerwise_r2"]["rank_updates"] >= 1
    gains = data["equal_loss_gains"]
    assert set(gains) == {"layerwise_r2", "layerwise+acc+layer_r2"}
    assert "at equal validation loss" in proc.stdout
    assert out.with_suffix(".png").stat().st_size > 1000
    merged = run_bench("quality_lm.py", "--merge", str(out), "--out", str(tmp_path / "m.json"))
    assert "layerwise+acc+layer_r2" in merged.stdout


def test_equal_loss_interpolation_and_method_names():
    spec = importlib.util.spec_from_file_location("bench_quality_lm", BENCH / "quality_lm.py")
    lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm)
    curve = [(10.0, 2.0), (20.0, 2.2), (40.0, 2.6)]
    ratio, where = lm.global_ratio_at(2.1, curve)
    assert where == "inside" and ratio == pytest.approx(math.sqrt(200.0))  # halfway in log ratio
    assert lm.global_ratio_at(1.9, curve) == (None, "below")
    assert lm.global_ratio_at(2.7, curve) == (None, "above")
    assert lm.parse_method("layerwise+acc+rel_r4") == ("layerwise", ("acc", "rel"), 4)
    assert lm.parse_method("fp32") == ("fp32", (), None)
    for bad in ("global+acc_r2", "layerwise+week_r2", "layerwise_r0", "layerwise+acc+acc_r2"):
        with pytest.raises(ValueError, match="unknown method"):
            lm.parse_method(bad)
    # mean and standard error
    assert lm.mean_se([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0 / math.sqrt(3.0)))
