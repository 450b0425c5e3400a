"""Device dispatch of the two passes: torch tensors in, the CPU or GPU kernels underneath.

On CPU the kernels work on the tensors' memory through numpy views (no copies). On CUDA the
Triton kernels run on the device; the packed bytes and norms, which are the payload's content,
are copied to the host for the entropy stage and the collective, and a received payload's
packed bytes and norms are copied to the device for decoding. The gradient itself stays on the
device.

Invalid packed values (outside the sender's alphabet: a corrupted or hostile payload) are
counted by the decode kernels. Pass an :class:`InvalidValues` to :func:`dequantize_into` to
gather the counts of a whole round and check them once (:meth:`InvalidValues.check`): on CUDA
the counts stay on the device until then, so decoding never waits for the GPU.

Example::

    >>> import torch
    >>> from qoda_hvd.kernels import level_table, stream_key
    >>> from qoda_hvd.kernels.dispatch import InvalidValues, quantize_pack, dequantize_into
    >>> t = level_table(torch.linspace(0, 1, 8))
    >>> x = torch.randn(5000)
    >>> packed, norms = quantize_pack(x, t, 1024, "l2", stream_key(0, 0, 0))
    >>> out = torch.zeros(5000)
    >>> dequantize_into(packed, norms, t, 1024, out, accumulate=False)  # invalid values found
    0
    >>> gap = torch.from_numpy(norms).repeat_interleave(1024)[:5000] / 7  # one level step
    >>> bool(((out - x).abs() <= gap * 1.0001).all())
    True
    >>> invalid = InvalidValues()
    >>> dequantize_into(packed, norms, t, 1024, out, accumulate=True, invalid=invalid,
    ...                 label="payload from rank 1, segment of type 0")
    >>> invalid.check()  # once per round; raises qoda_hvd.PayloadError if any was found
"""
from __future__ import annotations

import numpy as np
import torch

from qoda_hvd.errors import PayloadError
from qoda_hvd.kernels import cpu
from qoda_hvd.kernels.tables import LevelTable

__all__ = ["quantize_pack", "dequantize_into", "InvalidValues", "NonFiniteError"]


class NonFiniteError(ValueError):
    """A bucket's norm is NaN or Inf (the tensor holds NaN/Inf, or its L2 sum overflows)."""


