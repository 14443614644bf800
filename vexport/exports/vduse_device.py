"""A VDUSE device in the asyncio event loop, independent of the device type.

Theory of operation (see /usr/include/linux/vduse.h and docs/design.md)
------------------------------------------------------------------------
``VduseDevice.create`` opens ``/dev/vduse/control``, sets API version 0 and creates the
device (CREATE_DEV with the virtio config space), opens ``/dev/vduse/NAME`` non-blocking
and VQ_SETUPs every queue with its maximum size, so that ``vdpa dev add`` can attach it.

The device fd carries control messages.  It is registered with the loop; each readable
event drains every pending message and answers each one at once, in the loop thread,
without waiting for anything (a message unanswered for ``msg_timeout`` seconds breaks
the device for good).  A handler that fails answers VDUSE_REQ_RESULT_FAILED.

* SET_STATUS: the virtio status byte.  DRIVER_OK (newly set) starts the queues: for each
  ready queue VQ_GET_INFO gives its size, ring IOVAs and avail index; a `SplitQueue`
  is built over the device memory and an eventfd is attached with VQ_SETUP_KICKFD.
  Status 0 is a reset: queues stop (requests still in flight complete into nothing),
  the memory cache is dropped.
* GET_VQ_STATE: answer the queue's last avail index.
* UPDATE_IOTLB: forget cached regions overlapping [start, last].

Memory: a `RegionMemory` whose fault handler asks the kernel for the region holding an
IOVA (IOTLB_GET_FD) and mmaps it (MAP_SHARED, at the entry's offset).  Regions are
cached until an UPDATE_IOTLB or a reset removes them; a removed mmap is closed as soon
as no request holds a view into it.

The type-specific part (virtio-blk) sees `on_kick(queue)` calls and completes requests
with `VduseQueue.complete(head, used_len)`, which only collects them; at the end of the
batch (the completion batch hook, in the loop iteration in which the requests
completed) `flush_notifications` pushes each queue's collection to its used ring at once
and injects one interrupt per queue where `SplitQueue.should_notify` says one is due
(EVENT_IDX honoured).

Queues beyond the first are served by forked worker processes when ``workers`` is set
(vexport/exports/queue_worker.py): the daemon builds the queue as above, forks, and from
then on only forwards to the worker what concerns it (IOTLB invalidations, GET_VQ_STATE,
resets and stops), waiting for each answer before it answers the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import mmap
import os
import socket
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from vexport import native
from vexport.exports import queue_worker
from vexport.exports.inflight_log import InflightLog, LogConfig, QueueLog
from vexport.exports.irq_steering import RECHECK, IrqSteering
from vexport.exports.native_poll import NativePoll
from vexport.io import completions
from vexport.kernel import vduse as kv
from vexport.kernel.process import current_cpu
from vexport.virtio.memory import PERM_READ, PERM_RW, PERM_WRITE, RegionMemory
from vexport.virtio.virtqueue import DescriptorChain, SplitQueue, used_ring_size

log = logging.getLogger("vexport.vduse")

VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_NOTIFY_ON_EMPTY = 24
# 300 measured best in the guest (bench/README.md, "what helped").  (Polling was off for
# a while because of guest-tier failures seen with it on; they came from ring indices
# stored with struct.pack_into, which zeroes a field before writing it: see virtqueue.py.
# Polling made them likelier, as the driver then reads the ring while the device writes.)
POLL_SPINS = 300
# When there is a polling process on every CPU, poll only after kicks that brought few
# requests (a driver waiting for each answer, low queue depth), so that the pollers do
# not take every CPU from the driver's submitters: measured, two queues on two CPUs at
# depth 32 lost 4% polling after every kick.  With fewer pollers than CPUs, poll after
# every kick: a deep queue then keeps its poller finding work, without kicks, eventfd
# reads and wake-ups (one queue at depth 32: +3-12%; bench/README.md).
POLL_MAX_BATCH = 4
POLL_ANY_BATCH = 1 << 16


NATIVE_DEEP_LIMIT = 4
# A poll gives the event loop a turn after serving this many requests (the Python
# loop: passes) even if the driver keeps it busy: nothing else runs in the process's
# event loop meanwhile, and a queue worker must answer the daemon's messages (an IOTLB
# invalidation) within queue_worker.ANSWER_TIMEOUT.  Then it goes on (_resume_poll).
POLL_BUDGET = 4096


def poll_max_batch(pollers: int, cpus: int) -> int:
    """The largest kick batch after which a device polls (see POLL_MAX_BATCH)."""
    return POLL_ANY_BATCH if pollers < cpus else POLL_MAX_BATCH


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset and cpusets count)."""
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1


class DeviceType(Protocol):
    """What the device-type code (virtio-blk) provides to the device shell."""

    def on_kick(self, queue: VduseQueue) -> None: ...

    def on_queues_stopped(self) -> None: ...

    def on_resubmit(self, queue: VduseQueue, chains: list[DescriptorChain]) -> None:
        """Requests a previous daemon had taken but not completed (reconnect)."""
        ...

    # In a queue worker (vexport/exports/queue_worker.py):
    def after_fork(self) -> None:
        """Forget the daemon's event loop and engines (the worker has its own)."""
        ...

    def on_capacity(self, length: int) -> None:
        """The daemon resized the node to ``length`` bytes."""
        ...

    def stop_serving(self) -> None:
        """Pop nothing more (the worker is stopping)."""
        ...

    async def drain(self) -> None:
        """Wait until every request popped so far has completed."""
        ...


