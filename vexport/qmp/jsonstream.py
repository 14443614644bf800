"""QMP's JSON wire format: a streaming splitter/parser for input, an encoder for output.

Theory of operation
-------------------
QMP input is not line based: a client may send a message in pieces, or several messages
in one write (``{..}{..}``).  Like QEMU's json-lexer/json-streamer pair, parsing happens
in three stages:

1. A byte-level *lexer* (a small state machine fed any number of bytes at a time) cuts the
   input into tokens: ``{ } [ ] : ,``, strings (``"..."`` and QEMU's ``'...'`` extension,
   decoded as they are scanned), numbers and keywords.  A number or keyword at the end of
   the input is held until the byte that ends it arrives, exactly as in QEMU (so a bare
   ``1`` sent on its own is answered only once something follows it).
2. A *streamer* collects tokens and tracks the bracket depth; when the depth is back at
   zero the collected tokens form one top-level value.
3. A *parser* turns that token list into a Python value (an explicit stack, so deep
   nesting cannot exhaust the Python stack), or into an error.

Errors and resynchronisation: a *lexer* error (a stray byte, invalid UTF-8, a control
character in a string) is reported at once as ``JSON parse error, stray '...'``; the
tokens collected so far are dropped and input is skipped up to the next whitespace or
structural character.  Every other problem (a grammar error, an invalid keyword or escape,
a limit exceeded) *poisons* the current message: its tokens are no longer kept, only its
depth is tracked, and one error is reported when the message is complete.  Either way
the stream continues with the next message.  The texts follow QEMU 7.2's.

Limits: a message may hold at most ``max_bytes`` bytes of tokens, ``max_tokens`` tokens
and ``max_depth`` nested arrays/objects (QEMU: 64 MiB, 2 Mi tokens, 1024).
"""

from __future__ import annotations

import codecs
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

MAX_BYTES = 16 << 20
MAX_TOKENS = 1 << 18
MAX_DEPTH = 1024

_WHITESPACE = frozenset(b" \t\r\n")
_STRUCTURAL = frozenset(b"{}[]:,")
_NUMBER_CHARS = frozenset(b"0123456789+-.eE")
_KEYWORD_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz")
_KEYWORDS: dict[str, Any] = {"true": True, "false": False, "null": None}
_NUMBER_RE = re.compile(rb"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_SIMPLE_ESCAPES = {
    ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/",
    ord("b"): "\b", ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t",
}  # fmt: skip
_HEX = frozenset(b"0123456789abcdefABCDEF")
# Runs of string bytes that need no attention, per quote character.
_PLAIN = {q: re.compile(rb"[^\\\x00-\x1f" + bytes([q]) + rb"]+") for q in b"\"'"}
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")

# Lexer states.
_START, _STRING, _ESCAPE, _UNICODE, _NUMBER, _KEYWORD, _RECOVER = range(7)


@dataclass(frozen=True)
class JSONValue:
    """A complete top-level JSON value."""

    value: Any


@dataclass(frozen=True)
class JSONError:
    """A malformed message; the stream has resynchronised after it."""

    message: str


Item = JSONValue | JSONError

# A token is (kind, value): kind is one of "{}[]:," or "s" (string), "v" (other value),
# "!" (a poisoned token whose value is an error text).
Token = tuple[str, Any]


