"""IoUringEngine (``aio=io_uring``): SQ/CQ rings shared with the kernel, plus an eventfd.

Theory of operation (ring layout and memory ordering: see vexport.kernel.io_uring):

* ``io_uring_setup(depth)`` creates the ring (OSError with a clear message when the
  kernel lacks io_uring or ``kernel.io_uring_disabled`` forbids it); the rings are mapped
  and an eventfd is registered with ``IORING_REGISTER_EVENTFD`` and ``loop.add_reader``.
* ``sq_array[i] = i`` is set once, so the SQE used by a request is simply the one at the
  local tail.  A request writes its SQE (single segment: ``IORING_OP_READ``/``WRITE`` on
  the buffer; vectors: ``READV``/``WRITEV`` on a per-slot iovec array; ``FSYNC`` with
  ``IORING_FSYNC_DATASYNC``; ``FALLOCATE``) and advances the local tail.  ``_submit``
  publishes the tail and makes one ``io_uring_enter`` for everything not yet consumed.
* In-flight requests are limited to the number of slots (= SQ entries <= CQ entries), so
  neither the SQ ring nor the CQ ring can overflow.
* On an eventfd wakeup every CQE between our head and the kernel's tail is taken, the
  head published, then the callbacks run.  The CQ ring is also read right after each
  ``io_uring_enter`` (requests served from the page cache complete inside the call) and
  whenever a device polls (`completions.poll`), as the Linux AIO engine does.

Discard/zeroout ioctls on block devices go to a thread pool.
"""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Any

from vexport.io import completions
from vexport.io.slots import OP_FALLOCATE, OP_READ, OP_SYNC, SlotEngine
from vexport.kernel import io_uring as kur

_ffi = kur.ffi
_CHAR_ARRAY = _ffi.typeof("char[]")  # resolved once: from_buffer("char[]") parses the text
_from_buffer = getattr(getattr(_ffi, "_backend", None), "from_buffer", _ffi.from_buffer)
_RW_OPCODES = (kur.IORING_OP_READ, kur.IORING_OP_WRITE)  # by OP_READ, OP_WRITE
_MASK32 = 0xFFFFFFFF


