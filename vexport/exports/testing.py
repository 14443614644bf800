"""A fake VDUSE kernel for unit tests of the device shell and the vduse-blk export.

`FakeKernel` stands in for ``/dev/vduse``: `FakeVduseControl` (CREATE_DEV, DESTROY_DEV)
and `FakeVduseDeviceFd` have the methods of `vexport.kernel.vduse.VduseControl` and
`VduseDeviceFd`, backed by plain Python state and a few real file descriptors:

* the device fd is an eventfd, signalled whenever the test queues a control message,
  so the event loop wakes the device exactly as the kernel's fd would;
* guest memory is a memfd: `MemfdMemory` maps it for the driver side (a
  `vexport.virtio.testing.FakeDriver` writes its rings and buffers there) and
  ``iotlb_get_fd`` hands out dup'ed fds of it, split into IOTLB entries of
  ``iotlb_chunk`` bytes, so that the device's mmap region cache sees the same pages;
* ``vq_setup_kickfd`` keeps the device's eventfd, so ``kick(index)`` is a real kick.

Everything the device does is recorded (responses, interrupts, config writes, IOTLB
look-ups) for the tests to check.  Use `FakeKernel.install(monkeypatch)` to make
``VduseDeviceFd.open`` and ``VduseControl`` return the fakes.
"""

from __future__ import annotations

import collections
import errno
import mmap
import os
from dataclasses import dataclass, field
from typing import Any

from vexport.kernel import vduse as kv
from vexport.virtio.memory import PERM_RW, Region, RegionMemory


