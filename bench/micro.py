"""Host microbenchmark of vexport's data path, no kernel involved (issue 5, part 2).

    .venv/bin/python bench/micro.py                    # both backends, reads, ~2 s each
    .venv/bin/python bench/micro.py --rw write --seconds 5 --batch 64
    .venv/bin/python bench/micro.py --backend node --profile   # cProfile, top functions

A `FakeDriver` (vexport/virtio/testing.py) lays out a split ring of ``--queue-size``
entries in bytearrays, each head with a fixed request chain built the way Linux's
virtio_blk does with INDIRECT_DESC negotiated: one indirect table of three descriptors
(16-byte header, 4 KiB data, 1-byte status).  The driver keeps the ring full: after every
device pass it moves each used entry straight back to the avail ring.

One device pass does what the vduse-blk export does per kick (exports/vduse_blk.py,
exports/vduse_device.py): ``pop_batch`` until the ring is empty, ``VirtioBlk.parse`` and
``execute`` on the backend, ``push`` each completion, then ``should_notify`` once.  The
device runs with EVENT_IDX and INDIRECT_DESC on, as both daemons negotiate with Linux.

Backends:

``sync``
    a trivial null backend completing every request inside the submit call: the cost of
    the virtqueue and virtio-blk code alone.
``node``
    a real ``null-co`` BlockNode from vexport.blockdev, whose completions are deferred to
    the end of the pass's completion batch, as in the export; the pass runs inside an
    asyncio loop and yields once per pass (as the export's event loop would).
``native``, ``io_uring``, ``threads``
    a real ``file`` BlockNode with that ``aio`` (native with ``cache.direct=on``) on a
    sparse file in /dev/shm (or ``$VEXPORT_MICRO_FILE``): the I/O engine's Python path
    and its system calls (tmpfs completes inside the submitting call).

Requests per second are counted on CPU time (``time.process_time``) of the device side
only; the driver's refill is excluded.  ``--profile`` runs the device side under
cProfile (and pyinstrument if it is installed and ``--pyinstrument`` is given).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import struct
import sys
import time
from collections.abc import Callable

from vexport.io import completions
from vexport.virtio import blk
from vexport.virtio.blk import BlkRequest, VirtioBlk
from vexport.virtio.testing import FakeDriver
from vexport.virtio.virtqueue import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    SplitQueue,
)

CAPACITY = 1 << 30
FILE_BACKENDS = ("native", "io_uring", "threads")
MICRO_FILE = os.environ.get("VEXPORT_MICRO_FILE", "/dev/shm/vexport-micro.img")
BLOCK = 4096
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")


class SyncNull:
    """A null backend that completes inside the call (no event loop)."""

    def preadv(self, offset: int, iov: list[memoryview], done: Callable[[int], None]) -> None:
        done(0)

    def pwritev(self, offset: int, iov: list[memoryview], done: Callable[[int], None]) -> None:
        done(0)

    def flush(self, done: Callable[[int], None]) -> None:
        done(0)

    def discard(self, offset: int, length: int, done: Callable[[int], None]) -> None:
        done(0)

    def write_zeroes(
        self, offset: int, length: int, unmap: bool, done: Callable[[int], None]
    ) -> None:
        done(0)


def write_blk_chains(drv: FakeDriver, write: bool, data_align: int) -> None:
    """Descriptor i of ``drv`` -> an indirect table laid out as Linux's virtio_blk does:
    a 16-byte header (a 4 KiB read or write at a spread-out sector), 4 KiB of data
    aligned to ``data_align``, a status byte.  Nothing is made available."""
    kind = blk.VIRTIO_BLK_T_OUT if write else blk.VIRTIO_BLK_T_IN
    data_flags = 0 if write else VRING_DESC_F_WRITE
    for i in range(drv.size):
        sector = (i * 7919 % (CAPACITY // BLOCK)) * (BLOCK // 512)
        hdr = drv.alloc(16)
        drv.write(hdr, blk.OUTHDR.pack(kind, 0, sector))
        data = drv.alloc(BLOCK, data_align)
        status = drv.alloc(1)
        table = drv.write_indirect_table(
            [
                (hdr, 16, VRING_DESC_F_NEXT, 1),
                (data, BLOCK, data_flags | VRING_DESC_F_NEXT, 2),
                (status, 1, VRING_DESC_F_WRITE, 0),
            ]
        )
        drv.write_desc(i, table, 48, VRING_DESC_F_INDIRECT)


class Ring:
    """The driver side: one fixed indirect chain per head, recycled from used to avail."""

    def __init__(self, size: int, write: bool) -> None:
        data_size = size * (BLOCK + 1024) + (1 << 16)
        self.drv = FakeDriver(size, data_size=data_size)
        self.size = size
        write_blk_chains(self.drv, write, 512)
        for i in range(size):  # avail entry i -> head i
            self.drv.put_avail(i, publish=False)
        self.drv.publish()
        self.ring = self.drv.ring_region
        base = self.drv.desc_addr
        self.avail_off = self.drv.avail_addr - base
        self.used_off = self.drv.used_addr - base
        self.avail_idx = self.drv.avail_idx
        self.last_used = 0

    def refill(self) -> int:
        """Move every new used entry back to the avail ring; publish; return the count."""
        ring, size = self.ring, self.size
        used_idx = U16.unpack_from(ring, self.used_off + 2)[0]
        n = (used_idx - self.last_used) & 0xFFFF
        a_off, u_off = self.avail_off + 4, self.used_off + 4
        last, aidx = self.last_used, self.avail_idx
        for _ in range(n):
            head = USED_ELEM.unpack_from(ring, u_off + 8 * (last % size))[0]
            U16.pack_into(ring, a_off + 2 * (aidx % size), head)
            last = (last + 1) & 0xFFFF
            aidx = (aidx + 1) & 0xFFFF
        self.last_used, self.avail_idx = last, aidx
        U16.pack_into(ring, self.avail_off + 2, aidx)
        return n


class Device:
    """The export's per-kick work, without VDUSE: pop, parse, execute, push, notify."""

    def __init__(self, vq: SplitQueue, backend: object, batch: int) -> None:
        self.vq = vq
        self.backend = backend
        self.batch = batch
        self.vblk = VirtioBlk(CAPACITY, 512, "micro", True)
        self.inflight = 0
        self.notifies = 0
        self.completed = 0

    def _done(self, req: BlkRequest, used_len: int) -> None:
        req.iov = []
        self.vq.push(req.head, used_len)
        self.inflight -= 1
        self.completed += 1

    def kick(self) -> None:
        # As the device does: one completion batch per kick, so that completions a node
        # defers are delivered when it ends (vexport/io/completions.py).
        completions.begin()
        try:
            self._kick()
        finally:
            completions.end()

    def _kick(self) -> None:
        # The export's loop (VduseBlkExport.on_kick): pop_simple, then one pop_batch
        # entry for anything else (or to find the ring empty and re-arm kicks).
        vq, parse, execute = self.vq, self.vblk.parse, self.vblk.execute
        parse_simple = self.vblk.parse_simple
        first_len, last_len = blk.SIMPLE_SHAPE
        backend, done, batch = self.backend, self._done, self.batch
        preadv, pwritev = backend.preadv, backend.pwritev  # type: ignore[attr-defined]
        plug = getattr(backend, "plug", None)
        if plug is not None:
            plug()
        while True:
            simple = vq.pop_simple(batch, first_len, last_len)
            self.inflight += len(simple)
            for sc in simple:
                req = parse_simple(sc, None, done)
                if req.status is None:
                    kind = req.type
                    if kind == blk.VIRTIO_BLK_T_IN:
                        preadv(req.offset, req.iov, req)
                        continue
                    if kind == blk.VIRTIO_BLK_T_OUT:
                        pwritev(req.offset, req.iov, req)
                        continue
                execute(req, backend, done)  # type: ignore[arg-type]
            if len(simple) == batch:
                continue
            chains = vq.pop_batch(1)
            if not chains:
                break
            self.inflight += 1
            execute(parse(chains[0]), backend, done)  # type: ignore[arg-type]
        unplug = getattr(backend, "unplug", None)
        if unplug is not None:
            unplug()

    def flush_notifications(self) -> None:
        if self.vq.should_notify():
            self.notifies += 1


