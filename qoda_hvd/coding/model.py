"""Categorical symbol model: exact integer counts, their side-info bytes, and the ANS model.

The model is kept apart from the coder (as in constriction): :class:`CountsModel` knows which
symbols occur and how often; :mod:`qoda_hvd.coding.codecs` hands it to an ANS coder.

Side information layout (little-endian), for an alphabet of ``A = 2L - 1`` values
``u = symbol + L - 1``::

    +--------------------------+---------+----------------------------------------+
    | presence bitmap          | width w | counts of present values but the last  |
    | ceil(A / 8) bytes,       | 1 byte  | (k - 1) x w bytes, unsigned LE         |
    | bit u = byte u>>3, LSB 0 | 1..8    | (the last count is numel - their sum)  |
    +--------------------------+---------+----------------------------------------+

Only values that occur are in the model, so no probability mass is spent on absent symbols and
constriction's "every symbol keeps a minimum probability" rule never applies to them. The
decoder rebuilds the same float64 count array from the same integers, and constriction builds
its fixed-point model from it deterministically (``perfect=False`` on both sides), so encoder
and decoder models agree bit for bit.

Example::

    >>> import numpy as np
    >>> from qoda_hvd.coding.model import CountsModel
    >>> m = CountsModel.from_values(np.array([0, 2, 2, 1, 2], dtype=np.uint8), alphabet=3)
    >>> m.present.tolist(), m.counts.tolist()
    ([0, 1, 2], [1, 1, 3])
    >>> CountsModel.from_bytes(m.to_bytes(), numel=5, alphabet=3)[0].counts.tolist()
    [1, 1, 3]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CountsModel", "ModelError"]


class ModelError(ValueError):
    """Side information does not describe a valid model (turned into PayloadError upstream)."""


@dataclass(frozen=True)
class CountsModel:
    """Empirical distribution of one segment's values.

    Attributes:
        alphabet: number of possible values ``A`` (values are ``0 .. A-1``).
        present: sorted int64 array of the values that occur (``k`` of them).
        counts: int64 occurrences of each present value (all >= 1, summing to numel).
    """

    alphabet: int
    present: np.ndarray
    counts: np.ndarray

    @classmethod
    def from_values(cls, values: np.ndarray, alphabet: int) -> CountsModel:
        """Count the uint8 ``values`` (each < alphabet)."""
        import torch  # its bincount reads uint8 as is; numpy's first widens to int64 (4x slower)

        hist = torch.bincount(torch.from_numpy(np.ascontiguousarray(values, dtype=np.uint8)),
                              minlength=alphabet).numpy()
        present = np.flatnonzero(hist)
        return cls(alphabet, present, hist[present].astype(np.int64))

    @property
    def numel(self) -> int:
        return int(self.counts.sum())

    def side_info_size(self) -> int:
        """Exact byte size of :meth:`to_bytes`."""
        return len(self._header_and_width()[0]) + 1 + (self.present.size - 1) * self._width()

    def entropy_bits(self) -> float:
        """Empirical entropy of the values in bits, summed over all of them."""
        n = self.numel
        if n == 0:
            return 0.0
        c = self.counts.astype(np.float64)
        return float(np.sum(c * np.log2(n / c)))

    def probabilities(self) -> np.ndarray:
        """float64 weights for constriction (integers, exactly representable below 2**53)."""
        return self.counts.astype(np.float64)

    def index_of(self, values: np.ndarray) -> np.ndarray:
        """Map values to their rank among the present values (the ANS alphabet), int32."""
        lut = np.zeros(self.alphabet, dtype=np.int32)
        lut[self.present] = np.arange(self.present.size, dtype=np.int32)
        return lut[values]

    def _width(self) -> int:
        stored = self.counts[:-1]
        top = int(stored.max()) if stored.size else 0
        return max(1, (top.bit_length() + 7) // 8)

    def _header_and_width(self) -> tuple[bytes, int]:
        bitmap = np.zeros(-(-self.alphabet // 8) * 8, dtype=np.uint8)
        bitmap[self.present] = 1
        return np.packbits(bitmap, bitorder="little").tobytes(), self._width()

    def to_bytes(self) -> bytes:
        """Serialise as described in the module docstring."""
        bitmap, width = self._header_and_width()
        stored = self.counts[:-1].astype("<u8").view(np.uint8).reshape(-1, 8)[:, :width]
        return bitmap + bytes([width]) + stored.tobytes()

    @classmethod
    def from_bytes(cls, data: memoryview | bytes, numel: int, alphabet: int) -> tuple[CountsModel, int]:
        """Parse side info from the start of ``data``; returns the model and bytes consumed.

        Raises:
            ModelError: the bitmap, width or counts are inconsistent with ``numel``.
        """
        nbitmap = -(-alphabet // 8)
        if len(data) < nbitmap + 1:
            raise ModelError(f"side info needs at least {nbitmap + 1} bytes, segment has {len(data)}")
        raw = np.frombuffer(data, dtype=np.uint8, count=nbitmap)
        bits = np.unpackbits(raw, bitorder="little")
        if bits[alphabet:].any():
            raise ModelError(f"presence bitmap marks values >= alphabet size {alphabet}")
        present = np.flatnonzero(bits).astype(np.int64)
        if present.size == 0:
            raise ModelError("presence bitmap is empty for a non-empty segment")
        width = data[nbitmap]
        if not 1 <= width <= 8:
            raise ModelError(f"count width must be in [1, 8], got {width}")
        stored_n = present.size - 1
        end = nbitmap + 1 + stored_n * width
        if len(data) < end:
            raise ModelError(f"{stored_n} counts of {width} bytes need {end} bytes, segment has {len(data)}")
        padded = np.zeros((stored_n, 8), dtype=np.uint8)
        padded[:, :width] = np.frombuffer(data, dtype=np.uint8, count=stored_n * width,
                                          offset=nbitmap + 1).reshape(stored_n, width)
        stored = padded.view("<u8").reshape(stored_n)
        if stored_n and (stored.min() < 1 or stored.max() >= numel):
            raise ModelError(f"counts must be in [1, numel - 1 = {numel - 1}]")
        total = int(stored.astype(np.int64).sum())  # k <= 255 counts below 2**40: no overflow
        if total >= numel:
            raise ModelError(f"counts sum to {total}, leaving nothing for the last of numel={numel}")
        counts = np.append(stored.astype(np.int64), numel - total)
        return cls(alphabet, present, counts), end
