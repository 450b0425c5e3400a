"""qoda_hvd: layer-wise quantized, entropy-coded gradient exchange and QODA for Horovod."""
from __future__ import annotations

from qoda_hvd.errors import PayloadError

__version__ = "0.1.0"

__all__ = ["PayloadError", "__version__"]
