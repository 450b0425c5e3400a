"""What both DDP hooks share: the process group, bucket layouts, the worker, the step count.

- :class:`BucketLayout`: one DDP bucket's parameters grouped by layer type, computed once per
  bucket (and again only when DDP rebuilds its buckets, which it does once, after its first
  iteration): a flat scratch buffer holding the bucket's coordinates type by type (each type's
  parameters in model order), the uncompressed ones last, and the two lists of views that one
  ``torch._foreach_copy_`` copies between the bucket and the scratch. No Python loop over
  parameters runs per step beyond fetching ``bucket.parameters()`` to check that the layout
  still holds.
- :class:`HookStateBase`: the process group, the model binding (parameter -> name), the step
  counter (a step ends at the bucket with ``is_last()``) and ONE worker thread
  (:class:`qoda_hvd.comm.buckets.BucketWorker`) that runs every bucket's work and issues every
  collective of the hook in bucket order. DDP calls the hook for bucket 0, 1, ... in this order
  on every rank, so the collectives are issued in the same order everywhere; issuing them from
  future callbacks instead (torch's ``powerSGD_hook`` does) lets two buckets' second rounds
  cross between ranks (gloo then aborts: "Received data size doesn't match expected size").
  The hook returns at once; backward goes on while the worker quantizes and exchanges.
  Those collectives run on a private group of the same ranks (``dist.new_group``, made when the
  state is made or unpickled, so on every rank at the same point): DDP issues collectives of
  its own on its group from the autograd thread while buckets are still in flight (the map of
  used parameters with ``find_unused_parameters=True`` or at ``static_graph``'s first
  iteration), and two threads issuing on one group would interleave differently on each rank.
- Steps that need every bucket before any is sent (a level or rank agreement, the types found
  from the first step) stash their buckets; the last bucket's job agrees (one small
  allreduce) and then runs them all, in order.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from qoda_hvd.comm.buckets import BucketWorker

__all__ = ["BucketLayout", "HookStateBase", "CompressionStats", "resolve_model"]


def resolve_model(model) -> nn.Module:
    """The module whose ``named_parameters()`` name the gradients (a DDP wrapper's inner
    module, so names carry no ``module.`` prefix)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the torch.nn.Module that DDP wraps (or the DDP wrapper), "
                        f"got {type(model).__name__}")
    return model


class CompressionStats(tuple):
    """``(compress_rate, numel_before_compression, numel_after_compression)``, as torch's
    ``PowerSGDState.compression_stats()``, with more figures as attributes (:meth:`as_dict`).

    ``numel_after_compression`` counts float32-equivalents of what this rank contributed
    (payload bytes / 4 for the quantized hook; P, Q and uncompressed floats for PowerSGD).

    Example::

        >>> s = CompressionStats(1000, 125.0, steps=3)
        >>> rate, before, after = s
        >>> rate, s.steps
        (8.0, 3)
    """

    def __new__(cls, numel_before: float, numel_after: float, /, **extra):
        rate = numel_before / numel_after if numel_after > 0 else 0
        self = super().__new__(cls, (rate, numel_before, numel_after))
        self.__dict__.update(extra)
        return self

    def as_dict(self) -> dict:
        return {"compress_rate": self[0], "numel_before_compression": self[1],
                "numel_after_compression": self[2], **self.__dict__}


@dataclass
class BucketLayout:
    """One bucket's coordinates grouped by type (see the module doc).

    Attributes:
        index: the DDP bucket index.
        key: what identifies the bucket's layout (buffer address, size, parameters).
        names: the bucket's parameter names, in bucket order.
        scratch: flat float32 ``[numel]`` on the bucket's device: type 0's coordinates, type
            1's, ..., then the uncompressed ones.
        bounds: ``num_types + 2`` offsets into ``scratch`` (type t is ``bounds[t]:bounds[t+1]``,
            raw is the last range).
        src, dst: views of the bucket buffer and of ``scratch`` (same order, same sizes).
        order: bucket names in scratch order.
    """

    index: int
    key: tuple
    names: list
    scratch: torch.Tensor
    bounds: list
    src: list = field(default_factory=list)
    dst: list = field(default_factory=list)
    order: list = field(default_factory=list)

    @staticmethod
    def build(index: int, key: tuple, buffer: torch.Tensor, params: Sequence[torch.Tensor],
              name_of: dict, rank_of: dict, group_of: Callable[[str, torch.Tensor], int],
              num_groups: int, scratch_dtype=torch.float32) -> "BucketLayout":
        """``group_of(name, p)`` in ``[0, num_groups)``; the last group is the raw one."""
        sizes = [p.numel() for p in params]
        if sum(sizes) != buffer.numel():
            raise RuntimeError(f"DDP bucket {index} holds {buffer.numel()} coordinates but its "
                               f"parameters have {sum(sizes)}: an unsupported bucket layout")
        try:
            names = [name_of[id(p)] for p in params]
        except KeyError:
            raise RuntimeError("a DDP bucket holds a parameter that is not in the model this "
                               "hook state was bound to: pass model= the module DDP wraps"
                               ) from None
        pieces = buffer.split(sizes) if sizes else []
        members: list[list[int]] = [[] for _ in range(num_groups)]
        for i, (name, p) in enumerate(zip(names, params)):  # once per bucket layout
            members[group_of(name, p)].append(i)
        bounds, src, dst_sizes, order = [0], [], [], []
        for group in members:
            group.sort(key=lambda i: rank_of[names[i]])  # model order: layout-independent
            for i in group:
                src.append(pieces[i])
                dst_sizes.append(sizes[i])
                order.append(names[i])
            bounds.append(bounds[-1] + sum(sizes[i] for i in group))
        scratch = torch.zeros(buffer.numel(), dtype=scratch_dtype, device=buffer.device)
        dst = list(scratch.split(dst_sizes)) if dst_sizes else []
        return BucketLayout(index, key, names, scratch, bounds, src, dst, order)

    def group(self, g: int) -> torch.Tensor:
        return self.scratch[self.bounds[g]:self.bounds[g + 1]]

    def gather(self) -> None:
        """Bucket buffer -> scratch (one fused copy)."""
        if self.src:
            torch._foreach_copy_(self.dst, self.src)

    def scatter(self) -> None:
        """Scratch -> bucket buffer (one fused copy)."""
        if self.src:
            torch._foreach_copy_(self.src, self.dst)


