"""The main job: the built-in problem trained twice in one launch, Horovod fp32 vs qoda_hvd.

Both runs train the same model from the same initial weights on the same batches with the same
optimizer (QODA); only the gradient exchange differs:

1. ``horovod-fp32``: Horovod's own ``hvd.DistributedOptimizer`` (fp32 allreduce), the baseline;
2. ``qoda``: ``qoda_hvd.DistributedOptimizer`` with layer-wise quantization and entropy coding.

Rank 0 shows a progress bar per run and ends with a table: final loss (on held-out data), bytes
sent per rank, milliseconds per step, speedup over the first run. Every figure is measured in
this launch; nothing is looked up.

Run it through the launcher (``qoda-hvd demo`` or ``make demo``), which puts the ranks behind a
shaped link on the emulated cluster when the machine allows it (root, network namespaces);
started by hand it runs one rank. Rank ``k`` draws its own shard of a synthetic teacher-student
classification task, so the ranks really do disagree on gradients and the exchange matters.

Horovod is imported here because this module is an application, not part of the library core.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from qoda_hvd.config import CODINGS, EXCHANGES

__all__ = ["METHODS", "build_model", "build_parser", "compile_kernels", "kernels_cached",
           "make_batch", "main", "format_table"]

#: Held-out samples the final loss is measured on (the same on every rank and for every run).
EVAL_SAMPLES = 4096


def build_model(in_features: int = 32, hidden: int = 256, classes: int = 8) -> nn.Module:
    """The demo's student network: a three-layer MLP (~75k parameters at the defaults).

    Example::

        >>> sum(p.numel() for p in build_model().parameters())
        76296
    """
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def make_batch(teacher: nn.Module, batch: int, generator: torch.Generator,
               in_features: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of the task: Gaussian inputs labelled by a fixed random teacher network.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = make_batch(build_model(), 4, g)
        >>> tuple(x.shape), tuple(y.shape)
        ((4, 32), (4,))
    """
    x = torch.randn(batch, in_features, generator=generator)
    with torch.no_grad():
        y = teacher(x).argmax(dim=1)
    return x, y


def _kernel_dispatchers() -> list:
    from qoda_hvd.coding import rans
    from qoda_hvd.kernels import cpu

    # The one-thread kernels (a launched rank's: one codec thread each) and the rans coder.
    return [cpu._quantize_pack_serial, cpu._dequantize_serial, rans.byte_histogram, rans._encode,
            rans._decode]


def kernels_cached() -> Optional[bool]:
    """Whether numba's cache holds the CPU codec kernels a demo rank runs, for the kernels'
    current sources (None when it cannot tell). Without them a rank's first quantized step
    compiles them (about 15-20 s on 2 busy cores).

    Example::

        >>> kernels_cached() in (True, False, None)
        True
    """
    try:
        # numba's own check (the index of each kernel, stale when the source changed); internal
        # API, hence the broad fallback.
        return all(bool(d._cache._cache_file._load_index()) for d in _kernel_dispatchers())
    except Exception:
        return None


