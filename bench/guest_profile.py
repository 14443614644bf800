"""In-guest half of bench/profile_cell.py: one daemon, one fio cell, under a profiler.

Started by ``bench/profile_cell.py`` inside the test guest; writes into $VEXPORT_GUEST_RESULTS:
``fio.json``, ``summary.txt`` and, per tool, ``cprofile.pstats`` (vexport only, through
VEXPORT_PROFILE), ``strace.txt`` (``strace -c -f`` attached for the fio run) or
``perf.txt`` (``perf report`` of a ``perf record -g`` of the daemon).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import analysis as an  # noqa: E402
from guest import helpers  # noqa: E402

OUT = Path(os.environ.get("VEXPORT_GUEST_RESULTS", "/tmp"))


def cpu_ticks(pid: int) -> int:
    """The daemon's CPU ticks with its queue workers' (the benchmark's own count)."""
    from guest_bench import cpu_ticks as tree_ticks

    return tree_ticks(pid)


def guest_cpu() -> list[int]:
    """The guest's CPU time so far (all CPUs), per /proc/stat column."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def per_cpu() -> list[list[int]]:
    """Each CPU's /proc/stat columns."""
    with open("/proc/stat") as f:
        return [
            [int(x) for x in line.split()[1:]]
            for line in f
            if line.startswith("cpu") and line[3].isdigit()
        ]


def task_snapshot(daemon_pid: int) -> dict[int, tuple[str, an.TaskSample]]:
    """Every task in the guest: its group (bench/analysis.py task_group) and counters."""
    from guest_bench import process_tree

    daemon = set(process_tree(daemon_pid))
    snap: dict[int, tuple[str, an.TaskSample]] = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                base = f"/proc/{pid}/task/{tid}"
                with open(base + "/stat") as f, open(base + "/schedstat") as g:
                    sample = an.task_sample(f.read(), g.read())
                group = an.task_group(sample.comm, pid in daemon)
                if group in ("daemon", "fio"):  # per CPU (fio's jobs are pinned)
                    group = f"{group}@{sample.cpu}"
                snap[int(tid)] = (group, sample)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return snap


def sched_window(ns: argparse.Namespace, pid: int, dev: str) -> tuple[str, float, str]:
    """Run fio with a snapshot of every task's scheduler counters one second in and one
    second before the end: (fio stdout, daemon CPU seconds, the report)."""
    t0 = cpu_ticks(pid)
    g0 = guest_cpu()
    fio = subprocess.Popen(
        an.fio_args(dev, ns.rw, ns.depth, ns.queues, ns.runtime),
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1)
    c0, s0, w0 = per_cpu(), task_snapshot(pid), time.monotonic()
    time.sleep(max(ns.runtime - 2, 1))
    c1, s1, w1 = per_cpu(), task_snapshot(pid), time.monotonic()
    stdout, _ = fio.communicate()
    record_idle_since(g0)
    res = an.parse_fio(an.extract_json(stdout), ns.rw)
    report = an.sched_report(s0, s1, w1 - w0, res.iops * (w1 - w0), c0, c1)
    return stdout, (cpu_ticks(pid) - t0) / os.sysconf("SC_CLK_TCK"), report


IDLE_COLUMNS = (3, 4)  # idle, iowait
LAST_IDLE = [0.0]  # the guest's idle share during the last fio run


def record_idle_since(before: list[int]) -> None:
    """LAST_IDLE: the guest's idle share since ``before`` (a `guest_cpu` reading)."""
    delta = [b - a for a, b in zip(before, guest_cpu(), strict=True)]
    LAST_IDLE[0] = sum(delta[i] for i in IDLE_COLUMNS) / max(sum(delta), 1)


def run_fio(ns: argparse.Namespace, pid: int, dev: str) -> tuple[str, float]:
    """Run the cell's fio once; (fio stdout, daemon CPU seconds meanwhile).  The
    guest's idle share over the run goes to LAST_IDLE (is there a CPU left to use?)."""
    t0 = cpu_ticks(pid)
    s0 = guest_cpu()
    out = subprocess.run(
        an.fio_args(dev, ns.rw, ns.depth, ns.queues, ns.runtime),
        capture_output=True,
        text=True,
        check=False,
    )
    record_idle_since(s0)
    return out.stdout, (cpu_ticks(pid) - t0) / os.sysconf("SC_CLK_TCK")


def ab(ns: argparse.Namespace) -> int:
    """Run every variant ``--repeat`` times, interleaved (order alternating), and print
    the median IOPS, latency and CPU per variant."""
    import statistics

    if ns.backend in ("threads", "native"):
        fd = os.open(an.FILE_PATH, os.O_RDWR | os.O_CREAT, 0o644)
        os.posix_fallocate(fd, 0, an.FILE_SIZE)
        os.close(fd)
    results: dict[str, list[tuple[float, float, float]]] = {v: [] for v in ns.variant}
    lines: list[str] = []
    for rep in range(ns.repeat):
        order = ns.variant if rep % 2 == 0 else ns.variant[::-1]
        for variant in order:
            env = dict(kv.split("=", 1) for kv in [*ns.env, *variant.split(",")] if kv)
            # DAEMON=PATH: this variant runs another daemon program (e.g. vexport from
            # another virtualenv), not an environment variable.
            daemon = [env.pop("DAEMON")] if "DAEMON" in env else ns.daemon
            for key, value in env.items():
                os.environ[key] = value
            name = f"vxab{rep}{ns.variant.index(variant)}"
            proc = helpers.start_daemon(
                daemon, an.daemon_args(ns.backend, name, ns.queues), name, 180
            )
            try:
                dev = helpers.vdpa_add(name, timeout=60)
                time.sleep(0.5)
                stdout, cpu = run_fio(ns, proc.pid, dev)
                res = an.parse_fio(an.extract_json(stdout), ns.rw)
                sample = (
                    res.iops,
                    res.clat_median_us or 0,
                    1000 * cpu / max(res.iops * ns.runtime, 1),
                )
                results[variant].append(sample)
                line = (
                    f"rep {rep} {variant}: {sample[0]:.0f} IOPS, lat50 {sample[1]:.0f} us, "
                    f"{sample[2]:.3f} s/kIO, guest idle {100 * LAST_IDLE[0]:.0f}%"
                )
                print(line, flush=True)
                lines.append(line)
                helpers.vdpa_del(name)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
            for key in env:
                os.environ.pop(key, None)
    lines.append(f"{ns.backend} q{ns.queues} {ns.rw} d{ns.depth}, medians of {ns.repeat}:")
    for variant, samples in results.items():
        iops, lat, cpu = (statistics.median(x) for x in zip(*samples, strict=True))
        lines.append(
            f"  {variant or '(default)'}: {iops:.0f} IOPS, lat50 {lat:.0f} us, {cpu:.3f} s/kIO"
        )
    (OUT / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-1 - len(results) :]))
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--daemon", nargs="+", required=True)
    an.add_cell_options(p, repeat=1)
    ns = p.parse_args()
    if ns.variant:
        return ab(ns)
    if ns.backend in ("threads", "native"):
        fd = os.open(an.FILE_PATH, os.O_RDWR | os.O_CREAT, 0o644)
        os.posix_fallocate(fd, 0, an.FILE_SIZE)
        os.close(fd)
    # The daemon inherits this environment: every --env pair (PYTHONPATH too, to run
    # another checkout), and the profile's output file.
    daemon = ns.daemon
    for kv in ns.env:
        key, _, value = kv.partition("=")
        if key == "DAEMON":  # another daemon program, as in the A/B mode
            daemon = [value]
        else:
            os.environ[key] = value
    if ns.tool == "cprofile":
        os.environ["VEXPORT_PROFILE"] = str(OUT / "cprofile.pstats")
    name = "vxprof0"
    proc = helpers.start_daemon(daemon, an.daemon_args(ns.backend, name, ns.queues), name, 180)
    summary: list[str] = []
    try:
        dev = helpers.vdpa_add(name, timeout=60)
        time.sleep(0.5)
        tracer = None
        if ns.tool == "strace":
            tracer = subprocess.Popen(
                ["strace", "-c", "-f", "-o", str(OUT / "strace.txt"), "-p", str(proc.pid)]
            )
        elif ns.tool == "perf":
            tracer = subprocess.Popen(
                ["perf", "record", "-g", "-o", "/tmp/perf.data", "-p", str(proc.pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        elif ns.tool == "py-spy":
            # Sampling, without stopping the daemon (--nonblocking): its own cost is a
            # second process reading the daemon's memory, not a slower daemon.
            tracer = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--nonblocking",
                 "--idle", "--subprocesses", "--rate", "250", "--format", "raw",
                 "-o", str(OUT / "py-spy.txt"), "-p", str(proc.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        time.sleep(0.5 if tracer else 0)
        if ns.tool == "sched":
            stdout, cpu, report = sched_window(ns, proc.pid, dev)
            (OUT / "sched.txt").write_text(report)
        else:
            stdout, cpu = run_fio(ns, proc.pid, dev)
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(60)
        (OUT / "fio.json").write_text(stdout)
        res = an.parse_fio(an.extract_json(stdout), ns.rw)
        summary.append(
            f"{ns.backend} q{ns.queues} {ns.rw} d{ns.depth} tool={ns.tool}: "
            f"{res.iops:.0f} IOPS, lat50 {res.clat_median_us or 0:.0f} us, daemon cpu "
            f"{cpu:.2f} s = {1000 * cpu / max(res.iops * ns.runtime, 1):.3f} s/kIO, "
            f"guest idle {100 * LAST_IDLE[0]:.0f}% of {os.cpu_count()} CPUs"
        )
        if ns.tool == "perf":
            rep = subprocess.run(
                ["perf", "report", "-i", "/tmp/perf.data", "--stdio", "--no-children",
                 "--sort", "dso,sym", "--percent-limit", "0.5"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            (OUT / "perf.txt").write_text(rep.stdout + rep.stderr)
        if ns.tool == "py-spy":
            report = an.collapsed_stack_report((OUT / "py-spy.txt").read_text(), top=40)
            (OUT / "py-spy-report.txt").write_text(report)
        helpers.vdpa_del(name)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        summary.append(f"daemon exit status {proc.returncode}")
        summary.append(helpers.daemon_log(name)[-2000:])
        (OUT / "summary.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
