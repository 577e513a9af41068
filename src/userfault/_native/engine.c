/* The fault engine: C threads that serve userfaultfd events without ever taking the GIL.
 *
 * An engine serves one uffd whose registered "areas" (dst address, length, source offset) map
 * onto one source: zero, a repeating pattern, memory (a buffer or a read-only file mapping) or
 * a cycle of byte values (the man-page demo). Pages are installed with COPY, ZEROPAGE, MOVE
 * (from a per-thread staging buffer) or CONTINUE (after filling a memfd's page cache).
 * Policy: a chunk per fault, adaptive sequential readahead, background populate, prefetch.
 * Everything the threads touch is plain C; Python reads counters and the fault log. */
#define _GNU_SOURCE
#include "native.h"
#include "compat.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

enum { SRC_ZERO, SRC_PATTERN, SRC_MEMORY, SRC_CYCLE };
enum { INST_COPY, INST_ZEROPAGE, INST_MOVE, INST_CONTINUE };
#define HIST_BUCKETS 40
#define MAX_LOG (1ull << 22) /* fault log records (48 bytes each) */
#define MSG_BATCH 64
#define PIECE (256u << 10) /* readahead and populate install unit */

typedef struct {
    uint64_t base, len, src_off;
    uint64_t first_page; /* index of this area's first page in the bitmaps */
} area_t;

typedef struct {
    uint64_t addr, src_off, flags, tid, t_ns, service_ns;
} fault_rec_t;

typedef struct engine engine_t;

typedef struct {
    engine_t *e;
    pthread_t thread;
    char *bounce;  /* page tails, cycles */
    char *staging_map; /* MOVE staging mapping ... */
    char *staging;     /* ... used from its 2 MiB-aligned start */
} worker_t;

struct engine {
    int uffd, stopfd, memfd, src_fd;
    int kind, install, poison_on_error, started, released;
    int nthreads;   /* fault-serving threads */
    int nworkers;   /* ... plus the background thread when readahead or populate is on */
    int nstarted;   /* threads running */
    int stopping;   /* under lock: the background thread exits */
    pthread_cond_t work_cond; /* under lock: readahead or populate work was queued */
    pthread_mutex_t stop_lock; /* serializes stop_threads */
    uint64_t page, chunk, ra_min, ra_max, unit_max;
    area_t *areas;
    int nareas;
    uint64_t npages;
    uint8_t *installed, *removed; /* bitmaps, one bit per page */
    const char *src;
    uint64_t src_len;
    char *pattern; /* period pat_len, stored unit_max + pat_len long */
    uint64_t pat_len;
    char *zero;
    unsigned char *cycle;
    uint64_t cycle_len;
    worker_t *workers;

    pthread_mutex_t lock; /* readahead, populate cursor, fault log, error, CONTINUE fills */
    int ra_area;
    uint64_t ra_next, ra_end, ra_window, last_end;
    int pop_area;
    uint64_t pop_next;
    int populate;

    fault_rec_t *log;
    uint64_t log_cap, log_written, log_read, log_dropped; /* absolute sequence numbers */

    int err, err_addr_set;
    const char *err_op;
    uint64_t err_addr;

    /* counters: relaxed atomics, read by stats() at any time */
    uint64_t faults, write_faults, minor_faults, wp_faults, bytes, fault_bytes, readahead_bytes,
        populate_bytes, prefetch_bytes, eexist, eagain, poisoned, ev_remove, ev_unmap, ev_remap,
        ev_fork, service_ns, service_max_ns, hist[HIST_BUCKETS], cycle_next;
};

#define ADD(field, v) __atomic_add_fetch(&(field), (v), __ATOMIC_RELAXED)
#define GET(field) __atomic_load_n(&(field), __ATOMIC_RELAXED)

static int bit_get(uint8_t *bm, uint64_t i) { return (__atomic_load_n(&bm[i >> 3], __ATOMIC_RELAXED) >> (i & 7)) & 1; }
static void bit_set(uint8_t *bm, uint64_t i) { __atomic_fetch_or(&bm[i >> 3], (uint8_t)(1u << (i & 7)), __ATOMIC_RELAXED); }
static void bit_clear(uint8_t *bm, uint64_t i) { __atomic_fetch_and(&bm[i >> 3], (uint8_t)~(1u << (i & 7)), __ATOMIC_RELAXED); }

static void record_error(engine_t *e, int err, const char *op, uint64_t addr)
{
    pthread_mutex_lock(&e->lock);
    if (!e->err) {
        e->err = err;
        e->err_op = op;
        e->err_addr = addr;
    }
    pthread_mutex_unlock(&e->lock);
}

static area_t *find_area(engine_t *e, uint64_t addr)
{
    for (int i = 0; i < e->nareas; i++)
        if (addr - e->areas[i].base < e->areas[i].len)
            return &e->areas[i];
    return NULL;
}

/* Read n bytes of the source at offset `off` into dst (bounce, staging) with zeros past the
 * end. Files are read with pread so a truncated file is an error, not a SIGBUS. */
static int fill_from_source(engine_t *e, char *dst, uint64_t off, uint64_t n)
{
    switch (e->kind) {
    case SRC_ZERO:
        memset(dst, 0, n);
        return 0;
    case SRC_PATTERN:
        memcpy(dst, e->pattern + off % e->pat_len, n);
        return 0;
    case SRC_CYCLE: {
        uint64_t i = ADD(e->cycle_next, 1) - 1;
        memset(dst, e->cycle[i % e->cycle_len], n);
        return 0;
    }
    }
    uint64_t avail = off < e->src_len ? e->src_len - off : 0;
    if (avail > n)
        avail = n;
    if (e->src_fd >= 0) {
        uint64_t got = 0;
        while (got < avail) {
            ssize_t r = pread(e->src_fd, dst + got, avail - got, (off_t)(off + got));
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                return r < 0 ? errno : EIO; /* short file: never serve zeros for data */
            got += (uint64_t)r;
        }
    } else {
        memcpy(dst, e->src + off, avail);
    }
    memset(dst + avail, 0, n - avail);
    return 0;
}

