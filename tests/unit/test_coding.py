"""Wire format and codecs: round trips, exact sizes, golden bytes, argument errors.

Robustness (corrupt and hostile payloads, fuzzing) lives in test_coding_robustness.py.
Run: ``.venv/bin/python -m pytest tests/unit/test_coding*.py -q``.
"""
from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch

from qoda_hvd import PayloadError
from qoda_hvd.coding import (
    CODECS,
    DEFAULT_NS_PER_SYMBOL,
    RawSegment,
    Segment,
    bits_per_coordinate,
    choose_codec,
    decode,
    encode,
    encode_bytes,
    estimate_sizes,
    fixed_width,
    inspect_payload,
)
from qoda_hvd.coding import bits
from qoda_hvd.coding.auto import choose_and_encode
from qoda_hvd.coding.codecs import elias_size
from qoda_hvd.coding.model import CountsModel

CODEC_NAMES = ["fixed", "ans", "elias", "zstd"]


def uniform_levels(num_levels: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, num_levels, dtype=np.float32)


def make_symbols(rng: np.random.Generator, n: int, num_levels: int, kind: str) -> np.ndarray:
    top = num_levels - 1
    if kind == "uniform":
        return rng.integers(-top, top + 1, n).astype(np.int8)
    if kind == "sparse":  # QSGD-like: mostly zeros, small levels
        mag = np.minimum(rng.geometric(0.6, n) - 1, top)
        return (mag * rng.choice(np.array([-1, 1]), n)).astype(np.int8)
    if kind == "zeros":
        return np.zeros(n, dtype=np.int8)
    if kind == "extreme":
        return rng.choice(np.array([-top, top]), n).astype(np.int8)
    raise AssertionError(kind)


