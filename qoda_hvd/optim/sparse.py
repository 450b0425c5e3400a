"""Sparse gradients (``nn.Embedding(sparse=True)``) inside one fused, dense exchange.

Sparse gradients travel densified in the fused exchange (the quantizer skips all-zero
buckets), and, as Horovod does with or without ``sparse_as_dense``, the optimizer then gets a
sparse gradient again: the rows whose average is nonzero, so ``torch.optim.SparseAdam`` works.
"""
from __future__ import annotations

import torch

__all__ = ["SparseGradients"]


class SparseGradients:
    """The parameters whose gradient came sparse, and their dense buffers (made once).

    Example::

        >>> emb = torch.nn.Embedding(4, 2, sparse=True)
        >>> emb(torch.tensor([1])).sum().backward()
        >>> sg = SparseGradients(); sg.add(emb.weight)
        >>> dense = sg.densify(); emb.weight.grad.is_sparse
        False
        >>> sg.resparsify(dense); emb.weight.grad.is_sparse
        True
    """

    def __init__(self) -> None:
        self._params: set[torch.Tensor] = set()
        self._dense: dict[torch.Tensor, torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self._params)

    def add(self, p: torch.Tensor) -> None:
        """``p``'s gradient came sparse (from its hook)."""
        self._params.add(p)

    def densify(self) -> list[torch.Tensor]:
        """Sparse gradients -> dense buffers (reused) in ``p.grad``; returns those parameters."""
        dense = []
        for p in self._params:
            if p.grad is None or not p.grad.is_sparse:
                continue
            buf = self._dense.get(p)
            if buf is None:
                buf = self._dense[p] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            else:
                buf.zero_()
            buf.add_(p.grad)  # sums repeated indices, as coalescing would
            p.grad = buf
            dense.append(p)
        return dense

    @staticmethod
    def resparsify(params) -> None:
        """``p.grad`` of each of ``params`` -> its nonzero rows as a coalesced sparse tensor."""
        for p in params:
            dense = p.grad
            rows = dense.reshape(dense.shape[0], -1).ne(0).any(dim=1).nonzero().squeeze(1)
            p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), dense.index_select(0, rows),
                                             dense.shape, check_invariants=False,
                                             is_coalesced=True)
