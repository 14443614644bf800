"""QMP commands on the block graph: blockdev-add, blockdev-del,
query-named-block-nodes and block_resize."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vexport.errors import GenericError
from vexport.qmp.registry import command

if TYPE_CHECKING:
    from vexport.daemon import Daemon


@command("blockdev-add", schema="blockdev-add")
async def blockdev_add(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    await daemon.add_blockdev(args)
    return {}


@command("blockdev-del", schema="blockdev-del")
async def blockdev_del(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    daemon.graph.delete(args["node-name"])
    return {}


@command("query-named-block-nodes", schema="query-named-block-nodes")
async def query_named_block_nodes(daemon: Daemon, args: dict[str, Any]) -> list[dict[str, Any]]:
    # ``flat`` drops the backing chain ("backing-image", which blkdebug shows for its
    # image) and reports a depth of 0, as QSD does.
    entries = [node.query() for node in daemon.graph.nodes]
    if args.get("flat"):
        for entry in entries:
            entry.get("image", {}).pop("backing-image", None)
            entry["backing_file_depth"] = 0
    return entries


@command("block_resize", schema="block_resize")
async def block_resize(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    node = daemon.graph.lookup(args.get("device"), args.get("node-name"))
    size = args["size"]
    if size < 0:
        raise GenericError("Parameter 'size' expects a >0 size")
    await node.truncate(size)
    return {}
