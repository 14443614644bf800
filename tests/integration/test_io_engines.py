"""Every I/O engine (threads, Linux AIO, io_uring) against real files on this machine.

Files live in pytest's tmp_path (under /tmp, on the root ext4 file system, where O_DIRECT
works).  Buffers for O_DIRECT come from anonymous mmap (page aligned).
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import select
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from vexport.io import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    IOEngine,
    close_engines,
    get_engine,
)
from vexport.io.io_uring import IoUringEngine
from vexport.io.iov import full_result
from vexport.io.linux_aio import LinuxAioEngine
from vexport.io.slots import OP_READ, OP_WRITE, SlotEngine
from vexport.io.threads import ThreadPoolEngine, _transfer

KINDS = ["threads", "native", "io_uring"]
BATCHING_KINDS = ["native", "io_uring"]


@pytest.fixture(params=[*KINDS, "threads-pool", "native-getevents"])
async def engine(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[IOEngine]:
    """Every engine; "threads-pool" is aio=threads on the Python thread pool (where
    io_uring is missing), "native-getevents" is Linux AIO reading completions with
    io_getevents (its fallback) instead of the user-space ring."""
    kind = request.param.split("-")[0]
    if request.param == "threads-pool":
        monkeypatch.setenv("VEXPORT_THREADS", "pool")
    try:
        eng = get_engine(kind)
    except OSError as e:  # pragma: no cover - only on hosts without the interface
        pytest.skip(f"{kind} engine unavailable on this host: {e}")
    if request.param == "native-getevents":
        assert isinstance(eng, LinuxAioEngine) and eng._ring is not None
        eng._ring.close()
        eng._ring = None
    yield eng
    close_engines(asyncio.get_running_loop())


async def test_native_completions_done_at_submission_stay_in_the_batch(tmp_path: Path) -> None:
    """Buffered Linux AIO on a regular file completes inside io_submit: the engine reads
    the completion ring right after submitting and delivers the completion before the
    batch that submitted it closes (no loop iteration); the eventfd signal it leaves
    set is consumed by the loop once, without a second delivery."""
    from vexport.io import completions

    loop = asyncio.get_running_loop()
    eng = LinuxAioEngine(loop, depth=8)
    assert eng._ring is not None and eng._ring.nr >= 8
    fd = _open(tmp_path / "b", os.O_RDWR)
    got: list[int] = []
    try:
        completions.begin()
        try:
            eng.plug()
            for i in range(3):
                eng.pwritev(fd, i * 4096, [memoryview(bytes([i + 1]) * 4096)], got.append)
            assert got == []  # never inside the submitting call
            eng.unplug()
            assert got == [4096] * 3
        finally:
            completions.end()
        # The eventfd is left set (no read per batch); the loop clears it once.
        assert select.select([eng._efd], [], [], 0)[0] == [eng._efd]
        await asyncio.sleep(0.05)
        assert select.select([eng._efd], [], [], 0)[0] == []
        assert got == [4096] * 3
        assert len(eng._free) == 8
        assert os.pread(fd, 3 * 4096, 0) == b"\x01" * 4096 + b"\x02" * 4096 + b"\x03" * 4096
    finally:
        eng.close()
        os.close(fd)


async def test_io_uring_completions_done_at_submission_stay_in_the_batch(
    tmp_path: Path,
) -> None:
    """Reads served from the page cache complete inside io_uring_enter: the engine reads
    the CQ ring right after submitting and delivers them before the batch closes, and
    the eventfd signal they left is consumed without a second delivery."""
    from vexport.io import completions

    loop = asyncio.get_running_loop()
    eng = IoUringEngine(loop, depth=8)
    fd = _open(tmp_path / "c", os.O_RDWR)
    os.pwrite(fd, b"\x07" * 3 * 4096, 0)  # in the page cache now
    bufs = [bytearray(4096) for _ in range(3)]
    got: list[int] = []
    try:
        completions.begin()
        try:
            eng.plug()
            for i, buf in enumerate(bufs):
                eng.preadv(fd, i * 4096, [memoryview(buf)], got.append)
            assert got == []  # never inside the submitting call
            eng.unplug()
            assert got == [4096] * 3
        finally:
            completions.end()
        assert select.select([eng._efd], [], [], 0)[0] == [eng._efd]  # left set
        await asyncio.sleep(0.05)
        assert select.select([eng._efd], [], [], 0)[0] == []  # the loop cleared it
        assert got == [4096] * 3
        assert eng._submitted == 0 and len(eng._free) == 8
        assert all(bytes(b) == b"\x07" * 4096 for b in bufs)
    finally:
        eng.close()
        os.close(fd)


async def test_threads_engine_is_io_uring_unless_unavailable_or_pool_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aio=threads runs on io_uring (the kernel's io-wq threads) where it can; a kernel
    without it, or VEXPORT_THREADS=pool, gets the thread pool."""
    import vexport.io.io_uring as io_uring_module

    loop = asyncio.get_running_loop()
    assert isinstance(get_engine("threads"), IoUringEngine)
    close_engines(loop)
    monkeypatch.setenv("VEXPORT_THREADS", "pool")
    assert isinstance(get_engine("threads"), ThreadPoolEngine)
    close_engines(loop)
    monkeypatch.delenv("VEXPORT_THREADS")

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.EPERM, "io_uring_setup failed: Operation not permitted")

    monkeypatch.setattr(io_uring_module.IoUringEngine, "__init__", refuse)
    assert isinstance(get_engine("threads"), ThreadPoolEngine)
    close_engines(loop)


