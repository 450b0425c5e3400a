"""The flat reductions: every rank's typed buffers -> their (averaged) sum, in place, bit-identical.

Each strategy takes the per-type buffers (or bucket-aligned slices of them) and the float32 raw
buffer of one rank, runs exactly the collectives named below over one communicator, and leaves
``(1/divisor) sum_k Q(g_k)`` in the same buffers on every rank, summed in rank order so every
rank holds the same bits.

- :func:`allgather_reduce`: ONE allgather of each rank's payload; every rank decodes all K in
  rank order (its own from its packed symbols: the coding is lossless). The exact average of the
  ``Q(g_k)`` (the ``1/K`` folded into the decode: each norm scaled, no pass of its own); received bytes grow like ``(K-1) * compressed(d)``.
- :func:`scatter_gather_reduce`: each type cut into K bucket-aligned chunks; chunk j of every
  rank goes to rank j (ONE alltoall), rank j decodes and sums them, re-quantizes the sum with
  independent noise, and the K reduced chunks are allgathered (ONE allgather). About
  ``2 (K-1)/K * compressed(d)`` bytes per rank whatever K; unbiased (both quantizations are).

The two-level strategy (:mod:`qoda_hvd.comm.hierarchical`) runs one of these over the
cross-node communicator on each local rank's shard.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch

from qoda_hvd.comm.base import Communicator
from qoda_hvd.comm.codec import LayerwiseCodec, add_scaled
from qoda_hvd.comm.stats import ExchangeStats
from qoda_hvd.kernels import PHASE_QUANTIZE, PHASE_REQUANTIZE

__all__ = ["STRATEGIES", "allgather_reduce", "choose_strategy", "scatter_gather_reduce"]

#: The flat strategies of :class:`~qoda_hvd.comm.exchange.LayerwiseExchange`.
STRATEGIES = ("allgather", "scatter_gather")


def choose_strategy(strategy: str, size: int) -> str:
    """Resolve ``"auto"``: allgather up to 2 ranks, scatter_gather beyond.

    At K = 2 both move the same bytes and allgather is exact with one collective; from K = 3 on
    allgather receives ``K - 1`` compressed gradients per rank against about 2 for scatter_gather.

    Example::

        >>> choose_strategy("auto", 2), choose_strategy("auto", 8)
        ('allgather', 'scatter_gather')
    """
    if strategy == "auto":
        return "allgather" if size <= 2 else "scatter_gather"
    if strategy not in STRATEGIES:
        raise ValueError(f"exchange must be one of auto, {', '.join(STRATEGIES)}, got {strategy!r}")
    return strategy


def _bounds(total: int, parts: int) -> list[int]:
    return [(j * total) // parts for j in range(parts + 1)]


def _scale(divisor: Optional[int]) -> float:
    """The factor an average folds into the decode (1 for a sum)."""
    return 1.0 if divisor is None else 1.0 / divisor


def allgather_reduce(codec: LayerwiseCodec, comm: Communicator, typed: Sequence[torch.Tensor],
                     raw: torch.Tensor, stats: ExchangeStats, divisor: Optional[int] = None,
                     bases: Optional[Sequence[int]] = None) -> None:
    """ONE allgather of this rank's payload; every rank decodes all of them in rank order.

    Args:
        codec: the codec of this layout (its ``step`` set for this call).
        comm: the ranks to reduce over.
        typed: per layer type, the buffer (or slice) to reduce in place.
        raw: the float32 values that travel uncompressed (may be empty), reduced in place.
        stats: where the phase times and encoded bytes are counted.
        divisor: the sum is divided by it (``comm.size`` for an average; None: the sum).
        bases: per type, the index of ``typed[t][0]`` in type t's whole buffer (a multiple of
            its bucket size; the noise counter). Default: zeros.

    Example::

        >>> from qoda_hvd.comm import LocalGroup
        >>> from qoda_hvd.quant import LayerwiseQuantizer, LayerTyping
        >>> typing = LayerTyping({"w": 0}, ("dense",), frozenset(), {"w": 1024})
        >>> codec = LayerwiseCodec(LayerwiseQuantizer(typing, bits=8), [1024], rank=0)
        >>> g, raw = torch.ones(1024), torch.tensor([2.0])
        >>> allgather_reduce(codec, LocalGroup(1)[0], [g], raw, ExchangeStats(), divisor=1)
        >>> raw.tolist(), round(float(g.mean()), 2)      # unbiased: Q(g) averages to g
        ([2.0], 1.0)
    """
    st, me = stats, comm.rank
    bases = bases if bases is not None else [0] * len(typed)
    t0 = time.perf_counter()
    segs = [codec.quantize(tid, b, bases[tid], PHASE_QUANTIZE) for tid, b in enumerate(typed)]
    t1 = time.perf_counter()
    payload = codec.encode(segs, raw, peers=comm.size - 1)
    t2 = time.perf_counter()
    payloads = comm.allgather(payload)
    t3 = time.perf_counter()
    codec.link.observe_link(sum(p.numel() for p in payloads) - payload.numel(), t3 - t2)
    own_raw = raw.clone()  # small tensors only
    scale = _scale(divisor)  # folded into the decode: no pass of its own over the buffers
    for sender, p in enumerate(payloads):  # rank order on every rank: identical sums
        first = sender == 0
        if sender == me:
            # The coding is lossless: our own payload holds exactly these packed symbols and
            # norms, so add them without entropy-decoding it (same values, same order).
            for seg, buf in zip(segs, typed):
                if seg.numel:
                    codec.dequantize(seg, buf, not first, sender, scale=scale)
            add_scaled(raw, own_raw, scale, not first)
        else:
            codec.decode_into(p, sender, typed, raw, accumulate=not first, scale=scale)
    codec.check_decoded()
    st.quantize_s += t1 - t0
    st.encode_s += t2 - t1
    st.exchange_s += t3 - t2
    st.decode_s += time.perf_counter() - t3
    st.encoded_bytes += payload.numel()


def chunk_bounds(codec: LayerwiseCodec, typed: Sequence[torch.Tensor], raw: torch.Tensor,
                 parts: int) -> tuple[list[list[int]], list[int]]:
    """Element bounds of ``parts`` chunks of each type, cut at its norm-bucket boundaries, and
    of the raw buffer (cut anywhere).

    Example::

        >>> from qoda_hvd.quant import LayerwiseQuantizer, LayerTyping
        >>> typing = LayerTyping({"w": 0}, ("dense",), frozenset(), {"w": 5000})
        >>> codec = LayerwiseCodec(LayerwiseQuantizer(typing, bits=4), [5000], rank=0)
        >>> chunk_bounds(codec, [torch.zeros(5000)], torch.zeros(3), 2)
        ([[0, 2048, 5000]], [0, 1, 3])
    """
    elem_b = []
    for tid, buf in enumerate(typed):
        bs = codec.lq.quantizer(tid).bucket_size
        nb = -(-buf.numel() // bs)
        elem_b.append([min(x * bs, buf.numel()) for x in _bounds(nb, parts)])
    return elem_b, _bounds(raw.numel(), parts)


def scatter_gather_reduce(codec: LayerwiseCodec, comm: Communicator,
                          typed: Sequence[torch.Tensor], raw: torch.Tensor, stats: ExchangeStats,
                          divisor: Optional[int] = None,
                          bases: Optional[Sequence[int]] = None) -> None:
    """ONE alltoall of bucket-aligned chunks, a reduce and re-quantize of this rank's chunk,
    ONE allgather of the reduced chunks (arguments as :func:`allgather_reduce`)."""
    st, k, me = stats, comm.size, comm.rank
    bases = bases if bases is not None else [0] * len(typed)
    elem_b, raw_b = chunk_bounds(codec, typed, raw, k)
    t0 = time.perf_counter()
    # Chunk j of each type, quantized alone: the counter is the coordinate's index in the
    # type's buffer, so this draws exactly what quantizing the whole buffer would.
    parts = [[codec.quantize(tid, buf[e[j]:e[j + 1]], bases[tid] + e[j], PHASE_QUANTIZE)
              for tid, (buf, e) in enumerate(zip(typed, elem_b))] for j in range(k)]
    t1 = time.perf_counter()
    chunks = [codec.encode(part, raw[raw_b[j]:raw_b[j + 1]]) for j, part in enumerate(parts)]
    t2 = time.perf_counter()
    received = comm.alltoall(chunks)
    t3 = time.perf_counter()
    codec.link.observe_link(sum(c.numel() for c in received) - received[me].numel(), t3 - t2)
    # Reduce my chunk in place inside the buffers (my slice of them is mine to use).
    mine = [buf[e[me]:e[me + 1]] for buf, e in zip(typed, elem_b)]
    raw_mine = raw[raw_b[me]:raw_b[me + 1]]
    for sender, p in enumerate(received):
        codec.decode_into(p, sender, mine, raw_mine, accumulate=sender > 0,
                          scale=_scale(divisor))
    codec.check_decoded()  # before the reduced chunk is quantized and sent on
    t4 = time.perf_counter()
    # The reduced chunk is quantized again with noise independent of the first round's.
    requant = [codec.quantize(tid, m, bases[tid] + elem_b[tid][me], PHASE_REQUANTIZE)
               for tid, m in enumerate(mine)]
    t5 = time.perf_counter()
    reduced = codec.encode(requant, raw_mine)
    t6 = time.perf_counter()
    gathered = comm.allgather(reduced)
    t7 = time.perf_counter()
    for sender, p in enumerate(gathered):  # every rank decodes the same K payloads
        outs = [buf[e[sender]:e[sender + 1]] for buf, e in zip(typed, elem_b)]
        codec.decode_into(p, sender, outs, raw[raw_b[sender]:raw_b[sender + 1]], accumulate=False)
    codec.check_decoded()
    t8 = time.perf_counter()
    st.quantize_s += (t1 - t0) + (t5 - t4)
    st.encode_s += (t2 - t1) + (t6 - t5)
    st.exchange_s += (t3 - t2) + (t7 - t6)
    st.decode_s += (t4 - t3) + (t8 - t7)
    st.encoded_bytes += sum(c.numel() for c in chunks)


#: Strategy name -> reduction.
REDUCTIONS = {"allgather": allgather_reduce, "scatter_gather": scatter_gather_reduce}
