r"""Block exports: the registry, the lifecycle and the checks common to every type.

An export goes through explicit states::

    STARTING --create() ok--> RUNNING --delete requested--> DELETING --drained--> gone
        \--create() failed--> gone (nothing registered, the node is not marked in use)

``add_export`` performs qemu-storage-daemon's checks in its order (id syntax, id in
use, type, node, iothread, writable on a read-only node), then hands the options to the
type's ``create``.  ``delete_export`` asks the export to stop taking requests and drain,
then unregisters it and emits ``BLOCK_EXPORT_DELETED``.
"""

from __future__ import annotations

import enum
import logging
import re
from typing import TYPE_CHECKING, Any, ClassVar

from vexport.errors import GenericError

if TYPE_CHECKING:
    from vexport.blockdev.node import BlockNode
    from vexport.daemon import Daemon

log = logging.getLogger("vexport.exports")

# QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'.
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")

# Export types that qemu-storage-daemon has but vexport does not serve.
UNSUPPORTED_TYPES = {
    "nbd": "NBD exports are not supported by vexport",
    "vhost-user-blk": "Export type 'vhost-user-blk' is not supported by vexport",
    "fuse": "Export type 'fuse' is not supported by vexport",
}


class ExportState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DELETING = "deleting"


class BlockExport:
    """Base class of every export type."""

    type: ClassVar[str] = ""

    def __init__(self, daemon: Daemon, options: dict[str, Any], node: BlockNode) -> None:
        self.daemon = daemon
        self.id: str = options["id"]
        self.node = node
        self.writable: bool = bool(options.get("writable", False))
        self.options = options
        self.state = ExportState.STARTING

    @classmethod
    def check_options(cls, options: dict[str, Any], node: BlockNode) -> None:
        """Type-specific option checks, raising GenericError, before anything is created."""

    async def start(self) -> None:
        """Take the node (``graph.add_user`` with the permissions the export needs),
        create the device and start serving.  Raise GenericError on failure, with the
        node released."""
        raise NotImplementedError

    async def stop(self, mode: str) -> None:
        """Stop taking requests, drain the ones in flight, release the device and the
        node (``graph.remove_user``)."""
        raise NotImplementedError

    def resize(self, new_length: int) -> None:
        """The node's length changed (block_resize)."""

    def query(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "node-name": self.node.node_name,
            "shutting-down": self.state is ExportState.DELETING,
        }


def export_types() -> dict[str, type[BlockExport]]:
    from vexport.exports.vduse_blk import VduseBlkExport

    return {VduseBlkExport.type: VduseBlkExport}


async def add_export(daemon: Daemon, options: dict[str, Any]) -> BlockExport:
    export_id = options["id"]
    if not _ID_RE.match(export_id):
        raise GenericError("Invalid block export id")
    if export_id in daemon.exports:
        raise GenericError(f"Block export id '{export_id}' is already in use")
    export_type = options["type"]
    if export_type in UNSUPPORTED_TYPES:
        raise GenericError(UNSUPPORTED_TYPES[export_type])
    cls = export_types().get(export_type)
    if cls is None:
        raise GenericError(f"Parameter 'type' does not accept value '{export_type}'")
    node = daemon.graph.lookup(node_name=options["node-name"])
    if "iothread" in options:
        daemon.require_iothread(options["iothread"])
    if options.get("writable") and node.read_only:
        raise GenericError("Cannot export read-only node as writable")
    cls.check_options(options, node)

    export = cls(daemon, options, node)
    await export.start()
    export.state = ExportState.RUNNING
    daemon.exports[export_id] = export  # start() took the node (graph.add_user)
    log.info("export %s (%s) of node %s is running", export_id, export_type, node.node_name)
    return export


async def delete_export(daemon: Daemon, export_id: str, mode: str = "safe") -> None:
    export = daemon.exports.get(export_id)
    if export is None:
        raise GenericError(f"Export '{export_id}' is not found")
    if export.state is ExportState.DELETING:
        raise GenericError(f"Export '{export_id}' is already shutting down")
    export.state = ExportState.DELETING
    try:
        await export.stop(mode)
    except BaseException:
        export.state = ExportState.RUNNING
        raise
    del daemon.exports[export_id]  # stop() released the node
    daemon.emit_event("BLOCK_EXPORT_DELETED", {"id": export_id})


async def delete_all_exports(daemon: Daemon) -> None:
    """At quit: delete every export, newest first, emitting each one's event."""
    for export_id in reversed(list(daemon.exports)):
        export = daemon.exports.get(export_id)
        if export is None or export.state is ExportState.DELETING:
            continue
        try:
            await delete_export(daemon, export_id, "hard")
        except Exception:
            log.exception("failed to delete export %s at exit", export_id)


def query_exports(daemon: Daemon) -> list[dict[str, Any]]:
    return [export.query() for export in reversed(list(daemon.exports.values()))]
