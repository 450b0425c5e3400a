"""The ``qoda-hvd`` command (also ``python -m qoda_hvd``).

Subcommands:
    info   versions and capabilities of the stack: Python, torch, Horovod, MPI, mpi4py,
           Horovod's controllers and tensor operations, CUDA / NCCL.
    demo   launch the main job (``qoda_hvd.demo``) on local ranks and print its summary.
    launch ``mpirun`` / ``horovodrun`` on a multi-node GPU cluster (``qoda_hvd.cluster.launch``).
    emulate run a job on an emulated cluster of bandwidth-shaped network namespaces
           (``qoda_hvd.cluster.emulator``; needs root).
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from typing import Sequence

from qoda_hvd import __version__
from qoda_hvd.launcher import LAUNCHERS, run_local

__all__ = ["collect_info", "main"]


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


def _demo(args: argparse.Namespace, rest: list[str]) -> int:
    argv = [sys.executable, "-m", "qoda_hvd.demo", *rest]
    print(f"[qoda-hvd] launching {args.np} ranks with {args.launcher}: qoda_hvd.demo {' '.join(rest)}",
          flush=True)
    try:
        return run_local(args.np, argv, args.launcher, timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"[qoda-hvd] demo did not finish within {args.timeout} s", file=sys.stderr)
        return 124


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``qoda-hvd``."""
    parser = argparse.ArgumentParser(prog="qoda-hvd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"qoda_hvd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and capabilities of torch, Horovod, MPI, mpi4py")
    demo = sub.add_parser("demo", help="train the built-in problem on local ranks",
                          description="Launch qoda_hvd.demo on local ranks. Options after the "
                                      "launcher's are passed to the demo (see "
                                      "`python -m qoda_hvd.demo --help`).")
    demo.add_argument("--np", type=int, default=2, help="number of ranks (default 2)")
    demo.add_argument("--launcher", choices=LAUNCHERS, default="mpirun",
                      help="mpirun, horovodrun (MPI) or gloo (horovodrun --gloo); default mpirun, whose output is untagged")
    demo.add_argument("--timeout", type=float, default=1800, help="seconds before giving up")
    # launch and emulate own their whole command line (options, then `--` and a command).
    sub.add_parser("launch", add_help=False,
                   help="mpirun/horovodrun for a multi-node GPU cluster "
                        "(qoda-hvd launch [--launcher horovodrun] --help)")
    sub.add_parser("emulate", add_help=False,
                   help="run a job on emulated nodes behind shaped links (root; "
                        "qoda-hvd emulate --help)")
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
    return _demo(args, rest)


if __name__ == "__main__":
    raise SystemExit(main())