/* A pointer to n source bytes at `off`, without copying where the source allows it. */
static const char *source_ptr(engine_t *e, worker_t *w, uint64_t off, uint64_t n, int *err)
{
    *err = 0;
    if (e->kind == SRC_ZERO)
        return e->zero;
    if (e->kind == SRC_PATTERN)
        return e->pattern + off % e->pat_len;
    if (e->kind == SRC_MEMORY && off + n <= e->src_len)
        return e->src + off;
    if (!w->bounce && !(w->bounce = malloc(e->unit_max))) { /* only sources that need one */
        *err = ENOMEM;
        return NULL;
    }
    *err = fill_from_source(e, w->bounce, off, n);
    return w->bounce;
}

/* Fill the memfd page cache for the pages of [off, off+n) that are not resident yet, so that
 * UFFDIO_CONTINUE can map them. Resident pages are never written: they may hold user data.
 * mincore() works in windows of PIECE bytes: a chunk may be larger than one window. */
/* Write the source into the holes of the memfd's page cache within [off, off+n), so that
 * UFFDIO_CONTINUE can map them. Holes are found with SEEK_HOLE/SEEK_DATA, which count pages
 * swapped out as data: a page that exists, cached or swapped, may hold user data and is never
 * written. (mincore would report a swapped-out page as absent.) The memfd backs the region
 * from offset 0, so area offsets are file offsets (Pager maps one area per memfd). */
static int fill_page_cache(engine_t *e, worker_t *w, area_t *a, uint64_t off, uint64_t n, int zero)
{
    uint64_t end = off + n;
    while (off < end) {
        off_t hole = lseek(e->memfd, (off_t)off, SEEK_HOLE);
        if (hole < 0)
            return errno == ENXIO ? 0 : errno; /* ENXIO: past the end of the file */
        if ((uint64_t)hole >= end)
            return 0;
        off_t data = lseek(e->memfd, hole, SEEK_DATA);
        uint64_t stop = data < 0 ? end : (uint64_t)data < end ? (uint64_t)data : end;
        if (data < 0 && errno != ENXIO)
            return errno;
        uint64_t roff = (uint64_t)hole & ~(uint64_t)4095, rlen = stop - roff;
        int err = 0;
        const char *p = zero ? e->zero : source_ptr(e, w, a->src_off + roff, rlen, &err);
        if (err)
            return err;
        for (uint64_t done = 0; done < rlen;) {
            ssize_t r = pwrite(e->memfd, p + done, rlen - done, (off_t)(roff + done));
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                return r < 0 ? errno : EIO;
            done += (uint64_t)r;
        }
        off = stop;
    }
    return 0;
}

/* One install ioctl for area offset [off, off+n). Returns bytes installed; *err is 0, EEXIST
 * (stopped at a present page), EAGAIN, or a fatal errno. */
static uint64_t install_once(engine_t *e, worker_t *w, area_t *a, uint64_t off, uint64_t n,
                             int zero, int dontwake, int *err)
{
    uint64_t dst = a->base + off, src_off = a->src_off + off;
    long long done = 0;
    *err = 0;
    if ((zero || e->kind == SRC_ZERO) && e->install == INST_ZEROPAGE) {
        struct uffdio_zeropage z = {.range = {dst, n}, .mode = dontwake ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0};
        *err = uf_ioctl(e->uffd, UFFDIO_ZEROPAGE, &z);
        done = z.zeropage;
    } else if (e->install == INST_CONTINUE) {
        pthread_mutex_lock(&e->lock);
        *err = fill_page_cache(e, w, a, off, n, zero);
        if (!*err) {
            struct uffdio_continue c = {.range = {dst, n}, .mode = dontwake ? UFFDIO_CONTINUE_MODE_DONTWAKE : 0};
            *err = uf_ioctl(e->uffd, UFFDIO_CONTINUE, &c);
            done = c.mapped;
        }
        pthread_mutex_unlock(&e->lock);
    } else if (e->install == INST_MOVE && !zero) {
        *err = fill_from_source(e, w->staging, src_off, n);
        if (!*err) {
            struct uffdio_move m = {.dst = dst, .src = (uintptr_t)w->staging, .len = n,
                                    .mode = dontwake ? UFFDIO_MOVE_MODE_DONTWAKE : 0};
            *err = uf_ioctl(e->uffd, UFFDIO_MOVE, &m);
            done = m.move;
        }
    } else {
        const char *p = zero ? e->zero : source_ptr(e, w, src_off, n, err);
        if (!*err) {
            struct uffdio_copy c = {.dst = dst, .src = (uintptr_t)p, .len = n,
                                    .mode = dontwake ? UFFDIO_COPY_MODE_DONTWAKE : 0};
            *err = uf_ioctl(e->uffd, UFFDIO_COPY, &c);
            done = c.copy;
        }
    }
    if (!*err)
        return n;
    return done > 0 ? (uint64_t)done : 0;
}

#define NO_WAKE UINT64_MAX

