"""The ``raw`` format driver: a window ``[offset, offset + size)`` onto its ``file`` child.

Without ``size`` the window reaches the end of the child and follows it when the
child is resized.  Requests are forwarded with ``offset`` added; the child applies
its own checks (read-only, bounds, discard policy) again, as QEMU's layers do.
"""

from __future__ import annotations

from typing import Any

from vexport.blockdev.node import SECTOR_SIZE, BlockNode, Done
from vexport.errors import GenericError


class RawNode(BlockNode):
    driver = "raw"
    child_roles = ("file",)

    def __init__(self, node_name: str, options: dict[str, Any], file: BlockNode) -> None:
        super().__init__(node_name, options)
        self.file = file
        self.offset = int(options.get("offset", 0))
        self.has_size = "size" in options
        self.size = int(options.get("size", 0))
        real = file.length
        if self.offset < 0:  # normally caught by the schema (uint64)
            raise GenericError("Parameter 'offset' expects a non-negative number below 2^64")
        if self.offset > real:
            raise GenericError(
                f"Offset ({self.offset}) cannot be greater than size of the containing "
                f"file ({real})"
            )
        if self.has_size and real - self.offset < self.size:
            # (sic: QEMU's text has two spaces before "actual")
            raise GenericError(
                f"The sum of offset ({self.offset}) and size ({self.size}) has to be "
                f"smaller or equal to the  actual size of the containing file ({real})"
            )
        if self.has_size and self.size % SECTOR_SIZE:
            raise GenericError(f"Specified size is not multiple of {SECTOR_SIZE}")
        self.children = [file]
        self.refresh_length()

    @classmethod
    def create(
        cls, node_name: str, options: dict[str, Any], children: dict[str, BlockNode]
    ) -> BlockNode:
        return cls(node_name, options, children["file"])

    def _size(self) -> int:
        if self.has_size:
            return self.size
        return max(self.file.length - self.offset, 0)

    # -- data path ------------------------------------------------------------------------
    def _preadv(self, offset: int, iov: list[memoryview], nbytes: int, done: Done) -> None:
        self.file.preadv(offset + self.offset, iov, done)

    def _pwritev(self, offset: int, iov: list[memoryview], nbytes: int, done: Done) -> None:
        self.file.pwritev(offset + self.offset, iov, done)

    def _flush(self, done: Done) -> None:
        self.file.flush(done)

    def _discard(self, offset: int, length: int, done: Done) -> None:
        self.file.discard(offset + self.offset, length, done)

    def _write_zeroes(self, offset: int, length: int, unmap: bool, done: Done) -> None:
        self.file.write_zeroes(offset + self.offset, length, unmap, done)

    async def _truncate(self, length: int) -> None:
        if self.has_size:
            raise GenericError("Cannot resize fixed-size raw disks")
        await self.file.truncate(length + self.offset)

    # -- query -------------------------------------------------------------------------
    def exact_filename(self) -> str:
        if "offset" in self.options or self.has_size:
            return ""
        return self.file.exact_filename()

    def full_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"driver": self.driver}
        for key in ("offset", "size"):
            if key in self.options:
                opts[key] = self.options[key]
        opts["file"] = self.file.full_options()
        return opts

    def actual_size(self) -> int:
        return self.file.actual_size()

    def has_file_info(self) -> bool:
        return self.file.has_file_info()
