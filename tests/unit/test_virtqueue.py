"""Split virtqueue: normal operation, notifications, and every malformed-ring case."""

from __future__ import annotations

import pytest

from vexport.virtio import errors as E
from vexport.virtio.memory import PERM_READ, PERM_RW, RegionMemory
from vexport.virtio.testing import FakeDriver
from vexport.virtio.virtqueue import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    SplitQueue,
    vring_need_event,
)

W = VRING_DESC_F_WRITE
N = VRING_DESC_F_NEXT
I = VRING_DESC_F_INDIRECT  # noqa: E741


def _data(chain_views: list[memoryview]) -> bytes:
    return b"".join(bytes(v) for v in chain_views)


# -- normal operation ------------------------------------------------------------------


def test_direct_chain_round_trip() -> None:
    d2 = FakeDriver(8)
    q2 = d2.queue()
    sub = d2.add_chain([b"H" * 16, b"payload"], [512, 1])
    chain = q2.pop()
    assert chain is not None and chain.head == sub.head
    assert _data(chain.readable) == b"H" * 16 + b"payload"
    assert chain.read_len == 23 and chain.write_len == 513
    assert [len(v) for v in chain.writable] == [512, 1]
    chain.writable[0][:5] = b"hello"
    chain.writable[1][0] = 7
    assert q2.pop() is None
    assert q2.inflight_heads() == [sub.head]
    q2.push(chain.head, 513)
    assert d2.get_used() == [(sub.head, 513)]
    assert d2.writable_data(sub)[:5] == b"hello" and d2.writable_data(sub)[-1] == 7
    assert q2.inflight_count == 0 and q2.used_idx == 1 and q2.last_avail_idx == 1


def test_indirect_chain() -> None:
    d = FakeDriver(8)
    q = d.queue(indirect=True)
    sub = d.add_chain([b"A" * 16], [4096, 1], indirect=True)
    chain = q.pop()
    assert chain is not None and chain.head == sub.head
    assert _data(chain.readable) == b"A" * 16
    assert [len(v) for v in chain.writable] == [4096, 1]
    chain.writable[0][0] = 0x55
    assert d.read(sub.writable[0][0], 1) == b"\x55"


def test_mixed_direct_then_indirect() -> None:
    """Direct descriptors followed by one indirect descriptor (virtio 1.2, 2.7.5.3.2)."""
    d = FakeDriver(8)
    q = d.queue(indirect=True)
    hdr = d.alloc(16)
    d.write(hdr, b"h" * 16)
    data, status = d.alloc(512), d.alloc(1)
    table = d.write_indirect_table([(data, 512, W | N, 1), (status, 1, W, 0)])
    d.write_desc(0, hdr, 16, N, 1)
    d.write_desc(1, table, 32, I)
    d.put_avail(0)
    chain = q.pop()
    assert chain is not None
    assert chain.read_len == 16 and chain.write_len == 513


def test_batch_pop_push_and_order() -> None:
    d = FakeDriver(16)
    q = d.queue()
    subs = [d.add_chain([bytes([i]) * 16], [1]) for i in range(5)]
    chains = q.pop_batch(3)
    assert [c.head for c in chains] == [s.head for s in subs[:3]]
    chains += q.pop_batch(10)
    assert len(chains) == 5 and q.pop_batch(10) == []
    q.push_batch([(c.head, 1) for c in reversed(chains)])
    assert [h for h, _ in d.get_used()] == [s.head for s in reversed(subs)]


def test_wraparound_of_16_bit_indices() -> None:
    d = FakeDriver(4)
    # Start both sides just below 2**16 as if the queue had run for a long time.
    d.avail_idx = 0xFFFE
    d.set_avail_idx(0xFFFE)
    d.last_used = 0xFFFE
    d.write(d.used_addr + 2, (0xFFFE).to_bytes(2, "little"))
    q = d.queue(last_avail_idx=0xFFFE)
    assert q.used_idx == 0xFFFE
    seen = []
    for round_ in range(3):
        subs = [d.add_chain([bytes([round_]) * 16], [1]) for _ in range(2)]
        chains = q.pop_batch(8)
        assert [c.head for c in chains] == [s.head for s in subs]
        for c in chains:
            q.push(c.head, 1)
        seen += d.get_used()
    assert len(seen) == 6
    assert q.last_avail_idx == (0xFFFE + 6) & 0xFFFF == 4
    assert q.used_idx == 4


