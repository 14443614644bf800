"""Fixtures that run a real daemon (vexport, or qemu-storage-daemon for comparison).

``start_vexport(*args)`` starts ``python -m vexport`` with a QMP monitor on a unix socket
(``--chardev socket,id=m,path=<dir>/qmp.sock,server=on,wait=off --monitor chardev=m``)
plus ``args``, waits until the socket accepts connections, and stops the process
(SIGTERM) at the end of the test.  ``start_qsd`` does the same with
/usr/bin/qemu-storage-daemon.  ``RawQMP`` is a plain-socket client for byte-level tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

QSD = "/usr/bin/qemu-storage-daemon"


class DaemonProcess:
    def __init__(
        self, argv: list[str], workdir: Path, extra: tuple[str, ...], pretty: bool
    ) -> None:
        self.workdir = workdir
        self.qmp_path = str(workdir / "qmp.sock")
        monitor = "chardev=m" + (",pretty=on" if pretty else "")
        self.argv = [
            *argv,
            "--chardev", f"socket,id=m,path={self.qmp_path},server=on,wait=off",
            "--monitor", monitor,
            *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise RuntimeError(f"{self.argv} exited {self.proc.returncode}: {err}{out}")
            if os.path.exists(self.qmp_path):
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(self.qmp_path)
                        s.settimeout(5)
                        s.recv(4096)  # the greeting: the daemon is serving
                    break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.argv} did not open its QMP socket")
            time.sleep(0.02)

    def raw(self) -> RawQMP:
        return RawQMP(self.qmp_path)

    def wait(self, timeout: float = 10) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class RawQMP:
    """A byte-level QMP client: send any bytes, read CRLF-terminated replies."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.greeting = self.recv()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any]:
        """One reply; a pretty-printed one spans several CRLF-terminated lines."""
        text = b""
        while True:
            text += self.recv_raw_line()
            if not text.startswith(b"{\r\n") or text.endswith(b"\n}\r\n"):
                return json.loads(text)

    def recv_raw_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line + b"\r\n"

    def recv_until_quiet(self, quiet: float = 0.2) -> list[dict[str, Any]]:
        """Every reply that arrives until nothing comes for ``quiet`` seconds."""
        out: list[dict[str, Any]] = []
        old = self.sock.gettimeout()
        self.sock.settimeout(quiet)
        try:
            while True:
                try:
                    out.append(self.recv())
                except TimeoutError:
                    return out
        finally:
            self.sock.settimeout(old)

    def cmd(self, execute: str, arguments: dict[str, Any] | None = None, **extra: Any) -> Any:
        message: dict[str, Any] = {"execute": execute, **extra}
        if arguments is not None:
            message["arguments"] = arguments
        self.send(json.dumps(message).encode())
        while True:
            reply = self.recv()
            if "event" not in reply:
                return reply

    def negotiate(self) -> None:
        assert self.cmd("qmp_capabilities") == {"return": {}}

    def close(self) -> None:
        self.sock.close()


def short_tmpdir() -> Path:
    """Unix socket paths must stay under 108 bytes: pytest's tmp_path may be longer."""
    return Path(tempfile.mkdtemp(prefix="vx-", dir="/tmp"))


def _factory(argv: list[str]) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []
    dirs: list[Path] = []

    def start(*extra: str, pretty: bool = False) -> DaemonProcess:
        workdir = short_tmpdir()
        dirs.append(workdir)
        proc = DaemonProcess(argv, workdir, extra, pretty)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start_vexport() -> Iterator[Callable[..., DaemonProcess]]:
    yield from _factory([sys.executable, "-m", "vexport"])


@pytest.fixture
def start_qsd() -> Iterator[Callable[..., DaemonProcess]]:
    if not os.access(QSD, os.X_OK):
        pytest.skip("qemu-storage-daemon is not installed")
    yield from _factory([QSD])


@pytest.fixture
def raw_qmp() -> type[RawQMP]:
    """The RawQMP class (test modules cannot import conftest)."""
    return RawQMP


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def start_vexport_shared() -> Iterator[Callable[..., DaemonProcess]]:
    """Like start_vexport, for a whole test module (cases must clean up after themselves)."""
    yield from _factory([sys.executable, "-m", "vexport"])


@pytest.fixture(scope="module")
def start_qsd_shared() -> Iterator[Callable[..., DaemonProcess]]:
    if not os.access(QSD, os.X_OK):
        pytest.skip("qemu-storage-daemon is not installed")
    yield from _factory([QSD])
