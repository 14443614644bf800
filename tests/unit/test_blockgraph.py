"""Block graph bookkeeping, node-name rules, the null drivers and raw's arithmetic."""

from __future__ import annotations

import asyncio
import errno
import json
import random
import re
from typing import Any

import pytest

from vexport.blockdev import DRIVERS
from vexport.blockdev.graph import BlockGraph
from vexport.blockdev.names import is_wellformed, json_filename, qdict_order
from vexport.blockdev.node import BlockNode, Done, iov_is_zero
from vexport.blockdev.null import NullNode
from vexport.blockdev.perms import PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE
from vexport.errors import GenericError


class RecordingNode(NullNode):
    """A null-co node that records the requests reaching it and can be resized."""

    driver = "null-co"

    def __init__(self, node_name: str, options: dict[str, Any]) -> None:
        super().__init__(node_name, options)
        self.log: list[tuple[Any, ...]] = []

    def _preadv(self, offset: int, iov: list[memoryview], nbytes: int, done: Done) -> None:
        self.log.append(("read", offset, nbytes))
        super()._preadv(offset, iov, nbytes, done)

    def _pwritev(self, offset: int, iov: list[memoryview], nbytes: int, done: Done) -> None:
        self.log.append(("write", offset, nbytes))
        super()._pwritev(offset, iov, nbytes, done)

    def _discard(self, offset: int, length: int, done: Done) -> None:
        self.log.append(("discard", offset, length))
        super()._discard(offset, length, done)

    def _write_zeroes(self, offset: int, length: int, unmap: bool, done: Done) -> None:
        self.log.append(("zeroes", offset, length, unmap))
        super()._write_zeroes(offset, length, unmap, done)

    async def _truncate(self, length: int) -> None:
        self.size = length


def graph(recording: bool = False) -> BlockGraph:
    drivers = dict(DRIVERS)
    if recording:
        drivers["null-co"] = RecordingNode
    return BlockGraph(drivers, rng=random.Random(1))


# -- names ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a", "a-b_c.d", "Z9", "a" * 40])
def test_wellformed_names(name: str) -> None:
    assert is_wellformed(name)


@pytest.mark.parametrize("name", ["", "1abc", "a b", "-a", "#block1", "é", "a,b"])
def test_malformed_names(name: str) -> None:
    assert not is_wellformed(name)
    with pytest.raises(GenericError, match=re.escape(f"Invalid node-name: '{name}'")):
        graph().add({"driver": "null-co", "node-name": name})


def test_node_name_length_limit() -> None:
    g = graph()
    g.add({"driver": "null-co", "node-name": "a" * 31})
    with pytest.raises(GenericError, match=r"^Node name too long$"):
        g.add({"driver": "null-co", "node-name": "a" * 32})


def test_qdict_order_matches_qsd() -> None:
    # Orders observed in QSD 7.2's json: filenames.
    assert list(qdict_order({"driver": 1, "size": 2, "read-zeroes": 3})) == [
        "read-zeroes",
        "driver",
        "size",
    ]
    assert list(qdict_order({"driver": 1, "file": 2, "size": 3, "offset": 4})) == [
        "offset",
        "driver",
        "size",
        "file",
    ]
    assert json_filename({"size": 1000, "driver": "null-co"}) == (
        'json:{"driver": "null-co", "size": 1000}'
    )


# -- adding --------------------------------------------------------------------------------
def test_add_requires_root_node_name() -> None:
    with pytest.raises(GenericError, match=r"^'node-name' must be specified for the root node$"):
        graph().add({"driver": "null-co"})


def test_duplicate_and_listing_newest_first() -> None:
    g = graph()
    a = g.add({"driver": "null-co", "node-name": "a"})
    b = g.add({"driver": "null-aio", "node-name": "b"})
    with pytest.raises(GenericError, match=r"^Duplicate nodes with node-name='a'$"):
        g.add({"driver": "null-co", "node-name": "a"})
    assert g.nodes == [b, a]
    assert g.get("a") is a and g.get("zz") is None
    assert (a.driver, b.driver) == ("null-co", "null-aio")


