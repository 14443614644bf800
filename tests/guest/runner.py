"""Real-kernel test guest: prepare a kernel + initramfs, boot it under QEMU TCG, run a command.

Theory of operation
-------------------
The development machines run a kernel without VDUSE, so tests that need the real driver run
inside a throw-away guest (see docs/guest.md and /work/shared/docs/real-kernel-guest.md):

* ``prepare()`` makes sure the host has the needed Debian packages, finds the newest 6.12
  kernel package (bookworm-backports on Debian 12, the distribution kernel on Debian 13),
  ``apt-get download``s it, extracts ``vmlinuz`` and the modules we need (decompressed,
  because busybox ``insmod`` cannot read ``.ko.xz``) and builds a tiny busybox initramfs.
  Everything is cached outside the repository in ``$VEXPORT_GUEST_CACHE/<kver>/``
  (default ``~/.cache/vexport-guest``); a complete cache entry is reused without any apt or
  network access.
* ``run(argv)`` boots ``qemu-system-x86_64`` (TCG) with the host's ``/`` shared read-only
  over 9p as the guest's root and a per-run host *results directory* shared writable.  The
  initramfs ``/init`` loads the modules, mounts both shares, puts tmpfs on /tmp, /run,
  /var/tmp and /mnt and ``switch_root``s into the host's file system, running the stage-2
  script that the host wrote into the results directory.  Stage 2 sets up the environment,
  runs the command (written to ``cmd.sh`` in the results directory, never on the kernel
  command line), records ``output.log`` and ``status`` and powers the guest off with sysrq.
* The host waits for QEMU with a time limit; QEMU runs in its own process group, which is
  killed on timeout, on any exception (KeyboardInterrupt included) and on return, so no
  QEMU process outlives ``run()``.  A guest that never wrote ``status`` is reported as a
  :class:`GuestError` carrying the reason (a marker the init printed, a kernel panic, the
  time limit) and the tail of the serial console.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

ROOT_TAG = "hostroot"
RESULTS_TAG = "results"
CWD_TAG = "cwd"
# Directories the guest covers with its own tmpfs (see INIT_SCRIPT).
GUEST_TMPFS = ("/tmp", "/var/tmp", "/run", "/mnt")
# Where the results share is mounted inside the guest (a fresh tmpfs is put on /mnt first).
GUEST_RESULTS = "/mnt/vexport-results"
IN_GUEST_ENV = "VEXPORT_IN_GUEST"
CACHE_ENV = "VEXPORT_GUEST_CACHE"
# Printed on the console by /init when the boot cannot proceed; the host looks for it.
FAIL_MARKER = "VEXPORT-GUEST-FAIL:"

APT_PACKAGES = (
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "fio",
    "xz-utils",
    "e2fsprogs",
    "iproute2",
)
# Binaries that tell whether a package is present without asking dpkg (fast path).
_PACKAGE_PROBES = {
    "qemu-system-x86": "qemu-system-x86_64",
    "busybox-static": "busybox",
    "cpio": "cpio",
    "fio": "fio",
    "xz-utils": "xz",
    "e2fsprogs": "mkfs.ext4",
    "iproute2": "vdpa",
}

# Load order (dependencies from modules.dep are inserted before each module as needed).
# (name, insmod parameters)
MODULES: tuple[tuple[str, str], ...] = (
    ("netfs", ""),
    ("9pnet", ""),
    ("9pnet_virtio", ""),
    ("9p", ""),
    ("vhost_iotlb", ""),
    ("vdpa", ""),
    ("vduse", ""),
    ("virtio_vdpa", ""),
    ("virtio_blk", ""),
    ("vhost", ""),
    ("irqbypass", ""),
    ("vhost_vdpa", ""),
    ("configfs", ""),
    # Defaults: /dev/nullb0 exists (250 GiB, not memory backed); more devices with other
    # parameters can be made through configfs (/sys/kernel/config/nullb), see helpers.py.
    ("null_blk", ""),
    ("crc16", ""),
    ("crc32c_generic", ""),
    ("mbcache", ""),
    ("jbd2", ""),
    ("ext4", ""),
)

# Host environment variables handed to the guest command (when set on the host), and
# every VEXPORT_* one (daemon tuning such as VEXPORT_POLL_SPINS reaches the guest's daemons).
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "VIRTUAL_ENV", "PYTHONPATH", "TERM")
PASSED_PREFIX = "VEXPORT_"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

BOOT_QEMU = "qemu-system-x86_64"


class GuestError(RuntimeError):
    """The guest did not run the command to completion (boot failure, time limit, ...)."""

    def __init__(self, reason: str, console_tail: str = "", output_tail: str = "") -> None:
        self.reason = reason
        self.console_tail = console_tail
        self.output_tail = output_tail
        text = reason
        if output_tail:
            text += "\n--- guest command output (tail) ---\n" + output_tail
        if console_tail:
            text += "\n--- guest console (tail) ---\n" + console_tail
        super().__init__(text)


@dataclasses.dataclass
class GuestImage:
    """A prepared kernel + initramfs."""

    kver: str
    kernel: Path
    initramfs: Path
    modules_dir: Path


@dataclasses.dataclass
class GuestResult:
    status: int
    output: str
    console: str
    results_dir: Path
    boot_seconds: float  # from QEMU start until the command began (from the guest's uptime)
    total_seconds: float  # wall time of the whole run, QEMU start to exit


def _log(msg: str) -> None:
    print(f"[guest] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- preparation


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "vexport-guest"


def debian_major() -> int:
    try:
        text = Path("/etc/debian_version").read_text().strip()
    except OSError:
        return 0
    m = re.match(r"(\d+)", text)
    if m:
        return int(m.group(1))
    return {"bookworm": 12, "trixie": 13}.get(text.split("/")[0], 0)


def _run(argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=True, text=True, **kw)  # type: ignore[call-overload]


class _Apt:
    """apt-get with at most one ``update`` per process."""

    updated = False

    @classmethod
    def update(cls, force: bool = False) -> None:
        if cls.updated and not force:
            return
        _log("apt-get update")
        _run(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL)
        cls.updated = True

    @classmethod
    def install(cls, packages: Iterable[str]) -> None:
        pkgs = list(packages)
        if not pkgs:
            return
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        _log("apt-get install " + " ".join(pkgs))
        try:
            _run(["apt-get", "install", "-y", "-q", *pkgs], env=env, stdout=subprocess.DEVNULL)
        except subprocess.CalledProcessError:
            cls.update(force=True)
            _run(["apt-get", "install", "-y", "-q", *pkgs], env=env, stdout=subprocess.DEVNULL)


def ensure_packages() -> None:
    missing = [p for p, exe in _PACKAGE_PROBES.items() if not _have_exe(exe)]
    if missing:
        _Apt.install(missing)


def _have_exe(name: str) -> bool:
    return shutil.which(name, path=DEFAULT_PATH) is not None


BACKPORTS_FILE = Path("/etc/apt/sources.list.d/vexport-bookworm-backports.sources")


def ensure_backports_source() -> bool:
    """Add a bookworm-backports source next to the machine's own; True if one was added."""
    for f in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        if f.suffix not in (".list", ".sources") and f.name != "sources.list":
            continue
        with contextlib.suppress(OSError):
            if re.search(r"^[^#]*\bbookworm-backports\b", f.read_text(), re.M):
                return False
    uri, keyring = "http://deb.debian.org/debian", "/usr/share/keyrings/debian-archive-keyring.gpg"
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.exists():
        # Take the stanza that carries the plain "bookworm" suite (not -security).
        for stanza in deb822.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for ln in stanza.splitlines():
                k, sep, v = ln.partition(":")
                if sep and not ln.startswith("#"):
                    fields[k.strip()] = v.strip()
            if "bookworm" in fields.get("Suites", "").split():
                uri = fields.get("URIs", uri).split()[0]
                keyring = fields.get("Signed-By", keyring)
                break
    BACKPORTS_FILE.write_text(
        "# Added by vexport tests/guest/runner.py: the 6.12 kernel for the test guest.\n"
        f"Types: deb\nURIs: {uri}\nSuites: bookworm-backports\nComponents: main\n"
        f"Signed-By: {keyring}\n"
    )
    _log(f"added {BACKPORTS_FILE}")
    return True


