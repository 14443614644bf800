"""vexport vs qemu-storage-daemon: the one benchmark command (issue 5).

    .venv/bin/python bench/run.py                     # full matrix, 3 rounds, 5 s per fio run
    .venv/bin/python bench/run.py --quick             # smoke test: 1 round, 2 s, a subset
    .venv/bin/python bench/run.py --rounds 5 --runtime 10 --backends null,nullb --out DIR
    .venv/bin/python bench/run.py --report DIR        # re-print/re-plot an earlier run

Boots the real-kernel test guest once (tests/guest/runner.py), runs bench/guest_bench.py
in it, which alternates the two daemons over the matrix and appends one JSON line per
fio run to ``samples.jsonl`` in the results directory; then, on the host, summarises
(medians over the rounds, vexport/QSD ratios, geometric mean, worst cell), prints the
table and writes ``results.json``, ``table.txt`` and ``chart.png`` (needs matplotlib).
See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

import analysis as an  # noqa: E402

QSD = "/usr/bin/qemu-storage-daemon"
VEXPORT = str(ROOT / ".venv" / "bin" / "vexport")


def host_info() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": model,
        "cores": os.cpu_count(),
        "mem_mib": mem_kib // 1024,
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
        "commit": commit,
    }


def load_samples(out: Path) -> list[dict[str, Any]]:
    path = out / "samples.jsonl"
    if not path.exists():
        return []
    samples = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                samples.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut short by a guest that died mid-write
    return samples


def estimate_seconds(cfg: dict[str, Any]) -> float:
    sessions = cfg["rounds"] * len(cfg["backends"]) * len(cfg["queues"]) * 2
    fio_runs = sessions * len(cfg["rws"]) * len(cfg["depths"])
    # fio start-up under TCG ~1.5 s; a daemon start + vdpa add/del + stop ~8 s.
    return fio_runs * (cfg["runtime"] + 1.5) + sessions * 8 + 30


class ProgressTail(threading.Thread):
    """Echo the guest's progress.log (the results share is uncached) while it runs."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.stop_ev = threading.Event()

    def run(self) -> None:
        pos = 0
        while True:
            stopping = self.stop_ev.wait(2)
            try:
                with open(self.path) as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos = f.tell()
                for line in chunk.splitlines():
                    print("guest", line, flush=True)
            except OSError:
                pass
            if stopping:
                return


def run_guest(cfg: dict[str, Any], out: Path, timeout: float) -> str | None:
    """Run the guest half; returns an error text if the guest did not finish cleanly."""
    from guest import runner

    for name in ("samples.jsonl", "progress.log", "guest-done", "guest-info.json"):
        (out / name).unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    image = runner.prepare()
    cmd = [
        sys.executable,
        str(HERE / "guest_bench.py"),
        "--config",
        f"{runner.GUEST_RESULTS}/config.json",
    ]
    tailer = ProgressTail(out / "progress.log")
    tailer.start()
    try:
        res = runner.run(
            cmd,
            timeout=timeout,
            results_dir=out,
            env={"PYTHONDONTWRITEBYTECODE": "1"},
            cwd=str(ROOT),
            image=image,
        )
    except runner.GuestError as e:
        return f"guest failed: {e}"
    finally:
        tailer.stop_ev.set()
        tailer.join()
    if res.status != 0:
        return f"guest benchmark exited with status {res.status}:\n{res.output[-3000:]}"
    return None


