"""Common machinery of the kernel-queue engines (Linux AIO and io_uring).

Theory of operation:

* A fixed number of *slots* (the queue depth) is the unit of the in-flight table: slot
  ``i`` owns the kernel control block ``i`` (an iocb or an SQE's ``user_data``) and
  ``self._inflight[i]`` holds ``(done, op, fd, offset, arg, expected, acc, keepalive,
  full)`` until the completion arrives.  ``keepalive`` holds the cffi views of the caller's
  buffers (and the iovec array), so the memory the kernel uses stays pinned.
* A request is prepared into its slot at once and the slot queued for submission.  The
  batch is submitted by ``_flush``, which runs once per event loop iteration (scheduled by
  ``loop.call_soon`` when the first request of a batch arrives), at ``unplug``, and after
  each round of completions.  With no free slot, requests wait in a FIFO and are prepared
  as completions free slots.
* Completions are read when the engine's eventfd (registered with ``loop.add_reader``)
  fires; callbacks therefore run in the loop thread, never inside a submission call.
* Partial transfers: a read or write that moved fewer bytes than asked but more than zero
  is resubmitted for the remainder (buffered io_uring reads can legitimately do that).  A
  transfer of 0 bytes means EOF: the request completes with the count so far, or for
  ``transfer`` (``full``) as `iov.full_result` says.
* ``transfer`` (the block layer's reads and writes) has a fast path in each subclass for
  the common case, one buffer and a free slot: the control block is filled right there,
  without `_queue` and `_prep`, and ``done`` gets 0 or -errno without a wrapper.
* Operations the kernel queue cannot do are handed to a small ThreadPoolEngine.
"""

from __future__ import annotations

import asyncio
import errno
from collections import deque
from collections.abc import Callable
from typing import Any

from vexport.io import completions
from vexport.io.iov import OP_READ, OP_WRITE, full_result, iov_advance
from vexport.io.threads import ThreadPoolEngine

Done = Callable[[int], object]

__all__ = ["OP_FALLOCATE", "OP_READ", "OP_SYNC", "OP_WRITE", "SlotEngine"]

OP_SYNC = 2
OP_FALLOCATE = 3


IOV_INLINE = 16


