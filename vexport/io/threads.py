"""ThreadPoolEngine (``aio=threads``): blocking syscalls on a pool of worker threads.

Theory of operation:

* Submission: ``(function, args, done)`` tuples go into a ``queue.SimpleQueue``; worker
  threads (started on first use) take them and run the blocking call (``os.preadv``,
  ``os.pwritev``, ``os.fdatasync``, ``fallocate(2)``, the block ioctls), all of which
  release the GIL.  ``plug``/``unplug`` have nothing to batch here and are no-ops.
* Partial transfers: a worker resubmits the remainder of a short read/write itself; a
  transfer of 0 bytes means end of file and the count so far is returned (a short read at
  EOF is a valid result, the caller zero-fills).  An error after a partial transfer fails
  the whole request.
* Completion: a worker appends ``(done, ret)`` to a list under a lock and writes the
  engine's eventfd only when the list went from empty to non-empty.  The event loop reads
  the eventfd and runs every queued callback: one loop wakeup for many completions.  The
  eventfd is read *before* the list is taken, so a completion added afterwards always
  causes another wakeup (at worst a spurious one with an empty list).
"""

from __future__ import annotations

import asyncio
import errno
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from vexport.io import completions
from vexport.io.iov import OP_READ, full_result, iov_advance, iov_length
from vexport.kernel import aio as kaio

Done = Callable[[int], object]

_EFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC


def _transfer(func: Callable[..., int], fd: int, offset: int, iov: list[memoryview]) -> int:
    """Run os.preadv/os.pwritev until the whole vector is done, EOF or an error."""
    try:
        n = func(fd, iov, offset)
        if n <= 0:
            return n
        want = iov_length(iov)
        total = n
        while total < want:
            iov = iov_advance(iov, n)
            n = func(fd, iov, offset + total)
            if n == 0:
                break
            total += n
        return total
    except OSError as e:
        return -(e.errno or errno.EIO)


def _preadv(fd: int, offset: int, iov: list[memoryview]) -> int:
    return _transfer(os.preadv, fd, offset, iov)


def _pwritev(fd: int, offset: int, iov: list[memoryview]) -> int:
    return _transfer(os.pwritev, fd, offset, iov)


def _fdatasync(fd: int) -> int:
    if fd < 0:  # os.fdatasync raises ValueError for these
        return -errno.EBADF
    return _call(os.fdatasync, fd)


def _call(func: Callable[..., object], *args: int) -> int:
    try:
        func(*args)
    except OSError as e:
        return -(e.errno or errno.EIO)
    return 0


class ThreadPoolEngine:
    """Callback-style I/O on file descriptors, executed by worker threads."""

    kind = "threads"

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, workers: int = 8) -> None:
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._nworkers = workers
        self._jobs: queue.SimpleQueue[tuple[Callable[..., int], tuple[Any, ...], Done] | None]
        self._jobs = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._completed: list[tuple[Done, int]] = []
        self._efd = os.eventfd(0, _EFD_FLAGS)
        self._loop.add_reader(self._efd, self._on_eventfd)
        self._jobs_out = 0  # handed to workers, completion not delivered yet
        completions.add_poller(self._poll)
        self.closed = False

    # -- submission -------------------------------------------------------------------

    def _submit(self, func: Callable[..., int], args: tuple[Any, ...], done: Done) -> None:
        if self.closed:
            self._loop.call_soon(done, -errno.EBADF)
            return
        if len(self._threads) < self._nworkers:
            t = threading.Thread(target=self._worker, name="vexport-io", daemon=True)
            t.start()
            self._threads.append(t)
        self._jobs_out += 1
        self._jobs.put((func, args, done))

    def preadv(self, fd: int, offset: int, iov: list[memoryview], done: Done) -> None:
        self._submit(_preadv, (fd, offset, iov), done)

    def pwritev(self, fd: int, offset: int, iov: list[memoryview], done: Done) -> None:
        self._submit(_pwritev, (fd, offset, iov), done)

    def transfer(
        self, op: int, fd: int, offset: int, iov: list[memoryview], nbytes: int, done: Done
    ) -> None:
        def complete(ret: int) -> None:
            done(full_result(op, iov, nbytes, ret))

        self._submit(_preadv if op == OP_READ else _pwritev, (fd, offset, iov), complete)

    def fdatasync(self, fd: int, done: Done) -> None:
        self._submit(_fdatasync, (fd,), done)

    def fallocate(self, fd: int, mode: int, offset: int, length: int, done: Done) -> None:
        self._submit(_call, (kaio.fallocate, fd, mode, offset, length), done)

    def blkdiscard(self, fd: int, offset: int, length: int, done: Done) -> None:
        self._submit(_call, (kaio.blkdiscard, fd, offset, length), done)

    def blkzeroout(self, fd: int, offset: int, length: int, done: Done) -> None:
        self._submit(_call, (kaio.blkzeroout, fd, offset, length), done)

    def plug(self) -> None:
        """Nothing to batch: each request is handed to a worker at once."""

    def unplug(self) -> None:
        """See plug()."""

    # -- workers and completion -------------------------------------------------------

    def _worker(self) -> None:
        get = self._jobs.get
        lock = self._lock
        efd = self._efd
        while True:
            job = get()
            if job is None:
                return
            func, args, done = job
            try:
                ret = func(*args)
            except (TypeError, BufferError):  # e.g. a read into a read-only buffer
                ret = -errno.EFAULT
            except Exception:  # a bug, not an I/O error: report it as EIO
                ret = -errno.EIO
            with lock:
                completed = self._completed
                completed.append((done, ret))
                signal = len(completed) == 1
            if signal:
                try:
                    os.eventfd_write(efd, 1)
                except OSError:  # closed under us during shutdown
                    return

    def _on_eventfd(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        with self._lock:
            batch = self._completed
            self._completed = []
        self._jobs_out -= len(batch)
        completions.deliver(batch)

    def _poll(self) -> bool:
        """`completions.poll` hook: with jobs out, let the workers run (a finished
        worker needs the GIL to report, which a polling loop would hold for a whole
        switch interval) and deliver what they finished."""
        if not self._jobs_out:
            return False
        if not self._completed:
            time.sleep(0)
            if not self._completed:
                return False
        self._on_eventfd()
        return True

    def close(self) -> None:
        """Stop the workers after the queued jobs ran; undelivered callbacks are dropped."""
        if self.closed:
            return
        self.closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        self._threads.clear()
        completions.remove_poller(self._poll)
        self._loop.remove_reader(self._efd)
        os.close(self._efd)
        self._completed = []
