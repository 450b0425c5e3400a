"""The layer-wise quantized, entropy-coded exchange as a PyTorch DDP communication hook.

Per DDP bucket, on the state's worker thread (the hook itself returns a future at once):

1. the bucket's coordinates are copied, type by type, into the bucket's scratch buffer (one
   fused copy; the grouping is computed once per bucket, see :mod:`qoda_hvd.ddp._base`);
2. each type's coordinates are quantized and packed in one kernel pass
   (:func:`qoda_hvd.kernels.dispatch.quantize_pack`), the noise a function of ``(seed, rank,
   step)`` and the coordinate's counter ``bucket_index * 2**36 + offset``, so no two coordinates
   of a step share noise and a resumed run draws what the uninterrupted one drew;
3. the packed segments and the uncompressed float32 coordinates are entropy coded into ONE
   payload (:func:`qoda_hvd.coding.encode`);
4. the payloads' lengths are allgathered (8 bytes per rank), then the payloads, padded to the
   longest, in ONE ``all_gather_into_tensor`` started asynchronously: the worker goes on with
   the next bucket while it is on the wire;
5. when it lands, every rank decodes the K payloads in rank order (its own from its packed
   symbols: the coding is lossless) and adds them, scaled by 1/K, into the scratch, and copies
   the result into the bucket: the same bytes summed in the same order on every rank, so the
   parameters stay bit-identical.

The codec is :class:`qoda_hvd.comm.codec.LayerwiseCodec`, the Horovod path's (kernels of
:mod:`qoda_hvd.kernels`, wire format of :mod:`qoda_hvd.coding`, ``coding="auto"`` weighed by
its :class:`~qoda_hvd.comm.link.LinkModel`).

Levels are re-optimised on the :class:`~qoda_hvd.quant.LayerwiseQuantizer` schedule (steps 0,
200, 1000, 5000, then every 10000 by default), as on the Horovod path: on such a step the
buckets wait for the last one, the histograms of all of them are summed in ONE small allreduce,
and every rank sets the same levels from the same sums before any bucket is quantized. Ordinary
steps have no extra round. ``types="auto"`` finds the types the same way on the first step.

Gradients holding NaN/Inf are sent as such (a NaN norm, zero symbols): every rank gets NaN in
the same places of the aggregate (a ``GradScaler`` then skips the step everywhere); no rank
raises alone.
"""
import threading
import time
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
import torch.distributed as dist

from qoda_hvd.comm.codec import LayerwiseCodec, add_scaled
from qoda_hvd.comm.link import LinkModel
from qoda_hvd.config import LayerwiseConfig
from qoda_hvd.ddp._base import BucketLayout, CompressionStats, HookStateBase, Job
from qoda_hvd.quant import LayerTyping, LayerwiseQuantizer

__all__ = ["LayerwiseHookState", "layerwise_hook", "HookStats"]

#: Counter stride between buckets: 2**36 coordinates per bucket, far above any DDP bucket.
_BUCKET_STRIDE_BITS = 36

