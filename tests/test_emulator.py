"""The cluster emulator on this machine: shaped links run at their rate, nothing is left behind.

Needs root and network namespaces (skipped with the reason otherwise). Every job has a timeout;
the file runs in about 30-40 s on 2 cores. The unit checks at the top (rates, burst, rsh agent)
run anywhere.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from qoda_hvd.cluster.emulator import (EmulatedCluster, EmulatorError, emulator_unavailable_reason,
                                       netem_available, parse_delay, parse_rate, tbf_burst)
from qoda_hvd.cluster.rsh_agent import agent_command, parse_map

ROOT = Path(__file__).resolve().parents[1]
RATE = "50mbit"
NBYTES = 4 << 20  # 4 MiB: 0.67 s at 50 Mbit/s, long against TCP ramp-up and barrier latency
JOB_TIMEOUT = 90

_REASON = emulator_unavailable_reason()
needs_namespaces = pytest.mark.skipif(_REASON is not None, reason=f"{_REASON}")


# ------------------------------------------------------------------ pure parts (no root needed)
@pytest.mark.parametrize("text, bits", [("50mbit", 50 * 10**6), ("1gbit", 10**9),
                                        ("2.5gbit", 2_500_000_000), ("800kbit", 800_000)])
def test_parse_rate(text, bits):
    assert parse_rate(text) == bits


@pytest.mark.parametrize("call, error, match", [
    (lambda: parse_rate("50mbps"), ValueError, r"bandwidth must be a number followed by one of "
                                               r"bit, kbit, mbit, gbit, tbit.*got '50mbps'"),
    (lambda: parse_rate("1bit"), ValueError, r"bandwidth must be in \[8kbit, 400gbit\]"),
    (lambda: parse_rate(50), TypeError, r"bandwidth must be a str .* got int"),
    (lambda: parse_delay("1 min"), ValueError, r"delay must be a number followed by one of us, "
                                               r"ms, s"),
    (lambda: EmulatedCluster(nodes=0), ValueError, r"nodes must be in \[1, 64\], got 0"),
    (lambda: EmulatedCluster(nodes=2.0), TypeError, r"nodes must be an int, got float"),
    (lambda: EmulatedCluster(prefix="x"), ValueError, r"prefix must look like"),
    (lambda: EmulatedCluster(ranks_per_node=0), ValueError, r"ranks_per_node must be in "
                                                            r"\[1, 16\], got 0"),
    (lambda: EmulatedCluster(ranks_per_node="2"), TypeError, r"ranks_per_node must be an int"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_burst_covers_a_gso_segment_and_two_ms():
    assert tbf_burst(parse_rate("50mbit")) == 64 * 1024 + 1514   # 2 ms would be 12.5 kB
    assert tbf_burst(parse_rate("10gbit")) == 2_500_000           # 2 ms x 10 Gbit/s


def test_rsh_agent_runs_the_command_in_the_hosts_namespace():
    table = parse_map("198.18.7.1=ns0,198.18.7.2=ns1")
    assert agent_command(table, ["198.18.7.2", "orted", "-mca", "ess", "env"]) == [
        "ip", "netns", "exec", "ns1", "unshare", "--uts", "sh", "-c",
        "hostname ns1 && orted -mca ess env"]
    with pytest.raises(ValueError, match=r"is an emulated node; known nodes: 198.18.7.1, "):
        agent_command(table, ["10.0.0.9", "orted"])
    with pytest.raises(ValueError, match=r"ADDRESS=NAMESPACE"):
        parse_map("198.18.7.1")


def test_ranks_per_node_in_the_hostfile_and_mpirun_line(monkeypatch):
    cluster = EmulatedCluster(nodes=3, ranks_per_node=2, bandwidth=RATE)
    monkeypatch.setattr(cluster, "_workdir", Path("/nonexistent"))  # no namespaces needed
    cmd = cluster.mpirun_command(["python", "job.py"])
    assert cmd[cmd.index("-np") + 1] == "6" and cluster.size == 6
    assert cmd[cmd.index("btl") + 1] == "tcp,vader,self"  # shared memory inside a node
    assert cmd[4:6] == ["unshare", "--uts"]  # mpirun's node gets its own host name too
    with pytest.raises(ValueError, match=r"np must be an int in \[1, 6\] \(2 rank\(s\) per node\)"):
        cluster.mpirun_command(["python"], np=7)
    one = EmulatedCluster(nodes=2, bandwidth=RATE)
    monkeypatch.setattr(one, "_workdir", Path("/nonexistent"))
    assert one.mpirun_command(["x"])[one.mpirun_command(["x"]).index("btl") + 1] == "tcp,self"


def test_cli_ranks_per_node_is_checked_before_anything_starts(capsys):
    from qoda_hvd.cluster.emulator import main

    with pytest.raises(SystemExit) as e:
        main(["--nodes", "2", "--ranks-per-node", "0", "--", "true"])
    assert e.value.code == 2
    assert "ranks_per_node must be in [1, 16], got 0" in capsys.readouterr().err


def test_refuses_without_root_before_creating_anything(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    cluster = EmulatedCluster(nodes=2, bandwidth=RATE)
    with pytest.raises(PermissionError, match=r"the cluster emulator needs root"):
        cluster.start()
    assert emulator_unavailable_reason().startswith("the cluster emulator needs root")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to run the wrapper as another user")
def test_bash_wrapper_refuses_without_root():
    # A copy in a directory the unprivileged user can read: the checkout (and pytest's tmp_path)
    # may sit in a private 0700 directory, as CI's clone under mktemp -d does.
    public = Path(tempfile.mkdtemp(prefix="qoda-wrapper-"))
    try:
        public.chmod(0o755)
        wrapper = public / "emulate-cluster"
        shutil.copy(ROOT / "launch" / "emulate-cluster", wrapper)
        wrapper.chmod(0o755)
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               "bash", str(wrapper), "--nodes", "2", "--", "true"],
                              capture_output=True, text=True, timeout=30, cwd="/")
    finally:
        shutil.rmtree(public, ignore_errors=True)
    assert proc.returncode == 1
    assert "emulate-cluster: error: the cluster emulator needs root" in proc.stderr


# ------------------------------------------------------------------------ helpers (root only)
def _leftovers(prefix: str) -> list[str]:
    """Everything of a run that tear-down must remove: namespaces, root-namespace links, dirs."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           timeout=10).stdout.split()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           timeout=10).stdout
    left = [f"netns {n}" for n in names if n.startswith(prefix)]
    left += [f"link {line.split(':')[1].strip()}" for line in links.splitlines()
             if prefix in line]
    left += [f"dir {p}" for p in Path("/tmp").glob(f"{prefix}*")]
    return left


