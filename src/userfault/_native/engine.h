/* The fault engine's shared declarations (engine_*.c).
 *
 * One engine serves one source for a set of userfaultfd *contexts*: the uffd it was given
 * (the root) and, with UFFD_EVENT_FORK, one context per forked child, whose faults are served
 * from the same source. Every context has "areas" (address, length, source offset) and
 * per-page bitmaps. Threads never take the GIL except to call a Python source, and that GIL
 * belongs to the process the engine runs in: a pager process for Python sources, never the
 * process whose threads are blocked on the faults.
 *
 * Counters, the first error, the fault log and the pager process's bookkeeping live in a
 * uf_state_t, private memory or a shared memfd that the faulting process reads directly. */
#ifndef USERFAULT_ENGINE_H
#define USERFAULT_ENGINE_H

#include "native.h"
#include "compat.h"

#include <pthread.h>
#include <stdarg.h>
#include <sys/types.h>

#define UF_MAX_THREADS 64
#define UF_BG_THREADS 2              /* background copiers: readahead, populate */
#define UF_PREFETCH_SLOT (UF_MAX_THREADS + UF_BG_THREADS)
#define UF_EVICTOR_SLOT (UF_PREFETCH_SLOT + 1)
#define UF_SLOTS (UF_EVICTOR_SLOT + 1)
#define UF_HIST_BUCKETS 40
#define UF_MAX_LOG (1ull << 22)      /* fault log records */
#define UF_MAX_CHUNK (64ull << 20)
#define UF_MAX_PIECE (64ull << 20)
#define UF_DEFAULT_PIECE (256ull << 10)
/* a Python source pays a call (and the pager process's GIL) per piece: larger pieces amortise it
 * (BENCHMARKS.md, "piece"; Redis and HTTP sequential reads ran 15-35 % faster at 512 KiB) */
#define UF_PYTHON_PIECE (512ull << 10)
#define UF_MAX_AREAS 4096
#define UF_KEPT_AREAS 64 /* areas the state keeps after an mremap (a pager process's restart) */
#define UF_MAX_RETRIES 100
#define UF_MAX_MARKS 64              /* condemned pages, suspect ranges */
#define UF_ERR_MSG 512
#define UF_STATE_MAGIC 0x3245544154534655ull /* "UFSTATE2" */
#define UF_MSG_BATCH 64
#define UF_PARKED 64 /* faults held while an eviction's REMOVE is pending */
#define UF_STREAMS 8 /* readahead streams followed per context */
#define UF_TRACE_RECS 1365 /* 64 KiB of records per trace buffer */
#define UF_FORK_SLOTS 256 /* the fork table: one slot per pid modulo this */
#define UF_MAX_HINTS 65536 /* willneed() ranges pending at once */
#define UF_RA_WAITS 32 /* faults a readahead piece records the waits of (serve_fault) */
#define UF_BATCH 64 /* runs of a working set a background thread installs with one source read */

enum { SRC_ZERO, SRC_PATTERN, SRC_MEMORY, SRC_CYCLE, SRC_PYTHON, SRC_FAIL };
enum { INST_COPY, INST_ZEROPAGE, INST_MOVE, INST_CONTINUE };
enum { ONERR_POISON, ONERR_RETRY, ONERR_ZERO };
enum { ONREM_RELOAD, ONREM_ZERO };
enum { KIND_READ, KIND_WRITE, KIND_MINOR, KIND_WP, KIND_NONE };
enum { CAUSE_FAULT, CAUSE_READAHEAD, CAUSE_PREFETCH, CAUSE_POPULATE, CAUSE_EVICT,
       CAUSE_WRITEBACK, CAUSE_DROPPED, CAUSE_POISON };

/* Counters, in the order Python sees them (COUNTER_NAMES). Progress of the background jobs
 * (populate, preload: the working set): *_total bytes, *_done bytes finished with (installed,
 * or skipped as present), *_over 1 once the job will do no more (done, stopped by the budget,
 * or the pager process gave up); prefetch_done: bytes prefetch() calls are finished with;
 * remaps_in_hand: fault threads between reading a batch that holds a REMAP and applying it
 * (serve_ctx), which the supervisor reads (and zeroes) at a worker's death. */