def test_buffer_straddling_two_regions() -> None:
    mem = RegionMemory()
    d = FakeDriver(8, memory=mem, data_base=0x100000, data_size=0x1000)
    second = bytearray(0x1000)
    mem.add_region(0x101000, second)
    q = d.queue()
    hdr = d.alloc(16)
    d.write_desc(0, hdr, 16, N, 1)
    d.write_desc(1, 0x100F00, 0x200, W)  # 0x100 bytes in each region
    d.put_avail(0)
    chain = q.pop()
    assert chain is not None
    assert [len(v) for v in chain.writable] == [0x100, 0x100]
    chain.writable[1][0] = 0xAB
    assert second[0] == 0xAB


def test_indirect_table_straddling_regions() -> None:
    mem = RegionMemory()
    d = FakeDriver(8, memory=mem, data_base=0x100000, data_size=0x1000)
    mem.add_region(0x101000, bytearray(0x1000))
    q = d.queue(indirect=True)
    buf = d.alloc(64)
    table_addr = 0x101000 - 16
    from vexport.virtio.virtqueue import DESC

    d.write(table_addr, DESC.pack(buf, 16, N, 1) + DESC.pack(buf + 16, 1, W, 0))
    d.write_desc(0, table_addr, 32, I)
    d.put_avail(0)
    chain = q.pop()
    assert chain is not None and chain.read_len == 16 and chain.write_len == 1


def test_zero_length_descriptors_are_skipped() -> None:
    d = FakeDriver(8)
    q = d.queue()
    a = d.alloc(16)
    d.write_desc(0, a, 16, N, 1)
    d.write_desc(1, 0, 0, N, 2)
    d.write_desc(2, a, 1, W)
    d.put_avail(0)
    chain = q.pop()
    assert chain is not None and len(chain.readable) == 1 and chain.write_len == 1


def test_resubmit_after_reconnect() -> None:
    d = FakeDriver(8)
    sub = d.add_chain([b"x" * 16], [1])
    q = d.queue()
    chain = q.pop()
    assert chain is not None
    # A new process: avail index from VQ_GET_INFO, in-flight heads from its own log.
    q2 = d.queue(last_avail_idx=q.last_avail_idx)
    again = q2.resubmit(sub.head)
    assert again.read_len == 16 and q2.inflight_heads() == [sub.head]
    q2.push(sub.head, 1)
    assert d.get_used() == [(sub.head, 1)]
    with pytest.raises(ValueError):
        q2.push(sub.head, 1)


def test_push_of_unknown_head_is_a_programming_error() -> None:
    q = FakeDriver(8).queue()
    with pytest.raises(ValueError):
        q.push(3, 0)
    with pytest.raises(ValueError):
        q.push(99, 0)


# -- notifications --------------------------------------------------------------------


def test_need_event_rule() -> None:
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(5, 3, 0)
    assert vring_need_event(5, 6, 3)
    assert vring_need_event(0xFFFF, 1, 0xFFFE)  # wraps


def _complete_one(d: FakeDriver, q: SplitQueue) -> None:
    d.add_chain([b"h" * 16], [1])
    chain = q.pop()
    assert chain is not None
    q.push(chain.head, 1)


def test_no_interrupt_flag_without_event_idx() -> None:
    d = FakeDriver(8)
    q = d.queue()
    _complete_one(d, q)
    assert q.should_notify()
    assert not q.should_notify()  # nothing new since
    d.set_no_interrupt(True)
    _complete_one(d, q)
    assert not q.should_notify()
    d.set_no_interrupt(False)
    _complete_one(d, q)
    assert q.should_notify()


