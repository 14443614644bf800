"""virtio-blk: parse/execute for every request type and validation, config, features."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from vexport.virtio import blk as B
from vexport.virtio.testing import FakeDriver, SubmittedChain
from vexport.virtio.virtqueue import SplitQueue

CAP = 1 << 20  # 1 MiB disk = 2048 sectors


def hdr(type_: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", type_, 0, sector)


def seg(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)


class RecordingBackend:
    """Records calls; completes them synchronously with ``result``."""

    def __init__(self, result: int = 0) -> None:
        self.calls: list[tuple] = []
        self.result = result

    def preadv(self, offset: int, iov: list[memoryview], done: Callable[[int], None]) -> None:
        self.calls.append(("preadv", offset, sum(len(v) for v in iov)))
        done(self.result)

    def pwritev(self, offset: int, iov: list[memoryview], done: Callable[[int], None]) -> None:
        self.calls.append(("pwritev", offset, b"".join(bytes(v) for v in iov)))
        done(self.result)

    def flush(self, done: Callable[[int], None]) -> None:
        self.calls.append(("flush",))
        done(self.result)

    def discard(self, offset: int, length: int, done: Callable[[int], None]) -> None:
        self.calls.append(("discard", offset, length))
        done(self.result)

    def write_zeroes(
        self, offset: int, length: int, unmap: bool, done: Callable[[int], None]
    ) -> None:
        self.calls.append(("write_zeroes", offset, length, unmap))
        done(self.result)


class BytearrayNode:
    """A tiny in-memory block node honouring the callback API."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def preadv(self, offset: int, iov: list[memoryview], done: Callable[[int], None]) -> None:
        for v in iov:
            v[:] = self.data[offset : offset + len(v)]
            offset += len(v)
        done(0)

    def pwritev(self, offset: int, iov: list[memoryview], done: Callable[[int], None]) -> None:
        for v in iov:
            self.data[offset : offset + len(v)] = v
            offset += len(v)
        done(0)

    def flush(self, done: Callable[[int], None]) -> None:
        done(0)

    def discard(self, offset: int, length: int, done: Callable[[int], None]) -> None:
        self.data[offset : offset + length] = bytes(length)
        done(0)

    def write_zeroes(
        self, offset: int, length: int, unmap: bool, done: Callable[[int], None]
    ) -> None:
        self.data[offset : offset + length] = bytes(length)
        done(0)


class Harness:
    def __init__(self, *, writable: bool = True, lbs: int = 512, serial: str = "") -> None:
        self.d = FakeDriver(16, data_size=1 << 21)
        self.q: SplitQueue = self.d.queue(indirect=True)
        self.dev = B.VirtioBlk(CAP, lbs, serial, writable)
        self.completed: list[tuple[B.BlkRequest, int]] = []

    def run(
        self, readable: list[bytes], writable: list[int], backend: object, indirect: bool = False
    ) -> tuple[int, int, SubmittedChain]:
        """Submit a chain, parse/execute it, push; return (status, used_len, chain)."""
        sub = self.d.add_chain(readable, writable, indirect=indirect)
        chain = self.q.pop()
        assert chain is not None
        req = self.dev.parse(chain)
        self.dev.execute(req, backend, lambda r, n: self.completed.append((r, n)))  # type: ignore[arg-type]
        r, used = self.completed.pop()
        assert r is req
        self.q.push(r.head, used)
        assert self.d.get_used() == [(sub.head, used)]
        status = self.d.writable_data(sub)[-1]
        assert status == r.status
        return status, used, sub


# -- config and features ---------------------------------------------------------------


def test_config_layout_matches_header_offsets() -> None:
    # Offsets of struct virtio_blk_config (linux/virtio_blk.h, packed).
    cfg = B.config_space(CAP, 4096, num_queues=4, queue_size=128)
    assert len(cfg) == B.CONFIG_SIZE == 72
    u8 = lambda off: cfg[off]  # noqa: E731
    u16 = lambda off: struct.unpack_from("<H", cfg, off)[0]  # noqa: E731
    u32 = lambda off: struct.unpack_from("<I", cfg, off)[0]  # noqa: E731
    assert struct.unpack_from("<Q", cfg, 0)[0] == CAP // 512  # capacity
    assert u32(8) == 0  # size_max
    assert u32(12) == 126  # seg_max = queue size - 2
    assert u32(20) == 4096  # blk_size
    assert (u8(24), u8(25), u16(26), u32(28)) == (0, 0, 1, 1)  # topology
    assert u16(34) == 4  # num_queues
    assert (u32(36), u32(40), u32(44)) == (32768, 1, 8)  # discard
    assert (u32(48), u32(52), u8(56)) == (32768, 1, 0)  # write zeroes
    assert B.config_space(CAP, write_zeroes_may_unmap=True)[56] == 1


