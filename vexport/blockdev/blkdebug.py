"""The ``blkdebug`` filter driver: QEMU's fault injection in front of an ``image`` child.

Theory of operation
-------------------
A blkdebug node forwards every request to its ``image`` child unchanged (same offset,
same buffers), except the ones an ``inject-error`` rule makes fail.  Each rule names
an event; vexport fires three of QEMU's events, from blkdebug's own data path:

==================  ===================================
``read_aio``        ``preadv``    (I/O type ``read``)
``write_aio``       ``pwritev``   (I/O type ``write``)
``flush_to_disk``   ``flush``     (I/O type ``flush``)
==================  ===================================

(In QEMU these events are raised by the layer above, e.g. the ``raw`` format, on its
``file`` child, and an injected rule then stays armed until the next event; here the
request that fires an event is the one checked, which is what a test that exports a
blkdebug node wants.)  Every other event of QEMU's ``BlkdebugEvent`` enum is accepted
and never fires; discard and write-zeroes pass through.

A request is checked against the rules of its event, in the order they were given;
the first one that matches decides:

* ``state`` absent, or 1 (blkdebug starts in state 1 and vexport has no ``set-state``);
* ``iotype`` absent, or the request's I/O type;
* ``sector`` -1 (the default: any request), or ``sector * 512`` lies inside the
  request's byte range ``[offset, offset + bytes)``, so a flush (no bytes) only
  matches ``sector`` -1 rules and a negative sector other than -1 matches nothing.

The matching rule's ``errno`` (default EIO) completes the request with ``-errno``
without reaching the image; ``once`` deletes the rule when it fires.  As in QEMU an
``errno`` of 0 injects nothing (the request goes on to the image and a ``once``
rule stays).  Completions always come from the event loop; ``immediately`` only says
whether QEMU yields first, so it changes nothing here.  ``align`` is checked as QEMU
does and otherwise not used (vexport's exports only send sector-aligned requests).

query-named-block-nodes shows the node as the filter it is: ``blkdebug::<child>``
when only ``image`` (with a plain filename) is set, else a ``json:`` filename with
the ``inject-error`` list flattened to ``inject-error.N.key`` keys, and the child's
image information as ``backing-image`` (``backing_file_depth`` 1).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from vexport.blockdev.names import qdict_order
from vexport.blockdev.node import SECTOR_SIZE, BlockNode, Done
from vexport.errors import GenericError

# The events vexport's data path fires, and the I/O type of each.
EVENT_READ = "read_aio"
EVENT_WRITE = "write_aio"
EVENT_FLUSH = "flush_to_disk"
_EVENT_IOTYPE = {EVENT_READ: "read", EVENT_WRITE: "write", EVENT_FLUSH: "flush"}
_INITIAL_STATE = 1
_INT_MAX = 2**31 - 1
# Rule keys in the order QEMU flattens them into the json: filename (before qdict order).
_RULE_KEYS = ("event", "state", "iotype", "errno", "sector", "once", "immediately")


@dataclass
class InjectRule:
    """One ``inject-error`` entry with QEMU's defaults filled in."""

    event: str
    state: int | None = None
    iotype: str | None = None
    errno: int = errno.EIO
    sector: int = -1
    once: bool = False
    immediately: bool = False

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> InjectRule:
        return cls(
            event=options["event"],
            state=options.get("state"),
            iotype=options.get("iotype"),
            errno=int(options.get("errno", errno.EIO)),
            sector=int(options.get("sector", -1)),
            once=bool(options.get("once", False)),
            immediately=bool(options.get("immediately", False)),
        )

    def matches(self, state: int, iotype: str, offset: int, nbytes: int) -> bool:
        if self.state is not None and self.state != state:
            return False
        if self.iotype is not None and self.iotype != iotype:
            return False
        if self.sector == -1:
            return True
        if self.sector < 0:
            return False
        byte = self.sector * SECTOR_SIZE
        return nbytes > 0 and offset <= byte < offset + nbytes


