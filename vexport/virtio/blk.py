"""virtio-blk device logic (virtio 1.2, section 5.2), pure: chains in, backend calls out.

Theory of operation
-------------------
`VirtioBlk.parse(chain)` turns a `DescriptorChain` into a `BlkRequest`: the 16-byte
header (type, reserved, sector) from the readable buffers, the data buffers, and the
status byte (the last writable byte).  A chain too short to carry a header and a status
byte raises `BlkRequestError`: there is no way to report a status, so the export
decides (qemu-storage-daemon drops such requests; completing with used length 0 or
NEEDS_RESET are the alternatives).  Every other problem (range, alignment, read-only,
segment limits, unknown type...) is decided at parse time into ``request.status``, and
`execute` then completes the request without touching the backend.

`VirtioBlk.execute(request, backend, done)` calls the callback-style BlockNode API
(``preadv``, ``pwritev``, ``flush``, ``discard``, ``write_zeroes``) with the request
itself as the completion callback (no closure or coroutine per request).  On
completion the status byte is written and ``done(request, used_len)`` runs; used_len
counts the bytes written to the driver: data (IN, GET_ID) plus the status byte.

The rules follow qemu-storage-daemon 7.2's handler: OUT, DISCARD and WRITE_ZEROES on a
read-only export complete with IOERR; ranges are checked in 512-byte sectors against
the capacity with the start aligned to the logical block size; a discard/write-zeroes
payload longer than one segment is UNSUPP, shorter is IOERR; unknown flags are UNSUPP.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Protocol

from vexport.virtio.virtqueue import DescriptorChain, SimpleChain, simple_to_chain

# Request types, status values, flags (linux/virtio_blk.h).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_BARRIER = 0x80000000  # legacy flag, ignored like QEMU does

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_ID_BYTES = 20
SECTOR_SIZE = 512
SECTOR_BITS = 9
MAX_DISCARD_SECTORS = 32768
MAX_WRITE_ZEROES_SECTORS = 32768

# Feature bits (linux/virtio_config.h, virtio_ring.h, virtio_blk.h).
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33

VIRTIO_ID_BLOCK = 2

OUTHDR = struct.Struct("<IIQ")  # type, ioprio (reserved), sector
SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags

# struct virtio_blk_config (packed, little endian), every field of the 6.12 header.
CONFIG = struct.Struct(
    "<Q"  # capacity
    "I"  # size_max
    "I"  # seg_max
    "HBB"  # geometry: cylinders, heads, sectors
    "I"  # blk_size
    "BBHI"  # physical_block_exp, alignment_offset, min_io_size, opt_io_size
    "BB"  # wce, unused
    "H"  # num_queues
    "III"  # max_discard_sectors, max_discard_seg, discard_sector_alignment
    "II"  # max_write_zeroes_sectors, max_write_zeroes_seg
    "B3x"  # write_zeroes_may_unmap, unused1[3]
    "III"  # max_secure_erase_sectors, max_secure_erase_seg, secure_erase_sector_alignment
)
CONFIG_SIZE = CONFIG.size
CONFIG_CAPACITY_OFFSET = 0


def features(num_queues: int, writable: bool) -> int:
    """The feature bits qemu-storage-daemon's vduse-blk export offers."""
    bits = (
        VIRTIO_F_VERSION_1,
        VIRTIO_F_ACCESS_PLATFORM,
        VIRTIO_F_NOTIFY_ON_EMPTY,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    )
    value = 0
    for bit in bits:
        value |= 1 << bit
    if num_queues > 1:
        value |= 1 << VIRTIO_BLK_F_MQ
    if not writable:
        value |= 1 << VIRTIO_BLK_F_RO
    return value