#define UF_COUNTERS(X)                                                                        \
    X(faults) X(write_faults) X(minor_faults) X(wp_faults) X(bytes_installed) X(fault_bytes) \
    X(readahead_bytes) X(populate_bytes) X(prefetch_bytes) X(eexist) X(eagain) X(poisoned)    \
    X(zeroed) X(remove_events) X(unmap_events) X(remap_events) X(fork_events) X(children)     \
    X(service_ns) X(service_max_ns) X(errors) X(retries) X(restarts) X(timeouts)             \
    X(log_dropped) X(log_suppressed) X(resident_pages) X(evictions) X(refaults)               \
    X(writebacks) X(writeback_bytes) X(dirty_pages) X(reactivations) X(trace_dropped)     \
    X(populate_total) X(populate_done) X(populate_over) X(preload_total) X(preload_done)      \
    X(preload_over) X(prefetch_done) X(remaps_in_hand)
#define UF_ENUM(n) C_##n,
enum { UF_COUNTERS(UF_ENUM) UF_N_COUNTERS };
#undef UF_ENUM

/* A fault record's flags above the kernel's (trace/format.py TraceFlag): the page was present
 * (EEXIST), the mapping was changing (EAGAIN), the budget held the fault back (HELD), or it
 * waited for a background piece in flight, its service time running until that was in. */
#define REC_EEXIST 0x100
#define REC_EAGAIN 0x200
#define REC_HELD 0x400
#define REC_WAITED 0x800

/* In a fault-log record's `reserved`, beside its sequence number: its outcome is being
 * written, or has been (engine_state.c). */
#define UF_LOG_WRITING 0x80000000u
#define UF_LOG_DONE 0x40000000u
#define UF_LOG_SPINS 1000 /* yields before a record's writer is taken for dead */
#define UF_FLUSHERS 8 /* threads in flush() at once whose faults the budget knows not to hold */

/* One record of the fault log (and of trace files): 48 bytes, little-endian. */
typedef struct {
    uint64_t t_ns, offset, address, length;
    uint32_t tid, service_ns;
    uint8_t kind, cause;
    uint16_t flags; /* UFFD_PAGEFAULT_FLAG_* and REC_* */
    uint32_t reserved;
} uf_rec_t;

typedef struct { uint64_t start_ns, src_off, len, addr; } uf_inflight_t;

/* A request the pager process's engine asks the faulting process to carry out in its own
 * address space (madvise, copying pages out): one at a time, `seq` then `done`. */
enum { AGENT_MADVISE = 1, AGENT_DEACTIVATE, AGENT_COPY_OUT };
typedef struct { uint64_t seq, done, op, addr, len, arg; int64_t result; } uf_mail_t;
typedef struct { uint64_t off, len; } uf_mark_t;

/* A slot of the fork table (a shared memfd, see serving/forks.py): a forked child's uffd is
 * descriptor `fd` of process `server`. Written at pid % UF_FORK_SLOTS, `pid` last. */
typedef struct { int32_t pid, server, fd, reserved; } uf_forked_t;

typedef struct {
    uint64_t magic, size, log_cap;
    uint64_t counters[UF_N_COUNTERS];
    uint64_t hist[UF_HIST_BUCKETS];
    int64_t err; /* 0 none, -1 being written, > 0 the errno */
    uint64_t err_addr;
    char err_msg[UF_ERR_MSG];
    uint64_t root_gone; /* the process of the root context exited */
    /* A Python source read in progress, per thread slot: the pager process's supervisor
     * cuts reads that hang and learns which pages a dying worker was reading. */
    uf_inflight_t inflight[UF_SLOTS];
    /* Written by the supervisor: pages that killed or hung the worker too often (failed
     * without reading), and ranges that must be read one page at a time. */
    uint64_t ncondemned, nsuspect;
    uf_mark_t condemned[UF_MAX_MARKS], suspect[UF_MAX_MARKS];
    uf_mail_t mail;
    /* The thread of the faulting process that answers the mail (its watchdog), 0 until it
     * runs: the engine never holds that thread's faults (its copies for the evictor). */
    uint64_t agent_tid;
    /* The root context's areas once an mremap moved them (remap() writes them; areas_seq
     * is odd meanwhile and 0 while nothing moved), so that a new pager-process worker
     * starts from where the parts are now; nareas over UF_KEPT_AREAS: too many to keep.
     * A forked child's areas go to the supervisor with its descriptor, and again after
     * each mremap; children_unsent counts the children whose last ones could not be sent. */
    uint64_t areas_seq, nareas, children_unsent;
    uint64_t areas[3 * UF_KEPT_AREAS]; /* (address, length, source offset) */
    uint64_t log_written, log_read;
    uf_rec_t log[];
} uf_state_t;

