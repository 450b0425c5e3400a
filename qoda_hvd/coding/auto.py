"""The ``auto`` codec choice: per segment, the codec with the lowest estimated cost.

Rule (documented contract; tests pin it):

* Candidates are ``fixed``, ``zstd``, ``ans`` and ``elias``.
* Sizes: ``fixed`` exact, ``ceil(n * ceil(log2(2L - 1)) / 8)``; ``zstd`` exact (it is cheap
  enough, ~1 ns/symbol, to simply compress; it wins where zero runs or repeats give structure
  beyond the zeroth-order entropy, e.g. embedding rows of unused tokens); ``ans`` estimated from the
  counts, side info + entropy rounded up to 32-bit words + one word (the coder lands within
  a word or two of that); ``elias`` exact, from vectorised Elias-omega lengths, only for
  segments of at most :data:`ELIAS_MAX_AUTO` symbols and when its lower bound of 3 bits per
  non-zero does not already lose. On longer segments ``ans`` sits within a fraction of a percent
  of the zeroth-order entropy, which Elias-omega codes cannot beat, while computing Elias's
  exact size cost most of ``auto``'s time (77 ms of 101 ms per step on a 5M-parameter model).
* Without ``bandwidth`` the smallest size wins; ties go to the faster codec
  (fixed, zstd, ans, elias).
* With ``bandwidth`` (bytes/s of the link) each candidate costs
  ``size / bandwidth + numel * (encode_ns + decode_ns) * 1e-9`` seconds, with per-symbol
  speeds from ``speeds`` (default :data:`DEFAULT_NS_PER_SYMBOL`, one CPU thread, measured
  with ``bench/bench_codec.py``). So on a fast link the fastest codec wins (``zstd`` or
  ``fixed`` with the default table: ANS costs more time than the bytes it saves), and on a slow
  one the smallest payload wins. The crossover for ANS over zstd is where the bytes saved per
  symbol, divided by the bandwidth, exceed ANS's extra ~28 ns/symbol. Candidates are sized
  cheapest-floor first, and one whose cost at size 0 already loses is never sized: on a fast
  link ``auto`` neither counts values for ANS nor compresses with zstd just to find out
  (exact: the same codec wins as when every size is computed).
* The zstd body made while sizing is the one sent (:func:`choose_and_encode`): no second pass.

Example::

    >>> import numpy as np
    >>> from qoda_hvd.coding.auto import choose_codec, estimate_sizes
    >>> rng = np.random.default_rng(0)
    >>> s = rng.choice(np.array([-1, 0, 1], np.int8), 60_000, p=[0.05, 0.9, 0.05])
    >>> estimate_sizes(s, num_levels=2)
    {'fixed': 15000, 'zstd': 8522, 'ans': 4286, 'elias': 6234}
    >>> choose_codec(s, num_levels=2), choose_codec(s, num_levels=2, bandwidth=10e9)
    ('ans', 'zstd')
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from qoda_hvd.coding.codecs import CODECS, elias_size, to_values
from qoda_hvd.coding.model import CountsModel

__all__ = ["DEFAULT_NS_PER_SYMBOL", "DEFAULT_NS_PER_PACKED_BYTE", "AUTO_CANDIDATES",
           "PACKED_CANDIDATES", "ELIAS_MAX_AUTO", "estimate_sizes", "choose_codec",
           "choose_and_encode", "choose_packed"]

# (encode, decode) nanoseconds per symbol on one CPU thread, rounded from bench/bench_codec.py
# runs at 1M symbols and 2-8 bits (see bench/README.md). Pass your own via ``speeds``.
DEFAULT_NS_PER_SYMBOL: dict[str, tuple[float, float]] = {
    "fixed": (2.0, 2.0),
    "ans": (10.0, 20.0),
    "elias": (60.0, 100.0),
    "zstd": (1.5, 1.0),
}
AUTO_CANDIDATES = ("fixed", "zstd", "ans", "elias")  # tie order: fastest first
#: Candidates for already packed symbols (the exchange's fast path), fastest first.
PACKED_CANDIDATES = ("fixed", "rans")
# (encode, decode) nanoseconds per packed byte on one CPU thread (bench/bench_codec.py): the
# exchange replaces these by what it measures.
DEFAULT_NS_PER_PACKED_BYTE: dict[str, tuple[float, float]] = {
    "fixed": (0.0, 0.0),
    "rans": (4.0, 4.0),
}
#: Longest segment for which ``auto`` computes Elias's exact size (see the module docstring).
ELIAS_MAX_AUTO = 1 << 16


def estimate_sizes(symbols: np.ndarray, num_levels: int) -> dict[str, int]:
    """Body sizes in bytes of each ``auto`` candidate (exact for fixed/zstd/elias, estimate for ans).

    ``elias`` is omitted above :data:`ELIAS_MAX_AUTO` symbols and when its lower bound (8 + 3
    bits per non-zero) cannot beat the others.
    """
    return {name: size for name, (size, _) in _Candidates(symbols, num_levels).all().items()}


class _Candidates:
    """Sizes of one segment's candidates, each computed at most once, on demand.

    ``zstd``'s size is its real frame, kept so that encoding with zstd costs nothing more;
    ``ans``'s needs the value counts (one pass), also computed at most once.
    """

    def __init__(self, symbols: np.ndarray, num_levels: int) -> None:
        self.symbols, self.num_levels, self.n = symbols, num_levels, symbols.size
        self._model: CountsModel | None = None
        self.found: dict[str, tuple[int, bytes | None]] = {}

    def model(self) -> CountsModel:
        if self._model is None:
            self._model = CountsModel.from_values(to_values(self.symbols, self.num_levels),
                                                  2 * self.num_levels - 1)
        return self._model

    def size(self, name: str) -> int | None:
        """Size of ``name``'s body, or None where it is not a candidate (elias, see above)."""
        if name in self.found:
            return self.found[name][0]
        if self.n == 0:
            self.found[name] = (0, b"")
        elif name == "fixed":
            self.found[name] = (CODECS["fixed"].size(self.n, self.num_levels), None)
        elif name == "zstd":
            body = CODECS["zstd"].encode(self.symbols, self.num_levels)
            self.found[name] = (len(body), body)
        elif name == "ans":
            self.found[name] = (CODECS["ans"].size_estimate(self.model()), None)
        else:  # elias: exact, but only short segments whose lower bound can still win
            if self.n > ELIAS_MAX_AUTO:
                return None
            model = self.model()
            zero_value = self.num_levels - 1
            at = np.searchsorted(model.present, zero_value)
            zeros = (int(model.counts[at]) if at < model.present.size
                     and model.present[at] == zero_value else 0)
            others = [self.size(c) for c in ("fixed", "zstd", "ans")]
            if 8 + -(-3 * (self.n - zeros) // 8) >= min(others):
                return None
            self.found[name] = (elias_size(self.symbols), None)
        return self.found[name][0]

    def all(self) -> dict[str, tuple[int, bytes | None]]:
        for name in AUTO_CANDIDATES:
            self.size(name)
        return {name: self.found[name] for name in AUTO_CANDIDATES if name in self.found}


def choose_codec(
    symbols: np.ndarray,
    num_levels: int,
    bandwidth: float | None = None,
    speeds: Mapping[str, tuple[float, float]] | None = None,
) -> str:
    """Pick the codec name for one segment by the rule in the module docstring.

    Args:
        symbols: int8 symbols of the segment.
        num_levels: L of the segment's type.
        bandwidth: link bandwidth in bytes/s, or None to minimise size only.
        speeds: ``{codec: (encode_ns, decode_ns)}`` per symbol; defaults to
            :data:`DEFAULT_NS_PER_SYMBOL`.
    """
    return choose_and_encode(symbols, num_levels, bandwidth, speeds)[0]


def choose_and_encode(
    symbols: np.ndarray,
    num_levels: int,
    bandwidth: float | None = None,
    speeds: Mapping[str, tuple[float, float]] | None = None,
) -> tuple[str, bytes | None]:
    """:func:`choose_codec`, plus the body when computing the size already made it (zstd).

    With ``bandwidth``, a candidate whose cost cannot beat the best so far even at size 0
    (``numel * (encode_ns + decode_ns)``) is never sized: on a fast link that skips compressing
    with zstd or counting the values for ANS, which would cost more than the choice saves. The
    pruning is exact: the same codec wins as when every size is computed.
    """
    cands = _Candidates(symbols, num_levels)
    if bandwidth is None:
        found = cands.all()
        name = min(found, key=lambda c: (found[c][0], AUTO_CANDIDATES.index(c)))
        return name, found[name][1]
    table = DEFAULT_NS_PER_SYMBOL if speeds is None else speeds
    n = symbols.size

    def floor(name: str) -> tuple[float, int]:  # cost at size 0
        enc, dec = table[name]
        return n * (enc + dec) * 1e-9, AUTO_CANDIDATES.index(name)

    best: tuple[float, int] | None = None
    best_name = AUTO_CANDIDATES[0]
    for name in sorted(AUTO_CANDIDATES, key=floor):
        low = floor(name)
        if best is not None and low > best:
            break  # sorted by floor: no later candidate can win either
        size = cands.size(name)
        if size is None:
            continue
        cost = (size / bandwidth + low[0], low[1])
        if best is None or cost < best:
            best, best_name = cost, name
    return best_name, cands.found[best_name][1]


def choose_packed(
    packed: np.ndarray,
    numel: int,
    num_levels: int,
    bandwidth: float | None = None,
    speeds: Mapping[str, tuple[float, float]] | None = None,
) -> tuple[str, np.ndarray | None]:
    """``fixed`` or ``rans`` for already packed symbols, by the same rule as
    :func:`choose_codec`; returns the name and, when counted, the byte histogram (for the
    encoder, so the bytes are counted once).

    Without ``bandwidth`` the smaller wins. With it, ``rans`` costs
    ``size / bandwidth + bytes * (encode_ns + decode_ns)`` against ``fixed``'s
    ``bytes / bandwidth``, and it is not even counted when its time alone loses.

    Example::

        >>> import numpy as np
        >>> p = np.full(50_000, 0x77, np.uint8)   # all zero symbols at 4 bits
        >>> choose_packed(p, 100_000, 8)[0], choose_packed(p, 100_000, 8, bandwidth=1e12)[0]
        ('rans', 'fixed')
    """
    from qoda_hvd.coding.rans import byte_histogram, encoded_size_estimate

    nbytes = packed.size
    if nbytes == 0:
        return "fixed", None
    table = DEFAULT_NS_PER_PACKED_BYTE if speeds is None else speeds
    enc, dec = table["rans"]
    coding_s = nbytes * (enc + dec) * 1e-9
    if bandwidth is not None and coding_s >= nbytes / bandwidth:
        return "fixed", None  # even a zero-byte body would not pay for its coding time
    counts = byte_histogram(packed)
    size = encoded_size_estimate(counts)
    if bandwidth is None:
        return ("rans", counts) if size < nbytes else ("fixed", None)
    return ("rans", counts) if size / bandwidth + coding_s < nbytes / bandwidth else ("fixed", None)
