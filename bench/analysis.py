"""Pure helpers of the benchmark: the matrix, fio JSON parsing, statistics, the table.

No I/O and no third-party imports: `run.py` (host), `guest_bench.py` (guest) and the
unit tests (tests/unit/test_bench_parsing.py) share them.

Vocabulary
----------
A *cell* is one fio workload against one daemon configuration: ``(backend, queues, rw,
depth)``.  A *session* is one daemon instance (one backend and queue count, one round):
it serves the ``rw x depth`` cells one after the other.  A *sample* is one fio run of a
cell by one daemon in one round.  The summary keeps, per cell and daemon, the median
over the rounds of each measured value, and per cell the vexport/QSD ratio of the
median IOPS.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DAEMONS = ("qsd", "vexport")
BACKENDS = ("null", "threads", "native", "nullb")
RWS = ("randread", "randwrite")
DEPTHS = (1, 32)
QUEUES = (1, 2)

BACKEND_LABELS = {
    "null": "null-co",
    "threads": "file aio=threads",
    "native": "file aio=native",
    "nullb": "nullb0 aio=native",
}

# The tmpfs file the two file backends use, and the null-co size.
FILE_PATH = "/tmp/bench.img"
FILE_SIZE = 256 << 20
NULL_SIZE = 1 << 30
NULLB_DEV = "/dev/nullb0"


def blockdev_arg(backend: str) -> str:
    """The ``--blockdev`` option (the same for both daemons)."""
    if backend == "null":
        return f"driver=null-co,node-name=disk0,size={NULL_SIZE}"
    if backend == "threads":
        return f"driver=file,filename={FILE_PATH},node-name=disk0,aio=threads"
    if backend == "native":
        return f"driver=file,filename={FILE_PATH},node-name=disk0,aio=native,cache.direct=on"
    if backend == "nullb":
        return f"driver=host_device,filename={NULLB_DEV},node-name=disk0,aio=native,cache.direct=on"
    raise ValueError(f"unknown backend {backend!r}")


def export_arg(name: str, queues: int) -> str:
    return f"type=vduse-blk,id=exp0,node-name=disk0,name={name},writable=on,num-queues={queues}"


def daemon_args(backend: str, name: str, queues: int) -> list[str]:
    return ["--blockdev", blockdev_arg(backend), "--export", export_arg(name, queues)]


def fio_args(dev: str, rw: str, depth: int, numjobs: int, runtime: float) -> list[str]:
    """fio argv for one cell.  Two jobs are pinned one per vCPU so both queues work."""
    args = [
        "fio",
        "--name=bench",
        f"--filename={dev}",
        "--ioengine=libaio",
        "--direct=1",
        "--bs=4k",
        f"--rw={rw}",
        f"--iodepth={depth}",
        f"--numjobs={numjobs}",
        "--time_based",
        f"--runtime={runtime:g}",
        "--group_reporting",
        "--output-format=json",
    ]
    if numjobs > 1:
        args += [f"--cpus_allowed=0-{numjobs - 1}", "--cpus_allowed_policy=split"]
    return args


@dataclass(frozen=True, order=True)
class Cell:
    backend: str
    queues: int
    rw: str
    depth: int

    @property
    def key(self) -> str:
        return f"{self.backend}/q{self.queues}/{self.rw}/d{self.depth}"

    @property
    def label(self) -> str:
        rw = "read" if self.rw == "randread" else "write"
        return f"{BACKEND_LABELS.get(self.backend, self.backend)} q{self.queues} {rw} d{self.depth}"

    def sort_key(self) -> tuple[int, int, int, int]:
        """Matrix order: backend as in BACKENDS, then queues, rw, depth."""
        b = BACKENDS.index(self.backend) if self.backend in BACKENDS else len(BACKENDS)
        return (b, self.queues, RWS.index(self.rw) if self.rw in RWS else 9, self.depth)

    @classmethod
    def from_key(cls, key: str) -> Cell:
        backend, q, rw, d = key.split("/")
        return cls(backend, int(q[1:]), rw, int(d[1:]))


def matrix(
    backends: Sequence[str] = BACKENDS,
    queues: Sequence[int] = QUEUES,
    rws: Sequence[str] = RWS,
    depths: Sequence[int] = DEPTHS,
) -> list[Cell]:
    return [Cell(b, q, rw, d) for b in backends for q in queues for rw in rws for d in depths]


def session_order(round_no: int, slot: int) -> tuple[str, str]:
    """Which daemon goes first in the ``slot``-th (backend, queues) pair of a round.

    A B in one slot, B A in the next; and each slot swaps its order every round (whatever
    the number of slots per round), so each daemon goes first equally often.
    """
    return DAEMONS if (round_no + slot) % 2 == 0 else (DAEMONS[1], DAEMONS[0])


# --------------------------------------------------------------------------- fio


@dataclass
class FioResult:
    iops: float
    total_ios: int
    clat_median_us: float | None
    clat_mean_us: float | None
    fio_usr_cpu: float
    fio_sys_cpu: float
    errors: int


def parse_fio(doc: Mapping[str, Any], rw: str) -> FioResult:
    """The numbers of one ``--group_reporting --output-format=json`` run.

    ``rw`` selects the ``read`` or ``write`` section.  Latencies are in microseconds;
    the median is fio's 50th percentile of completion latency (absent if fio was run
    without percentiles).
    """
    jobs = doc.get("jobs") or []
    if not jobs:
        raise ValueError("fio output has no jobs")
    job = jobs[0]
    section = job["write" if "write" in rw else "read"]
    clat = section.get("clat_ns") or {}
    pct = clat.get("percentile") or {}
    median = None
    for key, value in pct.items():
        if math.isclose(float(key), 50.0):
            median = float(value) / 1000
    mean = clat.get("mean")
    return FioResult(
        iops=float(section["iops"]),
        total_ios=int(section.get("total_ios", 0)),
        clat_median_us=median,
        clat_mean_us=None if mean is None else float(mean) / 1000,
        fio_usr_cpu=float(job.get("usr_cpu", 0.0)),
        fio_sys_cpu=float(job.get("sys_cpu", 0.0)),
        errors=int(job.get("error", 0)),
    )


def extract_json(text: str) -> dict[str, Any]:
    """fio may print warnings before its JSON document: parse from the first '{'."""
    import json

    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON in fio output")
    doc: dict[str, Any] = json.JSONDecoder().raw_decode(text[start:])[0]
    return doc


# --------------------------------------------------------------------------- /proc


def stat_fields(stat: str) -> list[str]:
    """The fields of a /proc/PID/stat line after the command name, from field 3 (state)
    on.  The command name (field 2) may hold spaces and parentheses: split after the
    last ')'."""
    return stat[stat.rindex(")") + 2 :].split()


def cpu_ticks_from_stat(stat: str) -> tuple[int, int]:
    """(utime+stime, cutime+cstime) in clock ticks from a /proc/PID/stat line."""
    rest = stat_fields(stat)
    # rest[0] is field 3 (state); utime is field 14 -> rest[11].
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return utime + stime, cutime + cstime


def ppid_from_stat(stat: str) -> int:
    return int(stat_fields(stat)[1])


def pss_kib_from_rollup(text: str) -> int:
    """The ``Pss:`` line of /proc/PID/smaps_rollup, in KiB."""
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise ValueError("no Pss line in smaps_rollup")


# --------------------------------------------------------------------------- statistics


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def geomean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    if not vals or any(v <= 0 for v in vals):
        return None if not vals else 0.0
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


# An error sample for a cell that was skipped because an earlier cell broke the session:
# not a failure of that cell.
NOT_RUN = "not run:"

SAMPLE_FIELDS = (
    "iops",
    "clat_median_us",
    "clat_mean_us",
    "cpu_s_per_kio",
    "pss_idle_mib",
    "pss_load_mib",
)


def summarise(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per cell: medians per daemon, the IOPS ratio, failures; overall geomean and worst.

    ``samples`` are dicts with ``cell`` (key), ``daemon``, ``round`` and either the
    SAMPLE_FIELDS or ``error``.  A cell where vexport failed in any round has ratio 0
    (it counts as the worst cell); a cell where QSD failed has no ratio.
    """
    by_cell: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for s in samples:
        by_cell.setdefault(s["cell"], {}).setdefault(s["daemon"], []).append(s)
    cells: dict[str, Any] = {}
    for key in sorted(by_cell, key=lambda k: Cell.from_key(k).sort_key()):
        entry: dict[str, Any] = {"label": Cell.from_key(key).label}
        for daemon in DAEMONS:
            runs = by_cell[key].get(daemon, [])
            ok = [r for r in runs if "error" not in r]
            skipped = [r for r in runs if str(r.get("error", "")).startswith(NOT_RUN)]
            d: dict[str, Any] = {
                "rounds": len(runs),
                "failed": len(runs) - len(ok) - len(skipped),
                "not_run": len(skipped),
                "errors": sorted({str(r["error"]) for r in runs if "error" in r}),
                "iops_samples": [r["iops"] for r in ok],
            }
            for field in SAMPLE_FIELDS:
                d[field] = median(r.get(field) for r in ok)
            entry[daemon] = d
        q, v = entry["qsd"], entry["vexport"]
        if v["failed"] and q["iops"]:
            entry["ratio"] = 0.0
        else:
            entry["ratio"] = ratio(v["iops"], q["iops"])
        cells[key] = entry
    ratios = {k: c["ratio"] for k, c in cells.items() if c["ratio"] is not None}
    worst = min(ratios, key=lambda k: ratios[k]) if ratios else None
    return {
        "cells": cells,
        "geomean": geomean(ratios.values()),
        "geomean_without_failed": geomean(r for r in ratios.values() if r > 0),
        "worst_cell": worst,
        "worst_ratio": ratios[worst] if worst else None,
    }


