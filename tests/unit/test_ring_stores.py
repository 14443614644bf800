"""Ring fields written by one side are read by the other side *while* they are written.

A driver on another CPU polls used->idx and avail_event while the device stores them
(and the kernel reads the Linux AIO ring's head while vexport stores it).  A store must
therefore never expose a value that was never meant: ``struct.pack_into`` zero-fills
its target before writing the value, and a driver that reads that 0 consumes up to
65535 stale used entries.  These tests run a reader process on the shared memory while
the writer works, and fail if the reader ever sees a value outside what was written.
They need two CPUs to catch anything (with one, the reader rarely runs mid-store).
"""

from __future__ import annotations

import mmap
import os
import struct
import time

import pytest

from vexport.virtio.memory import PERM_RW, RegionMemory
from vexport.virtio.virtqueue import DESC, SplitQueue

pytestmark = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="a concurrent reader needs a second CPU"
)

U16 = struct.Struct("H")
SIZE = 8
DESC_ADDR, AVAIL_ADDR, USED_ADDR, DATA_ADDR = 0x1000, 0x1100, 0x1200, 0x2000
START = 1000  # indices start here and stay below 65535: a value < START was never written
SECONDS = 0.7


def _watch(mm: mmap.mmap, offsets: list[int], report: int, seconds: float) -> None:
    """Child: read the fields until the time is up; write (reads, bad reads, max seen)."""
    reads = bad = top = 0
    unpack = U16.unpack_from
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(200):
            for off in offsets:
                v = unpack(mm, off)[0]
                if v < START:
                    bad += 1
                elif v > top:
                    top = v
            reads += 1
    os.write(report, struct.pack("QQQ", reads, bad, top))


def _watched(offsets: list[int], work: object, mm: mmap.mmap) -> tuple[int, int, int]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            _watch(mm, offsets, w, SECONDS)
        finally:
            os._exit(0)
    os.close(w)
    try:
        time.sleep(0.05)  # let the reader start
        end = time.monotonic() + SECONDS - 0.1
        while time.monotonic() < end:
            work()  # type: ignore[operator]
        data = os.read(r, 24)
    finally:
        os.waitpid(pid, 0)
        os.close(r)
    reads, bad, top = struct.unpack("QQQ", data)
    return reads, bad, top


def test_the_driver_never_reads_a_used_idx_or_avail_event_that_was_not_written() -> None:
    mm = mmap.mmap(-1, 0x3000)  # shared with the forked reader
    memory = RegionMemory()
    memory.add_region(0x1000, mm, PERM_RW)
    DESC.pack_into(mm, DESC_ADDR - 0x1000, DATA_ADDR, 16, 0, 0)  # one readable descriptor
    U16.pack_into(mm, AVAIL_ADDR - 0x1000 + 2, START)
    U16.pack_into(mm, USED_ADDR - 0x1000 + 2, START)
    U16.pack_into(mm, USED_ADDR - 0x1000 + 4 + 8 * SIZE, START)  # avail_event
    vq = SplitQueue(
        memory, SIZE, DESC_ADDR, AVAIL_ADDR, USED_ADDR, event_idx=True, last_avail_idx=START
    )
    used_idx_off = USED_ADDR - 0x1000 + 2
    avail_event_off = USED_ADDR - 0x1000 + 4 + 8 * SIZE
    state = {"avail": START}

    def one_request() -> None:
        avail = state["avail"]
        if avail >= 65000:
            return
        U16.pack_into(mm, AVAIL_ADDR - 0x1000 + 4 + 2 * (avail % SIZE), 0)
        avail += 1
        state["avail"] = avail
        U16.pack_into(mm, AVAIL_ADDR - 0x1000 + 2, avail)
        chains = vq.pop_batch(4)  # pops one, then finds the ring empty: avail_event store
        assert [c.head for c in chains] == [0]
        vq.suppress_kicks(True)  # avail_event = last_avail - 1: another store
        vq.suppress_kicks(False)
        vq.push_batch([(0, 0)])  # used->idx store
        assert vq.should_notify() in (True, False)

    reads, bad, top = _watched([used_idx_off, avail_event_off], one_request, mm)
    vq.release()
    assert state["avail"] > START + 1000, "the writer did not get going"
    assert reads > 1000 and top > START, "the reader did not run alongside the writer"
    assert bad == 0, f"the reader saw {bad} values that were never written (of {reads} reads)"


def test_the_device_never_reads_an_avail_idx_or_used_event_the_test_driver_did_not_write() -> None:
    """The same for the vhost-vdpa test driver (`vexport.tools.vhost_vdpa_blk`), whose
    avail->idx the device polls: a transient 0 there makes the device see the avail
    index run ahead and stop the queue."""
    from vexport.tools import vhost_vdpa_blk as vb

    region = vb.Region("ring", 0x3000)
    region.iova = 0x10000
    ring = vb.DriverRing(region, 0, SIZE, event_idx=True)
    ring.avail_idx = ring.kicked_idx = ring.last_used = START
    U16.pack_into(region.mm, ring.avail_off + 2, START)
    U16.pack_into(region.mm, ring.avail_off + 4 + 2 * SIZE, START)  # used_event

    def one_request() -> None:
        if ring.avail_idx >= 65000:
            return
        _head, descs = ring.add([(0x20000, 16, False)])
        ring.need_kick()
        ring.free.extend(descs)
        ring.last_used = ring.avail_idx
        ring.arm()  # used_event store

    try:
        reads, bad, top = _watched(
            [ring.avail_off + 2, ring.avail_off + 4 + 2 * SIZE], one_request, region.mm
        )
    finally:
        region.close()
    assert reads > 1000 and top > START, "the reader did not run alongside the writer"
    assert bad == 0, f"the reader saw {bad} values that were never written (of {reads} reads)"
