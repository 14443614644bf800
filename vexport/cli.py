"""The ``vexport`` command line, compatible with qemu-storage-daemon 7.2's.

Theory of operation
-------------------
``argv`` is split GNU ``getopt_long`` style (``--opt arg``, ``--opt=arg``, unique
prefixes, ``-Tx``, ``-hV``) into ``Option`` items, each remembering how it was typed
so that errors read ``vexport: --blockdev driver=x: <message>`` like QSD's.

Two passes, as QSD: the first looks only at ``-h``, ``-V``, ``--daemonize``,
``--pidfile`` and malformed/unknown options (the first of these decides); the second
applies every other option strictly in order, by awaiting the daemon's methods
(``add_blockdev``, ``add_export``, ``add_object``, ``add_chardev``, ``add_monitor``)
with arguments typed and validated by ``schema``.  ``--blockdev``, ``--export``,
``--object``, ``--monitor`` and ``--nbd-server`` take keyval (or JSON, when the
argument starts with ``{``); ``--chardev`` takes QemuOpts (``chardev.py`` style parse
in ``parse_chardev``).

Then the pid file is written and locked, a daemonizing parent is released, and the
daemon runs until ``quit`` or SIGTERM/SIGINT/SIGHUP (exit 0).
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NoReturn

from vexport import __version__, keyval, schema
from vexport.errors import GenericError, QMPError

PROG = "vexport"
log = logging.getLogger("vexport")

# long name -> takes an argument
LONG_OPTIONS: dict[str, bool] = {
    "help": False,
    "trace": True,
    "version": False,
    "blockdev": True,
    "chardev": True,
    "daemonize": False,
    "export": True,
    "monitor": True,
    "nbd-server": True,
    "object": True,
    "pidfile": True,
}
SHORT_OPTIONS: dict[str, str] = {"h": "help", "T": "trace", "V": "version"}

HELP = f"""\
Usage: {PROG} [options]
vexport: a qemu-storage-daemon compatible daemon exporting block nodes over VDUSE

  -h, --help             print this help text and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         tracing options (accepted and ignored by vexport)
  -V, --version          print the version and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,force-share=on|off][,detect-zeroes=on|off|unmap]
             [,driver specific parameters...]
                         add a block node; drivers: file, host_device, raw,
                         null-co, null-aio, blkdebug

  --chardev socket,id=<id>,path=<socket-path>[,server=on|off][,wait=on|off]
  --chardev socket,id=<id>,host=<host>,port=<port>[,server=on|off][,wait=on|off]
                         add a character device (a socket for a monitor)

  --daemonize            run in the background; the parent process exits
                         once start-up has completed

  --export [type=]vduse-blk,id=<id>,node-name=<node-name>
           ,name=<vduse-name>[,writable=on|off]
           [,num-queues=<num-queues>][,queue-size=<queue-size>]
           [,logical-block-size=<logical-block-size>]
           [,serial=<serial-number>][,iothread=<id>]
                         export a block node as a vduse-blk device
                         (nbd, fuse and vhost-user-blk exports are not provided)

  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         serve QMP on a character device

  --nbd-server addr.type=...
                         refused: vexport does not serve NBD

  --object help          list the object types
  --object <type>,help   list the properties of an object type
  --object iothread,id=<id>[,poll-max-ns=<ns>][,poll-grow=<n>]
           [,poll-shrink=<n>][,aio-max-batch=<n>]
                         add an object (vexport knows iothread)

  --pidfile <path>       write the process ID to <path> once started up

Every keyval argument may also be given as a JSON object: --blockdev '{{...}}'.
"""

VERSION = (
    f"{PROG} version {__version__} (implements the qemu-storage-daemon 7.2 interface)\n"
    "Copyright (c) the vexport developers\n"
)

OBJECT_TYPES = ["iothread"]
IOTHREAD_PROPERTIES = [
    "aio-max-batch",
    "poll-grow",
    "poll-max-ns",
    "poll-shrink",
    "thread-pool-max",
    "thread-pool-min",
]


class UsageError(Exception):
    """A command line error; printed as ``vexport: <message>``, exit status 1."""


class ExitNow(Exception):
    """Stop with ``status`` after having printed what was asked (help lists...)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass(frozen=True)
class Option:
    name: str  # long option name; "" for a non-option argument, "?" for an error
    arg: str | None
    text: str  # as typed, for messages: "--blockdev x", "--blockdev=x", "-Tx"


