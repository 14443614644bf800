"""Queue worker processes (vexport/exports/queue_worker.py), the parts a host can check.

The worker protocol and the device side run against the real kernel only (a forked
worker's ioctls would go to a copy of the fake kernel): tests/guest covers them with
two-queue exports (random verified I/O on both queues, IOTLB remaps, resets with requests
in flight, kill -9 with requests in flight, block_resize).  Here: that a worker dies with
the daemon and lets go of the daemon's sockets, and that block nodes serve requests in a
forked worker with their own I/O engine while the daemon's keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import select
import signal
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vexport.blockdev.graph import BlockGraph
from vexport.errors import GenericError
from vexport.exports import queue_worker

MiB = 1 << 20


@pytest.fixture
def g() -> Iterator[BlockGraph]:
    graph = BlockGraph()
    yield graph
    graph.close_all()


def read_until_eof(fd: int, timeout: float) -> bytes:
    """Everything written to the pipe until every writer closed it (or the timeout)."""
    out = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"pipe still open after {timeout:g} s; read so far: {out!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                return out
            out += chunk


def test_worker_dies_with_the_daemon() -> None:
    """kill -9 of the daemon kills its workers (which hold /dev/vduse/NAME open: a
    restarted daemon would get EBUSY).  The worker sleeps for a minute holding the pipe's
    write end; the pipe reaches EOF only when it is dead."""
    r, w = os.pipe()
    daemon = os.fork()
    if daemon == 0:  # pragma: no cover - child
        try:
            os.close(r)
            parent = os.getpid()
            if os.fork() == 0:
                try:
                    loop = queue_worker.become_worker_process(parent)
                    os.write(w, b"worker %d ready %d;" % (os.getpid(), loop is not None))
                    time.sleep(60)
                finally:
                    os._exit(0)
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 30)
        first = os.read(r, 4096) if ready else b""
        assert first.endswith(b"ready 1;"), first
        worker = int(first.split()[1])
        os.kill(daemon, signal.SIGKILL)
        os.waitpid(daemon, 0)
        read_until_eof(r, 10)  # the worker's write end closed: it is dying
        # ... and it goes on to exit (its files close before it becomes a zombie).
        deadline = time.monotonic() + 10
        state = "?"
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                break
            if state in ("Z", "X"):
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"worker {worker} still in state {state} after 10 s")
    finally:
        os.close(r)
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(daemon, signal.SIGKILL)
            os.waitpid(daemon, 0)


def test_worker_leaves_sigterm_to_the_daemon() -> None:
    """SIGTERM sent to every process of the daemon (systemd stops a service's whole
    cgroup that way) must not kill a worker before the daemon has drained it; ^C
    (SIGINT to the foreground process group) neither."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            loop = queue_worker.become_worker_process(os.getppid())
            os.write(w, b"ready %d" % (loop is not None))
            time.sleep(2)
            os.write(w, b" alive")
        finally:
            os._exit(0)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 30)
        assert ready and os.read(r, 64) == b"ready 1"
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
        assert read_until_eof(r, 30) == b" alive"
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_worker_lets_go_of_the_daemons_sockets() -> None:
    """A worker keeps only its own socket: a QMP client the daemon disconnects sees EOF
    at once, not when the workers exit; a listening socket is not held either."""
    client, daemon_side = socket.socketpair()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(b"\0vexport-test-%d" % os.getpid())
    listener.listen(1)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            mine.close()
            loop = queue_worker.become_worker_process(os.getppid(), keep=theirs.fileno())
            sockets = [int(n) for n in os.listdir("/proc/self/fd") if _is_socket(int(n))]
            theirs.send(b"still mine")
            os.write(w, b"%d %r;" % (loop is not None, sockets == [theirs.fileno()]))
            time.sleep(30)
        finally:
            os._exit(0)
    os.close(w)
    theirs.close()
    try:
        ready, _, _ = select.select([r], [], [], 30)
        assert ready and os.read(r, 64) == b"1 True;"
        assert mine.recv(64) == b"still mine"
        daemon_side.close()  # the daemon drops the client
        client.settimeout(10)
        assert client.recv(1) == b""  # EOF while the worker still runs
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        for sock in (client, listener, mine):
            sock.close()


def _is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


def test_worker_started_after_the_daemon_died_exits() -> None:
    """A worker whose daemon died before the death signal was armed does not serve."""
    r, w = os.pipe()
    if os.fork() == 0:  # pragma: no cover - child
        try:
            loop = queue_worker.become_worker_process(os.getppid() + 1_000_000)
            os.write(w, b"loop" if loop is not None else b"none")
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert read_until_eof(r, 30) == b"none"
    finally:
        os.close(r)
        os.wait()


@pytest.mark.parametrize("aio", ["native", "threads", "io_uring"])
async def test_file_node_serves_requests_in_a_forked_worker(
    g: BlockGraph, tmp_path: Path, aio: str
) -> None:
    """Forked from inside the running loop, with the node's engine in use, as the daemon
    forks a worker: after ``after_fork`` the worker's node reads and writes through an
    engine of its own (the daemon's io context, threads or ring are not the worker's:
    without it Linux AIO fails with EINVAL and the thread pool never answers), and the
    daemon's node still works afterwards."""
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(MiB)
    opts = {"driver": "file", "node-name": "f", "filename": str(img), "aio": aio}
    if aio == "native":
        opts["cache"] = {"direct": True}
    try:
        node = g.add(opts)
    except GenericError as e:  # pragma: no cover - only on hosts without the interface
        pytest.skip(f"engine unavailable here: {e.desc}")
    buf = memoryview(mmap.mmap(-1, 4096))
    buf[:] = b"daemon".ljust(4096, b".")
    await node.co_pwritev(0, [buf])  # the daemon's engine exists and has been used
    r, w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        status = 1
        try:
            os.close(r)
            loop = queue_worker.become_worker_process(parent)
            assert loop is not None
            node.after_fork()

            async def serve() -> bytes:
                wbuf = memoryview(mmap.mmap(-1, 4096))
                wbuf[:] = b"worker".ljust(4096, b"!")
                await node.co_pwritev(8192, [wbuf])
                rbuf = memoryview(mmap.mmap(-1, 4096))
                await node.co_preadv(0, [rbuf])
                return bytes(rbuf[:6])

            seen = loop.run_until_complete(asyncio.wait_for(serve(), 20))
            os.write(w, b"read " + seen)
            status = 0
        except BaseException as e:
            os.write(w, repr(e).encode()[:500])
        finally:
            os._exit(status)
    os.close(w)
    try:
        answer = read_until_eof(r, 30)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert answer == b"read daemon", answer
    assert status == 0
    with open(img, "rb") as f:
        f.seek(8192)
        assert f.read(6) == b"worker"
    rbuf = memoryview(mmap.mmap(-1, 4096))
    await node.co_preadv(8192, [rbuf])  # the daemon's engine after the fork
    assert bytes(rbuf[:6]) == b"worker"