def chart(summary: dict[str, Any], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return False
    cells = summary["cells"]
    labels = [c["label"] for c in cells.values()]
    qsd = [c["qsd"]["iops"] or 0 for c in cells.values()]
    vx = [c["vexport"]["iops"] or 0 for c in cells.values()]
    ratios = [c["ratio"] if c["ratio"] is not None else 0 for c in cells.values()]
    x = range(len(labels))
    fig, (ax1, ax2) = plt.subplots(
        2, 1, figsize=(max(10, 0.45 * len(labels) + 3), 9), sharex=True,
        gridspec_kw={"height_ratios": [3, 2]},
    )  # fmt: skip
    w = 0.4
    ax1.bar([i - w / 2 for i in x], qsd, w, label="qemu-storage-daemon 7.2", color="#4c72b0")
    ax1.bar([i + w / 2 for i in x], vx, w, label="vexport", color="#dd8452")
    ax1.set_yscale("log")
    ax1.set_ylabel("IOPS (median, log scale)")
    ax1.legend(loc="upper left")
    ax1.grid(axis="y", which="both", alpha=0.3)
    ax1.set_title(title)
    colors = ["#55a868" if r >= 0.9 else "#c44e52" if r < 0.75 else "#dd8452" for r in ratios]
    ax2.bar(list(x), ratios, 0.6, color=colors)
    for y, style in ((1.0, "-"), (0.9, "--"), (0.75, ":")):
        ax2.axhline(y, color="black", linestyle=style, linewidth=0.8)
    gm = summary.get("geomean")
    ax2.set_ylabel("vexport / QSD IOPS")
    gm_ok = summary.get("geomean_without_failed")
    gm_text = "-" if gm is None else f"{gm:.2f}"
    if gm_ok is not None and gm_ok != gm:
        gm_text += f", {gm_ok:.2f} without the failed cells"
    ax2.set_title(f"ratio per cell (geomean {gm_text}; lines at 1.0, 0.9, 0.75)")
    for i, (r, c) in enumerate(zip(ratios, cells.values(), strict=True)):
        text = "FAILED" if c["vexport"]["failed"] else f"{r:.2f}"
        ax2.text(i, r + 0.02, text, ha="center", va="bottom", fontsize=7)
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(labels, rotation=75, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _load(avg: Any) -> str:
    return "/".join(f"{x:.1f}" for x in avg) if avg else "?"


def report(out: Path) -> int:
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
    samples = load_samples(out)
    if not samples:
        print(f"no samples in {out}", file=sys.stderr)
        return 1
    summary = an.summarise(samples)
    guest = {}
    if (out / "guest-info.json").exists():
        guest = json.loads((out / "guest-info.json").read_text())
    host = meta.get("host", {})
    cfg = meta.get("config", {})
    header = (
        f"{host.get('date', '?')}  host: {host.get('cpu_model', '?')}, "
        f"{host.get('cores', '?')} cores, {host.get('mem_mib', '?')} MiB, load average "
        f"{_load(host.get('loadavg_at_start'))} at start, "
        f"{_load(meta.get('loadavg_at_end'))} at end\n"
        f"guest: TCG, {guest.get('cpus', '?')} vCPUs, {guest.get('mem_mib', '?')} MiB, "
        f"Linux {guest.get('kernel', '?')}; {guest.get('qsd', '')}; {guest.get('fio', '')}\n"
        f"rounds {cfg.get('rounds', '?')}, fio runtime {cfg.get('runtime', '?')} s\n"
        "IOPS: median over rounds; lat50: median fio completion latency (us, depth-1 cells); "
        "cpu/kIO: daemon CPU seconds per 1,000 I/Os; PSS MiB at idle / peak under load"
    )
    table = header + "\n\n" + an.format_table(summary)
    errors = [s for s in samples if "error" in s]
    if errors:
        table += f"\n\n{len(errors)} failed fio run(s):"
        seen = set()
        for s in errors:
            key = (s["daemon"], s["error"])
            if key in seen:
                continue
            seen.add(key)
            text = " | ".join(str(s["error"]).splitlines())
            table += f"\n  {s['daemon']} {s['cell']} round {s['round'] + 1}: {text}"
    if meta.get("guest_error"):
        table += f"\n\nGUEST DID NOT FINISH: {meta['guest_error'][:2000]}"
    print(table)
    (out / "table.txt").write_text(table + "\n")
    doc = {"meta": meta, "guest": guest, "summary": summary, "samples": samples}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    date = host.get("date", "")[:10]
    if chart(summary, out / "chart.png", f"vexport vs qemu-storage-daemon, 4k random I/O, {date}"):
        print(f"\nwrote {out / 'results.json'}, {out / 'table.txt'}, {out / 'chart.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtime", type=float, default=5, help="seconds per fio run (default 5)")
    p.add_argument("--quick", action="store_true", help="1 round, 2 s, null-co and nullb0, 1 queue")
    p.add_argument("--backends", help="comma list of " + ",".join(an.BACKENDS))
    p.add_argument("--queues", help="comma list of 1,2")
    p.add_argument("--rws", help="comma list of randread,randwrite")
    p.add_argument("--depths", help="comma list of 1,32")
    p.add_argument("--out", help="results directory (default bench/results/DATE-TIME)")
    p.add_argument("--timeout", type=float, help="guest time limit, s (default: estimate x1.5)")
    p.add_argument("--report", metavar="DIR", help="only summarise an earlier run's DIR")
    ns = p.parse_args(argv)
    if ns.report:
        return report(Path(ns.report))
    cfg: dict[str, Any] = {
        "rounds": ns.rounds,
        "runtime": ns.runtime,
        "backends": list(an.BACKENDS),
        "queues": list(an.QUEUES),
        "rws": list(an.RWS),
        "depths": list(an.DEPTHS),
        "daemons": {"qsd": [QSD], "vexport": [VEXPORT]},
    }
    if ns.quick:
        cfg.update(rounds=1, runtime=2, backends=["null", "nullb"], queues=[1])
    if ns.backends:
        cfg["backends"] = [b for b in ns.backends.split(",") if b]
        bad = set(cfg["backends"]) - set(an.BACKENDS)
        if bad:
            p.error(f"unknown backend(s) {sorted(bad)}")
    if ns.queues:
        cfg["queues"] = [int(q) for q in ns.queues.split(",")]
    if ns.rws:
        cfg["rws"] = ns.rws.split(",")
    if ns.depths:
        cfg["depths"] = [int(d) for d in ns.depths.split(",")]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(ns.out) if ns.out else HERE / "results" / stamp
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    est = estimate_seconds(cfg)
    timeout = ns.timeout or est * 1.5 + 120
    print(
        f"benchmark: {len(an.matrix(cfg['backends'], cfg['queues'], cfg['rws'], cfg['depths']))} "
        f"cells x 2 daemons x {cfg['rounds']} rounds, fio {cfg['runtime']:g} s; "
        f"estimated {est / 60:.0f} min (limit {timeout / 60:.0f} min); results in {out}",
        flush=True,
    )
    meta: dict[str, Any] = {"host": host_info(), "config": cfg}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    t0 = time.monotonic()
    try:
        meta["guest_error"] = run_guest(cfg, out, timeout)
    except (KeyboardInterrupt, SystemExit) as e:
        meta["guest_error"] = f"interrupted ({type(e).__name__}); partial results"
    meta["wall_seconds"] = round(time.monotonic() - t0, 1)
    meta["loadavg_at_end"] = os.getloadavg()
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    rc = report(out)
    return 1 if meta["guest_error"] else rc


if __name__ == "__main__":
    sys.exit(main())
