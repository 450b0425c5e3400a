"""Low-rank gradient compression (PowerSGD) with layer-wise ranks (L-GreCo), as math only.

Free of communication: nothing here imports horovod, mpi4py or torch.distributed. The
exchange (:mod:`qoda_hvd.comm.lowrank`) owns the two allreduces of each step and the one small
allreduce of the error table on the steps that re-run the rank choice.

- :mod:`~qoda_hvd.lowrank.power`: batched orthonormalisation (with an epsilon), seeded Q,
  spectrum errors of candidate ranks;
- :mod:`~qoda_hvd.lowrank.powersgd`: :class:`LowRankCore`, the buffers and kernels of one step
  (error feedback, warm start, P = M Q, Q = M^T P, M ~ P Q^T);
- :mod:`~qoda_hvd.lowrank.lgreco`: candidate ranks and L-GreCo's dynamic program.
"""
from __future__ import annotations

from qoda_hvd.lowrank.lgreco import DEFAULT_BUCKETS, candidate_ranks, lgreco_dp
from qoda_hvd.lowrank.power import mix_seed, orthonormalize_, seeded_normal, spectrum_errors
from qoda_hvd.lowrank.powersgd import LowRankCore, MatrixSpec, should_compress

__all__ = [
    "DEFAULT_BUCKETS",
    "LowRankCore",
    "MatrixSpec",
    "candidate_ranks",
    "lgreco_dp",
    "mix_seed",
    "orthonormalize_",
    "seeded_normal",
    "should_compress",
    "spectrum_errors",
]
