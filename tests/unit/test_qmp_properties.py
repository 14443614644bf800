"""Property-based tests: hostile input against the QMP JSON stream and the QMP session.

Hypothesis throws random byte streams, huge messages, deep nesting, invalid UTF-8,
random JSON values and random splits of valid streams at `JSONStream` and `QMPSession`
(both pure: bytes in, items or bytes out).  The properties:

* ``JSONStream.feed`` and ``QMPSession.receive_data`` raise nothing, whatever the bytes;
  ``feed`` returns only `JSONValue`/`JSONError` items;
* a stream of valid JSON values, cut anywhere, gives back exactly those values
  (integers outside int64/uint64 become floats, as in QEMU);
* the session answers every complete top-level value with exactly one reply (a return,
  or an error), echoing the request's ``id``, however the stream was cut;
* after any garbage, a resynchronisation (two 0xFF bytes and a newline: a lexer error in
  every lexer state) and a valid ``query-version`` gets its reply: the session keeps
  working;
* memory stays bounded: after every ``feed`` the parser keeps at most ``max_tokens``
  tokens, at most ``max_bytes`` characters of token text and of the string being
  scanned, and at most ``max_bytes`` bytes of a pending number/keyword.

Most targets use a stream with small limits (so huge messages are cheap to make);
the session's stream is swapped for one (``session._stream``) where that matters.

Example counts: ``VEXPORT_HYPOTHESIS_PROFILE=ci`` runs 10,000 examples per test (the
reliability requirement); the default ``dev`` profile runs 100 so the unit tier stays
fast.  ``VEXPORT_HYPOTHESIS_EXAMPLES=N`` overrides both.  (Same variables as
tests/unit/test_virtqueue_properties.py: one setting drives both.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import DrawFn

from vexport.errors import GenericError
from vexport.qmp.jsonstream import JSONError, JSONStream, JSONValue
from vexport.qmp.registry import Command
from vexport.qmp.session import QMPSession

_PROFILE = os.environ.get("VEXPORT_HYPOTHESIS_PROFILE", "dev")
_EXAMPLES = int(
    os.environ.get("VEXPORT_HYPOTHESIS_EXAMPLES", "10000" if _PROFILE == "ci" else "100")
)
PROPERTY = settings(
    max_examples=_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=_PROFILE != "ci",  # dev runs are reproducible; CI explores new inputs
    database=None,
)

SMALL = {"max_bytes": 512, "max_tokens": 64, "max_depth": 16}
LARGE = {"max_bytes": 1024, "max_tokens": 128, "max_depth": 32}
RESYNC = b"\xff\xff\n"
LIMIT_ERRORS = {
    "JSON token size limit exceeded",
    "JSON token count limit exceeded",
    "JSON nesting depth limit exceeded",
}


# -- helpers ---------------------------------------------------------------------------


async def _never(daemon: Any, args: dict[str, Any]) -> Any:  # handlers are not run here
    raise AssertionError("the session must not call handlers")


COMMANDS = {
    "qmp_capabilities": Command("qmp_capabilities", _never, "qmp_capabilities"),
    "query-version": Command("query-version", _never, None),
    "ping-oob": Command("ping-oob", _never, None, allow_oob=True),
}
VERSION_REPLY = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "vexport"}


def check_bounded(stream: JSONStream) -> None:
    """The parser's buffers respect its limits."""
    assert len(stream._tokens) <= stream.max_tokens
    token_text = sum(len(v) for k, v in stream._tokens if k == "s")
    assert token_text <= stream.max_bytes
    assert len(stream._parts) <= stream.max_bytes
    assert sum(len(p) for p in stream._parts) <= stream.max_bytes
    assert len(stream._raw) <= stream.max_bytes


def feed_split(stream: JSONStream, data: bytes, cuts: list[int]) -> list[Any]:
    """Feed ``data`` cut at ``cuts``; check the items and the bounds after each piece."""
    items: list[Any] = []
    start = 0
    for end in [*sorted(set(cuts)), len(data)]:
        chunk = data[start:end]
        got = stream.feed(chunk)
        assert all(isinstance(item, JSONValue | JSONError) for item in got)
        check_bounded(stream)
        items += got
        start = end
    return items


