"""qoda_hvd.plot / `qoda-hvd plot`: the demo's JSON and the examples' CSV drawn to a PNG."""
from __future__ import annotations

import builtins
import csv
import json
import struct
import subprocess
import sys

import pytest

from qoda_hvd import plot
from qoda_hvd.cli import main as cli_main

pytest.importorskip("matplotlib")


def write_demo_json(path, steps=20):
    """What `qoda-hvd demo --json` writes, with two methods' per-step curves."""
    runs = []
    for name, label, mb_per_step, decay in (("horovod-fp32", "Horovod fp32 allreduce", 0.3, 0.05),
                                            ("qoda", "qoda_hvd layer-wise 4-bit", 0.03, 0.05)):
        runs.append({"name": name, "label": label, "loss": 0.9, "loss_se": 0.01,
                     "ms_per_step": 10.0, "seconds": 1.0, "bytes_sent": mb_per_step * steps * 1e6,
                     "bytes_how": "x", "bits": 4.0, "extra": {},
                     "series": {"step": list(range(1, steps + 1)),
                                "loss": [2.0 * (1 - decay) ** s for s in range(steps)],
                                "mb_sent": [mb_per_step * (s + 1) for s in range(steps)]}})
    path.write_text(json.dumps({"meta": {"ranks": 2, "steps": steps}, "runs": runs}))
    return path


def write_metrics_csv(path, columns=("loss", "val_perplexity"), rows=5):
    """An example's metrics.csv (the columns _common.Run writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ["step", *columns, "exchanges", "bits_per_coordinate", "bytes_sent", "seconds"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for s in range(1, rows + 1):
            w.writerow([s, *[3.0 / s] * len(columns), s, 3.1, 1000 * s, 0.1 * s])
    return path


def png_size(path) -> tuple[int, int]:
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and blob[12:16] == b"IHDR"
    return struct.unpack(">II", blob[16:24])


def test_demo_json_gives_one_line_per_method(tmp_path):
    series = plot.load_series(write_demo_json(tmp_path / "demo.json"))
    assert [s.label for s in series] == ["Horovod fp32 allreduce", "qoda_hvd layer-wise 4-bit"]
    assert series[1].steps[:3] == [1.0, 2.0, 3.0]
    assert series[1].columns["mb_sent"][-1] == pytest.approx(0.6)


def test_plot_writes_a_png_of_both_panels(tmp_path):
    out = plot.plot_files([write_demo_json(tmp_path / "demo.json")])
    assert out == tmp_path / "demo.png"
    w, h = png_size(out)
    assert (w, h) == (1100, 420)  # figsize 11 x 4.2 inches at 100 dpi


def test_csvs_one_line_per_run_labelled_by_directory(tmp_path):
    a = write_metrics_csv(tmp_path / "runs" / "qoda" / "metrics.csv")
    b = write_metrics_csv(tmp_path / "runs" / "fp32" / "metrics.csv")
    series = [s for p in (a, b) for s in plot.load_series(p)]
    assert [s.label for s in series] == ["qoda", "fp32"]
    assert series[0].columns["mb_sent"] == pytest.approx([0.001 * s for s in range(1, 6)])
    out = plot.plot_files([a, b], out=tmp_path / "cmp.png", title="two runs")
    assert png_size(out) == (1100, 420)


def test_gan_csv_defaults_to_the_wasserstein_estimate_and_metric_is_checked(tmp_path):
    gan = write_metrics_csv(tmp_path / "gan" / "metrics.csv",
                            columns=("loss_d", "loss_g", "wasserstein", "gradient_penalty"))
    assert plot._metric(plot.load_series(gan), None) == "wasserstein"
    with pytest.raises(ValueError, match="--metric 'nope' is not a column"):
        plot.plot_files([gan], metric="nope")


def test_bad_inputs_say_what_was_expected(tmp_path):
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected the JSON object"):
        plot.load_series(tmp_path / "x.json")
    old = json.loads(write_demo_json(tmp_path / "old.json").read_text())
    del old["runs"][0]["series"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="no per-step series"):
        plot.load_series(tmp_path / "old.json")
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="metrics.csv"):
        plot.load_series(tmp_path / "t.csv")


def test_without_matplotlib_the_error_names_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(RuntimeError, match=r"qoda_hvd\[examples\]"):
        plot.plot_files([write_demo_json(tmp_path / "demo.json")])


def test_cli_plot_subcommand(tmp_path, capsys):
    src = write_demo_json(tmp_path / "demo.json")
    assert cli_main(["plot", str(src), "-o", str(tmp_path / "d.png")]) == 0
    assert f"wrote {tmp_path / 'd.png'}" in capsys.readouterr().out
    assert cli_main(["plot", str(tmp_path / "missing.csv")]) == 2
    assert "qoda-hvd plot: error:" in capsys.readouterr().err
    # The console entry point runs it too.
    proc = subprocess.run([sys.executable, "-m", "qoda_hvd", "plot", str(src)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and (tmp_path / "demo.png").exists(), proc.stderr
