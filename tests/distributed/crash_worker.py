"""A job where rank 1 raises mid-training while rank 0 waits in the exchange.

Used by tests/test_rank_failure.py: the launcher must end the job (non-zero) instead of leaving
rank 0 blocked in a collective forever. With the argument ``overlap``, rank 1 raises in the
middle of its backward pass, after its first bucket's allgather was started from the hooks.
"""
from __future__ import annotations

import sys

import horovod.torch as hvd
import torch
from torch import nn

import qoda_hvd


def main() -> None:
    overlap = sys.argv[1:] == ["overlap"]
    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    opt = qoda_hvd.DistributedOptimizer(qoda_hvd.QODA(model.parameters()),
                                        model.named_parameters(),
                                        compression=qoda_hvd.Compression.layerwise(
                                            min_numel=16, types={"2.weight": "head"}),
                                        overlap=overlap)
    for step in range(3):
        opt.zero_grad()
        hidden = model[1](model[0](torch.randn(8, 64)))
        if overlap and hvd.rank() == 1 and step == 2:  # step 2: no level update, overlapped

            def fail(grad):
                # the head's bucket must really be in flight here, or the test proves nothing
                in_flight = opt._exchange.rounds.started
                raise RuntimeError(f"rank 1 fails on purpose (mid-backward, {in_flight} "
                                   "bucket(s) in flight)")

            hidden.register_hook(fail)  # after the last layer's gradients, before the first's
        model[2](hidden).sum().backward()
        if not overlap and hvd.rank() == 1 and step == 1:
            raise RuntimeError("rank 1 fails on purpose")
        opt.step()
    print("rank", hvd.rank(), "finished (must not happen on every rank)", flush=True)


if __name__ == "__main__":
    main()
