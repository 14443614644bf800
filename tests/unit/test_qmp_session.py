"""The sans-I/O QMP session, driven with plain bytes and a private command table."""

from __future__ import annotations

import json
from typing import Any

import pytest

import vexport
from vexport.errors import DeviceNotFound
from vexport.qmp.registry import Command
from vexport.qmp.session import Dispatch, QMPSession


async def _never(daemon: Any, args: dict[str, Any]) -> Any:  # handlers are not run here
    raise AssertionError("the session must not call handlers")


COMMANDS = {
    "qmp_capabilities": Command("qmp_capabilities", _never, "qmp_capabilities"),
    "query-version": Command("query-version", _never, None),
    "object-del": Command("object-del", _never, "object-del"),
    "ping-oob": Command("ping-oob", _never, None, allow_oob=True),
}


def replies(session: QMPSession) -> list[dict[str, Any]]:
    data = session.data_to_send()
    assert data == b"" or data.endswith(b"\r\n")
    return [json.loads(line) for line in data.split(b"\r\n") if line]


def new_session(negotiate: bool = True, **kw: Any) -> QMPSession:
    s = QMPSession(COMMANDS, **kw)
    greeting = replies(s)
    assert greeting == [
        {
            "QMP": {
                "version": {"qemu": vexport.QEMU_VERSION, "package": vexport.PACKAGE},
                "capabilities": ["oob"],
            }
        }
    ]
    if negotiate:
        s.receive_data(b'{"execute": "qmp_capabilities"}')
        assert s.next_action() is None
        assert replies(s) == [{"return": {}}]
    return s


def one_reply(session: QMPSession, data: bytes) -> dict[str, Any]:
    session.receive_data(data)
    assert session.next_action() is None
    (reply,) = replies(session)
    return reply


def err(desc: str, cls: str = "GenericError", **extra: Any) -> dict[str, Any]:
    return {**extra, "error": {"class": cls, "desc": desc}}


def test_greeting_bytes() -> None:
    s = QMPSession(COMMANDS, version={"major": 7, "minor": 2, "micro": 0}, package="p")
    assert s.data_to_send() == (
        b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "p"}, '
        b'"capabilities": ["oob"]}}\r\n'
    )


def test_commands_before_negotiation() -> None:
    s = new_session(negotiate=False)
    want = "Expecting capabilities negotiation with 'qmp_capabilities'"
    assert one_reply(s, b'{"execute":"query-version","id":1}') == err(want, "CommandNotFound", id=1)
    assert one_reply(s, b'{"execute":"nope"}') == err(want, "CommandNotFound")
    # exec-oob is not a known member before oob is enabled
    assert one_reply(s, b'{"exec-oob":"ping-oob","id":2}') == err(
        "QMP input member 'exec-oob' is unexpected", id=2
    )
    assert not s.negotiated


@pytest.mark.parametrize(
    ("arguments", "desc"),
    [
        ('{"x": 1}', "Parameter 'x' is unexpected"),
        ('{"enable": "oob"}', "Invalid parameter type for 'enable', expected: array"),
        ('{"enable": [1]}', "Invalid parameter type for 'enable[0]', expected: string"),
        ('{"enable": ["foo"]}', "Parameter 'null' does not accept value 'foo'"),
    ],
)
def test_bad_capabilities(arguments: str, desc: str) -> None:
    s = new_session(negotiate=False)
    data = b'{"execute":"qmp_capabilities","id":"c","arguments":' + arguments.encode() + b"}"
    assert one_reply(s, data) == err(desc, id="c")
    assert not s.negotiated


def test_negotiation_then_again() -> None:
    s = new_session(negotiate=False)
    assert one_reply(s, b'{"execute":"qmp_capabilities","id":{"a":[1]}}') == {
        "return": {},
        "id": {"a": [1]},
    }
    assert s.negotiated and not s.oob_enabled
    again = "Capabilities negotiation is already complete, command ignored"
    assert one_reply(s, b'{"execute":"qmp_capabilities","id":2}') == err(
        again, "CommandNotFound", id=2
    )


def test_negotiation_and_command_in_one_write() -> None:
    s = new_session(negotiate=False)
    s.receive_data(b'{"execute":"qmp_capabilities"}{"execute":"query-version","id":7}')
    action = s.next_action()
    assert action is not None and action.command.name == "query-version"
    assert replies(s) == [{"return": {}}]
    s.complete(action, result={"v": 1})
    assert replies(s) == [{"return": {"v": 1}, "id": 7}]


ENVELOPE_CASES = [
    (b"[1]", err("QMP input must be a JSON object")),
    (b'"x"', err("QMP input must be a JSON object")),
    (b'{"id":3}', err("QMP input lacks member 'execute'", id=3)),
    (b'{"execute":1,"id":4}', err("QMP input member 'execute' must be a string", id=4)),
    (
        b'{"execute":"query-version","arguments":[],"id":"s"}',
        err("QMP input member 'arguments' must be an object", id="s"),
    ),
    (b'{"execute":"x","foo":1,"id":null}', err("QMP input member 'foo' is unexpected", id=None)),
    (b'{"control":{},"execute":"query-version"}', err("QMP input member 'control' is unexpected")),
    (
        b'{"execute":"nope","id":9}',
        err("The command nope has not been found", "CommandNotFound", id=9),
    ),
    (
        b'{"execute":"query-version","arguments":{"x":1},"id":6}',
        err("Parameter 'x' is unexpected", id=6),
    ),
    (b'{"execute":"object-del","arguments":{},"id":5}', err("Parameter 'id' is missing", id=5)),
    (b'{"exec-oob":"ping-oob","id":8}', err("QMP input member 'exec-oob' is unexpected", id=8)),
    (b'{"a" 1}', err("JSON parse error, missing : in object pair")),
    (b'{"execute":"query-version","id":1,"id":2}', err("JSON parse error, duplicate key")),
]


