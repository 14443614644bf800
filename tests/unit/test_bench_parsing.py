"""The pure parts of the benchmark (bench/analysis.py): fio JSON, /proc parsing, statistics,
the matrix and the table."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import analysis as an


def fio_doc(rw: str, iops: float, total: int, p50_ns: int, mean_ns: float) -> dict:
    """The shape of ``fio --group_reporting --output-format=json`` (fio 3.33), trimmed."""
    active = {
        "iops": iops,
        "total_ios": total,
        "clat_ns": {
            "mean": mean_ns,
            "percentile": {"1.000000": 100, "50.000000": p50_ns, "99.000000": 10 * p50_ns},
        },
    }
    idle = {"iops": 0.0, "total_ios": 0, "clat_ns": {"mean": 0.0}}
    job = {
        "jobname": "bench",
        "error": 0,
        "usr_cpu": 3.5,
        "sys_cpu": 20.25,
        "read": active if rw == "randread" else idle,
        "write": active if rw == "randwrite" else idle,
    }
    return {"fio version": "fio-3.33", "jobs": [job]}


@pytest.mark.parametrize("rw", ["randread", "randwrite"])
def test_parse_fio_takes_the_section_of_the_workload(rw: str) -> None:
    res = an.parse_fio(fio_doc(rw, 2216.5, 11083, 285_000, 301_500.0), rw)
    assert res.iops == 2216.5
    assert res.total_ios == 11083
    assert res.clat_median_us == 285.0
    assert res.clat_mean_us == 301.5
    assert res.fio_usr_cpu + res.fio_sys_cpu == 23.75
    assert res.errors == 0


def test_parse_fio_without_percentiles_and_without_jobs() -> None:
    doc = fio_doc("randread", 10.0, 50, 1000, 2000.0)
    del doc["jobs"][0]["read"]["clat_ns"]["percentile"]
    assert an.parse_fio(doc, "randread").clat_median_us is None
    with pytest.raises(ValueError):
        an.parse_fio({"jobs": []}, "randread")


def test_extract_json_skips_warnings_before_the_document() -> None:
    doc = fio_doc("randread", 1.0, 1, 1, 1.0)
    text = "fio: some warning\nnote: both iodepth >= 1 and synchronous I/O engine\n"
    text += json.dumps(doc, indent=2) + "\ntrailing"
    assert an.extract_json(text) == doc
    with pytest.raises(ValueError):
        an.extract_json("no json here")


def test_proc_stat_fields_with_a_hostile_command_name() -> None:
    # pid (comm) state ppid ... utime(14) stime(15) cutime(16) cstime(17) ...
    fields = ["S", "77"] + [str(i) for i in range(5, 14)] + ["120", "30", "7", "3"] + ["0"] * 30
    stat = "1234 (we) ird (name)) " + " ".join(fields)
    assert an.cpu_ticks_from_stat(stat) == (150, 10)
    assert an.ppid_from_stat(stat) == 77


def test_pss_from_smaps_rollup() -> None:
    text = (
        "55d0-7ffd ---p 00000000 00:00 0  [rollup]\n"
        "Rss:               25600 kB\nPss:               25311 kB\nPss_Anon: 20000 kB\n"
    )
    assert an.pss_kib_from_rollup(text) == 25311
    with pytest.raises(ValueError):
        an.pss_kib_from_rollup("Rss: 1 kB\n")


def test_median_ratio_geomean() -> None:
    assert an.median([3.0, None, 1.0, 2.0]) == 2.0
    assert an.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert an.median([None]) is None
    assert an.ratio(3.0, 4.0) == 0.75
    assert an.ratio(None, 4.0) is None and an.ratio(1.0, 0.0) is None
    assert an.geomean([0.5, 2.0]) == pytest.approx(1.0)
    assert an.geomean([1.0, 8.0, None]) == pytest.approx(math.sqrt(8))
    assert an.geomean([]) is None
    assert an.geomean([0.0, 4.0]) == 0.0


def test_matrix_and_alternating_order() -> None:
    cells = an.matrix()
    assert len(cells) == 32 and len(set(cells)) == 32
    assert an.Cell.from_key(cells[5].key) == cells[5]
    orders = [an.session_order(r, slot) for r in range(2) for slot in range(8)]
    # Each (backend, queues) slot swaps the order from one round to the next, and within
    # a round each daemon goes first equally often.
    assert all(orders[i] != orders[i + 8] for i in range(8))
    assert all(o in (("qsd", "vexport"), ("vexport", "qsd")) for o in orders)
    assert sum(o[0] == "qsd" for o in orders[:8]) == 4
    # A round with a single slot still swaps the order from round to round.
    assert [an.session_order(r, 0)[0] for r in range(4)] == ["qsd", "vexport"] * 2


def test_daemon_and_fio_arguments() -> None:
    args = an.daemon_args("native", "vx0", 2)
    assert args[0] == "--blockdev" and "aio=native" in args[1] and "cache.direct=on" in args[1]
    assert args[3].endswith("name=vx0,writable=on,num-queues=2")
    assert "driver=host_device,filename=/dev/nullb0" in an.blockdev_arg("nullb")
    with pytest.raises(ValueError):
        an.blockdev_arg("nbd")
    fio = an.fio_args("/dev/vda", "randwrite", 32, 2, 5)
    assert "--iodepth=32" in fio and "--numjobs=2" in fio and "--runtime=5" in fio
    assert "--cpus_allowed_policy=split" in fio
    assert "--cpus_allowed_policy=split" not in an.fio_args("/dev/vda", "randread", 1, 1, 5)


def sample(cell: str, daemon: str, rnd: int, iops: float, **kw: object) -> dict:
    base = {
        "cell": cell,
        "daemon": daemon,
        "round": rnd,
        "iops": iops,
        "clat_median_us": 1e6 / iops,
        "clat_mean_us": 1e6 / iops,
        "cpu_s_per_kio": 0.1,
        "pss_idle_mib": 7.0,
        "pss_load_mib": 8.0,
    }
    base.update(kw)
    return base


def test_summarise_medians_ratios_worst_and_failures() -> None:
    a, b, c = "null/q1/randread/d1", "null/q1/randread/d32", "nullb/q2/randwrite/d32"
    samples = [
        sample(a, "qsd", 0, 2000), sample(a, "qsd", 1, 2200), sample(a, "qsd", 2, 1000),
        sample(a, "vexport", 0, 1000), sample(a, "vexport", 1, 3000), sample(a, "vexport", 2, 1600),
        sample(b, "qsd", 0, 20000), sample(b, "vexport", 0, 10000),
        sample(c, "qsd", 0, 10000),
        {"cell": c, "daemon": "vexport", "round": 0, "error": "daemon exited with status 1"},
    ]  # fmt: skip
    s = an.summarise(samples)
    ca = s["cells"][a]
    assert ca["qsd"]["iops"] == 2000 and ca["vexport"]["iops"] == 1600
    assert ca["ratio"] == pytest.approx(0.8)
    assert ca["vexport"]["iops_samples"] == [1000, 3000, 1600]
    assert s["cells"][b]["ratio"] == pytest.approx(0.5)
    cc = s["cells"][c]
    assert cc["vexport"]["failed"] == 1 and cc["ratio"] == 0.0
    assert cc["vexport"]["errors"] == ["daemon exited with status 1"]
    assert s["worst_cell"] == c and s["worst_ratio"] == 0.0
    assert s["geomean"] == 0.0  # a failed cell drags the geometric mean to zero
    assert s["geomean_without_failed"] == pytest.approx(math.sqrt(0.8 * 0.5))
    assert list(s["cells"]) == [a, b, c]  # matrix order: backend, queues, rw, depth
    skipped = {"cell": c, "daemon": "vexport", "round": 1, "error": "not run: fio hung on x"}
    s2 = an.summarise([*samples, skipped])
    assert s2["cells"][c]["vexport"]["failed"] == 1
    assert s2["cells"][c]["vexport"]["not_run"] == 1
    ok = an.summarise([x for x in samples if x["cell"] != c])
    assert ok["geomean"] == pytest.approx(math.sqrt(0.8 * 0.5))
    assert ok["worst_cell"] == b


def test_format_table_lists_every_cell_and_the_totals() -> None:
    a, b = "null/q1/randread/d1", "native/q2/randwrite/d32"
    s = an.summarise(
        [sample(a, "qsd", 0, 2000), sample(a, "vexport", 0, 1500),
         sample(b, "qsd", 0, 16000), sample(b, "vexport", 0, 8000)]
    )  # fmt: skip
    text = an.format_table(s)
    lines = text.splitlines()
    assert lines[0].split()[:1] == ["cell"] and set(lines[1]) <= {"-", " "}
    row_a = next(line for line in lines if line.startswith("null-co q1 read d1"))
    assert "2000" in row_a and "1500" in row_a and "0.75" in row_a and "500" in row_a
    row_b = next(line for line in lines if line.startswith("file aio=native q2 write d32"))
    assert "0.50" in row_b and "63" not in row_b  # no latency column at depth 32
    assert f"{math.sqrt(0.75 * 0.5):.3f}" in text
    assert "worst cell: file aio=native q2 write d32: 0.500" in text


def test_collapsed_stack_report_shares():
    text = "\n".join(
        [
            'process 10:"vexport";thread (0x1);run (cli.py:5);on_kick (blk.py:9);'
            "parse (blk.py:20) 6",
            'process 10:"vexport";thread (0x1);run (cli.py:5);on_kick (blk.py:9) 2',
            'process 11:"vexport-q1";thread (0x2);run (cli.py:5);run (cli.py:5) 2',
            "garbage line",
        ]
    )
    report = an.collapsed_stack_report(text, top=10)
    lines = report.splitlines()
    assert lines[0] == "10 samples"
    assert '   80.0%  process 10:"vexport"' in lines
    assert '   20.0%  process 11:"vexport-q1"' in lines
    own = lines[lines.index("own time (leaf frame):") + 1 : lines.index("inclusive:")]
    assert own == [
        "   60.0%  parse (blk.py:20)",
        "   20.0%  on_kick (blk.py:9)",
        "   20.0%  run (cli.py:5)",
    ]
    incl = lines[lines.index("inclusive:") + 1 :]
    # run appears twice in one stack: counted once per stack, so 100%, not 120%
    assert incl[0] == "  100.0%  run (cli.py:5)"
    assert "   80.0%  on_kick (blk.py:9)" in incl
    assert an.collapsed_stack_report("") == "no samples\n"


STAT = (
    "4242 (fio worker) R 1 4242 4242 0 -1 4194304 10 0 0 0 150 50 0 0 20 0 1 0 100 "
    "1000 100 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0"
)


def test_task_sample_reads_comm_with_spaces_and_last_cpu() -> None:
    s = an.task_sample(STAT, "123456 7890 12\n")
    assert s == an.TaskSample("fio worker", 123456, 7890, 12, 1, utime=150, stime=50)


def test_task_groups() -> None:
    assert an.task_group("python3", daemon=True) == "daemon"
    assert an.task_group("fio", daemon=False) == "fio"
    assert an.task_group("kworker/1:2-events", daemon=False) == "kworker"
    assert an.task_group("ksoftirqd/0", daemon=False) == "ksoftirqd"
    assert an.task_group("bash", daemon=False) == "other"


def test_sched_report_shares_and_per_io() -> None:
    old = an.TaskSample("fio", 1_000_000_000, 0, 10, 0)
    new = an.TaskSample("fio", 1_500_000_000, 100_000_000, 1010, 0, utime=30, stime=10)
    born = an.TaskSample("kworker/0:1", 200_000_000, 0, 500, 1)
    report = an.sched_report(
        {1: ("fio", old)},
        {1: ("fio", new), 2: ("kworker", born)},
        seconds=1.0,
        ios=1000,
        cpus_before=[[0, 0, 0, 0, 0, 0, 0]],
        cpus_after=[[50, 0, 25, 25, 0, 0, 0]],
    )
    lines = report.splitlines()
    fio = next(line for line in lines if line.startswith("fio"))
    # 0.5 s of CPU in a 1 s window: 50%, 500 us per I/O; 100 us waiting; 1 slice per I/O
    # a quarter of its ticks in the kernel
    assert fio.split() == ["fio", "50.0", "500.0", "25%", "100.0", "1.00"]
    kw = next(line for line in lines if line.startswith("kworker"))
    assert kw.split()[1:4] == ["20.0", "200.0", "-"]  # started in the window: from 0
    assert "cpu0: user 50% nice 0% system 25% idle 25%" in report


def test_switch_cost_table_medians_and_difference() -> None:
    lines = [
        "thread 0 18.0", "proc 0 60.0", "proc 0 64.0", "thread 0 20.0", "thread 0 19.0",
        "proc 0 70.0", "thread 256 23.0", "proc 256 117.5",
    ]  # fmt: skip
    rows = an.switch_cost_table(lines).splitlines()
    assert rows[1].split() == ["0", "19.0", "64.0", "45.0"]
    assert rows[2].split() == ["256", "23.0", "117.5", "94.5"]
    assert an.switch_cost_table(["proc 16 5.0"]).splitlines()[1].split() == ["16", "-", "5.0", "-"]
