"""Guest (driver) memory as seen by a virtio device: IOVA ranges backed by buffers.

Theory of operation
-------------------
Everything a virtio driver hands to the device is an I/O virtual address (IOVA).  The
device reaches it through a *memory object*; the virtqueue and virtio-blk code never
touch a buffer any other way, so they can be tested with bytearrays and run unchanged
over mmap'd VDUSE regions.

The protocol has two entry points:

``view(iova, length, write)``
    fast path: a memoryview of exactly ``length`` bytes when the range lies inside one
    region with the needed permission, else ``None`` (the caller then uses
    ``translate``).
``translate(iova, length, write)``
    general path: a list of memoryviews covering the range, one per region crossed
    (a buffer may straddle two adjacent regions), or ``GuestMemoryError``.

`RegionMemory` implements both over a sorted list of regions, and ``region_at(iova)``,
which the virtqueue's fast path (`SplitQueue.pop_simple`) uses to read descriptors in
place, by offset, without making a view per buffer.  A ``fault`` callback
may add regions on a miss: the VDUSE export uses it to call IOTLB_GET_FD and mmap the
region lazily; an UPDATE_IOTLB message maps to `remove_range`.  Memoryviews handed
out keep the underlying buffer exported, so an mmap cannot be closed while a request
still holds a view into it: the export drains requests first.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Protocol

from vexport.virtio.errors import GuestMemoryError

# Region permissions, the same values as VDUSE_ACCESS_RO / _WO / _RW: the device may
# read (RO), write (WO) or both.
PERM_READ = 0x1
PERM_WRITE = 0x2
PERM_RW = PERM_READ | PERM_WRITE

IOVA_LIMIT = 1 << 64


class GuestMemory(Protocol):
    """What the virtqueue and virtio-blk need from driver memory."""

    def view(self, iova: int, length: int, write: bool) -> memoryview | None:
        """A contiguous view of ``[iova, iova+length)``, or None if not one region."""
        ...

    def translate(self, iova: int, length: int, write: bool) -> list[memoryview]:
        """Views covering ``[iova, iova+length)``; raise `GuestMemoryError` if unmapped."""
        ...


class Region:
    """One IOVA range ``[start, start+len(buffer))`` backed by ``buffer``."""

    __slots__ = ("end", "perm", "start", "view")

    def __init__(self, start: int, buffer: memoryview, perm: int) -> None:
        self.start = start
        self.view = buffer
        self.end = start + len(buffer)
        self.perm = perm

    def __repr__(self) -> str:
        return f"Region(0x{self.start:x}-0x{self.end - 1:x}, perm={self.perm})"


class RegionMemory:
    """`GuestMemory` over a set of non-overlapping regions, sorted by IOVA.

    ``fault(iova)`` (optional) is called when no region holds ``iova``; it may call
    `add_region` and return True to have the lookup retried once.
    """

    def __init__(self, fault: Callable[[int], bool] | None = None) -> None:
        self._starts: list[int] = []
        self._regions: list[Region] = []
        self._last: Region | None = None
        self._fault = fault
        # Bumped whenever regions are removed: a cached Region is valid while it stays.
        self.epoch = 0

    @property
    def regions(self) -> list[Region]:
        return list(self._regions)

    def add_region(self, start: int, buffer: object, perm: int = PERM_RW) -> Region:
        """Map ``buffer`` (anything exporting a byte buffer) at IOVA ``start``."""
        view = memoryview(buffer).cast("B")  # type: ignore[arg-type]
        if view.readonly and perm & PERM_WRITE:
            raise ValueError("a read-only buffer cannot back a writable region")
        if start < 0 or start + len(view) > IOVA_LIMIT or len(view) == 0:
            raise ValueError("region outside the 64-bit IOVA space or empty")
        region = Region(start, view, perm)
        pos = bisect.bisect_right(self._starts, start)
        if pos > 0 and self._regions[pos - 1].end > start:
            raise ValueError(f"{region!r} overlaps {self._regions[pos - 1]!r}")
        if pos < len(self._regions) and self._regions[pos].start < region.end:
            raise ValueError(f"{region!r} overlaps {self._regions[pos]!r}")
        self._starts.insert(pos, start)
        self._regions.insert(pos, region)
        return region

    def remove_range(self, start: int, last: int) -> list[Region]:
        """Forget every region overlapping ``[start, last]``; return them (to unmap)."""
        keep: list[Region] = []
        removed: list[Region] = []
        for region in self._regions:
            if region.start <= last and region.end - 1 >= start:
                removed.append(region)
            else:
                keep.append(region)
        self._regions = keep
        self._starts = [r.start for r in keep]
        self._last = None
        self.epoch += 1
        return removed

    def _find(self, iova: int) -> Region | None:
        pos = bisect.bisect_right(self._starts, iova) - 1
        if pos >= 0:
            region = self._regions[pos]
            if iova < region.end:
                return region
        if self._fault is not None and self._fault(iova):
            pos = bisect.bisect_right(self._starts, iova) - 1
            if pos >= 0 and iova < self._regions[pos].end:
                return self._regions[pos]
        return None

    def region_at(self, iova: int) -> Region | None:
        """The region holding ``iova`` (faulting it in), or None."""
        return self._find(iova)

    def view(self, iova: int, length: int, write: bool) -> memoryview | None:
        region = self._last
        if region is not None:
            offset = iova - region.start
            if offset >= 0 and iova + length <= region.end:
                if region.perm & (PERM_WRITE if write else PERM_READ):
                    return region.view[offset : offset + length]
                return None
        region = self._find(iova)
        if region is None or iova + length > region.end:
            return None
        self._last = region
        if not region.perm & (PERM_WRITE if write else PERM_READ):
            return None
        offset = iova - region.start
        return region.view[offset : offset + length]

    def translate(self, iova: int, length: int, write: bool) -> list[memoryview]:
        if iova < 0 or length < 0 or iova + length > IOVA_LIMIT:
            raise GuestMemoryError(f"IOVA range 0x{iova:x}+{length} overflows 64 bits")
        need = PERM_WRITE if write else PERM_READ
        views: list[memoryview] = []
        while length > 0:
            region = self._find(iova)
            if region is None:
                raise GuestMemoryError(f"IOVA 0x{iova:x} is not mapped")
            if not region.perm & need:
                raise GuestMemoryError(
                    f"IOVA 0x{iova:x} is not {'writable' if write else 'readable'}"
                )
            offset = iova - region.start
            chunk = min(length, region.end - iova)
            views.append(region.view[offset : offset + chunk])
            iova += chunk
            length -= chunk
        return views

    def read(self, iova: int, length: int) -> bytes:
        """Copy bytes out (test and control-path convenience)."""
        return b"".join(bytes(v) for v in self.translate(iova, length, False))

    def write(self, iova: int, data: bytes) -> None:
        """Copy bytes in (test and control-path convenience), ignoring permissions."""
        pos = 0
        while pos < len(data):
            region = self._find(iova + pos)
            if region is None:
                raise GuestMemoryError(f"IOVA 0x{iova + pos:x} is not mapped")
            offset = iova + pos - region.start
            chunk = min(len(data) - pos, region.end - (iova + pos))
            region.view[offset : offset + chunk] = data[pos : pos + chunk]
            pos += chunk