def _version_key(v: str) -> list[tuple[int, object]]:
    # Good enough for kernel package versions (numbers compared numerically).
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.findall(r"\d+|[a-z]+", v)]


def find_kernel_package() -> str:
    """Name of the newest linux-image-6.12*-amd64 package apt knows about."""
    pattern = r"^linux-image-6\.12\.[0-9][^-]*-amd64(-unsigned)?$"
    out = _run(["apt-cache", "search", "--names-only", pattern], capture_output=True).stdout.split(
        "\n"
    )
    names = [ln.split(" ", 1)[0] for ln in out if ln.strip()]
    names = [n for n in names if "-rt-" not in n and "-cloud-" not in n and "-dbg" not in n]
    if not names:
        raise GuestError("no linux-image-6.12*-amd64 package found by apt-cache")
    names.sort(key=lambda n: (_version_key(n.replace("-unsigned", "")), n.endswith("-unsigned")))
    # Prefer the signed package (the usual one; it also holds vmlinuz and the modules).
    best = names[-1].replace("-unsigned", "")
    return best if best in names else names[-1]


def _dep_order(wanted: Sequence[str], deps: Mapping[str, list[str]]) -> list[str]:
    order: list[str] = []

    def visit(m: str, stack: tuple[str, ...]) -> None:
        if m in order or m in stack:
            return
        for d in deps.get(m, []):
            visit(d, (*stack, m))
        order.append(m)

    for m in wanted:
        visit(m, ())
    return order