class SlotEngine:
    """Base class: slot table, waiting FIFO, plug/flush, completion dispatch."""

    kind = ""
    _ffi: Any = None  # the subclass's cffi FFI, whose "struct iovec" the kernel reads
    _char_array: Any = None  # its ffi.typeof("char[]"), resolved once
    _iovecs: list[Any]

    def _pin_vector(self, slot: int, iov: list[memoryview], writable: bool) -> tuple[int, Any]:
        """Fill the slot's ``struct iovec`` array for ``iov`` (allocated on first use,
        per request only beyond IOV_INLINE segments); return (bytes, keepalive) where
        keepalive[0] is the array and the rest pin the buffers."""
        ffi = self._ffi
        n = len(iov)
        if n <= IOV_INLINE:
            vec = self._iovecs[slot]
            if vec is None:
                vec = self._iovecs[slot] = ffi.new("struct iovec[]", IOV_INLINE)
        else:
            vec = ffi.new("struct iovec[]", n)
        keep = [vec]
        expect = 0
        pin = ffi.from_buffer
        char_array = self._char_array
        for i, m in enumerate(iov):
            b = pin(char_array, m, writable)
            keep.append(b)
            v = vec[i]
            v.iov_base = b
            ln = m.nbytes
            v.iov_len = ln
            expect += ln
        return expect, keep

    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int) -> None:
        self._loop = loop
        self._depth = depth
        self._free = list(range(depth - 1, -1, -1))
        self._inflight: list[tuple[Any, ...] | None] = [None] * depth
        self._waiting: deque[tuple[int, int, int, Any, Done, int, bool]] = deque()
        self._plugged = 0
        self._flush_scheduled = False
        self._helper: ThreadPoolEngine | None = None
        self.closed = False

    # -- subclass interface ----------------------------------------------------------

    def _prep(self, slot: int, op: int, fd: int, offset: int, arg: Any) -> tuple[int, Any]:
        """Fill the control block of ``slot``; return (expected bytes, keepalive)."""
        raise NotImplementedError

    def _submit(self) -> None:
        """Hand every prepared control block to the kernel (as far as it accepts)."""
        raise NotImplementedError

    # -- public API ------------------------------------------------------------------

    def preadv(self, fd: int, offset: int, iov: list[memoryview], done: Done) -> None:
        self._queue(OP_READ, fd, offset, iov, done, 0)

    def pwritev(self, fd: int, offset: int, iov: list[memoryview], done: Done) -> None:
        self._queue(OP_WRITE, fd, offset, iov, done, 0)

    def transfer(
        self, op: int, fd: int, offset: int, iov: list[memoryview], nbytes: int, done: Done
    ) -> None:
        """Read (OP_READ) or write ``nbytes`` (the length of ``iov``); ``done(0)`` or
        ``done(-errno)`` as `iov.full_result` says.  Subclasses add the fast path."""
        self._queue(op, fd, offset, iov, done, 0, True)

    def fdatasync(self, fd: int, done: Done) -> None:
        self._queue(OP_SYNC, fd, 0, None, done, 0)

    def fallocate(self, fd: int, mode: int, offset: int, length: int, done: Done) -> None:
        self._threads().fallocate(fd, mode, offset, length, done)

    def blkdiscard(self, fd: int, offset: int, length: int, done: Done) -> None:
        self._threads().blkdiscard(fd, offset, length, done)

    def blkzeroout(self, fd: int, offset: int, length: int, done: Done) -> None:
        self._threads().blkzeroout(fd, offset, length, done)

    def plug(self) -> None:
        self._plugged += 1

    def unplug(self) -> None:
        if self._plugged > 0:
            self._plugged -= 1
            if not self._plugged:
                self._flush()

    # -- internals -------------------------------------------------------------------

    def _threads(self) -> ThreadPoolEngine:
        if self._helper is None:
            self._helper = ThreadPoolEngine(self._loop, workers=4)
        return self._helper

    def _queue(
        self, op: int, fd: int, offset: int, arg: Any, done: Done, acc: int, full: bool = False
    ) -> None:
        if self.closed:
            self._loop.call_soon(done, -errno.EBADF)
            return
        if self._free and not self._waiting:
            slot = self._free.pop()
            try:
                expect, keep = self._prep(slot, op, fd, offset, arg)
            except BaseException:
                self._free.append(slot)
                raise
            self._inflight[slot] = (done, op, fd, offset, arg, expect, acc, keep, full)
        else:
            self._waiting.append((op, fd, offset, arg, done, acc, full))
        if not self._flush_scheduled and not self._plugged:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        self._flush_scheduled = True
        self._loop.call_soon(self._flush)

    def _fill_from_waiting(self) -> None:
        waiting = self._waiting
        free = self._free
        while waiting and free:
            op, fd, offset, arg, done, acc, full = waiting.popleft()
            slot = free.pop()
            try:
                expect, keep = self._prep(slot, op, fd, offset, arg)
            except Exception as e:  # e.g. a read-only buffer for a read: fail the request
                free.append(slot)
                self._loop.call_soon(done, -errno.EFAULT)
                self._loop.call_exception_handler({"message": "bad I/O request", "exception": e})
                continue
            self._inflight[slot] = (done, op, fd, offset, arg, expect, acc, keep, full)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self.closed:
            if self._waiting:
                self._fill_from_waiting()
            self._submit()

    def _fail_slot(self, slot: int, ret: int) -> None:
        """Complete a request the kernel refused at submission time (deferred)."""
        entry = self._inflight[slot]
        self._inflight[slot] = None
        self._free.append(slot)
        if entry is not None:
            self._loop.call_soon(entry[0], ret)

    _completing = False  # inside _deliver: a poll or submission meanwhile does not reap

    def _deliver(self, events: list[tuple[int, int]]) -> None:
        """Dispatch ``(slot, result)`` pairs, resubmitting partial transfers.  While the
        callbacks run, the engine's own ring polls (after a submission, or
        `completions.poll`) do not deliver nested."""
        self._completing = True
        try:
            inflight = self._inflight
            free = self._free
            calls: list[tuple[Done, int]] = []
            for slot, res in events:
                entry = inflight[slot]
                inflight[slot] = None
                free.append(slot)
                if entry is None:
                    continue
                done, op, fd, offset, arg, expect, acc, _keep, full = entry
                if res >= expect:  # everything (reads and writes), or any other op's success
                    calls.append((done, 0 if full else res + acc))
                    continue
                if res > 0 and op <= OP_WRITE:
                    rest = iov_advance(arg, res)
                    self._waiting.append((op, fd, offset + res, rest, done, acc + res, full))
                    continue
                if full:
                    calls.append((done, full_result(op, arg, expect, res)))
                else:
                    calls.append((done, res + acc if res >= 0 else res))
            if self._waiting:
                self._fill_from_waiting()
            completions.deliver(calls)
            if not self._plugged:
                self._flush()
        finally:
            self._completing = False

    def _close_helper(self) -> None:
        self.closed = True
        if self._helper is not None:
            self._helper.close()
            self._helper = None
        self._waiting.clear()