def layout_key(buffer: torch.Tensor, params: Sequence[torch.Tensor]) -> tuple:
    return (buffer.data_ptr(), buffer.numel(), buffer.dtype, tuple(map(id, params)))


@dataclass
class Job:
    """One bucket of one step, as the worker sees it."""

    index: int
    last: bool
    buffer: torch.Tensor
    params: list
    future: torch.futures.Future
    step: int
    layout: Optional[BucketLayout] = None
    t_ready: float = 0.0


class HookStateBase:
    """Process group, model binding, step counter and worker of a DDP hook state.

    Subclasses implement :meth:`_plain_step` (no compression this step: a plain allreduce
    issued from the hook), :meth:`_needs_all` (this step's buckets wait for the last one),
    :meth:`_agree` (run on the worker at the last bucket of such a step, before the stashed
    buckets) and :meth:`_run` (one bucket, on the worker; sets the job's future).
    """

    #: Attributes that never travel in a pickle (rebuilt on first use).
    _TRANSIENT = ("process_group", "trace", "_model", "_name_of", "_rank_of", "_worker", "_layouts",
                  "_stash", "_lock", "_group_size", "_group_rank", "_private")

    def __init__(self, process_group, model) -> None:
        self.process_group = process_group
        self.step = 0
        self._init_transient()
        self._make_private()
        if model is not None:
            self.bind(model)

    def _init_transient(self) -> None:
        #: A list to record ``(event, bucket index, step, perf_counter())`` in, or None (off):
        #: "ready" when DDP hands the bucket over, "start" when the worker takes it up, "done"
        #: when its future completes. Shows the buckets' work overlapping backward.
        self.trace: Optional[list] = None
        self._model = None
        self._name_of: dict = {}
        self._rank_of: dict = {}
        self._worker = BucketWorker()
        self._layouts: dict[int, BucketLayout] = {}
        self._stash: list[Job] = []
        self._lock = threading.Lock()
        self._group_size: Optional[int] = None
        self._group_rank: Optional[int] = None
        self._private = None

    # -- binding ------------------------------------------------------------------------

    def bind(self, model) -> "HookStateBase":
        """Name the gradients after ``model``'s parameters (the module DDP wraps, or the DDP
        wrapper). Needed again after unpickling a state: parameters do not travel in a pickle.
        Returns the state."""
        model = resolve_model(model)
        self._model = model
        named = list(model.named_parameters())
        self._name_of = {id(p): n for n, p in named}
        self._rank_of = {n: i for i, (n, _) in enumerate(named)}
        self._layouts.clear()
        self._on_bind(named)
        return self

    def _on_bind(self, named) -> None:
        """Subclasses: derive what depends on the parameters."""

    # -- the group ----------------------------------------------------------------------

    def _make_private(self) -> None:
        """The hook's own group over ``process_group``'s ranks (see the module doc). A
        collective of the default group: every rank makes its states in the same order, as it
        makes DDP itself. Before ``init_process_group`` it is made at the first hook call."""
        if self._private is not None or not dist.is_initialized():
            return
        base = self.process_group if self.process_group is not None else dist.group.WORLD
        ranks = (None if self.process_group is None
                 else dist.get_process_group_ranks(self.process_group))
        self._private = dist.new_group(ranks=ranks, backend=dist.get_backend(base))

    @property
    def group(self):
        """The group the hook's collectives run on (private, same ranks as ``process_group``)."""
        if self._private is None:
            self._make_private()
        return self._private

    @property
    def size(self) -> int:
        if self._group_size is None:
            self._group_size = dist.get_world_size(self.group)
        return self._group_size

    @property
    def rank(self) -> int:
        if self._group_rank is None:
            self._group_rank = dist.get_rank(self.group)
        return self._group_rank

    def comm_device(self, buffer: torch.Tensor) -> torch.device:
        """Where collectives' tensors live: the device for NCCL, the host for gloo."""
        if dist.get_backend(self.group) == "nccl":
            return buffer.device
        return torch.device("cpu")

    # -- checkpoints ----------------------------------------------------------------------

    def __getstate__(self) -> dict:
        """Everything but the process group, the model and the worker (as torch's
        ``PowerSGDState``): a pickled state resumes the run after :meth:`bind`."""
        self._drain()
        return {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}

    def __setstate__(self, state: dict) -> None:
        """The process group becomes the default one (set ``process_group`` after loading for
        another); call :meth:`bind` with the model before training."""
        self.__dict__.update(state)
        self.process_group = None
        self._init_transient()
        self._make_private()
        self._after_setstate()

    def _after_setstate(self) -> None:
        """Subclasses: rebuild caches from the restored plain data."""

    def _drain(self) -> None:
        """Wait for the worker to be idle (a checkpoint between steps sees a settled state)."""
        self._worker.submit(lambda: None, torch.device("cpu")).result()

    # -- the hook -------------------------------------------------------------------------

    def hook(self, bucket) -> torch.futures.Future:
        """DDP's call for one bucket (see the module doc)."""
        if self._model is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to a model: pass model= when "
                               "making it, or call state.bind(model) after unpickling it")
        buffer = bucket.buffer()
        if buffer.dtype != torch.float32:
            raise TypeError(f"{type(self).__name__} takes float32 gradients, got a bucket of "
                            f"{buffer.dtype} (do not wrap it in fp16_compress_wrapper)")
        last = bool(bucket.is_last())
        step = self.step
        if last:
            self.step += 1
        if self._plain_step(step):
            return self._allreduce_plain(buffer)
        device = buffer.device
        fut = (torch.futures.Future(devices=[device]) if device.type == "cuda"
               else torch.futures.Future())
        job = Job(int(bucket.index()), last, buffer, list(bucket.parameters()), fut, step,
                  t_ready=time.perf_counter())
        if self.trace is not None:
            self.trace.append(("ready", job.index, step, job.t_ready))
        self._worker.submit(lambda: self._guarded(job), device)
        return fut

    def _allreduce_plain(self, buffer: torch.Tensor) -> torch.futures.Future:
        buffer.div_(self.size)
        self._count_plain(buffer)
        return (dist.all_reduce(buffer, group=self.group, async_op=True).get_future()
                .then(lambda f: f.value()[0]))

    def _count_plain(self, buffer: torch.Tensor) -> None:
        """Subclasses: account a plain float32 allreduce."""

    def _guarded(self, job: Job) -> None:
        try:
            self._dispatch(job)
        except BaseException as e:  # never leave DDP waiting on a future
            for j in [job] + self._stash:
                if not j.future.done():
                    j.future.set_exception(e)
            self._stash.clear()

    def _dispatch(self, job: Job) -> None:
        if self.trace is not None:
            self.trace.append(("start", job.index, job.step, time.perf_counter()))
            job.future.add_done_callback(
                lambda _f: self.trace.append(("done", job.index, job.step, time.perf_counter())))
        job.layout = self._layout(job)
        if self._needs_all(job.step):
            self._stash.append(job)
            if not job.last:
                return
            jobs, self._stash = self._stash, []
            self._agree(jobs)
            for j in jobs:
                j.layout = self._layout(j)  # the agreement may have changed the types
                self._run(j)
        else:
            self._run(job)

    def _layout(self, job: Job) -> Optional[BucketLayout]:
        key = layout_key(job.buffer, job.params)
        lay = self._layouts.get(job.index)
        if lay is None or lay.key != key:
            lay = self._make_layout(job, key)
            if lay is not None:
                if job.index in self._layouts:
                    self._on_rebuild(job.index, self._layouts[job.index], lay)
                self._layouts[job.index] = lay
        return lay

    def _make_layout(self, job: Job, key: tuple) -> Optional[BucketLayout]:
        raise NotImplementedError

    def _on_rebuild(self, index: int, old: BucketLayout, new: BucketLayout) -> None:
        """Subclasses: DDP rebuilt bucket ``index`` (carry per-parameter state over)."""

    def _plain_step(self, step: int) -> bool:
        return False

    def _needs_all(self, step: int) -> bool:
        return False

    def _agree(self, jobs: list) -> None:
        pass

    def _run(self, job: Job) -> None:
        raise NotImplementedError

    # -- collectives on the worker -----------------------------------------------------

    def _allreduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1 and tensor.numel():
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def close(self) -> None:
        """Stop the worker thread (a later hook call starts a new one)."""
        self._worker.close()