def test_notify_on_empty_overrides_no_interrupt() -> None:
    d = FakeDriver(8)
    q = d.queue(notify_on_empty=True)
    d.set_no_interrupt(True)
    _complete_one(d, q)
    assert q.should_notify()  # nothing in flight, ring empty
    d.add_chain([b"a" * 16], [1])
    d.add_chain([b"b" * 16], [1])
    c1 = q.pop()
    assert c1 is not None
    q.push(c1.head, 1)
    assert not q.should_notify()  # one still available: not empty


def test_event_idx_interrupts() -> None:
    d = FakeDriver(8)
    q = d.queue(event_idx=True)
    d.set_used_event(0)
    _complete_one(d, q)  # used idx 0 -> 1 crosses used_event 0
    assert q.should_notify()
    d.set_used_event(3)  # driver wants an interrupt once entry 3 is used
    _complete_one(d, q)  # 1 -> 2
    assert not q.should_notify()
    _complete_one(d, q)  # 2 -> 3
    assert not q.should_notify()
    _complete_one(d, q)  # 3 -> 4: steps over 3
    assert q.should_notify()


def test_event_idx_avail_event_rearmed_when_empty() -> None:
    d = FakeDriver(8)
    q = d.queue(event_idx=True)
    subs = [d.add_chain([b"h" * 16], [1]) for _ in range(3)]
    assert len(q.pop_batch(8)) == 3
    # The ring was found empty: the device asks for a kick at avail index 3.
    assert d.avail_event == 3
    assert subs
    q.suppress_kicks(True)
    assert d.avail_event == 2  # one behind: no addition steps over it
    d.add_chain([b"h" * 16], [1])
    assert not vring_need_event(d.avail_event, 4, 3)  # the driver's kick decision
    assert q.pop() is not None
    assert q.pop() is None
    assert d.avail_event == 2  # suppressed: left stale
    q.suppress_kicks(False)
    assert q.pop() is None
    assert d.avail_event == 4


def test_no_notify_flag_without_event_idx() -> None:
    d = FakeDriver(8)
    q = d.queue()
    q.suppress_kicks(True)
    assert d.used_flags & VRING_USED_F_NO_NOTIFY
    q.suppress_kicks(False)
    assert not d.used_flags & VRING_USED_F_NO_NOTIFY


# -- malformed rings: one test per error class ---------------------------------------


def test_avail_index_running_ahead() -> None:
    d = FakeDriver(8)
    q = d.queue()
    d.set_avail_idx(9)
    with pytest.raises(E.AvailIndexRunAhead) as info:
        q.pop()
    assert info.value.head is None and q.last_avail_idx == 0
    with pytest.raises(E.AvailIndexRunAhead):
        q.pop_batch(4)  # nothing consumed: stays broken


def test_head_out_of_range() -> None:
    d = FakeDriver(8)
    q = d.queue()
    d.put_avail(8)
    with pytest.raises(E.HeadOutOfRange) as info:
        q.pop()
    assert info.value.head is None and q.last_avail_idx == 1
    sub = d.add_chain([b"ok" * 8], [1])
    chain = q.pop()
    assert chain is not None and chain.head == sub.head  # the queue carries on


def test_head_already_in_flight() -> None:
    d = FakeDriver(8)
    q = d.queue()
    sub = d.add_chain([b"h" * 16], [1])
    assert q.pop() is not None
    d.put_avail(sub.head)  # offered again before being used
    with pytest.raises(E.HeadInFlight) as info:
        q.pop()
    assert info.value.head is None and q.inflight_heads() == [sub.head]


def test_next_index_out_of_range() -> None:
    d = FakeDriver(8)
    q = d.queue()
    a = d.alloc(16)
    d.write_desc(0, a, 16, N, 8)
    d.put_avail(0)
    with pytest.raises(E.DescriptorOutOfRange) as info:
        q.pop()
    assert info.value.head == 0
    q.push(0, 0)  # the device may return the broken chain with length 0
    assert d.get_used() == [(0, 0)]


