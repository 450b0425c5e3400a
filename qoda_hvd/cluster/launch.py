"""Multi-node ``mpirun`` / ``horovodrun`` command lines for GPU clusters.

One concept: turn "run this command on these hosts, one rank per GPU, over this network" into
the exact launcher command, checking the hosts and slot counts first. ``launch/qoda-mpirun``,
``launch/qoda-horovodrun`` and ``qoda-hvd launch`` are this module's :func:`main`.

What a cluster job needs, and where it goes on each launcher:

===================== ============================================ ==============================
need                  mpirun                                       horovodrun
===================== ============================================ ==============================
hosts                 ``-H node1:4,node2:4``                       ``-H node1:4,node2:4``
one rank per GPU      ``--map-by ppr:G:node``                      ``--binding-args=...``
binding               ``--bind-to none`` (default)                 ``--binding-args=...``
interface             ``--mca btl_tcp_if_include``,                ``--network-interfaces``,
                      ``--mca oob_tcp_if_include``,                ``--mpi-args=--mca
                      ``-x NCCL_SOCKET_IFNAME``,                   oob_tcp_if_include``,
                      ``-x GLOO_SOCKET_IFNAME``                    ``GLOO_SOCKET_IFNAME`` in env
transport             ``--mca pml``/``btl``, NCCL/UCX env (below)  env (horovodrun fixes the pml)
environment           ``-x VAR`` / ``-x VAR=value``                ``env VAR=value horovodrun``
                                                                   (it exports all of its env)
===================== ============================================ ==============================

Transports (:data:`TRANSPORTS`): ``tcp`` puts everything on TCP sockets (Open MPI's ob1 PML with
the tcp/self/vader BTLs, ``NCCL_IB_DISABLE=1``); ``ucx`` runs MPI over UCX (``--mca pml ucx
--mca osc ucx``: InfiniBand/RoCE where present); ``nccl`` keeps MPI on TCP for control and CPU
tensors and lets NCCL pick its fastest transport (InfiniBand/RoCE with GPUDirect when present)
for GPU tensors. Horovod pins each rank to GPU ``hvd.local_rank()`` when the script calls
``torch.cuda.set_device(hvd.local_rank())``, so ``CUDA_VISIBLE_DEVICES`` is left alone (every
rank sees every GPU of its node, which NCCL needs for peer-to-peer between local ranks).

Before launching, every named remote host is checked with a short TCP connect to its ssh port
(``--check ssh`` runs ``ssh -o BatchMode=yes host true`` instead, ``--no-check`` skips it). No
other address is ever contacted. ``--dry-run`` prints the command and contacts nothing.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

__all__ = [
    "BIND_TO", "CHECKS", "CONTROLLERS", "Host", "LAUNCHERS", "LaunchError", "LaunchSpec",
    "TRANSPORTS", "Transport", "check_hosts", "horovodrun_command", "launch_cli", "main",
    "mpirun_command",
    "parse_hosts", "read_hostfile",
]

#: Launchers :func:`main` builds commands for.
LAUNCHERS = ("mpirun", "horovodrun")
#: horovodrun controllers.
CONTROLLERS = ("mpi", "gloo")
#: Reachability checks before a launch.
CHECKS = ("tcp", "ssh", "none")
#: Open MPI ``--bind-to`` targets.
BIND_TO = ("none", "hwthread", "core", "l2cache", "l3cache", "socket", "numa", "board")
#: Variables every mpirun job forwards so remote ranks find the same Python and libraries.
DEFAULT_EXPORTS = ("PATH", "LD_LIBRARY_PATH")
_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}
_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_IFACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,14}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(=.*)?$", re.S)
_CHECK_TIMEOUT = 5.0  # seconds per host


class LaunchError(RuntimeError):
    """A host cannot be reached before launch (the arguments themselves raise ValueError)."""


@dataclass(frozen=True)
class Transport:
    """How one transport maps onto MPI parameters and environment variables.

    Attributes:
        mca: ``--mca`` name/value pairs for mpirun (horovodrun sets its own pml/btl).
        env: variables exported to every rank.
        horovodrun: whether horovodrun can use it (it always passes ``-mca pml ob1``).
        summary: one line for ``--help`` and the README.
    """

    mca: tuple[tuple[str, str], ...]
    env: tuple[tuple[str, str], ...]
    horovodrun: bool
    summary: str


#: ``--transport`` choices.
TRANSPORTS: dict[str, Transport] = {
    "tcp": Transport(mca=(("pml", "ob1"), ("btl", "tcp,self,vader")),
                     env=(("NCCL_IB_DISABLE", "1"),), horovodrun=True,
                     summary="MPI and NCCL over TCP sockets only (commodity Ethernet)"),
    "ucx": Transport(mca=(("pml", "ucx"), ("osc", "ucx")), env=(), horovodrun=False,
                     summary="MPI over UCX (InfiniBand/RoCE where present); NCCL's defaults"),
    "nccl": Transport(mca=(("pml", "ob1"), ("btl", "tcp,self,vader")), env=(), horovodrun=True,
                      summary="MPI over TCP for control and CPU tensors; NCCL picks "
                              "InfiniBand/RoCE (GPUDirect) when present for GPU tensors"),
}


@dataclass(frozen=True)
class Host:
    """One host and its slot count (None: not given)."""

    name: str
    slots: int | None = None

    def __post_init__(self) -> None:
        if not _HOST_RE.match(self.name):
            raise ValueError(f"host name must be letters, digits, '.', '-' or '_', got "
                             f"{self.name!r}")
        if self.slots is not None and (isinstance(self.slots, bool) or self.slots < 1):
            raise ValueError(f"slots of host {self.name} must be >= 1, got {self.slots}")


def _slots(text: str, where: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{where}: slots must be an integer >= 1, got {text!r}")
    return int(text)


def parse_hosts(spec: str) -> list[Host]:
    """Hosts from a ``-H`` value: ``"node1:4,node2:4"`` (``:slots`` optional).

    Args:
        spec: comma-separated ``host[:slots]``.

    Example::

        >>> parse_hosts("node1:4,node2")
        [Host(name='node1', slots=4), Host(name='node2', slots=None)]
    """
    hosts = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"-H must be host[:slots],host[:slots],..., got {spec!r}")
        name, sep, slots = item.partition(":")
        hosts.append(Host(name, _slots(slots, f"-H {item}") if sep else None))
    return _no_duplicates(hosts, "-H")


def read_hostfile(path: str | os.PathLike) -> list[Host]:
    """Hosts from an Open MPI / Horovod hostfile: ``node1 slots=4`` per line (or ``node1:4``).

    Blank lines and ``#`` comments are skipped; ``max_slots=`` is accepted and ignored.

    Args:
        path: the hostfile.

    Example::

        >>> read_hostfile("hosts.txt")  # doctest: +SKIP
        [Host(name='node1', slots=4), Host(name='node2', slots=4)]
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"hostfile {str(path)!r} does not exist"
                                + ("" if not p.exists() else " as a file"))
    hosts = []
    for number, raw in enumerate(p.read_text().splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        where = f"hostfile {path} line {number}"
        name, sep, colon_slots = words[0].partition(":")
        slots = _slots(colon_slots, where) if sep else None
        for word in words[1:]:
            key, eq, value = word.partition("=")
            if key == "slots" and eq:
                slots = _slots(value, where)
            elif not (key == "max_slots" and eq):
                raise ValueError(f"{where}: expected 'host slots=N', got {raw.strip()!r}")
        hosts.append(Host(name, slots))
    if not hosts:
        raise ValueError(f"hostfile {path} lists no host")
    return _no_duplicates(hosts, f"hostfile {path}")


def _no_duplicates(hosts: list[Host], where: str) -> list[Host]:
    seen = set()
    for h in hosts:
        if h.name in seen:
            raise ValueError(f"{where} names host {h.name} twice; give its slots once")
        seen.add(h.name)
    return hosts


@dataclass(frozen=True)
class LaunchSpec:
    """A validated multi-node job: hosts, ranks, network and the per-rank command.

    Args:
        command: the per-rank command, e.g. ``("python", "train.py")``.
        hosts: the hosts (see :func:`parse_hosts`, :func:`read_hostfile`).
        np: total ranks; default the sum of slots. Must equal it.
        gpus_per_node: ranks (GPUs) per node; hosts without a slot count get this many, and a
            host whose slot count differs is an error.
        transport: a key of :data:`TRANSPORTS`.
        network_interfaces: interface names for MPI, NCCL and Gloo traffic (e.g. ``("eth0",)``).
        env: ``VAR`` (forward the launcher's value) or ``VAR=value`` entries.
        bind_to: one of :data:`BIND_TO`.
        map_by: Open MPI ``--map-by`` (default ``ppr:G:node`` with ``gpus_per_node``, else
            ``slot``).
        mpi_args: extra mpirun arguments, appended last; may not repeat an MCA parameter the
            spec already sets (Open MPI refuses a command line that does).
        controller: horovodrun controller, one of :data:`CONTROLLERS`.
        ssh_port: ssh port of the hosts (default 22).
        allow_run_as_root: add mpirun's ``--allow-run-as-root`` (containers running as root).
        mpirun, horovodrun: program names or paths.

    Example::

        >>> spec = LaunchSpec(("python", "train.py"), parse_hosts("node1,node2"),
        ...                   gpus_per_node=4, network_interfaces=("eth0",))
        >>> mpirun_command(spec)[:5]
        ['mpirun', '-np', '8', '-H', 'node1:4,node2:4']
    """

    command: tuple[str, ...]
    hosts: tuple[Host, ...]
    np: int | None = None
    gpus_per_node: int | None = None
    transport: str = "tcp"
    network_interfaces: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    bind_to: str = "none"
    map_by: str | None = None
    mpi_args: tuple[str, ...] = ()
    controller: str = "mpi"
    ssh_port: int | None = None
    allow_run_as_root: bool = False
    mpirun: str = "mpirun"
    horovodrun: str = "horovodrun"
    resolved_hosts: tuple[Host, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("command", "hosts", "network_interfaces", "env", "mpi_args"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
                raise TypeError(f"{name} must be a sequence, got {type(value).__name__}")
            object.__setattr__(self, name, tuple(value))
        if not self.command:
            raise ValueError("command is empty: name what each rank runs, e.g. -- python "
                             "train.py")
        if not self.hosts:
            raise ValueError("hosts is empty: give -H host:slots,... or --hostfile")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got "
                             f"{self.transport!r}")
        if self.controller not in CONTROLLERS:
            raise ValueError(f"controller must be one of {', '.join(CONTROLLERS)}, got "
                             f"{self.controller!r}")
        if self.bind_to not in BIND_TO:
            raise ValueError(f"bind_to must be one of {', '.join(BIND_TO)}, got "
                             f"{self.bind_to!r}")
        for iface in self.network_interfaces:
            if not _IFACE_RE.match(iface):
                raise ValueError(f"network interface must be an interface name of at most 15 "
                                 f"characters (e.g. eth0, ib0), got {iface!r}")
        for entry in self.env:
            if not _ENV_RE.match(entry):
                raise ValueError(f"env entries must be VAR or VAR=value, got {entry!r}")
        if self.ssh_port is not None and not 1 <= self.ssh_port <= 65535:
            raise ValueError(f"ssh_port must be in [1, 65535], got {self.ssh_port}")
        g = self.gpus_per_node
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise ValueError(f"gpus_per_node must be an integer >= 1, got {g!r}")
        resolved = []
        for h in self.hosts:
            if g is not None and h.slots is not None and h.slots != g:
                raise ValueError(
                    f"host {h.name} has {h.slots} slots but --gpus-per-node {g} runs {g} ranks "
                    f"on every node: expected slots={g} for every host (or no slot count)")
            if g is None and h.slots is None:
                raise ValueError(f"host {h.name} has no slot count: give {h.name}:N (-H), "
                                 f"'{h.name} slots=N' (hostfile) or --gpus-per-node")
            resolved.append(Host(h.name, h.slots if h.slots is not None else g))
        object.__setattr__(self, "resolved_hosts", tuple(resolved))
        total = sum(h.slots for h in resolved)  # type: ignore[misc]
        if self.np is not None and (isinstance(self.np, bool) or not isinstance(self.np, int)
                                    or self.np < 1):
            raise ValueError(f"np must be an integer >= 1, got {self.np!r}")
        if self.np is not None and self.np != total:
            shape = (f"{len(resolved)} hosts x {g} GPUs" if g is not None
                     else " + ".join(str(h.slots) for h in resolved) + " slots")
            raise ValueError(f"np is {self.np} but the hosts have {total} slots in total "
                             f"({shape}): expected -np {total}, or change the slots")
        if self.controller == "gloo" and (self.bind_to != "none" or self.map_by or self.mpi_args
                                          or self.transport == "ucx"):
            raise ValueError("bind_to, map_by, mpi_args and transport ucx need MPI: "
                             "the gloo controller starts ranks itself")
        taken = {name for name, _ in self._mca()}
        for i, word in enumerate(self.mpi_args[:-1]):
            if word.lstrip("-") == "mca" and self.mpi_args[i + 1] in taken:
                raise ValueError(
                    f"mpi_args sets MCA parameter {self.mpi_args[i + 1]!r}, which the launcher "
                    f"already sets (from --transport {self.transport} / --network-interface); "
                    f"Open MPI refuses a parameter given twice: change those options instead")

    @property
    def total_ranks(self) -> int:
        """Ranks the job starts (the sum of slots)."""
        return sum(h.slots for h in self.resolved_hosts)  # type: ignore[misc]

    @property
    def hosts_arg(self) -> str:
        """The ``-H`` value, ``host:slots,...``."""
        return ",".join(f"{h.name}:{h.slots}" for h in self.resolved_hosts)

    def _map_by(self) -> str:
        if self.map_by:
            return self.map_by
        return f"ppr:{self.gpus_per_node}:node" if self.gpus_per_node else "slot"

    def _mca(self) -> list[tuple[str, str]]:
        mca = list(TRANSPORTS[self.transport].mca)
        if self.network_interfaces:
            ifaces = ",".join(self.network_interfaces)
            mca += [("btl_tcp_if_include", ifaces), ("oob_tcp_if_include", ifaces)]
        if self.ssh_port not in (None, 22):
            mca.append(("plm_rsh_args", f"-p {self.ssh_port}"))
        return mca

    def _env_pairs(self) -> list[str]:
        pairs = []
        if self.network_interfaces:
            ifaces = ",".join(self.network_interfaces)
            pairs += [f"NCCL_SOCKET_IFNAME={ifaces}", f"GLOO_SOCKET_IFNAME={ifaces}"]
        pairs += [f"{k}={v}" for k, v in TRANSPORTS[self.transport].env]
        return pairs + list(self.env)


def mpirun_command(spec: LaunchSpec) -> list[str]:
    """The ``mpirun`` command line for ``spec``.

    Example::

        >>> spec = LaunchSpec(("python", "t.py"), parse_hosts("a:2,b:2"))
        >>> " ".join(mpirun_command(spec)[:9])
        'mpirun -np 4 -H a:2,b:2 --bind-to none --map-by slot'
    """
    cmd = [spec.mpirun, "-np", str(spec.total_ranks), "-H", spec.hosts_arg,
           "--bind-to", spec.bind_to, "--map-by", spec._map_by()]
    if spec.allow_run_as_root:
        cmd.append("--allow-run-as-root")
    for name, value in spec._mca():
        cmd += ["--mca", name, value]
    for var in DEFAULT_EXPORTS:
        cmd += ["-x", var]
    for pair in spec._env_pairs():
        cmd += ["-x", pair]
    return cmd + list(spec.mpi_args) + list(spec.command)


def horovodrun_command(spec: LaunchSpec) -> list[str]:
    """The ``horovodrun`` command line for ``spec`` (prefixed by ``env`` when it sets variables).

    horovodrun exports its whole environment to the ranks and always passes ``-mca pml ob1
    -mca btl ^openib`` to mpirun itself, so the transport becomes environment only and
    ``ucx`` is refused.

    Example::

        >>> spec = LaunchSpec(("python", "t.py"), parse_hosts("a:2,b:2"), transport="nccl")
        >>> horovodrun_command(spec)
        ['horovodrun', '-np', '4', '-H', 'a:2,b:2', '--mpi', '--binding-args=--bind-to none --map-by slot', 'python', 't.py']
    """
    if not TRANSPORTS[spec.transport].horovodrun:
        raise ValueError(f"transport {spec.transport!r} cannot be used with horovodrun, which "
                         f"always passes '-mca pml ob1' to mpirun; use qoda-mpirun for it")
    if spec.allow_run_as_root:
        raise ValueError("allow_run_as_root is for mpirun; horovodrun already passes "
                         "--allow-run-as-root to it")
    env = [pair for pair in spec._env_pairs() if "=" in pair and
           not pair.startswith("NCCL_SOCKET_IFNAME=")]  # horovodrun sets that one from its nics
    cmd = (["env", *env] if env else []) + [
        spec.horovodrun, "-np", str(spec.total_ranks), "-H", spec.hosts_arg]
    if spec.network_interfaces:
        cmd += ["--network-interfaces", ",".join(spec.network_interfaces)]
    if spec.ssh_port not in (None, 22):
        cmd += ["--ssh-port", str(spec.ssh_port)]
    if spec.controller == "gloo":
        return cmd + ["--gloo", *spec.command]
    cmd += ["--mpi", f"--binding-args=--bind-to {spec.bind_to} --map-by {spec._map_by()}"]
    # horovodrun passes btl_tcp_if_include from --network-interfaces, not the out-of-band one.
    mpi_args = (["--mca", "oob_tcp_if_include", ",".join(spec.network_interfaces)]
                if spec.network_interfaces else []) + list(spec.mpi_args)
    if mpi_args:
        cmd.append("--mpi-args=" + shlex.join(mpi_args))
    return cmd + list(spec.command)


def _is_local(name: str) -> bool:
    return name in _LOCAL_NAMES or name in {socket.gethostname(), socket.getfqdn()}


def _check_one(host: str, how: str, port: int) -> str | None:
    if how == "ssh":
        argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(_CHECK_TIMEOUT)}",
                "-p", str(port), host, "true"]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=3 * _CHECK_TIMEOUT)
        except FileNotFoundError:
            return "ssh is not installed here (use --check tcp)"
        except subprocess.TimeoutExpired:
            return f"`{shlex.join(argv)}` did not finish within {3 * _CHECK_TIMEOUT:.0f} s"
        if proc.returncode != 0:
            return f"`{shlex.join(argv)}` failed: {proc.stderr.strip() or proc.returncode}"
        return None
    try:
        with socket.create_connection((host, port), timeout=_CHECK_TIMEOUT):
            return None
    except socket.gaierror as e:
        return f"cannot resolve the name ({e.strerror or e})"
    except socket.timeout:
        return f"no answer on port {port} (ssh) within {_CHECK_TIMEOUT:.0f} s"
    except OSError as e:
        return f"cannot connect to port {port} (ssh): {e.strerror or e}"