class JSONStream:
    """Feed bytes with :meth:`feed`; get back the complete values and errors found."""

    def __init__(
        self, max_bytes: int = MAX_BYTES, max_tokens: int = MAX_TOKENS, max_depth: int = MAX_DEPTH
    ) -> None:
        self.max_bytes = max_bytes
        self.max_tokens = max_tokens
        self.max_depth = max_depth
        # lexer
        self._state = _START
        self._quote = 0
        self._raw = bytearray()  # text of the current token (numbers, keywords, \u escapes)
        self._word_over = False  # the current number/keyword is over the size limit
        self._parts: list[str] = []  # decoded pieces of the current string
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._str_error: str | None = None  # poisons the current string
        self._str_len = 0
        # streamer
        self._tokens: list[Token] = []
        self._depth = 0
        self._msg_bytes = 0
        self._msg_error: str | None = None
        self._out: list[Item] = []

    @property
    def idle(self) -> bool:
        """True when no partial message is pending."""
        return self._state in (_START, _RECOVER) and not self._tokens and self._depth == 0

    def feed(self, data: bytes) -> list[Item]:
        i, n = 0, len(data)
        while i < n:
            state = self._state
            if state == _START:
                i = self._lex_start(data, i)
            elif state == _STRING:
                i = self._lex_string(data, i)
            elif state == _ESCAPE:
                self._lex_escape(data[i])
                i += 1
            elif state == _UNICODE:
                self._lex_unicode(data[i])
                i += 1
            elif state in (_NUMBER, _KEYWORD):
                chars = _NUMBER_CHARS if state == _NUMBER else _KEYWORD_CHARS
                j = i
                while j < n and data[j] in chars:
                    j += 1
                self._msg_bytes += j - i
                if self._word_over or self._msg_bytes > self.max_bytes:
                    self._word_over = True  # poisons the message once the word ends
                    self._raw.clear()
                else:
                    self._raw += data[i:j]
                if j < n:
                    self._end_word(data[j])
                    if self._state == _RECOVER:
                        j += 1  # the terminator belonged to the bad token
                i = j
            else:  # _RECOVER
                c = data[i]
                if c in _WHITESPACE or c in _STRUCTURAL:
                    self._state = _START
                else:
                    i += 1
        out, self._out = self._out, []
        return out

    # -- lexer ------------------------------------------------------------------------
    def _lex_start(self, data: bytes, i: int) -> int:
        c = data[i]
        if c in _WHITESPACE:
            return i + 1
        if c in _STRUCTURAL:
            self._msg_bytes += 1
            self._token((chr(c), None))
        elif c == 0x22 or c == 0x27:  # " '
            self._state, self._quote = _STRING, c
            self._parts, self._str_error, self._str_len = [], None, 1
            self._decoder.reset()
        elif c == 0x2D or 0x30 <= c <= 0x39:
            self._state, self._raw = _NUMBER, bytearray()
            return i
        elif c in _KEYWORD_CHARS:
            self._state, self._raw = _KEYWORD, bytearray()
            return i
        else:
            self._lexer_error(f"stray '{_show(data[i : i + 1])}'")
        return i + 1

    def _lex_string(self, data: bytes, i: int) -> int:
        m = _PLAIN[self._quote].match(data, i)
        if m is not None:
            chunk = m.group()
            i = m.end()
            self._str_len += len(chunk)
            try:
                text = self._decoder.decode(chunk)
            except UnicodeDecodeError:
                self._lexer_error(f"stray '{_show(bytes([self._quote]) + chunk)}'")
                return i
            self._append(text)
            if i == len(data):
                return i
        c = data[i]
        self._str_len += 1
        if c < 0x20:
            self._lexer_error(f"stray '{_show(bytes([self._quote, c]))}'")
            return i + 1
        try:
            self._decoder.decode(b"", final=True)  # a multi-byte character cut short?
        except UnicodeDecodeError:
            self._lexer_error(f"stray '{_show(bytes([self._quote, c]))}'")
            return i + 1
        if c == 0x5C:  # backslash
            self._state = _ESCAPE
        else:  # the closing quote
            self._state = _START
            self._msg_bytes += self._str_len
            if self._str_error is not None:
                self._token(("!", self._str_error))
            else:
                self._finish_string()
        return i + 1

    def _lex_escape(self, c: int) -> None:
        self._str_len += 1
        self._state = _STRING
        if c == 0x75:  # u
            self._state, self._raw = _UNICODE, bytearray(b"\\u")
        elif c in _SIMPLE_ESCAPES:
            self._append(_SIMPLE_ESCAPES[c])
        elif c < 0x20:
            self._lexer_error(f"stray '{_show(bytes([self._quote, 0x5C, c]))}'")
        else:
            self._str_error = (
                self._str_error or "JSON parse error, invalid escape sequence in string"
            )

    def _lex_unicode(self, c: int) -> None:
        self._str_len += 1
        self._raw.append(c)
        if c in _HEX:
            if len(self._raw) == 6:
                self._append(chr(int(self._raw[2:], 16)))
                self._state = _STRING
            return
        if c < 0x20:
            self._lexer_error(f"stray '{_show(bytes([self._quote]) + self._raw)}'")
            return
        self._str_error = self._str_error or (
            f"JSON parse error, {_show(self._raw)} is not a valid Unicode character"
        )
        self._state = _STRING
        if c == self._quote:  # the quote that ended the broken escape also ends the string
            self._state = _START
            self._msg_bytes += self._str_len
            self._token(("!", self._str_error))

    def _append(self, text: str) -> None:
        """Keep decoded string text while the message is within its size budget."""
        if self._str_error is not None:
            return
        if self._over_budget(self._str_len):
            self._str_error = "JSON token size limit exceeded"
            self._parts = []
            return
        self._parts.append(text)

    def _finish_string(self) -> None:
        text = "".join(self._parts)
        if _SURROGATE.search(text):
            text = _SURROGATE_PAIR.sub(_join_pair, text)
            bad = _SURROGATE.search(text)
            if bad is not None:
                msg = (
                    f"JSON parse error, \\u{ord(bad.group()):04x} is not a valid Unicode character"
                )
                self._token(("!", msg))
                return
        self._token(("s", text))

    def _end_word(self, terminator: int) -> None:
        raw = bytes(self._raw)
        self._state = _START
        if self._word_over:
            self._word_over = False
            self._token(("!", "JSON token size limit exceeded"))
            return
        if raw[0] not in _KEYWORD_CHARS:
            m = _NUMBER_RE.fullmatch(raw)
            if m is None:
                self._lexer_error(f"stray '{_show(raw + bytes([terminator]))}'")
                return
            self._token(("v", _number(raw, m)))
        elif raw.decode() in _KEYWORDS:
            self._token(("v", _KEYWORDS[raw.decode()]))
        else:
            self._token(("!", f"JSON parse error, invalid keyword '{raw.decode()}'"))

    def _over_budget(self, pending: int) -> bool:
        return self._msg_bytes + pending > self.max_bytes

    def _lexer_error(self, text: str) -> None:
        if not text.startswith("JSON "):
            text = f"JSON parse error, {text}"
        self._out.append(JSONError(text))
        self._state = _RECOVER
        self._reset_message()

    # -- streamer ---------------------------------------------------------------------
    def _reset_message(self) -> None:
        self._tokens = []
        self._depth = 0
        self._msg_bytes = 0
        self._msg_error = None

    def _token(self, token: Token) -> None:
        kind = token[0]
        if kind in ("{", "["):
            self._depth += 1
            if self._depth > self.max_depth and self._msg_error is None:
                self._msg_error = "JSON nesting depth limit exceeded"
        elif kind in ("}", "]"):
            self._depth -= 1
        if self._msg_error is None:
            if kind == "!":
                self._msg_error = token[1]
            elif len(self._tokens) >= self.max_tokens:
                self._msg_error = "JSON token count limit exceeded"
            elif self._msg_bytes > self.max_bytes:
                self._msg_error = "JSON token size limit exceeded"
            else:
                self._tokens.append(token)
        if self._depth > 0:
            return
        if self._msg_error is not None:
            self._out.append(JSONError(self._msg_error))
        else:
            self._out.append(parse_tokens(self._tokens))
        self._reset_message()


