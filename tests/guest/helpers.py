"""Helpers for guest tests: start a VDUSE export daemon, attach it with vdpa, O_DIRECT I/O.

The daemon is given as an argv prefix (``["qemu-storage-daemon"]`` or, later,
``[".venv/bin/vexport"]``) so the same test body runs against either implementation.
These helpers only make sense inside the guest (root, vduse loaded); see docs/guest.md.
"""

from __future__ import annotations

import contextlib
import glob
import mmap
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

PAGE = mmap.PAGESIZE
T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll predicate() until it returns a true value (returned); TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def start_daemon(
    cmd: Sequence[str], args: Sequence[str], vduse_name: str, timeout: float = 60
) -> subprocess.Popen[bytes]:
    """Start ``cmd + args``; wait until ``/dev/vduse/<vduse_name>`` exists.

    The daemon's stdout/stderr go to /tmp/<vduse_name>.daemon.log (see daemon_log()).
    If the daemon exits first, RuntimeError carries its exit status and log.
    """
    log = open(daemon_log_path(vduse_name), "wb")
    proc = subprocess.Popen([*cmd, *args], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    node = Path("/dev/vduse") / vduse_name

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(
                f"daemon exited with status {proc.returncode} before creating {node}:\n"
                + daemon_log(vduse_name)
            )
        return node.exists()

    try:
        wait_for(ready, timeout, str(node))
    except BaseException:
        stop_daemon(proc)
        raise
    return proc


def daemon_log_path(vduse_name: str) -> Path:
    return Path("/tmp") / f"{vduse_name}.daemon.log"


def daemon_log(vduse_name: str) -> str:
    try:
        return daemon_log_path(vduse_name).read_text(errors="replace")
    except OSError:
        return ""


def stop_daemon(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM the daemon and wait; SIGKILL after ``timeout``.  Returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"daemon did not exit within {timeout:g} s of SIGTERM") from None
    return proc.returncode


def block_device_of(vdpa_name: str) -> str | None:
    """/dev/vdX of a vdpa device bound to virtio_vdpa, if its disk exists yet."""
    for blk in glob.glob(f"/sys/bus/vdpa/devices/{vdpa_name}/virtio*/block/*"):
        dev = "/dev/" + os.path.basename(blk)
        if os.path.exists(dev):
            return dev
    return None


def vdpa_add(name: str, timeout: float = 30) -> str:
    """``vdpa dev add name NAME mgmtdev vduse``; wait for and return its block device."""
    subprocess.run(
        ["vdpa", "dev", "add", "name", name, "mgmtdev", "vduse"],
        check=True,
        capture_output=True,
    )
    return wait_for(lambda: block_device_of(name), timeout, f"the block device of {name}")


def vdpa_del(name: str) -> None:
    subprocess.run(["vdpa", "dev", "del", name], check=True, capture_output=True)


def aligned_buffer(length: int) -> mmap.mmap:
    """Page-aligned anonymous memory, suitable for O_DIRECT."""
    return mmap.mmap(-1, max(length, PAGE))


def odirect_write(path: str, offset: int, data: bytes) -> None:
    buf = aligned_buffer(len(data))
    buf[: len(data)] = data
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        n = os.pwritev(fd, [memoryview(buf)[: len(data)]], offset)
        if n != len(data):
            raise OSError(f"short O_DIRECT write: {n} of {len(data)}")
    finally:
        os.close(fd)
        buf.close()


def odirect_read(path: str, offset: int, length: int) -> bytes:
    buf = aligned_buffer(length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [memoryview(buf)[:length]], offset)
        if n != length:
            raise OSError(f"short O_DIRECT read: {n} of {length}")
        return bytes(buf[:length])
    finally:
        os.close(fd)
        buf.close()


def null_blk_create(name: str, size_mb: int = 1024, **params: int | str) -> str:
    """Make a null_blk device through configfs; returns /dev/<name>.  Remove it with
    null_blk_remove(name).  params are configfs attributes (memory_backed=1, blocksize=4096...)."""
    d = Path("/sys/kernel/config/nullb") / name
    d.mkdir()
    (d / "size").write_text(str(size_mb))
    for key, value in params.items():
        (d / key).write_text(str(value))
    (d / "power").write_text("1")
    dev = f"/dev/{name}"
    wait_for(lambda: os.path.exists(dev), 10, dev)
    return dev


def null_blk_remove(name: str) -> None:
    d = Path("/sys/kernel/config/nullb") / name
    with contextlib.suppress(OSError):
        (d / "power").write_text("0")
    d.rmdir()
