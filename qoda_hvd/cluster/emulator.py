"""A bandwidth-shaped cluster on one Linux machine: network namespaces on a bridge.

One concept: N virtual nodes, each a network namespace with one interface, all plugged into a
bridge that lives in its own "switch" namespace, every link shaped in both directions, and
``mpirun`` set up to start ``ranks_per_node`` ranks per node (default one). The root namespace is never touched: no interface,
address, route or qdisc is added there, and the only traffic is between namespaces created here.

Topology for ``nodes=2``, run prefix ``qoda-<pid>-<rand>`` (names cannot collide with another
run: the pid is unique among live processes and the random part guards against reuse)::

    <prefix>-n0: eth0 198.18.R.1/24  --veth--  p0 -+
    <prefix>-n1: eth0 198.18.R.2/24  --veth--  p1 -+- br0   (in <prefix>-sw)

- Upload of node i is shaped by a ``tbf`` qdisc on its ``eth0`` (egress, inside the node's
  namespace); download by a ``tbf`` on the switch-side port ``p<i>`` (egress into the node).
  Burst is max(64 KiB + 1514 B, 2 ms x rate), enough for a full GSO segment and for the timer
  granularity, so the link runs at the configured rate rather than below it.
- ``delay`` is the one-way latency added between two nodes, half on each hop (so the RTT grows by
  2 x delay), with a ``netem`` qdisc under each ``tbf``. It needs the kernel's ``sch_netem``;
  :func:`netem_available` says whether it is there, and asking for a delay without it raises.
- Several ranks per node (``ranks_per_node=L``): the ranks of a node share its namespace and
  its one shaped interface, so only traffic between nodes is shaped, and Horovod's
  ``local_rank`` / ``local_size`` / ``cross_rank`` / ``cross_size`` come out as on a real
  cluster of nodes with L GPUs each (Open MPI's shared-memory split follows its daemons).
- Addresses come from 198.18.0.0/15, the range reserved for benchmarking (RFC 2544), one /24 per
  run; they exist only inside the run's namespaces.
- ``mpirun`` runs inside node 0's namespace with a hostfile of node addresses (``slots`` =
  ranks per node; ranks fill node 0 first, so ranks ``0..L-1`` share node 0, as ``horovodrun``
  numbers them) and ``--mca plm_rsh_agent`` set to :mod:`qoda_hvd.cluster.rsh_agent`, which starts Open MPI's
  daemon for address A with ``ip netns exec <namespace of A>``. MPI is pinned to the emulated
  links: ``--mca btl tcp,self`` with one rank per node, ``tcp,vader,self`` with several (Open
  MPI uses shared memory only between ranks of one daemon, i.e. of one emulated node; ranks
  of a node that do talk TCP reach their own node's address over the namespace's loopback,
  unshaped), ``btl_tcp_if_include`` and
  ``oob_tcp_if_include`` set to the run's subnet, and ``--mca btl_tcp_flags send,inplace``
  (without it Open MPI's TCP BTL serialises the two directions of a pairwise exchange and the
  measured bandwidth halves at 4 nodes).

Tear-down (:meth:`EmulatedCluster.close`, also run by ``with`` on any exit) kills what still runs
inside the run's namespaces (SIGTERM, then SIGKILL after a grace period) and deletes them, which
removes their interfaces and qdiscs with them. Every external command has a timeout.

Why not Mininet or a container runtime: both bring a large dependency (and Mininet a controller)
for what is ten ``ip``/``tc`` commands; what is needed here is exactly Open MPI's process model
on shaped links, which these commands give directly.

Example::

    with EmulatedCluster(nodes=2, bandwidth="100mbit") as cluster:
        cluster.run([sys.executable, "train.py"], timeout=600)
"""
from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from qoda_hvd.launcher import rank_environment

__all__ = [
    "EmulatedCluster", "EmulatedNode", "EmulatorError", "MAX_NODES", "MAX_RANKS_PER_NODE",
    "cleanup_stale",
    "emulator_unavailable_reason", "main", "netem_available", "parse_delay", "parse_rate",
    "tbf_burst",
]

