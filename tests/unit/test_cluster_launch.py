"""Cluster launch command lines: the README's dry-run example, hostfiles, errors, host checks."""
from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qoda_hvd.cluster import launch as cl
from qoda_hvd.cluster.launch import (Host, LaunchError, LaunchSpec, check_hosts,
                                     horovodrun_command, mpirun_command, parse_hosts,
                                     read_hostfile)

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Launching on a cluster"


def readme_examples() -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for every ``$ launch/...`` line in the section's
    console blocks."""
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, f"README.md has no '{SECTION}' section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    examples: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", section, re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                examples.append((line[2:], []))
            elif examples:
                examples[-1][1].append(line)
    return examples


def test_readme_has_both_two_node_examples():
    commands = [cmd for cmd, _ in readme_examples()]
    assert any(c.startswith("launch/qoda-mpirun --dry-run") for c in commands), commands
    assert any(c.startswith("launch/qoda-horovodrun --dry-run") for c in commands), commands


@pytest.mark.parametrize("command, expected", readme_examples())
def test_readme_dry_run_output_is_exact(command, expected):
    argv = shlex.split(command)
    assert argv[0].startswith("launch/") and "--dry-run" in argv
    proc = subprocess.run(["bash", str(ROOT / argv[0]), *argv[1:]], cwd=ROOT, text=True,
                          capture_output=True, timeout=60,
                          env=dict(os.environ, QODA_PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == expected


def test_dry_run_contacts_no_host(monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("dry-run must not open a connection")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert cl.main(["--dry-run", "-H", "node1:2,node2:2", "--", "python", "t.py"]) == 0
    assert capsys.readouterr().out.startswith("mpirun -np 4 -H node1:2,node2:2 ")


def test_qoda_hvd_launch_matches_the_script(capsys):
    from qoda_hvd.cli import main as cli_main

    args = ["--dry-run", "-H", "a:2,b:2", "--gpus-per-node", "2", "--", "python", "t.py"]
    assert cli_main(["launch", "--launcher", "horovodrun", *args]) == 0
    via_cli = capsys.readouterr().out
    assert cl.main(args, "horovodrun") == 0
    assert capsys.readouterr().out == via_cli
    assert via_cli.startswith("env NCCL_IB_DISABLE=1 horovodrun -np 4 -H a:2,b:2 --mpi ")


def test_hostfile_formats(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode1 slots=4 max_slots=8\n\nnode2:4   # colon form\n"
                        "node3\n")
    assert read_hostfile(hostfile) == [Host("node1", 4), Host("node2", 4), Host("node3")]
    spec = LaunchSpec(("t",), tuple(read_hostfile(hostfile)), gpus_per_node=4)
    assert spec.hosts_arg == "node1:4,node2:4,node3:4" and spec.total_ranks == 12


def test_transports_map_to_mca_and_env():
    hosts = tuple(parse_hosts("a:1,b:1"))
    ucx = mpirun_command(LaunchSpec(("t",), hosts, transport="ucx"))
    assert "--mca pml ucx --mca osc ucx" in " ".join(ucx) and "NCCL_IB_DISABLE=1" not in ucx
    nccl = mpirun_command(LaunchSpec(("t",), hosts, transport="nccl"))
    assert "--mca pml ob1 --mca btl tcp,self,vader" in " ".join(nccl)
    assert "NCCL_IB_DISABLE=1" not in " ".join(nccl)
    tcp = mpirun_command(LaunchSpec(("t",), hosts, transport="tcp", ssh_port=2222))
    assert "-x NCCL_IB_DISABLE=1" in " ".join(tcp)
    assert ["--mca", "plm_rsh_args", "-p 2222"] == tcp[tcp.index("plm_rsh_args") - 1:][:3]
    gloo = horovodrun_command(LaunchSpec(("t",), hosts, controller="gloo",
                                         network_interfaces=("eth1",)))
    assert gloo == ["env", "GLOO_SOCKET_IFNAME=eth1", "NCCL_IB_DISABLE=1", "horovodrun", "-np",
                    "2", "-H", "a:1,b:1", "--network-interfaces", "eth1", "--gloo", "t"]


def _launch_error(argv: list[str], launcher: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cl.main(argv, launcher)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


CMD = ["--", "python", "train.py"]


@pytest.mark.parametrize("argv, launcher, match", [
    (["--hostfile", "/nonexistent/hosts.txt", *CMD], "mpirun",
     r"error: hostfile '/nonexistent/hosts.txt' does not exist"),
    (["-H", "node1:4,node2:4", "-np", "6", *CMD], "mpirun",
     r"np is 6 but the hosts have 8 slots in total \(4 \+ 4 slots\): expected -np 8"),
    (["-H", "node1,node2", "--gpus-per-node", "4", "-np", "6", *CMD], "horovodrun",
     r"np is 6 but the hosts have 8 slots in total \(2 hosts x 4 GPUs\): expected -np 8"),
    (["-H", "node1:4,node2:3", "--gpus-per-node", "4", *CMD], "mpirun",
     r"host node2 has 3 slots but --gpus-per-node 4 runs 4 ranks on every node: expected "
     r"slots=4"),
    (["-H", "node1,node2:2", *CMD], "mpirun", r"host node1 has no slot count"),
    (["-H", "node1:4", "--transport", "ib", *CMD], "mpirun",
     r"transport must be one of tcp, ucx, nccl, got 'ib'"),
    (["-H", "node1:4", "--transport", "ucx", *CMD], "horovodrun",
     r"transport 'ucx' cannot be used with horovodrun"),
    (["-H", "node1:4", "--mpi-args", "--mca btl tcp,self", *CMD], "mpirun",
     r"mpi_args sets MCA parameter 'btl', which the launcher already sets"),
    (["-H", "node1:4", "--bind-to", "everything", *CMD], "mpirun",
     r"bind_to must be one of none, hwthread, core"),
    (["-H", "node1:4", "--controller", "gloo", "--bind-to", "core", *CMD], "horovodrun",
     r"need MPI: the gloo controller starts ranks itself"),
    (["-H", "node1:4", "-x", "1BAD=x", *CMD], "mpirun", r"env entries must be VAR or VAR=value"),
    (["-H", "node1:4", "--network-interface", "eth0;rm", *CMD], "mpirun",
     r"network interface must be an interface name"),
    (["-H", "node1:4,node1:4", *CMD], "mpirun", r"-H names host node1 twice"),
    (["-H", "node1:0", *CMD], "mpirun", r"slots must be an integer >= 1, got '0'"),
    (["-H", "node1:4", "--ssh-port", "70000", *CMD], "mpirun",
     r"ssh_port must be in \[1, 65535\], got 70000"),
    (["-H", "node1:4", "--dry-run"], "mpirun", r"command is empty"),
])
def test_launch_errors(argv, launcher, match, capsys):
    assert re.search(match, _launch_error(argv, launcher, capsys))


def test_bad_hostfile_line_names_the_line(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=4\nnode2 gpus=4\n")
    err = _launch_error(["--hostfile", str(hostfile), *CMD], "mpirun", capsys)
    assert re.search(r"hostfile .*hosts line 2: expected 'host slots=N', got 'node2 gpus=4'", err)


@pytest.fixture
def closed_port():
    """A port on 127.0.0.2 that refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.2", 0))
        yield sock.getsockname()[1]


