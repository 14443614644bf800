"""Check the cffi declarations and numbers of vexport.kernel.aio / io_uring against the
system headers: a generated C program prints sizeof/offsetof/constants, compiled with gcc.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from vexport.kernel import aio as kaio
from vexport.kernel import io_uring as kur

HEADERS = [
    "linux/aio_abi.h",
    "linux/io_uring.h",
    "linux/fs.h",
    "linux/falloc.h",
    "sys/syscall.h",
    "sys/uio.h",
    "stddef.h",
    "stdio.h",
]

# struct name -> (cffi module, fields checked; a (c_name, py_name) pair when they differ)
STRUCTS: dict[str, tuple[object, list[str | tuple[str, str]]]] = {
    "iocb": (
        kaio,
        [
            "aio_data",
            "aio_key",
            "aio_rw_flags",
            "aio_lio_opcode",
            "aio_reqprio",
            "aio_fildes",
            "aio_buf",
            "aio_nbytes",
            "aio_offset",
            "aio_reserved2",
            "aio_flags",
            "aio_resfd",
        ],
    ),
    "io_event": (kaio, ["data", "obj", "res", "res2"]),
    "io_sqring_offsets": (
        kur,
        [
            "head",
            "tail",
            "ring_mask",
            "ring_entries",
            "flags",
            "dropped",
            "array",
            "resv1",
            "resv2",
        ],
    ),
    "io_cqring_offsets": (
        kur,
        [
            "head",
            "tail",
            "ring_mask",
            "ring_entries",
            "overflow",
            "cqes",
            "flags",
            "resv1",
            "resv2",
        ],
    ),
    "io_uring_params": (
        kur,
        [
            "sq_entries",
            "cq_entries",
            "flags",
            "sq_thread_cpu",
            "sq_thread_idle",
            "features",
            "wq_fd",
            "resv",
            "sq_off",
            "cq_off",
        ],
    ),
    "io_uring_sqe": (
        kur,
        [
            "opcode",
            "flags",
            "ioprio",
            "fd",
            "off",
            "addr",
            "len",
            "rw_flags",
            ("fsync_flags", "rw_flags"),
            "user_data",
            "buf_index",
            "personality",
            "splice_fd_in",
            "addr3",
            ("__pad2", "pad2"),
        ],
    ),
    "io_uring_cqe": (kur, ["user_data", "res", "flags"]),
}

CONSTANTS = {
    "SYS_io_setup": kaio.SYS_IO_SETUP,
    "SYS_io_destroy": kaio.SYS_IO_DESTROY,
    "SYS_io_getevents": kaio.SYS_IO_GETEVENTS,
    "SYS_io_submit": kaio.SYS_IO_SUBMIT,
    "SYS_io_cancel": kaio.SYS_IO_CANCEL,
    "SYS_io_uring_setup": kur.SYS_IO_URING_SETUP,
    "SYS_io_uring_enter": kur.SYS_IO_URING_ENTER,
    "SYS_io_uring_register": kur.SYS_IO_URING_REGISTER,
    "IOCB_CMD_PREAD": kaio.IOCB_CMD_PREAD,
    "IOCB_CMD_PWRITE": kaio.IOCB_CMD_PWRITE,
    "IOCB_CMD_FSYNC": kaio.IOCB_CMD_FSYNC,
    "IOCB_CMD_FDSYNC": kaio.IOCB_CMD_FDSYNC,
    "IOCB_CMD_PREADV": kaio.IOCB_CMD_PREADV,
    "IOCB_CMD_PWRITEV": kaio.IOCB_CMD_PWRITEV,
    "IOCB_FLAG_RESFD": kaio.IOCB_FLAG_RESFD,
    "BLKDISCARD": kaio.BLKDISCARD,
    "BLKZEROOUT": kaio.BLKZEROOUT,
    "FALLOC_FL_KEEP_SIZE": kaio.FALLOC_FL_KEEP_SIZE,
    "FALLOC_FL_PUNCH_HOLE": kaio.FALLOC_FL_PUNCH_HOLE,
    "FALLOC_FL_ZERO_RANGE": kaio.FALLOC_FL_ZERO_RANGE,
    "IORING_OP_NOP": kur.IORING_OP_NOP,
    "IORING_OP_READV": kur.IORING_OP_READV,
    "IORING_OP_WRITEV": kur.IORING_OP_WRITEV,
    "IORING_OP_FSYNC": kur.IORING_OP_FSYNC,
    "IORING_OP_FALLOCATE": kur.IORING_OP_FALLOCATE,
    "IORING_OP_READ": kur.IORING_OP_READ,
    "IORING_OP_WRITE": kur.IORING_OP_WRITE,
    "IORING_FSYNC_DATASYNC": kur.IORING_FSYNC_DATASYNC,
    "IORING_ENTER_GETEVENTS": kur.IORING_ENTER_GETEVENTS,
    "IORING_REGISTER_EVENTFD": kur.IORING_REGISTER_EVENTFD,
    "IORING_UNREGISTER_EVENTFD": kur.IORING_UNREGISTER_EVENTFD,
    "IORING_OFF_SQ_RING": kur.IORING_OFF_SQ_RING,
    "IORING_OFF_CQ_RING": kur.IORING_OFF_CQ_RING,
    "IORING_OFF_SQES": kur.IORING_OFF_SQES,
    "IORING_FEAT_SINGLE_MMAP": kur.IORING_FEAT_SINGLE_MMAP,
    "IORING_FEAT_NODROP": kur.IORING_FEAT_NODROP,
    "IORING_SQ_CQ_OVERFLOW": kur.IORING_SQ_CQ_OVERFLOW,
}


def _expected() -> dict[str, int]:
    """What the Python modules claim, keyed like the C program's output lines."""
    out: dict[str, int] = {}
    for name, (mod, fields) in STRUCTS.items():
        ffi = mod.ffi  # type: ignore[attr-defined]
        out[f"sizeof {name}"] = ffi.sizeof(f"struct {name}")
        field_types = dict(ffi.typeof(f"struct {name}").fields)
        for field in fields:
            c_name, py_name = field if isinstance(field, tuple) else (field, field)
            out[f"offsetof {name}.{c_name}"] = ffi.offsetof(f"struct {name}", py_name)
            out[f"sizeof {name}.{c_name}"] = ffi.sizeof(field_types[py_name].type)
    out["sizeof iovec"] = kaio.ffi.sizeof("struct iovec")
    out["sizeof iovec/uring"] = kur.ffi.sizeof("struct iovec")
    for name, value in CONSTANTS.items():
        out[name] = value
    return out


