"""Image locking with open file description (OFD) locks, as QEMU's file-posix does.

QEMU publishes the permissions a process holds on an image as shared (read) OFD
locks on single bytes of the image file: byte ``100 + bit`` while it holds the
permission ``1 << bit`` and byte ``200 + bit`` while it refuses to share it.  Before
taking a permission it tests whether another open file description holds byte
``200 + bit`` (someone refuses to share it), and before refusing to share one it
tests byte ``100 + bit`` (someone holds it).  A test uses F_OFD_GETLK with a write
lock, which conflicts with any lock held through another open file description.
Locks vanish when the file descriptor is closed.  See fcntl(2), "Open file
description locks".
"""

from __future__ import annotations

import fcntl
import struct

from vexport.blockdev.perms import PERM_ALL, PERM_NAMES
from vexport.errors import GenericError

PERM_LOCK_BASE = 100
SHARED_LOCK_BASE = 200

# struct flock on Linux x86_64/aarch64: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (+ padding to 32 bytes).
_FLOCK = struct.Struct("@hhqqi4x")
_F_RDLCK, _F_WRLCK, _F_UNLCK = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK
_SEEK_SET = 0


def _fcntl_lock(fd: int, cmd: int, ltype: int, start: int) -> int:
    arg = _FLOCK.pack(ltype, _SEEK_SET, start, 1, 0)
    out = fcntl.fcntl(fd, cmd, arg)
    return int(_FLOCK.unpack(out)[0])


def lock_byte(fd: int, byte: int) -> None:
    _fcntl_lock(fd, fcntl.F_OFD_SETLK, _F_RDLCK, byte)


def unlock_byte(fd: int, byte: int) -> None:
    _fcntl_lock(fd, fcntl.F_OFD_SETLK, _F_UNLCK, byte)


def byte_is_locked_elsewhere(fd: int, byte: int) -> bool:
    return _fcntl_lock(fd, fcntl.F_OFD_GETLK, _F_WRLCK, byte) != _F_UNLCK


def wanted_bytes(perm: int, shared: int) -> set[int]:
    out = set()
    for bit in range(len(PERM_NAMES)):
        if perm & (1 << bit):
            out.add(PERM_LOCK_BASE + bit)
        if not shared & (1 << bit) & PERM_ALL:
            out.add(SHARED_LOCK_BASE + bit)
    return out


class ImageLocks:
    """The lock bytes one open image holds."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.held: set[int] = set()

    def check(self, perm: int, shared: int) -> None:
        for bit, name in enumerate(PERM_NAMES):
            mask = 1 << bit
            if perm & mask and byte_is_locked_elsewhere(self.fd, SHARED_LOCK_BASE + bit):
                raise GenericError(f'Failed to get "{name}" lock')
            if not shared & mask and byte_is_locked_elsewhere(self.fd, PERM_LOCK_BASE + bit):
                raise GenericError(f'Failed to get shared "{name}" lock')

    def apply(self, perm: int, shared: int) -> None:
        """Check for conflicts, then hold exactly the bytes for ``perm``/``shared``."""
        self.check(perm, shared)
        want = wanted_bytes(perm, shared)
        for byte in sorted(want - self.held):
            lock_byte(self.fd, byte)
        for byte in sorted(self.held - want):
            unlock_byte(self.fd, byte)
        self.held = want
