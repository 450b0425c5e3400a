"""Buckets of the overlapped exchange: which gradients travel together, and where their work runs.

- :class:`BucketPlan` cuts each fused buffer (one per layer type, plus the uncompressed
  tensors) into buckets of about ``cap_bytes`` of float32 gradient (a bucket closes once it
  reaches the cap, as DDP's ``bucket_cap_mb`` buckets do; Horovod's fusion threshold plays the
  same part). Cuts fall at a parameter's end rounded UP to the type's
  norm-bucket size, so every norm bucket lies in one bucket: a bucket quantized alone (its noise
  counter offset by its start) draws exactly the symbols and norms the whole buffer would, and
  the aggregate stays bit-identical to the one-block exchange. A parameter that straddles a cut
  (only within that rounding) counts in both buckets, so a bucket is ready only when every
  coordinate in it is final. Unlike DDP and Horovod, a parameter larger than the cap is cut into
  near-equal pieces (at norm-bucket boundaries): they are ready at the same moment, but the
  first piece's collective starts after ITS codec pass instead of the whole gradient's, so the
  codec of one piece overlaps the wire of the one before (the output layer of a language model,
  the first gradient backward makes, is the case that matters).
- :class:`BucketWorker`: ONE background thread runs the bucket starts (copy out, quantize, pack,
  encode, start the collective) in submission order, so the gradient hook returns at once and
  backward goes on. On CUDA each start runs on a side stream that first waits for an event
  recorded on the backward's stream when the bucket became ready; only the payload's packed
  bytes and norms come to the host, on that side stream, so the wait blocks the worker, never
  the backward; ``synchronize()`` makes its stream wait for the side stream before decoding.

Why a thread of our own and not Horovod's: Horovod's background thread runs collectives, not
Python; the codec is Python-driven kernels (numba on CPU, Triton on CUDA).
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

__all__ = ["Bucket", "BucketPlan", "BucketWorker", "DEFAULT_BUCKET_CAP_MB", "bucket_cap_bytes"]

#: Default cap of a bucket, in MiB of float32 gradient: DDP's ``bucket_cap_mb``.
DEFAULT_BUCKET_CAP_MB = 25.0


def bucket_cap_bytes(bucket_cap_mb: Optional[float]) -> float:
    """The cap in bytes: ``bucket_cap_mb`` MiB; ``None``: Horovod's ``HOROVOD_FUSION_THRESHOLD``
    (bytes) when set, else :data:`DEFAULT_BUCKET_CAP_MB`. ``0``: one bucket per parameter
    (rounded to whole norm buckets), none split; ``math.inf``: one bucket per layer type.

    Example::

        >>> bucket_cap_bytes(1.0)
        1048576.0
    """
    if bucket_cap_mb is None:
        env = os.environ.get("HOROVOD_FUSION_THRESHOLD")
        if env is None or env.strip() == "":
            return DEFAULT_BUCKET_CAP_MB * 2 ** 20
        try:
            value = float(env)
        except ValueError:
            raise ValueError(f"HOROVOD_FUSION_THRESHOLD must be a number of bytes >= 0, got "
                             f"{env!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"HOROVOD_FUSION_THRESHOLD must be a number of bytes >= 0, got {env!r}")
        return value
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)):
        raise TypeError(f"bucket_cap_mb must be a number of MiB >= 0 or None, got "
                        f"{type(bucket_cap_mb).__name__}")
    if math.isnan(bucket_cap_mb) or bucket_cap_mb < 0:
        raise ValueError(f"bucket_cap_mb must be a number of MiB >= 0 (math.inf: one bucket per "
                         f"layer type), got {bucket_cap_mb!r}")
    return float(bucket_cap_mb) * 2 ** 20


@dataclass
class Bucket:
    """One bucket: coordinates ``[lo, hi)`` of fused buffer ``group``.

    Attributes:
        index: position in the plan (its collective's tag; waited for in this order).
        group: the fused buffer (a layer type id, or the number of types for the raw tensors).
        lo, hi: coordinate range in that buffer (``lo`` is a multiple of the norm-bucket size).
        params: the parameters with coordinates in the range.
    """

    index: int
    group: int
    lo: int
    hi: int
    params: list[torch.Tensor] = field(default_factory=list)
    # copies: whole parameters (buffer views shaped like them), then partial ones (flat ranges)
    _whole_dst: list[torch.Tensor] = field(default_factory=list, repr=False)
    _whole_src: list[torch.Tensor] = field(default_factory=list, repr=False)
    _part: list[tuple[torch.Tensor, torch.Tensor, int, int]] = field(default_factory=list,
                                                                     repr=False)

    @property
    def numel(self) -> int:
        return self.hi - self.lo


def _cuts(numels: Sequence[int], align: int, cap_numel: float) -> list[tuple[int, int]]:
    """Ranges ``[lo, hi)`` covering ``sum(numels)``: a cut after the parameter that brings the
    bucket to ``cap_numel`` or more, rounded up to a multiple of ``align``; with a cap > 0, a
    parameter of more than ``cap_numel`` (and of 2 ``align`` or more) is also cut inside, into
    near-equal pieces. A cap of 0 puts every parameter alone (Horovod's fusion threshold 0)."""
    total = sum(numels)
    ranges, lo, end = [], 0, 0
    for n in numels:
        start, end = end, end + n
        if 0 < cap_numel < n and n >= 2 * align:  # pieces of one gradient: codec and wire pipeline
            first = max(lo, -(-start // align) * align)
            if first > lo:  # what precedes the parameter's first whole norm bucket
                ranges.append((lo, first))
                lo = first
            pieces = min(math.ceil(n / max(cap_numel, 1)), (end - first) // align)
            for j in range(1, pieces):
                cut = first + round(j * (end - first) / pieces / align) * align
                if lo < cut < total:
                    ranges.append((lo, cut))
                    lo = cut
        if end - lo >= cap_numel and end < total:
            cut = min(total, -(-end // align) * align)
            if lo < cut < total:
                ranges.append((lo, cut))
                lo = cut
    if lo < total:
        ranges.append((lo, total))
    return ranges


class BucketPlan:
    """The buckets of a set of fused buffers, and which of them are ready (see module doc).

    Args:
        groups: the parameters of each fused buffer, in buffer order.
        buffers: the fused buffers (flat, float32).
        aligns: per buffer, the norm-bucket size cuts are rounded to (1: anywhere).
        cap_bytes: float32 gradient bytes at which a bucket closes (a larger parameter is cut
            in near-equal pieces; a cap of 0 puts every parameter alone).

    Example::

        >>> a, b = torch.zeros(3000), torch.zeros(3000)
        >>> plan = BucketPlan([[a, b]], [torch.zeros(6000)], [1024], cap_bytes=4 * 3000)
        >>> [(x.lo, x.hi) for x in plan.buckets]
        [(0, 3072), (3072, 6000)]
        >>> plan.ready(a), [x.index for x in plan.ready(b)]      # b is in both
        ([], [0, 1])
    """

    def __init__(self, groups: Sequence[Sequence[torch.Tensor]], buffers: Sequence[torch.Tensor],
                 aligns: Sequence[int], cap_bytes: float) -> None:
        self.cap_bytes = float(cap_bytes)
        self.buckets: list[Bucket] = []
        self._of: dict[int, list[int]] = {}
        for g, (params, buf, align) in enumerate(zip(groups, buffers, aligns)):
            numels = [p.numel() for p in params]
            starts = [sum(numels[:i]) for i in range(len(numels))]
            for lo, hi in _cuts(numels, max(1, int(align)), self.cap_bytes / 4):
                bucket = Bucket(len(self.buckets), g, lo, hi)
                for p, s, n in zip(params, starts, numels):
                    a, b = max(s, lo), min(s + n, hi)
                    if a >= b:
                        continue
                    bucket.params.append(p)
                    self._of.setdefault(id(p), []).append(bucket.index)
                    if a == s and b == s + n:
                        bucket._whole_dst.append(buf[s:s + n].view(p.shape))
                        bucket._whole_src.append(p)
                    else:
                        bucket._part.append((buf[a:b], p, a - s, b - s))
                self.buckets.append(bucket)
        self._remaining = [len(b.params) for b in self.buckets]

    def reset(self) -> None:
        """A new round: no gradient ready yet."""
        self._remaining = [len(b.params) for b in self.buckets]

    def buckets_of(self, p: torch.Tensor) -> list[int]:
        """Indices of the buckets ``p`` has coordinates in (none if it is not in the plan)."""
        return self._of.get(id(p), [])

    def ready(self, p: torch.Tensor) -> list[Bucket]:
        """``p``'s gradient is final: the buckets this completes (usually none or one)."""
        done = []
        for i in self._of.get(id(p), ()):
            self._remaining[i] -= 1
            if self._remaining[i] == 0:
                done.append(self.buckets[i])
        return done

    @staticmethod
    def gather(bucket: Bucket, buffer: torch.Tensor) -> torch.Tensor:
        """Copy the bucket's gradients into its range of ``buffer`` (a missing gradient counts
        as zeros, as Horovod does); returns that range."""
        for p in bucket.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if bucket._whole_src:
            torch._foreach_copy_(bucket._whole_dst, [p.grad for p in bucket._whole_src])
        for dst, p, a, b in bucket._part:
            dst.copy_(p.grad.reshape(-1)[a:b])
        return buffer[bucket.lo:bucket.hi]


class BucketWorker:
    """One background thread for bucket starts; a side stream per CUDA device (module doc).

    Example::

        >>> worker = BucketWorker()
        >>> worker.submit(lambda: 6 * 7, torch.device("cpu")).result()
        42
    """

    def __init__(self) -> None:
        self._pool: Optional[ThreadPoolExecutor] = None
        self._streams: dict[int, "torch.cuda.Stream"] = {}
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], object], device: torch.device,
               events: Optional[Sequence] = None) -> Future:
        """Run ``fn`` on the worker after everything submitted before. On CUDA ``fn`` runs on
        the side stream after ``events`` (recorded where the bucket's gradients were made), or,
        with none given, after an event recorded now on this thread's current stream."""
        ready: list = []
        if device.type == "cuda":
            ready = [e for e in (events or ()) if e is not None]
            if not ready:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                ready = [event]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qoda-bucket")
            return self._pool.submit(self._run, fn, device, ready)

    def _run(self, fn: Callable[[], object], device: torch.device, ready: list) -> object:
        if not ready:
            return fn()
        stream = self.stream(device)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            for event in ready:
                stream.wait_event(event)
            return fn()

    def stream(self, device: torch.device) -> "torch.cuda.Stream":
        """The side stream of a CUDA device (made on first use)."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        with self._lock:
            s = self._streams.get(index)
            if s is None:
                s = self._streams[index] = torch.cuda.Stream(device=index)
            return s

    def join(self, device: torch.device) -> None:
        """Make the current stream wait for the side stream's work (CUDA; nothing on CPU)."""
        if device.type == "cuda":
            torch.cuda.current_stream(device).wait_stream(self.stream(device))

    def close(self) -> None:
        """Finish what was submitted and stop the thread (a later submit starts a new one)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
