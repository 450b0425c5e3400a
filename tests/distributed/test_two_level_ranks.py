"""The two-level exchange on real ranks laid out as 2 nodes x 2 ranks.

Launched by tests/test_distributed.py (``horovodrun --gloo -np 4 -H localhost:2,127.0.0.1:2``,
with dynamic process sets: the node groups are Horovod process sets) and tests/test_emulator.py
(``mpirun`` on the emulated cluster, 2 nodes x 2 ranks, as root: groups over the global
alltoall).
Under any other layout (the 2-rank suites) every test here skips, on every rank alike.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import qoda_hvd
from qoda_hvd.optim import QODA

LAYERWISE = dict(bits=4, min_numel=256, bucket_size=128)


@pytest.fixture
def two_by_two(hvd):
    if (hvd.size(), hvd.local_size(), hvd.cross_size()) != (4, 2, 2):
        pytest.skip(f"needs 2 nodes x 2 ranks (this job: {hvd.size()} ranks, local_size "
                    f"{hvd.local_size()}, cross_size {hvd.cross_size()})")
    return hvd


def make_model():
    torch.manual_seed(0)
    # sizes that divide neither by the 2 ranks of a node nor by the bucket
    return nn.Sequential(nn.Linear(17, 61), nn.ReLU(), nn.Linear(61, 37), nn.ReLU(),
                         nn.Linear(37, 3))


def train(hvd, steps, **kwargs):
    model = make_model()
    opt = qoda_hvd.DistributedOptimizer(QODA(model.parameters(), lr=0.05),
                                        model.named_parameters(), overlap=False, **kwargs)
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * hvd.rank() + step)
        x, y = torch.randn(16, 17, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def assert_identical_across_ranks(hvd, model):
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = hvd.allgather(flat.unsqueeze(0), name="check.two_level")
    for r in range(1, hvd.size()):
        assert torch.equal(everyone[0], everyone[r]), f"rank {r} differs from rank 0"


def test_topology_is_two_nodes_of_two(two_by_two):
    from qoda_hvd.comm import HorovodCommunicator
    from qoda_hvd.comm.topology import detect_topology

    topo = detect_topology(HorovodCommunicator())
    assert topo.describe() == "2 nodes x 2 ranks (horovod)"
    assert topo.local_rank == two_by_two.local_rank() and topo.node == two_by_two.cross_rank()


def test_auto_runs_two_levels_bit_identical_with_the_expected_bytes(two_by_two):
    hvd, steps = two_by_two, 4
    model, opt = train(hvd, steps, compression=qoda_hvd.Compression.layerwise(**LAYERWISE))
    assert_identical_across_ranks(hvd, model)
    st = opt.compression_stats()
    assert st["strategy"] == "hierarchical" and st["exchanges"] == steps
    ex = opt._exchange
    # the node-local group: a Horovod process set when dynamic process sets are on (the gloo
    # launch sets HOROVOD_DYNAMIC_PROCESS_SETS=1), else a group over the global alltoall
    dynamic = os.environ.get("HOROVOD_DYNAMIC_PROCESS_SETS", "0") not in ("", "0")
    assert type(ex.reduction.local).__name__ == ("HorovodCommunicator" if dynamic
                                                 else "SubsetCommunicator")
    extra = ex.topology_stats()
    # between nodes (M = 2: allgather of each shard's payload to the one peer node): exactly
    # the payloads this rank encoded
    assert extra["inter_node_bytes_sent"] == ex.stats.encoded_bytes > 0
    # inside the node (L = 2), per step: the reduce-scatter sends the peer's float32 shard, the
    # allgather this rank's: 4 bytes x every coordinate
    n = sum(p.numel() for p in model.parameters())
    assert extra["intra_node_bytes_sent"] == steps * 4 * n
    # far fewer bytes between nodes than float32 would need (4 bits + norms and headers)
    assert extra["inter_node_bytes_sent"] < steps * 4 * n / 4


def test_mpi4py_groups_give_the_same_run(two_by_two):
    if "OMPI_COMM_WORLD_SIZE" not in os.environ:
        pytest.skip("mpi4py needs an MPI launcher (horovodrun --gloo starts no MPI job)")
    from qoda_hvd.comm import MPICommunicator

    comp = qoda_hvd.Compression.layerwise(**LAYERWISE)
    m_hvd, _ = train(two_by_two, 3, compression=comp, exchange="hierarchical")
    m_mpi, opt = train(two_by_two, 3, compression=comp, exchange="hierarchical",
                       communicator=MPICommunicator())
    assert opt.compression_stats()["strategy"] == "hierarchical"
    assert opt._exchange.topology_stats()["topology"] == "2 nodes x 2 ranks (mpi)"
    for a, b in zip(m_hvd.parameters(), m_mpi.parameters()):
        assert torch.equal(a, b)
