/* One request the loop handed to an asynchronous backend (Linux AIO, io_uring), by
 * head, until its completion: where the rest of its data goes and where its status
 * byte is (pointers into the request region, which stays exported while any is out). */
struct vx_req {
    uint8_t *buf;
    uint8_t *status;
    uint64_t offset;    /* file offset of what is still to move */
    uint32_t left;      /* bytes still to move (a short transfer goes on from there) */
    uint32_t used_len;
    uint8_t write;
    uint8_t active;
};

/* The state one vx_poll call (poll.c) works on.  Pointers are into the queue's ring
 * views, its in-flight bytearray, the in-flight log and the request region; the rest is
 * copied in before and out after each call (vexport/exports/native_poll.py).  cffi reads
 * this file too (build.py): plain declarations only. */
struct vx_poll {
    /* rings (SplitQueue._desc/_avail/_used) and SplitQueue._inflight */
    const uint8_t *desc;
    const uint8_t *avail;
    uint8_t *used;
    uint8_t *inflight;
    /* in-flight log: QueueLog.heads and its used_idx field */
    uint64_t *log_heads;
    uint16_t *log_used;
    /* the read-write region requests are read from (SplitQueue._simple_region) */
    uint8_t *region;
    uint64_t region_start;
    uint64_t region_end;
    /* VirtioBlk */
    uint64_t capacity_sectors;
    /* the backend: VX_NULL, or VX_AIO (Linux AIO context aio_ctx) or VX_URING (the
       io_uring below) reading and writing file_fd; both signal efd per completion */
    int backend;
    int file_fd;
    int efd;
    uint64_t aio_ctx;
    int ring_fd;
    uint32_t *sq_head;
    uint32_t *sq_tail;
    uint32_t *sq_array;
    uint32_t sq_mask;
    uint8_t *sqes;
    uint32_t *cq_head;
    uint32_t *cq_tail;
    uint32_t cq_mask;
    uint8_t *cqes;
    uint32_t sq_unsubmitted;  /* io_uring: entries written but not yet taken */
    /* requests out at the backend; discard: the queue stopped (reset), completions
       free their slots only and touch neither the rings nor the in-flight log */
    uint32_t pending;
    int discard;
    uint32_t nbatch;  /* completions written since the last used->idx store (heads[]) */
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
    uint64_t io_errors;     /* requests completed with VIRTIO_BLK_S_IOERR */
    uint64_t resubmits;     /* short transfers continued */
    uint64_t submit_errors;
    int submit_errno;
    /* scratch: the heads of one pass (queues of up to VX_MAX_SIZE entries) */
    uint16_t heads[1024];
    struct vx_req reqs[1024];
    uint64_t iocbs[1024 * 8];   /* struct iocb (64 bytes) per head, Linux AIO */
    uint64_t iocb_ptrs[1024];
};

#define VX_MAX_SIZE 1024

/* backends */
#define VX_NULL 0
#define VX_AIO 1
#define VX_URING 2

/* vx_poll's results */
#define VX_IDLE 0        /* spins empty looks in a row: the poll is over */
#define VX_PYTHON 1      /* the next avail entry is Python's (another shape, a fault) */
#define VX_SERVED 2      /* max_serve requests served (the steering's recheck) */
#define VX_INTERRUPT 3   /* fd < 0 (fake kernel): the caller injects the interrupt */
#define VX_DEEP 4        /* the driver has more than deep_limit requests out */
#define VX_LOOK 5        /* an empty look while Python's requests are out: the caller
                            looks at its engines' completions, then calls again */

int vx_poll(struct vx_poll *s);
/* Completions that came in since (asynchronous backends): pushed, interrupt decided;
   returns 1 when the caller must inject it (fd < 0, as VX_INTERRUPT). */
int vx_reap(struct vx_poll *s);
/* Whether the backend's completion ring has events (reads two indices, no call). */
int vx_ready(struct vx_poll *s);
