"""The streaming JSON splitter: fed all at once, one byte at a time, and with leftovers."""

from __future__ import annotations

from typing import Any

import pytest

from vexport.qmp.jsonstream import (
    JSONError,
    JSONStream,
    JSONValue,
    encode,
    parse_one,
)


def all_at_once(data: bytes, **limits: int) -> list[Any]:
    return _simplify(JSONStream(**limits).feed(data))


def byte_by_byte(data: bytes, **limits: int) -> list[Any]:
    stream = JSONStream(**limits)
    items = []
    for i in range(len(data)):
        items += stream.feed(data[i : i + 1])
    return _simplify(items)


def _simplify(items: list[JSONValue | JSONError]) -> list[Any]:
    return [("value", i.value) if isinstance(i, JSONValue) else ("error", i.message) for i in items]


FEEDERS = pytest.mark.parametrize("feed", [all_at_once, byte_by_byte], ids=["whole", "bytewise"])

OK_CASES = [
    (b'{"execute": "query-version"}', [{"execute": "query-version"}]),
    (b'{"a":1}{"b":2}', [{"a": 1}, {"b": 2}]),
    (
        b'\r\n {"a" :\n [1, 2.5, -3e2, true, false, null]}\n',
        [{"a": [1, 2.5, -300.0, True, False, None]}],
    ),
    (b"{'single': 'q\\'s'}", [{"single": "q's"}]),
    (b'"\\u00e9\\ud83d\\ude00\\n\\t\\/\\\\"', ["\u00e9\U0001f600\n\t/\\"]),
    ('"caf\u00e9 \U0001f600"'.encode(), ["caf\u00e9 \U0001f600"]),
    (b"[[], {}, [[{}]]]", [[[], {}, [[{}]]]]),
    (b"123456789012345678901234567890 ", [1.2345678901234568e29]),
    (b"18446744073709551615 -9223372036854775808 ", [18446744073709551615, -9223372036854775808]),
    (b"0 ", [0]),
]


@FEEDERS
@pytest.mark.parametrize(("data", "values"), OK_CASES)
def test_values(feed: Any, data: bytes, values: list[Any]) -> None:
    assert feed(data) == [("value", v) for v in values]


ERROR_CASES = [
    (b"}", "JSON parse error, expecting value"),
    (b"]", "JSON parse error, expecting value"),
    (b'{"a":1,}', "JSON parse error, expecting value"),
    (b'{"a" 1}', "JSON parse error, missing : in object pair"),
    (b"[1 2]", "JSON parse error, expected separator in list"),
    (b'{"a":1 "b":2}', "JSON parse error, expected separator in dict"),
    (b'{"a":"x" ]', "JSON parse error, expected separator in dict"),
    (b"{1:2}", "JSON parse error, key is not a string in object"),
    (b'{"a":1,"a":2}', "JSON parse error, duplicate key"),
    (b'"\\x"', "JSON parse error, invalid escape sequence in string"),
    (b'"\\u00"', 'JSON parse error, \\u00" is not a valid Unicode character'),
    (b'"\\ud800"', "JSON parse error, \\ud800 is not a valid Unicode character"),
    (b"tru ", "JSON parse error, invalid keyword 'tru'"),
    (b"[nul]", "JSON parse error, invalid keyword 'nul'"),
    (b"1.5e ", "JSON parse error, stray '1.5e '"),
    (b"%", "JSON parse error, stray '%'"),
    (b"\xff", "JSON parse error, stray '\ufffd'"),
    (b'"a\x01', "JSON parse error, stray '\"\x01'"),
]


@FEEDERS
@pytest.mark.parametrize(("data", "message"), ERROR_CASES)
def test_errors_then_resync(feed: Any, data: bytes, message: str) -> None:
    """Each malformed input gives one error, and the next message parses."""
    assert feed(data + b' {"next": 1}') == [("error", message), ("value", {"next": 1})]


@FEEDERS
def test_invalid_utf8_in_string(feed: Any) -> None:
    items = feed(b'{"id": "a\xc3(b"}\n{"ok": true}')
    assert items[0][0] == "error" and items[0][1].startswith("JSON parse error, stray")
    assert items[-1] == ("value", {"ok": True})


