/* The depth-1 poll loop of vexport's vduse-blk export, compiled (cffi API mode).
 *
 * vexport/native/__init__.py has the why; vexport/exports/native_poll.py is the Python
 * side that fills `struct vx_poll` from a SplitQueue, its in-flight log and the export,
 * and takes the state back after each call.  This loop serves what the Python path's
 * fast path serves (SplitQueue.pop_simple + VirtioBlk.parse_simple: one INDIRECT head
 * whose table holds header, data, status, all in one read-write region; a read or a
 * write of a valid, aligned range) on a backend it can complete itself, with the same
 * checks, and hands everything else back to Python without consuming it.
 *
 * Backends (which one: VduseBlkExport.native_backend):
 * - VX_NULL: null-co without read-zeroes or latency; the request is done once parsed.
 * - VX_AIO, VX_URING: a file or block device read and written through a Linux AIO
 *   context or an io_uring of the loop's own (what aio=native and aio=threads use in
 *   Python).  A request is submitted when it is popped (one system call per pass) and
 *   completed when its event comes back: the loop reads the completion ring at every
 *   look, and right after submitting (tmpfs and null_blk complete inside the call).
 *   It may return with requests out: the backend signals efd per completion, and the
 *   Python side calls vx_reap from its event loop (native_poll.py).  A short transfer
 *   goes on from where it stopped; a read that meets the end of the file is filled
 *   with zeroes; a write that moves nothing, or any error, completes with IOERR: what
 *   the Python path does (io/slots.py, io/iov.py full_result, QueueRequest).
 */

#include <errno.h>
#include <stdint.h>
#include <sched.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/aio_abi.h>

#include "poll.h"

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_BARRIER 0x80000000u
#define OUTHDR_LEN 16
#define MAX_CHAIN_BYTES (1u << 30)  /* virtqueue._MAX_CHAIN_BYTES */
#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define URING_OP_READ 22
#define URING_OP_WRITE 23

struct aio_ring_hdr { /* fs/aio.c struct aio_ring, before its io_events */
    unsigned id, nr, head, tail, magic, compat, incompat, header_length;
};

static inline uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* [addr, addr + len) lies in the region, without overflow. */
static inline int in_region(const struct vx_poll *s, uint64_t addr, uint64_t len)
{
    uint64_t size = s->region_end - s->region_start;
    return addr >= s->region_start && len <= size && addr - s->region_start <= size - len;
}

/* A request is over: its status byte, then (unless discarding) its used element;
 * publish() makes the batch visible. */
static void finish(struct vx_poll *s, uint16_t head, uint8_t *status, uint8_t value,
                   uint32_t used_len)
{
    *status = value;
    if (value != BLK_S_OK)
        s->io_errors++;
    if (s->discard)
        return;
    uint8_t *u = s->used + 4 + 8 * (s->used_idx & (s->size - 1));
    uint32_t id = head;
    memcpy(u, &id, 4);
    memcpy(u + 4, &used_len, 4);
    s->used_idx = (uint16_t)(s->used_idx + 1);
    s->heads[s->nbatch++] = head;
    s->served++;
}

/* used->idx for the finished batch (the completions' commit point, after their
 * elements), then their in-flight log entries cleared and the log's used index. */
static void publish(struct vx_poll *s)
{
    if (!s->nbatch)
        return;
    __atomic_store_n((uint16_t *)(s->used + 2), (uint16_t)s->used_idx, __ATOMIC_RELEASE);
    for (uint32_t i = 0; i < s->nbatch; i++)
        s->log_heads[s->heads[i]] = 0;
    __atomic_store_n(s->log_used, (uint16_t)s->used_idx, __ATOMIC_RELAXED);
    s->nbatch = 0;
}

static void complete_io(struct vx_poll *s, uint64_t head, int64_t res);

/* Hand the prepared iocbs to the kernel; one that is refused fails its request. */
static void submit_aio(struct vx_poll *s, uint64_t *ptrs, long n)
{
    long done = 0;
    while (done < n) {
        long r = syscall(SYS_io_submit, (aio_context_t)s->aio_ctx, n - done, ptrs + done);
        if (r > 0) {
            done += r;
            continue;
        }
        int err = r < 0 ? errno : EAGAIN;
        s->submit_errors++;
        s->submit_errno = err;
        struct iocb *cb = (struct iocb *)(uintptr_t)ptrs[done++];
        complete_io(s, cb->aio_data, -err);
    }
}

