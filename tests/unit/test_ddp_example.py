"""examples/ddp_lm.py under torchrun (2 gloo ranks, a tiny LM, a few steps): trains with the
layer-wise hook, saves, and resumes with its hook state."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--data", "synthetic", "--synthetic-sentences", "200", "--d-model", "32", "--heads", "2",
        "--layers", "1", "--d-ff", "64", "--seq-len", "16", "--batch", "2", "--log-every", "1",
        "--eval-batches", "1", "--eval-every", "100"]


def _torchrun(args, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this python")
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    return subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "examples" / "ddp_lm.py"), *TINY, *args],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)


@pytest.mark.timeout(600)
def test_ddp_lm_trains_saves_and_resumes(tmp_path):
    ck = str(tmp_path / "ck")
    first = _torchrun(["--hook", "layerwise", "--steps", "3", "--checkpoint", ck], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "step     3" in first.stdout and "compression" in first.stdout, first.stdout
    second = _torchrun(["--hook", "layerwise", "--steps", "4", "--checkpoint", ck, "--resume"],
                       tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "step     4" in second.stdout and "step     3" not in second.stdout, second.stdout
