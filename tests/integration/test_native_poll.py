"""The compiled poll (vexport/native/poll.c, vexport/exports/native_poll.py) against the
Python path it replaces: the same driver script, run through the real export over the
fake VDUSE kernel with the native loop on and off, must give the same used entries,
status bytes, interrupts and in-flight log.  The driver posts each request when the
previous one's interrupt arrives, so every request after the first is found by the
device's poll, as at queue depth 1 in the guest."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import random
import tempfile
from collections.abc import AsyncIterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from vexport import native
from vexport.blockdev.graph import BlockGraph
from vexport.exports.testing import FakeKernel, MemfdMemory, start_driver
from vexport.exports.vduse_blk import VduseBlkExport
from vexport.virtio import blk
from vexport.virtio.testing import FakeDriver, SubmittedChain
from vexport.virtio.virtqueue import VRING_DESC_F_INDIRECT

pytestmark = pytest.mark.skipif(
    not native.available(), reason="vexport.native._poll is not built (scripts/setup builds it)"
)

MiB = 1 << 20
CAPACITY = 64 * MiB
SECTORS = CAPACITY // 512
QUEUE_SIZE = 16

Spec = tuple[Any, ...]


class ScriptDriver:
    """Posts the script's requests one at a time: the next when an interrupt arrives."""

    def __init__(self, drv: FakeDriver, script: Sequence[Spec]) -> None:
        self.drv = drv
        self.script = list(script)
        self.pending: dict[int, SubmittedChain | None] = {}
        self.results: list[tuple[int, int, int | None]] = []  # head, used len, status
        self.read_data: list[str] = []  # a digest of each successful read's data
        self.image = ""
        self.interrupts = 0

    def post_next(self) -> None:
        if not self.script:
            return
        spec = self.script.pop(0)
        drv = self.drv
        kind = spec[0]
        if kind == "shrink":  # the file shrinks behind the node's back
            os.truncate(self.image, spec[1])
            self.post_next()
            return
        if kind == "burst":  # several reads made available at once
            for i in range(spec[1]):
                self.post_one(("read", 8 * i, 4096), publish=False)
            drv.publish()
            return
        self.post_one(spec)

    def post_one(self, spec: Spec, publish: bool = True) -> None:
        drv = self.drv
        kind = spec[0]
        if kind == "bad_head":  # an avail entry naming no descriptor
            drv.put_avail(QUEUE_SIZE + 3)
            return
        if kind == "bad_table":  # an INDIRECT head whose table is in no region
            head = drv._free_descs.pop(0)
            drv.write_desc(head, 0x7000_0000, 48, VRING_DESC_F_INDIRECT)
            drv.chains[head] = SubmittedChain(head=head, descs=[head])
            drv.put_avail(head)
            return
        later: dict[str, Any] = {"indirect": True, "publish": False}
        if kind in ("read", "write", "read_chain"):
            _, sector, nbytes = spec
            t = blk.VIRTIO_BLK_T_OUT if kind == "write" else blk.VIRTIO_BLK_T_IN
            hdr = blk.OUTHDR.pack(t, 0, sector)
            if kind == "write":
                data = random.Random(sector * 31 + nbytes).randbytes(nbytes)
                chain = drv.add_chain([hdr, data], [1], **later)
            else:
                chain = drv.add_chain([hdr], [nbytes, 1], indirect=kind == "read", publish=False)
        elif kind == "flush":
            chain = drv.add_chain([blk.OUTHDR.pack(blk.VIRTIO_BLK_T_FLUSH, 0, 0)], [1], **later)
        elif kind == "get_id":
            hdr = blk.OUTHDR.pack(blk.VIRTIO_BLK_T_GET_ID, 0, 0)
            chain = drv.add_chain([hdr], [20, 1], **later)
        elif kind == "type":  # a read-shaped chain whose header says another type
            chain = drv.add_chain([blk.OUTHDR.pack(spec[1], 0, 0)], [4096, 1], **later)
        else:
            raise AssertionError(kind)
        # A status byte the device must overwrite (a driver need not clear it), and
        # a read's buffer holding old data (the device must overwrite all of it)
        addr, n = chain.writable[-1]
        drv.write(addr + n - 1, b"\xff")
        if len(chain.writable) == 2:
            drv.write(chain.writable[0][0], b"\xaa" * chain.writable[0][1])
        if publish:
            drv.publish()
        self.pending[chain.head] = chain

    def on_interrupt(self, index: int) -> None:
        self.interrupts += 1
        self.take_used()

    def take_used(self) -> None:
        """Collect what the device completed, then post the next request."""
        quiet = False
        for head, length in self.drv.get_used():
            chain = self.pending.pop(head, None)
            status = None
            if chain is not None and chain.writable and length:
                addr, n = chain.writable[-1]
                status = self.drv.read(addr + n - 1, 1)[0]
                if status == blk.VIRTIO_BLK_S_OK and len(chain.writable) == 2:
                    data = self.drv.read(*chain.writable[0])
                    self.read_data.append(hashlib.sha256(data).hexdigest()[:16])
            self.results.append((head, length, status))
        if self.script and self.script[0][0] == "quiet":
            # Interrupt me only after several more completions: the next one comes
            # without an interrupt (the test collects it by looking at the ring).
            self.script.pop(0)
            quiet = True
        self.drv.set_used_event(self.drv.last_used + (8 if quiet else 0))
        self.post_next()


