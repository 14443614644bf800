"""vhost / vhost-vdpa kernel interface: structs, ioctls, IOTLB messages, thin wrappers.

This is the interface a VM monitor (QEMU) uses to drive a vDPA device through
``/dev/vhost-vdpa-N``; vexport uses it only from its test driver
(`vexport.tools.vhost_vdpa_blk`).  Everything follows ``linux/vhost.h`` and
``linux/vhost_types.h``; structs are declared with cffi in ABI mode and the ioctls go
through libc's ``ioctl()``.  ``tests/unit/test_vhost_abi.py`` checks every size,
offset, ioctl number and constant against the headers with a compiled C probe.

Memory is described to the device with ``write()``s of 72-byte ``struct vhost_msg_v2``
messages (`iotlb_msg`): UPDATE maps ``[iova, iova+size)`` to the caller's virtual
address ``uaddr``, INVALIDATE removes a range, BATCH_BEGIN/BATCH_END bracket a group
that the kernel commits at once.  For a VDUSE device the kernel hands the *file* behind
``uaddr`` to the daemon, so the memory must be a MAP_SHARED mapping of a file (memfd).

`VhostVdpa` is one open device node; ``OSError`` passes through unchanged.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import cffi

ffi = cffi.FFI()
ffi.cdef(
    """
    struct vhost_vring_state {
        unsigned int index;
        unsigned int num;
    };
    struct vhost_vring_file {
        unsigned int index;
        int fd;
    };
    struct vhost_vring_addr {
        unsigned int index;
        unsigned int flags;
        uint64_t desc_user_addr;
        uint64_t used_user_addr;
        uint64_t avail_user_addr;
        uint64_t log_guest_addr;
    };
    struct vhost_iotlb_msg {
        uint64_t iova;
        uint64_t size;
        uint64_t uaddr;
        uint8_t perm;
        uint8_t type;
    };
    struct vhost_msg_v2 {
        uint32_t type;
        uint32_t asid;
        union {
            struct vhost_iotlb_msg iotlb;
            uint8_t padding[64];
        };
    };
    struct vhost_vdpa_config {
        uint32_t off;
        uint32_t len;
        uint8_t buf[];
    };
    struct vhost_vdpa_iova_range {
        uint64_t first;
        uint64_t last;
    };
    int ioctl(int fd, unsigned long request, ...);
    """
)
_libc = ffi.dlopen(None)

# -- ioctl numbers (asm-generic/ioctl.h encoding) ---------------------------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (VHOST_VIRTIO << 8) | nr


VHOST_VIRTIO = 0xAF
_U8, _U16, _U32, _U64 = 1, 2, 4, 8
_STATE = ffi.sizeof("struct vhost_vring_state")
_FILE = ffi.sizeof("struct vhost_vring_file")
_ADDR = ffi.sizeof("struct vhost_vring_addr")
_CONFIG = ffi.sizeof("struct vhost_vdpa_config")
_RANGE = ffi.sizeof("struct vhost_vdpa_iova_range")

VHOST_GET_FEATURES = _ioc(_IOC_READ, 0x00, _U64)
VHOST_SET_FEATURES = _ioc(_IOC_WRITE, 0x00, _U64)
VHOST_SET_OWNER = _ioc(_IOC_NONE, 0x01, 0)
VHOST_SET_VRING_NUM = _ioc(_IOC_WRITE, 0x10, _STATE)
VHOST_SET_VRING_ADDR = _ioc(_IOC_WRITE, 0x11, _ADDR)
VHOST_SET_VRING_BASE = _ioc(_IOC_WRITE, 0x12, _STATE)
VHOST_GET_VRING_BASE = _ioc(_IOC_READ | _IOC_WRITE, 0x12, _STATE)
VHOST_SET_VRING_KICK = _ioc(_IOC_WRITE, 0x20, _FILE)
VHOST_SET_VRING_CALL = _ioc(_IOC_WRITE, 0x21, _FILE)
VHOST_SET_BACKEND_FEATURES = _ioc(_IOC_WRITE, 0x25, _U64)
VHOST_GET_BACKEND_FEATURES = _ioc(_IOC_READ, 0x26, _U64)
VHOST_VDPA_GET_DEVICE_ID = _ioc(_IOC_READ, 0x70, _U32)
VHOST_VDPA_GET_STATUS = _ioc(_IOC_READ, 0x71, _U8)
VHOST_VDPA_SET_STATUS = _ioc(_IOC_WRITE, 0x72, _U8)
VHOST_VDPA_GET_CONFIG = _ioc(_IOC_READ, 0x73, _CONFIG)
VHOST_VDPA_SET_VRING_ENABLE = _ioc(_IOC_WRITE, 0x75, _STATE)
VHOST_VDPA_GET_VRING_NUM = _ioc(_IOC_READ, 0x76, _U16)
VHOST_VDPA_GET_IOVA_RANGE = _ioc(_IOC_READ, 0x78, _RANGE)
VHOST_VDPA_GET_CONFIG_SIZE = _ioc(_IOC_READ, 0x79, _U32)
VHOST_VDPA_GET_VQS_COUNT = _ioc(_IOC_READ, 0x80, _U32)

# IOTLB messages (struct vhost_msg_v2.type and .iotlb.type / .perm).
VHOST_IOTLB_MSG_V2 = 0x2
VHOST_IOTLB_MISS = 1
VHOST_IOTLB_UPDATE = 2
VHOST_IOTLB_INVALIDATE = 3
VHOST_IOTLB_ACCESS_FAIL = 4
VHOST_IOTLB_BATCH_BEGIN = 5
VHOST_IOTLB_BATCH_END = 6
VHOST_ACCESS_RO = 0x1
VHOST_ACCESS_WO = 0x2
VHOST_ACCESS_RW = 0x3

# Backend feature *bit numbers* (VHOST_GET/SET_BACKEND_FEATURES take 1 << bit).
VHOST_BACKEND_F_IOTLB_MSG_V2 = 0x1
VHOST_BACKEND_F_IOTLB_BATCH = 0x2
VHOST_BACKEND_F_IOTLB_ASID = 0x3
VHOST_BACKEND_F_SUSPEND = 0x4

VHOST_FILE_UNBIND = -1
MSG_V2_SIZE = ffi.sizeof("struct vhost_msg_v2")

# virtio device status bits (linux/virtio_config.h).
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80


class IovaRange(NamedTuple):
    first: int
    last: int


def iotlb_msg(type_: int, iova: int = 0, size: int = 0, uaddr: int = 0, perm: int = 0) -> bytes:
    """One ``struct vhost_msg_v2`` (72 bytes) carrying an IOTLB message, address space 0."""
    msg = ffi.new("struct vhost_msg_v2 *")
    msg.type = VHOST_IOTLB_MSG_V2
    msg.asid = 0
    msg.iotlb.iova = iova
    msg.iotlb.size = size
    msg.iotlb.uaddr = uaddr
    msg.iotlb.perm = perm
    msg.iotlb.type = type_
    return bytes(ffi.buffer(msg))


def buffer_address(buf: object) -> int:
    """The virtual address of a writable buffer (an mmap), for IOTLB UPDATE."""
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buf, require_writable=True)))


def _ioctl(fd: int, request: int, arg: object) -> int:
    ret = _libc.ioctl(fd, ffi.cast("unsigned long", request), arg)
    if ret < 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err))
    return int(ret)


class VhostVdpa:
    """``/dev/vhost-vdpa-N``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, path: str) -> VhostVdpa:
        return cls(os.open(path, os.O_RDWR | os.O_CLOEXEC))

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- scalar getters / setters -----------------------------------------------------

    def _get(self, request: int, ctype: str) -> int:
        value = ffi.new(ctype + " *")
        _ioctl(self.fd, request, value)
        return int(value[0])

    def _set(self, request: int, ctype: str, value: int) -> None:
        _ioctl(self.fd, request, ffi.new(ctype + " *", value))

    def set_owner(self) -> None:
        _ioctl(self.fd, VHOST_SET_OWNER, ffi.cast("unsigned long", 0))

    def get_device_id(self) -> int:
        return self._get(VHOST_VDPA_GET_DEVICE_ID, "uint32_t")

    def get_features(self) -> int:
        return self._get(VHOST_GET_FEATURES, "uint64_t")

    def set_features(self, features: int) -> None:
        self._set(VHOST_SET_FEATURES, "uint64_t", features)

    def get_backend_features(self) -> int:
        return self._get(VHOST_GET_BACKEND_FEATURES, "uint64_t")

    def set_backend_features(self, features: int) -> None:
        self._set(VHOST_SET_BACKEND_FEATURES, "uint64_t", features)

    def get_status(self) -> int:
        return self._get(VHOST_VDPA_GET_STATUS, "uint8_t")

    def set_status(self, status: int) -> None:
        self._set(VHOST_VDPA_SET_STATUS, "uint8_t", status)

    def get_config_size(self) -> int:
        return self._get(VHOST_VDPA_GET_CONFIG_SIZE, "uint32_t")

    def get_vqs_count(self) -> int:
        return self._get(VHOST_VDPA_GET_VQS_COUNT, "uint32_t")

    def get_vring_num(self) -> int:
        """The device's maximum queue size."""
        return self._get(VHOST_VDPA_GET_VRING_NUM, "uint16_t")

    def get_iova_range(self) -> IovaRange:
        rng = ffi.new("struct vhost_vdpa_iova_range *")
        _ioctl(self.fd, VHOST_VDPA_GET_IOVA_RANGE, rng)
        return IovaRange(int(rng.first), int(rng.last))

    def get_config(self, offset: int, length: int) -> bytes:
        buf = ffi.new("char[]", _CONFIG + length)
        cfg = ffi.cast("struct vhost_vdpa_config *", buf)
        cfg.off = offset
        cfg.len = length
        _ioctl(self.fd, VHOST_VDPA_GET_CONFIG, cfg)
        return bytes(ffi.buffer(cfg.buf, length))

    # -- queues -----------------------------------------------------------------------

    def _state(self, request: int, index: int, num: int) -> int:
        state = ffi.new("struct vhost_vring_state *", {"index": index, "num": num})
        _ioctl(self.fd, request, state)
        return int(state.num)

    def set_vring_num(self, index: int, num: int) -> None:
        self._state(VHOST_SET_VRING_NUM, index, num)

    def set_vring_base(self, index: int, base: int) -> None:
        self._state(VHOST_SET_VRING_BASE, index, base)

    def get_vring_base(self, index: int) -> int:
        return self._state(VHOST_GET_VRING_BASE, index, 0)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._state(VHOST_VDPA_SET_VRING_ENABLE, index, 1 if enable else 0)

    def set_vring_addr(self, index: int, desc: int, avail: int, used: int) -> None:
        """Ring addresses (IOVAs for vhost-vdpa).  The struct orders them desc, used, avail."""
        addr = ffi.new(
            "struct vhost_vring_addr *",
            {
                "index": index,
                "flags": 0,
                "desc_user_addr": desc,
                "used_user_addr": used,
                "avail_user_addr": avail,
                "log_guest_addr": 0,
            },
        )
        _ioctl(self.fd, VHOST_SET_VRING_ADDR, addr)

    def _file(self, request: int, index: int, fd: int) -> None:
        _ioctl(self.fd, request, ffi.new("struct vhost_vring_file *", {"index": index, "fd": fd}))

    def set_vring_kick(self, index: int, fd: int) -> None:
        self._file(VHOST_SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int) -> None:
        self._file(VHOST_SET_VRING_CALL, index, fd)

    # -- memory -----------------------------------------------------------------------

    def write_iotlb(self, messages: list[bytes]) -> None:
        """Write IOTLB messages one ``write()`` each (the kernel takes one per call)."""
        for msg in messages:
            n = os.write(self.fd, msg)
            if n != len(msg):
                raise OSError(f"short vhost IOTLB write: {n} of {len(msg)}")
