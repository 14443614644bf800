"""Pure helpers for node names and QEMU's display filenames.

Node names follow QEMU's ``id_wellformed`` rule: a letter first, then letters,
digits, ``-``, ``.`` or ``_``; at most 31 characters.  Nodes created implicitly
(inline children) get ``#block<counter><two random digits>`` names, the
``#`` making them impossible to pass as a user name.

QEMU shows a node whose filename cannot be expressed as a plain path as
``json:{...}``.  Its keys come out in the iteration order of QEMU's QDict, a
hash table of 512 buckets keyed by the tdb hash of the key; ``json_filename``
reproduces that order so that query output matches QSD byte for byte.
"""

from __future__ import annotations

import json
from typing import Any

from vexport.errors import GenericError

NODE_NAME_MAX = 31
_QDICT_BUCKETS = 512


def check_node_name(name: str) -> None:
    """Raise GenericError with QEMU's text if ``name`` cannot be a node name."""
    if not is_wellformed(name):
        raise GenericError(f"Invalid node-name: '{name}'")


def check_node_name_length(name: str) -> None:
    if len(name) > NODE_NAME_MAX:
        raise GenericError("Node name too long")


def is_wellformed(name: str) -> bool:
    if not name or not (name[0].isascii() and name[0].isalpha()):
        return False
    return all(c.isascii() and (c.isalnum() or c in "-._") for c in name[1:])


def qdict_bucket(key: str) -> int:
    """Bucket of ``key`` in a QEMU QDict (tdb hash modulo the bucket count)."""
    data = key.encode()
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, c in enumerate(data):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % _QDICT_BUCKETS


def qdict_order(d: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``d`` (recursively) with keys in QDict iteration order."""
    out: dict[str, Any] = {}
    for key in sorted(d, key=qdict_bucket):
        value = d[key]
        out[key] = qdict_order(value) if isinstance(value, dict) else value
    return out


def json_filename(options: dict[str, Any]) -> str:
    return "json:" + json.dumps(qdict_order(options))
