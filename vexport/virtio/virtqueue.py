"""A split virtqueue, device side (virtio 1.2, section 2.7), with no I/O of its own.

Theory of operation
-------------------
The queue keeps three ring addresses and a few counters; every byte it reads or writes
goes through the `GuestMemory` object passed in (bytearrays in tests, mmap'd VDUSE
regions in the export).  The three areas are translated once, at construction (and by
`remap` after the driver's memory map changed): the descriptor table (16 bytes per
entry), the avail ring (flags, idx, ring[size], used_event) and the used ring (flags,
idx, ring[size] of {id, len}, avail_event).  All fields are little endian (VERSION_1).

``pop`` compares avail->idx with ``last_avail_idx``; each new entry names a head
descriptor; the chain is walked (following NEXT, and one level of INDIRECT table) and
turned into a `DescriptorChain`: memoryviews of the device-readable buffers, then of the
device-writable ones.  ``push(head, len)`` writes a used element and then used->idx.
Heads between pop and push are *in flight*; offering one again is an error.

Everything the driver wrote is checked before use; each violation raises its own
subclass of `VirtqueueError` (see `vexport.virtio.errors`).  What happens to the state:

* `AvailIndexRunAhead`: nothing is consumed; every later pop raises it again.  The
  device must give up (NEEDS_RESET).
* `HeadOutOfRange`, `HeadInFlight`: the avail entry is consumed (last_avail_idx moves
  on), ``err.head`` is None; nothing can be returned to the driver for it.
* every chain error: the entry is consumed and the head is in flight; ``err.head`` is
  the head, so the device may complete it with ``push(head, 0)`` or stop the queue.

So after any error other than `AvailIndexRunAhead` the queue stays consistent and the
next pop looks at the next entry.  ``pop_batch`` that meets an error after collecting
chains returns those and raises the error on the following call.

Notifications
-------------
Kicks (driver -> device): with RING_EVENT_IDX the device publishes avail_event, the
avail index it wants a kick for.  While it is busy it leaves it stale (no kicks); when
``pop`` finds the ring empty it writes avail_event = last_avail_idx and looks again, so a
buffer added concurrently is either seen or kicked (virtio 1.2, 2.7.10).  Callers must
therefore pop until the queue reports empty.  Without EVENT_IDX, VRING_USED_F_NO_NOTIFY
in used->flags is the switch (`suppress_kicks`).

Interrupts (device -> driver): ``should_notify()`` after a batch of pushes.
NOTIFY_ON_EMPTY forces one when nothing is in flight and the avail ring is empty
(virtio 1.2, 6.3); with EVENT_IDX an interrupt is due when used->idx stepped over
used_event (``vring_need_event``, 2.7.7.1); otherwise unless the driver set
VRING_AVAIL_F_NO_INTERRUPT.

Python has no memory fences; the stores and loads above happen in program order, which
is what x86 (TSO) needs for everything but the store->load pairs (avail_event then
avail->idx, used->idx then used_event), where a store may still sit in the CPU's store
buffer when the load runs and both sides miss each other's update (a lost kick or
interrupt stalls I/O for good).  `full_fence` orders them: acquiring and releasing an
uncontended lock executes a locked instruction (glibc's semaphore/mutex fast path), a
full barrier on x86.  It runs once per empty-ring check and once per interrupt
decision, not per request.
"""

from __future__ import annotations

import struct
import sys
import threading
from collections.abc import Callable

from vexport.virtio.errors import (
    AddressOverflow,
    AvailIndexRunAhead,
    BadIndirectLength,
    BadQueueSize,
    ChainLengthOverflow,
    ChainTooLong,
    DescriptorOutOfRange,
    DescriptorOutsideMemory,
    GuestMemoryError,
    HeadInFlight,
    HeadOutOfRange,
    IndirectNotNegotiated,
    IndirectWithNext,
    NestedIndirect,
    ReadableAfterWritable,
    RingOutsideMemory,
    VirtqueueError,
)
from vexport.virtio.memory import PERM_RW, GuestMemory, Region

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1

