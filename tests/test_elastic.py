"""Elastic training (``horovodrun --gloo --min-np/--max-np --host-discovery-script``) with
``qoda_hvd.DistributedOptimizer``: a worker killed mid-training, a worker added.

Each test starts its own elastic job on this machine (so it lives here, not under
tests/distributed, whose suite runs inside an already launched job), running
``examples/elastic.py`` with four models side by side: QODA + layer-wise allgather, Adam +
layer-wise scatter_gather, QODA + none, SGD + none. The harness:

- gives every slot a host name of its own (``localhost``, ``127.0.0.1``, this host's name, all
  this machine): Horovod leaves a failed *host* out, so one host with 3 slots would end the job;
- lists them from a discovery script that reads a file the test rewrites (to add a worker);
- kills a worker with SIGKILL at a chosen step (``--kill-at-step``, in the worker itself, just
  before the step's exchange, so its peers fail inside a collective);
- bounds the job in time (a hang is a failure) and reads every process's JSON-lines log and
  every final rank's parameters.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "elastic.py"
HOSTS = ["localhost", "127.0.0.1", socket.gethostname()]
CONFIGS = ["qoda_ag:qoda:layerwise:allgather", "adam_sg:adam:layerwise:scatter_gather",
           "qoda_none:qoda:none", "sgd_none:sgd:none"]
JOB_TIMEOUT = 300  # seconds for one elastic job, failure handling included

pytestmark = pytest.mark.timeout(JOB_TIMEOUT + 60)


def _horovodrun() -> str:
    path = Path(sys.executable).parent / "horovodrun"
    found = str(path) if path.exists() else shutil.which("horovodrun")
    if found is None:
        pytest.skip("horovodrun is not installed")
    if len(set(HOSTS)) < 3:
        pytest.skip("needs three distinct names for this machine")
    return found


class ElasticJob:
    """One ``horovodrun --gloo`` elastic job of examples/elastic.py on this machine."""

    def __init__(self, tmp_path: Path, hosts: list[str]) -> None:
        self.dir = tmp_path
        self.hosts_file = tmp_path / "hosts.txt"
        self.logs = tmp_path / "logs"
        self.out = tmp_path / "out"
        self.set_hosts(hosts)
        self.discover = tmp_path / "discover.sh"
        self.discover.write_text(f"#!/bin/sh\ncat '{self.hosts_file}'\n")
        self.discover.chmod(0o755)

    def set_hosts(self, hosts: list[str]) -> None:
        tmp = self.hosts_file.with_suffix(".new")
        tmp.write_text("".join(f"{h}:1\n" for h in hosts))
        tmp.replace(self.hosts_file)  # the discovery script never reads half a file

    def records(self) -> list[dict]:
        out = []
        for path in sorted(self.logs.glob("pid*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line being written, or cut by SIGKILL
                    continue
                rec["pid"] = path.stem
                out.append(rec)
        return out

    def run(self, np: int, min_np: int, max_np: int, args: list[str], watch=None) -> str:
        """Run to the end (``watch(job)`` is called twice a second meanwhile); the output."""
        cmd = [_horovodrun(), "--gloo", "-np", str(np), "--min-np", str(min_np),
               "--max-np", str(max_np), "--host-discovery-script", str(self.discover),
               sys.executable, str(EXAMPLE), "--log-dir", str(self.logs), "--out", str(self.out),
               *sum((["--config", c] for c in CONFIGS), []), *args]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        log = open(self.dir / "horovodrun.out", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        deadline = time.monotonic() + JOB_TIMEOUT
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    pytest.fail(f"the elastic job did not end within {JOB_TIMEOUT} s:\n"
                                + (self.dir / "horovodrun.out").read_text()[-4000:])
                if watch is not None:
                    watch(self)
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
        text = (self.dir / "horovodrun.out").read_text()
        assert proc.returncode == 0, f"horovodrun exited {proc.returncode}:\n{text[-4000:]}"
        return text

    def finals(self) -> list[dict]:
        return [torch.load(p, weights_only=False) for p in sorted(self.out.glob("rank*.pt"))]


def assert_bit_identical(finals: list[dict]) -> None:
    for name in finals[0]["params"]:
        for r, other in enumerate(finals[1:], 1):
            assert all(torch.equal(a, b) for a, b in zip(finals[0]["params"][name], other["params"][name])), \
                f"{name}: rank {r}'s parameters differ from rank 0's"


def test_lost_worker_survivors_roll_back_to_the_commit_and_go_on(tmp_path):
    steps, commit_every, kill_at = 16, 4, 9
    job = ElasticJob(tmp_path, HOSTS)
    job.run(3, 2, 3, ["--steps", str(steps), "--commit-every", str(commit_every),
                      "--kill-at-step", str(kill_at), "--kill-rank", "2", "--kill-size", "3"])
    finals = job.finals()
    assert [f["size"] for f in finals] == [2, 2] and all(f["step"] == steps for f in finals)
    assert_bit_identical(finals)
    for f in finals:  # the exchanges re-formed for 2 ranks; "auto" would pick allgather at 2
        assert f["stats"]["adam_sg"]["strategy"] == "scatter_gather"
        assert f["stats"]["qoda_ag"]["exchanges"] == steps - commit_every * (kill_at // commit_every)

    records = [r for r in job.records() if "step" in r]
    before = {(r["rank"], r["step"]): r["losses"] for r in records if r["size"] == 3}
    after = [r for r in records if r["size"] == 2]
    last_commit = commit_every * (kill_at // commit_every)
    assert max(s for _, s in before) == kill_at - 1, "the killed worker's peers went past its step"
    assert min(r["step"] for r in after) == last_commit, "did not resume from the last commit"
    assert {r["step"] for r in after} == set(range(last_commit, steps))
    for r in after:
        assert all(math.isfinite(v) for v in r["losses"].values())
        if r["step"] == last_commit:  # the committed state again: the very same losses
            assert r["losses"] == before[(r["rank"], last_commit)]


def test_added_worker_gets_the_state_and_all_stay_bit_identical(tmp_path):
    steps, commit_every, join_after = 24, 2, 4
    job = ElasticJob(tmp_path, HOSTS[:2])

    def add_a_worker(job):
        if len(job.hosts_file.read_text().split()) == 2 and any(
                r.get("step", -1) >= join_after for r in job.records()):
            job.set_hosts(HOSTS)

    job.run(2, 2, 3, ["--steps", str(steps), "--commit-every", str(commit_every),
                      "--step-sleep", "0.3"], watch=add_a_worker)
    finals = job.finals()
    assert [f["size"] for f in finals] == [3, 3, 3], "the third worker did not join before the end"
    assert_bit_identical(finals)

    records = [r for r in job.records() if "step" in r]
    by_pid: dict[str, list[dict]] = {}
    for r in records:
        by_pid.setdefault(r["pid"], []).append(r)
    newcomer = [rs for rs in by_pid.values() if min(r["step"] for r in rs) > 0]
    assert len(newcomer) == 1, "expected one worker that started mid-run"
    first = min(r["step"] for r in newcomer[0])
    assert first >= join_after and first % commit_every == 0, first
    assert all(r["size"] == 3 for r in newcomer[0])
    two = {r["step"] for r in records if r["size"] == 2}
    assert two == set(range(0, first)), "the job restarted instead of going on"
    for r in records:
        assert all(math.isfinite(v) for v in r["losses"].values())
