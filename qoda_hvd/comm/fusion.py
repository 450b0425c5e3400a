"""Fusion: every ``p.grad`` of fixed parameter groups <-> one flat buffer per group.

The exchanges work on a few large flat buffers (one per layer type, plus one of the small
tensors that travel as float32) instead of many small gradients: the codec's kernels and the
collectives then run once per type, not once per tensor.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["FusedGradients"]


class FusedGradients:
    """Flat buffers over the gradients of fixed parameter groups (one per layer type, plus raw).

    ``gather`` copies every ``p.grad`` into its group's buffer (a missing grad counts as zeros,
    as Horovod does); ``scatter`` hands the result back by making ``p.grad`` a view of its
    buffer (DDP's ``gradient_as_bucket_view``), so no copy back. A gradient that still is that
    view at the next ``gather`` (``zero_grad(set_to_none=False)`` and backward accumulating in
    place) is not copied either; one that autograd replaced is (one ``torch._foreach_copy_``
    over views made once: no per-step allocation). A buffer of another dtype than its
    parameters (float16) is copied back.

    Args:
        groups: the parameters of each buffer, in order.
        dtype: the buffers' dtype (float32; float16 for ``Compression.fp16``).

    Example::

        >>> a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
        >>> a.grad, b.grad = torch.ones(2), torch.full((3,), 2.0)
        >>> fused = FusedGradients([[a, b]])
        >>> fused.gather()[0].tolist()
        [1.0, 1.0, 2.0, 2.0, 2.0]
        >>> fused.buffers[0].mul_(10); fused.scatter(); b.grad.tolist()   # b.grad is a view now
        tensor([10., 10., 20., 20., 20.])
        [20.0, 20.0, 20.0]
    """

    def __init__(self, groups: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype = torch.float32):
        self.groups = [list(g) for g in groups]
        self.buffers: list[torch.Tensor] = []
        self._views: list[torch.Tensor] = []
        #: Every parameter, in buffer order.
        self.params: list[torch.Tensor] = []
        for params in self.groups:
            device = params[0].device if params else torch.device("cpu")
            buf = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=device)
            self.buffers.append(buf)
            for p, view in zip(params, buf.split([p.numel() for p in params])):
                self._views.append(view.view(p.shape))
                self.params.append(p)

    @property
    def numel(self) -> int:
        return sum(b.numel() for b in self.buffers)

    def gather(self) -> list[torch.Tensor]:
        """Copy every gradient into the buffers (zeros for a missing one); returns them."""
        dst, src = [], []
        for p, view in zip(self.params, self._views):
            g = p.grad
            if g is None:
                view.zero_()
            elif not (g.data_ptr() == view.data_ptr() and g.dtype == view.dtype):
                dst.append(view)
                src.append(g)
        if dst:
            torch._foreach_copy_(dst, src)
        return self.buffers

    def scatter(self) -> None:
        """Every ``p.grad`` becomes (a view of) its part of the buffers."""
        copy_dst, copy_src = [], []
        for p, view in zip(self.params, self._views):
            if view.dtype == p.dtype:
                if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                    p.grad = view
            else:  # float16 buffers: the gradient keeps its own dtype
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                copy_dst.append(p.grad)
                copy_src.append(view)
        if copy_dst:
            torch._foreach_copy_(copy_dst, copy_src)