class BlkdebugNode(BlockNode):
    driver = "blkdebug"
    child_roles = ("image",)

    def __init__(self, node_name: str, options: dict[str, Any], image: BlockNode) -> None:
        super().__init__(node_name, options)
        align = options.get("align")
        if align is not None:
            if align < 0:
                raise GenericError("Parameter 'align' expects a non-negative number below 2^64")
            if align and (align >= _INT_MAX or align & (align - 1)):
                raise GenericError(f"Cannot meet constraints with align {align}")
        self.image = image
        self.state = _INITIAL_STATE
        self.rules: dict[str, list[InjectRule]] = {}
        for rule_options in options.get("inject-error") or ():
            rule = InjectRule.from_options(rule_options)
            self.rules.setdefault(rule.event, []).append(rule)
        self.children = [image]
        self.refresh_length()

    @classmethod
    def create(
        cls, node_name: str, options: dict[str, Any], children: dict[str, BlockNode]
    ) -> BlockNode:
        return cls(node_name, options, children["image"])

    def _size(self) -> int:
        return self.image.length

    # -- fault injection ------------------------------------------------------------------
    def injected_error(self, event: str, offset: int, nbytes: int) -> int:
        """Fire ``event`` for a request: the (negative) result to fail it with, or 0."""
        rules = self.rules.get(event)
        if not rules:
            return 0
        iotype = _EVENT_IOTYPE[event]
        for i, rule in enumerate(rules):
            if rule.matches(self.state, iotype, offset, nbytes):
                if rule.errno == 0:
                    return 0
                if rule.once:
                    del rules[i]
                return -rule.errno
        return 0

    # -- data path ------------------------------------------------------------------------
    def _preadv(self, offset: int, iov: list[memoryview], nbytes: int, done: Done) -> None:
        err = self.injected_error(EVENT_READ, offset, nbytes)
        if err:
            self.complete_later(done, err)
        else:
            self.image.preadv(offset, iov, done)

    def _pwritev(self, offset: int, iov: list[memoryview], nbytes: int, done: Done) -> None:
        err = self.injected_error(EVENT_WRITE, offset, nbytes)
        if err:
            self.complete_later(done, err)
        else:
            self.image.pwritev(offset, iov, done)

    def _flush(self, done: Done) -> None:
        err = self.injected_error(EVENT_FLUSH, 0, 0)
        if err:
            self.complete_later(done, err)
        else:
            self.image.flush(done)

    def _discard(self, offset: int, length: int, done: Done) -> None:
        self.image.discard(offset, length, done)

    def _write_zeroes(self, offset: int, length: int, unmap: bool, done: Done) -> None:
        self.image.write_zeroes(offset, length, unmap, done)

    async def _truncate(self, length: int) -> None:
        # A filter without its own resize: QEMU resizes the filtered child.
        await self.image.truncate(length)

    # -- query ----------------------------------------------------------------------------
    def exact_filename(self) -> str:
        if any(key not in ("driver", "image") for key in self.full_options()):
            return ""
        child = self.image.exact_filename()
        return f"blkdebug::{child}" if child else ""

    def full_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"driver": self.driver, "image": self.image.full_options()}
        if "align" in self.options:
            opts["align"] = self.options["align"]
        for i, rule in enumerate(self.options.get("inject-error") or ()):
            for key in _RULE_KEYS:
                if key in rule:
                    opts[f"inject-error.{i}.{key}"] = rule[key]
        return opts

    def format_name(self) -> str:
        return self.driver

    def has_file_info(self) -> bool:
        return self.image.has_file_info()

    def query(self) -> dict[str, Any]:
        entry = super().query()
        image = dict(entry["image"])
        # A filter has no allocation of its own; the child's image is its "backing".
        image.pop("actual-size", None)
        image["backing-image"] = self.image.query()["image"]
        entry["image"] = image
        entry["backing_file_depth"] = 1
        return qdict_order(entry)
