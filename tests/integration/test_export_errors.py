"""block-export-add / block-export-del error paths over QMP on a machine without VDUSE.

Each error is checked against the exact class and text vexport gives (QSD's text where
QSD has one; vexport's own, clearer one where QSD defers to the kernel or has no such
export type).  Success paths need the kernel and are in tests/guest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

DaemonProcess = Any


@pytest.fixture
def vx(start_vexport, tmp_path: Path) -> DaemonProcess:  # type: ignore[no-untyped-def]
    return start_vexport(  # type: ignore[no-any-return]
        "--blockdev", "null-co,node-name=n0",
        "--blockdev", "null-co,node-name=r0,read-only=on",
        "--object", "iothread,id=io0",
    )  # fmt: skip


BASE = {"type": "vduse-blk", "id": "e0", "node-name": "n0", "name": "vx0"}

CASES = [
    ({"id": "1e"}, "Invalid block export id"),
    ({"node-name": "nope"}, "Cannot find device='' nor node-name='nope'"),
    ({"iothread": "nope"}, 'iothread "nope" not found'),
    ({"node-name": "r0", "writable": True}, "Cannot export read-only node as writable"),
    ({"num-queues": 0}, "num-queues must be greater than 0"),
    ({"queue-size": 3}, "queue-size is invalid"),
    ({"queue-size": 2048}, "queue-size is invalid"),
    ({"queue-size": 96}, "queue-size is invalid"),
    ({"num-queues": 70000}, "Parameter 'num-queues' expects uint16_t"),
    (
        {"logical-block-size": 100},
        "Property e0.logical-block-size doesn't take value 100 (minimum: 512, maximum: 4096)",
    ),
    (
        {"logical-block-size": 8192},
        "Property e0.logical-block-size doesn't take value 8192 (minimum: 512, maximum: 4096)",
    ),
    (
        {"logical-block-size": 1536},
        "Property e0.logical-block-size doesn't take value 1536, it's not a power of 2",
    ),
    (
        {"serial": "x" * 21},
        f"serial '{'x' * 21}' is too long: a virtio-blk serial has at most 20 bytes",
    ),
    ({"name": "a/b"}, "Invalid VDUSE device name 'a/b'"),
    ({"type": "nbd"}, "NBD exports are not supported by vexport"),
    ({"type": "fuse", "mountpoint": "/tmp/x"}, "Export type 'fuse' is not supported by vexport"),
    ({"type": "bogus"}, "Parameter 'type' does not accept value 'bogus'"),
    ({"bogus": 1}, "Parameter 'bogus' is unexpected"),
]


@pytest.mark.parametrize(("change", "desc"), CASES, ids=[c[1][:40] for c in CASES])
def test_block_export_add_errors(vx: DaemonProcess, change: dict, desc: str) -> None:  # type: ignore[type-arg]
    qmp = vx.raw()
    qmp.negotiate()
    args = {**BASE, **change}
    if change.get("type") in ("nbd", "fuse"):
        args.pop("name")
    reply = qmp.cmd("block-export-add", args, id="req-1")
    assert reply == {"id": "req-1", "error": {"class": "GenericError", "desc": desc}}
    assert qmp.cmd("query-block-exports") == {"return": []}
    # The node is not left "in use" by a failed export.
    assert qmp.cmd("blockdev-del", {"node-name": "n0"}) == {"return": {}}


def test_vduse_module_missing(vx: DaemonProcess) -> None:
    if Path("/dev/vduse/control").exists():
        pytest.skip("this kernel has VDUSE; the error path needs a machine without it")
    qmp = vx.raw()
    qmp.negotiate()
    reply = qmp.cmd("block-export-add", BASE)
    assert reply["error"]["class"] == "GenericError"
    assert reply["error"]["desc"].startswith(
        "/dev/vduse/control does not exist: the vduse kernel module is missing"
    )
    assert qmp.cmd("query-block-exports") == {"return": []}


def test_block_export_del_errors(vx: DaemonProcess) -> None:
    qmp = vx.raw()
    qmp.negotiate()
    assert qmp.cmd("block-export-del", {"id": "zz"}) == {
        "error": {"class": "GenericError", "desc": "Export 'zz' is not found"}
    }
    assert qmp.cmd("block-export-del", {"id": "zz", "mode": "sideways"}) == {
        "error": {
            "class": "GenericError",
            "desc": "Parameter 'mode' does not accept value 'sideways'",
        }
    }
    assert qmp.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/tmp/n"}}}) == {
        "error": {"class": "GenericError", "desc": "NBD is not supported by vexport"}
    }
