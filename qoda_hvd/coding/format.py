"""The qoda_hvd wire format: one self-contained, checksummed payload per exchange.

A payload carries quantized segments (one per compressed tensor: symbols, per-bucket norms),
raw segments (small tensors sent as float32) and the level table of every layer type it uses,
so it decodes alone. All integers and floats are little-endian.

Byte layout (version 1)::

    offset  size        field
    ------  ----------  -----------------------------------------------------------------
    0       4           magic b"QDHV"
    4       1           version = 1
    5       1           flags = 0 (reserved, must be 0)
    6       2   u16     n_types        level-table entries
    8       4   u32     n_segments     quantized segments
    12      4   u32     n_raw          raw (float32) segments
    16      8   u64     body_length    bytes between the tables and the checksum
    24      ...         level table, n_types entries, ascending type_id:
                          u16 type_id | u16 L | L x f32 levels (0 = l_0 < ... < l_{L-1} = 1)
    ...     36 each     segment table, n_segments entries:
                          u32 layer_id | u16 type_id | u8 codec_id | u8 reserved = 0 |
                          u32 bucket_size | u64 numel | u64 offset | u64 length
    ...     32 each     raw table, n_raw entries:
                          u32 layer_id | u32 dtype = 0 (float32) | u64 numel |
                          u64 offset | u64 length = 4 * numel
    H       body_length body: the regions named by the tables, contiguous, in table order
                          (segments first, then raw); offsets are relative to H.
                          segment region = ceil(numel / bucket_size) x f32 norms, then the
                                           codec body (side info + code, see .codecs)
                          raw region     = numel x f32 values
    H+B     4   u32     CRC-32 (zlib.crc32) of every byte before it

                +--------+-------+----------+---------+-------------------------+-------+
    payload  =  | header | level | segment  | raw     | body: [norms|code] ...  | CRC32 |
                | 24 B   | table | table    | table   |       [raw f32] ...     | 4 B   |
                +--------+-------+----------+---------+-------------------------+-------+

Codec ids: 0 fixed, 1 ans, 2 elias, 3 zstd (:mod:`qoda_hvd.coding.codecs`). Norms are float32
(float16 norms would add a relative error of 2**-11 per bucket to every coordinate, which the
unbiasedness argument does not cover, so they are not offered). NaN/inf norms and raw values are
carried faithfully (AMP loss scaling relies on seeing them); negative norms are rejected.

Empty segments (numel 0) are allowed: no norms, empty codec body.

Decoder rules. The decoder never trusts a length, count or offset: everything is checked
against the bytes present before it is used, the checksum is verified before the tables are
parsed, regions must tile the body exactly (no gaps, overlaps or trailing bytes), layer ids are
unique, every segment's type is in the level table, and each codec validates its body (exact
length for ``fixed``, counts equal to the decoded histogram for ``ans``, exact bit count and
zero padding for ``elias``, declared frame size and no trailing data for ``zstd``). Anything
else raises :class:`qoda_hvd.PayloadError` naming the field and segment.

Memory bound. ``fixed`` and raw regions hold exactly what they claim, but ``ans``, ``elias``
and ``zstd`` can describe a near-constant segment of any length in a few bytes, so no per-byte
rule separates honest from hostile there. The decoder therefore caps the total number of
decoded coordinates (symbols plus raw values) *before allocating*: at ``max_numel`` when the
caller passes it (the receiver knows its model's size; pass that), else at
``max(MIN_DECODE_BUDGET, MAX_SYMBOLS_PER_BYTE * len(payload))`` = max(2**24, 1024 x bytes).
Honest payloads with buckets of at most 4096 coordinates always fit the default (their norms
alone are >= 1 byte per 1024 coordinates); pass ``max_numel`` for per-tensor norms of mostly
zero tensors. Peak decode memory (tracemalloc, a dense segment of 2**20 coordinates of 15
symbols) is at most about 5 bytes per coordinate for ``fixed`` and ``rans``, 6 for ``zstd``, 9
for ``ans`` (it decodes via int32) and 37 for ``elias`` (its triples decode to int64 runs and
levels), plus the payload and a few MiB of working set. Each segment is also capped at
``MAX_NUMEL = 2**40`` coordinates.

CUDA tensors: symbols and norms are copied to host memory before coding; GPU coders (nvCOMP
ANS/Cascaded) are future work behind the same format.

Example::

    >>> import numpy as np
    >>> from qoda_hvd.coding import Segment, encode, decode
    >>> levels = {0: np.array([0.0, 0.5, 1.0], dtype=np.float32)}
    >>> seg = Segment(layer_id=7, type_id=0, numel=5, bucket_size=4,
    ...               symbols=np.array([0, 2, -1, 0, 1], dtype=np.int8),
    ...               norms=np.array([1.5, 0.25], dtype=np.float32), num_levels=3)
    >>> payload = encode([seg], levels, codec="ans")
    >>> out = decode(payload)
    >>> out.segments[0].symbols.tolist(), out.codecs
    ([0, 2, -1, 0, 1], ['ans'])
"""
from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from qoda_hvd.coding import bits
from qoda_hvd.coding.auto import choose_and_encode, choose_packed
from qoda_hvd.coding.codecs import (CODEC_BY_ID, CODECS, CodecError, ZstdCodec, fixed_width,
                                    from_values)