#: Nodes per run: addresses .1 to .MAX_NODES of one /24.
MAX_NODES = 64
#: Ranks per emulated node (they share the machine's cores with every other node's).
MAX_RANKS_PER_NODE = 16
#: Every namespace this module creates starts with this.
NAME_PREFIX = "qoda-"
_PREFIX_RE = re.compile(r"^qoda-(\d+)-[0-9a-f]{4}$")
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_DELAY_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_GSO_MAX = 64 * 1024 + 1514  # a full 64 KiB GSO segment plus one Ethernet frame
_CMD_TIMEOUT = 15.0          # seconds for any single ip/tc command
_QUEUE_SECONDS = 0.1         # tbf queue length, as time at the link rate
_KILL_GRACE = 3.0            # seconds between SIGTERM and SIGKILL at tear-down
_NEEDS_ROOT = ("the cluster emulator needs root (it creates network namespaces, veth pairs and "
               "tc qdiscs); run it as root, e.g. with sudo")
_NODE_IF = "eth0"
_BRIDGE = "br0"


class EmulatorError(RuntimeError):
    """An ``ip``/``tc`` step failed, or the kernel lacks what was asked for."""


def parse_rate(rate: str) -> int:
    """Bits per second from a tc-style rate: ``"50mbit"``, ``"1gbit"``, ``"2.5gbit"``.

    Args:
        rate: a number followed by one of bit, kbit, mbit, gbit, tbit (decimal prefixes, as tc).

    Example::

        >>> parse_rate("1gbit"), parse_rate("2.5mbit")
        (1000000000, 2500000)
    """
    if not isinstance(rate, str):
        raise TypeError(f"bandwidth must be a str such as '1gbit', got {type(rate).__name__}")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*", rate)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _RATE_UNITS:
        raise ValueError(f"bandwidth must be a number followed by one of "
                         f"{', '.join(_RATE_UNITS)} (e.g. '1gbit'), got {rate!r}")
    bits = int(round(float(m.group(1)) * _RATE_UNITS[unit]))
    if not 8_000 <= bits <= 400 * 10**9:
        raise ValueError(f"bandwidth must be in [8kbit, 400gbit], got {rate!r}")
    return bits


def parse_delay(delay: str) -> float:
    """Seconds from a tc-style time: ``"1ms"``, ``"250us"``, ``"0.5s"``.

    Args:
        delay: a number followed by us, ms or s.

    Example::

        >>> parse_delay("1ms")
        0.001
    """
    if not isinstance(delay, str):
        raise TypeError(f"delay must be a str such as '1ms', got {type(delay).__name__}")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(us|ms|s)\s*", delay)
    if m is None:
        raise ValueError(f"delay must be a number followed by one of "
                         f"{', '.join(_DELAY_UNITS)} (e.g. '1ms'), got {delay!r}")
    seconds = float(m.group(1)) * _DELAY_UNITS[m.group(2)]
    if not 0 < seconds <= 10:
        raise ValueError(f"delay must be in (0, 10s], got {delay!r}")
    return seconds


def tbf_burst(rate_bits: int) -> int:
    """Token-bucket burst in bytes for a rate: max(64 KiB + 1514, 2 ms x rate).

    A burst below one GSO segment stalls the link; below ~2 ms of traffic the kernel timer
    granularity caps the rate under the configured one.

    Example::

        >>> tbf_burst(50 * 10**6), tbf_burst(10 * 10**9)
        (67050, 2500000)
    """
    return max(_GSO_MAX, int(rate_bits * 0.002 / 8))