/* Install [off, off+n) of area a, page by page skipping what is present. With skip_installed,
 * pages already marked installed are left alone (readahead, populate, prefetch). The page at
 * wake_off is woken if it was found present (EEXIST): the COPY that installs a page wakes it,
 * a skipped one must be woken by hand. Returns 0 or the first error other than EEXIST;
 * *installed gets bytes installed by this call. */

static int install_range(engine_t *e, worker_t *w, area_t *a, uint64_t off, uint64_t n,
                         int skip_installed, int dontwake, uint64_t wake_off, uint64_t *installed)
{
    uint64_t end = off + n;
    *installed = 0;
    while (off < end) {
        uint64_t p = a->first_page + off / e->page;
        if (skip_installed && bit_get(e->installed, p)) {
            off += e->page;
            continue;
        }
        int zero = bit_get(e->removed, p);
        uint64_t run = off + e->page;
        while (run < end && run - off < e->unit_max) {
            uint64_t q = a->first_page + run / e->page;
            if ((skip_installed && bit_get(e->installed, q)) || bit_get(e->removed, q) != zero)
                break;
            run += e->page;
        }
        int err;
        uint64_t done = install_once(e, w, a, off, run - off, zero, dontwake, &err);
        for (uint64_t i = 0; i < done / e->page; i++)
            bit_set(e->installed, p + i);
        *installed += done;
        off += done;
        if (err == EAGAIN && done) {
            /* The kernel reports a short install as EAGAIN with the bytes done, whatever
             * stopped it (mostly EEXIST: another thread installed the next page). Go on
             * from there: the next ioctl returns the real error with nothing done. */
            continue;
        } else if (err == EEXIST) {
            ADD(e->eexist, 1);
            bit_set(e->installed, a->first_page + off / e->page);
            if (off == wake_off) { /* present already, but its faulting thread still waits */
                struct uffdio_range r = {a->base + off, e->page};
                uf_ioctl(e->uffd, UFFDIO_WAKE, &r);
            }
            off += e->page;
        } else if (err) {
            ADD(e->bytes, *installed);
            return err;
        }
    }
    ADD(e->bytes, *installed);
    return 0;
}

/* The fault log: a record is written before the fault is served, so the woken thread can
 * already read it; its service time is filled in afterwards if it was not drained yet. */
static uint64_t log_begin(engine_t *e, fault_rec_t *r)
{
    uint64_t seq = UINT64_MAX;
    if (!e->log_cap)
        return seq;
    pthread_mutex_lock(&e->lock);
    if (e->log_written - e->log_read == e->log_cap) {
        e->log_dropped++;
    } else {
        seq = e->log_written++;
        e->log[seq % e->log_cap] = *r;
    }
    pthread_mutex_unlock(&e->lock);
    return seq;
}

static void log_end(engine_t *e, uint64_t seq, uint64_t service_ns)
{
    if (seq == UINT64_MAX)
        return;
    pthread_mutex_lock(&e->lock);
    if (seq >= e->log_read)
        e->log[seq % e->log_cap].service_ns = service_ns;
    pthread_mutex_unlock(&e->lock);
}