def test_config_offsets_against_c_header(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil
    import subprocess

    if shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    fields = [
        "capacity",
        "seg_max",
        "blk_size",
        "physical_block_exp",
        "min_io_size",
        "opt_io_size",
        "num_queues",
        "max_discard_sectors",
        "discard_sector_alignment",
        "max_write_zeroes_sectors",
        "write_zeroes_may_unmap",
    ]
    src = tmp_path / "p.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/virtio_blk.h>\n"
        "#include <linux/virtio_config.h>\n#include <linux/virtio_ring.h>\nint main(void){\n"
        'printf("%zu\\n", sizeof(struct virtio_blk_config));\n'
        + "".join(f'printf("%zu\\n", offsetof(struct virtio_blk_config, {f}));\n' for f in fields)
        + "".join(
            f'printf("%d\\n", {n});\n'
            for n in [
                "VIRTIO_BLK_F_SEG_MAX",
                "VIRTIO_BLK_F_RO",
                "VIRTIO_BLK_F_BLK_SIZE",
                "VIRTIO_BLK_F_FLUSH",
                "VIRTIO_BLK_F_TOPOLOGY",
                "VIRTIO_BLK_F_MQ",
                "VIRTIO_BLK_F_DISCARD",
                "VIRTIO_BLK_F_WRITE_ZEROES",
                "VIRTIO_F_NOTIFY_ON_EMPTY",
                "VIRTIO_RING_F_INDIRECT_DESC",
                "VIRTIO_RING_F_EVENT_IDX",
                "VIRTIO_F_VERSION_1",
                "VIRTIO_F_ACCESS_PLATFORM",
                "VIRTIO_BLK_T_IN",
                "VIRTIO_BLK_T_OUT",
                "VIRTIO_BLK_T_FLUSH",
                "VIRTIO_BLK_T_GET_ID",
                "VIRTIO_BLK_T_DISCARD",
                "VIRTIO_BLK_T_WRITE_ZEROES",
                "VIRTIO_BLK_S_OK",
                "VIRTIO_BLK_S_IOERR",
                "VIRTIO_BLK_S_UNSUPP",
                "VIRTIO_BLK_ID_BYTES",
                "VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP",
            ]
        )
        + "return 0;}\n"
    )
    subprocess.run(["gcc", "-o", str(tmp_path / "p"), str(src)], check=True)
    out = [
        int(x)
        for x in subprocess.run(
            [str(tmp_path / "p")], capture_output=True, text=True, check=True
        ).stdout.split()
    ]
    assert out[0] == B.CONFIG_SIZE
    expected_offsets = [0, 12, 20, 24, 26, 28, 34, 36, 44, 48, 56]
    assert out[1 : 1 + len(fields)] == expected_offsets
    consts = [
        B.VIRTIO_BLK_F_SEG_MAX,
        B.VIRTIO_BLK_F_RO,
        B.VIRTIO_BLK_F_BLK_SIZE,
        B.VIRTIO_BLK_F_FLUSH,
        B.VIRTIO_BLK_F_TOPOLOGY,
        B.VIRTIO_BLK_F_MQ,
        B.VIRTIO_BLK_F_DISCARD,
        B.VIRTIO_BLK_F_WRITE_ZEROES,
        B.VIRTIO_F_NOTIFY_ON_EMPTY,
        B.VIRTIO_RING_F_INDIRECT_DESC,
        B.VIRTIO_RING_F_EVENT_IDX,
        B.VIRTIO_F_VERSION_1,
        B.VIRTIO_F_ACCESS_PLATFORM,
        B.VIRTIO_BLK_T_IN,
        B.VIRTIO_BLK_T_OUT,
        B.VIRTIO_BLK_T_FLUSH,
        B.VIRTIO_BLK_T_GET_ID,
        B.VIRTIO_BLK_T_DISCARD,
        B.VIRTIO_BLK_T_WRITE_ZEROES,
        B.VIRTIO_BLK_S_OK,
        B.VIRTIO_BLK_S_IOERR,
        B.VIRTIO_BLK_S_UNSUPP,
        B.VIRTIO_BLK_ID_BYTES,
        B.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    ]
    assert out[1 + len(fields) :] == consts
    # and the struct module layout agrees with the C offsets for every field we fill
    cfg = B.config_space(CAP, 512, 2, 256)
    assert struct.unpack_from("<H", cfg, out[7])[0] == 2  # num_queues


