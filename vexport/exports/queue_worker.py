"""Queue workers: virtqueues served by forked processes, so that queues use more than one core.

Theory of operation (docs/design.md, "Queues on more than one core")
--------------------------------------------------------------------
One Python thread can only use one core, and at queue depth 32 the data path is CPU
bound.  When a device with more than one queue starts (DRIVER_OK), the daemon forks one
worker process per queue beyond the first (``spawn``); the daemon itself keeps queue 0,
the control plane (QMP, the block graph, the device's control messages) and answers every
VDUSE control message itself.

The worker is a fork of the daemon taken at that moment: it owns the queue's ring (the
`SplitQueue` built by the daemon before the fork), its kick eventfd, its slice of the
in-flight log (a MAP_SHARED file mapping, each queue's slice written by one process
only), the device fd it inherited (for IOTLB_GET_FD and VQ_INJECT_IRQ) and the block
nodes, with their own event loop and I/O engines (`BlockNode.after_fork`).  It never
reads control messages and never touches the daemon's event loop.

The daemon talks to each worker over a SOCK_SEQPACKET pair, one request and one answer
at a time, waiting for the answer (each is short and the worker never waits for the
daemon, so this cannot deadlock):

=====================  =================================================================
``inval START LAST``   forget mapped regions overlapping the range (UPDATE_IOTLB: the
                       daemon answers the kernel only after every worker did)
``avail``              the queue's last avail index (GET_VQ_STATE)
``capacity BYTES``     the node was resized: re-read its size, new virtio-blk capacity
``stop 1``             reset: stop serving at once, requests in flight complete into
                       nothing, clear the queue's log; answer ``AVAIL`` and exit
``stop 0``             stop: stop popping, wait for the requests in flight, push them;
                       answer ``AVAIL`` and exit
=====================  =================================================================

A worker (named ``vexport-qN`` in ps and top) ignores SIGTERM, SIGINT and SIGHUP: the
daemon stops it.  It dies with the daemon: PR_SET_PDEATHSIG(SIGKILL), then a check that the parent
did not die before that (``getppid``), so after ``kill -9`` of the daemon no process
keeps ``/dev/vduse/NAME`` open, and a restarted daemon reattaches from the log the
workers kept.  If a worker dies on its own (or stops answering: it is killed), the daemon
takes its queue over from the ring and the log, as a restarted daemon would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import time
from typing import TYPE_CHECKING

from vexport.io import completions, forget_engines_after_fork
from vexport.kernel.process import set_name, set_parent_death_signal

if TYPE_CHECKING:
    from vexport.exports.vduse_device import VduseDevice, VduseQueue

log = logging.getLogger("vexport.vduse")

# Answers to ``inval``/``avail``/``capacity``/``stop 1`` come at once; ``stop 0`` waits
# for the requests in flight.  Both far below VDUSE's message timeout where it matters.
ANSWER_TIMEOUT = 5.0
DRAIN_TIMEOUT = 60.0


class WorkerGone(Exception):
    """The worker died or did not answer in time."""


class WorkerHandle:
    """The daemon's side of one queue worker."""

    def __init__(self, pid: int, sock: socket.socket, queue_index: int) -> None:
        self.pid = pid
        self.sock = sock
        self.queue_index = queue_index
        self.alive = True

    def request(self, message: bytes, timeout: float = ANSWER_TIMEOUT) -> bytes:
        """Send one request, wait for its answer (raises WorkerGone)."""
        if not self.alive:
            raise WorkerGone(f"the worker of queue {self.queue_index} is gone")
        try:
            self.sock.settimeout(timeout)
            self.sock.send(message)
            answer = self.sock.recv(256)
        except (OSError, TimeoutError) as e:
            raise WorkerGone(
                f"the worker of queue {self.queue_index} (pid {self.pid}) did not answer "
                f"{message.decode()!r}: {e or 'timed out'}"
            ) from None
        if not answer:
            raise WorkerGone(f"the worker of queue {self.queue_index} (pid {self.pid}) exited")
        return answer

    def end(self, kill: bool = False) -> int | None:
        """Wait for the worker's exit (it was told to exit, or died; ``kill``: SIGKILL it
        first), close the socket; returns the wait status.  The caller stops watching
        the socket first."""
        status: int | None = None
        if self.alive:
            self.alive = False
            if kill:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(self.pid, 0)
            self.sock.close()
        return status


def spawn(device: VduseDevice, queue: VduseQueue, resubmit: list[int]) -> WorkerHandle:
    """Fork a worker serving ``queue`` (started, not yet served); returns in the daemon only."""
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent_pid = os.getpid()
    pid = os.fork()
    if pid == 0:  # the worker: never returns
        status = 1
        try:
            parent_sock.close()
            _worker_main(device, queue, resubmit, child_sock, parent_pid)
            status = 0
        except BaseException:
            with contextlib.suppress(BaseException):
                log.exception("%s: worker of queue %d failed", device.name, queue.index)
        finally:
            os._exit(status)
    child_sock.close()
    return WorkerHandle(pid, parent_sock, queue.index)


