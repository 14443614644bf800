"""Errors raised for malformed rings and unreachable driver memory.

::

    GuestMemoryError             an IOVA range is not mapped / lacks the permission
    VirtqueueError               the driver broke a split-ring rule (virtio 1.2, 2.7)
     +-- AvailIndexRunAhead      avail idx more than queue size ahead
     +-- HeadOutOfRange          avail ring entry >= queue size
     +-- HeadInFlight            head offered again before it was used
     +-- DescriptorOutOfRange    next index outside the table
     +-- ChainTooLong            loop, or chain longer than the table
     +-- IndirectNotNegotiated   INDIRECT without VIRTIO_F_INDIRECT_DESC
     +-- NestedIndirect          INDIRECT inside an indirect table
     +-- IndirectWithNext        INDIRECT and NEXT on one descriptor
     +-- BadIndirectLength       indirect table length 0 or not a multiple of 16
     +-- ReadableAfterWritable   device-readable descriptor after a writable one
     +-- AddressOverflow         addr + len beyond 2**64
     +-- ChainLengthOverflow     total chain length beyond 2**32 - 1
     +-- DescriptorOutsideMemory buffer (or table) not in mapped memory
     +-- RingOutsideMemory       a ring area is not mapped (set-up time)
     +-- BadQueueSize            queue size 0, above 32768 or not a power of two

Every `VirtqueueError` carries ``head``: the head index that was consumed from the
avail ring and is now in flight (so that the device may complete it with used length
0 by ``queue.push(head, 0)``), or None when no head could be taken (the device should
then set NEEDS_RESET: it has no way to return the buffer).
"""

from __future__ import annotations


class GuestMemoryError(Exception):
    """An IOVA range is not (entirely) mapped with the access the device needs."""


class VirtqueueError(Exception):
    """The driver wrote something the split-ring rules forbid."""

    def __init__(self, message: str, head: int | None = None) -> None:
        super().__init__(message)
        self.head = head


class AvailIndexRunAhead(VirtqueueError):
    """avail->idx is more than queue size entries ahead of the device.

    virtio 1.2, 2.7.6 / 2.7.13.3: idx counts the entries the driver added, and the
    ring only holds queue-size of them; nothing is consumed, the queue is unusable.
    """


class HeadOutOfRange(VirtqueueError):
    """An avail ring entry names a descriptor >= queue size (virtio 1.2, 2.7.6)."""


class HeadInFlight(VirtqueueError):
    """The driver re-offered a head the device has not used yet.

    virtio 1.2, 2.7.13: a buffer belongs to the device from the time it is made
    available until it is returned in the used ring.  The duplicate entry is skipped;
    ``head`` is None because the earlier request still owns that head.
    """


class DescriptorOutOfRange(VirtqueueError):
    """``next`` points outside the descriptor (or indirect) table (virtio 1.2, 2.7.5)."""


class ChainTooLong(VirtqueueError):
    """A chain has more descriptors than its table: a loop (virtio 1.2, 2.7.5.2, 2.7.5.3.1)."""


class IndirectNotNegotiated(VirtqueueError):
    """VIRTQ_DESC_F_INDIRECT without VIRTIO_F_INDIRECT_DESC (virtio 1.2, 2.7.5.3.1)."""


class NestedIndirect(VirtqueueError):
    """VIRTQ_DESC_F_INDIRECT inside an indirect table (virtio 1.2, 2.7.5.3.1)."""


class IndirectWithNext(VirtqueueError):
    """VIRTQ_DESC_F_INDIRECT together with VIRTQ_DESC_F_NEXT (virtio 1.2, 2.7.5.3.1)."""


class BadIndirectLength(VirtqueueError):
    """Indirect table length 0 or not a multiple of 16 (virtio 1.2, 2.7.5.3)."""


class ReadableAfterWritable(VirtqueueError):
    """A device-readable descriptor follows a device-writable one (virtio 1.2, 2.7.4.2)."""


class AddressOverflow(VirtqueueError):
    """addr + len does not fit in 64 bits (virtio 1.2, 2.7.5)."""


class ChainLengthOverflow(VirtqueueError):
    """The chain's total length exceeds 2**32 - 1 bytes (virtio 1.2, 2.7.5.2)."""


class DescriptorOutsideMemory(VirtqueueError):
    """A buffer or indirect table is not in memory the device can access (2.7.5)."""


class RingOutsideMemory(VirtqueueError):
    """A descriptor table / avail ring / used ring is not mapped (virtio 1.2, 2.7)."""


class BadQueueSize(VirtqueueError):
    """Queue size 0, above 32768 or not a power of two (virtio 1.2, 2.7)."""
