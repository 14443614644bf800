"""VDUSE (vDPA Device in Userspace) kernel interface: structs, ioctls, thin wrappers.

Everything follows ``/usr/include/linux/vduse.h`` (API version 0, Linux 6.12).  The
structs are declared with cffi in ABI mode and the ioctls go through libc's
``ioctl()`` (``ffi.dlopen(None)``), so nothing is compiled at install time.
``tests/unit/test_vduse_abi.py`` checks every size, offset and ioctl number against the
header with a C probe.

Two classes, each a thin layer over one file descriptor; ``OSError`` passes through
unchanged (a missing ``/dev/vduse/control`` is ``FileNotFoundError``, ENOENT):

* `VduseControl`: ``/dev/vduse/control``: API version, CREATE_DEV, DESTROY_DEV.
* `VduseDeviceFd`: ``/dev/vduse/NAME``: IOTLB_GET_FD, features, config space,
  queue set-up and interrupts, and the control messages read()/write() on the fd.

The export takes these classes as factories so that unit tests can substitute a fake
kernel with the same methods.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import cffi

ffi = cffi.FFI()
ffi.cdef(
    """
    struct vduse_dev_config {
        char name[256];
        uint32_t vendor_id;
        uint32_t device_id;
        uint64_t features;
        uint32_t vq_num;
        uint32_t vq_align;
        uint32_t reserved[13];
        uint32_t config_size;
        uint8_t config[];
    };
    struct vduse_iotlb_entry {
        uint64_t offset;
        uint64_t start;
        uint64_t last;
        uint8_t perm;
    };
    struct vduse_config_data {
        uint32_t offset;
        uint32_t length;
        uint8_t buffer[];
    };
    struct vduse_vq_config {
        uint32_t index;
        uint16_t max_size;
        uint16_t reserved[13];
    };
    struct vduse_vq_state_split {
        uint16_t avail_index;
    };
    struct vduse_vq_state_packed {
        uint16_t last_avail_counter;
        uint16_t last_avail_idx;
        uint16_t last_used_counter;
        uint16_t last_used_idx;
    };
    struct vduse_vq_info {
        uint32_t index;
        uint32_t num;
        uint64_t desc_addr;
        uint64_t driver_addr;
        uint64_t device_addr;
        union {
            struct vduse_vq_state_split split;
            struct vduse_vq_state_packed packed;
        };
        uint8_t ready;
    };
    struct vduse_vq_eventfd {
        uint32_t index;
        int fd;
    };
    struct vduse_iova_umem {
        uint64_t uaddr;
        uint64_t iova;
        uint64_t size;
        uint64_t reserved[3];
    };
    struct vduse_iova_info {
        uint64_t start;
        uint64_t last;
        uint64_t capability;
        uint64_t reserved[3];
    };
    struct vduse_vq_state {
        uint32_t index;
        union {
            struct vduse_vq_state_split split;
            struct vduse_vq_state_packed packed;
        };
    };
    struct vduse_dev_status {
        uint8_t status;
    };
    struct vduse_iova_range {
        uint64_t start;
        uint64_t last;
    };
    struct vduse_dev_request {
        uint32_t type;
        uint32_t request_id;
        uint32_t reserved[4];
        union {
            struct vduse_vq_state vq_state;
            struct vduse_dev_status s;
            struct vduse_iova_range iova;
            uint32_t padding[32];
        };
    };
    struct vduse_dev_response {
        uint32_t request_id;
        uint32_t result;
        uint32_t reserved[4];
        union {
            struct vduse_vq_state vq_state;
            uint32_t padding[32];
        };
    };
    int ioctl(int fd, unsigned long request, ...);
    """
)
_libc = ffi.dlopen(None)

# -- ioctl numbers (asm-generic/ioctl.h encoding, used by x86 and arm64) -------------------
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _io(type_: int, nr: int) -> int:
    return _ioc(_IOC_NONE, type_, nr, 0)


def _ior(type_: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ, type_, nr, size)


def _iow(type_: int, nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, type_, nr, size)


def _iowr(type_: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, type_, nr, size)


VDUSE_BASE = 0x81
VDUSE_API_VERSION = 0
VDUSE_NAME_MAX = 256
_U64 = 8
_U32 = 4

VDUSE_GET_API_VERSION = _ior(VDUSE_BASE, 0x00, _U64)
VDUSE_SET_API_VERSION = _iow(VDUSE_BASE, 0x01, _U64)
VDUSE_CREATE_DEV = _iow(VDUSE_BASE, 0x02, ffi.sizeof("struct vduse_dev_config"))
VDUSE_DESTROY_DEV = _iow(VDUSE_BASE, 0x03, VDUSE_NAME_MAX)
VDUSE_IOTLB_GET_FD = _iowr(VDUSE_BASE, 0x10, ffi.sizeof("struct vduse_iotlb_entry"))
VDUSE_DEV_GET_FEATURES = _ior(VDUSE_BASE, 0x11, _U64)
VDUSE_DEV_SET_CONFIG = _iow(VDUSE_BASE, 0x12, ffi.sizeof("struct vduse_config_data"))
VDUSE_DEV_INJECT_CONFIG_IRQ = _io(VDUSE_BASE, 0x13)
VDUSE_VQ_SETUP = _iow(VDUSE_BASE, 0x14, ffi.sizeof("struct vduse_vq_config"))
VDUSE_VQ_GET_INFO = _iowr(VDUSE_BASE, 0x15, ffi.sizeof("struct vduse_vq_info"))
VDUSE_VQ_SETUP_KICKFD = _iow(VDUSE_BASE, 0x16, ffi.sizeof("struct vduse_vq_eventfd"))
VDUSE_VQ_INJECT_IRQ = _iow(VDUSE_BASE, 0x17, _U32)
VDUSE_IOTLB_REG_UMEM = _iow(VDUSE_BASE, 0x18, ffi.sizeof("struct vduse_iova_umem"))
VDUSE_IOTLB_DEREG_UMEM = _iow(VDUSE_BASE, 0x19, ffi.sizeof("struct vduse_iova_umem"))
VDUSE_IOTLB_GET_INFO = _iowr(VDUSE_BASE, 0x1A, ffi.sizeof("struct vduse_iova_info"))

# Control messages (enum vduse_req_type) and results.
VDUSE_GET_VQ_STATE = 0
VDUSE_SET_STATUS = 1
VDUSE_UPDATE_IOTLB = 2
VDUSE_REQ_RESULT_OK = 0x00
VDUSE_REQ_RESULT_FAILED = 0x01

VDUSE_ACCESS_RO = 0x1
VDUSE_ACCESS_WO = 0x2
VDUSE_ACCESS_RW = 0x3
VDUSE_IOVA_CAP_UMEM = 1 << 0
VDUSE_EVENTFD_DEASSIGN = -1

REQUEST_SIZE = ffi.sizeof("struct vduse_dev_request")
RESPONSE_SIZE = ffi.sizeof("struct vduse_dev_response")

CONTROL_PATH = "/dev/vduse/control"
DEVICE_DIR = "/dev/vduse"
# Per virtqueue, the CPUs on which VDUSE runs the driver's interrupt callback (a
# workqueue item per VDUSE_VQ_INJECT_IRQ, round-robin over the mask).  The virtio driver
# sets it (virtio_vdpa: from blk-mq's queue-to-CPU map); root may rewrite it.  Linux 6.8+.
SYSFS_CLASS_DIR = "/sys/class/vduse"


class IotlbEntry(NamedTuple):
    fd: int
    start: int
    last: int
    offset: int
    perm: int


@dataclass(frozen=True, slots=True)
class VqInfo:
    index: int
    num: int
    desc_addr: int
    driver_addr: int  # the avail ring
    device_addr: int  # the used ring
    avail_index: int
    ready: bool


class IovaInfo(NamedTuple):
    start: int
    last: int
    capability: int


class VduseRequest(NamedTuple):
    """One control message.  ``payload``: vq index (GET_VQ_STATE), status byte
    (SET_STATUS), ``(start, last)`` (UPDATE_IOTLB), or the raw 128-byte union."""

    type: int
    request_id: int
    payload: object


_requests: dict[int, Any] = {}  # request number -> its cdata (ffi.cast is slow per call)


def _ioctl(fd: int, request: int, arg: object) -> int:
    req = _requests.get(request)
    if req is None:
        req = _requests[request] = ffi.cast("unsigned long", request)
    ret = _libc.ioctl(fd, req, arg)
    if ret < 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err))
    return int(ret)


def _ioctl_int(fd: int, request: int, value: int = 0) -> int:
    return _ioctl(fd, request, ffi.cast("unsigned long", value))


def _name_bytes(name: str) -> bytes:
    raw = name.encode()
    if not raw or len(raw) >= VDUSE_NAME_MAX or b"/" in raw or b"\0" in raw:
        raise ValueError(f"invalid VDUSE device name {name!r}")
    return raw


class VduseControl:
    """``/dev/vduse/control``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, path: str = CONTROL_PATH) -> VduseControl:
        return cls(os.open(path, os.O_RDWR | os.O_CLOEXEC))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def get_api_version(self) -> int:
        value = ffi.new("uint64_t *")
        _ioctl(self.fd, VDUSE_GET_API_VERSION, value)
        return int(value[0])

    def set_api_version(self, version: int = VDUSE_API_VERSION) -> None:
        _ioctl(self.fd, VDUSE_SET_API_VERSION, ffi.new("uint64_t *", version))

    def create_dev(
        self,
        name: str,
        *,
        device_id: int,
        vendor_id: int = 0,
        features: int,
        vq_num: int,
        vq_align: int = 4096,
        config: bytes = b"",
    ) -> None:
        """CREATE_DEV; EEXIST (``FileExistsError``) if the device is already there."""
        raw = _name_bytes(name)
        buf = ffi.new("char[]", ffi.sizeof("struct vduse_dev_config") + len(config))
        cfg = ffi.cast("struct vduse_dev_config *", buf)
        cfg.name[0 : len(raw)] = raw
        cfg.vendor_id = vendor_id
        cfg.device_id = device_id
        cfg.features = features
        cfg.vq_num = vq_num
        cfg.vq_align = vq_align
        cfg.config_size = len(config)
        if config:
            ffi.memmove(cfg.config, config, len(config))
        _ioctl(self.fd, VDUSE_CREATE_DEV, cfg)

    def destroy_dev(self, name: str) -> None:
        """DESTROY_DEV; EBUSY while the device is attached or open."""
        buf = ffi.new("char[]", VDUSE_NAME_MAX)
        raw = _name_bytes(name)
        buf[0 : len(raw)] = raw
        _ioctl(self.fd, VDUSE_DESTROY_DEV, buf)


