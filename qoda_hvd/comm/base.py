"""The Communicator seam: the three collectives a compressed exchange needs, counted.

- :meth:`Communicator.allgather`: every rank's uint8 payload (lengths differ) to every rank;
- :meth:`Communicator.alltoall`: chunk ``j`` of every rank to rank ``j`` (reduce-scatter step);
- :meth:`Communicator.allreduce_sum`: a float tensor, summed (level agreement, the fallback's
  probe); :meth:`Communicator.allreduce_sum_` in place (the float32/float16 gradient path of
  ``Compression.none`` / ``fp16`` and of ``fallback``).
- :meth:`Communicator.allgather_async` / :meth:`Communicator.wait`: an allgather started while
  backward still runs (the overlapped exchange), finished at ``synchronize()``.
- :meth:`Communicator.reduce_scatter_sum`: chunk ``j`` of every rank summed on rank ``j``
  (float32 inside a node, the first stage of the two-level exchange); by default over
  :meth:`alltoall`, natively where the backend has one (Horovod's ``reducescatter``).
- :meth:`Communicator.agree`: a small set-up allgather (the topology every rank must share),
  counted apart from the per-step collectives.

A communicator made for a subset of another's ranks (the node-local and cross-node groups of
:mod:`qoda_hvd.comm.topology`) also adds what it counts to its parent's :class:`CommStats`, so
the parent's totals stay the whole traffic while each group's own stats say where it went.

Byte counts are logical: what the algorithm must move per rank, independent of how the backend
routes it (ring, tree, shared memory). ``bytes_received`` is what bounds the time on a link.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence

import torch

__all__ = ["AllgatherHandle", "CommStats", "Communicator", "check_payload", "as_bytes",
           "from_bytes"]

_REDUCIBLE = (torch.float16, torch.float32, torch.float64)


@dataclass
class CommStats:
    """What a communicator has done since it was made (or last :meth:`reset`).

    Attributes:
        collectives: collective calls (a Horovod grouped op counts once).
        allgathers, alltoalls, allreduces, reducescatters: per kind.
        bytes_sent: logical bytes this rank sent.
        bytes_received: logical bytes this rank received from other ranks.
        setup_collectives: set-up calls (:meth:`Communicator.agree`), not in ``collectives``.
    """

    collectives: int = 0
    allgathers: int = 0
    alltoalls: int = 0
    allreduces: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    reducescatters: int = 0
    setup_collectives: int = 0

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_payload(payload: torch.Tensor, what: str = "payload") -> None:
    """Raise ``TypeError`` unless ``payload`` is a 1-D uint8 CPU tensor."""
    if not isinstance(payload, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(payload).__name__}")
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise TypeError(f"{what} must be a 1-D torch.uint8 tensor, got {payload.dtype} with "
                        f"shape {tuple(payload.shape)}")


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a 1-D uint8 view (no copy when already contiguous): how
    float32 shards travel through the uint8 collectives.

    Example::

        >>> as_bytes(torch.ones(2)).numel()
        8
    """
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def from_bytes(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`as_bytes`: a 1-D ``dtype`` view of uint8 bytes (copied only when
    the bytes do not start at a multiple of the item size).

    Example::

        >>> from_bytes(as_bytes(torch.tensor([1.5, 2.0])), torch.float32).tolist()
        [1.5, 2.0]
    """
    item = torch.empty(0, dtype=dtype).element_size()
    if data.numel() % item:
        raise ValueError(f"{data.numel()} bytes are not a whole number of {dtype} values")
    if data.storage_offset() % item:
        data = data.clone()
    return data.view(dtype)


class AllgatherHandle:
    """An allgather in flight (see :meth:`Communicator.allgather_async`).

    Attributes:
        tag: its name, the same on every rank.
        payload: what this rank sent.
        state: the backend's (e.g. a Horovod handle).
        done: None until waited for.
    """

    __slots__ = ("comm", "payload", "tag", "state", "done")

    def __init__(self, comm: "Communicator", payload: torch.Tensor, tag: str, state: Any) -> None:
        self.comm = comm
        self.payload = payload
        self.tag = tag
        self.state = state
        self.done: Optional[bool] = None


class Communicator(abc.ABC):
    """Collectives over ``size`` ranks; this object is rank ``rank``.

    Subclasses implement the ``_``-prefixed methods; the public ones validate and count.

    Example::

        >>> from qoda_hvd.comm import LocalGroup
        >>> comm = LocalGroup(1)[0]
        >>> [p.tolist() for p in comm.allgather(torch.tensor([1, 2], dtype=torch.uint8))]
        [[1, 2]]
        >>> comm.stats.allgathers
        1
    """

    #: Whether :meth:`allgather_async` runs in the background (then overlapping pays).
    asynchronous = False

    def __init__(self, rank: int, size: int) -> None:
        self.rank = rank
        self.size = size
        self.stats = CommStats()
        #: Further stats every count is added to (a sub-group's parent's).
        self.parent_stats: tuple[CommStats, ...] = ()

    def _count(self, kind: str, sent: int, received: int) -> None:
        for st in (self.stats, *self.parent_stats):
            if kind == "setup_collectives":
                st.setup_collectives += 1
            else:
                st.collectives += 1
                setattr(st, kind, getattr(st, kind) + 1)
            st.bytes_sent += sent
            st.bytes_received += received

    def allgather(self, payload: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's 1-D uint8 payload, in rank order (this rank's included)."""
        check_payload(payload)
        out = self._allgather(payload)
        self._count("allgathers", payload.numel() * (self.size - 1),
                    sum(p.numel() for i, p in enumerate(out) if i != self.rank))
        return out

    def agree(self, payload: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`allgather` for set-up (what every rank must know before the first step, e.g.
        its node): the same collective, counted in ``stats.setup_collectives`` and the bytes,
        not in the per-step ``collectives``.

        Example::

            >>> from qoda_hvd.comm import LocalGroup
            >>> comm = LocalGroup(1)[0]
            >>> comm.agree(torch.tensor([7], dtype=torch.uint8))[0].tolist(), comm.stats.collectives
            ([7], 0)
        """
        check_payload(payload)
        out = self._allgather(payload)
        self._count("setup_collectives", payload.numel() * (self.size - 1),
                    sum(p.numel() for i, p in enumerate(out) if i != self.rank))
        return out

    def alltoall(self, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Send ``chunks[j]`` to rank ``j``; return what each rank ``i`` sent here, in rank order."""
        if len(chunks) != self.size:
            raise ValueError(f"alltoall needs one chunk per rank ({self.size}), got {len(chunks)}")
        for j, c in enumerate(chunks):
            check_payload(c, f"chunks[{j}]")
        out = self._alltoall(list(chunks))
        self._count("alltoalls", sum(c.numel() for j, c in enumerate(chunks) if j != self.rank),
                    sum(c.numel() for i, c in enumerate(out) if i != self.rank))
        return out

    def reduce_scatter_sum(self, chunks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Send ``chunks[j]`` to rank ``j``; return the sum, over ranks, of what they sent here.

        Every rank passes ``size`` 1-D float tensors of one dtype whose lengths are the same on
        every rank (chunk ``j`` has the same length everywhere). The sum runs in rank order, so
        it depends only on the inputs. By default over :meth:`alltoall` (the bytes of each
        chunk); backends with a native reduce-scatter override :meth:`_reduce_scatter_sum`.

        Example::

            >>> from qoda_hvd.comm import LocalGroup
            >>> LocalGroup(1)[0].reduce_scatter_sum([torch.tensor([1.0, 2.0])]).tolist()
            [1.0, 2.0]
        """
        chunks = list(chunks)
        if len(chunks) != self.size:
            raise ValueError(f"reduce_scatter_sum needs one chunk per rank ({self.size}), got "
                             f"{len(chunks)}")
        dtypes = {getattr(c, "dtype", None) for c in chunks}
        if len(dtypes) != 1 or dtypes.pop() not in _REDUCIBLE or any(c.dim() != 1 for c in chunks):
            raise TypeError("reduce_scatter_sum takes 1-D float16, float32 or float64 tensors of "
                            f"one dtype, got {[(c.dtype, tuple(c.shape)) for c in chunks]}")
        out = self._reduce_scatter_sum(chunks)
        mine = chunks[self.rank].numel() * chunks[self.rank].element_size()
        self._count("reducescatters",
                    sum(c.numel() * c.element_size() for j, c in enumerate(chunks) if j != self.rank),
                    mine * (self.size - 1))
        return out

    def _reduce_scatter_sum(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        dtype = chunks[0].dtype
        received = self._alltoall([as_bytes(c) for c in chunks])
        out = from_bytes(received[0], dtype).clone()
        for part in received[1:]:
            out.add_(from_bytes(part, dtype))
        return out

    def allgather_async(self, payload: torch.Tensor, tag: str) -> "AllgatherHandle":
        """Start :meth:`allgather` of ``payload``; :meth:`wait` returns its result.

        Several may be in flight; ``tag`` names this one (unique among those in flight, the
        same on every rank). Backends with a progress engine of their own (Horovod's
        background thread) start it now and match it across ranks by its tag, in whatever
        order the ranks start them; the others run it inside :meth:`wait`, and every rank must
        then wait for its handles in the same order (the exchange waits in bucket order).
        """
        check_payload(payload)
        return AllgatherHandle(self, payload, tag, self._allgather_start(payload, tag))

    def wait(self, handle: "AllgatherHandle") -> list[torch.Tensor]:
        """Finish an :meth:`allgather_async`: every rank's payload, in rank order."""
        if handle.done is not None:
            raise RuntimeError(f"allgather {handle.tag!r} was already waited for")
        out = self._allgather_finish(handle)
        self._count("allgathers", handle.payload.numel() * (self.size - 1),
                    sum(p.numel() for i, p in enumerate(out) if i != self.rank))
        handle.done = True
        return out

    def progress(self) -> None:
        """Let collectives in flight move on (called from the gradient hooks while backward
        runs). A no-op for backends that progress on their own or run collectives at
        :meth:`wait`; MPI without a progress thread moves data only inside MPI calls."""

    def _allgather_start(self, payload: torch.Tensor, tag: str) -> Any:
        """Backend hook: start the collective, return what finishing it needs (default:
        nothing; it runs in :meth:`_allgather_finish`)."""
        return None

    def _allgather_finish(self, handle: "AllgatherHandle") -> list[torch.Tensor]:
        return self._allgather(handle.payload)

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise sum of a same-shaped float tensor over ranks (a new tensor, same dtype).

        float16 travels as float16 (what ``Compression.fp16`` is for); float32 and float64 too.
        """
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in _REDUCIBLE:
            raise TypeError("allreduce_sum takes a float16, float32 or float64 torch.Tensor, got "
                            f"{getattr(tensor, 'dtype', type(tensor).__name__)}")
        out = self._allreduce_sum(tensor)
        self._count_allreduce(tensor)
        return out

    def allreduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place :meth:`allreduce_sum` of a contiguous tensor (the float32 gradient path: no
        second gradient-sized buffer). Returns ``tensor``."""
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in _REDUCIBLE:
            raise TypeError("allreduce_sum_ takes a float16, float32 or float64 torch.Tensor, got "
                            f"{getattr(tensor, 'dtype', type(tensor).__name__)}")
        if not tensor.is_contiguous():
            raise ValueError("allreduce_sum_ needs a contiguous tensor")
        self._allreduce_sum_(tensor)
        self._count_allreduce(tensor)
        return tensor

    def _count_allreduce(self, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        ring = 2 * (self.size - 1) * nbytes // max(self.size, 1)
        self._count("allreduces", ring, ring)

    def _allreduce_sum_(self, tensor: torch.Tensor) -> None:
        """In place; backends with a native in-place allreduce override this copy."""
        tensor.copy_(self._allreduce_sum(tensor))

    @abc.abstractmethod
    def _allgather(self, payload: torch.Tensor) -> list[torch.Tensor]: ...

    @abc.abstractmethod
    def _alltoall(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]: ...

    @abc.abstractmethod
    def _allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...