def test_duplicate_between_parent_and_inline_child() -> None:
    g = graph()
    with pytest.raises(GenericError, match=r"Duplicate nodes with node-name='x'"):
        g.add({"driver": "raw", "node-name": "x", "file": {"driver": "null-co", "node-name": "x"}})
    assert g.nodes == []


def test_inline_child_gets_generated_name_and_inherits() -> None:
    g = graph()
    raw = g.add(
        {
            "driver": "raw",
            "node-name": "r",
            "read-only": True,
            "cache": {"direct": True, "no-flush": True},
            "file": {"driver": "null-co"},
        }
    )
    raw2 = g.add({"driver": "raw", "node-name": "r2", "file": {"driver": "null-co"}})
    child, child2 = raw.children[0], raw2.children[0]
    assert re.fullmatch(r"#block0\d\d", child.node_name)
    assert re.fullmatch(r"#block1\d\d", child2.node_name)
    assert child.read_only and child.cache_direct and child.no_flush and child.discard_unmap
    assert not child2.read_only and not child2.cache_direct and child2.discard_unmap
    assert not raw.discard_unmap  # blockdev-add's default is discard=ignore
    assert child.parents == [raw]
    assert g.nodes == [raw2, child2, raw, child]


def test_child_reference_and_unknown_reference() -> None:
    g = graph()
    n = g.add({"driver": "null-co", "node-name": "n"})
    r = g.add({"driver": "raw", "node-name": "r", "file": "n"})
    assert r.children == [n] and n.parents == [r]
    with pytest.raises(GenericError, match=r"^Cannot find device='nope' nor node-name='nope'$"):
        g.add({"driver": "raw", "node-name": "x", "file": "nope"})


def test_failed_add_closes_inline_children() -> None:
    g = graph()
    with pytest.raises(GenericError, match=r"^Offset \(8192\) cannot be greater"):
        g.add(
            {
                "driver": "raw",
                "node-name": "x",
                "file": {"driver": "null-co", "node-name": "c", "size": 4096},
                "offset": 8192,
            }
        )
    assert g.nodes == [] and g.get("c") is None
    g.add({"driver": "null-co", "node-name": "c"})  # the name is free again


def test_common_option_checks() -> None:
    g = graph()
    with pytest.raises(GenericError, match=r"^force-share=on can only be used with read-only"):
        g.add({"driver": "null-co", "node-name": "a", "force-share": True})
    with pytest.raises(GenericError, match=r"^setting detect-zeroes to unmap is not allowed"):
        g.add({"driver": "null-co", "node-name": "a", "detect-zeroes": "unmap"})
    g.add({"driver": "null-co", "node-name": "a", "force-share": True, "read-only": True})


# -- deleting and users ----------------------------------------------------------------------
def test_delete_rules() -> None:
    g = graph()
    with pytest.raises(GenericError, match=r"^Failed to find node with node-name='x'$"):
        g.delete("x")
    n = g.add({"driver": "null-co", "node-name": "n"})
    r = g.add({"driver": "raw", "node-name": "r", "file": "n"})
    inline = g.add({"driver": "raw", "node-name": "r2", "file": {"driver": "null-co"}})
    child = inline.children[0]
    with pytest.raises(GenericError, match=r"^Block device n is in use$"):
        g.delete("n")
    with pytest.raises(GenericError) as ei:
        g.delete(child.node_name)
    assert ei.value.desc == f"Node {child.node_name} is not owned by the monitor"
    g.add_user(r, "export e")
    assert g.users(r) == ["export e"]
    with pytest.raises(GenericError, match=r"^Node r is in use$"):
        g.delete("r")
    g.remove_user(r, "export e")
    g.delete("r")
    assert r.closed and n.parents == [] and not n.closed
    g.delete("n")
    g.delete("r2")  # takes its inline child with it
    assert g.nodes == [] and child.closed


