"""The real ``vexport`` process: options, start-up errors, pid file, signals, daemonize."""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

VEXPORT = [sys.executable, "-m", "vexport"]
NULL = ["--blockdev", "null-co,node-name=a"]


def run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VEXPORT, *args], capture_output=True, text=True, timeout=timeout)


def wait_for(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.02)


def test_help() -> None:
    r = run("--help")
    assert r.returncode == 0
    assert r.stdout.startswith("Usage: vexport [options]")
    assert "--export [type=]vduse-blk" in r.stdout
    assert run("-h", "--bogus").returncode == 0


def test_version() -> None:
    r = run("-V")
    assert r.returncode == 0
    assert r.stdout.startswith("vexport version ")
    assert "qemu-storage-daemon 7.2" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "vexport: unrecognized option '--bogus'"),
        (["-x"], "vexport: invalid option -- 'x'"),
        (["--pidfile"], "vexport: option '--pidfile' requires an argument"),
        (["foo"], "vexport: foo: Unexpected argument"),
        (
            ["--blockdev", "x"],
            "vexport: --blockdev x: Parameter 'driver' does not accept value 'x'",
        ),
        (["--blockdev=x"], "vexport: --blockdev=x: Parameter 'driver' does not accept value 'x'"),
        (
            ["--blockdev", "driver=file,node-name=a"],
            "vexport: --blockdev driver=file,node-name=a: Parameter 'filename' is missing",
        ),
        (
            ["--blockdev", "null-co,read-only"],
            "vexport: --blockdev null-co,read-only: Expected '=' after parameter 'read-only'",
        ),
        (
            ["--blockdev", '{"driver":"null-co"'],
            'vexport: --blockdev {"driver":"null-co": JSON parse error, premature EOI',
        ),
        (
            ["--blockdev", '{"driver":"null-co","read-only":"on"}'],
            'vexport: --blockdev {"driver":"null-co","read-only":"on"}: '
            "Invalid parameter type for 'read-only', expected: boolean",
        ),
        # QSD aborts here (exit 134): vexport answers an error
        (
            ["--blockdev", "null-co,size=-1,node-name=a"],
            "vexport: --blockdev null-co,size=-1,node-name=a: "
            "Parameter 'size' expects a non-negative number below 2^64",
        ),
        (
            ["--export", "vduse-blk,id=e"],
            "vexport: --export vduse-blk,id=e: Parameter 'node-name' is missing",
        ),
        (["--object", "iothread"], "vexport: --object iothread: Parameter 'id' is missing"),
        (
            ["--monitor", "x,bogus=1"],
            "vexport: --monitor x,bogus=1: Parameter 'bogus' is unexpected",
        ),
        (["--chardev", "socket"], "vexport: --chardev socket: chardev: no id specified"),
        (
            ["--nbd-server", "addr.type=unix,addr.path=/tmp/x"],
            "vexport: --nbd-server addr.type=unix,addr.path=/tmp/x: "
            "NBD is not supported by vexport",
        ),
        (
            ["--nbd-server", "bogus"],
            "vexport: --nbd-server bogus: Expected '=' after parameter 'bogus'",
        ),
        # second pass strictly in order
        (
            [*NULL, "--blockdev", "null-co,node-name=b", "--blockdev", "bogus"],
            "vexport: --blockdev bogus: Parameter 'driver' does not accept value 'bogus'",
        ),
    ],
)
def test_startup_errors(args: list[str], message: str) -> None:
    r = run(*args)
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines()[0] == message


def test_object_help() -> None:
    r = run("--object", "help")
    assert r.returncode == 0
    assert r.stdout == "List of user creatable objects:\n  iothread\n"


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*VEXPORT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_pidfile_written_locked_removed(tmp: Path) -> None:
    pidfile = tmp / "v.pid"
    proc = start(*NULL, "--pidfile", str(pidfile))
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text().endswith("\n"))
        assert pidfile.read_text() == f"{proc.pid}\n"
        # locked by the daemon
        fd = os.open(pidfile, os.O_RDWR)
        try:
            with pytest.raises(OSError) as info:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert info.value.errno in (errno.EAGAIN, errno.EACCES)
        finally:
            os.close(fd)
        # a second vexport cannot take it
        r = run(*NULL, "--pidfile", str(pidfile))
        assert r.returncode == 1
        assert r.stderr.splitlines()[0] == (
            "vexport: cannot create PID file: Cannot lock pid file: "
            "Resource temporarily unavailable"
        )
        assert pidfile.read_text() == f"{proc.pid}\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not pidfile.exists()
    finally:
        proc.kill()
        proc.wait()


def test_pidfile_cannot_create(tmp: Path) -> None:
    r = run(*NULL, "--pidfile", str(tmp / "no" / "v.pid"))
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == (
        f"vexport: cannot create PID file: Could not create '{tmp}/no/v.pid': "
        "No such file or directory"
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_end_with_status_0(tmp: Path, signum: int) -> None:
    pidfile = tmp / "v.pid"
    proc = start(*NULL, "--pidfile", str(pidfile))
    try:
        wait_for(pidfile.exists)
        proc.send_signal(signum)
        assert proc.wait(timeout=10) == 0
        assert not pidfile.exists()
    finally:
        proc.kill()
        proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_daemonize(tmp: Path) -> None:
    pidfile = tmp / "v.pid"
    r = run("--daemonize", *NULL, "--pidfile", str(pidfile))
    assert r.returncode == 0, r.stderr
    # the parent returned only after start-up: the pid file is already there
    pid = int(pidfile.read_text())
    try:
        assert _alive(pid)
        assert os.getsid(pid) == pid  # a session of its own
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pidfile.exists())
    wait_for(lambda: not _alive(pid))


def test_daemonize_startup_error() -> None:
    r = run("--daemonize", "--blockdev", "null-co,size=-1,node-name=a")
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == (
        "vexport: --blockdev null-co,size=-1,node-name=a: "
        "Parameter 'size' expects a non-negative number below 2^64"
    )


def _qmp(path: str, command: str) -> dict:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    f = sock.makefile("rwb")
    assert "QMP" in json.loads(f.readline())
    for cmd in ("qmp_capabilities", command):
        f.write(json.dumps({"execute": cmd}).encode() + b"\n")
        f.flush()
        while "event" in (reply := json.loads(f.readline())):
            pass
        assert "return" in reply, reply
    sock.close()
    return reply


@pytest.mark.skipif(
    importlib.util.find_spec("vexport.qmp.server") is None, reason="QMP server not written yet"
)
def test_daemonize_with_monitor_quit(tmp: Path) -> None:
    sock = str(tmp / "qmp.sock")
    pidfile = tmp / "v.pid"
    r = run("--daemonize", "--chardev", f"socket,id=m,path={sock},server=on,wait=off",
            "--monitor", "m", *NULL, "--pidfile", str(pidfile))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert os.path.exists(sock)  # the parent exits once the socket exists
    pid = int(pidfile.read_text())
    try:
        _qmp(sock, "quit")
        wait_for(lambda: not _alive(pid))
        assert not pidfile.exists()
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
