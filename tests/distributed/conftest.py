"""Fixtures for the suite that runs on every rank under ``mpirun`` / ``horovodrun``.

Collected by a plain one-process ``pytest`` it is skipped: ``tests/test_distributed.py`` launches
it on 2 ranks with each launcher. Every test calls ``hvd.init()`` (through the ``hvd`` fixture),
derives its expectations from ``hvd.size()``, and skips identically on every rank at size 1.
"""
from __future__ import annotations

import os

import pytest
import torch

#: Set by the launcher (Open MPI, or horovodrun --gloo) on every rank.
_RANK_VARS = ("OMPI_COMM_WORLD_SIZE", "HOROVOD_SIZE", "PMI_SIZE")


def under_launcher() -> bool:
    return any(v in os.environ for v in _RANK_VARS)


def pytest_collection_modifyitems(config, items):
    if under_launcher():
        return
    skip = pytest.mark.skip(reason="runs under mpirun/horovodrun: see tests/test_distributed.py")
    for item in items:
        if "tests/distributed" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hvd():
    """``horovod.torch``, initialised; one compute thread per rank."""
    import horovod.torch as hvd

    torch.set_num_threads(1)
    hvd.init()
    expected = os.environ.get("QODA_EXPECTED_SIZE")
    if expected is not None and hvd.size() != int(expected):
        pytest.fail(f"launched for {expected} ranks but hvd.size() is {hvd.size()}: the "
                    "ranks did not join one job")
    return hvd


@pytest.fixture
def multi(hvd):
    """``hvd`` when there are at least 2 ranks; skips (on every rank alike) at size 1."""
    if hvd.size() < 2:
        pytest.skip("needs at least 2 ranks")
    return hvd