def test_lookup_errors() -> None:
    g = graph()
    n = g.add({"driver": "null-co", "node-name": "n"})
    assert g.lookup(None, "n") is n and g.lookup("", "n") is n
    with pytest.raises(GenericError, match=r"^Cannot find device='' nor node-name='x'$"):
        g.lookup(None, "x")
    with pytest.raises(GenericError, match=r"^Cannot find device='n' nor node-name=''$"):
        g.lookup("n", None)


def test_permissions() -> None:
    g = graph()
    ro = g.add({"driver": "null-co", "node-name": "ro", "read-only": True})
    with pytest.raises(GenericError, match=r"^Block node is read-only$"):
        g.add_user(ro, "e", PERM_CONSISTENT_READ | PERM_WRITE)
    assert g.users(ro) == []
    g.add_user(ro, "e")
    # raw over a read-only child is itself writable in QEMU, but cannot get write.
    r = g.add({"driver": "raw", "node-name": "r", "file": "ro"})
    assert not r.read_only
    with pytest.raises(GenericError, match=r"^Block node is read-only$"):
        g.add_user(r, "w", PERM_CONSISTENT_READ | PERM_WRITE)
    assert r.perm == 0 and ro.perm == PERM_CONSISTENT_READ

    n = g.add({"driver": "null-co", "node-name": "n"})
    g.add_user(n, "a", PERM_CONSISTENT_READ | PERM_WRITE, PERM_ALL & ~PERM_RESIZE)
    with pytest.raises(GenericError, match=r"permissions 'resize' are both required"):
        g.add_user(n, "b", PERM_RESIZE, PERM_ALL)
    assert n.perm == PERM_CONSISTENT_READ | PERM_WRITE
    assert n.shared == PERM_ALL & ~PERM_RESIZE
    g.remove_user(n, "a")
    assert (n.perm, n.shared) == (0, PERM_ALL)


# -- null drivers -----------------------------------------------------------------------------
async def test_null_sizes_and_query() -> None:
    g = graph()
    a = g.add({"driver": "null-co", "node-name": "a"})
    b = g.add({"driver": "null-co", "node-name": "b", "size": 1000, "read-zeroes": True})
    c = g.add({"driver": "null-aio", "node-name": "c", "latency-ns": 5})
    assert (a.length, b.length, c.length) == (1 << 30, 1024, 1 << 30)
    qa, qb, qc = a.query(), b.query(), c.query()
    assert qa["file"] == qa["image"]["filename"] == "null-co://"
    assert qc["file"] == "null-aio://"  # latency-ns is not part of the filename
    assert qb["file"] == 'json:{"read-zeroes": true, "driver": "null-co", "size": 1000}'
    assert qb["image"] == {
        "virtual-size": 1024,
        "filename": qb["file"],
        "format": "null-co",
        "actual-size": 0,
    }
    assert list(qa) == [
        "iops_rd", "detect_zeroes", "image", "iops_wr", "ro", "node-name",
        "backing_file_depth", "drv", "iops", "bps_wr", "write_threshold", "encrypted",
        "bps", "bps_rd", "cache", "file",
    ]  # fmt: skip
    assert qa["cache"] == {"no-flush": False, "direct": False, "writeback": True}
    assert (qa["ro"], qa["drv"], qa["node-name"], qa["detect_zeroes"]) == (
        False,
        "null-co",
        "a",
        "off",
    )


async def test_null_reads() -> None:
    g = graph()
    garbage = g.add({"driver": "null-co", "node-name": "g"})
    zeroes = g.add({"driver": "null-aio", "node-name": "z", "read-zeroes": True})
    assert await garbage.co_pread(0, 8) == bytes(8)  # fresh bytearray: untouched
    buf = bytearray(b"\xaa" * 1024)
    await garbage.co_preadv(512, [memoryview(buf)])
    assert buf == b"\xaa" * 1024
    await zeroes.co_preadv(512, [memoryview(buf)[:100], memoryview(buf)[100:]])
    assert buf == bytes(1024)