typedef struct { uint64_t base, len, src_off, first_page; } area_t;
typedef struct { int n; area_t a[]; } areas_t;

/* A userfaultfd served by the engine: the root, or a forked child's. */
typedef struct uctx {
    int uffd, id, own_fd, dead, users;
    uint64_t key; /* a forked child's name for the pager process's supervisor (fork_sock) */
    areas_t *areas; /* replaced whole on REMAP; a reader loads the pointer once */
    uint64_t npages;
    uint8_t *installed, *removed; /* one bit per page */
    uint8_t *ref, *evicting, *evicted; /* the resident budget (root context only) */
    uint8_t *refilled;            /* being evicted, and installed again after the drop */
    uint8_t *inactive;            /* on probation in the pool: the next touch installs it back */
    uint8_t *deactivating;        /* put on probation, the REMOVE of its drop not handled yet */
    uint8_t *pooled;              /* on probation, and its copy into the pool is complete */
    uint8_t *dirty, *wbusy, *deferred; /* writable: written since written back; being written
                                          back; a writer held until that is done */
    /* readahead: the sequential streams the faults follow, forward or backward (glibc's large
     * memcpy runs backward); area index, the window still to install [next, end), its size,
     * where the last fault started and ended, direction (+1, -1, 0 not yet known) */
    struct { int area, dir; uint64_t next, end, window, first, last_end, used; } ra[UF_STREAMS];
    uint64_t ra_tick;
    uint64_t remaps;     /* REMAPs handled (under e->lock): areas copied before one are stale */
    int moved_unsent;    /* a forked child's areas after its last mremap did not reach the
                          * supervisor (counted in the state's children_unsent) */
    struct uctx *next;
} uctx_t;

/* A run of pages of one area to read and install (unread: failed without a read, after an
 * earlier run's timeout). */
typedef struct { uint64_t off, len; int zero, err; char *buf; int unread; } run_t;

typedef struct engine engine_t;

typedef struct {
    engine_t *e;
    pthread_t thread;
    int slot, background;
    char *bounce;        /* unit_max bytes: Python reads, file tails, cycles */
    PyObject *exporter;  /* Python sources: owns bounce, counts the views handed out */
    char *staging_map, *staging; /* MOVE: staging mapping, used from its 2 MiB-aligned start */
    struct uffd_msg *msgs; /* UF_MSG_BATCH */
    run_t *runs;         /* unit_max / page + 1 */
    uint64_t *pages;     /* failing page offsets (unit_max / page) */
    char msg[UF_ERR_MSG];
    uf_mark_t poisoned[UF_MAX_MARKS]; /* prefetch reports the pages it poisoned */
    int npoisoned;
    uint64_t poisoned_bytes;
    int cause;           /* of the install in progress, and when it began: for the trace */
    uint64_t t0;
    /* A background thread's piece: (offset, length) ranges of one area, read at once (one
     * read_many for a Python source): scattered runs of a working set or of willneed()
     * hints, or one range. A readahead piece being read is the batch of the area at ra_base
     * of ra_ctx (under e->lock); ra_waiters: faults there were left to it (Python sources:
     * serve_fault), the first UF_RA_WAITS of which it records when done (ra_wait, with
     * their fault-log slots): those threads waited until then, not just while served. */
    uint64_t batch[2 * UF_BATCH];
    int nbatch;
    uctx_t *ra_ctx;
    uint64_t ra_base;
    int ra_waiters;
    uf_rec_t ra_wait[UF_RA_WAITS];
    uint64_t ra_wait_seq[UF_RA_WAITS];
    /* Installing what it claimed earlier (a background piece, a prefetch): the area it
     * copied then names addresses that a REMAP since may have given to other memory, so its
     * installs stop once the context's remaps differs from this (faults look areas up anew). */
    int claimed;
    uint64_t claimed_remaps;
} worker_t;