def session_feed(session: QMPSession, data: bytes, cuts: list[int]) -> None:
    start = 0
    for end in [*sorted(set(cuts)), len(data)]:
        chunk = data[start:end]
        session.receive_data(chunk)
        check_bounded(session._stream)
        start = end


def run_actions(session: QMPSession, fail: bool = False) -> int:
    """Complete every action the session hands out (query-version answers its version).
    Returns how many ran."""
    count = 0
    while (action := session.next_action()) is not None:
        count += 1
        if fail:
            session.complete(action, error=GenericError("it failed"))
        elif action.command.name == "query-version":
            session.complete(action, result=VERSION_REPLY)
        else:
            session.complete(action, result={})
    return count


def replies(session: QMPSession) -> list[dict[str, Any]]:
    data = session.data_to_send()
    assert data == b"" or data.endswith(b"\r\n")
    out = [json.loads(line) for line in data.split(b"\r\n") if line]
    for reply in out:
        assert isinstance(reply, dict)
        assert ("return" in reply) != ("error" in reply), reply
        if "error" in reply:
            assert set(reply["error"]) == {"class", "desc"}
    return out


def new_session(oob: bool = False, **limits: int) -> QMPSession:
    session = QMPSession(COMMANDS)
    session.data_to_send()  # the greeting
    if limits:
        session._stream = JSONStream(**limits)
    enable = b'"oob"' if oob else b""
    session.receive_data(b'{"execute": "qmp_capabilities", "arguments": {"enable": [%s]}}' % enable)
    assert session.next_action() is None
    assert replies(session) == [{"return": {}}]
    return session


def normalize(value: Any) -> Any:
    """What the parser gives back for a Python value encoded by json.dumps."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -(1 << 63) <= value < (1 << 64) else float(str(value))
    if isinstance(value, list):
        return [normalize(v) for v in value]
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    return value


def cuts_for(draw: Callable[[st.SearchStrategy[list[int]]], list[int]], data: bytes) -> list[int]:
    """Up to 8 places where ``data`` is cut into the pieces fed one by one."""
    return draw(st.lists(st.integers(0, len(data)), max_size=8))


# -- strategies ------------------------------------------------------------------------

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=5,
)
# Bytes that matter to the lexer, so random streams reach every state.
_JSONISH = st.sampled_from(
    [
        b"{", b"}", b"[", b"]", b":", b",", b'"', b"'", b"\\", b"u", b"0", b"7", b"-", b".",
        b"e", b"+", b"a", b"true", b"null", b"fals", b" ", b"\n", b"\t", b"\x00", b"\x1f",
        b"\xff", b"\xc3", b"\xa9", b"\xe2\x82", b"\xed\xa0\x80", b"\xf0\x9f\x98\x80",
        b"\\u", b"\\ud83d", b"\\ude00", b"D800", b'"execute"', b'"id"', b'"arguments"',
        b'"query-version"', b'"exec-oob"',
    ]
)  # fmt: skip
GARBAGE = st.binary(max_size=300) | st.lists(_JSONISH, max_size=120).map(b"".join)
INVALID_UTF8 = [
    b"\xff", b"\xc3(", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\x80",
]  # fmt: skip
SEPARATORS = st.sampled_from([b" ", b"\n", b"\r\n", b"\t ", b"  \n"])


@st.composite
def valid_stream(draw: DrawFn) -> tuple[list[Any], bytes]:
    values = draw(st.lists(JSON_VALUES, min_size=1, max_size=3))
    data = b""
    for value in values:
        ascii_only = draw(st.booleans())
        data += json.dumps(value, ensure_ascii=ascii_only).encode() + draw(SEPARATORS)
    return values, data


SHALLOW = _SCALARS | st.lists(_SCALARS, max_size=3)
REQUEST_NAMES = st.sampled_from(["query-version", "qmp_capabilities", "ping-oob", "nope", ""])


@st.composite
def request(draw: DrawFn) -> Any:
    """Mostly well-formed QMP requests, some broken, some not objects at all."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(SHALLOW)
    req: dict[str, Any] = {}
    key = draw(st.sampled_from(["execute", "execute", "exec-oob", "bogus"]))
    req[key] = draw(REQUEST_NAMES) if kind > 1 else draw(SHALLOW)
    if draw(st.booleans()):
        req["arguments"] = draw(st.dictionaries(st.text(max_size=6), SHALLOW, max_size=2))
    if draw(st.booleans()):
        req["id"] = draw(SHALLOW)
    return req