async def test_done_is_never_synchronous() -> None:
    g = graph()
    n = g.add({"driver": "null-co", "node-name": "n", "size": 4096})
    results: list[int] = []
    buf = memoryview(bytearray(512))
    n.preadv(0, [buf], results.append)
    n.preadv(4096, [buf], results.append)  # out of range
    n.flush(results.append)
    assert results == []
    await asyncio.sleep(0)
    assert results == [0, -errno.EIO, 0]


async def test_bounds_and_read_only() -> None:
    g = graph()
    n = g.add({"driver": "null-co", "node-name": "n", "size": 4096})
    ro = g.add({"driver": "null-co", "node-name": "ro", "size": 4096, "read-only": True})
    await n.co_pwrite(4096 - 512, bytes(512))
    for coro in (n.co_pwrite(4096 - 511, bytes(512)), n.co_pread(4096, 1), n.co_discard(-1, 2)):
        with pytest.raises(OSError) as ei:
            await coro
        assert ei.value.errno == errno.EIO
    for coro in (ro.co_pwrite(0, b"x"), ro.co_discard(0, 512), ro.co_write_zeroes(0, 512)):
        with pytest.raises(OSError) as ei:
            await coro
        assert ei.value.errno == errno.EPERM
    assert await ro.co_pread(0, 512) == bytes(512)


async def test_null_latency() -> None:
    g = graph()
    n = g.add({"driver": "null-aio", "node-name": "n", "latency-ns": 30_000_000})
    loop = asyncio.get_running_loop()
    start = loop.time()
    await n.co_flush()
    assert loop.time() - start >= 0.025


async def test_null_resize_refused() -> None:
    g = graph()
    n = g.add({"driver": "null-co", "node-name": "n"})
    with pytest.raises(GenericError, match=r"^Image format driver does not support resize$"):
        await n.truncate(4096)
    ro = g.add({"driver": "null-co", "node-name": "ro", "read-only": True})
    with pytest.raises(GenericError, match=r"^Image is read-only$"):
        await ro.truncate(4096)


# -- raw ----------------------------------------------------------------------------------------
def add_raw(g: BlockGraph, **raw: Any) -> tuple[BlockNode, RecordingNode]:
    child_opts = raw.pop("child", {})
    node = g.add(
        {"driver": "raw", "node-name": "r", "file": {"driver": "null-co", **child_opts}, **raw}
    )
    child = node.children[0]
    assert isinstance(child, RecordingNode)
    return node, child


async def test_raw_forwards_with_offset() -> None:
    g = graph(recording=True)
    raw, child = add_raw(g, offset=1024, size=2048, child={"size": 8192}, discard="unmap")
    assert raw.length == 2048
    buf = memoryview(bytearray(512))
    await raw.co_preadv(0, [buf])
    await raw.co_pwritev(1536, [buf])
    await raw.co_discard(512, 1024)
    await raw.co_write_zeroes(0, 512, unmap=True)
    assert child.log == [
        ("read", 1024, 512),
        ("write", 2560, 512),
        ("discard", 1536, 1024),
        ("zeroes", 1024, 512, True),
    ]
    with pytest.raises(OSError) as ei:
        await raw.co_preadv(2048, [buf])  # beyond size, though inside the child
    assert ei.value.errno == errno.EIO


async def test_raw_discard_policy_and_detect_zeroes() -> None:
    g = graph(recording=True)
    raw, child = add_raw(g, **{"detect-zeroes": "on"})
    await raw.co_discard(0, 512)  # discard=ignore on raw: nothing reaches the child
    await raw.co_write_zeroes(0, 512, unmap=True)  # unmap dropped without discard=unmap
    await raw.co_pwrite(512, bytes(1024))  # all zero: becomes write-zeroes
    await raw.co_pwrite(4096, b"\0" * 100 + b"\1")
    assert child.log == [
        ("zeroes", 0, 512, False),
        ("zeroes", 512, 1024, False),
        ("write", 4096, 101),
    ]