static void observe_latency(engine_t *e, uint64_t ns)
{
    ADD(e->service_ns, ns);
    int b = ns ? 63 - __builtin_clzll(ns) : 0;
    ADD(e->hist[b < HIST_BUCKETS ? b : HIST_BUCKETS - 1], 1);
    uint64_t cur = GET(e->service_max_ns);
    while (ns > cur && !__atomic_compare_exchange_n(&e->service_max_ns, &cur, ns, 1,
                                                    __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
}

/* A fault at `off` in area a: grow the readahead window if it continues the last one. */
static void update_readahead(engine_t *e, area_t *a, uint64_t off, uint64_t end)
{
    if (!e->ra_max)
        return;
    pthread_mutex_lock(&e->lock);
    int ai = (int)(a - e->areas);
    int sequential = ai == e->ra_area && off >= e->last_end - (e->last_end > e->chunk ? e->chunk : e->last_end)
                     && off <= e->ra_end + e->chunk;
    if (sequential) {
        uint64_t grown = e->ra_window * 2;
        e->ra_window = grown < e->ra_min ? e->ra_min : grown > e->ra_max ? e->ra_max : grown;
        e->ra_area = ai;
        if (e->ra_next < end)
            e->ra_next = end;
        e->ra_end = end + e->ra_window > a->len ? a->len : end + e->ra_window;
    } else {
        e->ra_window = 0; /* a random fault resets readahead */
        e->ra_area = ai;
        e->ra_next = e->ra_end = end;
    }
    e->last_end = end;
    if (e->ra_next < e->ra_end)
        pthread_cond_signal(&e->work_cond);
    pthread_mutex_unlock(&e->lock);
}

static void serve_fault(engine_t *e, worker_t *w, struct uffd_msg *m, uint64_t t0)
{
    uint64_t addr = m->arg.pagefault.address, flags = m->arg.pagefault.flags;
    area_t *a = find_area(e, addr);
    ADD(e->faults, 1);
    if (flags & UFFD_PAGEFAULT_FLAG_WRITE)
        ADD(e->write_faults, 1);
    if (flags & UFFD_PAGEFAULT_FLAG_WP)
        ADD(e->wp_faults, 1);
    if (!a) {
        /* Registered but not ours to serve. Waking would only make the thread fault again at
         * once (a busy loop): poison it, so the access fails loudly, or leave it blocked. */
        struct uffdio_poison p = {.range = {addr & ~(e->page - 1), e->page}};
        record_error(e, EFAULT, "fault outside every area", addr);
        if (e->poison_on_error && !uf_ioctl(e->uffd, UFFDIO_POISON, &p))
            ADD(e->poisoned, 1);
        return;
    }
    uint64_t page_off = (addr - a->base) & ~(e->page - 1);
    int err = 0;
    uint64_t got = 0;
    fault_rec_t rec = {addr, a->src_off + page_off, flags, m->arg.pagefault.feat.ptid, t0, 0};
    uint64_t seq = log_begin(e, &rec);
    if (flags & UFFD_PAGEFAULT_FLAG_MINOR) {
        /* Page cache already holds the page: just map it. */
        ADD(e->minor_faults, 1);
        struct uffdio_continue c = {.range = {a->base + page_off, e->page}};
        err = uf_ioctl(e->uffd, UFFDIO_CONTINUE, &c);
        if (!err) {
            /* ours: counted like any install (a page another thread cached, not mapped yet) */
            got = e->page;
            ADD(e->bytes, got);
        } else if (err == EEXIST) { /* mapped by another thread meanwhile: ours still waits */
            ADD(e->eexist, 1);
            err = uf_ioctl(e->uffd, UFFDIO_WAKE, &c.range);
        }
        if (!err)
            bit_set(e->installed, a->first_page + page_off / e->page);
    } else {
        uint64_t off = page_off - page_off % e->chunk, n = e->chunk;
        if (off + n > a->len)
            n = a->len - off;
        /* A successful COPY wakes what it installed; install_range wakes the faulting page
         * itself if someone else had installed it (EEXIST). */
        err = install_range(e, w, a, off, n, 0, 0, page_off, &got);
        if (!err)
            update_readahead(e, a, off, off + n);
    }
    if (err == EAGAIN) {
        /* The mapping is changing (a REMOVE or REMAP event is pending): wake the thread so it
         * faults again once the event is read; the new fault is served then. */
        struct uffdio_range r = {a->base + page_off, e->page};
        ADD(e->eagain, 1);
        uf_ioctl(e->uffd, UFFDIO_WAKE, &r);
    } else if (err == ENOENT || err == ESRCH) {
        /* The range was unregistered or its process exited: nobody waits any more. */
    } else if (err) {
        record_error(e, err, "serving a fault", addr);
        if (e->poison_on_error) {
            /* Never let an unservable page read as zeros: the access gets SIGBUS instead. */
            struct uffdio_poison p = {.range = {a->base + page_off, e->page}};
            if (!uf_ioctl(e->uffd, UFFDIO_POISON, &p))
                ADD(e->poisoned, 1);
        }
    }
    ADD(e->fault_bytes, got);
    uint64_t t1 = uf_now_ns();
    observe_latency(e, t1 - t0);
    log_end(e, seq, t1 - t0);
}

static void clear_range(engine_t *e, uint64_t start, uint64_t end, int removed)
{
    for (int i = 0; i < e->nareas; i++) {
        area_t *a = &e->areas[i];
        uint64_t s = start > a->base ? start : a->base, t = end < a->base + a->len ? end : a->base + a->len;
        for (uint64_t x = s; x < t; x += e->page) {
            uint64_t p = a->first_page + (x - a->base) / e->page;
            bit_clear(e->installed, p);
            if (removed)
                bit_set(e->removed, p); /* like anonymous memory, a removed page reads as zeros */
        }
    }
}

static void handle_event(engine_t *e, worker_t *w, struct uffd_msg *m, uint64_t t0)
{
    switch (m->event) {
    case UFFD_EVENT_PAGEFAULT:
        serve_fault(e, w, m, t0);
        break;
    case UFFD_EVENT_REMOVE:
        ADD(e->ev_remove, 1);
        clear_range(e, m->arg.remove.start, m->arg.remove.end, 1);
        break;
    case UFFD_EVENT_UNMAP:
        ADD(e->ev_unmap, 1);
        clear_range(e, m->arg.remove.start, m->arg.remove.end, 0);
        break;
    case UFFD_EVENT_REMAP:
        ADD(e->ev_remap, 1);
        pthread_mutex_lock(&e->lock);
        for (int i = 0; i < e->nareas; i++)
            if (e->areas[i].base == m->arg.remap.from && e->areas[i].len == m->arg.remap.len)
                e->areas[i].base = m->arg.remap.to; /* follow a whole-area mremap */
        pthread_mutex_unlock(&e->lock);
        break;
    case UFFD_EVENT_FORK:
        /* The engine serves its own process only; the child's uffd is closed, so the child's
         * copy of missing pages behaves as unregistered memory. */
        ADD(e->ev_fork, 1);
        close((int)m->arg.fork.ufd);
        break;
    }
}

/* Claim the next piece of background work: readahead first, then populate. */
static int claim_piece(engine_t *e, area_t **a, uint64_t *off, uint64_t *n, int *is_ra)
{
    /* At least a page: pieces of a 2 MiB hugetlb page would start mid-page, and an install
     * there (when the page is not marked installed yet) is EINVAL. */
    uint64_t piece = e->page > PIECE ? e->page : PIECE;
    int found = 0;
    pthread_mutex_lock(&e->lock);
    if (e->ra_next < e->ra_end) {
        *a = &e->areas[e->ra_area];
        *off = e->ra_next;
        *n = e->ra_end - e->ra_next < piece ? e->ra_end - e->ra_next : piece;
        e->ra_next += *n;
        *is_ra = 1;
        found = 1;
    } else {
        while (e->populate && e->pop_area < e->nareas) {
            area_t *pa = &e->areas[e->pop_area];
            if (e->pop_next >= pa->len) {
                e->pop_area++;
                e->pop_next = 0;
                continue;
            }
            *a = pa;
            *off = e->pop_next;
            *n = pa->len - e->pop_next < piece ? pa->len - e->pop_next : piece;
            e->pop_next += *n;
            *is_ra = 0;
            found = 1;
            break;
        }
    }
    pthread_mutex_unlock(&e->lock);
    return found;
}

/* A fault thread: serves events as they come, and nothing else, so a fault never waits
 * behind background work. */
static void *worker_main(void *arg)
{
    worker_t *w = arg;
    engine_t *e = w->e;
    struct uffd_msg msgs[MSG_BATCH];
    for (;;) {
        struct pollfd p[2] = {{.fd = e->uffd, .events = POLLIN}, {.fd = e->stopfd, .events = POLLIN}};
        int r = poll(p, 2, -1);
        if (r < 0 && errno != EINTR) {
            record_error(e, errno, "poll", 0);
            break;
        }
        if (p[1].revents || (p[0].revents & (POLLERR | POLLNVAL)))
            break;
        for (;;) {
            ssize_t got = read(e->uffd, msgs, sizeof(msgs));
            uint64_t t0 = uf_now_ns();
            if (got <= 0) {
                if (got < 0 && errno != EAGAIN && errno != EINTR) {
                    record_error(e, errno, "read", 0);
                    return NULL;
                }
                break;
            }
            /* Non-fault events first: a REMOVE read here lets COPYs into its range succeed
             * again, so its pages must be marked removed before any fault of the batch (or
             * background install) fills them with source data. */
            size_t count = (size_t)got / sizeof(msgs[0]);
            for (size_t i = 0; i < count; i++)
                if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                    handle_event(e, w, &msgs[i], t0);
            for (size_t i = 0; i < count; i++)
                if (msgs[i].event == UFFD_EVENT_PAGEFAULT)
                    handle_event(e, w, &msgs[i], t0);
        }
        if (GET(e->err) == ESRCH)
            break;
    }
    return NULL;
}

static int has_background_work(engine_t *e)
{
    return e->ra_next < e->ra_end || (e->populate && e->pop_area < e->nareas);
}

/* The background thread: readahead first, then populate, a piece at a time. It never polls the
 * uffd (so a fault wakes one fault thread only), and its copies run beside the fault threads':
 * a sequential reader gets two copying threads. */
static void *background_main(void *arg)
{
    worker_t *w = arg;
    engine_t *e = w->e;
    for (;;) {
        area_t *a;
        uint64_t off, n, done;
        int is_ra;
        pthread_mutex_lock(&e->lock);
        while (!e->stopping && !has_background_work(e))
            pthread_cond_wait(&e->work_cond, &e->lock);
        int stopping = e->stopping;
        pthread_mutex_unlock(&e->lock);
        if (stopping)
            break;
        if (!claim_piece(e, &a, &off, &n, &is_ra))
            continue;
        int err = install_range(e, w, a, off, n, 1, 0, NO_WAKE, &done);
        ADD(*(is_ra ? &e->readahead_bytes : &e->populate_bytes), done);
        if (err == EAGAIN) {
            ADD(e->eagain, 1);
        } else if (err && err != ENOENT) {
            record_error(e, err, is_ra ? "readahead" : "populate", a->base + off);
            if (err == ESRCH)
                break;
        }
    }
    return NULL;
}

/* ---- the Python type ---------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    engine_t *e;
    Py_buffer src_view; /* keeps a buffer source alive and pinned */
    int has_view;
    int prefetching; /* prefetch calls in flight (changed with the GIL held) */
} EngineObject;

/* Staging buffers are used at their 2 MiB-aligned start. */
static char *staging_start(char *p) { return (char *)(((uintptr_t)p + (2u << 20) - 1) & ~(uintptr_t)((2u << 20) - 1)); }

static void engine_free(engine_t *e)
{
    if (!e)
        return;
    if (e->stopfd >= 0)
        close(e->stopfd);
    for (int i = 0; e->workers && i < e->nworkers; i++) {
        free(e->workers[i].bounce);
        if (e->workers[i].staging_map)
            munmap(e->workers[i].staging_map, e->unit_max + (2u << 20));
    }
    free(e->workers);
    free(e->areas);
    free(e->installed);
    free(e->removed);
    free(e->pattern);
    free(e->zero);
    free(e->cycle);
    free(e->log);
    pthread_mutex_destroy(&e->lock);
    pthread_mutex_destroy(&e->stop_lock);
    pthread_cond_destroy(&e->work_cond);
    free(e);
}

static void stop_threads(engine_t *e)
{
    pthread_mutex_lock(&e->stop_lock); /* two Python threads may call stop() at once */
    if (!e->started) {
        pthread_mutex_unlock(&e->stop_lock);
        return;
    }
    pthread_mutex_lock(&e->lock);
    e->stopping = 1;
    pthread_cond_broadcast(&e->work_cond);
    pthread_mutex_unlock(&e->lock);
    uint64_t one = 1;
    if (write(e->stopfd, &one, sizeof(one)) < 0) {
        /* an eventfd write only fails on overflow, which cannot happen with one write */
    }
    for (int i = 0; i < e->nstarted; i++)
        pthread_join(e->workers[i].thread, NULL);
    if (read(e->stopfd, &one, sizeof(one)) < 0) {
        /* drained: a restarted engine must not see the old stop request */
    }
    e->nstarted = 0;
    e->started = 0;
    pthread_mutex_unlock(&e->stop_lock);
}

static void Engine_dealloc(EngineObject *self)
{
    if (self->e) {
        Py_BEGIN_ALLOW_THREADS
        stop_threads(self->e);
        Py_END_ALLOW_THREADS
        engine_free(self->e);
    }
    if (self->has_view)
        PyBuffer_Release(&self->src_view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int parse_areas(engine_t *e, PyObject *areas)
{
    PyObject *seq = PySequence_Fast(areas, "areas must be a sequence of (address, length, source_offset)");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > 4096) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "an engine serves between 1 and 4096 areas");
        return -1;
    }
    e->areas = calloc((size_t)n, sizeof(area_t));
    if (!e->areas) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    e->nareas = (int)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        area_t *a = &e->areas[i];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KKK;area must be (address, length, source_offset)",
                              &a->base, &a->len, &a->src_off)) {
            Py_DECREF(seq);
            return -1;
        }
        if (a->base % e->page || a->len % e->page || !a->len) {
            Py_DECREF(seq);
            PyErr_Format(PyExc_ValueError, "area %zd is not a non-empty range aligned to %llu bytes",
                         i, (unsigned long long)e->page);
            return -1;
        }
        a->first_page = e->npages;
        e->npages += a->len / e->page;
    }
    Py_DECREF(seq);
    return 0;
}