from qoda_hvd.errors import PayloadError

__all__ = [
    "MAGIC",
    "VERSION",
    "MAX_NUMEL",
    "MAX_SYMBOLS_PER_BYTE",
    "MIN_DECODE_BUDGET",
    "Segment",
    "PackedSegment",
    "RawSegment",
    "Decoded",
    "PayloadLayout",
    "encode",
    "encode_bytes",
    "decode",
    "inspect_payload",
    "bits_per_coordinate",
]

MAGIC = b"QDHV"
VERSION = 1
MAX_NUMEL = 1 << 40
MAX_SYMBOLS_PER_BYTE = 1024
MIN_DECODE_BUDGET = 1 << 24
MIN_LEVELS, MAX_LEVELS = 2, 128

_HEADER = struct.Struct("<4sBBHIIQ")
_TYPE_HEAD = struct.Struct("<HH")
_CRC = struct.Struct("<I")
_SEGMENT_DTYPE = np.dtype([
    ("layer_id", "<u4"), ("type_id", "<u2"), ("codec_id", "u1"), ("reserved", "u1"),
    ("bucket_size", "<u4"), ("numel", "<u8"), ("offset", "<u8"), ("length", "<u8"),
])
_RAW_DTYPE = np.dtype([
    ("layer_id", "<u4"), ("dtype", "<u4"), ("numel", "<u8"), ("offset", "<u8"), ("length", "<u8"),
])
assert _SEGMENT_DTYPE.itemsize == 36 and _RAW_DTYPE.itemsize == 32


# --------------------------------------------------------------------------- inputs

def _check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def _to_numpy(name: str, array: Any, dtype: np.dtype) -> np.ndarray:
    """A 1-D numpy view of a numpy array or torch tensor (CUDA tensors are copied to host)."""
    if type(array).__module__.startswith("torch"):
        array = array.detach()
        if array.device.type != "cpu":
            array = array.cpu()  # GPU coders would avoid this copy; see the module docstring
        array = array.contiguous().numpy()
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(array).__name__}")
    if array.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {array.dtype.name}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(array.shape)}")
    return np.ascontiguousarray(array)


