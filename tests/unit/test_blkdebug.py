"""The blkdebug driver: inject-error rules on read_aio / write_aio / flush_to_disk.

Expected query output was taken from qemu-storage-daemon 7.2 (query-named-block-nodes
after the same --blockdev / blockdev-add).
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vexport import schema
from vexport.blockdev.blkdebug import BlkdebugNode
from vexport.blockdev.graph import BlockGraph
from vexport.blockdev.node import BlockNode
from vexport.errors import GenericError

MiB = 1 << 20
NULL_IMAGE = {"driver": "null-co", "size": MiB, "read-zeroes": True}


@pytest.fixture
def g() -> Iterator[BlockGraph]:
    graph = BlockGraph()
    yield graph
    graph.close_all()


def add(g: BlockGraph, rules: list[dict[str, Any]] | None = None, **extra: Any) -> BlockNode:
    opts: dict[str, Any] = {"driver": "blkdebug", "node-name": "d0", "image": dict(NULL_IMAGE)}
    if rules is not None:
        opts["inject-error"] = rules
    opts.update(extra)
    return g.add(schema.validate("blockdev-add", opts))


async def result(submit: Any) -> int:
    """Run a callback-style request; check it completes from the loop, not inline."""
    import asyncio

    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    inline = True

    def done(ret: int) -> None:
        assert not inline, "completion ran inside the submit call"
        fut.set_result(ret)

    submit(done)
    inline = False
    return await fut


async def read(node: BlockNode, offset: int, n: int = 512) -> int:
    buf = memoryview(bytearray(b"\xaa" * n))
    ret = await result(lambda d: node.preadv(offset, [buf], d))
    if ret == 0:
        assert bytes(buf) == bytes(n), "a read that passed must reach the image (read-zeroes)"
    return ret


async def write(node: BlockNode, offset: int, n: int = 512) -> int:
    return await result(lambda d: node.pwritev(offset, [memoryview(bytes(n))], d))


async def test_read_rule_on_sector_fails_only_covering_requests_once(g: BlockGraph) -> None:
    node = add(g, [{"event": "read_aio", "errno": 5, "sector": 8, "once": True}])
    assert isinstance(node, BlkdebugNode)
    assert await read(node, 0, 4096) == 0  # [0, 4096) does not hold byte 4096
    assert await read(node, 4096 + 512, 512) == 0
    assert await write(node, 4096, 512) == 0  # another event
    assert await read(node, 3584, 1024) == -errno.EIO  # covers byte 4096
    assert await read(node, 3584, 1024) == 0  # once: the rule is gone


async def test_rule_without_once_keeps_firing_and_default_errno_is_eio(g: BlockGraph) -> None:
    node = add(g, [{"event": "write_aio", "sector": 0}])
    for _ in range(3):
        assert await write(node, 0, 512) == -errno.EIO
    assert await write(node, 512, 512) == 0
    assert await read(node, 0, 512) == 0


async def test_any_sector_and_custom_errno(g: BlockGraph) -> None:
    node = add(g, [{"event": "write_aio", "errno": errno.ENOSPC}])
    assert await write(node, 0) == -errno.ENOSPC
    assert await write(node, MiB - 512) == -errno.ENOSPC
    assert await read(node, 0) == 0
    assert await result(node.flush) == 0


async def test_flush_to_disk_matches_only_any_sector_rules(g: BlockGraph) -> None:
    node = add(g, [{"event": "flush_to_disk", "sector": 0}])
    assert await result(node.flush) == 0  # a flush covers no byte
    g.close_all()
    node = add(g, [{"event": "flush_to_disk", "errno": errno.EROFS, "once": True}])
    assert await result(node.flush) == -errno.EROFS
    assert await result(node.flush) == 0
    assert await write(node, 0) == 0


async def test_first_matching_rule_decides(g: BlockGraph) -> None:
    node = add(
        g,
        [
            {"event": "read_aio", "errno": errno.ENOSPC, "sector": 1, "once": True},
            {"event": "read_aio", "errno": errno.EIO, "sector": 1},
        ],
    )
    assert await read(node, 512) == -errno.ENOSPC
    assert await read(node, 512) == -errno.EIO
    assert await read(node, 0) == 0


async def test_errno_zero_injects_nothing_and_keeps_the_rule(g: BlockGraph) -> None:
    node = add(g, [{"event": "read_aio", "errno": 0, "once": True}])
    assert await read(node, 0) == 0
    assert [r.errno for r in node.rules["read_aio"]] == [0]  # type: ignore[attr-defined]


async def test_state_iotype_and_negative_sector_filters(g: BlockGraph) -> None:
    node = add(
        g,
        [
            {"event": "read_aio", "state": 2},  # blkdebug is in state 1
            {"event": "read_aio", "iotype": "write"},  # not a read
            {"event": "read_aio", "sector": -5},  # matches nothing
            {"event": "write_aio", "state": 1, "iotype": "write", "errno": 28},
        ],
    )
    assert await read(node, 0) == 0
    assert await write(node, 0) == -errno.ENOSPC


async def test_other_events_are_accepted_and_never_fire(g: BlockGraph) -> None:
    node = add(g, [{"event": "pwritev"}, {"event": "l2_load"}, {"event": "flush_to_os"}])
    assert await write(node, 0) == 0
    assert await read(node, 0) == 0
    assert await result(node.flush) == 0
    assert await result(lambda d: node.discard(0, 512, d)) == 0
    assert await result(lambda d: node.write_zeroes(0, 512, False, d)) == 0


async def test_data_reaches_the_image_unchanged(g: BlockGraph, tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(bytes(MiB))
    node = g.add(
        schema.validate(
            "blockdev-add",
            {
                "driver": "blkdebug",
                "node-name": "d0",
                "image": {"driver": "file", "filename": str(path), "node-name": "f0"},
                "inject-error": [{"event": "write_aio", "sector": 100}],
            },
        )
    )
    await node.co_pwrite(4096, b"x" * 512)
    assert path.read_bytes()[4096:4608] == b"x" * 512
    assert await node.co_pread(4096, 512) == b"x" * 512
    with pytest.raises(OSError) as e:
        await node.co_pwrite(100 * 512, b"y" * 512)
    assert e.value.errno == errno.EIO
    assert path.read_bytes()[51200:51712] == bytes(512), "a failed write must not reach the file"
    await node.truncate(2 * MiB)
    assert path.stat().st_size == 2 * MiB and node.length == 2 * MiB
    assert g.get("f0") is not None and g.get("f0") in node.children


async def test_image_by_reference_and_length(g: BlockGraph) -> None:
    g.add({"driver": "null-co", "node-name": "n0", "size": 3 * MiB})
    node = g.add(
        schema.validate("blockdev-add", {"driver": "blkdebug", "node-name": "d1", "image": "n0"})
    )
    assert node.length == 3 * MiB
    with pytest.raises(GenericError, match="Block device n0 is in use"):
        g.delete("n0")


def test_align_checks(g: BlockGraph) -> None:
    with pytest.raises(GenericError, match=r"^Cannot meet constraints with align 3$"):
        add(g, align=3)
    with pytest.raises(GenericError, match=r"^Cannot meet constraints with align 2147483648$"):
        add(g, align=2147483648)
    with pytest.raises(GenericError, match="expects a non-negative number below 2\\^64"):
        add(g, align=-512)
    assert add(g, align=4096).length == MiB


def test_schema_needs_image_and_knows_the_events() -> None:
    with pytest.raises(GenericError, match="Parameter 'image' is missing"):
        schema.validate("blockdev-add", {"driver": "blkdebug", "node-name": "d"})
    with pytest.raises(GenericError):
        schema.validate(
            "blockdev-add",
            {
                "driver": "blkdebug",
                "node-name": "d",
                "image": "x",
                "inject-error": [{"event": "x"}],
            },
        )


def test_query_with_rules_matches_qsd(g: BlockGraph) -> None:
    node = add(g, [{"event": "read_aio", "errno": 5, "sector": 8, "once": True}])
    child = json.dumps(
        {"read-zeroes": True, "driver": "null-co", "size": MiB}, separators=(", ", ": ")
    )
    name = (
        'json:{"inject-error.0.once": true, "image": ' + child + ', "driver": "blkdebug", '
        '"inject-error.0.event": "read_aio", "inject-error.0.errno": 5, '
        '"inject-error.0.sector": 8}'
    )
    q = node.query()
    assert q["file"] == name
    assert q["drv"] == "blkdebug" and q["backing_file_depth"] == 1
    assert json.dumps(q["image"]) == json.dumps(
        {
            "backing-image": {
                "virtual-size": MiB,
                "filename": "json:" + child,
                "format": "null-co",
                "actual-size": 0,
            },
            "virtual-size": MiB,
            "filename": name,
            "format": "blkdebug",
        }
    )
    assert list(q) == list(g.get(node.children[0].node_name).query())  # type: ignore[union-attr]


def test_query_plain_child_gives_blkdebug_prefix(g: BlockGraph, tmp_path: Path) -> None:
    node = g.add({"driver": "blkdebug", "node-name": "e1", "image": {"driver": "null-co"}})
    assert node.query()["file"] == "blkdebug::null-co://"
    path = tmp_path / "img"
    path.write_bytes(bytes(MiB))
    node = g.add(
        {
            "driver": "blkdebug",
            "node-name": "d3",
            "image": {"driver": "file", "filename": str(path)},
        }
    )
    image = node.query()["image"]
    assert image["filename"] == f"blkdebug::{path}"
    assert image["dirty-flag"] is False and "actual-size" not in image
    assert image["backing-image"]["filename"] == str(path)
    assert image["backing-image"]["dirty-flag"] is False


def test_query_flattens_every_rule_key(g: BlockGraph) -> None:
    node = add(
        g,
        [
            {
                "event": "read_aio",
                "state": 2,
                "iotype": "write",
                "errno": 5,
                "sector": 3,
                "once": False,
                "immediately": True,
            },
            {"event": "pwritev"},
        ],
        image={"driver": "null-co"},
        align=0,
    )
    # QSD 7.2 for the same rules (without align): the key order is QDict's.
    expected_keys = [
        "inject-error.0.state",
        "inject-error.0.immediately",
        "inject-error.0.once",
        "image",
        "driver",
        "inject-error.0.iotype",
        "inject-error.0.event",
        "inject-error.0.errno",
        "inject-error.1.event",
        "inject-error.0.sector",
    ]
    shown = json.loads(node.query()["file"][len("json:") :])
    assert [k for k in shown if k != "align"] == expected_keys
    assert shown["align"] == 0 and shown["inject-error.0.once"] is False