static int Engine_init(EngineObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"uffd", "areas", "page_size", "source", "install", "data", "src_fd",
                             "pattern", "cycle", "memfd", "chunk", "readahead_min", "readahead_max",
                             "populate", "threads", "log_capacity", "poison_on_error", NULL};
    int uffd, kind, install, src_fd = -1, memfd = -1, populate = 0, threads = 1, poison = 1;
    unsigned long long page, chunk = 0, ra_min = 0, ra_max = 0, log_cap = 0;
    PyObject *areas, *data = Py_None;
    Py_buffer pat = {0}, cyc = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iOKii|Oiy*y*iKKKpiKp", kwlist, &uffd, &areas, &page,
                                     &kind, &install, &data, &src_fd, &pat, &cyc, &memfd, &chunk,
                                     &ra_min, &ra_max, &populate, &threads, &log_cap, &poison))
        return -1;
    if (self->e) {
        PyErr_SetString(PyExc_RuntimeError, "an engine is initialised once");
        return -1;
    }
    if (log_cap > MAX_LOG) {
        PyErr_Format(PyExc_ValueError, "log_capacity is at most %llu records", (unsigned long long)MAX_LOG);
        return -1;
    }
    engine_t *e = calloc(1, sizeof(*e));
    if (!e) {
        PyErr_NoMemory();
        return -1;
    }
    int ok = 0;
    e->stopfd = -1;
    pthread_mutex_init(&e->lock, NULL);
    pthread_mutex_init(&e->stop_lock, NULL);
    pthread_cond_init(&e->work_cond, NULL);
    e->uffd = uffd;
    e->page = page;
    e->kind = kind;
    e->install = install;
    e->src_fd = src_fd;
    e->memfd = memfd;
    e->chunk = chunk ? chunk : page;
    e->ra_min = ra_min;
    e->ra_max = ra_max;
    e->populate = populate;
    e->nthreads = threads;
    e->poison_on_error = poison;
    if (page < 4096 || (page & (page - 1)) || e->chunk % page || threads < 1 || threads > 64) {
        PyErr_SetString(PyExc_ValueError, "bad page size, chunk (a multiple of the page size) or thread count (1..64)");
        goto done;
    }
    if (parse_areas(e, areas) < 0)
        goto done;
    e->unit_max = e->chunk > PIECE ? e->chunk : PIECE;
    if (e->unit_max < page)
        e->unit_max = page;
    e->installed = calloc(e->npages / 8 + 1, 1);
    e->removed = calloc(e->npages / 8 + 1, 1);
    e->zero = calloc(1, e->unit_max);
    if (!e->installed || !e->removed || !e->zero) {
        PyErr_NoMemory();
        goto done;
    }
    if (kind == SRC_PATTERN) {
        if (!pat.len) {
            PyErr_SetString(PyExc_ValueError, "the pattern must not be empty");
            goto done;
        }
        e->pat_len = (uint64_t)pat.len;
        e->pattern = malloc(e->unit_max + e->pat_len);
        if (!e->pattern) {
            PyErr_NoMemory();
            goto done;
        }
        for (uint64_t i = 0; i < e->unit_max + e->pat_len; i++)
            e->pattern[i] = ((char *)pat.buf)[i % e->pat_len];
    } else if (kind == SRC_CYCLE) {
        if (!cyc.len) {
            PyErr_SetString(PyExc_ValueError, "the cycle must not be empty");
            goto done;
        }
        e->cycle_len = (uint64_t)cyc.len;
        e->cycle = malloc(e->cycle_len);
        if (!e->cycle) {
            PyErr_NoMemory();
            goto done;
        }
        memcpy(e->cycle, cyc.buf, e->cycle_len);
    } else if (kind == SRC_MEMORY) {
        if (PyObject_GetBuffer(data, &self->src_view, PyBUF_SIMPLE) < 0)
            goto done;
        self->has_view = 1;
        e->src = self->src_view.buf;
        e->src_len = (uint64_t)self->src_view.len;
    }
    if (log_cap && !(e->log = calloc(log_cap, sizeof(fault_rec_t)))) {
        PyErr_NoMemory();
        goto done;
    }
    e->log_cap = log_cap;
    e->nworkers = threads + 2 * (ra_max > 0 || populate); /* + two background copiers */
    e->workers = calloc((size_t)e->nworkers, sizeof(worker_t));
    if (!e->workers) {
        PyErr_NoMemory();
        goto done;
    }
    for (int i = 0; i < e->nworkers; i++) {
        worker_t *w = &e->workers[i];
        w->e = e;
        if (install == INST_MOVE) {
            /* 2 MiB-aligned so whole-PMD moves of transparent huge pages are possible. */
            char *p = mmap(NULL, e->unit_max + (2u << 20), PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) {
                PyErr_SetFromErrno(PyExc_OSError);
                goto done;
            }
            w->staging_map = p;
            w->staging = staging_start(p);
            madvise(w->staging, e->unit_max, MADV_HUGEPAGE);
        }
    }
    e->stopfd = eventfd(0, EFD_CLOEXEC);
    if (e->stopfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    ok = 1;
done:
    if (pat.obj)
        PyBuffer_Release(&pat);
    if (cyc.obj)
        PyBuffer_Release(&cyc);
    if (!ok) {
        engine_free(e);
        return -1;
    }
    self->e = e;
    return 0;
}