def _checked_norms(seg: Any) -> np.ndarray:
    """The table fields every quantized segment shares, checked; its norms as float32 numpy."""
    _check_int("layer_id", seg.layer_id, 0, 2**32 - 1)
    _check_int("type_id", seg.type_id, 0, 2**16 - 1)
    _check_int("numel", seg.numel, 0, MAX_NUMEL)
    _check_int("bucket_size", seg.bucket_size, 1, 2**32 - 1)
    _check_int("num_levels", seg.num_levels, MIN_LEVELS, MAX_LEVELS)
    norms = _to_numpy("norms", seg.norms, np.float32)
    buckets = -(-seg.numel // seg.bucket_size)
    if norms.size != buckets:
        raise ValueError(f"norms must have ceil(numel / bucket_size) = {buckets} elements, "
                         f"got {norms.size}")
    return norms


@dataclass(frozen=True)
class Segment:
    """One quantized tensor: flat int8 symbols and float32 per-bucket norms.

    Args:
        layer_id: the tensor's id, unique within a payload (u32).
        type_id: its layer type; selects the levels in the level table (u16).
        numel: number of coordinates (0 allowed, at most MAX_NUMEL).
        bucket_size: coordinates per norm; the last bucket may be partial.
        symbols: int8 [numel], ``sign * level_index`` with ``|symbol| <= num_levels - 1``
            (numpy or torch; CUDA tensors are copied to host).
        norms: float32 [ceil(numel / bucket_size)].
        num_levels: L, levels including 0 and 1, in [2, 128].

    Example::

        >>> import numpy as np
        >>> Segment(0, 0, 3, 1024, np.array([1, 0, -1], np.int8), np.ones(1, np.float32), 2).numel
        3
    """

    layer_id: int
    type_id: int
    numel: int
    bucket_size: int
    symbols: np.ndarray
    norms: np.ndarray
    num_levels: int

    def __post_init__(self) -> None:
        norms = _checked_norms(self)
        symbols = _to_numpy("symbols", self.symbols, np.int8)
        if symbols.size != self.numel:
            raise ValueError(f"symbols has {symbols.size} elements, numel is {self.numel}")
        object.__setattr__(self, "symbols", symbols)
        object.__setattr__(self, "norms", norms)

    @property
    def num_buckets(self) -> int:
        return self.norms.size


@dataclass(frozen=True)
class PackedSegment:
    """One quantized tensor whose symbols are already packed (the fast path).

    The same content as :class:`Segment`, with the symbols as the ``fixed`` codec's body:
    values ``symbol + L - 1`` of ``ceil(log2(2L - 1))`` bits, MSB first, 1-padded (what
    :mod:`qoda_hvd.kernels` writes). Encoding it with ``fixed`` sends these bytes as they are;
    ``rans`` codes them byte-wise. :func:`decode` returns these with ``packed=True``.

    Args:
        layer_id, type_id, numel, bucket_size, norms, num_levels: as in :class:`Segment`.
        packed: uint8 [ceil(numel * width / 8)].

    Example::

        >>> import numpy as np
        >>> PackedSegment(0, 0, 3, 1024, np.array([0x12, 0x3F], np.uint8),
        ...               np.ones(1, np.float32), 8).width
        4
    """

    layer_id: int
    type_id: int
    numel: int
    bucket_size: int
    packed: np.ndarray
    norms: np.ndarray
    num_levels: int

    def __post_init__(self) -> None:
        norms = _checked_norms(self)
        packed = _to_numpy("packed", self.packed, np.uint8)
        want = -(-self.numel * self.width // 8)
        if packed.size != want:
            raise ValueError(f"packed has {packed.size} bytes, numel {self.numel} at "
                             f"{self.width} bits needs {want}")
        object.__setattr__(self, "packed", packed)
        object.__setattr__(self, "norms", norms)

    @property
    def width(self) -> int:
        """Bits per packed symbol."""
        return fixed_width(self.num_levels)

    @property
    def num_buckets(self) -> int:
        return self.norms.size

    def to_segment(self) -> Segment:
        """The same tensor with int8 symbols (unpacks; validates the values)."""
        values = bits.unpack_fixed(self.packed, self.numel, self.width)
        if values.size and int(values.max()) > 2 * self.num_levels - 2:
            raise ValueError(f"packed value {int(values.max())} outside the alphabet of "
                             f"{2 * self.num_levels - 1}")
        return Segment(self.layer_id, self.type_id, self.numel, self.bucket_size,
                       from_values(values, self.num_levels), self.norms, self.num_levels)


@dataclass(frozen=True)
class RawSegment:
    """A small tensor that travels uncompressed as float32 (biases, norms' weights, ...).

    Args:
        layer_id: the tensor's id, unique within a payload (u32).
        values: float32 [numel] (numpy or torch).
    """

    layer_id: int
    values: np.ndarray

    def __post_init__(self) -> None:
        _check_int("layer_id", self.layer_id, 0, 2**32 - 1)
        object.__setattr__(self, "values", _to_numpy("values", self.values, np.float32))

    @property
    def numel(self) -> int:
        return self.values.size


@dataclass(frozen=True)
class Decoded:
    """What :func:`decode` returns.

    Attributes:
        segments: quantized segments in payload order (numpy arrays, owned, not views).
        raw: raw segments in payload order.
        levels: ``{type_id: float32 levels}`` for the types the payload uses.
        codecs: codec name of each segment, parallel to ``segments``.
        nbytes: payload size in bytes.
    """

    segments: list[Segment] | list[PackedSegment]
    raw: list[RawSegment]
    levels: dict[int, np.ndarray]
    codecs: list[str]
    nbytes: int

    @property
    def numel(self) -> int:
        """Coordinates carried: symbols plus raw values."""
        return sum(s.numel for s in self.segments) + sum(r.numel for r in self.raw)

    def bits_per_coordinate(self) -> float:
        """Exact payload bits (everything: header, tables, norms, code, CRC) per coordinate."""
        return 8.0 * self.nbytes / self.numel if self.numel else math.inf


@dataclass(frozen=True)
class PayloadLayout:
    """Byte accounting of a payload, read from its validated tables (no body decoding).

    Attributes:
        nbytes: total payload bytes.
        header_bytes: fixed header, level, segment and raw tables.
        norm_bytes: per segment, bytes of float32 norms.
        code_bytes: per segment, bytes of codec body (side info included).
        codecs: per segment, codec name.
        numels: per segment, coordinates.
        raw_bytes: bytes of raw float32 values.
        raw_numel: raw coordinates.
    """

    nbytes: int
    header_bytes: int
    norm_bytes: list[int]
    code_bytes: list[int]
    codecs: list[str]
    numels: list[int]
    raw_bytes: int
    raw_numel: int

    @property
    def numel(self) -> int:
        return sum(self.numels) + self.raw_numel


def _check_levels(type_id: int, levels: Any, num_levels: int) -> np.ndarray:
    arr = np.asarray(levels.detach().cpu().numpy() if hasattr(levels, "detach") else levels)
    if arr.ndim != 1 or arr.size != num_levels:
        raise ValueError(f"levels[{type_id}] must be 1-D with num_levels={num_levels} entries, "
                         f"got shape {tuple(arr.shape)}")
    arr = arr.astype(np.float32)
    if not (np.isfinite(arr).all() and arr[0] == 0.0 and arr[-1] == 1.0 and (np.diff(arr) > 0).all()):
        raise ValueError(f"levels[{type_id}] must be strictly increasing from 0 to 1, got {arr.tolist()}")
    return arr


# --------------------------------------------------------------------------- encode

def encode(
    segments: Sequence[Segment],
    levels: Mapping[int, Any],
    codec: str | Sequence[str] = "auto",
    *,
    raw: Sequence[RawSegment] = (),
    bandwidth: float | None = None,
    speeds: Mapping[str, tuple[float, float]] | None = None,
    zstd_level: int = 1,
    packed_speeds: Mapping[str, tuple[float, float]] | None = None,
):
    """Encode segments into one payload (a CPU ``torch.uint8`` tensor).

    Args:
        segments: quantized segments (:class:`Segment`, or :class:`PackedSegment` for symbols
            already packed, the fast path), in the order the receiver wants them.
        levels: ``{type_id: levels}`` covering every segment's type (extra types are ignored;
            only used types are written).
        codec: ``"auto"`` (per segment, see :mod:`qoda_hvd.coding.auto`), a name in
            :data:`qoda_hvd.coding.CODECS` (``fixed``, ``ans``, ``elias``, ``zstd``, ``rans``),
            or a sequence with one of these per segment (a per-layer policy). For a
            :class:`PackedSegment`, ``auto`` chooses between ``fixed`` and ``rans``
            (:func:`qoda_hvd.coding.auto.choose_packed`).
        raw: raw float32 segments.
        bandwidth: link bandwidth in bytes/s for ``auto`` (None: smallest size wins).
        speeds: per-codec ``(encode_ns, decode_ns)`` per symbol for ``auto``.
        zstd_level: zstandard level for ``codec="zstd"``, in [1, 22].
        packed_speeds: per-codec ``(encode_ns, decode_ns)`` per packed byte for ``auto`` on
            packed segments.

    Returns:
        The payload, ``torch.uint8`` [nbytes] on CPU.

    Example::

        >>> import numpy as np
        >>> from qoda_hvd.coding import RawSegment
        >>> seg = Segment(1, 0, 4, 4, np.array([1, 0, 0, -1], np.int8), np.ones(1, np.float32), 2)
        >>> p = encode([seg], {0: np.array([0, 1], np.float32)}, "fixed",
        ...            raw=[RawSegment(2, np.zeros(3, np.float32))])
        >>> p.dtype, decode(p).raw[0].numel
        (torch.uint8, 3)
    """
    import torch

    body = encode_bytes(segments, levels, codec, raw=raw, bandwidth=bandwidth, speeds=speeds,
                        zstd_level=zstd_level, packed_speeds=packed_speeds)
    return torch.frombuffer(body, dtype=torch.uint8)


def encode_bytes(
    segments: Sequence[Segment],
    levels: Mapping[int, Any],
    codec: str | Sequence[str] = "auto",
    *,
    raw: Sequence[RawSegment] = (),
    bandwidth: float | None = None,
    speeds: Mapping[str, tuple[float, float]] | None = None,
    zstd_level: int = 1,
    packed_speeds: Mapping[str, tuple[float, float]] | None = None,
) -> bytearray:
    """Same as :func:`encode` but returns a ``bytearray`` (no torch)."""
    segments = list(segments)
    if not isinstance(codec, (str, Sequence)):
        raise TypeError(f"codec must be a str or a sequence of str, got {type(codec).__name__}")
    names = [codec] * len(segments) if isinstance(codec, str) else list(codec)
    if not isinstance(codec, str) and len(names) != len(segments):
        raise ValueError(f"codec must be a str or one name per segment; got {len(names)} names "
                         f"for {len(segments)} segments")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"codec must be a str or a sequence of str, got {type(name).__name__}")
        if name != "auto" and name not in CODECS:
            raise ValueError(f"unknown codec {name!r}; choose from {['auto', *CODECS]}")
    if bandwidth is not None and not (isinstance(bandwidth, (int, float)) and bandwidth > 0):
        raise ValueError(f"bandwidth must be a positive number of bytes/s or None, got {bandwidth!r}")
    zstd_level = _check_int("zstd_level", zstd_level, 1, 22)
    if not isinstance(levels, Mapping):
        raise TypeError(f"levels must be a mapping {{type_id: levels}}, got {type(levels).__name__}")
    raw = list(raw)
    for i, seg in enumerate(segments):
        if not isinstance(seg, (Segment, PackedSegment)):
            raise TypeError(f"segments[{i}] must be a Segment or PackedSegment, got {type(seg).__name__}")
    for i, r in enumerate(raw):
        if not isinstance(r, RawSegment):
            raise TypeError(f"raw[{i}] must be a RawSegment, got {type(r).__name__}")
    ids = [s.layer_id for s in segments] + [r.layer_id for r in raw]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"layer_id must be unique across segments and raw, repeated: {dup}")
    if len(segments) > 2**32 - 1 or len(raw) > 2**32 - 1:
        raise ValueError("at most 2**32 - 1 segments and raw segments per payload")

    table: dict[int, np.ndarray] = {}
    for i, seg in enumerate(segments):
        if seg.type_id not in levels:
            raise ValueError(f"levels has no entry for type_id {seg.type_id} "
                             f"(segments[{i}], layer_id {seg.layer_id}); has {sorted(levels)}")
        if seg.type_id not in table:
            table[seg.type_id] = _check_levels(seg.type_id, levels[seg.type_id], seg.num_levels)
        elif table[seg.type_id].size != seg.num_levels:
            raise ValueError(f"segments[{i}] has num_levels={seg.num_levels} but type_id "
                             f"{seg.type_id} has {table[seg.type_id].size} levels")
        if seg.numel and isinstance(seg, Segment):  # packed values are the kernels' (checked on decode)
            lo, hi = int(seg.symbols.min()), int(seg.symbols.max())
            top = seg.num_levels - 1
            if lo < -top or hi > top:
                raise ValueError(f"segments[{i}] symbols must be in [-{top}, {top}] for "
                                 f"num_levels={seg.num_levels}, got [{lo}, {hi}]")
        if seg.norms.size and bool((seg.norms < 0).any()):
            raise ValueError(f"segments[{i}] norms must be >= 0 (NaN/inf are carried as is)")

    zstd = CODECS["zstd"] if zstd_level == 1 else ZstdCodec(zstd_level)
    parts: list[bytes] = []
    seg_table = np.zeros(len(segments), dtype=_SEGMENT_DTYPE)
    offset = 0
    for i, seg in enumerate(segments):
        name, code = names[i], None
        if isinstance(seg, PackedSegment):
            counts = None
            if name == "auto":
                name, counts = choose_packed(seg.packed, seg.numel, seg.num_levels, bandwidth,
                                             packed_speeds)
            if name == "rans":
                code = CODECS["rans"].encode_packed(seg.packed, seg.numel, seg.num_levels, counts)
            elif name == "fixed":
                code = seg.packed
            else:  # a symbol codec: unpack first (slow path, for completeness)
                seg = seg.to_segment()
        if name == "auto":  # sizing zstd made its level-1 body: reuse it rather than compress twice
            name, code = choose_and_encode(seg.symbols, seg.num_levels, bandwidth, speeds)
        coder = zstd if name == "zstd" else CODECS[name]
        if code is None or (coder is not CODECS[name] and name == "zstd"):
            code = coder.encode(seg.symbols, seg.num_levels)
        norms = seg.norms.astype("<f4", copy=False)
        parts += (norms, code)
        length = norms.nbytes + len(code)
        seg_table[i] = (seg.layer_id, seg.type_id, coder.codec_id, 0, seg.bucket_size, seg.numel,
                        offset, length)
        offset += length
    raw_table = np.zeros(len(raw), dtype=_RAW_DTYPE)
    for i, r in enumerate(raw):
        values = r.values.astype("<f4", copy=False)
        parts.append(values)
        raw_table[i] = (r.layer_id, 0, r.numel, offset, values.nbytes)
        offset += values.nbytes

    out = bytearray(_HEADER.pack(MAGIC, VERSION, 0, len(table), len(segments), len(raw), offset))
    for type_id in sorted(table):
        out += _TYPE_HEAD.pack(type_id, table[type_id].size)
        out += table[type_id].astype("<f4").tobytes()
    out += seg_table.tobytes()
    out += raw_table.tobytes()
    for part in parts:  # numpy parts are appended through the buffer protocol (no tobytes copy)
        out += memoryview(part).cast("B") if isinstance(part, np.ndarray) else part
    out += _CRC.pack(zlib.crc32(out))
    return out


