"""Shared plumbing of the examples, in one place: command-line options, Horovod and device set-up,
the optimizer registry, one VI iteration, per-step random streams, progress bar, CSV and
TensorBoard scalars, PNG images, checkpoints with resume, and the final summary line.

Every rank computes; only rank 0 writes files and prints. A checkpoint is read by rank 0 and
broadcast to the others (``hvd.broadcast_object``), so resuming needs no shared file system.

The PNG writer is a few lines of :mod:`zlib` and :mod:`struct` (8-bit RGB, one IDAT chunk):
enough for sample grids, and it keeps matplotlib/Pillow out of the examples' dependencies.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "COMPRESSIONS",
    "OPTIMIZERS",
    "Context",
    "CsvLog",
    "OptimizerSpec",
    "Run",
    "add_common_arguments",
    "adaptive_lr",
    "image_grid",
    "make_distributed_optimizer",
    "run_iteration",
    "setup",
    "step_generator",
    "summary_line",
    "write_png",
]

COMPRESSIONS = ("layerwise", "none", "fp16")
CHECKPOINT = "checkpoint.pt"
#: Training steps are numbered from 1; step 0's streams serve evaluation (fixed windows/latents).
EVALUATION_STEP = 0
METRICS = "metrics.csv"


# -- optimizers ----------------------------------------------------------------------------

@dataclass(frozen=True)
class OptimizerSpec:
    """How an ``--optimizer`` choice is built and what one iteration of it costs.

    Attributes:
        build: ``(param_groups, args) -> torch.optim.Optimizer``; each group carries its ``lr``.
        exchanges_per_iteration: gradient exchanges per training iteration (1 for QODA and the
            optimistic optimizers, 2 for extra-gradient).
        default_step_size: the ``--step-size`` rule used when none is given, or None for
            optimizers without one (Adam, SGD).
        help: one line for ``--help``.
    """

    build: Callable[[list, argparse.Namespace], torch.optim.Optimizer]
    exchanges_per_iteration: int
    default_step_size: Optional[str]
    help: str

    def adaptive(self, args: argparse.Namespace) -> bool:
        """Whether the step is normalised by accumulated gradient-difference norms (QODA's
        rule), which makes ``lr`` a length in parameter space (see :func:`adaptive_lr`)."""
        if self.default_step_size is None:
            return False
        return (args.step_size or self.default_step_size) != "constant"


def _qoda(groups, args):
    import qoda_hvd

    return qoda_hvd.QODA(groups, step_size=args.step_size or "adaptive")


def _extragradient(groups, args):
    import qoda_hvd

    return qoda_hvd.ExtraGradient(groups, step_size=args.step_size or "constant")


def _adam(groups, args, optimistic: bool):
    import qoda_hvd

    opt = torch.optim.Adam(groups, betas=tuple(args.betas))
    return qoda_hvd.optimistic(opt) if optimistic else opt


def _optimistic_sgd(groups, args):
    import qoda_hvd

    return qoda_hvd.optimistic(torch.optim.SGD(groups))


#: Every optimizer an example may offer; each example restricts ``--optimizer`` to a subset.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "qoda": OptimizerSpec(_qoda, 1, "adaptive",
                          "QODA (optimistic dual averaging, adaptive steps): one exchange per "
                          "iteration"),
    "optimistic-adam": OptimizerSpec(lambda g, a: _adam(g, a, True), 1, None,
                                     "Adam made optimistic (extrapolation from the past): one "
                                     "exchange"),
    "adam": OptimizerSpec(lambda g, a: _adam(g, a, False), 1, None, "plain Adam: one exchange"),
    "optimistic-sgd": OptimizerSpec(_optimistic_sgd, 1, None,
                                    "optimistic gradient descent (SGD made optimistic): one "
                                    "exchange"),
    "extragradient": OptimizerSpec(_extragradient, 2, "constant",
                                   "extra-gradient (Q-GenX-style baseline, SGD-type steps): two "
                                   "gradients and two exchanges per iteration"),
}


def adaptive_lr(adam_lr: float, params: Iterable[torch.Tensor]) -> float:
    """Default ``lr`` of an adaptive (QODA-rule) optimizer, from an Adam learning rate.

    QODA's step is normalised by the norm over the whole parameter group, so its first step
    moves the group by about ``lr`` in Euclidean norm, while Adam's first step moves each of
    the ``d`` coordinates by ``adam_lr`` (norm ``adam_lr * sqrt(d)``). Equal first
    displacements give ``lr = adam_lr * sqrt(d)``. A heuristic, not a tuned value.

    Example::

        >>> adaptive_lr(1e-3, [torch.zeros(100, 100)])
        0.1
    """
    d = sum(p.numel() for p in params)
    return adam_lr * math.sqrt(d)


@contextlib.contextmanager
def at_base_iterates(optimizer: torch.optim.Optimizer):
    """Evaluate at the base iterate ``x_t`` inside the ``with`` block.

    QODA and optimistic optimizers keep the extrapolated half-iterate ``x_{t+1/2}`` in the
    parameters (where the next gradient is taken); samples, perplexity and distances are
    better measured at ``x_t`` (``optimizer.base_iterates()``). Other optimizers, and the
    first step before any state exists, evaluate at the parameters as they are.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    base = getattr(optimizer, "base_iterates", None)
    iterates = base() if callable(base) else []
    if len(iterates) != len(params):  # before the first step (or partial state): as they are
        yield
        return
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        torch._foreach_copy_(params, [b.to(p.dtype) for b, p in zip(iterates, params)])
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, saved)