@pytest.mark.parametrize(("data", "reply"), ENVELOPE_CASES)
def test_envelope_errors(data: bytes, reply: dict[str, Any]) -> None:
    s = new_session()
    assert one_reply(s, data) == reply
    # the session keeps going
    s.receive_data(b'{"execute":"query-version","id":"next"}')
    assert s.next_action() is not None


def test_reply_key_order_matches_qemu() -> None:
    s = new_session()
    s.receive_data(b'{"execute":"nope","id":1}{"execute":"query-version","id":2}')
    action = s.next_action()
    assert action is not None
    s.complete(action, result={})
    assert s.data_to_send() == (
        b'{"id": 1, "error": {"class": "CommandNotFound", '
        b'"desc": "The command nope has not been found"}}\r\n'
        b'{"return": {}, "id": 2}\r\n'
    )


def test_arguments_reach_the_handler_validated() -> None:
    s = new_session()
    s.receive_data(b'{"execute":"object-del","arguments":{"id":"io0"}}')
    action = s.next_action()
    assert isinstance(action, Dispatch)
    assert action.arguments == {"id": "io0"} and action.command is COMMANDS["object-del"]


def test_commands_run_one_at_a_time_in_order() -> None:
    s = new_session()
    s.receive_data(
        b'{"execute":"query-version","id":1}{"execute":"bogus","id":2}'
        b'{"execute":"query-version","id":3}'
    )
    first = s.next_action()
    assert first is not None and first.request_id == 1
    assert s.next_action() is None  # busy
    assert replies(s) == []  # the error for id 2 waits its turn
    assert s.backlog == 2
    s.complete(first, result=None)
    third = s.next_action()
    assert third is not None and third.request_id == 3
    assert replies(s) == [
        {"return": {}, "id": 1},
        err("The command bogus has not been found", "CommandNotFound", id=2),
    ]
    s.complete(third, error=DeviceNotFound("no such thing"))
    assert replies(s) == [err("no such thing", "DeviceNotFound", id=3)]
    with pytest.raises(ValueError):
        s.complete(third, result=None)


def test_unexpected_exception_becomes_generic_error(caplog: pytest.LogCaptureFixture) -> None:
    s = new_session()
    s.receive_data(b'{"execute":"query-version","id":1}')
    action = s.next_action()
    assert action is not None
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError as e:
        s.complete(action, error=e)
    (reply,) = replies(s)
    assert reply["id"] == 1 and reply["error"]["class"] == "GenericError"
    assert "boom" in reply["error"]["desc"]
    assert "ZeroDivisionError" in caplog.text
    s.receive_data(b'{"execute":"query-version"}')
    assert s.next_action() is not None


def test_oob() -> None:
    s = new_session(negotiate=False)
    assert one_reply(s, b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}') == {
        "return": {}
    }
    assert s.oob_enabled
    s.receive_data(b'{"execute":"query-version","id":"slow"}')
    slow = s.next_action()
    assert slow is not None and not slow.oob
    # while the in-band command runs, OOB requests are checked and handed out at once
    s.receive_data(
        b'{"exec-oob":"ping-oob","id":"fast"}'
        b'{"exec-oob":"query-version","id":"no"}'
        b'{"exec-oob":"nope"}'
        b'{"execute":"query-version","exec-oob":"query-version","id":9}'
        b'{"exec-oob":1,"id":10}'
    )
    fast = s.next_action()
    assert fast is not None and fast.oob and fast.request_id == "fast"
    assert replies(s) == [
        err("The command query-version does not support OOB", id="no"),
        err("The command nope has not been found", "CommandNotFound"),
        err("QMP input member 'execute' clashes with 'exec-oob'", id=9),
        err("QMP input member 'exec-oob' must be a string", id=10),
    ]
    s.complete(fast, result={"pong": True})
    assert replies(s) == [{"return": {"pong": True}, "id": "fast"}]
    assert s.next_action() is None  # the in-band one is still running
    s.complete(slow, result=None)
    assert replies(s) == [{"return": {}, "id": "slow"}]


def test_events_only_after_negotiation() -> None:
    event = {"timestamp": {"seconds": 1, "microseconds": 2}, "event": "X", "data": {"id": "e"}}
    s = new_session(negotiate=False)
    s.event(event)
    assert replies(s) == []
    one_reply(s, b'{"execute":"qmp_capabilities"}')
    s.event(event)
    assert s.data_to_send() == (
        b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "X", "data": {"id": "e"}}\r\n'
    )


def test_split_and_joined_input() -> None:
    s = new_session()
    message = b'{"execute": "query-version", "id": 42}'
    for byte in message:
        s.receive_data(bytes([byte]))
    action = s.next_action()
    assert action is not None and action.request_id == 42


def test_parse_error_has_no_id_and_session_continues() -> None:
    s = new_session()
    s.receive_data(b'{"execute":"query-version","id":"a\xffb"}\n{"execute":"query-version","id":1}')
    action = s.next_action()
    assert action is not None and action.request_id == 1
    items = replies(s)
    assert items and all("id" not in r for r in items)
    assert items[0]["error"]["desc"].startswith("JSON parse error, stray")


def test_pretty() -> None:
    s = QMPSession(COMMANDS, pretty=True, package="p")
    assert s.data_to_send().startswith(b'{\r\n    "QMP": {\r\n        "version": {\r\n')
    s.receive_data(b'{"execute":"qmp_capabilities","id":1}')
    s.next_action()
    assert s.data_to_send() == b'{\r\n    "return": {\r\n    },\r\n    "id": 1\r\n}\r\n'
