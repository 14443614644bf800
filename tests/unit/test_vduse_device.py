"""The VDUSE device shell and the vduse-blk data path against a fake kernel.

The fake (`vexport.exports.testing`) has the methods of the real kernel wrappers, real
eventfds for the control fd and the kicks, and a memfd as guest memory, which a
`FakeDriver` fills with rings and virtio-blk requests and the device mmaps through
IOTLB_GET_FD.  Everything runs in the test's event loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vexport.blockdev.graph import BlockGraph
from vexport.blockdev.node import BlockNode
from vexport.errors import GenericError
from vexport.exports.testing import FakeKernel, FakeVduseDeviceFd, MemfdMemory
from vexport.exports.vduse_blk import VduseBlkExport
from vexport.exports.vduse_device import VduseDevice, VduseQueue
from vexport.io import close_engines
from vexport.kernel import vduse as kv
from vexport.virtio import blk
from vexport.virtio.blk import (
    OUTHDR,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from vexport.virtio.testing import FakeDriver, SubmittedChain
from vexport.virtio.virtqueue import vring_need_event

MiB = 1 << 20
QSIZE = 8
BLK_QSIZE = 32
DRIVER_OK = 0xF  # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
F_EVENT_IDX = 1 << 29
F_INDIRECT = 1 << 28
F_VERSION_1 = 1 << 32


async def until(cond: Callable[[], bool], timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


async def settle(rounds: int = 20) -> None:
    """Let the loop run callbacks (completions, notifications) a few times."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class Guest:
    """A fake kernel plus one FakeDriver per queue, all in one memfd."""

    def __init__(self, num_queues: int = 1, iotlb_chunk: int = MiB, qsize: int = QSIZE) -> None:
        self.mem = MemfdMemory(4 * MiB)
        self.kernel = FakeKernel(self.mem, iotlb_chunk=iotlb_chunk)
        self.drivers = [
            FakeDriver(
                qsize,
                memory=self.mem,
                ring_base=0x1000 + 0x1000 * i,
                data_base=MiB + MiB * i,
                data_size=MiB,
            )
            for i in range(num_queues)
        ]

    @property
    def fd(self) -> FakeVduseDeviceFd:
        return next(iter(self.kernel.fds.values()))

    def configure(self, features: int, ready: tuple[int, ...] | None = None) -> None:
        dev = self.fd.dev
        dev.negotiated = features
        for i, drv in enumerate(self.drivers):
            q = dev.queues[i]
            q.num, q.desc_addr, q.driver_addr, q.device_addr = (
                drv.size,
                drv.desc_addr,
                drv.avail_addr,
                drv.used_addr,
            )
            q.ready = ready is None or i in ready

    async def request(self, type_: int, payload: object) -> tuple[int, tuple[int, int] | None]:
        fd = self.fd
        rid = fd.send(type_, payload)
        await until(lambda: rid in fd.responses)
        return fd.responses[rid]

    async def start(self, features: int = F_VERSION_1 | F_EVENT_IDX | F_INDIRECT) -> None:
        self.configure(features)
        assert await self.request(kv.VDUSE_SET_STATUS, DRIVER_OK) == (kv.VDUSE_REQ_RESULT_OK, None)

    def close(self) -> None:
        self.mem.close()


# -- a device with a recording device type ------------------------------------------------


class Recorder:
    """DeviceType that records kicks and completes every chain at once."""

    def __init__(self) -> None:
        self.kicks: list[int] = []
        self.stopped = 0
        self.complete = True

    def on_kick(self, queue: VduseQueue) -> None:
        self.kicks.append(queue.index)
        vq = queue.vq
        assert vq is not None
        while True:
            chain = vq.pop()
            if chain is None:
                break
            if self.complete:
                queue.complete(queue.generation, chain.head, chain.write_len)

    def on_queues_stopped(self) -> None:
        self.stopped += 1

    def on_resubmit(self, queue: VduseQueue, chains: list[Any]) -> None:
        raise AssertionError("no reattach in these tests")


@pytest.fixture
async def guest() -> AsyncIterator[Guest]:
    g = Guest(num_queues=2)
    yield g
    g.close()