def config_space(
    capacity_bytes: int,
    logical_block_size: int = 512,
    num_queues: int = 1,
    queue_size: int = 256,
    *,
    write_zeroes_may_unmap: bool = False,
) -> bytes:
    """``struct virtio_blk_config`` as qemu-storage-daemon fills it.

    size_max 0, seg_max = queue_size - 2, no geometry, topology: physical_block_exp 0,
    alignment_offset 0, min_io_size 1, opt_io_size 1; one 32768-sector segment for
    discard and write-zeroes, discard alignment in 512-byte sectors; QSD leaves
    write_zeroes_may_unmap at 0.
    """
    return CONFIG.pack(
        capacity_bytes >> SECTOR_BITS,
        0,
        queue_size - 2,
        0, 0, 0,
        logical_block_size,
        0, 0, 1, 1,
        0, 0,
        num_queues,
        MAX_DISCARD_SECTORS, 1, logical_block_size >> SECTOR_BITS,
        MAX_WRITE_ZEROES_SECTORS, 1,
        1 if write_zeroes_may_unmap else 0,
        0, 0, 0,
    )  # fmt: skip


def capacity_bytes_field(capacity_bytes: int) -> tuple[int, bytes]:
    """(offset, bytes) to write with DEV_SET_CONFIG after a resize."""
    return CONFIG_CAPACITY_OFFSET, struct.pack("<Q", capacity_bytes >> SECTOR_BITS)


class BlkRequestError(Exception):
    """A chain that cannot carry a virtio-blk request (no header or no status byte)."""

    def __init__(self, message: str, head: int) -> None:
        super().__init__(message)
        self.head = head


class BlockBackend(Protocol):
    """The callback-style subset of BlockNode that virtio-blk uses."""

    def preadv(self, offset: int, iov: list[memoryview], done: Callable[[int], None]) -> None: ...

    def pwritev(self, offset: int, iov: list[memoryview], done: Callable[[int], None]) -> None: ...

    def flush(self, done: Callable[[int], None]) -> None: ...

    def discard(self, offset: int, length: int, done: Callable[[int], None]) -> None: ...

    def write_zeroes(
        self, offset: int, length: int, unmap: bool, done: Callable[[int], None]
    ) -> None: ...


DoneCallback = Callable[["BlkRequest", int], None]


class BlkRequest:
    """One parsed request; also the backend's completion callback (``req(ret)``)."""

    __slots__ = (
        "data_len",
        "done",
        "head",
        "iov",
        "length",
        "offset",
        "sector",
        "status",
        "status_view",
        "type",
        "unmap",
        "used_len",
        "user",
    )

    def __init__(self, head: int, type_: int, sector: int, status_view: memoryview) -> None:
        self.head = head
        self.type = type_
        self.sector = sector
        self.status_view = status_view
        self.status: int | None = None  # decided at parse time, or by the backend
        self.iov: list[memoryview] = []
        self.offset = 0
        self.length = 0
        self.data_len = 0  # bytes of data the device writes to the driver on success
        self.unmap = False
        self.used_len = 1
        self.done: DoneCallback | None = None
        self.user: Any = None  # free for the export (e.g. its queue)

    def __call__(self, ret: int) -> None:
        """Backend completion: ``ret >= 0`` success, ``-errno`` failure (`complete`,
        inlined: this runs once per request)."""
        status = VIRTIO_BLK_S_OK if ret >= 0 else VIRTIO_BLK_S_IOERR
        used_len = self.data_len + 1
        self.status = status
        self.used_len = used_len
        self.status_view[0] = status
        done = self.done
        if done is not None:
            done(self, used_len)

    def complete(self, status: int, used_len: int = 1) -> None:
        self.status = status
        self.used_len = used_len
        self.status_view[0] = status
        done = self.done
        if done is not None:
            done(self, used_len)

    def __repr__(self) -> str:
        return (
            f"BlkRequest(head={self.head}, type={self.type}, sector={self.sector}, "
            f"status={self.status})"
        )


_new_request = object.__new__  # parse_simple builds requests without __init__


def _split_header(chain: DescriptorChain) -> tuple[bytes | memoryview, list[memoryview]]:
    """The 16 header bytes and the readable views after them."""
    readable = chain.readable
    first = readable[0]
    if len(first) == 16:
        return first, readable[1:]
    if len(first) > 16:
        return first, [first[16:], *readable[1:]]
    header = bytearray()
    rest: list[memoryview] = []
    for view in readable:
        need = 16 - len(header)
        if need > 0:
            header += view[:need]
            if len(view) > need:
                rest.append(view[need:])
        else:
            rest.append(view)
    return bytes(header), rest