def compile_kernels() -> str:
    """Compile the CPU codec kernels a demo rank runs, or load them from numba's cache
    (``cache=True``: in ``__pycache__`` next to their sources, or ``NUMBA_CACHE_DIR``).

    Two fake ranks in this process (threads over :class:`qoda_hvd.comm.local.LocalGroup`)
    train the demo's model for 2 steps with one codec thread each, as a launched rank does,
    through ``rans`` and ``fixed`` coding: every kernel and argument type of a demo step.
    ``launch/install.sh`` calls it, so a first ``make demo`` does not spend its first step
    compiling. Seconds when cached.

    Returns:
        The directories of the kernels' cache, joined by ``os.pathsep`` ("" when numba does
        not say).

    Example::

        >>> compile_kernels()  # doctest: +SKIP
        '/src/qoda_hvd/coding/__pycache__:/src/qoda_hvd/kernels/__pycache__'
    """
    import threading

    import qoda_hvd
    from qoda_hvd.comm.local import LocalGroup

    errors: list[BaseException] = []

    def rank(comm, coding: str) -> None:
        try:
            torch.manual_seed(0)
            model = build_model()
            compression = qoda_hvd.Compression.layerwise(bits=4, coding=coding, types=model,
                                                         threads=1)
            opt = qoda_hvd.DistributedOptimizer(qoda_hvd.QODA(model.parameters(), lr=0.1),
                                                named_parameters=model.named_parameters(),
                                                compression=compression, communicator=comm)
            gen = torch.Generator().manual_seed(comm.rank)
            for _ in range(2):
                opt.zero_grad()
                model(torch.randn(64, 32, generator=gen)).square().mean().backward()
                opt.step()
        except BaseException as e:  # re-raised below, in the caller's thread
            errors.append(e)

    for coding in ("rans", "fixed"):
        threads = [threading.Thread(target=rank, args=(comm, coding)) for comm in LocalGroup(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    try:
        return os.pathsep.join(sorted({str(d._cache._cache_path) for d in _kernel_dispatchers()}))
    except Exception:  # numba's internals moved
        return ""


@dataclass(frozen=True)
class Method:
    """One way to exchange gradients: its table label and how to wrap the optimizer."""

    label: str
    build: Callable  # (hvd, model, optimizer, args) -> distributed optimizer
    horovod: bool    # Horovod's own wrapper: bytes are not counted by it


def _horovod(compression: str) -> Callable:
    def build(hvd, model, base, args):
        comp = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}[compression]
        return hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                        compression=comp)
    return build


def _qoda_layerwise(hvd, model, base, args):
    import qoda_hvd

    comp = qoda_hvd.Compression.layerwise(bits=args.bits, coding=args.coding, types=model,
                                          bandwidth=args.link_bytes_per_s)
    return qoda_hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                         compression=comp, exchange=args.exchange)


def _qoda_uncompressed(hvd, model, base, args):
    import qoda_hvd

    return qoda_hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                         compression=qoda_hvd.Compression.none,
                                         exchange=args.exchange)


#: What ``--methods`` accepts, in the order the table lists them by default.
METHODS: dict[str, Method] = {
    "horovod-fp32": Method("Horovod fp32 allreduce", _horovod("none"), True),
    "horovod-fp16": Method("Horovod fp16 allreduce", _horovod("fp16"), True),
    "qoda": Method("qoda_hvd layer-wise {bits}-bit", _qoda_layerwise, False),
    "qoda-none": Method("qoda_hvd uncompressed", _qoda_uncompressed, False),
}
DEFAULT_METHODS = ("horovod-fp32", "qoda")


@dataclass
class RunResult:
    """What one run measured (rank 0's view of all ranks)."""

    name: str
    label: str
    loss: float                 # held-out cross-entropy of the final model
    loss_se: float              # its standard error over the held-out samples
    ms_per_step: float          # median step time of the slowest rank
    seconds: float              # sum of step times, slowest rank
    bytes_sent: float           # per rank, mean over ranks
    bytes_how: str              # how bytes_sent was obtained
    bits: Optional[float] = None  # qoda_hvd: encoded bits per coordinate
    extra: dict = field(default_factory=dict)
    # Rank 0's curves for `qoda-hvd plot`: step, its training loss, the MB it sent so far
    # (counted by qoda_hvd, or computed for Horovod's allreduce as in bytes_how).
    series: dict = field(default_factory=dict)


_PHASES = ("time_quantize_s", "time_encode_s", "time_exchange_s", "time_decode_s")


def _wire_tx_bytes() -> Optional[int]:
    # On the emulated cluster every rank owns a network namespace whose only link is eth0, so
    # its transmit counter is exactly this rank's traffic (TCP/IP headers included).
    try:
        return int(Path("/sys/class/net/eth0/statistics/tx_bytes").read_text())
    except (OSError, ValueError):
        return None


def _ring_allreduce_bytes(numel: int, size: int, width: int) -> float:
    # What a ring allreduce sends per rank: 2 (K-1)/K of the buffer. Horovod counts no bytes.
    return 2.0 * (size - 1) / size * numel * width