def _mod_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", base).replace("-", "_")


def _extract_kernel(pkg_dir: Path, dest: Path) -> str:
    """From an extracted package tree, copy vmlinuz + needed modules into dest; return kver."""
    kernels = sorted((pkg_dir / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise GuestError(f"no /boot/vmlinuz-* in the kernel package ({pkg_dir})")
    kver = kernels[-1].name[len("vmlinuz-") :]
    moddir = pkg_dir / "lib" / "modules" / kver
    if not moddir.is_dir():
        raise GuestError(f"kernel package has no lib/modules/{kver}")
    config = pkg_dir / "boot" / f"config-{kver}"
    if config.exists() and "CONFIG_VDPA_USER=m" not in config.read_text():
        raise GuestError(f"kernel {kver} is not built with CONFIG_VDPA_USER=m (no vduse)")
    # The package ships no modules.dep (depmod makes it at install time), so dependencies
    # come from each module's own "depends=" modinfo string.
    paths = {_mod_name(str(p)): p for p in moddir.rglob("*.ko*")}
    builtin: set[str] = set()
    if (moddir / "modules.builtin").exists():
        builtin = {_mod_name(x) for x in (moddir / "modules.builtin").read_text().split()}
    mods_out = dest / "modules"
    mods_out.mkdir(parents=True, exist_ok=True)
    deps: dict[str, list[str]] = {}

    def load(name: str) -> None:
        if name in deps or name in builtin:
            return
        if name not in paths:
            raise GuestError(f"kernel {kver}: module {name} not found")
        out = mods_out / f"{name}.ko"
        _decompress(paths[name], out)
        m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", out.read_bytes())
        deps[name] = [d for d in (m.group(1).decode().split(",") if m else []) if d]
        for d in deps[name]:
            load(d)

    wanted = [m for m, _ in MODULES]
    for m in wanted:
        load(m)
    order = [m for m in _dep_order(wanted, deps) if m not in builtin]
    params = dict(MODULES)
    lines = [f"{m} {params.get(m, '')}".rstrip() for m in order]
    (mods_out / "load-order").write_text("\n".join(lines) + "\n")
    shutil.copyfile(kernels[-1], dest / "vmlinuz")
    if config.exists():
        shutil.copyfile(config, dest / "config")
    return kver


def _decompress(src: Path, out: Path) -> None:
    if src.name.endswith(".xz"):
        with open(out, "wb") as f:
            _run(["xz", "-dc", str(src)], stdout=f)
    elif src.name.endswith(".zst"):
        with open(out, "wb") as f:
            _run(["zstd", "-dc", str(src)], stdout=f)
    else:
        shutil.copyfile(src, out)


def _download_kernel(work: Path) -> Path:
    """apt-get download the kernel package into work/, return the extracted tree."""
    if debian_major() == 12:
        if ensure_backports_source():
            _Apt.update(force=True)
    try:
        pkg = find_kernel_package()
    except GuestError:
        _Apt.update(force=True)
        pkg = find_kernel_package()
    _log(f"apt-get download {pkg}")
    try:
        _run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg],
            cwd=work,
            stdout=subprocess.DEVNULL,
        )
    except subprocess.CalledProcessError:
        _Apt.update(force=True)
        _run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg],
            cwd=work,
            stdout=subprocess.DEVNULL,
        )
    debs = list(work.glob("*.deb"))
    tree = work / "tree"
    _run(["dpkg-deb", "-x", str(debs[0]), str(tree)])
    if not list((tree / "boot").glob("vmlinuz-*")):
        # Some packages split the image; try the -unsigned variant.
        for d in debs:
            d.unlink()
        _run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg + "-unsigned"],
            cwd=work,
            stdout=subprocess.DEVNULL,
        )
        shutil.rmtree(tree)
        _run(["dpkg-deb", "-x", str(next(work.glob("*.deb"))), str(tree)])
    return tree


