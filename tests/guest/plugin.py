"""pytest plugin for the real-kernel guest tier (tests marked ``@pytest.mark.guest``).

Theory of operation
-------------------
On the host (``VEXPORT_IN_GUEST`` unset) guest items are collected like any other, but
their run protocol is replaced: the first time a guest item is due, ONE guest is booted
(``runner.run``) that runs ``pytest -p no:cacheprovider <node ids>`` on every selected
guest item.  Inside the guest this same plugin writes one JSON line per test report
(setup / call / teardown) to the results share and marks the start and end of every test
on the kernel console.  Back on the host each guest item gets reports that mirror the
guest's: pass, fail (with the guest's failure text and the guest console lines logged
while that test ran), skip (with the guest's reason).  A guest item the guest never
reported on (boot failure, time limit, crash, pytest usage error) FAILS with the reason.

Inside the guest (``VEXPORT_IN_GUEST=1``) guest items run normally.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from _pytest.reports import TestReport

from . import runner

REPORT_ENV = "VEXPORT_GUEST_REPORT"
TIMEOUT_ENV = "VEXPORT_GUEST_TIMEOUT"
MARK_BEGIN = "vexport-guest-test BEGIN "
MARK_END = "vexport-guest-test END "


def in_guest() -> bool:
    return os.environ.get(runner.IN_GUEST_ENV) == "1"


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("vexport-guest", "vexport real-kernel guest tier")
    g.addoption(
        "--guest-timeout",
        type=float,
        default=float(os.environ.get(TIMEOUT_ENV, "1800")),
        help="seconds the whole guest tier may take before QEMU is killed (default 1800, "
        f"or ${TIMEOUT_ENV})",
    )
    g.addoption(
        "--guest-results",
        default=None,
        help="host directory for the guest tier's results (default: a temporary directory)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "guest: runs inside the real-kernel test guest")
    config.addinivalue_line(
        "markers", "guest_runner: host test that boots guests to test tests/guest/runner.py"
    )
    if in_guest():
        path = os.environ.get(REPORT_ENV)
        if path:
            config.pluginmanager.register(_GuestSide(Path(path)), "vexport-guest-side")
    else:
        config.pluginmanager.register(_HostSide(config), "vexport-guest-host")


# --------------------------------------------------------------------------- guest side


class _GuestSide:
    """Inside the guest: record reports as JSON lines, mark tests on the console."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "a")

    @staticmethod
    def _kmsg(text: str) -> None:
        try:
            with open("/dev/kmsg", "w") as k:
                k.write(f"<5>{text}\n")
        except OSError:
            pass

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self._kmsg(MARK_BEGIN + nodeid)

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        self._kmsg(MARK_END + nodeid)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        rec: dict[str, Any] = {
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "duration": report.duration,
            "longrepr": report.longreprtext if report.longrepr is not None else "",
            "sections": [list(s) for s in report.sections],
        }
        if isinstance(report.longrepr, tuple):
            rec["skip"] = [str(report.longrepr[0]), report.longrepr[1], report.longrepr[2]]
        if hasattr(report, "wasxfail"):
            rec["wasxfail"] = report.wasxfail
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def pytest_unconfigure(self) -> None:
        self.f.close()


# --------------------------------------------------------------------------- host side