def run_method(name: str, hvd, args, teacher: nn.Module,
               eval_set: tuple[torch.Tensor, torch.Tensor]) -> Optional[RunResult]:
    """Train one run of ``args.steps`` steps; rank 0 gets the result, other ranks None."""
    import qoda_hvd
    from tqdm import tqdm

    method = METHODS[name]
    label = method.label.format(bits=args.bits)
    rank, size = hvd.rank(), hvd.size()
    with torch.random.fork_rng():
        # The same initial student in every run and on every rank (not the teacher's seed).
        torch.manual_seed(args.seed + 1)
        model = build_model(hidden=args.hidden)
    data_gen = torch.Generator().manual_seed(1000 + rank)  # this rank's shard, same every run
    base = qoda_hvd.QODA(model.parameters(), lr=args.lr)
    optimizer = method.build(hvd, model, base, args)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    loss_fn = nn.CrossEntropyLoss()
    stats0 = last = None if method.horovod else optimizer.compression_stats()
    phases: list[list[float]] = []
    hvd.barrier()
    wire = args.link is not None  # eth0 is this rank's own link only on the emulated cluster
    wire0 = _wire_tx_bytes() if wire else None
    times, losses, sent_mb = [], [], []
    ring_mb = (_ring_allreduce_bytes(sum(p.numel() for p in model.parameters()), size,
                                     2 if name == "horovod-fp16" else 4) / 1e6)
    bar = tqdm(range(args.steps), disable=rank != 0, unit="step", mininterval=1.0,
               desc=f"{args.run_index}/{args.run_count} {label}", dynamic_ncols=True)
    for _ in bar:
        x, y = make_batch(teacher, args.batch, data_gen)
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        if stats0 is not None:  # per-step phase times, read outside the timed part
            now = optimizer.compression_stats()
            phases.append([now[k] - last[k] for k in _PHASES])
            last = now
            sent_mb.append((now["bytes_sent"] - stats0["bytes_sent"]) / 1e6)
        else:
            sent_mb.append(ring_mb * len(times))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    bar.close()
    wire1 = _wire_tx_bytes() if wire else None
    with torch.no_grad():
        per_sample = nn.functional.cross_entropy(model(eval_set[0]), eval_set[1], reduction="none")
    numel = sum(p.numel() for p in model.parameters())
    mine = {"median": statistics.median(times), "total": sum(times),
            "wire": None if wire0 is None or wire1 is None else wire1 - wire0}
    if method.horovod:
        width = 2 if name == "horovod-fp16" else 4
        mine["logical"] = _ring_allreduce_bytes(numel, size, width) * args.steps
        how = f"computed as a ring allreduce moves {8 * width}-bit values"
        bits = 8.0 * width
    else:
        stats = optimizer.compression_stats()
        mine["logical"] = stats["bytes_sent"] - stats0["bytes_sent"]
        # Medians per step, like the step time (the first steps compile the codec kernels).
        mine["phases_ms"] = {k[5:-2]: 1e3 * statistics.median(p[i] for p in phases)
                             for i, k in enumerate(_PHASES)}
        how = "counted by qoda_hvd's communicator"
        bits = stats["bits_per_coordinate"] if name == "qoda" else 32.0
    everyone = hvd.allgather_object(mine)
    if rank != 0:
        return None
    wires = [r["wire"] for r in everyone]
    if all(w is not None for w in wires):
        sent = sum(wires) / len(wires)
        how = "measured at each node's eth0 (TCP/IP headers and MPI's own traffic included)"
    else:
        sent = sum(r["logical"] for r in everyone) / len(everyone)
    return RunResult(
        name=name, label=label, loss=per_sample.mean().item(),
        loss_se=(per_sample.std() / math.sqrt(per_sample.numel())).item(),
        ms_per_step=1e3 * max(r["median"] for r in everyone),
        seconds=max(r["total"] for r in everyone), bytes_sent=sent, bytes_how=how, bits=bits,
        extra={"logical_bytes": sum(r["logical"] for r in everyone) / len(everyone),
               "phases_ms": [r.get("phases_ms") for r in everyone]},
        series={"step": list(range(1, args.steps + 1)), "loss": losses, "mb_sent": sent_mb})