SLEEPER = "import time; time.sleep(60)"


def _processes_with(token: str) -> list[int]:
    """Pids of live ``python -c SLEEPER <token>`` processes (the ranks, not their launchers)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv[1:4] == ["-c", SLEEPER, token]:
            found.append(int(cmdline.parent.name))
    return found


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         timeout=10).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


# --------------------------------------------------------------------------------- the tests
@needs_namespaces
@pytest.mark.timeout(120)
def test_two_nodes_move_bytes_at_the_shaped_rate():
    links_before = _root_links()
    with EmulatedCluster(nodes=2, bandwidth=RATE) as cluster:
        prefix = cluster.prefix
        assert len(_leftovers(prefix)) > 0  # it exists while the `with` runs
        proc = cluster.run(
            [sys.executable, "-m", "qoda_hvd.cluster.bandwidth", "--bytes", str(NBYTES),
             "--pattern", "oneway,exchange", "--repeats", "3", "--rate", RATE],
            timeout=JOB_TIMEOUT, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print("\n".join(json.dumps(r) for r in results))
    assert [r["pattern"] for r in results] == ["oneway", "exchange"]
    for r in results:
        # The link cannot carry more than its rate (loopback veth unshaped would be ~100x), and
        # TCP over it should get most of it: loose bounds for a shared 2-core machine.
        assert 0.5 <= r["ratio"] <= 1.1, r
    assert _leftovers(prefix) == []
    assert _root_links() == links_before  # nothing was ever added to the root namespace


@needs_namespaces
@pytest.mark.timeout(120)
def test_horovod_job_runs_one_rank_per_node(tmp_path):
    script = tmp_path / "hvd_job.py"
    script.write_text(
        "import json, time, torch, horovod.torch as hvd\n"
        "torch.set_num_threads(1)\n"
        "hvd.init()\n"
        "total = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum).item()\n"
        "n = 1 << 19  # 2 MiB of float32 per rank\n"
        "mine = torch.full((n,), float(hvd.rank()))\n"
        "hvd.allgather(mine[:256], name='warm')\n"
        "hvd.allreduce(torch.zeros(1), name='barrier')\n"
        "t0 = time.perf_counter(); got = hvd.allgather(mine, name='big')\n"
        "dt = time.perf_counter() - t0\n"
        "ok = all(bool((got[r * n:(r + 1) * n] == r).all()) for r in range(hvd.size()))\n"
        "print(json.dumps({'rank': hvd.rank(), 'size': hvd.size(), 'local_rank': "
        "hvd.local_rank(), 'sum': total, 'ok': ok, 'seconds': dt, 'bytes_in': "
        "4 * n * (hvd.size() - 1)}), flush=True)\n")
    with EmulatedCluster(nodes=2, bandwidth=RATE) as cluster:
        prefix = cluster.prefix
        proc = cluster.run([sys.executable, str(script)], timeout=JOB_TIMEOUT,
                           capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    # The ranks' lines can arrive joined on one line of mpirun's output: take each object.
    ranks = sorted((json.loads(obj) for obj in re.findall(r"\{[^{}]*\}", proc.stdout)),
                   key=lambda r: r["rank"])
    print("\n".join(json.dumps(r) for r in ranks))
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["size"] == 2 and r["local_rank"] == 0  # each rank alone on its "node"
        assert r["sum"] == 3.0 and r["ok"]
        goodput = r["bytes_in"] * 8 / r["seconds"]
        # The bytes crossed the shaped link: no faster than the rate (with slack for timing).
        assert goodput <= 1.1 * parse_rate(RATE), r
    assert _leftovers(prefix) == []


@needs_namespaces
@pytest.mark.timeout(150)
def test_two_ranks_per_node_are_local_ranks_and_stay_off_the_link(tmp_path):
    """2 nodes x 2 ranks: Horovod sees local_size 2 and cross_size 2; 4 MiB exchanged inside
    each node does not cross the node's shaped interface, 4 MiB between nodes does."""
    script = tmp_path / "local_job.py"
    script.write_text(
        "import json, socket, numpy as np, torch, horovod.torch as hvd\n"
        "torch.set_num_threads(1)\n"
        "hvd.init()\n"
        "from mpi4py import MPI\n"
        "world = MPI.COMM_WORLD\n"
        "node = world.Split(hvd.cross_rank(), hvd.local_rank())\n"
        "cross = world.Split(hvd.local_rank(), hvd.cross_rank())\n"
        "def tx():\n"
        "    return int(open('/sys/class/net/eth0/statistics/tx_bytes').read())\n"
        "data = np.full(1 << 20, hvd.rank(), dtype=np.float32)  # 4 MiB\n"
        "world.Barrier(); t0 = tx()\n"
        "got = np.empty(2 * data.size, dtype=np.float32); node.Allgather(data, got)\n"
        "world.Barrier(); t1 = tx()\n"
        "cross.Allgather(data, got)\n"
        "world.Barrier(); t2 = tx()\n"
        "print(json.dumps({'rank': hvd.rank(), 'local_rank': hvd.local_rank(), 'local_size': "
        "hvd.local_size(), 'cross_rank': hvd.cross_rank(), 'cross_size': hvd.cross_size(), "
        "'host': socket.gethostname(), 'intra_tx': t1 - t0, 'cross_tx': t2 - t1}), flush=True)\n")
    with EmulatedCluster(nodes=2, ranks_per_node=2, bandwidth="1gbit") as cluster:
        prefix = cluster.prefix
        proc = cluster.run([sys.executable, str(script)], timeout=JOB_TIMEOUT,
                           capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    ranks = sorted((json.loads(obj) for obj in re.findall(r"\{[^{}]*\}", proc.stdout)),
                   key=lambda r: r["rank"])
    print("\n".join(json.dumps(r) for r in ranks))
    assert [(r["local_rank"], r["local_size"], r["cross_rank"], r["cross_size"]) for r in ranks] \
        == [(0, 2, 0, 2), (1, 2, 0, 2), (0, 2, 1, 2), (1, 2, 1, 2)]
    assert ranks[0]["host"] == ranks[1]["host"] != ranks[2]["host"] == ranks[3]["host"]
    # tx of the node's interface counts both of its ranks: inside the node almost nothing
    # (control traffic), between nodes each rank's 4 MiB
    for r in ranks:
        assert r["intra_tx"] < 256 << 10, r
        assert r["cross_tx"] >= 0.9 * 2 * (4 << 20), r  # (ranks read tx at slightly different times)
    assert _leftovers(prefix) == []


@needs_namespaces
@pytest.mark.timeout(400)
def test_two_level_exchange_on_emulated_two_by_two(tmp_path):
    """tests/distributed/test_two_level_ranks.py under mpirun on 2 emulated nodes x 2 ranks:
    Horovod's topology, bit-identical parameters, the inter-node bytes, and mpi4py's groups."""
    argv = [sys.executable, str(ROOT / "tests" / "distributed" / "run_rank.py"), str(tmp_path),
            str(ROOT / "tests" / "distributed" / "test_two_level_ranks.py"), "-x", "-q",
            "-p", "no:cacheprovider", "--timeout=240", "-rs"]
    env = dict(os.environ, QODA_EXPECTED_SIZE="4", PYTHONUNBUFFERED="1")
    with EmulatedCluster(nodes=2, ranks_per_node=2, bandwidth="1gbit") as cluster:
        proc = cluster.run(argv, timeout=360, capture_output=True, text=True, env=env, cwd=ROOT)
    logs = {p.name: p.read_text(errors="replace") for p in sorted(tmp_path.glob("rank*.log"))}
    shown = "\n".join(f"===== {n} =====\n{t[-3000:]}" for n, t in logs.items())
    assert proc.returncode == 0, proc.stderr[-3000:] + shown
    assert len(logs) == 4, shown
    for name, text in logs.items():
        assert "3 passed" in text, f"{name}:\n{text[-3000:]}"


@needs_namespaces
@pytest.mark.timeout(120)
def test_failures_leave_nothing_behind():
    token = f"qoda-test-{uuid.uuid4().hex}"
    # A job that fails.
    with EmulatedCluster(nodes=2, bandwidth=RATE) as cluster:
        proc = cluster.run([sys.executable, "-c", "import sys; sys.exit(1)"],
                           timeout=JOB_TIMEOUT, capture_output=True, text=True)
        prefixes = [cluster.prefix]
    assert proc.returncode != 0
    # An error in the caller's own code while a job runs in the namespaces.
    with pytest.raises(RuntimeError, match="boom"):
        with EmulatedCluster(nodes=2, bandwidth=RATE) as cluster:
            prefixes.append(cluster.prefix)
            subprocess.Popen(cluster.exec_command(1, [sys.executable, "-c", SLEEPER,
                                                      token]))
            deadline = time.monotonic() + 20
            while not _processes_with(token) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _processes_with(token)
            raise RuntimeError("boom")
    # A job that outlives its timeout.
    with EmulatedCluster(nodes=2, bandwidth=RATE) as cluster:
        prefixes.append(cluster.prefix)
        with pytest.raises(subprocess.TimeoutExpired):
            cluster.run([sys.executable, "-c", SLEEPER, token],
                        timeout=3, capture_output=True)
    assert _processes_with(token) == []
    for prefix in prefixes:
        assert _leftovers(prefix) == []


@needs_namespaces
@pytest.mark.timeout(90)
def test_bash_wrapper_passes_exit_code_and_cleans_up_on_ctrl_c():
    wrapper = [str(ROOT / "launch" / "emulate-cluster"), "--nodes", "2", "--bandwidth", RATE]
    env = dict(os.environ, QODA_PYTHON=sys.executable)
    proc = subprocess.run(wrapper + ["--", "sh", "-c", "exit 3"], env=env, capture_output=True,
                          text=True, timeout=JOB_TIMEOUT)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "2 emulated nodes on 198.18." in proc.stderr

    token = f"qoda-test-{uuid.uuid4().hex}"
    job = subprocess.Popen(wrapper + ["--", sys.executable, "-c", SLEEPER, token], env=env,
                           stderr=subprocess.PIPE, text=True)
    prefix = f"qoda-{job.pid}-"
    try:
        deadline = time.monotonic() + 30
        while len(_processes_with(token)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_processes_with(token)) >= 2, "the two ranks did not start"
        assert _leftovers(prefix)
        job.send_signal(signal.SIGINT)  # what Ctrl-C sends to the wrapper
        rc = job.wait(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert rc == 130, job.stderr.read()[-3000:]
    assert _processes_with(token) == []
    assert _leftovers(prefix) == []


@needs_namespaces
@pytest.mark.timeout(60)
def test_delay_without_netem_is_refused_and_cleaned_up():
    if netem_available():
        pytest.skip("this kernel has netem: the refusal path does not apply")
    cluster = EmulatedCluster(nodes=2, bandwidth=RATE, delay="1ms")
    with pytest.raises(EmulatorError, match=r"needs the kernel's netem qdisc \(sch_netem"):
        cluster.start()
    assert _leftovers(cluster.prefix) == []