# The chain shape Linux's virtio_blk gives reads and writes: a 16-byte header, the data,
# a 1-byte status (the lengths of the first and last buffer for SplitQueue.pop_simple).
SIMPLE_SHAPE = (OUTHDR.size, 1)


class VirtioBlk:
    """Per-export virtio-blk state: capacity, block size, serial, writability."""

    def __init__(
        self,
        capacity_bytes: int,
        logical_block_size: int = 512,
        serial: str | bytes = "",
        writable: bool = True,
    ) -> None:
        if logical_block_size < SECTOR_SIZE or logical_block_size & (logical_block_size - 1):
            raise ValueError(
                f"logical block size {logical_block_size} is not a power of two >= 512"
            )
        self.logical_block_size = logical_block_size
        # A sector number aligned to the logical block has these bits clear (the block
        # size is a power of two, checked above).
        self._align_mask = (logical_block_size >> SECTOR_BITS) - 1
        self.capacity_sectors = capacity_bytes >> SECTOR_BITS
        raw = serial.encode() if isinstance(serial, str) else bytes(serial)
        self.id_bytes = raw[:VIRTIO_BLK_ID_BYTES].ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        self.writable = writable
        # What parse and parse_simple build: an export may complete its requests in a
        # subclass's __call__ (the backend's callback) instead of through ``done``.
        self.request_class: type[BlkRequest] = BlkRequest

    def set_capacity(self, capacity_bytes: int) -> None:
        self.capacity_sectors = capacity_bytes >> SECTOR_BITS

    def range_ok(self, sector: int, length: int) -> bool:
        """``length`` bytes at ``sector`` lie inside the disk, aligned (overflow safe)."""
        if length % SECTOR_SIZE:
            return False
        if sector & self._align_mask:
            return False
        cap = self.capacity_sectors
        return sector <= cap and (length >> SECTOR_BITS) <= cap - sector

    def parse(self, chain: DescriptorChain) -> BlkRequest:
        if chain.read_len < OUTHDR.size:
            raise BlkRequestError(
                f"request header needs 16 readable bytes, got {chain.read_len}", chain.head
            )
        if chain.write_len < 1:
            raise BlkRequestError("request has no writable status byte", chain.head)
        header, out_data = _split_header(chain)
        type_, _ioprio, sector = OUTHDR.unpack_from(header, 0)
        writable = chain.writable
        last = writable[-1]
        n = len(last)
        if n == 1:
            status_view = last
            in_data = writable[:-1]
        else:
            status_view = last[n - 1 :]
            in_data = [*writable[:-1], last[: n - 1]]
        kind = type_ & ~VIRTIO_BLK_T_BARRIER
        req = self.request_class(chain.head, kind, sector, status_view)
        if kind == VIRTIO_BLK_T_IN:
            length = chain.write_len - 1
            if length == 0 or not self.range_ok(sector, length):
                req.status = VIRTIO_BLK_S_IOERR
            else:
                req.iov = in_data
                req.offset = sector << SECTOR_BITS
                req.length = req.data_len = length
        elif kind == VIRTIO_BLK_T_OUT:
            length = chain.read_len - OUTHDR.size
            if not self.writable or length == 0 or not self.range_ok(sector, length):
                req.status = VIRTIO_BLK_S_IOERR
            else:
                req.iov = out_data
                req.offset = sector << SECTOR_BITS
                req.length = length
        elif kind == VIRTIO_BLK_T_FLUSH:
            pass
        elif kind == VIRTIO_BLK_T_GET_ID:
            room = chain.write_len - 1
            req.iov = in_data
            req.data_len = min(room, VIRTIO_BLK_ID_BYTES)
        elif kind == VIRTIO_BLK_T_DISCARD or kind == VIRTIO_BLK_T_WRITE_ZEROES:
            req.status = self._parse_segment(req, kind, out_data, chain.read_len - OUTHDR.size)
        else:
            req.status = VIRTIO_BLK_S_UNSUPP
        return req

    def parse_simple(
        self, chain: SimpleChain, user: Any = None, done: DoneCallback | None = None
    ) -> BlkRequest:
        """`parse` for a chain of the common shape (``SplitQueue.pop_simple(n,
        *SIMPLE_SHAPE)``): a read or write of a valid range is decoded in place; any
        other request goes through `parse`, with the same result.  ``user`` and
        ``done`` are stored in the request (the caller's, set here once)."""
        head, view, first, data, data_len, data_written, last = chain
        type_, _ioprio, sector = OUTHDR.unpack_from(view, first)
        kind = type_ & ~VIRTIO_BLK_T_BARRIER
        wanted = VIRTIO_BLK_T_IN if data_written else VIRTIO_BLK_T_OUT
        if (
            kind == wanted
            and (data_written or self.writable)
            and not data_len & (SECTOR_SIZE - 1)
            and not sector & self._align_mask
            and sector <= self.capacity_sectors
            and data_len >> SECTOR_BITS <= self.capacity_sectors - sector
        ):
            # BlkRequest.__init__ inlined, each field stored once
            req = _new_request(self.request_class)
            req.head = head
            req.type = kind
            req.sector = sector
            req.status_view = view[last : last + 1]
            req.status = None
            req.iov = [view[data : data + data_len]]
            req.offset = sector << SECTOR_BITS
            req.length = data_len
            req.data_len = data_len if data_written else 0
            req.unmap = False
            req.used_len = 1
            req.done = done
            req.user = user
            return req
        req = self.parse(simple_to_chain(chain, *SIMPLE_SHAPE))
        req.user = user
        req.done = done
        return req

    def _parse_segment(
        self, req: BlkRequest, kind: int, data: list[memoryview], size: int
    ) -> int | None:
        """Decode the single discard/write-zeroes segment; a status if it is refused."""
        if not self.writable:
            return VIRTIO_BLK_S_IOERR
        if size > SEGMENT.size:
            return VIRTIO_BLK_S_UNSUPP  # more than one segment (max_*_seg is 1)
        if size < SEGMENT.size:
            return VIRTIO_BLK_S_IOERR
        raw = data[0] if len(data[0]) >= SEGMENT.size else b"".join(data)
        sector, num_sectors, flags = SEGMENT.unpack_from(raw, 0)
        limit = (
            MAX_WRITE_ZEROES_SECTORS if kind == VIRTIO_BLK_T_WRITE_ZEROES else MAX_DISCARD_SECTORS
        )
        if num_sectors > limit:
            return VIRTIO_BLK_S_IOERR
        length = num_sectors << SECTOR_BITS
        if not self.range_ok(sector, length):
            return VIRTIO_BLK_S_IOERR
        if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
            return VIRTIO_BLK_S_UNSUPP
        if kind == VIRTIO_BLK_T_DISCARD and flags:
            return VIRTIO_BLK_S_UNSUPP
        req.sector = sector
        req.offset = sector << SECTOR_BITS
        req.length = length
        req.unmap = bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
        if length == 0:
            return VIRTIO_BLK_S_OK
        return None

    def execute(self, req: BlkRequest, backend: BlockBackend, done: DoneCallback) -> None:
        """Run ``req`` on ``backend``; ``done(req, used_len)`` after the status is set."""
        req.done = done
        if req.status is not None:
            req.complete(req.status, 1)
            return
        kind = req.type
        if kind == VIRTIO_BLK_T_IN:
            backend.preadv(req.offset, req.iov, req)
        elif kind == VIRTIO_BLK_T_OUT:
            backend.pwritev(req.offset, req.iov, req)
        elif kind == VIRTIO_BLK_T_FLUSH:
            backend.flush(req)
        elif kind == VIRTIO_BLK_T_GET_ID:
            self._get_id(req)
        elif kind == VIRTIO_BLK_T_DISCARD:
            backend.discard(req.offset, req.length, req)
        else:
            backend.write_zeroes(req.offset, req.length, req.unmap, req)

    def _get_id(self, req: BlkRequest) -> None:
        """Copy the (NUL padded, possibly truncated) serial into the data buffers."""
        data = self.id_bytes[: req.data_len]
        pos = 0
        for view in req.iov:
            if pos >= len(data):
                break
            chunk = min(len(view), len(data) - pos)
            view[:chunk] = data[pos : pos + chunk]
            pos += chunk
        req.complete(VIRTIO_BLK_S_OK, req.data_len + 1)
