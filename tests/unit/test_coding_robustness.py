"""Corrupt and hostile payloads must raise PayloadError: never a crash, hang, huge allocation or
silently wrong tensor.

Two layers are tested: the checksum (truncation, extension, bit flips, shuffles, random bytes)
and the parser behind it (hostile headers and bodies with a *recomputed, valid* CRC).

The fuzz tests run a few thousand seeded mutations in a few seconds. To fuzz longer with
coverage guidance, use atheris (``pip install atheris``) with a harness like::

    import sys, atheris
    with atheris.instrument_imports():
        from qoda_hvd import PayloadError
        from qoda_hvd.coding import decode
    def one(data: bytes) -> None:
        try:
            decode(data, max_numel=1 << 22)
        except PayloadError:
            pass
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()

and run ``python fuzz_decode.py -max_total_time=3600 corpus/`` with a corpus of payloads from
``encode`` (for the parser behind the CRC, have the harness recompute the CRC before decoding,
as :func:`reseal` does here). Set ``QODA_FUZZ_ROUNDS`` to run more rounds of the seeded fuzz here.
"""
from __future__ import annotations

import os
import struct
import time
import zlib

import numpy as np
import pytest

from qoda_hvd import PayloadError
from qoda_hvd.coding import CODECS, RawSegment, Segment, decode, encode_bytes

LEVELS = {0: np.linspace(0, 1, 4, dtype=np.float32), 1: np.linspace(0, 1, 2, dtype=np.float32)}
HEADER = 24
SEG_ROW = 36
RAW_ROW = 32
FUZZ_ROUNDS = int(os.environ.get("QODA_FUZZ_ROUNDS", "1"))


def reseal(payload: bytearray | bytes) -> bytearray:
    """Recompute the CRC so the parser behind the checksum sees the (hostile) bytes."""
    out = bytearray(payload)
    out[-4:] = struct.pack("<I", zlib.crc32(bytes(out[:-4])))
    return out