def _bits(value: int) -> set[int]:
    return {b for b in range(64) if value >> b & 1}


def test_features_match_qsd() -> None:
    base = {32, 33, 24, 29, 28, 2, 10, 6, 9, 13, 14}
    assert _bits(B.features(1, True)) == base
    assert _bits(B.features(2, True)) == base | {12}
    assert _bits(B.features(1, False)) == base | {5}
    assert _bits(B.features(4, False)) == base | {5, 12}


def test_capacity_update_field() -> None:
    off, raw = B.capacity_bytes_field(4 << 20)
    assert off == 0 and struct.unpack("<Q", raw)[0] == 8192


# -- requests --------------------------------------------------------------------------


def test_read_lands_in_driver_buffers() -> None:
    h = Harness()
    node = BytearrayNode(CAP)
    node.data[1024:2048] = bytes(range(256)) * 4
    status, used, sub = h.run([hdr(B.VIRTIO_BLK_T_IN, 2)], [512, 512, 1], node)
    assert status == B.VIRTIO_BLK_S_OK and used == 1025
    assert h.d.writable_data(sub)[:1024] == bytes(range(256)) * 4


def test_write_lands_in_node_indirect() -> None:
    h = Harness()
    node = BytearrayNode(CAP)
    payload = b"\xaa" * 512 + b"\xbb" * 512
    status, used, _ = h.run([hdr(B.VIRTIO_BLK_T_OUT, 4), payload], [1], node, indirect=True)
    assert status == B.VIRTIO_BLK_S_OK and used == 1
    assert node.data[2048:3072] == payload


def test_header_and_data_in_one_descriptor_and_data_plus_status_in_one() -> None:
    h = Harness()
    node = BytearrayNode(CAP)
    status, _, _ = h.run([hdr(B.VIRTIO_BLK_T_OUT, 0) + b"\x11" * 512], [1], node)
    assert status == 0 and node.data[:512] == b"\x11" * 512
    status, used, sub = h.run([hdr(B.VIRTIO_BLK_T_IN, 0)], [513], node)
    assert status == 0 and used == 513 and h.d.writable_data(sub)[:512] == b"\x11" * 512


def test_header_split_over_descriptors() -> None:
    h = Harness()
    be = RecordingBackend()
    raw = hdr(B.VIRTIO_BLK_T_OUT, 1)
    status, _, _ = h.run([raw[:5], raw[5:], b"\1" * 512], [1], be)
    assert status == 0 and be.calls == [("pwritev", 512, b"\1" * 512)]


def test_flush() -> None:
    h = Harness()
    be = RecordingBackend()
    status, used, _ = h.run([hdr(B.VIRTIO_BLK_T_FLUSH)], [1], be)
    assert (status, used, be.calls) == (0, 1, [("flush",)])


def test_backend_error_gives_ioerr() -> None:
    h = Harness()
    be = RecordingBackend(result=-5)
    status, _, _ = h.run([hdr(B.VIRTIO_BLK_T_IN)], [512, 1], be)
    assert status == B.VIRTIO_BLK_S_IOERR and be.calls
    status, _, _ = h.run([hdr(B.VIRTIO_BLK_T_FLUSH)], [1], be)
    assert status == B.VIRTIO_BLK_S_IOERR


@pytest.mark.parametrize(
    ("serial", "room", "expected"),
    [
        ("disk-1", 20, b"disk-1" + b"\0" * 14),
        ("abcdefghijklmnopqrstuvwxyz", 20, b"abcdefghijklmnopqrst"),
        ("serial", 4, b"seri"),
        ("x", 32, b"x" + b"\0" * 19),
    ],
)
def test_get_id(serial: str, room: int, expected: bytes) -> None:
    h = Harness(serial=serial)
    be = RecordingBackend()
    status, used, sub = h.run([hdr(B.VIRTIO_BLK_T_GET_ID)], [room, 1], be)
    assert status == 0 and be.calls == []
    assert used == len(expected) + 1
    assert h.d.writable_data(sub)[: len(expected)] == expected


