"""QMP commands for block exports."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
