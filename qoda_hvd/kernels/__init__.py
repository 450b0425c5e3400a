"""The codec's kernels, in one place: the rounding noise, the level tables, and the two passes
(quantize + pack, unpack + dequantize + accumulate) for the CPU (:mod:`.cpu`, numba) and the GPU
(:mod:`.gpu`, Triton). Both produce the same symbols and bytes bit for bit.
"""
from __future__ import annotations

from qoda_hvd.kernels.rng import PHASE_QUANTIZE, PHASE_REQUANTIZE, stream_key, uniform_reference
from qoda_hvd.kernels.tables import LevelTable, level_table

__all__ = ["LevelTable", "PHASE_QUANTIZE", "PHASE_REQUANTIZE", "level_table", "stream_key",
           "uniform_reference"]