def test_discard_and_write_zeroes() -> None:
    h = Harness()
    be = RecordingBackend()
    assert h.run([hdr(B.VIRTIO_BLK_T_DISCARD), seg(8, 16)], [1], be)[0] == 0
    assert h.run([hdr(B.VIRTIO_BLK_T_WRITE_ZEROES), seg(8, 16, 1)], [1], be)[0] == 0
    assert h.run([hdr(B.VIRTIO_BLK_T_WRITE_ZEROES), seg(0, 1)], [1], be)[0] == 0
    assert be.calls == [
        ("discard", 4096, 8192),
        ("write_zeroes", 4096, 8192, True),
        ("write_zeroes", 0, 512, False),
    ]


def test_write_zeroes_lands_in_node() -> None:
    h = Harness()
    node = BytearrayNode(CAP)
    node.data[:] = b"\xff" * CAP
    assert h.run([hdr(B.VIRTIO_BLK_T_WRITE_ZEROES), seg(1, 2)], [1], node)[0] == 0
    assert node.data[512:1536] == bytes(1024) and node.data[511] == 0xFF
    assert node.data[1536] == 0xFF


@pytest.mark.parametrize(
    ("readable", "writable", "status"),
    [
        # unknown request type
        ([hdr(99)], [1], B.VIRTIO_BLK_S_UNSUPP),
        # data not a multiple of 512
        ([hdr(B.VIRTIO_BLK_T_IN)], [100, 1], B.VIRTIO_BLK_S_IOERR),
        ([hdr(B.VIRTIO_BLK_T_OUT), b"x" * 100], [1], B.VIRTIO_BLK_S_IOERR),
        # IN without writable data, OUT without readable data
        ([hdr(B.VIRTIO_BLK_T_IN)], [1], B.VIRTIO_BLK_S_IOERR),
        ([hdr(B.VIRTIO_BLK_T_OUT)], [1], B.VIRTIO_BLK_S_IOERR),
        # beyond capacity, straddling the end, 2**64-overflowing sector
        ([hdr(B.VIRTIO_BLK_T_IN, 2048)], [512, 1], B.VIRTIO_BLK_S_IOERR),
        ([hdr(B.VIRTIO_BLK_T_IN, 2047)], [1024, 1], B.VIRTIO_BLK_S_IOERR),
        ([hdr(B.VIRTIO_BLK_T_IN, 2**64 - 1)], [512, 1], B.VIRTIO_BLK_S_IOERR),
        ([hdr(B.VIRTIO_BLK_T_OUT, 2**55), b"x" * 512], [1], B.VIRTIO_BLK_S_IOERR),
        # discard / write zeroes segments
        ([hdr(B.VIRTIO_BLK_T_DISCARD), seg(0, 1) + seg(8, 1)], [1], B.VIRTIO_BLK_S_UNSUPP),
        ([hdr(B.VIRTIO_BLK_T_DISCARD), seg(0, 1)[:10]], [1], B.VIRTIO_BLK_S_IOERR),
        ([hdr(B.VIRTIO_BLK_T_DISCARD)], [1], B.VIRTIO_BLK_S_IOERR),
        ([hdr(B.VIRTIO_BLK_T_DISCARD), seg(0, 32769)], [1], B.VIRTIO_BLK_S_IOERR),
        ([hdr(B.VIRTIO_BLK_T_WRITE_ZEROES), seg(0, 32769)], [1], B.VIRTIO_BLK_S_IOERR),
        ([hdr(B.VIRTIO_BLK_T_DISCARD), seg(2040, 16)], [1], B.VIRTIO_BLK_S_IOERR),
        ([hdr(B.VIRTIO_BLK_T_DISCARD), seg(0, 1, 1)], [1], B.VIRTIO_BLK_S_UNSUPP),
        ([hdr(B.VIRTIO_BLK_T_WRITE_ZEROES), seg(0, 1, 2)], [1], B.VIRTIO_BLK_S_UNSUPP),
    ],
)
def test_refused_requests_do_not_reach_the_backend(
    readable: list[bytes], writable: list[int], status: int
) -> None:
    h = Harness()
    be = RecordingBackend()
    got, used, _ = h.run(readable, writable, be)
    assert (got, used, be.calls) == (status, 1, [])


def test_logical_block_alignment() -> None:
    h = Harness(lbs=4096)
    be = RecordingBackend()
    assert h.run([hdr(B.VIRTIO_BLK_T_IN, 1)], [4096, 1], be)[0] == B.VIRTIO_BLK_S_IOERR
    assert h.run([hdr(B.VIRTIO_BLK_T_DISCARD), seg(4, 8)], [1], be)[0] == B.VIRTIO_BLK_S_IOERR
    assert be.calls == []
    assert h.run([hdr(B.VIRTIO_BLK_T_IN, 8)], [4096, 1], be)[0] == 0
    assert be.calls == [("preadv", 4096, 4096)]


