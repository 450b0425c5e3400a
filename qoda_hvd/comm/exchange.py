"""The exchanges: every rank's ``p.grad`` -> the aggregate in every rank's ``p.grad``, once a step.

Every exchange reads ``p.grad`` of a fixed list of parameters, leaves the aggregate
``(1/K) sum_k Q(g_k)`` (or the sum, for ``op=Sum``) in ``p.grad`` on every rank, bit-identical
across ranks, and counts what it did in :class:`ExchangeStats`.

- :class:`AllreduceExchange` (``Compression.none`` / ``fp16``): one fused allreduce.
- :class:`LayerwiseExchange`: the gradients fused per layer type (:mod:`~qoda_hvd.comm.fusion`),
  quantized, packed and entropy coded (:mod:`~qoda_hvd.comm.codec`), reduced by one strategy
  (:mod:`~qoda_hvd.comm.strategies`: allgather or scatter_gather), ONE exchange per call. It
  composes the pieces that decide how a step runs, each in its own module: the level schedule
  (:class:`~qoda_hvd.quant.LayerwiseQuantizer`; on scheduled steps one small allreduce), the
  link model behind ``coding="auto"`` (:mod:`~qoda_hvd.comm.link`), the overlapped rounds
  (:mod:`~qoda_hvd.comm.overlap`), and two measured decisions (:mod:`~qoda_hvd.comm.decision`):

  - ``fallback=True``: quantizing and coding take CPU/GPU time, which pays only while the link
    is the bottleneck. Calls 1-3 are timed quantized, calls 5-7 sending float32 (calls 0 and 4
    warm each path up); every rank keeps the faster: quantized, or one fused float32 allreduce
    per step as ``Compression.none``.
  - ``overlap_probe`` (the optimizer's ``overlap=None``): over the first calls where overlap is
    possible, overlapped and one-block iterations are timed in turn (pairs, so the two calls of
    an extra-gradient iteration share a mode) and every rank keeps the faster.

  Every setting that shapes its collectives is agreed at the first call in this process, in
  one set-up collective (:mod:`~qoda_hvd.comm.agreement`), and all of its state (step, levels, both decisions) is in
  :meth:`LayerwiseExchange.state_dict`, restored identically on every rank.
"""
from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import torch

from qoda_hvd.comm.agreement import check_agreed, settings_digest
from qoda_hvd.comm.autotype import AutoTypedExchange
from qoda_hvd.comm.base import Communicator
from qoda_hvd.comm.codec import LayerwiseCodec
from qoda_hvd.comm.decision import AgreedChoice
from qoda_hvd.comm.fusion import FusedGradients
from qoda_hvd.comm.link import LinkModel
from qoda_hvd.comm.overlap import OverlappedRounds
from qoda_hvd.comm.stats import ExchangeStats
from qoda_hvd.comm.strategies import REDUCTIONS, STRATEGIES, choose_strategy
from qoda_hvd.quant import LayerwiseQuantizer, LayerTyping

__all__ = ["AllreduceExchange", "AutoTypedExchange", "ExchangeStats", "FusedGradients",
           "LayerwiseExchange", "STRATEGIES", "choose_strategy"]

#: ``fallback``'s probe: (option, timed) per call; 0 quantized, 1 float32.
FALLBACK_SCHEDULE = [(0, False), (0, True), (0, True), (0, True),
                     (1, False), (1, True), (1, True), (1, True)]