class _HostSide:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.items: list[pytest.Item] = []
        self.done = False
        self.error: str | None = None
        self.error_shown = False
        self.reports: dict[str, list[dict[str, Any]]] = {}
        self.console = ""
        self.output = ""

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.items = [i for i in session.items if i.get_closest_marker("guest")]

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> bool | None:
        if item.get_closest_marker("guest") is None:
            return None  # not ours: the normal protocol runs (a firstresult hook: not False)
        if not self.done:
            self.done = True
            self._run_guest()
        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for rep in self._host_reports(item):
            item.ihook.pytest_runtest_logreport(report=rep)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        # Host items set up before this one (e.g. the module of test_runner.py) must be
        # torn down as the normal protocol would, or the next host item's setup fails
        # with "previous item was not torn down properly".
        item.session._setupstate.teardown_exact(nextitem)
        return True

    def _run_guest(self) -> None:
        opt = self.config.option
        rootdir = str(self.config.rootpath)
        if opt.guest_results:
            results = Path(opt.guest_results).resolve()
        else:
            results = Path(tempfile.mkdtemp(prefix="vexport-guest-tier-"))
        report = results / "reports.jsonl"
        report.unlink(missing_ok=True)
        argv = [
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v",
            "--rootdir", rootdir, *[i.nodeid for i in self.items],
        ]  # fmt: skip
        env = {REPORT_ENV: f"{runner.GUEST_RESULTS}/reports.jsonl", "PYTHONDONTWRITEBYTECODE": "1"}
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        t0 = time.monotonic()
        if tr is not None:
            tr.write_line(f"[guest] booting one guest for {len(self.items)} guest test(s)")
        try:
            image = runner.prepare()
            res = runner.run(
                argv,
                timeout=opt.guest_timeout,
                results_dir=results,
                env=env,
                cwd=rootdir,
                image=image,
            )
            self.console, self.output = res.console, res.output
            if res.status not in (0, 1):
                self.error = (
                    f"guest pytest exited with status {res.status}\n"
                    f"--- guest pytest output (tail) ---\n{_tail(res.output)}"
                )
            if tr is not None:
                tr.write_line(
                    f"[guest] done in {time.monotonic() - t0:.1f} s (command started "
                    f"{res.boot_seconds:.1f} s after boot; status {res.status}; "
                    f"results in {results})"
                )
        except runner.GuestError as e:
            self.error = f"guest tier did not complete: {e}"
            self.console = runner.clean_console(_read(results / "console.log"))
            self.output = _read(results / "output.log")
        except Exception as e:  # prepare() failing (apt, network, ...) fails every item
            self.error = f"guest tier could not run: {type(e).__name__}: {e}"
        for line in _read(report).splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            self.reports.setdefault(rec["nodeid"], []).append(rec)

    def _console_for(self, nodeid: str) -> str:
        """Console lines logged between this test's BEGIN and END markers."""
        seg: list[str] | None = None
        for line in self.console.replace("\r", "").splitlines():
            if line.endswith(MARK_BEGIN + nodeid):
                seg = []
            elif seg is not None and line.endswith(MARK_END + nodeid):
                break
            elif seg is not None:
                seg.append(line)
        return "\n".join((seg or [])[-200:])

    def _incomplete(
        self, item: pytest.Item, out: list[TestReport], console: str, started: bool
    ) -> list[TestReport]:
        """The guest never finished this test: make it FAIL (never skip, never pass)."""
        if self.error:
            reason = self.error
            if self.error_shown:
                reason = reason.split("\n--- ", 1)[0] + " (console: see the first guest test)"
            self.error_shown = True
        else:
            reason = "the guest did not report this test; guest pytest output (tail):\n" + _tail(
                self.output
            )
        if started:
            reason = "the guest stopped while this test ran: " + reason
        if console:
            reason += "\n--- guest console while the test ran ---\n" + console
        whens = {r.when: r for r in out}
        if "setup" not in whens:
            return [
                _report(item, "passed", "setup"),
                _report(item, "failed", "call", reason),
                _report(item, "passed", "teardown"),
            ]
        if whens["setup"].passed and "call" not in whens:
            return [
                *out,
                _report(item, "failed", "call", reason),
                _report(item, "passed", "teardown"),
            ]
        return [*out, _report(item, "failed", "teardown", reason)]

    def _host_reports(self, item: pytest.Item) -> list[TestReport]:
        recs = self.reports.get(item.nodeid, [])
        console = self._console_for(item.nodeid)
        out: list[TestReport] = []
        for rec in recs:
            sections = [(str(a), str(b)) for a, b in rec["sections"]]
            longrepr: Any = None
            if rec["outcome"] == "failed":
                longrepr = rec["longrepr"] or "failed in the guest"
                if console:
                    sections.append(("guest console", console))
            elif rec["outcome"] == "skipped" and "skip" in rec:
                path, lineno, reason = rec["skip"]
                longrepr = (path, lineno, reason)
            rep = TestReport(
                item.nodeid,
                item.location,
                {k: 1 for k in item.keywords},
                rec["outcome"],
                longrepr,
                rec["when"],
                sections,
                rec["duration"],
            )
            if "wasxfail" in rec:
                rep.wasxfail = rec["wasxfail"]
            out.append(rep)
        if not any(r.when == "teardown" for r in out):
            out = self._incomplete(item, out, console, started=bool(recs))
        return out


def _report(item: pytest.Item, outcome: Any, when: Any, longrepr: Any = None) -> TestReport:
    keywords: Any = {k: 1 for k in item.keywords}
    return TestReport(item.nodeid, item.location, keywords, outcome, longrepr, when, [], 0.0)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.replace("\r", "").splitlines()[-lines:])


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def guest_command_line(nodeids: list[str]) -> str:
    """The command the host runs in the guest (for documentation and debugging)."""
    return shlex.join([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *nodeids])