class VduseQueue:
    """One virtqueue of the device: its ring (while running) and its kick eventfd."""

    def __init__(self, device: VduseDevice, index: int, max_size: int) -> None:
        self.device = device
        self.index = index
        self.max_size = max_size
        self.vq: SplitQueue | None = None
        self.kick_fd = -1
        self.generation = 0  # bumped at every stop: completions of older ones are dropped
        self.broken = False
        self.completed: list[tuple[int, int]] = []  # (head, used length) not pushed yet
        self.saved_avail_idx = 0
        self.log: QueueLog | None = None
        self.worker: queue_worker.WorkerHandle | None = None  # served by a worker process
        # Free for the device type: what it looked up for this queue (the data path
        # checks it against ``generation``).
        self.type_data: Any = None
        self.native: NativePoll | None = None  # the compiled poll's state (native_poll.py)

    @property
    def running(self) -> bool:
        return self.vq is not None and not self.broken

    def complete(self, generation: int, head: int, used_len: int) -> None:
        """A request popped in ``generation`` finished: collect it for the used ring
        (pushed with the rest of the batch by `flush`)."""
        if generation != self.generation or self.vq is None:
            return  # the queue was reset meanwhile: the driver forgot the request
        completed = self.completed
        completed.append((head, used_len))
        if len(completed) == 1:  # the first of the batch: have the batch flushed
            self.device.schedule_notify(self)

    def flush(self) -> bool:
        """Push the collected completions (used->idx written once), record them in the
        in-flight log; True if the driver is due an interrupt."""
        done, self.completed = self.completed, []
        vq = self.vq
        if vq is None or not done:
            return False
        # A ValueError here (a head completed twice: a vexport bug) leaves the log
        # behind the ring, which recovery repairs from the used ring.
        vq.push_batch(done)
        log = self.log
        if log is not None:
            log.completed_batch(done, vq.used_idx)
        return vq.should_notify()


class DeviceConfigMismatch(Exception):
    """A device of that name exists with another configuration."""


class DeviceBusy(Exception):
    """A device of that name exists and cannot be taken over."""