INIT_SCRIPT = r"""#!/bin/busybox sh
# vexport test guest, stage 1 (initramfs). Written by tests/guest/runner.py.
/bin/busybox mkdir -p /bin /sbin /proc /sys /dev /newroot
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() {
    echo "@FAIL@ $*"
    echo o > /proc/sysrq-trigger
    sleep 60
}
while read -r mod params; do
    [ -n "$mod" ] || continue
    msg=$(insmod "/modules/$mod.ko" $params 2>&1) || fail "insmod $mod failed: $msg"
done < /modules/load-order
O9P=trans=virtio,version=9p2000.L,msize=512000
msg=$(mount -t 9p -o $O9P,cache=loose,ro @ROOT@ /newroot 2>&1) \
    || fail "mounting the root 9p share failed: $msg"
for d in tmp run var/tmp mnt; do
    msg=$(mount -t tmpfs -o mode=1777 tmpfs "/newroot/$d" 2>&1) || fail "tmpfs on /$d: $msg"
done
chmod 755 /newroot/run /newroot/mnt
mkdir -p /newroot@RESULTS@
msg=$(mount -t 9p -o $O9P,cache=none @RTAG@ /newroot@RESULTS@ 2>&1) \
    || fail "mounting the results 9p share failed: $msg"
[ -f /newroot@RESULTS@/stage2.sh ] || fail "no stage2.sh in the results share"
mount --move /proc /newroot/proc || fail "moving /proc"
mount --move /sys /newroot/sys || fail "moving /sys"
mount --move /dev /newroot/dev || fail "moving /dev"
exec switch_root /newroot /bin/sh @RESULTS@/stage2.sh
"""

STAGE2_SCRIPT = r"""# vexport test guest, stage 2 (on the host's root), by tests/guest/runner.py.
R=@RESULTS@
mkdir -p /dev/pts /dev/shm /dev/mqueue
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t configfs configfs /sys/kernel/config 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mkdir -p /run/lock /tmp/vexport-home
hostname vexport-guest 2>/dev/null
ip link set lo up 2>/dev/null
cut -d' ' -f1 /proc/uptime > "$R/boot-uptime"
# From here on, kernel notices and info messages reach the console (and the host's log).
echo 6 > /proc/sys/kernel/printk
. "$R/env.sh"
# The tmpfs mounts hide the host's /tmp, /var/tmp, /run and /mnt: a working directory
# (a checkout and its .venv) under one of them comes as a share of its own (@CWDTAG@).
if [ -n "$GUEST_CWD_SHARED" ]; then
    mkdir -p "$GUEST_CWD"
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro @CWDTAG@ \
        "$GUEST_CWD" || echo "vexport-guest: cannot mount $GUEST_CWD"
fi
echo "vexport-guest: running command"
cd "$GUEST_CWD" 2>/dev/null || cd /
/bin/sh "$R/cmd.sh" > "$R/output.log" 2>&1 < /dev/null
echo $? > "$R/status.tmp"
sync
mv "$R/status.tmp" "$R/status"
sync
echo "vexport-guest: command finished, powering off"
echo o > /proc/sysrq-trigger
sleep 60
"""


