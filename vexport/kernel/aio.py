"""Linux native AIO (``io_setup``/``io_submit``/``io_getevents``) and file syscalls.

Structures follow ``/usr/include/linux/aio_abi.h``; the ioctl numbers come from
``/usr/include/linux/fs.h`` and the ``FALLOC_FL_*`` flags from ``linux/falloc.h``.
Everything is reached through cffi in ABI mode (``ffi.dlopen(None)``, i.e. libc), so no
compiler is needed at install time.  The raw syscalls go through libc's variadic
``syscall()``; integer arguments are therefore passed as cdata (``ffi.cast("long", n)``),
which cffi requires for the variadic part and which keeps the call ABI-correct.

Also here: the file operations Linux AIO cannot do (``fallocate(2)`` with a mode,
``BLKDISCARD``/``BLKZEROOUT``), which the engines run on worker threads.

``tests/unit/test_kernel_abi_io.py`` checks every size, offset and number against the
system headers.  Errors are raised as ``OSError`` unchanged.
"""

from __future__ import annotations

import fcntl
import os
import platform
import struct
from typing import Any

import cffi

# Syscall numbers per architecture (asm/unistd_64.h and asm-generic/unistd.h).
_SYSCALLS = {
    "x86_64": {
        "io_setup": 206,
        "io_destroy": 207,
        "io_getevents": 208,
        "io_submit": 209,
        "io_cancel": 210,
    },
    "aarch64": {"io_setup": 0, "io_destroy": 1, "io_submit": 2, "io_cancel": 3, "io_getevents": 4},
}
MACHINE = platform.machine()
if MACHINE not in _SYSCALLS:  # pragma: no cover - depends on the host
    raise ImportError(f"vexport.kernel.aio: unsupported architecture {MACHINE}")
SYS_IO_SETUP = _SYSCALLS[MACHINE]["io_setup"]
SYS_IO_DESTROY = _SYSCALLS[MACHINE]["io_destroy"]
SYS_IO_GETEVENTS = _SYSCALLS[MACHINE]["io_getevents"]
SYS_IO_SUBMIT = _SYSCALLS[MACHINE]["io_submit"]
SYS_IO_CANCEL = _SYSCALLS[MACHINE]["io_cancel"]

IOCB_CMD_PREAD = 0
IOCB_CMD_PWRITE = 1
IOCB_CMD_FSYNC = 2
IOCB_CMD_FDSYNC = 3
IOCB_CMD_PREADV = 7
IOCB_CMD_PWRITEV = 8
IOCB_FLAG_RESFD = 1 << 0

# linux/fs.h: _IO(0x12, 119) and _IO(0x12, 127); the argument is a uint64_t[2]
# {offset, length}.
BLKDISCARD = (0x12 << 8) | 119
BLKZEROOUT = (0x12 << 8) | 127
# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

ffi = cffi.FFI()
# Pointer fields (aio_buf, iov_base) are declared as pointers so that buffers from
# ffi.from_buffer() can be stored without an integer conversion; on the 64-bit targets
# above they have the size and alignment of the header's __u64.  aio_fildes is declared
# signed (header: __u32) so that a bad fd such as -1 reaches the kernel (EBADF) instead
# of failing the conversion in Python.
ffi.cdef(
    """
    typedef unsigned long aio_context_t;
    struct iovec { void *iov_base; size_t iov_len; };
    struct io_event { uint64_t data; uint64_t obj; int64_t res; int64_t res2; };
    struct iocb {
        uint64_t aio_data;
        uint32_t aio_key;
        int32_t aio_rw_flags;
        uint16_t aio_lio_opcode;
        int16_t aio_reqprio;
        int32_t aio_fildes;
        void *aio_buf;
        uint64_t aio_nbytes;
        int64_t aio_offset;
        uint64_t aio_reserved2;
        uint32_t aio_flags;
        uint32_t aio_resfd;
    };
    long syscall(long number, ...);
    int fallocate(int fd, int mode, int64_t offset, int64_t len);
    """
)
libc = ffi.dlopen(None)
assert ffi.sizeof("void *") == 8, "vexport.kernel.aio needs a 64-bit platform"

_syscall = libc.syscall
_long = ffi.cast


def _check(ret: int) -> int:
    if ret < 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err))
    return ret


def io_setup(nr_events: int) -> int:
    """Create an AIO context able to hold ``nr_events`` requests; returns its id."""
    ctxp = ffi.new("aio_context_t *")
    _check(_syscall(_long("long", SYS_IO_SETUP), _long("long", nr_events), ctxp))
    return int(ctxp[0])


def io_destroy(ctx: int) -> None:
    """Destroy the context (the kernel waits for requests still in flight)."""
    _check(_syscall(_long("long", SYS_IO_DESTROY), _long("unsigned long", ctx)))