def _pattern(seed: int, n: int) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(n))


async def call(method: Callable[..., None], *args: Any) -> int:
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    method(*args, fut.set_result)
    return await asyncio.wait_for(fut, 5)


def _split(buf: Any, sizes: list[int]) -> list[memoryview]:
    mv = memoryview(buf)
    out, pos = [], 0
    for s in sizes:
        out.append(mv[pos : pos + s])
        pos += s
    return out


def _open(path: Path, flags: int) -> int:
    return os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)


async def test_buffered_patterns_multi_segment(engine: IOEngine, tmp_path: Path) -> None:
    fd = _open(tmp_path / "f", os.O_RDWR)
    try:
        cases = [(0, [100, 3000, 1]), (12345, [4096, 7, 999]), (1 << 20, [1, 1, 1, 65536])]
        for seed, (offset, sizes) in enumerate(cases):
            data = bytearray(_pattern(seed, sum(sizes)))
            assert await call(engine.pwritev, fd, offset, _split(data, sizes)) == len(data)
        for seed, (offset, sizes) in enumerate(cases):
            want = _pattern(seed, sum(sizes))
            assert os.pread(fd, len(want), offset) == want
            back = bytearray(len(want))  # read with a different segmentation
            got = await call(engine.preadv, fd, offset, _split(back, list(reversed(sizes))))
            assert got == len(want)
            assert back == want
    finally:
        os.close(fd)


async def test_o_direct_aligned(engine: IOEngine, tmp_path: Path) -> None:
    fd = _open(tmp_path / "d", os.O_RDWR | os.O_DIRECT)
    wbuf, rbuf = mmap.mmap(-1, 4 * 4096), mmap.mmap(-1, 4 * 4096)
    try:
        wbuf[:] = _pattern(5, len(wbuf))
        for offset in (0, 8192, 1 << 20):
            sizes = [4096, 8192, 4096]
            assert await call(engine.pwritev, fd, offset, _split(wbuf, sizes)) == 16384
            rbuf[:] = bytes(len(rbuf))
            assert await call(engine.preadv, fd, offset, [memoryview(rbuf)]) == 16384
            assert rbuf[:] == wbuf[:]
        with open(tmp_path / "d", "rb") as f:
            f.seek(1 << 20)
            assert f.read(16384) == wbuf[:]
    finally:
        os.close(fd)


async def test_o_direct_misaligned_is_einval(engine: IOEngine, tmp_path: Path) -> None:
    # Allocated blocks: ext4 zero-fills holes without looking at the alignment.
    (tmp_path / "d").write_bytes(b"a" * 8192)
    fd = _open(tmp_path / "d", os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 2 * 4096)
    try:
        assert await call(engine.preadv, fd, 0, [memoryview(buf)[1:4097]]) == -errno.EINVAL
        assert await call(engine.preadv, fd, 1, [memoryview(buf)[:4096]]) == -errno.EINVAL
    finally:
        os.close(fd)


