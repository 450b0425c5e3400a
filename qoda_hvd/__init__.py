"""qoda_hvd: layer-wise quantized, entropy-coded gradient exchange and QODA for Horovod.

Everything a user needs is here, Horovod style (``qoda_hvd.X``)::

    opt = qoda_hvd.DistributedOptimizer(qoda_hvd.QODA(model.parameters()),
                                        named_parameters=model.named_parameters(),
                                        compression=qoda_hvd.Compression.layerwise(bits=4))
"""
from __future__ import annotations

from qoda_hvd.compression import Compression, Compressor
from qoda_hvd.config import LayerwiseConfig, PowerSGDConfig
from qoda_hvd.errors import PayloadError
from qoda_hvd.optim import (QODA, AdaptiveStepSize, ConstantStepSize, ExtraGradient, Optimistic,
                            StepSizePolicy, optimistic)
from qoda_hvd.optim.distributed import DistributedOptimizer
from qoda_hvd.optim.state import broadcast_optimizer_state

__version__ = "0.1.0"

__all__ = [
    "AdaptiveStepSize",
    "Compression",
    "Compressor",
    "ConstantStepSize",
    "DistributedOptimizer",
    "ExtraGradient",
    "LayerwiseConfig",
    "Optimistic",
    "PayloadError",
    "PowerSGDConfig",
    "QODA",
    "StepSizePolicy",
    "__version__",
    "broadcast_optimizer_state",
    "optimistic",
]
