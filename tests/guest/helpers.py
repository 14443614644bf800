"""Helpers for guest tests: start a VDUSE export daemon, attach it with vdpa, O_DIRECT I/O.

The daemon is given as an argv prefix (``["qemu-storage-daemon"]`` or, later,
``[".venv/bin/vexport"]``) so the same test body runs against either implementation.
These helpers only make sense inside the guest (root, vduse loaded); see docs/guest.md.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import mmap
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from qemu.qmp.legacy import QEMUMonitorProtocol as QMPClient

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


# --------------------------------------------------------------------------- daemons

REPO_ROOT = Path(__file__).resolve().parents[2]
QSD = ["qemu-storage-daemon"]
VEXPORT = [str(REPO_ROOT / ".venv" / "bin" / "vexport")]


def monitor_args(sock: str | os.PathLike[str]) -> list[str]:
    """Command-line options for a QMP monitor on the UNIX socket ``sock``."""
    return [
        "--chardev", f"socket,id=vxmon,path={sock},server=on,wait=off",
        "--monitor", "chardev=vxmon",
    ]  # fmt: skip


def qmp_connect(sock: str | os.PathLike[str], timeout: float = 30) -> QMPClient:
    """Connect to (and negotiate with) the QMP monitor listening on ``sock``.

    Waits for the socket to appear; the client's commands time out after ``timeout``.
    """
    from qemu.qmp.legacy import QEMUMonitorProtocol

    wait_for(lambda: os.path.exists(sock), timeout, f"the QMP socket {sock}")
    client = QEMUMonitorProtocol(os.fspath(sock))
    client.connect()
    client.settimeout(timeout)
    return client


def qmp_wait_event(client: QMPClient, name: str, timeout: float = 30) -> dict[str, Any]:
    """Return the next event called ``name`` (other events are dropped)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {name} event within {timeout:g} s")
        try:
            event = client.pull_event(wait=float(left))
        except TimeoutError:
            event = None
        if event is not None and event.get("event") == name:
            return event


# --------------------------------------------------------------------------- block devices


def sysfs_block(dev: str, attr: str) -> str:
    """/sys/block/<vdX>/<attr>, stripped."""
    return (Path("/sys/class/block") / Path(dev).name / attr).read_text().strip()


def disk_bytes(dev: str) -> int:
    return int(sysfs_block(dev, "size")) * 512


def odirect_digest(path: str, offset: int, length: int, chunk: int = 1 << 20) -> str:
    """sha256 of ``length`` bytes at ``offset``, read with O_DIRECT (offset and length
    must be aligned to the logical block size)."""
    h = hashlib.sha256()
    buf = aligned_buffer(chunk)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        pos = offset
        end = offset + length
        while pos < end:
            n = min(chunk, end - pos)
            got = os.preadv(fd, [memoryview(buf)[:n]], pos)
            if got != n:
                raise OSError(f"short O_DIRECT read of {path}: {got} of {n} at {pos}")
            h.update(memoryview(buf)[:n])
            pos += n
    finally:
        os.close(fd)
        buf.close()
    return h.hexdigest()


def file_digest(path: str | os.PathLike[str], offset: int, length: int) -> str:
    """sha256 of ``length`` bytes at ``offset`` of a regular file (buffered reads)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            data = f.read(min(left, 1 << 20))
            if not data:
                raise OSError(f"{path} ends {left} bytes before {offset + length}")
            h.update(data)
            left -= len(data)
    return h.hexdigest()


# --------------------------------------------------------------------------- fio


class FioError(AssertionError):
    pass


def fio(args: Sequence[str], timeout: float = 180) -> dict[str, Any]:
    """Run one fio job (``--name`` is added if absent) with ``--output-format=json``.

    Returns the job's JSON object.  Raises FioError, with fio's output, when fio exits
    with a non-zero status (verify failures, I/O errors) or reports a job error.
    """
    argv = ["fio", "--output-format=json", *args]
    if not any(a.startswith("--name=") for a in args):
        argv.insert(1, "--name=vxjob")
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    out = res.stdout
    start = out.find("{")
    report: dict[str, Any] | None = None
    if start >= 0:
        try:
            report = json.loads(out[start:])
        except ValueError:
            report = None
    if res.returncode != 0 or report is None:
        raise FioError(
            f"fio {' '.join(args)} exited with {res.returncode}\n"
            f"stdout:\n{out[-4000:]}\nstderr:\n{res.stderr[-4000:]}"
        )
    job: dict[str, Any] = report["jobs"][0]
    if job.get("error", 0) != 0:
        raise FioError(f"fio job error {job['error']}: {res.stderr[-4000:]}")
    return job


def _vdpa_driver(name: str) -> str | None:
    link = Path("/sys/bus/vdpa/devices") / name / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def _rebind(name: str, driver: str) -> None:
    current = _vdpa_driver(name)
    if current == driver:
        return
    if current is not None:
        Path(f"/sys/bus/vdpa/drivers/{current}/unbind").write_text(name)
    Path(f"/sys/bus/vdpa/drivers/{driver}/bind").write_text(name)


def vhost_vdpa_device_of(name: str) -> str | None:
    """/dev/vhost-vdpa-N of a vdpa device bound to vhost_vdpa, once the node exists."""
    for entry in glob.glob(f"/sys/bus/vdpa/devices/{name}/vhost-vdpa-*"):
        dev = "/dev/" + os.path.basename(entry)
        if os.path.exists(dev):
            return dev
    return None


def bind_vhost_vdpa(name: str, timeout: float = 10) -> str:
    """Move vdpa device ``name`` (e.g. from virtio_vdpa) to vhost_vdpa; returns
    /dev/vhost-vdpa-N, the node a VM monitor would open."""
    _rebind(name, "vhost_vdpa")
    return wait_for(lambda: vhost_vdpa_device_of(name), timeout, f"the vhost-vdpa node of {name}")


def rebind_virtio_vdpa(name: str, timeout: float = 30) -> str:
    """Move vdpa device ``name`` back to virtio_vdpa; returns its /dev/vdX."""
    _rebind(name, "virtio_vdpa")
    return wait_for(lambda: block_device_of(name), timeout, f"the block device of {name}")