def test_loop_in_chain() -> None:
    d = FakeDriver(8)
    q = d.queue()
    a = d.alloc(16)
    d.write_desc(0, a, 16, N, 1)
    d.write_desc(1, a, 16, N, 0)
    d.put_avail(0)
    with pytest.raises(E.ChainTooLong):
        q.pop()


def test_loop_in_indirect_table() -> None:
    d = FakeDriver(8)
    q = d.queue(indirect=True)
    a = d.alloc(16)
    table = d.write_indirect_table([(a, 16, N, 1), (a, 16, N, 0)])
    d.write_desc(0, table, 32, I)
    d.put_avail(0)
    with pytest.raises(E.ChainTooLong):
        q.pop()


def test_next_outside_indirect_table() -> None:
    d = FakeDriver(8)
    q = d.queue(indirect=True)
    a = d.alloc(16)
    table = d.write_indirect_table([(a, 16, N, 2), (a, 1, W, 0)])
    d.write_desc(0, table, 32, I)
    d.put_avail(0)
    with pytest.raises(E.DescriptorOutOfRange):
        q.pop()


def test_indirect_without_feature() -> None:
    d = FakeDriver(8)
    q = d.queue(indirect=False)
    d.add_chain([b"h" * 16], [1], indirect=True)
    with pytest.raises(E.IndirectNotNegotiated):
        q.pop()


def test_nested_indirect() -> None:
    d = FakeDriver(8)
    q = d.queue(indirect=True)
    a = d.alloc(16)
    inner = d.write_indirect_table([(a, 16, 0, 0)])
    outer = d.write_indirect_table([(inner, 16, I, 0)])
    d.write_desc(0, outer, 16, I)
    d.put_avail(0)
    with pytest.raises(E.NestedIndirect):
        q.pop()


@pytest.mark.parametrize("length", [0, 8, 24])
def test_bad_indirect_length(length: int) -> None:
    d = FakeDriver(8)
    q = d.queue(indirect=True)
    d.write_desc(0, d.alloc(32), length, I)
    d.put_avail(0)
    with pytest.raises(E.BadIndirectLength):
        q.pop()


def test_indirect_with_next() -> None:
    d = FakeDriver(8)
    q = d.queue(indirect=True)
    a = d.alloc(16)
    table = d.write_indirect_table([(a, 16, 0, 0)])
    d.write_desc(0, table, 16, I | N, 1)
    d.write_desc(1, a, 1, W)
    d.put_avail(0)
    with pytest.raises(E.IndirectWithNext):
        q.pop()


def test_readable_after_writable() -> None:
    d = FakeDriver(8)
    q = d.queue()
    a = d.alloc(32)
    d.write_desc(0, a, 1, W | N, 1)
    d.write_desc(1, a + 16, 16, 0)
    d.put_avail(0)
    with pytest.raises(E.ReadableAfterWritable):
        q.pop()


def test_address_overflow() -> None:
    d = FakeDriver(8)
    q = d.queue()
    d.write_desc(0, 2**64 - 8, 16, 0)
    d.put_avail(0)
    with pytest.raises(E.AddressOverflow):
        q.pop()


def test_descriptor_outside_memory() -> None:
    d = FakeDriver(8)
    q = d.queue()
    d.write_desc(0, 0x7000_0000, 16, 0)
    d.put_avail(0)
    with pytest.raises(E.DescriptorOutsideMemory) as info:
        q.pop()
    assert info.value.head == 0


def test_buffer_running_past_the_end_of_memory() -> None:
    d = FakeDriver(8, data_base=0x100000, data_size=0x1000)
    q = d.queue()
    d.write_desc(0, 0x100F00, 0x200, 0)  # last 0x100 bytes are unmapped
    d.put_avail(0)
    with pytest.raises(E.DescriptorOutsideMemory):
        q.pop()


def test_writable_descriptor_in_read_only_region() -> None:
    mem = RegionMemory()
    d = FakeDriver(8, memory=mem)
    mem.add_region(0x900000, bytearray(0x1000), PERM_READ)
    q = d.queue()
    d.write_desc(0, 0x900000, 16, W)
    d.put_avail(0)
    with pytest.raises(E.DescriptorOutsideMemory):
        q.pop()


