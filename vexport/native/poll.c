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
 * Backends: null-co without read-zeroes or latency (the request is done once it is
 * parsed); which one the export says through VduseBlkExport.native_backend.
 */

#include <errno.h>
#include <stdint.h>
#include <sched.h>
#include <string.h>
#include <sys/ioctl.h>

#include "poll.h"

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_BARRIER 0x80000000u
#define OUTHDR_LEN 16
#define MAX_CHAIN_BYTES (1u << 30)  /* virtqueue._MAX_CHAIN_BYTES */

static inline uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* [addr, addr + len) lies in the region, without overflow. */
static inline int in_region(const struct vx_poll *s, uint64_t addr, uint64_t len)
{
    uint64_t size = s->region_end - s->region_start;
    return addr >= s->region_start && len <= size && addr - s->region_start <= size - len;
}

/* Serve the avail entries from last_avail to avail_idx that have the common shape;
 * stop at the first that has not.  Returns how many were served. */
static int serve(struct vx_poll *s, uint16_t avail_idx)
{
    uint32_t size = s->size, mask = size - 1;
    uint16_t last = (uint16_t)s->last_avail;
    uint16_t n = (uint16_t)(avail_idx - last);
    uint16_t uidx = (uint16_t)s->used_idx;
    int k = 0;
    for (int i = 0; i < n; i++) {
        uint16_t head = ld16(s->avail + 4 + 2 * ((last + i) & mask));
        if (head >= size || s->inflight[head])
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
        /* null-co: done.  The status byte, then the used element. */
        s->region[a2 - s->region_start] = 0;
        uint8_t *u = s->used + 4 + 8 * (uidx & mask);
        uint32_t id = head, used_len = (data_written ? l1 : 0) + 1;
        memcpy(u, &id, 4);
        memcpy(u + 4, &used_len, 4);
        uidx++;
        s->heads[k++] = head;
    }
    if (!k)
        return 0;
    s->last_avail = (uint16_t)(last + k);
    /* used->idx: the completions' commit point, after their elements. */
    __atomic_store_n((uint16_t *)(s->used + 2), uidx, __ATOMIC_RELEASE);
    for (int i = 0; i < k; i++)
        s->log_heads[s->heads[i]] = 0;
    __atomic_store_n(s->log_used, uidx, __ATOMIC_RELAXED);
    s->used_idx = uidx;
    s->served += k;
    return k;
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
    if (s->notify_on_empty && s->python_inflight == 0 && avail_idx == (uint16_t)s->last_avail)
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

int vx_poll(struct vx_poll *s)
{
    int idle = 0, served = 0;
    while (idle < s->spins) {
        if (idle && s->yield_cpu)
            sched_yield();
        idle++;
        s->looks++;
        uint16_t avail_idx = __atomic_load_n((uint16_t *)(s->avail + 2), __ATOMIC_ACQUIRE);
        uint16_t n = (uint16_t)(avail_idx - (uint16_t)s->last_avail);
        if (!n)
            continue;
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
        if (k)
            notify(s);
        if (s->interrupt_due) {
            s->interrupt_due = 0;
            return VX_INTERRUPT;
        }
        if (k < n)
            return VX_PYTHON;
        served += k;
        idle = 0;
        if (served >= s->max_serve)
            return VX_SERVED;
    }
    return VX_IDLE;
}
