"""PowerSGD as a DDP communication hook, with per-type ranks chosen by L-GreCo's DP.

torch's ``powerSGD_hook`` gives every matrix one rank. Here, per DDP bucket, the math of
:class:`qoda_hvd.lowrank.LowRankCore` runs on the state's worker thread (see
:mod:`qoda_hvd.ddp._base`): the error of last step is added, ``P = M Q`` (Q warm-started from
last step, or seeded alike on every rank), allreduce #1 (every P and the bucket's uncompressed
tensors), P orthonormalised, ``Q = M^T P``, allreduce #2, ``P Q^T / K`` into the bucket and
the new error kept. Both allreduces of a bucket are issued from the worker in bucket order, so
they never cross another bucket's between ranks.

``layerwise=True``: on the first compressed step and every ``every`` compressed steps after,
the buckets of that step wait for the last one; every rank measures each layer type's
approximation error at every candidate rank (``rank_range`` around ``rank``) on its own input,
the ``types x candidates`` tables of all buckets are summed in ONE small allreduce, and every
rank runs the same L-GreCo DP on the same sums (least total size with the total error of
``rank`` everywhere): the same ranks on every rank.

Error feedback and the warm-start Q are kept per parameter (by name), so DDP's bucket rebuild
after its first iteration carries them over and ``start_iter`` may be 0 (torch's hook needs 2);
a checkpoint holds them by name too.
"""
from dataclasses import dataclass, fields
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from qoda_hvd.config import PowerSGDConfig
from qoda_hvd.ddp._base import CompressionStats, HookStateBase, Job
from qoda_hvd.lowrank import LowRankCore, MatrixSpec, candidate_ranks, lgreco_dp, mix_seed
from qoda_hvd.quant import LayerTyping

__all__ = ["PowerSGDHookState", "powersgd_hook", "PowerSGDHookStats"]


@dataclass
class PowerSGDHookStats:
    """Cumulative counts of one PowerSGD hook state on this rank.

    Attributes:
        steps: compressed steps (buckets with ``is_last()`` done compressed).
        buckets: buckets exchanged compressed.
        numel_before: coordinates of all buckets (compressed and plain steps).
        numel_after: floats this rank contributed (P, Q and uncompressed; plain steps: all).
        collectives: allreduces this state started (2 per compressed bucket at most, 1 per
            plain bucket, 1 per rank agreement).
        rank_updates: L-GreCo runs.
    """

    steps: int = 0
    buckets: int = 0
    numel_before: int = 0
    numel_after: int = 0
    collectives: int = 0
    rank_updates: int = 0

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class _PsgdBucket:
    """One bucket's low-rank layout: its core and the views copied in and out."""

    key: tuple
    core: LowRankCore
    src: list
    dst: list
    prepared: int = -1  # the step whose input (with the error added) the core holds

    def copy_in(self) -> None:
        if self.src:
            torch._foreach_copy_(self.dst, self.src)

    def copy_out(self) -> None:
        if self.src:
            torch._foreach_copy_(self.src, self.dst)