_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class HookStats:
    """Cumulative counts of one hook state on this rank.

    Attributes:
        steps: synchronised steps (one per DDP backward that communicated).
        buckets: buckets exchanged compressed.
        coordinates: gradient coordinates aggregated compressed.
        payload_bytes: bytes of this rank's payloads (each is received by the K - 1 others).
        bytes_received: bytes of the other ranks' payloads received.
        wire_bytes_received: what the collectives brought in: the payloads padded to the
            longest of their bucket, and the 8-byte lengths.
        plain_coordinates: coordinates sent as a plain float32 allreduce.
        level_updates: level agreements (each one small allreduce).
        quantize_s, encode_s, lengths_s, exchange_s, decode_s: seconds in each phase (the
            worker's and the collective's clocks; lengths_s is the blocking round of the
            payloads' lengths, exchange_s runs from starting the payloads' gather to its end).
    """

    steps: int = 0
    buckets: int = 0
    coordinates: int = 0
    payload_bytes: int = 0
    bytes_received: int = 0
    wire_bytes_received: int = 0
    plain_coordinates: int = 0
    level_updates: int = 0
    quantize_s: float = 0.0
    encode_s: float = 0.0
    lengths_s: float = 0.0
    exchange_s: float = 0.0
    decode_s: float = 0.0

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class LayerwiseHookState(HookStateBase):
    """State of :func:`layerwise_hook`: the layer types, the levels, the noise, the counts.

    Args:
        process_group: the group to average over (None: the default group). Gloo (CPU
            tensors) and NCCL (the payloads travel in device buffers) both work.
        model: the module DDP wraps (or the DDP wrapper): names the gradients for the layer
            typing. Required, here or later through :meth:`bind`.
        bits: bits per symbol before entropy coding, in [2, 8] (``2**(bits-1)`` levels).
        levels: ``"optimal"`` (adapted on ``schedule``), ``"uniform"`` or ``"exponential"``.
        coding: ``"auto"`` (fixed or rans per segment, weighed against the link rate),
            ``"fixed"``, ``"rans"``, ``"ans"``, ``"elias"`` or ``"zstd"``.
        types: ``None`` (rules on ``model``'s modules and names), ``{pattern: type}``
            overrides, another ``nn.Module`` to type, or ``"auto"`` (found from the first
            step's gradients, all ranks alike).
        bucket_size: coordinates per norm, in [16, 2**24].
        min_numel: tensors with fewer elements, or 1-D, travel as float32.
        norm: ``"l2"`` or ``"linf"``.
        schedule, every: the level re-optimisation steps (as the Horovod path).
        allocate: choose the number of levels per type under a variance budget.
        bandwidth: link bytes/s for ``coding="auto"`` (None: the rate measured on the
            exchanges; fixed-width until measured).
        seed: the rounding noise's seed (mixed with the rank and step).
        threads: CPU threads of the kernels (None: torch's, capped by the cores per local rank).
        average: divide the sum by K (DDP's mean), else leave the sum.

    Example::

        >>> import torch.nn as nn
        >>> from torch.nn.parallel import DistributedDataParallel as DDP
        >>> model = nn.Linear(64, 64)
        >>> ddp = DDP(model)                                              # doctest: +SKIP
        >>> state = LayerwiseHookState(model=model, bits=4)               # doctest: +SKIP
        >>> ddp.register_comm_hook(state, layerwise_hook)                 # doctest: +SKIP
        >>> LayerwiseHookState(model=model, bits=9)
        Traceback (most recent call last):
        ...
        ValueError: bits must be in [2, 8], got 9
    """

    _TRANSIENT = HookStateBase._TRANSIENT + ("_typing", "_lq", "_codec", "_stats_lock",
                                             "_decode_lock")

    def __init__(self, process_group=None, model=None, *, bits: int = 4, levels: str = "optimal",
                 coding: str = "auto", types: Any = None, bucket_size: int = 1024,
                 min_numel: int = 1024, norm: str = "l2",
                 schedule: tuple = (0, 200, 1000, 5000), every: int = 10_000,
                 allocate: bool = False, bandwidth: Optional[float] = None, seed: int = 0,
                 threads: Optional[int] = None, average: bool = True) -> None:
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got "
                            f"{type(process_group).__name__}")
        if not isinstance(average, bool):
            raise TypeError(f"average must be a bool, got {type(average).__name__}")
        self.config = LayerwiseConfig(bits=bits, levels=levels, coding=coding, types=types,
                                      bucket_size=bucket_size, min_numel=min_numel, norm=norm,
                                      schedule=tuple(schedule), every=every, allocate=allocate,
                                      bandwidth=bandwidth, seed=seed, threads=threads)
        self.average = average
        self.stats = HookStats()
        self._typing_state: Optional[dict] = None
        self._levels_state: Optional[list] = None
        self._update_deferred = False
        if isinstance(types, torch.nn.Module):  # typed now; the config keeps no module
            from qoda_hvd.quant import classify_parameters

            self._typing_state = _typing_to_state(classify_parameters(types, min_numel=min_numel))
            self.config = LayerwiseConfig(**{**self.config.__dict__, "types": None})
        super().__init__(process_group, model)

    def _init_transient(self) -> None:
        super()._init_transient()
        self._typing: Optional[LayerTyping] = None
        self._lq: Optional[LayerwiseQuantizer] = None
        self._codec: Optional[LayerwiseCodec] = None
        self._stats_lock = threading.Lock()
        # decodes of two buckets may land on two collective threads at once: the codec's tally
        # of invalid symbols is checked once per bucket, so one bucket decodes at a time
        self._decode_lock = threading.Lock()

    # -- typing and levels -------------------------------------------------------------

    def _on_bind(self, named) -> None:
        from qoda_hvd.quant import classify_parameters

        cfg = self.config
        if self._typing_state is not None:
            typing = _typing_from_state(self._typing_state)
        elif cfg.types == "auto":
            typing = None
        else:
            typing = classify_parameters(self._model, overrides=cfg.types,
                                         min_numel=cfg.min_numel)
        missing = [n for n, _ in named if typing is not None and n not in typing.type_ids
                   and n not in typing.uncompressed]
        if missing:
            raise ValueError(f"types does not name the model's parameters {missing[:5]}: pass the "
                             "model DDP wraps")
        self._set_typing(typing)

    def _set_typing(self, typing: Optional[LayerTyping]) -> None:
        self._typing, self._lq, self._codec = typing, None, None
        self._layouts.clear()
        if typing is None:
            return
        cfg = self.config
        self._lq = LayerwiseQuantizer(typing, bits=cfg.bits, family=cfg.levels,
                                      bucket_size=cfg.bucket_size, norm=cfg.norm,
                                      schedule=cfg.schedule, every=cfg.every,
                                      allocate=cfg.allocate, nonfinite="propagate")
        if self._levels_state is not None:
            self._lq.load_state_dict({"levels": self._levels_state})

    @property
    def typing(self) -> Optional[LayerTyping]:
        """The layer typing (None with ``types="auto"`` before the first step)."""
        return self._typing

    @property
    def quantizer(self) -> Optional[LayerwiseQuantizer]:
        """The per-type levels (None before the types are known)."""
        return self._lq

    @property
    def codec(self) -> LayerwiseCodec:
        """The codec (its noise counters are the hook's own, per bucket: no type offsets)."""
        if self._codec is None:
            cfg = self.config
            self._codec = LayerwiseCodec(self._lq, [0] * self._lq.num_types, self.rank, cfg.seed,
                                         cfg.coding, LinkModel(cfg.bandwidth), cfg.threads)
        return self._codec

    # -- the steps ----------------------------------------------------------------------

    def _needs_all(self, step: int) -> bool:
        return (self._typing is None or self._update_deferred
                or self._lq.should_update(step))

    def _make_layout(self, job: Job, key: tuple) -> Optional[BucketLayout]:
        typing = self._typing
        if typing is None:
            return None
        t = typing.num_types

        def group_of(name, p):
            tid = typing.type_id(name)
            return t if tid < 0 else tid

        return BucketLayout.build(job.index, key, job.buffer, job.params, self._name_of,
                                  self._rank_of, group_of, t + 1)

    def _agree(self, jobs: list) -> None:
        """On the worker, at the last bucket of a step that needs all: the types (first step of
        ``types="auto"``), then the levels, each from ONE allreduce every rank joins."""
        if self._typing is None:
            self._find_typing(jobs)
            for j in jobs:
                j.layout = self._layout(j)
        if not (self._update_deferred or self._lq.should_update(jobs[-1].step)):
            return
        lq = self._lq
        for j in jobs:
            j.layout.gather()
            for tid in range(lq.num_types):
                x = j.layout.group(tid)
                if x.numel():
                    lq.observe(tid, x)
        aggregate = self._allreduce_sum_(lq.histograms(self._reduce_device(jobs[0])))
        # every rank sees the same sums and takes the same branch: all-zero gradients say
        # nothing about the levels, and the update moves to the next step
        self._update_deferred = not bool(aggregate.sum() > 0)
        if not self._update_deferred:
            lq.set_histograms(aggregate.cpu())
            self.stats.level_updates += 1
            self._levels_state = None

    def _reduce_device(self, job: Job) -> torch.device:
        return self.comm_device(job.buffer)

    def _find_typing(self, jobs: list) -> None:
        from qoda_hvd.quant import auto_layer_typing, normalized_histogram

        cfg = self.config
        grads = {}
        for j in jobs:  # the first step only
            pieces = j.buffer.split([p.numel() for p in j.params])
            for p, piece in zip(j.params, pieces):
                grads[self._name_of[id(p)]] = (piece, p)
        named = sorted(grads, key=self._rank_of.__getitem__)
        small = {n for n in named if grads[n][1].dim() <= 1 or grads[n][1].numel() < cfg.min_numel}
        typed = [n for n in named if n not in small]
        bins = 256
        hists = [normalized_histogram(grads[n][0], bins=bins, bucket_size=cfg.bucket_size,
                                      norm=cfg.norm).cpu() for n in typed]
        flat = torch.cat(hists) if hists else torch.zeros(0, dtype=torch.float64)
        dev = self._reduce_device(jobs[0])
        total = self._allreduce_sum_(flat.to(dev)).cpu().reshape(len(typed), bins)
        lq_levels = 2 ** (cfg.bits - 1)
        typing = auto_layer_typing({n: total[i] for i, n in enumerate(typed)}, lq_levels,
                                   uncompressed=small,
                                   numels={n: grads[n][1].numel() for n in named})
        self._typing_state = _typing_to_state(typing)
        self._set_typing(typing)

    def _run(self, job: Job) -> None:
        """One bucket (module doc, steps 1-5), on the worker."""
        lay, codec, k = job.layout, self.codec, self.size
        t0 = time.perf_counter()
        lay.gather()
        nt = self._lq.num_types
        base = job.index << _BUCKET_STRIDE_BITS
        tids = [t for t in range(nt) if lay.bounds[t + 1] > lay.bounds[t]]
        codec.step = job.step
        segs = [codec.quantize(t, lay.group(t), base + lay.bounds[t]) for t in tids]
        raw = lay.group(nt) if lay.bounds[nt + 1] > lay.bounds[nt] else None
        t1 = time.perf_counter()
        payload = codec.encode(segs, raw, k - 1)
        own_raw = raw.clone() if raw is not None else None
        t2 = time.perf_counter()
        with self._stats_lock:
            st = self.stats
            st.quantize_s += t1 - t0
            st.encode_s += t2 - t1
            st.payload_bytes += payload.numel()
        if k == 1:
            self._finish(job, tids, segs, own_raw, [payload], t2, 0)
            return
        dev = self.comm_device(job.buffer)
        n = payload.numel()
        sizes = torch.empty(k, dtype=torch.int64, device=dev)
        _all_gather_tensor(sizes, torch.tensor([n], dtype=torch.int64, device=dev),
                           group=self.group)
        lengths = sizes.tolist()
        m = max(lengths)
        send = torch.zeros(m, dtype=torch.uint8, device=dev)
        send[:n].copy_(payload)
        recv = torch.empty(k * m, dtype=torch.uint8, device=dev)
        t3 = time.perf_counter()
        with self._stats_lock:
            self.stats.lengths_s += t3 - t2
        work = _all_gather_tensor(recv, send, group=self.group, async_op=True)
        wire = (k - 1) * (m + 8)

        def landed(host: torch.Tensor) -> None:
            payloads = [host[r * m:r * m + lengths[r]] for r in range(k)]
            self._finish(job, tids, segs, own_raw, payloads, t3, wire)

        if dev.type == "cuda":  # decoded here, on the worker's stream, after the gather
            work.wait()
            landed(recv.cpu())
            return

        def callback(fut) -> None:
            try:
                landed(recv)
            except BaseException as e:
                if not job.future.done():
                    job.future.set_exception(e)

        work.get_future().then(callback)

    def _finish(self, job: Job, tids, segs, own_raw, payloads, t_sent: float, wire: int) -> None:
        """Decode the K payloads in rank order into the scratch, each scaled by 1/K (the mean),
        copy the result into the bucket, complete the bucket's future."""
        lay, codec, k, me = job.layout, self.codec, self.size, self.rank
        t0 = time.perf_counter()
        nt = self._lq.num_types
        outs = [lay.group(t) for t in tids]
        raw = lay.group(nt) if own_raw is not None else None
        scale = 1.0 / k if self.average else 1.0
        with self._decode_lock:
            for sender, payload in enumerate(payloads):  # rank order on every rank
                first = sender == 0
                if sender == me:  # lossless coding: our own symbols, not our payload
                    for seg, out in zip(segs, outs):
                        codec.dequantize(seg, out, not first, sender, None, scale)
                    if raw is not None:
                        add_scaled(raw, own_raw, scale, not first)
                else:
                    codec.decode_into(payload, sender, outs, raw, not first, scale)
            codec.check_decoded()
        lay.scatter()
        t1 = time.perf_counter()
        received = sum(p.numel() for r, p in enumerate(payloads) if r != self.rank)
        if k > 1:
            codec.link.observe_link(received, t0 - t_sent)
        with self._stats_lock:
            st = self.stats
            st.buckets += 1
            st.coordinates += job.buffer.numel()
            st.bytes_received += received
            st.wire_bytes_received += wire
            st.exchange_s += t0 - t_sent if k > 1 else 0.0
            st.decode_s += t1 - t0
            if job.last:
                st.steps += 1
        job.future.set_result(job.buffer)

    def _count_plain(self, buffer: torch.Tensor) -> None:
        self.stats.plain_coordinates += buffer.numel()

    # -- reports and checkpoints --------------------------------------------------------

    def compression_stats(self) -> CompressionStats:
        """``(compress_rate, numel_before, numel_after)`` like torch's PowerSGD state, where
        ``numel_after`` is this rank's payload bytes / 4 (float32 equivalents); the
        attributes add :class:`HookStats`' counts, ``bits_per_coordinate`` and the current
        ``levels`` per type."""
        st = self.stats
        bits = 8.0 * st.payload_bytes / st.coordinates if st.coordinates else None
        levels = ({self._typing.type_names[t]: self._lq.levels(t).tolist()
                   for t in range(self._lq.num_types)} if self._lq is not None else {})
        return CompressionStats(st.coordinates, st.payload_bytes / 4, bits_per_coordinate=bits,
                                levels=levels, **st.as_dict())

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        if self._lq is not None:
            state["_levels_state"] = [lv.clone() for lv in self._lq.state_dict()["levels"]]
        if self._typing is not None and self._typing_state is None and self.config.types == "auto":
            state["_typing_state"] = _typing_to_state(self._typing)
        return state


def _typing_to_state(t: LayerTyping) -> dict:
    return {"type_ids": dict(t.type_ids), "type_names": list(t.type_names),
            "uncompressed": sorted(t.uncompressed), "numels": dict(t.numels)}


def _typing_from_state(s: dict) -> LayerTyping:
    return LayerTyping(dict(s["type_ids"]), tuple(s["type_names"]), frozenset(s["uncompressed"]),
                       dict(s["numels"]))


def layerwise_hook(state: "LayerwiseHookState", bucket: dist.GradBucket
                   ) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's layer-wise quantized, entropy-coded average.

    Register it with ``ddp_model.register_comm_hook(state, layerwise_hook)``; see
    :class:`LayerwiseHookState` and the module doc.

    Example::

        >>> state = LayerwiseHookState(model=model, bits=4)             # doctest: +SKIP
        >>> ddp_model.register_comm_hook(state, layerwise_hook)         # doctest: +SKIP
    """
    if not isinstance(state, LayerwiseHookState):
        raise TypeError(f"layerwise_hook needs a LayerwiseHookState, got {type(state).__name__}")
    return state.hook(bucket)