# The nodes run_script can export: null-co, or a file read and written by Linux AIO
# (aio=native, O_DIRECT) or io_uring (aio=threads).
NODES: dict[str, dict[str, Any]] = {
    "null": {"driver": "null-co", "size": CAPACITY},
    "aio": {"driver": "file", "aio": "native", "cache": {"direct": True}},
    "uring": {"driver": "file", "aio": "threads"},
}


def make_image(path: str) -> None:
    """A file of CAPACITY bytes with data of its own where the scripts read."""
    with open(path, "wb") as f:
        f.truncate(CAPACITY)
        f.write(random.Random(5).randbytes(MiB))
        f.seek(CAPACITY - 64 * 1024)
        f.write(random.Random(6).randbytes(64 * 1024))


@contextlib.asynccontextmanager
async def fake_export(
    mp: pytest.MonkeyPatch, state: str, node_options: dict[str, Any], writable: bool
) -> AsyncIterator[tuple[VduseBlkExport, Any, FakeDriver]]:
    """A started one-queue vduse-blk export of a node over the fake VDUSE kernel, with a
    FakeDriver attached as Linux negotiates (no VIRTIO_F_NOTIFY_ON_EMPTY, bit 24) whose
    buffers of whole sectors are aligned for O_DIRECT; yields the export, the device's
    fake fd and the driver, and stops and closes everything after."""
    mem = MemfdMemory(8 * MiB)
    kernel = FakeKernel(mem)
    drv = FakeDriver(QUEUE_SIZE, memory=mem, ring_base=0x1000, data_base=MiB, data_size=4 * MiB)
    drv.buffer_align = 512  # O_DIRECT (aio=native)
    mp.setenv("VEXPORT_STATE_DIR", state)
    mp.setenv("VEXPORT_IRQ_STEER", "0")  # no /proc/irq for a fake device
    kernel.install(mp)
    graph = BlockGraph()
    node = graph.add({**node_options, "node-name": "d0"})
    opts = {"id": "e0", "type": "vduse-blk", "node-name": "d0", "name": "vd1"}
    opts.update({"writable": writable, "num-queues": 1, "queue-size": QUEUE_SIZE})
    export = VduseBlkExport(SimpleNamespace(graph=graph), opts, node)  # type: ignore[arg-type]
    await export.start()
    try:
        fd = await start_driver(kernel, "vd1", drv, blk.features(1, True) & ~(1 << 24))
        yield export, fd, drv
    finally:
        await export.stop("hard")
        node.close()
        mem.close()