# -- splitting argv --------------------------------------------------------------------------


def _long(argv: list[str], i: int) -> tuple[Option, int]:
    word = argv[i]
    body = word[2:]
    name, eq, inline = body.partition("=")
    if name in LONG_OPTIONS:
        full = name
    else:
        matches = [o for o in LONG_OPTIONS if o.startswith(name)]
        if len(matches) != 1 or not name:
            if len(matches) > 1:
                alts = " ".join(f"'--{m}'" for m in matches)
                msg = f"option '{word}' is ambiguous; possibilities: {alts}"
            else:
                msg = f"unrecognized option '{word}'"
            return Option("?", msg, word), i + 1
        full = matches[0]
    if not LONG_OPTIONS[full]:
        if eq:
            return Option("?", f"option '--{full}' doesn't allow an argument", word), i + 1
        return Option(full, None, word), i + 1
    if eq:
        return Option(full, inline, word), i + 1
    if i + 1 >= len(argv):
        return Option("?", f"option '--{full}' requires an argument", word), i + 1
    return Option(full, argv[i + 1], f"{word} {argv[i + 1]}"), i + 2


def split_argv(argv: list[str]) -> list[Option]:
    """Split the arguments (without the program name) into options, in order."""
    out: list[Option] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            out.extend(Option("", w, w) for w in argv[i + 1 :])
            break
        if word.startswith("--"):
            opt, i = _long(argv, i)
            out.append(opt)
            continue
        if word.startswith("-") and word != "-":
            j = 1
            while j < len(word):
                letter = word[j]
                if letter not in SHORT_OPTIONS:
                    out.append(Option("?", f"invalid option -- '{letter}'", word))
                    j += 1
                    continue
                name = SHORT_OPTIONS[letter]
                if not LONG_OPTIONS[name]:
                    out.append(Option(name, None, word))
                    j += 1
                    continue
                if j + 1 < len(word):
                    out.append(Option(name, word[j + 1 :], word))
                elif i + 1 < len(argv):
                    i += 1
                    out.append(Option(name, argv[i], f"{word} {argv[i]}"))
                else:
                    out.append(Option("?", f"option requires an argument -- '{letter}'", word))
                break
            i += 1
            continue
        out.append(Option("", word, word))
        i += 1
    return out


@dataclass
class FirstPass:
    daemonize: bool = False
    pidfile: str | None = None


def first_pass(options: list[Option]) -> FirstPass:
    """-h, -V, --daemonize, --pidfile and option errors, in order.

    Raises ``UsageError`` for the first malformed option and ``ExitNow(0)`` after
    printing help or the version.
    """
    result = FirstPass()
    for opt in options:
        if opt.name == "?":
            raise UsageError(opt.arg or opt.text)
        if opt.name == "help":
            sys.stdout.write(HELP)
            raise ExitNow(0)
        if opt.name == "version":
            sys.stdout.write(VERSION)
            raise ExitNow(0)
        if opt.name == "daemonize":
            result.daemonize = True
        elif opt.name == "pidfile":
            result.pidfile = opt.arg
    return result


# -- option arguments ------------------------------------------------------------------------


def parse_json_object(text: str) -> dict[str, Any]:
    """A JSON option argument, with QEMU's parse error texts."""
    decoder = json.JSONDecoder()
    try:
        value, end = decoder.raw_decode(text)
    except json.JSONDecodeError as e:
        if e.pos >= len(text.rstrip()):
            raise GenericError("JSON parse error, premature EOI") from None
        if e.msg.startswith("Invalid \\escape"):
            raise GenericError("JSON parse error, invalid escape sequence in string") from None
        if e.msg.startswith("Expecting ':'"):
            raise GenericError("JSON parse error, missing : in object pair") from None
        if e.msg.startswith("Expecting ','"):
            raise GenericError("JSON parse error, expected separator in object") from None
        raise GenericError("JSON parse error, expecting value") from None
    if text[end:].strip():
        raise GenericError("Expecting at most one JSON value")
    if not isinstance(value, dict):  # cannot happen: the text starts with "{"
        raise GenericError("JSON parse error, expecting value")
    return value


def parse_option_arg(schema_name: str, text: str, implied_key: str | None) -> dict[str, Any]:
    """A keyval or JSON option argument, typed and validated by schema ``schema_name``."""
    if text.startswith("{"):
        return schema.validate(schema_name, parse_json_object(text))
    return schema.from_keyval(schema_name, keyval.parse(text, implied_key))