def check_hosts(hosts: Sequence[Host], how: str = "tcp", ssh_port: int | None = None) -> None:
    """Raise :class:`LaunchError` naming every remote host that cannot be reached.

    Only the named hosts are contacted, on their ssh port, in parallel, each within a few
    seconds; ``localhost`` and this machine's own name are skipped (mpirun starts those ranks
    without ssh).

    Args:
        hosts: the job's hosts.
        how: ``tcp`` (connect to the ssh port), ``ssh`` (``ssh -o BatchMode=yes host true``:
            also proves password-less login) or ``none``.
        ssh_port: the hosts' ssh port (default 22).

    Example::

        >>> check_hosts([Host("localhost", 2)])
    """
    if how not in CHECKS:
        raise ValueError(f"check must be one of {', '.join(CHECKS)}, got {how!r}")
    remote = [h.name for h in hosts if not _is_local(h.name)]
    if how == "none" or not remote:
        return
    port = ssh_port or 22
    with ThreadPoolExecutor(max_workers=min(16, len(remote))) as pool:
        results = list(pool.map(lambda name: _check_one(name, how, port), remote))
    failed = [f"  {name}: {why}" for name, why in zip(remote, results) if why]
    if failed:
        raise LaunchError("cannot reach these hosts before launch:\n" + "\n".join(failed) +
                          "\ncheck the names, that sshd runs there and that this machine can "
                          "log in without a password; --no-check skips this test")