def run_iteration(optimizer: torch.optim.Optimizer, field: Callable[[], Any]) -> Any:
    """One training iteration. ``field()`` fills ``p.grad`` with the operator (the gradient,
    or a game's stacked field) at the current parameters and returns what to log.

    QODA and optimistic optimizers evaluate the field once and exchange once; extra-gradient
    evaluates it at ``x_t``, exchanges, extrapolates, evaluates it at ``x_{t+1/2}`` and
    exchanges again. Returns the last ``field()``'s result.
    """
    import qoda_hvd

    if isinstance(optimizer, qoda_hvd.ExtraGradient):
        optimizer.zero_grad()
        field()
        optimizer.extrapolation()  # exchange 1 of 2
    optimizer.zero_grad()
    out = field()
    optimizer.step()  # the (only, or second) exchange
    return out


# -- command line --------------------------------------------------------------------------

def add_common_arguments(parser: argparse.ArgumentParser, *, steps: int, batch: Optional[int],
                         optimizers: Sequence[str], default_optimizer: str, log_every: int = 10,
                         save_every: int = 100) -> None:
    """Options every example shares: training loop, optimizer, compression and exchange,
    device, outputs and resume. ``batch=None`` leaves out ``--batch`` (no minibatches);
    ``--betas`` is offered only with an Adam-type optimizer among ``optimizers``."""
    t = parser.add_argument_group("training")
    t.add_argument("--steps", type=int, default=steps,
                   help=f"total iterations; with --resume the run continues up to this count "
                        f"(default {steps})")
    if batch is not None:
        t.add_argument("--batch", type=int, default=batch,
                       help=f"batch size per rank (global batch = ranks x batch; default {batch})")
    t.add_argument("--optimizer", choices=list(optimizers), default=default_optimizer,
                   help="; ".join(f"{n}: {OPTIMIZERS[n].help}" for n in optimizers)
                   + f" (default {default_optimizer})")
    t.add_argument("--step-size", choices=["adaptive", "adaptive_per_tensor", "constant"],
                   default=None,
                   help="step-size rule of qoda / extragradient (default: adaptive for qoda, "
                        "constant for extragradient); ignored by the Adam/SGD optimizers")
    if any("adam" in name for name in optimizers):
        t.add_argument("--betas", type=float, nargs=2, default=[0.5, 0.9], metavar=("B1", "B2"),
                       help="Adam betas of (optimistic-)adam (default 0.5 0.9, as in WGAN-GP)")
    t.add_argument("--seed", type=int, default=0,
                   help="seed of initialisation and data; rank k draws its own stream (default 0)")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA when available (GPU hvd.local_rank() per rank), else CPU")

    c = parser.add_argument_group("compression and exchange (qoda_hvd.DistributedOptimizer)")
    c.add_argument("--compression", choices=COMPRESSIONS, default="layerwise",
                   help="layerwise: per-layer-type quantization + entropy coding (default); "
                        "none: fp32 fused allreduce; fp16: fp16 fused allreduce")
    c.add_argument("--bits", type=int, default=4,
                   help="layerwise: bits per symbol before entropy coding, 2-8 (default 4)")
    c.add_argument("--coding", choices=["auto", "ans", "elias", "fixed", "zstd"], default="auto",
                   help="layerwise: entropy coder of the symbols (default auto: cheapest per type)")
    c.add_argument("--levels", choices=["optimal", "uniform", "exponential"], default="optimal",
                   help="layerwise: level family; optimal = adapted to gradient statistics (MQV)")
    c.add_argument("--exchange", choices=["auto", "allgather", "scatter_gather"], default="auto",
                   help="how compressed payloads travel (default auto: allgather up to 2 ranks, "
                        "scatter_gather beyond)")

    o = parser.add_argument_group("outputs")
    o.add_argument("--out", default=None,
                   help="directory for metrics.csv, checkpoint.pt (and images); rank 0 writes. "
                        "Default: no files")
    o.add_argument("--resume", action="store_true",
                   help=f"continue from --out/{CHECKPOINT}: the step count, model and optimizer "
                        "state continue; metrics.csv is appended to")
    o.add_argument("--log-every", type=int, default=log_every,
                   help=f"steps between metric rows (default {log_every})")
    o.add_argument("--save-every", type=int, default=save_every,
                   help=f"steps between checkpoints; one is always written at the end "
                        f"(default {save_every})")


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Range checks of :func:`add_common_arguments`'s options (``parser.error`` on failure)."""
    for name in ("steps", "batch", "log_every", "save_every"):
        if hasattr(args, name) and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 2 <= args.bits <= 8:
        parser.error(f"--bits must be in [2, 8], got {args.bits}")
    if not all(0.0 <= b < 1.0 for b in getattr(args, "betas", [])):
        parser.error(f"--betas must be in [0, 1), got {args.betas}")
    if args.resume and args.out is None:
        parser.error("--resume needs --out (the directory holding checkpoint.pt)")