async def test_many_in_flight_with_plug(engine: IOEngine, tmp_path: Path) -> None:
    fd = _open(tmp_path / "m", os.O_RDWR | os.O_DIRECT)
    n = 64
    wbuf, rbuf = mmap.mmap(-1, n * 4096), mmap.mmap(-1, n * 4096)
    wbuf[:] = b"".join(_pattern(i, 4096) for i in range(n))
    loop = asyncio.get_running_loop()
    try:
        for src, method in ((wbuf, engine.pwritev), (rbuf, engine.preadv)):
            futs = [loop.create_future() for _ in range(n)]
            engine.plug()
            for i in range(n):
                # Scattered order, two segments each.
                j = (i * 37) % n
                iov = _split(memoryview(src)[j * 4096 : (j + 1) * 4096], [1024, 3072])
                method(fd, j * 4096, iov, futs[i].set_result)
            await asyncio.sleep(0.01)
            if engine.kind in BATCHING_KINDS:
                assert not any(f.done() for f in futs), "submitted before unplug"
            engine.unplug()
            assert await asyncio.wait_for(asyncio.gather(*futs), 5) == [4096] * n
        assert rbuf[:] == wbuf[:]
    finally:
        os.close(fd)


async def test_queue_deeper_than_the_engine(tmp_path: Path) -> None:
    """More requests than slots: the rest waits and runs as slots free up."""
    loop = asyncio.get_running_loop()
    fd = _open(tmp_path / "q", os.O_RDWR)
    for eng in (LinuxAioEngine(loop, depth=4), IoUringEngine(loop, depth=4)):
        try:
            n = 40
            bufs = [bytearray(_pattern(i, 512)) for i in range(n)]
            futs = [loop.create_future() for _ in range(n)]
            for i in range(n):
                eng.pwritev(fd, i * 512, [memoryview(bufs[i])], futs[i].set_result)
            assert await asyncio.wait_for(asyncio.gather(*futs), 5) == [512] * n
            assert os.pread(fd, n * 512, 0) == b"".join(bufs)
            assert sorted(eng._free) == list(range(eng._depth))  # every slot came back
        finally:
            eng.close()
    os.close(fd)


async def test_transfer_moves_everything_or_fails(engine: IOEngine, tmp_path: Path) -> None:
    """``transfer`` (the block layer's reads and writes, with the kernel queue engines'
    one-buffer fast path): 0 once every byte moved; a read that meets end of file gets
    zeroes for the rest (one buffer and a vector); errors come back as -errno."""
    fd = _open(tmp_path / "t", os.O_RDWR)
    try:
        one = bytearray(_pattern(1, 6000))
        assert await call(engine.transfer, OP_WRITE, fd, 0, [memoryview(one)], 6000) == 0
        two = bytearray(_pattern(2, 4000))
        assert await call(engine.transfer, OP_WRITE, fd, 6000, _split(two, [1000, 3000]), 4000) == 0
        disk = bytes(one + two)
        assert os.pread(fd, 20000, 0) == disk  # 10000 bytes
        buf = bytearray(b"\xff" * 8192)
        assert await call(engine.transfer, OP_READ, fd, 0, [memoryview(buf)], 8192) == 0
        assert buf == disk[:8192]
        buf[:] = b"\xff" * 8192
        assert await call(engine.transfer, OP_READ, fd, 4096, [memoryview(buf)], 8192) == 0
        assert buf == disk[4096:] + bytes(8192 - (10000 - 4096))
        buf[:] = b"\xff" * 8192
        got = await call(engine.transfer, OP_READ, fd, 8000, _split(buf, [1000, 7192]), 8192)
        assert got == 0
        assert buf == disk[8000:] + bytes(8192 - 2000)
        buf[:] = b"\xff" * 8192
        assert await call(engine.transfer, OP_READ, fd, 20000, [memoryview(buf)], 8192) == 0
        assert buf == bytes(8192)
    finally:
        os.close(fd)
    assert await call(engine.transfer, OP_READ, fd, 0, [memoryview(buf)], 8192) == -errno.EBADF
    assert await call(engine.transfer, OP_WRITE, fd, 0, [memoryview(buf)], 8192) == -errno.EBADF


