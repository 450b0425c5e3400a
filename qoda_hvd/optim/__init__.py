"""Optimizers: QODA, optimism for any torch optimizer, and the extra-gradient baseline.

Pure math, no communication (DESIGN.md section 2): each can be tested like ``torch.optim.Adam``.
"""
from __future__ import annotations

from qoda_hvd.optim.extragradient import ExtraGradient
from qoda_hvd.optim.optimistic import Optimistic, optimistic
from qoda_hvd.optim.qoda import (
    QODA,
    STEP_SIZE_POLICIES,
    AdaptiveStepSize,
    ConstantStepSize,
    StepSizePolicy,
    make_step_size_policy,
)

__all__ = [
    "QODA",
    "StepSizePolicy",
    "AdaptiveStepSize",
    "ConstantStepSize",
    "STEP_SIZE_POLICIES",
    "make_step_size_policy",
    "Optimistic",
    "optimistic",
    "ExtraGradient",
]
