"""The QMP server over real sockets: qemu.qmp clients, raw bytes, a real vexport process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

import vexport
from vexport.daemon import Daemon
from vexport.qmp.registry import REGISTRY, Command
from vexport.qmp.server import MAX_BACKLOG, add_chardev, add_monitor, close_monitors

Start = Callable[..., Any]  # conftest.DaemonProcess factory


# -- a real vexport process, driven by qemu.qmp ---------------------------------------------
async def test_qmpclient_session(start_vexport: Start) -> None:
    proc = start_vexport()
    qmp = QMPClient("test")
    await qmp.connect(proc.qmp_path)
    try:
        version = await qmp.execute("query-version")
        assert version == {"qemu": vexport.QEMU_VERSION, "package": vexport.PACKAGE}
        names = {c["name"] for c in await qmp.execute("query-commands")}
        assert {"qmp_capabilities", "query-version", "quit", "object-add", "object-del"} <= names
        assert await qmp.execute("query-iothreads") == []
        await qmp.execute("object-add", {"qom-type": "iothread", "id": "io0"})
        await qmp.execute(
            "object-add", {"qom-type": "iothread", "id": "io1", "poll-max-ns": 100, "poll-grow": 2}
        )
        threads = await qmp.execute("query-iothreads")
        assert [t["id"] for t in threads] == ["io1", "io0"]
        assert threads[0] == {
            "id": "io1",
            "thread-id": proc.proc.pid,
            "poll-max-ns": 100,
            "poll-grow": 2,
            "poll-shrink": 0,
            "aio-max-batch": 0,
        }
        with pytest.raises(ExecuteError) as e:
            await qmp.execute("object-add", {"qom-type": "iothread", "id": "io0"})
        assert str(e.value) == (
            "attempt to add duplicate property 'io0' to object (type 'container')"
        )
        await qmp.execute("object-del", {"id": "io0"})
        with pytest.raises(ExecuteError) as e:
            await qmp.execute("object-del", {"id": "io0"})
        assert e.value.error_class == "GenericError"
        assert str(e.value) == "object 'io0' not found"
        with pytest.raises(ExecuteError) as e:
            await qmp.execute("no-such-command")
        assert e.value.error_class == "CommandNotFound"
        assert [t["id"] for t in await qmp.execute("query-iothreads")] == ["io1"]
    finally:
        await qmp.disconnect()


def test_legacy_client_and_quit(start_vexport: Start) -> None:
    proc = start_vexport("--object", "iothread,id=cli0")
    qmp = QEMUMonitorProtocol(proc.qmp_path)
    qmp.connect(negotiate=True)
    assert qmp.cmd_obj({"execute": "query-version"})["return"]["qemu"] == vexport.QEMU_VERSION
    assert [t["id"] for t in qmp.cmd_obj({"execute": "query-iothreads"})["return"]] == ["cli0"]
    reply = qmp.cmd_obj({"execute": "query-version", "arguments": {"x": 1}, "id": "abc"})
    assert reply == {
        "id": "abc",
        "error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"},
    }
    assert qmp.cmd_obj({"execute": "quit"}) == {"return": {}}
    # The daemon closes the connection as it exits (as QSD does); qemu.qmp reports that
    # as EOFError if it sees the close before its own.
    with contextlib.suppress(EOFError):
        qmp.close()
    assert proc.wait() == 0
    assert not os.path.exists(proc.qmp_path)


def test_socket_is_private_and_stale_file_replaced(short_tmp: Path, raw_qmp: Any) -> None:
    workdir = short_tmp
    path = workdir / "qmp.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a socket file nobody listens on
    stale.close()
    argv = [sys.executable, "-m", "vexport", "--chardev",
            f"socket,id=m,path={path},server=on,wait=off", "--monitor", "m"]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        deadline = 100
        while deadline:
            try:
                client = raw_qmp(str(path))
                break
            except OSError:
                deadline -= 1
                time.sleep(0.05)
        else:
            raise TimeoutError
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        client.negotiate()
        client.cmd("quit")
        assert proc.wait(10) == 0
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_two_clients_at_once(start_vexport: Start) -> None:
    proc = start_vexport()
    a, b = proc.raw(), proc.raw()  # the second is served while the first is connected
    assert a.greeting["QMP"]["capabilities"] == ["oob"] == b.greeting["QMP"]["capabilities"]
    a.negotiate()
    assert b.cmd("query-version")["error"]["class"] == "CommandNotFound"  # b not negotiated
    b.negotiate()
    assert b.cmd("object-add", {"qom-type": "iothread", "id": "x"}) == {"return": {}}
    assert [t["id"] for t in a.cmd("query-iothreads")["return"]] == ["x"]
    a.close()
    assert b.cmd("query-version", id=5)["id"] == 5
    b.close()


@pytest.mark.parametrize(
    ("data", "descs"),
    [
        (
            b"garbage%",
            ["JSON parse error, invalid keyword 'garbage'", "JSON parse error, stray '%'"],
        ),
        (b"\xff\xfe ", ["JSON parse error, stray '\ufffd'"]),
        (b'{"execute": "query-version", "id": "\xc3\x28"}\n', None),
        (b"[1, 2]", ["QMP input must be a JSON object"]),
        (b'{"execute" 1}', ["JSON parse error, missing : in object pair"]),
    ],
)
def test_malformed_input_then_serving(
    start_vexport: Start, data: bytes, descs: list[str] | None
) -> None:
    proc = start_vexport()
    c = proc.raw()
    c.negotiate()
    c.send(data)
    replies = c.recv_until_quiet()
    assert replies and all("id" not in r and r["error"]["class"] == "GenericError" for r in replies)
    if descs is not None:
        assert [r["error"]["desc"] for r in replies] == descs
    assert c.cmd("query-version", id=1)["return"]["qemu"] == vexport.QEMU_VERSION


def test_split_joined_and_pipelined_messages(start_vexport: Start) -> None:
    proc = start_vexport()
    c = proc.raw()
    c.negotiate()
    message = b'{"execute": "query-version", "id": "split"}'
    for i in range(0, len(message), 5):
        c.send(message[i : i + 5])
    assert c.recv()["id"] == "split"
    # many commands in one write (more than the backlog bound): all answered, in order
    count = MAX_BACKLOG * 4
    c.send(b"".join(b'{"execute":"query-version","id":%d}' % i for i in range(count)))
    assert [c.recv()["id"] for _ in range(count)] == list(range(count))


def test_huge_messages(start_vexport: Start) -> None:
    proc = start_vexport()
    c = proc.raw()
    c.negotiate()
    big_id = "x" * (1 << 20)
    c.send(json.dumps({"execute": "query-version", "id": big_id}).encode())
    assert c.recv()["id"] == big_id
    c.send(b'{"execute": "query-version", "id": "' + b"y" * (17 << 20) + b'"}')
    assert c.recv() == {
        "error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}
    }
    assert c.cmd("query-version", id=2)["id"] == 2


def test_oob_and_pretty(start_vexport: Start) -> None:
    proc = start_vexport(pretty=True)
    c = proc.raw()
    assert c.greeting["QMP"]["version"]["qemu"] == vexport.QEMU_VERSION
    c.send(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 1}')
    assert c.recv_raw_line() == b"{\r\n"  # pretty output is multi-line, CRLF
    assert c.recv_raw_line() == b'    "return": {\r\n'
    for line in (b"    },\r\n", b'    "id": 1\r\n', b"}\r\n"):
        assert c.recv_raw_line() == line
    c.send(b'{"exec-oob": "query-version", "id": 2}')
    text = b"".join(c.recv_raw_line() for _ in range(7))
    assert json.loads(text) == {
        "id": 2,
        "error": {
            "class": "GenericError",
            "desc": "The command query-version does not support OOB",
        },
    }


def test_client_disconnect_mid_stream(start_vexport: Start) -> None:
    proc = start_vexport()
    for _ in range(3):
        c = proc.raw()
        c.negotiate()
        c.send(b'{"execute":"query-version"}{"execute":"query-commands"}{"execute":"query-ve')
        c.close()
    c = proc.raw()
    c.negotiate()
    assert "return" in c.cmd("query-version")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--monitor", "chardev=x"], 'chardev "x" not found'),
        (["--monitor", "m"], "Device 'm' is in use"),
        (["--object", "iothread,id=m", "--object", "iothread,id=m"],
         "attempt to add duplicate property 'm' to object (type 'container')"),
    ],
)  # fmt: skip
def test_monitor_startup_errors(start_vexport: Start, args: list[str], message: str) -> None:
    with pytest.raises(RuntimeError, match="exited 1: vexport: .*" + re.escape(message)):
        start_vexport(*args)


def test_bind_failure_message(tmp_path: Path) -> None:
    path = "/nonexistent-dir/x.sock"
    r = subprocess.run(
        [sys.executable, "-m", "vexport", "--chardev",
         f"socket,id=m,path={path},server=on,wait=off"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.strip().endswith(f"Failed to bind socket to {path}: No such file or directory")


# -- in-process server: events, TCP, wait=on, slow commands --------------------------------
@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    d = Daemon()
    yield d
    await close_monitors(d)


@pytest.fixture
def slow_command() -> Any:
    """A temporary command that waits for a future, to disconnect mid-command."""
    gate: asyncio.Future[None] = asyncio.get_event_loop().create_future()
    calls: list[str] = []

    async def handler(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
        calls.append("start")
        await gate
        calls.append("end")
        return {"slept": True}

    REGISTRY["x-test-slow"] = Command("x-test-slow", handler, None)
    yield gate, calls
    del REGISTRY["x-test-slow"]


async def _open(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(path)
    greeting = json.loads(await reader.readline())
    assert "QMP" in greeting
    return reader, writer


async def _cmd(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: dict[str, Any]
) -> dict[str, Any]:
    writer.write(json.dumps(message).encode())
    return json.loads(await asyncio.wait_for(reader.readline(), 5))


async def _unix_monitor(daemon: Daemon, where: Path) -> str:
    path = str(where / "q.sock")
    await add_chardev(
        daemon, {"backend": "socket", "id": "m", "path": path, "server": True, "wait": False}
    )
    await add_monitor(daemon, {"chardev": "m"})
    return path


async def test_events_reach_negotiated_clients_only(daemon: Daemon, short_tmp: Path) -> None:
    path = await _unix_monitor(daemon, short_tmp)
    r1, w1 = await _open(path)
    r2, w2 = await _open(path)
    assert await _cmd(r1, w1, {"execute": "qmp_capabilities"}) == {"return": {}}
    daemon.emit_event("BLOCK_EXPORT_DELETED", {"id": "e0"})
    event = json.loads(await asyncio.wait_for(r1.readline(), 5))
    assert event["event"] == "BLOCK_EXPORT_DELETED" and event["data"] == {"id": "e0"}
    assert set(event["timestamp"]) == {"seconds", "microseconds"}
    # client 2 has not negotiated: its next line is the reply, not the event
    reply = await _cmd(r2, w2, {"execute": "qmp_capabilities", "id": 1})
    assert reply == {"return": {}, "id": 1}
    w1.close()
    w2.close()
    await close_monitors(daemon)
    assert not os.path.exists(path)


async def test_disconnect_mid_command(daemon: Daemon, short_tmp: Path, slow_command: Any) -> None:
    gate, calls = slow_command
    path = await _unix_monitor(daemon, short_tmp)
    r, w = await _open(path)
    await _cmd(r, w, {"execute": "qmp_capabilities"})
    w.write(b'{"execute": "x-test-slow"}{"execute": "x-test-slow"}')
    await w.drain()
    while not calls:
        await asyncio.sleep(0.01)
    w.close()
    await asyncio.sleep(0.05)
    gate.set_result(None)
    await asyncio.sleep(0.05)
    assert calls == ["start", "end"]  # finished; the queued second one was dropped
    r2, w2 = await _open(path)
    assert (await _cmd(r2, w2, {"execute": "qmp_capabilities"})) == {"return": {}}
    w2.close()


async def test_events_do_not_split_replies_and_order(
    daemon: Daemon, short_tmp: Path, slow_command: Any
) -> None:
    gate, calls = slow_command
    path = await _unix_monitor(daemon, short_tmp)
    r, w = await _open(path)
    await _cmd(r, w, {"execute": "qmp_capabilities"})
    w.write(b'{"execute": "x-test-slow", "id": 1}{"execute": "query-version", "id": 2}')
    while not calls:
        await asyncio.sleep(0.01)
    daemon.emit_event("X", None)
    gate.set_result(None)
    lines = [json.loads(await asyncio.wait_for(r.readline(), 5)) for _ in range(3)]
    assert [m.get("event", m.get("id")) for m in lines] == ["X", 1, 2]
    w.close()


async def test_tcp_chardev_and_wait_on(daemon: Daemon) -> None:
    options = {"backend": "socket", "id": "t", "host": "127.0.0.1", "port": "0", "server": True}
    task = asyncio.ensure_future(add_chardev(daemon, options))  # wait defaults to on
    while "t" not in daemon.chardevs:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert not task.done()  # waiting for a client
    host, port = daemon.chardevs["t"].addresses[0][:2]
    reader, writer = await asyncio.open_connection(host, port)
    await asyncio.wait_for(task, 5)
    await add_monitor(daemon, {"chardev": "t", "pretty": False})
    greeting = json.loads(await asyncio.wait_for(reader.readline(), 5))
    assert greeting["QMP"]["version"]["package"] == vexport.PACKAGE
    writer.close()


@pytest.mark.parametrize(
    ("options", "desc"),
    [
        ({"backend": "socket", "path": "/tmp/x"}, "chardev: no id specified"),
        ({"backend": "file", "id": "f", "path": "/tmp/x"},
         "chardev backend 'file' is not supported by vexport"),
        ({"backend": "socket", "id": "s", "path": "/tmp/x", "host": "h", "port": "1"},
         "None or one of 'path', 'fd' or 'host' option required."),
        ({"backend": "socket", "id": "s", "host": "127.0.0.1", "server": True},
         "chardev: socket: no port given"),
        ({"backend": "socket", "id": "s", "path": "/nonexistent-dir/q.sock"},
         "Failed to connect to '/nonexistent-dir/q.sock': No such file or directory"),
        ({"backend": "socket", "id": "s", "path": "/tmp/x", "telnet": True},
         "Invalid parameter 'telnet'"),
    ],
)  # fmt: skip
async def test_chardev_errors(daemon: Daemon, options: dict[str, Any], desc: str) -> None:
    from vexport.errors import GenericError

    with pytest.raises(GenericError) as e:
        await add_chardev(daemon, options)
    assert e.value.desc == desc
    assert daemon.chardevs == {}


async def test_monitor_errors(daemon: Daemon, short_tmp: Path) -> None:
    from vexport.errors import GenericError

    await _unix_monitor(daemon, short_tmp)
    for options, desc in [
        ({"chardev": "nope"}, 'chardev "nope" not found'),
        ({"chardev": "m"}, "Device 'm' is in use"),
        ({"chardev": "m", "mode": "readline"}, "Only QMP is supported"),
    ]:
        with pytest.raises(GenericError) as e:
            await add_monitor(daemon, options)
        assert e.value.desc == desc
