"""The vduse-blk export: a virtio-blk device served from userspace through VDUSE.

This module holds the option checks (qemu-storage-daemon's, plus the stricter ones
vexport makes) and the device lifecycle.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import TYPE_CHECKING, Any

from vexport.errors import GenericError
from vexport.exports import BlockExport

if TYPE_CHECKING:
    from vexport.blockdev.node import BlockNode

VDUSE_CONTROL = "/dev/vduse/control"
SERIAL_MAX_BYTES = 20  # VIRTIO_BLK_ID_BYTES
NAME_MAX_BYTES = 255  # VDUSE_NAME_MAX includes the terminating NUL


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def check_vduse_blk_options(options: dict[str, Any]) -> None:
    """Validate vduse-blk options; raises GenericError with a clear message."""
    export_id = options["id"]
    if options.get("num-queues", 1) < 1:
        raise GenericError("num-queues must be greater than 0")
    queue_size = options.get("queue-size", 256)
    if not (2 < queue_size <= 1024 and _is_power_of_two(queue_size)):
        raise GenericError("queue-size is invalid")
    block_size = options.get("logical-block-size", 512)
    page_size = mmap.PAGESIZE
    if not 512 <= block_size <= page_size:
        # Stricter than QSD 7.2 (which allows up to 2 MiB and lets the kernel refuse):
        # the virtio-blk driver cannot use a logical block larger than a page.
        raise GenericError(
            f"Property {export_id}.logical-block-size doesn't take value {block_size} "
            f"(minimum: 512, maximum: {page_size})"
        )
    if not _is_power_of_two(block_size):
        raise GenericError(
            f"Property {export_id}.logical-block-size doesn't take value {block_size}, "
            "it's not a power of 2"
        )
    serial = options.get("serial", "")
    if len(serial.encode()) > SERIAL_MAX_BYTES:
        raise GenericError(
            f"serial '{serial}' is too long: a virtio-blk serial has at most "
            f"{SERIAL_MAX_BYTES} bytes"
        )
    name = options["name"]
    if not name or "/" in name or name in (".", "..") or len(name.encode()) > NAME_MAX_BYTES:
        raise GenericError(f"Invalid VDUSE device name '{name}'")


def open_vduse_control() -> int:
    """Open the VDUSE control node, translating its absence into a clear error."""
    try:
        return os.open(VDUSE_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise GenericError(
            f"{VDUSE_CONTROL} does not exist: the vduse kernel module is missing "
            "(load it with 'modprobe vduse'; it needs a kernel with CONFIG_VDPA_USER)"
        ) from None
    except OSError as e:
        raise GenericError(
            f"Could not open {VDUSE_CONTROL}: {os.strerror(e.errno or errno.EIO)}"
        ) from None


class VduseBlkExport(BlockExport):
    type = "vduse-blk"

    @classmethod
    def check_options(cls, options: dict[str, Any], node: BlockNode) -> None:
        check_vduse_blk_options(options)

    async def start(self) -> None:
        fd = open_vduse_control()
        os.close(fd)
        raise GenericError("vduse-blk export: device creation is not implemented yet")

    async def stop(self, mode: str) -> None:
        return None