class InvalidValues:
    """Counts of packed values outside the alphabet over several decodes, checked once.

    Each :func:`dequantize_into` given this object adds one record (its ``label`` and the
    alphabet size). CPU counts are host integers; CUDA counts are slots of one int64 device
    tensor per device that the decode kernels add to, so nothing waits for the GPU until
    :meth:`check` reads them all back at once (one host sync per device and round).

    Example::

        >>> iv = InvalidValues()
        >>> iv.record_host(0, "payload from rank 0, segment of type 1", alphabet=15)
        >>> iv.check()
        >>> iv.record_host(3, "payload from rank 1, segment of type 0", alphabet=15)
        >>> iv.check()
        Traceback (most recent call last):
        ...
        qoda_hvd.errors.PayloadError: payload from rank 1, segment of type 0: 3 packed value(s) outside the alphabet of 15
    """

    def __init__(self) -> None:
        self._labels: list[tuple[str, int]] = []
        self._where: list[tuple[str, int]] = []  # ("host", count) or (device key, slot)
        self._slots: dict[str, torch.Tensor] = {}  # device -> int64 counters, grown by doubling
        self._used: dict[str, int] = {}

    def record_host(self, count: int, label: str, alphabet: int) -> None:
        """Record a count known on the host (the CPU kernels')."""
        self._labels.append((label, alphabet))
        self._where.append(("host", int(count)))

    def device_slot(self, device: torch.device, label: str, alphabet: int) -> torch.Tensor:
        """A zeroed one-element int64 counter on ``device`` for one decode to add to."""
        key = str(device)
        used = self._used.get(key, 0)
        buf = self._slots.get(key)
        if buf is None or used == buf.numel():
            grown = torch.zeros(max(64, 2 * used), dtype=torch.int64, device=device)
            if buf is not None:
                grown[:used] = buf
            self._slots[key] = buf = grown
        self._used[key] = used + 1
        self._labels.append((label, alphabet))
        self._where.append((key, used))
        return buf[used:used + 1]

    def check(self) -> None:
        """Raise :class:`qoda_hvd.PayloadError` naming the first record with invalid values;
        then (or when there is none) start over empty."""
        try:
            read = {key: self._slots[key][:used].cpu().tolist() for key, used in self._used.items()
                    if used}
            for (label, alphabet), (key, v) in zip(self._labels, self._where):
                count = v if key == "host" else read[key][v]
                if count:
                    raise PayloadError(f"{label}: {count} packed value(s) outside the alphabet "
                                       f"of {alphabet}")
        finally:
            self.reset()

    def reset(self) -> None:
        """Forget every record (the device counters are zeroed for reuse, without a sync)."""
        for key, used in self._used.items():
            if used:
                self._slots[key][:used].zero_()
        self._used.clear()
        self._labels.clear()
        self._where.clear()


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array -> device tensor without waiting for the device: through pinned memory
    (a plain ``.to(device)`` from pageable memory synchronizes the stream)."""
    return torch.from_numpy(np.ascontiguousarray(a)).pin_memory().to(device, non_blocking=True)


def quantize_pack(x: torch.Tensor, table: LevelTable, bucket_size: int, norm: str,
                  key: tuple[int, int], *, base: int = 0, nonfinite: str = "raise",
                  threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Quantize + pack a flat float32 tensor; host numpy ``(packed, norms)``.

    Args:
        x: float32, 1-D, contiguous, CPU or CUDA.
        table, bucket_size, norm, key, base: see :func:`qoda_hvd.kernels.cpu.quantize_pack`.
        nonfinite: ``"raise"`` (:class:`NonFiniteError`) or ``"propagate"`` (NaN/Inf norms
            travel, their buckets' symbols are zero, so the receiver sees NaN there).
        threads: CPU threads (default: torch's setting, capped by the cores per rank on the node).
    """
    if x.is_cuda:
        from qoda_hvd.kernels import gpu

        packed_d, norms_d, _ = gpu.quantize_pack(x, table, bucket_size, norm, key, base=base)
        packed, norms = packed_d.cpu().numpy(), norms_d.cpu().numpy()
        bad = int((~np.isfinite(norms)).sum())  # on the host copy: no second sync
    else:
        packed, norms, bad = cpu.quantize_pack(x.detach().numpy(), table, bucket_size, norm, key,
                                               base=base, threads=threads)
    if bad and nonfinite == "raise":
        first = int(np.flatnonzero(~np.isfinite(norms))[0])
        raise NonFiniteError(
            f"tensor contains NaN or Inf values (bucket {first} of size {bucket_size}, {bad} bad "
            "bucket(s)); pass nonfinite='propagate' to send them as NaN instead (e.g. under AMP "
            "loss scaling)" + ("; with norm='l2' this also happens when a bucket's sum of squares "
                               "overflows float32 (|values| above ~1e19)" if norm == "l2" else ""))
    return packed, norms


def dequantize_into(packed: np.ndarray, norms: np.ndarray, table: LevelTable, bucket_size: int,
                    out: torch.Tensor, *, accumulate: bool, threads: int | None = None,
                    invalid: InvalidValues | None = None, label: str = "payload") -> int | None:
    """``out (+)= sign * level * norm``; counts the packed values outside the alphabet.

    Args:
        packed, norms: host numpy arrays (a payload's content).
        table, bucket_size: the sender's levels and buckets.
        out: float32, 1-D, contiguous, CPU or CUDA (written in place).
        accumulate: add instead of overwrite.
        threads: CPU threads (default: torch's setting, capped by the cores per rank on the node).
        invalid: where the count goes (see :class:`InvalidValues`): then nothing is returned and
            nothing waits for the GPU; :meth:`InvalidValues.check` raises later.
        label: names this decode in that error (e.g. ``"payload from rank 1, segment of type
            0"``).

    Returns:
        Without ``invalid``: the count (0 for an honest payload; on CUDA reading it waits for
        the GPU). With ``invalid``: None.
    """
    if out.is_cuda:
        from qoda_hvd.kernels import gpu

        dev = out.device
        slot = None if invalid is None else invalid.device_slot(dev, label,
                                                                2 * table.num_levels - 1)
        bad = gpu.dequantize_into(_to_device(packed, dev), _to_device(norms, dev), table,
                                  bucket_size, out, accumulate=accumulate, bad=slot)
        return int(bad.item()) if invalid is None else None
    count = cpu.dequantize_into(packed, norms, table, bucket_size, out.numpy(),
                                accumulate=accumulate, threads=threads)
    if invalid is None:
        return count
    invalid.record_host(count, label, 2 * table.num_levels - 1)
    return None