async def test_transfer_o_direct_past_end_of_file(engine: IOEngine, tmp_path: Path) -> None:
    path = tmp_path / "td"
    path.write_bytes(_pattern(6, 6144))
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, 8192)
    try:
        buf[:] = b"\xff" * 8192
        assert await call(engine.transfer, OP_READ, fd, 4096, [memoryview(buf)], 8192) == 0
        assert buf[:] == _pattern(6, 6144)[4096:] + bytes(8192 - 2048)
    finally:
        os.close(fd)


async def test_transfer_deeper_than_the_engine(tmp_path: Path) -> None:
    """More transfers than slots: the fast path gives way to the queue, and the queued
    ones complete all-or-nothing too; every slot comes back."""
    loop = asyncio.get_running_loop()
    fd = _open(tmp_path / "tq", os.O_RDWR)
    for eng in (LinuxAioEngine(loop, depth=4), IoUringEngine(loop, depth=4)):
        try:
            n = 24
            bufs = [bytearray(_pattern(i, 512)) for i in range(n)]
            futs = [loop.create_future() for _ in range(n)]
            for i in range(n):
                eng.transfer(OP_WRITE, fd, i * 512, [memoryview(bufs[i])], 512, futs[i].set_result)
            assert await asyncio.wait_for(asyncio.gather(*futs), 5) == [0] * n
            back = [bytearray(b"\xff" * 1024) for _ in range(n)]
            futs = [loop.create_future() for _ in range(n)]
            for i in range(n):  # each read runs 512 bytes past the end for the last one
                eng.transfer(OP_READ, fd, i * 512, [memoryview(back[i])], 1024, futs[i].set_result)
            assert await asyncio.wait_for(asyncio.gather(*futs), 5) == [0] * n
            assert [bytes(b) for b in back[:-1]] == [
                bytes(bufs[i] + bufs[i + 1]) for i in range(n - 1)
            ]
            assert back[-1] == bufs[-1] + bytes(512)
            assert sorted(eng._free) == list(range(eng._depth))
        finally:
            eng.close()
    os.close(fd)


async def test_fdatasync(engine: IOEngine, tmp_path: Path) -> None:
    fd = _open(tmp_path / "s", os.O_RDWR)
    r, w = os.pipe()
    try:
        assert await call(engine.pwritev, fd, 0, [memoryview(b"hello")]) == 5
        assert await call(engine.fdatasync, fd) == 0
        assert await call(engine.fdatasync, r) == -errno.EINVAL  # a pipe cannot sync
    finally:
        for x in (fd, r, w):
            os.close(x)


async def test_punch_hole_and_zero_range(engine: IOEngine, tmp_path: Path) -> None:
    fd = _open(tmp_path / "p", os.O_RDWR)
    size = 64 * 1024
    data = _pattern(9, size)
    try:
        assert await call(engine.pwritev, fd, 0, [memoryview(data)]) == size
        os.fsync(fd)
        blocks = os.fstat(fd).st_blocks
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        assert await call(engine.fallocate, fd, mode, 16384, 16384) == 0
        st = os.fstat(fd)
        assert st.st_size == size
        assert st.st_blocks < blocks  # really deallocated
        assert await call(engine.fallocate, fd, FALLOC_FL_ZERO_RANGE, 40000, 1000) == 0
        back = bytearray(size)
        assert await call(engine.preadv, fd, 0, [memoryview(back)]) == size
        want = bytearray(data)
        want[16384:32768] = bytes(16384)
        want[40000:41000] = bytes(1000)
        assert back == want
        # errno from fallocate: an unsupported mode combination.
        assert await call(engine.fallocate, fd, FALLOC_FL_PUNCH_HOLE, 0, 4096) == -errno.EOPNOTSUPP
    finally:
        os.close(fd)


async def test_block_ioctls_on_a_regular_file_fail(engine: IOEngine, tmp_path: Path) -> None:
    fd = _open(tmp_path / "b", os.O_RDWR)
    try:
        assert await call(engine.blkdiscard, fd, 0, 4096) == -errno.ENOTTY
        assert await call(engine.blkzeroout, fd, 0, 4096) == -errno.ENOTTY
    finally:
        os.close(fd)