def _run(argv: Sequence[str], *, check: bool = True,
         timeout: float = _CMD_TIMEOUT) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise EmulatorError(f"`{shlex.join(argv)}` did not finish within {timeout} s") from e
    if check and proc.returncode != 0:
        raise EmulatorError(f"`{shlex.join(argv)}` failed (exit {proc.returncode}): "
                            f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def _list_namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def emulator_unavailable_reason() -> str | None:
    """Why the emulator cannot run here, or None when it can.

    Checks root, the ``ip`` and ``tc`` tools, and that a network namespace can really be created
    (containers often forbid it); the probe namespace is deleted again.

    Example::

        >>> reason = emulator_unavailable_reason()  # doctest: +SKIP
    """
    if not hasattr(os, "geteuid") or sys.platform != "linux":
        return "the cluster emulator needs Linux network namespaces"
    if os.geteuid() != 0:
        return _NEEDS_ROOT
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found: install iproute2 (apt-get install iproute2)"
    probe = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(2)}-probe"
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          timeout=_CMD_TIMEOUT)
    if proc.returncode != 0:
        return f"cannot create a network namespace here: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=_CMD_TIMEOUT)
    return None


def netem_available() -> bool:
    """Whether the kernel has the ``netem`` qdisc (``sch_netem``), which ``delay`` needs.

    Probed on the loopback of a throw-away namespace, so nothing outside it changes.

    Example::

        >>> netem_available()  # doctest: +SKIP
        False
    """
    reason = emulator_unavailable_reason()
    if reason is not None:
        raise EmulatorError(reason)
    probe = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(2)}-netem"
    _run(["ip", "netns", "add", probe])
    try:
        return _netem_in(probe)
    finally:
        _run(["ip", "netns", "del", probe], check=False)


def _netem_in(namespace: str) -> bool:
    proc = _run(["tc", "-n", namespace, "qdisc", "add", "dev", "lo", "root", "netem",
                 "delay", "1ms"], check=False)
    if proc.returncode == 0:
        _run(["tc", "-n", namespace, "qdisc", "del", "dev", "lo", "root"], check=False)
    return proc.returncode == 0


def _kill_namespace_processes(namespaces: Sequence[str]) -> None:
    """SIGTERM every process in these namespaces, then SIGKILL what is left after a grace."""
    def pids() -> set[int]:
        found: set[int] = set()
        for ns in namespaces:
            out = _run(["ip", "netns", "pids", ns], check=False).stdout
            found.update(int(p) for p in out.split() if p.isdigit())
        found.discard(os.getpid())
        return found

    for sig, wait in ((signal.SIGTERM, _KILL_GRACE), (signal.SIGKILL, 2.0)):
        running = pids()
        if not running:
            return
        for pid in running:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and pids():
            time.sleep(0.05)


def _delete_namespaces(namespaces: Sequence[str]) -> list[str]:
    """Delete namespaces (and with them their interfaces); return error messages, not raise."""
    _kill_namespace_processes(namespaces)
    errors = []
    present = set(_list_namespaces())
    for ns in namespaces:
        if ns in present:
            proc = _run(["ip", "netns", "del", ns], check=False)
            if proc.returncode != 0:
                errors.append(f"ip netns del {ns}: {proc.stderr.strip()}")
    return errors


def cleanup_stale() -> list[str]:
    """Delete namespaces left by emulator runs whose process is gone (e.g. after SIGKILL).

    Only names of the form ``qoda-<pid>-<4 hex>-...`` whose pid is no longer alive are touched
    (namespaces, and the runs' work directories in /tmp). Returns the namespaces deleted.

    Example::

        >>> cleanup_stale()  # doctest: +SKIP
        []
    """
    stale = []
    for ns in _list_namespaces():
        head = "-".join(ns.split("-")[:3])
        m = _PREFIX_RE.match(head)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            stale.append(ns)
    errors = _delete_namespaces(stale)
    for workdir in Path("/tmp").glob(f"{NAME_PREFIX}*"):
        m = _PREFIX_RE.match("-".join(workdir.name.split("-")[:3]))
        if m and workdir.is_dir() and not Path(f"/proc/{m.group(1)}").exists():
            shutil.rmtree(workdir, ignore_errors=True)
    if errors:
        raise EmulatorError("; ".join(errors))
    return stale


@dataclass(frozen=True)
class EmulatedNode:
    """One virtual node: its namespace, its address on the run's subnet, its interface."""

    index: int
    namespace: str
    address: str
    interface: str = _NODE_IF


