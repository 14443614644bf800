"""Profile one daemon on one benchmark cell in the real-kernel test guest.

    .venv/bin/python bench/profile_cell.py --tool cprofile --backend null --depth 1
    .venv/bin/python bench/profile_cell.py --tool strace --backend native --depth 32
    .venv/bin/python bench/profile_cell.py --tool perf --daemon qsd --backend nullb
    .venv/bin/python bench/profile_cell.py --tool py-spy --backend native --depth 32
    .venv/bin/python bench/profile_cell.py --variant VEXPORT_LOOP=asyncio \
        --variant VEXPORT_LOOP=uvloop --repeat 4 --depth 32

Boots the guest, starts the daemon with the benchmark's options (bench/analysis.py),
runs the fio cell once while the chosen tool watches, and prints the summary (IOPS,
latency, daemon CPU per 1,000 I/Os) plus the tool's report.  With ``--variant`` (two or
more daemon environments) it instead runs each variant ``--repeat`` times in the same
guest, interleaved, and prints the medians: the way to tell whether a change helped,
since runs under TCG move by 15-30%.  ``cprofile`` (vexport only)
prints the top functions by own time and by cumulative time; results stay in --out.
"""

from __future__ import annotations

import argparse
import pstats
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

import analysis as an  # noqa: E402

DAEMONS = {
    "vexport": [str(ROOT / ".venv" / "bin" / "vexport")],
    "qsd": ["/usr/bin/qemu-storage-daemon"],
}


def main() -> int:
    from guest import runner

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--daemon", choices=sorted(DAEMONS), default="vexport")
    an.add_cell_options(p, repeat=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile")
    ns = p.parse_args()
    if ns.tool == "cprofile" and ns.daemon != "vexport":
        p.error("cprofile profiles vexport only")
    ns.out.mkdir(parents=True, exist_ok=True)
    for old in ns.out.iterdir():
        old.unlink()
    cmd = [
        sys.executable, str(HERE / "guest_profile.py"), "--daemon", *DAEMONS[ns.daemon],
        "--backend", ns.backend, "--queues", str(ns.queues), "--rw", ns.rw,
        "--depth", str(ns.depth), "--runtime", str(ns.runtime), "--tool", ns.tool,
    ]  # fmt: skip
    for kv in ns.env:
        cmd.append(f"--env={kv}")
    for variant in ns.variant:
        cmd.append(f"--variant={variant}")
    if ns.variant:
        cmd.append(f"--repeat={ns.repeat}")
    res = runner.run(cmd, timeout=900, results_dir=ns.out, cwd=str(ROOT), image=runner.prepare())
    summary = ns.out / "summary.txt"
    print(summary.read_text() if summary.exists() else res.output[-4000:])
    if ns.tool == "cprofile" and (ns.out / "cprofile.pstats").exists():
        stats = pstats.Stats(str(ns.out / "cprofile.pstats"))
        stats.sort_stats("tottime").print_stats(ns.top)
        stats.sort_stats("cumulative").print_stats(ns.top)
    for name in ("strace.txt", "perf.txt", "py-spy-report.txt", "sched.txt"):
        if (ns.out / name).exists():
            print((ns.out / name).read_text()[:12000])
    return res.status


if __name__ == "__main__":
    sys.exit(main())
