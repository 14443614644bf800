"""vexport.kernel.vhost against linux/vhost.h and vhost_types.h, via a compiled C probe."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from vexport.kernel import vhost

HEADERS = ("/usr/include/linux/vhost.h", "/usr/include/linux/vhost_types.h")

FIELDS = {
    "vhost_vring_state": ["index", "num"],
    "vhost_vring_file": ["index", "fd"],
    "vhost_vring_addr": [
        "index",
        "flags",
        "desc_user_addr",
        "used_user_addr",
        "avail_user_addr",
        "log_guest_addr",
    ],
    "vhost_iotlb_msg": ["iova", "size", "uaddr", "perm", "type"],
    "vhost_msg_v2": ["type", "asid", "iotlb", "iotlb.perm", "iotlb.type", "padding"],
    "vhost_vdpa_config": ["off", "len", "buf"],
    "vhost_vdpa_iova_range": ["first", "last"],
}
IOCTLS = [
    "VHOST_GET_FEATURES",
    "VHOST_SET_FEATURES",
    "VHOST_SET_OWNER",
    "VHOST_SET_VRING_NUM",
    "VHOST_SET_VRING_ADDR",
    "VHOST_SET_VRING_BASE",
    "VHOST_GET_VRING_BASE",
    "VHOST_SET_VRING_KICK",
    "VHOST_SET_VRING_CALL",
    "VHOST_SET_BACKEND_FEATURES",
    "VHOST_GET_BACKEND_FEATURES",
    "VHOST_VDPA_GET_DEVICE_ID",
    "VHOST_VDPA_GET_STATUS",
    "VHOST_VDPA_SET_STATUS",
    "VHOST_VDPA_GET_CONFIG",
    "VHOST_VDPA_SET_VRING_ENABLE",
    "VHOST_VDPA_GET_VRING_NUM",
    "VHOST_VDPA_GET_IOVA_RANGE",
    "VHOST_VDPA_GET_CONFIG_SIZE",
    "VHOST_VDPA_GET_VQS_COUNT",
]
CONSTANTS = [
    "VHOST_VIRTIO",
    "VHOST_IOTLB_MSG_V2",
    "VHOST_IOTLB_MISS",
    "VHOST_IOTLB_UPDATE",
    "VHOST_IOTLB_INVALIDATE",
    "VHOST_IOTLB_ACCESS_FAIL",
    "VHOST_IOTLB_BATCH_BEGIN",
    "VHOST_IOTLB_BATCH_END",
    "VHOST_ACCESS_RO",
    "VHOST_ACCESS_WO",
    "VHOST_ACCESS_RW",
    "VHOST_BACKEND_F_IOTLB_MSG_V2",
    "VHOST_BACKEND_F_IOTLB_BATCH",
    "VHOST_BACKEND_F_IOTLB_ASID",
    "VHOST_BACKEND_F_SUSPEND",
    "VHOST_FILE_UNBIND",
    "VIRTIO_CONFIG_S_ACKNOWLEDGE",
    "VIRTIO_CONFIG_S_DRIVER",
    "VIRTIO_CONFIG_S_DRIVER_OK",
    "VIRTIO_CONFIG_S_FEATURES_OK",
    "VIRTIO_CONFIG_S_NEEDS_RESET",
    "VIRTIO_CONFIG_S_FAILED",
]


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if shutil.which("gcc") is None or not all(os.path.exists(h) for h in HEADERS):
        pytest.skip("needs gcc and linux/vhost.h")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <sys/ioctl.h>",
        "#include <linux/vhost.h>",
        "#include <linux/virtio_config.h>",
        "int main(void) {",
    ]
    for struct, fields in FIELDS.items():
        lines.append(f'printf("sizeof {struct} %zu\\n", sizeof(struct {struct}));')
        for f in fields:
            lines.append(f'printf("offsetof {struct}.{f} %zu\\n", offsetof(struct {struct}, {f}));')
    for name in IOCTLS:
        lines.append(f'printf("ioctl {name} %lu\\n", (unsigned long){name});')
    for name in CONSTANTS:
        lines.append(f'printf("const {name} %ld\\n", (long){name});')
    lines.append("return 0; }")
    d = tmp_path_factory.mktemp("vhost_probe")
    src, exe = d / "probe.c", d / "probe"
    src.write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    result = {}
    for line in out.splitlines():
        kind, name, value = line.split()
        result[f"{kind} {name}"] = int(value)
    return result


@pytest.mark.parametrize("struct", sorted(FIELDS))
def test_struct_layout(probe: dict[str, int], struct: str) -> None:
    assert vhost.ffi.sizeof(f"struct {struct}") == probe[f"sizeof {struct}"]
    for f in FIELDS[struct]:
        offset = vhost.ffi.offsetof(f"struct {struct}", *f.split("."))
        assert offset == probe[f"offsetof {struct}.{f}"], f


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_numbers(probe: dict[str, int], name: str) -> None:
    assert getattr(vhost, name) == probe[f"ioctl {name}"]


@pytest.mark.parametrize("name", CONSTANTS)
def test_constants(probe: dict[str, int], name: str) -> None:
    assert getattr(vhost, name) == probe[f"const {name}"]


def test_iotlb_message_encoding() -> None:
    raw = vhost.iotlb_msg(
        vhost.VHOST_IOTLB_UPDATE, 0x1_0000_0000, 0x20_0000, 0x7F00_1234_5000, vhost.VHOST_ACCESS_RW
    )
    assert len(raw) == vhost.MSG_V2_SIZE == 72
    msg = vhost.ffi.cast("struct vhost_msg_v2 *", vhost.ffi.from_buffer(raw))
    assert (msg.type, msg.asid) == (vhost.VHOST_IOTLB_MSG_V2, 0)
    assert (msg.iotlb.iova, msg.iotlb.size, msg.iotlb.uaddr) == (
        0x1_0000_0000,
        0x20_0000,
        0x7F00_1234_5000,
    )
    assert (msg.iotlb.perm, msg.iotlb.type) == (3, 2)
    assert raw[:8] == b"\x02\0\0\0\0\0\0\0"
    assert vhost.iotlb_msg(vhost.VHOST_IOTLB_BATCH_END)[8 + 25] == 6


def test_buffer_address_is_the_mapping() -> None:
    import ctypes
    import mmap

    mm = mmap.mmap(-1, 4096)
    try:
        mm[:4] = b"vhst"
        addr = vhost.buffer_address(mm)
        assert ctypes.string_at(addr, 4) == b"vhst"
    finally:
        mm.close()
