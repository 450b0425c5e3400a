"""Elastic, fault-tolerant training with qoda_hvd.DistributedOptimizer and Horovod Elastic.

The model, the optimizer (its state: QODA's dual sum and anchor, Adam's moments) and the
exchange's state (its step, which seeds the rounding noise, the level tables, automatic layer
types, the fallback's choice) live in one ``hvd.elastic.TorchState``, committed every
``--commit-every`` steps. When a worker dies, the others roll back to the last commit, Horovod
re-forms the ring without it, and training goes on; a worker that joins gets everything by
broadcast. The optimizer re-forms its exchange for the new number of ranks and rank by itself
(strategy, chunking, rank-keyed noise), with no reset callback to register.

Launch on one machine (a discovery script lists the hosts and their slots; a host that fails is
left out, so each slot here gets a host name of its own, all of them this machine)::

    printf '#!/bin/sh\\nprintf "localhost:1\\\\n127.0.0.1:1\\\\n%%s:1\\\\n" "$(hostname)"\\n' > discover.sh
    chmod +x discover.sh
    horovodrun --gloo -np 3 --min-np 2 --max-np 3 --host-discovery-script ./discover.sh \\
        python examples/elastic.py --steps 100 --commit-every 5

``--config NAME:OPTIMIZER:COMPRESSION[:EXCHANGE]`` (repeatable) trains several models side by
side on the same batches, one per combination. ``--kill-at-step S --kill-rank R`` makes rank R
of a ring of ``--kill-size`` workers kill itself (SIGKILL) at step S, to see a failure.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Optional, Sequence

import torch
from torch import nn

import qoda_hvd

OPTIMIZERS = {
    "qoda": lambda params, lr: qoda_hvd.QODA(params, lr=lr),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr / 10),
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
}
COMPRESSIONS = ("none", "fp16", "layerwise")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elastic.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", action="append", default=None,
                        help="NAME:OPTIMIZER:COMPRESSION[:EXCHANGE], OPTIMIZER in "
                             f"{', '.join(OPTIMIZERS)}, COMPRESSION in {', '.join(COMPRESSIONS)}, "
                             "EXCHANGE in auto, allgather, scatter_gather (default main:qoda:layerwise)")
    parser.add_argument("--steps", type=int, default=100, help="training steps in all")
    parser.add_argument("--commit-every", type=int, default=5,
                        help="steps between commits (a failure rolls back to the last one)")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate (Adam takes lr/10)")
    parser.add_argument("--bits", type=int, default=4, help="bits per symbol of layer-wise compression")
    parser.add_argument("--seed", type=int, default=0, help="model and data seed")
    parser.add_argument("--step-sleep", type=float, default=0.0,
                        help="seconds to wait after each step (to watch a join or a failure)")
    parser.add_argument("--log-dir", default=None,
                        help="where each process appends its steps as JSON lines (pid<PID>.jsonl)")
    parser.add_argument("--out", default=None,
                        help="directory for each final rank's parameters (rank<R>.pt)")
    parser.add_argument("--kill-at-step", type=int, default=-1, help="fault injection: the step")
    parser.add_argument("--kill-rank", type=int, default=-1, help="fault injection: the rank")
    parser.add_argument("--kill-size", type=int, default=0,
                        help="fault injection: only in a ring of this many workers (so it happens once)")
    return parser


def parse_configs(specs: Optional[Sequence[str]]) -> list[tuple[str, str, str, str]]:
    """``NAME:OPTIMIZER:COMPRESSION[:EXCHANGE]`` strings -> tuples, checked.

    Example::

        >>> parse_configs(["a:qoda:layerwise:scatter_gather"])
        [('a', 'qoda', 'layerwise', 'scatter_gather')]
    """
    out = []
    for spec in specs or ["main:qoda:layerwise"]:
        parts = spec.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"--config must be NAME:OPTIMIZER:COMPRESSION[:EXCHANGE], got {spec!r}")
        name, opt, comp, exchange = (parts + ["auto"])[:4]
        if opt not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {opt!r}")
        if comp not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {comp!r}")
        out.append((name, opt, comp, exchange))
    if len({c[0] for c in out}) != len(out):
        raise ValueError("--config names must be unique")
    return out


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def batch(seed: int, rank: int, step: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch at this step (a fixed learnable rule: the class of 8 linear scores)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + step)
    x = torch.randn(n, 32, generator=g)
    return x, (x[:, :8] * 2 + x[:, 8:16]).argmax(dim=1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    configs = parse_configs(args.config)
    import horovod.torch as hvd

    torch.set_num_threads(1)
    hvd.init()
    log = None
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
        log = open(os.path.join(args.log_dir, f"pid{os.getpid()}.jsonl"), "a", buffering=1)

    models, opts = {}, {}
    for name, opt_name, comp_name, exchange in configs:
        model = make_model(args.seed)
        if comp_name == "layerwise":
            comp = qoda_hvd.Compression.layerwise(bits=args.bits, min_numel=256, coding="ans",
                                                  schedule=(0, 10))
        else:
            comp = getattr(qoda_hvd.Compression, comp_name)
        opt = qoda_hvd.DistributedOptimizer(OPTIMIZERS[opt_name](model.parameters(), args.lr),
                                            named_parameters=model.named_parameters(),
                                            compression=comp, exchange=exchange)
        models[name], opts[name] = model, opt
    # Everything a lost worker's peers roll back to, and a new worker receives.
    state = hvd.elastic.TorchState(step=0, **{f"model_{n}": m for n, m in models.items()},
                                   **{f"optimizer_{n}": o for n, o in opts.items()})

    @hvd.elastic.run
    def train(state):
        while state.step < args.steps:
            rank, size = hvd.rank(), hvd.size()
            if (state.step == args.kill_at_step and rank == args.kill_rank
                    and size == args.kill_size):
                os.kill(os.getpid(), signal.SIGKILL)  # a lost worker, mid-exchange for its peers
            x, y = batch(args.seed, rank, state.step)
            losses = {}
            for name, model in models.items():
                opts[name].zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opts[name].step()
                losses[name] = loss.item()
            if log is not None:
                log.write(json.dumps({"rank": rank, "size": size, "step": state.step,
                                      "losses": losses, "time": time.time()}) + "\n")
            if rank == 0 and state.step % 10 == 0:
                print(f"step {state.step} size {size} " + " ".join(
                    f"{n}={v:.4f}" for n, v in losses.items()), flush=True)
            state.step += 1
            if state.step % args.commit_every == 0:
                state.commit()
            if args.step_sleep:
                time.sleep(args.step_sleep)

    train(state)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        torch.save({"size": hvd.size(), "step": state.step,
                    "params": {n: [p.detach() for p in m.parameters()] for n, m in models.items()},
                    "stats": {n: o.compression_stats() for n, o in opts.items()}},
                   os.path.join(args.out, f"rank{hvd.rank()}.pt"))
    if log is not None:
        log.write(json.dumps({"rank": hvd.rank(), "size": hvd.size(), "done": state.step}) + "\n")
    if hvd.rank() == 0:
        print(f"done: {state.step} steps on {hvd.size()} workers", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