async def run_script(
    script: Sequence[Spec],
    *,
    use_native: bool,
    writable: bool = True,
    deep: int = 0,
    backend: str = "null",
    budget: int | None = None,
) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as state:
        mp.setenv("VEXPORT_NATIVE_DEEP", str(deep))
        if budget is not None:
            mp.setenv("VEXPORT_POLL_BUDGET", str(budget))
        if not use_native:
            mp.setattr(native, "lib", None)
        image = os.path.join(state, "image")
        options = dict(NODES[backend])
        if backend != "null":
            make_image(image)
            options["filename"] = image
        async with fake_export(mp, state, options, writable) as (export, fd, drv):
            driver = ScriptDriver(drv, script)
            driver.image = image
            fd.vq_inject_irq = driver.on_interrupt  # type: ignore[method-assign]
            expected = sum(
                spec[1] if spec[0] == "burst" else spec[0] not in ("bad_head", "quiet", "shrink")
                for spec in script
            )
            # How many requests had completed at each turn of the event loop
            turns: list[int] = []
            loop = asyncio.get_running_loop()

            def probe() -> None:
                turns.append(len(driver.results))
                if len(driver.results) < expected:
                    loop.call_soon(probe)

            loop.call_soon(probe)
            driver.post_next()
            fd.kick(0)
            for _ in range(2000):
                if len(driver.results) >= expected or export.device.queues[0].broken:
                    break
                await asyncio.sleep(0.001)
                if drv.used_idx != drv.last_used:
                    driver.take_used()  # completed without an interrupt (asked so)
                fd.kick(0)  # a request the poll left for the next kick
            queue = export.device.queues[0]
            qlog = queue.log
            assert qlog is not None
            out = {
                "results": driver.results,
                "interrupts": driver.interrupts,
                "broken": queue.broken,
                "log_heads": list(qlog.heads),
                "log_used": qlog.used_idx,
                "log_seq": qlog.next_seq,
                "used_idx": drv.used_idx,
                "native_served": queue.native.state.served if queue.native else 0,
                "read_data": driver.read_data,
                "inflight": export._inflight,
                "turns": turns,
            }
        if backend != "null":
            with open(image, "rb") as f:
                out["image"] = hashlib.sha256(f.read()).hexdigest()
    return out


