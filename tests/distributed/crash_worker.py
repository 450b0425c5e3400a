"""A job where rank 1 raises mid-training while rank 0 waits in the exchange.

Used by tests/test_rank_failure.py: the launcher must end the job (non-zero) instead of leaving
rank 0 blocked in a collective forever.
"""
from __future__ import annotations

import horovod.torch as hvd
import torch
from torch import nn

import qoda_hvd


def main() -> None:
    hvd.init()
    torch.set_num_threads(1)
    model = nn.Linear(64, 64)
    opt = qoda_hvd.DistributedOptimizer(qoda_hvd.QODA(model.parameters()),
                                        model.named_parameters(),
                                        compression=qoda_hvd.Compression.layerwise(min_numel=16))
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(8, 64)).sum().backward()
        if hvd.rank() == 1 and step == 1:
            raise RuntimeError("rank 1 fails on purpose")
        opt.step()
    print("rank", hvd.rank(), "finished (must not happen on every rank)", flush=True)


if __name__ == "__main__":
    main()