def summary_line(result: RunResult, size: int, steps: int) -> str:
    """One line per run, as rank 0 prints it when the run ends.

    Example::

        >>> r = RunResult("qoda", "qoda_hvd layer-wise 4-bit", 0.8355, 0.01, 22.7, 6.8, 9.51e6,
        ...               "counted", 3.31)
        >>> summary_line(r, 2, 300)
        'demo: qoda, 2 ranks, 300 steps, final loss 0.8355, 6.8 s, 9.51 MB sent per rank (counted, 3.31 bits/coordinate)'
    """
    bits = "" if result.bits is None else f", {result.bits:.2f} bits/coordinate"
    return (f"demo: {result.name}, {size} ranks, {steps} steps, final loss {result.loss:.4f}, "
            f"{result.seconds:.1f} s, {result.bytes_sent / 1e6:.2f} MB sent per rank "
            f"({result.bytes_how}{bits})")


def format_table(results: Sequence[RunResult], *, size: int, steps: int, batch: int,
                 model_desc: str, link: Optional[str], unshaped_reason: Optional[str]) -> str:
    """The comparison rank 0 prints at the end: one row per run, speedup against the first.

    Example::

        >>> a = RunResult("horovod-fp32", "Horovod fp32 allreduce", 0.84, 0.01, 7.0, 2.1, 90e6, "x")
        >>> b = RunResult("qoda", "qoda_hvd layer-wise 4-bit", 0.84, 0.01, 3.5, 1.0, 9e6, "y", 3.3)
        >>> print(format_table([a, b], size=2, steps=300, batch=64, model_desc="MLP",
        ...                    link="1gbit", unshaped_reason=None))  # doctest: +ELLIPSIS
        ==...
        method                      final loss  MB sent/rank  ms/step  speedup
        Horovod fp32 allreduce          0.8400         90.00     7.00    1.00x
        qoda_hvd layer-wise 4-bit       0.8400          9.00     3.50    2.00x
        ...
    """
    base = results[0]
    rule = "=" * 74
    if link:
        where = f"link: {link} each way, emulated ({size} network namespaces behind tc tbf-shaped links)"
    else:
        where = "link: none shaped (local ranks, Open MPI shared memory)"
    lines = [rule, f"qoda_hvd demo: {size} ranks, {steps} steps of batch {batch} per rank, "
                   f"{model_desc}, QODA in every run", where, "",
             f"{'method':<27} {'final loss':>10} {'MB sent/rank':>13} {'ms/step':>8} {'speedup':>8}"]
    for r in results:
        lines.append(f"{r.label:<27} {r.loss:>10.4f} {r.bytes_sent / 1e6:>13.2f} "
                     f"{r.ms_per_step:>8.2f} {base.ms_per_step / r.ms_per_step:>7.2f}x")
    se = max(r.loss_se for r in results)
    lines += ["", f"final loss: cross-entropy of the trained model on {EVAL_SAMPLES:,} held-out "
                  f"samples (standard error {se:.4f})"]
    for r in results[1:]:
        d = r.loss - base.loss
        noise = "within noise" if abs(d) < 2 * se else "more than 2 standard errors"
        lines.append(f"  {r.label} vs {base.label}: {d:+.4f} ({noise})")
    lines.append("MB sent/rank: what one rank sent during the training steps")
    for r in _unique_how(results):
        lines.append(f"  {r.bytes_how}" if len(_unique_how(results)) == 1 else
                     f"  {r.label}: {r.bytes_how}")
    for r in results[1:]:
        ratio = base.bytes_sent / r.bytes_sent if r.bytes_sent else float("inf")
        bits = "" if r.bits is None else f" ({r.bits:.2f} bits/coordinate)"
        lines.append(f"  {r.label}: {ratio:.1f}x fewer bytes than {base.label}{bits}")
    lines.append(f"ms/step: median over the steps of the slower rank; speedup: {base.label}'s "
                 f"ms/step / the row's")
    if not link:
        why = f" ({unshaped_reason})" if unshaped_reason else ""
        note = (f"No shaped link was available{why}: the ranks exchanged through shared "
                f"memory, where communication costs almost nothing, so the time column favours "
                f"fp32: qoda_hvd's quantize, encode and decode CPU time is pure overhead there. "
                f"As root, `qoda-hvd demo` runs both on an emulated link (--bandwidth).")
        lines += [""] + textwrap.wrap(note, width=len(rule))
    lines.append(rule)
    return "\n".join(lines)