# Native formats, not "<...": CPython packs and unpacks the standard-size formats one
# byte at a time, so a "<H" load of avail->idx can combine bytes of two values.  Native
# formats copy the whole field with one memcpy, a single aligned load: atomic on x86.
# Native order is little endian on the machines vexport runs on (checked below), as
# virtio wants.
#
# Fields the driver reads while the device may be writing them (used->idx, used->flags,
# avail_event) are never stored with ``struct.pack_into``: it zero-fills its target
# before writing the value, so a driver polling used->idx on another CPU can read 0 and
# consume up to 65535 stale used entries (Linux: "id N out of range", the queue fails).
# They are stored through a ``memoryview.cast("H")`` of the used ring instead: one
# two-byte store, nothing in between (`_used16`).  The used elements may keep using
# pack_into: the driver reads none of them before used->idx says they are there.
if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("vexport's virtqueue needs a little-endian host")
DESC = struct.Struct("QIHH")  # addr, len, flags, next (16 bytes, no padding)
DESC3 = struct.Struct("QIHH" * 3)  # a three-entry indirect table, read at once
USED_ELEM = struct.Struct("II")  # id, len
U16 = struct.Struct("H")
assert DESC.size == 16 and USED_ELEM.size == 8 and U16.size == 2
DESC_SIZE = DESC.size
MAX_QUEUE_SIZE = 32768
_IOVA_LIMIT = 1 << 64
_MAX_CHAIN_BYTES = 0xFFFFFFFF
_EMPTY_VIEW = memoryview(b"")
# Module-level aliases for the hot paths (a global load, no attribute look-up).
_u16_at = U16.unpack_from
_desc_at = DESC.unpack_from
_desc3_at = DESC3.unpack_from


_fence_lock = threading.Lock()
_fence_acquire = _fence_lock.acquire
_fence_release = _fence_lock.release


def full_fence() -> None:
    """A full memory barrier (see the module docstring).  The hot paths inline it as
    ``_fence_acquire(); _fence_release()``."""
    _fence_acquire()
    _fence_release()


def desc_table_size(size: int) -> int:
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    """flags, idx, ring[size], used_event."""
    return 6 + 2 * size


def used_ring_size(size: int) -> int:
    """flags, idx, ring[size] of {id, len}, avail_event."""
    return 6 + 8 * size