class _HugeMemory:
    """Maps every IOVA, handing out a small dummy view (lets chains claim 4 GiB)."""

    def __init__(self, real: RegionMemory) -> None:
        self.real = real
        self.dummy = memoryview(bytearray(1))

    def view(self, iova: int, length: int, write: bool) -> memoryview | None:
        v = self.real.view(iova, length, write)
        return v if v is not None else self.dummy

    def translate(self, iova: int, length: int, write: bool) -> list[memoryview]:
        return [self.dummy]


def test_total_chain_length_overflow() -> None:
    d = FakeDriver(8)
    q = SplitQueue(_HugeMemory(d.memory), 8, d.desc_addr, d.avail_addr, d.used_addr)
    d.write_desc(0, 0x10_0000_0000, 0xFFFF_FFFF, N, 1)
    d.write_desc(1, 0x20_0000_0000, 1, W)
    d.put_avail(0)
    with pytest.raises(E.ChainLengthOverflow):
        q.pop()


def test_rings_must_be_mapped_and_size_valid() -> None:
    d = FakeDriver(8)
    with pytest.raises(E.RingOutsideMemory):
        SplitQueue(d.memory, 8, 0x5000_0000, d.avail_addr, d.used_addr)
    with pytest.raises(E.BadQueueSize):
        SplitQueue(d.memory, 6, d.desc_addr, d.avail_addr, d.used_addr)
    ro = RegionMemory()
    ro.add_region(0x1000, bytearray(0x4000), PERM_READ)
    with pytest.raises(E.RingOutsideMemory):
        SplitQueue(ro, 8, 0x1000, 0x1100, 0x1200)  # used ring must be writable


def test_pop_batch_defers_an_error_after_good_chains() -> None:
    d = FakeDriver(8)
    q = d.queue()
    good = d.add_chain([b"h" * 16], [1])
    d.put_avail(9)  # bad head
    good2 = d.add_chain([b"h" * 16], [1])
    chains = q.pop_batch(8)
    assert [c.head for c in chains] == [good.head]
    with pytest.raises(E.HeadOutOfRange):
        q.pop_batch(8)
    assert [c.head for c in q.pop_batch(8)] == [good2.head]


def test_all_errors_are_virtqueue_errors() -> None:
    classes = [getattr(E, n) for n in dir(E) if isinstance(getattr(E, n), type)]
    for cls in classes:
        if cls not in (E.GuestMemoryError, E.VirtqueueError) and issubclass(cls, Exception):
            assert issubclass(cls, E.VirtqueueError), cls
            assert "2.7" in (cls.__doc__ or ""), cls


def test_region_memory_rejects_overlaps_and_removes_ranges() -> None:
    mem = RegionMemory()
    mem.add_region(0x1000, bytearray(0x1000))
    with pytest.raises(ValueError):
        mem.add_region(0x1800, bytearray(0x1000))
    with pytest.raises(ValueError):
        mem.add_region(0x800, bytearray(0x1000))
    mem.add_region(0x2000, bytearray(0x1000), PERM_RW)
    assert len(mem.translate(0x1F00, 0x200, True)) == 2
    removed = mem.remove_range(0x2000, 0x2000)
    assert [r.start for r in removed] == [0x2000]
    assert mem.view(0x2000, 1, False) is None


def test_region_memory_fault_handler_maps_lazily() -> None:
    calls = []

    def fault(iova: int) -> bool:
        calls.append(iova)
        mem.add_region(iova & ~0xFFF, bytearray(0x1000))
        return True

    mem = RegionMemory(fault)
    v = mem.view(0x5010, 4, True)
    assert v is not None and len(v) == 4 and calls == [0x5010]
    assert mem.view(0x5020, 4, True) is not None and calls == [0x5010]


