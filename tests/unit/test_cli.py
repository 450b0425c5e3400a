"""``qoda-hvd info`` on the real installed stack."""
from __future__ import annotations

import subprocess
import sys

import pytest

from qoda_hvd import __version__
from qoda_hvd.cli import collect_info, main


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