class EmulatedCluster:
    """N network namespaces on a bridge, each link shaped to ``bandwidth`` in both directions.

    Args:
        nodes: number of virtual nodes, in [1, :data:`MAX_NODES`].
        ranks_per_node: MPI ranks on each node (default 1), in [1, :data:`MAX_RANKS_PER_NODE`];
            they share the node's namespace and shaped link.
        bandwidth: link rate each way, tc style ("50mbit", "1gbit", "10gbit").
        delay: optional one-way latency between two nodes ("1ms"), half on each hop; needs
            the kernel's ``sch_netem`` (raises :class:`EmulatorError` without it).
        prefix: name prefix ``qoda-<pid>-<4 hex>`` (default: this process's pid and a random
            suffix); the bash wrapper passes its own so it can clean up after a SIGKILL.
        mpirun: the ``mpirun`` to use (default: the one on PATH).

    ``with`` creates everything on entry and tears it down on any exit; :meth:`start` and
    :meth:`close` do the same by hand (close is idempotent).

    Example::

        with EmulatedCluster(nodes=2, bandwidth="100mbit") as cluster:
            print(cluster.subnet, [n.address for n in cluster.nodes])
            proc = cluster.run([sys.executable, "job.py"], timeout=120)
    """

    def __init__(self, nodes: int = 2, bandwidth: str = "1gbit", delay: str | None = None, *,
                 ranks_per_node: int = 1, prefix: str | None = None,
                 mpirun: str = "mpirun") -> None:
        if isinstance(nodes, bool) or not isinstance(nodes, int):
            raise TypeError(f"nodes must be an int, got {type(nodes).__name__}")
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be in [1, {MAX_NODES}], got {nodes}")
        if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int):
            raise TypeError(f"ranks_per_node must be an int, got {type(ranks_per_node).__name__}")
        if not 1 <= ranks_per_node <= MAX_RANKS_PER_NODE:
            raise ValueError(f"ranks_per_node must be in [1, {MAX_RANKS_PER_NODE}], got "
                             f"{ranks_per_node}")
        self.ranks_per_node = ranks_per_node
        self.rate_bits = parse_rate(bandwidth)
        self.bandwidth = bandwidth
        self.delay_s = None if delay is None else parse_delay(delay)
        self.delay = delay
        if prefix is None:
            prefix = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(2)}"
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"prefix must look like 'qoda-<pid>-<4 hex digits>', got {prefix!r}")
        self.prefix = prefix
        # The third octet only makes runs easy to tell apart in logs: each run's addresses live
        # in its own namespaces, so two runs with the same subnet cannot collide.
        octet = int(prefix[-4:], 16) % 256
        self.subnet = f"198.18.{octet}.0/24"
        self.switch_namespace = f"{prefix}-sw"
        self.nodes = [EmulatedNode(i, f"{prefix}-n{i}", f"198.18.{octet}.{i + 1}")
                      for i in range(nodes)]
        self.mpirun = mpirun
        self.netem = False
        #: Packet loss set by :meth:`impair`, per node (0.0: none).
        self.loss = [0.0] * nodes
        self._impaired: set[tuple[str, str]] = set()
        self._workdir: Path | None = None
        self._created: list[str] = []
        self._started = False

    # ----------------------------------------------------------------------------- lifecycle
    @property
    def namespaces(self) -> list[str]:
        """Every namespace of this run: the switch, then the nodes."""
        return [self.switch_namespace] + [n.namespace for n in self.nodes]

    def __enter__(self) -> EmulatedCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Create the namespaces, bridge, veth pairs and qdiscs; on any failure undo it all."""
        if self._started:
            raise RuntimeError("this EmulatedCluster is already started; use one per `with`")
        if hasattr(os, "geteuid") and os.geteuid() != 0:
            raise PermissionError(_NEEDS_ROOT)
        reason = emulator_unavailable_reason()
        if reason is not None:
            raise EmulatorError(reason)
        self._started = True
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _ns_add(self, namespace: str) -> None:
        _run(["ip", "netns", "add", namespace])
        self._created.append(namespace)
        _run(["ip", "-n", namespace, "link", "set", "lo", "up"])

    def _build(self) -> None:
        sw = self.switch_namespace
        self._ns_add(sw)
        if self.delay_s is not None:
            self.netem = _netem_in(sw)
            if not self.netem:
                raise EmulatorError(
                    f"delay={self.delay!r} needs the kernel's netem qdisc (sch_netem, kernel "
                    f"option CONFIG_NET_SCH_NETEM), which this kernel lacks (`tc qdisc add ... "
                    f"netem` says the qdisc kind is unknown). Run without a delay, or load the "
                    f"module (modprobe sch_netem) where the kernel ships it.")
        _run(["ip", "-n", sw, "link", "add", "name", _BRIDGE, "type", "bridge"])
        _run(["ip", "-n", sw, "link", "set", _BRIDGE, "up"])
        prefix_len = self.subnet.split("/")[1]
        for node in self.nodes:
            self._ns_add(node.namespace)
            port = f"p{node.index}"
            # Both ends are created directly in their namespaces: nothing touches the root one.
            _run(["ip", "-n", sw, "link", "add", "name", port, "type", "veth",
                  "peer", "name", node.interface, "netns", node.namespace])
            _run(["ip", "-n", sw, "link", "set", port, "master", _BRIDGE])
            _run(["ip", "-n", sw, "link", "set", port, "up"])
            _run(["ip", "-n", node.namespace, "addr", "add", f"{node.address}/{prefix_len}",
                  "dev", node.interface])
            _run(["ip", "-n", node.namespace, "link", "set", node.interface, "up"])
            self._shape(node.namespace, node.interface)  # upload: node -> switch
            self._shape(sw, port)                         # download: switch -> node
        self._workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-", dir="/tmp"))
        self._write_launch_files()

    def _shape(self, namespace: str, dev: str) -> None:
        burst = tbf_burst(self.rate_bits)
        # Queue of 100 ms at the link rate (at least 4 bursts): deep enough that TCP keeps the
        # link busy, shallow enough that a stalled job shows up as time, not as lost packets.
        limit = max(4 * burst, int(self.rate_bits * _QUEUE_SECONDS / 8))
        _run(["tc", "-n", namespace, "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf",
              "rate", f"{self.rate_bits}bit", "burst", str(burst), "limit", str(limit)])
        if self.delay_s is not None:
            # netem under tbf holds the queue now (tbf's own limit no longer applies): size it
            # in packets for the same queue time plus the packets in flight on the delay.
            half = self.delay_s / 2
            packets = max(1000, int(self.rate_bits * (_QUEUE_SECONDS + half) / 8 / 1500) + 1)
            _run(["tc", "-n", namespace, "qdisc", "add", "dev", dev, "parent", "1:1",
                  "handle", "10:", "netem", "delay", f"{max(1, round(half * 1e6))}us",
                  "limit", str(packets)])

    def _write_launch_files(self) -> None:
        assert self._workdir is not None
        (self._workdir / "hostfile").write_text(
            "".join(f"{n.address} slots={self.ranks_per_node}\n" for n in self.nodes))
        table = ",".join(f"{n.address}={n.namespace}" for n in self.nodes)
        agent = Path(__file__).with_name("rsh_agent.py")
        wrapper = self._workdir / "rsh-agent"
        wrapper.write_text("#!/bin/sh\n" + shlex.join(
            [sys.executable, str(agent), "--map", table]) + ' "$@"\n')
        wrapper.chmod(0o755)

    def close(self) -> None:
        """Kill what runs in the run's namespaces and delete them; safe to call twice.

        SIGINT, SIGTERM and SIGHUP are held back while it runs (and delivered after it), so a
        second Ctrl-C cannot leave half a cluster behind.
        """
        held = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            errors = _delete_namespaces(self.namespaces) if self._created else []
        finally:
            self._created = []
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if errors:
            raise EmulatorError("tear-down left namespaces behind: " + "; ".join(errors))

    # ------------------------------------------------------------------------------- running
    def _require_started(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("the emulated cluster is not running: use `with EmulatedCluster(...)"
                               " as cluster:` or call start() first")
        return self._workdir

    @property
    def size(self) -> int:
        """Ranks of a job that fills the cluster: nodes x ranks per node."""
        return len(self.nodes) * self.ranks_per_node

    @property
    def hostfile(self) -> Path:
        """Open MPI hostfile listing every node's address with ``ranks_per_node`` slots."""
        return self._require_started() / "hostfile"

    @property
    def rsh_agent(self) -> Path:
        """The ``plm_rsh_agent`` script that runs a command in a node's namespace."""
        return self._require_started() / "rsh-agent"

    def exec_command(self, node: int, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` inside node ``node``'s namespace."""
        if not 0 <= node < len(self.nodes):
            raise ValueError(f"node must be in [0, {len(self.nodes) - 1}], got {node}")
        ns = self.nodes[node].namespace
        # its own host name, as the rsh agent gives the other nodes' daemons (see rsh_agent)
        return ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', ns, *argv]

    def mpirun_command(self, argv: Sequence[str], *, np: int | None = None,
                       mpi_args: Sequence[str] = ()) -> list[str]:
        """The full command that runs ``argv`` with ``ranks_per_node`` ranks per emulated node.

        ``mpirun`` itself runs in node 0's namespace; Open MPI's daemons on the other nodes are
        started through :attr:`rsh_agent`.

        Args:
            argv: the per-rank command.
            np: ranks (default: every slot, nodes x ranks per node; at most that).
            mpi_args: extra ``mpirun`` options, placed before ``argv``.
        """
        np = self.size if np is None else np
        if isinstance(np, bool) or not isinstance(np, int) or not 1 <= np <= self.size:
            raise ValueError(f"np must be an int in [1, {self.size}] ({self.ranks_per_node} "
                             f"rank(s) per node), got {np!r}")
        if not argv:
            raise ValueError("argv must name the command each rank runs, got an empty list")
        # mpi_yield_when_idle: the emulated nodes share this machine's cores, which Open MPI
        # cannot see (one slot per namespace), so it would busy-poll as on a dedicated node;
        # Horovod's background thread then spins through every negotiation cycle and took 3-7x
        # the codec's time from the training thread beside it (measured, 1 core per rank). It
        # is what Open MPI sets by itself on an oversubscribed node.
        mca = [("plm_rsh_agent", str(self.rsh_agent)), ("plm_rsh_no_tree_spawn", "1"),
               ("btl", "tcp,self" if self.ranks_per_node == 1 else "tcp,vader,self"),
               ("btl_tcp_if_include", self.subnet),
               ("oob_tcp_if_include", self.subnet), ("btl_tcp_flags", "send,inplace"),
               ("mpi_yield_when_idle", "1")]
        mpi_args = list(mpi_args)
        for i, word in enumerate(mpi_args[:-1]):
            if word.lstrip("-") == "mca" and mpi_args[i + 1] in dict(mca):
                raise ValueError(f"mpi_args sets MCA parameter {mpi_args[i + 1]!r}, which the "
                                 f"emulator sets itself (Open MPI refuses a parameter given "
                                 f"twice)")
        words = [w for name, value in mca for w in ("--mca", name, value)]
        return self.exec_command(0, [
            self.mpirun, "-np", str(np), "--hostfile", str(self.hostfile), "--bind-to", "none",
            *words, *mpi_args, *argv])

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for :meth:`run`: one thread per rank, root allowed for Open MPI."""
        env = rank_environment(base)
        env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
        env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
        return env

    def run(self, argv: Sequence[str], *, timeout: float, np: int | None = None,
            mpi_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
            **popen_kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` on the emulated cluster under ``mpirun`` and wait for it.

        The job runs in its own session; on timeout, Ctrl-C or any error it is killed as a
        whole (and anything left in the namespaces is killed at :meth:`close`).

        Args:
            argv: per-rank command.
            timeout: seconds before the job is killed and ``subprocess.TimeoutExpired`` raised.
            np: ranks (default every slot).
            mpi_args: extra ``mpirun`` options.
            env: environment base (default ``os.environ``).
            **popen_kwargs: for :class:`subprocess.Popen` (``capture_output=True``, ``text``,
                ``cwd``, ``stdout``...).
        """
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        cmd = self.mpirun_command(argv, np=np, mpi_args=mpi_args)
        if popen_kwargs.pop("capture_output", False):
            popen_kwargs.setdefault("stdout", subprocess.PIPE)
            popen_kwargs.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(cmd, env=self.environment(env), start_new_session=True,
                                **popen_kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = _drain(proc)
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
        except BaseException:  # Ctrl-C, SIGTERM (as SystemExit), errors: never leave the job
            _kill_group(proc)
            _drain(proc)
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def impair(self, node: int, loss: float) -> None:
        """Drop a random fraction ``loss`` of the packets on node ``node``'s link, both ways, from
        now on, mid-run; ``loss=0`` restores the link (``loss=1``: the link is down).

        What ``tc netem loss`` does, without ``sch_netem`` (many kernels lack it): a classic-BPF
        ``cls_bpf`` filter on the ``clsact`` egress hook of both ends of the link (the node's
        ``eth0`` and the switch port ``p<i>``) draws the kernel's per-packet random number
        (``SKF_AD_RANDOM``) and redirects the packets it picks to an ``ifb`` device that is never
        up, which drops them. The hook runs before the ``tbf`` shaper, so a dropped packet never
        took link time; TCP sees a loss and retransmits. Needs ``cls_bpf`` and ``act_mirred``.

        Args:
            node: the node whose link drops packets, in [0, nodes).
            loss: fraction of packets dropped in each direction, in [0, 1].

        Example::

            with EmulatedCluster(nodes=2) as cluster:
                cluster.impair(1, 1.0)   # node 1 unreachable ...
                time.sleep(3)
                cluster.impair(1, 0.0)   # ... and back
        """
        self._require_started()
        if not 0 <= node < len(self.nodes):
            raise ValueError(f"node must be in [0, {len(self.nodes) - 1}], got {node}")
        if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not 0 <= loss <= 1:
            raise ValueError(f"loss must be a fraction in [0, 1], got {loss!r}")
        ends = [(self.nodes[node].namespace, self.nodes[node].interface),
                (self.switch_namespace, f"p{node}")]
        for ns, dev in ends:
            if (ns, dev) not in self._impaired:  # once per end: the hook and the drop device
                if _run(["ip", "-n", ns, "link", "show", "qdrop"], check=False).returncode:
                    _run(["ip", "-n", ns, "link", "add", "qdrop", "type", "ifb"])  # stays down
                _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "clsact"])
                self._impaired.add((ns, dev))
            _run(["tc", "-n", ns, "filter", "del", "dev", dev, "egress", "pref", "1"], check=False)
            if loss > 0:
                # cBPF: A = random u32; drop (match) if A < loss * 2^32, else no match
                threshold = min(int(round(loss * 2**32)), 2**32 - 1)
                prog = ("1,6 0 0 4294967295" if loss >= 1 else
                        f"4,32 0 0 {0xfffff038},53 1 0 {threshold},6 0 0 4294967295,6 0 0 0")
                _run(["tc", "-n", ns, "filter", "add", "dev", dev, "egress", "pref", "1", "bpf",
                      "bytecode", prog, "action", "mirred", "egress", "redirect", "dev", "qdrop"])
        self.loss[node] = float(loss)

    def describe(self) -> str:
        """One line saying what was built."""
        delay = f", +{self.delay} one-way latency" if self.delay else ", no added latency"
        per_node = (f" x {self.ranks_per_node} ranks (shared memory inside a node)"
                    if self.ranks_per_node > 1 else "")
        return (f"{len(self.nodes)} emulated nodes{per_node} on {self.subnet} (namespaces "
                f"{self.prefix}-n0..n{len(self.nodes) - 1}, switch {self.switch_namespace}), "
                f"links {self.bandwidth} each way (tbf burst {tbf_burst(self.rate_bits)} B){delay}")


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, _KILL_GRACE), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _drain(proc: subprocess.Popen) -> tuple:
    try:
        return proc.communicate(timeout=5)
    except (subprocess.TimeoutExpired, ValueError):
        return None, None


def _raise_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None, prog: str = "qoda-hvd emulate") -> int:
    """``qoda-hvd emulate`` / ``launch/emulate-cluster``: run a command on an emulated cluster.

    Builds the cluster, runs ``mpirun`` with ``--ranks-per-node`` ranks per node (default 1), tears everything down on any
    exit (job failure, timeout, Ctrl-C, SIGTERM, SIGHUP) and returns the job's exit code
    (124 on timeout).

    Example::

        qoda-hvd emulate --nodes 2 --bandwidth 1gbit -- python -m qoda_hvd.cluster.bandwidth
        qoda-hvd emulate --nodes 2 --ranks-per-node 2 -- python -c "import horovod.torch as h; h.init(); print(h.local_size(), h.cross_size())"
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog, description="Run an MPI/Horovod job on emulated nodes (--ranks-per-node ranks "
                               "each): network namespaces on a bridge, every link shaped to "
                               "--bandwidth in both directions; ranks of one node share its "
                               "namespace and talk at full speed. Needs root. Options before "
                               "'--', the per-rank command after it.")
    parser.add_argument("--nodes", type=int, default=2, help=f"nodes, 1 to {MAX_NODES} "
                                                            f"(default 2)")
    parser.add_argument("--bandwidth", default="1gbit",
                        help="link rate each way, tc style: 100mbit, 1gbit, 10gbit (default 1gbit)")
    parser.add_argument("--delay", default=None,
                        help="one-way latency between two nodes, e.g. 1ms (needs sch_netem)")
    parser.add_argument("--ranks-per-node", type=int, default=1,
                        help=f"ranks on each node, 1 to {MAX_RANKS_PER_NODE} (default 1); Horovod "
                             f"sees them as local ranks of one node")
    parser.add_argument("--np", type=int, default=None,
                        help="ranks (default: nodes x ranks per node)")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds before the job is killed (default 3600)")
    parser.add_argument("--mpi-args", default="", help="extra mpirun arguments (one string)")
    parser.add_argument("--prefix", default=None, help=argparse.SUPPRESS)  # from the bash wrapper
    parser.add_argument("--check", action="store_true",
                        help="say whether the emulator can run here and whether --delay can, "
                             "then exit")
    parser.add_argument("--cleanup-stale", action="store_true",
                        help="delete namespaces left by emulator runs whose process is gone")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the per-rank command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else list(args.command)

    if args.check:
        reason = emulator_unavailable_reason()
        if reason is not None:
            print(f"{prog}: cannot run here: {reason}")
            return 1
        print(f"{prog}: network namespaces, veth, bridge and tbf: available")
        print(f"{prog}: netem (--delay): " + ("available" if netem_available() else
                                             "NOT available in this kernel (sch_netem missing); "
                                             "--delay will be refused"))
        return 0
    if args.cleanup_stale:
        reason = emulator_unavailable_reason()
        if reason is not None:
            parser.exit(1, f"{prog}: error: {reason}\n")
        removed = cleanup_stale()
        print(f"{prog}: removed {len(removed)} stale namespaces" +
              (f": {', '.join(removed)}" if removed else ""))
        return 0
    if not command:
        parser.error("no command: give it after '--', e.g. -- python train.py")
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0 seconds, got {args.timeout}")

    # SIGTERM / SIGHUP become SystemExit so that `with` tears down; SIGINT is KeyboardInterrupt
    # unless the caller made us ignore it (the bash wrapper forwards it as SIGTERM then).
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_on_signal)
    try:
        cluster = EmulatedCluster(args.nodes, args.bandwidth, args.delay,
                                  ranks_per_node=args.ranks_per_node, prefix=args.prefix)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    try:
        with cluster:
            print(f"[{prog}] {cluster.describe()}", file=sys.stderr, flush=True)
            try:
                proc = cluster.run(command, timeout=args.timeout, np=args.np,
                                   mpi_args=shlex.split(args.mpi_args))
            except subprocess.TimeoutExpired:
                print(f"[{prog}] the job did not finish within {args.timeout:g} s: killed",
                      file=sys.stderr, flush=True)
                return 124
            return proc.returncode
    except (PermissionError, EmulatorError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"[{prog}] interrupted: emulated cluster torn down", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m qoda_hvd.cluster.emulator"))
