"""io_uring: setup, ring mapping and enter/register, via cffi in ABI mode.

Layouts follow ``/usr/include/linux/io_uring.h`` (checked by
``tests/unit/test_kernel_abi_io.py``).  ``struct io_uring_sqe`` is declared flat with only
the union members vexport uses (``off``, ``addr``, ``rw_flags``/``fsync_flags`` share
offsets as in the header); its size is still the header's 64 bytes.  ``off`` is declared
signed (header: __u64) so that a negative offset reaches the kernel (EINVAL) instead of
failing the conversion in Python.

Theory of operation (see io_uring_setup(2)):

* ``io_uring_setup`` returns a ring fd and, in ``struct io_uring_params``, the offsets of
  the submission ring (head, tail, mask, array), the completion ring (head, tail, mask,
  cqes) and the number of entries.  The rings are ``mmap``-ed from the fd at
  ``IORING_OFF_SQ_RING``/``IORING_OFF_CQ_RING`` (one mapping when the kernel reports
  ``IORING_FEAT_SINGLE_MMAP``) and the SQE array at ``IORING_OFF_SQES``.
* Submission: fill an SQE, store its index in ``array[tail & mask]``, then store
  ``tail + 1``; ``io_uring_enter(fd, n, 0, 0)`` makes the kernel consume ``n`` entries.
* Completion: entries between our ``head`` and the kernel's ``tail`` are ready; after
  reading them, store the new ``head`` so the kernel can reuse the slots.

Memory ordering: the kernel side uses acquire/release on head and tail.  The user side
here uses plain loads and stores through cffi (each a separate C call, so the compiler
cannot reorder them).  On x86-64 (TSO) stores are not reordered with other stores and
loads not with other loads, which gives exactly the release (SQE before tail; cqe reads
before head) and acquire (tail before cqe) orderings needed.  Other architectures would
need explicit barriers, so ``RingMapping`` refuses to run anywhere but x86-64.
"""

from __future__ import annotations

import mmap
import os
import platform

import cffi

SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426
SYS_IO_URING_REGISTER = 427

IORING_OP_NOP = 0
IORING_OP_READV = 1
IORING_OP_WRITEV = 2
IORING_OP_FSYNC = 3
IORING_OP_FALLOCATE = 17
IORING_OP_READ = 22
IORING_OP_WRITE = 23
IORING_FSYNC_DATASYNC = 1 << 0
IORING_ENTER_GETEVENTS = 1 << 0
IORING_REGISTER_EVENTFD = 4
IORING_UNREGISTER_EVENTFD = 5
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_FEAT_NODROP = 1 << 1
IORING_SQ_CQ_OVERFLOW = 1 << 1

ffi = cffi.FFI()
ffi.cdef(
    """
    struct iovec { void *iov_base; size_t iov_len; };
    struct io_sqring_offsets {
        uint32_t head; uint32_t tail; uint32_t ring_mask; uint32_t ring_entries;
        uint32_t flags; uint32_t dropped; uint32_t array; uint32_t resv1; uint64_t resv2;
    };
    struct io_cqring_offsets {
        uint32_t head; uint32_t tail; uint32_t ring_mask; uint32_t ring_entries;
        uint32_t overflow; uint32_t cqes; uint32_t flags; uint32_t resv1; uint64_t resv2;
    };
    struct io_uring_params {
        uint32_t sq_entries; uint32_t cq_entries; uint32_t flags; uint32_t sq_thread_cpu;
        uint32_t sq_thread_idle; uint32_t features; uint32_t wq_fd; uint32_t resv[3];
        struct io_sqring_offsets sq_off;
        struct io_cqring_offsets cq_off;
    };
    struct io_uring_sqe {
        uint8_t opcode; uint8_t flags; uint16_t ioprio; int32_t fd;
        int64_t off;
        void *addr;
        uint32_t len;
        uint32_t rw_flags;
        uint64_t user_data;
        uint16_t buf_index; uint16_t personality; int32_t splice_fd_in;
        uint64_t addr3; uint64_t pad2;
    };
    struct io_uring_cqe { uint64_t user_data; int32_t res; uint32_t flags; };
    long syscall(long number, ...);
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset);
    int munmap(void *addr, size_t length);
    """
)
libc = ffi.dlopen(None)
_cast = ffi.cast


def _raise(what: str) -> None:
    err = ffi.errno
    raise OSError(err, f"{what}: {os.strerror(err)}")


def io_uring_setup(entries: int) -> tuple[int, object]:
    """Create a ring; returns (fd, params cdata).  Raises OSError with a clear message."""
    params = ffi.new("struct io_uring_params *")
    fd = libc.syscall(_cast("long", SYS_IO_URING_SETUP), _cast("unsigned", entries), params)
    if fd < 0:
        err = ffi.errno
        hint = ""
        try:
            with open("/proc/sys/kernel/io_uring_disabled") as f:
                disabled = f.read().strip()
            if disabled != "0":
                hint = f" (sysctl kernel.io_uring_disabled = {disabled})"
        except OSError:
            pass
        raise OSError(err, f"io_uring_setup failed: {os.strerror(err)}{hint}")
    return fd, params


