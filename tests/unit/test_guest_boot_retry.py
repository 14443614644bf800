"""The guest runner boots again when the kernel panicked before the command started,
and only then (tests/guest/runner.py, BOOT_PANIC_RETRIES).  QEMU is replaced by a
function that writes what a guest would have written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from guest import runner

PANIC = "[    1.68] Oops: int3: 0000 [#1]\nKernel panic - not syncing: Fatal exception\n"

Boot = Callable[[Path], str]


def fake_boots(monkeypatch: pytest.MonkeyPatch, boots: list[Boot]) -> list[int]:
    calls: list[int] = []

    def boot(qemu: list[str], console_path: Path, timeout: float) -> tuple[int, bool]:
        results = console_path.parent
        console_path.write_text(boots[len(calls)](results))
        calls.append(1)
        return 0, False

    monkeypatch.setattr(runner, "_boot", boot)
    return calls


def panics_early(results: Path) -> str:
    return PANIC


def runs(results: Path) -> str:
    (results / "boot-uptime").write_text("1.9\n")
    (results / "output.log").write_text("hello\n")
    (results / "status").write_text("0\n")
    return "booted\n"


def panics_late(results: Path) -> str:
    (results / "boot-uptime").write_text("1.9\n")
    return PANIC


def image(tmp_path: Path) -> runner.GuestImage:
    return runner.GuestImage("6.12", tmp_path / "vmlinuz", tmp_path / "initrd", tmp_path)


def test_a_panic_before_the_command_boots_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = fake_boots(monkeypatch, [panics_early, runs])
    res = runner.run(["true"], results_dir=tmp_path / "r", image=image(tmp_path))
    assert len(calls) == 2
    assert res.status == 0 and res.output == "hello\n"
    assert "Kernel panic" in (tmp_path / "r" / "console-panic-1.log").read_text()


def test_a_panic_after_the_command_started_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = fake_boots(monkeypatch, [panics_late, runs])
    with pytest.raises(runner.GuestError, match="guest kernel panic"):
        runner.run(["true"], results_dir=tmp_path / "r", image=image(tmp_path))
    assert len(calls) == 1


def test_a_guest_that_always_panics_is_reported_after_one_more_boot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = fake_boots(monkeypatch, [panics_early, panics_early, runs])
    with pytest.raises(runner.GuestError, match="guest kernel panic"):
        runner.run(["true"], results_dir=tmp_path / "r", image=image(tmp_path))
    assert len(calls) == 1 + runner.BOOT_PANIC_RETRIES