def _c_program() -> str:
    lines = [f"#include <{h}>" for h in HEADERS]
    lines.append("int main(void) {")
    for name, (_mod, fields) in STRUCTS.items():
        lines.append(f'printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
        for field in fields:
            c_name = field[0] if isinstance(field, tuple) else field
            lines.append(
                f'printf("offsetof {name}.{c_name} %zu\\n", offsetof(struct {name}, {c_name}));'
            )
            lines.append(
                f'printf("sizeof {name}.{c_name} %zu\\n", sizeof(((struct {name} *)0)->{c_name}));'
            )
    lines.append('printf("sizeof iovec %zu\\n", sizeof(struct iovec));')
    lines.append('printf("sizeof iovec/uring %zu\\n", sizeof(struct iovec));')
    for name in CONSTANTS:
        lines.append(f'printf("{name} %llu\\n", (unsigned long long)({name}));')
    lines.append("return 0; }")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def from_headers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler to read the system headers")
    d = tmp_path_factory.mktemp("abi")
    src = d / "abi.c"
    exe = d / "abi"
    src.write_text(_c_program())
    subprocess.run([gcc, "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    result: dict[str, int] = {}
    for line in out.splitlines():
        key, _, value = line.rpartition(" ")
        result[key] = int(value)
    return result


def test_everything_matches_the_headers(from_headers: dict[str, int]) -> None:
    expected = _expected()
    assert set(expected) == set(from_headers)
    mismatches = {
        k: (expected[k], from_headers[k]) for k in expected if expected[k] != from_headers[k]
    }
    assert mismatches == {}


def test_header_facts() -> None:
    """Sizes stated in the headers' own comments, independent of the compiler."""
    assert kaio.ffi.sizeof("struct iocb") == 64
    assert kaio.ffi.sizeof("struct io_event") == 32
    assert kur.ffi.sizeof("struct io_uring_sqe") == 64
    assert kur.ffi.sizeof("struct io_uring_cqe") == 16
    assert kur.ffi.sizeof("struct io_uring_params") == 120


def test_syscall_numbers_for_this_machine() -> None:
    if os.uname().machine == "x86_64":
        assert (kaio.SYS_IO_SETUP, kaio.SYS_IO_SUBMIT, kaio.SYS_IO_GETEVENTS) == (206, 209, 208)
