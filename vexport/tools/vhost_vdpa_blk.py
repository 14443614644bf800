"""A userspace virtio-blk driver for ``/dev/vhost-vdpa-N``: the test client standing in for a VM.

Theory of operation
-------------------
It does at the vhost-vdpa interface what a VM monitor plus a guest's virtio-blk driver
do together (QEMU's order, see docs/vhost-vdpa.md):

1. ``open()``: SET_OWNER, check the device id (2 = block), read the offered features,
   negotiate backend features (IOTLB_MSG_V2, IOTLB_BATCH).
2. ``setup()``: status 0, ACK|DRIVER, SET_FEATURES, FEATURES_OK (checked to stick),
   read the config space (capacity, blk_size, num_queues), program every queue (num,
   base, ring IOVAs, kick and call eventfds), map guest memory, enable the queues,
   DRIVER_OK.
3. Requests: `run` keeps up to ``depth`` requests in flight on each queue, kicks through
   the kick eventfd, waits on the call eventfds (always with a time limit), reads used
   entries and records each request's status and data.

Guest memory is *split RAM*: three memfd-backed MAP_SHARED regions (the daemon can only
reach file-backed memory) at unrelated IOVAs, the way a VM's RAM below and above 4 GiB
is: ``rings`` (descriptor tables, avail and used rings, request headers, status bytes,
indirect tables), ``data_a`` and ``data_b`` (data buffers).  Every data transfer of
1 KiB or more is split into two descriptors, one in each data region, so the device
must translate through both.  Each region is mapped with a ``vhost_msg_v2`` IOTLB
UPDATE write (inside BATCH_BEGIN/END when negotiated); `remap` invalidates a region and
maps it again (same or new IOVA); `reset` is status 0 followed by a fresh `setup`.

The driver's own split ring (`DriverRing`) lives in the ``rings`` mapping: the device
writes the used ring there and the driver reads it back through the same memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import random
import select
import struct
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from vexport.kernel import vhost
from vexport.virtio import blk as vblk

DESC = struct.Struct("<QIHH")  # addr, len, flags, next
U16 = struct.Struct("H")  # native: one 2-byte store/load (see vexport/virtio/virtqueue.py)
USED_ELEM = struct.Struct("<II")
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4

PAGE = mmap.PAGESIZE
SLOT_META = 256  # per-slot bytes in the rings region: header, segment, status, table
META_HEADER, META_SEGMENT, META_STATUS, META_TABLE = 0, 16, 32, 64
NOT_DONE = -1

_fence_lock = threading.Lock()


def _fence() -> None:
    """A full barrier (a locked instruction on x86) between a store and a later load."""
    _fence_lock.acquire()
    _fence_lock.release()


def _need_event(event: int, new: int, old: int) -> bool:
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def _align(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


class DeviceError(Exception):
    """The device refused a step of the set-up or stopped answering."""


# -- guest memory --------------------------------------------------------------------------


class Region:
    """One memfd-backed piece of guest RAM; ``iova`` is None while it is unmapped."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = _align(size, PAGE)
        self.fd = os.memfd_create(f"vhost-vdpa-blk-{name}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED)
        self.view = memoryview(self.mm)
        self.uaddr = vhost.buffer_address(self.mm)
        self.iova: int | None = None

    def addr(self, offset: int) -> int:
        if self.iova is None:
            raise DeviceError(f"region {self.name} is not mapped")
        return self.iova + offset

    def close(self) -> None:
        self.view.release()
        self.mm.close()
        os.close(self.fd)


# -- driver side of a split ring -------------------------------------------------------------


def _store16(view: memoryview, offset: int, value: int) -> None:
    """Store a ring index the device may be reading: one two-byte store.
    ``struct.pack_into`` would zero the field first, and a device polling it on another
    CPU could read that 0 (see vexport/virtio/virtqueue.py)."""
    with view[offset : offset + 2] as field, field.cast("H") as u16:
        u16[0] = value


class DriverRing:
    """Descriptor table, avail ring and used ring of one queue, at ``base`` in ``region``."""

    def __init__(self, region: Region, base: int, size: int, event_idx: bool) -> None:
        self.region = region
        self.size = size
        self.event_idx = event_idx
        self.desc_off = base
        self.avail_off = base + 16 * size
        self.used_off = _align(self.avail_off + 6 + 2 * size, PAGE)
        self.end = self.used_off + 6 + 8 * size
        self.reset()

    @staticmethod
    def footprint(size: int) -> int:
        return _align(_align(16 * size + 6 + 2 * size, PAGE) + 6 + 8 * size, PAGE)

    def reset(self) -> None:
        v = self.region.view
        v[self.desc_off : self.end] = bytes(self.end - self.desc_off)
        self.free = list(range(self.size))
        self.avail_idx = 0
        self.kicked_idx = 0
        self.last_used = 0

    @property
    def addrs(self) -> tuple[int, int, int]:
        """(desc, avail, used) IOVAs."""
        r = self.region
        return r.addr(self.desc_off), r.addr(self.avail_off), r.addr(self.used_off)

    def write_desc(self, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        DESC.pack_into(self.region.view, self.desc_off + 16 * index, addr, length, flags, nxt)

    def add(self, buffers: Sequence[tuple[int, int, bool]]) -> tuple[int, list[int]]:
        """Chain ``(iova, length, device_writable)`` buffers; returns (head, descriptors)."""
        if len(buffers) > len(self.free):
            raise DeviceError("out of descriptors")
        idxs = [self.free.pop() for _ in buffers]
        for i, (addr, length, writable) in enumerate(buffers):
            flags = VRING_DESC_F_WRITE if writable else 0
            nxt = 0
            if i + 1 < len(buffers):
                flags |= VRING_DESC_F_NEXT
                nxt = idxs[i + 1]
            self.write_desc(idxs[i], addr, length, flags, nxt)
        self._offer(idxs[0])
        return idxs[0], idxs

    def add_indirect(self, table_addr: int, table_len: int) -> tuple[int, list[int]]:
        head = self.free.pop()
        self.write_desc(head, table_addr, table_len, VRING_DESC_F_INDIRECT, 0)
        self._offer(head)
        return head, [head]

    def _offer(self, head: int) -> None:
        slot = self.avail_idx % self.size
        U16.pack_into(self.region.view, self.avail_off + 4 + 2 * slot, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        _store16(self.region.view, self.avail_off + 2, self.avail_idx)  # publish

    def need_kick(self) -> bool:
        """After publishing: must the device be told (EVENT_IDX: avail_event crossed)?"""
        old, new = self.kicked_idx, self.avail_idx
        self.kicked_idx = new
        if old == new:
            return False
        if not self.event_idx:
            flags = U16.unpack_from(self.region.view, self.used_off)[0]
            return not flags & 1  # VRING_USED_F_NO_NOTIFY
        _fence()
        event = U16.unpack_from(self.region.view, self.used_off + 4 + 8 * self.size)[0]
        return _need_event(event, new, old)

    def describe(self) -> str:
        """The ring's indices and used entries, for error reports."""
        v, n = self.region.view, self.size
        used = [USED_ELEM.unpack_from(v, self.used_off + 4 + 8 * i) for i in range(n)]
        avail = [U16.unpack_from(v, self.avail_off + 4 + 2 * i)[0] for i in range(n)]
        avail_event = U16.unpack_from(v, self.used_off + 4 + 8 * n)[0]
        return (
            f"avail_idx {self.avail_idx}, kicked_idx {self.kicked_idx}, used_idx "
            f"{self.used_idx()}, last_used {self.last_used}, avail_event {avail_event}, "
            f"avail ring {avail}, used ring {used}"
        )

    def used_idx(self) -> int:
        return int(U16.unpack_from(self.region.view, self.used_off + 2)[0])

    def arm(self) -> bool:
        """Ask for an interrupt at the next used entry; True if one is already there."""
        if self.event_idx:
            _store16(self.region.view, self.avail_off + 4 + 2 * self.size, self.last_used)
        _fence()
        return self.used_idx() != self.last_used

    def take_used(self) -> list[tuple[int, int]]:
        out = []
        used = self.used_idx()
        while self.last_used != used:
            slot = self.last_used % self.size
            out.append(USED_ELEM.unpack_from(self.region.view, self.used_off + 4 + 8 * slot))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


# -- requests ------------------------------------------------------------------------------


@dataclass(eq=False)
class Request:
    """One virtio-blk request and, after `VhostVdpaBlk.run`, its outcome."""

    type: int
    sector: int = 0
    data: bytes = b""  # OUT payload
    length: int = 0  # IN / GET_ID: bytes to read
    num_sectors: int = 0  # DISCARD / WRITE_ZEROES
    flags: int = 0  # WRITE_ZEROES: UNMAP
    bad_iova: int | None = None  # put the data buffer at this (unmapped) IOVA
    status: int = NOT_DONE
    used_len: int = -1
    result: bytes = b""

    @classmethod
    def read(cls, sector: int, length: int) -> Request:
        return cls(vblk.VIRTIO_BLK_T_IN, sector, length=length)

    @classmethod
    def write(cls, sector: int, data: bytes) -> Request:
        return cls(vblk.VIRTIO_BLK_T_OUT, sector, data=data)

    @classmethod
    def flush(cls) -> Request:
        return cls(vblk.VIRTIO_BLK_T_FLUSH)

    @classmethod
    def get_id(cls) -> Request:
        return cls(vblk.VIRTIO_BLK_T_GET_ID, length=vblk.VIRTIO_BLK_ID_BYTES)

    @classmethod
    def discard(cls, sector: int, num_sectors: int) -> Request:
        return cls(vblk.VIRTIO_BLK_T_DISCARD, sector, num_sectors=num_sectors)

    @classmethod
    def write_zeroes(cls, sector: int, num_sectors: int, unmap: bool = False) -> Request:
        flags = vblk.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0
        return cls(vblk.VIRTIO_BLK_T_WRITE_ZEROES, sector, num_sectors=num_sectors, flags=flags)


@dataclass
class Config:
    capacity: int  # bytes
    blk_size: int
    num_queues: int
    seg_max: int
    raw: bytes


@dataclass
class Queue:
    index: int
    ring: DriverRing
    kick: int
    call: int
    meta_off: int  # slot meta area in the rings region
    data_off: int  # slot data area in both data regions
    free_slots: list[int] = field(default_factory=list)
    inflight: dict[int, tuple[int, list[int], Request]] = field(default_factory=dict)


DEFAULT_FEATURES = (
    vblk.VIRTIO_RING_F_EVENT_IDX,
    vblk.VIRTIO_RING_F_INDIRECT_DESC,
    vblk.VIRTIO_BLK_F_SEG_MAX,
    vblk.VIRTIO_BLK_F_BLK_SIZE,
    vblk.VIRTIO_BLK_F_FLUSH,
    vblk.VIRTIO_BLK_F_TOPOLOGY,
    vblk.VIRTIO_BLK_F_DISCARD,
    vblk.VIRTIO_BLK_F_WRITE_ZEROES,
    vblk.VIRTIO_BLK_F_MQ,
    vblk.VIRTIO_BLK_F_RO,
)

RING_IOVA = 0x10_0000  # 1 MiB
DATA_A_IOVA = 0x4000_0000  # 1 GiB
DATA_B_IOVA = 0x1_0000_0000  # 4 GiB


class VhostVdpaBlk:
    """The driver.  ``depth`` bounds requests in flight per queue; ``max_io`` their size."""

    def __init__(
        self,
        path: str,
        *,
        queue_size: int = 64,
        depth: int = 16,
        max_io: int = 64 * 1024,
        event_idx: bool = True,
        indirect: bool = False,
        num_queues: int | None = None,
    ) -> None:
        self.path = path
        self.dev = vhost.VhostVdpa.open(path)
        self.queue_size = queue_size
        self.depth = min(depth, queue_size // 4)
        self.max_io = max_io
        self.want_event_idx = event_idx
        self.want_indirect = indirect
        self.want_queues = num_queues
        self.features = 0
        self.backend_features = 0
        self.config: Config | None = None
        self.queues: list[Queue] = []
        self.regions: dict[str, Region] = {}
        self.stats = {
            "kicks": 0,
            "interrupts": 0,
            "missed_interrupts": 0,
            "iotlb_msgs": 0,
            "max_inflight": 0,
        }
        self._mapped: set[str] = set()
        try:
            self._open()
        except BaseException:
            self.dev.close()
            raise

    # -- set-up ---------------------------------------------------------------------

    def _open(self) -> None:
        d = self.dev
        d.set_owner()
        self.device_id = d.get_device_id()
        if self.device_id != vblk.VIRTIO_ID_BLOCK:
            raise DeviceError(f"{self.path}: device id {self.device_id}, not a block device")
        self.offered = d.get_features()
        backend = d.get_backend_features()
        want = (1 << vhost.VHOST_BACKEND_F_IOTLB_MSG_V2) | (1 << vhost.VHOST_BACKEND_F_IOTLB_BATCH)
        if not backend & (1 << vhost.VHOST_BACKEND_F_IOTLB_MSG_V2):
            raise DeviceError(f"{self.path}: no IOTLB_MSG_V2 backend feature ({backend:#x})")
        self.backend_features = backend & want
        d.set_backend_features(self.backend_features)
        self.max_queue_size = d.get_vring_num()
        self.vqs_count = d.get_vqs_count()

    @property
    def batching(self) -> bool:
        return bool(self.backend_features & (1 << vhost.VHOST_BACKEND_F_IOTLB_BATCH))

    def _add_status(self, bits: int) -> int:
        status = self.dev.get_status() | bits
        self.dev.set_status(status)
        got = self.dev.get_status()
        if got & bits != bits:
            raise DeviceError(f"status {status:#x} did not stick (device says {got:#x})")
        return got

    def setup(self) -> None:
        """Negotiate, program the queues, map memory, DRIVER_OK (also after `reset`)."""
        d = self.dev
        d.set_status(0)
        self._add_status(vhost.VIRTIO_CONFIG_S_ACKNOWLEDGE | vhost.VIRTIO_CONFIG_S_DRIVER)
        required = (1 << vblk.VIRTIO_F_VERSION_1) | (1 << vblk.VIRTIO_F_ACCESS_PLATFORM)
        if self.offered & required != required:
            raise DeviceError(f"device lacks VERSION_1/ACCESS_PLATFORM ({self.offered:#x})")
        wanted = [b for b in DEFAULT_FEATURES if b != vblk.VIRTIO_RING_F_EVENT_IDX]
        if self.want_event_idx:
            wanted.append(vblk.VIRTIO_RING_F_EVENT_IDX)
        if not self.want_indirect:
            wanted.remove(vblk.VIRTIO_RING_F_INDIRECT_DESC)
        self.features = required | (self.offered & sum(1 << b for b in wanted))
        d.set_features(self.features)
        self._add_status(vhost.VIRTIO_CONFIG_S_FEATURES_OK)
        self.config = self._read_config()
        nq = self.config.num_queues if self.has(vblk.VIRTIO_BLK_F_MQ) else 1
        if self.want_queues is not None:
            nq = min(nq, self.want_queues)
        size = min(self.queue_size, self.max_queue_size)
        if not self.regions:
            self._make_regions(nq, size)
        self._make_queues(nq, size)
        self.map_all()
        for q in self.queues:
            d.set_vring_enable(q.index, True)
        self._add_status(vhost.VIRTIO_CONFIG_S_DRIVER_OK)

    def has(self, bit: int) -> bool:
        return bool(self.features & (1 << bit))

    def _read_config(self) -> Config:
        size = min(self.dev.get_config_size(), vblk.CONFIG_SIZE)
        raw = self.dev.get_config(0, size).ljust(vblk.CONFIG_SIZE, b"\0")
        fields = vblk.CONFIG.unpack(raw)
        capacity, seg_max, blk_size, num_queues = fields[0], fields[2], fields[6], fields[13]
        if not self.has(vblk.VIRTIO_BLK_F_BLK_SIZE):
            blk_size = 512
        return Config(capacity * 512, blk_size, max(num_queues, 1), seg_max, raw[:size])

    def _make_regions(self, nq: int, size: int) -> None:
        ring_bytes = nq * self._queue_block(size)
        data_bytes = nq * self.depth * self.max_io
        self.regions = {
            "rings": Region("rings", ring_bytes),
            "data_a": Region("data_a", data_bytes),
            "data_b": Region("data_b", data_bytes),
        }
        self.regions["rings"].iova = RING_IOVA
        self.regions["data_a"].iova = DATA_A_IOVA
        self.regions["data_b"].iova = DATA_B_IOVA
        self._mapped = set()

    def _queue_block(self, size: int) -> int:
        return DriverRing.footprint(size) + _align(self.depth * SLOT_META, PAGE)

    def _make_queues(self, nq: int, size: int) -> None:
        self._close_queue_fds()
        rings = self.regions["rings"]
        block = self._queue_block(size)
        d = self.dev
        for i in range(nq):
            base = i * block
            ring = DriverRing(rings, base, size, self.has(vblk.VIRTIO_RING_F_EVENT_IDX))
            q = Queue(
                i,
                ring,
                os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
                os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
                base + DriverRing.footprint(size),
                i * self.depth * self.max_io,
                list(range(self.depth)),
            )
            self.queues.append(q)
            d.set_vring_num(i, size)
            d.set_vring_base(i, 0)
            desc, avail, used = ring.addrs
            d.set_vring_addr(i, desc, avail, used)
            d.set_vring_kick(i, q.kick)
            d.set_vring_call(i, q.call)

    def _close_queue_fds(self) -> None:
        for q in self.queues:
            os.close(q.kick)
            os.close(q.call)
        self.queues = []

    # -- memory ---------------------------------------------------------------------

    def _iotlb(self, messages: list[bytes]) -> None:
        if self.batching:
            messages = [
                vhost.iotlb_msg(vhost.VHOST_IOTLB_BATCH_BEGIN),
                *messages,
                vhost.iotlb_msg(vhost.VHOST_IOTLB_BATCH_END),
            ]
        self.stats["iotlb_msgs"] += len(messages)
        self.dev.write_iotlb(messages)

    @staticmethod
    def _update(region: Region, iova: int) -> bytes:
        return vhost.iotlb_msg(
            vhost.VHOST_IOTLB_UPDATE, iova, region.size, region.uaddr, vhost.VHOST_ACCESS_RW
        )

    @staticmethod
    def _invalidate(region: Region, iova: int) -> bytes:
        return vhost.iotlb_msg(vhost.VHOST_IOTLB_INVALIDATE, iova, region.size)

    def map_all(self) -> None:
        msgs = [
            self._update(r, r.addr(0)) for n, r in self.regions.items() if n not in self._mapped
        ]
        if msgs:
            self._iotlb(msgs)
        self._mapped = set(self.regions)

    def unmap(self, name: str) -> int:
        """Invalidate a region's mapping (its IOVA is returned; it stays unusable)."""
        r = self.regions[name]
        iova = r.addr(0)
        self._iotlb([self._invalidate(r, iova)])
        self._mapped.discard(name)
        r.iova = None
        return iova

    def map(self, name: str, iova: int) -> None:
        r = self.regions[name]
        self._iotlb([self._update(r, iova)])
        r.iova = iova
        self._mapped.add(name)

    def remap(self, name: str, iova: int | None = None) -> None:
        """INVALIDATE a data region and UPDATE it again (at ``iova``, default the same)."""
        if name == "rings":
            raise ValueError("the rings region holds the queues' addresses; remap data only")
        r = self.regions[name]
        old = r.addr(0)
        new = old if iova is None else iova
        self._iotlb([self._invalidate(r, old), self._update(r, new)])
        r.iova = new

    # -- requests -------------------------------------------------------------------

    def _submit(self, q: Queue, req: Request) -> None:
        slot = q.free_slots.pop()
        rings, a, b = self.regions["rings"], self.regions["data_a"], self.regions["data_b"]
        meta = q.meta_off + slot * SLOT_META
        data = q.data_off + slot * self.max_io
        rv = rings.view
        vblk.OUTHDR.pack_into(rv, meta + META_HEADER, req.type, 0, req.sector)
        rv[meta + META_STATUS] = 0xFF
        bufs: list[tuple[int, int, bool]] = [(rings.addr(meta + META_HEADER), 16, False)]
        t = req.type
        if t in (vblk.VIRTIO_BLK_T_DISCARD, vblk.VIRTIO_BLK_T_WRITE_ZEROES):
            vblk.SEGMENT.pack_into(rv, meta + META_SEGMENT, req.sector, req.num_sectors, req.flags)
            bufs.append((rings.addr(meta + META_SEGMENT), 16, False))
        elif t == vblk.VIRTIO_BLK_T_OUT or t in (vblk.VIRTIO_BLK_T_IN, vblk.VIRTIO_BLK_T_GET_ID):
            out = t == vblk.VIRTIO_BLK_T_OUT
            length = len(req.data) if out else req.length
            if length > self.max_io:
                raise ValueError(f"request of {length} bytes > max_io {self.max_io}")
            if req.bad_iova is not None:
                bufs.append((req.bad_iova, length, not out))
            else:
                first = (length // 2) & ~511 if length >= 1024 else length
                if out:
                    a.view[data : data + first] = req.data[:first]
                    b.view[data : data + length - first] = req.data[first:]
                bufs.append((a.addr(data), first, not out))
                if length > first:
                    bufs.append((b.addr(data), length - first, not out))
        bufs.append((rings.addr(meta + META_STATUS), 1, True))
        if self.has(vblk.VIRTIO_RING_F_INDIRECT_DESC) and len(bufs) > 2:
            table = meta + META_TABLE
            for i, (addr, n, wr) in enumerate(bufs):
                flags = (VRING_DESC_F_WRITE if wr else 0) | (
                    VRING_DESC_F_NEXT if i + 1 < len(bufs) else 0
                )
                DESC.pack_into(
                    rv, table + 16 * i, addr, n, flags, i + 1 if i + 1 < len(bufs) else 0
                )
            head, descs = q.ring.add_indirect(rings.addr(table), 16 * len(bufs))
        else:
            head, descs = q.ring.add(bufs)
        q.inflight[head] = (slot, descs, req)
        if len(q.inflight) > self.stats["max_inflight"]:
            self.stats["max_inflight"] = len(q.inflight)

    def _complete(self, q: Queue, head: int, used_len: int) -> None:
        if head not in q.inflight:
            raise DeviceError(
                f"queue {q.index}: used entry for unknown head {head} (length {used_len}); "
                + q.ring.describe()
            )
        slot, descs, req = q.inflight.pop(head)
        meta = q.meta_off + slot * SLOT_META
        data = q.data_off + slot * self.max_io
        req.status = self.regions["rings"].view[meta + META_STATUS]
        req.used_len = used_len
        if req.type in (vblk.VIRTIO_BLK_T_IN, vblk.VIRTIO_BLK_T_GET_ID) and req.bad_iova is None:
            n = req.length
            first = (n // 2) & ~511 if n >= 1024 else n
            a, b = self.regions["data_a"].view, self.regions["data_b"].view
            req.result = bytes(a[data : data + first]) + bytes(b[data : data + n - first])
        q.ring.free.extend(descs)
        q.free_slots.append(slot)

    def _kick(self, q: Queue) -> None:
        if q.ring.need_kick():
            os.eventfd_write(q.kick, 1)
            self.stats["kicks"] += 1

    def submit(self, queue: int, requests: Iterable[Request]) -> None:
        """Offer requests without waiting (up to the free slots), then kick."""
        q = self.queues[queue]
        for req in requests:
            self._submit(q, req)
        self._kick(q)

    def inflight(self) -> int:
        return sum(len(q.inflight) for q in self.queues)

    def run(
        self, jobs: Mapping[int, Sequence[Request]], timeout: float = 30.0, depth: int | None = None
    ) -> None:
        """Run ``jobs[queue]`` keeping up to ``depth`` in flight on each queue at once.

        Raises `DeviceError` if no completion arrives for ``timeout`` seconds.
        """
        depth = min(depth or self.depth, self.depth)
        pending = {qi: list(reqs)[::-1] for qi, reqs in jobs.items()}
        poller = select.poll()
        by_fd = {}
        for qi in jobs:
            q = self.queues[qi]
            poller.register(q.call, select.POLLIN)
            by_fd[q.call] = q
        deadline = time.monotonic() + timeout
        while True:
            for qi, todo in pending.items():
                q = self.queues[qi]
                n = 0
                while todo and len(q.inflight) < depth:
                    self._submit(q, todo.pop())
                    n += 1
                if n:
                    self._kick(q)
            progressed = False
            for qi in jobs:
                q = self.queues[qi]
                for head, used_len in q.ring.take_used():
                    self._complete(q, head, used_len)
                    progressed = True
            if not any(pending.values()) and not any(self.queues[qi].inflight for qi in jobs):
                return
            if progressed:
                deadline = time.monotonic() + timeout
                continue
            if any(self.queues[qi].ring.arm() for qi in jobs if self.queues[qi].inflight):
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeviceError(self._stall_report(jobs, timeout))
            events = poller.poll(min(left, 0.5) * 1000)
            for fd, _ in events:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(fd)
                    self.stats["interrupts"] += 1
            if not events and any(
                self.queues[qi].ring.used_idx() != self.queues[qi].ring.last_used for qi in jobs
            ):
                self.stats["missed_interrupts"] += 1

    def _stall_report(self, jobs: Mapping[int, Sequence[Request]], timeout: float) -> str:
        parts = []
        for qi in jobs:
            q = self.queues[qi]
            parts.append(
                f"queue {qi}: {len(q.inflight)} in flight, avail_idx {q.ring.avail_idx}, "
                f"used_idx {q.ring.used_idx()}, last_used {q.ring.last_used}"
            )
        status = self.dev.get_status()
        return f"no completion for {timeout:g} s (status {status:#x}); " + "; ".join(parts)

    def drain(self, timeout: float = 30.0) -> None:
        """Wait for every request in flight on every queue."""
        self.run({q.index: [] for q in self.queues}, timeout)

    def try_request(self, queue: int, req: Request, timeout: float = 10.0) -> str:
        """Submit one request that may never complete (e.g. ``bad_iova``); returns
        ``"status N"`` when a used entry came back, ``"needs_reset"`` when the device
        set NEEDS_RESET (or FAILED), ``"no completion"`` after ``timeout``."""
        q = self.queues[queue]
        self.submit(queue, [req])
        deadline = time.monotonic() + timeout
        while True:
            for head, used_len in q.ring.take_used():
                self._complete(q, head, used_len)
            if req.status != NOT_DONE:
                return f"status {req.status}"
            bad = vhost.VIRTIO_CONFIG_S_NEEDS_RESET | vhost.VIRTIO_CONFIG_S_FAILED
            if self.dev.get_status() & bad:
                return "needs_reset"
            if time.monotonic() > deadline:
                return "no completion"
            if not q.ring.arm():
                r, _, _ = select.select([q.call], [], [], 0.2)
                if r:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(q.call)

    def abandon(self) -> list[Request]:
        """Forget requests in flight (after a reset); returns them."""
        lost = []
        for q in self.queues:
            for slot, descs, req in q.inflight.values():
                q.free_slots.append(slot)
                q.ring.free.extend(descs)
                lost.append(req)
            q.inflight.clear()
        return lost

    # -- reset / teardown -----------------------------------------------------------

    def reset(self) -> list[Request]:
        """Status 0 (device reset), drop every mapping as QEMU does, forget in-flight
        requests (returned).  Call `setup` to use the device again."""
        self.dev.set_status(0)
        lost = self.abandon()
        msgs = [self._invalidate(self.regions[n], self.regions[n].addr(0)) for n in self._mapped]
        if msgs:
            self._iotlb(msgs)
        self._mapped = set()
        return lost

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.dev.fd >= 0:
                self.dev.set_status(0)
        self.dev.close()
        self._close_queue_fds()
        for r in self.regions.values():
            r.close()
        self.regions = {}

    def __enter__(self) -> VhostVdpaBlk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- verified workloads (used by the CLI and the guest tests) ---------------------------------


class Model:
    """What the disk must contain: a bytearray image of it."""

    def __init__(self, initial: bytes) -> None:
        self.image = bytearray(initial)

    def write(self, offset: int, data: bytes) -> None:
        self.image[offset : offset + len(data)] = data


def random_writes(
    rng: random.Random,
    capacity: int,
    count: int,
    chunk: int = 32 * 1024,
    align: int = 512,
) -> list[Request]:
    """``count`` writes to distinct ``chunk``-sized pieces of the disk (never overlapping,
    so any order of completion gives the same result), random offset and length inside."""
    chunks = rng.sample(range(capacity // chunk), count)
    out = []
    for c in chunks:
        n_units = chunk // align
        start = rng.randrange(n_units)
        length = rng.randint(1, n_units - start) * align
        offset = c * chunk + start * align
        out.append(Request.write(offset // 512, rng.randbytes(length)))
    return out


def check_ok(requests: Iterable[Request], what: str) -> None:
    bad = [(r.type, r.sector, r.status) for r in requests if r.status != vblk.VIRTIO_BLK_S_OK]
    if bad:
        raise DeviceError(f"{what}: {len(bad)} requests failed (type, sector, status): {bad[:5]}")


def verified_round(
    drv: VhostVdpaBlk, model: Model, rng: random.Random, per_queue: int, timeout: float = 60
) -> int:
    """Random writes at full depth on every queue, then read every range back (also at
    full depth, on a different queue) and compare with the model.  Returns bytes written."""
    assert drv.config is not None
    nq = len(drv.queues)
    writes = random_writes(rng, drv.config.capacity, per_queue * nq)
    jobs = {qi: writes[qi::nq] for qi in range(nq)}
    drv.run(jobs, timeout)
    check_ok(writes, "writes")
    for w in writes:
        model.write(w.sector * 512, w.data)
    reads = [Request.read(w.sector, len(w.data)) for w in writes]
    drv.run({qi: reads[(qi + 1) % nq :: nq] for qi in range(nq)}, timeout)
    check_ok(reads, "reads")
    for r in reads:
        off = r.sector * 512
        expect = bytes(model.image[off : off + r.length])
        if r.result != expect:
            raise DeviceError(f"read back at {off:#x}+{r.length:#x} differs from what was written")
    return sum(len(w.data) for w in writes)


# -- command line --------------------------------------------------------------------------


def _info(drv: VhostVdpaBlk) -> dict[str, object]:
    assert drv.config is not None
    return {
        "device": drv.path,
        "offered_features": hex(drv.offered),
        "negotiated_features": hex(drv.features),
        "backend_features": hex(drv.backend_features),
        "vqs_count": drv.vqs_count,
        "max_queue_size": drv.max_queue_size,
        "queues_used": len(drv.queues),
        "capacity": drv.config.capacity,
        "blk_size": drv.config.blk_size,
        "num_queues": drv.config.num_queues,
        "seg_max": drv.config.seg_max,
        "status": hex(drv.dev.get_status()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vexport.tools.vhost_vdpa_blk",
        description="Drive a virtio-blk vDPA device through /dev/vhost-vdpa-N (as a VM "
        "would) and check it: verified random writes/reads on every queue, flush, "
        "GET_ID, optional remap/reset/bad-request scenarios.  DESTROYS DATA on the device.",
    )
    p.add_argument("device", help="/dev/vhost-vdpa-N")
    p.add_argument("--info", action="store_true", help="set up, print the device, stop")
    p.add_argument("--queue-size", type=int, default=64)
    p.add_argument("--depth", type=int, default=16, help="requests in flight per queue")
    p.add_argument("--queues", type=int, default=None, help="use at most N queues")
    p.add_argument("--count", type=int, default=32, help="writes per queue per round")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--indirect", action="store_true", help="negotiate INDIRECT_DESC")
    p.add_argument("--no-event-idx", action="store_true")
    p.add_argument("--remap", action="store_true", help="move data_b to a new IOVA and back")
    p.add_argument("--reset", action="store_true", help="reset and set up again")
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    with VhostVdpaBlk(
        args.device,
        queue_size=args.queue_size,
        depth=args.depth,
        event_idx=not args.no_event_idx,
        indirect=args.indirect,
        num_queues=args.queues,
    ) as drv:
        drv.setup()
        print(json.dumps(_info(drv), indent=1))
        if args.info:
            return 0
        assert drv.config is not None
        rng = random.Random(args.seed)
        # The model starts from the device's current contents.
        image = bytearray()
        step = drv.max_io
        for off in range(0, drv.config.capacity, step * drv.depth):
            reqs = [
                Request.read(o // 512, min(step, drv.config.capacity - o))
                for o in range(off, min(off + step * drv.depth, drv.config.capacity), step)
            ]
            drv.run({0: reqs}, args.timeout)
            check_ok(reqs, "initial read")
            for r in reqs:
                image += r.result
        model = Model(bytes(image))
        total = 0
        for rnd in range(args.rounds):
            total += verified_round(drv, model, rng, args.count, args.timeout)
            if args.remap:
                drv.remap("data_b", 0x2_0000_0000 + rnd * 0x1000_0000)
                total += verified_round(drv, model, rng, args.count, args.timeout)
                drv.remap("data_b", DATA_B_IOVA)
            if args.reset:
                drv.reset()
                drv.setup()
                total += verified_round(drv, model, rng, args.count, args.timeout)
        extra = [Request.flush(), Request.get_id()]
        drv.run({0: extra}, args.timeout)
        check_ok(extra, "flush/get-id")
        print(
            json.dumps(
                {
                    "bytes_written": total,
                    "serial": extra[1].result.rstrip(b"\0").decode(errors="replace"),
                    **drv.stats,
                }
            )
        )
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
