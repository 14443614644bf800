"""A fresh virtualenv with ``pip install <repo>`` gives a working ``vexport``.

This catches packaging mistakes the editable install hides (the schema files must
ship inside the package, the console script must exist).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    # Copy the tracked sources only: no .venv, no build leftovers.
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    for name in files:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(src)],
        check=True, capture_output=True,
    )  # fmt: skip
    return venv


def test_help_lists_options(installed: Path) -> None:
    out = subprocess.run(
        [str(installed / "bin" / "vexport"), "--help"], check=True, capture_output=True, text=True
    ).stdout
    for option in ("--blockdev", "--export", "--chardev", "--monitor", "--object", "--pidfile"):
        assert option in out


def test_schema_ships_with_the_package(installed: Path) -> None:
    proc = subprocess.run(
        [str(installed / "bin" / "vexport"), "--blockdev", "driver=file,node-name=a"],
        capture_output=True, text=True, cwd="/",
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "vexport: --blockdev driver=file,node-name=a: Parameter 'filename' is missing"
    )


def test_vduse_export_without_the_module_is_a_clear_error(installed: Path) -> None:
    if Path("/dev/vduse/control").exists():
        pytest.skip("this kernel has VDUSE; the error path needs a machine without it")
    proc = subprocess.run(
        [
            str(installed / "bin" / "vexport"),
            "--blockdev", "null-co,node-name=n0",
            "--export", "vduse-blk,id=e0,node-name=n0,name=vx0",
        ],
        capture_output=True, text=True, cwd="/",
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        "vexport: --export vduse-blk,id=e0,node-name=n0,name=vx0: /dev/vduse/control does not "
        "exist: the vduse kernel module is missing"
    ), proc.stderr
    assert "Traceback" not in proc.stderr
