"""Names the docstring examples of qoda_hvd use (they run as doctests in ``make test``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    import qoda_hvd
    from qoda_hvd import QODA

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    x, y = torch.randn(4, 8), torch.randn(4, 2)
    doctest_namespace.update(
        torch=torch, nn=nn, qoda_hvd=qoda_hvd, QODA=QODA, model=model,
        g=torch.Generator().manual_seed(0),
        batch=x, loader=[x, x], loss_fn=lambda out: nn.functional.mse_loss(out, y))
