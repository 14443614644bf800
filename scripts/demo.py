"""vexport serving a real disk, step by step (run by scripts/demo, as root, with VDUSE).

1. a file-backed block node and a vduse-blk export, with a QMP monitor;
2. ``vdpa dev add``: the kernel's virtio-blk driver makes /dev/vdX;
3. mkfs.ext4, mount, write files, drop the page cache, read them back and compare;
4. umount, fsck, ``vdpa dev del``, ``block-export-del`` (BLOCK_EXPORT_DELETED), ``quit``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

REPO = Path(__file__).resolve().parent.parent
VEXPORT = REPO / ".venv" / "bin" / "vexport"


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run(*cmd: str) -> str:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out.stdout


def wait_for(what: str, predicate, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"[demo] timed out waiting for {what}")


def block_device(name: str) -> str | None:
    for path in glob.glob(f"/sys/bus/vdpa/devices/{name}/virtio*/block/*"):
        dev = "/dev/" + os.path.basename(path)
        if os.path.exists(dev):
            return dev
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--name", default="vexport-demo")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vexport-demo-"))
    image = work / "disk.img"
    sock = work / "qmp.sock"
    mnt = work / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(args.size_mib << 20)
    say(f"backing file {image}: {args.size_mib} MiB")

    cmd = [
        str(VEXPORT),
        "--blockdev", f"driver=file,node-name=disk0,filename={image},aio=native,cache.direct=on",
        "--export", f"type=vduse-blk,id=exp0,node-name=disk0,name={args.name},writable=on,"
                    "num-queues=2,queue-size=128,serial=vexport-demo",
        "--chardev", f"socket,id=mon0,path={sock},server=on,wait=off",
        "--monitor", "chardev=mon0",
    ]  # fmt: skip
    say("starting: " + " ".join(cmd))
    daemon = subprocess.Popen(cmd)
    wait_for("the QMP socket", sock.exists)
    qmp = QEMUMonitorProtocol(str(sock))
    qmp.connect(negotiate=True)
    say(f"query-block-exports: {qmp.cmd('query-block-exports')}")

    run("vdpa", "dev", "add", "name", args.name, "mgmtdev", "vduse")
    dev = wait_for("the virtio-blk disk", lambda: block_device(args.name))
    sysblk = Path("/sys/block") / os.path.basename(dev)
    size = int((sysblk / "size").read_text()) * 512
    queues = len(os.listdir(sysblk / "mq"))
    serial = (sysblk / "serial").read_text().strip()
    say(f"vdpa dev add -> {dev}: {size >> 20} MiB, {queues} hardware queue(s), serial {serial!r}")

    run("mkfs.ext4", "-q", "-F", dev)
    run("mount", dev, str(mnt))
    say(f"mkfs.ext4 and mount {dev} on {mnt}")
    rng = random.Random(42)
    digests = {}
    for i in range(args.files):
        data = rng.randbytes(rng.randrange(1, 64 * 1024))
        path = mnt / f"dir{i % 10}" / f"file{i}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        digests[path] = hashlib.sha256(data).hexdigest()
    big = rng.randbytes(32 << 20)
    (mnt / "big").write_bytes(big)
    digests[mnt / "big"] = hashlib.sha256(big).hexdigest()
    os.sync()
    say(f"wrote {len(digests)} files ({sum(p.stat().st_size for p in digests) >> 20} MiB), sync")

    run("umount", str(mnt))
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    run("mount", dev, str(mnt))
    bad = [p for p, d in digests.items() if hashlib.sha256(p.read_bytes()).hexdigest() != d]
    if bad:
        say(f"FAILED: {len(bad)} files differ after remount, e.g. {bad[0]}")
        return 1
    say(f"remounted with a cold cache: all {len(digests)} files read back identical")
    say("df: " + run("df", "-h", str(mnt)).splitlines()[-1])
    run("umount", str(mnt))
    fsck = subprocess.run(["fsck.ext4", "-fn", dev], capture_output=True, text=True)
    say(f"fsck.ext4 -fn: exit {fsck.returncode} ({fsck.stdout.strip().splitlines()[-1]})")
    if fsck.returncode != 0:
        return 1

    run("vdpa", "dev", "del", args.name)
    wait_for(f"{dev} to go away", lambda: not os.path.exists(dev))
    say("vdpa dev del: disk detached")
    qmp.cmd("block-export-del", id="exp0")
    event = qmp.pull_event(wait=10.0)
    name = event["event"] if event else None
    say(f"block-export-del -> event {name} {event.get('data') if event else ''}")
    qmp.cmd("quit")
    qmp.close()
    status = daemon.wait(timeout=30)
    say(f"quit: vexport exited with status {status}")
    shutil.rmtree(work)
    if status == 0 and event and event["event"] == "BLOCK_EXPORT_DELETED":
        say("SUCCESS")
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