# --------------------------------------------------------------------------- table


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


TABLE_HEADER = (
    "cell",
    "QSD IOPS",
    "vx IOPS",
    "vx/QSD",
    "QSD lat50",
    "vx lat50",
    "QSD cpu/kIO",
    "vx cpu/kIO",
    "QSD PSS idle/load",
    "vx PSS idle/load",
)


def format_table(summary: Mapping[str, Any]) -> str:
    """A plain-text table (latency in us at depth 1; CPU s per 1,000 I/Os; PSS MiB)."""
    rows: list[tuple[str, ...]] = [TABLE_HEADER]
    for entry in summary["cells"].values():
        q, v = entry["qsd"], entry["vexport"]
        depth1 = entry["label"].endswith(" d1")
        rows.append(
            (
                entry["label"],
                _fmt(q["iops"], ".0f"),
                _fmt(v["iops"], ".0f") + (f" ({v['failed']} failed)" if v["failed"] else ""),
                _fmt(entry["ratio"], ".2f"),
                _fmt(q["clat_median_us"] if depth1 else None, ".0f"),
                _fmt(v["clat_median_us"] if depth1 else None, ".0f"),
                _fmt(q["cpu_s_per_kio"], ".3f"),
                _fmt(v["cpu_s_per_kio"], ".3f"),
                f"{_fmt(q['pss_idle_mib'], '.1f')}/{_fmt(q['pss_load_mib'], '.1f')}",
                f"{_fmt(v['pss_idle_mib'], '.1f')}/{_fmt(v['pss_load_mib'], '.1f')}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEADER))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    gm = summary.get("geomean")
    worst = summary.get("worst_cell")
    lines.append("")
    lines.append(f"geometric mean of vexport/QSD IOPS ratios: {_fmt(gm, '.3f')}")
    gm_ok = summary.get("geomean_without_failed")
    if gm_ok != gm:
        lines.append(f"  (over the cells where vexport never failed: {_fmt(gm_ok, '.3f')})")
    if worst:
        label = summary["cells"][worst]["label"]
        lines.append(f"worst cell: {label}: {summary['worst_ratio']:.3f}")
    return "\n".join(lines)


def collapsed_stack_report(text: str, top: int = 30) -> str:
    """Summarise collapsed stacks (py-spy's ``--format raw``: one ``frame;frame;...
    COUNT`` line per distinct stack, the leaf last) into shares of all samples: per
    process (the first frame when sampled with ``--subprocesses``), per function as
    the leaf (own time) and anywhere in the stack (inclusive, each function counted
    once per stack)."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    procs: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        if frames[0].startswith("process "):
            procs[frames[0]] += count
            frames = frames[1:]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        own[frames[-1]] += count
        for frame in set(frames):
            incl[frame] += count
    if not total:
        return "no samples\n"
    out = [f"{total} samples"]
    if procs:
        out.append("per process:")
        out += [f"  {100 * n / total:5.1f}%  {p}" for p, n in procs.most_common()]
    for title, counter in (("own time (leaf frame):", own), ("inclusive:", incl)):
        out.append(title)
        out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in counter.most_common(top)]
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class TaskSample:
    """One task's scheduler counters (/proc/PID/task/TID/stat and schedstat)."""

    comm: str
    run_ns: int  # time on a CPU
    wait_ns: int  # time runnable, waiting for a CPU
    slices: int  # times it was put on a CPU
    cpu: int  # the CPU it last ran on
    utime: int = 0  # clock ticks in user mode
    stime: int = 0  # clock ticks in the kernel


def task_sample(stat: str, schedstat: str) -> TaskSample:
    """Parse a task's stat and schedstat lines (proc(5): field 39 is the CPU)."""
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat_fields(stat)
    run, wait, slices = (int(x) for x in schedstat.split()[:3])
    return TaskSample(comm, run, wait, slices, int(fields[36]), int(fields[11]), int(fields[12]))


def task_group(comm: str, daemon: bool) -> str:
    """The row a task is counted in: the daemon's tasks, fio, the kernel's workers by
    kind, everything else."""
    if daemon:
        return "daemon"
    if comm.startswith("fio"):
        return "fio"
    for prefix in ("kworker", "ksoftirqd", "migration", "rcu", "vduse"):
        if comm.startswith(prefix):
            return prefix
    return "other"


def sched_report(
    before: Mapping[int, tuple[str, TaskSample]],
    after: Mapping[int, tuple[str, TaskSample]],
    seconds: float,
    ios: float,
    cpus_before: Sequence[Sequence[int]],
    cpus_after: Sequence[Sequence[int]],
) -> str:
    """Where the guest's CPUs went over a window: per group of tasks (keyed by task
    id, each with its group), CPU time and run-queue wait as a share of the window
    and per I/O, the kernel's share of that CPU time (stime over utime + stime, in clock
    ticks), and times put on a CPU per I/O; per CPU, the /proc/stat
    shares.
    Tasks that started during the window count from zero; tasks that ended are lost."""
    rows: dict[str, list[float]] = {}
    for tid, (group, new) in after.items():
        old = before.get(tid, (group, TaskSample(new.comm, 0, 0, 0, new.cpu)))[1]
        row = rows.setdefault(group, [0.0, 0.0, 0.0, 0.0, 0.0])
        row[0] += new.run_ns - old.run_ns
        row[1] += new.wait_ns - old.wait_ns
        row[2] += new.slices - old.slices
        row[3] += new.utime - old.utime
        row[4] += new.stime - old.stime
    ios = max(ios, 1)
    out = [
        f"window {seconds:.2f} s, {ios:.0f} I/Os",
        f"{'group':<10} {'cpu %':>7} {'cpu us/IO':>10} {'kernel':>7} {'wait us/IO':>11} "
        f"{'slices/IO':>10}",
    ]
    for group, (run, wait, slices, ut, st) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        if run < 1e6 and wait < 1e6:
            continue  # under a millisecond: not worth a line
        kernel = f"{100 * st / (ut + st):6.0f}%" if ut + st else "     -"
        out.append(
            f"{group:<10} {100 * run / 1e9 / seconds:7.1f} {run / 1e3 / ios:10.1f} {kernel:>7} "
            f"{wait / 1e3 / ios:11.1f} {slices / ios:10.2f}"
        )
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq")
    for n, (a, b) in enumerate(zip(cpus_before, cpus_after, strict=True)):
        delta = [y - x for x, y in zip(a, b, strict=True)]
        total = max(sum(delta), 1)
        pairs = zip(names, delta, strict=False)  # kernels add columns after these
        shares = " ".join(f"{name} {100 * d / total:.0f}%" for name, d in pairs)
        out.append(f"cpu{n}: {shares}")
    return "\n".join(out) + "\n"


def switch_cost_table(lines: Iterable[str]) -> str:
    """bench/switch_cost.py's table: from ``MODE PAGES US`` lines (one per run), the
    median microseconds per round trip per page count for threads and for processes,
    and the difference (what the address-space switches cost)."""
    runs: dict[tuple[str, int], list[float]] = {}
    for line in lines:
        mode, pages, us = line.split()
        runs.setdefault((mode, int(pages)), []).append(float(us))
    out = [f"{'pages':>6} {'threads us':>11} {'processes us':>13} {'difference us':>14}"]
    for pages in sorted({p for _, p in runs}):
        thread = median(runs.get(("thread", pages), []))
        proc = median(runs.get(("proc", pages), []))
        diff = proc - thread if thread is not None and proc is not None else None
        out.append(
            f"{pages:>6} {_fmt(thread, '.1f'):>11} {_fmt(proc, '.1f'):>13} {_fmt(diff, '.1f'):>14}"
        )
    return "\n".join(out) + "\n"


def add_cell_options(p: argparse.ArgumentParser, repeat: int) -> None:
    """The options bench/profile_cell.py and its in-guest half share: one cell, the
    profiling tool, the daemon's environment and the A/B variants."""
    p.add_argument("--backend", choices=("null", "threads", "native", "nullb"), default="null")
    p.add_argument("--queues", type=int, default=1)
    p.add_argument("--rw", choices=("randread", "randwrite"), default="randread")
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--runtime", type=float, default=5)
    p.add_argument(
        "--tool", choices=("none", "cprofile", "strace", "perf", "py-spy", "sched"), default="none"
    )
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the daemon")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="A/B mode (no tool): KEY=VALUE[,KEY=VALUE] daemon environment; give two or more",
    )
    p.add_argument("--repeat", type=int, default=repeat, help="A/B mode: runs per variant")