async def make_device(g: Guest, monkeypatch: pytest.MonkeyPatch, dt: Recorder) -> VduseDevice:
    g.kernel.install(monkeypatch)
    return VduseDevice.create(
        "vd0",
        device_id=blk.VIRTIO_ID_BLOCK,
        features=blk.features(2, True),
        config=blk.config_space(MiB, num_queues=2, queue_size=QSIZE),
        num_queues=2,
        queue_size=QSIZE,
        device_type=dt,
        open_control=g.kernel.control,
    )


async def test_create_sets_up_every_queue_and_close_destroys(
    guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = await make_device(guest, monkeypatch, Recorder())
    fd = guest.fd
    assert fd.vq_setups == [(0, QSIZE), (1, QSIZE)]
    assert guest.kernel.devices["vd0"].device_id == blk.VIRTIO_ID_BLOCK
    assert guest.kernel.controls[0].api_version == kv.VDUSE_API_VERSION
    assert dev.close() is True
    assert guest.kernel.destroyed == ["vd0"] and "vd0" not in guest.kernel.devices
    assert fd.closed and guest.kernel.controls[0].closed
    assert dev.close() is False  # idempotent


async def test_close_while_attached_leaves_the_device(
    guest: Guest, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    dev = await make_device(guest, monkeypatch, Recorder())
    guest.kernel.devices["vd0"].attached = True
    with caplog.at_level(logging.WARNING):
        assert dev.close() is False
    assert "vd0" in guest.kernel.devices and guest.kernel.destroyed == []
    assert "still attached" in caplog.text
    assert guest.kernel.controls[0].closed


async def test_every_control_message_is_answered(
    guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = await make_device(guest, monkeypatch, Recorder())
    fd = guest.fd
    ids = [
        fd.send(99, b""),  # unknown type
        fd.send(kv.VDUSE_GET_VQ_STATE, 7),  # no such queue: the handler raises
        fd.send(kv.VDUSE_GET_VQ_STATE, 1),
        fd.send(kv.VDUSE_UPDATE_IOTLB, (0, (1 << 64) - 1)),
        fd.send(kv.VDUSE_SET_STATUS, 0x3),
    ]
    await until(lambda: len(fd.responses) == len(ids))
    assert fd.response_order == ids
    assert fd.responses[ids[0]] == (kv.VDUSE_REQ_RESULT_FAILED, None)
    assert fd.responses[ids[1]] == (kv.VDUSE_REQ_RESULT_FAILED, None)
    assert fd.responses[ids[2]] == (kv.VDUSE_REQ_RESULT_OK, (1, 0))
    assert fd.responses[ids[3]] == (kv.VDUSE_REQ_RESULT_OK, None)
    assert fd.responses[ids[4]] == (kv.VDUSE_REQ_RESULT_OK, None)
    assert dev.status == 0x3
    dev.close()


async def test_driver_ok_starts_only_ready_queues(
    guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    dt = Recorder()
    dev = await make_device(guest, monkeypatch, dt)
    guest.configure(F_VERSION_1, ready=(1,))
    assert await guest.request(kv.VDUSE_SET_STATUS, DRIVER_OK) == (kv.VDUSE_REQ_RESULT_OK, None)
    assert dev.queues[0].vq is None and dev.queues[1].vq is not None
    assert guest.fd.dev.queues[0].kick_fd == -1 and guest.fd.dev.queues[1].kick_fd >= 0
    # The queue is polled once at start (requests may predate the kick fd).
    await until(lambda: dt.kicks == [1])
    drv = guest.drivers[1]
    drv.add_chain([b"hello"], [3])
    guest.fd.kick(1)
    await until(lambda: drv.used_idx == 1)
    assert drv.get_used() == [(0, 3)]
    state = await guest.request(kv.VDUSE_GET_VQ_STATE, 1)
    assert state == (kv.VDUSE_REQ_RESULT_OK, (1, 1))
    dev.close()


async def test_one_interrupt_per_batch_and_event_idx(
    guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    dt = Recorder()
    dev = await make_device(guest, monkeypatch, dt)
    await guest.start(F_VERSION_1 | F_EVENT_IDX)
    drv, fq = guest.drivers[0], guest.fd.dev.queues[0]
    for _ in range(5):
        drv.add_chain([], [1])
    drv.set_used_event(0)  # interrupt me as soon as anything is used
    guest.fd.kick(0)
    await until(lambda: drv.used_idx == 5)
    await settle()
    assert fq.irqs == 1
    drv.get_used()
    drv.set_used_event(100)  # not before used idx 101
    for _ in range(3):
        drv.add_chain([], [1])
    guest.fd.kick(0)
    await until(lambda: drv.used_idx == 8)
    await settle()
    assert fq.irqs == 1
    # The device re-armed kicks: avail_event is its last avail index.
    assert drv.avail_event == 8
    dev.close()


async def test_no_event_idx_honours_no_interrupt_flag(
    guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = await make_device(guest, monkeypatch, Recorder())
    await guest.start(F_VERSION_1)
    drv, fq = guest.drivers[0], guest.fd.dev.queues[0]
    drv.set_no_interrupt(True)
    drv.add_chain([], [1])
    guest.fd.kick(0)
    await until(lambda: drv.used_idx == 1)
    await settle()
    assert fq.irqs == 0
    drv.set_no_interrupt(False)
    drv.add_chain([], [1])
    drv.add_chain([], [1])
    guest.fd.kick(0)
    await until(lambda: drv.used_idx == 3)
    await settle()
    assert fq.irqs == 1
    dev.close()


async def test_reset_drops_queues_and_late_completions(
    guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    dt = Recorder()
    dt.complete = False  # hold requests, as a slow backend would
    dev = await make_device(guest, monkeypatch, dt)
    await guest.start()
    drv = guest.drivers[0]
    drv.add_chain([b"x"], [4])
    guest.fd.kick(0)
    await until(lambda: dev.queues[0].vq is not None and dev.queues[0].vq.inflight_count == 1)
    queue = dev.queues[0]
    generation = queue.generation
    assert await guest.request(kv.VDUSE_SET_STATUS, 0) == (kv.VDUSE_REQ_RESULT_OK, None)
    assert queue.vq is None and queue.kick_fd == -1 and dt.stopped == 1
    assert dev.memory.regions == []  # the mmap cache is dropped
    queue.complete(generation, 0, 4)  # the held request finishes after the reset
    await settle()
    assert drv.used_idx == 0 and guest.fd.dev.queues[0].irqs == 0
    state = await guest.request(kv.VDUSE_GET_VQ_STATE, 0)
    assert state == (kv.VDUSE_REQ_RESULT_OK, (0, 0))
    dev.close()


async def test_update_iotlb_drops_cached_regions(monkeypatch: pytest.MonkeyPatch) -> None:
    g = Guest(num_queues=2, iotlb_chunk=MiB)  # rings in [0, 1M), data in [1M, 2M)
    try:
        dev = await make_device(g, monkeypatch, Recorder())
        await g.start()
        drv, fd = g.drivers[0], g.fd
        drv.add_chain([b"a" * 16], [1])
        fd.kick(0)
        await until(lambda: drv.used_idx == 1)
        data_lookups = [s for s in fd.iotlb_lookups if MiB <= s < 2 * MiB]
        assert len(data_lookups) == 1
        drv.add_chain([b"b" * 16], [1])
        fd.kick(0)
        await until(lambda: drv.used_idx == 2)
        assert len([s for s in fd.iotlb_lookups if MiB <= s < 2 * MiB]) == 1  # cached
        assert await g.request(kv.VDUSE_UPDATE_IOTLB, (MiB, 2 * MiB - 1)) == (0, None)
        assert all(r.start != MiB for r in dev.memory.regions)
        drv.add_chain([b"c" * 16], [1])
        fd.kick(0)
        await until(lambda: drv.used_idx == 3)
        assert len([s for s in fd.iotlb_lookups if MiB <= s < 2 * MiB]) == 2  # mapped again
        dev.close()
    finally:
        g.close()


async def test_interrupt_einval_is_quiet(guest: Guest, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = await make_device(guest, monkeypatch, Recorder())
    await guest.start(F_VERSION_1)
    guest.fd.irq_errno = errno.EINVAL
    drv = guest.drivers[0]
    drv.add_chain([], [1])
    guest.fd.kick(0)
    await until(lambda: drv.used_idx == 1)
    await settle()
    assert dev.queues[0].running
    dev.close()


# -- the vduse-blk export ------------------------------------------------------------------


class BlkGuest(Guest):
    """A guest driving a virtio-blk device."""

    def request_chain(
        self,
        type_: int,
        sector: int = 0,
        *,
        out: bytes = b"",
        in_len: int = 0,
        queue: int = 0,
        indirect: bool = False,
    ) -> SubmittedChain:
        readable = [OUTHDR.pack(type_, 0, sector)] + ([out] if out else [])
        writable = ([in_len] if in_len else []) + [1]
        return self.drivers[queue].add_chain(readable, writable, indirect=indirect)

    def status(self, chain: SubmittedChain, queue: int = 0) -> int:
        addr, length = chain.writable[-1]
        return self.drivers[queue].read(addr + length - 1, 1)[0]

    def data(self, chain: SubmittedChain, queue: int = 0) -> bytes:
        addr, length = chain.writable[0]
        return self.drivers[queue].read(addr, length)


async def make_export(
    g: BlkGuest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    node_options: dict[str, Any],
    **options: Any,
) -> tuple[VduseBlkExport, BlockGraph]:
    monkeypatch.setenv("VEXPORT_STATE_DIR", str(tmp_path))
    g.kernel.install(monkeypatch)
    graph = BlockGraph()
    node = graph.add(node_options)
    daemon = SimpleNamespace(graph=graph)
    opts = {"id": "e0", "type": "vduse-blk", "node-name": node.node_name, "name": "vblk0"}
    opts.update({"writable": True, "num-queues": len(g.drivers), "queue-size": BLK_QSIZE})
    opts.update(options)
    export = VduseBlkExport(daemon, opts, node)  # type: ignore[arg-type]
    await export.start()
    return export, graph


@pytest.fixture
async def bguest() -> AsyncIterator[BlkGuest]:
    g = BlkGuest(num_queues=1, qsize=BLK_QSIZE)
    yield g
    g.close()


async def serve(g: BlkGuest, n: int, queue: int = 0) -> list[tuple[int, int]]:
    drv = g.drivers[queue]
    target = (drv.last_used + n) & 0xFFFF
    g.fd.kick(queue)
    await until(lambda: drv.used_idx == target)
    return drv.get_used()


async def test_blk_reads_writes_flush_get_id_on_a_file(
    bguest: BlkGuest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"\x11" * MiB)
    export, graph = await make_export(
        bguest,
        monkeypatch,
        tmp_path,
        {"driver": "file", "node-name": "f0", "filename": str(img)},
        serial="vexport-serial",
    )
    await bguest.start()
    w = bguest.request_chain(VIRTIO_BLK_T_OUT, 8, out=b"w" * 1024)
    r = bguest.request_chain(VIRTIO_BLK_T_IN, 0, in_len=1024, indirect=True)
    f = bguest.request_chain(VIRTIO_BLK_T_FLUSH)
    i = bguest.request_chain(VIRTIO_BLK_T_GET_ID, in_len=20)
    used = dict(await serve(bguest, 4))
    assert used == {w.head: 1, r.head: 1025, f.head: 1, i.head: 21}
    for chain in (w, r, f, i):
        assert bguest.status(chain) == VIRTIO_BLK_S_OK
    assert img.read_bytes()[4096 : 4096 + 1024] == b"w" * 1024
    assert bguest.data(r) == b"\x11" * 1024
    assert bguest.data(i) == b"vexport-serial".ljust(20, b"\0")
    assert bguest.fd.dev.queues[0].irqs >= 1
    # Past the end, unknown type: decided at parse time, the queue goes on.
    bad = bguest.request_chain(VIRTIO_BLK_T_IN, MiB // 512, in_len=512)
    unk = bguest.request_chain(77)
    assert dict(await serve(bguest, 2)) == {bad.head: 1, unk.head: 1}
    assert bguest.status(bad) == VIRTIO_BLK_S_IOERR
    assert bguest.status(unk) == VIRTIO_BLK_S_UNSUPP
    await export.stop("safe")
    assert bguest.kernel.destroyed == ["vblk0"]
    graph.close_all()


async def test_blk_blkdebug_errors_fail_only_the_chosen_requests(
    bguest: BlkGuest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    node = {
        "driver": "blkdebug",
        "node-name": "d0",
        "image": {"driver": "null-co", "size": MiB, "read-zeroes": True},
        "inject-error": [
            {"event": "read_aio", "errno": 5, "sector": 8, "once": True},
            {"event": "write_aio", "errno": 28, "sector": 16},
        ],
    }
    export, graph = await make_export(bguest, monkeypatch, tmp_path, node)
    await bguest.start()
    chains = [
        bguest.request_chain(VIRTIO_BLK_T_IN, 0, in_len=4096),  # [0, 8) sectors: ok
        bguest.request_chain(VIRTIO_BLK_T_IN, 8, in_len=512),  # EIO, once
        bguest.request_chain(VIRTIO_BLK_T_OUT, 16, out=b"z" * 512),  # ENOSPC
        bguest.request_chain(VIRTIO_BLK_T_OUT, 15, out=b"z" * 512),  # ok
        bguest.request_chain(VIRTIO_BLK_T_IN, 8, in_len=512),  # the rule is gone: ok
    ]
    used = dict(await serve(bguest, len(chains)))
    assert [bguest.status(c) for c in chains] == [
        VIRTIO_BLK_S_OK,
        VIRTIO_BLK_S_IOERR,
        VIRTIO_BLK_S_IOERR,
        VIRTIO_BLK_S_OK,
        VIRTIO_BLK_S_OK,
    ]
    assert [used[c.head] for c in chains] == [4097, 513, 1, 1, 513]
    await settle()
    assert bguest.fd.dev.queues[0].irqs == 1  # one batch, one interrupt
    await export.stop("safe")
    graph.close_all()


async def test_blk_malformed_chains_complete_with_ioerr_and_serving_goes_on(
    bguest: BlkGuest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    export, graph = await make_export(
        bguest, monkeypatch, tmp_path, {"driver": "null-co", "node-name": "n0", "size": MiB}
    )
    await bguest.start()
    drv = bguest.drivers[0]
    no_header = drv.add_chain([b"short"], [1])  # BlkRequestError
    outside = drv.add_raw_chain([(0x7FFF_0000, 16, False), (MiB, 1, True)])  # not mapped
    no_status = drv.add_chain([bytes(16)], [])  # nowhere to put a status byte
    ok = bguest.request_chain(VIRTIO_BLK_T_FLUSH)
    for chain in (no_header, outside):  # a driver may leave a stale OK there
        drv.write(chain.writable[-1][0], b"\0")
    used = dict(await serve(bguest, 4))
    # Where the chain has a writable last byte, it says IOERR (used length 1).
    assert used == {no_header.head: 1, outside.head: 1, no_status.head: 0, ok.head: 1}
    assert drv.read(no_header.writable[-1][0], 1) == bytes([VIRTIO_BLK_S_IOERR])
    assert drv.read(MiB, 1) == bytes([VIRTIO_BLK_S_IOERR])
    assert bguest.status(ok) == VIRTIO_BLK_S_OK
    # A head out of range is skipped (nothing to complete); the next one is served.
    drv.put_avail(BLK_QSIZE + 3)
    ok2 = bguest.request_chain(VIRTIO_BLK_T_FLUSH)
    assert dict(await serve(bguest, 1)) == {ok2.head: 1}
    assert bguest.status(ok2) == VIRTIO_BLK_S_OK
    await export.stop("safe")
    graph.close_all()


async def test_blk_avail_index_run_ahead_stops_the_queue(
    bguest: BlkGuest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    export, graph = await make_export(
        bguest, monkeypatch, tmp_path, {"driver": "null-co", "node-name": "n0", "size": MiB}
    )
    await bguest.start()
    drv = bguest.drivers[0]
    drv.set_avail_idx(BLK_QSIZE + 5)
    bguest.fd.kick(0)
    assert export.device is not None
    await until(lambda: export.device is not None and export.device.queues[0].broken)
    assert drv.used_idx == 0
    # Control messages are still answered.
    assert (await bguest.request(kv.VDUSE_GET_VQ_STATE, 0))[0] == kv.VDUSE_REQ_RESULT_OK
    await export.stop("safe")
    graph.close_all()


async def test_blk_reset_with_requests_in_flight(
    bguest: BlkGuest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    node = {"driver": "null-co", "node-name": "n0", "size": MiB, "latency-ns": 30_000_000}
    export, graph = await make_export(bguest, monkeypatch, tmp_path, node)
    await bguest.start()
    drv = bguest.drivers[0]
    bguest.request_chain(VIRTIO_BLK_T_IN, 0, in_len=512)
    bguest.fd.kick(0)
    await until(lambda: export._inflight == 1)
    assert await bguest.request(kv.VDUSE_SET_STATUS, 0) == (kv.VDUSE_REQ_RESULT_OK, None)
    await until(lambda: export._inflight == 0)  # the backend finished...
    await settle()
    assert drv.used_idx == 0  # ...into nothing: the driver reset the ring
    assert bguest.fd.dev.queues[0].irqs == 0
    # The driver starts again from scratch and is served.
    bguest.drivers = [FakeDriver(BLK_QSIZE, memory=bguest.mem, ring_base=0x3000, data_base=2 * MiB)]
    await bguest.start()
    c = bguest.request_chain(VIRTIO_BLK_T_FLUSH)
    assert dict(await serve(bguest, 1)) == {c.head: 1}
    await export.stop("safe")
    graph.close_all()


async def test_blk_simple_requests_follow_the_file_node_to_its_next_engine(
    bguest: BlkGuest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Reads and writes of the common shape go straight to the file node's engine,
    which the kick context keeps; once that engine is closed, the next kick takes the
    node's new one instead of failing the request."""
    img = tmp_path / "disk.img"
    img.write_bytes(b"\x22" * MiB)
    node = {"driver": "file", "node-name": "f0", "filename": str(img)}
    export, graph = await make_export(bguest, monkeypatch, tmp_path, node)
    await bguest.start()
    r1 = bguest.request_chain(VIRTIO_BLK_T_IN, 0, in_len=4096, indirect=True)
    assert dict(await serve(bguest, 1)) == {r1.head: 4097}
    old = export.node.engine
    close_engines()
    assert old.closed
    r2 = bguest.request_chain(VIRTIO_BLK_T_IN, 8, in_len=4096, indirect=True)
    w = bguest.request_chain(VIRTIO_BLK_T_OUT, 16, out=b"n" * 4096, indirect=True)
    assert dict(await serve(bguest, 2)) == {r2.head: 4097, w.head: 1}
    assert bguest.status(r2) == bguest.status(w) == VIRTIO_BLK_S_OK
    assert bguest.data(r2) == b"\x22" * 4096
    assert img.read_bytes()[8192 : 8192 + 4096] == b"n" * 4096
    assert export.node.engine is not old
    await export.stop("safe")
    graph.close_all()


async def test_blk_detect_zeroes_still_sees_writes_of_the_common_shape(
    bguest: BlkGuest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A node with detect-zeroes keeps its write path (no shortcut to the engine): a
    zero write of the common shape punches a hole with detect-zeroes=unmap."""
    img = tmp_path / "disk.img"
    img.write_bytes(b"\x01" * MiB)
    node = {
        "driver": "file",
        "node-name": "f0",
        "filename": str(img),
        "discard": "unmap",
        "detect-zeroes": "unmap",
    }
    export, graph = await make_export(bguest, monkeypatch, tmp_path, node)
    await bguest.start()
    before = os.stat(img).st_blocks
    w = bguest.request_chain(VIRTIO_BLK_T_OUT, 0, out=bytes(65536), indirect=True)
    assert dict(await serve(bguest, 1)) == {w.head: 1}
    assert bguest.status(w) == VIRTIO_BLK_S_OK
    assert os.stat(img).st_blocks < before
    assert img.read_bytes()[:65536] == bytes(65536)
    await export.stop("safe")
    graph.close_all()


async def test_blk_resize_updates_config_space(
    bguest: BlkGuest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(MiB))
    export, graph = await make_export(
        bguest,
        monkeypatch,
        tmp_path,
        {"driver": "file", "node-name": "f0", "filename": str(img)},
    )
    dev = bguest.fd.dev
    assert struct.unpack_from("<Q", dev.config, 0)[0] == MiB // 512
    await bguest.start()
    node = graph.get("f0")
    assert isinstance(node, BlockNode)
    await node.truncate(3 * MiB)
    assert dev.config_writes == [(0, struct.pack("<Q", 3 * MiB // 512))]
    assert struct.unpack_from("<Q", dev.config, 0)[0] == 3 * MiB // 512
    assert dev.config_irqs == 1
    # The new sectors are usable at once.
    c = bguest.request_chain(VIRTIO_BLK_T_IN, 2 * MiB // 512, in_len=512)
    await serve(bguest, 1)
    assert bguest.status(c) == VIRTIO_BLK_S_OK
    await export.stop("safe")
    graph.close_all()


async def test_blk_existing_device_name_is_refused(
    bguest: BlkGuest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VEXPORT_STATE_DIR", str(tmp_path))
    bguest.kernel.install(monkeypatch)
    ctl = bguest.kernel.control()
    ctl.set_api_version()
    ctl.create_dev("vblk0", device_id=2, features=0, vq_num=1)
    bguest.kernel.devices["vblk0"].opened = True  # another daemon serves it
    with pytest.raises(GenericError, match="vblk0"):
        await make_export(
            bguest, monkeypatch, tmp_path, {"driver": "null-co", "node-name": "n0", "size": MiB}
        )


async def test_writes_on_read_only_export_fail(
    bguest: BlkGuest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    export, graph = await make_export(
        bguest,
        monkeypatch,
        tmp_path,
        {"driver": "null-co", "node-name": "n0", "size": MiB},
        writable=False,
    )
    assert bguest.fd.dev.features & (1 << blk.VIRTIO_BLK_F_RO)
    await bguest.start()
    c = bguest.request_chain(VIRTIO_BLK_T_OUT, 0, out=b"q" * 512)
    await serve(bguest, 1)
    assert bguest.status(c) == VIRTIO_BLK_S_IOERR
    await export.stop("safe")
    graph.close_all()


async def test_blk_export_holds_its_node_until_stopped(
    bguest: BlkGuest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(MiB))
    export, graph = await make_export(
        bguest, monkeypatch, tmp_path, {"driver": "file", "node-name": "f0", "filename": str(img)}
    )
    with pytest.raises(GenericError, match=r"^Node f0 is in use$"):
        graph.delete("f0")
    assert graph.users(export.node) == [export]
    # The export took write permission: a second writer of the node is refused.
    from vexport.blockdev.perms import PERM_CONSISTENT_READ, PERM_WRITE

    with pytest.raises(GenericError):
        graph.add_user(export.node, object(), PERM_CONSISTENT_READ | PERM_WRITE, 0)
    await export.stop("safe")
    assert graph.users(export.node) == []
    graph.delete("f0")


async def test_polling_serves_a_request_added_after_the_batch_without_a_kick(
    guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After serving a kick the device keeps looking at the avail rings, kicks
    suppressed (avail_event one behind, so the driver's vring_need_event is false): a
    request the driver adds meanwhile is served with no kick; when the poll ends,
    kicks are re-armed (avail_event = last avail index)."""
    import threading

    dt = Recorder()
    dev = await make_device(guest, monkeypatch, dt)
    await guest.start(F_VERSION_1 | F_EVENT_IDX)
    drv = guest.drivers[0]
    drv.add_chain([], [1])
    seen: list[int] = []

    def driver() -> None:
        deadline = time.monotonic() + 10
        while (drv.used_idx < 1 or drv.avail_event != 0) and time.monotonic() < deadline:
            pass  # until the device completed the first request and polls
        seen.append(drv.avail_event)
        drv.add_chain([], [1])  # and no kick

    thread = threading.Thread(target=driver)
    thread.start()
    dev.poll_spins = 200_000
    guest.fd.kick(0)
    await until(lambda: drv.used_idx == 2)
    thread.join()
    assert dt.kicks.count(0) >= 2  # the kick's batch and the polled one(s)
    assert seen == [0]  # one behind avail index 1: adding entry 1 needs no kick
    assert not vring_need_event(seen[0], 2, 1)
    assert drv.avail_event == 2  # re-armed once the poll ended
    dev.poll_spins = 0
    dev.close()


async def test_poll_steers_the_polled_queues_interrupts(
    guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll begins by steering the interrupt masks of the queues it polls off the
    CPU it runs on (irq_steering.py); a device that does not poll never touches them."""
    from vexport.exports.irq_steering import IrqSteering

    dt = Recorder()
    dev = await make_device(guest, monkeypatch, dt)
    masks = {0: frozenset({0, 1})}
    writes: list[tuple[int, frozenset[int]]] = []

    def write(index: int, cpus: frozenset[int]) -> None:
        writes.append((index, cpus))

    dev.irq_steering = IrqSteering(masks.__getitem__, write, lambda: 1)
    await guest.start(F_VERSION_1 | F_EVENT_IDX)
    drv = guest.drivers[0]
    dev.poll_spins = 0
    drv.add_chain([], [1])
    guest.fd.kick(0)
    await until(lambda: drv.used_idx == 1)
    assert writes == []  # no poll
    dev.poll_spins = 50
    drv.add_chain([], [1])
    guest.fd.kick(0)
    await until(lambda: drv.used_idx == 2)
    assert writes == [(0, frozenset({0}))]
    dev.poll_spins = 0
    dev.close()  # stops serving: the driver's mask is written back
    assert writes == [(0, frozenset({0})), (0, frozenset({0, 1}))]


def test_poll_max_batch_polls_every_kick_only_with_a_cpu_to_spare() -> None:
    from vexport.exports.vduse_device import POLL_ANY_BATCH, POLL_MAX_BATCH, poll_max_batch

    assert poll_max_batch(pollers=1, cpus=2) == POLL_ANY_BATCH
    assert poll_max_batch(pollers=2, cpus=2) == POLL_MAX_BATCH
    assert poll_max_batch(pollers=4, cpus=2) == POLL_MAX_BATCH
    assert POLL_MAX_BATCH < QSIZE < POLL_ANY_BATCH


async def test_poll_after_a_large_batch_only_within_the_limit(
    guest: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kick that brought more requests than ``poll_max_batch`` is served without a
    poll; within the limit the device polls (seen through its steering call)."""
    from vexport.exports.irq_steering import IrqSteering
    from vexport.exports.vduse_device import POLL_ANY_BATCH, POLL_MAX_BATCH

    monkeypatch.setenv("VEXPORT_POLL_MAX_BATCH", "3")
    dt = Recorder()
    dev = await make_device(guest, monkeypatch, dt)
    assert dev.poll_max_batch == 3  # the environment overrides the rule
    writes: list[tuple[int, frozenset[int]]] = []
    dev.irq_steering = IrqSteering(
        {0: frozenset({0, 1}), 1: frozenset({0, 1})}.__getitem__,
        lambda index, cpus: writes.append((index, cpus)),
        lambda: 1,
    )
    await guest.start(F_VERSION_1 | F_EVENT_IDX)
    drv = guest.drivers[0]
    dev.poll_spins = 50
    dev.poll_max_batch = POLL_MAX_BATCH
    for _ in range(POLL_MAX_BATCH + 1):
        drv.add_chain([], [1])
    guest.fd.kick(0)
    await until(lambda: drv.used_idx == POLL_MAX_BATCH + 1)
    await settle()
    assert writes == []  # a deep batch: no poll
    drv.get_used()  # the descriptors back to the driver
    dev.poll_max_batch = POLL_ANY_BATCH
    for _ in range(POLL_MAX_BATCH + 1):
        drv.add_chain([], [1])
    guest.fd.kick(0)
    await until(lambda: drv.used_idx == 2 * (POLL_MAX_BATCH + 1))
    assert writes and writes[0][1] == frozenset({0})  # polled: steered off CPU 1
    dev.poll_spins = 0
    dev.close()
