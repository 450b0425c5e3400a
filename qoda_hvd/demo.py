"""The main job: a small built-in problem trained data-parallel on every rank, by default with
QODA and layer-wise, entropy-coded gradient compression through qoda_hvd.DistributedOptimizer.

Run it through the launcher (``qoda-hvd demo`` or ``make demo``); started by hand it runs one
rank. Rank ``k`` draws its own shard of a synthetic teacher-student classification task, so the
ranks really do disagree on gradients and the exchange matters.

Horovod is imported here because this module is an application, not part of the library core.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["build_model", "make_batch", "main"]


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


def _horovod_sgd(hvd, model: nn.Module, args) -> torch.optim.Optimizer:
    """The baseline: Horovod's own DistributedOptimizer (allreduce) around momentum SGD."""
    if args.compression == "layerwise":
        raise SystemExit("--optimizer horovod-sgd takes --compression none or fp16 (layer-wise "
                         "compression saves bandwidth only through qoda_hvd.DistributedOptimizer)")
    compression = {"none": hvd.Compression.none, "fp16": hvd.Compression.fp16}[args.compression]
    base = torch.optim.SGD(model.parameters(), lr=args.lr or 0.05, momentum=0.9)
    return hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                    compression=compression)


def _qoda(hvd, model: nn.Module, args) -> torch.optim.Optimizer:
    """QODA through qoda_hvd.DistributedOptimizer: one (compressed) exchange per step."""
    import qoda_hvd

    compression = {"none": qoda_hvd.Compression.none, "fp16": qoda_hvd.Compression.fp16}.get(
        args.compression)
    if compression is None:
        compression = qoda_hvd.Compression.layerwise(bits=args.bits, coding=args.coding)
    return qoda_hvd.DistributedOptimizer(qoda_hvd.QODA(model.parameters(), lr=args.lr or 1.0),
                                         named_parameters=model.named_parameters(),
                                         compression=compression, exchange=args.exchange)


def _wire_bytes_ring(model: nn.Module, size: int, bytes_per_value: int) -> float:
    # A ring allreduce sends 2 (K-1)/K of the buffer per rank; Horovod does not count bytes itself.
    d = sum(p.numel() for p in model.parameters())
    return 2.0 * (size - 1) / size * d * bytes_per_value


#: How each ``--optimizer`` choice builds its distributed optimizer.
OPTIMIZERS: dict[str, Callable] = {"qoda": _qoda, "horovod-sgd": _horovod_sgd}


def main(argv: Sequence[str] | None = None) -> int:
    """Train the demo problem on this rank; rank 0 shows progress and prints the summary."""
    parser = argparse.ArgumentParser(prog="qoda_hvd.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--batch", type=int, default=64, help="per-rank batch size (default 64)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default 1.0 for qoda, 0.05 for horovod-sgd)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="qoda",
                        help="qoda: QODA through qoda_hvd.DistributedOptimizer (default); "
                             "horovod-sgd: momentum SGD through Horovod's allreduce (baseline)")
    parser.add_argument("--compression", choices=["layerwise", "none", "fp16"], default="layerwise",
                        help="gradient compression (default layerwise: quantized + entropy coded)")
    parser.add_argument("--bits", type=int, default=4, help="layer-wise bits per symbol, 2-8 (default 4)")
    parser.add_argument("--coding", default="auto", choices=["auto", "ans", "elias", "fixed", "zstd"],
                        help="entropy coder of the symbols (default auto: cheapest per layer type)")
    parser.add_argument("--exchange", default="auto", choices=["auto", "allgather", "scatter_gather"],
                        help="how compressed payloads are exchanged (default auto: by rank count)")
    parser.add_argument("--seed", type=int, default=0, help="seed of teacher and init (default 0)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")

    import horovod.torch as hvd
    from tqdm import tqdm

    hvd.init()
    torch.set_num_threads(1)
    rank, size = hvd.rank(), hvd.size()
    torch.manual_seed(args.seed)  # same teacher and initial student on every rank
    teacher, model = build_model(), build_model()
    data_gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard
    optimizer = OPTIMIZERS[args.optimizer](hvd, model, args)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    loss_fn = nn.CrossEntropyLoss()

    start = time.perf_counter()
    bar = tqdm(range(args.steps), disable=rank != 0, desc=f"demo {size} ranks", unit="step",
               mininterval=1.0)
    loss = torch.tensor(math.nan)
    for _ in bar:
        x, y = make_batch(teacher, args.batch, data_gen)
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    seconds = time.perf_counter() - start
    final = hvd.allreduce(loss.detach(), name="demo.final_loss").item()
    if hasattr(optimizer, "compression_stats"):
        stats = optimizer.compression_stats()
        sent, how = stats["bytes_sent"], "measured"
        if args.compression == "layerwise":
            how += f", {stats['bits_per_coordinate']:.2f} bits/coordinate, " \
                   f"{stats['ratio']:.1f}x smaller than fp32"
    else:
        sent = _wire_bytes_ring(model, size, 2 if args.compression == "fp16" else 4) * args.steps
        how = f"{args.compression} ring allreduce, computed"
    if rank == 0:
        print(f"demo: {args.optimizer}, {size} ranks, {args.steps} steps, final loss {final:.4f}, "
              f"{seconds:.1f} s, {sent / 1e6:.2f} MB sent per rank ({how})", flush=True)
    hvd.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
