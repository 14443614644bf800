"""Process control the standard library lacks: prctl(PR_SET_PDEATHSIG, PR_SET_NAME),
sched_getcpu().

A queue worker (see vexport/exports/queue_worker.py) holds ``/dev/vduse/NAME`` open; if
the daemon is killed, the worker must die with it, or a restarted daemon could not open
the device again (EBUSY).  cffi in ABI mode, like the other kernel modules.
"""

from __future__ import annotations

import os

import cffi

ffi = cffi.FFI()
ffi.cdef(
    "int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4,"
    " unsigned long arg5);"
    " int sched_getcpu(void);"
)
_libc = ffi.dlopen(None)

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


def set_parent_death_signal(signum: int) -> None:
    """Have the kernel send ``signum`` to this process when its parent thread exits."""
    if _libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err))


def set_name(name: str) -> None:
    """Name this process (its ``comm``: what ps, top and /proc/PID/comm show; at most
    15 bytes are kept)."""
    buf = ffi.new("char[]", name.encode()[:15])
    if _libc.prctl(PR_SET_NAME, int(ffi.cast("uintptr_t", buf)), 0, 0, 0) != 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err))


def current_cpu() -> int:
    """The CPU this thread runs on now (glibc's sched_getcpu: no system call where the
    vDSO or RDPID answers); -1 if unknown."""
    return int(_libc.sched_getcpu())
