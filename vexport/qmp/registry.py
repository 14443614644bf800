"""The QMP command registry.

Commands are registered declaratively: a name, the name of the JSON schema in
``schema/`` that validates the arguments (validated before the handler runs), and
an async handler ``handler(daemon, args) -> result``.  ``query-commands`` lists
this registry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vexport.daemon import Daemon

Handler = Callable[["Daemon", dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    schema: str | None  # e.g. "blockdev-add" -> schema/blockdev-add.json; None: no arguments
    allow_oob: bool = False


REGISTRY: dict[str, Command] = {}


def command(
    name: str, *, schema: str | None = None, allow_oob: bool = False
) -> Callable[[Handler], Handler]:
    """Register ``handler`` as QMP command ``name``."""

    def register(handler: Handler) -> Handler:
        if name in REGISTRY:
            raise ValueError(f"QMP command {name} registered twice")
        REGISTRY[name] = Command(name, handler, schema, allow_oob)
        return handler

    return register
