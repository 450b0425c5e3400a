"""Buckets of the overlapped exchange: where the cuts fall, what each bucket waits for and
copies, the cap's sources and errors, and the worker thread."""
from __future__ import annotations

import math
import threading

import pytest
import torch

from qoda_hvd.comm.buckets import BucketPlan, BucketWorker, bucket_cap_bytes


def plan_of(sizes, align, cap_numel):
    params = [torch.zeros(n) for n in sizes]
    buf = torch.zeros(sum(sizes))
    return params, buf, BucketPlan([params], [buf], [align], cap_bytes=4 * cap_numel)


@pytest.mark.parametrize("sizes, align, cap, ranges", [
    ([1500, 3500, 210], 1024, 0, [(0, 2048), (2048, 5120), (5120, 5210)]),
    ([1500, 3500, 210], 1024, math.inf, [(0, 5210)]),
    ([1500, 3500, 210], 1024, 4000, [(0, 5120), (5120, 5210)]),
    ([2048, 1024, 4096], 1024, 0, [(0, 2048), (2048, 3072), (3072, 7168)]),
    ([10, 20, 30], 1, 25, [(0, 30), (30, 45), (45, 60)]),
    ([5000], 1024, 0, [(0, 5000)]),       # cap 0: every parameter alone, none split
    ([100, 100], 1024, 0, [(0, 200)]),    # cuts round up past the end: one bucket
    # a parameter above a cap > 0: near-equal pieces at norm-bucket boundaries
    ([8 * 1024 * 1024, 30], 1024, 6.5e6, [(0, 4 * 1024 * 1024), (4 * 1024 * 1024, 8 * 1024 * 1024 + 30)]),
    ([300, 9000, 300], 1024, 3000, [(0, 1024), (1024, 4096), (4096, 6144), (6144, 9600)]),
    ([1000], 1024, 10, [(0, 1000)]),      # under 2 norm buckets: not cut
])
def test_cuts_fall_at_parameter_ends_rounded_up_to_the_norm_buckets(sizes, align, cap, ranges):
    _, _, plan = plan_of(sizes, align, cap)
    assert [(b.lo, b.hi) for b in plan.buckets] == ranges
    assert all(b.lo % align == 0 for b in plan.buckets)


def test_a_bucket_is_ready_when_every_coordinate_in_it_is_final():
    (a, b, c), _, plan = plan_of([1500, 3500, 210], 1024, 0)
    # b straddles buckets 0 and 1 (coordinates 1500..2048 and 2048..5000); c straddles 1 and 2
    assert [len(x.params) for x in plan.buckets] == [2, 2, 1]
    assert plan.ready(c) == [plan.buckets[2]]
    assert plan.ready(a) == []
    assert [x.index for x in plan.ready(b)] == [0, 1]
    plan.reset()
    assert [x.index for x in plan.ready(b)] == []
    assert plan.ready(torch.zeros(3)) == []  # not in the plan


def test_gather_copies_exactly_the_bucket_range():
    (a, b, c), buf, plan = plan_of([1500, 3500, 210], 1024, 0)
    g = torch.Generator().manual_seed(0)
    a.grad, b.grad = torch.randn(1500, generator=g), torch.randn(3500, generator=g)
    c.grad = None  # never arrived: zeros, as Horovod does
    whole = torch.cat([a.grad, b.grad, torch.zeros(210)])
    for bucket in plan.buckets:
        out = plan.gather(bucket, buf)
        assert out.data_ptr() == buf[bucket.lo:].data_ptr() and out.numel() == bucket.numel
    assert torch.equal(buf, whole)
    assert c.grad is not None and not c.grad.any()


def test_gather_handles_non_contiguous_gradients_of_partial_parameters():
    p = torch.zeros(40, 50)
    q = torch.zeros(1000)
    buf = torch.zeros(3000)
    plan = BucketPlan([[q, p]], [buf], [1024], cap_bytes=0)
    assert [(x.lo, x.hi) for x in plan.buckets] == [(0, 1024), (1024, 3000)]
    q.grad = torch.arange(1000.0)
    p.grad = torch.arange(2000.0).reshape(50, 40).t()  # transposed: not contiguous
    for bucket in plan.buckets:
        plan.gather(bucket, buf)
    assert torch.equal(buf, torch.cat([q.grad, p.grad.reshape(-1)]))


def test_pieces_of_one_parameter_are_ready_together():
    (big,), buf, plan = plan_of([5000], 1024, 2000)
    assert [(b.lo, b.hi) for b in plan.buckets] == [(0, 2048), (2048, 3072), (3072, 5000)]
    big.grad = torch.arange(5000.0)
    assert [b.index for b in plan.ready(big)] == [0, 1, 2]
    for b in plan.buckets:
        plan.gather(b, buf)
    assert torch.equal(buf, big.grad)


def test_bucket_cap_sources_and_errors(monkeypatch):
    monkeypatch.delenv("HOROVOD_FUSION_THRESHOLD", raising=False)
    assert bucket_cap_bytes(None) == 25 * 2 ** 20
    assert bucket_cap_bytes(0) == 0 and bucket_cap_bytes(math.inf) == math.inf
    monkeypatch.setenv("HOROVOD_FUSION_THRESHOLD", "1048576")
    assert bucket_cap_bytes(None) == 2 ** 20
    assert bucket_cap_bytes(2) == 2 * 2 ** 20  # the argument wins over the environment
    monkeypatch.setenv("HOROVOD_FUSION_THRESHOLD", "lots")
    with pytest.raises(ValueError, match="HOROVOD_FUSION_THRESHOLD must be a number of bytes"):
        bucket_cap_bytes(None)
    with pytest.raises(ValueError, match="bucket_cap_mb must be a number of MiB >= 0.*-1"):
        bucket_cap_bytes(-1)
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        bucket_cap_bytes(float("nan"))
    with pytest.raises(TypeError, match="bucket_cap_mb must be a number.*str"):
        bucket_cap_bytes("25")
    with pytest.raises(TypeError, match="bucket_cap_mb"):
        bucket_cap_bytes(True)


def test_worker_runs_in_submission_order_off_the_calling_thread():
    worker = BucketWorker()
    seen = []
    futures = [worker.submit(lambda i=i: seen.append((i, threading.current_thread().name)) or i,
                             torch.device("cpu")) for i in range(20)]
    assert [f.result(timeout=10) for f in futures] == list(range(20))
    assert [i for i, _ in seen] == list(range(20))
    assert all(name.startswith("qoda-bucket") for _, name in seen)
    assert threading.current_thread().name not in {name for _, name in seen}

    def boom():
        raise ValueError("bad bucket")

    with pytest.raises(ValueError, match="bad bucket"):
        worker.submit(boom, torch.device("cpu")).result(timeout=10)
    assert worker.submit(lambda: 1, torch.device("cpu")).result(timeout=10) == 1  # still alive
    worker.close()
    assert worker.submit(lambda: 2, torch.device("cpu")).result(timeout=10) == 2  # restarts
    worker.close()