class MemfdMemory(RegionMemory):
    """Driver-side memory: IOVA ``[0, size)`` is one memfd, mapped once.

    ``add_region`` calls for ranges inside the memfd (FakeDriver's ring and data
    regions) are satisfied by the memfd mapping; the buffers passed in are ignored.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.fd = os.memfd_create("vexport-fake-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mapping = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        self._whole = super().add_region(0, self.mapping, PERM_RW)

    def add_region(self, start: int, buffer: object, perm: int = PERM_RW) -> Region:
        length = memoryview(buffer).nbytes  # type: ignore[arg-type]
        if 0 <= start and start + length <= self.size:
            return self._whole
        return super().add_region(start, buffer, perm)

    def close(self) -> None:
        self._whole.view.release()
        self.mapping.close()
        os.close(self.fd)


@dataclass
class FakeQueue:
    """What VQ_GET_INFO reports for one queue, and the kick fd the device gave."""

    max_size: int = 0
    num: int = 0
    desc_addr: int = 0
    driver_addr: int = 0
    device_addr: int = 0
    avail_index: int = 0
    ready: bool = False
    kick_fd: int = -1
    irqs: int = 0


@dataclass
class FakeDevice:
    """A created device, as the kernel keeps it."""

    name: str
    device_id: int
    features: int
    config: bytearray
    queues: list[FakeQueue]
    attached: bool = False
    opened: bool = False
    negotiated: int = 0
    config_irqs: int = 0
    config_writes: list[tuple[int, bytes]] = field(default_factory=list)


class FakeKernel:
    """The kernel side: devices by name, guest memory, and the open device fds."""

    def __init__(self, memory: MemfdMemory, iotlb_chunk: int | None = None) -> None:
        self.memory = memory
        self.iotlb_chunk = iotlb_chunk or memory.size
        self.devices: dict[str, FakeDevice] = {}
        self.fds: dict[str, FakeVduseDeviceFd] = {}
        self.controls: list[FakeVduseControl] = []
        self.destroyed: list[str] = []

    def install(self, monkeypatch: Any) -> None:
        """Route ``VduseDeviceFd.open`` and ``VduseControl(...)`` to this kernel."""
        monkeypatch.setattr(
            kv.VduseDeviceFd, "open", classmethod(lambda cls, name: self.open(name))
        )
        monkeypatch.setattr(kv, "VduseControl", lambda fd=-1: self.control())
        from vexport.exports import vduse_blk

        monkeypatch.setattr(vduse_blk, "open_vduse_control", lambda: -1)
        # The fake's state lives in this process: a forked queue worker's ioctls and
        # interrupts would go to its own copy.  Every queue is served here.
        monkeypatch.setenv("VEXPORT_WORKERS", "0")

    def control(self) -> FakeVduseControl:
        ctl = FakeVduseControl(self)
        self.controls.append(ctl)
        return ctl

    def open(self, name: str) -> FakeVduseDeviceFd:
        dev = self.devices.get(name)
        if dev is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        if dev.opened:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        dev.opened = True
        fd = FakeVduseDeviceFd(self, dev)
        self.fds[name] = fd
        return fd


class FakeVduseControl:
    """``/dev/vduse/control``."""

    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel
        self.api_version: int | None = None
        self.closed = False
        self.fd = -1

    def set_api_version(self, version: int = kv.VDUSE_API_VERSION) -> None:
        self.api_version = version

    def get_api_version(self) -> int:
        return kv.VDUSE_API_VERSION

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
        if self.api_version is None:
            raise OSError(errno.EINVAL, "API version not set")
        if name in self.kernel.devices:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))
        self.kernel.devices[name] = FakeDevice(
            name, device_id, features, bytearray(config), [FakeQueue() for _ in range(vq_num)]
        )

    def destroy_dev(self, name: str) -> None:
        dev = self.kernel.devices.get(name)
        if dev is None:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        if dev.attached or dev.opened:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        del self.kernel.devices[name]
        self.kernel.destroyed.append(name)

    def close(self) -> None:
        self.closed = True


class FakeVduseDeviceFd:
    """``/dev/vduse/NAME``: control messages in a deque, signalled through an eventfd."""

    def __init__(self, kernel: FakeKernel, dev: FakeDevice) -> None:
        self.kernel = kernel
        self.dev = dev
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.requests: collections.deque[kv.VduseRequest] = collections.deque()
        self.responses: dict[int, tuple[int, tuple[int, int] | None]] = {}
        self.response_order: list[int] = []
        self.iotlb_lookups: list[int] = []
        self.vq_setups: list[tuple[int, int]] = []
        self.irq_errno = 0  # set to make vq_inject_irq fail
        self._next_id = 1
        self.closed = False

    # -- what the test does (the kernel on behalf of the driver) -------------------------
    def send(self, type_: int, payload: object) -> int:
        """Queue a control message; returns its request id."""
        request_id = self._next_id
        self._next_id += 1
        self.requests.append(kv.VduseRequest(type_, request_id, payload))
        os.eventfd_write(self.fd, 1)
        return request_id

    def set_status(self, status: int) -> int:
        if status == 0:  # the kernel forgets the kick eventfds at a reset
            for q in self.dev.queues:
                q.kick_fd = -1
        return self.send(kv.VDUSE_SET_STATUS, status)

    def kick(self, index: int) -> None:
        fd = self.dev.queues[index].kick_fd
        if fd >= 0:
            os.eventfd_write(fd, 1)

    # -- VduseDeviceFd's methods --------------------------------------------------------
    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)
            self.dev.opened = False

    def read_request(self) -> kv.VduseRequest | None:
        if self.requests:
            return self.requests.popleft()
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        return None

    def write_response(
        self, request_id: int, result: int, vq_state: tuple[int, int] | None = None
    ) -> None:
        if request_id in self.responses:
            raise AssertionError(f"request {request_id} answered twice")
        self.responses[request_id] = (result, vq_state)
        self.response_order.append(request_id)

    def iotlb_get_fd(self, start: int, last: int) -> kv.IotlbEntry:
        self.iotlb_lookups.append(start)
        if not 0 <= start < self.kernel.memory.size:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        chunk = self.kernel.iotlb_chunk
        first = start - start % chunk
        end = min(first + chunk, self.kernel.memory.size)
        return kv.IotlbEntry(
            os.dup(self.kernel.memory.fd), first, end - 1, first, kv.VDUSE_ACCESS_RW
        )

    def get_features(self) -> int:
        return self.dev.negotiated

    def set_config(self, offset: int, data: bytes) -> None:
        if offset + len(data) > len(self.dev.config):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        self.dev.config[offset : offset + len(data)] = data
        self.dev.config_writes.append((offset, bytes(data)))

    def inject_config_irq(self) -> None:
        self.dev.config_irqs += 1

    def vq_setup(self, index: int, max_size: int) -> None:
        self.vq_setups.append((index, max_size))
        self.dev.queues[index].max_size = max_size

    def vq_get_info(self, index: int) -> kv.VqInfo:
        q = self.dev.queues[index]
        return kv.VqInfo(
            index, q.num, q.desc_addr, q.driver_addr, q.device_addr, q.avail_index, q.ready
        )

    def vq_setup_kickfd(self, index: int, fd: int) -> None:
        self.dev.queues[index].kick_fd = -1 if fd == kv.VDUSE_EVENTFD_DEASSIGN else fd

    def vq_inject_irq(self, index: int) -> None:
        if self.irq_errno:
            raise OSError(self.irq_errno, os.strerror(self.irq_errno))
        self.dev.queues[index].irqs += 1


__all__ = [
    "FakeDevice",
    "FakeKernel",
    "FakeQueue",
    "FakeVduseControl",
    "FakeVduseDeviceFd",
    "MemfdMemory",
]


DRIVER_OK_STATUS = 0xF  # ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK


async def start_driver(
    kernel: FakeKernel, name: str, rings: Any, features: int, index: int = 0
) -> FakeVduseDeviceFd:
    """As a virtio driver would: negotiate ``features``, give queue ``index`` of device
    ``name`` the rings of ``rings`` (a `vexport.virtio.testing.FakeDriver`), and set
    DRIVER_OK; returns once the device answered.  The device's fd is returned."""
    import asyncio

    fd = kernel.fds[name]
    fd.dev.negotiated = features
    q = fd.dev.queues[index]
    q.num, q.desc_addr, q.driver_addr, q.device_addr = (
        rings.size,
        rings.desc_addr,
        rings.avail_addr,
        rings.used_addr,
    )
    q.ready = True
    rid = fd.send(kv.VDUSE_SET_STATUS, DRIVER_OK_STATUS)
    while rid not in fd.responses:
        await asyncio.sleep(0.001)
    return fd