def base_payload(codec: str, n: int = 300, seed: int = 0) -> bytearray:
    rng = np.random.default_rng(seed)
    s = rng.choice(np.array([-3, -1, 0, 0, 0, 1, 2], np.int8), n)
    seg = Segment(11, 0, n, 64, s, rng.random(-(-n // 64), dtype=np.float32), 4)
    seg2 = Segment(12, 1, 40, 16, rng.choice(np.array([-1, 0, 1], np.int8), 40),
                   np.ones(3, np.float32), 2)
    raw = RawSegment(13, rng.standard_normal(5).astype(np.float32))
    return encode_bytes([seg, seg2], LEVELS, codec, raw=[raw])


def table_start(p: bytes) -> int:
    """Byte offset of the segment table (after the level table)."""
    n_types = struct.unpack_from("<H", p, 6)[0]
    pos = HEADER
    for _ in range(n_types):
        count = struct.unpack_from("<H", p, pos + 2)[0]
        pos += 4 + 4 * count
    return pos


def body_start(p: bytes) -> int:
    n_seg, n_raw = struct.unpack_from("<II", p, 8)
    return table_start(p) + SEG_ROW * n_seg + RAW_ROW * n_raw


def set_field(p: bytearray, fmt: str, offset: int, value) -> bytearray:
    struct.pack_into(fmt, p, offset, value)
    return reseal(p)


# Segment row fields: (format, offset within the row).
FIELD = {"layer_id": ("<I", 0), "type_id": ("<H", 4), "codec_id": ("<B", 6), "reserved": ("<B", 7),
         "bucket_size": ("<I", 8), "numel": ("<Q", 12), "offset": ("<Q", 20), "length": ("<Q", 28)}


def set_segment(p: bytearray, index: int, name: str, value) -> bytearray:
    fmt, off = FIELD[name]
    return set_field(p, fmt, table_start(p) + SEG_ROW * index + off, value)


def expect(payload, match: str, **kwargs) -> None:
    with pytest.raises(PayloadError, match=match):
        decode(bytes(payload), **kwargs)


# --------------------------------------------------------------------------- checksum layer

@pytest.mark.parametrize("codec", list(CODECS))
def test_every_truncation_and_extension_is_rejected(codec):
    p = bytes(base_payload(codec))
    decode(p)
    for cut in range(len(p)):
        with pytest.raises(PayloadError):
            decode(p[:cut])
    for extra in [b"\0", b"\0" * 4, p[-4:], bytes(range(17))]:
        expect(p + extra, "checksum mismatch")


@pytest.mark.parametrize("codec", list(CODECS))
def test_every_single_bit_flip_is_rejected(codec):
    p = bytes(base_payload(codec, n=120))
    arr = np.frombuffer(p, np.uint8)
    for bit in range(8 * len(p)):
        flipped = arr.copy()
        flipped[bit // 8] ^= np.uint8(1 << (bit % 8))
        with pytest.raises(PayloadError):
            decode(flipped)


def test_shuffled_and_random_payloads_are_rejected():
    rng = np.random.default_rng(1)
    p = np.frombuffer(bytes(base_payload("ans")), np.uint8)
    for _ in range(200):
        blocks = np.array_split(p, 8)
        order = rng.permutation(8)
        if (order == np.arange(8)).all():
            continue
        with pytest.raises(PayloadError):
            decode(np.concatenate([blocks[i] for i in order]))
    for size in [0, 1, 27, 28, 100, 5000]:
        for _ in range(20):
            junk = rng.integers(0, 256, size, dtype=np.uint8)
            with pytest.raises(PayloadError):
                decode(junk)
            if size >= 8:  # right magic and version, valid CRC, random everything else
                junk[:5] = np.frombuffer(b"QDHV\x01", np.uint8)
                with pytest.raises(PayloadError):
                    decode(reseal(junk.tobytes()))


def test_header_fields():
    p = base_payload("fixed")
    expect(b"XXXX" + bytes(p[4:]), "bad magic")
    expect(set_field(bytearray(p), "<B", 4, 2), "unsupported payload version 2")
    expect(set_field(bytearray(p), "<B", 5, 1), "reserved flags must be 0")
    expect(p[:20], "shorter than the 28-byte minimum")
    expect(set_field(bytearray(p), "<Q", 16, 2**63), "truncated: header claims")
    expect(set_field(bytearray(p), "<I", 8, 2**31), "truncated: header claims")
    expect(set_field(bytearray(p), "<H", 6, 3), "truncated|level table|tables end")


# --------------------------------------------------------------------------- behind the CRC

@pytest.mark.parametrize("codec", list(CODECS))
def test_hostile_segment_table_with_valid_crc(codec):
    p = base_payload(codec)
    expect(set_segment(bytearray(p), 0, "numel", 2**40 + 1), "numel above the limit")
    expect(set_segment(bytearray(p), 0, "numel", 2**39), "above the decode budget|shorter than its")
    expect(set_segment(set_segment(bytearray(p), 0, "bucket_size", 2**32 - 1), 0, "numel", 2**36),
           "above the decode budget")
    expect(set_segment(bytearray(p), 0, "offset", 10**6), "region 0 starts at 1000000")
    expect(set_segment(bytearray(p), 1, "offset", 3), "region 1 starts at 3.*overlap")
    expect(set_segment(bytearray(p), 0, "length", 2**62), "length exceeds the body")
    expect(set_segment(bytearray(p), 0, "length", 1), "region 1 starts at|shorter than its")
    expect(set_segment(bytearray(p), 0, "codec_id", 9), r"unknown codec id; known \[0, 1, 2, 3, 4\]")
    expect(set_segment(bytearray(p), 0, "type_id", 5), "type id not in the level table")
    expect(set_segment(bytearray(p), 0, "bucket_size", 0), "bucket_size must be >= 1")
    expect(set_segment(bytearray(p), 0, "bucket_size", 1), "shorter than its float32 norms")
    expect(set_segment(bytearray(p), 0, "reserved", 1), "reserved byte must be 0")
    expect(set_segment(bytearray(p), 1, "layer_id", 11), "layer ids repeat")
    # Numel changed by one: every codec notices its body no longer matches.
    expect(set_segment(bytearray(p), 0, "numel", 301), "segment 0")
    expect(set_segment(bytearray(p), 0, "numel", 299), "segment 0")
    # A caller-supplied budget applies before any allocation.
    expect(p, "above the decode budget of 100", max_numel=100)
    decode(bytes(p), max_numel=345)


def test_hostile_raw_and_level_tables_with_valid_crc():
    p = base_payload("fixed")
    raw_row = table_start(p) + 2 * SEG_ROW
    expect(set_field(bytearray(p), "<I", raw_row + 4, 1), "dtype code must be 0")
    expect(set_field(bytearray(p), "<Q", raw_row + 8, 6), "length must be 4 \\* numel")
    expect(set_field(bytearray(p), "<Q", raw_row + 8, 2**41), "numel above the limit")
    expect(set_field(bytearray(p), "<I", raw_row, 12), "layer ids repeat")
    # Level table: type 0 has L = 4 at offset 24.
    expect(set_field(bytearray(p), "<H", HEADER + 2, 1), r"L must be in \[2, 128\], got 1")
    expect(set_field(bytearray(p), "<H", HEADER + 2, 3), "levels must rise|tables end")
    expect(set_field(bytearray(p), "<f", HEADER + 8, 0.9), "levels must rise strictly")
    expect(set_field(bytearray(p), "<f", HEADER + 4, float("nan")), "levels must rise strictly")
    expect(set_field(bytearray(p), "<H", HEADER + 4 + 16, 0), "lists type 0 twice")


def test_negative_norm_with_valid_crc():
    p = base_payload("fixed")
    expect(set_field(bytearray(p), "<f", body_start(p), -1.0), "negative norm")
    nan = set_field(bytearray(p), "<f", body_start(p), float("nan"))
    assert np.isnan(decode(bytes(nan)).segments[0].norms[0])  # carried as is (see docstring)


def segment_body(p: bytes, index: int) -> tuple[int, int]:
    """Absolute (start, end) of segment ``index``'s codec body (after its norms)."""
    row = table_start(p) + SEG_ROW * index
    bucket, numel, offset, length = struct.unpack_from("<IQQQ", p, row + 8)
    start = body_start(p) + offset + 4 * (-(-numel // bucket))
    return start, body_start(p) + offset + length


def test_fixed_body_values_outside_alphabet_and_padding():
    p = base_payload("fixed")
    start, end = segment_body(p, 0)  # L = 4: 7 values in 3 bits, so 7 is unused
    q = bytearray(p)
    q[start] = 0xFF
    expect(reseal(q), "decoded value 7 outside alphabet of 7")
    q = bytearray(p)
    q[end - 1] &= 0xFE  # 300 * 3 bits = 900 bits: the last 4 bits are padding (all ones)
    expect(reseal(q), "padding bits after the last fixed-width field must all be 1")


def test_ans_side_info_inconsistent_with_valid_crc():
    p = base_payload("ans")
    start, end = segment_body(p, 0)
    # Side info: bitmap (1 byte, 7 values), width byte, counts of the first k - 1 values.
    q = bytearray(p)
    q[start] = 0
    expect(reseal(q), "presence bitmap is empty")
    q = bytearray(p)
    q[start] |= 0x80
    expect(reseal(q), "marks values >= alphabet size 7")
    q = bytearray(p)
    q[start + 1] = 9
    expect(reseal(q), r"count width must be in \[1, 8\], got 9")
    q = bytearray(p)
    q[start + 2] += 1  # counts no longer match the coded symbols
    expect(reseal(q), "segment 0.*ans")
    q = bytearray(p)
    q[start + 2] = 250  # counts sum past numel
    expect(reseal(q), "counts sum to|counts must be in")
    q = bytearray(p)
    q[start + 2] = 0
    expect(reseal(q), r"counts must be in \[1, numel - 1")
    q = bytearray(p)
    q[end - 4: end] = bytes(4)  # last ANS word zero: constriction's own ValueError, converted
    expect(reseal(q), "ans decoder rejected the words|ans symbols decoded|left over")
    q = bytearray(p)
    q[end - 8] ^= 0x40  # a flipped word decodes to a different histogram or leftover state
    expect(reseal(q), "segment 0 .*ans")


def test_ans_words_not_multiple_of_four_with_valid_crc():
    p = base_payload("ans")
    # Grow segment 0's region by one byte inside the body and shift everything after it.
    start, end = segment_body(p, 0)
    q = bytearray(p[:end]) + b"\x01" + bytearray(p[end:])
    row = table_start(p)
    struct.pack_into("<Q", q, row + 28, struct.unpack_from("<Q", p, row + 28)[0] + 1)
    for i, kind_row in [(1, row + SEG_ROW), (2, row + 2 * SEG_ROW)]:
        off_at = kind_row + (20 if i == 1 else 16)
        struct.pack_into("<Q", q, off_at, struct.unpack_from("<Q", p, off_at)[0] + 1)
    struct.pack_into("<Q", q, 16, struct.unpack_from("<Q", p, 16)[0] + 1)
    expect(reseal(q), "positive multiple of 4 bytes")


def test_elias_body_inconsistent_with_valid_crc():
    p = base_payload("elias")
    start, end = segment_body(p, 0)
    q = bytearray(p)
    struct.pack_into("<Q", q, start, 301)
    expect(reseal(q), "claims 301 non-zeros in a segment of 300")
    q = bytearray(p)
    struct.pack_into("<Q", q, start, 299)
    expect(reseal(q), "non-zeros but holds only|segment 0")
    q = bytearray(p)
    struct.pack_into("<Q", q, start, 0)
    expect(reseal(q), "segment 0 .*elias")
    q = bytearray(p)
    q[end - 1] |= 1
    expect(reseal(q), "segment 0 .*elias")
    q = bytearray(p)
    q[start + 8: end] = b"\xff" * (end - start - 8)  # every code word too long or too large
    expect(reseal(q), "segment 0 .*elias")


def test_zstd_body_inconsistent_with_valid_crc():
    p = base_payload("zstd")
    start, end = segment_body(p, 0)
    q = bytearray(p)
    q[start + 8] ^= 0xFF
    expect(reseal(q), "segment 0 .*zstd")
    q = bytearray(p)
    q[end - 1] ^= 0xFF
    expect(reseal(q), "segment 0 .*zstd")
    # A frame whose content is fine but whose values leave the alphabet of 7.
    import zstandard

    frame = zstandard.ZstdCompressor(level=1).compress(bytes([9]) * 300)
    q = bytearray(p[:start]) + frame + bytearray(p[end:])
    delta = len(frame) - (end - start)
    row = table_start(p)
    struct.pack_into("<Q", q, row + 28, struct.unpack_from("<Q", p, row + 28)[0] + delta)
    struct.pack_into("<Q", q, row + SEG_ROW + 20, struct.unpack_from("<Q", p, row + SEG_ROW + 20)[0] + delta)
    struct.pack_into("<Q", q, row + 2 * SEG_ROW + 16,
                     struct.unpack_from("<Q", p, row + 2 * SEG_ROW + 16)[0] + delta)
    struct.pack_into("<Q", q, 16, struct.unpack_from("<Q", p, 16)[0] + delta)
    expect(reseal(q), "decoded value 9 outside alphabet of 7")


def test_huge_claims_fail_without_allocating():
    # numel = 2**40 in an empty ans region: rejected before any allocation (tracemalloc sees
    # no large block; a wall-clock bound would fail on a busy machine)
    import tracemalloc

    seg = Segment(0, 0, 0, 1024, np.zeros(0, np.int8), np.zeros(0, np.float32), 4)
    p = encode_bytes([seg], LEVELS, "ans")
    tracemalloc.start()
    try:
        expect(set_segment(bytearray(p), 0, "numel", 2**40), "above the decode budget")
        q = set_segment(set_segment(bytearray(p), 0, "bucket_size", 2**32 - 1), 0, "numel",
                        2**32 - 1)
        expect(q, "above the decode budget of 16777216")  # one norm missing too, budget first
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the claims are 2**40 and 2**32 coordinates (terabytes, gigabytes); 64 MiB is room for
    # the decoder's own bookkeeping and far below either
    assert peak < 64 << 20, f"{peak} bytes allocated while rejecting the claims"


def test_default_budget_and_max_numel_for_honest_constant_segments():
    # An all-zero tensor with one per-tensor norm is tiny yet honest: the default budget
    # (max(2**24, 1024 x bytes)) refuses it, and the receiver's max_numel admits it.
    n = (1 << 24) + 1
    seg = Segment(0, 0, n, n, np.zeros(n, np.int8), np.ones(1, np.float32), 4)
    p = encode_bytes([seg], LEVELS, "ans")
    assert len(p) < 200
    expect(p, "above the decode budget of 16777216")
    out = decode(bytes(p), max_numel=n)
    assert out.segments[0].numel == n and not out.segments[0].symbols.any()
    expect(p, f"above the decode budget of {n - 1}", max_numel=n - 1)


# --------------------------------------------------------------------------- fuzz

def mutate(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    q = p.copy()
    kind = rng.integers(6)
    if kind == 0:  # flip bits
        for _ in range(rng.integers(1, 4)):
            i = rng.integers(q.size)
            q[i] ^= np.uint8(1 << rng.integers(8))
    elif kind == 1:  # overwrite bytes with random values
        i = int(rng.integers(q.size))
        k = min(int(rng.integers(1, 9)), q.size - i)
        q[i: i + k] = rng.integers(0, 256, k, dtype=np.uint8)
    elif kind == 2:  # truncate
        q = q[: rng.integers(q.size)]
    elif kind == 3:  # insert bytes
        i = rng.integers(q.size)
        q = np.concatenate([q[:i], rng.integers(0, 256, rng.integers(1, 16), dtype=np.uint8), q[i:]])
    elif kind == 4:  # interesting integers into a table field
        i = rng.integers(max(1, min(q.size - 8, 400)))
        value = rng.choice(np.array([0, 1, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1], np.uint64))
        q[i: i + 8] = np.frombuffer(struct.pack("<Q", int(value)), np.uint8)[: q[i: i + 8].size]
    else:  # duplicate a block
        i, j = sorted(rng.integers(q.size, size=2))
        q = np.concatenate([q[:j], q[i:j], q[j:]])
    return q


def check_decoded(out) -> None:
    """A mutated payload that still decodes must be internally consistent."""
    for seg in out.segments:
        assert seg.symbols.dtype == np.int8 and seg.symbols.size == seg.numel
        assert seg.norms.size == -(-seg.numel // seg.bucket_size)
        if seg.numel:
            assert np.abs(seg.symbols.astype(np.int16)).max() <= seg.num_levels - 1
        assert seg.num_levels == out.levels[seg.type_id].size


@pytest.mark.parametrize("resealed", [False, True], ids=["raw", "crc-resealed"])
def test_fuzz_mutations_raise_payload_error_or_decode_consistently(resealed):
    rng = np.random.default_rng(20240 + resealed)
    bases = [np.frombuffer(bytes(base_payload(c, n=n, seed=n)), np.uint8)
             for c in CODECS for n in (50, 700)]
    rounds = 4000 * FUZZ_ROUNDS
    decoded_ok = 0
    start = time.perf_counter()
    for r in range(rounds):
        base = bases[r % len(bases)]
        q = mutate(rng, base)
        if q.size == base.size and np.array_equal(q, base):
            continue  # a no-op mutation (empty duplicate, same bytes written back)
        if resealed and q.size >= 4:
            q = np.frombuffer(reseal(q.tobytes()), np.uint8)
        try:
            out = decode(q, max_numel=1 << 20)
        except PayloadError:
            continue
        decoded_ok += 1
        assert resealed, "a mutation passed the CRC"
        check_decoded(out)
    elapsed = time.perf_counter() - start
    assert elapsed < 60 * FUZZ_ROUNDS  # bounded time (a hang would stop here, not pass)
    if resealed:  # body mutations in fixed/elias/raw regions can decode to other valid data
        assert decoded_ok < rounds