def make(backend_kind: str, size: int, write: bool, batch: int) -> tuple[Ring, Device]:
    ring = Ring(size, write)
    vq = ring.drv.queue(event_idx=True, indirect=True, notify_on_empty=True)
    if backend_kind == "sync":
        backend: object = SyncNull()
    elif backend_kind == "node":
        from vexport.blockdev.null import NullNode

        backend = NullNode("null0", {"driver": "null-co", "size": CAPACITY})
    else:  # "native", "io_uring", "threads": a file node on a sparse tmpfs file
        from vexport.blockdev.file import FileNode

        with open(MICRO_FILE, "wb") as f:
            f.truncate(CAPACITY)
        options: dict[str, object] = {"driver": "file", "filename": MICRO_FILE, "aio": backend_kind}
        if backend_kind == "native":
            options["cache"] = {"direct": True}
        backend = FileNode("file0", options)
    return ring, Device(vq, backend, batch)


def run_sync(ring: Ring, dev: Device, seconds: float) -> tuple[int, float]:
    cpu = 0.0
    clock = time.process_time
    while cpu < seconds:
        t = clock()
        dev.kick()
        dev.flush_notifications()
        cpu += clock() - t
        ring.refill()
    return dev.completed, cpu


async def _run_node(ring: Ring, dev: Device, seconds: float) -> tuple[int, float]:
    cpu = 0.0
    clock = time.process_time
    while cpu < seconds:
        t = clock()
        dev.kick()
        await asyncio.sleep(0)  # the loop runs the completions queued with call_soon
        dev.flush_notifications()
        cpu += clock() - t
        ring.refill()
    return dev.completed, cpu


