"""Build vexport.native._poll (cffi API mode): ``python -m vexport.native.build`` (in
place), or setup.py's ``cffi_modules`` at ``pip install``.  Needs a C compiler and
Python's headers."""

from __future__ import annotations

from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent

ffibuilder = cffi.FFI()
ffibuilder.cdef((HERE / "poll.h").read_text())
ffibuilder.set_source(
    "vexport.native._poll",
    (HERE / "poll.c").read_text(),
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    import os
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        # Compiled away from the repository: setuptools would read its pyproject.toml.
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            built = ffibuilder.compile(tmpdir=tmp)
        finally:
            os.chdir(cwd)
        # The name pip's build gives it (cffi's modules use the stable ABI), as a new
        # file renamed over the old one: a process may have the old one mapped.
        target = HERE / "_poll.abi3.so"
        shutil.copy(built, f"{target}.new")
        os.replace(f"{target}.new", target)
        for stale in HERE.glob("_poll.cpython-*.so"):
            stale.unlink()
        print(target)