# --------------------------------------------------------------------------- decode

def _as_view(buffer: Any) -> memoryview:
    if type(buffer).__module__.startswith("torch"):
        import torch

        if not isinstance(buffer, torch.Tensor):
            raise TypeError(f"buffer must be a tensor, array or bytes, got {type(buffer).__name__}")
        if buffer.dtype != torch.uint8:
            raise TypeError(f"buffer tensor must have dtype torch.uint8, got {buffer.dtype}")
        if buffer.dim() != 1:
            raise ValueError(f"buffer tensor must be 1-D, got shape {tuple(buffer.shape)}")
        buffer = buffer.detach().cpu().contiguous().numpy()
    if isinstance(buffer, np.ndarray):
        if buffer.dtype != np.uint8:
            raise TypeError(f"buffer array must have dtype uint8, got {buffer.dtype.name}")
        if buffer.ndim != 1:
            raise ValueError(f"buffer array must be 1-D, got shape {buffer.shape}")
        return memoryview(np.ascontiguousarray(buffer)).cast("B")
    if isinstance(buffer, (bytes, bytearray)):
        return memoryview(buffer)
    if isinstance(buffer, memoryview):
        view = buffer if buffer.c_contiguous else memoryview(buffer.tobytes())
        return view.cast("B") if view.format != "B" or view.ndim != 1 else view
    raise TypeError("buffer must be a uint8 torch.Tensor, numpy array, bytes, bytearray or "
                    f"memoryview, got {type(buffer).__name__}")