def vring_need_event(event: int, new: int, old: int) -> bool:
    """True if moving the index from ``old`` to ``new`` stepped past ``event`` (2.7.7.1)."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


# (head, region view, first buffer's offset, data offset, data length, data written by
# the device, last buffer's offset): what `SplitQueue.pop_simple` returns per chain.
SimpleChain = tuple[int, memoryview, int, int, int, bool, int]


class DescriptorChain:
    """One request: the head index and views of its readable and writable buffers."""

    __slots__ = ("head", "read_len", "readable", "writable", "write_len")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        read_len: int,
        write_len: int,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.read_len = read_len
        self.write_len = write_len

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, read={self.read_len}B in "
            f"{len(self.readable)}, write={self.write_len}B in {len(self.writable)})"
        )


def simple_to_chain(simple: SimpleChain, first_len: int, last_len: int) -> DescriptorChain:
    """The `DescriptorChain` that `SplitQueue.pop_batch` returns for a chain that
    ``pop_simple(n, first_len, last_len)`` returned (for the general path's rare cases)."""
    head, view, first, data, data_len, data_written, last = simple
    v0 = view[first : first + first_len]
    v1 = view[data : data + data_len]
    v2 = view[last : last + last_len]
    if data_written:
        return DescriptorChain(head, [v0], [v1, v2], first_len, data_len + last_len)
    return DescriptorChain(head, [v0, v1], [v2], first_len + data_len, last_len)


class SplitQueue:
    """The device side of one split virtqueue.

    ``last_avail_idx`` is where to resume (VQ_GET_INFO's avail index after a
    reconnect); ``used_idx`` None means "read used->idx from the ring".
    """

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        notify_on_empty: bool = False,
        last_avail_idx: int = 0,
        used_idx: int | None = None,
    ) -> None:
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise BadQueueSize(f"queue size {size} is not a power of two in [1, 32768]")
        self.memory = memory
        # Memories made of regions (RegionMemory) offer pop_simple's in-place reads.
        self._region_at: Callable[[int], Region | None] | None = getattr(memory, "region_at", None)
        self.size = size
        self._mask = size - 1
        self.desc_addr = desc_addr
        self.avail_addr = avail_addr
        self.used_addr = used_addr
        self.event_idx = event_idx
        self.indirect = indirect
        self.notify_on_empty = notify_on_empty
        self._last_avail = last_avail_idx & 0xFFFF
        self._inflight = bytearray(size)
        self._inflight_count = 0
        self._pending_error: VirtqueueError | None = None
        self._kicks_suppressed = False
        # pop_simple: whether its last call consumed every entry the driver had made
        # available (then an empty pop_batch would find nothing either), and the region
        # it read from, with the memory's epoch (RegionMemory.epoch) at that time.
        self.simple_drained = False
        self._simple_region: tuple[int, memoryview, int, int] = (-1, _EMPTY_VIEW, 0, 0)
        self._signalled_used = 0
        self._signalled_valid = False
        self._desc = self._avail = self._used = self._used16 = memoryview(b"")
        self.remap()
        self._used_idx = U16.unpack_from(self._used, 2)[0] if used_idx is None else used_idx
        self._used_idx &= 0xFFFF
        self._used_event_off = 4 + 2 * size
        self._avail_event_i = 2 + 4 * size  # avail_event's index in _used16 (byte 4 + 8*size)

    # -- set-up --------------------------------------------------------------------

    def _ring(self, name: str, addr: int, length: int, write: bool) -> memoryview:
        if addr + length > _IOVA_LIMIT:
            raise RingOutsideMemory(f"{name} at 0x{addr:x} overflows 64 bits")
        view = self.memory.view(addr, length, write)
        if view is None:
            raise RingOutsideMemory(
                f"{name} 0x{addr:x}+{length} is not in one {'writable' if write else 'readable'}"
                " mapped region"
            )
        return view

    def remap(self) -> None:
        """Translate the three ring areas again (after the memory map changed)."""
        size = self.size
        self._desc = self._ring("descriptor table", self.desc_addr, desc_table_size(size), False)
        self._avail = self._ring("avail ring", self.avail_addr, avail_ring_size(size), False)
        self._used = self._ring("used ring", self.used_addr, used_ring_size(size), True)
        # used->flags [0], used->idx [1], avail_event [2 + 4 * size]: single stores.
        self._used16 = self._used.cast("H")

    def release(self) -> None:
        """Drop the ring views (so that the memory behind them can be unmapped)."""
        for view in (self._used16, self._desc, self._avail, self._used):
            view.release()
        self._simple_region = (-1, _EMPTY_VIEW, 0, 0)

    # -- state -----------------------------------------------------------------------

    @property
    def last_avail_idx(self) -> int:
        return self._last_avail

    @property
    def used_idx(self) -> int:
        return self._used_idx

    @property
    def kicks_suppressed(self) -> bool:
        """The device polls: `suppress_kicks` asked the driver not to kick."""
        return self._kicks_suppressed

    @property
    def error_pending(self) -> bool:
        """pop_batch stopped at an error it raises on the next call."""
        return self._pending_error is not None

    @property
    def inflight_count(self) -> int:
        return self._inflight_count

    def inflight_heads(self) -> list[int]:
        return [i for i, busy in enumerate(self._inflight) if busy]

    def avail_idx(self) -> int:
        """avail->idx as the driver wrote it."""
        return U16.unpack_from(self._avail, 2)[0]

    def pending(self) -> int:
        """Entries the driver made available that were not popped yet."""
        return (U16.unpack_from(self._avail, 2)[0] - self._last_avail) & 0xFFFF

    # -- taking requests ---------------------------------------------------------------

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None if the ring is empty (kicks re-armed)."""
        if self._pending_error is not None:
            err, self._pending_error = self._pending_error, None
            raise err
        avail = U16.unpack_from(self._avail, 2)[0]
        if avail == self._last_avail:
            if not self._rearm():
                return None
            avail = U16.unpack_from(self._avail, 2)[0]
        return self._take(avail)

    def pop_batch(self, max_chains: int) -> list[DescriptorChain]:
        """Up to ``max_chains`` chains; fewer (maybe none) means the ring is empty."""
        if self._pending_error is not None:
            err, self._pending_error = self._pending_error, None
            raise err
        chains: list[DescriptorChain] = []
        unpack = U16.unpack_from
        avail_view = self._avail
        while len(chains) < max_chains:
            avail = unpack(avail_view, 2)[0]
            if avail == self._last_avail:
                if not self._rearm():
                    break
                avail = unpack(avail_view, 2)[0]
            try:
                chains.append(self._take(avail))
            except VirtqueueError as err:
                if not chains:
                    raise
                self._pending_error = err
                break
        return chains

    def pop_simple(self, max_chains: int, first_len: int, last_len: int) -> list[SimpleChain]:
        """The fast path of `pop_batch` for the shape nearly every request has: one
        INDIRECT head descriptor whose table holds three buffers (readable, then data
        of either direction, then writable) of which the first is ``first_len`` bytes
        and the last ``last_len``, all three inside one read-write region.

        Returns up to ``max_chains`` `SimpleChain` tuples ``(head, view, first, data,
        data_len, data_written, last)``: ``view`` is the region's memoryview and the
        three offsets index it.  The entries are consumed and in flight as with
        `pop_batch`.  It stops, consuming nothing more, at the first avail entry of
        any other shape or with any fault (which `pop_batch` then takes and judges),
        and it never re-arms kicks: an empty result does not mean an empty ring.
        A chain it returns is the one `pop_batch` would have returned (same checks).
        """
        self.simple_drained = False
        if self._pending_error is not None or not self.indirect or self._region_at is None:
            return []
        avail = self._avail
        last = self._last_avail
        n = (_u16_at(avail, 2)[0] - last) & 0xFFFF
        if n == 0:
            self.simple_drained = True
            return []
        size = self.size
        if n > size:
            return []  # AvailIndexRunAhead: pop_batch raises it
        seen = n
        if n > max_chains:
            n = max_chains
        desc = self._desc
        inflight = self._inflight
        mask = self._mask
        # The region of the previous call, while the memory removed no region since.
        epoch, view, start, end = self._simple_region
        if epoch != self.memory.epoch:  # type: ignore[attr-defined]
            view = _EMPTY_VIEW
            start = end = 0
        out: list[SimpleChain] = []
        add = out.append
        for i in range(n):
            head = _u16_at(avail, 4 + 2 * ((last + i) & mask))[0]
            if head >= size or inflight[head]:
                break
            addr, length, flags, _nxt = _desc_at(desc, head << 4)
            if flags != VRING_DESC_F_INDIRECT or length != 48:
                break
            if not start <= addr <= end - 48:
                region = self._region_at(addr)
                if region is None or region.perm != PERM_RW:
                    break
                view, start, end = region.view, region.start, region.end
                if addr > end - 48:
                    break
            a0, l0, f0, n0, a1, l1, f1, n1, a2, l2, f2, _n2 = _desc3_at(view, addr - start)
            if (
                f0 != VRING_DESC_F_NEXT
                or n0 != 1
                or n1 != 2
                or f2 != VRING_DESC_F_WRITE
                or l0 != first_len
                or l2 != last_len
                or not l1
                or l1 > _MAX_CHAIN_BYTES - first_len - last_len
                or f1 & ~VRING_DESC_F_WRITE != VRING_DESC_F_NEXT
                or a0 < start
                or a0 + l0 > end
                or a1 < start
                or a1 + l1 > end
                or a2 < start
                or a2 + l2 > end
            ):
                break
            inflight[head] = 1
            add((head, view, a0 - start, a1 - start, l1, f1 != VRING_DESC_F_NEXT, a2 - start))
        k = len(out)
        if k:
            self._last_avail = (last + k) & 0xFFFF
            self._inflight_count += k
            self._simple_region = (self.memory.epoch, view, start, end)  # type: ignore[attr-defined]
            self.simple_drained = k == seen
        return out

    def _rearm(self) -> bool:
        """Ring found empty: re-enable kicks; True if entries arrived meanwhile."""
        if not self.event_idx or self._kicks_suppressed:
            return False
        self._used16[self._avail_event_i] = self._last_avail
        full_fence()
        return U16.unpack_from(self._avail, 2)[0] != self._last_avail

    def _take(self, avail: int) -> DescriptorChain:
        last = self._last_avail
        if (avail - last) & 0xFFFF > self.size:
            raise AvailIndexRunAhead(f"avail idx {avail} is more than {self.size} ahead of {last}")
        head = U16.unpack_from(self._avail, 4 + 2 * (last & self._mask))[0]
        self._last_avail = (last + 1) & 0xFFFF
        if head >= self.size:
            raise HeadOutOfRange(f"avail ring entry {last}: head {head} >= {self.size}")
        if self._inflight[head]:
            raise HeadInFlight(f"avail ring entry {last}: head {head} is already in flight")
        self._inflight[head] = 1
        self._inflight_count += 1
        try:
            return self._walk(head)
        except VirtqueueError as err:
            err.head = head
            raise

    def resubmit(self, head: int) -> DescriptorChain:
        """Walk the chain of ``head`` again, marking it in flight (reconnect recovery)."""
        if not 0 <= head < self.size or self._inflight[head]:
            raise ValueError(f"head {head} cannot be resubmitted")
        self._inflight[head] = 1
        self._inflight_count += 1
        try:
            return self._walk(head)
        except VirtqueueError as err:
            err.head = head
            raise

    def _translate(self, addr: int, length: int, write: bool) -> list[memoryview]:
        try:
            return self.memory.translate(addr, length, write)
        except GuestMemoryError as err:
            raise DescriptorOutsideMemory(str(err)) from None

    def _indirect_table(self, addr: int, length: int) -> memoryview:
        view = self.memory.view(addr, length, False)
        if view is None:  # straddles regions: copy it together
            view = memoryview(b"".join(self._translate(addr, length, False)))
        return view

    def _walk(self, head: int) -> DescriptorChain:
        """Validate the chain starting at ``head`` and map its buffers (the hot path).

        The shape Linux's virtio_blk gives nearly every request (one INDIRECT head
        descriptor, a table of three: 16-byte header, one data buffer, status byte) is
        served with one read of the table and no loop; whatever deviates from it in any
        way goes through `_walk_general`, which decides every error case.  Both give
        the same result for a chain of that shape (checked by the property tests)."""
        addr, length, flags, _nxt = DESC.unpack_from(self._desc, head << 4)
        if flags == VRING_DESC_F_INDIRECT and length == 48 and self.indirect:
            mem_view = self.memory.view
            table = mem_view(addr, 48, False)
            if table is not None:
                a0, l0, f0, n0, a1, l1, f1, n1, a2, l2, f2, _n2 = DESC3.unpack_from(table, 0)
                if (
                    f0 == VRING_DESC_F_NEXT
                    and n0 == 1
                    and n1 == 2
                    and f2 == VRING_DESC_F_WRITE
                    and l0
                    and l1
                    and l2
                    and l0 + l1 + l2 <= _MAX_CHAIN_BYTES
                    and f1 & ~VRING_DESC_F_WRITE == VRING_DESC_F_NEXT
                ):
                    data_written = f1 != VRING_DESC_F_NEXT  # a read request's data
                    v0 = mem_view(a0, l0, False)
                    v1 = mem_view(a1, l1, data_written)
                    v2 = mem_view(a2, l2, True)
                    if v0 is not None and v1 is not None and v2 is not None:
                        if data_written:
                            return DescriptorChain(head, [v0], [v1, v2], l0, l1 + l2)
                        return DescriptorChain(head, [v0, v1], [v2], l0 + l1, l2)
        return self._walk_general(head)

    def _walk_general(self, head: int) -> DescriptorChain:
        """`_walk` for every chain: each descriptor checked in turn."""
        mem_view = self.memory.view
        unpack = DESC.unpack_from
        iova_limit = _IOVA_LIMIT
        table = self._desc
        limit = self.size
        in_indirect = False
        index = head
        count = 0
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        read_len = write_len = 0
        seen_write = False
        while True:
            if count >= limit:
                raise ChainTooLong(f"chain at head {head} has more than {limit} descriptors")
            count += 1
            addr, length, flags, nxt = unpack(table, index << 4)
            if flags & VRING_DESC_F_INDIRECT:
                if in_indirect:
                    raise NestedIndirect(f"indirect descriptor {index} in an indirect table")
                if not self.indirect:
                    raise IndirectNotNegotiated(f"descriptor {index} is INDIRECT")
                if flags & VRING_DESC_F_NEXT:
                    raise IndirectWithNext(f"descriptor {index} has INDIRECT and NEXT")
                if length == 0 or length & 15:
                    raise BadIndirectLength(f"indirect table of {length} bytes")
                if addr + length > iova_limit:
                    raise AddressOverflow(f"indirect table 0x{addr:x}+{length}")
                view = mem_view(addr, length, False)
                table = view if view is not None else self._indirect_table(addr, length)
                limit = length >> 4
                in_indirect = True
                index = count = 0
                continue
            if length:
                if addr + length > iova_limit:
                    raise AddressOverflow(f"descriptor {index}: 0x{addr:x}+{length}")
                if flags & VRING_DESC_F_WRITE:
                    seen_write = True
                    write_len += length
                    view = mem_view(addr, length, True)
                    if view is None:
                        writable.extend(self._translate(addr, length, True))
                    else:
                        writable.append(view)
                else:
                    if seen_write:
                        raise ReadableAfterWritable(
                            f"descriptor {index} is readable after writable"
                        )
                    read_len += length
                    view = mem_view(addr, length, False)
                    if view is None:
                        readable.extend(self._translate(addr, length, False))
                    else:
                        readable.append(view)
            elif flags & VRING_DESC_F_WRITE:
                seen_write = True
            elif seen_write:
                raise ReadableAfterWritable(f"descriptor {index} is readable after writable")
            if not flags & VRING_DESC_F_NEXT:
                if read_len + write_len > _MAX_CHAIN_BYTES:
                    # Each length is < 2**32 and the count is bounded, so checking the
                    # total once at the end is exact.
                    raise ChainLengthOverflow(f"chain at head {head} is longer than 2**32-1 bytes")
                return DescriptorChain(head, readable, writable, read_len, write_len)
            index = nxt
            if index >= limit:
                raise DescriptorOutOfRange(f"next index {index} >= table size {limit}")

    def last_writable_byte(self, head: int) -> memoryview | None:
        """Best effort, for a chain that failed validation: a view of the last byte of
        its last device-writable descriptor (where a virtio-blk driver expects the
        status), or None if the chain gives no usable one.  Never raises."""
        try:
            table = self._desc
            limit = self.size
            index, count, in_indirect = head, 0, False
            last: tuple[int, int] | None = None
            while count < limit:
                count += 1
                addr, length, flags, nxt = DESC.unpack_from(table, index << 4)
                if flags & VRING_DESC_F_INDIRECT:
                    if in_indirect or not self.indirect or length == 0 or length & 15:
                        return None
                    view = self.memory.view(addr, length, False)
                    if view is None:
                        return None
                    table, limit, index, count, in_indirect = view, length >> 4, 0, 0, True
                    continue
                if flags & VRING_DESC_F_WRITE and length:
                    last = (addr, length)
                if not flags & VRING_DESC_F_NEXT or nxt >= limit:
                    break
                index = nxt
            if last is None or last[0] + last[1] > _IOVA_LIMIT:
                return None
            return self.memory.view(last[0] + last[1] - 1, 1, True)
        except Exception:
            return None

    # -- completing requests -----------------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Return ``head`` to the driver with ``written`` bytes in its writable buffers."""
        if not 0 <= head < self.size or not self._inflight[head]:
            raise ValueError(f"head {head} is not in flight")
        self._inflight[head] = 0
        self._inflight_count -= 1
        idx = self._used_idx
        USED_ELEM.pack_into(self._used, 4 + 8 * (idx & self._mask), head, written)
        idx = (idx + 1) & 0xFFFF
        self._used_idx = idx
        self._used16[1] = idx

    def push_batch(self, completions: list[tuple[int, int]]) -> None:
        """Several ``(head, written)`` pairs; used->idx is written once, at the end."""
        inflight = self._inflight
        used = self._used
        used16 = self._used16
        mask = self._mask
        idx = self._used_idx
        for head, written in completions:
            if not 0 <= head < self.size or not inflight[head]:
                self._used_idx = idx
                used16[1] = idx
                raise ValueError(f"head {head} is not in flight")
            inflight[head] = 0
            self._inflight_count -= 1
            USED_ELEM.pack_into(used, 4 + 8 * (idx & mask), head, written)
            idx = (idx + 1) & 0xFFFF
        self._used_idx = idx
        used16[1] = idx

    def should_notify(self) -> bool:
        """Whether to interrupt the driver for the entries pushed since the last call."""
        new = self._used_idx
        old = self._signalled_used
        valid = self._signalled_valid
        if valid and new == old:
            return False
        self._signalled_used = new
        self._signalled_valid = True
        _fence_acquire()  # full_fence(), inlined
        _fence_release()
        avail = self._avail
        if (
            self.notify_on_empty
            and self._inflight_count == 0
            and U16.unpack_from(avail, 2)[0] == self._last_avail
        ):
            return True
        if self.event_idx:
            used_event = U16.unpack_from(avail, self._used_event_off)[0]
            return not valid or vring_need_event(used_event, new, old)
        return not U16.unpack_from(avail, 0)[0] & VRING_AVAIL_F_NO_INTERRUPT

    # -- kick suppression --------------------------------------------------------------

    def suppress_kicks(self, suppress: bool) -> None:
        """Ask the driver not to kick (while the device polls), or to kick again.

        With EVENT_IDX, suppressing sets avail_event one behind the last avail index
        the device consumed, so that no addition steps over it (the driver's
        ``vring_need_event`` stays false) and leaves it there while the device pops;
        un-suppressing takes effect at the next empty pop, which re-arms.  Without
        EVENT_IDX, VRING_USED_F_NO_NOTIFY is set/cleared.
        """
        self._kicks_suppressed = suppress
        if self.event_idx:
            if suppress:
                self._used16[self._avail_event_i] = (self._last_avail - 1) & 0xFFFF
            return
        flags = U16.unpack_from(self._used, 0)[0]
        if suppress:
            flags |= VRING_USED_F_NO_NOTIFY
        else:
            flags &= ~VRING_USED_F_NO_NOTIFY
        self._used16[0] = flags

    def set_avail_event(self, idx: int) -> None:
        """Write avail_event directly (EVENT_IDX): kick me once avail idx passes ``idx``."""
        self._used16[self._avail_event_i] = idx & 0xFFFF
