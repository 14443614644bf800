"""LinuxAioEngine (``aio=native``): io_submit/io_getevents with an eventfd.

Theory of operation (see io_submit(2), linux/aio_abi.h):

* ``io_setup(depth)`` creates the kernel context; if that fails (ENOSYS, or EAGAIN when
  ``fs.aio-max-nr`` is exhausted) the constructor raises OSError, which the block driver
  reports when the node is opened.
* One ``struct iocb`` per slot, allocated once; ``aio_data`` (= slot), ``aio_flags``
  (``IOCB_FLAG_RESFD``) and ``aio_resfd`` (the eventfd) are set once.  A single-segment
  request uses ``IOCB_CMD_PREAD``/``PWRITE`` on the buffer directly; a vector uses
  ``PREADV``/``PWRITEV`` on a per-slot ``struct iovec`` array (allocated on first use,
  reallocated per request only beyond ``IOV_INLINE`` segments).  ``fdatasync`` is
  ``IOCB_CMD_FDSYNC``.  fallocate and the block ioctls go to a thread pool.
* ``_submit`` passes every prepared iocb to one ``io_submit``.  A partial acceptance keeps
  the rest queued; EAGAIN keeps everything queued until completions come back; any other
  error belongs to the first iocb, which is failed with ``-errno`` and the rest retried.
* Completions are read from the context's ring in user space (`kaio.CompletionRing`;
  ``io_getevents(min_nr=0)`` if the ring layout is not the known one).  The kernel
  signals the eventfd per completion, after writing the event; the loop reads the
  eventfd, then the ring.  Right after ``io_submit`` the ring is read once more:
  requests that complete inside the call (tmpfs, null_blk, page-cache hits) are then
  delivered in the same batch as their submission, without a loop iteration.  That
  read leaves the eventfd set (no system call per batch); the loop then wakes once for
  it and finds nothing new, or new events.  The eventfd handler reads the eventfd
  before the ring, so an event is never left without a signal.

Buffers: memoryviews are pinned with ``ffi.from_buffer`` until the completion.  With
``O_DIRECT`` the caller must pass buffers, offsets and lengths aligned to the device's
logical block size (mmap-allocated memory is page aligned); the kernel answers -EINVAL
otherwise.  Without ``O_DIRECT`` Linux AIO on regular files runs synchronously inside
io_submit (correct, but it blocks the loop), which is why QEMU wants ``cache.direct=on``
for ``aio=native``.
"""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Any

from vexport.io import completions
from vexport.io.slots import OP_READ, OP_SYNC, SlotEngine
from vexport.kernel import aio as kaio

_ffi = kaio.ffi
_CHAR_ARRAY = _ffi.typeof("char[]")  # resolved once: from_buffer("char[]") parses the text
# The backend's from_buffer: ffi.from_buffer is a Python wrapper that only checks its
# arguments' types before calling it (one frame less per request).
_from_buffer = getattr(getattr(_ffi, "_backend", None), "from_buffer", _ffi.from_buffer)
_NULL = _ffi.NULL
_RW_OPCODES = (kaio.IOCB_CMD_PREAD, kaio.IOCB_CMD_PWRITE)  # by OP_READ, OP_WRITE


