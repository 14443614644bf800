"""Host benchmark of one request at a time through the real vduse-blk export (issue 5).

    .venv/bin/python bench/d1_path.py                       # null-co and native, reads
    .venv/bin/python bench/d1_path.py --backend native --rw write --requests 50000
    .venv/bin/python bench/d1_path.py --backend native --profile   # cProfile, calls/request
    .venv/bin/python bench/d1_path.py --guest --checkout /root/wt-base --checkout /work/main
    .venv/bin/python bench/d1_path.py --depth 32     # 32 in flight, replaced per interrupt

At queue depth 1 every step of a request is on its latency path, and in the test guest
(QEMU TCG) each Python call costs tens of times what it does here.  `bench/micro.py`
measures throughput with full rings through a copy of the export's loop; this one runs
the export itself (`VduseBlkExport` on `VduseDevice`, in-flight log included) over the
fake VDUSE kernel of `vexport/exports/testing.py`, with a driver that keeps exactly one
request in flight: when the device injects an interrupt, the driver takes the used
entry, sets ``used_event`` as Linux's virtio ring does, and makes the next request
available.  The device finds it while polling (as in the guest at depth 1: no kick),
so a run is one kick followed by ``--requests`` requests served in the poll loop.
``--depth N`` keeps N requests in flight instead: the driver makes each interrupt's
completions available again at once, as fio does, so that at depth 32 the device serves
32 requests per pass (the lock-step of the guest's one-queue depth-32 cells).

Reported per backend: CPU microseconds per request (``time.process_time``, the driver's
few struct operations included), and with ``--profile`` the function calls per request
(cProfile counts Python and C calls alike) and the functions with the most own time.
Backends: ``null`` (null-co), and ``native``, ``io_uring``, ``threads`` (a ``file``
node on a sparse file in /dev/shm; native with ``cache.direct=on``).

``--checkout DIR`` (two or more) compares versions of the code: each backend runs in a
fresh process with ``PYTHONPATH=DIR``, the checkouts interleaved over ``--rounds``
rounds (order alternating), and the medians per checkout are printed.  ``--guest`` runs
the same command inside the real-kernel test guest (QEMU TCG, where each Python step
costs about 20 times what it costs here; the guest sees this host's ``/`` read-only, so
checkouts outside ``/tmp`` work there too).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vexport.blockdev.graph import BlockGraph
from vexport.exports.testing import FakeKernel, MemfdMemory, start_driver
from vexport.exports.vduse_blk import VduseBlkExport
from vexport.virtio import blk
from vexport.virtio.testing import FakeDriver
from vexport.virtio.virtqueue import U16, USED_ELEM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from micro import BLOCK, CAPACITY, write_blk_chains

MiB = 1 << 20
QUEUE_SIZE = 128
BACKENDS = ("null", "native", "io_uring", "threads")
FILE = os.environ.get("VEXPORT_MICRO_FILE", "/dev/shm/vexport-d1.img")


class InFlight:
    """The driver: one indirect chain per head, ``depth`` requests in flight; each
    interrupt's completions are replaced at once (fio's way at queue depth N)."""

    def __init__(self, drv: FakeDriver, write: bool, requests: int, depth: int) -> None:
        self.drv = drv
        self.depth = depth
        self.left = requests
        self.done = 0
        size = drv.size
        write_blk_chains(drv, write, 4096)
        mem = drv.memory
        region = mem.region_at(drv.desc_addr)
        assert region is not None
        self.view = region.view
        self.avail = drv.avail_addr - region.start
        self.used = drv.used_addr - region.start
        self.used_event = self.avail + 4 + 2 * size
        self.size = size
        self.avail_idx = 0
        self.last_used = 0

    def post(self, n: int) -> None:
        """Make the next ``n`` requests available (head = avail index modulo the size;
        with at most ``depth`` <= size / 2 in flight, a head is free when it comes up
        again), then publish the avail index once."""
        i = self.avail_idx
        for _ in range(n):
            U16.pack_into(self.view, self.avail + 4 + 2 * (i % self.size), i % self.size)
            i = (i + 1) & 0xFFFF
        self.avail_idx = i
        U16.pack_into(self.view, self.avail + 2, i)
        self.left -= n

    def on_interrupt(self, index: int) -> None:
        view = self.view
        used_idx = U16.unpack_from(view, self.used + 2)[0]
        freed = 0
        while self.last_used != used_idx:
            slot = self.last_used % self.size
            head, length = USED_ELEM.unpack_from(view, self.used + 4 + 8 * slot)
            if length != BLOCK + 1 and length != 1:
                raise AssertionError(f"used length {length} for head {head}")
            self.last_used = (self.last_used + 1) & 0xFFFF
            self.done += 1
            freed += 1
        U16.pack_into(view, self.used_event, self.last_used)  # virtqueue_enable_cb
        self.post(min(freed, self.left))


def node_options(backend: str) -> dict[str, Any]:
    if backend == "null":
        return {"driver": "null-co", "node-name": "d0", "size": CAPACITY}
    with open(FILE, "wb") as f:
        f.truncate(CAPACITY)
    options: dict[str, Any] = {"driver": "file", "node-name": "d0", "filename": FILE}
    options["aio"] = backend
    if backend == "native":
        options["cache"] = {"direct": True}
    return options


async def run(
    backend: str, write: bool, requests: int, depth: int, profile: cProfile.Profile | None
) -> float:
    """CPU seconds for ``requests`` requests at queue depth ``depth`` through the export."""
    mem = MemfdMemory(8 * MiB)
    kernel = FakeKernel(mem)
    drv = FakeDriver(QUEUE_SIZE, memory=mem, ring_base=0x1000, data_base=MiB, data_size=4 * MiB)
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as state:
        mp.setenv("VEXPORT_STATE_DIR", state)
        mp.setenv("VEXPORT_IRQ_STEER", "0")  # no /proc/irq for a fake device
        kernel.install(mp)
        graph = BlockGraph()
        node = graph.add(node_options(backend))
        opts = {"id": "e0", "type": "vduse-blk", "node-name": "d0", "name": "vd1"}
        opts.update({"writable": True, "num-queues": 1, "queue-size": QUEUE_SIZE})
        export = VduseBlkExport(SimpleNamespace(graph=graph), opts, node)  # type: ignore[arg-type]
        await export.start()
        try:
            fd = await start_driver(kernel, "vd1", drv, blk.features(1, True))
            driver = InFlight(drv, write, requests, depth)
            fd.vq_inject_irq = driver.on_interrupt  # type: ignore[method-assign]
            driver.post(min(depth, requests))
            t0 = time.process_time()
            if profile is not None:
                profile.enable()
            fd.kick(0)
            while driver.done < requests:
                await asyncio.sleep(0)
            if profile is not None:
                profile.disable()
            cpu = time.process_time() - t0
        finally:
            await export.stop("hard")
            node.close()
            if backend != "null":
                os.unlink(FILE)
        mem.close()
    return cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--backend", choices=(*BACKENDS, "both"), default="both")
    p.add_argument("--rw", choices=("read", "write"), default="read")
    p.add_argument("--requests", type=int, default=30000)
    p.add_argument("--depth", type=int, default=1, help="requests in flight (<= 64)")
    p.add_argument("--repeat", type=int, default=3, help="runs per backend; the median is shown")
    p.add_argument("--profile", action="store_true", help="one more run under cProfile")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--checkout", action="append", default=[], help="PYTHONPATH to compare")
    p.add_argument("--rounds", type=int, default=3, help="with --checkout: interleaved rounds")
    p.add_argument("--guest", action="store_true", help="run this command in the test guest")
    args = p.parse_args(argv)
    if not 1 <= args.depth <= QUEUE_SIZE // 2:
        p.error(f"--depth must be 1 to {QUEUE_SIZE // 2}")
    kinds = ("null", "native") if args.backend == "both" else (args.backend,)
    if args.guest:
        return in_guest([a for a in (sys.argv[1:] if argv is None else argv) if a != "--guest"])
    if args.checkout:
        return compare(args, kinds)
    write = args.rw == "write"
    for kind in kinds:
        us = sorted(
            asyncio.run(run(kind, write, args.requests, args.depth, None)) / args.requests * 1e6
            for _ in range(args.repeat)
        )
        runs = " ".join(f"{u:.2f}" for u in us)
        print(
            f"{kind:8s} {args.rw:5s} depth {args.depth}: {us[len(us) // 2]:6.2f} us CPU per "
            f"request (median of {args.repeat}: {runs})",
            flush=True,
        )
        if args.profile:
            prof = cProfile.Profile()
            asyncio.run(run(kind, write, args.requests, args.depth, prof))
            out = io.StringIO()
            stats = pstats.Stats(prof, stream=out)
            calls = stats.total_calls  # type: ignore[attr-defined]
            print(f"--- cProfile, {kind}: {calls / args.requests:.1f} calls per request")
            stats.sort_stats("tottime").print_stats(args.top)
            print(out.getvalue())
    return 0


def compare(args: argparse.Namespace, kinds: tuple[str, ...]) -> int:
    """Each checkout in its own processes, interleaved; medians of the runs' medians."""
    results: dict[tuple[str, str], list[float]] = {}
    for rnd in range(args.rounds):
        order = args.checkout if rnd % 2 == 0 else args.checkout[::-1]
        for checkout in order:
            for kind in kinds:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--backend", kind]
                cmd += ["--rw", args.rw, "--requests", str(args.requests)]
                cmd += ["--repeat", str(args.repeat), "--depth", str(args.depth)]
                env = {**os.environ, "PYTHONPATH": checkout}
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                us = float(out.stdout.split(f"depth {args.depth}:")[1].split()[0])
                results.setdefault((checkout, kind), []).append(us)
                print(f"round {rnd} {checkout} {kind}: {us:.2f} us", flush=True)
    for (checkout, kind), values in results.items():
        runs = " ".join(f"{v:.2f}" for v in values)
        print(f"  {checkout} {kind:8s}: {statistics.median(values):7.2f} us per request ({runs})")
    return 0


def in_guest(argv: list[str]) -> int:
    """Run this script with ``argv`` in the real-kernel test guest; print its output."""
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "tests"))
    from guest import runner

    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    out = root / "bench" / "results" / "d1-path-guest"
    res = runner.run(cmd, timeout=3000, results_dir=out, image=runner.prepare())
    print(res.output[-20000:], end="")
    return 0 if res.status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