async def both(script: Sequence[Spec], **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    py = await run_script(script, use_native=False, **kw)
    c = await run_script(script, use_native=True, **kw)
    return py, c


def same_but_counter(py: dict[str, Any], c: dict[str, Any]) -> None:
    for key in py:
        if key not in ("native_served", "turns"):
            assert c[key] == py[key], key


async def test_native_poll_serves_reads_and_writes_as_python_does() -> None:
    script = [("read", (i * 7919) % (SECTORS - 8), 4096) for i in range(20)]
    script += [("write", (i * 104729) % (SECTORS - 8), 4096) for i in range(20)]
    script += [("read", 0, 512), ("write", SECTORS - 1, 512), ("read", 8, 64 * 1024)]
    py, c = await both(script)
    same_but_counter(py, c)
    assert len(c["results"]) == len(script)
    assert all(status == blk.VIRTIO_BLK_S_OK for _h, _n, status in c["results"])
    # reads report their data and the status byte, writes the status byte alone
    assert [n for _h, n, _s in c["results"][:20]] == [4097] * 20
    assert [n for _h, n, _s in c["results"][20:40]] == [1] * 20
    assert py["native_served"] == 0
    # every request after the first was found by the poll, and the C loop served it
    assert c["native_served"] == len(script) - 1
    assert all(h == 0 for h in c["log_heads"]) and c["log_used"] == c["used_idx"]
    assert c["log_seq"] == py["log_seq"] == len(script) + 1


async def test_native_poll_interrupts_only_when_the_driver_asks() -> None:
    """EVENT_IDX: a driver that moved used_event ahead gets no interrupt for the
    completions before it."""
    script: list[Spec] = []
    for i in range(6):
        script += [("read", 8 * i, 4096), ("quiet",), ("write", 8 * i, 4096)]
    py, c = await both(script)
    same_but_counter(py, c)
    assert len(c["results"]) == 12
    assert c["interrupts"] < 12  # the quiet ones came without
    assert c["native_served"] >= 6


async def test_native_poll_leaves_a_deep_driver_to_python() -> None:
    """With a limit on the requests the driver has out, the C loop returns at a burst
    above it before taking any, and the Python loop serves the rest of that poll."""
    script: list[Spec] = [("read", 0, 4096), ("read", 8, 4096), ("burst", 8)]
    script += [("read", 16, 4096), ("burst", 3), ("read", 24, 4096)]
    py, c = await both(script, deep=4)
    same_but_counter(py, c)
    assert len(c["results"]) == 15
    assert c["native_served"] == 1  # the second read; the burst ended the C loop
    unlimited = await run_script(script, use_native=True)
    same_but_counter(py, unlimited)
    assert unlimited["native_served"] == 14  # all but the first (the kick's)


async def test_native_poll_leaves_every_other_request_to_python() -> None:
    """Other types, other chain shapes, refused ranges and lengths, malformed entries:
    the C loop stops before each, Python serves it as it would have, the C loop goes
    on with the next."""
    script: list[Spec] = [
        ("read", 0, 4096),
        ("flush",),
        ("read", 8, 4096),
        ("get_id",),
        ("read", SECTORS - 4, 4096),  # past the end: IOERR
        ("read", 16, 1000),  # not whole sectors: IOERR
        ("write", SECTORS, 512),  # starts at the end: IOERR
        ("read_chain", 24, 4096),  # no INDIRECT: the general walk
        ("type", blk.VIRTIO_BLK_T_OUT),  # a write header on a read-shaped chain
        ("type", blk.VIRTIO_BLK_T_DISCARD),
        ("bad_table",),
        ("read", 32, 4096),
        ("write", 40, 4096),
        ("read", 48, 4096),
        ("bad_head",),  # no completion: logged and dropped
    ]
    py, c = await both(script)
    same_but_counter(py, c)
    # the valid reads and writes after the first
    assert c["native_served"] == 4
    assert len(c["results"]) == len(script) - 1
    statuses = [s for _h, _n, s in c["results"]]
    assert statuses[0] == blk.VIRTIO_BLK_S_OK
    assert statuses[4] == statuses[5] == statuses[6] == blk.VIRTIO_BLK_S_IOERR


async def test_native_poll_refuses_writes_of_a_read_only_export() -> None:
    script = [("read", 0, 4096), ("write", 8, 4096), ("read", 16, 4096), ("write", 24, 512)]
    py, c = await both(script, writable=False)
    same_but_counter(py, c)
    assert [s for _h, _n, s in c["results"]] == [
        blk.VIRTIO_BLK_S_OK,
        blk.VIRTIO_BLK_S_IOERR,
        blk.VIRTIO_BLK_S_OK,
        blk.VIRTIO_BLK_S_IOERR,
    ]
    assert c["native_served"] == 1  # the second read; the writes went to Python


async def test_native_poll_is_not_used_for_other_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """null-co with read-zeroes must write zeroes: not the C loop's to serve."""
    from vexport.blockdev import null

    orig = null.NullNode.__init__

    def zeroes(self: null.NullNode, name: str, options: dict[str, Any]) -> None:
        orig(self, name, {**options, "read-zeroes": True})

    monkeypatch.setattr(null.NullNode, "__init__", zeroes)
    c = await run_script([("read", 0, 4096), ("read", 8, 4096)], use_native=True)
    assert c["native_served"] == 0
    assert [s for _h, _n, s in c["results"]] == [blk.VIRTIO_BLK_S_OK] * 2


@pytest.mark.parametrize("backend", ["aio", "uring"])
async def test_native_poll_reads_and_writes_a_file_as_python_does(backend: str) -> None:
    """Linux AIO (aio=native) and io_uring (aio=threads): the data read, the file
    written, the statuses and the in-flight log are the Python path's."""
    script: list[Spec] = [("read", (i * 7) % 2040, 4096) for i in range(12)]
    script += [("write", (i * 104729) % (SECTORS - 8), 4096) for i in range(12)]
    script += [("read", (i * 104729) % (SECTORS - 8), 4096) for i in range(12)]
    script += [("read", SECTORS - 16, 8192), ("write", 0, 512), ("read", 0, 64 * 1024)]
    script += [("burst", 6), ("flush",), ("read", 8, 4096)]
    py, c = await both(script, backend=backend)
    # Completions of a burst may come back in another order, with other interrupts.
    for key in ("results", "read_data"):
        assert sorted(c[key]) == sorted(py[key]), key
    for key in ("broken", "log_heads", "log_used", "log_seq", "used_idx", "inflight"):
        assert c[key] == py[key], key
    assert len(c["results"]) == len(script) + 5
    assert all(status == blk.VIRTIO_BLK_S_OK for _h, _n, status in c["results"])
    assert len(c["read_data"]) == 12 + 12 + 2 + 6 + 1
    # the writes reached the file: the data read back after them is theirs
    written = [random.Random(s * 31 + 4096).randbytes(4096) for _k, s, _n in script[12:24]]
    digests = [hashlib.sha256(d).hexdigest()[:16] for d in written]
    assert c["read_data"][12:24] == py["read_data"][12:24] == digests
    assert c["image"] == py["image"]  # the file after the run
    # many (a request posted after a poll gave up is served by Python, at its kick)
    assert c["native_served"] >= 10
    assert c["inflight"] == 0
    assert all(h == 0 for h in c["log_heads"]) and c["log_used"] == c["used_idx"]


@pytest.mark.parametrize("backend", ["aio", "uring"])
async def test_native_poll_reads_past_the_end_of_the_file_as_zeroes(backend: str) -> None:
    """A file shorter than the node (shrunk from outside): a read that meets its end
    gets zeroes for the rest and succeeds, as in the Python path (io/iov.py)."""
    end = CAPACITY - 64 * 1024
    script: list[Spec] = [("read", 0, 4096), ("shrink", end + 2048)]
    script += [("read", end // 512, 4096), ("read", end // 512 + 16, 8192), ("read", 8, 4096)]
    py, c = await both(script, backend=backend)
    for key in ("results", "read_data", "log_heads", "log_seq", "inflight"):
        assert c[key] == py[key], key
    assert [s for _h, _n, s in c["results"]] == [blk.VIRTIO_BLK_S_OK] * 4
    tail = random.Random(6).randbytes(2048) + bytes(2048)
    assert c["read_data"][1] == hashlib.sha256(tail).hexdigest()[:16]
    assert c["read_data"][2] == hashlib.sha256(bytes(8192)).hexdigest()[:16]
    assert c["native_served"] >= 2


@contextlib.asynccontextmanager
async def pipe_export() -> AsyncIterator[tuple[VduseBlkExport, Any, FakeDriver, int]]:
    """A null-co export whose compiled poll reads from a pipe through io_uring: a read
    stays out until the test writes into the pipe (a slow backend).  Yields the export,
    the device's fake fd, the driver and the pipe's write end."""
    from vexport.exports.native_poll import NativeBackend

    pipe_r, pipe_w = os.pipe()

    def pipe_backend(self: VduseBlkExport) -> NativeBackend | None:
        if self._stopping:
            return None
        return NativeBackend(SECTORS, 0, False, native.lib.VX_URING, pipe_r)

    try:
        with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as state:
            mp.setattr(VduseBlkExport, "native_backend", pipe_backend)
            async with fake_export(mp, state, NODES["null"], False) as (export, fd, drv):
                yield export, fd, drv, pipe_w
    finally:
        os.close(pipe_w)
        os.close(pipe_r)


async def _until(cond: Any, what: str) -> None:
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


async def test_native_poll_completes_requests_that_stay_out_from_the_event_loop() -> None:
    """A request still out when the C loop gives up the poll is counted in the export's
    in-flight requests (a drain waits for it) and completed later, from the event
    loop, by the backend's eventfd; a short read goes on for the rest."""
    async with pipe_export() as (export, fd, drv, pipe_w):
        hdr = blk.OUTHDR.pack(blk.VIRTIO_BLK_T_IN, 0, 8)
        chains: list[SubmittedChain] = []

        def on_interrupt(index: int) -> None:
            # The driver posts its next read at the first read's interrupt, so that
            # the poll finds it (as at queue depth 1).
            if len(chains) == 1:
                drv.set_used_event(1)  # interrupt me for the next one too
                chains.append(drv.add_chain([hdr], [4096, 1], indirect=True))
            interrupts.append(index)

        interrupts: list[int] = []
        fd.vq_inject_irq = on_interrupt  # type: ignore[method-assign]
        chains.append(drv.add_chain([hdr], [4096, 1], indirect=True))
        fd.kick(0)  # served by Python (null-co), then the poll begins
        await _until(lambda: drv.used_idx == 1, "the first read")
        first, second = chains
        interrupts.clear()
        queue = export.device.queues[0]
        await _until(
            lambda: queue.native is not None and queue.native.state.pending == 1,
            "the second read to be out",
        )
        await asyncio.sleep(0.05)  # the poll is over: nothing answers the read
        assert drv.used_idx == 1 and export._inflight == 1
        assert queue.vq is not None and queue.vq.inflight_count == 1
        drain = asyncio.ensure_future(export.drain())
        data = random.Random(9).randbytes(4096)
        os.write(pipe_w, data[:1000])  # a short read: the rest is asked for again
        await _until(lambda: queue.native.state.resubmits == 1, "the short read")
        assert drv.used_idx == 1 and not drain.done()
        os.write(pipe_w, data[1000:])
        await _until(lambda: drv.used_idx == 2, "the second read")
        await asyncio.wait_for(drain, 1)
        assert drv.get_used() == [(first.head, 4097), (second.head, 4097)]
        assert drv.read(*second.writable[0]) == data
        assert drv.read(second.writable[1][0], 1) == bytes([blk.VIRTIO_BLK_S_OK])
        assert interrupts  # the event loop's completion interrupted the driver
        assert export._inflight == 0 and queue.vq.inflight_count == 0
        assert queue.log is not None and all(h == 0 for h in queue.log.heads)


async def test_native_poll_requests_out_at_a_reset_are_discarded() -> None:
    """A reset with a request out: the queue stops at once; the request's completion
    comes later and only frees its slot (no used entry, no in-flight log entry), the
    export's count goes back to 0 and the retired poll is closed."""
    async with pipe_export() as (export, fd, drv, pipe_w):
        hdr = blk.OUTHDR.pack(blk.VIRTIO_BLK_T_IN, 0, 8)
        posted: list[SubmittedChain] = []

        def on_interrupt(index: int) -> None:  # the next read, found by the poll
            if len(posted) == 1:
                posted.append(drv.add_chain([hdr], [4096, 1], indirect=True))

        fd.vq_inject_irq = on_interrupt  # type: ignore[method-assign]
        posted.append(drv.add_chain([hdr], [4096, 1], indirect=True))
        fd.kick(0)
        await _until(lambda: drv.used_idx == 1, "the first read")
        device = export.device
        queue = device.queues[0]
        await _until(
            lambda: queue.native is not None and queue.native.state.pending == 1,
            "the second read to be out",
        )
        poller = queue.native
        rid = fd.set_status(0)
        await _until(lambda: rid in fd.responses, "the reset")
        assert queue.native is None and device.native_retiring == [poller]
        assert export._inflight == 1
        assert queue.log is not None and all(h == 0 for h in queue.log.heads)
        os.write(pipe_w, bytes(4096))
        await _until(lambda: export._inflight == 0, "the discarded completion")
        assert device.native_retiring == [] and poller.efd == -1
        assert drv.used_idx == 1  # nothing pushed after the reset


@pytest.mark.parametrize("use_native", [False, True])
async def test_a_busy_poll_gives_the_event_loop_its_turn(
    use_native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver that always has the next request ready keeps the device polling; after
    ``VEXPORT_POLL_BUDGET`` requests (the Python loop: passes) the event loop gets a
    turn (a worker's messages wait for that), then the poll goes on by itself.
    Without the budget, one poll would serve the whole script."""
    from vexport.exports.vduse_device import VduseDevice

    resumed: list[int] = []
    resume = VduseDevice._resume_poll

    def counted(self: VduseDevice) -> None:
        resumed.append(1)
        resume(self)

    monkeypatch.setattr(VduseDevice, "_resume_poll", counted)
    script = [("read", (i * 8) % (SECTORS - 8), 4096) for i in range(300)]
    out = await run_script(script, use_native=use_native, budget=40)
    assert len(resumed) >= 5  # the poll went on after its turns
    assert len(out["results"]) == 300
    assert all(s == blk.VIRTIO_BLK_S_OK for _h, _n, s in out["results"])
    turns = out["turns"]
    gaps = [b - a for a, b in itertools.pairwise(turns)]
    assert max(gaps) <= 3 * 40, turns  # (a kick may start a poll in the same turn)
    if use_native:
        assert out["native_served"] > 200
    whole = await run_script(script, use_native=use_native)
    assert max(b - a for a, b in itertools.pairwise(whole["turns"])) > 250
