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

The buffers behind the pointers are exported (`ffi.from_buffer`) only during one poll:
`release` gives them back, so that the queue's views can be released and its memory
unmapped between polls.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from vexport import native
from vexport.kernel import vduse as kv
from vexport.virtio.virtqueue import SplitQueue

log = logging.getLogger("vexport.native_poll")


class NativeBackend(NamedTuple):
    """What the C loop needs to serve a virtio-blk device's requests itself."""

    capacity_sectors: int
    align_mask: int  # VirtioBlk._align_mask: sectors per logical block - 1
    writable: bool


class NativePoll:
    """One queue's `struct vx_poll`, kept between polls (allocated once)."""

    __slots__ = ("_buffers", "_region", "_region_view", "errors_seen", "state")

    def __init__(self) -> None:
        self.state: Any = native.ffi.new("struct vx_poll *")
        self._buffers: list[Any] = []
        self._region: Any = None
        self._region_view: memoryview | None = None
        self.errors_seen = 0

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
        ffi = native.ffi
        s = self.state
        bufs = [ffi.from_buffer(b) for b in (vq._desc, vq._avail, vq._used, vq._inflight)]
        heads = ffi.from_buffer(qlog.heads)
        used = ffi.from_buffer(qlog._used16)
        self._buffers = [*bufs, heads, used]
        s.desc, s.avail, s.used, s.inflight = bufs
        s.log_heads = ffi.cast("uint64_t *", heads)
        s.log_used = ffi.cast("uint16_t *", used)
        s.capacity_sectors = backend.capacity_sectors
        s.align_mask = backend.align_mask
        s.writable = backend.writable
        s.size = vq.size
        s.event_idx = vq.event_idx
        s.notify_on_empty = vq.notify_on_empty
        s.fd = fd
        s.inject_irq = kv.VDUSE_VQ_INJECT_IRQ
        s.queue_index = queue_index
        s.spins = spins
        s.yield_cpu = yield_cpu
        s.max_serve = max_serve
        s.deep_limit = deep_limit
        s.interrupt_due = 0

    def run(self, vq: SplitQueue, qlog: Any) -> int:
        """One vx_poll call from the queue's current state; the state is taken back."""
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
        s.last_avail = vq._last_avail
        s.used_idx = vq._used_idx
        s.signalled_used = vq._signalled_used
        s.signalled_valid = vq._signalled_valid
        s.python_inflight = vq._inflight_count
        s.seq = qlog.next_seq
        rc: int = native.lib.vx_poll(s)
        vq._last_avail = s.last_avail
        vq._used_idx = s.used_idx
        vq._signalled_used = s.signalled_used
        vq._signalled_valid = bool(s.signalled_valid)
        qlog.next_seq = s.seq
        if s.interrupt_errors != self.errors_seen:
            self.errors_seen = s.interrupt_errors
            if s.interrupt_errno != 22:  # EINVAL: not DRIVER_OK any more (quiet)
                log.error("queue %d interrupt failed: errno %d", s.queue_index, s.interrupt_errno)
        return rc

    def _drop_region(self) -> None:
        if self._region is not None:
            native.ffi.release(self._region)
            self._region = None
            self._region_view = None
            self.state.region = native.ffi.NULL
            self.state.region_start = self.state.region_end = 0

    def release(self) -> None:
        """Give the exported buffers back (the end of one poll)."""
        ffi = native.ffi
        for b in self._buffers:
            ffi.release(b)
        self._buffers = []
        self._drop_region()
        s = self.state
        s.desc = s.avail = s.used = s.inflight = ffi.NULL
        s.log_heads = ffi.NULL
        s.log_used = ffi.NULL
