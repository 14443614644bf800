"""vduse-blk export life cycle in the real-kernel guest: detach, block-export-del, quit.

Run against vexport and qemu-storage-daemon (the reference) alike.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from guest import helpers

pytestmark = pytest.mark.guest

MiB = 1024 * 1024
DAEMONS = {"qsd": helpers.QSD, "vexport": helpers.VEXPORT}


@pytest.mark.parametrize("daemon", ["vexport", "qsd"])
def test_detach_export_del_event_quit(daemon: str, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    name = f"vxdel-{daemon}"
    sock = tmp_path / "qmp.sock"
    args = [
        *helpers.monitor_args(sock),
        "--blockdev", f"driver=file,node-name=file0,filename={image}",
        "--export", f"type=vduse-blk,id=exp0,node-name=file0,name={name},writable=on",
    ]  # fmt: skip
    data = random.Random("del").randbytes(8192)
    proc = helpers.start_daemon(DAEMONS[daemon], args, name)
    try:
        qmp = helpers.qmp_connect(sock)
        dev = helpers.vdpa_add(name)
        helpers.odirect_write(dev, 4096, data)
        helpers.vdpa_del(name)
        helpers.wait_for(lambda: not os.path.exists(dev), 30, f"{dev} to go away")
        assert qmp.cmd("query-block-exports") == [
            {"id": "exp0", "type": "vduse-blk", "node-name": "file0", "shutting-down": False}
        ]
        assert qmp.cmd("block-export-del", id="exp0") == {}
        event = helpers.qmp_wait_event(qmp, "BLOCK_EXPORT_DELETED", timeout=30)
        assert event["data"] == {"id": "exp0"}
        assert qmp.cmd("query-block-exports") == []
        vduse = Path("/dev/vduse") / name
        helpers.wait_for(lambda: not vduse.exists(), 30, f"{vduse} to go away")
        # The node stays, no longer in use.
        nodes = qmp.cmd("query-named-block-nodes")
        assert isinstance(nodes, list)
        assert [n["node-name"] for n in nodes] == ["file0"]
        assert qmp.cmd("quit") == {}
        qmp.close()
        status = proc.wait(timeout=30)
    finally:
        helpers.stop_daemon(proc)
    assert status == 0, helpers.daemon_log(name)
    with open(image, "rb") as f:
        f.seek(4096)
        assert f.read(8192) == data
