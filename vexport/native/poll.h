/* The state one vx_poll call (poll.c) works on.  Pointers are into the queue's ring
 * views, its in-flight bytearray, the in-flight log and the request region; the rest is
 * copied in before and out after each call (vexport/exports/native_poll.py).  cffi reads
 * this file too (build.py): plain declarations only. */
struct vx_poll {
    /* rings (SplitQueue._desc/_avail/_used) and SplitQueue._inflight */
    const uint8_t *desc;
    const uint8_t *avail;
    uint8_t *used;
    const uint8_t *inflight;
    /* in-flight log: QueueLog.heads and its used_idx field */
    uint64_t *log_heads;
    uint16_t *log_used;
    /* the read-write region requests are read from (SplitQueue._simple_region) */
    uint8_t *region;
    uint64_t region_start;
    uint64_t region_end;
    /* VirtioBlk */
    uint64_t capacity_sectors;
    uint64_t align_mask;
    int writable;
    /* SplitQueue state, copied in and out */
    uint32_t size;
    uint32_t last_avail;
    uint32_t used_idx;
    uint32_t signalled_used;
    int signalled_valid;
    int event_idx;
    int notify_on_empty;
    uint32_t python_inflight;
    uint64_t seq;
    /* interrupts: VDUSE_VQ_INJECT_IRQ on fd, or fd < 0: return VX_INTERRUPT */
    int fd;
    unsigned long inject_irq;
    uint32_t queue_index;
    /* the poll: empty looks before giving up, sched_yield between them, requests
       served before returning (for the interrupt steering's recheck) */
    int spins;
    int yield_cpu;
    int max_serve;
    /* with the driver's requests out (avail idx - used_event) above deep_limit (if not
       0), return VX_DEEP: Python's loop serves that queue for the rest of the poll */
    uint32_t deep_limit;
    int interrupt_due;
    /* counters */
    uint64_t served;
    uint64_t passes;   /* looks that found requests */
    uint64_t looks;
    uint64_t interrupts;
    uint64_t interrupt_errors;
    int interrupt_errno;
    /* scratch: the heads of one pass (queues of up to VX_MAX_SIZE entries) */
    uint16_t heads[1024];
};

#define VX_MAX_SIZE 1024

/* vx_poll's results */
#define VX_IDLE 0        /* spins empty looks in a row: the poll is over */
#define VX_PYTHON 1      /* the next avail entry is Python's (another shape, a fault) */
#define VX_SERVED 2      /* max_serve requests served (the steering's recheck) */
#define VX_INTERRUPT 3   /* fd < 0 (fake kernel): the caller injects the interrupt */
#define VX_DEEP 4        /* the driver has more than deep_limit requests out */

int vx_poll(struct vx_poll *s);
