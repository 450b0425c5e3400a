"""Overlapped rounds: each bucket's quantize + encode + allgather starts from the gradient hooks.

Horovod hides communication behind backward by starting each fused bucket's collective as soon
as its gradients are final. :class:`OverlappedRounds` does the same with the layer-wise codec:
the fused buffers are cut into buckets (:class:`~qoda_hvd.comm.buckets.BucketPlan`); when a
bucket's last gradient arrives, its start (copy out, quantize + pack, encode, start its
allgather) goes to ONE worker thread (:class:`~qoda_hvd.comm.buckets.BucketWorker`, on CUDA a
side stream), and backward goes on. :meth:`OverlappedRounds.finish` starts the buckets no hook
started, waits for every bucket and decodes each into its own range: the same symbols summed in
the same rank order as one block, so the aggregate is bit-identical. Still ONE round per step,
one collective per bucket, named ``{name}.b{index}`` (``name`` is the optimizer's, so two
optimizers whose hooks fire in one backward never share a name).
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Optional

import torch

from qoda_hvd.comm.base import Communicator
from qoda_hvd.comm.buckets import Bucket, BucketPlan, BucketWorker, bucket_cap_bytes
from qoda_hvd.comm.codec import LayerwiseCodec, add_scaled
from qoda_hvd.comm.fusion import FusedGradients
from qoda_hvd.comm.stats import ExchangeStats
from qoda_hvd.kernels import PHASE_QUANTIZE

__all__ = ["OverlappedRounds"]


class OverlappedRounds:
    """The overlapped allgather rounds of one layer-wise exchange (module doc).

    Args:
        fused: the exchange's fused buffers (per type, then raw).
        codec: the exchange's codec (its ``step`` keys the noise).
        comm: the collectives (``allgather_async`` / ``wait``).
        stats: where phase times and bytes are counted.
        name: prefix of the buckets' collective names, the same on every rank and unique per
            exchange in flight at once.
        bucket_cap_mb: as :attr:`bucket_cap_mb`.

    Example::

        >>> from qoda_hvd.comm import LocalGroup
        >>> from qoda_hvd.quant import LayerwiseQuantizer, LayerTyping
        >>> w = torch.zeros(4096, requires_grad=True)
        >>> typing = LayerTyping({"w": 0}, ("dense",), frozenset(), {"w": 4096})
        >>> fused = FusedGradients([[w], []])
        >>> codec = LayerwiseCodec(LayerwiseQuantizer(typing, bits=4), [4096], rank=0)
        >>> rounds = OverlappedRounds(fused, codec, LocalGroup(1)[0], ExchangeStats(), "doc")
        >>> w.grad = torch.ones(4096)
        >>> rounds.ready(w, start=True)          # the bucket starts on the worker thread
        >>> rounds.in_flight
        True
        >>> rounds.finish(divisor=None); rounds.in_flight
        False
    """

    def __init__(self, fused: FusedGradients, codec: LayerwiseCodec, comm: Communicator,
                 stats: ExchangeStats, name: str, bucket_cap_mb: Optional[float] = None) -> None:
        self.fused = fused
        self.codec = codec
        self.comm = comm
        self.stats = stats
        self.name = name
        self.num_types = codec.num_types
        self._cap_mb = bucket_cap_mb
        self._plan: Optional[BucketPlan] = None  # made on first use, or when the cap changes
        self._ready_events: dict[int, list] = {}  # (CUDA) per bucket, its gradients' events
        self._worker = BucketWorker()
        self._inflight: dict[int, Future] = {}

    @property
    def in_flight(self) -> bool:
        """Whether buckets of this round were started."""
        return bool(self._inflight)

    @property
    def started(self) -> int:
        """How many buckets of this round were started."""
        return len(self._inflight)

    @property
    def bucket_cap_mb(self) -> Optional[float]:
        """MiB of float32 gradient at which a bucket closes (see
        :class:`~qoda_hvd.comm.buckets.BucketPlan`); ``None`` for the default (Horovod's
        ``HOROVOD_FUSION_THRESHOLD`` when set, else 25 MiB as DDP). Like every setting that
        shapes the collectives it must be the same on every rank: the exchange agrees it at its
        first call."""
        return self._cap_mb

    @bucket_cap_mb.setter
    def bucket_cap_mb(self, mb: Optional[float]) -> None:
        if self._inflight:
            raise RuntimeError("bucket_cap_mb cannot change while buckets are in flight; set it "
                               "between steps")
        if mb is not None:
            bucket_cap_bytes(mb)  # TypeError / ValueError now, naming the argument
        self._cap_mb = mb
        self._plan = None

    @property
    def cap_bytes(self) -> float:
        """The cap in force, in bytes (reads ``HOROVOD_FUSION_THRESHOLD`` for the default)."""
        return self.plan.cap_bytes

    @property
    def plan(self) -> BucketPlan:
        """The buckets (made from the parameters and the cap; the same on every rank)."""
        if self._plan is None:
            aligns = [self.codec.lq.quantizer(g).bucket_size for g in range(self.num_types)] + [1]
            self._plan = BucketPlan(self.fused.groups, self.fused.buffers, aligns,
                                    bucket_cap_bytes(self._cap_mb))
        return self._plan

    def reset(self) -> None:
        """A new round: no gradient ready, nothing in flight (after a finish or an error)."""
        if self._plan is not None:
            self._plan.reset()
        self._ready_events.clear()

    def abort(self) -> None:
        """After a failed round on this rank: let what the worker started finish (its
        collectives may be in flight), drop the handles and counts; the next round is clean.
        A communicator that keeps handles of its own (mpi4py's) is told to abandon them."""
        self._drop_inflight()
        self.codec.invalid.reset()
        self.reset()

    def _drop_inflight(self, current=None) -> None:
        """Wait for every start still in flight and abandon its collective (and ``current``,
        the handle being waited for when a round failed): a communicator that tracks its
        handles (mpi4py's) then lets the next round reuse the names."""
        abandon = getattr(self.comm, "abandon", None)
        handles = [current] if current is not None else []
        for fut in self._inflight.values():
            if fut.exception() is None:
                handles.append(fut.result()[0])
        self._inflight.clear()
        if callable(abandon):
            for handle in handles:
                abandon(handle)  # a no-op for a handle already waited for

    def ready(self, p: torch.Tensor, start: bool) -> None:
        """``p``'s gradient is final for this round. With ``start``, each bucket it completes
        starts on the worker thread; without, readiness is only counted (a bucket may complete
        in a later round's hooks only if every rank counts the same)."""
        if not start:
            self.plan.ready(p)
            return
        if self._inflight:
            self.comm.progress()  # (MPI without a progress thread) let the started ones move
        event = None
        if p.is_cuda:  # where this gradient was made (models may use several streams)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(p.device))
            for i in self.plan.buckets_of(p):
                self._ready_events.setdefault(i, []).append(event)
        for bucket in self.plan.ready(p):
            if bucket.index not in self._inflight:
                self._submit(bucket, self._ready_events.pop(bucket.index, None))

    def _submit(self, bucket: Bucket, events: Optional[list] = None) -> None:
        device = self.fused.buffers[bucket.group].device
        self._inflight[bucket.index] = self._worker.submit(lambda: self._start(bucket),
                                                           device, events)

    def _start(self, bucket: Bucket) -> tuple:
        """On the worker thread (on CUDA: on its side stream). Returns ``(handle, own)``."""
        st, g = self.stats, bucket.group
        t0 = time.perf_counter()
        buf = self.plan.gather(bucket, self.fused.buffers[g])
        if g < self.num_types:
            # lo is a multiple of the norm-bucket size: the same symbols as the whole buffer
            own = self.codec.quantize(g, buf, bucket.lo, PHASE_QUANTIZE)
            t1 = time.perf_counter()
            payload = self.codec.encode([own], None, peers=self.comm.size - 1)
        else:
            own = buf.clone()
            t1 = time.perf_counter()
            payload = self.codec.encode([], buf, peers=self.comm.size - 1)
        t2 = time.perf_counter()
        handle = self.comm.allgather_async(payload, f"{self.name}.b{bucket.index}")
        st.quantize_s += t1 - t0
        st.encode_s += t2 - t1
        st.encoded_bytes += payload.numel()
        return handle, own

    def finish(self, divisor: Optional[int]) -> None:
        """Start the buckets no hook started (gradients that never arrived count as zeros, as
        Horovod does), then wait for every bucket and decode it into its own range, dividing
        by ``divisor`` (None: the sum); the fused buffers then go back into ``p.grad``.

        With a communicator that runs collectives in the background (Horovod's), buckets are
        waited for in the order they started, which is about the order they arrive: the first
        ones decode while the last ones are still on the wire. Otherwise (the collective runs
        inside the wait) every rank waits in bucket order, the same on every rank."""
        st, plan, me = self.stats, self.plan, self.comm.rank
        scale = 1.0 if divisor is None else 1.0 / divisor  # as the one-block path folds it
        for bucket in plan.buckets:
            if bucket.index not in self._inflight:
                for p in bucket.params:  # zeros made here, on the stream that uses them later
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                self._submit(bucket)
        order = (list(self._inflight) if self.comm.asynchronous
                 else sorted(self._inflight))  # dicts keep insertion (= start) order
        wait_s = decode_s = 0.0
        handle = None
        try:
            for bucket in (plan.buckets[i] for i in order):
                g = bucket.group
                t0 = time.perf_counter()
                handle = None
                handle, own = self._inflight.pop(bucket.index).result()
                # (CUDA) this stream decodes after the side stream's copies into the buffer
                self._worker.join(self.fused.buffers[g].device)
                payloads = self.comm.wait(handle)
                t1 = time.perf_counter()
                # (no link-rate sample here: a wait that overlapped backward is not a transfer)
                buf = self.fused.buffers[g][bucket.lo:bucket.hi]
                for sender, p in enumerate(payloads):  # rank order, as in one block
                    first = sender == 0
                    if sender == me:
                        if g < self.num_types:
                            self.codec.dequantize(own, buf, not first, sender, scale=scale)
                        else:  # as the one-block path adds this rank's raw values
                            if own.is_cuda:  # made on the side stream, read on this one
                                own.record_stream(torch.cuda.current_stream(own.device))
                            add_scaled(buf, own, scale, not first)
                    elif g < self.num_types:
                        self.codec.decode_into(p, sender, [buf], None, accumulate=not first,
                                               scale=scale)
                    else:
                        self.codec.decode_into(p, sender, [], buf, accumulate=not first,
                                               scale=scale)
                wait_s += t1 - t0
                decode_s += time.perf_counter() - t1
            self.codec.check_decoded()
        except BaseException:
            # let what was submitted finish (its collectives are in flight) before anything
            # else touches the buffers, and abandon what will not be waited for
            self._drop_inflight(handle)
            raise
        self.fused.scatter()
        st.exchange_s += wait_s
        st.decode_s += decode_s