def test_iov_is_zero() -> None:
    big = bytearray(200_000)
    assert iov_is_zero([memoryview(big), memoryview(b"")])
    big[150_000] = 1
    assert not iov_is_zero([memoryview(b"\0"), memoryview(big)])


def test_raw_option_errors() -> None:
    g = graph()
    child = {"driver": "null-co", "size": 4096}
    cases = [
        ({"offset": 1024, "size": 4096},
         "The sum of offset (1024) and size (4096) has to be smaller or equal to the  actual "
         "size of the containing file (4096)"),
        ({"size": 1000}, "Specified size is not multiple of 512"),
        ({"offset": 4097},
         "Offset (4097) cannot be greater than size of the containing file (4096)"),
    ]  # fmt: skip
    for opts, msg in cases:
        with pytest.raises(GenericError) as ei:
            g.add({"driver": "raw", "node-name": "x", "file": dict(child), **opts})
        assert ei.value.desc == msg
    # offset without size: the rest of the child, rounded up to 512 as QEMU shows it
    x = g.add({"driver": "raw", "node-name": "x", "file": dict(child), "offset": 100})
    assert x.length == 4096
    assert x.query()["file"] == (
        'json:{"offset": 100, "driver": "raw", "file": {"driver": "null-co", "size": 4096}}'
    )
    y = g.add({"driver": "raw", "node-name": "y", "file": {"driver": "null-co"}})
    assert y.query()["file"] == "null-co://"


async def test_raw_resize_follows_child_and_notifies() -> None:
    g = graph(recording=True)
    raw, child = add_raw(g, offset=512, child={"size": 4096})
    seen_raw: list[int] = []
    seen_child: list[int] = []
    raw.resize_listeners.append(seen_raw.append)
    child.resize_listeners.append(seen_child.append)
    assert raw.length == 3584
    await raw.truncate(8192)
    assert child.size == 8192 + 512 and child.length == 8704
    assert raw.length == 8192
    assert seen_raw == [8192] and seen_child == [8704]  # exactly once each
    fixed, _ = add_raw(graph(recording=True), size=1024)
    with pytest.raises(GenericError, match=r"^Cannot resize fixed-size raw disks$"):
        await fixed.truncate(2048)


def test_query_is_json_serialisable_for_every_node() -> None:
    g = graph()
    g.add({"driver": "raw", "node-name": "r", "file": {"driver": "null-aio", "size": 512}})
    json.dumps([n.query() for n in g.nodes])


# -- QMP handlers ----------------------------------------------------------------------------------
async def test_block_commands() -> None:
    import vexport.commands.block  # noqa: F401  (registers the commands)
    from vexport.daemon import Daemon
    from vexport.qmp.registry import REGISTRY

    d = Daemon()

    async def run(name: str, args: dict[str, Any]) -> Any:
        return await REGISTRY[name].handler(d, args)

    assert await run("blockdev-add", {"driver": "null-co", "node-name": "a", "size": 512}) == {}
    await run("blockdev-add", {"driver": "raw", "node-name": "r", "file": "a"})
    nodes = await run("query-named-block-nodes", {})
    assert [n["node-name"] for n in nodes] == ["r", "a"]
    assert await run("query-named-block-nodes", {"flat": True}) == nodes
    with pytest.raises(GenericError, match=r"^Parameter 'size' expects a >0 size$"):
        await run("block_resize", {"node-name": "a", "size": -1})
    with pytest.raises(GenericError, match=r"^Cannot find device='x' nor node-name=''$"):
        await run("block_resize", {"device": "x", "size": 512})
    with pytest.raises(GenericError, match=r"^Image format driver does not support resize$"):
        await run("block_resize", {"device": "", "node-name": "r", "size": 1024})
    with pytest.raises(GenericError, match=r"^Block device a is in use$"):
        await run("blockdev-del", {"node-name": "a"})
    assert await run("blockdev-del", {"node-name": "r"}) == {}
    assert [n.node_name for n in d.graph.nodes] == ["a"]