typedef struct retired { void *p; struct retired *next; } retired_t;

struct engine {
    int stopfd, epfd, memfd, src_fd, log_fd;
    int kind, install, on_error, on_remove, retries, populate;
    int nthreads, nworkers, nstarted, started, released, stopping;
    int in_batch; /* threads between reading messages and handling their events */
    pid_t owner;
    uint64_t page, chunk, ra_min, ra_max, piece, unit_max, probe_addr, last_probe_ns;
    uctx_t *ctxs; /* the root first; dead ones are recycled, never freed while running */
    int next_id;
    const char *src;
    uint64_t src_len;
    char *pattern; uint64_t pat_len;
    char *zero;
    unsigned char *cycle; uint64_t cycle_len, cycle_next;
    PyObject *read_into, *read_many; /* Python sources (references owned by the type) */
    char name[256];                  /* the source, for log lines */
    char fail_msg[256];              /* SRC_FAIL: why every read fails */
    int fail_errno;
    worker_t *workers;
    pthread_mutex_t lock;      /* contexts, readahead, populate, log ring, CONTINUE fills */
    pthread_mutex_t stop_lock; /* serializes stop */
    pthread_mutex_t log_lock;  /* log lines and their rate limit */
    pthread_cond_t work_cond;
    int pop_area, pop_inflight;
    uint64_t pop_next;
    uf_state_t *st;
    size_t st_size;
    int st_owned;
    /* the resident budget: pages, watermarks, the evictor's thread and clock hand */
    uint64_t max_pages, high_pages, low_pages, evict_batch;
    int evict_advice, evictor_started, evict_stop, agent_req, agent_done;
    pthread_t evictor;
    worker_t *evict_worker; /* its buffers (write-back of dirty victims) */
    pthread_cond_t evict_cond;
    pthread_mutex_t agent_lock;
    int hand_area;
    uint64_t hand_off;
    int pool_fd;                 /* a memfd holding pages on probation, at page index * page */
    char *pool_map;
    uint64_t pool_len;
    pthread_mutex_t budget_lock; /* a page leaving the pool: reactivated or evicted, once */
    /* Faults answered EAGAIN while the evictor's madvise runs, held (not woken) until it
     * returns (under budget_lock; engine_budget.c). */
    int evict_madvising, nparked;
    uint64_t parked[UF_PARKED];
    /* Faults held back too, while the count is at max_resident + one batch (uf_throttle,
     * under budget_lock): pages reserved by fault and readahead installs under way; holding
     * is off without a running evictor or while it finds nothing to give; the evictor's
     * thread (its own faults are never held). */
    uint64_t reserved_pages;
    int throttle_off;
    pid_t evictor_tid;
    /* threads in uf_flush (UF_FLUSHERS at most are known): their faults are never held. A
     * flush's pwrite from the memory faults holding the file's inode lock, which the
     * evictor's own write-back then waits for: held, that fault would never be woken. */
    pid_t flushers[UF_FLUSHERS];
    /* writable: where written pages go (a file, a buffer, or a Python write_from). Writes
     * are tracked (pages installed write-protected, dirty bits) when writable, and under a
     * budget too: there a written page of a read-only pager is kept, never dropped. */
    int writable, track_writes, shared_mem, wb_fd, pinned_warned;
    /* A pager process's worker tells its supervisor of every forked child's descriptor (so a
     * worker that dies does not take them along: the child would read zeros) and of its end. */
    int fork_sock;
    uint64_t key_base;
    /* A forked child touches the beacon page (registered, outside every area) to learn which
     * descriptor here is its uffd: the engine writes it to the fork table and answers. */
    uint64_t beacon;
    uf_forked_t *fork_table;
    char *wb_buf;
    uint64_t wb_len;
    PyObject *write_from, *src_flush;
    pthread_mutex_t wp_lock; /* a page's protection changes under it: written, written back */
    /* write-back windows under way, and how often that count fell to 0 (under wp_lock): a
     * flush() waits for the ones others began (the evictor's) before it says done */
    int wb_active;
    uint64_t wb_idle;
    pthread_cond_t wb_cond;
    /* the trace: two buffers, a writer thread (engine_trace.c) */
    int trace_fd, trace_cur, trace_full, trace_stop, trace_started;
    uf_rec_t *trace_buf[2];
    size_t trace_n[2];
    uint64_t trace_lost;
    int faults_serving; /* serve_fault calls under way: their threads may be woken, not traced yet */
    pthread_t trace_thread;
    pthread_mutex_t trace_lock;
    pthread_cond_t trace_cond;
    /* a working set installed by the background threads from the first fault on: (area,
     * offset, length) runs of the root context, in first-touch order */
    uint64_t *preload;
    int npreload, preload_next, preload_armed, preload_inflight, preload_woken, preload_sized;
    uint64_t preload_room; /* pages the working set may still fill (uf_room_below_high) */
    uint64_t preload_off;
    /* ranges willneed() asked for: (area, offset, length) runs of the root context in the order
     * given, read by the background threads as readahead once no fault's stream has a window
     * left; hint_next and hint_off say where the next piece starts (engine_serve.c) */
    uint64_t *hints;
    int nhints, hint_next;
    uint64_t hint_off;
    double log_tokens;
    uint64_t log_last_ns, log_quiet;
    retired_t *retired;
};