def parse_object_arg(text: str) -> dict[str, Any] | None:
    """``--object``: like ``parse_option_arg`` but prints the help lists (returns None)."""
    if text.startswith("{"):
        return schema.validate("object-add", parse_json_object(text))
    tree, want_help = keyval.parse_with_help(text, "qom-type")
    if want_help:
        qom_type = tree.get("qom-type")
        if qom_type is None:
            print("List of user creatable objects:")
            for name in OBJECT_TYPES:
                print(f"  {name}")
        elif qom_type == "iothread":
            print("iothread options:")
            for prop in IOTHREAD_PROPERTIES:
                print(f"  {prop}=<int>")
        else:
            raise GenericError(f"invalid object type: {qom_type}")
        return None
    return schema.from_keyval("object-add", tree)


CHARDEV_BACKENDS = [
    "pty", "udp", "memory", "file", "socket", "stdio", "ringbuf", "null", "parallel",
    "pipe", "mux", "serial",
]  # fmt: skip
_CHARDEV_BOOLS = {
    "server", "wait", "telnet", "tn3270", "websocket", "delay", "nodelay", "ipv4", "ipv6",
    "tight", "abstract", "logappend", "mux", "append", "signal", "numeric", "keep-alive",
}  # fmt: skip
_CHARDEV_STRINGS = {"backend", "id", "path", "host", "port", "to", "fd", "reconnect", "logfile"}
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


def _split_qemu_opts(text: str) -> list[str]:
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    if cur:
        parts.append("".join(cur))
    return parts


def parse_chardev(text: str) -> dict[str, Any]:
    """``--chardev`` in QemuOpts syntax: ``backend,id=ID,key=value,...``.

    Returns ``{"backend": str, "id": str, ...}`` with booleans typed (``server``,
    ``wait``...) and everything else as strings (``path``, ``host``, ``port``...).
    """
    opts: dict[str, Any] = {}
    for n, part in enumerate(_split_qemu_opts(text)):
        key, eq, value = part.partition("=")
        if not eq:
            if n == 0:
                key, value = "backend", part
            else:  # deprecated short-form boolean: "server", "nowait"
                value = "on"
                if key not in _CHARDEV_BOOLS and key.startswith("no"):
                    key, value = key[2:], "off"
                log.warning(
                    "short-form boolean option '%s' deprecated; use %s=%s", part, key, value
                )
        if key in _CHARDEV_BOOLS:
            if value not in ("on", "off", "yes", "no", "true", "false"):
                raise GenericError(f"Parameter '{key}' expects 'on' or 'off'")
            opts[key] = value in ("on", "yes", "true")
        elif key in _CHARDEV_STRINGS:
            if key == "id" and not _IDENTIFIER.fullmatch(value):
                raise GenericError(
                    "Parameter 'id' expects an identifier\n"
                    "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."
                )
            opts[key] = value
        else:
            raise GenericError(f"Invalid parameter '{key}'")
    if "id" not in opts:
        raise GenericError("chardev: no id specified")
    backend = opts.get("backend")
    if backend is None:
        raise GenericError(f'chardev: "{opts["id"]}" missing backend')
    if backend not in CHARDEV_BACKENDS:
        raise GenericError(f"'{backend}' is not a valid char driver name")
    if backend == "socket":
        if "host" in opts and "port" not in opts:
            raise GenericError("chardev: socket: no port given")
        if not any(k in opts for k in ("path", "host", "fd")):
            raise GenericError("chardev: socket: no path, host or fd given")
    return opts


# -- the second pass -------------------------------------------------------------------------


async def apply_option(daemon: Any, opt: Option) -> None:
    """Apply one option of the second pass (raise QMPError/UsageError/ExitNow)."""
    arg = opt.arg or ""
    if opt.name == "":
        raise UsageError(f"{arg}: Unexpected argument")
    if opt.name == "blockdev":
        await daemon.add_blockdev(parse_option_arg("blockdev-add", arg, "driver"))
    elif opt.name == "export":
        await daemon.add_export(parse_option_arg("block-export-add", arg, "type"))
    elif opt.name == "object":
        options = parse_object_arg(arg)
        if options is None:
            raise ExitNow(0)
        await daemon.add_object(options)
    elif opt.name == "monitor":
        await daemon.add_monitor(parse_option_arg("monitor", arg, "chardev"))
    elif opt.name == "chardev":
        if arg == "help":
            print("Available chardev backend types: \n  socket")
            raise ExitNow(0)
        await daemon.add_chardev(parse_chardev(arg))
    elif opt.name == "nbd-server":
        parse_option_arg("nbd-server", arg, None)
        raise GenericError("NBD is not supported by vexport")
    elif opt.name == "trace":
        log.warning("%s: tracing is not supported by vexport; ignored", opt.text)
    # help, version, daemonize, pidfile: first pass


