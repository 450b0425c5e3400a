"""The codec glue the layer-wise hook needs: quantize + pack one type's coordinates, encode
segments into one payload, decode a payload and dequantize + accumulate it.

The same steps as the Horovod path's exchange (kernels of :mod:`qoda_hvd.kernels`, wire format
of :mod:`qoda_hvd.coding`), kept to the methods a DDP bucket needs. The level table cache holds
the kernels' tables by the levels' bytes (ours and any peer's).
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
import torch

from qoda_hvd.coding import PackedSegment, RawSegment, decode, encode
from qoda_hvd.errors import PayloadError
from qoda_hvd.kernels import LevelTable, level_table, stream_key
from qoda_hvd.kernels.dispatch import dequantize_into, quantize_pack
from qoda_hvd.quant import LayerwiseQuantizer

__all__ = ["BucketCodec"]


class BucketCodec:
    """Quantize / encode / decode for one rank (see the module doc).

    Args:
        quantizer: the per-type levels (and bucket size, norm).
        rank: this rank (part of the noise stream).
        seed: the noise seed.
        coding: codec name for :func:`qoda_hvd.coding.encode` (``"auto"``: fixed or rans per
            segment, weighed against ``bandwidth`` or the measured link rate).
        bandwidth: link bytes/s for ``coding="auto"`` (None: measured).
        threads: CPU threads of the kernels (None: the kernels' default).
    """

    def __init__(self, quantizer: LayerwiseQuantizer, rank: int, seed: int, coding: str,
                 bandwidth: Optional[float], threads: Optional[int]) -> None:
        self.lq = quantizer
        self.rank = rank
        self.seed = seed
        self.coding = coding
        self.bandwidth = bandwidth
        self.threads = threads
        self.measured_bandwidth: Optional[float] = None
        self._rans_ns = [4.0, 4.0]  # encode, decode per packed byte; replaced by measurements
        self._tables: dict[bytes, LevelTable] = {}

    @property
    def num_types(self) -> int:
        return self.lq.num_types

    def table(self, levels) -> LevelTable:
        lv = np.ascontiguousarray(np.asarray(levels.cpu() if isinstance(levels, torch.Tensor)
                                             else levels, dtype=np.float32))
        key = lv.tobytes()
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) > 64:
                self._tables.clear()
            table = self._tables[key] = level_table(torch.from_numpy(lv.copy()))
        return table

    def quantize(self, tid: int, x: torch.Tensor, base: int, step: int, phase: int = 0
                 ) -> PackedSegment:
        """One type's coordinates -> its packed segment (noise of coordinate ``base + i`` of the
        stream ``(seed, rank, step, phase)``). NaN/Inf buckets travel (NaN norm, zero symbols),
        so every rank sees the same NaN in the aggregate."""
        q = self.lq.quantizer(tid)
        key = stream_key(self.seed, self.rank, step, phase)
        packed, norms = quantize_pack(x, self.table(q.levels), q.bucket_size, q.norm, key,
                                      base=base, nonfinite="propagate", threads=self.threads)
        return PackedSegment(tid, tid, x.numel(), q.bucket_size, packed, norms, q.num_levels)

    def encode(self, segments: Sequence[PackedSegment], raw: Optional[torch.Tensor],
               peers: int) -> torch.Tensor:
        """ONE payload (CPU uint8) of the segments and the raw float32 coordinates; ``peers``
        ranks decode it (the auto codec weighs its decode time that many times)."""
        codec, bandwidth, speeds = self.coding, None, None
        if codec == "auto":
            bw = self.bandwidth if self.bandwidth is not None else self.measured_bandwidth
            if bw is None:
                codec = "fixed"  # nothing measured yet: the fastest codec
            else:
                p = max(1, peers)
                bandwidth = bw / p
                speeds = {"fixed": (0.0, 0.0), "rans": (self._rans_ns[0], self._rans_ns[1] * p)}
        t0 = time.perf_counter()
        payload = encode(segments, self.lq.level_table(), codec,
                         raw=[] if raw is None else [RawSegment(self.num_types,
                                                                raw.detach().cpu())],
                         bandwidth=bandwidth, packed_speeds=speeds)
        if codec != "fixed":
            self._observe_rans(0, time.perf_counter() - t0, segments, payload.numel())
        return payload

    def observe_link(self, nbytes: int, seconds: float) -> None:
        if nbytes > (1 << 16) and seconds > 0:
            rate = nbytes / seconds
            m = self.measured_bandwidth
            self.measured_bandwidth = rate if m is None else 0.7 * m + 0.3 * rate

    def _observe_rans(self, which: int, seconds: float, segments, nbytes: int) -> None:
        packed = sum(-(-s.numel * s.width // 8) for s in segments)
        if packed > (1 << 16) and nbytes < 0.97 * packed:
            ns = seconds * 1e9 / packed
            old = self._rans_ns[which]
            self._rans_ns[which] = min(ns, 0.9 * old + 0.1 * ns)

    def decode_into(self, payload: torch.Tensor, sender: int, tids: Sequence[int],
                    outs: Sequence[torch.Tensor], raw_out: Optional[torch.Tensor],
                    accumulate: bool) -> None:
        """Decode one payload; its segments (of types ``tids``) into ``outs``, its raw values
        into ``raw_out`` (None: it carries none); added, or written when not ``accumulate``."""
        expected = [o.numel() for o in outs]
        raw_expected = [] if raw_out is None else [raw_out.numel()]
        t0 = time.perf_counter()
        decoded = decode(payload, max_numel=sum(expected) + sum(raw_expected), packed=True)
        got = [s.numel for s in decoded.segments]
        if (got != expected or [s.type_id for s in decoded.segments] != list(tids)
                or [r.numel for r in decoded.raw] != raw_expected):
            raise PayloadError(
                f"payload from rank {sender} carries segments of {got} coordinates (types "
                f"{[s.type_id for s in decoded.segments]}) and raw {[r.numel for r in decoded.raw]}; "
                f"this bucket expects {expected} (types {list(tids)}) and {raw_expected}: the "
                "ranks disagree on the model, its layer types or DDP's buckets")
        if "rans" in decoded.codecs:
            self._observe_rans(1, time.perf_counter() - t0, decoded.segments, len(payload))
        for seg, out in zip(decoded.segments, outs):
            if seg.numel:
                self.dequantize(seg, decoded.levels[seg.type_id], out, accumulate, sender)
        if raw_out is not None:
            raw = torch.from_numpy(decoded.raw[0].values).to(raw_out.device)
            raw_out.add_(raw) if accumulate else raw_out.copy_(raw)

    def dequantize(self, seg: PackedSegment, levels, out: torch.Tensor, accumulate: bool,
                   sender: int) -> None:
        mine = self.lq.quantizer(seg.type_id) if seg.type_id < self.num_types else None
        if mine is None or seg.bucket_size != mine.bucket_size:
            raise PayloadError(f"payload from rank {sender}: type {seg.type_id} with bucket size "
                               f"{seg.bucket_size}, expected "
                               f"{mine.bucket_size if mine else 'a type of this model'}")
        bad = dequantize_into(seg.packed, seg.norms, self.table(levels), seg.bucket_size, out,
                              accumulate=accumulate, threads=self.threads)
        if bad:
            raise PayloadError(f"payload from rank {sender}, segment of type {seg.type_id}: "
                               f"{bad} packed value(s) outside the alphabet of "
                               f"{2 * seg.num_levels - 1}")
