"""BlockNode: the unit of the block graph, and the request checks every driver shares.

Theory of operation
-------------------
The data path is callback style: ``node.preadv(offset, iov, done)`` submits a request
and returns; ``done(ret)`` runs later in the event loop thread with ``ret == 0`` on
success or ``-errno``.  ``done`` is never called from inside the submit call (errors
found while checking a request are delivered with ``loop.call_soon``), so a caller
may submit while holding state that its completion handler changes.

The public methods do what QEMU's generic block layer does before reaching a driver,
then call the driver's ``_preadv``/``_pwritev``/... hooks:

* bounds: a request must lie inside ``[0, length)`` or it fails with ``-EIO`` (as
  QEMU's ``blk_check_byte_request``).  ``length`` is the driver's size rounded up to
  a multiple of 512, which is what QEMU reports and exports.
* read-only: writes, discards and write-zeroes on a read-only node fail with
  ``-EPERM`` (QEMU's ``bdrv_co_pdiscard``/write paths use ``-EPERM``).
* ``discard=ignore`` (the default of a node created with blockdev-add) turns
  discards into successful no-ops and clears the unmap flag of write-zeroes;
  ``cache.no-flush`` turns flushes into no-ops; ``detect-zeroes=on|unmap`` turns a
  write of an all-zero buffer into a write-zeroes request (with unmap for ``unmap``).

Permissions: users (exports, parent nodes) declare the permissions they take and
the ones they let others share (``PERM_*``, QEMU's BLK_PERM_* bits).  A node ORs the
users' ``perm`` and ANDs their ``shared`` masks, checks that a write permission is
not requested on a read-only node ("Block node is read-only"), passes the result on
to its children and lets the driver apply it (the file driver takes OFD locks).
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from typing import Any, ClassVar

from vexport.blockdev.names import json_filename, qdict_order
from vexport.blockdev.perms import (
    PERM_ALL,
    PERM_NAMES,
    PERM_RESIZE,
    PERM_WRITE,
    PERM_WRITE_UNCHANGED,
)
from vexport.errors import GenericError
from vexport.io import completions

Done = Callable[[int], None]
ResizeListener = Callable[[int], None]

SECTOR_SIZE = 512


_ZEROS = bytes(1 << 16)


def iov_bytes(iov: list[memoryview]) -> int:
    if len(iov) == 1:
        return iov[0].nbytes
    total = 0
    for m in iov:
        total += m.nbytes
    return total


def iov_is_zero(iov: list[memoryview]) -> bool:
    """True if every byte of ``iov`` is zero (memcmp against a zero block)."""
    for m in iov:
        n = m.nbytes
        pos = 0
        while pos < n:
            step = min(n - pos, len(_ZEROS))
            if m[pos : pos + step] != _ZEROS[:step]:
                return False
            pos += step
    return True


def round_up(value: int, align: int = SECTOR_SIZE) -> int:
    return -(-value // align) * align


class BlockNode:
    """Base class of the block drivers (see the module docstring)."""

    driver: ClassVar[str] = ""
    child_roles: ClassVar[tuple[str, ...]] = ()  # option keys naming children ("file")

    @classmethod
    def create(
        cls, node_name: str, options: dict[str, Any], children: dict[str, BlockNode]
    ) -> BlockNode:
        """Open a node of this driver; ``children`` maps child_roles to opened nodes."""
        return cls(node_name, options)

    def __init__(self, node_name: str, options: dict[str, Any]) -> None:
        self.node_name = node_name
        self.options = options
        self.read_only = bool(options.get("read-only", False))
        self.children: list[BlockNode] = []
        self.parents: list[BlockNode] = []
        self.resize_listeners: list[ResizeListener] = []
        cache = options.get("cache") or {}
        self.cache_direct = bool(cache.get("direct", False))
        self.no_flush = bool(cache.get("no-flush", False))
        self.discard_unmap = options.get("discard", "ignore") == "unmap"
        self.detect_zeroes: str = options.get("detect-zeroes", "off")
        self.force_share = bool(options.get("force-share", False))
        self.monitor_owned = False  # created by blockdev-add (not an inline child)
        self._length = 0
        self._notified_length = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._perm_users: dict[object, tuple[int, int]] = {}
        self.perm = 0
        self.shared = PERM_ALL
        self.closed = False

    @staticmethod
    def check_common_options(options: dict[str, Any]) -> None:
        """Option checks QEMU makes before opening any driver."""
        if options.get("force-share") and not options.get("read-only"):
            raise GenericError("force-share=on can only be used with read-only images")
        if options.get("detect-zeroes") == "unmap" and options.get("discard") != "unmap":
            raise GenericError(
                "setting detect-zeroes to unmap is not allowed without setting discard "
                "operation to unmap"
            )

    # -- size ---------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Size in bytes as QEMU shows and exports it (a multiple of 512)."""
        return self._length

    def refresh_length(self) -> None:
        self._length = round_up(self._size())
        if self._notified_length < 0:
            self._notified_length = self._length

    def _size(self) -> int:
        """The driver's exact size in bytes."""
        raise NotImplementedError

    # -- worker processes -----------------------------------------------------------------
    def after_fork(self) -> None:
        """In a forked queue worker: forget what belongs to the parent's event loop (the
        loop itself, I/O engines), so that requests run in the worker's own loop."""
        self._loop = None
        for child in self.children:
            child.after_fork()

    def refresh_tree_length(self) -> None:
        """In a queue worker, after the daemon resized the node: re-read the size of the
        node and of its children (children first: a parent's size derives from them)."""
        for child in self.children:
            child.refresh_tree_length()
        self.refresh_length()

    # -- completion helpers -------------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def complete_later(self, done: Done, ret: int) -> None:
        """Deliver ``ret`` to ``done`` from the loop, never synchronously (batched with
        the other completions of the iteration, see vexport/io/completions.py)."""
        completions.defer(self.loop, done, ret)

    def _check(self, offset: int, nbytes: int, write: bool) -> int:
        if write and self.read_only:
            return -errno.EPERM
        if offset < 0 or nbytes < 0 or offset + nbytes > self._length:
            return -errno.EIO
        return 0

    # -- data path (public) -------------------------------------------------------------
    def preadv(self, offset: int, iov: list[memoryview], done: Done) -> None:
        # _check inlined (the hot path): a read needs only the range check.
        nbytes = iov[0].nbytes if len(iov) == 1 else iov_bytes(iov)
        if offset < 0 or offset + nbytes > self._length:
            self.complete_later(done, -errno.EIO)
        else:
            self._preadv(offset, iov, nbytes, done)

    def pwritev(self, offset: int, iov: list[memoryview], done: Done) -> None:
        nbytes = iov[0].nbytes if len(iov) == 1 else iov_bytes(iov)
        err = self._check(offset, nbytes, True)
        if err:
            self.complete_later(done, err)
        elif self.detect_zeroes != "off" and iov_is_zero(iov):
            self.write_zeroes(offset, nbytes, self.detect_zeroes == "unmap", done)
        else:
            self._pwritev(offset, iov, nbytes, done)

    def flush(self, done: Done) -> None:
        if self.no_flush:
            self.complete_later(done, 0)
        else:
            self._flush(done)

    def discard(self, offset: int, length: int, done: Done) -> None:
        err = self._check(offset, length, True)
        if err:
            self.complete_later(done, err)
        elif not self.discard_unmap or length == 0:
            self.complete_later(done, 0)
        else:
            self._discard(offset, length, done)

    def write_zeroes(self, offset: int, length: int, unmap: bool, done: Done) -> None:
        err = self._check(offset, length, True)
        if err:
            self.complete_later(done, err)
        elif length == 0:
            self.complete_later(done, 0)
        else:
            self._write_zeroes(offset, length, unmap and self.discard_unmap, done)

    def direct_io(self, write: bool) -> tuple[Any, int] | None:
        """``(engine, fd)`` when this node's reads (``write``: writes) of a range the
        caller has checked may go straight to ``engine.transfer(op, fd, ...)`` (and
        ``plug``/``unplug`` to the engine's): what `preadv`/`pwritev` would do after
        the range check.  None when the node does more (the default)."""
        return None

    def plug(self) -> None:
        for child in self.children:
            child.plug()

    def unplug(self) -> None:
        for child in self.children:
            child.unplug()

    # -- driver hooks -------------------------------------------------------------------
    def _preadv(self, offset: int, iov: list[memoryview], nbytes: int, done: Done) -> None:
        raise NotImplementedError

    def _pwritev(self, offset: int, iov: list[memoryview], nbytes: int, done: Done) -> None:
        raise NotImplementedError

    def _flush(self, done: Done) -> None:
        self.complete_later(done, 0)

    def _discard(self, offset: int, length: int, done: Done) -> None:
        self.complete_later(done, 0)

    def _write_zeroes(self, offset: int, length: int, unmap: bool, done: Done) -> None:
        raise NotImplementedError

    async def _truncate(self, length: int) -> None:
        raise GenericError("Image format driver does not support resize")

    # -- coroutine conveniences ------------------------------------------------------------
    async def _wait(self, submit: Callable[[Done], None]) -> int:
        fut: asyncio.Future[int] = self.loop.create_future()

        def done(ret: int) -> None:
            if not fut.done():
                fut.set_result(ret)

        submit(done)
        ret = await fut
        if ret < 0:
            raise OSError(-ret, os.strerror(-ret))
        return ret

    async def co_preadv(self, offset: int, iov: list[memoryview]) -> int:
        return await self._wait(lambda d: self.preadv(offset, iov, d))

    async def co_pwritev(self, offset: int, iov: list[memoryview]) -> int:
        return await self._wait(lambda d: self.pwritev(offset, iov, d))

    async def co_flush(self) -> int:
        return await self._wait(self.flush)

    async def co_discard(self, offset: int, length: int) -> int:
        return await self._wait(lambda d: self.discard(offset, length, d))

    async def co_write_zeroes(self, offset: int, length: int, unmap: bool = False) -> int:
        return await self._wait(lambda d: self.write_zeroes(offset, length, unmap, d))

    async def co_pread(self, offset: int, nbytes: int) -> bytes:
        buf = bytearray(nbytes)
        await self.co_preadv(offset, [memoryview(buf)])
        return bytes(buf)

    async def co_pwrite(self, offset: int, data: bytes) -> None:
        await self.co_pwritev(offset, [memoryview(data)])

    # -- control path -------------------------------------------------------------------
    async def truncate(self, length: int) -> None:
        """block_resize: change the size, then tell the listeners and the parents."""
        if length < 0:
            raise GenericError("Image size cannot be negative")
        if self.read_only:
            raise GenericError("Image is read-only")
        # Like QEMU's block_resize, hold the resize permission while resizing: it
        # fails if a user (here or in another process) refuses to share it.
        token = object()
        self.set_user_perm(token, PERM_RESIZE, PERM_ALL)
        try:
            await self._truncate(length)
        finally:
            self.drop_user_perm(token)
        self.refresh_length()
        self.notify_resize()

    def notify_resize(self) -> None:
        if self._length == self._notified_length:
            return
        self._notified_length = self._length
        for listener in list(self.resize_listeners):
            listener(self._length)
        for parent in self.parents:
            parent.refresh_length()
            parent.notify_resize()

    def set_user_perm(self, user: object, perm: int, shared: int) -> None:
        """Take (or change) ``user``'s permissions; GenericError if they conflict."""
        old = self._perm_users.get(user)
        self._perm_users[user] = (perm, shared)
        try:
            self._update_perms()
        except GenericError:
            if old is None:
                del self._perm_users[user]
            else:
                self._perm_users[user] = old
            self._update_perms()
            raise

    def drop_user_perm(self, user: object) -> None:
        if self._perm_users.pop(user, None) is not None:
            self._update_perms()

    def _update_perms(self) -> None:
        perm, shared = 0, PERM_ALL
        for p, s in self._perm_users.values():
            perm |= p
            shared &= s
        if self.force_share:
            shared = PERM_ALL
        if perm & (PERM_WRITE | PERM_WRITE_UNCHANGED) and self.read_only:
            raise GenericError("Block node is read-only")
        if not self.force_share:
            for user, (p, _s) in self._perm_users.items():
                others = PERM_ALL
                for other, (_p, s) in self._perm_users.items():
                    if other is not user:
                        others &= s
                if p & ~others:
                    names = ", ".join(
                        f"'{n}'" for bit, n in enumerate(PERM_NAMES) if p & ~others & (1 << bit)
                    )
                    raise GenericError(
                        f"Permission conflict on node '{self.node_name}': permissions "
                        f"{names} are both required and unshared by its users"
                    )
        for child in self.children:
            child.set_user_perm(self, perm, shared)
        self._apply_perms(perm, shared)
        self.perm, self.shared = perm, shared

    def _apply_perms(self, perm: int, shared: int) -> None:
        """Driver hook: make ``perm``/``shared`` visible outside (file locks)."""

    def close(self) -> None:
        """Release the node's resources (the graph unlinks it first)."""
        if self.closed:
            return
        self.closed = True
        for child in self.children:
            child.drop_user_perm(self)
        self._close()

    def _close(self) -> None:
        pass

    # -- query-named-block-nodes -----------------------------------------------------------
    def filename(self) -> str:
        """QEMU's ``bs->filename``: a path, ``null-co://`` or ``json:{...}``."""
        return self.exact_filename() or json_filename(self.full_options())

    def exact_filename(self) -> str:
        """The plain filename if the node's options fit in one, else ''."""
        return ""

    def full_options(self) -> dict[str, Any]:
        """The options that identify the node's data (for ``json:`` filenames)."""
        return {"driver": self.driver}

    def format_name(self) -> str:
        return self.driver

    def actual_size(self) -> int:
        return 0

    def has_file_info(self) -> bool:
        """Whether QEMU's bdrv_get_info succeeds (it then shows ``dirty-flag``)."""
        return False

    def query(self) -> dict[str, Any]:
        name = self.filename()
        image: dict[str, Any] = {
            "virtual-size": self._length,
            "filename": name,
            "format": self.format_name(),
            "actual-size": self.actual_size(),
        }
        if self.has_file_info():
            image["dirty-flag"] = False
        entry = {
            "iops_rd": 0,
            "detect_zeroes": self.detect_zeroes,
            "image": image,
            "iops_wr": 0,
            "ro": self.read_only,
            "node-name": self.node_name,
            "backing_file_depth": 0,
            "drv": self.driver,
            "iops": 0,
            "bps_wr": 0,
            "write_threshold": 0,
            "encrypted": False,
            "bps": 0,
            "bps_rd": 0,
            "cache": {"no-flush": self.no_flush, "direct": self.cache_direct, "writeback": True},
            "file": name,
        }
        return qdict_order(entry)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.node_name!r}>"
