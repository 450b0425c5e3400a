"""The link model behind ``coding="auto"``: what the link carries and what the rans coder costs.

Entropy coding pays only while the bytes it saves take longer on the link than coding and
decoding them. Without a configured ``bandwidth`` the rate is the one this exchange measured on
its own collectives; the rans speeds are measured on the calls that used it. Before the first
measurement the fastest codec (fixed-width symbols) is the answer.
"""
from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["LinkModel"]

#: Samples smaller than this (bytes) say more about latency than about the rate.
_MIN_SAMPLE = 1 << 16


class LinkModel:
    """Running estimates of the link rate and of the rans coder's speed, per rank.

    Args:
        bandwidth: link bytes/s when the user knows it (then it is not measured).

    Attributes:
        measured_bandwidth: bytes/s measured on this exchange's collectives (None before one).
        rans_ns: ns per packed byte to encode and to decode with rans (replaced by measurements).

    Example::

        >>> link = LinkModel()
        >>> link.costs(peers=1)[0]            # nothing measured yet: the fastest codec
        inf
        >>> link.observe_link(nbytes=1 << 20, seconds=0.01)
        >>> round(link.costs(peers=1)[0] / 1e6)
        105
    """

    def __init__(self, bandwidth: Optional[float] = None) -> None:
        self.bandwidth = bandwidth
        self.measured_bandwidth: Optional[float] = None
        self.rans_ns = [4.0, 4.0]

    def costs(self, peers: int) -> tuple[float, Optional[dict]]:
        """``(bandwidth, speeds)`` for :func:`qoda_hvd.coding.encode`: the configured or measured
        rate, and the per-byte codec speeds. A payload received and decoded by ``peers`` ranks
        (allgather) is seen as a ``peers`` times slower link and decoder."""
        bw = self.bandwidth if self.bandwidth is not None else self.measured_bandwidth
        if bw is None:
            return float("inf"), None
        peers = max(1, peers)
        return bw / peers, {"fixed": (0.0, 0.0), "rans": (self.rans_ns[0], self.rans_ns[1] * peers)}

    def observe_link(self, nbytes: int, seconds: float) -> None:
        """A collective moved ``nbytes`` into this rank in ``seconds``."""
        if nbytes > _MIN_SAMPLE and seconds > 0:
            rate = nbytes / seconds
            m = self.measured_bandwidth
            self.measured_bandwidth = rate if m is None else 0.7 * m + 0.3 * rate

    def observe_rans(self, which: int, seconds: float, segments: Sequence, nbytes: int) -> None:
        """A call that encoded (``which=0``) or decoded (``1``) ``segments`` into/from a payload
        of ``nbytes`` took ``seconds``; counted only when rans did most of the work."""
        packed = sum(-(-s.numel * s.width // 8) for s in segments)
        if packed > _MIN_SAMPLE and nbytes < 0.97 * packed:
            ns = seconds * 1e9 / packed
            # what the core can do: a faster call counts at once, a slower one (the core shared
            # with backward, or with a collective's polling thread) only drifts the estimate up
            old = self.rans_ns[which]
            self.rans_ns[which] = min(ns, 0.9 * old + 0.1 * ns)
