"""Symbol codecs behind one registry: ``fixed``, ``ans``, ``elias``, ``zstd`` and ``rans``.

A codec turns one segment's int8 symbols (``sign * level_index``, ``|symbol| <= L - 1``) into
bytes that decode alone (side information included) and back. Codecs see numpy only.

======== == ============================================================== ================
name     id body                                                           size
======== == ============================================================== ================
fixed    0  ``u = symbol + L - 1`` in ``w = ceil(log2(2L - 1))`` bits each,  exact:
            MSB first, padded with 1 bits (never a valid value)             ceil(n w / 8)
ans      1  counts side info (:mod:`.model`), then constriction ANS words    ~ n H + side
            (uint32 LE); no words when a single value occurs                info + 4..8
elias    2  nnz (uint64 LE), then per non-zero symbol the QSGD triple        exact, see
            omega(zeros before it + 1), sign (1 = negative), omega(level),  :func:`elias_size`
            then omega(trailing zeros + 1), zero padded to a byte
zstd     3  zstandard frame (content size set) of one byte ``u`` per symbol  measured
rans     4  the ``fixed`` body, coded byte-wise by rANS (:mod:`.rans`)      ~ entropy of the
                                                                            packed bytes + side
======== == ============================================================== ================

``fixed`` and ``rans`` also code *packed* symbols directly (``encode_packed`` /
``decode_packed``: the ``fixed`` body as made by :mod:`qoda_hvd.kernels`), which is the fast path
of the exchange: no int8 symbol array exists on either side.

An empty segment (numel 0) has an empty body for every codec. The ``elias`` body ends with the
trailing zero run (QSGD leaves it implicit) so that the body alone fixes numel: a header that
changes numel by any amount is rejected by every codec (``fixed`` through its all-ones padding,
``ans`` through its counts, ``zstd`` through its frame size).

``decode`` validates everything it reads: lengths exact where the codec defines them, values
inside the alphabet, side information consistent with numel, no trailing bytes; any
inconsistency raises :class:`CodecError`, which the wire format reports as PayloadError with the
segment index. Exceptions raised by constriction (including Rust panics, which are not
``Exception`` subclasses) and zstandard are converted the same way.

Example::

    >>> import numpy as np
    >>> from qoda_hvd.coding.codecs import CODECS
    >>> s = np.array([0, 1, -1, 0, 0, 2], dtype=np.int8)
    >>> data = CODECS["ans"].encode(s, num_levels=3)
    >>> CODECS["ans"].decode(data, numel=6, num_levels=3).tolist()
    [0, 1, -1, 0, 0, 2]
"""
from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from qoda_hvd.coding import bits, rans
from qoda_hvd.coding.model import CountsModel, ModelError

__all__ = [
    "Codec",
    "CodecError",
    "CODECS",
    "CODEC_BY_ID",
    "FixedCodec",
    "AnsCodec",
    "EliasCodec",
    "ZstdCodec",
    "RansCodec",
    "fixed_width",
    "check_padding",
    "elias_size",
    "to_values",
    "from_values",
]


class CodecError(ValueError):
    """A codec body does not decode to the segment it claims (PayloadError upstream)."""


def fixed_width(num_levels: int) -> int:
    """Bits per symbol of the ``fixed`` codec: ceil(log2(2L - 1))."""
    return (2 * num_levels - 2).bit_length()


def to_values(symbols: np.ndarray, num_levels: int) -> np.ndarray:
    """int8 symbols -> uint8 values ``symbol + L - 1`` in [0, 2L - 2] (modular add, no copy pass)."""
    return symbols.view(np.uint8) + np.uint8(num_levels - 1)


def from_values(values: np.ndarray, num_levels: int) -> np.ndarray:
    """Inverse of :func:`to_values`."""
    return (values - np.uint8(num_levels - 1)).view(np.int8)


def _check_alphabet(values: np.ndarray, num_levels: int) -> None:
    if values.size and int(values.max()) > 2 * num_levels - 2:
        raise CodecError(f"decoded value {int(values.max())} outside alphabet of {2 * num_levels - 1}")


class Codec(Protocol):
    """What every codec provides (see the module table)."""

    name: str
    codec_id: int

    def encode(self, symbols: np.ndarray, num_levels: int) -> bytes:
        """Encode int8 ``symbols`` (validated by the caller) into a self-contained body."""

    def decode(self, data: memoryview | bytes, numel: int, num_levels: int) -> np.ndarray:
        """Decode exactly ``numel`` int8 symbols or raise CodecError."""