/* Methods on an engine whose __init__ failed (or never ran) raise instead of crashing. */
#define ENGINE_OR_RAISE(self)                                                            \
    engine_t *e = (self)->e;                                                             \
    if (!e) {                                                                            \
        PyErr_SetString(PyExc_RuntimeError, "the engine was not initialised");           \
        return NULL;                                                                     \
    }

static PyObject *Engine_start(EngineObject *self, PyObject *unused)
{
    ENGINE_OR_RAISE(self)
    if (e->started) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is already running");
        return NULL;
    }
    if (e->released) {
        PyErr_SetString(PyExc_RuntimeError, "the engine was stopped and let go of its source");
        return NULL;
    }
    e->stopping = 0;
    for (int i = 0; i < e->nworkers; i++) {
        worker_t *w = &e->workers[i];
        int r = pthread_create(&w->thread, NULL, i < e->nthreads ? worker_main : background_main, w);
        if (r) {
            e->started = 1;
            stop_threads(e); /* the ones already running */
            errno = r;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        e->nstarted = i + 1;
    }
    e->started = 1;
    Py_RETURN_NONE;
}

/* stop() joins the threads and lets go of a buffer source at once: a stopped engine may stay
 * referenced for long (a traceback through prefetch keeps it alive) and must not keep the
 * source's buffer exported, or closing the source (mmap.close) fails. Counters and the log
 * stay readable; start and prefetch refuse afterwards. */