def measure(backend_kind: str, args: argparse.Namespace) -> tuple[int, float, Device]:
    try:
        ring, dev = make(backend_kind, args.queue_size, args.rw == "write", args.batch)
        if backend_kind == "sync":
            n, cpu = run_sync(ring, dev, args.seconds)
        else:
            n, cpu = asyncio.run(_run_node(ring, dev, args.seconds))
        if backend_kind in FILE_BACKENDS:
            dev.backend.close()  # type: ignore[attr-defined]
    finally:
        if backend_kind in FILE_BACKENDS:
            os.unlink(MICRO_FILE)  # the file make() created for this run
    return n, cpu, dev


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--backend", choices=("sync", "node", "both", *FILE_BACKENDS), default="both")
    p.add_argument("--rw", choices=("read", "write"), default="read")
    p.add_argument("--seconds", type=float, default=2.0, help="CPU seconds per backend")
    p.add_argument("--queue-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=128, help="pop_batch size (the export's BATCH)")
    p.add_argument("--profile", action="store_true", help="cProfile; print the top functions")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--pyinstrument", action="store_true", help="also profile with pyinstrument")
    args = p.parse_args(argv)
    kinds = ("sync", "node") if args.backend == "both" else (args.backend,)
    for kind in kinds:
        n, cpu, dev = measure(kind, args)
        print(
            f"{kind:4s} {args.rw:5s}: {n / cpu:10,.0f} requests/s per core "
            f"({n} requests in {cpu:.2f} CPU s, {dev.notifies} interrupts due, "
            f"queue {args.queue_size}, batch {args.batch})",
            flush=True,
        )
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            measure(kind, args)
            prof.disable()
            out = io.StringIO()
            stats = pstats.Stats(prof, stream=out)
            stats.sort_stats("tottime").print_stats(args.top)
            print(f"--- cProfile, {kind} backend, sorted by own time (top {args.top})")
            print(out.getvalue())
        if args.pyinstrument:
            try:
                import pyinstrument
            except ImportError:
                print("pyinstrument is not installed", file=sys.stderr)
            else:
                prof2 = pyinstrument.Profiler()
                prof2.start()
                measure(kind, args)
                prof2.stop()
                print(prof2.output_text(unicode=False, color=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
