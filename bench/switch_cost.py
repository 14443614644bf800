"""What a task switch costs in the test guest, with and without an address-space switch.

    .venv/bin/python bench/switch_cost.py            # in the guest (boots it)
    .venv/bin/python bench/switch_cost.py --host     # on this machine, for comparison

Compiles bench/switch_cost.c (gcc, static) and runs it: two tasks pinned to one CPU pass
a byte back and forth, touching PAGES pages of their own memory on each turn, as two
threads of one process and as two processes.  Prints the median time per round trip of
each (``--rounds`` runs each, interleaved, each after one unrecorded run of the same
kind) and the difference, which is what two address-space switches per round trip
cost, with the pages touched after them.  Under TCG every address-space switch flushes
the vCPU's software TLB (bench/README.md, "What the guest's CPUs do").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

import analysis as an  # noqa: E402

PAGES = (0, 16, 64, 256, 1024)


def measure(binary: str, repeat: int, trips: int) -> list[str]:
    """Run every (pages, mode) ``repeat`` times, the modes interleaved; the output lines."""
    lines = []
    for rep in range(repeat):
        for pages in PAGES:
            modes = ("thread", "proc") if rep % 2 == 0 else ("proc", "thread")
            for mode in modes:
                argv = [binary, mode, str(pages), str(trips)]
                # A first run to warm up: QEMU sizes a vCPU's software TLB by its recent
                # use, which the other mode's run (flushing, or not) has just changed.
                subprocess.run(argv, capture_output=True, check=True)
                out = subprocess.run(argv, capture_output=True, text=True, check=True)
                lines.append(out.stdout.strip())
                print(lines[-1], flush=True)
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", action="store_true", help="run here, not in the guest")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--trips", type=int, default=3000, help="round trips per run")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "switch-cost")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # in-guest half: the binary
    ns = p.parse_args()
    if ns.measure:
        measure(ns.measure, ns.rounds, ns.trips)
        return 0
    ns.out.mkdir(parents=True, exist_ok=True)
    binary = ns.out / "switch_cost"
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-Wall",
            "-static",
            "-pthread",
            "-o",
            str(binary),
            str(HERE / "switch_cost.c"),
        ],
        check=True,
    )
    if ns.host:
        lines = measure(str(binary), ns.rounds, ns.trips)
    else:
        from guest import runner

        cmd = [sys.executable, str(Path(__file__).resolve()), f"--measure={binary}",
               f"--rounds={ns.rounds}", f"--trips={ns.trips}"]  # fmt: skip
        res = runner.run(cmd, timeout=900, results_dir=ns.out / "guest", image=runner.prepare())
        if res.status != 0:
            print(res.output[-4000:])
            return 1
        lines = [line for line in res.output.splitlines() if line.startswith(("thread ", "proc "))]
    table = an.switch_cost_table(lines)
    (ns.out / "table.txt").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