# -- pid file and daemonizing ----------------------------------------------------------------


class PidFile:
    """A locked pid file, removed when vexport ends."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.fd = -1

    def write(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise UsageError(
                f"cannot create PID file: Could not create '{self.path}': {e.strerror}"
            ) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise UsageError(
                f"cannot create PID file: Cannot lock pid file: {e.strerror}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def remove(self) -> None:
        if self.fd >= 0:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1


def daemonize() -> int:
    """Fork; in the parent wait for the child's start-up and exit.  Returns the
    write end of the "ready" pipe in the child."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as ready:
            status = ready.read(1)
        if status == b"\0":
            os._exit(0)
        os.waitpid(pid, 0)  # the child printed its error
        os._exit(1)
    os.close(read_fd)
    os.setsid()
    return write_fd


def daemon_ready(write_fd: int) -> None:
    """Start-up is complete: release the parent, leave the terminal and the cwd."""
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    os.write(write_fd, b"\0")
    os.close(write_fd)


# -- main ------------------------------------------------------------------------------------


def _die(message: str) -> NoReturn:
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()
    raise ExitNow(1)


def settle_heap() -> None:
    """After start-up: move every object made so far (modules, schemas, the graph) out
    of the cyclic garbage collector's sight (``gc.freeze``), so that the collections
    the data path's allocations trigger only look at young objects."""
    mode = os.environ.get("VEXPORT_GC", "freeze")
    if mode == "freeze":
        gc.collect()
        gc.freeze()


async def run(options: list[Option], first: FirstPass, ready_fd: int | None) -> int:
    from vexport.daemon import Daemon

    daemon = Daemon()
    pidfile = PidFile(first.pidfile) if first.pidfile is not None else None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, daemon.request_quit)
    try:
        for opt in options:
            try:
                await apply_option(daemon, opt)
            except QMPError as e:
                _die(f"{opt.text}: {e.desc}")
            except OSError as e:
                _die(f"{opt.text}: {e.strerror or e}")
            except UsageError as e:
                _die(str(e))
        if pidfile is not None:
            try:
                pidfile.write()
            except UsageError as e:
                _die(str(e))
        if ready_fd is not None:
            daemon_ready(ready_fd)
            ready_fd = None
        settle_heap()
        await daemon.wait_quit()
        return 0
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        try:
            await daemon.close()
        except Exception:
            log.exception("error while shutting down")
        if pidfile is not None:
            pidfile.remove()


def _run_profiled(path: str, options: list[Option], first: FirstPass, ready_fd: int | None) -> int:
    """VEXPORT_PROFILE=FILE: run under cProfile and write its statistics to FILE at exit
    (for bench/: where the daemon's CPU goes in the real-kernel guest)."""
    import cProfile

    profiler = cProfile.Profile()
    try:
        return profiler.runcall(run_loop, run(options, first, ready_fd))
    finally:
        profiler.dump_stats(path)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop (libuv, compiled) unless VEXPORT_LOOP=asyncio asks for the
    standard library's: the data path runs one or more loop iterations per batch of
    requests, and at queue depth 1 the pure-Python loop's iteration is a good part of
    the latency."""
    if os.environ.get("VEXPORT_LOOP", "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return None
    return uvloop.new_event_loop


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def main(argv: list[str] | None = None) -> int:
    """The ``vexport`` console script."""
    if argv is None:
        argv = sys.argv[1:]
    level = os.environ.get("VEXPORT_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format=f"{PROG}: %(message)s",
        stream=sys.stderr,
    )
    options = split_argv(argv)
    try:
        first = first_pass(options)
    except UsageError as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        return 1
    except ExitNow as e:
        return e.status
    ready_fd = daemonize() if first.daemonize else None
    profile_path = os.environ.get("VEXPORT_PROFILE")
    try:
        if profile_path:
            return _run_profiled(profile_path, options, first, ready_fd)
        return run_loop(run(options, first, ready_fd))
    except UsageError as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        return 1
    except ExitNow as e:
        return e.status
