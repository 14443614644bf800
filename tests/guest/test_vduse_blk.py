"""vduse-blk export in the real-kernel guest: geometry, data integrity, discard, resize.

Each test attaches an export with ``vdpa dev add`` (virtio_vdpa, so the guest's own
virtio_blk driver talks to the daemon) and drives /dev/vdX with fio, O_DIRECT I/O,
mkfs/mount and blkdiscard.

vexport takes 5-20 s to start under TCG, so the tests share ONE vexport process (the
``vexport`` fixture) serving every export in EXPORTS, each on its own node and VDUSE
device, plus a QMP monitor; each test attaches and detaches its own device.  Tests that
also run against qemu-storage-daemon (the reference, for comparison) start a QSD with
the same options for that one export.  The life-cycle test (detach, block-export-del,
quit) needs a daemon of its own: test_vduse_lifecycle.py.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guest import helpers
from vexport.kernel import vduse

pytestmark = pytest.mark.guest

MiB = 1024 * 1024
DAEMONS = {"qsd": helpers.QSD, "vexport": helpers.VEXPORT}


def pattern(seed: str, length: int) -> bytes:
    """Deterministic pseudo-random data for ``seed``."""
    return random.Random(seed).randbytes(length)


def make_image(path: Path, size: int, fill: bytes = b"") -> None:
    with open(path, "wb") as f:
        f.write(fill)
        f.truncate(size)


# --------------------------------------------------------------------------- the exports

VERIFY_SIZE = 32 * MiB
RAW_OFFSET = 3 * MiB  # bytes of the backing file before the raw node's window
RAW_HEAD = pattern("head", RAW_OFFSET)
RAW_TAIL = pattern("tail", MiB)  # bytes after the window
RO_SIZE = 16 * MiB
RO_CONTENT = pattern("ro", 2 * MiB)
NULL_BLK = "nullb1"
NULL_BLK_SIZE = 64 * MiB


@dataclass
class Export:
    """One export: ``node`` is the --blockdev tail (``{img}`` = its image file),
    ``export`` the --export tail (after type, id, node-name, name)."""

    node: str
    export: str = "writable=on"
    image_size: int = 0
    image_fill: Callable[[Path], None] | None = None
    raw_window: str = ""  # a raw node on top: "offset=...,size=..."

    def args(self, key: str, name: str, image_dir: Path) -> list[str]:
        """Command-line options for this export, as VDUSE device ``name``."""
        image = image_dir / f"{key}.img"
        node = f"n-{key}"
        args = ["--blockdev", f"node-name={node}," + self.node.format(img=image)]
        if self.raw_window:
            args += ["--blockdev", f"driver=raw,node-name=r-{key},file={node},{self.raw_window}"]
            node = f"r-{key}"
        args += [
            "--export",
            f"type=vduse-blk,id=e-{key},node-name={node},name={name},{self.export}",
        ]
        return args

    def make_image(self, key: str, image_dir: Path) -> None:
        if self.image_size:
            image = image_dir / f"{key}.img"
            make_image(image, self.image_size)
            if self.image_fill is not None:
                self.image_fill(image)


def fill_raw(image: Path) -> None:
    with open(image, "r+b") as f:
        f.write(RAW_HEAD)
        f.seek(RAW_OFFSET + VERIFY_SIZE)
        f.write(RAW_TAIL)


def fill_ro(image: Path) -> None:
    with open(image, "r+b") as f:
        f.write(RO_CONTENT)


FILE = "driver=file,filename={img}"
RW2 = "writable=on,num-queues=2"

GEOMETRY = {
    # key: (size, num-queues, logical-block-size, serial, expected number of hw queues)
    "geo1": (64 * MiB, 1, 512, "vx-serial-one", 1),
    "geo2": (96 * MiB, 2, 4096, "VX2", 2),
    "geo4": (160 * MiB, 4, 512, "abcdefghij0123456789", 2),  # 20 bytes: the maximum
}

EXPORTS: dict[str, Export] = {
    **{
        key: Export(
            f"driver=null-co,size={size}",
            f"writable=on,num-queues={nq},logical-block-size={lbs},serial={serial}",
        )
        for key, (size, nq, lbs, serial, _) in GEOMETRY.items()
    },
    "null": Export(f"driver=null-co,size={1024 * MiB}", "num-queues=2"),
    "null-1q": Export(f"driver=null-co,size={64 * MiB}", "num-queues=1"),  # own daemon
    "threads": Export(FILE + ",aio=threads", RW2, VERIFY_SIZE),
    "native-direct": Export(FILE + ",aio=native,cache.direct=on", RW2, VERIFY_SIZE),
    "io_uring": Export(FILE + ",aio=io_uring", RW2, VERIFY_SIZE),
    "raw-offset": Export(
        FILE,
        RW2,
        RAW_OFFSET + VERIFY_SIZE + len(RAW_TAIL),
        fill_raw,
        f"offset={RAW_OFFSET},size={VERIFY_SIZE}",
    ),
    "nullblk": Export(
        f"driver=host_device,filename=/dev/{NULL_BLK},cache.direct=on,aio=native",
        "writable=on,num-queues=16",
    ),
    "ext4": Export(FILE, RW2, 64 * MiB),
    "discard": Export(FILE + ",discard=unmap", "writable=on", 64 * MiB),
    "ro-writable-off": Export(FILE, "writable=off", RO_SIZE, fill_ro),
    "ro-node-read-only": Export(FILE + ",read-only=on", "num-queues=1", RO_SIZE, fill_ro),
    "resize": Export(FILE, RW2, 64 * MiB),
    "reattach": Export(FILE + ",aio=native,cache.direct=on", RW2, 16 * MiB),
    # own daemons (the compiled poll's counts are logged when the queues stop)
    "c-native": Export(FILE + ",aio=native,cache.direct=on", RW2, 16 * MiB),
    "c-threads": Export(FILE + ",aio=threads", RW2, 16 * MiB),
}


@dataclass
class Served:
    """A running daemon serving some of EXPORTS."""

    proc: subprocess.Popen[bytes]
    daemon: str
    image_dir: Path
    qmp_sock: Path
    log_name: str

    def name(self, key: str) -> str:
        return ("vx-" if self.daemon == "vexport" else "vq-") + key

    def image(self, key: str) -> Path:
        return self.image_dir / f"{key}.img"

    @contextlib.contextmanager
    def attach(self, key: str) -> Iterator[str]:
        """vdpa-attach the export ``key``; yield /dev/vdX; detach afterwards."""
        if self.proc.poll() is not None:
            pytest.fail(
                f"{self.daemon} exited with status {self.proc.returncode}:\n"
                + helpers.daemon_log(self.log_name)
            )
        name = self.name(key)
        dev = helpers.vdpa_add(name)
        try:
            yield dev
        finally:
            helpers.vdpa_del(name)
            helpers.wait_for(lambda: not os.path.exists(dev), 30, f"{dev} to go away")


@contextlib.contextmanager
def serve(daemon: str, keys: list[str], image_dir: Path) -> Iterator[Served]:
    """Start ``daemon`` serving ``keys`` of EXPORTS, with a QMP monitor; stop it at the end
    and check that it exits with status 0."""
    prefix = "vx-" if daemon == "vexport" else "vq-"
    sock = image_dir / f"{daemon}-qmp.sock"
    args = helpers.monitor_args(sock)
    for key in keys:
        EXPORTS[key].make_image(key, image_dir)
        args += EXPORTS[key].args(key, prefix + key, image_dir)
    names = [prefix + key for key in keys]
    proc = helpers.start_daemon(DAEMONS[daemon], args, names[-1])
    try:
        for name in names:
            node = Path("/dev/vduse") / name
            helpers.wait_for(node.exists, 30, str(node))
        yield Served(proc, daemon, image_dir, sock, names[-1])
    finally:
        status = helpers.stop_daemon(proc)
    assert status == 0, f"{daemon} exit status {status}:\n{helpers.daemon_log(names[-1])}"


# Exports a test serves with a daemon of its own (it stops the daemon while attached).
OWN_DAEMON = {"null-1q", "c-native", "c-threads"}


@pytest.fixture(scope="module")
def vexport(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The one vexport serving every export in EXPORTS."""
    helpers.null_blk_create(NULL_BLK, size_mb=NULL_BLK_SIZE // MiB, memory_backed=1)
    try:
        shared = [key for key in EXPORTS if key not in OWN_DAEMON]
        with serve("vexport", shared, tmp_path_factory.mktemp("vexport")) as served:
            yield served
    finally:
        helpers.null_blk_remove(NULL_BLK)


@contextlib.contextmanager
def served_by(daemon: str, key: str, vexport: Callable[[], Served], tmp: Path) -> Iterator[Served]:
    """The shared vexport, or a qemu-storage-daemon serving only ``key``."""
    if daemon == "vexport":
        yield vexport()
    else:
        with serve(daemon, [key], tmp) as served:
            yield served


@pytest.fixture
def get_vexport(request: pytest.FixtureRequest) -> Callable[[], Served]:
    """Start (or reuse) the shared vexport only when a test needs it."""
    return lambda: request.getfixturevalue("vexport")


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("key", sorted(GEOMETRY))
def test_geometry(vexport: Served, key: str) -> None:
    size, nq, lbs, serial, mq = GEOMETRY[key]
    with vexport.attach(key) as dev:
        assert helpers.disk_bytes(dev) == size
        hw_queues = os.listdir(f"/sys/class/block/{Path(dev).name}/mq")
        assert len(hw_queues) == mq == min(nq, os.cpu_count() or 1), hw_queues
        assert int(helpers.sysfs_block(dev, "queue/logical_block_size")) == lbs
        assert int(helpers.sysfs_block(dev, "queue/physical_block_size")) >= lbs
        assert helpers.sysfs_block(dev, "serial") == serial
        assert helpers.sysfs_block(dev, "ro") == "0"
        # One logical block at the first and at the last block.
        helpers.odirect_read(dev, 0, lbs)
        helpers.odirect_read(dev, size - lbs, lbs)


# Block-layer limits and flags the guest derives from the device's features and config
# space: the same for vexport and qemu-storage-daemon given the same options.
SYSFS_ATTRS = [
    "size", "ro", "serial", "queue/logical_block_size", "queue/physical_block_size",
    "queue/minimum_io_size", "queue/optimal_io_size", "queue/max_segments",
    "queue/max_segment_size", "queue/max_hw_sectors_kb", "queue/discard_granularity",
    "queue/discard_max_hw_bytes", "queue/write_zeroes_max_bytes", "queue/write_cache",
    "queue/nr_requests", "queue/fua", "alignment_offset", "discard_alignment",
]  # fmt: skip


def sysfs_view(dev: str) -> dict[str, str]:
    view = {attr: helpers.sysfs_block(dev, attr) for attr in SYSFS_ATTRS}
    view["mq"] = str(len(os.listdir(f"/sys/class/block/{Path(dev).name}/mq")))
    return view


@pytest.mark.parametrize("key", ["geo2", "geo4", "discard", "ro-writable-off"])
def test_sysfs_matches_qsd(vexport: Served, key: str, tmp_path: Path) -> None:
    with vexport.attach(key) as dev:
        ours = sysfs_view(dev)
    with serve("qsd", [key], tmp_path) as qsd, qsd.attach(key) as dev:
        reference = sysfs_view(dev)
    assert ours == reference


# --------------------------------------------------------------------------- null-co


@pytest.mark.parametrize("daemon", ["vexport", "qsd"])
def test_null_randread_depth16(
    daemon: str, get_vexport: Callable[[], Served], tmp_path: Path
) -> None:
    with served_by(daemon, "null", get_vexport, tmp_path) as served, served.attach("null") as dev:
        fio_args = [
            f"--filename={dev}", "--ioengine=libaio", "--direct=1", "--rw=randread",
            "--bs=4k", "--iodepth=16", "--runtime=3", "--time_based",
        ]  # fmt: skip
        job = helpers.fio(fio_args)
    read = job["read"]
    print(f"{daemon}: null-co randread 4k qd16: {read['iops']:.0f} IOPS")
    assert read["total_ios"] > 0 and read["iops"] > 0
    assert read.get("short_ios", 0) == 0 and read.get("drop_ios", 0) == 0


def _depth1_reads(dev: str) -> None:
    helpers.fio([
        f"--filename={dev}", "--ioengine=libaio", "--direct=1", "--rw=randread",
        "--bs=4k", "--iodepth=1", "--runtime=2", "--time_based",
    ])  # fmt: skip


def test_depth1_null_reads_are_served_by_the_compiled_poll(tmp_path: Path) -> None:
    """With the real driver at queue depth 1 the device polls, and on a null-co node
    the compiled poll (vexport/native/poll.c) serves the requests it finds: fio sees
    every read succeed, and the daemon counts what the C loop served when the driver
    resets the queue.  (The export is read-only: its writes are refused by the driver
    before they reach the device.)"""
    with serve("vexport", ["null-1q"], tmp_path) as served:
        name = served.name("null-1q")
        with served.attach("null-1q") as dev:
            job = helpers.fio([
                f"--filename={dev}", "--ioengine=libaio", "--direct=1", "--rw=randread",
                "--bs=4k", "--iodepth=1", "--runtime=2", "--time_based",
            ])  # fmt: skip
        log_text = helpers.daemon_log(name)
    ios = job["read"]["total_ios"]
    assert ios > 100 and job["error"] == 0
    counts = [
        int(m)
        for m in re.findall(r"queue 0: (\d+) request\(s\) served by the compiled poll", log_text)
    ]
    assert counts, log_text[-2000:]
    # nearly every request came while polling: all but the ones that came with a kick
    assert sum(counts) > ios // 2, (counts, ios)


@pytest.mark.parametrize("key", ["c-native", "c-threads"])
def test_file_io_of_the_compiled_poll_is_verified(key: str, tmp_path: Path) -> None:
    """On a file with aio=native (Linux AIO) or aio=threads (io_uring), the compiled
    poll submits the requests it finds to a context or ring of its own: fio writes at
    queue depth 1 with checksums and reads everything back, checked, and the C loop
    served a good part of those requests (the ones found while polling; each queue's
    process logs its count when the driver resets the queues)."""
    with serve("vexport", [key], tmp_path) as served:
        name = served.name(key)
        with served.attach(key) as dev:
            job = helpers.fio([
                f"--filename={dev}", "--size=4M", "--ioengine=libaio", "--direct=1",
                "--rw=randwrite", "--bs=4k", "--iodepth=1", "--verify=crc32c",
                "--do_verify=1", "--verify_fatal=1", "--randseed=77",
            ])  # fmt: skip
        log_text = helpers.daemon_log(name)
    ios = job["write"]["total_ios"] + job["read"]["total_ios"]
    assert job["error"] == 0 and job["write"]["io_bytes"] >= 4 * MiB * 9 // 10
    assert job["read"]["io_bytes"] >= 4 * MiB * 9 // 10
    counts = [
        int(m)
        for m in re.findall(r"queue \d+: (\d+) request\(s\) served by the compiled poll", log_text)
    ]
    assert sum(counts) > ios // 4, (counts, ios, log_text[-2000:])


def test_interrupt_work_steered_off_the_polling_cpu(tmp_path: Path) -> None:
    """One queue: the driver's interrupt mask holds every CPU; at depth 1 the device
    polls, and narrows the mask to the CPUs it does not run on (irq_steering.py).  A
    daemon stopped with the driver attached writes the driver's mask back."""
    cpus = os.cpu_count() or 1
    if cpus < 2:
        pytest.skip("needs at least 2 CPUs")
    every = set(range(cpus))
    with serve("vexport", ["null-1q"], tmp_path) as served:
        name = served.name("null-1q")
        dev = helpers.vdpa_add(name)
        _depth1_reads(dev)
        steered = vduse.read_irq_affinity(name, 0)
        assert steered and steered != every, steered
    # stopped with the device attached: the device stays, with the driver's mask
    assert vduse.read_irq_affinity(name, 0) == every
    # clean up: a new daemon reattaches; detached, its stop destroys the device
    with serve("vexport", ["null-1q"], tmp_path):
        helpers.vdpa_del(name)
        helpers.wait_for(lambda: not os.path.exists(dev), 30, f"{dev} to go away")


# --------------------------------------------------------------------------- fio verify

# Random writes of mixed sizes at depth 16 with crc32c headers, then read back and checked.
VERIFY_ARGS = [
    "--ioengine=libaio", "--direct=1", "--rw=randwrite", "--iodepth=16",
    "--bssplit=4k/30:8k/20:16k/20:64k/15:128k/15",
    "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--randseed=4242",
]  # fmt: skip


def fio_verify(dev: str, size: int) -> None:
    job = helpers.fio([f"--filename={dev}", f"--size={size}", *VERIFY_ARGS])
    # The random map makes fio write every block once, then read all back and check.
    assert job["write"]["io_bytes"] >= size * 9 // 10, job["write"]["io_bytes"]
    assert job["read"]["io_bytes"] >= size * 9 // 10, job["read"]["io_bytes"]


@pytest.mark.parametrize(
    "daemon,key",
    [
        ("vexport", "threads"),
        ("vexport", "native-direct"),
        ("vexport", "io_uring"),
        ("vexport", "raw-offset"),
        ("qsd", "native-direct"),
        ("qsd", "raw-offset"),
    ],
)
def test_fio_verify_file(
    daemon: str, key: str, get_vexport: Callable[[], Served], tmp_path: Path
) -> None:
    window = RAW_OFFSET if key == "raw-offset" else 0
    with served_by(daemon, key, get_vexport, tmp_path) as served:
        image = served.image(key)
        with served.attach(key) as dev:
            assert helpers.disk_bytes(dev) == VERIFY_SIZE
            fio_verify(dev, VERIFY_SIZE)
            # The backing file holds exactly what the device shows, at the right place.
            assert helpers.odirect_digest(dev, 0, VERIFY_SIZE) == helpers.file_digest(
                image, window, VERIFY_SIZE
            )
    if key == "raw-offset":
        assert os.path.getsize(image) == RAW_OFFSET + VERIFY_SIZE + len(RAW_TAIL)
        with open(image, "rb") as f:
            assert f.read(RAW_OFFSET) == RAW_HEAD, "bytes before the raw window changed"
            f.seek(RAW_OFFSET + VERIFY_SIZE)
            assert f.read() == RAW_TAIL, "bytes after the raw window changed"
    else:
        assert os.path.getsize(image) == VERIFY_SIZE


def test_host_device_null_blk_native_16_queues(vexport: Served) -> None:
    """The classic null_blk example (host_device, cache.direct=on, aio=native, 16
    queues), on a memory-backed null_blk so that fio can verify the data."""
    with vexport.attach("nullblk") as dev:
        assert helpers.disk_bytes(dev) == NULL_BLK_SIZE
        assert len(os.listdir(f"/sys/class/block/{Path(dev).name}/mq")) == 2
        fio_verify(dev, VERIFY_SIZE)
        assert helpers.odirect_digest(dev, 0, NULL_BLK_SIZE) == helpers.odirect_digest(
            f"/dev/{NULL_BLK}", 0, NULL_BLK_SIZE
        )


@pytest.mark.parametrize("daemon", ["vexport", "qsd"])
def test_reattach_keeps_data(
    daemon: str, get_vexport: Callable[[], Served], tmp_path: Path
) -> None:
    """Detach and attach again (a virtio reset, new rings): I/O works, data is kept."""
    data = pattern("reattach", 256 * 1024)
    with served_by(daemon, "reattach", get_vexport, tmp_path) as served:
        with served.attach("reattach") as dev:
            helpers.odirect_write(dev, 5 * MiB, data)
        for round in range(2):
            with served.attach("reattach") as dev:
                assert helpers.odirect_read(dev, 5 * MiB, len(data)) == data, round
                job = helpers.fio(
                    [f"--filename={dev}", f"--size={4 * MiB}", "--runtime=1", *VERIFY_ARGS]
                )
                assert job["write"]["total_ios"] > 0 and job["read"]["total_ios"] > 0


# --------------------------------------------------------------------------- file system

N_FILES = 2000


def test_ext4_many_files_fsck_remount(vexport: Served, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rng = random.Random(2000)
    sums: dict[str, str] = {}
    with vexport.attach("ext4") as dev:
        subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
        subprocess.run(["mount", "-t", "ext4", dev, str(mnt)], check=True)
        try:
            for i in range(N_FILES):
                rel = f"d{i % 40:02d}/f{i:05d}"
                data = rng.randbytes(rng.randrange(0, 6000))
                path = mnt / rel
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(data)
                sums[rel] = hashlib.sha256(data).hexdigest()
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        fsck = subprocess.run(["fsck.ext4", "-fn", dev], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        subprocess.run(["mount", "-t", "ext4", "-o", "ro", dev, str(mnt)], check=True)
        try:
            found = {
                str(p.relative_to(mnt)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in mnt.glob("d*/f*")
            }
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    assert len(found) == N_FILES
    assert found == sums
    # The file system really is in the backing file.
    fsck = subprocess.run(
        ["fsck.ext4", "-fn", str(vexport.image("ext4"))], capture_output=True, text=True
    )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


# --------------------------------------------------------------------------- discard, zeroes, flush


def test_discard_write_zeroes_flush(vexport: Served) -> None:
    image = vexport.image("discard")
    with vexport.attach("discard") as dev:
        assert int(helpers.sysfs_block(dev, "queue/discard_max_bytes")) > 0
        assert int(helpers.sysfs_block(dev, "queue/write_zeroes_max_bytes")) > 0
        assert helpers.sysfs_block(dev, "queue/write_cache") == "write back"

        # Discard: 16 MiB of data allocated in the backing file, then unmapped.
        data = pattern("discard", MiB)
        for i in range(16):
            helpers.odirect_write(dev, i * MiB, data)
        allocated = os.stat(image).st_blocks * 512
        assert allocated >= 16 * MiB, allocated
        subprocess.run(
            ["blkdiscard", "-o", "0", "-l", str(16 * MiB), dev], check=True, capture_output=True
        )
        after = os.stat(image).st_blocks * 512
        assert after <= allocated - 15 * MiB, (allocated, after)

        # Write zeroes: data at 32 MiB, then blkdiscard -z over the middle of it.
        zdata = pattern("zeroes", 4 * MiB)
        helpers.odirect_write(dev, 32 * MiB, zdata)
        subprocess.run(
            ["blkdiscard", "-z", "-o", str(33 * MiB), "-l", str(2 * MiB), dev],
            check=True,
            capture_output=True,
        )
        got = helpers.odirect_read(dev, 32 * MiB, 4 * MiB)
        assert got[:MiB] == zdata[:MiB]
        assert got[MiB : 3 * MiB] == bytes(2 * MiB)
        assert got[3 * MiB :] == zdata[3 * MiB :]
        with open(image, "rb") as f:
            f.seek(32 * MiB)
            assert f.read(4 * MiB) == got

        # Flush: fio with an fsync after every write, then sync(1).
        fio_args = [
            f"--filename={dev}", "--ioengine=psync", "--direct=1", "--rw=randwrite",
            "--bs=4k", "--fsync=1", f"--offset={40 * MiB}", f"--size={16 * MiB}",
            "--runtime=2", "--time_based",
        ]  # fmt: skip
        job = helpers.fio(fio_args)
        assert job["write"]["total_ios"] > 0
        assert job["sync"]["total_ios"] >= job["write"]["total_ios"] - 1, job["sync"]
        subprocess.run(["sync", dev], check=True)


# --------------------------------------------------------------------------- read-only


@pytest.mark.parametrize("key", ["ro-writable-off", "ro-node-read-only"])
def test_read_only_export(vexport: Served, key: str) -> None:
    with vexport.attach(key) as dev:
        assert helpers.sysfs_block(dev, "ro") == "1"
        assert helpers.odirect_read(dev, 0, len(RO_CONTENT)) == RO_CONTENT
        assert helpers.odirect_read(dev, 8 * MiB, 4096) == bytes(4096)
        # The disk is read-only (VIRTIO_BLK_F_RO): Linux 6.12 lets it be opened for
        # writing but fails every write with EPERM (qemu-storage-daemon: the same).
        with pytest.raises(OSError) as exc:
            helpers.odirect_write(dev, 0, bytes(4096))
        assert exc.value.errno == errno.EPERM
        with pytest.raises(OSError) as exc, open(dev, "r+b", buffering=0) as f:
            f.write(bytes(512))
        assert exc.value.errno == errno.EPERM
    with open(vexport.image(key), "rb") as f:
        assert f.read(len(RO_CONTENT)) == RO_CONTENT
        assert f.read() == bytes(RO_SIZE - len(RO_CONTENT))


# --------------------------------------------------------------------------- QMP


@pytest.mark.parametrize("daemon", ["vexport", "qsd"])
def test_block_resize_grows_disk(
    daemon: str, get_vexport: Callable[[], Served], tmp_path: Path
) -> None:
    with served_by(daemon, "resize", get_vexport, tmp_path) as served:
        image = served.image("resize")
        with served.attach("resize") as dev:
            assert helpers.disk_bytes(dev) == 64 * MiB
            qmp = helpers.qmp_connect(served.qmp_sock)
            try:
                reply = qmp.cmd("block_resize", **{"node-name": "n-resize", "size": 96 * MiB})
                assert reply == {}
            finally:
                qmp.close()
            helpers.wait_for(
                lambda: helpers.disk_bytes(dev) == 96 * MiB, 30, f"{dev} to grow to 96 MiB"
            )
            assert os.path.getsize(image) == 96 * MiB
            # The new space is usable through the same device, without reattaching, on
            # both queues (one per CPU; vexport serves queue 1 in a worker process, which
            # must learn the new size too).
            data = pattern("resize", 64 * 1024)
            offsets = {cpu: 96 * MiB - (cpu + 1) * len(data) for cpu in (0, 1)}
            affinity = os.sched_getaffinity(0)
            try:
                for cpu, offset in offsets.items():
                    os.sched_setaffinity(0, {cpu})
                    helpers.odirect_write(dev, offset, data)
                    assert helpers.odirect_read(dev, offset, len(data)) == data
            finally:
                os.sched_setaffinity(0, affinity)
        with open(image, "rb") as f:
            for offset in offsets.values():
                f.seek(offset)
                assert f.read(len(data)) == data
