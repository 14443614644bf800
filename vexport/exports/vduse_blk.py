"""The vduse-blk export: a virtio-blk device served from userspace through VDUSE.

This module holds the option checks (qemu-storage-daemon's, plus the stricter ones
vexport makes) and the device lifecycle.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import os
from functools import partial
from typing import TYPE_CHECKING, Any

from vexport.blockdev.perms import PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE
from vexport.errors import GenericError
from vexport.exports import BlockExport
from vexport.exports.inflight_log import LogConfig, log_path
from vexport.exports.native_poll import NativeBackend
from vexport.exports.vduse_device import (
    DeviceBusy,
    DeviceConfigMismatch,
    VduseDevice,
    VduseQueue,
)
from vexport.io.iov import OP_READ, OP_WRITE
from vexport.kernel import vduse as kv
from vexport.virtio import blk
from vexport.virtio.blk import BlkRequest, BlkRequestError, VirtioBlk
from vexport.virtio.errors import AvailIndexRunAhead, VirtqueueError
from vexport.virtio.virtqueue import DescriptorChain

if TYPE_CHECKING:
    from vexport.blockdev.node import BlockNode
    from vexport.daemon import Daemon

log = logging.getLogger("vexport.vduse_blk")

VDUSE_CONTROL = "/dev/vduse/control"
SERIAL_MAX_BYTES = 20  # VIRTIO_BLK_ID_BYTES
NAME_MAX_BYTES = 255  # VDUSE_NAME_MAX includes the terminating NUL


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def check_vduse_blk_options(options: dict[str, Any]) -> None:
    """Validate vduse-blk options; raises GenericError with a clear message."""
    export_id = options["id"]
    if options.get("num-queues", 1) < 1:
        raise GenericError("num-queues must be greater than 0")
    queue_size = options.get("queue-size", 256)
    if not (2 < queue_size <= 1024 and _is_power_of_two(queue_size)):
        raise GenericError("queue-size is invalid")
    block_size = options.get("logical-block-size", 512)
    page_size = mmap.PAGESIZE
    if not 512 <= block_size <= page_size:
        # Stricter than QSD 7.2 (which allows up to 2 MiB and lets the kernel refuse):
        # the virtio-blk driver cannot use a logical block larger than a page.
        raise GenericError(
            f"Property {export_id}.logical-block-size doesn't take value {block_size} "
            f"(minimum: 512, maximum: {page_size})"
        )
    if not _is_power_of_two(block_size):
        raise GenericError(
            f"Property {export_id}.logical-block-size doesn't take value {block_size}, "
            "it's not a power of 2"
        )
    serial = options.get("serial", "")
    if len(serial.encode()) > SERIAL_MAX_BYTES:
        raise GenericError(
            f"serial '{serial}' is too long: a virtio-blk serial has at most "
            f"{SERIAL_MAX_BYTES} bytes"
        )
    name = options["name"]
    if not name or "/" in name or name in (".", "..") or len(name.encode()) > NAME_MAX_BYTES:
        raise GenericError(f"Invalid VDUSE device name '{name}'")


_S_OK = blk.VIRTIO_BLK_S_OK
_S_IOERR = blk.VIRTIO_BLK_S_IOERR


class QueueRequest(BlkRequest):
    """A request of a vduse-blk export; ``user`` is ``(queue, generation, export)``.

    The backend's completion call ``req(ret)`` does what BlkRequest.__call__ and then
    `VduseBlkExport._done` would, in one frame: it runs once per request."""

    __slots__ = ()

    def __call__(self, ret: int) -> None:
        status = _S_OK if ret >= 0 else _S_IOERR
        used_len = self.data_len + 1
        self.status = status
        self.used_len = used_len
        self.status_view[0] = status
        self.iov = []  # drop views into the mapped memory
        queue, generation, export = self.user
        # From here on a copy of VduseBlkExport._done.
        if generation == queue.generation and queue.vq is not None:
            completed = queue.completed
            completed.append((self.head, used_len))
            if len(completed) == 1:  # the first of the batch: have the batch flushed
                queue.device.schedule_notify(queue)
        export._inflight -= 1
        if export._inflight == 0:
            export._idle()


class _NoEngine:
    """The kick context's engine for a node without `BlockNode.direct_io`."""

    closed = False


_NO_ENGINE = _NoEngine()

# The compiled poll's backends (poll.h VX_AIO, VX_URING) by engine kind; see
# VduseBlkExport.native_backend.
_NATIVE_KINDS = {"native": 1, "io_uring": 2}
_NATIVE_IO = os.environ.get("VEXPORT_NATIVE_IO", "1") != "0"


