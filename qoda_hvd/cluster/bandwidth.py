"""Point-to-point goodput between MPI ranks: checks that a (real or emulated) link runs at its rate.

Run it under any launcher, e.g. on the emulator::

    launch/emulate-cluster --nodes 2 --bandwidth 100mbit -- python -m qoda_hvd.cluster.bandwidth

Patterns (every one is timed on the receiving side between two barriers, median of repeats):

- ``oneway``: rank 2k sends ``--bytes`` to rank 2k+1 (one direction of each link in use).
- ``exchange``: ranks 2k and 2k+1 send to each other at once (both directions).
- ``ring``: every rank sends to rank+1 and receives from rank-1 at once.

Goodput is payload bits over time (headers, the TCP handshake of the warm-up and barrier latency
are not counted), so on a link shaped to R it comes out a few percent under R. Rank 0 prints one
JSON object, with ``ratio`` to ``--rate`` when given. Uses mpi4py (the plain-MPI tool here; no
Horovod or torch import, so a probe starts in well under a second).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Sequence

__all__ = ["PATTERNS", "main", "measure"]

PATTERNS = ("oneway", "exchange", "ring")


def measure(comm, nbytes: int, pattern: str = "exchange", repeats: int = 3) -> list[float]:
    """Seconds per transfer of ``nbytes`` on this rank, one entry per repeat (collective call).

    Ranks that only send (``oneway``, even ranks) report the time of their receiving peer.

    Args:
        comm: an ``mpi4py.MPI.Comm`` with at least 2 ranks (an even number for the pair patterns).
        nbytes: payload bytes per transfer, >= 1.
        pattern: one of :data:`PATTERNS`.
        repeats: timed transfers after one small warm-up.

    Example::

        >>> from mpi4py import MPI  # doctest: +SKIP
        >>> measure(MPI.COMM_WORLD, 4 << 20, "exchange")  # doctest: +SKIP
        [0.69, 0.68, 0.69]
    """
    import numpy as np

    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")
    if nbytes < 1:
        raise ValueError(f"nbytes must be >= 1, got {nbytes}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    rank, size = comm.Get_rank(), comm.Get_size()
    if size < 2 or (pattern != "ring" and size % 2):
        raise ValueError(f"pattern {pattern!r} needs an even number of ranks >= 2, got {size}")
    peer = rank ^ 1
    send = np.full(nbytes, rank % 251, dtype=np.uint8)
    recv = np.empty(nbytes, dtype=np.uint8)

    def transfer(n: int) -> None:
        if pattern == "oneway":
            if rank % 2 == 0:
                comm.Send(send[:n], dest=peer)
            else:
                comm.Recv(recv[:n], source=peer)
        elif pattern == "exchange":
            comm.Sendrecv(send[:n], dest=peer, recvbuf=recv[:n], source=peer)
        else:
            comm.Sendrecv(send[:n], dest=(rank + 1) % size, recvbuf=recv[:n],
                          source=(rank - 1) % size)

    transfer(min(nbytes, 64 * 1024))  # connections are opened lazily: not part of the timing
    times = []
    from mpi4py import MPI

    for _ in range(repeats):
        comm.Barrier()
        t0 = MPI.Wtime()
        transfer(nbytes)
        elapsed = MPI.Wtime() - t0
        if pattern == "oneway":  # the receiver's clock is the one that saw the bytes arrive
            received = comm.sendrecv(elapsed, dest=peer, source=peer)
            elapsed = received if rank % 2 == 0 else elapsed
        times.append(elapsed)
        source = (rank - 1) % size if pattern == "ring" else peer
        if pattern != "oneway" or rank % 2:
            if recv[0] != source % 251 or recv[nbytes - 1] != source % 251:
                raise RuntimeError(f"rank {rank}: received bytes do not match what was sent")
    comm.Barrier()
    return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qoda_hvd.cluster.bandwidth",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=4 << 20, help="payload per transfer")
    parser.add_argument("--pattern", default="exchange",
                        help=f"one or more of {', '.join(PATTERNS)}, comma-separated "
                             f"(default exchange); one JSON line each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rate", default=None,
                        help="link rate the goodput is compared to, tc style (e.g. 50mbit)")
    args = parser.parse_args(argv)
    patterns = args.pattern.split(",")
    for pattern in patterns:
        if pattern not in PATTERNS:
            parser.error(f"--pattern must be among {', '.join(PATTERNS)}, got {pattern!r}")
    rate = None
    if args.rate:
        from qoda_hvd.cluster.emulator import parse_rate

        rate = parse_rate(args.rate)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    for pattern in patterns:
        times = measure(comm, args.bytes, pattern, args.repeats)
        per_rank = comm.gather(statistics.median(times), root=0)
        if comm.Get_rank() == 0:
            # The slowest rank sets the pace of a collective exchange: report its goodput.
            result = {"pattern": pattern, "ranks": comm.Get_size(), "bytes": args.bytes,
                      "repeats": args.repeats, "median_seconds_per_rank": per_rank,
                      "goodput_bits_per_s": args.bytes * 8 / max(per_rank)}
            if rate:
                result["rate_bits_per_s"] = rate
                result["ratio"] = result["goodput_bits_per_s"] / rate
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
