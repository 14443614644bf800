"""Interrupt steering (vexport/exports/irq_steering.py) and the sysfs cpumask format."""

from __future__ import annotations

import pytest

from vexport.exports.irq_steering import IrqSteering
from vexport.kernel.vduse import format_cpumask, parse_cpumask


class FakeSysfs:
    def __init__(self, masks: dict[int, frozenset[int]]) -> None:
        self.masks = dict(masks)
        self.reads: list[int] = []
        self.writes: list[tuple[int, frozenset[int]]] = []
        self.fail: Exception | None = None
        self.fail_write = False

    def read(self, index: int) -> frozenset[int]:
        if self.fail is not None:
            raise self.fail
        self.reads.append(index)
        return self.masks[index]

    def write(self, index: int, cpus: frozenset[int]) -> None:
        if self.fail_write:
            raise OSError(22, "Invalid argument")
        self.writes.append((index, cpus))
        self.masks[index] = cpus


def make(masks: dict[int, frozenset[int]], cpu: list[int]) -> tuple[IrqSteering, FakeSysfs]:
    fs = FakeSysfs(masks)
    return IrqSteering(fs.read, fs.write, lambda: cpu[0]), fs


def test_steers_off_the_current_cpu_and_follows_it():
    cpu = [1]
    steering, fs = make({0: frozenset({0, 1, 2, 3})}, cpu)
    steering.steer([0])
    assert fs.writes == [(0, frozenset({0, 2, 3}))]
    steering.steer([0])  # same CPU: nothing to do, not even a read
    assert len(fs.writes) == 1 and fs.reads == [0]
    cpu[0] = 3
    steering.steer([0])  # moved: steer from the driver's mask, not the written one
    assert fs.writes[-1] == (0, frozenset({0, 1, 2}))
    assert fs.reads == [0]


def test_a_mask_of_only_this_cpu_is_kept():
    cpu = [0]
    steering, fs = make({0: frozenset({0}), 1: frozenset({1})}, cpu)
    steering.steer([0, 1])
    # queue 1's mask does not hold CPU 0: nothing to change there either
    assert fs.writes == []
    cpu[0] = 1
    steering.steer([0, 1])
    assert fs.writes == []


def test_back_to_the_drivers_mask_when_it_no_longer_needs_narrowing():
    cpu = [0]
    steering, fs = make({0: frozenset({0, 1})}, cpu)
    steering.steer([0])
    assert fs.masks[0] == frozenset({1})
    cpu[0] = 5  # a CPU outside the driver's mask: the driver's mask as it was
    steering.steer([0])
    assert fs.masks[0] == frozenset({0, 1})


def test_forget_reads_the_drivers_mask_again():
    cpu = [0]
    steering, fs = make({0: frozenset({0, 1})}, cpu)
    steering.steer([0])
    fs.masks[0] = frozenset({0, 1, 2})  # the driver set it again (queue restarted)
    steering.forget(0)
    steering.steer([0])
    assert fs.reads == [0, 0]
    assert fs.masks[0] == frozenset({1, 2})


@pytest.mark.parametrize("error", [FileNotFoundError(2, "no such file"), PermissionError(13, "no")])
def test_turns_itself_off_when_the_file_cannot_be_used(error):
    cpu = [0]
    steering, fs = make({0: frozenset({0, 1})}, cpu)
    fs.fail = error
    steering.steer([0])
    assert not steering.enabled
    fs.fail = None
    cpu[0] = 1
    steering.steer([0])
    assert fs.reads == [] and fs.writes == []


def test_disabled_and_unknown_cpu_do_nothing():
    fs = FakeSysfs({0: frozenset({0, 1})})
    IrqSteering(fs.read, fs.write, lambda: 0, enabled=False).steer([0])
    IrqSteering(fs.read, fs.write, lambda: -1).steer([0])
    assert fs.reads == [] and fs.writes == []


@pytest.mark.parametrize(
    "text,cpus",
    [
        ("3\n", {0, 1}),
        ("1", {0}),
        ("0", set()),
        ("00000001,00000000\n", {32}),
        ("80000000,00000001", {0, 63}),
        ("ff", set(range(8))),
    ],
)
def test_cpumask_parse(text, cpus):
    assert parse_cpumask(text) == cpus
    assert parse_cpumask(format_cpumask(frozenset(cpus))) == cpus


def test_cpumask_format_groups_of_32_bits():
    assert format_cpumask(frozenset({0, 1})) == "3"
    assert format_cpumask(frozenset({32})) == "1,00000000"
    assert format_cpumask(frozenset({0, 64})) == "1,00000000,00000001"


def test_restore_writes_the_drivers_masks_back():
    cpu = [0]
    steering, fs = make({0: frozenset({0, 1}), 1: frozenset({0, 2}), 2: frozenset({3})}, cpu)
    steering.steer([0, 1, 2])
    assert fs.masks == {0: frozenset({1}), 1: frozenset({2}), 2: frozenset({3})}
    fs.writes.clear()
    steering.restore()
    assert sorted(fs.writes) == [(0, frozenset({0, 1})), (1, frozenset({0, 2}))]
    fs.writes.clear()
    steering.restore()  # nothing changed since
    assert fs.writes == []
    steering.steer([0])  # steers again after a restore (same CPU as before)
    assert fs.writes == [(0, frozenset({1}))]


def test_restore_ignores_errors():
    cpu = [0]
    steering, fs = make({0: frozenset({0, 1})}, cpu)
    steering.steer([0])
    fs.fail_write = True
    steering.restore()  # no exception
    assert fs.masks[0] == frozenset({1}) and steering.enabled