def make_segment(rng, layer_id, n, num_levels, kind="sparse", bucket=64, type_id=None) -> Segment:
    nb = -(-n // bucket)
    return Segment(layer_id, num_levels if type_id is None else type_id, n, bucket,
                   make_symbols(rng, n, num_levels, kind),
                   rng.random(nb, dtype=np.float32) + 0.5, num_levels)


def assert_same(decoded: Segment, original: Segment) -> None:
    assert decoded.layer_id == original.layer_id and decoded.type_id == original.type_id
    assert decoded.numel == original.numel and decoded.bucket_size == original.bucket_size
    assert decoded.num_levels == original.num_levels
    np.testing.assert_array_equal(decoded.symbols, original.symbols)
    np.testing.assert_array_equal(decoded.norms, original.norms)


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("codec", CODEC_NAMES + ["auto"])
@pytest.mark.parametrize("num_levels", [2, 3, 4, 8, 16, 65, 128])
def test_round_trip_shapes_and_levels(codec, num_levels):
    rng = np.random.default_rng(num_levels)
    sizes = [0, 1, 7, 8, 9, 63, 1000, 4097]
    kinds = ["uniform", "sparse", "zeros", "extreme"]
    segments = [make_segment(rng, i, n, num_levels, kinds[i % 4], bucket=[1, 5, 64][i % 3])
                for i, n in enumerate(sizes)]
    raw = [RawSegment(100, rng.standard_normal(3).astype(np.float32)),
           RawSegment(101, np.zeros(0, np.float32))]
    payload = encode(segments, {num_levels: uniform_levels(num_levels)}, codec, raw=raw)
    out = decode(payload)
    assert len(out.segments) == len(segments)
    for got, want in zip(out.segments, segments):
        assert_same(got, want)
    for got, want in zip(out.raw, raw):
        assert got.layer_id == want.layer_id
        np.testing.assert_array_equal(got.values, want.values)
    np.testing.assert_array_equal(out.levels[num_levels], uniform_levels(num_levels))
    if codec != "auto":
        assert out.codecs == [codec] * len(segments)


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_round_trip_large_sparse_segment_with_long_zero_runs(codec):
    # Long zero runs cross the Elias decoder's chunk boundaries and need >16-bit omega codes.
    rng = np.random.default_rng(7)
    n = 1_500_000
    s = np.zeros(n, np.int8)
    where = np.sort(rng.choice(n, 3000, replace=False))
    s[where] = rng.choice(np.array([-3, -1, 1, 2, 3], np.int8), where.size)
    s[:200_000] = make_symbols(rng, 200_000, 4, "uniform")  # dense part: many code words
    seg = Segment(0, 0, n, 1024, s, np.ones(-(-n // 1024), np.float32), 4)
    out = decode(encode([seg], {0: uniform_levels(4)}, codec))
    np.testing.assert_array_equal(out.segments[0].symbols, s)


def test_accepts_torch_numpy_bytes_and_memoryview():
    rng = np.random.default_rng(1)
    s = torch.tensor([1, 0, -1, 0, 2], dtype=torch.int8)
    seg = Segment(3, 0, 5, 2, s, torch.ones(3), 3)
    assert isinstance(seg.symbols, np.ndarray) and seg.symbols.dtype == np.int8
    payload = encode([seg, make_segment(rng, 4, 100, 3, type_id=0)], {0: torch.tensor([0.0, 0.3, 1.0])})
    assert payload.dtype == torch.uint8 and payload.device.type == "cpu" and payload.dim() == 1
    forms = [payload, payload.numpy(), bytes(payload.numpy()), bytearray(payload.numpy()),
             memoryview(payload.numpy()), memoryview(bytes(payload.numpy()))]
    for form in forms:
        out = decode(form)
        assert out.segments[0].symbols.tolist() == [1, 0, -1, 0, 2]
    # Decoded arrays are owned: mutating the buffer afterwards does not change them.
    buf = bytearray(payload.numpy())
    out = decode(buf)
    buf[:] = bytes(len(buf))
    assert out.segments[0].norms.tolist() == [1.0, 1.0, 1.0]


def test_empty_payload_and_levels_only_for_used_types():
    out = decode(encode([], {0: uniform_levels(2)}))
    assert out.segments == [] and out.raw == [] and out.levels == {}
    assert out.nbytes == 24 + 4


@pytest.mark.parametrize("num_levels", [2, 4, 128])
def test_symbols_round_trip_through_values_mapping(num_levels):
    # to_values / from_values use modular uint8 arithmetic; check the whole symbol range.
    from qoda_hvd.coding.codecs import from_values, to_values

    top = num_levels - 1
    s = np.arange(-top, top + 1, dtype=np.int8)
    v = to_values(s, num_levels)
    assert v.tolist() == list(range(2 * top + 1))
    np.testing.assert_array_equal(from_values(v, num_levels), s)


# --------------------------------------------------------------------------- exact sizes

def expected_length(segments, raw, code_bytes) -> int:
    types = {s.type_id: s.num_levels for s in segments}
    tables = sum(4 + 4 * L for L in types.values()) + 36 * len(segments) + 32 * len(raw)
    body = sum(4 * s.num_buckets for s in segments) + sum(code_bytes) + sum(4 * r.numel for r in raw)
    return 24 + tables + body + 4


@pytest.mark.parametrize("num_levels", [2, 3, 5, 9, 17, 33, 64, 65, 128])
def test_fixed_size_is_exact(num_levels):
    rng = np.random.default_rng(num_levels)
    segments = [make_segment(rng, i, n, num_levels, "uniform") for i, n in enumerate([1, 8, 1001])]
    raw = [RawSegment(9, np.ones(5, np.float32))]
    payload = encode(segments, {num_levels: uniform_levels(num_levels)}, "fixed", raw=raw)
    width = math.ceil(math.log2(2 * num_levels - 1))
    assert fixed_width(num_levels) == width
    code = [math.ceil(s.numel * width / 8) for s in segments]
    assert inspect_payload(payload).code_bytes == code
    assert payload.numel() == expected_length(segments, raw, code)
    numel = sum(s.numel for s in segments) + 5
    assert bits_per_coordinate(payload) == 8 * payload.numel() / numel
    assert decode(payload).bits_per_coordinate() == bits_per_coordinate(payload)


def test_elias_size_matches_hand_count():
    # symbols 0 0 3 -1 0 2 with L = 4: triples (run+1, sign, level) = (3,+,3) (1,-,1) (2,+,2)
    # omega(3) = "110", omega(1) = "0", omega(2) = "100"
    s = np.array([0, 0, 3, -1, 0, 2], np.int8)
    stream = "110" "0" "110" + "0" "1" "0" + "100" "0" "100" + "0"  # + omega(0 trailing + 1)
    assert elias_size(s) == 8 + math.ceil(len(stream) / 8)
    body = CODECS["elias"].encode(s, 4)
    assert body[:8] == (3).to_bytes(8, "little")
    padded = stream + "0" * (-len(stream) % 8)
    assert body[8:] == int(padded, 2).to_bytes(len(padded) // 8, "big")
    assert CODECS["elias"].decode(body, 6, 4).tolist() == s.tolist()


@pytest.mark.parametrize("kind", ["sparse", "uniform", "extreme"])
@pytest.mark.parametrize("num_levels", [2, 8, 128])
def test_elias_size_exact_and_auto_estimates(kind, num_levels):
    rng = np.random.default_rng(3)
    s = make_symbols(rng, 20_000, num_levels, kind)
    assert len(CODECS["elias"].encode(s, num_levels)) == elias_size(s)
    sizes = estimate_sizes(s, num_levels)
    assert sizes["fixed"] == len(CODECS["fixed"].encode(s, num_levels))
    ans = len(CODECS["ans"].encode(s, num_levels))
    assert abs(ans - sizes["ans"]) <= 8, (ans, sizes["ans"])
    assert sizes["zstd"] == len(CODECS["zstd"].encode(s, num_levels))


def test_omega_codes_match_definition():
    def omega(n: int) -> str:  # "0"; while n > 1: prepend binary(n), n = bit_length(n) - 1
        code = "0"
        while n > 1:
            code = bin(n)[2:] + code
            n = n.bit_length() - 1
        return code

    values = np.array([1, 2, 3, 4, 7, 8, 15, 16, 17, 127, 1023, 1024, 2**20 + 3, 2**40], np.int64)
    codes, lengths = bits.omega_encode(values)
    for v, c, n in zip(values, codes, lengths):
        assert format(int(c), f"0{n}b") == omega(int(v))
    np.testing.assert_array_equal(bits.omega_lengths(values), lengths)


def test_ans_rate_within_one_percent_of_entropy_at_64k():
    # Side info included; quantized-gradient-like distributions at 2, 4 and 8 bits.
    rng = np.random.default_rng(11)
    for num_levels, p_zero in [(2, 0.8), (8, 0.4), (128, 0.05)]:
        s = make_symbols(rng, 65_536, num_levels, "sparse")
        s[rng.random(s.size) < p_zero] = 0
        model = CountsModel.from_values(s.view(np.uint8) + np.uint8(num_levels - 1), 2 * num_levels - 1)
        nbits = 8 * len(CODECS["ans"].encode(s, num_levels))
        assert model.entropy_bits() <= nbits <= 1.01 * model.entropy_bits(), (num_levels, nbits)


def test_ans_single_value_segment_is_side_info_only():
    s = np.full(10_000, -3, np.int8)
    body = CODECS["ans"].encode(s, 4)
    assert len(body) == 1 + 1  # bitmap of 7 values, width byte, no counts, no words
    assert CODECS["ans"].decode(body, 10_000, 4).tolist() == s.tolist()


def test_counts_model_round_trip_and_size():
    rng = np.random.default_rng(5)
    v = rng.integers(0, 255, 100_000).astype(np.uint8)
    m = CountsModel.from_values(v, 255)
    data = m.to_bytes()
    assert len(data) == m.side_info_size() == 32 + 1 + 254 * 2
    back, used = CountsModel.from_bytes(data, 100_000, 255)
    assert used == len(data)
    np.testing.assert_array_equal(back.present, m.present)
    np.testing.assert_array_equal(back.counts, m.counts)


# --------------------------------------------------------------------------- auto rule

def test_auto_picks_smallest_without_bandwidth_and_fixed_on_fast_links():
    rng = np.random.default_rng(2)
    sparse = make_symbols(rng, 50_000, 2, "sparse")
    sparse[rng.random(sparse.size) < 0.7] = 0
    sizes = estimate_sizes(sparse, 2)
    assert choose_codec(sparse, 2) == min(sizes, key=sizes.get) == "ans"
    fastest = min(["fixed", "zstd", "ans", "elias"], key=lambda k: sum(DEFAULT_NS_PER_SYMBOL[k]))
    assert choose_codec(sparse, 2, bandwidth=1e12) == fastest  # bytes are free: fastest wins
    assert choose_codec(sparse, 2, bandwidth=1e6) == "ans"  # slow link: smallest wins
    uniform = make_symbols(rng, 50_000, 2, "uniform")  # entropy log2(3) = 1.58 < 2 bits
    assert choose_codec(uniform, 2) == "ans"
    assert choose_codec(uniform, 2, bandwidth=1e12) == fastest
    only_fixed_fast = {"fixed": (1.0, 1.0), "zstd": (5.0, 5.0), "ans": (9.0, 9.0), "elias": (99.0, 99.0)}
    assert choose_codec(uniform, 2, bandwidth=1e12, speeds=only_fixed_fast) == "fixed"
    run = np.zeros(100_000, np.int8)
    run[:10_000] = 1  # one long run: zstd's matches beat every zeroth-order coder
    sizes = estimate_sizes(run, 2)
    assert sizes["zstd"] < min(sizes["ans"], sizes["fixed"])
    assert choose_codec(run, 2) == "zstd"
    # Custom speeds change the trade-off: make ans free and it wins at any bandwidth.
    speeds = {"fixed": (1.0, 1.0), "zstd": (1.0, 1.0), "ans": (0.0, 0.0), "elias": (1e3, 1e3)}
    assert choose_codec(sparse, 2, bandwidth=1e12, speeds=speeds) == "ans"
    payload = encode([Segment(0, 0, run.size, 1024, run, np.ones(98, np.float32), 2),
                      Segment(1, 0, sparse.size, 1024, sparse, np.ones(49, np.float32), 2)],
                     {0: uniform_levels(2)})
    assert decode(payload).codecs == ["zstd", "ans"]


def test_auto_choice_is_the_argmin_of_sizes():
    rng = np.random.default_rng(8)
    for num_levels in (2, 4, 16, 128):
        for kind in ("sparse", "uniform", "zeros", "extreme"):
            s = make_symbols(rng, 30_000, num_levels, kind)
            sizes = estimate_sizes(s, num_levels)
            order = ["fixed", "zstd", "ans", "elias"]
            assert choose_codec(s, num_levels) == min(sizes, key=lambda k: (sizes[k], order.index(k)))


def test_auto_pruned_choice_equals_full_cost_rule():
    # choose_codec skips sizing candidates that cannot win even at size 0; check it against the
    # rule evaluated over every size, across links from 1 MB/s to 100 GB/s and speed tables.
    rng = np.random.default_rng(9)
    order = ["fixed", "zstd", "ans", "elias"]
    tables = [DEFAULT_NS_PER_SYMBOL,
              {"fixed": (1.0, 1.0), "zstd": (5.0, 5.0), "ans": (9.0, 9.0), "elias": (9.0, 9.0)},
              {"fixed": (3.0, 3.0), "zstd": (1.0, 1.0), "ans": (0.0, 0.0), "elias": (1.0, 1.0)}]
    seen = set()
    for num_levels in (2, 8, 128):
        for kind in ("sparse", "uniform", "zeros", "extreme"):
            for n in (0, 1000, 40_000, 70_000):
                s = make_symbols(rng, n, num_levels, kind) if n else np.zeros(0, np.int8)
                sizes = estimate_sizes(s, num_levels)
                for speeds in tables:
                    for bw in (1e6, 1e7, 1e8, 1e9, 1e10, 1e11):
                        want = min(sizes, key=lambda k: (sizes[k] / bw + n * sum(speeds[k]) * 1e-9,
                                                         order.index(k)))
                        got = choose_codec(s, num_levels, bandwidth=bw, speeds=speeds)
                        assert got == want, (num_levels, kind, n, speeds, bw, sizes)
                        seen.add(got)
    assert seen == set(order)  # the cases reach every codec


def test_auto_encode_reuses_the_zstd_body_it_sized():
    run = np.zeros(100_000, np.int8)
    run[:10_000] = 1
    name, body = choose_and_encode(run, 2)
    assert name == "zstd" and body == CODECS["zstd"].encode(run, 2)
    # Fixed is cheapest even before zstd's size is known: zstd is never run, no body comes back.
    fast_fixed = {"fixed": (1.0, 1.0), "zstd": (5.0, 5.0), "ans": (9.0, 9.0), "elias": (9.0, 9.0)}
    assert choose_and_encode(run, 2, bandwidth=1e12, speeds=fast_fixed) == ("fixed", None)
    # A payload encoded through auto decodes to the same symbols at both zstd levels.
    for level in (1, 3):
        payload = encode([Segment(0, 0, run.size, 1024, run, np.ones(98, np.float32), 2)],
                         {0: uniform_levels(2)}, zstd_level=level)
        np.testing.assert_array_equal(decode(payload).segments[0].symbols, run)


# --------------------------------------------------------------------------- golden bytes

def golden_payload() -> bytes:
    """Three segments (fixed, elias, ans), two types, one raw segment; fully deterministic."""
    fixed = Segment(5, 1, 5, 4, np.array([1, 0, -1, 0, 1], np.int8),
                    np.array([0.5, 2.0], np.float32), 2)
    elias = Segment(6, 2, 6, 8, np.array([0, 0, 3, -1, 0, 2], np.int8),
                    np.array([1.0], np.float32), 4)
    ans = Segment(7, 2, 8, 8, np.array([0, 1, 0, 0, -1, 0, 0, 0], np.int8),
                  np.array([0.25], np.float32), 4)
    raw = RawSegment(9, np.array([1.5, -2.0], np.float32))
    levels = {2: np.array([0, 0.25, 0.5, 1], np.float32), 1: np.array([0, 1], np.float32)}
    return bytes(encode_bytes([fixed, elias, ans], levels, ["fixed", "elias", "ans"], raw=[raw]))


GOLDEN_HEX = (
    "514448560100020003000000010000002d0000000000000001000200000000000000803f02000400000000000000803e"
    "0000003f0000803f050000000100000004000000050000000000000000000000000000000a0000000000000006000000"
    "020002000800000006000000000000000a000000000000000f0000000000000007000000020001000800000008000000"
    "0000000019000000000000000c0000000000000009000000000000000200000000000000250000000000000008000000"
    "000000000000003f0000004091bf0000803f0300000000000000cca2000000803e1c0101061700a03a0000c03f000000"
    "c0c775e101"
)


def test_golden_bytes():
    payload = golden_payload()
    assert payload.hex() == GOLDEN_HEX


def test_golden_bytes_follow_the_documented_layout():
    p = golden_payload()
    assert p[:4] == b"QDHV" and p[4] == 1 and p[5] == 0
    n_types, n_seg, n_raw, body_len = struct.unpack_from("<HIIQ", p, 6)
    assert (n_types, n_seg, n_raw) == (2, 3, 1)
    # Level table: ascending type ids.
    assert struct.unpack_from("<HH2f", p, 24) == (1, 2, 0.0, 1.0)
    assert struct.unpack_from("<HH4f", p, 36) == (2, 4, 0.0, 0.25, 0.5, 1.0)
    table = 36 + 4 + 16
    rows = [struct.unpack_from("<IHBBIQQQ", p, table + 36 * i) for i in range(3)]
    # fixed: 2 norms (8 B) + ceil(5 * 2 / 8) = 2 B; elias: 1 norm + 8 B count + 3 B code
    # ("110 0 110" "0 1 0" "100 0 100" + tail omega(1) "0" = 18 bits); ans: 1 norm + bitmap 1 B + width 1 B +
    # 2 counts of 1 B (u = 2, 3; the last, u = 4, is implied) + one 32-bit word.
    assert rows == [(5, 1, 0, 0, 4, 5, 0, 10), (6, 2, 2, 0, 8, 6, 10, 15),
                    (7, 2, 1, 0, 8, 8, 25, 12)]
    raw_row = struct.unpack_from("<IIQQQ", p, table + 3 * 36)
    assert raw_row == (9, 0, 2, 37, 8)
    body = table + 3 * 36 + 32
    assert len(p) == body + body_len + 4 and body_len == 45
    assert struct.unpack_from("<2f", p, body) == (0.5, 2.0)
    # fixed codes u = s + 1 in 2 bits: 2 1 0 1 2 -> 10 01 00 01 | 10, padded with 1 bits
    assert p[body + 8: body + 10] == bytes([0b10010001, 0b10111111])
    assert p[body + 14: body + 22] == (3).to_bytes(8, "little")
    assert p[body + 22: body + 25] == int("11001100101000100" "0" + "0" * 6, 2).to_bytes(3, "big")
    assert p[body + 29: body + 33] == bytes([0b0001_1100, 1, 1, 6])  # bitmap, width, counts
    assert struct.unpack_from("<2f", p, body + 37) == (1.5, -2.0)
    assert struct.unpack_from("<I", p, len(p) - 4)[0] == zlib.crc32(p[:-4])
    out = decode(p)
    assert out.codecs == ["fixed", "elias", "ans"]
    assert out.segments[1].symbols.tolist() == [0, 0, 3, -1, 0, 2]


# --------------------------------------------------------------------------- argument errors

def _seg(**overrides):
    kwargs = dict(layer_id=0, type_id=0, numel=3, bucket_size=2,
                  symbols=np.array([1, 0, -1], np.int8), norms=np.ones(2, np.float32), num_levels=2)
    kwargs.update(overrides)
    return kwargs


SEGMENT_ERRORS = [
    (dict(layer_id=-1), ValueError, r"layer_id must be in \[0, 4294967295\], got -1"),
    (dict(layer_id=1.5), TypeError, r"layer_id must be an int, got float"),
    (dict(type_id=70000), ValueError, r"type_id must be in \[0, 65535\]"),
    (dict(numel=4), ValueError, r"symbols has 3 elements, numel is 4"),
    (dict(bucket_size=0), ValueError, r"bucket_size must be in \[1, "),
    (dict(num_levels=1), ValueError, r"num_levels must be in \[2, 128\], got 1"),
    (dict(num_levels=200), ValueError, r"num_levels must be in \[2, 128\], got 200"),
    (dict(num_levels=True), TypeError, r"num_levels must be an int, got bool"),
    (dict(symbols=np.array([1, 0, -1], np.int16)), TypeError, r"symbols must have dtype int8, got int16"),
    (dict(symbols=[1, 0, -1]), TypeError, r"symbols must be a numpy array or torch tensor, got list"),
    (dict(symbols=np.zeros((3, 1), np.int8)), ValueError, r"symbols must be 1-D"),
    (dict(norms=np.ones(2, np.float64)), TypeError, r"norms must have dtype float32, got float64"),
    (dict(norms=np.ones(3, np.float32)), ValueError, r"norms must have ceil\(numel / bucket_size\) = 2"),
]


@pytest.mark.parametrize("overrides, exc, match", SEGMENT_ERRORS)
def test_segment_argument_errors(overrides, exc, match):
    with pytest.raises(exc, match=match):
        Segment(**_seg(**overrides))


LEVELS = {0: np.array([0.0, 1.0], np.float32)}
ENCODE_ERRORS = [
    (dict(codec="huffman"), ValueError, r"unknown codec 'huffman'; choose from \['auto', 'fixed', 'ans', 'elias', 'zstd', 'rans'\]"),
    (dict(codec=3), TypeError, r"codec must be a str or a sequence of str, got int"),
    (dict(codec=["ans", "ans"]), ValueError, r"one name per segment; got 2 names for 1 segments"),
    (dict(bandwidth=-1.0), ValueError, r"bandwidth must be a positive number"),
    (dict(zstd_level=0), ValueError, r"zstd_level must be in \[1, 22\], got 0"),
    (dict(levels={1: LEVELS[0]}), ValueError, r"levels has no entry for type_id 0"),
    (dict(levels=[LEVELS[0]]), TypeError, r"levels must be a mapping"),
    (dict(levels={0: np.array([0.0, 0.5, 1.0])}), ValueError, r"levels\[0\] must be 1-D with num_levels=2"),
    (dict(levels={0: np.array([0.1, 1.0])}), ValueError, r"levels\[0\] must be strictly increasing from 0 to 1"),
    (dict(segments=[Segment(**_seg(symbols=np.array([2, 0, 0], np.int8)))]), ValueError,
     r"symbols must be in \[-1, 1\] for num_levels=2, got \[0, 2\]"),
    (dict(segments=[Segment(**_seg(norms=np.array([1, -1], np.float32)))]), ValueError, r"norms must be >= 0"),
    (dict(segments=[Segment(**_seg()), Segment(**_seg())]), ValueError, r"layer_id must be unique.*\[0\]"),
    (dict(segments=[Segment(**_seg(layer_id=4))], raw=[RawSegment(4, np.ones(1, np.float32))]),
     ValueError, r"layer_id must be unique.*\[4\]"),
    (dict(segments=[Segment(**_seg()), Segment(**_seg(layer_id=1, num_levels=3,
                                                      symbols=np.zeros(3, np.int8)))]),
     ValueError, r"num_levels=3 but type_id 0 has 2 levels"),
    (dict(segments=[np.zeros(3, np.int8)]), TypeError, r"segments\[0\] must be a Segment or PackedSegment, got ndarray"),
    (dict(raw=[np.zeros(3, np.float32)]), TypeError, r"raw\[0\] must be a RawSegment"),
]


@pytest.mark.parametrize("overrides, exc, match", ENCODE_ERRORS)
def test_encode_argument_errors(overrides, exc, match):
    kwargs = dict(segments=[Segment(**_seg())], levels=LEVELS)
    kwargs.update(overrides)
    with pytest.raises(exc, match=match):
        encode(kwargs.pop("segments"), kwargs.pop("levels"), **kwargs)


DECODE_ERRORS = [
    (dict(buffer="QDHV"), TypeError, r"buffer must be a uint8 torch.Tensor, numpy array, bytes"),
    (dict(buffer=np.zeros(40, np.int8)), TypeError, r"buffer array must have dtype uint8, got int8"),
    (dict(buffer=torch.zeros(40, dtype=torch.int32)), TypeError, r"dtype torch.uint8, got torch.int32"),
    (dict(buffer=torch.zeros(4, 10, dtype=torch.uint8)), ValueError, r"buffer tensor must be 1-D"),
    (dict(buffer=b"", max_numel=-1), ValueError, r"max_numel must be in \[0, "),
    (dict(buffer=b"", max_numel=2.0), TypeError, r"max_numel must be an int, got float"),
]


@pytest.mark.parametrize("kwargs, exc, match", DECODE_ERRORS)
def test_decode_argument_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        decode(kwargs.pop("buffer"), **kwargs)
    assert not issubclass(exc, PayloadError)


def test_zstd_level_is_used():
    rng = np.random.default_rng(0)
    seg = make_segment(rng, 0, 50_000, 8, "sparse", type_id=0)
    one = encode([seg], {0: uniform_levels(8)}, "zstd", zstd_level=1)
    three = encode([seg], {0: uniform_levels(8)}, "zstd", zstd_level=3)
    assert one.numel() != three.numel()
    assert_same(decode(three).segments[0], seg)
