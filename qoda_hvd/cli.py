"""The ``qoda-hvd`` command (also ``python -m qoda_hvd``).

Subcommands:
    info   versions and capabilities of the stack: Python, torch, Horovod, MPI, mpi4py,
           Horovod's controllers and tensor operations, CUDA / NCCL.
    demo   the main job (``qoda_hvd.demo``): Horovod fp32 allreduce, then qoda_hvd layer-wise
           compression, on 2 ranks behind an emulated link when root allows it (else local
           ranks), ending with a comparison table.
    launch ``mpirun`` / ``horovodrun`` on a multi-node GPU cluster (``qoda_hvd.cluster.launch``).
    emulate run a job on an emulated cluster of bandwidth-shaped network namespaces
           (``qoda_hvd.cluster.emulator``; needs root).
    plot   ``demo --json`` output and the examples' metrics.csv as a PNG: loss and bytes sent
           against the step, one line per method (``qoda_hvd.plot``; needs matplotlib).
"""
from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
from typing import Sequence

from qoda_hvd import __version__
from qoda_hvd.launcher import LAUNCHERS, run_local

__all__ = ["build_parser", "collect_info", "main"]


def _mark(flag: bool) -> str:
    return "[X]" if flag else "[ ]"


def collect_info() -> dict:
    """Versions and capabilities of the installed stack, as a dict (what ``info`` prints).

    Example::

        >>> collect_info()["qoda_hvd"] == __version__
        True
    """
    info: dict = {"qoda_hvd": __version__, "python": platform.python_version()}
    import torch

    info["torch"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    try:
        info["torch_nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    except Exception:  # torch built without NCCL
        info["torch_nccl"] = None
    try:
        import horovod
        import horovod.torch as hvd

        info["horovod"] = horovod.__version__
        info["horovod_controllers"] = {"mpi": hvd.mpi_built(), "gloo": hvd.gloo_built()}
        info["horovod_tensor_ops"] = {
            "nccl": hvd.nccl_built() != 0, "ddl": hvd.ddl_built(), "ccl": hvd.ccl_built(),
            "mpi": hvd.mpi_built(), "gloo": hvd.gloo_built()}
        info["horovod_cuda"] = hvd.cuda_built()
    except ImportError as e:
        info["horovod"] = f"not importable ({e})"
    try:
        from mpi4py import MPI
        import mpi4py

        info["mpi4py"] = mpi4py.__version__
        info["mpi"] = MPI.Get_library_version().strip().splitlines()[0]
    except ImportError as e:
        info["mpi4py"] = f"not importable ({e})"
    return info


def _print_info() -> int:
    info = collect_info()
    print(f"qoda_hvd   {info['qoda_hvd']}")
    print(f"Python     {info['python']}")
    print(f"torch      {info['torch']} (CUDA {info['torch_cuda'] or 'none'}, "
          f"GPU available: {info['cuda_available']}, NCCL {info['torch_nccl'] or 'none'})")
    print(f"Horovod    {info['horovod']}")
    if "horovod_controllers" in info:
        print("  Available Frameworks:\n    [X] PyTorch")
        print("  Available Controllers:")
        for name, ok in info["horovod_controllers"].items():
            print(f"    {_mark(ok)} {name.upper() if name == 'mpi' else name.capitalize()}")
        print("  Available Tensor Operations:")
        for name, ok in info["horovod_tensor_ops"].items():
            print(f"    {_mark(ok)} {name.upper() if name in ('nccl', 'ddl', 'ccl', 'mpi') else name.capitalize()}")
        print(f"  CUDA built: {info['horovod_cuda']}")
    print(f"mpi4py     {info['mpi4py']}")
    if "mpi" in info:
        print(f"MPI        {info['mpi']}")
    return 0


#: Link rate ``qoda-hvd demo`` emulates when it can (``--bandwidth auto``): slow enough that the
#: demo's small model spends most of a fp32 step exchanging (measured: at 1gbit its step is
#: bound by compute and qoda_hvd's CPU codec instead, and fp32 is faster).
DEMO_BANDWIDTH = "100mbit"


def _demo_link(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(rate to emulate or None, why there is no shaped link or None) for ``demo``."""
    from qoda_hvd.cluster.emulator import MAX_NODES, emulator_unavailable_reason, parse_rate

    if not 1 <= args.np <= MAX_NODES:
        raise ValueError(f"--np must be in [1, {MAX_NODES}], got {args.np}")
    if args.bandwidth == "none":
        return None, "asked for with --bandwidth none"
    if args.bandwidth != "auto":
        parse_rate(args.bandwidth)  # ValueError naming the accepted units
        if args.launcher != "mpirun":
            raise ValueError(f"--launcher {args.launcher} runs local ranks only; the emulated "
                             f"link runs them under mpirun (drop --launcher, or add "
                             f"--bandwidth none)")
    elif args.launcher != "mpirun":
        return None, f"--launcher {args.launcher} runs local ranks only"
    reason = emulator_unavailable_reason()
    if reason is not None:
        if args.bandwidth != "auto":
            raise ValueError(f"--bandwidth {args.bandwidth} needs the cluster emulator, which "
                             f"cannot run here: {reason}")
        return None, reason
    return (DEMO_BANDWIDTH if args.bandwidth == "auto" else args.bandwidth), None


def _raise_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _demo(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        rate, reason = _demo_link(args)
    except ValueError as e:
        print(f"qoda-hvd demo: error: {e}", file=sys.stderr)
        return 2
    argv = [sys.executable, "-m", "qoda_hvd.demo", *rest]
    argv += [f"--link={rate}"] if rate else [f"--unshaped-reason={reason}"]
    # One codec thread per rank, as one torch thread (the ranks share this machine's cores):
    # numba's pool, started with a thread per core in every rank, slowed the 2-rank demo's
    # qoda_hvd steps ~9x on 2 cores (440 ms vs 49 ms a step, measured).
    env = dict(os.environ)
    env.setdefault("NUMBA_NUM_THREADS", "1")
    try:
        if rate is None:
            print(f"[qoda-hvd] no shaped link ({reason}): {args.np} local ranks with "
                  f"{args.launcher}: qoda_hvd.demo {' '.join(argv[3:])}", flush=True)
            return run_local(args.np, argv, args.launcher, timeout=args.timeout,
                             env=env).returncode
        from qoda_hvd.cluster import EmulatedCluster

        # SIGTERM/SIGHUP unwind like Ctrl-C, so the namespaces are removed on the way out.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _raise_on_signal)
        with EmulatedCluster(nodes=args.np, bandwidth=rate) as cluster:
            print(f"[qoda-hvd] {cluster.describe()}", flush=True)
            print(f"[qoda-hvd] one rank per node under mpirun: qoda_hvd.demo "
                  f"{' '.join(argv[3:])}", flush=True)
            return cluster.run(argv, timeout=args.timeout, env=env).returncode
    except subprocess.TimeoutExpired:
        print(f"[qoda-hvd] demo did not finish within {args.timeout} s", file=sys.stderr)
        return 124


def build_parser() -> argparse.ArgumentParser:
    """The ``qoda-hvd`` command line (``launch`` and ``emulate`` parse their own).

    Example::

        >>> build_parser().parse_known_args(["demo", "--bandwidth", "none", "--steps", "5"])[1]
        ['--steps', '5']
    """
    parser = argparse.ArgumentParser(prog="qoda-hvd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"qoda_hvd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and capabilities of torch, Horovod, MPI, mpi4py")
    demo = sub.add_parser(
        "demo", help="Horovod fp32 vs qoda_hvd on the built-in problem, side by side",
        description="Launch qoda_hvd.demo: the built-in problem trained with Horovod's fp32 "
                    "allreduce, then with qoda_hvd's layer-wise compression, ending with a "
                    "table. Options not listed here are passed to the demo (see `python -m "
                    "qoda_hvd.demo --help`).")
    demo.add_argument("--np", type=int, default=2, help="number of ranks (default 2)")
    demo.add_argument("--bandwidth", default="auto", metavar="RATE|auto|none",
                      help=f"link between the ranks, each way: a tc rate (e.g. 1gbit, 100mbit) "
                           f"runs one rank per node of the emulated cluster (root, network "
                           f"namespaces); auto (default): {DEMO_BANDWIDTH} when the emulator "
                           f"can run here, else local ranks; none: local ranks (shared memory)")
    demo.add_argument("--launcher", choices=LAUNCHERS, default="mpirun",
                      help="local ranks only: mpirun, horovodrun (MPI) or gloo (horovodrun --gloo); "
                           "default mpirun, whose output is untagged")
    demo.add_argument("--timeout", type=float, default=1800, help="seconds before giving up")
    # launch and emulate own their whole command line (options, then `--` and a command).
    sub.add_parser("launch", add_help=False,
                   help="mpirun/horovodrun for a multi-node GPU cluster "
                        "(qoda-hvd launch [--launcher horovodrun] --help)")
    sub.add_parser("emulate", add_help=False,
                   help="run a job on emulated nodes behind shaped links (root; "
                        "qoda-hvd emulate --help)")
    from qoda_hvd.plot import build_parser as plot_parser

    plot_parser(sub.add_parser(
        "plot", help="plot `demo --json` files and the examples' metrics.csv to a PNG",
        description="Loss and MB sent against the step, one line per method of a `qoda-hvd "
                    "demo --json` file or per example metrics.csv (needs matplotlib: the "
                    "examples extra, which `make setup` installs)."))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qoda-hvd``."""
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["launch"]:
        from qoda_hvd.cluster.launch import launch_cli

        return launch_cli(words[1:], prog="qoda-hvd launch")
    if words[:1] == ["emulate"]:
        from qoda_hvd.cluster.emulator import main as emulate_main

        return emulate_main(words[1:], prog="qoda-hvd emulate")
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _print_info()
    if args.command == "plot":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from qoda_hvd.plot import main as plot_main

        return plot_main(args)
    return _demo(args, rest)


if __name__ == "__main__":
    raise SystemExit(main())