def make_compression(args: argparse.Namespace, types: Any = None):
    """The ``compression=`` of :func:`qoda_hvd.DistributedOptimizer` for ``--compression``.

    Args:
        args: parsed options.
        types: layer typing for ``layerwise`` (an ``nn.Module``, overrides, or None).
    """
    import qoda_hvd

    if args.compression == "none":
        return qoda_hvd.Compression.none
    if args.compression == "fp16":
        return qoda_hvd.Compression.fp16
    return qoda_hvd.Compression.layerwise(bits=args.bits, levels=args.levels, coding=args.coding,
                                          types=types, seed=args.seed)


def make_distributed_optimizer(param_groups: list, named_parameters, args: argparse.Namespace,
                               types: Any = None) -> torch.optim.Optimizer:
    """``--optimizer`` over ``param_groups``, wrapped by :func:`qoda_hvd.DistributedOptimizer`
    with ``--compression`` and ``--exchange``."""
    import qoda_hvd

    base = OPTIMIZERS[args.optimizer].build(param_groups, args)
    return qoda_hvd.DistributedOptimizer(base, named_parameters=named_parameters,
                                         compression=make_compression(args, types),
                                         exchange=args.exchange)


# -- processes, devices, randomness --------------------------------------------------------

@dataclass
class Context:
    """Where this rank runs: Horovod module, rank, size and device."""

    hvd: Any
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def print(self, *parts: Any) -> None:
        """Print on rank 0 only, each line in ONE write, flushed (so launchers show it at once,
        and another rank's output cannot land inside it: with ``PYTHONUNBUFFERED`` every piece
        of a ``print`` is a write of its own)."""
        if self.main:
            sys.stdout.write(" ".join(map(str, parts)) + "\n")
            sys.stdout.flush()

    def mean(self, value: float, name: str) -> float:
        """Average of a float over ranks (a collective: every rank must call it)."""
        return self.means({"value": value}, name)["value"]

    def means(self, values: Mapping[str, float], name: str) -> dict[str, float]:
        """Averages over ranks of named floats, in one allreduce (a collective)."""
        t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64)
        avg = self.hvd.allreduce(t, name=name, op=self.hvd.Average).tolist()
        return dict(zip(values, avg))


