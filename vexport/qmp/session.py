"""One QMP conversation, sans I/O: bytes in, actions and bytes out.

Theory of operation
-------------------
``QMPSession`` owns no socket and runs no coroutine.  The shell (``qmp/server.py``, or a
test) drives it:

    session = QMPSession()
    send(session.data_to_send())            # the greeting
    session.receive_data(bytes_from_client)
    while (action := session.next_action()) is not None:
        try:
            result = await action.command.handler(daemon, action.arguments)
        except Exception as e:
            session.complete(action, error=e)
        else:
            session.complete(action, result=result)
    send(session.data_to_send())

Input is split into JSON values by ``jsonstream``.  In-band requests are queued and
checked one at a time *when they reach the head of the queue* (so that
``qmp_capabilities`` followed by another command in the same write sees the negotiated
state), and ``next_action`` hands out at most one in-band command at a time: commands
from one client run in order, and replies come out in request order.  Requests that fail
their checks (envelope, negotiation, lookup, arguments) are answered by the session
itself without reaching a handler.

With the ``oob`` capability enabled, a request carrying ``exec-oob`` is checked on
arrival and, if its command allows it, handed out ahead of the queue even while an
in-band command runs (QEMU's out-of-band execution).

The checks and their texts follow QEMU 7.2's qmp_dispatch(): the request must be an
object; members are checked in order (``execute``/``exec-oob`` strings, ``arguments`` an
object, ``id`` anything, nothing else); then negotiation state, command lookup, OOB
support and finally the argument schema.  Error replies carry the request's ``id`` first
(``{"id": 1, "error": ...}``), success replies last (``{"return": {}, "id": 1}``), as
QEMU prints them.

Events (``event()``) are queued only once negotiation is complete.  Every output item is
one whole JSON document followed by CRLF, so events never split a reply.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import vexport
from vexport.errors import CommandNotFound, GenericError, QMPError
from vexport.qmp.jsonstream import JSONError, JSONStream, JSONValue, encode
from vexport.qmp.registry import REGISTRY, Command

log = logging.getLogger("vexport.qmp")

_NEGOTIATE = "qmp_capabilities"
_CAPABILITIES = ("oob",)
_NO_ID = object()


@dataclass(frozen=True)
class Dispatch:
    """Run ``command.handler(daemon, arguments)`` and report with ``complete``."""

    command: Command
    arguments: dict[str, Any]
    oob: bool = False
    request_id: Any = field(default=_NO_ID, compare=False)
    token: int = 0


class QMPSession:
    def __init__(
        self,
        commands: Mapping[str, Command] | None = None,
        *,
        pretty: bool = False,
        version: Mapping[str, int] | None = None,
        package: str | None = None,
    ) -> None:
        self.commands = REGISTRY if commands is None else commands
        self.pretty = pretty
        self.version = {
            "qemu": dict(version or vexport.QEMU_VERSION),
            "package": vexport.PACKAGE if package is None else package,
        }
        self.negotiated = False
        self.oob_enabled = False
        self._stream = JSONStream()
        self._queue: deque[JSONValue | JSONError] = deque()
        self._oob: deque[Dispatch] = deque()
        self._running: set[int] = set()
        self._busy = False  # an in-band command is running
        self._tokens = itertools.count(1)
        self._out = bytearray()
        self._send({"QMP": {"version": self.version, "capabilities": list(_CAPABILITIES)}})

    # -- input ------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        for item in self._stream.feed(data):
            if (
                self.oob_enabled
                and isinstance(item, JSONValue)
                and isinstance(item.value, dict)
                and "exec-oob" in item.value
            ):
                action = self._check(item, allow_oob=True)
                if action is not None:
                    self._oob.append(action)
            else:
                self._queue.append(item)

    @property
    def backlog(self) -> int:
        """Requests received but not yet handed out (the shell stops reading past a few)."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return bool(self._running)

    def next_action(self) -> Dispatch | None:
        """The next command to run, or None (queue empty, or an in-band command running)."""
        if self._oob:
            action = self._oob.popleft()
            self._running.add(action.token)
            return action
        while not self._busy and self._queue:
            inband = self._check(self._queue.popleft(), allow_oob=False)
            if inband is not None:
                self._busy = True
                self._running.add(inband.token)
                return inband
        return None

    def complete(
        self, action: Dispatch, result: Any = None, error: BaseException | None = None
    ) -> None:
        """Report the outcome of ``action``: a return value or an exception."""
        if action.token not in self._running:
            raise ValueError("action completed twice or not from this session")
        self._running.discard(action.token)
        if not action.oob:
            self._busy = False
        if error is None:
            reply: dict[str, Any] = {"return": {} if result is None else result}
            if action.request_id is not _NO_ID:
                reply["id"] = action.request_id
            self._send(reply)
            return
        if not isinstance(error, QMPError):
            log.error(
                "QMP command %s failed",
                action.command.name,
                exc_info=(type(error), error, error.__traceback__),
            )
            error = GenericError(f"internal error in {action.command.name}: {error!r}")
        self._reply_error(error, action.request_id)

    def event(self, event: Mapping[str, Any]) -> None:
        """Queue an event (``{"timestamp", "event", "data"}``) once negotiation is done."""
        if self.negotiated:
            self._send(event)

    # -- output -----------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def pending_output(self) -> int:
        return len(self._out)

    def _send(self, message: Mapping[str, Any]) -> None:
        text = encode(message, self.pretty)
        if self.pretty:
            text = text.replace("\n", "\r\n")  # strings never hold a raw newline
        self._out += text.encode("ascii")
        self._out += b"\r\n"

    def _reply_error(self, error: QMPError, request_id: Any) -> None:
        reply: dict[str, Any] = {}
        if request_id is not _NO_ID:
            reply["id"] = request_id
        reply["error"] = error.to_wire()
        self._send(reply)

    # -- checks -----------------------------------------------------------------------
    def _check(self, item: JSONValue | JSONError, allow_oob: bool) -> Dispatch | None:
        """Check one request; answer it and return None, or return the Dispatch."""
        if isinstance(item, JSONError):
            self._reply_error(GenericError(item.message), _NO_ID)
            return None
        request = item.value
        if not isinstance(request, dict):
            self._reply_error(GenericError("QMP input must be a JSON object"), _NO_ID)
            return None
        request_id = request.get("id", _NO_ID)
        try:
            name, arguments, oob = _check_envelope(request, allow_oob)
            command = self._lookup(name, oob)
            if name == _NEGOTIATE:
                self._negotiate(arguments)
                self._send(
                    {"return": {}} if request_id is _NO_ID else {"return": {}, "id": request_id}
                )
                return None
            assert command is not None
            arguments = _validate(command, arguments)
        except QMPError as e:
            self._reply_error(e, request_id)
            return None
        return Dispatch(command, arguments, oob, request_id, next(self._tokens))

    def _lookup(self, name: str, oob: bool) -> Command | None:
        command = self.commands.get(name)
        if name == _NEGOTIATE:
            pass  # handled by the session itself, listed or not
        elif not self.negotiated:
            raise CommandNotFound("Expecting capabilities negotiation with 'qmp_capabilities'")
        elif command is None:
            raise CommandNotFound(f"The command {name} has not been found")
        if oob and not (command is not None and command.allow_oob):
            raise GenericError(f"The command {name} does not support OOB")
        return command

    def _negotiate(self, arguments: dict[str, Any]) -> None:
        for key in arguments:
            if key != "enable":
                raise GenericError(f"Parameter '{key}' is unexpected")
        enable = arguments.get("enable", [])
        if not isinstance(enable, list):
            raise GenericError("Invalid parameter type for 'enable', expected: array")
        for index, capability in enumerate(enable):
            if not isinstance(capability, str):
                raise GenericError(
                    f"Invalid parameter type for 'enable[{index}]', expected: string"
                )
            if capability not in _CAPABILITIES:
                # sic: QEMU 7.2 names the parameter 'null' here.
                raise GenericError(f"Parameter 'null' does not accept value '{capability}'")
        if self.negotiated:
            raise CommandNotFound("Capabilities negotiation is already complete, command ignored")
        self.negotiated = True
        self.oob_enabled = "oob" in enable


def _check_envelope(request: dict[str, Any], allow_oob: bool) -> tuple[str, dict[str, Any], bool]:
    for key, value in request.items():
        if key == "execute" or (key == "exec-oob" and allow_oob):
            if not isinstance(value, str):
                raise GenericError(f"QMP input member '{key}' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise GenericError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise GenericError(f"QMP input member '{key}' is unexpected")
    if "execute" in request and "exec-oob" in request:
        raise GenericError("QMP input member 'execute' clashes with 'exec-oob'")
    oob = "exec-oob" in request
    name = request.get("exec-oob" if oob else "execute")
    if name is None:
        raise GenericError("QMP input lacks member 'execute'")
    return name, request.get("arguments", {}), oob


def _validate(command: Command, arguments: dict[str, Any]) -> dict[str, Any]:
    if command.schema is None:
        if arguments:
            raise GenericError(f"Parameter '{next(iter(arguments))}' is unexpected")
        return {}
    from vexport import schema

    return schema.validate(command.schema, arguments)
