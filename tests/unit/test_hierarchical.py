"""The two-level reduction on fake ranks placed on fake nodes (L ranks x M nodes)."""
from __future__ import annotations


import pytest
import torch

from qoda_hvd.comm import LocalGroup
from qoda_hvd.comm.codec import LayerwiseCodec
from qoda_hvd.comm.hierarchical import TwoLevelReduction, shard_bounds, two_level_allreduce_
from qoda_hvd.comm.stats import ExchangeStats
from qoda_hvd.comm.topology import detect_topology, node_communicators
from qoda_hvd.quant import LayerTyping, LayerwiseQuantizer

LAYOUTS = [(2, 2), (2, 3), (3, 2), (4, 2)]  # (L ranks per node, M nodes)
#: two layer types whose sizes divide neither by L nor by the bucket, and odd raw values
SIZES, RAW, BUCKET = (1000, 333), 7, 64


def run_nodes(L, M, fn, timeout=60.0):
    """``fn(rank, comm, local, cross)`` on L x M fake ranks (ranks 0..L-1 on node 0, ...)."""
    def work(r, comm):
        local, cross = node_communicators(comm, detect_topology(comm, environ={}))
        return fn(r, comm, local, cross)

    return LocalGroup(L * M, timeout=timeout, ranks_per_node=L).run(work)


def make_codec(rank, bits=4, seed=0):
    names = {f"t{i}": i for i in range(len(SIZES))}
    typing = LayerTyping(names, tuple(names), frozenset(), dict(zip(names, SIZES)))
    lq = LayerwiseQuantizer(typing, bits=bits, bucket_size=BUCKET, family="uniform")
    return LayerwiseCodec(lq, list(SIZES), rank=rank, seed=seed, coding="fixed")


def gradient(rank, integer=False):
    g = torch.Generator().manual_seed(1000 + rank)
    if integer:
        return ([torch.randint(-50, 50, (n,), generator=g).float() for n in SIZES],
                torch.randint(-50, 50, (RAW,), generator=g).float())
    return [torch.randn(n, generator=g) for n in SIZES], torch.randn(RAW, generator=g)


def test_shards_cut_at_bucket_boundaries():
    typed, raw = shard_bounds([1000, 333], [64, 64], 7, 3)
    assert typed == [[0, 320, 640, 1000], [0, 128, 256, 333]] and raw == [0, 2, 4, 7]
    assert all(b % 64 == 0 for e in typed for b in e[:-1])


@pytest.mark.parametrize("L, M", LAYOUTS)
def test_float32_path_is_the_exact_mean_on_integer_data(L, M):
    """Everything raw (the float32 path of all three stages): the exact float32 mean."""
    K = L * M

    def fn(r, comm, local, cross):
        typed, raw = gradient(r, integer=True)
        flat = torch.cat([*typed, raw])
        empty = [torch.zeros(0) for _ in SIZES]
        red = TwoLevelReduction(local, cross, [0, 0], [BUCKET, BUCKET], flat.numel())
        red(make_codec(r), comm, empty, flat, ExchangeStats(), divisor=K)
        return flat

    out = run_nodes(L, M, fn)
    total = sum(torch.cat([*t, w]) for t, w in (gradient(r, integer=True) for r in range(K)))
    for r in range(K):
        assert torch.equal(out[r], total / K), r  # integer sums are exact in float32