def choose_device(requested: str, local_rank: int) -> torch.device:
    """``--device``: ``cuda`` takes GPU ``local_rank``; ``auto`` picks CUDA when available."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (torch.cuda.is_available() "
                         "is False); use --device cpu or auto")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise SystemExit(f"--device cuda: local rank {local_rank} needs GPU {local_rank} but "
                         f"this node has {count}; start at most {count} ranks per node")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def setup(args: argparse.Namespace) -> Context:
    """``hvd.init()``, one CPU thread per rank, the device of ``--device``."""
    import horovod.torch as hvd

    hvd.init()
    torch.set_num_threads(1)  # ranks share the node's cores
    device = choose_device(args.device, hvd.local_rank())
    return Context(hvd, hvd.rank(), hvd.size(), device)


def step_generator(seed: int, rank: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for one rank's randomness at one step (independent streams by
    ``numpy.random.SeedSequence``). Deriving it from the step, not carrying state, makes a
    resumed run draw exactly what the uninterrupted run would have drawn.

    Args:
        seed: the run's ``--seed``.
        rank: this rank.
        step: the training step (>= 1), or :data:`EVALUATION_STEP`.
        stream: several independent streams within one step (e.g. the two oracle calls of
            extra-gradient).

    Example::

        >>> a = torch.rand(2, generator=step_generator(0, 0, 5))
        >>> bool((a == torch.rand(2, generator=step_generator(0, 0, 5))).all())
        True
    """
    state = np.random.SeedSequence([seed, rank, step, stream]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1))


# -- outputs -------------------------------------------------------------------------------

