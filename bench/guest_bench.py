"""The in-guest half of the benchmark: run both daemons alternately under fio.

Started by bench/run.py inside the real-kernel test guest (see docs/guest.md) as
``python bench/guest_bench.py --config $VEXPORT_GUEST_RESULTS/config.json``.  For every
round, backend and queue count (a *session*) it starts each daemon in turn (A B, then
B A in the next session), attaches the export with ``vdpa dev add``, runs fio for every
``rw x depth`` cell against that one daemon instance, detaches and stops the daemon.

Per fio run it records IOPS, completion latency, the daemon's CPU time (utime+stime of
the daemon and all its descendants, threads included, from /proc/PID/stat) per 1,000
I/Os, and its PSS (smaps_rollup, summed over the process tree) at idle and the peak
while fio ran.  Each sample is appended to ``samples.jsonl`` in the results share as
soon as it exists, so a crash or a hung guest keeps what was measured.  A failure
(daemon exits, device never appears, fio fails or hangs) becomes an ``error`` sample
for the cells concerned; the benchmark goes on with the next session.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import analysis as an  # noqa: E402
from guest import helpers  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def results_dir() -> Path:
    return Path(os.environ.get("VEXPORT_GUEST_RESULTS", "/tmp"))


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(results_dir() / "progress.log", "a") as f:
        f.write(line + "\n")


# --------------------------------------------------------------------------- /proc


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its living descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read(f"/proc/{entry}/stat")
        if stat:
            children.setdefault(an.ppid_from_stat(stat), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_ticks(pid: int) -> int:
    """CPU ticks of the daemon, its threads, its reaped children and living descendants."""
    total = 0
    for p in process_tree(pid):
        stat = _read(f"/proc/{p}/stat")
        if stat:
            own, reaped = an.cpu_ticks_from_stat(stat)
            total += own + (reaped if p == pid else 0)
    return total


def pss_kib(pid: int) -> int:
    total = 0
    for p in process_tree(pid):
        text = _read(f"/proc/{p}/smaps_rollup")
        if text:
            total += an.pss_kib_from_rollup(text)
    return total


class PssSampler(threading.Thread):
    """Peak PSS of a process tree, sampled every ``interval`` seconds until stop()."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self._stop_ev = threading.Event()

    def run(self) -> None:
        while not self._stop_ev.wait(self.interval):
            self.peak = max(self.peak, pss_kib(self.pid))

    def stop(self) -> int:
        self._stop_ev.set()
        self.join()
        return self.peak


# --------------------------------------------------------------------------- sessions