# -- property: random rings only ever raise VirtqueueError ------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=150, deadline=None)
@given(
    descs=st.lists(
        st.tuples(
            st.sampled_from([0x100000, 0x100800, 0x1000FF0, 0x7000_0000, 2**64 - 4]),
            st.integers(0, 0x900),
            st.integers(0, 7),
            st.integers(0, 10),
        ),
        min_size=8,
        max_size=8,
    ),
    heads=st.lists(st.integers(0, 9), min_size=1, max_size=6),
    avail_idx=st.integers(0, 0xFFFF),
)
def test_random_rings_raise_only_virtqueue_errors(
    descs: list[tuple[int, int, int, int]], heads: list[int], avail_idx: int
) -> None:
    d = FakeDriver(8, data_base=0x100000, data_size=0x1000)
    q = d.queue(indirect=True, event_idx=True)
    for i, (addr, length, flags, nxt) in enumerate(descs):
        d.write_desc(i, addr, length, flags, nxt)
    for h in heads:
        d.put_avail(h, publish=False)
    d.set_avail_idx(avail_idx if avail_idx % 3 else len(heads))
    for _ in range(len(heads) + 1):
        try:
            chain = q.pop()
        except E.VirtqueueError:
            continue
        if chain is None:
            break
        assert sum(len(v) for v in chain.readable) == chain.read_len
        assert sum(len(v) for v in chain.writable) == chain.write_len
        for v in chain.readable + chain.writable:
            assert isinstance(v, memoryview)


@pytest.mark.parametrize("indirect", [False, True])
def test_last_writable_byte_of_a_malformed_chain(indirect: bool) -> None:
    drv = FakeDriver(8)
    vq = drv.queue(indirect=True)
    status = drv.alloc(1)
    # The data buffer is unmapped: the chain fails, but its status byte is reachable.
    chain = drv.add_raw_chain(
        [(drv.alloc(16), 16, False), (0x7000_0000, 512, True), (status, 1, True)],
        indirect=indirect,
    )
    with pytest.raises(E.DescriptorOutsideMemory) as info:
        vq.pop()
    assert info.value.head == chain.head
    view = vq.last_writable_byte(chain.head)
    assert view is not None
    view[0] = 0xAB
    assert drv.read(status, 1) == b"\xab"


def test_last_writable_byte_none_when_unreachable() -> None:
    drv = FakeDriver(8)
    vq = drv.queue()
    only_readable = drv.add_raw_chain([(drv.alloc(16), 16, False)])
    unmapped_status = drv.add_raw_chain([(drv.alloc(16), 16, False), (0x7000_0000, 1, True)])
    assert vq.last_writable_byte(only_readable.head) is None
    assert vq.last_writable_byte(unmapped_status.head) is None
    # A loop does not hang it: descriptor 0 points at itself.
    drv.write_desc(0, drv.alloc(1), 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0)
    assert vq.last_writable_byte(0) is not None


def test_ring_indices_use_single_store_formats() -> None:
    """Regression guard: "<H" packs byte by byte in CPython, so a driver on another CPU
    could read a torn used->idx (seen in the guest as "id N is not a head!").  The
    native format copies the field with one memcpy (one aligned 2-byte store)."""
    from vexport.virtio import virtqueue

    for fmt in (virtqueue.U16.format, virtqueue.USED_ELEM.format, virtqueue.DESC.format):
        assert fmt[0] not in "<>!=", fmt


# -- pop_simple: the three-buffer indirect fast path ------------------------------------