#define ADD(e, n, v) __atomic_add_fetch(&(e)->st->counters[C_##n], (uint64_t)(v), __ATOMIC_RELAXED)
#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)

/* A background piece: whole pages, at least one (pieces of a 2 MiB hugetlb page would start
 * mid-page, and an install there, when the page is not marked installed yet, is EINVAL). */
static inline uint64_t piece_of(const engine_t *e)
{
    uint64_t p = e->piece & ~(e->page - 1);
    return p > e->page ? p : e->page;
}

/* How many ranges a background piece may gather: one while the pager process's supervisor
 * suspects a range (it learns which pages killed a worker from the span a read covers). */
static inline int batch_of(const engine_t *e) { return LOAD(e->st->nsuspect) ? 1 : UF_BATCH; }

static inline int bit_get(const uint8_t *bm, uint64_t i)
{
    return (__atomic_load_n(&bm[i >> 3], __ATOMIC_RELAXED) >> (i & 7)) & 1;
}
static inline void bit_set(uint8_t *bm, uint64_t i)
{
    __atomic_fetch_or(&bm[i >> 3], (uint8_t)(1u << (i & 7)), __ATOMIC_RELAXED);
}
static inline void bit_clear(uint8_t *bm, uint64_t i)
{
    __atomic_fetch_and(&bm[i >> 3], (uint8_t) ~(1u << (i & 7)), __ATOMIC_RELAXED);
}
/* Set or clear a bit; returns whether it was set before. */
static inline int bit_test_set(uint8_t *bm, uint64_t i)
{
    return (__atomic_fetch_or(&bm[i >> 3], (uint8_t)(1u << (i & 7)), __ATOMIC_RELAXED) >> (i & 7)) & 1;
}
static inline int bit_test_clear(uint8_t *bm, uint64_t i)
{
    return (__atomic_fetch_and(&bm[i >> 3], (uint8_t) ~(1u << (i & 7)), __ATOMIC_RELAXED) >> (i & 7)) & 1;
}

extern PyTypeObject userfault_BounceType;