def io_uring_register_eventfd(ring_fd: int, efd: int) -> None:
    arg = ffi.new("int32_t *", efd)
    if (
        libc.syscall(
            _cast("long", SYS_IO_URING_REGISTER),
            _cast("int", ring_fd),
            _cast("unsigned", IORING_REGISTER_EVENTFD),
            arg,
            _cast("unsigned", 1),
        )
        < 0
    ):
        _raise("io_uring_register(EVENTFD)")


class Enter:
    """io_uring_enter for one ring, with the constant arguments cast once."""

    def __init__(self, ring_fd: int) -> None:
        self._nr = _cast("long", SYS_IO_URING_ENTER)
        self._fd = _cast("int", ring_fd)
        self._zero = _cast("unsigned", 0)
        self._getevents = _cast("unsigned", IORING_ENTER_GETEVENTS)

    def submit(self, to_submit: int) -> int:
        """Make the kernel consume ``to_submit`` SQEs; returns how many it took."""
        ret = libc.syscall(
            self._nr,
            self._fd,
            _cast("unsigned", to_submit),
            self._zero,
            self._zero,
            ffi.NULL,
            _cast("size_t", 0),
        )
        if ret < 0:
            _raise("io_uring_enter")
        return int(ret)

    def wait(self, min_complete: int) -> None:
        """Block until at least ``min_complete`` completions are in the CQ ring."""
        ret = libc.syscall(
            self._nr,
            self._fd,
            self._zero,
            _cast("unsigned", min_complete),
            self._getevents,
            ffi.NULL,
            _cast("size_t", 0),
        )
        if ret < 0:
            _raise("io_uring_enter(GETEVENTS)")

    def flush_overflow(self) -> None:
        """Ask the kernel to move overflowed completions into the CQ ring."""
        ret = libc.syscall(
            self._nr,
            self._fd,
            self._zero,
            self._zero,
            self._getevents,
            ffi.NULL,
            _cast("size_t", 0),
        )
        if ret < 0:
            _raise("io_uring_enter(GETEVENTS)")


class RingMapping:
    """The mmap-ed SQ ring, CQ ring and SQE array of one io_uring fd."""

    def __init__(self, ring_fd: int, params: object) -> None:
        if platform.machine() != "x86_64":
            raise OSError(95, "io_uring engine: only x86-64 memory ordering is supported")
        p = params
        self.sq_entries = int(p.sq_entries)  # type: ignore[attr-defined]
        self.cq_entries = int(p.cq_entries)  # type: ignore[attr-defined]
        sq_off = p.sq_off  # type: ignore[attr-defined]
        cq_off = p.cq_off  # type: ignore[attr-defined]
        sq_size = sq_off.array + self.sq_entries * 4
        cq_size = cq_off.cqes + self.cq_entries * ffi.sizeof("struct io_uring_cqe")
        single = bool(p.features & IORING_FEAT_SINGLE_MMAP)  # type: ignore[attr-defined]
        if single:
            sq_size = cq_size = max(sq_size, cq_size)
        self._maps: list[tuple[object, int]] = []
        try:
            sq = self._map(ring_fd, sq_size, IORING_OFF_SQ_RING)
            cq = sq if single else self._map(ring_fd, cq_size, IORING_OFF_CQ_RING)
            sqes = self._map(ring_fd, self.sq_entries * 64, IORING_OFF_SQES)
        except OSError:
            self.close()
            raise
        u32p = "uint32_t *"
        self.sq_head = _cast(u32p, sq + sq_off.head)
        self.sq_tail = _cast(u32p, sq + sq_off.tail)
        self.sq_mask = int(_cast(u32p, sq + sq_off.ring_mask)[0])
        self.sq_flags = _cast(u32p, sq + sq_off.flags)
        self.sq_array = _cast(u32p, sq + sq_off.array)
        self.cq_head = _cast(u32p, cq + cq_off.head)
        self.cq_tail = _cast(u32p, cq + cq_off.tail)
        self.cq_mask = int(_cast(u32p, cq + cq_off.ring_mask)[0])
        self.cqes = _cast("struct io_uring_cqe *", cq + cq_off.cqes)
        self.sqes = _cast("struct io_uring_sqe *", sqes)

    def _map(self, fd: int, size: int, offset: int) -> object:
        ptr = libc.mmap(
            ffi.NULL,
            size,
            mmap.PROT_READ | mmap.PROT_WRITE,
            mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
            fd,
            offset,
        )
        if int(_cast("intptr_t", ptr)) == -1:
            _raise("mmap(io_uring)")
        self._maps.append((ptr, size))
        return _cast("char *", ptr)

    def close(self) -> None:
        for ptr, size in self._maps:
            libc.munmap(ptr, size)
        self._maps.clear()