def test_unreachable_host_is_reported_before_launch(closed_port, monkeypatch, capsys):
    def never(*args):
        raise AssertionError("must not launch when a host is unreachable")

    monkeypatch.setattr(os, "execvp", never)
    err = _launch_error(["-H", "127.0.0.2:1", "--ssh-port", str(closed_port), *CMD], "mpirun",
                        capsys)
    assert re.search(rf"cannot reach these hosts before launch:\n  127.0.0.2: cannot connect to "
                     rf"port {closed_port} \(ssh\): Connection refused", err), err
    assert "--no-check skips this test" in err


def test_reachable_host_passes_and_local_names_are_not_probed(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.2", 0))
        server.listen(1)
        check_hosts([Host("127.0.0.2", 1)], "tcp", server.getsockname()[1])
    monkeypatch.setattr(socket, "create_connection",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("probed")))
    check_hosts([Host("localhost", 2), Host(socket.gethostname(), 2)], "tcp")
    check_hosts([Host("node9", 2)], "none")
    with pytest.raises(ValueError, match=r"check must be one of tcp, ssh, none, got 'ping'"):
        check_hosts([Host("node9", 2)], "ping")


def test_check_hosts_lists_every_failure(closed_port):
    with pytest.raises(LaunchError) as info:
        check_hosts([Host("127.0.0.2", 1), Host("127.0.0.3", 1)], "tcp", closed_port)
    assert "127.0.0.2:" in str(info.value) and "127.0.0.3:" in str(info.value)
