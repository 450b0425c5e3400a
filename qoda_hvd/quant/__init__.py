"""Layer-wise unbiased quantization: level sequences, the bucketed quantizer, layer typing.

Free of communication: nothing here imports horovod, mpi4py or torch.distributed. The adaptive
state (:class:`LayerwiseQuantizer`) exposes its statistics as one flat tensor for the caller to
allreduce, and recomputes levels deterministically from the aggregate.
"""
from __future__ import annotations

from qoda_hvd.quant.levels import (
    MAX_BITS,
    MAX_LEVELS,
    MIN_BITS,
    MIN_LEVELS,
    eps_q,
    expected_variance,
    exponential_levels,
    is_uniform,
    level_candidates,
    level_probabilities,
    num_levels_for_bits,
    optimal_levels,
    optimal_levels_sweep,
    symbol_entropy_bits,
    uniform_levels,
    validate_levels,
    validate_num_levels,
)
from qoda_hvd.quant.layers import (
    CANONICAL_TYPES,
    UNCOMPRESSED,
    UNCOMPRESSED_TYPE_ID,
    LayerTyping,
    auto_layer_typing,
    classify_named_parameters,
    classify_parameters,
)
from qoda_hvd.quant.allocation import Allocation, allocate_levels
from qoda_hvd.quant.adaptive import LayerwiseQuantizer, normalized_histogram
from qoda_hvd.quant.quantizer import (
    DEFAULT_BUCKET_SIZE,
    NORMS,
    QuantizedTensor,
    Quantizer,
    dequantize,
    quantize,
    rank_generator,
)

__all__ = [
    "MAX_BITS",
    "MAX_LEVELS",
    "MIN_BITS",
    "MIN_LEVELS",
    "eps_q",
    "expected_variance",
    "exponential_levels",
    "is_uniform",
    "level_candidates",
    "level_probabilities",
    "num_levels_for_bits",
    "optimal_levels",
    "optimal_levels_sweep",
    "symbol_entropy_bits",
    "uniform_levels",
    "validate_levels",
    "validate_num_levels",
    "DEFAULT_BUCKET_SIZE",
    "NORMS",
    "QuantizedTensor",
    "Quantizer",
    "dequantize",
    "quantize",
    "rank_generator",
    "CANONICAL_TYPES",
    "UNCOMPRESSED",
    "UNCOMPRESSED_TYPE_ID",
    "LayerTyping",
    "auto_layer_typing",
    "classify_parameters",
    "classify_named_parameters",
    "Allocation",
    "allocate_levels",
    "LayerwiseQuantizer",
    "normalized_histogram",
]
