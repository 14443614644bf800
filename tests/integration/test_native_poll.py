"""The compiled poll (vexport/native/poll.c, vexport/exports/native_poll.py) against the
Python path it replaces: the same driver script, run through the real export over the
fake VDUSE kernel with the native loop on and off, must give the same used entries,
status bytes, interrupts and in-flight log.  The driver posts each request when the
previous one's interrupt arrives, so every request after the first is found by the
device's poll, as at queue depth 1 in the guest."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Sequence
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
        self.interrupts = 0

    def post_next(self) -> None:
        if not self.script:
            return
        spec = self.script.pop(0)
        drv = self.drv
        kind = spec[0]
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
                chain = drv.add_chain([hdr, bytes([7]) * nbytes], [1], **later)
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
        # A status byte the device must overwrite (a driver need not clear it)
        addr, n = chain.writable[-1]
        drv.write(addr + n - 1, b"\xff")
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
            self.results.append((head, length, status))
        if self.script and self.script[0][0] == "quiet":
            # Interrupt me only after several more completions: the next one comes
            # without an interrupt (the test collects it by looking at the ring).
            self.script.pop(0)
            quiet = True
        self.drv.set_used_event(self.drv.last_used + (8 if quiet else 0))
        self.post_next()


async def run_script(
    script: Sequence[Spec], *, use_native: bool, writable: bool = True, deep: int = 0
) -> dict[str, Any]:
    mem = MemfdMemory(8 * MiB)
    kernel = FakeKernel(mem)
    drv = FakeDriver(QUEUE_SIZE, memory=mem, ring_base=0x1000, data_base=MiB, data_size=4 * MiB)
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as state:
        mp.setenv("VEXPORT_STATE_DIR", state)
        mp.setenv("VEXPORT_IRQ_STEER", "0")  # no /proc/irq for a fake device
        mp.setenv("VEXPORT_NATIVE_DEEP", str(deep))
        if not use_native:
            mp.setattr(native, "lib", None)
        kernel.install(mp)
        graph = BlockGraph()
        node = graph.add({"driver": "null-co", "node-name": "d0", "size": CAPACITY})
        opts = {"id": "e0", "type": "vduse-blk", "node-name": "d0", "name": "vd1"}
        opts.update({"writable": writable, "num-queues": 1, "queue-size": QUEUE_SIZE})
        export = VduseBlkExport(SimpleNamespace(graph=graph), opts, node)  # type: ignore[arg-type]
        await export.start()
        try:
            # As Linux negotiates: no VIRTIO_F_NOTIFY_ON_EMPTY (bit 24)
            fd = await start_driver(kernel, "vd1", drv, blk.features(1, True) & ~(1 << 24))
            driver = ScriptDriver(drv, script)
            fd.vq_inject_irq = driver.on_interrupt  # type: ignore[method-assign]
            expected = sum(
                spec[1] if spec[0] == "burst" else spec[0] not in ("bad_head", "quiet")
                for spec in script
            )
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
            }
        finally:
            await export.stop("hard")
            node.close()
        mem.close()
    return out


async def both(script: Sequence[Spec], **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    py = await run_script(script, use_native=False, **kw)
    c = await run_script(script, use_native=True, **kw)
    return py, c


def same_but_counter(py: dict[str, Any], c: dict[str, Any]) -> None:
    for key in py:
        if key != "native_served":
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