#: The overlap probe, in calls where overlap is possible: calls 0-1 warm up overlapped; calls
#: 2-13 are timed in pairs, overlapped and one block in turn; 0 one block, 1 overlapped.
OVERLAP_SCHEDULE = [(1, False), (1, False)] + [(1 - (j // 2) % 2, True) for j in range(12)]


class AllreduceExchange:
    """``Compression.none`` / ``fp16`` through the wrapper: ONE fused allreduce per step.

    Args:
        params: the parameters whose gradients are summed.
        communicator: the collectives.
        average: divide the sum by K.
        fp16: send float16.
        stats: count into these (another exchange's), or new ones.

    Example::

        >>> from qoda_hvd.comm import LocalGroup
        >>> w = torch.zeros(3, requires_grad=True)
        >>> w.grad = torch.ones(3)
        >>> ex = AllreduceExchange([w], LocalGroup(1)[0])
        >>> ex(); w.grad.tolist(), ex.stats.exchanges
        ([1.0, 1.0, 1.0], 1)
    """

    def __init__(self, params: Sequence[torch.Tensor], communicator: Communicator,
                 average: bool = True, fp16: bool = False,
                 stats: Optional[ExchangeStats] = None) -> None:
        self.comm = communicator
        self.average = average
        self.fused = FusedGradients([params], torch.float16 if fp16 else torch.float32)
        self.stats = ExchangeStats() if stats is None else stats

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
        threads: CPU threads of the codec kernels (None: torch's setting, capped by the cores
            per rank on the node).
        overlap: start each bucket's allgather from the gradient hooks (:meth:`grad_ready`;
            allgather only).
        overlap_probe: with ``overlap``, measure it against one block and keep the faster.
        bucket_cap_mb: the overlapped buckets' cap (:attr:`bucket_cap_mb`).
        name: prefix of this exchange's collective names: the same on every rank, unique per
            exchange whose collectives may be in flight at once (one per optimizer).

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
                 threads: Optional[int] = None, *, overlap: bool = False,
                 overlap_probe: bool = False, bucket_cap_mb: Optional[float] = None,
                 name: str = "qoda") -> None:
        self.typing = typing
        self.lq = quantizer
        self.comm = communicator
        self.strategy = choose_strategy(strategy, communicator.size)
        #: the reduction of the typed buffers (the two-level exchange puts its own here)
        self.reduction = REDUCTIONS[self.strategy]
        self.coding = coding
        self.average = average
        self.bandwidth = bandwidth
        self.seed = seed
        self.threads = threads
        self.name = name
        groups: list[list[torch.Tensor]] = [[] for _ in range(typing.num_types)]
        raw: list[torch.Tensor] = []
        for pname, p in named_parameters:
            tid = typing.type_id(pname)
            (raw if tid < 0 else groups[tid]).append(p)
        self.fused = FusedGradients(groups + [raw])
        self.num_types = typing.num_types
        self.stats = ExchangeStats()
        self.link = LinkModel(bandwidth)
        self.codec = LayerwiseCodec(quantizer, [b.numel() for b in self.fused.buffers[:-1]],
                                    communicator.rank, seed, coding, self.link, threads)
        self.rounds = OverlappedRounds(self.fused, self.codec, communicator, self.stats, name,
                                       bucket_cap_mb)
        limit = getattr(communicator, "limit_payloads", None)
        if callable(limit):  # lengths from peers bounded by what an honest payload can be
            limit(self.fused.numel, self.num_types + 1)
        #: Start each bucket's collective from the gradient hooks (see :meth:`grad_ready`).
        self.overlap = bool(overlap)
        #: With ``overlap``: time overlapped and one-block iterations and keep the faster.
        self.overlap_probe = bool(overlap_probe)
        self.fallback = bool(fallback)
        self.fallback_choice = AgreedChoice(("quantized", "fp32"), FALLBACK_SCHEDULE)
        self.overlap_choice = AgreedChoice(("block", "overlapped"), OVERLAP_SCHEDULE)
        self._update_deferred = False  # a level update postponed by an all-zero gradient
        self._plain: Optional[AllreduceExchange] = None  # the float32 path, made when used
        self._agreed = False  # settings agreed with the other ranks, in this process
        self._last_end: Optional[float] = None  # end of the previous call (overlap probe)

    # -- state every rank shares --------------------------------------------------------

    @property
    def step(self) -> int:
        """Calls made over the run (checkpoints included): keys the noise and the schedule."""
        return self.codec.step

    @step.setter
    def step(self, value: int) -> None:
        self.codec.step = int(value)

    @property
    def sends(self) -> str:
        """``"quantized"``, or ``"fp32"`` once ``fallback`` measured float32 to be faster."""
        c = self.fallback_choice
        return "fp32" if self.fallback and c.decided and c.choice == 1 else "quantized"

    @property
    def fallback_decided(self) -> bool:
        return self.fallback_choice.decided

    @property
    def fallback_measured(self) -> Optional[dict[str, float]]:
        """Mean seconds per exchange call of each path over the probe, all ranks."""
        return self.fallback_choice.measured

    @property
    def overlap_decided(self) -> bool:
        return self.overlap_choice.decided

    @property
    def overlap_measured(self) -> Optional[dict[str, float]]:
        """Mean seconds per iteration of each mode over the probe, all ranks."""
        return self.overlap_choice.measured

    @property
    def measured_bandwidth(self) -> Optional[float]:
        return self.link.measured_bandwidth

    @property
    def overlap_state(self) -> str:
        """``"on"``, ``"off"`` or ``"probing"``: what :meth:`grad_ready` does on steps without a
        level update (off wherever overlap cannot happen: scatter_gather, one rank, float32)."""
        if not (self._overlap_wanted() and self.strategy == "allgather" and self.comm.size > 1
                and self.sends == "quantized"):
            return "off"
        return "probing" if self._probing_overlap() else "on"

    def state_dict(self) -> dict[str, Any]:
        """Everything that decides this exchange's next collectives, as plain data: the step,
        the levels, both decisions (the keys of earlier releases' checkpoints)."""
        return {"step": self.step, "levels": self.lq.state_dict(),
                "sends": self.sends, "fallback_decided": self.fallback_decided,
                "fallback_measured": self.fallback_measured,
                "overlap_decided": self.overlap_decided,
                "overlap": self.overlap_decided and self.overlap_choice.choice == 1,
                "overlap_measured": self.overlap_measured,
                "update_deferred": self._update_deferred}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; decisions load whatever this exchange's flags (a rank
        that rebuilt its exchange must not forget a choice the others keep); undecided probes
        start again from their first call."""
        self.step = int(state["step"])
        self.lq.load_state_dict(state["levels"])
        self._update_deferred = bool(state.get("update_deferred", False))
        decided = bool(state.get("fallback_decided", False))
        self.fallback_choice.load_state_dict({
            "decided": decided, "choice": int(state.get("sends") == "fp32"),
            "measured": state.get("fallback_measured")})
        decided = bool(state.get("overlap_decided", False))
        self.overlap_choice.load_state_dict({
            "decided": decided, "choice": int(bool(state.get("overlap", False))),
            "measured": state.get("overlap_measured")})
        self._agreed = False

    def restart_probes(self) -> None:
        """Every rank at once (inside a broadcast of the state): undecided probes time from
        their first call again, and the settings are agreed again at the next call."""
        for choice in (self.fallback_choice, self.overlap_choice):
            if not choice.decided:
                choice.restart()
        self._agreed = False

    def adopt_progress(self, old) -> None:
        """Continue the probes of ``old`` (the exchange this one replaces on a re-form): their
        partial counts, and whether the settings were agreed, so this rank stays in step with
        ranks that did not re-form."""
        old = getattr(old, "inner", old)
        if isinstance(old, LayerwiseExchange):
            self.fallback_choice, self.overlap_choice = old.fallback_choice, old.overlap_choice
            self._agreed, self._last_end = old._agreed, old._last_end

    def restart_overlap_probe(self) -> None:
        """Time the overlap probe's calls from zero (every rank at once)."""
        self.overlap_choice.restart()

    def settings(self) -> dict[str, Any]:
        """What must be the same on every rank for the collectives to match."""
        return {"name": self.name, "strategy": self.strategy, "coding": self.coding,
                "average": self.average, "seed": self.seed, "fallback": self.fallback,
                "overlap": (self.overlap, self.overlap_probe),
                "bucket_cap_bytes": self.rounds.cap_bytes if self.overlap else None,
                "layout": [b.numel() for b in self.fused.buffers],
                "types": list(self.typing.type_names),
                "levels": [int(self.lq.levels(t).numel()) for t in range(self.num_types)],
                "step": self.step, "update_deferred": self._update_deferred,
                "fallback_state": (self.fallback_choice.decided, self.fallback_choice.choice,
                                   self.fallback_choice.calls),
                "overlap_state": (self.overlap_choice.decided, self.overlap_choice.choice,
                                  self.overlap_choice.calls)}

    # -- the step -----------------------------------------------------------------------

    def __call__(self) -> None:
        """Aggregate every rank's ``p.grad`` into every rank's ``p.grad`` (one exchange)."""
        probing_fallback = self.fallback and not self.fallback_choice.decided
        timing_overlap = self._probing_overlap() and self._overlap_possible()
        t0 = time.perf_counter()
        try:
            if self.rounds.in_flight or (self._overlap_now() and self.comm.size > 1):
                self.rounds.finish(self._divisor())
                self.stats.exchanges += 1
                self.stats.coordinates += self.fused.numel
            elif self.fallback and self.fallback_choice.option() == 1:
                self._agree_settings()
                self._send_fp32()
            else:
                self._send_quantized()
        finally:  # a new round, also after an error: no count may carry over
            self.rounds.reset()
            self.codec.invalid.reset()
        end = time.perf_counter()
        if probing_fallback:
            self.fallback_choice.record(end - t0, self.comm)
            if self.fallback_choice.decided and self.sends != "fp32":
                self._plain = None  # its float32 buffer is not needed any more
        if timing_overlap:
            # an iteration's time: from the end of the previous exchange to the end of this one
            # (optimizer step, forward, backward with the hooks' starts, this exchange)
            last = self._last_end
            self.overlap_choice.record(0.0 if last is None else end - last, self.comm)
        self._last_end = time.perf_counter()
        self.step += 1

    def abort_round(self) -> None:
        """After a failed round on this rank: wait for what the worker started, drop its
        handles and readiness counts, so the next round starts clean (no state is lost)."""
        self.rounds.abort()

    def _divisor(self) -> Optional[int]:
        return self.comm.size if self.average else None

    def _agree_settings(self) -> None:
        """At the first call in this process: every rank's settings in ONE set-up allgather
        (:mod:`~qoda_hvd.comm.agreement`); the same error on every rank if they differ."""
        if not self._agreed:
            settings = self.settings()
            check_agreed(self.comm.agree(settings_digest(settings)), settings)
            self._agreed = True

    # -- overlap with backward --------------------------------------------------------

    def _overlap_wanted(self) -> bool:
        c = self.overlap_choice
        return self.overlap and not (self.overlap_probe and c.decided and c.choice == 0)

    def _probing_overlap(self) -> bool:
        return self.overlap and self.overlap_probe and not self.overlap_choice.decided

    def _overlap_possible(self) -> bool:
        """Whether this step may start its buckets from the hooks. A function of state every
        rank shares (step, schedule, fallback's decision, settings agreed), so all ranks agree:
        level-update steps (their levels need every bucket's histogram first), the fallback's
        probe, float32 sending and the first call in a process (it agrees the settings) run as
        one block at ``synchronize()``."""
        return (self._overlap_wanted() and self.strategy == "allgather" and self._agreed
                and self.sends == "quantized" and self.comm.size > 1
                and not (self.fallback and not self.fallback_choice.decided)
                and not (self.lq.should_update(self.step) or self._update_deferred))

    def _overlap_now(self) -> bool:
        """Whether this step's buckets start from the hooks (while probing, in the probe's
        turn: a function of the shared call count)."""
        if not self._overlap_possible():
            return False
        return self.overlap_choice.option() == 1

    @property
    def bucket_cap_mb(self) -> Optional[float]:
        """MiB of float32 gradient at which an overlapped bucket closes (see
        :attr:`qoda_hvd.comm.overlap.OverlappedRounds.bucket_cap_mb`)."""
        return self.rounds.bucket_cap_mb

    @bucket_cap_mb.setter
    def bucket_cap_mb(self, mb: Optional[float]) -> None:
        self.rounds.bucket_cap_mb = mb

    @property
    def buckets(self):
        """The overlapped exchange's buckets (a :class:`~qoda_hvd.comm.buckets.BucketPlan`)."""
        return self.rounds.plan

    def grad_ready(self, p: torch.Tensor) -> None:
        """``p``'s gradient is final for this round (the optimizer's hook, after
        ``backward_passes_per_step`` passes). When the last gradient of a bucket arrives, the
        bucket's start (copy out, quantize, pack, encode, start its allgather) goes to the
        worker thread, and backward goes on."""
        self.rounds.ready(p, start=self._overlap_now())

    # -- one block --------------------------------------------------------------------

    def _send_fp32(self) -> None:
        if self._plain is None:
            self._plain = AllreduceExchange(self.fused.params, self.comm, self.average,
                                            stats=self.stats)
        self._plain()

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

    def _send_quantized(self) -> None:
        self._agree_settings()
        buffers = self.fused.gather()
        typed, raw = buffers[:-1], buffers[-1]
        if self.lq.should_update(self.step) or self._update_deferred:
            self._agree_levels(typed)
        self.reduction(self.codec, self.comm, typed, raw, self.stats, self._divisor())
        self.fused.scatter()
        self.stats.exchanges += 1
        self.stats.coordinates += self.fused.numel