def check_padding(packed: np.ndarray, numel: int, width: int) -> None:
    """Raise CodecError unless the bits after the last field of a packed body are all ones."""
    used = (numel * width) % 8
    if used and packed.size:
        mask = (1 << (8 - used)) - 1
        if int(packed[-1]) & mask != mask:
            raise CodecError("fixed body padding bits must be 1 (numel does not match the body)")


class FixedCodec:
    """Fixed-width bit packing; the fastest codec and the size every other codec must beat."""

    name = "fixed"
    codec_id = 0

    def encode_packed(self, packed: np.ndarray, numel: int, num_levels: int) -> np.ndarray:
        """The body of already packed symbols: the packed bytes themselves."""
        return packed

    def decode_packed(self, data, numel: int, num_levels: int) -> np.ndarray:
        """The packed bytes of a body (length and padding checked; the values are checked by
        the unpacking kernel, which counts those outside the alphabet)."""
        expected = self.size(numel, num_levels)
        if len(data) != expected:
            raise CodecError(f"fixed body must be {expected} bytes for numel={numel}, got {len(data)}")
        packed = np.frombuffer(data, dtype=np.uint8)
        check_padding(packed, numel, fixed_width(num_levels))
        return packed

    def encode(self, symbols: np.ndarray, num_levels: int) -> bytes:
        return bits.pack_fixed(to_values(symbols, num_levels), fixed_width(num_levels)).tobytes()

    def size(self, numel: int, num_levels: int) -> int:
        return -(-numel * fixed_width(num_levels) // 8)

    def decode(self, data, numel: int, num_levels: int) -> np.ndarray:
        expected = self.size(numel, num_levels)
        if len(data) != expected:
            raise CodecError(f"fixed body must be {expected} bytes for numel={numel}, got {len(data)}")
        try:
            values = bits.unpack_fixed(np.frombuffer(data, dtype=np.uint8), numel,
                                       fixed_width(num_levels))
        except bits.StreamError as e:
            raise CodecError(str(e)) from None
        _check_alphabet(values, num_levels)
        return from_values(values, num_levels)


def _is_fatal(exc: BaseException) -> bool:
    return isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError))


class AnsCodec:
    """constriction's stack ANS coder with one categorical model per segment.

    The model is the segment's exact symbol counts (side info, :mod:`.model`); all symbols are
    coded with one vectorised ``encode_reverse`` call and decoded with one ``decode`` call.
    """

    name = "ans"
    codec_id = 1

    def encode(self, symbols: np.ndarray, num_levels: int) -> bytes:
        import constriction

        if symbols.size == 0:
            return b""
        values = to_values(symbols, num_levels)
        model = CountsModel.from_values(values, 2 * num_levels - 1)
        side = model.to_bytes()
        if model.present.size == 1:
            return side  # one value: the counts say everything
        ans_model = constriction.stream.model.Categorical(model.probabilities(), perfect=False)
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(model.index_of(values), ans_model)
        return side + coder.get_compressed().astype("<u4").tobytes()

    def size_estimate(self, model: CountsModel) -> int:
        """Side info plus the entropy in whole 32-bit words (ANS lands within a word or two)."""
        if model.numel == 0:
            return 0
        if model.present.size == 1:
            return model.side_info_size()
        return model.side_info_size() + 4 * (math.ceil(model.entropy_bits() / 32) + 1)

    def decode(self, data, numel: int, num_levels: int) -> np.ndarray:
        if numel == 0:
            if len(data):
                raise CodecError(f"empty segment must have an empty body, got {len(data)} bytes")
            return np.zeros(0, dtype=np.int8)
        try:
            model, used = CountsModel.from_bytes(data, numel, 2 * num_levels - 1)
        except ModelError as e:
            raise CodecError(f"ans side info: {e}") from None
        rest = len(data) - used
        if model.present.size == 1:
            if rest:
                raise CodecError(f"single-value ans segment has {rest} unexpected bytes")
            values = np.full(numel, model.present[0], dtype=np.uint8)
            return from_values(values, num_levels)
        if rest < 4 or rest % 4:
            raise CodecError(f"ans words must be a positive multiple of 4 bytes, got {rest}")
        words = np.frombuffer(data, dtype="<u4", offset=used).astype(np.uint32)
        try:
            import constriction

            ans_model = constriction.stream.model.Categorical(model.probabilities(), perfect=False)
            coder = constriction.stream.stack.AnsCoder(words)
            index = coder.decode(ans_model, numel)
            leftover = not coder.is_empty()
        except BaseException as e:  # constriction raises ValueError or a Rust panic
            if _is_fatal(e):
                raise
            raise CodecError(f"ans decoder rejected the words: {type(e).__name__}: {e}") from None
        if leftover:
            raise CodecError("ans words left over after decoding numel symbols")
        decoded_counts = np.bincount(index, minlength=model.present.size)
        if decoded_counts.size != model.present.size or not np.array_equal(decoded_counts, model.counts):
            raise CodecError("ans symbols decoded do not match the counts in the side info")
        return from_values(model.present.astype(np.uint8)[index], num_levels)