def _unique_how(results: Sequence[RunResult]) -> list[RunResult]:
    seen, out = set(), []
    for r in results:  # one line per way of counting, in row order
        if r.bytes_how not in seen:
            seen.add(r.bytes_how)
            out.append(r)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The demo's command line (``python -m qoda_hvd.demo --help``).

    Example::

        >>> build_parser().parse_args(["--steps", "30"]).methods
        ['horovod-fp32', 'qoda']
    """
    parser = argparse.ArgumentParser(prog="qoda_hvd.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(DEFAULT_METHODS),
                        metavar="METHOD",
                        help=f"runs, in order; the first is the speedup baseline (default "
                             f"{' '.join(DEFAULT_METHODS)}; choices {', '.join(METHODS)})")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    parser.add_argument("--batch", type=int, default=64, help="per-rank batch size (default 64)")
    parser.add_argument("--hidden", type=int, default=256,
                        help="hidden width of the MLP (default 256: 76k parameters)")
    parser.add_argument("--lr", type=float, default=1.0, help="QODA learning rate (default 1.0)")
    parser.add_argument("--bits", type=int, default=4, help="layer-wise bits per symbol, 2-8 (default 4)")
    parser.add_argument("--coding", default="auto", choices=CODINGS,
                        help="entropy coder of the symbols (default auto: cheapest per layer type)")
    parser.add_argument("--exchange", default="auto", choices=EXCHANGES,
                        help="how compressed payloads are exchanged (default auto: by rank count)")
    parser.add_argument("--seed", type=int, default=0, help="seed of teacher and init (default 0)")
    parser.add_argument("--link", default=None, metavar="RATE",
                        help="rate of the shaped link the ranks run behind (tc style, e.g. 1gbit); "
                             "set by `qoda-hvd demo` on the emulated cluster. It labels the table "
                             "and tells coding='auto' the bandwidth")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write every run's figures and per-step curves to PATH (rank 0); "
                             "`qoda-hvd plot PATH` draws them")
    parser.add_argument("--unshaped-reason", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Train each method in turn on this rank; rank 0 shows progress and prints the table."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for opt, low in (("steps", 1), ("batch", 1), ("hidden", 1)):
        if getattr(args, opt) < low:
            parser.error(f"--{opt} must be >= {low}, got {getattr(args, opt)}")
    if len(set(args.methods)) != len(args.methods):
        parser.error(f"--methods names a method twice: {' '.join(args.methods)}")
    args.link_bytes_per_s = None
    if args.link:
        from qoda_hvd.cluster.emulator import parse_rate

        try:
            args.link_bytes_per_s = parse_rate(args.link) / 8
        except (TypeError, ValueError) as e:
            parser.error(f"--link: {e}")

    import horovod.torch as hvd

    hvd.init()
    torch.set_num_threads(1)
    rank, size = hvd.rank(), hvd.size()
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        teacher = build_model()  # the task; its own seed, so --hidden does not change it
    eval_set = make_batch(teacher, EVAL_SAMPLES, torch.Generator().manual_seed(args.seed + 99_991))
    results = []
    if rank == 0 and any(not METHODS[m].horovod for m in args.methods) and kernels_cached() is False:
        print("[demo] numba compiles qoda_hvd's CPU codec kernels in the first qoda_hvd step "
              "(once, about 20 s; then cached; `make setup` does it ahead)", flush=True)
    args.run_count = len(args.methods)
    for i, name in enumerate(args.methods, start=1):
        args.run_index = i
        result = run_method(name, hvd, args, teacher, eval_set)
        if rank == 0:
            results.append(result)
            print(summary_line(result, size, args.steps), flush=True)
    if rank == 0:
        numel = sum(p.numel() for p in build_model(hidden=args.hidden).parameters())
        desc = f"MLP 32-{args.hidden}-{args.hidden}-8 ({numel:,} parameters)"
        print(format_table(results, size=size, steps=args.steps, batch=args.batch,
                           model_desc=desc, link=args.link,
                           unshaped_reason=args.unshaped_reason), flush=True)
        if args.json is not None:
            meta = {"ranks": size, "steps": args.steps, "batch": args.batch,
                    "hidden": args.hidden, "parameters": numel, "link": args.link,
                    "unshaped_reason": args.unshaped_reason, "bits": args.bits,
                    "coding": args.coding, "exchange": args.exchange, "seed": args.seed}
            args.json.write_text(json.dumps({"meta": meta, "runs": [asdict(r) for r in results]},
                                            indent=1))
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