def append_sample(sample: dict[str, Any]) -> None:
    with open(results_dir() / "samples.jsonl", "a") as f:
        f.write(json.dumps(sample) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_bounded(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """subprocess.run with a time limit that never blocks past it.

    A process stuck in the kernel (fio or ``vdpa dev del`` waiting for I/O a broken
    device will never complete) ignores SIGKILL; subprocess.run would then wait forever.
    Such a process is abandoned (TimeoutExpired is raised all the same).
    """
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            log(f"  pid {proc.pid} ({argv[0]}) does not die: abandoned (stuck in the kernel)")
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def vdpa_del(name: str, timeout: float = 60) -> None:
    r = run_bounded(["vdpa", "dev", "del", name], timeout)
    if r.returncode:
        raise RuntimeError(f"vdpa dev del {name}: status {r.returncode}: {r.stderr.strip()}")


def stop_daemon(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, 30 s, SIGKILL, 10 s; None if it still did not exit (abandoned)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log(f"  daemon pid {proc.pid} ignored SIGTERM for 30 s: SIGKILL")
            proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                return None
    return proc.returncode


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_session(
    cfg: dict[str, Any], daemon: str, backend: str, queues: int, round_no: int, name: str
) -> None:
    argv = cfg["daemons"][daemon]
    cells = [an.Cell(backend, queues, rw, depth) for rw in cfg["rws"] for depth in cfg["depths"]]
    base = {"daemon": daemon, "round": round_no}
    runtime = cfg["runtime"]
    t0 = time.monotonic()
    try:
        proc = helpers.start_daemon(argv, an.daemon_args(backend, name, queues), name, timeout=180)
    except Exception as e:
        err = f"daemon start failed: {e}"
        log(f"  {daemon}: {err}")
        for cell in cells:
            append_sample({**base, "cell": cell.key, "error": tail(err)})
        return
    start_s = time.monotonic() - t0
    attached = False
    try:
        try:
            dev = helpers.vdpa_add(name, timeout=60)
            attached = True
        except Exception as e:
            err = f"vdpa dev add failed: {e}; daemon log: {helpers.daemon_log(name)}"
            log(f"  {daemon}: {tail(err)}")
            for cell in cells:
                append_sample({**base, "cell": cell.key, "error": tail(err)})
            return
        time.sleep(0.5)
        pss_idle = pss_kib(proc.pid)
        broken: str | None = None
        for cell in cells:
            sample: dict[str, Any] = {**base, "cell": cell.key, "start_s": start_s}
            if broken:
                append_sample({**sample, "error": f"{an.NOT_RUN} {broken}"})
                continue
            numjobs = queues
            args = an.fio_args(dev, cell.rw, cell.depth, numjobs, runtime)
            sampler = PssSampler(proc.pid)
            ticks0 = cpu_ticks(proc.pid)
            sampler.start()
            try:
                out = run_bounded(args, runtime + 120)
            except subprocess.TimeoutExpired:
                sampler.stop()
                broken = f"fio did not finish within {runtime + 120:g} s on {cell.key}"
                append_sample(
                    {**sample, "error": broken + "; daemon log: " + tail(helpers.daemon_log(name))}
                )
                log(f"  {daemon} {cell.key}: {broken}")
                continue
            pss_load = sampler.stop()
            ticks1 = cpu_ticks(proc.pid)
            if proc.poll() is not None:
                broken = f"daemon exited with status {proc.returncode}"
                append_sample(
                    {**sample, "error": broken + "; log: " + tail(helpers.daemon_log(name))}
                )
                log(f"  {daemon} {cell.key}: {broken}")
                continue
            try:
                if out.returncode:
                    raise ValueError(f"fio exit status {out.returncode}: {tail(out.stderr)}")
                res = an.parse_fio(an.extract_json(out.stdout), cell.rw)
                if res.errors:
                    raise ValueError(f"fio reported error {res.errors}: {tail(out.stderr)}")
            except (ValueError, KeyError) as e:
                append_sample({**sample, "error": str(e)})
                log(f"  {daemon} {cell.key}: {e}")
                continue
            cpu_s = (ticks1 - ticks0) / CLK_TCK
            sample.update(
                iops=res.iops,
                total_ios=res.total_ios,
                clat_median_us=res.clat_median_us,
                clat_mean_us=res.clat_mean_us,
                cpu_s=cpu_s,
                cpu_s_per_kio=cpu_s / res.total_ios * 1000 if res.total_ios else None,
                fio_cpu_pct=res.fio_usr_cpu + res.fio_sys_cpu,
                pss_idle_mib=pss_idle / 1024,
                pss_load_mib=max(pss_load, pss_idle) / 1024 if pss_load else None,
            )
            append_sample(sample)
            log(
                f"  {daemon:7s} {cell.key:28s} {res.iops:9.0f} IOPS  "
                f"lat50 {res.clat_median_us or 0:7.0f} us  cpu {cpu_s:6.2f} s  "
                f"PSS {pss_idle / 1024:.1f}/{pss_load / 1024:.1f} MiB"
            )
    finally:
        if attached:
            try:
                vdpa_del(name)
            except Exception as e:
                log(f"  {daemon}: vdpa dev del {name} failed: {e}")
        status = stop_daemon(proc)
        if status not in (0, -15):
            log(f"  {daemon}: exit status {status} after SIGTERM (None: would not exit)")


def guest_info(cfg: dict[str, Any]) -> dict[str, Any]:
    mem = next(
        (line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal:")), "0"
    )

    def version(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except Exception as e:
            return f"unknown ({e})"

    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "mem_mib": int(mem) // 1024,
        "fio": version(["fio", "--version"]),
        "qsd": version([cfg["daemons"]["qsd"][0], "--version"]),
        "python": sys.version.split()[0],
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    cfg = json.loads(Path(p.parse_args().config).read_text())
    (results_dir() / "guest-info.json").write_text(json.dumps(guest_info(cfg), indent=1))
    if {"threads", "native"} & set(cfg["backends"]):
        fd = os.open(an.FILE_PATH, os.O_RDWR | os.O_CREAT, 0o644)
        os.posix_fallocate(fd, 0, an.FILE_SIZE)
        os.close(fd)
    session_no = 0
    for round_no in range(cfg["rounds"]):
        for backend in cfg["backends"]:
            for queues in cfg["queues"]:
                slot = session_no % (len(cfg["backends"]) * len(cfg["queues"]))
                order = an.session_order(round_no, slot)
                log(
                    f"round {round_no + 1}/{cfg['rounds']} {backend} q{queues}: "
                    + " then ".join(order)
                )
                for daemon in order:
                    run_session(
                        cfg, daemon, backend, queues, round_no, f"vxbench{session_no}{daemon[0]}"
                    )
                session_no += 1
    log("done")
    (results_dir() / "guest-done").write_text("ok\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