async def test_errno_propagation(engine: IOEngine, tmp_path: Path) -> None:
    path = tmp_path / "e"
    path.write_bytes(b"x" * 8192)
    wr = os.open(path, os.O_WRONLY)
    rd = os.open(path, os.O_RDONLY)
    rw = os.open(path, os.O_RDWR)
    buf = bytearray(4096)
    try:
        assert await call(engine.preadv, wr, 0, [memoryview(buf)]) == -errno.EBADF
        assert await call(engine.pwritev, rd, 0, [memoryview(buf)]) == -errno.EBADF
        assert await call(engine.pwritev, rw, 1 << 62, [memoryview(buf)]) == -errno.EFBIG
        assert await call(engine.preadv, -1, 0, [memoryview(buf)]) == -errno.EBADF
        assert await call(engine.preadv, rw, -4096, [memoryview(buf)]) == -errno.EINVAL
    finally:
        for x in (wr, rd, rw):
            os.close(x)


async def test_callbacks_never_run_inside_the_submit_call(engine: IOEngine) -> None:
    results: list[int] = []
    engine.preadv(-1, 0, [memoryview(bytearray(16))], results.append)
    engine.fdatasync(-1, results.append)
    assert results == []
    await asyncio.sleep(0.05)
    assert results == [-errno.EBADF, -errno.EBADF]


async def test_short_read_at_eof(engine: IOEngine, tmp_path: Path) -> None:
    path = tmp_path / "eof"
    path.write_bytes(_pattern(3, 10000))
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(16384)
        got = await call(engine.preadv, fd, 4096, _split(buf, [4096, 12288]))
        assert got == 10000 - 4096
        assert buf[:got] == _pattern(3, 10000)[4096:]
        assert await call(engine.preadv, fd, 20000, [memoryview(buf)]) == 0
    finally:
        os.close(fd)


async def test_short_read_at_eof_o_direct(engine: IOEngine, tmp_path: Path) -> None:
    path = tmp_path / "eofd"
    path.write_bytes(_pattern(4, 6000))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 16384)
    try:
        assert await call(engine.preadv, fd, 4096, [memoryview(buf)]) == 6000 - 4096
        assert buf[: 6000 - 4096] == _pattern(4, 6000)[4096:]
    finally:
        os.close(fd)


async def test_a_failing_callback_does_not_lose_other_completions(
    engine: IOEngine, tmp_path: Path
) -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    fd = _open(tmp_path / "c", os.O_RDWR)
    try:
        futs = [loop.create_future() for _ in range(8)]
        engine.plug()
        for i, fut in enumerate(futs):

            def done(ret: int, fut: asyncio.Future[int] = fut, i: int = i) -> None:
                fut.set_result(ret)
                if i % 2:
                    raise RuntimeError("callback bug")

            engine.pwritev(fd, i * 10, [memoryview(b"0123456789")], done)
        engine.unplug()
        assert await asyncio.wait_for(asyncio.gather(*futs), 5) == [10] * 8
        assert len(errors) == 4
    finally:
        loop.set_exception_handler(None)
        os.close(fd)


async def test_get_engine_one_per_loop_and_kind() -> None:
    a = get_engine("threads")
    assert get_engine("threads") is a
    b = get_engine("native")
    assert b is not a and get_engine("native") is b
    a.close()
    assert get_engine("threads") is not a
    with pytest.raises(ValueError):
        get_engine("posix")
    close_engines(asyncio.get_running_loop())


def test_engines_of_a_closed_loop_are_dropped() -> None:
    first = asyncio.run(_engine_of_this_loop())
    second = asyncio.run(_engine_of_this_loop())
    assert first is not second
    assert first.closed  # dropped (and closed) when the next loop asked


async def _engine_of_this_loop() -> IOEngine:
    return get_engine("threads")


async def test_setup_failures_raise_oserror() -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(OSError) as exc:
        LinuxAioEngine(loop, depth=10_000_000)  # beyond fs.aio-max-nr
    assert exc.value.errno in (errno.EAGAIN, errno.EINVAL)
    with pytest.raises(OSError, match="io_uring_setup failed") as exc:
        IoUringEngine(loop, depth=1 << 20)  # beyond IORING_MAX_ENTRIES
    assert exc.value.errno == errno.EINVAL