def test_pop_simple_takes_the_common_shape_and_stops_at_anything_else() -> None:
    """Indirect chains of header/data/status are taken in place, in ring order; a
    direct chain stops it without being consumed (pop_batch takes that one); after
    it, the fast path goes on."""
    d = FakeDriver(8)
    q = d.queue(indirect=True, event_idx=True)
    read = d.add_chain([b"R" * 16], [4096, 1], indirect=True)
    write = d.add_chain([b"W" * 16, b"d" * 512], [1], indirect=True)
    direct = d.add_chain([b"D" * 16], [512, 1])
    last = d.add_chain([b"L" * 16], [1024, 1], indirect=True)
    got = q.pop_simple(8, 16, 1)
    assert [g[0] for g in got] == [read.head, write.head]
    _head, view, first, data, data_len, data_written, status = got[0]
    assert bytes(view[first : first + 16]) == b"R" * 16
    assert (data_len, data_written) == (4096, True)
    view[data] = 0x5A
    view[status] = 3
    assert d.read(read.writable[0][0], 1) == b"\x5a" and d.read(read.writable[1][0], 1) == b"\x03"
    _head, view, first, data, data_len, data_written, status = got[1]
    assert (bytes(view[data : data + data_len]), data_written) == (b"d" * 512, False)
    assert q.last_avail_idx == 2 and q.inflight_heads() == sorted([read.head, write.head])
    assert q.pop_simple(8, 16, 1) == []  # the direct chain is next
    chain = q.pop()
    assert chain is not None and chain.head == direct.head
    assert [g[0] for g in q.pop_simple(8, 16, 1)] == [last.head]
    assert q.pop_simple(8, 16, 1) == [] and q.pop() is None  # empty: pop re-arms
    assert d.avail_event == 4


def test_pop_simple_respects_its_limit_and_other_lengths() -> None:
    d = FakeDriver(8)
    q = d.queue(indirect=True)
    subs = [d.add_chain([b"h" * 16], [512, 1], indirect=True) for _ in range(3)]
    assert [g[0] for g in q.pop_simple(2, 16, 1)] == [s.head for s in subs[:2]]
    assert q.pop_simple(2, 32, 1) == []  # another first length: left for pop_batch
    assert [g[0] for g in q.pop_simple(2, 16, 1)] == [subs[2].head]


def test_pop_simple_says_whether_it_drained_the_ring() -> None:
    """simple_drained: every entry the driver had made available was taken (so that a
    polling device can skip the empty pop_batch); not after a limit or another shape."""
    d = FakeDriver(8)
    q = d.queue(indirect=True)
    assert q.pop_simple(8, 16, 1) == [] and q.simple_drained  # empty ring
    for _ in range(3):
        d.add_chain([b"h" * 16], [512, 1], indirect=True)
    assert len(q.pop_simple(2, 16, 1)) == 2 and not q.simple_drained  # one left
    assert len(q.pop_simple(2, 16, 1)) == 1 and q.simple_drained
    d.add_chain([b"h" * 16], [512, 1], indirect=True)
    d.add_chain([b"h" * 16, b"d" * 512], [1])  # direct: another shape
    assert len(q.pop_simple(8, 16, 1)) == 1 and not q.simple_drained
    assert q.pop_simple(8, 16, 1) == [] and not q.simple_drained  # the direct one is next


def test_pop_simple_forgets_its_region_when_the_memory_removes_regions() -> None:
    """pop_simple keeps the region of its last call; after remove_range (an IOTLB
    update) it looks the region up again, and views the new mapping."""
    d = FakeDriver(8)
    q = d.queue(indirect=True)
    first = d.add_chain([b"h" * 16], [512, 1], indirect=True)
    (chain,) = q.pop_simple(8, 16, 1)
    assert chain[0] == first.head and chain[1].obj is d.data_region
    # The data region is replaced by another buffer at the same IOVA, same content.
    moved = bytearray(d.data_region)
    [old] = d.memory.remove_range(d.data_base, d.data_base)
    old.view.release()
    d.memory.add_region(d.data_base, moved)
    d.data_region = moved
    second = d.add_chain([b"h" * 16], [512, 1], indirect=True)
    (chain,) = q.pop_simple(8, 16, 1)
    assert chain[0] == second.head and chain[1].obj is moved


def test_pop_simple_leaves_faults_to_pop_batch() -> None:
    """A head in flight, or a table outside memory: nothing consumed, pop raises."""
    d = FakeDriver(8)
    q = d.queue(indirect=True)
    d.write_desc(0, 0x7FFF0000, 48, I)
    d.put_avail(0)
    assert q.pop_simple(8, 16, 1) == [] and q.last_avail_idx == 0
    with pytest.raises(E.DescriptorOutsideMemory):
        q.pop()
    assert q.last_avail_idx == 1