class LinuxAioEngine(SlotEngine):
    kind = "native"
    _ffi = _ffi
    _char_array = _CHAR_ARRAY

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, depth: int = 256) -> None:
        loop = loop if loop is not None else asyncio.get_running_loop()
        self._ctx = kaio.io_setup(depth)  # first: a failure must leave nothing behind
        super().__init__(loop, depth)
        try:
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            kaio.io_destroy(self._ctx)
            raise
        self._sys = kaio.Submitter(self._ctx)
        self._iocbs = _ffi.new("struct iocb[]", depth)
        self._ptrs = [self._iocbs + i for i in range(depth)]
        self._iocbpp = _ffi.new("struct iocb *[]", depth)
        self._events = _ffi.new("struct io_event[]", depth)
        self._iovecs: list[Any] = [None] * depth
        self._pending: list[int] = []
        try:
            self._ring: kaio.CompletionRing | None = kaio.CompletionRing(self._ctx)
        except ValueError:
            self._ring = None
        if self._ring is not None:
            completions.add_poller(self._poll_ring)
        for i in range(depth):
            iocb = self._iocbs[i]
            iocb.aio_data = i
            iocb.aio_flags = kaio.IOCB_FLAG_RESFD
            iocb.aio_resfd = self._efd
        loop.add_reader(self._efd, self._on_eventfd)

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
        iocb = self._ptrs[slot]
        iocb.aio_fildes = fd
        iocb.aio_lio_opcode = _RW_OPCODES[op]
        iocb.aio_buf = keep
        iocb.aio_nbytes = nbytes
        iocb.aio_offset = offset
        self._inflight[slot] = (done, op, fd, offset, iov, nbytes, 0, keep, True)
        self._pending.append(slot)
        if not self._flush_scheduled and not self._plugged:
            self._schedule_flush()

    def _prep(self, slot: int, op: int, fd: int, offset: int, arg: Any) -> tuple[int, Any]:
        iocb = self._ptrs[slot]
        iocb.aio_fildes = fd
        if op == OP_SYNC:
            iocb.aio_lio_opcode = kaio.IOCB_CMD_FDSYNC
            iocb.aio_buf = _NULL
            iocb.aio_nbytes = 0
            iocb.aio_offset = 0
            self._pending.append(slot)
            return 0, None
        iocb.aio_offset = offset
        n = len(arg)
        if n == 1:
            m = arg[0]
            keep = _from_buffer(_CHAR_ARRAY, m, op == OP_READ)
            iocb.aio_buf = keep
            expect = m.nbytes
            iocb.aio_nbytes = expect
            iocb.aio_lio_opcode = kaio.IOCB_CMD_PREAD if op == OP_READ else kaio.IOCB_CMD_PWRITE
        else:
            expect, keep = self._pin_vector(slot, arg, op == OP_READ)
            iocb.aio_buf = keep[0]
            iocb.aio_nbytes = n
            iocb.aio_lio_opcode = kaio.IOCB_CMD_PREADV if op == OP_READ else kaio.IOCB_CMD_PWRITEV
        self._pending.append(slot)
        return expect, keep

    def _submit(self) -> None:
        pending = self._pending
        if not pending:
            return  # nothing submitted: nothing new to look for in the ring either
        ptrs = self._ptrs
        while pending:
            n = len(pending)
            if n == 1:  # the usual case at queue depth 1: no list built
                self._iocbpp[0] = ptrs[pending[0]]
            else:
                self._iocbpp[0:n] = [ptrs[s] for s in pending]
            try:
                k = self._sys.submit(n, self._iocbpp)
            except OSError as e:
                if e.errno == errno.EAGAIN and len(pending) < self._depth - len(self._free):
                    return  # retried when completions come back
                self._fail_slot(pending.pop(0), -(e.errno or errno.EIO))
                continue
            del pending[:k]
        self._poll_ring()

    def _poll_ring(self) -> bool:
        """Deliver the completions already in the ring (after a submission, or when a
        device polls: `completions.poll`); True if there were any."""
        ring = self._ring
        if ring is None or self._completing or len(self._free) == self._depth:
            return False
        batch: list[tuple[int, int]] = []
        if not ring.reap(batch):
            return False
        # The eventfd is left set: a polling device never sleeps between requests, so
        # reading it here would be a system call per batch; a loop that does sleep
        # wakes once for it, finds the ring empty (or new events) and clears it.
        self._deliver(batch)
        return True

    def _reap(self, batch: list[tuple[int, int]]) -> None:
        if self._ring is not None:
            self._ring.reap(batch)
            return
        events = self._events
        depth = self._depth
        while True:
            n = self._sys.getevents(depth, events)
            for i in range(n):
                ev = events[i]
                batch.append((ev.data, ev.res))
            if n < depth:
                break

    def _on_eventfd(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        batch: list[tuple[int, int]] = []
        self._reap(batch)
        if batch:
            self._deliver(batch)

    def close(self) -> None:
        """Destroy the context (waits for requests in flight; their callbacks are dropped)."""
        if self.closed:
            return
        self._close_helper()
        self._loop.remove_reader(self._efd)
        if self._ring is not None:
            completions.remove_poller(self._poll_ring)
            self._ring.close()
            self._ring = None
        kaio.io_destroy(self._ctx)
        os.close(self._efd)
        self._pending.clear()
        self._inflight = [None] * self._depth