async def test_read_into_a_read_only_buffer_is_refused(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    fd = _open(tmp_path / "ro", os.O_RDWR)
    for eng in (LinuxAioEngine(loop, depth=4), IoUringEngine(loop, depth=4)):
        try:
            with pytest.raises(BufferError):
                eng.preadv(fd, 0, [memoryview(b"immutable")], lambda _ret: None)
            assert len(eng._free) == 4
            with pytest.raises(BufferError):  # the fast path gives the slot back too
                eng.transfer(OP_READ, fd, 0, [memoryview(b"immutable")], 9, lambda _ret: None)
            assert len(eng._free) == 4
        finally:
            eng.close()
    threads = ThreadPoolEngine(loop, workers=1)
    try:
        assert await call(threads.preadv, fd, 0, [memoryview(b"immutable")]) == -errno.EFAULT
    finally:
        threads.close()
    os.close(fd)


# -- partial transfers (forced with fakes: regular files rarely produce them) ---------


def test_thread_transfer_resubmits_the_remainder() -> None:
    calls: list[tuple[int, int]] = []
    store = bytearray(100)

    def short_write(fd: int, iov: list[memoryview], offset: int) -> int:
        calls.append((offset, sum(m.nbytes for m in iov)))
        first = iov[0][:7]  # never more than 7 bytes at a time
        store[offset : offset + first.nbytes] = first
        return first.nbytes

    data = bytes(range(30))
    got = _transfer(short_write, 0, 50, _split(data, [10, 5, 15]))
    assert got == 30
    assert store[50:80] == data
    assert calls[0] == (50, 30) and calls[1] == (57, 23)


def test_thread_transfer_stops_at_eof_and_reports_errors() -> None:
    answers = iter([4, 0])
    assert _transfer(lambda *_: next(answers), 0, 0, [memoryview(bytearray(10))]) == 4

    def fail(*_: object) -> int:
        raise OSError(errno.EIO, "boom")

    assert _transfer(fail, 0, 0, [memoryview(bytearray(10))]) == -errno.EIO


class _FakeKernelEngine(SlotEngine):
    """Records what would be submitted; completions are fed in by the test."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop, depth=2)
        self.submitted: list[tuple[int, int, int, int]] = []  # slot, op, offset, bytes
        self.prepared: list[tuple[int, int, int, int]] = []

    def _prep(self, slot: int, op: int, fd: int, offset: int, arg: Any) -> tuple[int, Any]:
        size = sum(m.nbytes for m in arg) if arg is not None else 0
        self.prepared.append((slot, op, offset, size))
        return size, None

    def _submit(self) -> None:
        self.submitted.extend(self.prepared)
        self.prepared.clear()


async def test_slot_engine_resubmits_partial_transfers_and_reports_eof() -> None:
    eng = _FakeKernelEngine(asyncio.get_running_loop())
    results: list[int] = []
    eng.preadv(3, 1000, _split(bytearray(300), [100, 200]), results.append)
    eng.pwritev(3, 0, [memoryview(b"x" * 50)], results.append)
    await asyncio.sleep(0)
    assert [s[1:] for s in eng.submitted] == [(OP_READ, 1000, 300), (OP_WRITE, 0, 50)]
    read_slot, write_slot = eng.submitted[0][0], eng.submitted[1][0]
    eng.submitted.clear()
    eng._deliver([(read_slot, 120), (write_slot, 50)])
    assert results == [50]  # the write is done; the read continues
    assert [s[1:] for s in eng.submitted] == [(OP_READ, 1120, 180)]
    eng._deliver([(eng.submitted[0][0], 30)])
    assert [s[1:] for s in eng.submitted[1:]] == [(OP_READ, 1150, 150)]
    eng._deliver([(eng.submitted[1][0], 0)])  # EOF
    assert results == [50, 150]
    # an error after a partial transfer fails the request
    eng.submitted.clear()
    eng.preadv(3, 0, [memoryview(bytearray(10))], results.append)
    await asyncio.sleep(0)
    eng._deliver([(eng.submitted[0][0], 4)])
    eng._deliver([(eng.submitted[1][0], -errno.EIO)])
    assert results == [50, 150, -errno.EIO]
    assert sorted(eng._free) == [0, 1]
    eng._close_helper()


async def test_slot_engine_transfer_after_partial_transfers() -> None:
    """``transfer`` through the queue (more than one buffer): a read continued after
    partial transfers that then meets end of file zero-fills the rest and succeeds; a
    write the file stops taking fails with ENOSPC; an error fails the request."""
    eng = _FakeKernelEngine(asyncio.get_running_loop())
    results: list[int] = []
    buf = bytearray(b"\xff" * 300)
    eng.transfer(OP_READ, 3, 1000, _split(buf, [100, 200]), 300, results.append)
    eng.transfer(OP_WRITE, 3, 0, _split(bytearray(50), [20, 30]), 50, results.append)
    await asyncio.sleep(0)
    read_slot, write_slot = eng.submitted[0][0], eng.submitted[1][0]
    eng.submitted.clear()
    eng._deliver([(read_slot, 120), (write_slot, 20)])
    assert results == []
    assert [s[1:] for s in eng.submitted] == [(OP_READ, 1120, 180), (OP_WRITE, 20, 30)]
    eng._deliver([(eng.submitted[0][0], 0), (eng.submitted[1][0], 0)])  # EOF, full disk
    assert results == [0, -errno.ENOSPC]
    assert buf == b"\xff" * 120 + bytes(180)  # the rest of the read is zeroes
    eng.submitted.clear()
    eng.transfer(OP_READ, 3, 0, _split(bytearray(10), [5, 5]), 10, results.append)
    await asyncio.sleep(0)
    eng._deliver([(eng.submitted[0][0], 4)])
    eng._deliver([(eng.submitted[1][0], -errno.EIO)])
    assert results == [0, -errno.ENOSPC, -errno.EIO]
    assert sorted(eng._free) == [0, 1]
    eng._close_helper()


def test_full_result() -> None:
    buf = bytearray(b"\xff" * 10)
    assert full_result(OP_READ, _split(buf, [3, 7]), 10, 10) == 0
    assert buf == b"\xff" * 10
    assert full_result(OP_READ, _split(buf, [3, 7]), 10, 5) == 0
    assert buf == b"\xff" * 5 + bytes(5)
    assert full_result(OP_READ, _split(buf, [3, 7]), 10, 0) == 0
    assert buf == bytes(10)
    assert full_result(OP_WRITE, [memoryview(buf)], 10, 9) == -errno.ENOSPC
    assert full_result(OP_WRITE, [memoryview(buf)], 10, 10) == 0
    assert full_result(OP_READ, [memoryview(buf)], 10, -errno.EIO) == -errno.EIO


def test_thread_engine_needs_a_loop() -> None:
    with pytest.raises(RuntimeError):
        ThreadPoolEngine()


async def test_close_releases_every_fd() -> None:
    loop = asyncio.get_running_loop()
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(3):
        engines: list[Any] = [ThreadPoolEngine(loop), LinuxAioEngine(loop), IoUringEngine(loop)]
        for eng in engines:
            await call(eng.fdatasync, -1)  # start the workers
            eng.close()
            assert eng.closed
        with pytest.raises(OSError):
            IoUringEngine(loop, depth=1 << 20)
    assert sorted(os.listdir("/proc/self/fd")) == before


async def test_native_completion_ring_is_polled(tmp_path: Path) -> None:
    """completions.poll() delivers what sits in the ring (a device polling instead of
    sleeping), and finds nothing when nothing is in flight."""
    from vexport.io import completions

    loop = asyncio.get_running_loop()
    eng = LinuxAioEngine(loop, depth=4)
    fd = _open(tmp_path / "p", os.O_RDWR)
    got: list[int] = []
    try:
        assert completions.poll() is False
        eng._completing = True  # as inside a delivery: no reading right after io_submit
        eng.pwritev(fd, 0, [memoryview(b"p" * 4096)], got.append)
        eng._flush()
        eng._completing = False
        assert got == []
        assert completions.poll() is True
        assert got == [4096]
        assert completions.poll() is False
        await asyncio.sleep(0.05)
        assert got == [4096]
    finally:
        eng.close()
        os.close(fd)
    assert eng._poll_ring not in completions._pollers