class VduseDevice:
    """A created (or reattached) VDUSE device served in the running event loop."""

    def __init__(
        self,
        name: str,
        control: kv.VduseControl,
        dev: kv.VduseDeviceFd,
        num_queues: int,
        queue_size: int,
        device_type: DeviceType,
        log: InflightLog | None = None,
        workers: bool = False,
    ) -> None:
        self.name = name
        # Queues beyond the first served by worker processes (see queue_worker.py).
        self.workers = workers
        self.is_worker = False
        self.log = log
        self.reattached = False
        self.control = control
        self.dev = dev
        self.device_type = device_type
        self.queues = [VduseQueue(self, i, queue_size) for i in range(num_queues)]
        if log is not None:
            for queue, qlog in zip(self.queues, log.queues, strict=True):
                queue.log = qlog
        self.status = 0
        self.features = 0
        self.memory = RegionMemory(fault=self._fault)
        # Mappings removed from the memory, closed once no request holds a view into them.
        self.retired: list[mmap.mmap] = []
        # Compiled polls of stopped queues with requests still out (native_poll.py).
        self.native_retiring: list[NativePoll] = []
        self._mmaps: dict[int, mmap.mmap] = {}  # region start -> mapping
        self._notify_pending: list[VduseQueue] = []
        self._notify_scheduled = False
        self._loop = asyncio.get_running_loop()
        self._closed = False
        # Empty looks at the avail rings before sleeping (see _poll); 0 disables.
        self.poll_spins = int(os.environ.get("VEXPORT_POLL_SPINS", str(POLL_SPINS)))
        # Poll after a kick that brought at most this many requests (poll_max_batch):
        # one polling process per queue with workers, else this one.
        pollers = num_queues if workers else 1
        cpus = usable_cpus()
        self.poll_max_batch = int(
            os.environ.get("VEXPORT_POLL_MAX_BATCH", poll_max_batch(pollers, cpus))
        )
        # sched_yield between empty looks: the driver's thread may share this CPU.
        self.poll_yield = os.environ.get("VEXPORT_POLL_YIELD", "1") == "1"
        self.poll_budget = max(1, int(os.environ.get("VEXPORT_POLL_BUDGET", str(POLL_BUDGET))))
        self._poll_spent = False  # the current poll used its budget
        # The compiled poll (native_poll.py) injects interrupts itself through a real
        # device fd; with the fake kernel of the tests it has _poll inject them.
        self.native_interrupts = type(dev) is kv.VduseDeviceFd
        # With fewer polling processes than CPUs (one queue), a driver with more than
        # this many requests out is served by the Python loop: measured at null-co q1
        # d32, the C loop's interrupt per request (the driver adds its burst one entry
        # at a time) cost a third of the IOPS (bench/README.md).  0: no limit.  For
        # null-co only (NativePoll.setup).
        self.native_deep_limit = int(
            os.environ.get(
                "VEXPORT_NATIVE_DEEP",
                str(NATIVE_DEEP_LIMIT if pollers < cpus else 0),
            )
        )
        # The queues' interrupt work kept off the CPU that polls them (irq_steering.py).
        self.irq_steering = IrqSteering(
            lambda index: kv.read_irq_affinity(self.name, index),
            lambda index, cpus: kv.write_irq_affinity(self.name, index, cpus),
            current_cpu,
            enabled=os.environ.get("VEXPORT_IRQ_STEER", "1") != "0",
        )

    # -- creation -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        name: str,
        *,
        device_id: int,
        features: int,
        config: bytes,
        num_queues: int,
        queue_size: int,
        device_type: DeviceType,
        log_config: LogConfig | None = None,
        log_path: str | None = None,
        open_control: Callable[[], kv.VduseControl] = kv.VduseControl.open,
        workers: bool = False,
    ) -> VduseDevice:
        """Create the device, or reattach to it if it exists and ``log_path`` holds a
        matching in-flight log (a previous daemon died or left it attached)."""
        control = open_control()
        log: InflightLog | None = None
        created = False
        try:
            control.set_api_version(kv.VDUSE_API_VERSION)
            try:
                control.create_dev(
                    name,
                    device_id=device_id,
                    features=features,
                    vq_num=num_queues,
                    vq_align=mmap.PAGESIZE,
                    config=config,
                )
                created = True
            except FileExistsError:
                if log_path is None or log_config is None:
                    raise
                log = cls._open_log_for_reattach(name, log_path, log_config)
            try:
                dev = kv.VduseDeviceFd.open(name)
            except OSError as e:
                if e.errno == errno.EBUSY:
                    raise DeviceBusy(f"VDUSE device '{name}' is open in another process") from None
                raise
            try:
                if created:
                    for index in range(num_queues):
                        dev.vq_setup(index, queue_size)
                    if log_path is not None and log_config is not None:
                        log = InflightLog.create(log_path, log_config)
            except BaseException:
                dev.close()
                raise
        except BaseException:
            if log is not None:
                log.close()
            if created:
                with contextlib.suppress(OSError):
                    control.destroy_dev(name)
            control.close()
            raise
        device = cls(name, control, dev, num_queues, queue_size, device_type, log, workers)
        completions.add_hook(device.flush_notifications)
        if not created:
            device.reattach()
        device._loop.add_reader(dev.fd, device._on_control)
        return device

    @staticmethod
    def _open_log_for_reattach(name: str, path: str, config: LogConfig) -> InflightLog:
        try:
            log = InflightLog.open_existing(path)
        except FileNotFoundError:
            raise DeviceBusy(
                f"a VDUSE device named '{name}' already exists and there is no in-flight "
                f"log at {path} to resume it from (another daemon may be serving it)"
            ) from None
        except ValueError as e:
            raise DeviceBusy(f"VDUSE device '{name}' exists but its log {path}: {e}") from None
        if log.config != config:
            old = log.config
            log.close()
            raise DeviceConfigMismatch(
                f"VDUSE device '{name}' exists with a different configuration "
                f"(num-queues={old.num_queues}, queue-size={old.queue_size}, "
                f"logical-block-size={old.block_size}, size={old.capacity}, "
                f"features=0x{old.features:x}); restart with the same options, or detach "
                "and destroy it first"
            )
        return log

    def reattach(self) -> None:
        """Resume a device a previous daemon served: rebuild the running queues from
        the kernel (VQ_GET_INFO) and the in-flight log, then resubmit what was in flight."""
        self.reattached = True
        self.features = self.dev.get_features()
        infos = [self.dev.vq_get_info(q.index) for q in self.queues]
        if not any(info.ready for info in infos):
            log.info("%s: reattached to a device that is not running", self.name)
            if self.log is not None:
                for q in self.log.queues:
                    q.clear()
            return
        self.status = (
            VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK
        )
        self.start_queues(infos)
        for queue in self.queues:
            if queue.vq is not None or queue.worker is not None:
                # A completion may have reached the ring before the old daemon could
                # interrupt the driver: one spurious interrupt is harmless.
                with contextlib.suppress(OSError):
                    self.dev.vq_inject_irq(queue.index)
        log.info("%s: reattached to a running device", self.name)

    # -- control messages -------------------------------------------------------------
    def _on_control(self) -> None:
        while not self._closed:
            try:
                request = self.dev.read_request()
            except OSError as e:
                log.error("%s: reading a control message failed: %s", self.name, e)
                return
            if request is None:
                return
            self.handle_request(request)

    def handle_request(self, request: kv.VduseRequest) -> None:
        """Answer one control message; never leaves it unanswered."""
        result = kv.VDUSE_REQ_RESULT_OK
        vq_state: tuple[int, int] | None = None
        try:
            if request.type == kv.VDUSE_SET_STATUS:
                assert isinstance(request.payload, int)
                self._set_status(request.payload)
            elif request.type == kv.VDUSE_GET_VQ_STATE:
                assert isinstance(request.payload, int)
                vq_state = (request.payload, self.avail_index(request.payload))
            elif request.type == kv.VDUSE_UPDATE_IOTLB:
                assert isinstance(request.payload, tuple)
                self.invalidate_range(int(request.payload[0]), int(request.payload[1]))
            else:
                log.warning("%s: unknown control message type %d", self.name, request.type)
                result = kv.VDUSE_REQ_RESULT_FAILED
        except Exception:
            log.exception("%s: handling control message %r failed", self.name, request)
            result = kv.VDUSE_REQ_RESULT_FAILED
        try:
            self.dev.write_response(request.request_id, result, vq_state)
        except OSError as e:
            log.error("%s: answering control message failed: %s", self.name, e)

    def avail_index(self, index: int) -> int:
        if not 0 <= index < len(self.queues):
            raise ValueError(f"no queue {index}")
        queue = self.queues[index]
        if queue.worker is not None:
            return int(self._ask(queue, b"avail"))
        if queue.vq is not None:
            return queue.vq.last_avail_idx
        return queue.saved_avail_idx

    def _set_status(self, status: int) -> None:
        old, self.status = self.status, status
        log.debug("%s: status 0x%x -> 0x%x", self.name, old, status)
        if status == 0:
            self.stop_queues(reset=True)
        elif status & VIRTIO_CONFIG_S_DRIVER_OK and not old & VIRTIO_CONFIG_S_DRIVER_OK:
            self.start_queues()

    # -- queues -----------------------------------------------------------------------
    def start_queues(self, infos: list[kv.VqInfo] | None = None) -> None:
        self.features = self.dev.get_features()
        if self.log is not None:
            self.log.write_header(self.features)
        started: list[tuple[VduseQueue, list[int]]] = []
        for queue in self.queues:
            if queue.vq is not None or queue.worker is not None:
                continue  # already running (a re-queued DRIVER_OK after a reattach)
            info = infos[queue.index] if infos else self.dev.vq_get_info(queue.index)
            if not info.ready:
                continue
            resubmit = self._start_queue(queue, info, recover=self.reattached)
            if resubmit is not None:
                started.append((queue, resubmit))
        for queue, resubmit in started:
            if self.workers and queue.index > 0:
                self._start_worker(queue, resubmit)
            else:
                self.serve_started_queue(queue, resubmit)

    def _start_queue(self, queue: VduseQueue, info: kv.VqInfo, recover: bool) -> list[int] | None:
        """Build the queue's ring and kick fd; with ``recover``, resume from the in-flight
        log.  Returns the heads to resubmit, or None if the queue cannot start (broken)."""
        event_idx = bool(self.features >> VIRTIO_RING_F_EVENT_IDX & 1)
        indirect = bool(self.features >> VIRTIO_RING_F_INDIRECT_DESC & 1)
        notify_on_empty = bool(self.features >> VIRTIO_F_NOTIFY_ON_EMPTY & 1)
        resubmit: list[int] = []
        try:
            last_avail = info.avail_index
            if recover and queue.log is not None:
                resubmit, last_avail = self._recover(queue, info)
            queue.vq = SplitQueue(
                self.memory,
                info.num,
                info.desc_addr,
                info.driver_addr,
                info.device_addr,
                event_idx=event_idx,
                indirect=indirect,
                notify_on_empty=notify_on_empty,
                last_avail_idx=last_avail,
            )
        except Exception as e:
            log.error("%s: queue %d cannot be started: %s", self.name, queue.index, e)
            queue.broken = True
            return None
        queue.broken = False
        queue.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.dev.vq_setup_kickfd(queue.index, queue.kick_fd)
        log.debug(
            "%s: queue %d started: size %d, avail idx %d, %d to resubmit",
            self.name,
            queue.index,
            info.num,
            last_avail,
            len(resubmit),
        )
        return resubmit

    def serve_started_queue(self, queue: VduseQueue, resubmit: list[int]) -> None:
        """Serve a started queue in this process (the daemon, or the queue's worker)."""
        self.irq_steering.forget(queue.index)
        self._loop.add_reader(queue.kick_fd, self._on_kick, queue)
        if resubmit:
            self._resubmit(queue, resubmit)
        # Requests may have been made available before the kick fd existed.
        self._loop.call_soon(self._on_kick, queue)

    # -- worker processes (queue_worker.py) ----------------------------------------------
    def _start_worker(self, queue: VduseQueue, resubmit: list[int]) -> None:
        handle = queue_worker.spawn(self, queue, resubmit)
        # The worker owns the ring and the kick fd now.
        queue.worker = handle
        assert queue.vq is not None
        queue.vq.release()
        queue.vq = None
        os.close(queue.kick_fd)
        queue.kick_fd = -1
        self._loop.add_reader(handle.sock.fileno(), self._on_worker_event, queue)
        log.info("%s: queue %d served by worker process %d", self.name, queue.index, handle.pid)

    def _on_worker_event(self, queue: VduseQueue) -> None:
        """The worker's socket is readable outside a request: it died."""
        handle = queue.worker
        if handle is None:
            return
        try:
            data = handle.sock.recv(256, socket.MSG_DONTWAIT | socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            handle.sock.recv(256, socket.MSG_DONTWAIT)  # a late answer: drop it
            return
        self._worker_lost(queue, f"the worker of queue {queue.index} (pid {handle.pid}) exited")

    def _worker_lost(self, queue: VduseQueue, reason: str, take_over: bool = True) -> None:
        """A worker died or stopped answering: kill it; with ``take_over``, serve its queue
        here (soon: not inside the control message being answered)."""
        handle = queue.worker
        if handle is None:
            return
        queue.worker = None
        queue.broken = True
        self._loop.remove_reader(handle.sock.fileno())
        status = handle.end(kill=True)
        log.error("%s: %s (wait status %s)", self.name, reason, status)
        if take_over:
            self._loop.call_soon(self._take_over, queue)

    def _take_over(self, queue: VduseQueue) -> None:
        """Serve in this process a queue whose worker is gone: resume from the kernel's
        ring addresses and the in-flight log, as a restarted daemon would, and serve
        again what the worker had taken and not completed."""
        if queue.vq is not None or queue.worker is not None:
            return  # restarted meanwhile (a reset and DRIVER_OK)
        if self._closed or not self.status & VIRTIO_CONFIG_S_DRIVER_OK or queue.log is None:
            log.error("%s: queue %d is not served any more", self.name, queue.index)
            return
        try:
            info = self.dev.vq_get_info(queue.index)
        except OSError as e:
            log.error("%s: queue %d cannot be taken over: %s", self.name, queue.index, e)
            return
        if not info.ready:
            return
        resubmit = self._start_queue(queue, info, recover=True)
        if resubmit is None:
            return
        log.warning("%s: queue %d now served by the daemon itself", self.name, queue.index)
        self.serve_started_queue(queue, resubmit)
        # The worker may have pushed completions it did not signal.
        with contextlib.suppress(OSError):
            self.dev.vq_inject_irq(queue.index)

    def _ask(
        self,
        queue: VduseQueue,
        message: bytes,
        timeout: float = queue_worker.ANSWER_TIMEOUT,
        take_over: bool = True,
    ) -> bytes:
        """One request to the queue's worker and its answer (WorkerGone: it is lost)."""
        assert queue.worker is not None
        try:
            return queue.worker.request(message, timeout)
        except queue_worker.WorkerGone as e:
            self._worker_lost(queue, str(e), take_over)
            raise

    def _stop_worker(self, queue: VduseQueue, reset: bool) -> None:
        handle = queue.worker
        if handle is None:
            return
        timeout = queue_worker.ANSWER_TIMEOUT if reset else queue_worker.DRAIN_TIMEOUT
        try:
            answer = self._ask(queue, b"stop 1" if reset else b"stop 0", timeout, take_over=False)
        except queue_worker.WorkerGone:
            return  # logged; the queue is stopped all the same
        queue.worker = None
        self._loop.remove_reader(handle.sock.fileno())
        handle.end()
        queue.broken = False
        try:
            queue.saved_avail_idx = 0 if reset else int(answer)
        except ValueError:
            log.error(
                "%s: queue %d: the worker answered %r to stop", self.name, queue.index, answer
            )

    def stop_workers(self) -> None:
        """Stop every worker: each waits for its requests in flight and exits."""
        for queue in self.queues:
            self._stop_worker(queue, reset=False)

    def tell_workers(self, message: bytes) -> None:
        for queue in self.queues:
            if queue.worker is not None:
                with contextlib.suppress(queue_worker.WorkerGone):  # logged by _ask
                    self._ask(queue, message)

    def become_worker(self, queue: VduseQueue, loop: asyncio.AbstractEventLoop) -> None:
        """In a freshly forked worker: keep ``queue`` only, in the worker's loop."""
        self.is_worker = True
        self.workers = False
        self._loop = loop
        self._notify_pending = []
        self._notify_scheduled = False
        for other in self.queues:
            other.type_data = None  # may hold the daemon's engines
            if other.native is not None:  # the daemon's counters, context and eventfd
                other.native.forget_after_fork()
                other.native = None
            if other.worker is not None:  # another worker's socket, inherited
                other.worker.sock.close()
                other.worker = None
            if other is queue:
                continue
            if other.kick_fd >= 0:
                os.close(other.kick_fd)
                other.kick_fd = -1
            if other.vq is not None:
                other.vq.release()
                other.vq = None
            other.log = None  # written by its own process only
            other.completed = []
        for poller in self.native_retiring:
            poller.forget_after_fork()
        self.native_retiring = []
        completions.add_hook(self.flush_notifications)
        self.device_type.after_fork()

    def _recover(self, queue: VduseQueue, info: kv.VqInfo) -> tuple[list[int], int]:
        assert queue.log is not None
        used = self.memory.view(info.device_addr, used_ring_size(info.num), False)
        if used is None:
            raise ValueError("the used ring is not mapped")
        ring_used_idx = int.from_bytes(used[2:4], "little")

        def head_at(i: int) -> int:
            off = 4 + 8 * (i % info.num)
            return int.from_bytes(used[off : off + 4], "little")

        try:
            heads, last_avail = queue.log.recover(ring_used_idx, head_at)
        finally:
            used.release()
        log.info(
            "%s: queue %d resumes at avail %d, used %d, %d request(s) in flight",
            self.name,
            queue.index,
            last_avail,
            ring_used_idx,
            len(heads),
        )
        return heads, last_avail

    def _resubmit(self, queue: VduseQueue, heads: list[int]) -> None:
        vq = queue.vq
        assert vq is not None
        chains: list[DescriptorChain] = []
        for head in heads:
            try:
                chains.append(vq.resubmit(head))
            except Exception as e:
                log.error(
                    "%s: queue %d: cannot resubmit head %d: %s", self.name, queue.index, head, e
                )
        self.device_type.on_resubmit(queue, chains)

    def stop_queues(self, reset: bool = False) -> None:
        for queue in self.queues:
            self._stop_worker(queue, reset)
        if not reset:
            # Not on a reset: that comes inside a control message, and the driver
            # sets the masks again when it starts the queues.
            self.irq_steering.restore()
        for queue in self.queues:
            if queue.kick_fd >= 0:
                self._loop.remove_reader(queue.kick_fd)
                if not reset and not self._closed:
                    with contextlib.suppress(OSError):
                        self.dev.vq_setup_kickfd(queue.index, kv.VDUSE_EVENTFD_DEASSIGN)
                os.close(queue.kick_fd)
                queue.kick_fd = -1
            if queue.native is not None and queue.native.state.served:
                st = queue.native.state
                log.info(
                    "%s: queue %d: %d request(s) served by the compiled poll"
                    " (%d passes, %d interrupts, %d looks)",
                    self.name,
                    queue.index,
                    st.served,
                    st.passes,
                    st.interrupts,
                    st.looks,
                )
            if queue.native is not None:
                self._native_end(queue.native)
            queue.native = None  # counted afresh from the next start
            if queue.vq is not None:
                queue.saved_avail_idx = 0 if reset else queue.vq.last_avail_idx
                queue.vq.release()
                queue.vq = None
            queue.generation += 1
            queue.completed = []
            queue.broken = False
            if reset and queue.log is not None:
                queue.log.clear()
        if reset:
            self._invalidate(0, (1 << 64) - 1)
        self.device_type.on_queues_stopped()

    def _on_kick(self, queue: VduseQueue) -> None:
        if queue.kick_fd >= 0:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(queue.kick_fd)
        vq = queue.vq
        if vq is None or not queue.running:
            return
        before = vq.last_avail_idx
        self._serve(queue)
        if self.poll_spins and 0 < (vq.last_avail_idx - before) & 0xFFFF <= self.poll_max_batch:
            self._poll()

    def _serve(self, queue: VduseQueue) -> None:
        # Requests completed synchronously while popping (refused ones, GET_ID, null
        # nodes, Linux AIO done at submission) are pushed and signalled when the batch
        # ends.
        completions.begin()
        try:
            self.device_type.on_kick(queue)
        finally:
            completions.end()

    def _poll(self) -> None:
        """After serving a kick (``poll_max_batch``), look at every queue's avail
        ring for a while before sleeping, with kicks suppressed: a driver that sends
        its next request soon (at queue depth 1, right after the interrupt) is served
        without a kick, a wake-up and an eventfd read.  Backends that can be polled
        (`completions.poll`: Linux AIO's completion ring, the thread pool's finished
        jobs) are looked at too, so that their completions do not wait.  The poll ends
        after ``poll_spins`` looks in a row that found nothing; nothing else runs in the
        loop meanwhile, so the window is kept short.  Between empty looks the CPU is
        yielded (``poll_yield``): with as many driver threads as CPUs, one of them
        shares the poller's CPU.  The queues' interrupt work is steered off the
        poller's CPU (`IrqSteering`) when the poll begins and every ``RECHECK``
        requests it serves.  A driver that keeps the poll busy meets ``poll_budget``:
        the event loop then runs once (its messages, a queue worker's answers) and the
        poll goes on, kicks still suppressed."""
        queues = [(q, q.vq) for q in self.queues if q.vq is not None and q.running]
        steering = self.irq_steering
        indices = [q.index for q, _vq in queues]
        steering.steer(indices)
        recheck = RECHECK
        for _q, vq in queues:
            vq.suppress_kicks(True)
        self._poll_spent = False
        try:
            idle = 0
            spins = self.poll_spins
            if len(queues) == 1 and self._native_poll(queues[0][0], steering, indices):
                spins = 0  # done: no Python loop
            poll_backends = completions.poll
            yield_cpu = self.poll_yield
            budget = self.poll_budget
            while idle < spins:
                if idle and yield_cpu:
                    os.sched_yield()  # let a driver thread sharing this CPU run
                idle += 1
                if poll_backends():  # requests in flight that completed meanwhile
                    idle = 0
                for queue, vq in queues:
                    if vq.pending() and queue.running:
                        self._serve(queue)
                        idle = 0
                        recheck -= 1
                        if not recheck:  # the scheduler may have moved this process
                            recheck = RECHECK
                            steering.steer(indices)
                        budget -= 1
                if budget <= 0:
                    self._poll_spent = True
                    break
        finally:
            if not self._poll_spent:
                for _q, vq in queues:
                    vq.suppress_kicks(False)
        if self._poll_spent:
            # The driver kept the poll busy: the event loop's turn, then the poll goes
            # on (kicks stay suppressed; a kick would not come with the ring busy, and
            # after a busy kick batch no poll would start: see poll_max_batch).
            self._loop.call_soon(self._resume_poll)
            return
        for queue, _vq in queues:
            if queue.running:
                self._serve(queue)  # re-arms kicks (an empty pop), serves late arrivals

    def _resume_poll(self) -> None:
        """A poll that used its budget goes on, after one turn of the event loop."""
        if not self._closed and any(q.vq is not None and q.running for q in self.queues):
            self._poll()

    def _native_poll(self, queue: VduseQueue, steering: IrqSteering, indices: list[int]) -> bool:
        """`_poll`'s loop for one queue in C (native_poll.py), when the device type can
        have its requests served there; False: the Python loop polls instead (from the
        start, or from where the C loop found the driver with more than
        ``native_deep_limit`` requests out).  Entries the C loop does not take are served
        by `_serve`, and the C loop goes on."""
        backend_of = getattr(self.device_type, "native_backend", None)
        vq = queue.vq
        qlog = queue.log
        if backend_of is None or vq is None or qlog is None:
            return False
        if not NativePoll.usable(vq):
            return False
        backend = backend_of()
        if backend is None:
            return False
        poller = queue.native
        if poller is None:
            poller = queue.native = NativePoll()
        if backend.kind != poller.kind and not self._native_open(queue, poller, backend.kind):
            return False
        if poller.poll_hook is not None:
            # The C loop reads its completion ring itself at every look; the hook
            # (`_native_reap`) must not run inside it (it re-exports the buffers).
            completions.remove_poller(poller.poll_hook)
        poller.setup(
            vq,
            qlog,
            backend,
            self._native_irq_fd(),
            queue.index,
            self.poll_spins,
            self.poll_yield,
            min(RECHECK, self.poll_budget),
            self.native_deep_limit,
        )
        lib = native.lib
        delta = 0
        looks = 0
        served_before = poller.state.served
        try:
            while True:
                rc, change = poller.run(vq, qlog)
                delta += change
                if rc == lib.VX_LOOK:
                    # Requests of the Python path are out (the kick's, before the poll):
                    # their engine's completions are looked at between the C loop's
                    # looks, as the Python loop does, within the same number of looks.
                    if completions.poll():
                        looks = 0
                    else:
                        looks += 1
                        if looks >= self.poll_spins:
                            break
                    continue
                looks = 0
                if rc == lib.VX_INTERRUPT:  # no device fd to inject through (tests)
                    self.dev.vq_inject_irq(queue.index)
                elif rc == lib.VX_DEEP:
                    return False
                elif rc == lib.VX_IDLE or not queue.running or queue.vq is not vq:
                    break
                elif rc == lib.VX_SERVED:
                    steering.steer(indices)  # as the Python loop does every RECHECK
                else:  # VX_PYTHON: an entry of another shape, a fault, a broken ring
                    before = vq.last_avail_idx
                    self._serve(queue)
                    if queue.vq is not vq or not queue.running or vq.last_avail_idx == before:
                        break
                if poller.state.served - served_before >= self.poll_budget:
                    self._poll_spent = True  # the event loop's turn (`_poll`)
                    break
        finally:
            poller.release()
            if poller.poll_hook is not None:  # an asynchronous backend
                self._native_count(poller, delta)
        return True

    def _native_irq_fd(self) -> int:
        """The fd the compiled poll injects interrupts through; -1: it asks its caller
        (VX_INTERRUPT, the fake kernel of the tests)."""
        return self.dev.fd if self.native_interrupts else -1

    def _native_open(self, queue: VduseQueue, poller: NativePoll, kind: int) -> bool:
        """The poll's asynchronous backend, created at first use; False (logged once
        per queue start) when it cannot be: the Python path serves the queue."""
        if poller.failed:
            return False
        try:
            poller.open_backend(kind, queue.max_size)
        except OSError as e:
            log.info(
                "%s: queue %d: the compiled poll cannot use its I/O backend (%s); the"
                " Python path serves it",
                self.name,
                queue.index,
                e,
            )
            poller.failed = True  # not tried again until the queue restarts
            return False
        self._loop.add_reader(poller.efd, self._native_reap, queue, poller)
        poller.poll_hook = partial(self._native_hook, queue, poller)
        return True

    def _native_hook(self, queue: VduseQueue, poller: NativePoll) -> bool:
        """`completions.poll`'s look at the compiled poll's completion ring."""
        return bool(native.lib.vx_ready(poller.state)) and self._native_reap(queue, poller) > 0

    def _native_count(self, poller: NativePoll, delta: int) -> None:
        """Requests out at the compiled poll's backend changed by ``delta``: the device
        type counts them (a drain waits for them); while any is out, `_poll`'s Python
        loop looks at the poll's completion ring too."""
        if poller.state.pending:
            completions.add_poller(poller.poll_hook)
        else:
            completions.remove_poller(poller.poll_hook)
        counter = getattr(self.device_type, "native_inflight", None)
        if delta and counter is not None:
            counter(delta)

    def _native_reap(self, queue: VduseQueue, poller: NativePoll) -> int:
        """The compiled poll's eventfd: completions that came after it returned.
        Returns how many requests finished."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(poller.efd)
        if not poller.state.pending:
            return 0
        vq = queue.vq
        qlog = queue.log
        retired = poller in self.native_retiring
        if retired or vq is None or qlog is None or queue.native is not poller:
            finished, due = poller.reap(None, None)
            poller.release()  # the regions too, once nothing is out
        else:
            poller.attach(vq, qlog, self._native_irq_fd(), queue.index)
            try:
                finished, due = poller.reap(vq, qlog)
            finally:
                poller.release()
            if due:
                with contextlib.suppress(OSError):
                    self.dev.vq_inject_irq(queue.index)
        if finished:
            self._native_count(poller, -finished)
        if retired and not poller.state.pending:
            self.native_retiring.remove(poller)
            self._native_close(poller)
        return finished

    def _native_end(self, poller: NativePoll) -> None:
        """The queue stops: close its compiled poll, or retire it while requests are
        out (their completions are discarded, as the Python path drops those of an
        older generation)."""
        if poller.state.pending:
            self.native_retiring.append(poller)
        else:
            self._native_close(poller)

    def _native_close(self, poller: NativePoll) -> None:
        """Stop watching the poll's eventfd and ring, and free its backend."""
        if poller.efd >= 0:
            self._loop.remove_reader(poller.efd)
        completions.remove_poller(poller.poll_hook)
        poller.close()

    def queue_broken(self, queue: VduseQueue, reason: str) -> None:
        """The driver corrupted the ring beyond recovery: stop serving this queue."""
        log.error("%s: queue %d stopped: %s", self.name, queue.index, reason)
        queue.broken = True
        if queue.kick_fd >= 0:
            self._loop.remove_reader(queue.kick_fd)

    # -- interrupts -------------------------------------------------------------------
    def schedule_notify(self, queue: VduseQueue) -> None:
        self._notify_pending.append(queue)
        if completions._depth:  # completions.in_batch(), inlined (once per batch)
            return  # flushed by the end-of-batch hook, in this loop iteration
        if not self._notify_scheduled:
            self._notify_scheduled = True
            self._loop.call_soon(self.flush_notifications)

    def flush_notifications(self) -> None:
        self._notify_scheduled = False
        if not self._notify_pending:
            return
        pending, self._notify_pending = self._notify_pending, []
        for queue in pending:
            if not queue.flush():  # pushes the batch; False: no interrupt due
                continue
            try:
                self.dev.vq_inject_irq(queue.index)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: not DRIVER_OK any more
                    log.error("%s: queue %d interrupt failed: %s", self.name, queue.index, e)

    # -- config -----------------------------------------------------------------------
    def update_config(self, offset: int, data: bytes) -> None:
        """Change config space bytes and tell the driver (DEV_SET_CONFIG + config IRQ)."""
        self.dev.set_config(offset, data)
        try:
            self.dev.inject_config_irq()
        except OSError as e:
            # Before DRIVER_OK there is nobody to tell; the driver reads the new value.
            if e.errno != errno.EINVAL:
                raise

    # -- memory -----------------------------------------------------------------------
    def _fault(self, iova: int) -> bool:
        try:
            entry = self.dev.iotlb_get_fd(iova, iova)
        except OSError as e:
            log.debug("%s: IOVA 0x%x has no mapping: %s", self.name, iova, e)
            return False
        try:
            length = entry.last - entry.start + 1
            perm = entry.perm & PERM_RW
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if perm & PERM_WRITE else 0)
            try:
                mapping = mmap.mmap(entry.fd, length, mmap.MAP_SHARED, prot, offset=entry.offset)
            except OSError:
                if not perm & PERM_WRITE:
                    raise
                mapping = mmap.mmap(
                    entry.fd,
                    length,
                    mmap.MAP_SHARED,
                    mmap.PROT_READ | mmap.PROT_WRITE,
                    offset=entry.offset,
                )
        finally:
            os.close(entry.fd)
        if not perm & PERM_WRITE:
            perm |= PERM_READ
        self.memory.add_region(entry.start, mapping, perm)
        self._mmaps[entry.start] = mapping
        log.debug("%s: mapped IOVA 0x%x-0x%x perm %d", self.name, entry.start, entry.last, perm)
        return True

    def invalidate_range(self, start: int, last: int) -> None:
        """UPDATE_IOTLB: every process serving a queue forgets its mappings of the range
        before the kernel gets its answer."""
        self.tell_workers(b"inval %d %d" % (start, last))
        self._invalidate(start, last)

    def _invalidate(self, start: int, last: int) -> None:
        for region in self.memory.remove_range(start, last):
            mapping = self._mmaps.pop(region.start, None)
            region.view.release()
            if mapping is not None:
                self.retired.append(mapping)
        self.collect_retired()

    def collect_retired(self) -> None:
        """Unmap removed regions that no request holds a view into any more."""
        if not self.retired:
            return
        still: list[mmap.mmap] = []
        for mapping in self.retired:
            try:
                mapping.close()
            except BufferError:
                still.append(mapping)
        self.retired = still

    # -- teardown ---------------------------------------------------------------------
    def inflight(self) -> int:
        return sum(q.vq.inflight_count for q in self.queues if q.vq is not None)

    def close(self, destroy: bool = True) -> bool:
        """Stop serving and close the device; DESTROY_DEV unless it is still attached.

        Returns True if the device was destroyed.
        """
        if self._closed:
            return False
        self.stop_queues()
        self._closed = True
        completions.remove_hook(self.flush_notifications)
        self._loop.remove_reader(self.dev.fd)
        self._invalidate(0, (1 << 64) - 1)
        self.dev.close()
        destroyed = False
        if destroy:
            try:
                self.control.destroy_dev(self.name)
                destroyed = True
                if self.log is not None:
                    self.log.remove()
                    self.log = None
            except OSError as e:
                if e.errno == errno.EBUSY:
                    log.warning(
                        "%s: device is still attached (vdpa dev del it first); it is left "
                        "in place for a later reconnect",
                        self.name,
                    )
                else:
                    log.error("%s: destroying the device failed: %s", self.name, e)
        if self.log is not None:
            self.log.close()
            self.log = None
        self.control.close()
        return destroyed

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "features": self.features}
