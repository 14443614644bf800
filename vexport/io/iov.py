"""Pure helpers on I/O vectors (lists of byte memoryviews)."""

from __future__ import annotations

import errno


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


# Directions of `transfer` (engine.transfer(op, fd, offset, iov, nbytes, done)).
OP_READ = 0
OP_WRITE = 1


def iov_zero_from(iov: list[memoryview], n: int) -> None:
    """Zero every byte of ``iov`` after the first ``n`` (a read that met end of file)."""
    for m in iov:
        ln = m.nbytes
        if n >= ln:
            n -= ln
            continue
        m[n:] = bytes(ln - n)
        n = 0


def full_result(op: int, iov: list[memoryview], nbytes: int, ret: int) -> int:
    """What ``transfer`` reports for a transfer of ``nbytes`` that moved ``ret`` bytes
    (or failed with ``ret`` = -errno): 0 when everything moved; a read that met end of
    file zero-fills the rest of ``iov`` and succeeds; a write the file took only part of
    fails with -ENOSPC."""
    if ret < 0:
        return ret
    if ret >= nbytes:
        return 0
    if op == OP_READ:
        iov_zero_from(iov, ret)
        return 0
    return -errno.ENOSPC