def build_parser(launcher: str = "mpirun", prog: str | None = None,
                 launcher_option: bool = False) -> argparse.ArgumentParser:
    """The command-line parser of ``qoda-<launcher>`` (also ``qoda-hvd launch``, which shows
    ``--launcher`` when ``launcher_option``)."""
    parser = argparse.ArgumentParser(
        prog=prog or f"qoda-{launcher}",
        description=f"Launch a Horovod job on a multi-node GPU cluster with {launcher}: one rank "
                    f"per GPU, the chosen network interface and transport. Options before "
                    f"'--', the per-rank command after it.",
        epilog="transports: " + "; ".join(f"{k}: {t.summary}" for k, t in TRANSPORTS.items()))
    if launcher_option:
        parser.add_argument("--launcher", choices=LAUNCHERS, default=launcher,
                            help="mpirun (default) or horovodrun; must come before '--'")
    hosts = parser.add_mutually_exclusive_group(required=True)
    hosts.add_argument("-H", "--hosts", help="host[:slots],host[:slots],... (e.g. "
                                             "node1:4,node2:4)")
    hosts.add_argument("--hostfile", help="hostfile with 'host slots=N' lines")
    parser.add_argument("-np", "--np", type=int, default=None,
                        help="total ranks (default: the sum of slots; must equal it)")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="ranks per node, one per GPU; fills in missing slot counts")
    parser.add_argument("--transport", default="tcp", help=f"one of {', '.join(TRANSPORTS)} "
                                                           f"(default tcp)")
    parser.add_argument("--network-interface", "--network-interfaces", action="append",
                        default=[], metavar="IFACE",
                        help="interface for MPI, NCCL and Gloo traffic (repeat or comma-list)")
    parser.add_argument("-x", "--env", action="append", default=[], metavar="VAR[=VALUE]",
                        help="environment variable for every rank (repeatable)")
    parser.add_argument("--ssh-port", type=int, default=None, help="ssh port of the hosts")
    parser.add_argument("--check", choices=CHECKS, default="tcp",
                        help="reachability test before launch (default tcp: connect to the "
                             "ssh port)")
    parser.add_argument("--no-check", dest="check", action="store_const", const="none",
                        help="skip the reachability test")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the exact command and exit (contacts no host)")
    if launcher == "mpirun":
        parser.add_argument("--bind-to", default="none", help=f"one of {', '.join(BIND_TO)}")
        parser.add_argument("--map-by", default=None,
                            help="Open MPI --map-by (default ppr:<gpus-per-node>:node, or slot)")
        parser.add_argument("--mpi-args", default="", help="extra mpirun arguments (one string)")
        parser.add_argument("--allow-run-as-root", action="store_true",
                            help="pass --allow-run-as-root to mpirun (containers run as root)")
        parser.add_argument("--mpirun", default="mpirun", help="mpirun program")
    else:
        parser.add_argument("--controller", choices=CONTROLLERS, default="mpi",
                            help="horovodrun controller (default mpi)")
        parser.add_argument("--bind-to", default="none", help=f"one of {', '.join(BIND_TO)}")
        parser.add_argument("--map-by", default=None, help="Open MPI --map-by (MPI controller)")
        parser.add_argument("--mpi-args", default="", help="extra mpirun arguments (one string)")
        parser.add_argument("--horovodrun", default="horovodrun", help="horovodrun program")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the per-rank command")
    return parser


