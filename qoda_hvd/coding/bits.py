"""Vectorised bit packing: fixed-width fields, variable-length codes and Elias-omega.

Everything here is numpy over whole arrays; the only Python loops run over a constant number of
passes (bit widths, code recursion depth) or over chunks of a bit stream, never over symbols.
Bit order is MSB first throughout (the first bit of a stream is bit 7 of byte 0), as in
``np.packbits``.

Hand-written because no maintained library packs arbitrary-width fields or Elias codes from
numpy arrays (``np.packbits`` handles single bits only); the functions are small and pinned by
golden bytes in the tests.

Elias-omega decoding is inherently sequential (a code's length is known only after reading it).
:func:`omega_decode_stream` makes it vectorised anyway by *speculating*: it decodes a code word at
every bit position of a chunk at once (the QSGD triple ``omega(run + 1), sign, omega(level)``
needs two such look-ups), which gives the start of the next triple for every position. The true
chain of starts is then followed with a jump table of 64 code words (six squarings of the
successor array), so the Python loop runs over at most ``nnz / 64`` steps per stream plus at
most 64 per chunk of 2**19 bits; the 63 starts between jumps are recovered with vectorised
gathers. Cost is O(bits) work and O(chunk) memory.

Example::

    >>> import numpy as np
    >>> from qoda_hvd.coding.bits import pack_fixed, unpack_fixed
    >>> packed = pack_fixed(np.array([1, 2, 3], dtype=np.uint8), width=2)
    >>> bytes(packed).hex(), unpack_fixed(packed, 3, width=2).tolist()
    ('6f', [1, 2, 3])
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "bit_length",
    "omega_lengths",
    "omega_encode",
    "pack_codes",
    "pack_fixed",
    "unpack_fixed",
    "omega_decode_stream",
    "omega_decode_at",
    "StreamError",
]

_U64 = np.uint64
# Values coded with Elias-omega stay below 2**53 so float64 gives exact bit lengths.
_MAX_OMEGA_VALUE = 1 << 53
# A QSGD triple omega(run + 1) + sign + omega(level) never spans more bits than this.
_MAX_TRIPLE_BITS = 64 + 1 + 64
# Stream bits decoded per vectorised pass. The pass's working set is ~60 bytes per bit (the
# per-position code tables and the jump chain), so this bounds its memory: 2**16 bits, ~4 MB
# (2**19 held ~30 MB for any payload of 64 KB or more, 460 bytes per decoded coordinate at
# 4-64k coordinates), at the same speed.
_CHUNK_BITS = 1 << 16
_JUMP_SQUARINGS = 6
_JUMP = 1 << _JUMP_SQUARINGS  # code words per jump-table step


class StreamError(ValueError):
    """A bit stream does not decode (the caller turns it into a PayloadError with context)."""


def bit_length(values: np.ndarray) -> np.ndarray:
    """Bit length of each non-negative integer below 2**53 (0 -> 0), as int64."""
    _, exponent = np.frexp(values.astype(np.float64))
    return exponent.astype(np.int64)


def pack_fixed(values: np.ndarray, width: int) -> np.ndarray:
    """Pack uint8 ``values`` (each < 2**width) into ``ceil(n * width / 8)`` bytes, MSB first.

    The last byte is padded with 1 bits.

    Eight values fill exactly ``width`` bytes, so each group of eight is assembled in one uint64
    with ``width`` shift-or passes over columns and its low ``width`` bytes are kept.
    """
    n = values.size
    if width == 8:
        return np.ascontiguousarray(values, dtype=np.uint8).copy()
    groups = -(-n // 8)
    # Pad with all-ones fields: 2**width - 1 >= 2L - 1 is never a valid value, so a header that
    # claims a few more symbols than were packed decodes an invalid value and is rejected.
    padded = np.full(groups * 8, (1 << width) - 1, dtype=np.uint8)
    padded[:n] = values
    columns = padded.reshape(groups, 8)
    acc = np.zeros(groups, dtype=_U64)
    for j in range(8):
        acc |= columns[:, j].astype(_U64) << _U64(width * (7 - j))
    as_bytes = acc.astype(">u8").view(np.uint8).reshape(groups, 8)[:, 8 - width:]
    return as_bytes.reshape(-1)[: -(-n * width // 8)].copy()


def unpack_fixed(data: np.ndarray, n: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_fixed`; raises StreamError unless every padding bit is 1.

    ``data`` must hold exactly ``ceil(n * width / 8)`` bytes (the caller checks the length).
    """
    if width == 8:
        return np.array(data, dtype=np.uint8, copy=True)
    groups = -(-n // 8)
    buf = np.zeros((groups, 8), dtype=np.uint8)
    flat = np.full(groups * width, 0xFF, dtype=np.uint8)
    flat[: data.size] = data
    buf[:, 8 - width:] = flat.reshape(groups, width)
    acc = buf.view(">u8").reshape(groups).astype(_U64)
    out = np.empty((groups, 8), dtype=np.uint8)
    mask = _U64((1 << width) - 1)
    for j in range(8):
        out[:, j] = (acc >> _U64(width * (7 - j))) & mask
    out = out.reshape(-1)
    if (out[n:] != (1 << width) - 1).any():
        raise StreamError("padding bits after the last fixed-width field must all be 1")
    return out[:n]


def omega_lengths(values: np.ndarray) -> np.ndarray:
    """Length in bits of the Elias-omega code of each value >= 1 (int64)."""
    lengths = np.ones(values.shape, dtype=np.int64)
    m = values.astype(np.int64)
    idx = np.flatnonzero(m > 1)
    while idx.size:
        b = bit_length(m[idx])
        lengths[idx] += b
        m[idx] = b - 1
        keep = m[idx] > 1
        idx = idx[keep]
    return lengths


def omega_encode(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Elias-omega codes of ``values`` (each in [1, 2**53)), right aligned in uint64.

    Omega of n: write "0"; while n > 1, prepend binary(n) and set n := bit_length(n) - 1.
    Built right to left, all values at once; the loop runs over the recursion depth (<= 5).

    Returns:
        ``(codes, lengths)``: uint64 code words and their int64 bit lengths (<= 64).
    """
    codes = np.zeros(values.shape, dtype=_U64)
    lengths = np.ones(values.shape, dtype=np.int64)
    m = values.astype(np.int64)
    idx = np.flatnonzero(m > 1)
    while idx.size:
        mi = m[idx]
        b = bit_length(mi)
        codes[idx] |= mi.astype(_U64) << lengths[idx].astype(_U64)
        lengths[idx] += b
        m[idx] = b - 1
        idx = idx[b - 1 > 1]
    return codes, lengths


def pack_codes(codes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate variable-length code words (each 1..64 bits, right aligned) into bytes.

    Each word lands in at most two 64-bit output words. Bit offsets come from a cumulative sum;
    contributions to one output word are disjoint and contiguous in the input (offsets grow),
    so ``bitwise_or.reduceat`` merges them without a scatter loop. The last byte is zero padded.
    """
    if codes.size == 0:
        return np.zeros(0, dtype=np.uint8)
    ends = np.cumsum(lengths)
    total = int(ends[-1])
    starts = ends - lengths
    word = starts >> 6
    within = starts & 63
    shift = 64 - within - lengths  # < 0 when the code spills into the next word
    left = shift >= 0
    first = np.where(
        left,
        codes << np.where(left, shift, 0).astype(_U64),
        codes >> np.where(left, 0, -shift).astype(_U64),
    )
    out = np.zeros(total // 64 + 2, dtype=_U64)
    heads = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
    out[word[heads]] = np.bitwise_or.reduceat(first, heads)
    spill = np.flatnonzero(~left)
    if spill.size:  # at most one code crosses each word boundary, so indices are unique
        out[word[spill] + 1] |= codes[spill] << (64 + shift[spill]).astype(_U64)
    return out.astype(">u8").view(np.uint8)[: -(-total // 8)].copy()


def _windows(padded: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """64-bit window of ``padded`` (a byte stream followed by >= 9 zero bytes) at each bit."""
    byte = positions >> 3
    r = (positions & 7).astype(_U64)
    w64 = np.zeros(positions.size, dtype=_U64)
    for k in range(8):
        w64 |= padded[byte + k].astype(_U64) << _U64(56 - 8 * k)
    nxt = padded[byte + 8].astype(_U64)
    # (w64 << r) | (next byte >> (8 - r)); for r == 0 the next byte is shifted out entirely.
    return (w64 << r) | ((nxt << _U64(8)) >> (_U64(8) - r) >> _U64(8))


def _omega_at(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode one Elias-omega code at the start of every 64-bit window (general, slow path).

    Returns ``(values, lengths)`` as int64; length 0 marks a window that holds no complete code
    of at most 64 bits, or a value of 2**53 or more (never produced by the encoder).
    """
    count = windows.size
    values = np.ones(count, dtype=_U64)
    lengths = np.zeros(count, dtype=np.int64)
    consumed = np.zeros(count, dtype=np.int64)
    idx = np.arange(count)
    while idx.size:
        idx = idx[consumed[idx] < 64]  # all 64 bits used: no complete code in this window
        w = windows[idx]
        c = consumed[idx]
        bit = (w << c.astype(_U64)) >> _U64(63)
        stop = bit == 0
        done = idx[stop]
        lengths[done] = c[stop] + 1
        go = ~stop
        idx, w, c = idx[go], w[go], c[go]
        # The next group has values + 1 bits; keep only windows where it fits (compare in
        # uint64: a 63-bit group value must not wrap when cast).
        fits = values[idx] < (64 - c).astype(_U64)
        idx, w, c = idx[fits], w[fits], c[fits]
        k = values[idx].astype(np.int64) + 1
        values[idx] = (w << c.astype(_U64)) >> (64 - k).astype(_U64)
        consumed[idx] = c + k
    lengths[values >= _U64(_MAX_OMEGA_VALUE)] = 0
    return np.minimum(values, _U64(_MAX_OMEGA_VALUE)).astype(np.int64), lengths


def _build_tables() -> tuple[np.ndarray, np.ndarray]:
    """Decode table over 16-bit prefixes: omega value and length, length 0 if > 16 bits."""
    prefixes = np.arange(1 << 16, dtype=_U64) << _U64(48)
    values, lengths = _omega_at(prefixes)
    lengths[lengths > 16] = 0  # read zero padding: the real code is longer
    return values.astype(np.int64), lengths.astype(np.int64)


_TABLE_VALUES, _TABLE_LENGTHS = _build_tables()


def _omega_everywhere(padded: np.ndarray, first_bit: int, count: int):
    """Omega ``(values, lengths)`` at bit positions first_bit .. first_bit + count - 1.

    A 16-bit table look-up decodes every code of at most 16 bits (values below 1024: all
    levels and most zero runs); only the remaining positions take the general path.
    """
    first_byte = first_bit >> 3
    nbytes = ((first_bit + count) >> 3) - first_byte + 1
    b = padded[first_byte: first_byte + nbytes + 2].astype(np.uint32)
    w24 = (b[:nbytes] << 16) | (b[1: nbytes + 1] << 8) | b[2: nbytes + 2]
    shifts = np.arange(8, 0, -1, dtype=np.uint32)
    w16 = ((w24[:, None] >> shifts[None, :]) & 0xFFFF).reshape(-1)
    offset = first_bit - (first_byte << 3)
    w16 = w16[offset: offset + count]
    values = _TABLE_VALUES[w16]
    lengths = _TABLE_LENGTHS[w16]
    slow = np.flatnonzero(lengths == 0)
    if slow.size:
        v, n = _omega_at(_windows(padded, slow + first_bit))
        values[slow] = v
        lengths[slow] = n
    return values, lengths


def omega_decode_stream(
    stream: np.ndarray, nnz: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Decode ``nnz`` QSGD triples ``omega(run + 1), sign bit, omega(level)`` from ``stream``.

    Args:
        stream: uint8 bytes.
        nnz: number of triples to read (the caller bounds it by the stream length).

    Returns:
        ``(runs_plus_one, negative, levels, end_bit)``: int64, bool, int64 arrays of length
        ``nnz`` and the bit position after the last triple.

    Raises:
        StreamError: a code is longer than 64 bits or the triples run past the stream.
    """
    total_bits = 8 * stream.size
    padded = np.zeros(stream.size + 32, dtype=np.uint8)
    padded[: stream.size] = stream
    pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    cursor = 0
    found = 0
    while found < nnz:
        if cursor >= total_bits:
            raise StreamError(f"stream ends after {found} of {nnz} code words")
        base = cursor
        span = min(_CHUNK_BITS, total_bits - base)
        look = span + _MAX_TRIPLE_BITS
        if (base + look) >> 3 > stream.size + 16:  # keep reads inside the zero padding
            look = ((stream.size + 16) << 3) - base
        values, lengths = _omega_everywhere(padded, base, look)
        p = np.arange(span)
        len1 = lengths[:span]
        level_at = np.minimum(p + len1 + 1, look - 1)
        len2 = lengths[level_at]
        nxt = level_at + len2
        bad = (len1 == 0) | (len2 == 0)
        # Local successor: span is the sentinel "leaves the chunk or invalid".
        local = np.where(bad | (nxt >= span), span, nxt)
        local = np.append(local, span)
        jump = local
        for _ in range(_JUMP_SQUARINGS):
            jump = jump[jump]
        # Follow the chain: jumps of _JUMP code words, then single steps to the chunk edge.
        i = 0
        jump_starts = []
        remaining = nnz - found
        while remaining >= _JUMP:
            j = int(jump[i])
            if j >= span:
                break
            jump_starts.append(i)
            remaining -= _JUMP
            i = j
        singles = []
        while remaining > 0 and i < span:
            singles.append(i)
            remaining -= 1
            if bad[i]:
                raise StreamError(f"invalid Elias-omega code at bit {base + i}")
            i = int(local[i])
        if jump_starts:
            block = np.empty((len(jump_starts), _JUMP), dtype=np.int64)
            block[:, 0] = jump_starts
            for k in range(1, _JUMP):
                block[:, k] = local[block[:, k - 1]]
            starts = np.concatenate([block.reshape(-1), np.asarray(singles, dtype=np.int64)])
        else:
            starts = np.asarray(singles, dtype=np.int64)
        if starts.size == 0:
            raise StreamError(f"no code word decodes at bit {base}")
        if bad[starts].any():
            raise StreamError(f"invalid Elias-omega code in bits {base}..{base + span}")
        last = int(starts[-1])
        cursor = base + int(nxt[last])
        la = level_at[starts]
        # A sign bit past the end means cursor > total_bits, rejected below; clip to index.
        sign_pos = np.minimum(base + starts + len1[starts], total_bits - 1)
        sign_bit = _bit_at(stream, sign_pos)
        pieces.append((values[starts], sign_bit, values[la]))
        found += starts.size
    if cursor > total_bits:
        raise StreamError(f"code words run {cursor - total_bits} bits past the stream")
    if not pieces:
        empty = np.zeros(0, dtype=_U64)
        return empty, np.zeros(0, dtype=bool), empty, 0
    runs = np.concatenate([piece[0] for piece in pieces])
    neg = np.concatenate([piece[1] for piece in pieces])
    lev = np.concatenate([piece[2] for piece in pieces])
    return runs, neg, lev, cursor


def omega_decode_at(stream: np.ndarray, position: int) -> tuple[int, int]:
    """Decode one Elias-omega code at bit ``position``: ``(value, end_bit)``.

    Raises:
        StreamError: no complete code of at most 64 bits there, or it runs past the stream.
    """
    total_bits = 8 * stream.size
    if position >= total_bits:
        raise StreamError(f"no bits left for a code word at bit {position}")
    padded = np.zeros(stream.size + 16, dtype=np.uint8)
    padded[: stream.size] = stream
    values, lengths = _omega_at(_windows(padded, np.array([position], dtype=np.int64)))
    end = position + int(lengths[0])
    if lengths[0] == 0 or end > total_bits:
        raise StreamError(f"invalid or truncated code word at bit {position}")
    return int(values[0]), end


def _bit_at(stream: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The bit at each absolute position (positions < 8 * stream.size), as bool."""
    return ((stream[positions >> 3] >> (7 - (positions & 7)).astype(np.uint8)) & 1).astype(bool)
