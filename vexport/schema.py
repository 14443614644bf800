"""QMP argument schemas: validation with QSD's error texts, and keyval typing.

Theory of operation
-------------------
Every command's arguments are described by a JSON Schema (draft 2020-12) in
``schema/<name>.json`` (installed as the package ``vexport.schema``).  A few ``x-``
annotations carry what QAPI knows and JSON Schema does not:

* ``x-qapi-type`` on integers (``int``, ``int32``, ``uint16``, ``uint32``, ``uint64``,
  ``size``): the range and the error text; the range is added as
  ``minimum``/``maximum`` when the schema is loaded.
* ``x-range-error``: the text for an explicit ``minimum``/``maximum`` (``{name}`` is
  replaced by the parameter), e.g. null-co's ``size`` may not be negative.
* ``x-discriminator``: a flat union (``BlockdevOptions`` by ``driver``...).  The branch
  is an ``allOf`` of ``if {driver: const X} then {$ref branch}``, closed by
  ``unevaluatedProperties: false``.
* ``x-alternate``: QAPI alternates (``BlockdevRef``: a node name or inline options),
  written as ``if {type: string} then ... else ...``.

``jsonschema`` finds *all* errors; QSD's visitor reports only the first one it meets
walking the members in declaration order (base members, then the branch's, then
"unexpected" members at the end of each object).  So each jsonschema error is turned
into candidates ``(position, priority, text)`` where position is the path expressed
as declaration indexes, and the smallest wins.

Keyval arguments (strings only) are first typed by walking the same schema
(``from_keyval``): a string that does not parse becomes a ``_Bad`` value carrying
QSD's keyval text, which fails the ``type`` check at the right place in the order.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError

from vexport.errors import GenericError

KeyPath = tuple[str | int, ...]

_INT64 = (-(2**63), 2**63 - 1)
# QEMU accepts negative numbers for uint64 in JSON "for backward compatibility".
_TYPE_RANGES: dict[str, tuple[int, int]] = {
    "int": _INT64,
    "int8": (-(2**7), 2**7 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint8": (0, 2**8 - 1),
    "uint16": (0, 2**16 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (-(2**63), 2**64 - 1),
    "size": (-(2**63), 2**64 - 1),
}
_UNEXPECTED_BASE = 1 << 40  # "unexpected" sorts after every member of its object


class _Bad:
    """A keyval value that failed to parse; carries QSD's message."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"_Bad({self.message!r})"


def _is_integer(_checker: Any, value: Any) -> bool:
    # JSON 1.0 is a number, not an integer, for QEMU.
    return isinstance(value, int) and not isinstance(value, bool)


_TYPE_CHECKER = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer)
_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, type_checker=_TYPE_CHECKER
)


# -- loading ---------------------------------------------------------------------------


def _add_ranges(node: Any) -> None:
    if isinstance(node, dict):
        qtype = node.get("x-qapi-type")
        if qtype is not None:
            lo, hi = _TYPE_RANGES[qtype]
            if qtype in ("uint64", "size"):
                lo = 0 if "x-range-error" not in node else lo
            node.setdefault("minimum", lo)
            node.setdefault("maximum", hi)
        for value in node.values():
            _add_ranges(value)
    elif isinstance(node, list):
        for value in node:
            _add_ranges(value)


@functools.cache
def _schema_dir() -> Any:
    """The JSON files: ``vexport/schema/`` when installed, ``schema/`` in the source tree.

    (This module is ``vexport.schema`` too, so the directory is found next to it rather
    than imported.)
    """
    installed = resources.files("vexport").joinpath("schema")
    if installed.joinpath("blockdev-add.json").is_file():
        return installed
    return Path(__file__).resolve().parent.parent / "schema"


@functools.cache
def load(name: str) -> dict[str, Any]:
    """The schema of QMP command (or command line option) ``name``."""
    try:
        text = _schema_dir().joinpath(f"{name}.json").read_text()
    except FileNotFoundError:
        raise KeyError(f"no schema named {name!r}") from None
    schema: dict[str, Any] = json.loads(text)
    _add_ranges(schema)
    _Validator.check_schema(schema)
    return schema


def names() -> list[str]:
    """All schema names."""
    files = _schema_dir().iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".json"))


@functools.cache
def _validator(name: str) -> Any:
    return _Validator(load(name))


# -- walking the schema alongside an instance -----------------------------------------------