def _init_text() -> str:
    return (
        INIT_SCRIPT.replace("@FAIL@", FAIL_MARKER)
        .replace("@ROOT@", ROOT_TAG)
        .replace("@RTAG@", RESULTS_TAG)
        .replace("@RESULTS@", GUEST_RESULTS)
    )


def _build_initramfs(entry: Path) -> Path:
    """Build (or reuse) the initramfs for a cache entry; named by a hash of its inputs."""
    init = _init_text()
    busybox = shutil.which("busybox", path=DEFAULT_PATH)
    if busybox is None:
        raise GuestError("busybox not found (install busybox-static)")
    h = hashlib.sha256(init.encode())
    h.update((entry / "modules" / "load-order").read_bytes())
    h.update(str(os.stat(busybox).st_size).encode())
    out = entry / f"initramfs-{h.hexdigest()[:12]}.cpio.gz"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(prefix="initramfs-", dir=entry) as tmp:
        t = Path(tmp)
        (t / "bin").mkdir()
        shutil.copyfile(busybox, t / "bin" / "busybox")
        os.chmod(t / "bin" / "busybox", 0o755)
        shutil.copytree(entry / "modules", t / "modules")
        (t / "init").write_text(init)
        os.chmod(t / "init", 0o755)
        for d in ("dev", "proc", "sys", "newroot"):
            (t / d).mkdir()
        names = sorted(str(p.relative_to(t)) for p in t.rglob("*"))
        data = subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
            cwd=t,
            input=("\n".join(names) + "\n").encode(),
            stdout=subprocess.PIPE,
            check=True,
        ).stdout
    tmp_out = out.with_suffix(".tmp")
    with gzip.open(tmp_out, "wb", compresslevel=1) as f:
        f.write(data)
    tmp_out.rename(out)
    for old in entry.glob("initramfs-*.cpio.gz"):
        if old != out:
            old.unlink()
    return out


def _complete_entries(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    entries = [p for p in root.iterdir() if (p / "complete").exists()]
    return sorted(entries, key=lambda p: _version_key(p.name))


def prepare(refresh: bool = False, packages: bool = True) -> GuestImage:
    """Make sure a kernel + initramfs are cached; return them.  Fast when cached.

    With ``refresh=True`` apt is asked for a newer kernel even when one is cached.
    """
    if packages:
        ensure_packages()
    root = cache_root()
    entries = _complete_entries(root)
    if refresh or not entries:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="download-", dir=root) as tmp:
            work = Path(tmp)
            tree = _download_kernel(work)
            staging = work / "entry"
            staging.mkdir()
            kver = _extract_kernel(tree, staging)
            (staging / "complete").write_text(kver + "\n")
            final = root / kver
            if not (final / "complete").exists():
                shutil.rmtree(final, ignore_errors=True)
                staging.rename(final)
                _log(f"cached kernel {kver} in {final}")
        entries = _complete_entries(root)
    entry = entries[-1]
    initramfs = _build_initramfs(entry)
    return GuestImage(
        kver=entry.name,
        kernel=entry / "vmlinuz",
        initramfs=initramfs,
        modules_dir=entry / "modules",
    )


# --------------------------------------------------------------------------- running


def hidden_in_guest(path: str) -> bool:
    """True if ``path`` lies under a directory the guest hides with a tmpfs."""
    return any(path.startswith(d + "/") for d in GUEST_TMPFS)


def _qemu_argv(image: GuestImage, results: Path, memory_mb: int, cpus: int) -> list[str]:
    append = "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init"
    return [
        BOOT_QEMU,
        "-accel", "tcg,thread=multi",
        "-cpu", "max",
        "-m", str(memory_mb),
        "-smp", str(cpus),
        "-nographic",
        "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initramfs),
        "-append", append,
        "-virtfs",
        f"local,path=/,mount_tag={ROOT_TAG},security_model=none,readonly=on,multidevs=remap",
        "-virtfs",
        f"local,path={results},mount_tag={RESULTS_TAG},security_model=none,multidevs=remap",
        "-nic", "none",
    ]  # fmt: skip


