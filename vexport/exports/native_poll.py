"""The compiled poll of one queue (vexport/native/poll.c), run by `VduseDevice._poll`
instead of its Python loop when the process polls one queue whose device type can have
its requests served there (`NativeBackend`: a null-co node today).

The C loop works on the queue's own memory: the rings, `SplitQueue`'s in-flight
bytearray, the in-flight log and the region of the previous `pop_simple`.  The queue's
state (avail and used indices, the last signalled used index, the log's sequence
number) is copied into `struct vx_poll` before each call and back after it, so the
Python path goes on from where the C loop stopped, and the other way round.  The loop
serves only requests of the common shape (`SplitQueue.pop_simple`, then
`VirtioBlk.parse_simple`'s accepted reads and writes), with the same checks; at any
other entry it returns without consuming it, and `_poll` has the Python path serve it.

The buffers behind the pointers are exported (`ffi.from_buffer`) only during one call:
`release` gives them back, so that the queue's views can be released and its memory
unmapped between polls.  The request region is the exception while requests are out
at an asynchronous backend (Linux AIO, io_uring: `NativeBackend.kind`): their buffers
and status bytes are in it, so it stays exported (as the Python engines pin a
request's buffers) until the last of them completed.

Asynchronous backends: the poll owns a Linux AIO context or an io_uring of its own,
created at first use in the process that polls, and an eventfd the backend signals per
completion.  The device watches that eventfd in its event loop and calls `reap` (the C
loop's vx_reap) for the completions that come after the poll returned.  Requests out
are counted in the queue's in-flight count and, through the device, in the export's,
so that a drain waits for them.  When the queue stops (reset) with requests out, the
poll is *retired*: its completions only free their slots (``discard``), and it is
closed when the last came back.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, NamedTuple

from vexport import native
from vexport.kernel import aio as kaio
from vexport.kernel import io_uring as kuring
from vexport.kernel import vduse as kv
from vexport.virtio.virtqueue import SplitQueue

log = logging.getLogger("vexport.native_poll")


def _ring_pointer(cdata: Any, ctype: str = "uint32_t *") -> Any:
    """A pointer into an io_uring mapping, from kernel/io_uring's ffi to native's."""
    return native.ffi.cast(ctype, int(kuring.ffi.cast("uintptr_t", cdata)))


class NativeBackend(NamedTuple):
    """What the C loop needs to serve a virtio-blk device's requests itself."""

    capacity_sectors: int
    align_mask: int  # VirtioBlk._align_mask: sectors per logical block - 1
    writable: bool  # writes of the common shape may be served (else Python serves them)
    kind: int = 0  # VX_NULL (0), VX_AIO (1) or VX_URING (2)
    fd: int = -1  # the file the asynchronous backends read and write