def _elias_fields(symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    nonzero = np.flatnonzero(symbols)
    runs_plus_one = np.diff(nonzero, prepend=-1)  # zeros before each non-zero, plus one
    return nonzero, runs_plus_one


def elias_size(symbols: np.ndarray) -> int:
    """Exact byte size of the ``elias`` body of ``symbols`` (vectorised code lengths)."""
    if symbols.size == 0:
        return 0
    nonzero, runs_plus_one = _elias_fields(symbols)
    levels = np.abs(symbols[nonzero].astype(np.int16))
    trailing = symbols.size - (int(nonzero[-1]) + 1 if nonzero.size else 0)
    total = int(bits.omega_lengths(runs_plus_one).sum() + bits.omega_lengths(levels).sum())
    total += int(bits.omega_lengths(np.array([trailing + 1]))[0])
    return 8 + -(-(total + nonzero.size) // 8)


class EliasCodec:
    """The QSGD protocol with Elias-omega integer codes; distribution-free, no model.

    Decoding is vectorised by speculative decoding at every bit position (see
    :mod:`qoda_hvd.coding.bits`); it costs O(body bits) and is several times slower than
    ``ans`` at equal size, so ``auto`` picks it only when zero runs make it smaller.
    """

    name = "elias"
    codec_id = 2

    def encode(self, symbols: np.ndarray, num_levels: int) -> bytes:
        if symbols.size == 0:
            return b""
        nonzero, runs_plus_one = _elias_fields(symbols)
        picked = symbols[nonzero]
        run_codes, run_lengths = bits.omega_encode(runs_plus_one)
        level_codes, level_lengths = bits.omega_encode(np.abs(picked.astype(np.int16)))
        # Sign bit in front of the level code: one code word of at most 1 + 13 bits.
        level_codes |= (picked < 0).astype(np.uint64) << level_lengths.astype(np.uint64)
        trailing = symbols.size - (int(nonzero[-1]) + 1 if nonzero.size else 0)
        tail_code, tail_length = bits.omega_encode(np.array([trailing + 1]))
        codes = np.empty(2 * nonzero.size + 1, dtype=np.uint64)
        lengths = np.empty(2 * nonzero.size + 1, dtype=np.int64)
        codes[0:-1:2], codes[1::2], codes[-1] = run_codes, level_codes, tail_code[0]
        lengths[0:-1:2], lengths[1::2] = run_lengths, level_lengths + 1
        lengths[-1] = tail_length[0]
        return int(nonzero.size).to_bytes(8, "little") + bits.pack_codes(codes, lengths).tobytes()

    def decode(self, data, numel: int, num_levels: int) -> np.ndarray:
        if numel == 0:
            if len(data):
                raise CodecError(f"empty segment must have an empty body, got {len(data)} bytes")
            return np.zeros(0, dtype=np.int8)
        if len(data) < 8:
            raise CodecError(f"elias body needs an 8-byte count, got {len(data)} bytes")
        nnz = int.from_bytes(bytes(data[:8]), "little")
        stream = np.frombuffer(data, dtype=np.uint8, offset=8)
        if nnz > numel:
            raise CodecError(f"elias claims {nnz} non-zeros in a segment of {numel}")
        if 3 * nnz > 8 * stream.size:  # each triple takes at least 3 bits
            raise CodecError(f"elias claims {nnz} non-zeros but holds only {8 * stream.size} bits")
        try:
            if nnz:
                runs_plus_one, negative, levels, cursor = bits.omega_decode_stream(stream, nnz)
            else:
                runs_plus_one = levels = np.zeros(0, dtype=np.int64)
                negative, cursor = np.zeros(0, dtype=bool), 0
            tail_plus_one, end = bits.omega_decode_at(stream, cursor)
        except bits.StreamError as e:
            raise CodecError(f"elias: {e}") from None
        if -(-end // 8) != stream.size:
            raise CodecError(f"elias code words end at bit {end}, body holds {8 * stream.size}")
        if end % 8 and int(stream[-1]) & ((1 << (8 - end % 8)) - 1):
            raise CodecError("elias padding bits are not zero")
        if nnz and int(levels.max()) > num_levels - 1:
            raise CodecError(f"elias level {int(levels.max())} exceeds {num_levels - 1}")
        if nnz and int(runs_plus_one.max()) > numel:
            raise CodecError(f"elias zero run exceeds numel={numel}")
        # Runs and tail must add up to numel exactly (float sum first: no int64 overflow).
        covered = float(runs_plus_one.sum(dtype=np.float64)) + tail_plus_one - 1
        if covered != numel or int(runs_plus_one.sum()) + tail_plus_one - 1 != numel:
            raise CodecError(f"elias zero runs and non-zeros cover {covered:.0f} coordinates, numel={numel}")
        out = np.zeros(numel, dtype=np.int8)
        if nnz:
            positions = np.cumsum(runs_plus_one) - 1
            lev = levels.astype(np.int8)
            out[positions] = np.where(negative, -lev, lev)
        return out


class ZstdCodec:
    """zstandard on one byte per symbol: fast, no model, weak at small alphabets.

    Args:
        level: zstandard compression level (1-3 are the fast levels meant here).
    """

    name = "zstd"
    codec_id = 3

    def __init__(self, level: int = 1) -> None:
        if not 1 <= level <= 22:
            raise ValueError(f"zstd level must be in [1, 22], got {level}")
        self.level = level

    def encode(self, symbols: np.ndarray, num_levels: int) -> bytes:
        import zstandard

        if symbols.size == 0:
            return b""
        values = to_values(symbols, num_levels)
        return zstandard.ZstdCompressor(level=self.level, write_content_size=True).compress(values)

    def decode(self, data, numel: int, num_levels: int) -> np.ndarray:
        import zstandard

        if numel == 0:
            if len(data):
                raise CodecError(f"empty segment must have an empty body, got {len(data)} bytes")
            return np.zeros(0, dtype=np.int8)
        try:
            declared = zstandard.frame_content_size(data)
            if declared != numel:
                raise CodecError(f"zstd frame declares {declared} bytes, segment numel is {numel}")
            dobj = zstandard.ZstdDecompressor().decompressobj()
            out = dobj.decompress(data)
            complete, trailing = dobj.eof, len(dobj.unused_data)
        except CodecError:
            raise
        except BaseException as e:
            if _is_fatal(e):
                raise
            raise CodecError(f"zstd rejected the frame: {e}") from None
        if not complete or trailing or len(out) != numel:
            raise CodecError(f"zstd frame incomplete, {trailing} trailing bytes or {len(out)} != {numel}")
        values = np.frombuffer(out, dtype=np.uint8)
        _check_alphabet(values, num_levels)
        return from_values(values, num_levels)


class RansCodec:
    """rANS over the packed (``fixed``) bytes: within a fraction of a percent of their
    zeroth-order entropy, a few ns per byte each way (:mod:`qoda_hvd.coding.rans`)."""

    name = "rans"
    codec_id = 4

    def encode_packed(self, packed: np.ndarray, numel: int, num_levels: int,
                      counts: np.ndarray | None = None) -> bytes:
        if numel == 0:
            return b""
        return rans.encode_bytes(packed, counts)

    def decode_packed(self, data, numel: int, num_levels: int) -> np.ndarray:
        if numel == 0:
            if len(data):
                raise CodecError(f"empty segment must have an empty body, got {len(data)} bytes")
            return np.zeros(0, dtype=np.uint8)
        try:
            packed = rans.decode_bytes(data, -(-numel * fixed_width(num_levels) // 8))
        except rans.RansError as e:
            raise CodecError(str(e)) from None
        check_padding(packed, numel, fixed_width(num_levels))
        return packed

    def encode(self, symbols: np.ndarray, num_levels: int) -> bytes:
        packed = bits.pack_fixed(to_values(symbols, num_levels), fixed_width(num_levels))
        return self.encode_packed(packed, symbols.size, num_levels)

    def decode(self, data, numel: int, num_levels: int) -> np.ndarray:
        packed = self.decode_packed(data, numel, num_levels)
        if numel == 0:
            return np.zeros(0, dtype=np.int8)
        try:
            values = bits.unpack_fixed(packed, numel, fixed_width(num_levels))
        except bits.StreamError as e:
            raise CodecError(str(e)) from None
        _check_alphabet(values, num_levels)
        return from_values(values, num_levels)


CODECS: dict[str, Codec] = {
    "fixed": FixedCodec(),
    "ans": AnsCodec(),
    "elias": EliasCodec(),
    "zstd": ZstdCodec(level=1),
    "rans": RansCodec(),
}
CODEC_BY_ID: dict[int, Codec] = {c.codec_id: c for c in CODECS.values()}