static void release_source(EngineObject *self)
{
    /* A prefetch running on another Python thread (GIL released) still reads the buffer: the
     * last one to finish lets go instead. */
    if (!self->has_view || self->prefetching)
        return;
    self->e->src = NULL;
    self->e->src_len = 0;
    PyBuffer_Release(&self->src_view);
    self->has_view = 0;
}

static PyObject *Engine_stop(EngineObject *self, PyObject *unused)
{
    ENGINE_OR_RAISE(self)
    Py_BEGIN_ALLOW_THREADS
    stop_threads(e);
    Py_END_ALLOW_THREADS
    if (self->has_view)
        e->released = 1;
    release_source(self);
    Py_RETURN_NONE;
}

/* prefetch([(source_offset, length), ...]) -> bytes installed. Installs every page of the
 * ranges that is not present yet with DONTWAKE, then wakes each touched area once. */
static PyObject *Engine_prefetch(EngineObject *self, PyObject *ranges)
{
    ENGINE_OR_RAISE(self)
    if (e->released) {
        PyErr_SetString(PyExc_RuntimeError, "the engine was stopped and let go of its source");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(ranges, "ranges must be a sequence of (source_offset, length)");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    unsigned long long *rs = PyMem_Malloc(sizeof(*rs) * 2 * (size_t)(n ? n : 1));
    if (!rs) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KK;range must be (source_offset, length)",
                              &rs[2 * i], &rs[2 * i + 1])) {
            PyMem_Free(rs);
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    self->prefetching++;
    uint64_t total = 0;
    int err = 0;
    uint64_t err_addr = 0;
    Py_BEGIN_ALLOW_THREADS
    worker_t w = {.e = e};
    if (e->install == INST_MOVE) {
        w.staging = mmap(NULL, e->unit_max + (2u << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (w.staging == MAP_FAILED)
            err = errno, w.staging = NULL;
    }
    char *staging_map = w.staging;
    if (w.staging) {
        w.staging = staging_start(w.staging);
        madvise(w.staging, e->unit_max, MADV_HUGEPAGE);
    }
    for (Py_ssize_t i = 0; !err && i < n; i++) {
        uint64_t s = rs[2 * i], end = rs[2 * i] + rs[2 * i + 1];
        for (int k = 0; !err && k < e->nareas; k++) {
            area_t *a = &e->areas[k];
            uint64_t lo = s > a->src_off ? s : a->src_off;
            uint64_t hi = end < a->src_off + a->len ? end : a->src_off + a->len;
            if (lo >= hi)
                continue;
            lo = (lo - a->src_off) & ~(e->page - 1);
            hi = ((hi - a->src_off) + e->page - 1) & ~(e->page - 1);
            for (uint64_t off = lo; !err && off < hi; off += e->unit_max) {
                uint64_t len = hi - off < e->unit_max ? hi - off : e->unit_max, done;
                err = install_range(e, &w, a, off, len, 1, 1, NO_WAKE, &done);
                total += done;
                if (err == EAGAIN) { /* a REMOVE is pending there: skip it, faults will decide */
                    ADD(e->eagain, 1);
                    err = 0;
                } else if (err) {
                    err_addr = a->base + off;
                }
            }
        }
    }
    for (int k = 0; k < e->nareas; k++) {
        struct uffdio_range r = {e->areas[k].base, e->areas[k].len};
        uf_ioctl(e->uffd, UFFDIO_WAKE, &r);
    }
    free(w.bounce);
    if (staging_map)
        munmap(staging_map, e->unit_max + (2u << 20));
    Py_END_ALLOW_THREADS
    self->prefetching--;
    if (e->released)
        release_source(self);
    PyMem_Free(rs);
    ADD(e->prefetch_bytes, total);
    return Py_BuildValue("KiK", (unsigned long long)total, err, (unsigned long long)err_addr);
}

static PyObject *Engine_stats(EngineObject *self, PyObject *unused)
{
    ENGINE_OR_RAISE(self)
    PyObject *hist = PyTuple_New(HIST_BUCKETS);
    for (int i = 0; i < HIST_BUCKETS; i++)
        PyTuple_SET_ITEM(hist, i, PyLong_FromUnsignedLongLong(GET(e->hist[i])));
    return Py_BuildValue(
        "{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:N}",
        "faults", GET(e->faults), "write_faults", GET(e->write_faults),
        "minor_faults", GET(e->minor_faults), "wp_faults", GET(e->wp_faults),
        "bytes_installed", GET(e->bytes), "fault_bytes", GET(e->fault_bytes),
        "readahead_bytes", GET(e->readahead_bytes), "populate_bytes", GET(e->populate_bytes),
        "prefetch_bytes", GET(e->prefetch_bytes), "eexist", GET(e->eexist),
        "eagain", GET(e->eagain), "poisoned", GET(e->poisoned), "remove_events", GET(e->ev_remove),
        "unmap_events", GET(e->ev_unmap), "remap_events", GET(e->ev_remap),
        "fork_events", GET(e->ev_fork), "service_ns", GET(e->service_ns),
        "service_max_ns", GET(e->service_max_ns), "latency_histogram", hist);
}

/* drain_log() -> bytes of packed records (6 x u64: addr, src_off, flags, tid, t_ns, service_ns). */
static PyObject *Engine_drain_log(EngineObject *self, PyObject *unused)
{
    ENGINE_OR_RAISE(self)
    pthread_mutex_lock(&e->lock);
    uint64_t n = e->log_written - e->log_read;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * sizeof(fault_rec_t)));
    if (out) {
        fault_rec_t *dst = (fault_rec_t *)PyBytes_AS_STRING(out);
        for (uint64_t i = 0; i < n; i++)
            dst[i] = e->log[(e->log_read + i) % e->log_cap];
        e->log_read = e->log_written;
    }
    pthread_mutex_unlock(&e->lock);
    return out;
}

