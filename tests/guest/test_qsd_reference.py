"""Reference behaviour of a file-backed vduse-blk export, checked in the real-kernel guest.

The daemon is a fixture parameter: qemu-storage-daemon (the reference) and vexport.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from guest import helpers

pytestmark = pytest.mark.guest

DAEMONS = {
    "qsd": helpers.QSD,
    "vexport": helpers.VEXPORT,  # <repo>/.venv/bin/vexport
}

SIZE = 64 * 1024 * 1024


@pytest.fixture(params=sorted(DAEMONS))
def daemon_cmd(request: pytest.FixtureRequest) -> list[str]:
    cmd = DAEMONS[request.param]
    if shutil.which(cmd[0]) is None and not os.path.exists(cmd[0]):
        pytest.fail(f"daemon {cmd[0]} not found in the guest")
    return cmd


def pattern(offset: int, length: int) -> bytes:
    """Deterministic, offset-dependent data (every 32-byte chunk differs)."""
    out = bytearray()
    block = offset
    while len(out) < length:
        out += hashlib.sha256(f"vexport:{block}".encode()).digest()
        block += 32
    return bytes(out[:length])


def test_file_export_odirect_roundtrip(daemon_cmd: list[str], tmp_path: Path) -> None:
    assert os.environ.get("VEXPORT_IN_GUEST") == "1"
    assert Path("/dev/vduse/control").exists(), "vduse is not loaded in the guest"
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    name = "vxref0"
    args = [
        "--blockdev", f"driver=file,node-name=file0,filename={image}",
        "--export", f"type=vduse-blk,id=exp0,node-name=file0,name={name},writable=on",
    ]  # fmt: skip
    proc = helpers.start_daemon(daemon_cmd, args, name)
    attached = False
    try:
        dev = helpers.vdpa_add(name)
        attached = True
        size = int(Path(f"/sys/class/block/{Path(dev).name}/size").read_text()) * 512
        assert size == SIZE
        writes = {0: 4096, 7 * 4096: 8192, 32 * 1024 * 1024 + 512: 3584, SIZE - 4096: 4096}
        for off, length in writes.items():
            helpers.odirect_write(dev, off, pattern(off, length))
        for off, length in writes.items():
            assert helpers.odirect_read(dev, off, length) == pattern(off, length), off
        # Untouched space reads as zeroes, through the export too.
        assert helpers.odirect_read(dev, 1024 * 1024, 4096) == bytes(4096)
        # The backing file holds the data at the same offsets.
        with open(image, "rb") as f:
            for off, length in writes.items():
                f.seek(off)
                assert f.read(length) == pattern(off, length), off
        helpers.vdpa_del(name)
        attached = False
        helpers.wait_for(lambda: not os.path.exists(dev), 10, f"{dev} to go away")
    finally:
        if attached:
            helpers.vdpa_del(name)
        status = helpers.stop_daemon(proc)
    assert status == 0, helpers.daemon_log(name)
    assert not Path(f"/dev/vduse/{name}").exists()
    with open(image, "rb") as f:
        f.seek(SIZE - 4096)
        assert f.read(4096) == pattern(SIZE - 4096, 4096)