@dataclass
class _Parsed:
    levels: dict[int, np.ndarray]
    segments: np.ndarray
    raw: np.ndarray
    body_start: int
    header_bytes: int


def _parse(data: memoryview, max_numel: int | None) -> _Parsed:
    n = len(data)
    minimum = _HEADER.size + _CRC.size
    if n < minimum:
        raise PayloadError(f"payload is {n} bytes, shorter than the {minimum}-byte minimum")
    magic, version, flags, n_types, n_seg, n_raw, body_len = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise PayloadError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}: not a qoda_hvd payload")
    if version != VERSION:
        raise PayloadError(f"unsupported payload version {version}; this decoder reads {VERSION}")
    if flags:
        raise PayloadError(f"reserved flags must be 0, got {flags:#04x}")
    tables_min = n_types * (_TYPE_HEAD.size + 8) + n_seg * _SEGMENT_DTYPE.itemsize + n_raw * _RAW_DTYPE.itemsize
    if _HEADER.size + tables_min + body_len + _CRC.size > n:
        raise PayloadError(f"truncated: header claims {n_types} types, {n_seg} segments, {n_raw} raw "
                           f"and a {body_len}-byte body, more than the {n}-byte payload holds")
    stored_crc = _CRC.unpack_from(data, n - _CRC.size)[0]
    actual_crc = zlib.crc32(data[: n - _CRC.size])
    if stored_crc != actual_crc:
        raise PayloadError(f"checksum mismatch (stored {stored_crc:#010x}, computed {actual_crc:#010x}): "
                           "payload corrupted, truncated or extended")
    body_start = n - _CRC.size - body_len

    # Level table.
    pos = _HEADER.size
    levels: dict[int, np.ndarray] = {}
    for k in range(n_types):
        if pos + _TYPE_HEAD.size > body_start:
            raise PayloadError(f"level table entry {k} runs past the tables")
        type_id, count = _TYPE_HEAD.unpack_from(data, pos)
        if not MIN_LEVELS <= count <= MAX_LEVELS:
            raise PayloadError(f"level table type {type_id}: L must be in [{MIN_LEVELS}, {MAX_LEVELS}], got {count}")
        if type_id in levels:
            raise PayloadError(f"level table lists type {type_id} twice")
        pos += _TYPE_HEAD.size
        if pos + 4 * count > body_start:
            raise PayloadError(f"level table type {type_id} runs past the tables")
        lv = np.frombuffer(data, dtype="<f4", count=count, offset=pos).astype(np.float32)
        if not (np.isfinite(lv).all() and lv[0] == 0.0 and lv[-1] == 1.0 and (np.diff(lv) > 0).all()):
            raise PayloadError(f"level table type {type_id}: levels must rise strictly from 0 to 1")
        levels[type_id] = lv
        pos += 4 * count

    # Segment and raw tables.
    seg_bytes = n_seg * _SEGMENT_DTYPE.itemsize
    raw_bytes = n_raw * _RAW_DTYPE.itemsize
    if pos + seg_bytes + raw_bytes != body_start:
        raise PayloadError(f"tables end at byte {pos + seg_bytes + raw_bytes}, body starts at "
                           f"{body_start}: lengths in the header are inconsistent")
    segs = np.frombuffer(data, dtype=_SEGMENT_DTYPE, count=n_seg, offset=pos)
    raws = np.frombuffer(data, dtype=_RAW_DTYPE, count=n_raw, offset=pos + seg_bytes)

    def fail_at(kind: str, mask: np.ndarray, why: str) -> None:
        if mask.any():
            i = int(np.flatnonzero(mask)[0])
            raise PayloadError(f"{kind} {i}: {why}")

    fail_at("segment", segs["reserved"] != 0, "reserved byte must be 0")
    fail_at("segment", ~np.isin(segs["codec_id"], list(CODEC_BY_ID)),
            f"unknown codec id; known {sorted(CODEC_BY_ID)}")
    fail_at("segment", ~np.isin(segs["type_id"], list(levels)), f"type id not in the level table {sorted(levels)}")
    fail_at("segment", segs["bucket_size"] == 0, "bucket_size must be >= 1")
    fail_at("segment", segs["numel"] > MAX_NUMEL, f"numel above the limit {MAX_NUMEL}")
    fail_at("raw", raws["dtype"] != 0, "dtype code must be 0 (float32)")
    fail_at("raw", raws["numel"] > MAX_NUMEL, f"numel above the limit {MAX_NUMEL}")
    fail_at("segment", segs["length"] > body_len, "length exceeds the body")
    fail_at("raw", raws["length"] > body_len, "length exceeds the body")
    ids = np.concatenate([segs["layer_id"], raws["layer_id"]])
    if np.unique(ids).size != ids.size:
        raise PayloadError("layer ids repeat across segments / raw segments")

    # Regions tile the body in table order (lengths <= body_len < 2**63, so sums fit in uint64).
    lengths = np.concatenate([segs["length"], raws["length"]]).astype(np.uint64)
    offsets = np.concatenate([segs["offset"], raws["offset"]]).astype(np.uint64)
    expected = np.concatenate([[0], np.cumsum(lengths, dtype=np.uint64)]).astype(np.uint64)
    bad = np.flatnonzero(offsets != expected[:-1])
    if bad.size:
        i = int(bad[0])
        raise PayloadError(f"region {i} starts at {int(offsets[i])}, expected {int(expected[i])}: "
                           "regions must be contiguous in table order (gap, overlap or past the end)")
    if int(expected[-1]) != body_len:
        raise PayloadError(f"regions cover {int(expected[-1])} bytes, body is {body_len}")

    numel = segs["numel"].astype(np.int64)
    total = int(numel.sum()) + int(raws["numel"].astype(np.int64).sum())
    budget = max_numel if max_numel is not None else max(MIN_DECODE_BUDGET, MAX_SYMBOLS_PER_BYTE * n)
    if total > budget:
        raise PayloadError(f"payload claims {total} coordinates, above the decode budget of {budget} "
                           f"({'max_numel' if max_numel is not None else 'default: max(2**24, 1024 x bytes)'})")
    buckets = -(-numel // segs["bucket_size"].astype(np.int64))
    fail_at("segment", segs["length"].astype(np.int64) < 4 * buckets,
            "region is shorter than its float32 norms")
    fail_at("raw", raws["length"] != 4 * raws["numel"], "length must be 4 * numel")

    return _Parsed(levels, segs, raws, body_start, body_start)


def _check_max_numel(max_numel: int | None) -> int | None:
    if max_numel is None:
        return None
    return _check_int("max_numel", max_numel, 0, 2**62)


def decode(buffer: Any, *, max_numel: int | None = None, packed: bool = False) -> Decoded:
    """Decode and validate a payload.

    Args:
        buffer: the payload: ``torch.uint8`` tensor (CPU or CUDA, copied to host), uint8 numpy
            array, bytes, bytearray or memoryview.
        max_numel: most coordinates (symbols plus raw values) the caller accepts; defaults to
            ``max(2**24, 1024 * len(buffer))``. See "Memory bound" in the module docstring.
        packed: return :class:`PackedSegment` objects (the fast path: ``fixed`` bodies are
            returned as views of ``buffer``, ``rans`` bodies decode to packed bytes, and no
            int8 symbols are made; packed values outside the alphabet are left for the
            unpacking kernel to count, see :mod:`qoda_hvd.kernels`).

    Returns:
        :class:`Decoded` with owned numpy arrays (views of ``buffer`` for packed ``fixed``).

    Raises:
        PayloadError: the bytes are truncated, corrupted, inconsistent or over the budget.
        TypeError / ValueError: ``buffer`` or ``max_numel`` has the wrong type or value.

    Example::

        >>> from qoda_hvd import PayloadError
        >>> try:
        ...     decode(b"QDHV" + bytes(30))
        ... except PayloadError as e:
        ...     print(str(e)[:24])
        unsupported payload vers
    """
    max_numel = _check_max_numel(max_numel)
    data = _as_view(buffer)
    parsed = _parse(data, max_numel)
    segments: list[Segment] = []
    names: list[str] = []
    start = parsed.body_start
    for i, row in enumerate(parsed.segments):
        numel = int(row["numel"])
        bucket_size = int(row["bucket_size"])
        type_id = int(row["type_id"])
        num_levels = parsed.levels[type_id].size
        begin = start + int(row["offset"])
        nb = -(-numel // bucket_size)
        norms = np.frombuffer(data, dtype="<f4", count=nb, offset=begin).astype(np.float32)
        if (norms < 0).any():
            raise PayloadError(f"segment {i} (layer {int(row['layer_id'])}): negative norm")
        coder = CODEC_BY_ID[int(row["codec_id"])]
        body = data[begin + 4 * nb: begin + int(row["length"])]
        try:
            if packed and hasattr(coder, "decode_packed"):
                seg = PackedSegment(int(row["layer_id"]), type_id, numel, bucket_size,
                                    coder.decode_packed(body, numel, num_levels), norms, num_levels)
            else:
                symbols = coder.decode(body, numel, num_levels)
                seg = Segment(int(row["layer_id"]), type_id, numel, bucket_size, symbols, norms,
                              num_levels)
                if packed:
                    values = bits.pack_fixed(symbols.view(np.uint8) + np.uint8(num_levels - 1),
                                             fixed_width(num_levels))
                    seg = PackedSegment(seg.layer_id, type_id, numel, bucket_size, values, norms,
                                        num_levels)
        except CodecError as e:
            raise PayloadError(f"segment {i} (layer {int(row['layer_id'])}, {coder.name}): {e}") from None
        segments.append(seg)
        names.append(coder.name)
    raw = [
        RawSegment(int(row["layer_id"]),
                   np.frombuffer(data, dtype="<f4", count=int(row["numel"]),
                                 offset=start + int(row["offset"])).astype(np.float32))
        for row in parsed.raw
    ]
    return Decoded(segments, raw, parsed.levels, names, len(data))


def inspect_payload(buffer: Any, *, max_numel: int | None = None) -> PayloadLayout:
    """Validate a payload's header, tables and checksum and report where its bytes go.

    Bodies are not decoded (use :func:`decode` for full validation).

    Example::

        >>> import numpy as np
        >>> seg = Segment(0, 0, 8, 8, np.zeros(8, np.int8), np.ones(1, np.float32), 2)
        >>> inspect_payload(encode([seg], {0: np.array([0, 1], np.float32)}, "fixed")).code_bytes
        [2]
    """
    max_numel = _check_max_numel(max_numel)
    data = _as_view(buffer)
    parsed = _parse(data, max_numel)
    segs = parsed.segments
    numel = segs["numel"].astype(np.int64)
    norm_bytes = 4 * (-(-numel // segs["bucket_size"].astype(np.int64)))
    return PayloadLayout(
        nbytes=len(data),
        header_bytes=parsed.header_bytes,
        norm_bytes=[int(x) for x in norm_bytes],
        code_bytes=[int(x) for x in segs["length"].astype(np.int64) - norm_bytes],
        codecs=[CODEC_BY_ID[int(c)].name for c in segs["codec_id"]],
        numels=[int(x) for x in numel],
        raw_bytes=int(parsed.raw["length"].astype(np.int64).sum()),
        raw_numel=int(parsed.raw["numel"].astype(np.int64).sum()),
    )


def bits_per_coordinate(buffer: Any, *, max_numel: int | None = None) -> float:
    """Exact bits per coordinate of a payload: 8 * len(payload) / (symbols + raw values).

    Everything counts: header, tables, norms, codec side info, code, raw values and CRC.

    Example::

        >>> import numpy as np
        >>> seg = Segment(0, 0, 8, 8, np.zeros(8, np.int8), np.ones(1, np.float32), 2)
        >>> p = encode([seg], {0: np.array([0, 1], np.float32)}, "fixed")
        >>> bits_per_coordinate(p) == 8 * p.numel() / 8
        True
    """
    layout = inspect_payload(buffer, max_numel=max_numel)
    return 8.0 * layout.nbytes / layout.numel if layout.numel else math.inf
