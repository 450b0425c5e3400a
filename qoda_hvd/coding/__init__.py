"""Entropy-coded wire format for quantized gradients (numpy core; no torch.distributed/horovod).

Public entry points: :func:`encode` (segments -> one checksummed ``torch.uint8`` payload) and
:func:`decode` (payload -> :class:`Decoded`, validated; corrupt input raises
:class:`qoda_hvd.PayloadError`). Codecs live in one registry, :data:`CODECS`: ``fixed``,
``ans`` (constriction), ``elias`` (QSGD protocol), ``zstd``, ``rans`` (packed bytes); ``codec="auto"`` picks per segment
(:mod:`qoda_hvd.coding.auto`). The byte layout is documented in :mod:`qoda_hvd.coding.format`.

Example::

    >>> import numpy as np
    >>> from qoda_hvd.coding import Segment, encode, decode, bits_per_coordinate
    >>> rng = np.random.default_rng(0)
    >>> s = rng.choice(np.array([-1, 0, 1], np.int8), size=65536, p=[0.1, 0.8, 0.1])
    >>> seg = Segment(0, 0, 65536, 1024, s, np.ones(64, np.float32), num_levels=2)
    >>> payload = encode([seg], {0: np.array([0.0, 1.0], np.float32)}, codec="ans")
    >>> bool((decode(payload).segments[0].symbols == s).all())
    True
    >>> round(bits_per_coordinate(payload), 3)  # ~entropy 0.92 + norms 0.031 + header
    0.966
"""
from __future__ import annotations

from qoda_hvd.coding.auto import DEFAULT_NS_PER_SYMBOL, choose_codec, estimate_sizes
from qoda_hvd.coding.codecs import CODEC_BY_ID, CODECS, Codec, fixed_width
from qoda_hvd.coding.format import (
    MAGIC,
    MAX_NUMEL,
    MAX_SYMBOLS_PER_BYTE,
    MIN_DECODE_BUDGET,
    VERSION,
    Decoded,
    PackedSegment,
    PayloadLayout,
    RawSegment,
    Segment,
    bits_per_coordinate,
    decode,
    encode,
    encode_bytes,
    inspect_payload,
)

__all__ = [
    "CODECS",
    "CODEC_BY_ID",
    "Codec",
    "DEFAULT_NS_PER_SYMBOL",
    "Decoded",
    "MAGIC",
    "MAX_NUMEL",
    "MAX_SYMBOLS_PER_BYTE",
    "MIN_DECODE_BUDGET",
    "PackedSegment",
    "PayloadLayout",
    "RawSegment",
    "Segment",
    "VERSION",
    "bits_per_coordinate",
    "choose_codec",
    "decode",
    "encode",
    "encode_bytes",
    "estimate_sizes",
    "fixed_width",
    "inspect_payload",
]
