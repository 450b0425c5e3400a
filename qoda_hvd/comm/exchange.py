"""Exchange strategies: fused gradients -> one compressed exchange per step -> the aggregate.

Every strategy reads ``p.grad`` of a fixed list of parameters, leaves the aggregate
``(1/K) sum_k Q(g_k)`` (or the sum, for ``op=Sum``) in ``p.grad`` on every rank, bit-identical
across ranks, and counts what it did in :class:`ExchangeStats`.

- :class:`AllreduceExchange` (``Compression.none`` / ``fp16``): one fused allreduce.
- :class:`LayerwiseExchange` with ``strategy="allgather"``: each rank quantizes and packs its
  fused gradient per layer type in one kernel pass (:mod:`qoda_hvd.kernels`: noise keyed by
  (seed, rank, step, coordinate), the same bits on CPU and GPU), entropy codes ONE payload, the payloads are allgathered in ONE
  collective, and every rank decodes all K in rank order (its own from its quantized tensors:
  the coding is lossless) and averages them. Exact average of the
  ``Q(g_k)``; received bytes grow like ``(K-1) * compressed(d)``.
- :class:`LayerwiseExchange` with ``strategy="scatter_gather"``: each type's fused gradient is
  cut into K bucket-aligned chunks; chunk j of every rank goes to rank j (ONE alltoall), rank j
  decodes and reduces them, re-quantizes its reduced chunk, and the K reduced chunks are
  allgathered (ONE allgather). About ``2 (K-1)/K * compressed(d)`` bytes per rank whatever K;
  still unbiased (both quantizations are).

Both count as ONE exchange per call. Decoding is one kernel pass too: the packed symbols are
unpacked, scaled and added into the fused buffer in place. ``coding="auto"`` without a
``bandwidth`` weighs the rans coder's measured speed against the link rate this exchange
measured on its own collectives (``fixed`` until there is a measurement). Level agreement adds one small allreduce on scheduled
steps only (see :class:`qoda_hvd.quant.LayerwiseQuantizer`).

With ``overlap`` (allgather only), the fused buffers are cut into buckets
(:mod:`qoda_hvd.comm.buckets`) whose quantize + encode + allgather start from the gradient hooks
on a worker thread while backward goes on (:meth:`LayerwiseExchange.grad_ready`); the call then
waits and decodes them. Still ONE exchange (one round) per call, one collective per bucket, the
same aggregate bit for bit; ``overlap_probe`` times both modes and keeps the faster.

``fallback=True``: quantizing and coding take CPU/GPU time, which pays only while the link is
the bottleneck, and the float32 path has costs of its own (copies, no overlap with backward), so
the choice is measured, not modelled. Calls 1-3 are timed quantized, calls 5-7 timed sending
float32 (calls 0 and 4 warm each path up); at the end of call 7 every rank's two sums are added
up in ONE small allreduce (once per run), and every rank (same sums, same branch) keeps the
faster one: quantized, or one fused float32 allreduce per step as ``Compression.none``. The
choice is kept in checkpoints.
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import numpy as np
import torch

from qoda_hvd.coding import PackedSegment, RawSegment, decode, encode
from qoda_hvd.comm.base import Communicator
from qoda_hvd.comm.buckets import Bucket, BucketPlan, BucketWorker, bucket_cap_bytes
from qoda_hvd.errors import PayloadError
from qoda_hvd.kernels import PHASE_QUANTIZE, PHASE_REQUANTIZE, LevelTable, level_table, stream_key
from qoda_hvd.kernels.dispatch import dequantize_into, quantize_pack
from qoda_hvd.quant import LayerwiseQuantizer, LayerTyping

__all__ = ["ExchangeStats", "FusedGradients", "AllreduceExchange", "LayerwiseExchange",
           "STRATEGIES", "choose_strategy"]

#: Strategies of :class:`LayerwiseExchange`.
STRATEGIES = ("allgather", "scatter_gather")


def choose_strategy(strategy: str, size: int) -> str:
    """Resolve ``"auto"``: allgather up to 2 ranks, scatter_gather beyond.

    At K = 2 both move the same bytes and allgather is exact with one collective; from K = 3 on
    allgather receives ``K - 1`` compressed gradients per rank against about 2 for scatter_gather.

    Example::

        >>> choose_strategy("auto", 2), choose_strategy("auto", 8)
        ('allgather', 'scatter_gather')
    """
    if strategy == "auto":
        return "allgather" if size <= 2 else "scatter_gather"
    if strategy not in STRATEGIES:
        raise ValueError(f"exchange must be one of auto, {', '.join(STRATEGIES)}, got {strategy!r}")
    return strategy


@dataclass
class ExchangeStats:
    """Cumulative counts and times of one exchange object (per rank).

    Attributes:
        exchanges: calls (one per synchronisation).
        coordinates: gradient coordinates aggregated, summed over calls.
        encoded_bytes: bytes of the payloads this rank encoded from its own gradient.
        quantize_s, encode_s, exchange_s, decode_s: wall time in each phase (CPU clock; on
            CUDA the quantizer's time includes waiting for the device).
        level_updates: scheduled level re-optimisations (each one small allreduce).
    """

    exchanges: int = 0
    coordinates: int = 0
    encoded_bytes: int = 0
    quantize_s: float = 0.0
    encode_s: float = 0.0
    exchange_s: float = 0.0
    decode_s: float = 0.0
    level_updates: int = 0

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class FusedGradients:
    """Flat buffers over the gradients of fixed parameter groups (one per layer type, plus raw).

    ``gather`` copies every ``p.grad`` into its group's buffer (a missing grad counts as zeros,
    as Horovod does); ``scatter`` writes buffers back into ``p.grad``. Each is one
    ``torch._foreach_copy_`` over views made once, so no per-step allocation.
    """

    def __init__(self, groups: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype = torch.float32):
        self.groups = [list(g) for g in groups]
        self.buffers: list[torch.Tensor] = []
        self._views: list[torch.Tensor] = []
        self._params: list[torch.Tensor] = []
        for params in self.groups:
            device = params[0].device if params else torch.device("cpu")
            buf = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=device)
            self.buffers.append(buf)
            for p, view in zip(params, buf.split([p.numel() for p in params])):
                self._views.append(view.view(p.shape))
                self._params.append(p)

    @property
    def numel(self) -> int:
        return sum(b.numel() for b in self.buffers)

    def gather(self) -> list[torch.Tensor]:
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self._params:
            torch._foreach_copy_(self._views, [p.grad for p in self._params])
        return self.buffers

    def scatter(self) -> None:
        if self._params:
            torch._foreach_copy_([p.grad for p in self._params], self._views)


class AllreduceExchange:
    """``Compression.none`` / ``fp16`` through the wrapper: ONE fused allreduce per step."""

    def __init__(self, params: Sequence[torch.Tensor], communicator: Communicator,
                 average: bool = True, fp16: bool = False,
                 stats: Optional[ExchangeStats] = None) -> None:
        self.comm = communicator
        self.average = average
        self.fused = FusedGradients([params], torch.float16 if fp16 else torch.float32)
        self.stats = ExchangeStats() if stats is None else stats  # may count into another's

    def __call__(self) -> None:
        (buf,) = self.fused.gather()
        t0 = time.perf_counter()
        self.comm.allreduce_sum_(buf)  # in place; float16 stays float16 on the wire
        if self.average:
            buf.div_(self.comm.size)
        self.fused.scatter()
        st = self.stats
        st.exchange_s += time.perf_counter() - t0
        st.exchanges += 1
        st.coordinates += buf.numel()
        st.encoded_bytes += buf.numel() * buf.element_size()


#: ``fallback``'s probe, in exchange calls: quantized calls timed, then float32 ones (the
#: calls before each range warm that path up); the decision ends the last float32 call.
_PROBE_QUANTIZED = range(1, 4)
_PROBE_FP32 = range(5, 8)


#: The overlap probe (``overlap_probe``), in calls where overlap is possible: calls 0-1 warm up
#: overlapped; calls 2-13 are timed in pairs, overlapped and one block in turn (pairs, so the two
#: calls of an extra-gradient iteration share a mode); the decision ends call 13.
_OVERLAP_WARMUP = 2
_OVERLAP_TIMED = 12


def _bounds(total: int, parts: int) -> list[int]:
    return [(j * total) // parts for j in range(parts + 1)]


class LayerwiseExchange:
    """Layer-wise quantized, entropy-coded exchange of the fused gradient (see module doc).

    Args:
        typing: parameter name -> layer type (uncompressed names travel as float32).
        named_parameters: ``(name, parameter)`` pairs, every name typed by ``typing``.
        quantizer: the per-type level state (its schedule decides level updates).
        communicator: the collectives.
        strategy: ``"allgather"`` or ``"scatter_gather"``.
        coding: codec name for :func:`qoda_hvd.coding.encode` (``"auto"`` picks per segment).
        average: divide the sum by K (``op=Average``) or not (``op=Sum``).
        seed: rounding-noise seed, mixed with the rank.
        bandwidth: link bytes/s for ``coding="auto"``.
        fallback: keep sending float32 (one allreduce) if, measured, it is faster than
            compressing (module doc).
        threads: CPU threads of the codec kernels (None: torch's setting, capped by the cores per rank on the node).

    Example::

        >>> from qoda_hvd.comm import LocalGroup
        >>> from qoda_hvd.quant import classify_parameters
        >>> model = torch.nn.Linear(64, 64)
        >>> typing = classify_parameters(model, min_numel=100)
        >>> ex = LayerwiseExchange(typing, list(model.named_parameters()),
        ...                        LayerwiseQuantizer(typing, bits=4), LocalGroup(1)[0])
        >>> model(torch.randn(8, 64)).sum().backward()
        >>> ex()                     # p.grad now holds Q(g), decoded from the payload
        >>> ex.stats.exchanges
        1
    """

    def __init__(self, typing: LayerTyping, named_parameters: Sequence[tuple[str, torch.Tensor]],
                 quantizer: LayerwiseQuantizer, communicator: Communicator,
                 strategy: str = "allgather", coding: str = "auto", average: bool = True,
                 seed: int = 0, bandwidth: Optional[float] = None, fallback: bool = False,
                 threads: Optional[int] = None) -> None:
        self.typing = typing
        #: CPU threads of the codec kernels (None: torch's setting, capped by the cores per rank on the node).
        self.threads = threads
        self.lq = quantizer
        self.comm = communicator
        self.strategy = choose_strategy(strategy, communicator.size)
        self.coding = coding
        self.average = average
        self.bandwidth = bandwidth
        groups: list[list[torch.Tensor]] = [[] for _ in range(typing.num_types)]
        raw: list[torch.Tensor] = []
        for name, p in named_parameters:
            tid = typing.type_id(name)
            (raw if tid < 0 else groups[tid]).append(p)
        self.fused = FusedGradients(groups + [raw])
        self.num_types = typing.num_types
        self.seed = seed
        self.stats = ExchangeStats()
        self.step = 0
        # level tables of the kernels, by the levels' bytes (ours and any peer's)
        self._tables: dict[bytes, LevelTable] = {}
        # offset of each type's buffer in the fused gradient: the noise counter of its first
        # coordinate, so no two coordinates of a step share noise
        self._bases = np.cumsum([0] + [b.numel() for b in self.fused.buffers[:-2]]).tolist()
        # what coding="auto" weighs when no bandwidth is given: the link rate this exchange
        # measured (bytes/s, None before the first collective) and the rans speeds
        self.measured_bandwidth: Optional[float] = None
        self._rans_ns = [4.0, 4.0]  # encode, decode per packed byte; replaced by measurements
        #: Start each bucket's collective from the gradient hooks (see :meth:`grad_ready`).
        self.overlap = False
        self._plan: Optional[BucketPlan] = None  # made on first use, or when the cap changes
        self._cap_mb: Optional[float] = None  # None: read where it is first needed
        self._ready_events: dict[int, list] = {}  # (CUDA) per bucket, its gradients' events
        self._worker = BucketWorker()
        self._inflight: dict[int, Future] = {}
        #: With ``overlap``: time overlapped and one-block iterations and keep the faster (see
        #: :meth:`_decide_overlap`); ``overlap`` becomes False if one block was faster.
        self.overlap_probe = False
        #: Whether the probe has decided; mean seconds per iteration of each mode, all ranks.
        self.overlap_decided = False
        self.overlap_measured: Optional[dict[str, float]] = None
        self._ov_calls = 0  # calls where overlap was possible, while undecided
        self._ov_sums = [0.0, 0.0]  # seconds: one block, overlapped
        self._ov_last_end: Optional[float] = None
        self._update_deferred = False
        self.fallback = fallback
        #: ``"quantized"``, or ``"fp32"`` once ``fallback`` measured float32 to be faster.
        self.sends = "quantized"
        #: Whether ``fallback`` has decided (kept in checkpoints; a resumed run does not re-probe).
        self.fallback_decided = False
        #: Mean seconds per exchange call of each path over the probe, all ranks, once decided.
        self.fallback_measured: Optional[dict[str, float]] = None
        self._probe_calls = 0  # calls in this process while undecided (same on every rank)
        self._probe_sums = [0.0, 0.0]  # seconds: quantized calls, float32 calls
        self._plain: Optional[AllreduceExchange] = None

    # -- helpers ------------------------------------------------------------------------

    def _levels_table(self) -> dict[int, torch.Tensor]:
        return self.lq.level_table()

    def _agree_levels(self, buffers: Sequence[torch.Tensor]) -> None:
        for tid in range(self.num_types):
            if buffers[tid].numel():
                self.lq.observe(tid, buffers[tid])
        aggregate = self.comm.allreduce_sum(self.lq.histograms())
        # All ranks see the same aggregate, so they take the same branch: gradients that were
        # all zero (e.g. the zero-grad step of hvd.broadcast_optimizer_state) say nothing about
        # the levels, and the update moves to the next step instead of being spent.
        self._update_deferred = not bool(aggregate.sum() > 0)
        if not self._update_deferred:
            self.lq.set_histograms(aggregate)
            self.stats.level_updates += 1

    def _table(self, levels) -> LevelTable:
        lv = np.ascontiguousarray(np.asarray(levels.cpu() if isinstance(levels, torch.Tensor)
                                             else levels, dtype=np.float32))
        key = lv.tobytes()
        table = self._tables.get(key)
        if table is None:  # new levels (an update, or a peer's that differ from ours)
            if len(self._tables) > 64:
                self._tables.clear()
            table = self._tables[key] = level_table(torch.from_numpy(lv.copy()))
        return table

    def _quantize(self, tid: int, x: torch.Tensor, base: int, phase: int) -> PackedSegment:
        """One type's buffer (or chunk of it) -> its packed segment, in one kernel pass."""
        q = self.lq.quantizer(tid)
        table = self._table(q.levels)
        key = stream_key(self.seed, self.comm.rank, self.step, phase)
        packed, norms = quantize_pack(x, table, q.bucket_size, q.norm, key,
                                      base=self._bases[tid] + base, nonfinite=q.nonfinite,
                                      threads=self.threads)
        return PackedSegment(tid, tid, x.numel(), q.bucket_size, packed, norms, q.num_levels)

    def _link(self) -> tuple[Optional[float], Optional[dict]]:
        """``(bandwidth, speeds)`` for coding="auto": the configured bandwidth, else the measured
        one; per-byte rans speeds as measured here. With allgather a payload is received and
        decoded by K - 1 ranks, which the cost model sees as a K - 1 times slower link and
        decoder."""
        bw = self.bandwidth if self.bandwidth is not None else self.measured_bandwidth
        if bw is None:  # nothing measured yet: the fastest codec
            return float("inf"), None
        peers = max(1, self.comm.size - 1) if self.strategy == "allgather" else 1
        return bw / peers, {"fixed": (0.0, 0.0),
                            "rans": (self._rans_ns[0], self._rans_ns[1] * peers)}

    def _encode(self, segments: Sequence[PackedSegment], raw: Optional[torch.Tensor]) -> torch.Tensor:
        bandwidth, speeds = self._link() if self.coding == "auto" else (None, None)
        if bandwidth == float("inf"):
            codec = "fixed"
        else:
            codec = self.coding
        t0 = time.perf_counter()
        payload = encode(segments, self._levels_table(), codec,
                         raw=[] if raw is None else [RawSegment(self.num_types, raw.detach().cpu())],
                         bandwidth=bandwidth, packed_speeds=speeds)
        if codec != "fixed":
            self._observe_rans(0, time.perf_counter() - t0, segments, payload.numel())
        return payload

    def _observe_rans(self, which: int, seconds: float, segments, nbytes: int) -> None:
        """Running estimate of the rans speed (ns per packed byte) from calls that used it."""
        packed = sum(-(-s.numel * s.width // 8) for s in segments)
        if packed > (1 << 16) and nbytes < 0.97 * packed:  # mostly rans, large enough to time
            ns = seconds * 1e9 / packed
            # what the core can do: a faster call counts at once, a slower one (the core shared
            # with backward, or with a collective's polling thread) only drifts the estimate up
            old = self._rans_ns[which]
            self._rans_ns[which] = min(ns, 0.9 * old + 0.1 * ns)

    def _observe_link(self, nbytes: int, seconds: float) -> None:
        if nbytes > (1 << 16) and seconds > 0:
            rate = nbytes / seconds
            m = self.measured_bandwidth
            self.measured_bandwidth = rate if m is None else 0.7 * m + 0.3 * rate

    def _decode_into(self, payload: torch.Tensor, sender: int, outs: Sequence[torch.Tensor],
                     raw_out: Optional[torch.Tensor], accumulate: bool) -> None:
        """Decode one payload; add (or copy) its values into ``outs`` / ``raw_out`` (None: the
        payload carries no raw segment)."""
        expected = [o.numel() for o in outs]
        raw_expected = [] if raw_out is None else [raw_out.numel()]
        t0 = time.perf_counter()
        decoded = decode(payload, max_numel=sum(expected) + sum(raw_expected), packed=True)
        got = [s.numel for s in decoded.segments]
        if got != expected or [r.numel for r in decoded.raw] != raw_expected:
            raise PayloadError(
                f"payload from rank {sender} carries segments of {got} and raw "
                f"{[r.numel for r in decoded.raw]} coordinates; this exchange expects {expected} "
                f"and {raw_expected}: the ranks disagree on the parameters or chunking")
        if "rans" in decoded.codecs:
            self._observe_rans(1, time.perf_counter() - t0, decoded.segments, len(payload))
        for seg, out in zip(decoded.segments, outs):
            if not seg.numel:
                continue
            self._dequantize(seg, decoded.levels[seg.type_id], out, accumulate, sender)
        if raw_out is not None:
            raw = torch.from_numpy(decoded.raw[0].values).to(raw_out.device)
            raw_out.add_(raw) if accumulate else raw_out.copy_(raw)

    def _dequantize(self, seg: PackedSegment, levels, out: torch.Tensor, accumulate: bool,
                    sender: int) -> None:
        mine = self.lq.quantizer(seg.type_id) if seg.type_id < self.num_types else None
        if mine is None or seg.bucket_size != mine.bucket_size:
            raise PayloadError(f"payload from rank {sender}: type {seg.type_id} with bucket size "
                               f"{seg.bucket_size}, expected "
                               f"{mine.bucket_size if mine else 'a type of this model'}")
        bad = dequantize_into(seg.packed, seg.norms, self._table(levels), seg.bucket_size, out,
                              accumulate=accumulate, threads=self.threads)
        if bad:
            raise PayloadError(f"payload from rank {sender}, segment of type {seg.type_id}: "
                               f"{bad} packed value(s) outside the alphabet of "
                               f"{2 * seg.num_levels - 1}")

    # -- the step -----------------------------------------------------------------------

    def __call__(self) -> None:
        """Aggregate every rank's ``p.grad`` into every rank's ``p.grad`` (one exchange)."""
        # Probe calls count from this process's first call: the same on every rank, also after
        # a resume (an undecided checkpoint probes again).
        probing = self.fallback and not self.fallback_decided
        timing_overlap = (self.overlap_probe and not self.overlap_decided
                          and self._overlap_possible() and self.comm.size > 1)
        t0 = time.perf_counter()
        try:
            if self._inflight or (self._overlap_now() and self.comm.size > 1):
                self._finish_overlapped()
            elif self.sends == "fp32" or (probing and self._probe_calls >= _PROBE_FP32.start - 1):
                self._send_fp32()
            else:
                self._send_quantized()
        finally:  # a new round, also after an error: no count may carry over
            if self._plan is not None:
                self._plan.reset()
            self._ready_events.clear()
        if probing:
            calls = self._probe_calls
            if calls in _PROBE_QUANTIZED or calls in _PROBE_FP32:
                self._probe_sums[calls in _PROBE_FP32] += time.perf_counter() - t0
            if calls == _PROBE_FP32[-1]:
                self._decide_fallback()
            self._probe_calls += 1
        if timing_overlap:
            # an iteration's time: from the end of the previous exchange to the end of this one
            # (optimizer step, forward, backward with the hooks' starts, this exchange)
            calls, now = self._ov_calls, time.perf_counter()
            if calls >= _OVERLAP_WARMUP and self._ov_last_end is not None:
                self._ov_sums[self._probe_overlapped(calls)] += now - self._ov_last_end
            self._ov_calls += 1
            if self._ov_calls == _OVERLAP_WARMUP + _OVERLAP_TIMED:
                self._decide_overlap()
        self._ov_last_end = time.perf_counter()
        self.step += 1

    # -- overlap with backward --------------------------------------------------------

    def _overlap_possible(self) -> bool:
        """Whether this step may start its buckets from the hooks. A function of state every
        rank shares (step, schedule, fallback's decision), so all ranks agree: level-update
        steps (their levels need every bucket's histogram first), the fallback's probe and
        float32 sending run as one block at ``synchronize()``."""
        return (self.overlap and self.strategy == "allgather" and self.sends == "quantized"
                and not (self.fallback and not self.fallback_decided)
                and not (self.lq.should_update(self.step) or self._update_deferred))

    def _overlap_now(self) -> bool:
        """Whether this step's buckets start from the hooks (while probing, in the probe's
        turn; the same on every rank: a function of the shared call count)."""
        if not self._overlap_possible():
            return False
        if self.overlap_probe and not self.overlap_decided:
            return self._probe_overlapped(self._ov_calls)
        return True

    @staticmethod
    def _probe_overlapped(calls: int) -> bool:
        return calls < _OVERLAP_WARMUP or (calls - _OVERLAP_WARMUP) // 2 % 2 == 0

    def _decide_overlap(self) -> None:
        """ONE allreduce of every rank's probe sums: every rank gets the same totals and takes
        the same branch. Overlap stays on only if it was faster per iteration: where backward
        and the codec share a core with the collectives' progress, or there is no wire time to
        hide, one block wins."""
        total = self.comm.allreduce_sum(torch.tensor(self._ov_sums, dtype=torch.float64))
        per_mode = self.comm.size * (_OVERLAP_TIMED // 2)
        block, overlapped = float(total[0]) / per_mode, float(total[1]) / per_mode
        self.overlap_measured = {"block_s": block, "overlapped_s": overlapped}
        self.overlap_decided = True
        if not overlapped < block:
            self.overlap = False

    @property
    def bucket_cap_mb(self) -> Optional[float]:
        """MiB of float32 gradient at which an overlapped bucket closes (see
        :class:`qoda_hvd.comm.buckets.BucketPlan`); ``None`` for the default (Horovod's
        ``HOROVOD_FUSION_THRESHOLD`` when set, else 25 MiB as DDP), read when the buckets are
        first made. Like every setting that shapes the collectives, it must be the same on every
        rank."""
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
    def buckets(self) -> BucketPlan:
        """The overlapped exchange's buckets (made from the parameters and the cap; the same on
        every rank)."""
        if self._plan is None:
            aligns = [self.lq.quantizer(g).bucket_size for g in range(self.num_types)] + [1]
            self._plan = BucketPlan(self.fused.groups, self.fused.buffers, aligns,
                                    bucket_cap_bytes(self._cap_mb))
        return self._plan

    @property
    def overlap_state(self) -> str:
        """``"on"``, ``"off"`` or ``"probing"``: what :meth:`grad_ready` does on steps without a
        level update (off wherever overlap cannot happen: scatter_gather, one rank, float32)."""
        if not (self.overlap and self.strategy == "allgather" and self.comm.size > 1
                and self.sends == "quantized"):
            return "off"
        return "probing" if self.overlap_probe and not self.overlap_decided else "on"

    def restart_overlap_probe(self) -> None:
        """Time the overlap probe's calls from zero (every rank at once; see
        :meth:`_decide_overlap`)."""
        self._ov_calls, self._ov_sums, self._ov_last_end = 0, [0.0, 0.0], None

    def grad_ready(self, p: torch.Tensor) -> None:
        """``p``'s gradient is final for this round (the optimizer's hook, after
        ``backward_passes_per_step`` passes). When the last gradient of a bucket arrives, the
        bucket's start (copy out, quantize, pack, encode, start its allgather) goes to the
        worker thread, and backward goes on."""
        if not (self._overlap_now() and self.comm.size > 1):
            self.buckets.ready(p)  # counted all the same: a bucket may complete later
            return
        if self._inflight:
            self.comm.progress()  # (MPI without a progress thread) let the started ones move
        event = None
        if p.is_cuda:  # where this gradient was made (models may use several streams)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(p.device))
        for i in self.buckets.buckets_of(p):
            self._ready_events.setdefault(i, []).append(event)
        for bucket in self.buckets.ready(p):
            if bucket.index not in self._inflight:
                self._submit(bucket, self._ready_events.pop(bucket.index, None))

    def _submit(self, bucket: Bucket, events: Optional[list] = None) -> None:
        device = self.fused.buffers[bucket.group].device
        self._inflight[bucket.index] = self._worker.submit(lambda: self._start_bucket(bucket),
                                                           device, events)

    def _start_bucket(self, bucket: Bucket) -> tuple:
        """On the worker thread (on CUDA: on its side stream). Returns ``(handle, own)``."""
        st, g = self.stats, bucket.group
        t0 = time.perf_counter()
        buf = self.buckets.gather(bucket, self.fused.buffers[g])
        if g < self.num_types:
            # lo is a multiple of the norm-bucket size: the same symbols as the whole buffer
            own = self._quantize(g, buf, bucket.lo, PHASE_QUANTIZE)
            t1 = time.perf_counter()
            payload = self._encode([own], None)
        else:
            own = buf.clone()
            t1 = time.perf_counter()
            payload = self._encode([], buf)
        t2 = time.perf_counter()
        handle = self.comm.allgather_async(payload, f"b{bucket.index}")
        st.quantize_s += t1 - t0
        st.encode_s += t2 - t1
        st.encoded_bytes += payload.numel()
        return handle, own

    def _finish_overlapped(self) -> None:
        """Start the buckets no hook started (gradients that never arrived count as zeros, as
        Horovod does), then wait for every bucket and decode it into its own range: the same
        symbols summed in the same rank order as one block, so the aggregate is bit-identical.

        With a communicator that runs collectives in the background (Horovod's), buckets are
        waited for in the order they started, which is about the order they arrive: the first
        ones decode while the last ones are still on the wire. Otherwise (the collective runs
        inside the wait) every rank waits in bucket order, the same on every rank."""
        st, plan = self.stats, self.buckets
        for bucket in plan.buckets:
            if bucket.index not in self._inflight:
                for p in bucket.params:  # zeros made here, on the stream that uses them later
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                self._submit(bucket)
        order = (list(self._inflight) if getattr(self.comm, "asynchronous", False)
                 else sorted(self._inflight))  # dicts keep insertion (= start) order
        wait_s = decode_s = 0.0
        try:
            for bucket in (plan.buckets[i] for i in order):
                g = bucket.group
                t0 = time.perf_counter()
                handle, own = self._inflight.pop(bucket.index).result()
                # (CUDA) this stream decodes after the side stream's copies into the buffer
                self._worker.join(self.fused.buffers[g].device)
                payloads = self.comm.wait(handle)
                t1 = time.perf_counter()
                # (no link-rate sample here: a wait that overlapped backward is not a transfer)
                buf = self.fused.buffers[g][bucket.lo:bucket.hi]
                for sender, p in enumerate(payloads):  # rank order, as in one block
                    first = sender == 0
                    if sender == self.comm.rank:
                        if g < self.num_types:
                            self._dequantize(own, self.lq.quantizer(g).levels, buf, not first,
                                             sender)
                        else:  # as the one-block path: zeros, then this rank's values added
                            if own.is_cuda:  # made on the side stream, read on this one
                                own.record_stream(torch.cuda.current_stream(own.device))
                            (buf.zero_() if first else buf).add_(own)
                    elif g < self.num_types:
                        self._decode_into(p, sender, [buf], None, accumulate=not first)
                    else:
                        self._decode_into(p, sender, [], buf, accumulate=not first)
                if self.average:
                    buf.div_(self.comm.size)
                wait_s += t1 - t0
                decode_s += time.perf_counter() - t1
        finally:
            # after an error: let what was submitted finish (its collectives are in flight)
            # before anything else touches the buffers; the handles are dropped
            for fut in self._inflight.values():
                fut.exception()
            self._inflight.clear()
        self.fused.scatter()
        st.exchange_s += wait_s
        st.decode_s += decode_s
        st.exchanges += 1
        st.coordinates += self.fused.numel

    def _send_fp32(self) -> None:
        if self._plain is None:
            self._plain = AllreduceExchange(self.fused._params, self.comm, self.average,
                                            stats=self.stats)
        self._plain()

    def _decide_fallback(self) -> None:
        """ONE allreduce of every rank's probe sums: all ranks get the same totals, so they take
        the same branch (one slow rank cannot decide alone)."""
        total = self.comm.allreduce_sum(torch.tensor(self._probe_sums, dtype=torch.float64))
        quantized = float(total[0]) / (self.comm.size * len(_PROBE_QUANTIZED))
        fp32 = float(total[1]) / (self.comm.size * len(_PROBE_FP32))
        self.fallback_measured = {"quantized_s": quantized, "fp32_s": fp32}
        self.fallback_decided = True
        if fp32 < quantized:
            self.sends = "fp32"
        else:
            self._plain = None  # its float32 buffer is not needed any more

    def _send_quantized(self) -> None:
        buffers = self.fused.gather()
        typed, raw = buffers[:-1], buffers[-1]
        if self.lq.should_update(self.step) or self._update_deferred:
            self._agree_levels(typed)
        if self.strategy == "allgather":
            self._allgather(typed, raw)
        else:
            self._scatter_gather(typed, raw)
        self.fused.scatter()
        self.stats.exchanges += 1
        self.stats.coordinates += self.fused.numel

    def _allgather(self, typed, raw) -> None:
        st = self.stats
        t0 = time.perf_counter()
        # The noise is a function of (seed, rank, step) and the coordinate alone, so a run
        # resumed from a checkpoint at step t draws what the uninterrupted run drew.
        segs = [self._quantize(tid, b, 0, PHASE_QUANTIZE) for tid, b in enumerate(typed)]
        t1 = time.perf_counter()
        payload = self._encode(segs, raw)
        t2 = time.perf_counter()
        payloads = self.comm.allgather(payload)
        t3 = time.perf_counter()
        self._observe_link(sum(p.numel() for p in payloads) - payload.numel(), t3 - t2)
        own_raw = raw.clone()  # small tensors only
        raw.zero_()
        first = True
        for sender, p in enumerate(payloads):  # rank order on every rank: identical sums
            if sender == self.comm.rank:
                # The coding is lossless: our own payload holds exactly these packed symbols
                # and norms, so add them without entropy-decoding it (same values, same order).
                for seg, buf in zip(segs, typed):
                    if seg.numel:
                        self._dequantize(seg, self.lq.quantizer(seg.type_id).levels, buf,
                                         not first, sender)
                raw.add_(own_raw)
            else:
                self._decode_into(p, sender, typed, raw, accumulate=not first)
            first = False
        if self.average:
            for buf in (*typed, raw):
                buf.div_(self.comm.size)
        st.quantize_s += t1 - t0
        st.encode_s += t2 - t1
        st.exchange_s += t3 - t2
        st.decode_s += time.perf_counter() - t3
        st.encoded_bytes += payload.numel()

    def _chunk_bounds(self) -> tuple[list[list[int]], list[list[int]], list[int]]:
        """Per type, bucket and element bounds of the K chunks; element bounds of raw chunks."""
        k = self.comm.size
        bucket_b, elem_b = [], []
        for tid, buf in enumerate(self.fused.buffers[:-1]):
            bs = self.lq.quantizer(tid).bucket_size
            nb = -(-buf.numel() // bs)
            b = _bounds(nb, k)
            bucket_b.append(b)
            elem_b.append([min(x * bs, buf.numel()) for x in b])
        return bucket_b, elem_b, _bounds(self.fused.buffers[-1].numel(), k)

    def _scatter_gather(self, typed, raw) -> None:
        st, k, me = self.stats, self.comm.size, self.comm.rank
        _, elem_b, raw_b = self._chunk_bounds()
        t0 = time.perf_counter()
        # Chunk j of each type, quantized alone: the counter is the coordinate's index in the
        # type's buffer, so this draws exactly what quantizing the whole buffer would.
        parts = [[self._quantize(tid, buf[e[j]:e[j + 1]], e[j], PHASE_QUANTIZE)
                  for tid, (buf, e) in enumerate(zip(typed, elem_b))] for j in range(k)]
        t1 = time.perf_counter()
        chunks = [self._encode(part, raw[raw_b[j]:raw_b[j + 1]]) for j, part in enumerate(parts)]
        t2 = time.perf_counter()
        received = self.comm.alltoall(chunks)
        t3 = time.perf_counter()
        self._observe_link(sum(c.numel() for c in received) - received[me].numel(), t3 - t2)
        # Reduce my chunk in place inside the fused buffers (my slice of them is mine to use).
        mine = [buf[e[me]:e[me + 1]] for buf, e in zip(typed, elem_b)]
        raw_mine = raw[raw_b[me]:raw_b[me + 1]]
        for sender, p in enumerate(received):
            self._decode_into(p, sender, mine, raw_mine, accumulate=sender > 0)
        if self.average:
            for out in (*mine, raw_mine):
                out.div_(k)
        t4 = time.perf_counter()
        # The reduced chunk is quantized again with noise independent of the first round's.
        requant = [self._quantize(tid, m, elem_b[tid][me], PHASE_REQUANTIZE)
                   for tid, m in enumerate(mine)]
        t5 = time.perf_counter()
        reduced = self._encode(requant, raw_mine)
        t6 = time.perf_counter()
        gathered = self.comm.allgather(reduced)
        t7 = time.perf_counter()
        for sender, p in enumerate(gathered):  # every rank decodes the same K payloads
            outs = [buf[e[sender]:e[sender + 1]] for buf, e in zip(typed, elem_b)]
            self._decode_into(p, sender, outs, raw[raw_b[sender]:raw_b[sender + 1]],
                              accumulate=False)
        t8 = time.perf_counter()
        st.quantize_s += (t1 - t0) + (t5 - t4)
        st.encode_s += (t2 - t1) + (t6 - t5)
        st.exchange_s += (t3 - t2) + (t7 - t6)
        st.decode_s += (t4 - t3) + (t8 - t7)
        st.encoded_bytes += sum(c.numel() for c in chunks)


class AutoTypedExchange:
    """A :class:`LayerwiseExchange` whose layer types come from the first step's gradients.

    The paper sets the number of layer types M by hand; here, on the first call, every rank
    histograms each parameter's normalised coordinates, the histograms are summed in ONE
    allreduce (that step only), and :func:`qoda_hvd.quant.auto_layer_typing` groups the
    parameters, choosing M itself. Every rank gets the same aggregate, hence the same typing;
    then ``build(typing)`` makes the real exchange, which this object delegates to. The typing is
    part of :meth:`typing_state` so a resumed run keeps it.

    Args:
        named_parameters: ``(name, parameter)`` pairs.
        communicator: the collectives.
        build: makes the layer-wise exchange for a typing.
        num_levels: levels the types will be quantized with (the grouping's cost model).
        min_numel, bucket_size, norm: as in :class:`qoda_hvd.config.LayerwiseConfig`.
        bins: histogram bins per parameter (a multiple of 256).
    """

    def __init__(self, named_parameters, communicator: Communicator, build, num_levels: int,
                 min_numel: int, bucket_size: int, norm: str, bins: int = 256) -> None:
        self._named = list(named_parameters)
        self.comm = communicator
        self._build = build
        self._num_levels = num_levels
        self._min_numel = min_numel
        self._bucket_size = bucket_size
        self._norm = norm
        self._bins = bins
        self.inner: Optional[LayerwiseExchange] = None
        self._idle_stats = ExchangeStats()
        self._overlap = False
        self._probe = False
        self._cap_mb: Optional[float] = None

    @property
    def overlap(self) -> bool:
        """Overlap with backward (see :meth:`LayerwiseExchange.grad_ready`); from the second
        step on, once the types are known."""
        return self.inner.overlap if self.inner is not None else self._overlap

    @overlap.setter
    def overlap(self, on: bool) -> None:
        self._overlap = bool(on)
        if self.inner is not None:
            self.inner.overlap = self._overlap

    @property
    def overlap_probe(self) -> bool:
        """Measure overlap against one block (see :attr:`LayerwiseExchange.overlap_probe`)."""
        return self.inner.overlap_probe if self.inner is not None else self._probe

    @overlap_probe.setter
    def overlap_probe(self, on: bool) -> None:
        self._probe = bool(on)
        if self.inner is not None:
            self.inner.overlap_probe = self._probe

    @property
    def bucket_cap_mb(self) -> Optional[float]:
        """The overlapped buckets' cap (see :attr:`LayerwiseExchange.bucket_cap_mb`)."""
        return self.inner.bucket_cap_mb if self.inner is not None else self._cap_mb

    @bucket_cap_mb.setter
    def bucket_cap_mb(self, mb: Optional[float]) -> None:
        if mb is not None:
            bucket_cap_bytes(mb)  # checked now, not at the first step
        self._cap_mb = mb
        if self.inner is not None:
            self.inner.bucket_cap_mb = mb

    def grad_ready(self, p: torch.Tensor) -> None:
        """Forwarded to the layer-wise exchange once the types are known (a no-op before)."""
        if self.inner is not None:
            self.inner.grad_ready(p)

    def __getattr__(self, name):
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(f"{name!r}: the layer types are found at the first exchange")
        return getattr(inner, name)

    @property
    def stats(self) -> ExchangeStats:
        return self.inner.stats if self.inner is not None else self._idle_stats

    def _find_typing(self) -> LayerTyping:
        from qoda_hvd.quant import auto_layer_typing, normalized_histogram

        small = {n for n, p in self._named if p.dim() <= 1 or p.numel() < self._min_numel}
        typed = [(n, p) for n, p in self._named if n not in small]
        hists = [normalized_histogram(p.grad if p.grad is not None else torch.zeros_like(p),
                                      bins=self._bins, bucket_size=self._bucket_size,
                                      norm=self._norm).cpu()
                 for _, p in typed]
        flat = torch.cat(hists) if hists else torch.zeros(0, dtype=torch.float64)
        total = self.comm.allreduce_sum(flat).reshape(len(typed), self._bins)
        return auto_layer_typing({n: total[i] for i, (n, _) in enumerate(typed)}, self._num_levels,
                                 uncompressed=small, numels={n: p.numel() for n, p in self._named})

    def __call__(self) -> None:
        if self.inner is None:
            self.inner = self._build(self._find_typing())
            self.inner.overlap = self._overlap
            self.inner.bucket_cap_mb = self._cap_mb
            self.inner.overlap_probe = self._probe
        self.inner()

    def typing_state(self) -> Optional[dict]:
        """The found typing as plain data (None before the first exchange)."""
        if self.inner is None:
            return None
        t = self.inner.typing
        return {"type_ids": dict(t.type_ids), "type_names": list(t.type_names),
                "uncompressed": sorted(t.uncompressed), "numels": dict(t.numels)}

    def load_typing_state(self, state: Optional[dict]) -> None:
        """Rebuild the exchange with a saved typing (from :meth:`typing_state`)."""
        if state is not None:
            self.inner = self._build(LayerTyping(state["type_ids"], tuple(state["type_names"]),
                                                 frozenset(state["uncompressed"]), state["numels"]))
            self.inner.overlap = self._overlap
            self.inner.bucket_cap_mb = self._cap_mb
            self.inner.overlap_probe = self._probe