# -- in the worker -------------------------------------------------------------------------


def _worker_main(
    device: VduseDevice,
    queue: VduseQueue,
    resubmit: list[int],
    sock: socket.socket,
    parent_pid: int,
) -> None:
    loop = become_worker_process(parent_pid, keep=sock.fileno())
    if loop is None:
        return
    with contextlib.suppress(OSError):
        set_name(f"vexport-q{queue.index}")
    device.become_worker(queue, loop)
    worker = _Worker(device, queue, sock, loop)
    try:
        loop.run_until_complete(worker.run(resubmit))
    finally:
        # Closing the loop would close selectors and transports: skip, the process exits.
        sock.close()


def become_worker_process(parent_pid: int, keep: int = -1) -> asyncio.AbstractEventLoop | None:
    """In a process just forked from the daemon's event loop: die with the daemon, let
    go of the daemon's sockets but ``keep``, leave the daemon's signal handling, loop,
    completion hooks and I/O engines alone, and return a new event loop of the daemon's
    kind (None: the daemon is already gone).  The caller then calls ``after_fork`` on
    the objects it keeps (block nodes)."""
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:
        return None  # the daemon died before the death signal was armed
    drop_inherited_sockets(keep)
    # The daemon's signal handlers and its loop's wake-up fd are not ours.  SIGTERM, ^C
    # and SIGHUP are the daemon's to act on: it stops its workers itself (draining them
    # first), and a worker dies with it anyway.  (systemd sends SIGTERM to every process
    # of the service at once.)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    asyncio.events._set_running_loop(None)
    completions.reset_after_fork()
    forget_engines_after_fork()
    from vexport.cli import loop_factory

    loop = (loop_factory() or asyncio.new_event_loop)()
    asyncio.set_event_loop(loop)
    return loop


def drop_inherited_sockets(keep: int) -> None:
    """Let go of every socket inherited from the daemon but ``keep``: its QMP listeners
    and client connections, and its ends of the other workers' socket pairs.  Otherwise
    a client the daemon disconnects would not see EOF while a worker lives, nor would a
    worker the daemon stops.  Each is replaced by /dev/null rather than closed: the
    daemon's socket objects, copied into this process, still name the numbers, and a
    number closed here could be reused by one of the worker's own files and then
    closed by such an object's finaliser."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for name in names:
            fd = int(name)
            if fd < 3 or fd == keep or fd == null:
                continue
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.dup2(null, fd, inheritable=False)
            except OSError:
                continue  # the listing's own descriptor, closed by now
    finally:
        os.close(null)


class _Worker:
    def __init__(
        self,
        device: VduseDevice,
        queue: VduseQueue,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.device = device
        self.queue = queue
        self.sock = sock
        self.loop = loop
        self.done: asyncio.Future[None] = loop.create_future()
        self.stopping = False

    async def run(self, resubmit: list[int]) -> None:
        device, queue, loop = self.device, self.queue, self.loop
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._on_message)
        device.serve_started_queue(queue, resubmit)
        log.debug("%s: worker %d serves queue %d", device.name, os.getpid(), queue.index)
        await self.done

    def _on_message(self) -> None:
        try:
            data = self.sock.recv(256)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the daemon closed its end: it is exiting
            self._finish()
            return
        words = data.split()
        try:
            if words[0] == b"inval":
                self.device.invalidate_range(int(words[1]), int(words[2]))
                self._answer(b"ok")
            elif words[0] == b"avail":
                self._answer(b"%d" % self.device.avail_index(self.queue.index))
            elif words[0] == b"capacity":
                self.device.device_type.on_capacity(int(words[1]))
                self._answer(b"ok")
            elif words[0] == b"stop" and not self.stopping:
                self.stopping = True
                reset = words[1] == b"1"
                self.loop.create_task(self._stop(reset))
            else:
                log.error("%s: worker: unknown request %r", self.device.name, data)
                self._answer(b"error")
        except Exception:
            log.exception("%s: worker: request %r failed", self.device.name, data)
            self._answer(b"error")

    async def _stop(self, reset: bool) -> None:
        device = self.device
        if not reset:
            device.device_type.stop_serving()
            await device.device_type.drain()
            device.flush_notifications()
        avail = device.avail_index(self.queue.index) if self.queue.vq is not None else 0
        device.stop_queues(reset=reset)
        self._answer(b"%d" % avail)
        self._finish()

    def _answer(self, data: bytes) -> None:
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while True:
            try:
                self.sock.send(data)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.001)

    def _finish(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        if not self.done.done():
            self.done.set_result(None)