class NativePoll:
    """One queue's `struct vx_poll`, kept between polls (allocated once), with the
    asynchronous backend's context, ring and eventfd when it has one."""

    __slots__ = (
        "_buffers",
        "_held",
        "_region",
        "_region_view",
        "_ring",
        "efd",
        "errors_seen",
        "failed",
        "kind",
        "poll_hook",
        "state",
    )

    def __init__(self) -> None:
        self.state: Any = native.ffi.new("struct vx_poll *")
        self._buffers: list[Any] = []
        self._region: Any = None
        self._region_view: memoryview | None = None
        self._held: list[Any] = []  # earlier regions that requests out still point into
        self.errors_seen = 0
        self.kind = native.lib.VX_NULL if native.lib is not None else 0
        self.efd = -1
        self._ring: Any = None  # kuring.RingMapping (VX_URING)
        self.failed = False  # its backend could not be made (the Python path serves)
        self.poll_hook: Any = None  # for completions.add_poller (set by the device)

    @staticmethod
    def usable(vq: SplitQueue) -> bool:
        """Built, and a queue whose requests can have the common shape (INDIRECT,
        memory made of regions) and that fits the loop's scratch space."""
        return (
            native.available()
            and vq.indirect
            and vq.size <= native.lib.VX_MAX_SIZE
            and vq._region_at is not None
        )

    # -- the backend ---------------------------------------------------------------
    def open_backend(self, kind: int, size: int) -> None:
        """Create what ``kind`` needs (once per poll object; OSError if it cannot)."""
        lib = native.lib
        if kind == self.kind:
            return
        if self.kind != lib.VX_NULL or self.state.pending:
            raise OSError(0, "the compiled poll has another backend already")
        s = self.state
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            if kind == lib.VX_AIO:
                ctx = kaio.io_setup(2 * size)
                try:
                    kaio.CompletionRing(ctx).close()  # the ring layout must be the known one
                except ValueError as e:
                    kaio.io_destroy(ctx)
                    raise OSError(0, str(e)) from None
                s.aio_ctx = ctx
            elif kind == lib.VX_URING:
                ring_fd, params = kuring.io_uring_setup(size)
                try:
                    ring = kuring.RingMapping(ring_fd, params)
                    kuring.io_uring_register_eventfd(ring_fd, efd)
                except OSError:
                    os.close(ring_fd)
                    raise
                self._ring = ring
                s.ring_fd = ring_fd
                ptr = _ring_pointer
                s.sq_head, s.sq_tail = ptr(ring.sq_head), ptr(ring.sq_tail)
                s.sq_array, s.sqes = ptr(ring.sq_array), ptr(ring.sqes, "uint8_t *")
                s.cq_head, s.cq_tail = ptr(ring.cq_head), ptr(ring.cq_tail)
                s.cqes = ptr(ring.cqes, "uint8_t *")
                s.sq_mask = ring.sq_mask
                s.cq_mask = ring.cq_mask
            else:
                raise OSError(0, f"unknown backend {kind}")
        except BaseException:
            os.close(efd)
            raise
        self.efd = efd
        s.efd = efd
        s.backend = kind
        self.kind = kind

    def close(self) -> None:
        """Free the backend (Linux AIO's io_destroy waits for requests still out)."""
        lib = native.lib
        s = self.state
        if self.kind == lib.VX_AIO and s.aio_ctx:
            with contextlib.suppress(OSError):
                kaio.io_destroy(int(s.aio_ctx))
            s.aio_ctx = 0
        if self._ring is not None:
            self._ring.close()
            self._ring = None
            os.close(s.ring_fd)
            s.ring_fd = -1
        if self.efd >= 0:
            os.close(self.efd)
            self.efd = -1
        self.kind = lib.VX_NULL
        s.backend = lib.VX_NULL
        s.pending = 0
        self.release()  # with nothing out: the regions too

    def forget_after_fork(self) -> None:
        """In a forked worker: the parent's context and ring are not this process's;
        only the descriptors are closed."""
        if self._ring is not None:
            self._ring = None  # the mappings go with the process image
            with contextlib.suppress(OSError):
                os.close(self.state.ring_fd)
        if self.efd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.efd)
            self.efd = -1

    # -- one call ----------------------------------------------------------------
    def setup(
        self,
        vq: SplitQueue,
        qlog: Any,
        backend: NativeBackend,
        fd: int,
        queue_index: int,
        spins: int,
        yield_cpu: bool,
        max_serve: int,
        deep_limit: int,
    ) -> None:
        """Point the state at this queue's memory for one poll (`release` after it)."""
        self.attach(vq, qlog, fd, queue_index)
        s = self.state
        s.capacity_sectors = backend.capacity_sectors
        s.align_mask = backend.align_mask
        s.writable = backend.writable
        s.file_fd = backend.fd
        s.spins = spins
        s.yield_cpu = yield_cpu
        s.max_serve = max_serve
        # The deep limit is null-co's (measured there); with an asynchronous backend the
        # C loop kept deep drivers as well or better (bench/README.md).
        s.deep_limit = deep_limit if backend.kind == native.lib.VX_NULL else 0

    def attach(self, vq: SplitQueue, qlog: Any, fd: int, queue_index: int) -> None:
        """Export the queue's rings and log to the state (`release` after the call)."""
        ffi = native.ffi
        s = self.state
        bufs = [ffi.from_buffer(b) for b in (vq._desc, vq._avail, vq._used)]
        inflight = ffi.from_buffer(vq._inflight, require_writable=True)
        heads = ffi.from_buffer(qlog.heads)
        used = ffi.from_buffer(qlog._used16)
        self._buffers = [*bufs, inflight, heads, used]
        s.desc, s.avail, s.used = bufs
        s.inflight = inflight
        s.log_heads = ffi.cast("uint64_t *", heads)
        s.log_used = ffi.cast("uint16_t *", used)
        s.size = vq.size
        s.event_idx = vq.event_idx
        s.notify_on_empty = vq.notify_on_empty
        s.fd = fd
        s.inject_irq = kv.VDUSE_VQ_INJECT_IRQ
        s.queue_index = queue_index
        s.interrupt_due = 0

    def _load(self, vq: SplitQueue, qlog: Any) -> int:
        s = self.state
        s.last_avail = vq._last_avail
        s.used_idx = vq._used_idx
        s.signalled_used = vq._signalled_used
        s.signalled_valid = vq._signalled_valid
        pending = int(s.pending)
        s.python_inflight = vq._inflight_count - pending
        s.seq = qlog.next_seq
        return pending

    def _store(self, vq: SplitQueue, qlog: Any, pending: int) -> int:
        """The state back into the queue; returns the change of requests out."""
        s = self.state
        vq._last_avail = s.last_avail
        vq._used_idx = s.used_idx
        vq._signalled_used = s.signalled_used
        vq._signalled_valid = bool(s.signalled_valid)
        qlog.next_seq = s.seq
        delta = int(s.pending) - pending
        vq._inflight_count += delta
        if s.interrupt_errors != self.errors_seen:
            self.errors_seen = s.interrupt_errors
            if s.interrupt_errno != 22:  # EINVAL: not DRIVER_OK any more (quiet)
                log.error("queue %d interrupt failed: errno %d", s.queue_index, s.interrupt_errno)
        return delta

    def run(self, vq: SplitQueue, qlog: Any) -> tuple[int, int]:
        """One vx_poll call from the queue's current state; the state is taken back.
        Returns vx_poll's result and the change of requests out at the backend."""
        s = self.state
        epoch, view, start, end = vq._simple_region
        if epoch == vq.memory.epoch and end > start:  # type: ignore[attr-defined]
            if view is not self._region_view:
                self._drop_region()
                self._region = native.ffi.from_buffer(view)
                self._region_view = view
                s.region = self._region
            s.region_start = start
            s.region_end = end
        else:
            s.region_start = s.region_end = 0  # nothing is in it: Python pops first
        pending = self._load(vq, qlog)
        rc: int = native.lib.vx_poll(s)
        return rc, self._store(vq, qlog, pending)

    def reap(self, vq: SplitQueue | None, qlog: Any) -> tuple[int, int]:
        """The completions that came in since the last call (vx_reap): with the queue
        attached (`attach`), or discarded (retired: ``vq`` is None).  Returns how many
        requests finished and whether the caller must inject the interrupt."""
        s = self.state
        lib = native.lib
        if vq is None:
            s.discard = 1
            before = int(s.pending)
            lib.vx_reap(s)
            return before - int(s.pending), 0
        pending = self._load(vq, qlog)
        due: int = lib.vx_reap(s)
        return -self._store(vq, qlog, pending), due

    def _drop_region(self) -> None:
        if self._region is None:
            return
        if self.state.pending:
            self._held.append(self._region)  # requests out point into it
        else:
            native.ffi.release(self._region)
        self._region = None
        self._region_view = None
        self.state.region = native.ffi.NULL
        self.state.region_start = self.state.region_end = 0

    def release(self) -> None:
        """Give the exported buffers back (the end of one call); the regions too
        unless requests are out."""
        ffi = native.ffi
        for b in self._buffers:
            ffi.release(b)
        self._buffers = []
        s = self.state
        if not s.pending:
            self._drop_region()
            for held in self._held:
                ffi.release(held)
            self._held = []
        s.desc = s.avail = s.used = s.inflight = ffi.NULL
        s.log_heads = ffi.NULL
        s.log_used = ffi.NULL