@FEEDERS
def test_multibyte_character_split_anywhere(feed: Any) -> None:
    data = '["\u00e9\u4e2d\U0001f600"]'.encode()
    assert feed(data) == [("value", ["\u00e9\u4e2d\U0001f600"])]


def test_trailing_bytes_are_kept() -> None:
    """A partial message stays pending and completes with the next write."""
    stream = JSONStream()
    assert _simplify(stream.feed(b'{"a": 1}{"b": [1, ')) == [("value", {"a": 1})]
    assert not stream.idle
    assert _simplify(stream.feed(b'2]}{"c"')) == [("value", {"b": [1, 2]})]
    assert _simplify(stream.feed(b": 3}")) == [("value", {"c": 3})]
    assert stream.idle


def test_top_level_scalar_waits_for_terminator() -> None:
    stream = JSONStream()
    assert stream.feed(b"12") == []
    assert stream.feed(b"3") == []
    assert _simplify(stream.feed(b"\n")) == [("value", 123)]
    assert stream.feed(b"true") == []
    assert _simplify(stream.feed(b"{}")) == [("value", True), ("value", {})]


@FEEDERS
def test_nesting_limit(feed: Any) -> None:
    ok = b"[" * 4 + b"]" * 4
    assert feed(ok, max_depth=4) == [("value", [[[[]]]])]
    too_deep = b"[" * 5 + b"]" * 5
    # one error for the whole message, then the stream goes on
    assert feed(too_deep + b"{}", max_depth=4) == [
        ("error", "JSON nesting depth limit exceeded"),
        ("value", {}),
    ]


def test_default_nesting_limit_is_deep_but_bounded() -> None:
    assert all_at_once(b"[" * 1024 + b"]" * 1024)[0][0] == "value"
    assert all_at_once(b"[" * 1025 + b"]" * 1025) == [
        ("error", "JSON nesting depth limit exceeded")
    ]


@FEEDERS
def test_size_limit(feed: Any) -> None:
    big = b'{"s": "' + b"x" * 200 + b'"}'
    assert feed(big + b"[1]", max_bytes=100) == [
        ("error", "JSON token size limit exceeded"),
        ("value", [1]),
    ]
    assert feed(big, max_bytes=1000) == [("value", {"s": "x" * 200})]


@FEEDERS
def test_token_count_limit(feed: Any) -> None:
    many = b"[" + b",".join(b"1" for _ in range(20)) + b"]"
    assert feed(many + b"[]", max_tokens=10) == [
        ("error", "JSON token count limit exceeded"),
        ("value", []),
    ]


def test_byte_at_a_time_large_string_is_linear() -> None:
    """Scanning resumes where it stopped (no rescans from the token start)."""
    data = b'"' + b"y" * 20000 + b'"'
    assert byte_by_byte(data) == [("value", "y" * 20000)]


def test_parse_one() -> None:
    assert parse_one('{"a": [1]}') == {"a": [1]}
    for text, message in [
        ('{"a": ', "JSON parse error, premature EOI"),
        ("{} {}", "Expecting at most one JSON value"),
        ('{"a" 1}', "JSON parse error, missing : in object pair"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_one(text)


def test_encode_like_qemu() -> None:
    assert encode({"return": {}, "id": [1, "a"]}) == '{"return": {}, "id": [1, "a"]}'
    assert encode({"s": '\u00e9\x7f/\t"\\\U0001f600\x01'}) == (
        '{"s": "\\u00E9\\u007F/\\t\\"\\\\\\uD83D\\uDE00\\u0001"}'
    )
    assert encode([True, False, None, 1.5, 2.0]) == "[true, false, null, 1.5, 2]"
    pretty = encode({"return": {}, "id": [1, {"a": "b"}, []]}, pretty=True)
    assert pretty == (
        '{\n    "return": {\n    },\n    "id": [\n        1,\n        {\n'
        '            "a": "b"\n        },\n        [\n        ]\n    ]\n}'
    )


@pytest.mark.parametrize("value", [{"a": [1, {"b": None}], "c": "\u00e9\U0001f600\n"}, [], "x"])
def test_encode_round_trip(value: Any) -> None:
    assert all_at_once(encode(value).encode() + b" ") == [("value", value)]