class CsvLog:
    """``metrics.csv`` on rank 0: a header, then one row per logged step, flushed each row.

    On resume from step ``s`` rows with ``step > s`` (written after the checkpoint by an
    interrupted run) are dropped before appending, so each step appears once.
    """

    def __init__(self, path: Optional[str], columns: Sequence[str], resume_step: Optional[int]):
        self.columns = list(columns)
        self._file = None
        if path is None:
            return
        rows: list[list[str]] = []
        if resume_step is not None and os.path.exists(path):
            with open(path, newline="") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                if header != self.columns:
                    raise SystemExit(f"{path} has columns {header}, this run writes "
                                     f"{self.columns}: use another --out")
                rows = [r for r in reader if r and int(r[0]) <= resume_step]
        self._file = open(path, "w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerow(self.columns)
        self._writer.writerows(rows)
        self._file.flush()

    def write(self, row: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        self._writer.writerow([_fmt(row[c]) for c in self.columns])
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def open_tensorboard(out: Optional[str], ctx: Context):
    """A ``SummaryWriter`` under ``out/tensorboard`` when the tensorboard package is installed
    (rank 0), else None, saying so once."""
    if out is None or not ctx.main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        ctx.print("TensorBoard: not written (the tensorboard package is not installed; "
                  "`pip install tensorboard` to get it); scalars are in metrics.csv")
        return None
    return SummaryWriter(os.path.join(out, "tensorboard"))


def write_png(path: str, image: np.ndarray) -> None:
    """Write an 8-bit RGB image ``[H, W, 3]`` (uint8) as a PNG file.

    Example::

        >>> write_png("/tmp/black.png", np.zeros((2, 3, 3), np.uint8))  # doctest: +SKIP
    """
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    h, w, _ = image.shape
    # Each scanline starts with filter type 0 (none).
    raw = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


def image_grid(images: torch.Tensor, columns: int = 8, pad: int = 2) -> np.ndarray:
    """Tile ``[N, 3, H, W]`` images with values in [-1, 1] into one uint8 ``[H', W', 3]`` grid.

    Example::

        >>> image_grid(torch.zeros(3, 3, 4, 4), columns=2, pad=1).shape
        (11, 11, 3)
    """
    n, c, h, w = images.shape
    if c != 3:
        raise ValueError(f"images must have 3 channels, got {c}")
    rows = -(-n // columns)
    cols = min(n, columns)
    grid = torch.zeros(3, pad + rows * (h + pad), pad + cols * (w + pad), dtype=torch.uint8)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    for i in range(n):
        r, q = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, y:y + h, x:x + w] = pixels[i]
    return grid.permute(1, 2, 0).numpy()


# -- checkpoints ---------------------------------------------------------------------------

def save_checkpoint(ctx: Context, out: Optional[str], state: Mapping[str, Any]) -> None:
    """Rank 0 writes ``out/checkpoint.pt`` atomically (a crash mid-write keeps the old one)."""
    if out is None or not ctx.main:
        return
    path = os.path.join(out, CHECKPOINT)
    torch.save(dict(state), path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(ctx: Context, out: str) -> dict:
    """Rank 0 reads ``out/checkpoint.pt`` and broadcasts it; every rank gets the same dict, or
    every rank exits with rank 0's reason (so no rank waits in a collective for ever)."""
    payload: Any = None
    if ctx.main:
        path = os.path.join(out, CHECKPOINT)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            payload = f"--resume: no checkpoint at {path} (run once without --resume first)"
        except Exception as e:  # a truncated or foreign file
            payload = f"--resume: cannot read {path}: {type(e).__name__}: {e}"
    payload = ctx.hvd.broadcast_object(payload, root_rank=0, name="qoda_examples.checkpoint")
    if isinstance(payload, str):
        raise SystemExit(payload)
    return payload


def check_resume_arguments(saved: Mapping[str, Any], args: argparse.Namespace,
                           names: Sequence[str]) -> None:
    """Options that shape the model must match the checkpoint's."""
    for name in names:
        now, then = getattr(args, name), saved.get(name)
        if isinstance(now, (list, tuple)):
            now, then = list(now), list(then) if then is not None else then
        if now != then:
            raise SystemExit(f"--resume: --{name.replace('_', '-')} is {now!r} but the checkpoint "
                             f"was trained with {then!r}")


class Run:
    """The training loop's bookkeeping: resume, progress bar, metrics, checkpoints, summary.

    Args:
        name: the example's name (summary line prefix).
        args: parsed options (common ones included).
        ctx: this rank's :class:`Context`.
        columns: metric columns after ``step``.
        model_options: options that must match on resume.
    """

    def __init__(self, name: str, args: argparse.Namespace, ctx: Context, columns: Sequence[str],
                 model_options: Sequence[str] = ()) -> None:
        self.name, self.args, self.ctx = name, args, ctx
        self.model_options = list(model_options)
        self.start_step = 0
        self._before: dict[str, float] = {}
        self.checkpoint: Optional[dict] = None
        if args.out is not None and ctx.main:
            os.makedirs(args.out, exist_ok=True)
        if args.resume:
            self.checkpoint = load_checkpoint(ctx, args.out)
            check_resume_arguments(self.checkpoint["args"], args, self.model_options)
            if self.checkpoint["args"].get("optimizer") != args.optimizer:
                raise SystemExit(f"--resume: --optimizer is {args.optimizer!r} but the checkpoint "
                                 f"was trained with {self.checkpoint['args'].get('optimizer')!r}")
            self.start_step = int(self.checkpoint["step"])
            # Metric columns count the whole training, across resumes.
            self._before = dict(self.checkpoint.get("totals", {}))
        self.columns = ["step"] + list(columns) + ["exchanges", "bits_per_coordinate",
                                                   "bytes_sent", "seconds"]
        path = os.path.join(args.out, METRICS) if (args.out and ctx.main) else None
        self.csv = CsvLog(path, self.columns, self.start_step if args.resume else None)
        self.tensorboard = open_tensorboard(args.out, ctx)
        self._t0 = time.perf_counter()

    def steps(self):
        """Steps ``start+1 .. --steps`` with a tqdm bar on rank 0."""
        from tqdm import tqdm

        self._t0 = time.perf_counter()
        first = self.start_step + 1
        return tqdm(range(first, self.args.steps + 1), initial=self.start_step,
                    total=self.args.steps, disable=not self.ctx.main, desc=self.name, unit="it",
                    mininterval=1.0, dynamic_ncols=True)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._t0

    def due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.args.steps

    def totals(self, optimizer) -> dict[str, float]:
        """Exchanges, bytes sent and seconds since the first step of the training (resumes
        included)."""
        st = optimizer.compression_stats()
        now = {"exchanges": st["exchanges"], "bytes_sent": st["bytes_sent"],
               "seconds": self.seconds}
        return {k: v + self._before.get(k, 0) for k, v in now.items()}

    def log(self, step: int, optimizer, values: Mapping[str, float]) -> None:
        """One metric row (rank 0 writes; values should already be averaged over ranks).
        ``exchanges``, ``bytes_sent`` and ``seconds`` count from the first step of the
        training; ``bits_per_coordinate`` is this run's mean."""
        st = optimizer.compression_stats()
        totals = self.totals(optimizer)
        row = dict(values, step=step, exchanges=int(totals["exchanges"]),
                   bits_per_coordinate=st["bits_per_coordinate"],
                   bytes_sent=int(totals["bytes_sent"]), seconds=round(totals["seconds"], 3))
        self.csv.write(row)
        if self.tensorboard is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tensorboard.add_scalar(k, v, step)

    def save(self, step: int, optimizer, state: Mapping[str, Any]) -> None:
        """Checkpoint ``state`` plus the step, the running totals and the options (rank 0)."""
        if self.args.out is None or not self.ctx.main:
            return
        save_checkpoint(self.ctx, self.args.out,
                        dict(state, step=step, totals=self.totals(optimizer),
                             args=_plain(vars(self.args))))

    def finish(self, optimizer, extra: Mapping[str, str]) -> str:
        """Close the outputs and print (rank 0) and return the summary line."""
        seconds = self.seconds
        self.csv.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        line = summary_line(self.name, self.args, self.ctx.size, optimizer, self.start_step,
                            self.args.steps, seconds, extra)
        self.ctx.print(line)
        return line


def _plain(options: Mapping[str, Any]) -> dict:
    # torch.load(weights_only=True) accepts plain containers of str/int/float/bool/None.
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def summary_line(name: str, args: argparse.Namespace, size: int, optimizer, first_step: int,
                 last_step: int, seconds: float, extra: Mapping[str, str]) -> str:
    """``name: optimizer, K ranks, steps a-b (n this run), T s, E exchanges (e per iteration),
    compression B bits/coordinate, Rx smaller than fp32, M MB sent per rank, extra...``"""
    st = optimizer.compression_stats()
    n = last_step - first_step
    per_it = f"{st['exchanges'] / n:.2g}" if n > 0 else "-"
    parts = [f"{name}: {args.optimizer}, {size} ranks",
             f"steps {first_step + 1}-{last_step} ({n} this run)" if n > 0
             else f"steps done ({last_step}, 0 this run)",
             f"{seconds:.1f} s",
             f"{st['exchanges']} exchanges ({per_it} per iteration)",
             f"{args.compression} {st['bits_per_coordinate']:.2f} bits/coordinate",
             f"{st['ratio']:.1f}x smaller than fp32",
             f"{st['bytes_sent'] / 1e6:.2f} MB sent per rank"]
    parts += [f"{k} {v}" for k, v in extra.items()]
    return ", ".join(parts)


def exit_on_error(main: Callable[[Optional[Sequence[str]]], int]):
    """Run ``main`` as a script; an uncaught error ends the whole job with a message (a rank
    that dies quietly would leave the others waiting in a collective)."""
    try:
        return main(None)
    except SystemExit:
        raise
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
