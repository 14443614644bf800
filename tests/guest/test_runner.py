"""Host tests of the guest runner itself (each boots a real guest; few and combined).

Not marked ``guest``: they run on the host, in the default suite, in about a minute.
They are skipped inside the guest (no nested guests).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from guest import runner

pytestmark = [
    pytest.mark.guest_runner,
    pytest.mark.skipif(
        os.environ.get(runner.IN_GUEST_ENV) == "1", reason="runner tests run on the host only"
    ),
]


def qemu_processes_for(marker: str) -> list[int]:
    """PIDs whose command line mentions marker (a per-run results path): /proc scan."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and b"qemu-system" in cmdline:
            pids.append(int(entry))
    return pids


REPO = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def image() -> runner.GuestImage:
    return runner.prepare()


def test_command_status_output_and_environment(
    image: runner.GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # VEXPORT_* variables reach the guest; the runner's own ones win.
    monkeypatch.setenv("VEXPORT_TEST_KNOB", "from-host")
    monkeypatch.setenv(runner.IN_GUEST_ENV, "0")
    script = (
        "echo to-stdout; echo to-stderr >&2; "
        'echo "home=$HOME in_guest=$VEXPORT_IN_GUEST cwd=$(pwd) kernel=$(uname -r)"; '
        'echo "knob=$VEXPORT_TEST_KNOB"; '
        "test -c /dev/vduse/control && echo vduse-ok; "
        "touch /tmp/w && echo tmp-writable; "
        "touch /work/probe 2>/dev/null || echo root-readonly; "
        "python -c 'import vexport; print(\"py-ok\", vexport.__name__)'; "
        'echo from-guest > "$VEXPORT_GUEST_RESULTS/extra.txt"; '
        "exit 7"
    )
    res = runner.run(["sh", "-c", script], timeout=300, results_dir=tmp_path, cwd=REPO, image=image)
    assert res.status == 7
    out = res.output
    assert "to-stdout" in out and "to-stderr" in out
    assert f"home=/root in_guest=1 cwd={REPO} kernel={image.kver}" in out
    for word in ("vduse-ok", "tmp-writable", "root-readonly", "py-ok vexport", "knob=from-host"):
        assert word in out, out
    assert (tmp_path / "extra.txt").read_text() == "from-guest\n"
    assert (tmp_path / "output.log").read_text() == out
    assert 0 < res.boot_seconds < res.total_seconds
    print(f"boot {res.boot_seconds:.1f} s, total {res.total_seconds:.1f} s")
    assert not qemu_processes_for(str(tmp_path))


def test_a_working_directory_under_tmp_is_reachable(
    image: runner.GuestImage, tmp_path: Path
) -> None:
    """The guest puts its own tmpfs on /tmp: a checkout there (a CI clone) comes as a
    share of its own, at the same path."""
    work = tmp_path / "checkout"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "marker").write_text("from-the-host\n")
    assert runner.hidden_in_guest(str(work))
    res = runner.run(
        ["sh", "-c", "pwd; cat sub/marker"],
        timeout=300,
        results_dir=tmp_path / "results",
        cwd=str(work),
        image=image,
    )
    assert res.status == 0, res.output
    assert res.output.split() == [str(work), "from-the-host"]


def test_hung_guest_is_killed_at_the_time_limit(image: runner.GuestImage, tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(runner.GuestError) as err:
        runner.run(
            ["sh", "-c", "echo about-to-hang; sleep 100000"],
            timeout=40,
            results_dir=tmp_path,
            image=image,
        )
    elapsed = time.monotonic() - start
    assert 40 <= elapsed < 60
    text = str(err.value)
    assert "timed out after 40 s" in text and "QEMU was killed" in text
    # The command's output so far is part of the report; no QEMU is left behind.
    assert "about-to-hang" in err.value.output_tail
    assert not qemu_processes_for(str(tmp_path))


def test_boot_failure_is_reported_with_reason(image: runner.GuestImage, tmp_path: Path) -> None:
    junk = tmp_path / "junk-initramfs"
    junk.write_bytes(b"this is not a cpio archive\n" * 100)
    broken = runner.GuestImage(image.kver, image.kernel, junk, image.modules_dir)
    with pytest.raises(runner.GuestError) as err:
        runner.run(["true"], timeout=120, results_dir=tmp_path / "r", image=broken)
    assert err.value.reason.startswith("guest kernel panic:"), err.value.reason
    assert "Kernel panic" in err.value.console_tail
    assert not qemu_processes_for(str(tmp_path))