class PowerSGDHookState(HookStateBase):
    """State of :func:`powersgd_hook` (argument names follow :class:`qoda_hvd.PowerSGDConfig`
    and torch's ``PowerSGDState``).

    Args:
        process_group: the group to average over (None: the default group).
        model: the module DDP wraps (or the DDP wrapper); required here or via :meth:`bind`.
        rank: the rank ``r`` of every matrix (``layerwise=False``), or the reference whose
            total error bounds the layer-wise choice, in [1, 1024].
        layerwise: per-type (or per-layer, ``granularity="layer"``) ranks by L-GreCo's DP.
        types: ``None`` (rules on ``model``), ``{pattern: type}`` overrides or a module.
        granularity, rank_range, every, buckets, error_metric: as in
            :class:`~qoda_hvd.config.PowerSGDConfig`.
        error_feedback, warm_start: torch's ``use_error_feedback`` and ``warm_start``.
        start_iter: plain float32 allreduce for the first ``start_iter`` steps (torch's
            ``start_powerSGD_iter``; 0 is fine here, see the module doc).
        min_compression_rate: compress a matrix only if ``(n + m) r * rate < n m``.
        min_numel: tensors with fewer elements, or 1-D, travel uncompressed.
        orthogonalization_epsilon: added to column norms in Gram-Schmidt.
        seed: seed of the initial Q (the same on every rank).

    Example::

        >>> import torch.nn as nn
        >>> model = nn.Linear(256, 128)
        >>> state = PowerSGDHookState(model=model, rank=4, layerwise=True)   # doctest: +SKIP
        >>> ddp_model.register_comm_hook(state, powersgd_hook)             # doctest: +SKIP
        >>> PowerSGDHookState(model=model, rank=0)
        Traceback (most recent call last):
        ...
        ValueError: rank must be in [1, 1024], got 0
    """

    _TRANSIENT = HookStateBase._TRANSIENT + ("_typing", "_unit_of", "_carry_step")

    def __init__(self, process_group=None, model=None, *, rank: int = 4, layerwise: bool = False,
                 types: Any = None, granularity: str = "type", rank_range: tuple = (0.5, 2.0),
                 every: int = 100, buckets: int = 10_000, error_metric: str = "absolute",
                 error_feedback: bool = True, warm_start: bool = True, start_iter: int = 0,
                 min_compression_rate: float = 2.0, min_numel: int = 1024,
                 orthogonalization_epsilon: float = 1e-8, seed: int = 0) -> None:
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got "
                            f"{type(process_group).__name__}")
        if types == "auto":
            raise ValueError("types='auto' is not offered by the DDP PowerSGD hook; pass None "
                             "(rules on the model), {pattern: type} overrides or a module")
        self.config = PowerSGDConfig(rank=rank, types=types, layerwise=layerwise,
                                     granularity=granularity, rank_range=rank_range, every=every,
                                     buckets=buckets, error_metric=error_metric,
                                     error_feedback=error_feedback, warm_start=warm_start,
                                     start_iter=start_iter,
                                     min_compression_rate=min_compression_rate,
                                     min_numel=min_numel,
                                     orthogonalization_epsilon=orthogonalization_epsilon,
                                     seed=seed)
        self._types_module = None
        if isinstance(types, torch.nn.Module):  # the config (pickled) keeps no module
            self._types_module = types
            self.config = PowerSGDConfig(**{**self.config.__dict__, "types": None})
        self.stats = PowerSGDHookStats()
        self.unit_names: list[str] = []
        self.unit_ranks: list[int] = []
        self.candidates = (candidate_ranks(rank, *self.config.rank_range) if layerwise
                           else [rank])
        self.last_choice: Optional[dict] = None
        self._deferred = False
        self._carry: Optional[dict] = None  # errors and Q by name, when no core holds them
        self._typing_state: Optional[dict] = None
        super().__init__(process_group, model)
        self._types_module = None

    def _init_transient(self) -> None:
        super()._init_transient()
        self._typing: Optional[LayerTyping] = None
        self._unit_of: dict[str, int] = {}
        self._carry_step: Optional[int] = None

    # -- binding -----------------------------------------------------------------------

    def _on_bind(self, named) -> None:
        from qoda_hvd.quant import classify_parameters

        cfg = self.config
        if self._typing_state is not None:
            from qoda_hvd.ddp.layerwise import _typing_from_state

            typing = _typing_from_state(self._typing_state)
        elif self._types_module is not None:
            typing = classify_parameters(self._types_module, min_numel=cfg.min_numel)
        else:
            typing = classify_parameters(self._model, overrides=cfg.types,
                                         min_numel=cfg.min_numel)
        missing = [n for n, _ in named if n not in typing.type_ids and n not in typing.uncompressed]
        if missing:
            raise ValueError(f"types does not name the model's parameters {missing[:5]}: pass the "
                             "model DDP wraps")
        from qoda_hvd.ddp.layerwise import _typing_to_state

        self._typing_state = _typing_to_state(typing)
        self._typing = typing
        units: list[str] = []
        self._unit_of = {}
        for name, p in named:
            if not self._compressible(name, p):
                continue
            key = name if cfg.granularity == "layer" else typing.type_names[typing.type_id(name)]
            if key not in units:
                units.append(key)
            self._unit_of[name] = units.index(key)
        if self.unit_names != units:
            self.unit_names = units
            self.unit_ranks = [cfg.rank] * len(units)

    def _compressible(self, name: str, p: torch.Tensor) -> bool:
        return (name not in self._typing.uncompressed and p.dim() >= 2
                and p.numel() >= self.config.min_numel)

    @property
    def ranks(self) -> dict[str, int]:
        """Current rank per unit (layer type, or parameter name with ``granularity="layer"``)."""
        return dict(zip(self.unit_names, self.unit_ranks))

    # -- layouts -----------------------------------------------------------------------

    def _make_layout(self, job: Job, key: tuple) -> _PsgdBucket:
        names = [self._name_of.get(id(p)) for p in job.params]
        if None in names:
            raise RuntimeError("a DDP bucket holds a parameter that is not in the model this hook "
                               "state was bound to: pass model= the module DDP wraps")
        if self._layouts and self._carry_step != job.step:
            # DDP rebuilt its buckets (once, after its first iteration): errors and Q of every
            # current core by name, for the new cores to take
            self._snapshot()
            self._carry_step = job.step
        return self._build(job.index, key, job.buffer, job.params, names, self.unit_ranks)

    def _build(self, index: int, key: tuple, buffer, params, names, ranks) -> _PsgdBucket:
        cfg = self.config
        order = sorted(range(len(names)), key=lambda i: self._rank_of[names[i]])
        specs, raw = [], []
        for i in order:  # once per bucket layout
            n, p = names[i], params[i]
            if n in self._unit_of:
                specs.append(MatrixSpec(n, tuple(p.shape), self._unit_of[n]))
            else:
                raw.append((n, tuple(p.shape)))
        core = LowRankCore(specs, raw, ranks, cfg.min_compression_rate, cfg.error_feedback,
                           cfg.warm_start, cfg.orthogonalization_epsilon,
                           mix_seed(cfg.seed, index), buffer.device)
        if self._carry is not None:
            carry = self._carry
            dev = buffer.device
            core.load_matrix_state(
                {"errors": {n: e.to(dev) for n, e in carry["errors"].items() if n in names},
                 "q": {n: q.to(dev) for n, q in carry["q"].items() if n in names}},
                self.step, carry["q_ready"])
        src = list(buffer.split([p.numel() for p in params])) if params else []
        dst = [core.views[n].view(-1) for n in names]
        return _PsgdBucket(key, core, src, dst)

    def _snapshot(self) -> None:
        errors, qs, ready = {}, {}, False
        if self._carry is not None:
            errors.update(self._carry["errors"])
            qs.update(self._carry["q"])
            ready = self._carry["q_ready"]
        for b in self._layouts.values():
            ms = b.core.matrix_state()
            errors.update(ms["errors"])
            qs.update(ms["q"])
            ready = ready or b.core.q_ready
        self._carry = {"errors": errors, "q": qs, "q_ready": ready}

    # -- the steps ---------------------------------------------------------------------

    def _plain_step(self, step: int) -> bool:
        return step < self.config.start_iter

    def _count_plain(self, buffer: torch.Tensor) -> None:
        st = self.stats
        st.numel_before += buffer.numel()
        st.numel_after += buffer.numel()
        st.collectives += 1

    def _due(self, step: int) -> bool:
        if not self.config.layerwise or not self.unit_names:
            return False
        since = step - self.config.start_iter
        every = self.config.every
        return self._deferred or since == 0 or (every > 0 and since % every == 0)

    def _needs_all(self, step: int) -> bool:
        return self._due(step)

    def _prepare(self, job: Job) -> None:
        b = job.layout
        if b.prepared != job.step:
            b.copy_in()
            b.core.add_error()
            b.prepared = job.step

    def _agree(self, jobs: list) -> None:
        """L-GreCo at the last bucket: ONE allreduce of the summed error tables, the same DP
        on every rank, then the cores rebuilt at the new ranks (this step's inputs and Q
        carried over)."""
        units = len(self.unit_names)
        errors = np.zeros((units, len(self.candidates)))
        sizes = np.zeros_like(errors)
        energy = np.zeros(units)
        for j in jobs:
            self._prepare(j)
            e, s, en = j.layout.core.unit_tables(self.candidates, units,
                                                 seed=mix_seed(self.config.seed, j.step, j.index))
            errors += e
            sizes += s
            energy += en
        dev = self.comm_device(jobs[0].buffer)
        table = torch.from_numpy(np.concatenate([errors.reshape(-1), energy])).to(dev)
        total = self._allreduce_sum_(table).cpu().numpy()
        self.stats.collectives += 1
        errors, energy = total[:errors.size].reshape(errors.shape), total[errors.size:]
        # every rank has the same sums, so the same branch: an all-zero table says nothing
        self._deferred = not bool(energy.sum() > 0)
        if self._deferred:
            return
        cfg = self.config
        if cfg.error_metric == "relative":
            errors = errors / np.where(energy > 0, energy, 1.0)[:, None]
        base = self.candidates.index(cfg.rank)
        budget = float(errors[:, base].sum())
        choice = lgreco_dp(errors, sizes, budget, cfg.buckets, fallback=[base] * units)
        ranks = [self.candidates[int(c)] for c in choice]
        idx = np.arange(units)
        self.last_choice = {"budget": budget, "error": float(errors[idx, choice].sum()),
                            "size": float(sizes[idx, choice].sum()),
                            "uniform_size": float(sizes[:, base].sum())}
        self.stats.rank_updates += 1
        if ranks == self.unit_ranks:
            return
        self.unit_ranks = ranks
        for j in jobs:  # new layouts at the new ranks: this step's inputs and Q carried over
            old = j.layout
            names = [self._name_of[id(p)] for p in j.params]
            ms = old.core.matrix_state()
            new = self._build(j.index, old.key, j.buffer, j.params, names, ranks)
            torch._foreach_copy_(new.dst, old.dst)
            new.core.load_matrix_state({"q": ms["q"]}, j.step, old.core.q_ready)
            new.prepared = j.step
            self._layouts[j.index] = j.layout = new

    def _run(self, job: Job) -> None:
        """One bucket's PowerSGD round (module doc), on the worker."""
        self._prepare(job)
        b, k = job.layout, self.size
        core = b.core
        core.start(job.step)
        st = self.stats
        if core.send_p.numel():
            self._allreduce_sum_(core.send_p)
            st.collectives += 1
        core.project()
        if core.send_q.numel():
            self._allreduce_sum_(core.send_q)
            st.collectives += 1
        core.finish(k, True)
        if not _finite(core):
            # NaN/Inf in the sums (a rank's gradient overflowed): the aggregate is NaN on every
            # rank alike (a GradScaler skips the step), but kept in the error and Q memory it
            # would poison every later step; every rank sees the same sums, so all reset alike
            core.err.zero_()
            core.q_ready = False
        b.copy_out()
        st.buckets += 1
        st.numel_before += job.buffer.numel()
        st.numel_after += core.sent_floats
        if job.last:
            st.steps += 1
        job.future.set_result(job.buffer)

    # -- reports and checkpoints --------------------------------------------------------

    def compression_stats(self) -> CompressionStats:
        """``(compress_rate, numel_before, numel_after)`` as torch's ``PowerSGDState``; the
        attributes add :class:`PowerSGDHookStats` and the current ``ranks``."""
        st = self.stats
        return CompressionStats(st.numel_before, st.numel_after, ranks=self.ranks,
                                **st.as_dict())

    def __getstate__(self) -> dict:
        """Config, step, ranks, and every parameter's error (this rank's) and Q by name, on the
        CPU; no process group, model or worker (as torch's ``PowerSGDState``)."""
        self._drain()
        if self._layouts:
            self._snapshot()
        state = {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}
        state["_types_module"] = None
        if self._carry is not None:
            state["_carry"] = {"errors": {n: e.cpu() for n, e in self._carry["errors"].items()},
                               "q": {n: q.cpu() for n, q in self._carry["q"].items()},
                               "q_ready": self._carry["q_ready"]}
        return state


def _finite(core: LowRankCore) -> bool:
    """Whether both summed buffers are finite (one reduction each; the same on every rank)."""
    return bool(torch.isfinite(core.send_p).all()) and bool(torch.isfinite(core.send_q).all())


def powersgd_hook(state: "PowerSGDHookState", bucket: dist.GradBucket
                  ) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: PowerSGD with per-type ranks (``layerwise=True``) or one rank.

    Register it with ``ddp_model.register_comm_hook(state, powersgd_hook)``; see
    :class:`PowerSGDHookState` and the module doc.

    Example::

        >>> state = PowerSGDHookState(model=model, rank=4, layerwise=True)  # doctest: +SKIP
        >>> ddp_model.register_comm_hook(state, powersgd_hook)            # doctest: +SKIP
    """
    if not isinstance(state, PowerSGDHookState):
        raise TypeError(f"powersgd_hook needs a PowerSGDHookState, got {type(state).__name__}")
    return state.hook(bucket)
