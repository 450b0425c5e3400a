"""Local launcher command lines and their argument checks."""
from __future__ import annotations

import pytest

from qoda_hvd.launcher import local_command, rank_environment


@pytest.mark.parametrize("launcher, expected", [
    ("mpirun", ["-np", "2", "--bind-to", "none", "python", "w.py"]),
    ("horovodrun", ["-np", "2", "-H", "localhost:2", "--mpi", "python", "w.py"]),
    ("gloo", ["-np", "2", "-H", "localhost:2", "--gloo", "python", "w.py"]),
])
def test_local_command(launcher, expected):
    cmd = local_command(2, ["python", "w.py"], launcher)
    assert cmd[0].endswith("mpirun" if launcher == "mpirun" else "horovodrun")
    assert cmd[1:] == expected


def test_oversubscribe_beyond_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert "--oversubscribe" in local_command(3, ["x"], "mpirun")
    assert "--oversubscribe" not in local_command(2, ["x"], "mpirun")


@pytest.mark.parametrize("kwargs, error, match", [
    ({"np": 0}, ValueError, r"np must be an integer >= 1, got 0"),
    ({"np": 2.0}, ValueError, r"np must be an integer >= 1, got 2.0"),
    ({"np": 2, "launcher": "srun"}, ValueError, r"launcher must be one of .*got 'srun'"),
])
def test_local_command_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        local_command(argv=["x"], **kwargs)


def test_rank_environment_one_thread_and_keeps_user_choice():
    env = rank_environment({"OMP_NUM_THREADS": "4"})
    assert env["OMP_NUM_THREADS"] == "4"
    assert rank_environment({})["MKL_NUM_THREADS"] == "1"
