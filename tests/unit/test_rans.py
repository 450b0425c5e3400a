"""The rans codec and the packed fast path of the wire format: round trips, entropy, hostile
bodies, golden bytes."""
from __future__ import annotations

import numpy as np
import pytest

from qoda_hvd import PayloadError
from qoda_hvd.coding import PackedSegment, RawSegment, decode, encode_bytes
from qoda_hvd.coding import bits, rans
from qoda_hvd.coding.codecs import CODECS, CodecError


def entropy_bits(data: np.ndarray) -> float:
    c = np.bincount(data, minlength=256)
    p = c[c > 0] / data.size
    return float(-(p * np.log2(p)).sum() * data.size)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 1000, 100_003])
@pytest.mark.parametrize("dist", ["skewed", "uniform", "single", "two"])
def test_round_trip(n, dist):
    rng = np.random.default_rng(n)
    if dist == "skewed":
        data = rng.choice(np.arange(256, dtype=np.uint8), n, p=np.r_[0.9, np.full(255, 0.1 / 255)])
    elif dist == "uniform":
        data = rng.integers(0, 256, n).astype(np.uint8)
    elif dist == "single":
        data = np.full(n, 0x77, np.uint8)
    else:
        data = rng.choice(np.array([3, 200], np.uint8), n)
    body = rans.encode_bytes(data)
    assert np.array_equal(rans.decode_bytes(body, n), data)


def test_near_the_entropy_of_the_packed_bytes():
    rng = np.random.default_rng(0)
    # nibble pairs of 4-bit symbols concentrated on the zero symbol (7), as gradients give
    p = np.r_[[0.001] * 5, 0.02, 0.2, 0.55, 0.2, 0.02, [0.001] * 5]
    sym = rng.choice(np.arange(15), 400_000, p=p / p.sum())
    packed = bits.pack_fixed(sym.astype(np.uint8), 4)
    body = rans.encode_bytes(packed)
    assert 8 * len(body) <= 1.01 * entropy_bits(packed) + 8 * 600


@pytest.mark.parametrize("cut", [1, 5, 40, 100])
def test_truncated_or_flipped_bodies_raise(cut):
    data = np.random.default_rng(1).integers(0, 16, 20_000).astype(np.uint8)
    body = bytearray(rans.encode_bytes(data))
    with pytest.raises(rans.RansError):
        rans.decode_bytes(bytes(body[:-cut]), data.size)
    flipped = body.copy()
    flipped[-cut] ^= 0x5A
    with pytest.raises(rans.RansError):
        rans.decode_bytes(bytes(flipped), data.size)
    with pytest.raises(rans.RansError, match="expected"):
        rans.decode_bytes(bytes(body), data.size + 1)
    bad_freq = body.copy()
    bad_freq[32] ^= 0x01  # first frequency: the sum is no longer 2**15
    with pytest.raises(rans.RansError, match="sum"):
        rans.decode_bytes(bytes(bad_freq), data.size)


def test_codec_rejects_a_numel_that_does_not_match():
    packed = bits.pack_fixed(np.full(9, 7, np.uint8), 4)  # 9 symbols: the last nibble is padding
    body = CODECS["rans"].encode_packed(packed, 9, 8)
    with pytest.raises(CodecError, match="outside alphabet"):
        CODECS["rans"].decode(body, 10, 8)  # the padding nibble 0xF is no valid value
    with pytest.raises(CodecError, match="expected"):
        CODECS["rans"].decode_packed(body, 11, 8)  # 6 bytes, the body codes 5


LEVELS = {0: np.array([0, 0.25, 0.5, 1], np.float32), 1: np.linspace(0, 1, 8).astype(np.float32)}


def packed_segments():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 7, 3001).astype(np.uint8)       # L = 4: 3-bit values in [0, 6]
    p = np.r_[[0.01] * 6, 0.2, 0.48, 0.2, [0.01] * 6]
    b = rng.choice(np.arange(15, dtype=np.uint8), 20_000, p=p / p.sum())
    return [PackedSegment(0, 0, a.size, 1024, bits.pack_fixed(a, 3), np.ones(3, np.float32), 4),
            PackedSegment(1, 1, b.size, 1024, bits.pack_fixed(b, 4),
                          np.linspace(1, 2, 20).astype(np.float32), 8)]


@pytest.mark.parametrize("codec", ["fixed", "rans", "auto", "ans", "zstd", "elias"])
def test_packed_segments_round_trip_through_the_payload(codec):
    segs = packed_segments()
    raw = RawSegment(9, np.array([1.5, -2.0], np.float32))
    payload = encode_bytes(segs, LEVELS, codec, raw=[raw])
    out = decode(payload, packed=True)
    for s, o in zip(segs, out.segments):
        assert isinstance(o, PackedSegment)
        assert np.array_equal(o.packed, s.packed) and np.array_equal(o.norms, s.norms)
    sym = decode(payload).segments  # the symbol view of the same payload
    for s, o in zip(segs, sym):
        assert np.array_equal(s.to_segment().symbols, o.symbols)


def test_auto_on_packed_weighs_the_link():
    segs = packed_segments()
    slow = decode(encode_bytes(segs, LEVELS, "auto", bandwidth=1e6)).codecs
    fast = decode(encode_bytes(segs, LEVELS, "auto", bandwidth=1e12)).codecs
    assert slow[1] == "rans" and fast == ["fixed", "fixed"]


def test_hostile_packed_rans_segment_raises_payload_error():
    segs = packed_segments()
    payload = bytearray(encode_bytes(segs, LEVELS, "rans"))
    payload[-30] ^= 0x33
    import struct
    import zlib
    payload[-4:] = struct.pack("<I", zlib.crc32(bytes(payload[:-4])))  # a valid CRC
    with pytest.raises(PayloadError, match="rans"):
        decode(bytes(payload), packed=True)


def golden_packed_payload() -> bytes:
    a = PackedSegment(3, 0, 10, 8, bits.pack_fixed(np.array([3, 3, 4, 2, 3, 6, 0, 3, 3, 3], np.uint8), 3),
                      np.array([1.0, 0.5], np.float32), 4)
    return bytes(encode_bytes([a], LEVELS, "rans"))


GOLDEN_RANS_HEX = (  # header, level table, segment table, norms, rans body (bitmap, freqs, n,
    # four states, stream), CRC: a change here is a wire-format change
    "51444856010001000100000000000000440000000000000000000400000000000000803e0000003f0000803f03"
    "00000000000400080000000a00000000000000000000000000000044000000000000000000803f0000003f0000"
    "0000800000000000000000c000000800000000000000000000000000000000200020002000200400000000200"
    "002000000020060000200400002a42cfa48"
)


def test_golden_rans_bytes():
    p = golden_packed_payload()
    assert p.hex() == GOLDEN_RANS_HEX