/* io_uring: have the kernel take the entries written (those it does not take now stay
 * in the ring for the next call). */
static void submit_uring(struct vx_poll *s)
{
    while (s->sq_unsubmitted) {
        long r = syscall(__NR_io_uring_enter, s->ring_fd, s->sq_unsubmitted, 0, 0, NULL, 0);
        if (r <= 0) {
            if (r < 0 && errno == EINTR)
                continue;
            s->submit_errors++;
            s->submit_errno = r < 0 ? errno : EAGAIN;
            return; /* retried at the next look */
        }
        s->sq_unsubmitted -= (uint32_t)r;
    }
}

/* Submit what was prepared: `n` iocbs at `ptrs` (Linux AIO), or the entries written
 * into the ring (io_uring). */
static void submit(struct vx_poll *s, uint64_t *ptrs, long n)
{
    if (s->backend == VX_AIO)
        submit_aio(s, ptrs, n);
    else
        submit_uring(s);
}

/* Prepare the transfer of what request `head` still has to move; Linux AIO's iocb
 * pointer goes to *ptr (submitted by the caller), io_uring's entry into the ring. */
static void prep(struct vx_poll *s, uint16_t head, uint64_t *ptr)
{
    struct vx_req *r = &s->reqs[head];
    if (s->backend == VX_AIO) {
        struct iocb *cb = (struct iocb *)&s->iocbs[8 * head];
        memset(cb, 0, sizeof *cb);
        cb->aio_data = head;
        cb->aio_lio_opcode = r->write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
        cb->aio_fildes = (uint32_t)s->file_fd;
        cb->aio_buf = (uint64_t)(uintptr_t)r->buf;
        cb->aio_nbytes = r->left;
        cb->aio_offset = (int64_t)r->offset;
        cb->aio_flags = IOCB_FLAG_RESFD;
        cb->aio_resfd = (uint32_t)s->efd;
        *ptr = (uint64_t)(uintptr_t)cb;
        return;
    }
    uint32_t tail = *s->sq_tail, idx = tail & s->sq_mask;
    uint8_t *e = s->sqes + 64 * idx;
    memset(e, 0, 64);
    e[0] = r->write ? URING_OP_WRITE : URING_OP_READ;
    int32_t fd = s->file_fd;
    uint64_t addr = (uint64_t)(uintptr_t)r->buf, user = head;
    memcpy(e + 4, &fd, 4);
    memcpy(e + 8, &r->offset, 8);
    memcpy(e + 16, &addr, 8);
    memcpy(e + 24, &r->left, 4);
    memcpy(e + 32, &user, 8);
    s->sq_array[idx] = idx;
    __atomic_store_n(s->sq_tail, tail + 1, __ATOMIC_RELEASE);
    s->sq_unsubmitted++;
}

/* The backend's result for request `head`: a short transfer goes on, anything else
 * finishes the request (zeroes after the end of the file for a read). */
static void complete_io(struct vx_poll *s, uint64_t head, int64_t res)
{
    if (head >= VX_MAX_SIZE || !s->reqs[head].active)
        return; /* not one of ours */
    struct vx_req *r = &s->reqs[head];
    if (res > 0 && (uint64_t)res < r->left) {
        r->buf += res;
        r->offset += (uint64_t)res;
        r->left -= (uint32_t)res;
        s->resubmits++;
        uint64_t ptr = 0;
        prep(s, (uint16_t)head, &ptr);
        submit(s, &ptr, 1);
        return;
    }
    uint8_t value = BLK_S_OK;
    if (res < 0 || (res == 0 && r->write))
        value = BLK_S_IOERR;
    else if (res == 0)
        memset(r->buf, 0, r->left);
    r->active = 0;
    s->pending--;
    if (!s->discard)
        s->inflight[head] = 0;
    finish(s, (uint16_t)head, r->status, value, r->used_len);
}

