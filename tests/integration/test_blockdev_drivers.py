"""The file, host_device and raw drivers on real files (and a loop device when possible)."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vexport.blockdev.file import FileNode
from vexport.blockdev.graph import BlockGraph
from vexport.blockdev.node import BlockNode
from vexport.blockdev.perms import PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE
from vexport.errors import GenericError

MiB = 1 << 20


@pytest.fixture
def img(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(MiB)
    return path


@pytest.fixture
def g() -> Iterator[BlockGraph]:
    graph = BlockGraph()
    yield graph
    graph.close_all()


def aligned(n: int) -> memoryview:
    return memoryview(mmap.mmap(-1, n))


def file_opts(path: Path, **extra: Any) -> dict[str, Any]:
    return {"driver": "file", "node-name": "f", "filename": str(path), **extra}


ENGINES = [
    {"aio": "threads"},
    {"aio": "threads", "cache": {"direct": True}},
    {"aio": "native", "cache": {"direct": True}},
    {"aio": "io_uring"},
]


@pytest.mark.parametrize("opts", ENGINES, ids=lambda o: f"{o['aio']}-{'cache' in o}")
async def test_file_read_write_roundtrip(g: BlockGraph, img: Path, opts: dict[str, Any]) -> None:
    try:
        node = g.add(file_opts(img, **opts))
    except GenericError as e:
        pytest.skip(f"engine unavailable here: {e.desc}")
    assert node.length == MiB
    data = bytes(range(256)) * 16  # 4 KiB
    wbuf = aligned(8192)
    wbuf[:4096] = data
    wbuf[4096:] = data[::-1]
    await node.co_pwritev(65536, [wbuf[:4096], wbuf[4096:]])
    await node.co_flush()
    rbuf = aligned(8192)
    await node.co_preadv(65536, [rbuf[:512], rbuf[512:]])
    assert bytes(rbuf) == data + data[::-1]
    with open(img, "rb") as f:
        f.seek(65536)
        assert f.read(8192) == data + data[::-1]


def test_cache_direct_opens_o_direct(g: BlockGraph, img: Path) -> None:
    direct = g.add(file_opts(img, cache={"direct": True, "no-flush": True}))
    buffered = g.add(file_opts(img, **{"node-name": "b"}))
    assert isinstance(direct, FileNode) and isinstance(buffered, FileNode)
    assert fcntl.fcntl(direct.fd, fcntl.F_GETFL) & os.O_DIRECT
    assert not fcntl.fcntl(buffered.fd, fcntl.F_GETFL) & os.O_DIRECT
    assert direct.query()["cache"] == {"no-flush": True, "direct": True, "writeback": True}


async def test_short_read_at_eof_is_zero_filled(g: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(b"\x11" * 1000)
    node = g.add(file_opts(path))
    assert node.length == 1024  # rounded up like QEMU
    buf = bytearray(b"\xff" * 1024)
    await node.co_preadv(0, [memoryview(buf)])
    assert buf == b"\x11" * 1000 + bytes(24)


@pytest.mark.parametrize("unmap", [False, True])
async def test_discard_and_write_zeroes_read_back_zeros(
    g: BlockGraph, img: Path, unmap: bool
) -> None:
    node = g.add(file_opts(img, discard="unmap"))
    await node.co_pwrite(0, b"\x5a" * 65536)
    await node.co_write_zeroes(4096, 8192, unmap=unmap)
    await node.co_discard(32768, 16384)
    got = await node.co_pread(0, 65536)
    assert got[:4096] == b"\x5a" * 4096
    assert got[4096:12288] == bytes(8192)
    assert got[12288:32768] == b"\x5a" * 20480
    assert got[32768:49152] == bytes(16384)
    assert got[49152:] == b"\x5a" * 16384
    assert node.length == MiB


async def test_discard_ignored_by_default(g: BlockGraph, img: Path) -> None:
    node = g.add(file_opts(img))
    await node.co_pwrite(0, b"\x5a" * 4096)
    await node.co_discard(0, 4096)
    assert await node.co_pread(0, 4096) == b"\x5a" * 4096


async def test_detect_zeroes_unmap_punches_holes(g: BlockGraph, img: Path) -> None:
    node = g.add(file_opts(img, discard="unmap", **{"detect-zeroes": "unmap"}))
    assert node.direct_io(True) is None  # writes must go through pwritev's check
    await node.co_pwrite(0, b"\x01" * 65536)
    before = os.stat(img).st_blocks
    await node.co_pwrite(0, bytes(65536))
    assert os.stat(img).st_blocks < before
    assert await node.co_pread(0, 65536) == bytes(65536)


async def test_truncate_and_listeners(g: BlockGraph, img: Path) -> None:
    f = g.add(file_opts(img))
    r = g.add({"driver": "raw", "node-name": "r", "file": "f", "offset": 4096})
    seen: list[int] = []
    r.resize_listeners.append(seen.append)
    await r.truncate(2 * MiB)
    assert os.path.getsize(img) == 2 * MiB + 4096
    assert f.length == 2 * MiB + 4096 and r.length == 2 * MiB
    await f.truncate(8192 + 1000)
    assert os.path.getsize(img) == 9192
    assert r.length == 5120  # 9192 - 4096 = 5096, shown rounded up
    assert seen == [2 * MiB, 5120]


async def test_read_only_refuses_writes(g: BlockGraph, img: Path) -> None:
    node = g.add(file_opts(img, **{"read-only": True}))
    assert node.read_only and node.query()["ro"] is True
    # Reads may bypass preadv's range check (vduse-blk's fast path); writes may not.
    assert node.direct_io(False) is not None and node.direct_io(True) is None
    for coro in (node.co_pwrite(0, b"x" * 512), node.co_write_zeroes(0, 512)):
        with pytest.raises(OSError) as ei:
            await coro
        assert ei.value.errno == errno.EPERM
    with pytest.raises(GenericError, match=r"^Image is read-only$"):
        await node.truncate(4096)
    assert os.path.getsize(img) == MiB


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[Path]:
    """A file that cannot be opened for writing, not even by root (chattr +i)."""
    path = tmp_path / "immutable.img"
    path.write_bytes(bytes(4096))
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)]).returncode:
        pytest.skip("cannot make an immutable file here")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_auto_read_only_falls_back(g: BlockGraph, immutable: Path) -> None:
    with pytest.raises(GenericError) as ei:
        g.add(file_opts(immutable))
    assert ei.value.desc == f"Could not open '{immutable}': Operation not permitted"
    node = g.add(file_opts(immutable, **{"auto-read-only": True}))
    assert node.read_only and node.query()["ro"] is True


def test_open_errors(g: BlockGraph, img: Path, tmp_path: Path) -> None:
    cases = [
        (file_opts(tmp_path / "missing"),
         f"Could not open '{tmp_path}/missing': No such file or directory"),
        (file_opts(tmp_path), f"Could not open '{tmp_path}': Is a directory"),
        (file_opts(tmp_path, **{"read-only": True}),
         f"'file' driver requires '{tmp_path}' to be a regular file"),
        ({"driver": "host_device", "node-name": "h", "filename": str(img)},
         f"'host_device' driver requires '{img}' to be either a character or block device"),
        (file_opts(img, aio="native"),
         "aio=native was specified, but it requires cache.direct=on, which was not specified."),
    ]  # fmt: skip
    for opts, msg in cases:
        with pytest.raises(GenericError) as ei:
            g.add(opts)
        assert ei.value.desc == msg
    assert g.nodes == []


async def test_raw_window_over_file(g: BlockGraph, img: Path) -> None:
    r = g.add(
        {
            "driver": "raw",
            "node-name": "r",
            "file": {"driver": "file", "filename": str(img)},
            "offset": 8192,
            "size": 4096,
        }
    )
    assert r.length == 4096
    await r.co_pwrite(0, b"A" * 512)
    await r.co_pwrite(4096 - 512, b"B" * 512)
    with pytest.raises(OSError):
        await r.co_pwrite(4096, b"C" * 512)
    data = img.read_bytes()
    assert data[8192 : 8192 + 512] == b"A" * 512
    assert data[12288 - 512 : 12288] == b"B" * 512
    assert data.count(0) == MiB - 1024
    q = r.query()
    assert q["image"]["dirty-flag"] is False and q["image"]["format"] == "raw"
    assert q["file"] == (
        f'json:{{"offset": 8192, "driver": "raw", "size": 4096, '
        f'"file": {{"driver": "file", "filename": "{img}"}}}}'
    )
    assert r.children[0].query()["file"] == str(img)


# -- locking ------------------------------------------------------------------------------------
def test_locks_between_two_opens(img: Path) -> None:
    a, b = BlockGraph(), BlockGraph()
    try:
        fa = a.add(file_opts(img))
        fb = b.add(file_opts(img))
        a.add_user(fa, "e", PERM_CONSISTENT_READ | PERM_WRITE, PERM_ALL & ~PERM_WRITE)
        with pytest.raises(GenericError, match=r'^Failed to get "write" lock$'):
            b.add_user(fb, "e", PERM_CONSISTENT_READ | PERM_WRITE, PERM_ALL)
        with pytest.raises(GenericError, match=r'^Failed to get shared "write" lock$'):
            b.add_user(fb, "e", PERM_CONSISTENT_READ, PERM_ALL & ~PERM_WRITE)
        b.add_user(fb, "e", PERM_CONSISTENT_READ, PERM_ALL)  # a reader sharing all is fine
        a.remove_user(fa, "e")
        b.remove_user(fb, "e")
        b.add_user(fb, "e", PERM_CONSISTENT_READ | PERM_WRITE, PERM_ALL)
        nolock = a.add(file_opts(img, **{"node-name": "nl", "locking": "off"}))
        a.add_user(nolock, "e", PERM_WRITE, 0)
    finally:
        a.close_all()
        b.close_all()


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="needs qemu-img")
async def test_locks_seen_by_qemu(g: BlockGraph, img: Path) -> None:
    f = g.add(file_opts(img))
    g.add_user(f, "e", PERM_CONSISTENT_READ | PERM_WRITE, PERM_ALL & ~PERM_RESIZE)
    r = subprocess.run(
        ["qemu-img", "resize", "-f", "raw", str(img), "2M"], capture_output=True, text=True
    )
    assert r.returncode != 0 and 'Failed to get "resize" lock' in r.stderr
    assert os.path.getsize(img) == MiB
    g.remove_user(f, "e")
    # The other way round: qemu-io holds "write" while we refuse to share it.
    proc = subprocess.Popen(
        ["qemu-io", "-f", "raw", str(img)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdin and proc.stdout
        proc.stdin.write(b"help\n")  # its answer means the image is open
        proc.stdin.flush()
        proc.stdout.readline()
        with pytest.raises(GenericError, match=r'^Failed to get shared "write" lock$'):
            g.add_user(f, "e", PERM_CONSISTENT_READ, PERM_ALL & ~PERM_WRITE)
    finally:
        proc.kill()
        proc.wait()
    g.add_user(f, "e", PERM_CONSISTENT_READ, PERM_ALL & ~PERM_WRITE)
    await f.truncate(2 * MiB)
    assert os.path.getsize(img) == 2 * MiB


# -- host_device on a loop device ------------------------------------------------------------------
@pytest.fixture
def loopdev(img: Path) -> Iterator[str]:
    if not shutil.which("losetup"):
        pytest.skip("no losetup")
    r = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot set up a loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


async def test_host_device(g: BlockGraph, loopdev: str, img: Path) -> None:
    with pytest.raises(GenericError, match=r"'file' driver requires .* to be a regular file"):
        g.add({"driver": "file", "node-name": "x", "filename": loopdev})
    node: BlockNode = g.add(
        {"driver": "host_device", "node-name": "h", "filename": loopdev, "discard": "unmap"}
    )
    assert node.length == MiB
    await node.co_pwrite(4096, b"\x77" * 8192)
    await node.co_flush()
    assert await node.co_pread(4096, 8192) == b"\x77" * 8192
    await node.co_write_zeroes(4096, 4096)
    await node.co_discard(8192, 4096)
    assert await node.co_pread(4096, 8192) == bytes(8192)
    with pytest.raises(GenericError, match=r"^Cannot grow device files$"):
        await node.truncate(2 * MiB)
    await node.truncate(4096)  # shrinking a device changes nothing
    assert node.length == MiB