class VduseDeviceFd:
    """``/dev/vduse/NAME`` (one opener at a time: EBUSY)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._irq_args: dict[int, Any] = {}  # queue index -> its VQ_INJECT_IRQ argument

    @classmethod
    def open(
        cls, name: str, directory: str = DEVICE_DIR, nonblocking: bool = True
    ) -> VduseDeviceFd:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
        return cls(os.open(os.path.join(directory, name), flags))

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- memory -----------------------------------------------------------------------

    def iotlb_get_fd(self, start: int, last: int) -> IotlbEntry:
        """The first region overlapping [start, last] (EINVAL if none); mmap its fd."""
        entry = ffi.new("struct vduse_iotlb_entry *")
        entry.start = start
        entry.last = last
        fd = _ioctl(self.fd, VDUSE_IOTLB_GET_FD, entry)
        return IotlbEntry(fd, int(entry.start), int(entry.last), int(entry.offset), int(entry.perm))

    def iotlb_reg_umem(self, uaddr: int, iova: int, size: int) -> None:
        umem = ffi.new("struct vduse_iova_umem *", {"uaddr": uaddr, "iova": iova, "size": size})
        _ioctl(self.fd, VDUSE_IOTLB_REG_UMEM, umem)

    def iotlb_dereg_umem(self, iova: int, size: int) -> None:
        umem = ffi.new("struct vduse_iova_umem *", {"iova": iova, "size": size})
        _ioctl(self.fd, VDUSE_IOTLB_DEREG_UMEM, umem)

    def iotlb_get_info(self, start: int, last: int) -> IovaInfo:
        info = ffi.new("struct vduse_iova_info *", {"start": start, "last": last})
        _ioctl(self.fd, VDUSE_IOTLB_GET_INFO, info)
        return IovaInfo(int(info.start), int(info.last), int(info.capability))

    # -- device -----------------------------------------------------------------------

    def get_features(self) -> int:
        value = ffi.new("uint64_t *")
        _ioctl(self.fd, VDUSE_DEV_GET_FEATURES, value)
        return int(value[0])

    def set_config(self, offset: int, data: bytes) -> None:
        size = ffi.sizeof("struct vduse_config_data")
        buf = ffi.new("char[]", size + len(data))
        cfg = ffi.cast("struct vduse_config_data *", buf)
        cfg.offset = offset
        cfg.length = len(data)
        ffi.memmove(cfg.buffer, data, len(data))
        _ioctl(self.fd, VDUSE_DEV_SET_CONFIG, cfg)

    def inject_config_irq(self) -> None:
        _ioctl_int(self.fd, VDUSE_DEV_INJECT_CONFIG_IRQ)

    # -- queues -----------------------------------------------------------------------

    def vq_setup(self, index: int, max_size: int) -> None:
        cfg = ffi.new("struct vduse_vq_config *", {"index": index, "max_size": max_size})
        _ioctl(self.fd, VDUSE_VQ_SETUP, cfg)

    def vq_get_info(self, index: int) -> VqInfo:
        info = ffi.new("struct vduse_vq_info *", {"index": index})
        _ioctl(self.fd, VDUSE_VQ_GET_INFO, info)
        return VqInfo(
            int(info.index),
            int(info.num),
            int(info.desc_addr),
            int(info.driver_addr),
            int(info.device_addr),
            int(info.split.avail_index),
            bool(info.ready),
        )

    def vq_setup_kickfd(self, index: int, fd: int) -> None:
        """Attach eventfd ``fd`` as the kick of queue ``index`` (-1 detaches)."""
        arg = ffi.new("struct vduse_vq_eventfd *", {"index": index, "fd": fd})
        _ioctl(self.fd, VDUSE_VQ_SETUP_KICKFD, arg)

    def vq_inject_irq(self, index: int) -> None:
        arg = self._irq_args.get(index)
        if arg is None:
            arg = self._irq_args[index] = ffi.new("uint32_t *", index)
        _ioctl(self.fd, VDUSE_VQ_INJECT_IRQ, arg)

    # -- control messages -----------------------------------------------------------

    def read_request(self) -> VduseRequest | None:
        """One control message, or None if none is pending (non-blocking fd)."""
        try:
            data = os.read(self.fd, REQUEST_SIZE)
        except BlockingIOError:
            return None
        return parse_request(data)

    def write_response(
        self, request_id: int, result: int, vq_state: tuple[int, int] | None = None
    ) -> None:
        """Answer ``request_id``; ``vq_state`` = (index, avail_index) for GET_VQ_STATE."""
        os.write(self.fd, build_response(request_id, result, vq_state))


def irq_affinity_path(name: str, index: int) -> str:
    return f"{SYSFS_CLASS_DIR}/{name}/vq{index}/irq_cb_affinity"


def parse_cpumask(text: str) -> frozenset[int]:
    """A sysfs cpumask (``%*pb``: hex, 32-bit groups separated by commas, most
    significant first, e.g. ``3`` or ``00000001,00000000``) as a set of CPU numbers."""
    value = int(text.strip().replace(",", "") or "0", 16)
    return frozenset(i for i in range(value.bit_length()) if value >> i & 1)


def format_cpumask(cpus: frozenset[int] | set[int]) -> str:
    """The inverse of `parse_cpumask` (the kernel's cpumask_parse reads it)."""
    value = 0
    for cpu in cpus:
        value |= 1 << cpu
    text = f"{value:x}"
    groups = [text[max(0, i - 8) : i] for i in range(len(text), 0, -8)]
    return ",".join(reversed(groups))


def read_irq_affinity(name: str, index: int) -> frozenset[int]:
    with open(irq_affinity_path(name, index)) as f:
        return parse_cpumask(f.read())


def write_irq_affinity(name: str, index: int, cpus: frozenset[int]) -> None:
    with open(irq_affinity_path(name, index), "w") as f:
        f.write(format_cpumask(cpus))


def parse_request(data: bytes) -> VduseRequest:
    """Decode one ``struct vduse_dev_request``."""
    if len(data) != REQUEST_SIZE:
        raise OSError(f"short VDUSE request: {len(data)} bytes")
    req = ffi.cast("struct vduse_dev_request *", ffi.from_buffer(data))
    type_ = int(req.type)
    payload: object
    if type_ == VDUSE_GET_VQ_STATE:
        payload = int(req.vq_state.index)
    elif type_ == VDUSE_SET_STATUS:
        payload = int(req.s.status)
    elif type_ == VDUSE_UPDATE_IOTLB:
        payload = (int(req.iova.start), int(req.iova.last))
    else:
        payload = bytes(data[24:])
    return VduseRequest(type_, int(req.request_id), payload)


def build_response(request_id: int, result: int, vq_state: tuple[int, int] | None = None) -> bytes:
    """Encode one ``struct vduse_dev_response``."""
    resp = ffi.new("struct vduse_dev_response *")
    resp.request_id = request_id
    resp.result = result
    if vq_state is not None:
        resp.vq_state.index = vq_state[0]
        resp.vq_state.split.avail_index = vq_state[1]
    return bytes(ffi.buffer(resp))
