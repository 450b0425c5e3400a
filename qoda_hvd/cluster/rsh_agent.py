"""Open MPI ``plm_rsh_agent`` for the cluster emulator: "ssh" into a network namespace.

Open MPI starts its remote daemons by running ``<agent> <host> <command...>``, the way it would
run ``ssh <host> <command...>``. This agent looks ``<host>`` up in the address -> namespace map
it was given and runs the command there with ``ip netns exec <namespace> unshare --uts sh -c
"hostname <namespace> && <command>"``, joining the words with spaces exactly as ssh does for
its remote shell. The node's own host name (a UTS namespace per daemon) is what lets Open MPI
and PMIx tell the emulated nodes apart: with the machine's one name they merged ranks of
different nodes into one shared-memory group. The environment passes
through unchanged (all "nodes" share one machine), so ranks see what ``mpirun`` saw.

It is a standalone script (standard library only, no ``qoda_hvd`` import) so that starting it
costs a bare interpreter start, not the package's imports. The emulator writes a small wrapper
that calls it with the map baked in::

    python rsh_agent.py --map 198.18.7.1=qoda-1234-ab12-n0,198.18.7.2=qoda-1234-ab12-n1 \\
        198.18.7.2 orted -mca ess env ...
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

__all__ = ["agent_command", "main", "parse_map"]


def parse_map(text: str) -> dict[str, str]:
    """Parse ``addr=namespace,addr=namespace`` into a dict.

    Args:
        text: the comma-separated pairs.

    Example::

        >>> parse_map("198.18.7.1=ns0,198.18.7.2=ns1")["198.18.7.2"]
        'ns1'
    """
    table: dict[str, str] = {}
    for pair in filter(None, text.split(",")):
        host, sep, namespace = pair.partition("=")
        if not sep or not host or not namespace:
            raise ValueError(f"--map entries must be ADDRESS=NAMESPACE, got {pair!r}")
        table[host] = namespace
    return table


def agent_command(table: dict[str, str], argv: Sequence[str]) -> list[str]:
    """The command that runs Open MPI's remote command inside the host's namespace.

    ``argv`` is what Open MPI passes: optional ssh-style options, the host, then the command
    words. The host is the first word that names a known address (Open MPI puts any
    ``plm_rsh_args`` before it).

    Args:
        table: address -> namespace.
        argv: the agent's arguments after ``--map``.

    Example::

        >>> agent_command({"10.0.0.2": "ns1"}, ["10.0.0.2", "orted", "-mca", "x", "1"])[4:]
        ['unshare', '--uts', 'sh', '-c', 'hostname ns1 && orted -mca x 1']
    """
    for i, word in enumerate(argv):
        if word in table:
            words = list(argv[i + 1:])
            if not words:
                raise ValueError(f"no command to run on {word}")
            # its own UTS namespace named after the node: Open MPI (PMIx) tells nodes apart by
            # host name, and ranks of two emulated nodes must not look like one node's
            return ["ip", "netns", "exec", table[word], "unshare", "--uts", "sh", "-c",
                    f"hostname {table[word]} && " + " ".join(words)]
    raise ValueError(f"none of {list(argv)[:3]} is an emulated node; known nodes: "
                     f"{', '.join(sorted(table))}")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "--map":
        print("usage: rsh_agent.py --map ADDR=NS[,ADDR=NS...] HOST COMMAND...", file=sys.stderr)
        return 2
    try:
        command = agent_command(parse_map(args[1]), args[2:])
    except ValueError as e:
        print(f"qoda_hvd rsh agent: {e}", file=sys.stderr)
        return 255  # what ssh returns when it cannot reach the host
    os.execvp(command[0], command)
    return 255  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