def spec_from_args(args: argparse.Namespace, launcher: str) -> LaunchSpec:
    """A :class:`LaunchSpec` from parsed command-line arguments."""
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    hosts = read_hostfile(args.hostfile) if args.hostfile else parse_hosts(args.hosts)
    ifaces = tuple(i for arg in args.network_interface for i in arg.split(",") if i)
    extra: dict = {"mpirun": args.mpirun} if launcher == "mpirun" else {
        "horovodrun": args.horovodrun, "controller": args.controller}
    return LaunchSpec(
        command=tuple(command), hosts=tuple(hosts), np=args.np, gpus_per_node=args.gpus_per_node,
        transport=args.transport, network_interfaces=ifaces, env=tuple(args.env),
        bind_to=args.bind_to, map_by=args.map_by, mpi_args=tuple(shlex.split(args.mpi_args)),
        ssh_port=args.ssh_port, allow_run_as_root=getattr(args, "allow_run_as_root", False),
        **extra)


def main(argv: Sequence[str] | None = None, launcher: str = "mpirun",
         prog: str | None = None, launcher_option: bool = False) -> int:
    """Entry point of ``qoda-mpirun`` / ``qoda-horovodrun``: check, print, then exec the launcher.

    Args:
        argv: arguments (default ``sys.argv[1:]``).
        launcher: one of :data:`LAUNCHERS`.
        prog: program name in messages.
        launcher_option: accept (and show in ``--help``) ``--launcher``, as ``qoda-hvd launch``.

    Example::

        >>> main(["--dry-run", "-H", "a:1,b:1", "--", "python", "t.py"])  # doctest: +ELLIPSIS
        mpirun -np 2 -H a:1,b:1 --bind-to none --map-by slot ...
        0
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    parser = build_parser(launcher, prog, launcher_option)
    args = parser.parse_args(argv)
    try:
        spec = spec_from_args(args, launcher)
        cmd = mpirun_command(spec) if launcher == "mpirun" else horovodrun_command(spec)
        if args.dry_run:
            print(shlex.join(cmd), flush=True)
            return 0
        check_hosts(spec.resolved_hosts, args.check, spec.ssh_port)
    except (ValueError, TypeError, FileNotFoundError, LaunchError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"[{parser.prog}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    try:
        os.execvp(cmd[0], cmd)  # the launcher replaces us: signals and exit code are its own
    except FileNotFoundError:
        parser.exit(127, f"{parser.prog}: error: {cmd[0]} not found on PATH\n")
    return 0  # not reached


def launch_cli(argv: Sequence[str] | None = None, prog: str = "qoda-hvd launch") -> int:
    """``qoda-hvd launch [--launcher mpirun|horovodrun] ...``: :func:`main` with a launcher choice.

    Example::

        >>> launch_cli(["--launcher", "horovodrun", "--dry-run", "-H", "a:1", "--", "t"])
        env NCCL_IB_DISABLE=1 horovodrun -np 1 -H a:1 --mpi '--binding-args=--bind-to none --map-by slot' t
        0
    """
    args = list(sys.argv[1:] if argv is None else argv)
    head = args[:args.index("--")] if "--" in args else args
    launcher = "mpirun"
    for i, word in enumerate(head):
        if word == "--launcher" or word.startswith("--launcher="):
            value = word.partition("=")[2] if "=" in word else (
                args[i + 1] if i + 1 < len(head) else "")
            if value not in LAUNCHERS:
                print(f"{prog}: error: --launcher must be one of {', '.join(LAUNCHERS)}, got "
                      f"{value!r}", file=sys.stderr)
                return 2
            launcher = value
            break
    return main(args, launcher, prog=prog, launcher_option=True)


if __name__ == "__main__":
    # launch/qoda-mpirun and launch/qoda-horovodrun call `-m ... --launcher X`: messages then
    # carry their own names (qoda-mpirun, qoda-horovodrun).
    if sys.argv[1:2] == ["--launcher"] and sys.argv[2:3] and sys.argv[2] in LAUNCHERS:
        raise SystemExit(main(sys.argv[3:], sys.argv[2]))
    raise SystemExit(launch_cli(prog="python -m qoda_hvd.cluster.launch"))
