"""The codec glue: one layout of typed gradient buffers <-> self-contained payloads.

A :class:`LayerwiseCodec` quantizes and packs a layer type's buffer (or a bucket-aligned slice
of it) in one kernel pass (:mod:`qoda_hvd.kernels`), entropy codes a list of packed segments and
an optional float32 raw segment into ONE payload (:func:`qoda_hvd.coding.encode`), and decodes a
payload back, unpacking, scaling and adding it into output slices in one kernel pass. It holds
no communicator: the strategies (:mod:`qoda_hvd.comm.strategies`,
:mod:`qoda_hvd.comm.hierarchical`) and the DDP hooks move its payloads.

Decoding checks every packed value against the alphabet; the counts are gathered over a round
and checked once (:meth:`LayerwiseCodec.check_decoded`), so a GPU decode never waits for the
device. The payloads themselves are host bytes: the entropy coder runs on the CPU, so on CUDA
the packed symbols and norms (not the gradient) cross to the host and back.

The rounding noise is a function of ``(seed, rank, step, phase)`` and the coordinate's index in
the fused gradient, so a slice quantized alone draws exactly what the whole buffer would, and a
run resumed at step ``t`` draws what the uninterrupted run drew.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
import torch

from qoda_hvd.coding import PackedSegment, RawSegment, decode, encode
from qoda_hvd.comm.link import LinkModel
from qoda_hvd.errors import PayloadError
from qoda_hvd.kernels import LevelTable, level_table, stream_key
from qoda_hvd.kernels.dispatch import InvalidValues, dequantize_into, quantize_pack
from qoda_hvd.quant import LayerwiseQuantizer

__all__ = ["LayerwiseCodec", "add_scaled"]

#: Level tables kept per codec (ours and peers'); more means levels that keep changing.
_MAX_TABLES = 64


def add_scaled(out: torch.Tensor, values: torch.Tensor, scale: float, accumulate: bool) -> None:
    """``out (+)= values * scale``: how every path adds float32 raw values (the same rounding
    whichever path, so their aggregates stay bit-identical).

    Example::

        >>> out = torch.ones(2); add_scaled(out, torch.tensor([2.0, 4.0]), 0.5, True); out
        tensor([2., 3.])
    """
    if scale != 1.0:
        values = values * scale
    out.add_(values) if accumulate else out.copy_(values)


class LayerwiseCodec:
    """Quantize + pack, encode, decode + accumulate for the layer types of one gradient layout.

    Args:
        quantizer: the per-type level state (levels, bucket size, norm, schedule).
        type_sizes: coordinates of each type's fused buffer (its noise counters follow each
            other, so no two coordinates of a step share noise).
        rank: this rank (mixed into the noise).
        seed: the noise seed.
        coding: codec name for :func:`qoda_hvd.coding.encode`; ``"auto"`` weighs ``link``.
        link: the link model ``coding="auto"`` consults (a new one without a bandwidth if None).
        threads: CPU threads of the kernels (None: torch's setting, capped per rank).

    Attributes:
        step: the step the noise is keyed by (the exchange sets it each call).

    Example::

        >>> from qoda_hvd.quant import LayerwiseQuantizer, LayerTyping
        >>> typing = LayerTyping({"w": 0}, ("dense",), frozenset(), {"w": 2048})
        >>> codec = LayerwiseCodec(LayerwiseQuantizer(typing, bits=4), [2048], rank=0)
        >>> g = torch.randn(2048)
        >>> seg = codec.quantize(0, g, base=0)
        >>> payload = codec.encode([seg], None)
        >>> out = torch.zeros(2048)
        >>> codec.decode_into(payload, sender=0, outs=[out], raw_out=None, accumulate=False)
        >>> codec.check_decoded()                # once per round: invalid symbols raise here
        >>> payload.numel() < 2048 * 4 / 6      # about 4 bits a coordinate, not 32
        True
        >>> bool((out.sign() * g.sign() >= 0).all())   # levels keep the sign
        True
    """

    def __init__(self, quantizer: LayerwiseQuantizer, type_sizes: Sequence[int], rank: int,
                 seed: int = 0, coding: str = "auto", link: Optional[LinkModel] = None,
                 threads: Optional[int] = None) -> None:
        self.lq = quantizer
        self.num_types = quantizer.num_types
        self.rank = rank
        self.seed = seed
        self.coding = coding
        self.link = link if link is not None else LinkModel()
        self.threads = threads
        self.step = 0
        # the noise counter of each type's first coordinate
        self.type_offsets = np.cumsum([0, *type_sizes[:-1]]).tolist() if type_sizes else []
        self._tables: dict[bytes, LevelTable] = {}
        #: Invalid packed values found by this round's decodes, checked once per round
        #: (:meth:`check_decoded`): on CUDA the counts stay on the device, no sync per decode.
        self.invalid = InvalidValues()

    def table(self, levels) -> LevelTable:
        """The kernels' table of ``levels`` (ours or a peer's), made once per distinct levels."""
        lv = np.ascontiguousarray(np.asarray(levels.cpu() if isinstance(levels, torch.Tensor)
                                             else levels, dtype=np.float32))
        key = lv.tobytes()
        table = self._tables.get(key)
        if table is None:  # new levels (an update, or a peer's that differ from ours)
            if len(self._tables) > _MAX_TABLES:
                self._tables.clear()
            table = self._tables[key] = level_table(torch.from_numpy(lv.copy()))
        return table

    def quantize(self, tid: int, x: torch.Tensor, base: int, phase: int = 0) -> PackedSegment:
        """Type ``tid``'s buffer, or its slice starting at coordinate ``base`` (a multiple of
        the type's bucket size), -> its packed segment, in one kernel pass. ``phase`` keeps
        two quantizations of one step independent (see :mod:`qoda_hvd.kernels`)."""
        q = self.lq.quantizer(tid)
        key = stream_key(self.seed, self.rank, self.step, phase)
        packed, norms = quantize_pack(x, self.table(q.levels), q.bucket_size, q.norm, key,
                                      base=self.type_offsets[tid] + base, nonfinite=q.nonfinite,
                                      threads=self.threads)
        return PackedSegment(tid, tid, x.numel(), q.bucket_size, packed, norms, q.num_levels)

    def encode(self, segments: Sequence[PackedSegment], raw: Optional[torch.Tensor],
               peers: int = 1) -> torch.Tensor:
        """ONE self-contained uint8 payload of ``segments`` and the float32 ``raw`` values
        (None: no raw segment). ``peers``: how many ranks receive and decode it (what
        ``coding="auto"`` weighs)."""
        bandwidth, speeds = self.link.costs(peers) if self.coding == "auto" else (None, None)
        codec = "fixed" if bandwidth == float("inf") else self.coding
        raws = [] if raw is None else [RawSegment(self.num_types, raw.detach().cpu())]
        t0 = time.perf_counter()
        payload = encode(segments, self.lq.level_table(), codec, raw=raws, bandwidth=bandwidth,
                         packed_speeds=speeds)
        if codec != "fixed":
            self.link.observe_rans(0, time.perf_counter() - t0, segments, payload.numel())
        return payload

    def decode_into(self, payload: torch.Tensor, sender: int, outs: Sequence[torch.Tensor],
                    raw_out: Optional[torch.Tensor], accumulate: bool, scale: float = 1.0) -> None:
        """Decode one payload; add (or copy) its values times ``scale`` into ``outs`` (one per
        segment) and ``raw_out`` (None: the payload carries no raw segment). A payload of
        another layout raises :class:`~qoda_hvd.errors.PayloadError` naming ``sender``."""
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
            self.link.observe_rans(1, time.perf_counter() - t0, decoded.segments, len(payload))
        for seg, out in zip(decoded.segments, outs):
            if seg.numel:
                self.dequantize(seg, out, accumulate, sender, decoded.levels[seg.type_id], scale)
        if raw_out is not None:
            raw = torch.from_numpy(decoded.raw[0].values).to(raw_out.device)
            add_scaled(raw_out, raw, scale, accumulate)

    def dequantize(self, seg: PackedSegment, out: torch.Tensor, accumulate: bool, sender: int,
                   levels=None, scale: float = 1.0) -> None:
        """Unpack, scale and add (or copy) one packed segment into ``out``: a decoded peer's
        (with the ``levels`` its payload carried) or this rank's own (``levels`` None: ours;
        the coding is lossless, so our own payload need not be decoded). ``scale`` multiplies
        the bucket norms (the average's ``1/K``, folded into the pass that writes ``out``
        instead of a pass of its own)."""
        mine = self.lq.quantizer(seg.type_id) if seg.type_id < self.num_types else None
        if mine is None or seg.bucket_size != mine.bucket_size:
            raise PayloadError(f"payload from rank {sender}: type {seg.type_id} with bucket size "
                               f"{seg.bucket_size}, expected "
                               f"{mine.bucket_size if mine else 'a type of this model'}")
        table = self.table(mine.levels if levels is None else levels)
        norms = seg.norms if scale == 1.0 else seg.norms * np.float32(scale)
        dequantize_into(seg.packed, norms, table, seg.bucket_size, out, accumulate=accumulate,
                        threads=self.threads, invalid=self.invalid,
                        label=f"payload from rank {sender}, segment of type {seg.type_id}")

    def check_decoded(self) -> None:
        """Raise :class:`~qoda_hvd.errors.PayloadError` if a decode since the last check met
        packed values outside the alphabet (once per round: one device read on CUDA); then
        start over."""
        self.invalid.check()
