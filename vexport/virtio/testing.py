"""A fake virtio driver for tests and benchmarks: a split ring in plain bytearrays.

`FakeDriver` lays out a descriptor table, avail ring and used ring at chosen IOVAs of
a `RegionMemory`, allocates buffers from a data region, adds chains (direct or through
an indirect table), publishes them, and reads used entries back, the way a guest
driver would.  The raw helpers (`write_desc`, `put_avail`, `set_avail_idx`...) let a
test write the malformed rings a hostile driver could produce.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vexport.virtio.memory import PERM_RW, RegionMemory
from vexport.virtio.virtqueue import (
    DESC,
    U16,
    USED_ELEM,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    SplitQueue,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)


@dataclass
class SubmittedChain:
    """What the driver remembers about one chain it made available."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)  # (iova, length)
    writable: list[tuple[int, int]] = field(default_factory=list)
    descs: list[int] = field(default_factory=list)  # descriptor indices used


class FakeDriver:
    """Driver side of one split queue over a `RegionMemory` it creates (or is given).

    Layout: the rings in one region at ``ring_base``; buffers are carved from a data
    region ``[data_base, data_base + data_size)`` by a bump allocator.
    """

    def __init__(
        self,
        size: int = 8,
        *,
        memory: RegionMemory | None = None,
        ring_base: int = 0x1000,
        data_base: int = 0x100000,
        data_size: int = 1 << 20,
    ) -> None:
        self.size = size
        # add_chain's alignment of buffers of whole sectors (512: what O_DIRECT needs)
        self.buffer_align = 16
        self.memory = memory if memory is not None else RegionMemory()
        self.desc_addr = ring_base
        self.avail_addr = ring_base + desc_table_size(size)
        self.used_addr = (self.avail_addr + avail_ring_size(size) + 3) & ~3
        ring_bytes = self.used_addr + used_ring_size(size) - ring_base
        self.ring_region = bytearray(ring_bytes)
        self.memory.add_region(ring_base, self.ring_region, PERM_RW)
        self.data_base = data_base
        self.data_region = bytearray(data_size)
        self.memory.add_region(data_base, self.data_region, PERM_RW)
        self._next_buf = data_base
        self._free_descs = list(range(size))
        self.avail_idx = 0  # driver's shadow of avail->idx (published or not)
        self.last_used = 0
        self.chains: dict[int, SubmittedChain] = {}

    # -- the device side ---------------------------------------------------------------

    def queue(self, **kwargs: object) -> SplitQueue:
        """A `SplitQueue` over the same memory (kwargs: event_idx, indirect...)."""
        return SplitQueue(
            self.memory,
            self.size,
            self.desc_addr,
            self.avail_addr,
            self.used_addr,
            **kwargs,  # type: ignore[arg-type]
        )

    # -- memory --------------------------------------------------------------------------

    def alloc(self, length: int, align: int = 16) -> int:
        """An IOVA of ``length`` fresh bytes in the data region."""
        addr = (self._next_buf + align - 1) & ~(align - 1)
        if addr + length > self.data_base + len(self.data_region):
            raise MemoryError("FakeDriver data region exhausted")
        self._next_buf = addr + length
        return addr

    def reset_buffers(self) -> None:
        self._next_buf = self.data_base

    def read(self, iova: int, length: int) -> bytes:
        return self.memory.read(iova, length)

    def write(self, iova: int, data: bytes) -> None:
        self.memory.write(iova, data)

    # -- raw ring access (also for malformed rings) --------------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.write(self.desc_addr + 16 * index, DESC.pack(addr, length, flags, nxt))

    def put_avail(self, head: int, publish: bool = True) -> None:
        """Append ``head`` to the avail ring (any value, valid or not)."""
        slot = self.avail_idx % self.size
        self.write(self.avail_addr + 4 + 2 * slot, U16.pack(head & 0xFFFF))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self) -> None:
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.write(self.avail_addr + 2, U16.pack(value & 0xFFFF))

    def set_avail_flags(self, flags: int) -> None:
        self.write(self.avail_addr, U16.pack(flags))

    def set_no_interrupt(self, on: bool) -> None:
        self.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT if on else 0)

    def set_used_event(self, value: int) -> None:
        self.write(self.avail_addr + 4 + 2 * self.size, U16.pack(value & 0xFFFF))

    @property
    def avail_event(self) -> int:
        return U16.unpack(self.read(self.used_addr + 4 + 8 * self.size, 2))[0]

    @property
    def used_flags(self) -> int:
        return U16.unpack(self.read(self.used_addr, 2))[0]

    @property
    def used_idx(self) -> int:
        return U16.unpack(self.read(self.used_addr + 2, 2))[0]

    def write_indirect_table(self, entries: Sequence[tuple[int, int, int, int]]) -> int:
        """Write ``(addr, len, flags, next)`` entries to fresh memory; return its IOVA."""
        table = b"".join(DESC.pack(*e) for e in entries)
        addr = self.alloc(len(table))
        self.write(addr, table)
        return addr

    # -- well-formed chains -------------------------------------------------------------

    def add_raw_chain(
        self,
        buffers: Sequence[tuple[int, int, bool]],
        *,
        indirect: bool = False,
        publish: bool = True,
    ) -> SubmittedChain:
        """Chain ``(iova, length, device_writable)`` buffers; link them with NEXT."""
        entries = []
        chain = SubmittedChain(head=-1)
        for i, (addr, length, wr) in enumerate(buffers):
            flags = VRING_DESC_F_WRITE if wr else 0
            if i + 1 < len(buffers):
                flags |= VRING_DESC_F_NEXT
            entries.append((addr, length, flags))
            (chain.writable if wr else chain.readable).append((addr, length))
        if indirect:
            table = self.write_indirect_table(
                [
                    (a, n, f, i + 1 if f & VRING_DESC_F_NEXT else 0)
                    for i, (a, n, f) in enumerate(entries)
                ]
            )
            head = self._free_descs.pop(0)
            self.write_desc(head, table, 16 * len(entries), VRING_DESC_F_INDIRECT)
            chain.descs = [head]
        else:
            if len(entries) > len(self._free_descs):
                raise MemoryError("FakeDriver out of descriptors")
            idxs = [self._free_descs.pop(0) for _ in entries]
            for i, (addr, length, flags) in enumerate(entries):
                nxt = idxs[i + 1] if flags & VRING_DESC_F_NEXT else 0
                self.write_desc(idxs[i], addr, length, flags, nxt)
            head = idxs[0]
            chain.descs = idxs
        chain.head = head
        self.chains[head] = chain
        self.put_avail(head, publish)
        return chain

    def add_chain(
        self,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        *,
        indirect: bool = False,
        publish: bool = True,
    ) -> SubmittedChain:
        """Readable buffers holding ``readable`` data, then writable ones of the sizes."""
        buffers: list[tuple[int, int, bool]] = []
        align = self.buffer_align
        for data in readable:
            n = len(data)
            addr = self.alloc(n, align if n % 512 == 0 else 16)
            self.write(addr, data)
            buffers.append((addr, n, False))
        for n in writable:
            buffers.append((self.alloc(n, align if n % 512 == 0 else 16), n, True))
        return self.add_raw_chain(buffers, indirect=indirect, publish=publish)

    # -- completions --------------------------------------------------------------------

    def get_used(self) -> list[tuple[int, int]]:
        """New used elements ``(id, len)``; their descriptors return to the free list."""
        out = []
        used_idx = self.used_idx
        while self.last_used != used_idx:
            slot = self.last_used % self.size
            elem = USED_ELEM.unpack(self.read(self.used_addr + 4 + 8 * slot, 8))
            out.append(elem)
            chain = self.chains.pop(elem[0], None)
            if chain is not None:
                self._free_descs.extend(chain.descs)
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def writable_data(self, chain: SubmittedChain) -> bytes:
        """Everything the device could have written for ``chain``, concatenated."""
        return b"".join(self.read(a, n) for a, n in chain.writable)


__all__ = ["FakeDriver", "SubmittedChain"]