def queue_workers_enabled() -> bool:
    """Queues beyond the first in worker processes (vexport/exports/queue_worker.py)
    unless VEXPORT_WORKERS=0."""
    return os.environ.get("VEXPORT_WORKERS", "1") != "0"


def open_vduse_control() -> int:
    """Open the VDUSE control node, translating its absence into a clear error."""
    try:
        return os.open(VDUSE_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise GenericError(
            f"{VDUSE_CONTROL} does not exist: the vduse kernel module is missing "
            "(load it with 'modprobe vduse'; it needs a kernel with CONFIG_VDPA_USER)"
        ) from None
    except OSError as e:
        raise GenericError(
            f"Could not open {VDUSE_CONTROL}: {os.strerror(e.errno or errno.EIO)}"
        ) from None


class VduseBlkExport(BlockExport):
    """vduse-blk: requests popped from every queue go to the block node, zero copy.

    Per kick: pop chains until the queue is empty (the virtqueue re-arms kicks when it
    finds the ring empty), parse each into a `BlkRequest` and execute it on the node
    between ``plug()`` and ``unplug()``, so that a backend submits the whole batch with
    one system call.  Completions push to the used ring; the device injects one
    interrupt per queue per loop iteration, when EVENT_IDX says one is due.
    """

    type = "vduse-blk"
    BATCH = 128

    def __init__(self, daemon: Daemon, options: dict[str, Any], node: BlockNode) -> None:
        super().__init__(daemon, options, node)
        self.name: str = options["name"]
        self.num_queues: int = options.get("num-queues", 1)
        self.queue_size: int = options.get("queue-size", 256)
        self.block_size: int = options.get("logical-block-size", 512)
        self.serial: str = options.get("serial", "")
        self.device: VduseDevice | None = None
        self.blk = VirtioBlk(node.length, self.block_size, self.serial, self.writable)
        self.blk.request_class = QueueRequest
        self._inflight = 0
        self._drained: asyncio.Event | None = None
        self._stopping = False

    @classmethod
    def check_options(cls, options: dict[str, Any], node: BlockNode) -> None:
        check_vduse_blk_options(options)

    def config_bytes(self) -> bytes:
        return blk.config_space(
            self.node.length,
            logical_block_size=self.block_size,
            num_queues=self.num_queues,
            queue_size=self.queue_size,
        )

    async def start(self) -> None:
        perm = PERM_CONSISTENT_READ | (PERM_WRITE if self.writable else 0)
        # Share everything, resize included, so that block_resize works while exported.
        self.daemon.graph.add_user(self.node, self, perm=perm, shared=PERM_ALL)
        try:
            self.device = self._create_device()
        except BaseException:
            self.daemon.graph.remove_user(self.node, self)
            raise
        self.node.resize_listeners.append(self.resize)
        log.info(
            "vduse-blk %s: device %s created (%d queues of %d, %d-byte blocks, %d bytes)",
            self.id,
            self.name,
            self.num_queues,
            self.queue_size,
            self.block_size,
            self.node.length,
        )

    def _create_device(self) -> VduseDevice:
        def open_control() -> kv.VduseControl:
            return kv.VduseControl(open_vduse_control())

        features = blk.features(self.num_queues, self.writable)
        log_config = LogConfig(
            self.num_queues, self.queue_size, self.block_size, self.node.length, features
        )
        try:
            return VduseDevice.create(
                self.name,
                device_id=blk.VIRTIO_ID_BLOCK,
                features=features,
                config=self.config_bytes(),
                num_queues=self.num_queues,
                queue_size=self.queue_size,
                device_type=self,
                log_config=log_config,
                log_path=log_path(self.name),
                open_control=open_control,
                workers=queue_workers_enabled(),
            )
        except (DeviceBusy, DeviceConfigMismatch) as e:
            raise GenericError(f"failed to create vduse device: {e}") from None
        except FileExistsError:
            raise GenericError(
                f"failed to create vduse device: a VDUSE device named '{self.name}' already exists"
            ) from None
        except OSError as e:
            raise GenericError(
                f"failed to create vduse device '{self.name}': {os.strerror(e.errno or 0)}"
            ) from None

    # -- data path ----------------------------------------------------------------
    def on_kick(self, queue: VduseQueue) -> None:
        vq = queue.vq
        if vq is None or self._stopping:
            return
        context = queue.type_data
        if context is None or context[0] != queue.generation or context[1].closed:
            context = queue.type_data = self._kick_context(queue)
        (generation, _engine, user, node, plug, unplug, parse_simple, read, write, preadv,
         pwritev, done, execute, qlog, first_len, last_len, batch) = context  # fmt: skip
        plug()
        try:
            while True:
                # The common shape, decoded in place (pop_simple), until the ring is
                # empty or an entry of another shape (or a fault) comes up; then
                # pop_batch takes one entry: that one, judged by the general path, or
                # nothing when the ring is empty (it re-arms kicks).
                simple = vq.pop_simple(batch, first_len, last_len)
                if simple:
                    if qlog is not None:
                        qlog.popped_simple(simple)
                    # Counted first: a request refused at parse time completes (and
                    # is counted down) inside execute.
                    self._inflight += len(simple)
                    for sc in simple:
                        req = parse_simple(sc, user, done)
                        if req.status is None:
                            kind = req.type
                            if kind == blk.VIRTIO_BLK_T_IN:
                                if read is not None:  # parse_simple checked the range
                                    read(req.offset, req.iov, req.length, req)
                                else:
                                    preadv(req.offset, req.iov, req)
                                continue
                            if kind == blk.VIRTIO_BLK_T_OUT:
                                if write is not None:
                                    write(req.offset, req.iov, req.length, req)
                                else:
                                    pwritev(req.offset, req.iov, req)
                                continue
                        execute(req, node, done)
                    if len(simple) == batch:
                        continue
                if vq.simple_drained and vq.kicks_suppressed:
                    break  # nothing else is there, and no kick to re-arm while polling
                try:
                    chains = vq.pop_batch(1)
                except VirtqueueError as err:
                    if err.head is None:
                        if isinstance(err, AvailIndexRunAhead):
                            assert self.device is not None
                            self.device.queue_broken(queue, str(err))
                            return
                        log.warning("vduse-blk %s: queue %d: %s", self.id, queue.index, err)
                        continue
                    log.warning("vduse-blk %s: queue %d: %s", self.id, queue.index, err)
                    if qlog is not None:
                        qlog.popped(err.head)
                    self._fail_malformed(queue, generation, err.head)
                    continue
                if not chains:
                    break  # empty, kicks re-armed
                chain = chains[0]
                if qlog is not None:
                    qlog.popped(chain.head)
                try:
                    req = self.blk.parse(chain)
                except BlkRequestError as err:
                    log.warning("vduse-blk %s: queue %d: %s", self.id, queue.index, err)
                    self._fail_malformed(queue, generation, chain.head)
                    continue
                req.user = user
                self._inflight += 1
                execute(req, node, done)
        finally:
            unplug()

    def _kick_context(self, queue: VduseQueue) -> tuple[Any, ...]:
        """What `on_kick` uses, looked up once per queue start (``queue.generation``)
        instead of on every kick: at queue depth 1 every kick serves one request.  For a
        node with `BlockNode.direct_io`, reads and writes of the simple shape go
        straight to the engine (``read``/``write``: the range is checked by
        ``parse_simple``), and the context is remade when that engine is closed."""
        node = self.node
        blk_ = self.blk
        engine: Any = _NO_ENGINE
        read = write = None
        plug, unplug = node.plug, node.unplug
        direct = node.direct_io(False)
        if direct is not None:
            engine, fd = direct
            read = partial(engine.transfer, OP_READ, fd)
            plug, unplug = engine.plug, engine.unplug
            if node.direct_io(True) is not None:
                write = partial(engine.transfer, OP_WRITE, fd)
        return (
            queue.generation,
            engine,
            (queue, queue.generation, self),  # each request's ``user``
            node,
            plug,
            unplug,
            blk_.parse_simple,
            read,
            write,
            node.preadv,
            node.pwritev,
            self._done,
            blk_.execute,
            queue.log,
            *blk.SIMPLE_SHAPE,
            self.BATCH,
        )

    def native_backend(self) -> NativeBackend | None:
        """Whether the compiled poll (native_poll.py) may serve this export's reads and
        writes of the common shape itself, and how: on a null-co node that completes
        them at once, leaving the buffers as they are (no read-zeroes, no latency); on
        a node whose reads go straight to a Linux AIO or io_uring engine
        (`BlockNode.direct_io`: a file or host_device with aio=native, or aio=threads
        where io_uring serves it), through a context or ring of the poll's own on the
        same file.  Writes only where `direct_io` takes them too (not read-only, no
        detect-zeroes); others go to Python.  ``VEXPORT_NATIVE_IO=0``: null-co only.
        Checked at every poll, so a change of node or of capacity is seen."""
        node = self.node
        if self._stopping:
            return None
        blk_ = self.blk
        if node.driver == "null-co":
            if node.read_zeroes or node.latency:  # type: ignore[attr-defined]
                return None
            return NativeBackend(blk_.capacity_sectors, blk_._align_mask, blk_.writable)
        if not _NATIVE_IO:
            return None
        direct = node.direct_io(False)
        if direct is None:
            return None
        engine, fd = direct
        kind = _NATIVE_KINDS.get(getattr(engine, "kind", ""))
        if kind is None or engine.closed:
            return None
        writable = blk_.writable and node.direct_io(True) is not None
        return NativeBackend(blk_.capacity_sectors, blk_._align_mask, writable, kind, fd)

    def native_inflight(self, delta: int) -> None:
        """The compiled poll has ``delta`` more requests out (fewer when negative)."""
        self._inflight += delta
        if self._inflight == 0:
            self._idle()

    def _fail_malformed(self, queue: VduseQueue, generation: int, head: int) -> None:
        """Complete a chain that failed validation: IOERR in its status byte when one
        can be found (a driver may not clear the byte before reusing it), else used
        length 0."""
        vq = queue.vq
        status = vq.last_writable_byte(head) if vq is not None else None
        if status is not None:
            status[0] = blk.VIRTIO_BLK_S_IOERR
            status.release()
            queue.complete(generation, head, 1)
        else:
            queue.complete(generation, head, 0)

    def _done(self, req: BlkRequest, used_len: int) -> None:
        """A request completed (`BlkRequest.complete`; the backend's ``req(ret)`` runs
        QueueRequest.__call__, which copies this)."""
        queue, generation, _export = req.user
        req.iov = []  # drop views into the mapped memory
        # queue.complete, inlined (once per request)
        if generation == queue.generation and queue.vq is not None:
            completed = queue.completed
            completed.append((req.head, used_len))
            if len(completed) == 1:  # the first of the batch: have the batch flushed
                queue.device.schedule_notify(queue)
        self._inflight -= 1
        if self._inflight == 0:
            self._idle()

    def _idle(self) -> None:
        """No request is in flight any more."""
        device = self.device
        if device is not None and device.retired:
            device.collect_retired()
        if self._drained is not None:
            self._drained.set()

    def on_queues_stopped(self) -> None:
        pass

    # -- in a queue worker (queue_worker.py) --------------------------------------------
    def after_fork(self) -> None:
        self._inflight = 0  # the daemon's requests are the daemon's
        self._drained = None
        self.node.after_fork()

    def on_capacity(self, length: int) -> None:
        self.node.refresh_tree_length()
        self.blk.set_capacity(length)

    def stop_serving(self) -> None:
        self._stopping = True

    def on_resubmit(self, queue: VduseQueue, chains: list[DescriptorChain]) -> None:
        """Serve again, in order, what a previous daemon had taken but not completed."""
        log.info(
            "vduse-blk %s: queue %d: resubmitting %d request(s)", self.id, queue.index, len(chains)
        )
        generation = queue.generation
        self.node.plug()
        try:
            for chain in chains:
                try:
                    req = self.blk.parse(chain)
                except BlkRequestError as err:
                    log.warning("vduse-blk %s: queue %d: %s", self.id, queue.index, err)
                    self._fail_malformed(queue, generation, chain.head)
                    continue
                req.user = (queue, generation, self)
                self._inflight += 1
                self.blk.execute(req, self.node, self._done)
        finally:
            self.node.unplug()

    # -- control ------------------------------------------------------------------
    def resize(self, new_length: int) -> None:
        self.blk.set_capacity(new_length)
        if self.device is not None:
            self.device.tell_workers(b"capacity %d" % new_length)
            if self.device.log is not None:
                self.device.log.set_capacity(new_length)
            field_offset, data = blk.capacity_bytes_field(new_length)
            try:
                self.device.update_config(field_offset, data)
            except OSError as e:
                log.error("vduse-blk %s: telling the driver the new size failed: %s", self.id, e)

    async def drain(self) -> None:
        if self._inflight:
            self._drained = asyncio.Event()
            while self._inflight:
                self._drained.clear()
                await self._drained.wait()
            self._drained = None

    async def stop(self, mode: str) -> None:
        self._stopping = True
        if self.device is not None:
            self.device.stop_workers()  # each drains its queue first
        await self.drain()
        if self.writable:
            # Everything the driver was told is done reaches the backend's storage.
            try:
                await self.node.co_flush()
            except OSError as e:
                log.error("vduse-blk %s: flushing at shutdown failed: %s", self.id, e)
        if self.resize in self.node.resize_listeners:
            self.node.resize_listeners.remove(self.resize)
        if self.device is not None:
            self.device.close()
            self.device = None
        self.daemon.graph.remove_user(self.node, self)