class _Walker:
    def __init__(self, root: dict[str, Any], keyval: bool) -> None:
        self.root = root
        self.keyval = keyval

    def deref(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            ref = node["$ref"]
            if ref == "#":
                node = self.root
                continue
            assert ref.startswith("#/$defs/"), ref
            node = self.root["$defs"][ref[len("#/$defs/") :]]
        return node

    def resolve(self, node: dict[str, Any], inst: Any) -> dict[str, Any]:
        """$refs followed and alternates decided by the instance's type."""
        node = self.deref(node)
        while "x-alternate" in node:
            node = self.deref(node["then"] if isinstance(inst, str) else node["else"])
        return node

    def props(self, node: dict[str, Any], inst: Any) -> dict[str, Any]:
        """The members of an object schema: base members, then the union branch's."""
        node = self.resolve(node, inst)
        out = dict(node.get("properties", {}))
        disc = node.get("x-discriminator")
        if disc is not None and isinstance(inst, dict):
            for item in node.get("allOf", []):
                const = item["if"]["properties"][disc]["const"]
                if inst.get(disc) == const:
                    out.update(self.props(item["then"], inst))
        return out

    def locate(self, path: KeyPath, inst: Any) -> tuple[tuple[int, ...], dict[str, Any] | None]:
        """Sort position of ``path`` and the schema declared for it."""
        node: dict[str, Any] | None = self.root
        key: list[int] = []
        for comp in path:
            if node is None:
                key.append(_UNEXPECTED_BASE)
                inst = inst[comp]
                continue
            if isinstance(comp, int):
                key.append(comp)
                node = self.resolve(node, inst).get("items")
            else:
                props = self.props(node, inst)
                if comp in props:
                    key.append(list(props).index(comp))
                    node = props[comp]
                else:
                    key.append(_UNEXPECTED_BASE + list(inst).index(comp))
                    node = None
            inst = inst[comp]
        return tuple(key), node

    def fmt(self, path: KeyPath) -> str:
        out = ""
        for comp in path:
            if isinstance(comp, int):
                out += f".{comp}" if self.keyval else f"[{comp}]"
            else:
                out += f".{comp}" if out else comp
        return out


# -- translating jsonschema errors -----------------------------------------------------------


def _type_message(w: _Walker, declared: dict[str, Any] | None, value: Any, name: str) -> str:
    if isinstance(value, _Bad):
        return value.message
    node = w.deref(declared) if declared is not None else {}
    if "x-alternate" in node:
        return f"Invalid parameter type for '{name}', expected: {node['x-alternate']}"
    node = w.resolve(node, value)
    expected = node.get("type", "object")
    if w.keyval and expected not in ("object", "array") and isinstance(value, (dict, list)):
        return f"Parameters '{name}.*' are unexpected"
    if expected == "integer":
        qtype = node.get("x-qapi-type", "int")
        if qtype.startswith("uint") or qtype == "size":
            return f"Parameter '{name}' expects uint64"
    return f"Invalid parameter type for '{name}', expected: {expected}"


def _range_message(node: dict[str, Any], value: int, name: str) -> str:
    qtype = node.get("x-qapi-type", "int")
    lo, hi = _TYPE_RANGES[qtype]
    if lo <= value <= hi and "x-range-error" in node:
        return str(node["x-range-error"]).format(name=name)
    if qtype == "int":
        return f"Invalid parameter type for '{name}', expected: integer"
    if qtype == "size":
        qtype = "uint64"
    return f"Parameter '{name}' expects {qtype}" + ("" if qtype == "uint64" else "_t")


def _candidates(w: _Walker, err: ValidationError, inst: Any) -> Iterator[tuple[Any, ...]]:
    path: KeyPath = tuple(err.absolute_path)
    kind = err.validator
    instance: Any = err.instance
    if kind == "required":
        base, declared = w.locate(path, inst)
        names = list(w.props(declared or {}, instance))
        required: list[str] = list(err.validator_value)  # type: ignore[arg-type]
        for missing in required:
            if missing not in instance:
                idx = names.index(missing) if missing in names else len(names)
                name = w.fmt((*path, missing))
                yield (*base, idx), 0, f"Parameter '{name}' is missing"
    elif kind in ("additionalProperties", "unevaluatedProperties"):
        base, declared = w.locate(path, inst)
        known = w.props(declared or {}, instance)
        for i, extra in enumerate(instance):
            if extra not in known:
                name = w.fmt((*path, extra))
                yield (*base, _UNEXPECTED_BASE + i), 0, f"Parameter '{name}' is unexpected"
    elif kind == "type":
        key, declared = w.locate(path, inst)
        yield key, 0, _type_message(w, declared, err.instance, w.fmt(path))
    elif kind == "enum":
        if isinstance(err.instance, str):
            key, _ = w.locate(path, inst)
            short = next((c for c in reversed(path) if isinstance(c, str)), "null")
            yield key, 1, f"Parameter '{short}' does not accept value '{err.instance}'"
    elif kind in ("minimum", "maximum"):
        key, declared = w.locate(path, inst)
        node = w.deref(declared or {})
        yield key, 2, _range_message(node, instance, w.fmt(path))
    else:  # not used by our schemas; still say something precise
        key, _ = w.locate(path, inst)
        yield key, 3, f"Parameter '{w.fmt(path)}' is invalid"


def _check(name: str, instance: Any, keyval: bool) -> None:
    w = _Walker(load(name), keyval)
    best: tuple[Any, ...] | None = None
    for err in _validator(name).iter_errors(instance):
        for cand in _candidates(w, err, instance):
            if best is None or cand[:2] < best[:2]:
                best = cand
    if best is not None:
        raise GenericError(best[2])


def validate(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """Validate QMP (JSON) arguments for ``name``; raise ``GenericError`` like QSD."""
    _check(name, args, keyval=False)
    return args


# -- keyval typing ------------------------------------------------------------------------

_WS = " \t\n\v\f\r"
_C_INT = re.compile(r"([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_SIZE = re.compile(r"\+?(?:(0[xX][0-9a-fA-F]+)|([0-9]+)(\.[0-9]*)?)([bBkKmMgGtTpPeE]?)")
_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SUFFIX.update({"p": 1 << 50, "e": 1 << 60})


def parse_c_integer(text: str, signed: bool) -> int | None:
    """``strtoll``/``strtoull`` with base 0 on the whole string (QEMU's qemu_strto*)."""
    m = _C_INT.fullmatch(text.lstrip(_WS))
    if m is None:
        return None
    digits = m.group(2)
    value = (
        int(digits, 16)
        if digits[:2] in ("0x", "0X")
        else int(digits, 8 if digits[0] == "0" else 10)
    )
    if signed:
        value = -value if m.group(1) == "-" else value
        return value if _INT64[0] <= value <= _INT64[1] else None
    if value > 2**64 - 1:
        return None
    return (2**64 - value) % 2**64 if m.group(1) == "-" else value


def parse_size(text: str) -> int | None:
    """QEMU's qemu_strtosz: decimal or hex, optional fraction and B/K/M/G/T/P/E suffix."""
    m = _SIZE.fullmatch(text.lstrip(_WS))
    if m is None:
        return None
    hexa, whole, frac, suffix = m.groups()
    mul = _SUFFIX[suffix.lower()]
    if hexa is not None:
        value = int(hexa, 16) * mul
    else:
        if frac is not None and mul == 1:
            return None  # a fraction needs a unit
        value = int(whole) * mul + int(float("0" + (frac or ".0")) * mul)
    return value if value <= 2**64 - 1 else None


_BOOLS = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


def _type_scalar(node: dict[str, Any], value: str, name: str) -> Any:
    kind = node.get("type")
    if kind == "boolean":
        if value in _BOOLS:
            return _BOOLS[value]
        return _Bad(f"Parameter '{name}' expects 'on' or 'off'")
    if kind == "integer":
        qtype = node.get("x-qapi-type", "int")
        if qtype == "size":
            number = parse_size(value)
            return _Bad(f"Parameter '{name}' expects size") if number is None else number
        number = parse_c_integer(value, signed=not qtype.startswith("uint"))
        return _Bad(f"Parameter '{name}' expects integer") if number is None else number
    return value


def _type_keyval(w: _Walker, declared: dict[str, Any], value: Any, path: KeyPath) -> Any:
    node = w.resolve(declared, value)
    kind = node.get("type", "object")
    if kind == "object":
        if not isinstance(value, dict):
            return value  # the type check reports it
        props = w.props(node, value)
        return {
            k: _type_keyval(w, props[k], v, (*path, k)) if k in props else v
            for k, v in value.items()
        }
    if kind == "array":
        if not isinstance(value, list) or "items" not in node:
            return value
        return [_type_keyval(w, node["items"], v, (*path, i)) for i, v in enumerate(value)]
    if isinstance(value, (dict, list)):
        return _Bad(f"Parameters '{w.fmt(path)}.*' are unexpected")
    if not isinstance(value, str):
        return value
    return _type_scalar(node, value, w.fmt(path))


def from_keyval(name: str, tree: dict[str, Any]) -> dict[str, Any]:
    """Type a keyval tree (strings) by schema ``name`` and validate it like QSD."""
    w = _Walker(load(name), keyval=True)
    typed = _type_keyval(w, w.root, tree, ())
    _check(name, typed, keyval=True)
    assert isinstance(typed, dict)
    return typed