/* Take every event in the backend's completion ring. */
static int reap_ring(struct vx_poll *s)
{
    int n = 0;
    if (s->backend == VX_AIO) {
        struct aio_ring_hdr *ring = (struct aio_ring_hdr *)(uintptr_t)s->aio_ctx;
        struct io_event *ev = (struct io_event *)(ring + 1);
        unsigned nr = ring->nr, head = ring->head;
        unsigned tail = __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);
        if (head >= nr || tail >= nr)
            return 0;
        while (head != tail) {
            uint64_t data = ev[head].data;
            int64_t res = ev[head].res;
            head = head + 1 == nr ? 0 : head + 1;
            __atomic_store_n(&ring->head, head, __ATOMIC_RELEASE);
            complete_io(s, data, res);
            n++;
        }
        return n;
    }
    uint32_t head = *s->cq_head;
    uint32_t tail = __atomic_load_n(s->cq_tail, __ATOMIC_ACQUIRE);
    while (head != tail) {
        const uint8_t *c = s->cqes + 16 * (head & s->cq_mask);
        uint64_t data = ld64(c);
        int32_t res = (int32_t)ld32(c + 8);
        head++;
        __atomic_store_n(s->cq_head, head, __ATOMIC_RELEASE);
        complete_io(s, data, res);
        n++;
    }
    return n;
}

int vx_ready(struct vx_poll *s)
{
    if (!s->pending)
        return 0;
    if (s->backend == VX_AIO) {
        struct aio_ring_hdr *ring = (struct aio_ring_hdr *)(uintptr_t)s->aio_ctx;
        return ring->head != __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);
    }
    return *s->cq_head != __atomic_load_n(s->cq_tail, __ATOMIC_ACQUIRE);
}

/* Take the avail entries from last_avail to avail_idx that have the common shape;
 * stop at the first that has not.  VX_NULL finishes them at once; the others submit
 * them.  Returns how many were taken. */
static int serve(struct vx_poll *s, uint16_t avail_idx)
{
    uint32_t size = s->size, mask = size - 1;
    uint16_t last = (uint16_t)s->last_avail;
    uint16_t n = (uint16_t)(avail_idx - last);
    int async = s->backend != VX_NULL;
    long nsub = 0;
    int i;
    for (i = 0; i < n; i++) {
        uint16_t head = ld16(s->avail + 4 + 2 * ((last + i) & mask));
        if (head >= size || s->inflight[head] || s->reqs[head].active)
            break;
        const uint8_t *d = s->desc + 16 * (uint32_t)head;
        uint64_t addr = ld64(d);
        uint32_t len = ld32(d + 8);
        uint16_t flags = ld16(d + 12);
        if (flags != DESC_F_INDIRECT || len != 48 || !in_region(s, addr, 48))
            break;
        const uint8_t *t = s->region + (addr - s->region_start);
        uint64_t a0 = ld64(t), a1 = ld64(t + 16), a2 = ld64(t + 32);
        uint32_t l0 = ld32(t + 8), l1 = ld32(t + 24), l2 = ld32(t + 40);
        uint16_t f0 = ld16(t + 12), n0 = ld16(t + 14);
        uint16_t f1 = ld16(t + 28), n1 = ld16(t + 30), f2 = ld16(t + 44);
        if (f0 != DESC_F_NEXT || n0 != 1 || n1 != 2 || f2 != DESC_F_WRITE
            || l0 != OUTHDR_LEN || l2 != 1 || !l1 || l1 > MAX_CHAIN_BYTES - OUTHDR_LEN - 1
            || (f1 & ~DESC_F_WRITE) != DESC_F_NEXT || !in_region(s, a0, l0)
            || !in_region(s, a1, l1) || !in_region(s, a2, l2))
            break;
        const uint8_t *hdr = s->region + (a0 - s->region_start);
        uint32_t kind = ld32(hdr) & ~BLK_T_BARRIER;
        uint64_t sector = ld64(hdr + 8);
        int data_written = (f1 & DESC_F_WRITE) != 0;
        if (kind != (data_written ? BLK_T_IN : BLK_T_OUT) || !(data_written || s->writable)
            || (l1 & 511) || (sector & s->align_mask) || sector > s->capacity_sectors
            || (l1 >> 9) > s->capacity_sectors - sector)
            break;
        /* Popped: the in-flight log's commit point (inflight_log.py). */
        s->log_heads[head] = s->seq++;
        uint8_t *status = s->region + (a2 - s->region_start);
        uint32_t used_len = (data_written ? l1 : 0) + 1;
        if (!async) {
            finish(s, head, status, BLK_S_OK, used_len);
            continue;
        }
        struct vx_req *r = &s->reqs[head];
        r->buf = s->region + (a1 - s->region_start);
        r->status = status;
        r->offset = sector << 9;
        r->left = l1;
        r->used_len = used_len;
        r->write = !data_written;
        r->active = 1;
        s->inflight[head] = 1;
        s->pending++;
        prep(s, head, &s->iocb_ptrs[nsub]);
        nsub++;
    }
    s->last_avail = (uint16_t)(last + i);
    if (nsub)
        submit(s, s->iocb_ptrs, nsub);
    return i;
}

