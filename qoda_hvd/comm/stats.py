"""What an exchange did: the per-rank counts and phase times behind ``compression_stats()``."""
from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["ExchangeStats"]


@dataclass
class ExchangeStats:
    """Cumulative counts and times of one exchange object (per rank).

    Attributes:
        exchanges: calls (one per synchronisation).
        coordinates: gradient coordinates aggregated, summed over calls.
        encoded_bytes: bytes of the payloads this rank encoded from its own gradient.
        quantize_s, encode_s, exchange_s, decode_s: wall time in each phase (CPU clock; on
            CUDA the quantizer's time includes waiting for the device).
        level_updates: scheduled level re-optimisations (each one small allreduce).

    Example::

        >>> st = ExchangeStats(exchanges=2, coordinates=10)
        >>> st.as_dict()["coordinates"]
        10
    """

    exchanges: int = 0
    coordinates: int = 0
    encoded_bytes: int = 0
    quantize_s: float = 0.0
    encode_s: float = 0.0
    exchange_s: float = 0.0
    decode_s: float = 0.0
    level_updates: int = 0

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