def _env_script(cwd: str, extra_env: Mapping[str, str] | None) -> str:
    env: dict[str, str] = {}
    for k, v in os.environ.items():
        if k in PASSED_ENV or k.startswith(PASSED_PREFIX):
            env[k] = v
    path = env.get("PATH", "")
    for d in DEFAULT_PATH.split(":"):
        if d not in path.split(":"):
            path = f"{path}:{d}" if path else d
    env["PATH"] = path
    env.setdefault("LANG", "C.UTF-8")
    env["HOME"] = "/root"
    env["USER"] = env["LOGNAME"] = "root"
    env["SHELL"] = "/bin/sh"
    env["TMPDIR"] = "/tmp"
    env[IN_GUEST_ENV] = "1"
    env["GUEST_CWD"] = cwd
    env["VEXPORT_GUEST_RESULTS"] = GUEST_RESULTS
    env.update(extra_env or {})
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


_ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[A-Za-z])")


def clean_console(text: str) -> str:
    """Console text without carriage returns and terminal escape sequences (SeaBIOS')."""
    return _ANSI.sub("", text.replace("\r", ""))


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(clean_console(text).splitlines()[-lines:])


def _diagnose(console: str) -> str:
    for line in console.replace("\r", "").splitlines():
        if FAIL_MARKER in line:
            return "guest boot failed: " + line.split(FAIL_MARKER, 1)[1].strip()
    m = re.search(r"Kernel panic[^\n]*", console)
    if m:
        return "guest kernel panic: " + m.group(0).strip()
    return "guest exited without running the command to completion (no status file)"


# A guest kernel that panics while booting, before the command started, is booted once
# more: the 6.12 kernel under TCG with several vCPUs was seen once (in about 30 CI runs)
# to die at 1.7 s of uptime of an int3 trap in sched_clock_cpu, before the init ran,
# the kind of fault live code patching under multi-threaded TCG can cause.  Nothing of
# the command ran then, so booting again changes no result.
BOOT_PANIC_RETRIES = 1


def _panicked_before_command(results: Path, console: str) -> bool:
    """The guest kernel panicked before the command started (no ``boot-uptime``,
    which the init writes just before it)."""
    return not (results / "boot-uptime").exists() and "Kernel panic" in console