def _join_pair(m: re.Match[str]) -> str:
    pair = m.group()
    hi, lo = pair[0], pair[1]
    return chr(0x10000 + ((ord(hi) - 0xD800) << 10) + (ord(lo) - 0xDC00))


def _show(raw: bytes | bytearray) -> str:
    return bytes(raw).decode("utf-8", "replace")


def _number(raw: bytes, m: re.Match[bytes]) -> int | float:
    # An integer of more than 20 digits fits neither int64 nor uint64 (and int() refuses
    # strings of more than 4300 digits): it becomes a double, as in QEMU.
    if m.group(1) is None and m.group(2) is None and len(raw) <= 20:
        value = int(raw)
        if -(1 << 63) <= value < (1 << 64):
            return value
    return float(raw)


# -- parser ----------------------------------------------------------------------------
class _Fail(Exception):
    pass


def parse_tokens(tokens: list[Token]) -> Item:
    """Build the value of one balanced token list (QEMU's json-parser texts)."""
    try:
        return JSONValue(_parse(tokens))
    except _Fail as e:
        return JSONError(f"JSON parse error, {e}")


def _parse(tokens: list[Token]) -> Any:
    pos = 0
    n = len(tokens)
    # Each stack entry is a container under construction: a list, or [dict, pending_key].
    stack: list[Any] = []

    def value_at(i: int) -> tuple[Any, bool, int]:
        """Parse a scalar or open a container at i; return (value, is_container, next)."""
        if i >= n:
            raise _Fail("premature EOI")
        kind, val = tokens[i]
        if kind in ("s", "v"):
            return val, False, i + 1
        if kind == "[":
            return [], True, i + 1
        if kind == "{":
            return {}, True, i + 1
        raise _Fail("expecting value")

    root, opened, pos = value_at(0)
    if opened:
        stack.append(root)
    while stack:
        top = stack[-1]
        is_list = isinstance(top, list)
        close = "]" if is_list else "}"
        if pos < n and tokens[pos][0] == close and not top:
            pos += 1
            stack.pop()
            continue
        if top:  # a separator is needed
            if pos < n and tokens[pos][0] == close:
                pos += 1
                stack.pop()
                continue
            if pos >= n or tokens[pos][0] != ",":
                raise _Fail("expected separator in " + ("list" if is_list else "dict"))
            pos += 1
        if is_list:
            item, opened, pos = value_at(pos)
            top.append(item)
        else:
            if pos >= n:
                raise _Fail("premature EOI")
            key, opened, pos = value_at(pos)
            if not isinstance(key, str):
                raise _Fail("key is not a string in object")
            if pos >= n or tokens[pos][0] != ":":
                raise _Fail("missing : in object pair")
            item, opened, pos = value_at(pos + 1)
            if key in top:
                raise _Fail("duplicate key")
            top[key] = item
        if opened:
            stack.append(item)
    return root


