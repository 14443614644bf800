"""QEMU's keyval command line syntax, as qemu-storage-daemon 7.2 parses it.

Theory of operation
-------------------
An argument such as ``null-co,node-name=a,cache.direct=on,x.0=p`` is a comma separated
list of ``key=value`` pairs.  ``,,`` inside a value is a literal comma; a trailing comma
is fine.  When the first element has no ``=`` it is the value of the *implied key*
(``driver`` for ``--blockdev``...).  Keys are dotted paths: every fragment but the
first may be a decimal number, everything else must be a QAPI name (a letter followed
by letters, digits, ``-`` and ``_``, optionally behind a ``__RFQDN_`` prefix).  Each
pair is put into a tree of dicts (a repeated key: the last one wins); a key used
both as a leaf and as a parent is an error.  Finally every dict whose keys are all
numbers becomes a list, and the indexes must run without gaps from 0.

The result is a tree of dicts, lists and strings; typing the strings is the job of
``schema.from_keyval``.  Errors are raised as ``GenericError`` with QSD's texts.
"""

from __future__ import annotations

import re
from typing import Any

from vexport.errors import GenericError

#: QEMU keeps key fragments in a 128 byte buffer.
MAX_FRAGMENT = 127
INT_MAX = 2**31 - 1

_QAPI_NAME = re.compile(r"(?:__[A-Za-z0-9.-]*_)?[A-Za-z][A-Za-z0-9_-]*")
_INDEX = re.compile(r"[0-9]+")
_HELP_WORDS = ("help", "?")

Tree = dict[str, Any]


def _fragment_len(key: str, pos: int, first: bool) -> int:
    """Length of the key fragment at ``pos`` (0 when it is not a valid fragment)."""
    m = _QAPI_NAME.match(key, pos)
    if m is None and not first:
        m = _INDEX.match(key, pos)
        # An index is all digits: ``x.0a`` is invalid.
        if m is not None and m.end() < len(key) and key[m.end()] != ".":
            return 0
    return 0 if m is None else m.end() - pos


def _put(cur: Tree, fragment: str, value: str | None, prefix: str) -> Tree | None:
    """Store ``value`` (a leaf) or an intermediate dict (``value is None``)."""
    old = cur.get(fragment)
    if old is not None:
        if isinstance(old, dict) != (value is None):
            raise GenericError(f"Parameters '{prefix}.*' used inconsistently")
        if value is None:
            return old
    if value is None:
        new: Tree = {}
        cur[fragment] = new
        return new
    # Last one wins, but the key moves to the end like a fresh insertion.
    cur.pop(fragment, None)
    cur[fragment] = value
    return None


def _parse_one(root: Tree, params: str, pos: int, implied_key: str | None) -> tuple[int, bool]:
    """Parse one ``key=value`` starting at ``pos``; return (next pos, help seen)."""
    end = pos
    while end < len(params) and params[end] not in "=,":
        end += 1
    word = params[pos:end]
    next_is_eq = end < len(params) and params[end] == "="
    if word in _HELP_WORDS and not next_is_eq:
        pos = end + 1 if end < len(params) else end
        return pos, True
    if implied_key is not None and word and not next_is_eq:
        key = implied_key
        value_start = pos
    else:
        key = word
        value_start = -1

    # Walk the key fragments, creating the intermediate dicts.
    cur = root
    s = 0
    first = True
    fragment = ""
    while True:
        flen = _fragment_len(key, s, first)
        if not flen or (s + flen < len(key) and key[s + flen] != "."):
            raise GenericError(f"Invalid parameter '{key}'")
        if flen > MAX_FRAGMENT:
            what = "Parameter fragment" if s or s + flen != len(key) else "Parameter"
            raise GenericError(f"{what} '{key[s : s + flen]}' is too long")
        if not first:
            sub = _put(cur, fragment, None, key[: s - 1])
            assert sub is not None
            cur = sub
        fragment = key[s : s + flen]
        s += flen
        first = False
        if s < len(key) and key[s] == ".":
            s += 1
            continue
        break

    if value_start < 0:
        if not next_is_eq:
            raise GenericError(f"Expected '=' after parameter '{key}'")
        value_start = end + 1
    # The value runs to the next single comma; ",," is a literal comma.
    chars: list[str] = []
    i = value_start
    while i < len(params):
        c = params[i]
        if c == ",":
            if i + 1 < len(params) and params[i + 1] == ",":
                chars.append(",")
                i += 2
                continue
            break
        chars.append(c)
        i += 1
    _put(cur, fragment, "".join(chars), key)
    if i < len(params):  # skip the separating comma
        i += 1
    return i, False


def _key_to_index(key: str) -> int:
    if not key or not key[0].isdigit():
        return -1
    return min(int(key), INT_MAX)


def _listify(cur: Tree, prefix: str) -> Tree | list[Any]:
    """Turn dicts whose keys are all indexes into lists, recursively."""
    has_index = has_member = False
    max_index = -1
    for k, v in list(cur.items()):
        if isinstance(v, dict):
            cur[k] = _listify(v, f"{prefix}{k}.")
        index = _key_to_index(k)
        if index >= 0:
            has_index = True
            max_index = max(max_index, index)
        else:
            has_member = True
    if has_index and has_member:
        raise GenericError(f"Parameters '{prefix}*' used inconsistently")
    if not has_index:
        return cur
    # Like QEMU: one extra slot works as a sentinel, so an index too large to
    # fit is reported as the first missing one.
    nelt = len(cur) + 1
    elements: list[Any] = [None] * nelt
    for k, v in cur.items():
        index = _key_to_index(k)
        if index < nelt - 1:
            elements[index] = v
    out: list[Any] = []
    for i in range(min(nelt, max_index + 1)):
        if elements[i] is None:
            raise GenericError(f"Parameter '{prefix}{i}' missing")
        out.append(elements[i])
    return out


def _parse(params: str, implied_key: str | None, allow_help: bool) -> tuple[Tree, bool]:
    root: Tree = {}
    pos = 0
    want_help = False
    while pos < len(params):
        pos, saw_help = _parse_one(root, params, pos, implied_key)
        want_help = want_help or saw_help
        implied_key = None
    # QEMU refuses help before it builds the lists.
    if want_help and not allow_help:
        raise GenericError("Help is not available for this option")
    tree = _listify(root, "")
    assert isinstance(tree, dict)  # the first fragment is never an index
    return tree, want_help


def parse_with_help(params: str, implied_key: str | None = None) -> tuple[Tree, bool]:
    """Parse ``params`` for an option that offers help (``--object``): also say
    whether a bare ``help`` or ``?`` was present."""
    return _parse(params, implied_key, True)


def parse(params: str, implied_key: str | None = None) -> Tree:
    """Parse a keyval string for an option that offers no help."""
    return _parse(params, implied_key, False)[0]