def _boot(qemu: list[str], console_path: Path, timeout: float) -> tuple[int | None, bool]:
    """Run QEMU until it exits or ``timeout``; its exit status and whether it was
    killed at the time limit.  The console goes to ``console_path``."""
    timed_out = False
    with open(console_path, "wb") as console_f:
        proc = subprocess.Popen(
            qemu,
            stdin=subprocess.DEVNULL,
            stdout=console_f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: killed as a whole
            preexec_fn=_die_with_parent,
        )
        try:
            with _sigterm_as_exit():
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
        finally:
            _kill_group(proc)
    return proc.returncode, timed_out


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _die_with_parent() -> None:
    """In the QEMU child: get SIGKILL if the runner dies (even by SIGKILL)."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """While waiting for QEMU, SIGTERM raises SystemExit so that QEMU is killed first."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run(
    argv: Sequence[str] | str,
    *,
    timeout: float = 1800,
    results_dir: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    memory_mb: int = 2048,
    cpus: int = 2,
    image: GuestImage | None = None,
) -> GuestResult:
    """Boot a guest, run ``argv`` (a list, or a shell command string) in it, power off.

    Returns a :class:`GuestResult` (the command's exit status and output).  Raises
    :class:`GuestError` when the guest fails to boot, crashes, or exceeds ``timeout``
    seconds (then QEMU is killed).  ``results_dir`` (default: a fresh temporary directory)
    is shared writable with the guest at ``/mnt/vexport-results``
    (``$VEXPORT_GUEST_RESULTS``); files the command writes there are kept.
    """
    if image is None:
        image = prepare()
    if results_dir is None:
        results = Path(tempfile.mkdtemp(prefix="vexport-guest-"))
    else:
        results = Path(results_dir)
        results.mkdir(parents=True, exist_ok=True)
    results = results.resolve()
    for name in ("status", "status.tmp", "output.log", "console.log", "boot-uptime"):
        with contextlib.suppress(FileNotFoundError):
            (results / name).unlink()
    cmd = argv if isinstance(argv, str) else shlex.join(argv)
    (results / "cmd.sh").write_text(cmd + "\n")
    cwd = os.path.abspath(cwd or os.getcwd())
    cwd_share = cwd if hidden_in_guest(cwd) else None
    extra_env = dict(env or {})
    if cwd_share:
        extra_env["GUEST_CWD_SHARED"] = "1"
    (results / "env.sh").write_text(_env_script(cwd, extra_env))
    (results / "stage2.sh").write_text(
        STAGE2_SCRIPT.replace("@RESULTS@", GUEST_RESULTS).replace("@CWDTAG@", CWD_TAG)
    )
    console_path = results / "console.log"
    qemu = _qemu_argv(image, results, memory_mb, cpus)
    if cwd_share:
        qemu += [
            "-virtfs",
            f"local,path={cwd_share},mount_tag={CWD_TAG},security_model=none,readonly=on,"
            "multidevs=remap",
        ]
    start = time.monotonic()
    status_file = results / "status"
    for attempt in range(1 + BOOT_PANIC_RETRIES):
        returncode, timed_out = _boot(qemu, console_path, timeout)
        console = clean_console(console_path.read_text(errors="replace"))
        if (
            timed_out
            or status_file.exists()
            or not _panicked_before_command(results, console)
            or attempt == BOOT_PANIC_RETRIES
        ):
            break
        # Nothing of the command ran: boot again (see BOOT_PANIC_RETRIES).
        _log(f"{_diagnose(console)} before the command started: booting again")
        (results / f"console-panic-{attempt + 1}.log").write_text(console)
    total = time.monotonic() - start
    if timed_out:
        raise GuestError(
            f"guest timed out after {timeout:g} s; QEMU was killed",
            _tail(console_path),
            _tail(results / "output.log"),
        )
    if not status_file.exists():
        raise GuestError(
            _diagnose(console) + f" (QEMU exit status {returncode})",
            _tail(console_path),
            _tail(results / "output.log"),
        )
    try:
        boot = float((results / "boot-uptime").read_text().strip())
    except (OSError, ValueError):
        boot = float("nan")
    return GuestResult(
        status=int(status_file.read_text().strip() or "255"),
        output=(results / "output.log").read_text(errors="replace"),
        console=console,
        results_dir=results,
        boot_seconds=boot,
        total_seconds=total,
    )


# --------------------------------------------------------------------------- CLI


def main(args: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="vexport real-kernel test guest")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="install packages, fetch the kernel, build initramfs")
    pp.add_argument("--refresh", action="store_true", help="look for a newer kernel")
    pr = sub.add_parser("run", help="boot a guest and run a command in it")
    pr.add_argument("--timeout", type=float, default=1800, help="seconds (default 1800)")
    pr.add_argument("--results", help="host directory shared writable with the guest")
    pr.add_argument("--memory", type=int, default=2048, help="MiB (default 2048)")
    pr.add_argument("--cpus", type=int, default=2)
    pr.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    ns = p.parse_args(args)
    if ns.cmd == "prepare":
        t = time.monotonic()
        img = prepare(refresh=ns.refresh)
        print(f"kernel {img.kver}\n  {img.kernel}\n  {img.initramfs}")
        print(f"prepared in {time.monotonic() - t:.1f} s")
        return 0
    command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if not command:
        p.error("run needs a command after --")
    try:
        res = run(
            command,
            timeout=ns.timeout,
            results_dir=ns.results,
            memory_mb=ns.memory,
            cpus=ns.cpus,
        )
    except GuestError as e:
        print(f"guest error: {e}", file=sys.stderr)
        return 125
    sys.stdout.write(res.output)
    _log(
        f"exit status {res.status}; command started {res.boot_seconds:.1f} s after boot; "
        f"total {res.total_seconds:.1f} s; results in {res.results_dir}"
    )
    return res.status


if __name__ == "__main__":
    sys.exit(main())