class Submitter:
    """io_submit/io_getevents bound to one context, with the constant arguments cast once."""

    def __init__(self, ctx: int) -> None:
        self._nr_submit = _long("long", SYS_IO_SUBMIT)
        self._nr_getevents = _long("long", SYS_IO_GETEVENTS)
        self._ctx = _long("unsigned long", ctx)
        self._zero = _long("long", 0)
        self._null = ffi.NULL
        self._counts: list[Any] = []  # _long("long", n), cast once per n (ffi.cast is slow)

    def submit(self, n: int, iocbpp: object) -> int:
        """Submit the first ``n`` iocbs of ``iocbpp`` (``struct iocb **``).

        Returns how many the kernel accepted; raises OSError if it took none.
        """
        counts = self._counts
        count = counts[n] if n < len(counts) else self._count(n)
        ret = _syscall(self._nr_submit, self._ctx, count, iocbpp)
        return ret if ret >= 0 else _check(ret)

    def _count(self, n: int) -> Any:
        counts = self._counts
        while len(counts) <= n:
            counts.append(_long("long", len(counts)))
        return counts[n]

    def getevents(self, nr: int, events: object) -> int:
        """Reap up to ``nr`` completions into ``events`` without waiting."""
        return _check(
            _syscall(self._nr_getevents, self._ctx, self._zero, self._count(nr), events, self._null)
        )


AIO_RING_MAGIC = 0xA10A10A1
_RING_HEADER = struct.Struct("8I")  # id, nr, head, tail, magic, compat, incompat, header_length
_RING_HEAD_TAIL = struct.Struct("II")
_EVENT = struct.Struct("QQqq")  # struct io_event: data, obj, res, res2
RING_HEADER_SIZE = 32


class CompletionRing:
    """The context's completion ring, read in user space (no io_getevents call).

    ``io_setup`` returns the address of a ring the kernel maps into the process (fs/aio.c
    ``struct aio_ring``: id, nr, head, tail, magic, compat and incompat features,
    header length, then ``nr`` io_events).  The kernel writes an event, then moves
    ``tail``; the reader consumes [head, tail) and stores the new ``head``, which the
    kernel reads back to know the slots are free (what QEMU's linux-aio does).  The
    ring layout is only trusted with the expected magic and no incompatible features;
    otherwise the constructor raises ValueError and the caller uses io_getevents.

    Must not be used after ``io_destroy``: the mapping is gone.
    """

    def __init__(self, ctx: int) -> None:
        base = ffi.cast("char *", ctx)
        _id, nr, _head, _tail, magic, _compat, incompat, header_length = _RING_HEADER.unpack(
            ffi.buffer(base, RING_HEADER_SIZE)
        )
        if magic != AIO_RING_MAGIC or incompat != 0 or header_length != RING_HEADER_SIZE:
            raise ValueError("unknown AIO completion ring layout")
        self.nr = nr
        self._buf = memoryview(ffi.buffer(base, RING_HEADER_SIZE + _EVENT.size * nr))
        # The kernel reads head when an I/O completes (on any CPU): store it with one
        # four-byte store, not pack_into, which zeroes the field first.
        self._head = self._buf[8:12].cast("I")

    def reap(self, out: list[tuple[int, int]]) -> int:
        """Append ``(data, res)`` of every completed event to ``out``; return the count."""
        buf = self._buf
        head, tail = _RING_HEAD_TAIL.unpack_from(buf, 8)
        if head == tail:
            return 0
        nr = self.nr
        if head >= nr or tail >= nr:
            raise ValueError(f"AIO completion ring head {head} / tail {tail} outside {nr}")
        unpack = _EVENT.unpack_from
        count = 0
        while head != tail:
            data, _obj, res, _res2 = unpack(buf, RING_HEADER_SIZE + 32 * head)
            out.append((data, res))
            count += 1
            head += 1
            if head == nr:
                head = 0
        self._head[0] = head
        return count

    def close(self) -> None:
        self._head.release()
        self._buf.release()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate only does mode 0).  Blocks."""
    if libc.fallocate(fd, mode, offset, length) < 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err))


_RANGE = struct.Struct("=QQ")


def blkdiscard(fd: int, offset: int, length: int) -> None:
    """BLKDISCARD on a block device.  Blocks."""
    fcntl.ioctl(fd, BLKDISCARD, _RANGE.pack(offset, length))


def blkzeroout(fd: int, offset: int, length: int) -> None:
    """BLKZEROOUT on a block device.  Blocks."""
    fcntl.ioctl(fd, BLKZEROOUT, _RANGE.pack(offset, length))
