"""The block layer: nodes, drivers and the graph (see docs/design.md, "Block layer").

``DRIVERS`` maps the QAPI driver name (``BlockdevOptions.driver``) to its BlockNode
class; ``BlockGraph`` uses it to open nodes.
"""

from __future__ import annotations

from vexport.blockdev.blkdebug import BlkdebugNode
from vexport.blockdev.file import FileNode, HostDeviceNode
from vexport.blockdev.node import BlockNode
from vexport.blockdev.null import NullAioNode, NullNode
from vexport.blockdev.raw import RawNode

DRIVERS: dict[str, type[BlockNode]] = {
    cls.driver: cls
    for cls in (BlkdebugNode, FileNode, HostDeviceNode, NullNode, NullAioNode, RawNode)
}

__all__ = ["DRIVERS", "BlockNode"]
