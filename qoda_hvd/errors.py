"""Exceptions raised by qoda_hvd."""
from __future__ import annotations

__all__ = ["PayloadError"]


class PayloadError(ValueError):
    """A compressed payload is truncated, corrupted or inconsistent.

    Raised by the decoder instead of crashing, hanging, allocating what the payload merely claims,
    or returning a silently wrong tensor. The message says what was wrong and where.

    Example::

        >>> from qoda_hvd import PayloadError
        >>> from qoda_hvd.coding import decode
        >>> try:
        ...     decode(b"not a payload")
        ... except PayloadError as e:
        ...     print("rejected:", e)
        rejected: payload is 13 bytes, shorter than the 28-byte minimum
    """
