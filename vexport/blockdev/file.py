"""The ``file`` and ``host_device`` protocol drivers (QEMU's file-posix).

Requests go to an I/O engine chosen by ``aio`` (threads, native, io_uring; see
``vexport.io``), fetched for the running loop at the first request.  Engine
completions carry byte counts for reads and writes: a short read means end of file
and the rest of the buffer is zero-filled (QEMU does the same, a file's size being
rounded up to 512 bytes); a short write fails with ``-ENOSPC``.

* flush: fdatasync (a no-op with ``cache.no-flush``, handled by BlockNode).
* discard: fallocate(PUNCH_HOLE|KEEP_SIZE) on files, BLKDISCARD on devices; a
  filesystem without hole punching makes discard a successful no-op (it is advisory).
* write-zeroes: files use PUNCH_HOLE|KEEP_SIZE when unmapping is allowed, else
  ZERO_RANGE; devices use BLKZEROOUT; when the kernel refuses (EOPNOTSUPP, EINVAL,
  ENOTTY) zeroes are written from a page-aligned zero buffer, which also satisfies
  O_DIRECT.
* truncate: ftruncate for files; a device cannot grow ("Cannot grow device files")
  and shrinking it changes nothing, as in QEMU.
* locking (auto|on|off, default auto = on): OFD locks, see ``locking.py``.

With ``cache.direct=on`` the file is opened O_DIRECT; requests must then be aligned
(offset, length and buffer addresses on the logical block size) or the kernel
answers ``-EINVAL``.  QEMU bounces unaligned requests; vexport leaves that to the
exports, which only send aligned requests.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import stat
from typing import Any

from vexport.blockdev.locking import ImageLocks
from vexport.blockdev.node import BlockNode, Done
from vexport.errors import GenericError
from vexport.io import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, get_engine
from vexport.io.iov import OP_READ, OP_WRITE

_ZERO_BUF_SIZE = 1 << 20
_zero_buf: mmap.mmap | None = None
_UNSUPPORTED = (-errno.EOPNOTSUPP, -errno.ENOTSUP, -errno.EINVAL, -errno.ENOTTY, -errno.ENOSYS)


def _zero_buffer() -> memoryview:
    global _zero_buf
    if _zero_buf is None:
        _zero_buf = mmap.mmap(-1, _ZERO_BUF_SIZE, prot=mmap.PROT_READ)
    return memoryview(_zero_buf)


class FileNode(BlockNode):
    driver = "file"

    def __init__(self, node_name: str, options: dict[str, Any]) -> None:
        super().__init__(node_name, options)
        self.path: str = options["filename"]
        self.aio: str = options.get("aio", "threads")
        if self.aio == "native" and not self.cache_direct:
            raise GenericError(
                "aio=native was specified, but it requires cache.direct=on, "
                "which was not specified."
            )
        self._engine: Any = None
        self.fd = self._open(bool(options.get("auto-read-only", False)))
        self.locks: ImageLocks | None = None
        try:
            st = os.fstat(self.fd)
            self.is_device = stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)
            self._check_type(st.st_mode)
            if options.get("locking", "auto") != "off":
                self.locks = ImageLocks(self.fd)
            self.refresh_length()
            self._get_engine_if_running()
        except BaseException:
            os.close(self.fd)
            raise

    def _open(self, auto_read_only: bool) -> int:
        flags = os.O_CLOEXEC | (os.O_DIRECT if self.cache_direct else 0)
        try:
            return os.open(self.path, flags | (os.O_RDONLY if self.read_only else os.O_RDWR))
        except OSError as e:
            if (
                auto_read_only
                and not self.read_only
                and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM)
            ):
                try:
                    fd = os.open(self.path, flags | os.O_RDONLY)
                except OSError as e2:
                    e = e2
                else:
                    self.read_only = True
                    return fd
            raise GenericError(
                f"Could not open '{self.path}': {os.strerror(e.errno or errno.EIO)}"
            ) from None

    def _check_type(self, mode: int) -> None:
        if not stat.S_ISREG(mode):
            raise GenericError(f"'file' driver requires '{self.path}' to be a regular file")

    def _size(self) -> int:
        if self.is_device:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    def _get_engine_if_running(self) -> None:
        """Fail blockdev-add, not the first request, when ``aio`` cannot work here."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # opened outside the loop: the engine comes with the first request
        try:
            self._engine = get_engine(self.aio)
        except OSError as e:
            raise GenericError(
                f"Unable to use {self.aio} AIO: {os.strerror(e.errno or errno.EIO)}"
            ) from None

    @property
    def engine(self) -> Any:
        engine = self._engine
        if engine is None or engine.closed:
            engine = self._engine = get_engine(self.aio)
        return engine

    # -- data path ------------------------------------------------------------------------
    # A read past end of file (the file shrank) reads zeroes; a write the file takes only
    # part of fails with ENOSPC (engine.transfer).
    def _preadv(self, offset: int, iov: list[memoryview], nbytes: int, done: Done) -> None:
        self.engine.transfer(OP_READ, self.fd, offset, iov, nbytes, done)

    def _pwritev(self, offset: int, iov: list[memoryview], nbytes: int, done: Done) -> None:
        self.engine.transfer(OP_WRITE, self.fd, offset, iov, nbytes, done)

    def _flush(self, done: Done) -> None:
        self.engine.fdatasync(self.fd, lambda ret: done(min(ret, 0)))

    def _discard(self, offset: int, length: int, done: Done) -> None:
        def complete(ret: int) -> None:
            done(0 if ret >= 0 or ret in _UNSUPPORTED else ret)

        if self.is_device:
            self.engine.blkdiscard(self.fd, offset, length, complete)
        else:
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            self.engine.fallocate(self.fd, mode, offset, length, complete)

    def _write_zeroes(self, offset: int, length: int, unmap: bool, done: Done) -> None:
        def complete(ret: int) -> None:
            if ret in _UNSUPPORTED:
                self._write_zero_buffers(offset, length, done)
            else:
                done(min(ret, 0))

        if self.is_device:
            self.engine.blkzeroout(self.fd, offset, length, complete)
        elif unmap and offset + length <= self._size():
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            self.engine.fallocate(self.fd, mode, offset, length, complete)
        else:
            self.engine.fallocate(self.fd, FALLOC_FL_ZERO_RANGE, offset, length, complete)

    def _write_zero_buffers(self, offset: int, length: int, done: Done) -> None:
        """Fallback write-zeroes: write the zero buffer chunk after chunk."""
        zeros = _zero_buffer()
        end = offset + length

        def step(ret: int, pos: int) -> None:
            if ret < 0 or pos >= end:
                done(min(ret, 0))
                return
            n = min(end - pos, len(zeros))

            def written(r: int) -> None:
                step(-errno.ENOSPC if 0 <= r < n else min(r, 0), pos + n)

            self.engine.pwritev(self.fd, pos, [zeros[:n]], written)

        step(0, offset)

    def after_fork(self) -> None:
        # The parent's engine (its io context, threads or io_uring) is not this
        # process's: the worker gets its own with its first request.
        self._engine = None
        super().after_fork()

    def direct_io(self, write: bool) -> tuple[Any, int] | None:
        # pwritev's other checks: a read-only node refuses writes, detect-zeroes looks at
        # the data first.
        if write and (self.read_only or self.detect_zeroes != "off"):
            return None
        return self.engine, self.fd

    def plug(self) -> None:
        self.engine.plug()

    def unplug(self) -> None:
        self.engine.unplug()

    # -- control path -------------------------------------------------------------------
    async def _truncate(self, length: int) -> None:
        if self.is_device:
            if length > self._size():
                raise GenericError("Cannot grow device files")
            return
        try:
            os.ftruncate(self.fd, length)
        except OSError as e:
            raise GenericError(
                f"Could not resize file: {os.strerror(e.errno or errno.EIO)}"
            ) from None

    def _apply_perms(self, perm: int, shared: int) -> None:
        if self.locks is not None:
            self.locks.apply(perm, shared)

    def _close(self) -> None:
        os.close(self.fd)
        self.fd = -1

    # -- query -------------------------------------------------------------------------
    def exact_filename(self) -> str:
        return self.path

    def full_options(self) -> dict[str, Any]:
        return {"driver": self.driver, "filename": self.path}

    def actual_size(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def has_file_info(self) -> bool:
        return True


class HostDeviceNode(FileNode):
    driver = "host_device"

    def _check_type(self, mode: int) -> None:
        if not (stat.S_ISBLK(mode) or stat.S_ISCHR(mode)):
            raise GenericError(
                f"'host_device' driver requires '{self.path}' to be either a character "
                "or block device"
            )
