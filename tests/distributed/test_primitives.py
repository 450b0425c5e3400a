"""The Horovod collectives the compressed exchange is built on, on real ranks."""
from __future__ import annotations

import torch


def _payload(rank: int, length: int) -> torch.Tensor:
    return ((torch.arange(length, dtype=torch.int64) * 7 + rank * 13) % 251).to(torch.uint8)


def test_allgather_uint8_payloads_of_different_lengths(multi):
    hvd = multi
    rank, size = hvd.rank(), hvd.size()
    lengths = [100 + 37 * r for r in range(size)]
    gathered = hvd.allgather(_payload(rank, lengths[rank]), name="prim.allgather_u8")
    assert gathered.dtype == torch.uint8
    expected = torch.cat([_payload(r, lengths[r]) for r in range(size)])
    assert torch.equal(gathered, expected)


def test_grouped_allgather_payload_and_lengths(multi):
    hvd = multi
    rank, size = hvd.rank(), hvd.size()
    length = 10 + 5 * rank
    payload, lengths = hvd.grouped_allgather(
        [_payload(rank, length), torch.tensor([length], dtype=torch.int64)], name="prim.grouped")
    assert lengths.tolist() == [10 + 5 * r for r in range(size)]
    parts = torch.split(payload, lengths.tolist())
    for r, part in enumerate(parts):
        assert torch.equal(part, _payload(r, 10 + 5 * r))


def test_alltoall_with_splits(multi):
    hvd = multi
    rank, size = hvd.rank(), hvd.size()
    # Rank r sends (r + j + 1) bytes of value 10 r + j to rank j.
    splits = torch.tensor([rank + j + 1 for j in range(size)], dtype=torch.int32)
    send = torch.cat([torch.full((rank + j + 1,), 10 * rank + j, dtype=torch.uint8)
                      for j in range(size)])
    received, received_splits = hvd.alltoall(send, splits=splits, name="prim.alltoall")
    assert received_splits.tolist() == [r + rank + 1 for r in range(size)]
    expected = torch.cat([torch.full((r + rank + 1,), 10 * r + rank, dtype=torch.uint8)
                          for r in range(size)])
    assert torch.equal(received, expected)


def test_allreduce_average_matches_size(multi):
    hvd = multi
    out = hvd.allreduce(torch.tensor([float(hvd.rank())]), op=hvd.Average, name="prim.avg")
    assert out.item() == sum(range(hvd.size())) / hvd.size()
