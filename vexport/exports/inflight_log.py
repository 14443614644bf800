"""The per-device in-flight log that lets a restarted daemon resume a VDUSE device.

Theory of operation
-------------------
When the daemon dies, the VDUSE device lives on: the driver's requests stay in the rings
(shared memory owned by the kernel) and the driver waits.  The kernel keeps no record of
which requests the dead daemon had taken, so the daemon keeps one, in a file that
outlives it (``/run/vexport/vduse-NAME.inflight`` by default), mapped with MAP_SHARED so
that every update is a plain store into the page cache: no system call on the hot path,
and nothing is lost when the process is killed (the kernel owns the pages).

Layout (little endian)::

    header   magic "VXINFLT1", then u32 version, num_queues, queue_size, block_size,
             u64 capacity (bytes), u64 offered features, u64 negotiated features
             (padded to 64 bytes)
    queue i  u16 used_idx (the used index whose completions the log has absorbed),
             6 bytes padding, u64 next sequence number,
             u64 heads[queue_size]: 0 = not in flight, else the sequence number at pop

A request's life and its commit points:

1. pop (the device reads the avail ring) -> ``heads[h] = seq`` (the pop's commit point).
   A crash before it leaves no trace; the request is still in the avail ring and is
   simply popped again, because the resume point is *derived*, not stored:
   ``last_avail_idx = used->idx + number of heads in flight``.
2. push (used element, then used->idx: the completion's commit point) -> ``heads[h] = 0``
   -> ``used_idx = used->idx``.  A crash between the push and the log update is
   repaired at recovery: every used element between the log's used_idx and the ring's
   used->idx names a head that completed, whose log entry is cleared.

Recovery (`QueueLog.recover`) therefore needs only the ring's used->idx and used
elements; it returns the heads to resubmit, oldest pop first, and the avail index to
resume from.  Heads consumed with no completion (a driver that offered an out-of-range or
already-in-flight head) break the derivation; such a driver has broken the device anyway.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vexport.virtio.virtqueue import SimpleChain

MAGIC = b"VXINFLT1"
VERSION = 1
HEADER = struct.Struct("<8sIIIIQQQ")
HEADER_SIZE = 64
QUEUE_HEADER = struct.Struct("<H6xQ")
QUEUE_HEADER_SIZE = QUEUE_HEADER.size  # 16


@dataclass(frozen=True)
class LogConfig:
    """What a restart must match to reuse a device."""

    num_queues: int
    queue_size: int
    block_size: int
    capacity: int
    features: int


def log_size(num_queues: int, queue_size: int) -> int:
    return HEADER_SIZE + num_queues * (QUEUE_HEADER_SIZE + 8 * queue_size)


class QueueLog:
    """The log of one queue, over a writable buffer (a slice of the mapped file)."""

    __slots__ = ("_buf", "_seq", "_used16", "heads", "next_seq", "size")

    def __init__(self, buf: memoryview, queue_size: int) -> None:
        self._buf = buf
        self.size = queue_size
        self.heads = buf[QUEUE_HEADER_SIZE : QUEUE_HEADER_SIZE + 8 * queue_size].cast("Q")
        # Single stores (pack_into zeroes a field before writing it, and a kill -9 can
        # land in between): used->idx as logged, and the sequence number.
        self._used16 = buf[0:2].cast("H")
        self._seq = buf[8:16].cast("Q")
        _used, seq = QUEUE_HEADER.unpack_from(buf, 0)
        self.next_seq = max(seq, 1)

    @property
    def used_idx(self) -> int:
        return int(QUEUE_HEADER.unpack_from(self._buf, 0)[0])

    def set_used_idx(self, used_idx: int) -> None:
        self._used16[0] = used_idx & 0xFFFF

    def popped(self, head: int) -> None:
        """Hot path: ``head`` was taken from the avail ring."""
        seq = self.next_seq
        self.heads[head] = seq
        self.next_seq = seq + 1

    def popped_simple(self, chains: list[SimpleChain]) -> None:
        """Hot path: the heads of ``chains`` (`SplitQueue.pop_simple`) were taken, in
        this order."""
        heads = self.heads
        seq = self.next_seq
        for chain in chains:
            heads[chain[0]] = seq
            seq += 1
        self.next_seq = seq

    def completed_batch(self, done: list[tuple[int, int]], used_idx: int) -> None:
        """Hot path: the ``(head, used_len)`` pairs were pushed; used->idx is now used_idx."""
        heads = self.heads
        for head, _len in done:
            heads[head] = 0
        self._used16[0] = used_idx & 0xFFFF

    def save_seq(self) -> None:
        self._seq[0] = self.next_seq

    def clear(self) -> None:
        """Forget everything (a reset: the driver forgot its requests too)."""
        for i in range(self.size):
            self.heads[i] = 0
        self._used16[0] = 0
        self._seq[0] = 1
        self.next_seq = 1

    def release(self) -> None:
        for view in (self.heads, self._used16, self._seq, self._buf):
            view.release()

    def inflight(self) -> list[int]:
        """Heads in flight, in pop order."""
        return [h for _, h in sorted((s, h) for h, s in enumerate(self.heads) if s)]

    def recover(
        self, ring_used_idx: int, used_elem_head: Callable[[int], int]
    ) -> tuple[list[int], int]:
        """Reconcile the log with the ring after a crash.

        ``used_elem_head(i)`` reads the head id of used ring element ``i`` (mod size).
        Returns (heads to resubmit in pop order, avail index to resume from).
        """
        logged = self.used_idx
        behind = (ring_used_idx - logged) & 0xFFFF
        if behind > self.size:
            raise ValueError(
                f"in-flight log is inconsistent with the ring: used index {logged} in the "
                f"log, {ring_used_idx} in the ring"
            )
        for i in range(behind):
            head = used_elem_head((logged + i) & 0xFFFF)
            if 0 <= head < self.size:
                self.heads[head] = 0
        self.set_used_idx(ring_used_idx)
        heads = self.inflight()
        seqs = [s for s in self.heads if s]
        self.next_seq = max([self.next_seq, *[s + 1 for s in seqs]])
        return heads, (ring_used_idx + len(heads)) & 0xFFFF


class InflightLog:
    """The whole log file of one device, mapped shared."""

    def __init__(self, path: str, mapping: object, config: LogConfig) -> None:
        self.path = path
        self._mapping = mapping
        self._view = memoryview(mapping)  # type: ignore[arg-type]
        self.config = config
        self.queues = [
            QueueLog(
                self._view[
                    HEADER_SIZE + i * (QUEUE_HEADER_SIZE + 8 * config.queue_size) : HEADER_SIZE
                    + (i + 1) * (QUEUE_HEADER_SIZE + 8 * config.queue_size)
                ],
                config.queue_size,
            )
            for i in range(config.num_queues)
        ]

    @staticmethod
    def read_config(data: bytes) -> tuple[LogConfig, int]:
        """Parse a header; returns (config, negotiated features).  ValueError if bad."""
        if len(data) < HEADER_SIZE:
            raise ValueError("in-flight log is truncated")
        magic, version, nq, qs, bs, cap, feat, negotiated = HEADER.unpack_from(data, 0)
        if magic != MAGIC or version != VERSION:
            raise ValueError("not a vexport in-flight log (bad magic or version)")
        return LogConfig(nq, qs, bs, cap, feat), negotiated

    def write_header(self, negotiated: int = 0) -> None:
        c = self.config
        HEADER.pack_into(
            self._view,
            0,
            MAGIC,
            VERSION,
            c.num_queues,
            c.queue_size,
            c.block_size,
            c.capacity,
            c.features,
            negotiated,
        )

    def set_capacity(self, capacity: int) -> None:
        """block_resize: a restart after it must expect the new size."""
        c = self.config
        self.config = LogConfig(c.num_queues, c.queue_size, c.block_size, capacity, c.features)
        negotiated = HEADER.unpack_from(self._view, 0)[7]
        self.write_header(negotiated)

    @classmethod
    def create(cls, path: str, config: LogConfig) -> InflightLog:
        """A fresh, zeroed log at ``path`` (replacing any old one)."""
        import mmap

        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        size = log_size(config.num_queues, config.queue_size)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        log = cls(path, mapping, config)
        log.write_header()
        for q in log.queues:
            q.clear()
        return log

    @classmethod
    def open_existing(cls, path: str) -> InflightLog:
        """Map an existing log; FileNotFoundError if absent, ValueError if damaged."""
        import mmap

        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            header = os.pread(fd, HEADER_SIZE, 0)
            config, _ = cls.read_config(header)
            if size != log_size(config.num_queues, config.queue_size):
                raise ValueError("in-flight log has the wrong size")
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(path, mapping, config)

    def close(self) -> None:
        for q in self.queues:
            q.save_seq()
            q.release()
        self._view.release()
        close = getattr(self._mapping, "close", None)
        if close is not None:
            close()

    def remove(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def default_log_dir() -> str:
    """Where in-flight logs live: $VEXPORT_STATE_DIR, else /run/vexport, else $TMPDIR."""
    explicit = os.environ.get("VEXPORT_STATE_DIR")
    if explicit:
        return explicit
    if os.access("/run", os.W_OK):
        return "/run/vexport"
    import tempfile

    return os.path.join(tempfile.gettempdir(), "vexport")


def log_path(device_name: str, directory: str | None = None) -> str:
    return os.path.join(directory or default_log_dir(), f"vduse-{device_name}.inflight")