def parse_one(text: str | bytes) -> Any:
    """Parse a whole document holding exactly one JSON value (QEMU's extensions included).

    Raises ``ValueError`` with QEMU's text.  Useful for JSON given on the command line.
    """
    data = text.encode() if isinstance(text, str) else text
    stream = JSONStream()
    items = stream.feed(data + b" ")
    if not items:
        raise ValueError("JSON parse error, premature EOI")
    if isinstance(items[0], JSONError):
        raise ValueError(items[0].message)
    if len(items) > 1 or not stream.idle:
        raise ValueError("Expecting at most one JSON value")
    return items[0].value


# -- encoder ---------------------------------------------------------------------------
_ESCAPE_RE = re.compile('[\\x00-\\x1f"\\\\\\x7f-\\U0010ffff]')
_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    if ch in _SHORT:
        return _SHORT[ch]
    code = ord(ch)
    if code >= 0x10000:
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04X}\\u{0xDC00 + (code & 0x3FF):04X}"
    return f"\\u{code:04X}"


def encode_string(s: str) -> str:
    return '"' + _ESCAPE_RE.sub(_escape_char, s) + '"'


def encode(value: Any, pretty: bool = False) -> str:
    """Serialise like QEMU: ``{"a": 1, "b": [1, 2]}``, pure ASCII, ``\\uXXXX`` escapes.

    ``pretty`` gives QEMU's pretty form (four-space indent, ``{`` and ``}`` of an empty
    object on separate lines).  Iterative: any depth the parser accepts can be echoed.
    """
    out: list[str] = []
    stack: list[tuple[str, int, Iterator[tuple[str | None, Any]], list[int]]] = []
    _emit(value, out, stack, 0)
    while stack:
        closing, level, items, count = stack[-1]
        entry = next(items, None)
        if entry is None:
            stack.pop()
            if pretty:
                out.append("\n" + "    " * level)
            out.append(closing)
            continue
        key, item = entry
        if count[0]:
            out.append("," if pretty else ", ")
        count[0] += 1
        if pretty:
            out.append("\n" + "    " * (level + 1))
        if key is not None:
            out.append(encode_string(key))
            out.append(": ")
        _emit(item, out, stack, level + 1)
    return "".join(out)


def _emit(
    value: Any,
    out: list[str],
    stack: list[tuple[str, int, Iterator[tuple[str | None, Any]], list[int]]],
    level: int,
) -> None:
    if isinstance(value, str):
        out.append(encode_string(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(str(int(value)))
    elif isinstance(value, float):
        if math.isfinite(value):
            out.append(
                repr(value) if value != int(value) or abs(value) >= 1e16 else str(int(value))
            )
        else:
            out.append("inf" if value > 0 else "-inf" if value < 0 else "nan")
    elif isinstance(value, dict):
        out.append("{")
        stack.append(("}", level, iter(value.items()), [0]))
    elif isinstance(value, list | tuple):
        out.append("[")
        stack.append(("]", level, ((None, v) for v in value), [0]))
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as JSON")
