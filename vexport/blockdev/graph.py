"""BlockGraph: which nodes exist, who uses them, and QEMU's rules for adding/deleting.

Pure bookkeeping: the drivers (which do the I/O) are looked up in a mapping from
driver name to BlockNode class, ``vexport.blockdev.DRIVERS`` unless another is given.

* ``add(options)`` opens a root node (blockdev-add / --blockdev) and, depth first,
  its inline children.  A child given as a string references an existing node; one
  given as a dict is opened with options inherited from the parent (read-only,
  auto-read-only, cache.*, force-share; discard defaults to unmap) and, without a
  node-name, gets a generated ``#block...`` name.  If anything fails, every node
  opened by that call is closed again.
* Nodes created by ``add`` are "monitor owned"; inline children live as long as a
  parent references them.
* Users (exports) register with ``add_user(node, owner, perm, shared)``; a node with
  users cannot be deleted ("Node X is in use"), one with parents neither ("Block
  device X is in use").
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vexport.blockdev.names import check_node_name, check_node_name_length
from vexport.blockdev.perms import PERM_ALL, PERM_CONSISTENT_READ
from vexport.errors import GenericError

if TYPE_CHECKING:
    from vexport.blockdev.node import BlockNode

# Options an inline child takes from its parent when it does not set them itself.
_INHERITED = ("read-only", "auto-read-only", "force-share")
_INHERITED_CACHE = ("direct", "no-flush")


def inherit_options(child: dict[str, Any], parent: dict[str, Any]) -> dict[str, Any]:
    """The options of an inline child after QEMU's inheritance rules."""
    out = copy.deepcopy(child)
    for key in _INHERITED:
        if key not in out and key in parent:
            out[key] = parent[key]
    parent_cache = parent.get("cache") or {}
    for key in _INHERITED_CACHE:
        if key in parent_cache:
            out.setdefault("cache", {}).setdefault(key, parent_cache[key])
    out.setdefault("discard", "unmap")
    return out


class BlockGraph:
    def __init__(
        self,
        drivers: Mapping[str, type[BlockNode]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._drivers = drivers
        self._nodes: dict[str, BlockNode] = {}
        self._users: dict[BlockNode, list[object]] = {}
        self._reserved: set[str] = set()
        self._id_counter = 0
        self._rng = rng or random.Random()

    @property
    def drivers(self) -> Mapping[str, type[BlockNode]]:
        if self._drivers is None:
            from vexport.blockdev import DRIVERS

            self._drivers = DRIVERS
        return self._drivers

    @property
    def nodes(self) -> list[BlockNode]:
        """All nodes, newest first (query-named-block-nodes order)."""
        return list(reversed(self._nodes.values()))

    # -- lookup ------------------------------------------------------------------------
    def get(self, name: str) -> BlockNode | None:
        return self._nodes.get(name)

    def lookup(self, device: str | None = None, node_name: str | None = None) -> BlockNode:
        """QEMU's bdrv_lookup_bs.  vexport has no named BlockBackends, so only
        ``node_name`` can match; ``device`` appears in the error text."""
        node = self._nodes.get(node_name) if node_name is not None else None
        if node is None:
            raise GenericError(
                f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'"
            )
        return node

    # -- adding ------------------------------------------------------------------------
    def add(self, options: dict[str, Any]) -> BlockNode:
        if "node-name" not in options:
            raise GenericError("'node-name' must be specified for the root node")
        created: list[BlockNode] = []
        try:
            node = self._open(options, created)
        except BaseException:
            for n in reversed(created):
                self._remove(n, cascade=False)
            raise
        finally:
            self._reserved.clear()
        node.monitor_owned = True
        return node

    def generate_name(self) -> str:
        """``#block`` + a counter + two random digits, as QEMU's id_generate."""
        name = f"#block{self._id_counter}{self._rng.randrange(100):02d}"
        self._id_counter += 1
        return name

    def _open(self, options: dict[str, Any], created: list[BlockNode]) -> BlockNode:
        cls = self.drivers.get(options["driver"])
        if cls is None:
            raise GenericError(f"Unknown driver '{options['driver']}'")
        cls.check_common_options(options)
        name = options.get("node-name")
        if name is None:
            name = self.generate_name()
        else:
            check_node_name(name)
            if name in self._nodes or name in self._reserved:
                raise GenericError(f"Duplicate nodes with node-name='{name}'")
            check_node_name_length(name)
        self._reserved.add(name)
        children: dict[str, BlockNode] = {}
        for role in cls.child_roles:
            spec = options.get(role)
            if spec is None:
                raise GenericError(f'A block device must be specified for "{role}"')
            if isinstance(spec, str):
                children[role] = self.lookup(spec, spec)
            else:
                children[role] = self._open(inherit_options(spec, options), created)
        node = cls.create(name, options, children)
        self._nodes[name] = node
        created.append(node)
        for child in children.values():
            child.parents.append(node)
        return node

    # -- users -------------------------------------------------------------------------
    def add_user(
        self,
        node: BlockNode,
        owner: object,
        perm: int = PERM_CONSISTENT_READ,
        shared: int = PERM_ALL,
    ) -> None:
        """Mark ``node`` in use by ``owner`` (an export), taking ``perm`` and sharing
        ``shared`` (PERM_* bits); GenericError if the permissions conflict."""
        node.set_user_perm(owner, perm, shared)
        self._users.setdefault(node, []).append(owner)

    def remove_user(self, node: BlockNode, owner: object) -> None:
        users = self._users.get(node)
        if users and owner in users:
            users.remove(owner)
            if not users:
                del self._users[node]
        node.drop_user_perm(owner)

    def users(self, node: BlockNode) -> list[object]:
        return list(self._users.get(node, ()))

    # -- deleting ----------------------------------------------------------------------
    def delete(self, name: str) -> None:
        """blockdev-del."""
        node = self._nodes.get(name)
        if node is None:
            raise GenericError(f"Failed to find node with node-name='{name}'")
        if self._users.get(node):
            raise GenericError(f"Node {name} is in use")
        if not node.monitor_owned:
            raise GenericError(f"Node {name} is not owned by the monitor")
        if node.parents:
            raise GenericError(f"Block device {name} is in use")
        self._remove(node, cascade=True)

    def _remove(self, node: BlockNode, cascade: bool) -> None:
        self._nodes.pop(node.node_name, None)
        self._users.pop(node, None)
        node.close()
        for child in node.children:
            if node in child.parents:
                child.parents.remove(node)
            if cascade and not child.monitor_owned and not child.parents:
                self._remove(child, cascade=True)

    def close_all(self) -> None:
        """Close every node, parents before children (daemon shutdown)."""
        for node in self.nodes:
            node.close()
        self._nodes.clear()
        self._users.clear()
