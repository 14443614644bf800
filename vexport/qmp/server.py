"""The asyncio shell of the QMP monitor: socket chardevs, monitors and their clients.

Theory of operation
-------------------
``--chardev socket,...`` (``add_chardev``) creates a ``Chardev``: a listening unix or TCP
socket (``server=on``), or one outgoing connection (``server=off``).  Connections that
arrive before a monitor is attached wait in ``Chardev.pending``.  With ``wait=on`` (the
default for a server, as in QEMU) ``add_chardev`` returns only once a client connected.

``--monitor chardev=ID`` (``add_monitor``) attaches a ``Monitor`` to the chardev; every
connection becomes a ``Client`` with its own ``QMPSession`` (several clients may talk to
one monitor at once, where QSD serves one at a time).  A client's reader task feeds the
session; each command the session hands out runs in its own task (``_run``), so an
out-of-band command can run while an in-band one is in progress, and in-band commands
still run one at a time in order (the session hands out the next one only after
``complete``).

Bounds: reading stops while more than ``MAX_BACKLOG`` requests are queued (QEMU's
QMP_REQ_QUEUE_LEN_MAX) or while the socket's write buffer is above the transport's high
water mark; a client whose unsent output (events it does not read) exceeds
``MAX_OUTPUT`` bytes is disconnected.

Unix sockets are bound, chmod'ed 0600 and only then put in listening state, so nobody
else can connect in between.  A stale socket file at the path is replaced (as QEMU does);
any other kind of file there is left alone and reported.  ``close_monitors`` flushes and
closes every client, closes the listeners and removes the socket files it created.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vexport.errors import GenericError
from vexport.qmp.session import Dispatch, QMPSession

if TYPE_CHECKING:
    from vexport.daemon import Daemon

log = logging.getLogger("vexport.qmp")

MAX_BACKLOG = 8
MAX_OUTPUT = 16 << 20
READ_SIZE = 64 << 10
CLOSE_TIMEOUT = 2.0

_CHARDEV_KEYS = {
    "backend", "id", "path", "host", "port", "server", "wait", "to", "ipv4", "ipv6",
    "nodelay", "mux",
}  # fmt: skip

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(eq=False)
class Chardev:
    id: str
    options: dict[str, Any]
    path: str | None = None  # the unix socket file this chardev created
    inode: int | None = None
    server: asyncio.AbstractServer | None = None
    addresses: list[Any] = field(default_factory=list)  # bound socket names
    monitor: Monitor | None = None
    pending: list[Connection] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connected.set()
        if self.monitor is None:
            self.pending.append((reader, writer))
        else:
            self.monitor.start_client(reader, writer)


class Monitor:
    def __init__(self, daemon: Daemon, chardev: Chardev, pretty: bool) -> None:
        self.daemon = daemon
        self.chardev = chardev
        self.pretty = pretty
        self.clients: set[Client] = set()

    def start_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = Client(self, reader, writer)
        self.clients.add(client)
        client.task = asyncio.get_running_loop().create_task(client.run())

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in list(self.clients)), return_exceptions=True)


class Client:
    def __init__(
        self, monitor: Monitor, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.monitor = monitor
        self.daemon = monitor.daemon
        self.reader = reader
        self.writer = writer
        self.session = QMPSession(pretty=monitor.pretty)
        self.task: asyncio.Task[None] | None = None
        self._commands: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._room.set()
        self._closed = False

    async def run(self) -> None:
        self.daemon.add_event_listener(self._on_event)
        try:
            self._flush()  # the greeting
            while not self._closed:
                await self._room.wait()
                await self.writer.drain()
                data = await self.reader.read(READ_SIZE)
                if not data:
                    break
                self.session.receive_data(data)
                self._pump()
        except (ConnectionError, OSError) as e:
            log.debug("QMP client went away: %s", e)
        finally:
            self._disconnect()

    def _pump(self) -> None:
        """Start every command the session hands out, then flush its output."""
        while not self._closed and (action := self.session.next_action()) is not None:
            task = asyncio.get_running_loop().create_task(self._run(action))
            self._commands.add(task)
            task.add_done_callback(self._commands.discard)
        if self.session.backlog >= MAX_BACKLOG:
            self._room.clear()
        else:
            self._room.set()
        self._flush()

    async def _run(self, action: Dispatch) -> None:
        try:
            result = await action.command.handler(self.daemon, action.arguments)
        except asyncio.CancelledError:
            self.session.complete(action, error=GenericError("command cancelled"))
            raise
        except Exception as e:
            self.session.complete(action, error=e)
        else:
            self.session.complete(action, result=result)
        finally:
            self._pump()

    def _on_event(self, event: dict[str, Any]) -> None:
        self.session.event(event)
        self._flush()

    def _flush(self) -> None:
        data = self.session.data_to_send()
        if not data or self._closed or self.writer.is_closing():
            return
        if self.writer.transport.get_write_buffer_size() + len(data) > MAX_OUTPUT:
            log.warning("QMP client does not read its output; disconnecting it")
            self.writer.transport.abort()
            self._disconnect()
            return
        self.writer.write(data)

    def _disconnect(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._room.set()
        self.daemon.remove_event_listener(self._on_event)
        self.monitor.clients.discard(self)
        self.writer.close()

    async def close(self) -> None:
        """Flush what is already queued, then close (daemon shutdown)."""
        self._flush()
        if not self._closed and not self.writer.is_closing():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.drain(), CLOSE_TIMEOUT)
        self._disconnect()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), CLOSE_TIMEOUT)
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


# -- chardevs --------------------------------------------------------------------------
def _bool(options: dict[str, Any], key: str, default: bool) -> bool:
    value = options.get(key, default)
    if isinstance(value, bool):
        return value
    if value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise GenericError(f"Parameter '{key}' expects 'on' or 'off'")


async def add_chardev(daemon: Daemon, options: dict[str, Any]) -> Chardev:
    """``--chardev socket,id=ID,(path=P|host=H,port=N)[,server=on|off][,wait=on|off]``."""
    chardev_id = options.get("id")
    if not chardev_id:
        raise GenericError("chardev: no id specified")
    backend = options.get("backend")
    if backend != "socket":
        raise GenericError(f"chardev backend '{backend}' is not supported by vexport")
    for key in options:
        if key not in _CHARDEV_KEYS:
            raise GenericError(f"Invalid parameter '{key}'")
    if _bool(options, "mux", False):
        raise GenericError("chardev: mux=on is not supported by vexport")
    if chardev_id in daemon.chardevs:
        raise GenericError("duplicate yank instance")  # sic: QSD's text for a duplicate id
    path, host = options.get("path"), options.get("host")
    if path is not None and host is not None:
        raise GenericError("None or one of 'path', 'fd' or 'host' option required.")
    if path is None and host is None:
        raise GenericError("chardev: socket: no path, host or fd given")
    if host is not None and options.get("port") in (None, ""):
        raise GenericError("chardev: socket: no port given")
    server = _bool(options, "server", False)
    wait = _bool(options, "wait", True)

    chardev = Chardev(chardev_id, dict(options))
    if server:
        if path is not None:
            await _listen_unix(chardev, path)
        else:
            await _listen_tcp(chardev, host or "", str(options["port"]))
    else:
        await _connect(chardev, path, host, options.get("port"))
    daemon.chardevs[chardev_id] = chardev
    if server and wait:
        where = f"unix:{path}" if path is not None else f"tcp:{host}:{options['port']}"
        log.info("info: waiting for connection on: disconnected:%s,server=on", where)
        await chardev.connected.wait()
    return chardev


async def _listen_unix(chardev: Chardev, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a stale socket, as QEMU replaces it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise GenericError(f"Failed to bind socket to {path}: {e.strerror}") from None
    try:
        os.chmod(path, 0o600)  # before listen(): nobody can connect in between
        chardev.inode = os.lstat(path).st_ino
        chardev.path = path
        sock.listen(16)
        chardev.server = await asyncio.start_unix_server(chardev.accept, sock=sock)
    except BaseException:
        sock.close()
        _unlink_own(chardev)
        raise
    chardev.addresses = [path]


async def _listen_tcp(chardev: Chardev, host: str, port: str) -> None:
    loop = asyncio.get_running_loop()
    try:
        await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise GenericError(f"address resolution failed for {host}:{port}: {e.strerror}") from None
    try:
        server = await asyncio.start_server(
            chardev.accept, host=host or None, port=port, reuse_address=True
        )
    except OSError as e:
        raise GenericError(f"Failed to bind socket: {e.strerror}") from None
    chardev.server = server
    chardev.addresses = [s.getsockname() for s in server.sockets]


async def _connect(chardev: Chardev, path: str | None, host: str | None, port: Any) -> None:
    try:
        if path is not None:
            reader, writer = await asyncio.open_unix_connection(path)
        else:
            reader, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        where = path if path is not None else f"{host}:{port}"
        raise GenericError(f"Failed to connect to '{where}': {e.strerror}") from None
    chardev.accept(reader, writer)


def _unlink_own(chardev: Chardev) -> None:
    if chardev.path is None:
        return
    with contextlib.suppress(OSError):
        if os.lstat(chardev.path).st_ino == chardev.inode:
            os.unlink(chardev.path)
    chardev.path = None


# -- monitors --------------------------------------------------------------------------
async def add_monitor(daemon: Daemon, options: dict[str, Any]) -> Monitor:
    """``--monitor [chardev=]ID[,mode=control][,pretty=on|off]`` (validated options)."""
    from vexport.commands import load_all

    load_all()  # the QMP commands this monitor serves
    if options.get("mode", "control") == "readline":
        raise GenericError("Only QMP is supported")
    name = options.get("chardev")
    if name is None:
        raise GenericError("Parameter 'chardev' is missing")
    chardev = daemon.chardevs.get(name)
    if chardev is None:
        raise GenericError(f'chardev "{name}" not found')
    if chardev.monitor is not None:
        raise GenericError(f"Device '{name}' is in use")
    monitor = Monitor(daemon, chardev, _bool(options, "pretty", False))
    chardev.monitor = monitor
    daemon.monitors.append(monitor)
    pending, chardev.pending = chardev.pending, []
    for reader, writer in pending:
        monitor.start_client(reader, writer)
    return monitor


async def close_monitors(daemon: Daemon) -> None:
    """Flush and close every client, close the listeners, remove the socket files."""
    for chardev in daemon.chardevs.values():
        if chardev.server is not None:
            chardev.server.close()
    await asyncio.gather(*(m.close() for m in daemon.monitors), return_exceptions=True)
    for chardev in daemon.chardevs.values():
        for _reader, writer in chardev.pending:
            writer.close()
        chardev.pending.clear()
        _unlink_own(chardev)
    daemon.monitors.clear()
    daemon.chardevs.clear()