# -- the JSON stream -------------------------------------------------------------------


@PROPERTY
@given(st.data())
def test_stream_random_bytes_then_resync(data: st.DataObject) -> None:
    garbage = data.draw(GARBAGE)
    stream = JSONStream(**SMALL)
    tail = garbage + RESYNC + b'{"ok": [1, "two"]}'
    items = feed_split(stream, tail, cuts_for(data.draw, tail))
    assert items and items[-1] == JSONValue({"ok": [1, "two"]})
    assert stream.idle


@PROPERTY
@given(st.data())
def test_stream_valid_values_cut_anywhere(data: st.DataObject) -> None:
    values, raw = data.draw(valid_stream())
    stream = JSONStream()
    items = feed_split(stream, raw, cuts_for(data.draw, raw))
    assert items == [JSONValue(normalize(v)) for v in values]
    assert stream.idle


def huge_message(unit: str, count: int) -> tuple[bytes, Any, int, int]:
    """(message, its value if within the limits, tokens, depth) for ``count`` units."""
    if unit in ("a", "\u00e9", "\\n", "\\u00e9", "\\ud83d\\ude00"):
        char = json.loads(f'"{unit}"')
        return b'"' + unit.encode() * count + b'"', char * count, 1, 0
    if unit == "1":  # a number; QEMU turns what int64/uint64 cannot hold into a double
        digits = b"1" * count
        return digits + b" ", float(digits) if count > 20 else int(digits), 1, 0
    if unit == "1,":
        return b"[" + b"1," * count + b"1]", [1] * (count + 1), 2 * count + 3, 1
    if unit == "{":
        value: Any = 1
        for _ in range(count + 1):
            value = {"k": value}
        message = b"{" + b'"k": {' * count + b'"k": 1' + b"}" * (count + 1)
        return message, value, 4 * count + 5, count + 1
    assert unit == "["
    value = []
    for _ in range(count - 1):
        value = [value]
    return b"[" * count + b"]" * count, value, 2 * count, count


@PROPERTY
@given(
    st.sampled_from(["a", "\u00e9", "\\n", "\\u00e9", "\\ud83d\\ude00", "1", "1,", "{", "["]),
    st.integers(1, 1500),
    st.data(),
)
@example("1", 5000, [])  # more digits than int() takes from a string, in one piece
@example("1", 2000, [1500])  # the size limit is passed at the end of a piece, in a number
@example("\\n", 20000, [15000])  # escapes in a string already over the size limit
@example("\\u00e9", 5000, [20000])
def test_stream_huge_and_deep_messages(unit: str, count: int, data: Any) -> None:
    """``data`` draws the cuts; an explicit example gives them as a list."""
    message, value, tokens, depth = huge_message(unit, count)
    stream = JSONStream(**LARGE)
    tail = message + b'\n{"after": 1}'
    cuts = data if isinstance(data, list) else cuts_for(data.draw, tail)
    items = feed_split(stream, tail, cuts)
    assert len(items) == 2, items[-3:]
    assert items[-1] == JSONValue({"after": 1})
    size = len(message) - message.count(b" ")
    over = size > stream.max_bytes or tokens > stream.max_tokens or depth > stream.max_depth
    if over:
        assert isinstance(items[0], JSONError) and items[0].message in LIMIT_ERRORS, items[0]
    else:
        assert items[0] == JSONValue(value)


