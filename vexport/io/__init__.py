"""I/O engines: asynchronous, callback-style I/O on file descriptors.

Every engine offers::

    engine.preadv(fd, offset, iov, done)      # iov: list of byte memoryviews
    engine.pwritev(fd, offset, iov, done)
    engine.transfer(op, fd, offset, iov, nbytes, done)  # OP_READ / OP_WRITE, all or nothing
    engine.fdatasync(fd, done)
    engine.fallocate(fd, mode, offset, length, done)   # FALLOC_FL_* below
    engine.blkdiscard(fd, offset, length, done)        # block devices
    engine.blkzeroout(fd, offset, length, done)        # block devices
    engine.plug(); engine.unplug()            # submit everything queued in between at once
    engine.close()

``transfer`` is what the block layer uses: ``done(0)`` once all ``nbytes`` moved (a
read that meets end of file zero-fills the rest), ``done(-ENOSPC)`` for a write the file
took only part of, ``done(-errno)`` on error; the kernel queue engines serve one-buffer
requests without an intermediate callback.

``done(ret)`` runs in the event loop thread, never inside the submitting call; ``ret``
is the number of bytes transferred (0 for the other operations) or ``-errno``.  A read
that hits end of file returns the short count (the caller zero-fills); other partial
transfers are resubmitted by the engine.  Buffers for reads must be writable: the kernel
queue engines raise BufferError at submission otherwise, the thread engine completes with
-EFAULT.  With O_DIRECT, alignment is the caller's responsibility (-EINVAL otherwise).

``get_engine(kind)`` returns the engine of that kind for the running loop, creating it on
first use (OSError if the kernel interface is unavailable).  ``threads`` is an io_uring
engine where io_uring is available (the kernel's io-wq threads run what would block),
else the Python thread pool (`ThreadPoolEngine`); ``VEXPORT_THREADS=pool`` forces the
pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Protocol

from vexport.kernel.aio import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE

__all__ = [
    "ENGINE_KINDS",
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FALLOC_FL_ZERO_RANGE",
    "Done",
    "IOEngine",
    "close_engines",
    "get_engine",
]

log = logging.getLogger("vexport.io")

Done = Callable[[int], object]
ENGINE_KINDS = ("threads", "native", "io_uring")


class IOEngine(Protocol):
    kind: str
    closed: bool

    def preadv(self, fd: int, offset: int, iov: list[memoryview], done: Done) -> None: ...
    def pwritev(self, fd: int, offset: int, iov: list[memoryview], done: Done) -> None: ...
    def transfer(
        self, op: int, fd: int, offset: int, iov: list[memoryview], nbytes: int, done: Done
    ) -> None: ...
    def fdatasync(self, fd: int, done: Done) -> None: ...
    def fallocate(self, fd: int, mode: int, offset: int, length: int, done: Done) -> None: ...
    def blkdiscard(self, fd: int, offset: int, length: int, done: Done) -> None: ...
    def blkzeroout(self, fd: int, offset: int, length: int, done: Done) -> None: ...
    def plug(self) -> None: ...
    def unplug(self) -> None: ...
    def close(self) -> None: ...


_engines: dict[tuple[asyncio.AbstractEventLoop, str], IOEngine] = {}


def _create(kind: str, loop: asyncio.AbstractEventLoop) -> IOEngine:
    if kind == "threads":
        # aio=threads promises blocking system calls done off the loop, on any file.
        # io_uring keeps that promise with the kernel's own worker threads (io-wq), for
        # only what would block, and without the GIL hand-offs our pool costs per
        # request; where io_uring is unavailable (an old kernel, io_uring_disabled, a
        # seccomp filter) the pool does it.  VEXPORT_THREADS=pool: always the pool.
        if os.environ.get("VEXPORT_THREADS", "io_uring") != "pool":
            from vexport.io.io_uring import IoUringEngine

            try:
                return IoUringEngine(loop)
            except OSError as e:
                log.info("aio=threads: io_uring is not available (%s), using a thread pool", e)
        from vexport.io.threads import ThreadPoolEngine

        return ThreadPoolEngine(loop)
    if kind == "native":
        from vexport.io.linux_aio import LinuxAioEngine

        return LinuxAioEngine(loop)
    if kind == "io_uring":
        from vexport.io.io_uring import IoUringEngine

        return IoUringEngine(loop)
    raise ValueError(f"unknown I/O engine kind {kind!r}")


def get_engine(kind: str) -> IOEngine:
    """The engine of ``kind`` ("threads", "native", "io_uring") for the running loop."""
    loop = asyncio.get_running_loop()
    for key in [k for k in _engines if k[0].is_closed()]:
        _engines.pop(key).close()
    engine = _engines.get((loop, kind))
    if engine is None or engine.closed:
        engine = _create(kind, loop)
        _engines[(loop, kind)] = engine
    return engine


def close_engines(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Close the engines of ``loop`` (all loops if None), e.g. at daemon shutdown."""
    for key in list(_engines):
        if loop is None or key[0] is loop:
            _engines.pop(key).close()


def forget_engines_after_fork() -> None:
    """In a forked queue worker: forget the parent's engines without closing them (their
    io contexts, threads and rings are the parent's); `get_engine` makes new ones."""
    _engines.clear()