/* SplitQueue.should_notify, for the entries served since the last call. */
static int should_notify(struct vx_poll *s)
{
    uint16_t new_idx = (uint16_t)s->used_idx, old = (uint16_t)s->signalled_used;
    int valid = s->signalled_valid;
    if (valid && new_idx == old)
        return 0;
    s->signalled_used = new_idx;
    s->signalled_valid = 1;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t avail_idx = __atomic_load_n((uint16_t *)(s->avail + 2), __ATOMIC_ACQUIRE);
    if (s->notify_on_empty && s->python_inflight + s->pending == 0
        && avail_idx == (uint16_t)s->last_avail)
        return 1;
    if (s->event_idx) {
        uint16_t used_event = ld16(s->avail + 4 + 2 * s->size);
        return !valid || (uint16_t)(new_idx - used_event - 1) < (uint16_t)(new_idx - old);
    }
    return !(ld16(s->avail) & 1); /* VRING_AVAIL_F_NO_INTERRUPT */
}

/* The interrupt for what was served in the last pass, if the driver wants it. */
static void notify(struct vx_poll *s)
{
    if (!should_notify(s))
        return;
    s->interrupts++;
    if (s->fd < 0) {
        s->interrupt_due = 1; /* the caller injects: vx_poll returns VX_INTERRUPT */
        return;
    }
    uint32_t index = s->queue_index;
    if (ioctl(s->fd, s->inject_irq, &index) < 0) {
        s->interrupt_errors++;
        s->interrupt_errno = errno;
    }
}

/* Publish what finished and decide its interrupt; 1: the caller must inject it. */
static int flush(struct vx_poll *s)
{
    if (!s->nbatch)
        return 0;
    publish(s);
    notify(s);
    if (s->interrupt_due) {
        s->interrupt_due = 0;
        return 1;
    }
    return 0;
}

int vx_reap(struct vx_poll *s)
{
    if (s->sq_unsubmitted)
        submit_uring(s);
    if (s->pending)
        reap_ring(s);
    if (s->discard) {
        s->nbatch = 0;
        return 0;
    }
    return flush(s);
}

int vx_poll(struct vx_poll *s)
{
    int idle = 0, served = 0;
    s->nbatch = 0;
    while (idle < s->spins) {
        if (idle && s->yield_cpu)
            sched_yield();
        idle++;
        s->looks++;
        if (s->pending) {
            if (s->sq_unsubmitted)
                submit_uring(s);
            if (reap_ring(s)) {
                idle = 0;
                if (flush(s))
                    return VX_INTERRUPT;
            }
        }
        uint16_t avail_idx = __atomic_load_n((uint16_t *)(s->avail + 2), __ATOMIC_ACQUIRE);
        uint16_t n = (uint16_t)(avail_idx - (uint16_t)s->last_avail);
        if (!n) {
            if (s->python_inflight) {
                /* a driver at depth 1 waits for that one */
                if (s->yield_cpu)
                    sched_yield();
                return VX_LOOK;
            }
            continue;
        }
        if (n > s->size)
            return VX_PYTHON; /* AvailIndexRunAhead: Python stops the queue */
        if (s->deep_limit) {
            /* Requests the driver has out: made available since the used index it last
               asked an interrupt for (used_event).  Deep: Python's slower passes serve
               them in bursts with one interrupt each, which a driver on one queue with
               a CPU of its own turns over faster (bench/README.md).  Linux writes 0 to
               used_event while it takes completions with interrupts off, and a
               used_event ahead of the avail index says nothing either: unknown. */
            uint16_t used_event = ld16(s->avail + 4 + 2 * s->size);
            uint16_t out = (uint16_t)(avail_idx - used_event);
            if (used_event && out <= s->size && out > s->deep_limit)
                return VX_DEEP;
        }
        s->passes++;
        int k = serve(s, avail_idx);
        if (s->pending)
            reap_ring(s); /* what completed inside the submission */
        if (flush(s))
            return VX_INTERRUPT; /* the caller comes back; the rest is seen again */
        if (k < n)
            return VX_PYTHON;
        served += k;
        idle = 0;
        if (served >= s->max_serve)
            return VX_SERVED;
    }
    return VX_IDLE;
}