/* engine_state.c */
size_t uf_state_size(uint64_t log_cap);
void uf_state_init(uf_state_t *st, size_t size, uint64_t log_cap);
int uf_state_check(const void *buf, size_t len, const char **why);
void uf_state_error(uf_state_t *st, int err, uint64_t addr, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void uf_log(engine_t *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void uf_state_keep_areas(uf_state_t *st, const areas_t *as);
uint64_t uf_log_begin(engine_t *e, const uf_rec_t *r);
void uf_log_end(engine_t *e, uint64_t seq, const uf_rec_t *done);
void uf_observe_latency(engine_t *e, uint64_t ns);
void uf_inflight(engine_t *e, int slot, uint64_t src_off, uint64_t len, uint64_t addr);
int uf_marked(const uf_mark_t *marks, uint64_t n, uint64_t off, uint64_t len);

/* engine_source.c */
#define IR_SKIP_INSTALLED 1
#define IR_DONTWAKE 2
#define NO_WAKE UINT64_MAX
void uf_source_willneed(engine_t *e, uint64_t at, uint64_t len);
int uf_install_range(engine_t *e, worker_t *w, uctx_t *c, area_t *a, uint64_t off, uint64_t n,
                     int flags, int cause, uint64_t wake_off, uint64_t *installed);
int uf_install_ranges(engine_t *e, worker_t *w, uctx_t *c, area_t *a, const uint64_t *ranges,
                      int nranges, int flags, int cause, uint64_t wake_off, uint64_t *installed);
int uf_worker_buffers(engine_t *e, worker_t *w);
void uf_worker_free(worker_t *w);
void uf_worker_python(engine_t *e, worker_t *w, int enter);
const char *uf_cause_name(int cause);
int uf_take_exception(char *msg, size_t len);

/* engine_budget.c */
void uf_page_in(engine_t *e, uctx_t *c, uint64_t p);
int uf_reactivate(engine_t *e, uctx_t *c, area_t *a, uint64_t off, pid_t tid, int *err);
int uf_park(engine_t *e, uctx_t *c, uint64_t addr, pid_t tid);
int uf_throttle(engine_t *e, uctx_t *c, uint64_t addr, uint64_t pages, pid_t tid, uint64_t *reserved);
int uf_reserve(engine_t *e, uint64_t pages, uint64_t limit);
uint64_t uf_room_below_high(engine_t *e);
int uf_take_room(engine_t *e, uint64_t *len, uint64_t *room);
void uf_unreserve(engine_t *e, uint64_t pages);
void uf_page_out(engine_t *e, uctx_t *c, uint64_t p, int zero);
void uf_refill(engine_t *e, uctx_t *c, uint64_t p);
int uf_budget_alloc(engine_t *e, uctx_t *c);
int uf_evictor_start(engine_t *e);
void uf_evictor_stop(engine_t *e);
int uf_target_madvise(engine_t *e, uint64_t addr, uint64_t len, int advice);
int uf_ask_target(engine_t *e, int op, uint64_t addr, uint64_t len, uint64_t arg);
int uf_deactivate_local(char *pool_map, uint64_t addr, uint64_t len, uint64_t pool_off, int advice);

/* engine_write.c */
int uf_write_alloc(engine_t *e, uctx_t *c);
void uf_wp_fault(engine_t *e, uctx_t *c, area_t *a, uint64_t off);
int uf_writeback(engine_t *e, worker_t *w, uctx_t *c, uint64_t first, uint64_t n, uint64_t *bytes,
                 uint8_t *written);
int uf_flush(engine_t *e, worker_t *w, uint64_t *pages, uint64_t *bytes);
int uf_hold(engine_t *e, uctx_t *c, uint64_t p);
void uf_release(engine_t *e, uctx_t *c, uint64_t first, uint64_t n, int dropped);

/* engine_trace.c */
void uf_trace(engine_t *e, const uf_rec_t *r);
void uf_trace_install(engine_t *e, uint64_t t0, area_t *a, uint64_t off, uint64_t len, int cause);
int uf_trace_start(engine_t *e);
void uf_trace_stop(engine_t *e);
void uf_trace_sync(engine_t *e);

/* engine_serve.c */
area_t *uf_find_area(areas_t *as, uint64_t addr);
int uf_engine_start(engine_t *e);
void uf_engine_stop(engine_t *e);
uctx_t *uf_ctx_new(engine_t *e, int uffd, const areas_t *areas, int own_fd, const uctx_t *from);
void uf_ctx_free_all(engine_t *e);
void uf_orphan_children(engine_t *e);
int uf_prefetch(engine_t *e, worker_t *w, const uint64_t *ranges, Py_ssize_t n, uint64_t *installed);
int uf_willneed(engine_t *e, const uint64_t *ranges, Py_ssize_t n, uint64_t *queued);
void uf_wake_all(engine_t *e);      /* every thread blocked on the areas */
void uf_wake_anywhere(engine_t *e); /* every thread blocked on the uffds, anywhere */
void uf_jobs_init(engine_t *e);

#endif
