"""vexport.kernel.vduse against /usr/include/linux/vduse.h, via a compiled C probe."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from vexport.kernel import vduse

HEADER = "/usr/include/linux/vduse.h"

# struct -> fields whose offset is checked (nested members with dots).
FIELDS = {
    "vduse_dev_config": [
        "name",
        "vendor_id",
        "device_id",
        "features",
        "vq_num",
        "vq_align",
        "reserved",
        "config_size",
        "config",
    ],
    "vduse_iotlb_entry": ["offset", "start", "last", "perm"],
    "vduse_config_data": ["offset", "length", "buffer"],
    "vduse_vq_config": ["index", "max_size", "reserved"],
    "vduse_vq_state_split": ["avail_index"],
    "vduse_vq_state_packed": [
        "last_avail_counter",
        "last_avail_idx",
        "last_used_counter",
        "last_used_idx",
    ],
    "vduse_vq_info": [
        "index",
        "num",
        "desc_addr",
        "driver_addr",
        "device_addr",
        "split.avail_index",
        "packed.last_used_idx",
        "ready",
    ],
    "vduse_vq_eventfd": ["index", "fd"],
    "vduse_iova_umem": ["uaddr", "iova", "size", "reserved"],
    "vduse_iova_info": ["start", "last", "capability", "reserved"],
    "vduse_vq_state": ["index", "split.avail_index", "packed.last_used_idx"],
    "vduse_dev_status": ["status"],
    "vduse_iova_range": ["start", "last"],
    "vduse_dev_request": [
        "type",
        "request_id",
        "reserved",
        "vq_state.index",
        "vq_state.split.avail_index",
        "s.status",
        "iova.start",
        "iova.last",
        "padding",
    ],
    "vduse_dev_response": [
        "request_id",
        "result",
        "reserved",
        "vq_state.index",
        "vq_state.split.avail_index",
        "padding",
    ],
}
IOCTLS = [
    "VDUSE_GET_API_VERSION",
    "VDUSE_SET_API_VERSION",
    "VDUSE_CREATE_DEV",
    "VDUSE_DESTROY_DEV",
    "VDUSE_IOTLB_GET_FD",
    "VDUSE_DEV_GET_FEATURES",
    "VDUSE_DEV_SET_CONFIG",
    "VDUSE_DEV_INJECT_CONFIG_IRQ",
    "VDUSE_VQ_SETUP",
    "VDUSE_VQ_GET_INFO",
    "VDUSE_VQ_SETUP_KICKFD",
    "VDUSE_VQ_INJECT_IRQ",
    "VDUSE_IOTLB_REG_UMEM",
    "VDUSE_IOTLB_DEREG_UMEM",
    "VDUSE_IOTLB_GET_INFO",
]
CONSTANTS = [
    "VDUSE_BASE",
    "VDUSE_API_VERSION",
    "VDUSE_NAME_MAX",
    "VDUSE_GET_VQ_STATE",
    "VDUSE_SET_STATUS",
    "VDUSE_UPDATE_IOTLB",
    "VDUSE_REQ_RESULT_OK",
    "VDUSE_REQ_RESULT_FAILED",
    "VDUSE_ACCESS_RO",
    "VDUSE_ACCESS_WO",
    "VDUSE_ACCESS_RW",
    "VDUSE_IOVA_CAP_UMEM",
    "VDUSE_EVENTFD_DEASSIGN",
]


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if shutil.which("gcc") is None or not os.path.exists(HEADER):
        pytest.skip("needs gcc and linux/vduse.h")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <sys/ioctl.h>",
        "#include <linux/vduse.h>",
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
    d = tmp_path_factory.mktemp("vduse_probe")
    src, exe = d / "probe.c", d / "probe"
    src.write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    result = {}
    for line in out.splitlines():
        kind, name, value = line.split()
        result[f"{kind} {name}"] = int(value)
    return result


def _cffi_offset(struct: str, path: str) -> int:
    ctype = vduse.ffi.typeof(f"struct {struct}")
    offset = 0
    for part in path.split("."):
        offset += vduse.ffi.offsetof(ctype, part)
        ctype = dict(ctype.fields)[part].type if part in dict(ctype.fields) else None
        if ctype is None:
            # member of an anonymous union: cffi flattens it into the parent's fields
            raise AssertionError(f"{struct}.{path} not found")
    return offset


@pytest.mark.parametrize("struct", sorted(FIELDS))
def test_struct_layout(probe: dict[str, int], struct: str) -> None:
    assert vduse.ffi.sizeof(f"struct {struct}") == probe[f"sizeof {struct}"]
    for f in FIELDS[struct]:
        assert _cffi_offset(struct, f) == probe[f"offsetof {struct}.{f}"], f


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_numbers(probe: dict[str, int], name: str) -> None:
    assert getattr(vduse, name) == probe[f"ioctl {name}"]


@pytest.mark.parametrize("name", CONSTANTS)
def test_constants(probe: dict[str, int], name: str) -> None:
    assert getattr(vduse, name) == probe[f"const {name}"]


def test_message_sizes_match_facts() -> None:
    assert vduse.REQUEST_SIZE == 152
    assert vduse.RESPONSE_SIZE == 152
    assert vduse.ffi.sizeof("struct vduse_dev_config") == 336


def test_request_round_trip() -> None:
    # Build requests the way the kernel lays them out and parse them back.
    req = vduse.ffi.new("struct vduse_dev_request *")
    req.type = vduse.VDUSE_UPDATE_IOTLB
    req.request_id = 42
    req.iova.start = 0x1000
    req.iova.last = 0xFFFFFFFFFFFFFFFF
    parsed = vduse.parse_request(bytes(vduse.ffi.buffer(req)))
    assert parsed == (vduse.VDUSE_UPDATE_IOTLB, 42, (0x1000, 0xFFFFFFFFFFFFFFFF))
    req.type = vduse.VDUSE_SET_STATUS
    req.s.status = 0x0F
    assert vduse.parse_request(bytes(vduse.ffi.buffer(req))).payload == 0x0F
    req.type = vduse.VDUSE_GET_VQ_STATE
    req.vq_state.index = 3
    assert vduse.parse_request(bytes(vduse.ffi.buffer(req))).payload == 3
    req.type = 99
    assert len(vduse.parse_request(bytes(vduse.ffi.buffer(req))).payload) == 128
    with pytest.raises(OSError):
        vduse.parse_request(b"\0" * 10)


def test_response_encoding() -> None:
    raw = vduse.build_response(7, vduse.VDUSE_REQ_RESULT_OK, (2, 0xBEEF))
    resp = vduse.ffi.cast("struct vduse_dev_response *", vduse.ffi.from_buffer(raw))
    assert (resp.request_id, resp.result) == (7, 0)
    assert (resp.vq_state.index, resp.vq_state.split.avail_index) == (2, 0xBEEF)
    failed = vduse.build_response(8, vduse.VDUSE_REQ_RESULT_FAILED)
    assert len(failed) == 152 and failed[4:8] == b"\x01\0\0\0" and not any(failed[8:])


def test_missing_control_node_is_enoent(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(FileNotFoundError) as info:
        vduse.VduseControl.open(os.path.join(tmp_path, "control"))
    assert info.value.errno == 2


def test_ioctl_errors_pass_through_as_oserror() -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with pytest.raises(OSError) as info:
            vduse.VduseControl(fd).get_api_version()
        assert info.value.errno == 25  # ENOTTY: /dev/null is no VDUSE node
        dev = vduse.VduseDeviceFd(fd)
        with pytest.raises(OSError):
            dev.vq_get_info(0)
        with pytest.raises(OSError):
            dev.set_config(0, b"\0" * 8)
    finally:
        os.close(fd)


def test_invalid_names_rejected() -> None:
    ctl = vduse.VduseControl(-1)
    for bad in ("", "a/b", "x" * 256):
        with pytest.raises(ValueError):
            ctl.destroy_dev(bad)
