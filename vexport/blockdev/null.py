"""The ``null-co`` and ``null-aio`` drivers: no storage at all.

Writes, flushes, discards and write-zeroes succeed and store nothing.  Reads leave
the buffer untouched unless ``read-zeroes=on`` (QSD 7.2's default is off).  Requests
complete from the event loop, after ``latency-ns`` when given.  The two drivers
differ only in name (QEMU runs one in a coroutine, the other through its AIO
callbacks; here both go through the loop).
"""

from __future__ import annotations

from typing import Any

from vexport.blockdev.node import BlockNode, Done
from vexport.io import completions

DEFAULT_SIZE = 1 << 30


class NullNode(BlockNode):
    driver = "null-co"

    def __init__(self, node_name: str, options: dict[str, Any]) -> None:
        super().__init__(node_name, options)
        self.size = int(options.get("size", DEFAULT_SIZE))
        self.read_zeroes = bool(options.get("read-zeroes", False))
        self.latency = int(options.get("latency-ns", 0)) / 1e9
        self.refresh_length()

    def _size(self) -> int:
        return self.size

    def _complete(self, done: Done) -> None:
        if self.latency:
            self.loop.call_later(self.latency, done, 0)
        else:
            completions.defer(self._loop or self.loop, done, 0)

    def _preadv(self, offset: int, iov: list[memoryview], nbytes: int, done: Done) -> None:
        if self.read_zeroes:
            for m in iov:
                m[:] = bytes(m.nbytes)
        self._complete(done)

    def _pwritev(self, offset: int, iov: list[memoryview], nbytes: int, done: Done) -> None:
        self._complete(done)

    def _flush(self, done: Done) -> None:
        self._complete(done)

    def _discard(self, offset: int, length: int, done: Done) -> None:
        self._complete(done)

    def _write_zeroes(self, offset: int, length: int, unmap: bool, done: Done) -> None:
        self._complete(done)

    def exact_filename(self) -> str:
        return f"{self.driver}://" if len(self._strong_options()) == 1 else ""

    def _strong_options(self) -> dict[str, Any]:
        strong: dict[str, Any] = {"driver": self.driver}
        for key in ("size", "read-zeroes"):
            if key in self.options:
                strong[key] = self.options[key]
        return strong

    def full_options(self) -> dict[str, Any]:
        return self._strong_options()


class NullAioNode(NullNode):
    driver = "null-aio"
