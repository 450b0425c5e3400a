r"""PowerSGD's per-step math over fixed buffers, without communication.

One step for every compressed matrix :math:`M` (a parameter viewed as ``shape[0] x rest``: a
conv kernel is ``out x in*kh*kw``), with the two sums left to the caller (the exchange):

1. :meth:`LowRankCore.add_error`: :math:`M \leftarrow M + e` (error feedback);
2. :meth:`LowRankCore.start`: :math:`Q` from the previous step (warm start, re-orthonormalised)
   or from a seed every rank shares; :math:`P = M Q`. Caller: allreduce ``send_p`` (P and the
   uncompressed tensors, one grouped allreduce);
3. :meth:`LowRankCore.project`: orthonormalise :math:`P`; :math:`Q = M^\top P`. Caller:
   allreduce ``send_q``;
4. :meth:`LowRankCore.finish`: :math:`Q \leftarrow Q / K`, :math:`e = M - P Q^\top` (the local
   input minus the global approximation, as torch's ``powerSGD_hook``), :math:`M \leftarrow P
   Q^\top`: identical on every rank (same summed P and Q, same deterministic kernels).

Matrices of one ``(n, m, r)`` are stacked in one buffer and go through ``torch.bmm`` and a
batched QR together. A matrix travels uncompressed (with the 1-D and small tensors, in the P
allreduce) when ``(n + m) r * min_compression_rate >= n m``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from qoda_hvd.lowrank.power import mix_seed, orthonormalize_, seeded_normal, spectrum_errors

__all__ = ["MatrixSpec", "LowRankCore", "should_compress"]


def should_compress(n: int, m: int, rank: int, min_compression_rate: float) -> bool:
    """torch's rule: low rank pays when ``(n + m) r * min_compression_rate < n m``.

    Example::

        >>> should_compress(512, 512, 4, 2.0), should_compress(8, 8, 4, 2.0)
        (True, False)
    """
    r = min(rank, n, m)
    return (n + m) * r * min_compression_rate < n * m


@dataclass(frozen=True)
class MatrixSpec:
    """A parameter that may be compressed: its name, shape and unit (rank group of the DP)."""

    name: str
    shape: tuple
    unit: int

    @property
    def rows(self) -> int:
        return int(self.shape[0])

    @property
    def cols(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64))


@dataclass
class _Group:
    rows: int
    cols: int
    rank: int
    members: list  # indices into LowRankCore.matrices


class LowRankCore:
    """Buffers and kernels of one PowerSGD layout (which matrices, at which ranks).

    Args:
        matrices: parameters that may be compressed, in a fixed order (every rank the same).
        raw: ``(name, shape)`` of parameters that always travel uncompressed.
        ranks: rank per unit (``ranks[spec.unit]``).
        min_compression_rate: see :func:`should_compress`.
        error_feedback, warm_start, epsilon, seed: as in :class:`~qoda_hvd.config.PowerSGDConfig`.
        device: where the buffers live (the parameters' device).

    Attributes:
        send_p: the first allreduce buffer: every group's P, then the uncompressed tensors.
        send_q: the second allreduce buffer: every group's Q (the warm-start memory after
            :meth:`finish`).

    Example::

        >>> core = LowRankCore([MatrixSpec("w", (64, 32), 0)], [("b", (64,))], ranks=[2])
        >>> core.compressed_names(), core.send_p.numel(), core.send_q.numel()
        (['w'], 192, 64)
    """

    def __init__(self, matrices: Sequence[MatrixSpec], raw: Sequence[tuple], ranks: Sequence[int],
                 min_compression_rate: float = 2.0, error_feedback: bool = True,
                 warm_start: bool = True, epsilon: float = 1e-8, seed: int = 0,
                 device=None) -> None:
        self.matrices = list(matrices)
        self.ranks = [int(r) for r in ranks]
        self.min_compression_rate = min_compression_rate
        self.error_feedback = error_feedback
        self.warm_start = warm_start
        self.epsilon = epsilon
        self.seed = seed
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.q_ready = False

        groups: dict[tuple, _Group] = {}
        travel_raw = []
        for i, spec in enumerate(self.matrices):
            n, m = spec.rows, spec.cols
            r = min(self.ranks[spec.unit], n, m)
            if should_compress(n, m, r, min_compression_rate):
                groups.setdefault((n, m, r), _Group(n, m, r, [])).members.append(i)
            else:
                travel_raw.append((spec.name, tuple(spec.shape)))
        self.groups = list(groups.values())
        self.raw = [(name, tuple(shape)) for name, shape in raw] + travel_raw

        mat_n = sum(len(g.members) * g.rows * g.cols for g in self.groups)
        p_n = sum(len(g.members) * g.rows * g.rank for g in self.groups)
        q_n = sum(len(g.members) * g.cols * g.rank for g in self.groups)
        raw_n = sum(int(np.prod(s, dtype=np.int64)) for _, s in self.raw)
        f32 = dict(dtype=torch.float32, device=self.device)
        self.mat = torch.zeros(mat_n, **f32)
        self.err = torch.zeros(mat_n if error_feedback else 0, **f32)
        self.send_p = torch.zeros(p_n + raw_n, **f32)
        self.send_q = torch.zeros(q_n, **f32)
        self.raw_buffer = self.send_p[p_n:]

        # Views made once: (b, n, m) / (b, n, r) / (b, m, r) per group; param-shaped per name.
        self._m, self._e, self._p, self._q = [], [], [], []
        self.views: dict[str, torch.Tensor] = {}
        self._slot: dict[str, tuple[int, int]] = {}  # name -> (group, index in group)
        mo = po = qo = 0
        for gi, g in enumerate(self.groups):
            b = len(g.members)
            mview = self.mat[mo:mo + b * g.rows * g.cols].view(b, g.rows, g.cols)
            self._m.append(mview)
            if error_feedback:
                self._e.append(self.err[mo:mo + b * g.rows * g.cols].view(b, g.rows, g.cols))
            self._p.append(self.send_p[po:po + b * g.rows * g.rank].view(b, g.rows, g.rank))
            self._q.append(self.send_q[qo:qo + b * g.cols * g.rank].view(b, g.cols, g.rank))
            for j, i in enumerate(g.members):
                spec = self.matrices[i]
                self.views[spec.name] = mview[j].view(spec.shape)
                self._slot[spec.name] = (gi, j)
            mo += b * g.rows * g.cols
            po += b * g.rows * g.rank
            qo += b * g.cols * g.rank
        ro = 0
        for name, shape in self.raw:
            k = int(np.prod(shape, dtype=np.int64))
            self.views[name] = self.raw_buffer[ro:ro + k].view(shape)
            ro += k

    # -- layout facts --------------------------------------------------------------------

    def compressed_names(self) -> list[str]:
        return [self.matrices[i].name for g in self.groups for i in g.members]

    @property
    def numel(self) -> int:
        """Gradient coordinates this layout aggregates."""
        return self.mat.numel() + self.raw_buffer.numel()

    @property
    def sent_floats(self) -> int:
        """Floats this rank contributes per step (P, uncompressed, Q)."""
        return self.send_p.numel() + self.send_q.numel()

    # -- the step ------------------------------------------------------------------------

    def add_error(self) -> None:
        """``M <- M + e`` for every compressed matrix (one add over the stacked buffer)."""
        if self.error_feedback and self.err.numel():
            self.mat.add_(self.err)

    def start(self, step: int) -> None:
        """Prepare Q (warm or seeded) and compute ``P = M Q`` into ``send_p``."""
        if self.warm_start and self.q_ready:
            for q in self._q:
                orthonormalize_(q, self.epsilon)
        else:
            for gi, q in enumerate(self._q):  # the same seed on every rank: the same Q
                q.copy_(seeded_normal(q.shape, mix_seed(self.seed, step, gi), q.device))
                orthonormalize_(q, self.epsilon)
        for m, q, p in zip(self._m, self._q, self._p):
            torch.bmm(m, q, out=p)

    def project(self) -> None:
        """After the P allreduce: orthonormalise P, ``Q = M^T P`` into ``send_q``."""
        for m, q, p in zip(self._m, self._q, self._p):
            orthonormalize_(p, self.epsilon)
            torch.bmm(m.transpose(1, 2), p, out=q)

    def finish(self, size: int, average: bool = True) -> None:
        """After the Q allreduce: the aggregate ``P Q^T`` into the matrices, the error updated,
        the uncompressed sum averaged (``average``) or every value scaled to the sum."""
        self.send_q.div_(size)
        if self.error_feedback and self.err.numel():
            self.err.copy_(self.mat)
        for m, q, p in zip(self._m, self._q, self._p):
            torch.bmm(p, q.transpose(1, 2), out=m)
        if self.error_feedback and self.err.numel():
            self.err.sub_(self.mat)
        if average:
            self.raw_buffer.div_(size)
        else:
            self.mat.mul_(size)
        self.q_ready = True

    # -- L-GreCo measurement -------------------------------------------------------------

    def unit_tables(self, candidates: Sequence[int], num_units: int, seed: int = 0,
                    inputs: Optional[Mapping[str, torch.Tensor]] = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Errors and sizes of every unit at every candidate rank, from the current inputs.

        Call after :meth:`add_error` (the inputs then hold gradient plus error). A matrix that
        would travel uncompressed at a candidate rank counts ``n m`` floats and no error.

        Args:
            candidates: candidate ranks.
            num_units: units of the DP (``spec.unit < num_units``).
            seed: seed of the randomised spectrum measurement.
            inputs: ``name -> tensor`` (parameter-shaped) to measure instead of this step's
                inputs, e.g. inputs summed over several steps; every matrix must be there.

        Returns:
            ``(errors, sizes, energy)``: float64 ``(num_units, len(candidates))`` errors
            (squared Frobenius norms of this rank's input; sum them over ranks before the DP)
            and sizes, and each unit's squared input norm ``(num_units,)``.
        """
        errors = np.zeros((num_units, len(candidates)))
        sizes = np.zeros((num_units, len(candidates)))
        energy = np.zeros(num_units)
        by_shape: dict[tuple, list[int]] = {}
        for i, spec in enumerate(self.matrices):
            by_shape.setdefault((spec.rows, spec.cols), []).append(i)
        for si, ((n, m), members) in enumerate(by_shape.items()):
            source = self.views if inputs is None else inputs
            stack = torch.stack([source[self.matrices[i].name].reshape(n, m) for i in members])
            errs = spectrum_errors(stack, candidates, seed=mix_seed(seed, si)).numpy()
            norms = stack.double().square().sum(dim=(1, 2)).cpu().numpy()
            for j, i in enumerate(members):  # matrices x candidates, on DP steps only
                u = self.matrices[i].unit
                energy[u] += norms[j]
                for c, r in enumerate(candidates):
                    if should_compress(n, m, r, self.min_compression_rate):
                        errors[u, c] += errs[j, c]
                        sizes[u, c] += (n + m) * min(r, n, m)
                    else:
                        sizes[u, c] += n * m
        return errors, sizes, energy

    # -- state across layouts and checkpoints -------------------------------------------

    def matrix_state(self) -> dict:
        """``{"errors": {name: e}, "q": {name: Q}}`` of the compressed matrices (copies)."""
        errors, qs = {}, {}
        for name, (gi, j) in self._slot.items():
            if self.error_feedback:
                errors[name] = self._e[gi][j].detach().clone()
            qs[name] = self._q[gi][j].detach().clone()
        return {"errors": errors, "q": qs}

    def load_matrix_state(self, state: Mapping, step: int, q_ready: bool) -> None:
        """Take errors and Q from :meth:`matrix_state` (another layout's, or a checkpoint's).

        Q columns beyond the saved rank (a rank grew) and matrices without a saved Q get
        seeded normal columns, so every rank fills them alike.
        """
        errors, qs = state.get("errors", {}), state.get("q", {})
        index = {spec.name: i for i, spec in enumerate(self.matrices)}
        for name, (gi, j) in self._slot.items():
            if self.error_feedback:
                e = errors.get(name)
                self._e[gi][j].copy_(e.reshape(self._e[gi][j].shape) if e is not None else 0.0)
            q = self._q[gi][j]
            old: Optional[torch.Tensor] = qs.get(name)
            keep = 0 if old is None else min(old.shape[1], q.shape[1])
            if keep:
                q[:, :keep].copy_(old[:, :keep])
            if keep < q.shape[1]:
                fresh = seeded_normal((q.shape[0], q.shape[1] - keep),
                                      mix_seed(self.seed, step, 1 << 20, index[name]), q.device)
                q[:, keep:].copy_(fresh)
        self.q_ready = bool(q_ready)
