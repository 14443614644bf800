"""QMP commands for block exports."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vexport.errors import GenericError
from vexport.exports import add_export, delete_export, query_exports
from vexport.qmp.registry import command

if TYPE_CHECKING:
    from vexport.daemon import Daemon


@command("block-export-add", schema="block-export-add")
async def block_export_add(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await add_export(daemon, args)
    return {}


@command("block-export-del", schema="block-export-del")
async def block_export_del(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await delete_export(daemon, args["id"], args.get("mode", "safe"))
    return {}


@command("query-block-exports")
async def query_block_exports(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    return query_exports(daemon)


@command("nbd-server-start", schema="nbd-server-start")
async def nbd_server_start(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    raise GenericError("NBD is not supported by vexport")


@command("nbd-server-stop")
async def nbd_server_stop(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    raise GenericError("NBD is not supported by vexport")