/* error() -> None or (errno, operation, address); also the count of dropped log records. */
static PyObject *Engine_error(EngineObject *self, PyObject *unused)
{
    ENGINE_OR_RAISE(self)
    pthread_mutex_lock(&e->lock);
    int err = e->err;
    const char *op = e->err_op;
    uint64_t addr = e->err_addr;
    pthread_mutex_unlock(&e->lock);
    if (!err)
        Py_RETURN_NONE;
    return Py_BuildValue("isK", err, op, (unsigned long long)addr);
}

static PyObject *Engine_log_dropped(EngineObject *self, void *closure)
{
    ENGINE_OR_RAISE(self)
    pthread_mutex_lock(&e->lock);
    uint64_t d = e->log_dropped;
    pthread_mutex_unlock(&e->lock);
    return PyLong_FromUnsignedLongLong(d);
}

static PyObject *Engine_running(EngineObject *self, void *closure)
{
    ENGINE_OR_RAISE(self)
    return PyBool_FromLong(e->started);
}

static PyObject *Engine_memory(EngineObject *self, void *closure)
{
    ENGINE_OR_RAISE(self)
    uint64_t bytes = sizeof(*e) + e->nareas * sizeof(area_t) + 2 * (e->npages / 8 + 1) + e->unit_max
                     + (e->kind == SRC_PATTERN ? e->unit_max + e->pat_len : 0) + e->log_cap * sizeof(fault_rec_t);
    for (int i = 0; i < e->nworkers; i++) /* bounce buffers exist once a source needed them */
        bytes += sizeof(worker_t) + (e->workers[i].bounce ? e->unit_max : 0)
                 + (e->install == INST_MOVE ? e->unit_max : 0);
    return PyLong_FromUnsignedLongLong(bytes);
}

static PyMethodDef Engine_methods[] = {
    {"start", (PyCFunction)Engine_start, METH_NOARGS, "Start the handler threads."},
    {"stop", (PyCFunction)Engine_stop, METH_NOARGS, "Stop and join the handler threads."},
    {"prefetch", (PyCFunction)Engine_prefetch, METH_O, "prefetch(ranges) -> (bytes, errno, address)"},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, "Counters as a dict."},
    {"drain_log", (PyCFunction)Engine_drain_log, METH_NOARGS, "Take the logged fault records."},
    {"error", (PyCFunction)Engine_error, METH_NOARGS, "The first error, or None."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"running", (getter)Engine_running, NULL, "Whether the threads run.", NULL},
    {"log_dropped", (getter)Engine_log_dropped, NULL, "Fault records dropped on a full log.", NULL},
    {"memory_bytes", (getter)Engine_memory, NULL, "Heap the engine holds.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject userfault_EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "userfault._native.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "GIL-free fault-serving threads (configure through userfault.Pager).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};
