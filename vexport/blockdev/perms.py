"""Permission bits users take on block nodes (QEMU's BLK_PERM_*); pure."""

from __future__ import annotations

PERM_CONSISTENT_READ = 0x01
PERM_WRITE = 0x02
PERM_WRITE_UNCHANGED = 0x04
PERM_RESIZE = 0x08
PERM_GRAPH_MOD = 0x10
PERM_ALL = 0x1F
# Indexed by bit number, as QEMU names them in its lock error messages.
PERM_NAMES = ("consistent read", "write", "write unchanged", "resize", "change children")
