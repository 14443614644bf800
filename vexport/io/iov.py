"""Pure helpers on I/O vectors (lists of byte memoryviews)."""

from __future__ import annotations


def iov_length(iov: list[memoryview]) -> int:
    """Total number of bytes described by ``iov``."""
    return sum(m.nbytes for m in iov)


def iov_advance(iov: list[memoryview], n: int) -> list[memoryview]:
    """The vector that remains after the first ``n`` bytes of ``iov`` were transferred.

    Used to resubmit the rest of a partial read or write.  Segments are byte
    memoryviews (format ``B``), so slicing counts bytes.
    """
    out: list[memoryview] = []
    for m in iov:
        if n:
            ln = m.nbytes
            if n >= ln:
                n -= ln
                continue
            m = m[n:]
            n = 0
        out.append(m)
    return out