@PROPERTY
@given(st.data())
def test_stream_invalid_utf8_in_strings(data: st.DataObject) -> None:
    text = data.draw(
        st.text(
            st.characters(codec="utf-8", min_codepoint=0x20, exclude_characters='"\\'), max_size=30
        )
    )
    bad = data.draw(st.sampled_from(INVALID_UTF8))
    at = data.draw(st.integers(0, len(text)))  # between two whole characters
    string = text[:at].encode() + bad + text[at:].encode()
    message = b'{"execute": "x", "id": "' + string + b'"}'
    stream = JSONStream(**SMALL)
    tail = message + RESYNC + b'{"ok": 1}'
    items = feed_split(stream, tail, cuts_for(data.draw, tail))
    first = items[0]
    assert isinstance(first, JSONError) and first.message.startswith("JSON parse error, stray")
    assert items[-1] == JSONValue({"ok": 1})


# -- the session -----------------------------------------------------------------------


@PROPERTY
@given(st.lists(request(), min_size=1, max_size=6), st.booleans(), st.booleans(), st.data())
def test_session_one_reply_per_value(
    requests: list[Any], oob: bool, fail: bool, data: st.DataObject
) -> None:
    session = new_session(oob=oob)
    raw = b"".join(json.dumps(r).encode() + b"\n" for r in requests)
    session_feed(session, raw, cuts_for(data.draw, raw))
    run_actions(session, fail=fail)
    out = replies(session)
    assert len(out) == len(requests), (requests, out)
    assert session.backlog == 0 and not session.busy
    if not oob:  # in-band: replies come in request order
        for req, reply in zip(requests, out, strict=True):
            if isinstance(req, dict) and "id" in req:
                assert reply["id"] == normalize(req["id"])
            else:
                assert "id" not in reply
    # and the session still works
    session.receive_data(b'{"execute": "query-version", "id": "v"}')
    assert run_actions(session) == 1
    assert replies(session) == [{"return": VERSION_REPLY, "id": "v"}]


@PROPERTY
@given(GARBAGE, st.booleans(), st.data())
@example(b"1" * 5000 + b" ", False, None)  # an integer longer than int() accepts
@example(b'{"execute": "x", "id": ' + b"[" * 600 + b"]" * 600 + b"}", False, None)  # deep id
def test_session_keeps_working_after_garbage(garbage: bytes, oob: bool, data: Any) -> None:
    session = new_session(oob=oob, max_bytes=8192, max_tokens=2048, max_depth=1024)
    tail = garbage + RESYNC + b'{"execute": "query-version", "id": "after"}'
    cuts = cuts_for(data.draw, tail) if data is not None else []
    session_feed(session, tail, cuts)
    run_actions(session)
    out = replies(session)
    assert out and out[-1] == {"return": VERSION_REPLY, "id": "after"}, out[-3:]
    assert session.backlog == 0 and not session.busy


@PROPERTY
@given(st.integers(1, 1024), st.sampled_from(["list", "dict"]))
@example(600, "list")
@example(1024, "dict")
def test_session_echoes_deeply_nested_ids(depth: int, shape: str) -> None:
    """An id that keeps the request within the parser's depth limit (QEMU's 1024) is
    echoed in the reply, however deep (a return for even depths, an error for odd)."""
    known = depth % 2 == 0
    levels = depth - 1  # the request object is one level
    expected: Any
    if levels == 0:
        ident, expected = b"0", 0
    elif shape == "list":
        ident = b"[" * levels + b"]" * levels
        expected = []
        for _ in range(levels - 1):
            expected = [expected]
    else:
        ident = b'{"a": ' * levels + b"0" + b"}" * levels
        expected = 0
        for _ in range(levels):
            expected = {"a": expected}
    name = b"query-version" if known else b"nope"
    session = new_session()
    session.receive_data(b'{"execute": "%s", "id": %s}' % (name, ident))
    assert run_actions(session) == (1 if known else 0)
    (reply,) = JSONStream().feed(session.data_to_send())
    assert isinstance(reply, JSONValue), reply
    assert reply.value["id"] == expected
    assert ("return" in reply.value) == known
