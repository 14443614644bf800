"""User-creatable objects (``--object`` / ``object-add``): vexport knows ``iothread``.

An ``IOThread`` is, for now, a named handle: exports that name it run in the daemon's
one event loop, so ``query-iothreads`` reports the main thread's native id (the daemon's
pid) as ``thread-id``.  The polling properties are accepted, stored and reported, as QEMU
does, but have no effect on an asyncio loop.  QSD 7.2 has no ``query-iothreads``; vexport
answers it with the entry shape of QEMU's system emulator.

Objects share QEMU's ``/objects`` namespace, hence the odd duplicate-id text.  Unlike
QSD, deleting an iothread that an export still names is refused.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vexport.errors import GenericError

if TYPE_CHECKING:
    from vexport.daemon import Daemon

_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
_INT64_MAX = (1 << 63) - 1
_POLL_PROPERTIES = ("poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch")
# QEMU's defaults (iothread.c): adaptive polling up to 32 us, grow/shrink 0 = automatic.
_DEFAULTS = {"poll-max-ns": 32768, "poll-grow": 0, "poll-shrink": 0, "aio-max-batch": 0}
_ACCEPTED = {"qom-type", "id", *_POLL_PROPERTIES, "thread-pool-min", "thread-pool-max"}


@dataclass
class IOThread:
    id: str
    properties: dict[str, int]
    thread_id: int = field(default_factory=threading.get_native_id)
    # Owners (e.g. export ids) that use this iothread; anyone may add themselves.
    users: set[str] = field(default_factory=set)

    def query(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": self.id, "thread-id": self.thread_id}
        for name in _POLL_PROPERTIES:
            entry[name] = self.properties[name]
        return entry


def add_object(daemon: Daemon, options: dict[str, Any]) -> IOThread:
    """Create an object from validated ``object-add`` options."""
    qom_type = options.get("qom-type")
    if qom_type != "iothread":
        raise GenericError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
    object_id = options.get("id")
    if not isinstance(object_id, str) or not _ID_RE.match(object_id):
        raise GenericError("Parameter 'id' expects an identifier")
    for key in options:
        if key not in _ACCEPTED:
            raise GenericError(f"Parameter '{key}' is unexpected")
    properties = dict(_DEFAULTS)
    for name in _POLL_PROPERTIES:
        if name not in options:
            continue
        value = options[name]
        if not isinstance(value, int) or isinstance(value, bool):
            raise GenericError(f"Invalid parameter type for '{name}', expected: integer")
        if not 0 <= value <= _INT64_MAX:
            raise GenericError(f"{name} value must be in range [0, {_INT64_MAX}]")
        properties[name] = value
    if object_id in daemon.iothreads:
        raise GenericError(
            f"attempt to add duplicate property '{object_id}' to object (type 'container')"
        )
    iothread = IOThread(object_id, properties)
    daemon.iothreads[object_id] = iothread
    return iothread


def _users(daemon: Daemon, iothread: IOThread) -> list[str]:
    users = set(iothread.users)
    for export_id, export in daemon.exports.items():
        options = getattr(export, "options", None) or {}
        named = options.get("iothread") if isinstance(options, dict) else None
        if named == iothread.id or getattr(export, "iothread", None) in (iothread, iothread.id):
            users.add(export_id)
    return sorted(users)


def delete_object(daemon: Daemon, object_id: str) -> None:
    iothread = daemon.iothreads.get(object_id)
    if iothread is None:
        raise GenericError(f"object '{object_id}' not found")
    if _users(daemon, iothread):
        raise GenericError(f"object '{object_id}' is in use, can not be deleted")
    del daemon.iothreads[object_id]


def query_iothreads(daemon: Daemon) -> list[dict[str, Any]]:
    """Newest first, like QEMU's other lists."""
    return [t.query() for t in reversed(daemon.iothreads.values())]