class IoUringEngine(SlotEngine):
    kind = "io_uring"
    _ffi = _ffi
    _char_array = _CHAR_ARRAY

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, depth: int = 256) -> None:
        loop = loop if loop is not None else asyncio.get_running_loop()
        self._ring_fd, params = kur.io_uring_setup(depth)
        self._efd = -1
        self._ring: kur.RingMapping | None = None
        try:
            self._ring = ring = kur.RingMapping(self._ring_fd, params)
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            kur.io_uring_register_eventfd(self._ring_fd, self._efd)
        except OSError:
            self._release()
            raise
        super().__init__(loop, ring.sq_entries)
        self._enter = kur.Enter(self._ring_fd)
        # One pointer per SQE, made once (indexing the array makes a new cdata each time).
        self._sqe_ptrs = [ring.sqes + i for i in range(ring.sq_entries)]
        self._sq_mask = ring.sq_mask
        self._sq_head = ring.sq_head
        self._sq_ktail = ring.sq_tail
        self._tail = int(ring.sq_tail[0])
        self._cq_head = ring.cq_head
        self._cq_ktail = ring.cq_tail
        self._cq_mask = ring.cq_mask
        self._cqes = ring.cqes
        self._head = int(ring.cq_head[0])
        for i in range(ring.sq_entries):
            ring.sq_array[i] = i
        self._iovecs: list[Any] = [None] * ring.sq_entries
        self._submitted = 0  # requests handed to the kernel and not completed
        loop.add_reader(self._efd, self._on_eventfd)
        completions.add_poller(self._poll_cq)

    def _release(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1
        if self._ring_fd >= 0:
            os.close(self._ring_fd)
            self._ring_fd = -1

    def fallocate(self, fd: int, mode: int, offset: int, length: int, done: Any) -> None:
        self._queue(OP_FALLOCATE, fd, offset, (mode, length), done, 0)

    def transfer(
        self, op: int, fd: int, offset: int, iov: list[memoryview], nbytes: int, done: Any
    ) -> None:
        free = self._free
        if not free or len(iov) != 1 or self._waiting or self.closed:
            self._queue(op, fd, offset, iov, done, 0, True)
            return
        # The fast path: one buffer, a free slot (what _queue and _prep would do).
        slot = free.pop()
        try:
            keep = _from_buffer(_CHAR_ARRAY, iov[0], op == OP_READ)
        except BaseException:
            free.append(slot)
            raise
        tail = self._tail
        sqe = self._sqe_ptrs[tail & self._sq_mask]
        sqe.opcode = _RW_OPCODES[op]
        sqe.fd = fd
        sqe.off = offset
        sqe.addr = keep
        sqe.len = nbytes
        sqe.rw_flags = 0
        sqe.user_data = slot
        self._tail = (tail + 1) & _MASK32
        self._inflight[slot] = (done, op, fd, offset, iov, nbytes, 0, keep, True)
        if not self._flush_scheduled and not self._plugged:
            self._schedule_flush()

    def _prep(self, slot: int, op: int, fd: int, offset: int, arg: Any) -> tuple[int, Any]:
        tail = self._tail
        sqe = self._sqe_ptrs[tail & self._sq_mask]
        sqe.fd = fd
        sqe.user_data = slot
        keep: Any = None
        expect = 0
        if op == OP_SYNC:
            sqe.opcode = kur.IORING_OP_FSYNC
            sqe.off = 0
            sqe.addr = _ffi.NULL
            sqe.len = 0
            sqe.rw_flags = kur.IORING_FSYNC_DATASYNC
        elif op == OP_FALLOCATE:
            mode, length = arg
            sqe.opcode = kur.IORING_OP_FALLOCATE
            sqe.off = offset
            sqe.addr = _ffi.cast("void *", length)
            sqe.len = mode
            sqe.rw_flags = 0
        else:
            sqe.off = offset
            sqe.rw_flags = 0
            n = len(arg)
            if n == 1:
                m = arg[0]
                keep = _from_buffer(_CHAR_ARRAY, m, op == OP_READ)
                sqe.addr = keep
                expect = m.nbytes
                sqe.len = expect
                sqe.opcode = kur.IORING_OP_READ if op == OP_READ else kur.IORING_OP_WRITE
            else:
                expect, keep = self._pin_vector(slot, arg, op == OP_READ)
                sqe.addr = keep[0]
                sqe.len = n
                sqe.opcode = kur.IORING_OP_READV if op == OP_READ else kur.IORING_OP_WRITEV
        self._tail = (tail + 1) & _MASK32
        return expect, keep

    def _submit(self) -> None:
        tail = self._tail
        self._sq_ktail[0] = tail  # plain store after the SQE stores: release on x86-64
        to_submit = (tail - self._sq_head[0]) & _MASK32
        if not to_submit:
            return
        try:
            k = self._enter.submit(to_submit)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EBUSY, errno.EINTR):
                if not self._submitted:  # nothing to wait for: try again soon
                    self._loop.call_later(0.001, self._flush)
                return
            raise
        self._submitted += k
        if k < to_submit and not self._submitted:
            self._loop.call_later(0.001, self._flush)
        self._poll_cq()

    def _reap(self) -> list[tuple[int, int]]:
        """Take every CQE between our head and the kernel's tail; publish the head."""
        head = self._head
        cqes = self._cqes
        mask = self._cq_mask
        batch: list[tuple[int, int]] = []
        while True:
            tail = self._cq_ktail[0]  # plain load before the CQE loads: acquire on x86-64
            if head == tail:
                break
            while head != tail:
                cqe = cqes[head & mask]
                batch.append((cqe.user_data, cqe.res))
                head = (head + 1) & _MASK32
            self._cq_head[0] = head  # after the CQE loads: release on x86-64
        self._head = head
        return batch

    def _on_eventfd(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        batch = self._reap()
        if batch:
            self._submitted -= len(batch)
            self._deliver(batch)

    def _poll_cq(self) -> bool:
        """Deliver the completions already in the CQ ring (right after a submission:
        page-cache hits complete inside io_uring_enter; or when a device polls:
        `completions.poll`); True if there were any.  The eventfd is left set (as
        in the Linux AIO engine): no system call per batch here; a loop that sleeps
        wakes once for it, and `_on_eventfd` reads it before the ring."""
        if self._completing or not self._submitted or self._cq_ktail[0] == self._head:
            return False
        batch = self._reap()
        self._submitted -= len(batch)
        self._deliver(batch)
        return True

    def close(self) -> None:
        """Wait for requests in flight (their callbacks are dropped), unmap, close."""
        if self.closed:
            return
        self._close_helper()
        self._loop.remove_reader(self._efd)
        completions.remove_poller(self._poll_cq)
        while self._submitted > 0:
            self._enter.wait(self._submitted)
            tail = self._cq_ktail[0]
            self._submitted -= (tail - self._head) & _MASK32
            self._head = tail
            self._cq_head[0] = tail
        self._inflight = [None] * self._depth
        self._release()
