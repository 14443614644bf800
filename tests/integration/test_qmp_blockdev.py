"""The block graph driven over QMP with the qemu.qmp client, as a user's script would.

blockdev-add of every driver, query-named-block-nodes, block_resize, blockdev-del and
their errors, then quit; against a real ``vexport`` process.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

MiB = 1 << 20


@pytest.fixture
def image(short_tmp: Path) -> Path:
    path = short_tmp / "disk.img"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    return path


@pytest.fixture
def loop_device(short_tmp: Path) -> Iterator[str]:
    backing = short_tmp / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(8 * MiB)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], check=True, capture_output=True, text=True
    ).stdout.strip()
    yield dev
    subprocess.run(["losetup", "-d", dev], check=False)


@pytest.fixture
async def qmp(start_vexport) -> AsyncIterator[QMPClient]:  # type: ignore[no-untyped-def]
    daemon = start_vexport()
    client = QMPClient("blockdev-test")
    await client.connect(daemon.qmp_path)
    client.daemon = daemon  # type: ignore[attr-defined]
    yield client
    with contextlib.suppress(Exception):
        await client.disconnect()


async def error_of(qmp: QMPClient, cmd: str, args: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(ExecuteError) as info:
        await qmp.execute(cmd, args)
    return info.value.error_class, info.value.error.error.desc


async def nodes(qmp: QMPClient) -> dict[str, dict[str, Any]]:
    result = await qmp.execute("query-named-block-nodes", {"flat": True})
    assert isinstance(result, list)
    return {n["node-name"]: n for n in result}


async def test_every_driver(qmp: QMPClient, image: Path, loop_device: str) -> None:
    await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "nc", "size": 1000})
    await qmp.execute(
        "blockdev-add",
        {"driver": "null-aio", "node-name": "na", "size": MiB, "latency-ns": 1000},
    )
    await qmp.execute("blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(image)})
    await qmp.execute(
        "blockdev-add",
        {"driver": "raw", "node-name": "r0", "file": "f0", "offset": MiB, "size": 2 * MiB},
    )
    await qmp.execute(
        "blockdev-add",
        {
            "driver": "host_device",
            "node-name": "hd",
            "filename": loop_device,
            "aio": "native",
            "cache": {"direct": True},
        },
    )
    await qmp.execute(
        "blockdev-add",
        {
            "driver": "blkdebug",
            "node-name": "dbg",
            "image": {"driver": "null-co", "node-name": "dbgimg"},
            "inject-error": [{"event": "read_aio", "errno": 5, "sector": 8, "once": True}],
        },
    )
    listed = await qmp.execute("query-named-block-nodes")
    assert isinstance(listed, list)
    # Newest first, as QSD lists them.
    assert [n["node-name"] for n in listed][:6] == ["dbg", "dbgimg", "hd", "r0", "f0", "na"]
    by_name = await nodes(qmp)
    assert by_name["nc"]["image"]["virtual-size"] == 1024  # rounded up to 512
    assert by_name["nc"]["drv"] == "null-co"
    assert by_name["na"]["drv"] == "null-aio"
    assert by_name["f0"]["image"]["virtual-size"] == 4 * MiB
    assert by_name["f0"]["file"] == str(image)
    assert by_name["r0"]["image"]["virtual-size"] == 2 * MiB
    assert by_name["hd"]["image"]["virtual-size"] == 8 * MiB
    assert by_name["hd"]["cache"]["direct"] is True
    assert by_name["dbg"]["drv"] == "blkdebug"
    for name in ("dbg", "r0", "hd", "f0", "na", "nc"):
        await qmp.execute("blockdev-del", {"node-name": name})
    assert await nodes(qmp) == {}


async def test_errors(qmp: QMPClient, image: Path, short_tmp: Path) -> None:
    await qmp.execute("blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(image)})
    await qmp.execute("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "f0"})
    missing = short_tmp / "missing.img"
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("blockdev-add", {"driver": "null-co", "node-name": "f0"},
         "Duplicate nodes with node-name='f0'"),
        ("blockdev-add", {"driver": "file", "node-name": "m", "filename": str(missing)},
         f"Could not open '{missing}': No such file or directory"),
        ("blockdev-add", {"driver": "null-co", "node-name": "x", "size": "big"},
         "Invalid parameter type for 'size', expected: integer"),
        ("blockdev-add", {"driver": "null-co", "node-name": "x", "bogus": 1},
         "Parameter 'bogus' is unexpected"),
        ("blockdev-add", {"driver": "qcow9", "node-name": "x"},
         "Parameter 'driver' does not accept value 'qcow9'"),
        ("blockdev-add", {"driver": "null-co", "node-name": "x", "size": -1},
         "Parameter 'size' expects a non-negative number below 2^64"),
        ("blockdev-add", {"driver": "host_device", "node-name": "x", "filename": str(image)},
         f"'host_device' driver requires '{image}' to be either a character or block device"),
        ("blockdev-add", {"driver": "file", "node-name": "x", "filename": str(image),
                          "aio": "native"},
         "aio=native was specified, but it requires cache.direct=on, which was not specified."),
        ("blockdev-add", {"driver": "null-co", "node-name": "1abc"}, "Invalid node-name: '1abc'"),
        ("blockdev-del", {"node-name": "nope"}, "Failed to find node with node-name='nope'"),
        ("blockdev-del", {"node-name": "f0"}, "Block device f0 is in use"),
        ("block_resize", {"node-name": "nope", "size": MiB},
         "Cannot find device='' nor node-name='nope'"),
    ]  # fmt: skip
    for cmd, args, desc in cases:
        assert await error_of(qmp, cmd, args) == ("GenericError", desc), (cmd, args)
    # Nothing half-made is left behind.
    assert set(await nodes(qmp)) == {"f0", "r0"}


async def test_block_resize(qmp: QMPClient, image: Path) -> None:
    await qmp.execute("blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(image)})
    await qmp.execute("block_resize", {"node-name": "f0", "size": 6 * MiB})
    assert image.stat().st_size == 6 * MiB
    assert (await nodes(qmp))["f0"]["image"]["virtual-size"] == 6 * MiB
    await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    assert await error_of(qmp, "block_resize", {"node-name": "n0", "size": MiB}) == (
        "GenericError",
        "Image format driver does not support resize",
    )


async def test_quit_ends_the_daemon(qmp: QMPClient) -> None:
    await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    assert await qmp.execute("quit") == {}
    daemon = qmp.daemon  # type: ignore[attr-defined]
    assert daemon.wait(10) == 0
    assert not Path(daemon.qmp_path).exists()
