"""Batched power-iteration kernels of PowerSGD: orthonormalisation, seeded Q, spectrum errors.

Every function works on a batch of same-shaped matrices (``(b, n, m)``), so a model with many
same-shaped layers costs one ``torch.bmm`` / batched QR per shape, never a Python loop per
matrix. Nothing here communicates.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["orthonormalize_", "seeded_normal", "spectrum_errors", "mix_seed"]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy ``SeedSequence``: independent streams per tuple).

    Example::

        >>> mix_seed(0, 1) != mix_seed(0, 2)
        True
    """
    state = np.random.SeedSequence([int(p) & ((1 << 63) - 1) for p in parts]).generate_state(2, np.uint32)
    return ((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def orthonormalize_(matrices: torch.Tensor, epsilon: float = 1e-8) -> torch.Tensor:
    """Orthonormalise the columns of each ``(n, r)`` matrix of a ``(b, n, r)`` batch, in place.

    As torch's ``powerSGD_hook``: Gram-Schmidt for ``r <= 2`` or half precision, with
    ``epsilon`` added to every column norm (an all-zero column stays zero instead of NaN);
    batched Householder QR otherwise (a zero column gives a unit column, never NaN).

    Args:
        matrices: ``(b, n, r)`` with ``r <= n``.
        epsilon: added to column norms in Gram-Schmidt, >= 0.

    Example::

        >>> x = torch.randn(3, 8, 2)
        >>> q = orthonormalize_(x)
        >>> torch.allclose(q.transpose(1, 2) @ q, torch.eye(2).expand(3, 2, 2), atol=1e-5)
        True
    """
    if matrices.dim() != 3 or matrices.shape[2] > matrices.shape[1]:
        raise ValueError(f"matrices must be (b, n, r) with r <= n, got {tuple(matrices.shape)}")
    if matrices.numel() == 0:
        return matrices
    rank = matrices.shape[2]
    if rank <= 2 or matrices.dtype in (torch.float16, torch.bfloat16):
        for i in range(rank):  # columns, not elements: r <= 2 here
            col = matrices[:, :, i:i + 1]
            col.div_(torch.linalg.vector_norm(col, dim=1, keepdim=True).add_(epsilon))
            if i + 1 < rank:
                rest = matrices[:, :, i + 1:]
                rest.sub_((col * rest).sum(dim=1, keepdim=True) * col)
    else:  # in place, as torch's hook: only the small (b, r, r) R factor is allocated
        r_factor = torch.empty(matrices.shape[0], rank, rank, dtype=matrices.dtype,
                               device=matrices.device)
        torch.linalg.qr(matrices, out=(matrices, r_factor))
    return matrices


def seeded_normal(shape: Sequence[int], seed: int, device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal tensor from an explicit generator seeded with ``seed`` (drawn on the CPU,
    so every rank and device type gets the same numbers from the same seed).

    Example::

        >>> torch.equal(seeded_normal((2, 3), 7), seeded_normal((2, 3), 7))
        True
    """
    gen = torch.Generator().manual_seed(int(seed))
    out = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)


def spectrum_errors(matrices: torch.Tensor, ranks: Sequence[int], seed: int = 0,
                    iterations: int = 2) -> torch.Tensor:
    r"""Squared best rank-``r`` approximation errors :math:`\lVert M - M_r\rVert_F^2` per matrix.

    One randomised subspace iteration of width ``max(ranks)`` plus oversampling
    (``iterations`` power steps),
    then the singular values of the small projected matrix: :math:`\lVert M\rVert_F^2 -
    \sum_{i \le r}\sigma_i^2`, clamped at 0 (exact when ``max(ranks) >= min(n, m)``). This is
    L-GreCo's error measurement by power iterations, for all candidate ranks at once.

    Args:
        matrices: ``(b, n, m)`` float batch.
        ranks: candidate ranks (>= 1); those beyond ``min(n, m)`` get error 0.
        seed: seed of the random start.
        iterations: power steps, >= 1.

    Returns:
        float64 ``(b, len(ranks))``.

    Example::

        >>> u, v = torch.randn(1, 30, 3), torch.randn(1, 3, 20)
        >>> spectrum_errors(u @ v, [1, 3])[0, 1].item() < 1e-6
        True
    """
    b, n, m = matrices.shape
    full = min(n, m)
    top = max(ranks)
    width = max(1, min(top + max(4, top // 4), full))  # oversampled, as randomised SVD
    mats = matrices.detach().float()
    x = seeded_normal((b, m, width), seed, mats.device)
    for _ in range(iterations):
        y = orthonormalize_(torch.bmm(mats, x), 0.0)
        x = orthonormalize_(torch.bmm(mats.transpose(1, 2), y), 0.0)
    # The last projection in float64: the error is ||M||^2 minus the kept energy, a
    # difference that float32 would drown for well-approximated matrices.
    m64 = mats.double()
    y = orthonormalize_(torch.bmm(m64, x.double()), 0.0)
    proj = torch.bmm(y.transpose(1, 2), m64)                       # (b, width, m)
    s2 = torch.linalg.svdvals(proj).square()                       # descending
    total = m64.square().sum(dim=(1, 2))
    kept = torch.cumsum(s2, dim=1)
    out = torch.empty(b, len(ranks), dtype=torch.float64, device=mats.device)
    for j, r in enumerate(ranks):  # candidates, not elements
        out[:, j] = 0.0 if r >= full else (total - kept[:, r - 1]).clamp_min(0.0)
    return out.cpu()