def test_read_only_export() -> None:
    h = Harness(writable=False)
    be = RecordingBackend()
    for readable in (
        [hdr(B.VIRTIO_BLK_T_OUT), b"x" * 512],
        [hdr(B.VIRTIO_BLK_T_DISCARD), seg(0, 1)],
        [hdr(B.VIRTIO_BLK_T_WRITE_ZEROES), seg(0, 1)],
    ):
        assert h.run(readable, [1], be)[0] == B.VIRTIO_BLK_S_IOERR
    assert be.calls == []
    assert h.run([hdr(B.VIRTIO_BLK_T_IN)], [512, 1], be)[0] == 0
    assert h.run([hdr(B.VIRTIO_BLK_T_FLUSH)], [1], be)[0] == 0


def test_capacity_change() -> None:
    h = Harness()
    be = RecordingBackend()
    assert h.run([hdr(B.VIRTIO_BLK_T_IN, 2048)], [512, 1], be)[0] == B.VIRTIO_BLK_S_IOERR
    h.dev.set_capacity(2 * CAP)
    assert h.run([hdr(B.VIRTIO_BLK_T_IN, 2048)], [512, 1], be)[0] == 0


def test_unparsable_chains_raise() -> None:
    h = Harness()
    h.d.add_chain([b"short"], [1])
    h.d.add_chain([hdr(B.VIRTIO_BLK_T_IN)], [])
    for _ in range(2):
        chain = h.q.pop()
        assert chain is not None
        with pytest.raises(B.BlkRequestError) as info:
            h.dev.parse(chain)
        assert info.value.head == chain.head


def test_async_completion_uses_request_as_callback() -> None:
    """The backend may complete later; the request object is the callback."""
    h = Harness()
    pending: list[Callable[[int], None]] = []

    class Deferred(RecordingBackend):
        def preadv(self, offset: int, iov: list[memoryview], done: Callable[[int], None]) -> None:
            pending.append(done)

    sub = h.d.add_chain([hdr(B.VIRTIO_BLK_T_IN)], [512, 1])
    chain = h.q.pop()
    assert chain is not None
    req = h.dev.parse(chain)
    h.dev.execute(req, Deferred(), lambda r, n: h.completed.append((r, n)))
    assert h.completed == [] and pending == [req]
    pending[0](512)
    assert h.completed == [(req, 513)] and h.d.writable_data(sub)[-1] == 0


def test_parse_simple_stores_user_and_done_on_both_paths() -> None:
    """The caller's user and done are in the request whether parse_simple decoded it in
    place (a read) or handed it to parse (a GET_ID has the same chain shape)."""
    h = Harness()

    def done(r: B.BlkRequest, n: int) -> None:
        pass

    read = h.d.add_chain([B.OUTHDR.pack(B.VIRTIO_BLK_T_IN, 0, 8)], [4096, 1], indirect=True)
    get_id = h.d.add_chain([B.OUTHDR.pack(B.VIRTIO_BLK_T_GET_ID, 0, 0)], [20, 1], indirect=True)
    chains = h.q.pop_simple(8, *B.SIMPLE_SHAPE)
    assert [c[0] for c in chains] == [read.head, get_id.head]
    fast = h.dev.parse_simple(chains[0], "user", done)
    slow = h.dev.parse_simple(chains[1], "user", done)
    assert (fast.type, fast.offset, fast.status) == (B.VIRTIO_BLK_T_IN, 8 * 512, None)
    assert slow.type == B.VIRTIO_BLK_T_GET_ID
    for req in (fast, slow):
        assert req.user == "user" and req.done is done


@pytest.mark.parametrize("lbs", [256, 1000, 3072])
def test_logical_block_size_must_be_a_power_of_two_of_at_least_512(lbs: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        B.VirtioBlk(CAP, lbs)


@pytest.mark.parametrize("sector, ok", [(8, True), (16, True), (4, False), (9, False)])
def test_parse_simple_checks_alignment_to_the_logical_block(sector: int, ok: bool) -> None:
    h = Harness(lbs=4096)
    h.d.add_chain([B.OUTHDR.pack(B.VIRTIO_BLK_T_IN, 0, sector)], [4096, 1], indirect=True)
    (chain,) = h.q.pop_simple(8, *B.SIMPLE_SHAPE)
    req = h.dev.parse_simple(chain)
    assert req.status == (None if ok else B.VIRTIO_BLK_S_IOERR)
