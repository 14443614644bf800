"""Interrupt steering: keep a queue's interrupt work off the CPU that serves the queue.

Theory of operation
-------------------
VDUSE does not interrupt the driver itself: each VDUSE_VQ_INJECT_IRQ queues a work item
that runs the driver's callback (virtio_blk's completion, which wakes the submitter) on
a CPU of the virtqueue's ``irq_cb_affinity`` mask, round-robin over the mask.  The
virtio driver sets that mask; for a device with one queue it holds every CPU.

A device that polls (vduse_device.py, ``_poll``) keeps its CPU busy.  When the work item
lands on that CPU, it and the submitter it wakes preempt the device, and the device's
ioctl returns only after they ran: measured in the test guest at depth 1 (null-co, one
queue, the daemon pinned for the measurement), the ioctl took 250 us with the interrupt
work on the daemon's CPU, 92 us with it on the other CPU, and 186 us round-robin over
both (the default), for 1515 / 1906 / 1593 IOPS.

So each process that serves queues rewrites their masks to the driver's mask without
the CPU it runs on, when that leaves any CPU (a queue whose mask is that one CPU, as
with one queue per CPU, keeps it).  It looks at its CPU when a poll begins and every
``RECHECK`` requests served in a poll, and writes only when the wanted mask changes.
The driver's mask is read the first time a queue is seen after it starts.  The file
needs Linux 6.8 and root; where it is missing or refused, steering turns itself off.
``VEXPORT_IRQ_STEER=0`` turns it off too.

A process that stops serving its queues while the device stays (the daemon stopped with
the driver attached, a worker told to stop) writes the driver's masks back (`restore`),
so that the next daemon reads the driver's mask.  After ``kill -9`` nothing restores
them: a daemon restarted then reads the previous daemon's mask as the driver's, and can
only narrow it further, never widen it back.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable

log = logging.getLogger("vexport.vduse")

RECHECK = 256  # requests served in one poll between two looks at the current CPU

CpuSet = frozenset[int]


class IrqSteering:
    def __init__(
        self,
        read_mask: Callable[[int], CpuSet],
        write_mask: Callable[[int, CpuSet], None],
        current_cpu: Callable[[], int],
        enabled: bool = True,
    ) -> None:
        self._read = read_mask
        self._write = write_mask
        self._current_cpu = current_cpu
        self.enabled = enabled
        self._driver: dict[int, CpuSet] = {}  # queue index -> the driver's mask
        self._written: dict[int, CpuSet] = {}  # queue index -> the mask last written
        self._cpu = -1  # the CPU the masks were last steered for

    def forget(self, index: int) -> None:
        """Queue ``index`` (re)started: read the driver's mask again next time."""
        self._driver.pop(index, None)
        self._written.pop(index, None)
        self._cpu = -1

    def steer(self, indices: Iterable[int]) -> None:
        """Steer the masks of the queues ``indices`` (served by this process) off the
        CPU this process runs on now."""
        if not self.enabled:
            return
        cpu = self._current_cpu()
        if cpu == self._cpu or cpu < 0:
            return
        self._cpu = cpu
        for index in indices:
            try:
                driver = self._driver.get(index)
                if driver is None:
                    driver = self._driver[index] = self._read(index)
                want = driver - {cpu} or driver
                if want != self._written.get(index, driver):
                    self._write(index, want)
                    self._written[index] = want
            except (OSError, ValueError) as e:
                log.info("interrupt steering is off: queue %d's irq_cb_affinity: %s", index, e)
                self.enabled = False
                return

    def restore(self) -> None:
        """Write the driver's mask back where this process changed it (it stops serving
        its queues and the device may stay); errors are ignored."""
        for index, written in list(self._written.items()):
            driver = self._driver.get(index)
            if driver is not None and written != driver:
                with contextlib.suppress(OSError, ValueError):
                    self._write(index, driver)
        self._written.clear()
        self._cpu = -1
