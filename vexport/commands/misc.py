"""QMP commands of the monitor itself and of user-creatable objects."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import vexport
from vexport.errors import CommandNotFound
from vexport.objects import query_iothreads
from vexport.qmp.registry import REGISTRY, command

if TYPE_CHECKING:
    from vexport.daemon import Daemon


@command("qmp_capabilities", schema="qmp_capabilities")
async def qmp_capabilities(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    # Negotiation is the session's business (it needs the session's state); a request
    # that reaches a handler comes after negotiation.
    raise CommandNotFound("Capabilities negotiation is already complete, command ignored")


@command("query-version")
async def query_version(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    return {"qemu": dict(vexport.QEMU_VERSION), "package": vexport.PACKAGE}


@command("query-commands")
async def query_commands(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, str]]:
    # QSD lists the most recently registered command first.
    return [{"name": name} for name in reversed(REGISTRY)]


@command("quit")
async def quit_(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    # As in QSD, every live export is deleted (each emitting BLOCK_EXPORT_DELETED)
    # before the reply.  The session writes the reply before the event loop gets to
    # run the daemon's shutdown, and the server flushes every client before closing it.
    from vexport.exports import delete_all_exports

    await delete_all_exports(daemon)
    daemon.request_quit()
    return {}


@command("object-add", schema="object-add")
async def object_add(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await daemon.add_object(args)
    return {}


@command("object-del", schema="object-del")
async def object_del(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await daemon.delete_object(args["id"])
    return {}


@command("query-iothreads")
async def query_iothreads_(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    return query_iothreads(daemon)
