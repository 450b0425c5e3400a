"""``qoda-hvd info`` on the real installed stack; ``qoda-hvd demo``'s choices and its table."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from qoda_hvd import __version__
from qoda_hvd.cli import DEMO_BANDWIDTH, _demo_link, collect_info, main
from qoda_hvd.demo import RunResult, format_table, summary_line


def test_info_reports_real_horovod_with_mpi_and_gloo():
    out = subprocess.run([sys.executable, "-m", "qoda_hvd", "info"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert f"qoda_hvd   {__version__}" in out
    assert "[X] PyTorch" in out
    assert "[X] MPI" in out and "[X] Gloo" in out
    assert "Open MPI" in out


def test_collect_info_versions():
    import horovod
    import torch

    info = collect_info()
    assert info["torch"] == torch.__version__
    assert info["horovod"] == horovod.__version__ == "0.28.1"
    assert info["horovod_controllers"] == {"mpi": True, "gloo": True}


def test_info_rejects_extra_arguments():
    with pytest.raises(SystemExit) as e:
        main(["info", "--bogus"])
    assert e.value.code == 2


# --- `qoda-hvd demo`: where the ranks run, and the table it ends with ---------------------------


@pytest.mark.parametrize("argv, message", [
    (["demo", "--bandwidth", "fast"], "bandwidth must be a number followed by one of"),
    (["demo", "--bandwidth", "1gbit", "--launcher", "gloo"],
     "--launcher gloo runs local ranks only; the emulated link runs them under mpirun"),
    (["demo", "--np", "0"], "--np must be in [1, 64], got 0"),
])
def test_demo_refuses_bad_link_options_before_launching(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_demo_link_choice(monkeypatch):
    import qoda_hvd.cluster.emulator as emulator

    args = argparse.Namespace(np=2, bandwidth="auto", launcher="mpirun")
    monkeypatch.setattr(emulator, "emulator_unavailable_reason", lambda: "no namespaces here")
    assert _demo_link(args) == (None, "no namespaces here")  # auto: local ranks, and why
    args.bandwidth = "250mbit"  # asked for by name: an error, not a silent local run
    with pytest.raises(ValueError, match="needs the cluster emulator, which cannot run here: "
                                         "no namespaces here"):
        _demo_link(args)
    monkeypatch.setattr(emulator, "emulator_unavailable_reason", lambda: None)
    assert _demo_link(args) == ("250mbit", None)
    args.bandwidth = "auto"
    assert _demo_link(args) == (DEMO_BANDWIDTH, None)
    args.bandwidth = "none"
    assert _demo_link(args) == (None, "asked for with --bandwidth none")
    args.bandwidth, args.launcher = "auto", "horovodrun"
    assert _demo_link(args) == (None, "--launcher horovodrun runs local ranks only")


def _result(name, label, loss, ms, mb, how, bits=None):
    return RunResult(name, label, loss, 0.0136, ms, ms * 0.3, mb * 1e6, how, bits)


def test_demo_table_reports_what_was_measured():
    fp32 = _result("horovod-fp32", "Horovod fp32 allreduce", 0.8349, 54.38, 95.76, "measured")
    qoda = _result("qoda", "qoda_hvd layer-wise 4-bit", 0.8701, 36.73, 10.53, "measured", 3.47)
    text = format_table([fp32, qoda], size=2, steps=300, batch=64, model_desc="MLP",
                        link="100mbit", unshaped_reason=None)
    assert "link: 100mbit each way, emulated (2 network namespaces" in text
    assert "Horovod fp32 allreduce          0.8349         95.76    54.38    1.00x" in text
    assert "qoda_hvd layer-wise 4-bit       0.8701         10.53    36.73    1.48x" in text
    # 0.0352 apart is more than 2 standard errors of 0.0136: said so, not called noise.
    assert "vs Horovod fp32 allreduce: +0.0352 (more than 2 standard errors)" in text
    assert "9.1x fewer bytes than Horovod fp32 allreduce (3.47 bits/coordinate)" in text
    assert "No shaped link" not in text
    local = format_table([fp32, qoda], size=2, steps=300, batch=64, model_desc="MLP", link=None,
                         unshaped_reason="not root")
    assert "link: none shaped" in local
    assert "No shaped link was available (not root)" in " ".join(local.split())
    assert summary_line(qoda, 2, 300).startswith("demo: qoda, 2 ranks, 300 steps, final loss 0.8701")