@pytest.mark.parametrize("L, M", LAYOUTS)
def test_bit_identical_on_every_rank_and_counted_per_group(L, M):
    K = L * M

    def fn(r, comm, local, cross):
        typed, raw = gradient(r)
        red = TwoLevelReduction(local, cross, SIZES, [BUCKET] * 2, RAW)
        st = ExchangeStats()
        red(make_codec(r), comm, typed, raw, st, divisor=K)
        return typed, raw, local.stats, cross.stats, comm.stats, st

    out = run_nodes(L, M, fn)
    for r in range(1, K):
        assert all(torch.equal(a, b) for a, b in zip(out[0][0], out[r][0])), r
        assert torch.equal(out[0][1], out[r][1])
    exact = sum(torch.cat([*t, w]) for t, w in (gradient(r) for r in range(K))) / K
    got = torch.cat([*out[0][0], out[0][1]])
    assert torch.allclose(got[-RAW:], exact[-RAW:], atol=1e-6)  # raw: float32 all the way
    assert (got[:-RAW] - exact[:-RAW]).abs().mean() < 0.5  # 4-bit noise, not garbage
    n = sum(SIZES) + RAW
    for r, (_, _, ls, cs, ps, st) in enumerate(out):
        # node stages: ONE reduce-scatter and ONE allgather, float32, over the node only
        assert (ls.collectives, ls.reducescatters, ls.allgathers) == (2, 1, 1)
        me = r % L
        elem_b, raw_b = shard_bounds(SIZES, [BUCKET] * 2, RAW, L)
        shard = [sum(e[j + 1] - e[j] for e in elem_b) + raw_b[j + 1] - raw_b[j] for j in range(L)]
        assert sum(shard) == n
        assert ls.bytes_sent == 4 * (n - shard[me]) + 4 * shard[me] * (L - 1)
        # cross stage: the flat strategy of M ranks (allgather for M = 2, else 2 collectives)
        assert cs.collectives == (1 if M == 2 else 2)
        assert ps.collectives == ls.collectives + cs.collectives
        assert ps.bytes_sent > ls.bytes_sent + cs.bytes_sent  # + the set-up agreement
        assert st.encoded_bytes > 0


@pytest.mark.parametrize("L, M", [(2, 2), (2, 3)])
def test_unbiased_over_seeds(L, M):
    """The mean over many independent rounding draws converges to the true mean."""
    K, draws = L * M, 150

    def fn(r, comm, local, cross):
        codec = make_codec(r, bits=2)
        red = TwoLevelReduction(local, cross, SIZES, [BUCKET] * 2, RAW)
        acc = [torch.zeros(n, dtype=torch.float64) for n in SIZES]
        sq = [torch.zeros(n, dtype=torch.float64) for n in SIZES]
        for step in range(draws):
            codec.step = step  # the noise is keyed by (seed, rank, step, phase)
            typed, raw = gradient(r)
            red(codec, comm, typed, raw, ExchangeStats(), divisor=K)
            for a, s, t in zip(acc, sq, typed):
                a.add_(t.double())
                s.add_(t.double().square())
        return acc, sq

    out = run_nodes(L, M, fn)
    exact = [sum(gradient(r)[0][i] for r in range(K)).double() / K for i in range(len(SIZES))]
    for acc, sq, ex in zip(out[0][0], out[0][1], exact):
        mean = acc / draws
        std = (sq / draws - mean.square()).clamp_min(0).sqrt()
        noisy = std > 1e-6  # (rarely rounded coordinates may not have moved in these draws)
        z = (mean - ex)[noisy] / (std[noisy] / draws ** 0.5)
        # z-scores of an unbiased mean: centred on 0 with unit spread (a biased reduction
        # shifts them all; one skewed Bernoulli coordinate may lie far out, so no max test)
        assert abs(float(z.mean())) < 0.2 and 0.8 < float(z.square().mean().sqrt()) < 1.25, z
        total = (mean - ex)[noisy].sum() / (std[noisy].square().sum() / draws).sqrt()
        assert abs(float(total)) < 4.0


def test_one_node_is_float32_only():
    """Cross size 1 (one node): nothing is quantized, the float32 sum is exact."""
    def fn(r, comm, local, cross):
        typed, raw = gradient(r, integer=True)
        red = TwoLevelReduction(local, cross, SIZES, [BUCKET] * 2, RAW)
        st = ExchangeStats()
        red(make_codec(r), comm, typed, raw, st, divisor=None)
        return typed, raw, st, cross.stats.collectives

    out = run_nodes(3, 1, fn)
    total = [sum(gradient(r, integer=True)[0][i] for r in range(3)) for i in range(2)]
    for typed, raw, st, cross_collectives in out:
        assert all(torch.equal(a, b) for a, b in zip(typed, total))
        assert st.encoded_bytes == 0 and cross_collectives == 0


@pytest.mark.parametrize("L, M", LAYOUTS)
def test_two_level_allreduce_is_the_sum_on_every_rank(L, M):
    """The float32 two-level allreduce (for summed payloads such as PowerSGD's P and Q)."""
    K = L * M

    def fn(r, comm, local, cross):
        t = torch.arange(11, dtype=torch.float32) * (r + 1)  # 11: divides by no L here
        two_level_allreduce_(t, local, cross)
        return t, cross.stats.bytes_sent

    out = run_nodes(L, M, fn)
    total = torch.arange(11, dtype=torch.float32) * sum(range(1, K + 1))
    for t, _ in out:
        assert torch.equal(t, total)
