"""Compiled helpers for the data path (cffi API mode), used when they were built.

The export's per-request work in Python costs more guest CPU than QSD's C (under the
test guest's TCG, about 20 times the host's cost per Python step): at queue depth 1 with
two queues, each queue's process and the fio job beside it fill both CPUs.  `poll.c`
runs the poll loop of one queue (vexport/exports/native_poll.py) for the requests of
the common shape on backends it can complete (null-co at once; files and block devices
through a Linux AIO context or an io_uring of its own); everything else stays in Python,
which remains the reference: the compiled loop must give the same used entries, status
bytes and in-flight log as the Python path, and the tests run both.

The module is built by ``pip install`` (setup.py, ``cffi_modules``) or by
``python -m vexport.native.build``.  Without it (or with ``VEXPORT_NATIVE=0``) the
daemon runs the Python path alone.
"""

from __future__ import annotations

import os
from typing import Any

ffi: Any = None
lib: Any = None


def _load() -> None:
    global ffi, lib
    if os.environ.get("VEXPORT_NATIVE", "1") == "0":
        return
    try:
        from vexport.native._poll import ffi as _ffi
        from vexport.native._poll import lib as _lib
    except ImportError:
        return
    ffi, lib = _ffi, _lib


_load()


def available() -> bool:
    """Whether the compiled helpers are built and not turned off."""
    return lib is not None
