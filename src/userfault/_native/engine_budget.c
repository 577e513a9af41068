/* The resident budget: memory larger than RAM.
 *
 * Pages installed in the root context are counted. Above the high watermark an evictor thread
 * (no GIL) gives pages back until the low watermark: CLOCK, where a page installed since the
 * hand last passed it is spared once, so pages that keep faulting in stay. A page is given back
 * with madvise in the faulting process (MADV_DONTNEED, MADV_REMOVE for shared memory); its
 * next touch faults and is served from the source again.
 *
 * The evictor only marks its victims and calls madvise: the UFFD_EVENT_REMOVE that madvise
 * sends is read by a fault thread, which does the accounting before it serves any later fault
 * (so a page faulting straight back in is counted again, never lost from the count).
 *
 * The kernel shows userland no accessed bits, so the evictor makes its own: an unreferenced
 * page is first put on probation: copied into a pool (a memfd, at its page index) and dropped
 * from the memory; a touch faults and the page is installed straight back from the pool (no
 * source read: a reactivation). Only a page still in the pool when the hand comes round again
 * is freed (a hole punched in the pool). Hot pages stay. Fault threads read the pool directly,
 * so they never wait for the faulting process; only the evictor does (UFFDIO_MOVE, which
 * could move pages without copying, refuses to work across processes).
 *
 * madvise acts on the caller's own memory. In a pager process the engine asks the faulting
 * process to call it, through a one-slot mailbox in the shared state and two eventfds; the
 * faulting process's watchdog thread answers (engine_type.c). */
#define _GNU_SOURCE
#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

void uf_page_in(engine_t *e, uctx_t *c, uint64_t p)
{
    if (bit_test_set(c->installed, p) || !c->ref)
        return;
    bit_set(c->ref, p);
    uint64_t resident = ADD(e, resident_pages, 1);
    if (bit_test_clear(c->evicted, p))
        ADD(e, refaults, 1);
    if (resident > e->high_pages) {
        pthread_mutex_lock(&e->lock);
        pthread_cond_signal(&e->evict_cond);
        pthread_mutex_unlock(&e->lock);
    }
}

void uf_page_out(engine_t *e, uctx_t *c, uint64_t p, int zero)
{
    /* The REMOVE of a probation drop: the page stays counted, pooled, or installed back
     * already (another fault thread can serve the page's next fault before this one handles
     * the event: the page is back and maybe written, its dirty bit must stay). */
    if (c->deactivating && bit_test_clear(c->deactivating, p))
        return;
    if (c->inactive && bit_get(c->inactive, p))
        return; /* put on probation (the pool holds it), or dropped again while there */
    int ours = 0, back = 0;
    if (c->evicting && bit_get(c->evicting, p)) {
        pthread_mutex_lock(&e->budget_lock);
        ours = bit_test_clear(c->evicting, p);
        back = ours && bit_test_clear(c->refilled, p);
        pthread_mutex_unlock(&e->budget_lock);
    }
    if (back) {
        bit_clear(c->removed, p); /* installed again since the drop: it stays counted */
        return;
    }
    if (ours) {
        /* our own eviction: the page goes back to the source, whatever on_remove says */
        if (bit_test_clear(c->installed, p)) {
            ADD(e, resident_pages, -1);
            ADD(e, evictions, 1);
            bit_set(c->evicted, p);
        }
        bit_clear(c->ref, p);
        bit_clear(c->removed, p);
        return;
    }
    if (bit_test_clear(c->installed, p) && c->ref) {
        ADD(e, resident_pages, -1);
        bit_clear(c->ref, p);
    }
    if (c->dirty) { /* the process dropped what it wrote itself: nothing is left to keep */
        pthread_mutex_lock(&e->wp_lock);
        if (bit_test_clear(c->dirty, p))
            ADD(e, dirty_pages, -1);
        pthread_mutex_unlock(&e->wp_lock);
    }
    if (zero)
        bit_set(c->removed, p); /* like anonymous memory, a removed page reads as zeros */
    else
        bit_clear(c->removed, p);
}

/* Page p was installed (not found present). While its eviction's REMOVE is still to be
 * handled (another fault thread read it, the madvise dropped the page, this install put it
 * back), that handling must not count it out: it would stay present, uncounted, and never be
 * evicted again. Under budget_lock, as uf_page_out's test: one of the two comes first. */
void uf_refill(engine_t *e, uctx_t *c, uint64_t p)
{
    if (!c->evicting || !bit_get(c->evicting, p))
        return;
    pthread_mutex_lock(&e->budget_lock);
    if (bit_get(c->evicting, p))
        bit_set(c->refilled, p);
    pthread_mutex_unlock(&e->budget_lock);
}

/* The root context's budget bitmaps (under e->lock or before threads run). */
int uf_budget_alloc(engine_t *e, uctx_t *c)
{
    size_t n = c->npages / 8 + 1;
    c->ref = calloc(n, 1);
    c->evicting = calloc(n, 1);
    c->evicted = calloc(n, 1);
    c->refilled = calloc(n, 1);
    c->inactive = e->pool_map ? calloc(n, 1) : NULL;
    c->deactivating = e->pool_map ? calloc(n, 1) : NULL;
    c->pooled = e->pool_map ? calloc(n, 1) : NULL;
    return c->ref && c->evicting && c->evicted && c->refilled
           && (!e->pool_map || (c->inactive && c->deactivating && c->pooled)) ? 0 : ENOMEM;
}

/* Whether a fault of thread `tid` may be held back: never the evictor's own (its copies),
 * nor a flushing thread's, nor one that may be the thread answering a pager process's mail
 * (its watchdog: that thread, or any while it is not known yet), nor any when the kernel
 * reports no thread ids (tid 0: UFFD_FEATURE_THREAD_ID not granted). */
static int may_hold(engine_t *e, pid_t tid)
{
    if (!tid || tid == e->evictor_tid)
        return 0;
    for (int i = 0; i < UF_FLUSHERS; i++)
        if (__atomic_load_n(&e->flushers[i], __ATOMIC_ACQUIRE) == tid)
            return 0; /* a flush (engine.h) */
    if (e->agent_req < 0)
        return 1; /* in-process: the evictor does its own copies and madvise */
    uint64_t agent = __atomic_load_n(&e->st->agent_tid, __ATOMIC_ACQUIRE);
    return agent && (pid_t)agent != tid;
}

/* Whether a fault of thread `tid` is known to be the evictor's own copy into the pool: the
 * evictor's (in-process) or the faulting process's watchdog's (a pager process, once it has
 * said which thread it is). */
static int copy_fault(engine_t *e, pid_t tid)
{
    if (!tid)
        return 0;
    if (e->agent_req < 0)
        return tid == e->evictor_tid;
    uint64_t agent = __atomic_load_n(&e->st->agent_tid, __ATOMIC_ACQUIRE);
    return agent && (pid_t)agent == tid;
}

/* Free the pool slot of page p, which left the pool (not under budget_lock). Not while a
 * write-back copies through it (a pager process's do): the punch would zero what it copied. */
static void free_slot(engine_t *e, uctx_t *c, uint64_t p)
{
    pthread_mutex_lock(&e->wp_lock);
    if (!c->wbusy || !bit_get(c->wbusy, p))
        fallocate(e->pool_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(p * e->page), (off_t)e->page);
    pthread_mutex_unlock(&e->wp_lock);
}

/* A fault on a page on probation: install it back from the pool (waking the thread).
 * Returns 1 if it was there (0 on success, or EAGAIN in *err: the mapping is changing, fault
 * again), 0 if the fault must be served from the source.
 *
 * Only once its copy into the pool is complete (pooled): before that the slot holds zeros or
 * an older copy. A fault then is the copy's own, on a page counted as present that was not
 * (an install finds a page present between the REMOVE of its eviction being read and that
 * madvise dropping it, and counts it), or the process's, in the middle of the copy. Either is
 * served from the source. The copy's own fault leaves the page on probation: the copy takes
 * those bytes, then drops it. The process's takes it off (so does a fault not known to be the
 * copy's: a page left on probation while present would be counted out, and stay, when freed). */
int uf_reactivate(engine_t *e, uctx_t *c, area_t *a, uint64_t off, pid_t tid, int *err)
{
    uint64_t p = a->first_page + off / e->page;
    *err = 0;
    if (!c->inactive)
        return 0;
    pthread_mutex_lock(&e->budget_lock);
    int was = bit_get(c->inactive, p), ready = was && bit_get(c->pooled, p);
    if (ready || (was && !copy_fault(e, tid)))
        bit_clear(c->inactive, p);
    pthread_mutex_unlock(&e->budget_lock);
    if (!ready)
        return 0;
    struct uffdio_copy cp = {.dst = a->base + off, .src = (uintptr_t)(e->pool_map + p * e->page),
                             .len = e->page, .mode = e->track_writes ? UFFDIO_COPY_MODE_WP : 0};
    *err = uf_ioctl(c->uffd, UFFDIO_COPY, &cp);
    if (*err == EAGAIN) {
        bit_set(c->inactive, p); /* still pooled: a REMOVE is pending */
        return 1;
    }
    if (*err == EEXIST) { /* back already: off the pool */
        struct uffdio_range r = {a->base + off, e->page};
        uf_ioctl(c->uffd, UFFDIO_WAKE, &r);
        bit_clear(c->pooled, p);
        free_slot(e, c, p);
        *err = 0;
        return 1;
    }
    if (*err) { /* serve it from the source instead; its pooled copy is freed */
        pthread_mutex_lock(&e->budget_lock);
        if (bit_test_clear(c->installed, p))
            ADD(e, resident_pages, -1);
        bit_clear(c->pooled, p);
        pthread_mutex_unlock(&e->budget_lock);
        fallocate(e->pool_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(p * e->page), (off_t)e->page);
        *err = 0;
        return 0;
    }
    bit_clear(c->pooled, p);
    free_slot(e, c, p); /* else the pool keeps a copy of every page ever brought back */
    bit_set(c->ref, p);
    ADD(e, reactivations, 1);
    return 1;
}

/* The evictor's madvise raises the mm's mmap_changing until it runs again after its REMOVE
 * event is read: until then every install into that memory fails with EAGAIN. A fault woken
 * on EAGAIN faults straight back, and userfaultfd hands out faults before events, so under
 * load those re-faults spin (taking the CPU the madvise waits for); woken when the madvise
 * returns, it meets the next one of the round. Instead such a fault is held, not woken, until
 * the evictor's round of madvise calls is over (wake_held; it faults again then). Held only
 * while a madvise runs: never a fault of the evictor's own copies (or of the watchdog's). A
 * held thread holds no lock (the kernel dropped the mm's before it slept).
 * Returns 1 if held, 0 if the caller must wake it (no eviction running: the EAGAIN is the
 * process's own madvise or mremap; or the list is full). */
int uf_park(engine_t *e, uctx_t *c, uint64_t addr, pid_t tid)
{
    if (!e->max_pages || c != e->ctxs)
        return 0; /* the evictor drops pages of the root's memory only */
    pthread_mutex_lock(&e->budget_lock);
    int held = e->evict_madvising && e->nparked < UF_PARKED && may_hold(e, tid);
    if (held)
        e->parked[e->nparked++] = addr;
    pthread_mutex_unlock(&e->budget_lock);
    return held;
}

/* Under budget_lock: whether the count and the installs under way leave `pages` within
 * `limit`. */
static int has_room(engine_t *e, uint64_t pages, uint64_t limit)
{
    return LOAD(e->st->counters[C_resident_pages]) + e->reserved_pages + pages <= limit;
}

/* Throttling. One evictor gives pages back while every fault thread installs, so a fast
 * stream would outrun it. A fault whose chunk would take the count (installs under way
 * included) past max_resident + one batch is held like a parked one: not served, its thread
 * not woken, so the fault thread goes on reading the uffd (the evictor's madvise waits for a
 * fault thread to read its REMOVE event: a fault thread must never sleep here). The thread
 * faults again when the evictor's round is over (wake_held). Never held: a fault of the
 * evictor's own copies or of the faulting process's watchdog (a pager process's evictor asks
 * it to copy and drop pages: it must go on; until it has said which thread it is, no fault of
 * that process is held), and while the evictor is not running or finds nothing to give
 * (written pages of a read-only pager): then the count may pass it.
 * Returns 1 if held; else 0, with the pages reserved in *reserved (uf_unreserve them once
 * the install is done and counted). */
int uf_throttle(engine_t *e, uctx_t *c, uint64_t addr, uint64_t pages, pid_t tid, uint64_t *reserved)
{
    *reserved = 0;
    if (!e->max_pages || c != e->ctxs)
        return 0;
    pthread_mutex_lock(&e->budget_lock);
    int room = has_room(e, pages, e->max_pages + e->evict_batch);
    /* Only above the high watermark, where the evictor is bound to run a round (and wake
     * it): below it, a chunk too large for the room left is served, not held for ever. */
    int held = !room && LOAD(e->st->counters[C_resident_pages]) > e->high_pages
               && !e->throttle_off && LOAD(e->evictor_started) && may_hold(e, tid)
               && e->nparked < UF_PARKED;
    if (held)
        e->parked[e->nparked++] = addr;
    else
        e->reserved_pages += *reserved = pages;
    pthread_mutex_unlock(&e->budget_lock);
    if (held) { /* the evictor was told when the count passed the high watermark; again */
        pthread_mutex_lock(&e->lock);
        pthread_cond_signal(&e->evict_cond);
        pthread_mutex_unlock(&e->lock);
    }
    return held;
}

/* Reserve room for a speculative install (readahead): 1 if the count and the installs under
 * way leave `pages` below `limit`. */
int uf_reserve(engine_t *e, uint64_t pages, uint64_t limit)
{
    pthread_mutex_lock(&e->budget_lock);
    int room = has_room(e, pages, limit);
    if (room)
        e->reserved_pages += pages;
    pthread_mutex_unlock(&e->budget_lock);
    return room;
}

/* Pages a job that installs ahead (prefetch(), a working set, willneed) may fill: what the
 * count and the installs under way leave below the high watermark now. Passing it would
 * start an eviction round, and the hand would take back the job's own pages first; room made
 * later (for faults) is not the job's to take, so prefetch() and a working set take this
 * once, when they begin. */
uint64_t uf_room_below_high(engine_t *e)
{
    pthread_mutex_lock(&e->budget_lock);
    uint64_t used = LOAD(e->st->counters[C_resident_pages]) + e->reserved_pages;
    uint64_t room = used < e->high_pages ? e->high_pages - used : 0;
    pthread_mutex_unlock(&e->budget_lock);
    return room;
}

/* A job that installs ahead takes `*len` bytes, cut to the `*room` pages it may still fill
 * and to what is left below the high watermark now, and reserves them, all under one lock (a
 * room learned first could be taken by another thread before the reservation). 0 if nothing
 * fits: the job stops there. */
int uf_take_room(engine_t *e, uint64_t *len, uint64_t *room)
{
    pthread_mutex_lock(&e->budget_lock);
    uint64_t used = LOAD(e->st->counters[C_resident_pages]) + e->reserved_pages;
    uint64_t left = used < e->high_pages ? e->high_pages - used : 0;
    uint64_t can = *room < left ? *room : left, want = *len / e->page;
    if (want > can) {
        want = can;
        *len = can * e->page;
    }
    if (*len)
        e->reserved_pages += want;
    pthread_mutex_unlock(&e->budget_lock);
    *room -= want;
    return *len != 0;
}

void uf_unreserve(engine_t *e, uint64_t pages)
{
    if (!pages)
        return;
    pthread_mutex_lock(&e->budget_lock);
    e->reserved_pages -= pages;
    pthread_mutex_unlock(&e->budget_lock);
}

static void set_madvising(engine_t *e, int on)
{
    pthread_mutex_lock(&e->budget_lock);
    e->evict_madvising = on;
    pthread_mutex_unlock(&e->budget_lock);
}

/* The round's madvise calls returned (their REMOVEs were read, mmap_changing is down): wake
 * the held faults. throttle_off (0, 1; -1 leaves it) is set in the same step: no fault is
 * held after the last wake of a round that turns holding off. */
static void wake_held_throttle(engine_t *e, uctx_t *c, int throttle_off)
{
    uint64_t held[UF_PARKED];
    pthread_mutex_lock(&e->budget_lock);
    if (throttle_off >= 0)
        e->throttle_off = throttle_off;
    int n = e->nparked;
    memcpy(held, e->parked, (size_t)n * sizeof(held[0]));
    e->nparked = 0;
    pthread_mutex_unlock(&e->budget_lock);
    for (int i = 0; i < n; i++) {
        struct uffdio_range r = {held[i], e->page};
        uf_ioctl(c->uffd, UFFDIO_WAKE, &r);
    }
}

static void wake_held(engine_t *e, uctx_t *c) { wake_held_throttle(e, c, -1); }

/* Put [addr, addr+len) on probation: copy it into the pool, then drop it from the memory
 * (the faulting process's watchdog, for a pager process). */
int uf_deactivate_local(char *pool_map, uint64_t addr, uint64_t len, uint64_t pool_off, int advice)
{
    memcpy(pool_map + pool_off, (const void *)(uintptr_t)addr, len);
    return madvise((void *)(uintptr_t)addr, len, advice) ? errno : 0;
}

/* Ask the faulting process's watchdog thread to carry out `op`. Returns an errno. */
int uf_ask_target(engine_t *e, int op, uint64_t addr, uint64_t len, uint64_t arg)
{
    uf_mail_t *m = &e->st->mail;
    pthread_mutex_lock(&e->agent_lock);
    uint64_t seq = m->seq + 1, one = 1;
    m->op = (uint64_t)op;
    m->addr = addr;
    m->len = len;
    m->arg = arg;
    __atomic_store_n(&m->seq, seq, __ATOMIC_RELEASE);
    int err = write(e->agent_req, &one, sizeof(one)) < 0 ? errno : 0;
    while (!err && __atomic_load_n(&m->done, __ATOMIC_ACQUIRE) != seq) {
        struct pollfd p[2] = {{.fd = e->agent_done, .events = POLLIN}, {.fd = e->stopfd, .events = POLLIN}};
        if (poll(p, 2, 100) < 0 && errno != EINTR)
            err = errno;
        else if (p[0].revents && read(e->agent_done, &one, sizeof(one)) < 0 && errno != EAGAIN)
            err = errno;
        else if (LOAD(e->evict_stop))
            err = ECANCELED;
    }
    if (!err)
        err = (int)m->result;
    pthread_mutex_unlock(&e->agent_lock);
    return err;
}

/* madvise in the faulting process: here, or through its watchdog thread. Returns an errno. */
int uf_target_madvise(engine_t *e, uint64_t addr, uint64_t len, int advice)
{
    if (e->agent_req < 0)
        return madvise((void *)(uintptr_t)addr, len, advice) ? errno : 0;
    return uf_ask_target(e, AGENT_MADVISE, addr, len, (uint64_t)advice);
}

/* The evictor's madvise, holding the faults it makes fail meanwhile (uf_park). Only around a
 * madvise: a copy of the pages may fault, and a fault of the thread that will wake the held
 * ones must never be held. */
static int evict_madvise(engine_t *e, uint64_t addr, uint64_t len)
{
    set_madvising(e, 1);
    int err = uf_target_madvise(e, addr, len, e->evict_advice);
    set_madvising(e, 0);
    return err;
}

static int target_deactivate(engine_t *e, uint64_t addr, uint64_t len, uint64_t pool_off)
{
    if (e->agent_req < 0) {
        memcpy(e->pool_map + pool_off, (const void *)(uintptr_t)addr, len);
        return evict_madvise(e, addr, len);
    }
    /* The watchdog copies and drops in one request (its copy may fault: never held). The
     * advice travels in the high bits of arg, the pool offset in the low 48. */
    set_madvising(e, 1);
    int err = uf_ask_target(e, AGENT_DEACTIVATE, addr, len, pool_off | ((uint64_t)e->evict_advice << 48));
    set_madvising(e, 0);
    return err;
}

/* What the hand decided for a run of pages: give them back (madvise, counted when the
 * REMOVE event is read), free their pooled copies (freed and counted when picked), put them
 * on probation, or write them back (dirty: taken on a later turn, if still clean then). */
enum { EVICT, FREE_POOLED, DEACTIVATE, CLEAN };
typedef struct { area_t a; uint64_t off, len; int op; } victim_t;

static void add_run(victim_t *v, int *runs, area_t *a, uint64_t off, uint64_t page, int op)
{
    victim_t *last = *runs ? &v[*runs - 1] : NULL;
    if (last && last->op == op && last->a.base == a->base && last->off + last->len == off)
        last->len += page;
    else
        v[(*runs)++] = (victim_t){*a, off, page, op};
}

/* Under e->lock: decide for up to evict_batch pages that leave memory, as runs; returns the
 * number of runs. The hand walks the root's areas; a referenced page loses its mark and is
 * passed; an unreferenced one goes to the pool (or is taken, without a pool or when the
 * count is over the budget itself); a pooled one that nothing touched since is taken. At most
 * two turns. */
static int pick_victims(engine_t *e, uctx_t *c, victim_t *v, int max_runs)
{
    areas_t *as = c->areas;
    uint64_t taken = 0, looked = 0, limit = 2 * c->npages + 2;
    int runs = 0, over = LOAD(e->st->counters[C_resident_pages]) > e->max_pages;
    if (!as || !as->n)
        return 0;
    while (taken < e->evict_batch && looked < limit && runs < max_runs) {
        if (e->hand_area >= as->n) {
            e->hand_area = 0;
            e->hand_off = 0;
        }
        area_t *a = &as->a[e->hand_area];
        if (e->hand_off >= a->len) {
            e->hand_area++;
            e->hand_off = 0;
            continue;
        }
        uint64_t off = e->hand_off, p = a->first_page + off / e->page;
        e->hand_off += e->page;
        looked++;
        if (!bit_get(c->installed, p) || bit_get(c->evicting, p))
            continue;
        if (c->inactive && bit_get(c->inactive, p)) {
            pthread_mutex_lock(&e->budget_lock);
            int still = bit_test_clear(c->inactive, p);
            /* Freed before it leaves the pool: once it has, a fault serves it from the source,
             * and a write-back of what that installs copies it through this very slot (a
             * pager process), which a late hole punch would turn to zeros. */
            if (still) {
                bit_clear(c->pooled, p);
                fallocate(e->pool_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(p * e->page),
                          (off_t)e->page);
            }
            if (still && bit_test_clear(c->installed, p)) {
                ADD(e, resident_pages, -1);
                ADD(e, evictions, 1);
                bit_set(c->evicted, p);
            }
            pthread_mutex_unlock(&e->budget_lock);
            if (still) {
                add_run(v, &runs, a, off, e->page, FREE_POOLED);
                taken++;
            }
            continue;
        }
        if (bit_test_clear(c->ref, p))
            continue; /* touched since the hand last came by: spared once */
        int held = uf_hold(e, c, p);
        if (held < 0)
            continue; /* being written back (by flush()): passed this time */
        if (!held) { /* dirty */
            if (!e->writable)
                continue; /* written, in a read-only pager: nowhere to write it, so it stays */
            add_run(v, &runs, a, off, e->page, CLEAN);
        } else if (c->inactive && !over) {
            bit_set(c->inactive, p); /* before the drop: a fault after it finds the page pooled */
            bit_set(c->deactivating, p);
            add_run(v, &runs, a, off, e->page, DEACTIVATE);
        } else { /* no pool, or over the budget itself: no probation */
            bit_set(c->evicting, p);
            add_run(v, &runs, a, off, e->page, EVICT);
        }
        taken++; /* probation costs a copy: it counts towards the batch too */
    }
    return runs;
}

/* Put a run on probation; a run that cannot be is evicted directly instead. The REMOVE its
 * madvise sends finds the pages marked inactive: they stay counted (the pool holds them). */
static void deactivate(engine_t *e, uctx_t *c, victim_t *r)
{
    uint64_t first = r->a.first_page + r->off / e->page, n = r->len / e->page;
    int err = target_deactivate(e, r->a.base + r->off, r->len, first * e->page);
    if (!err) { /* copied: the pool holds the pages still on probation (uf_reactivate) */
        pthread_mutex_lock(&e->budget_lock);
        for (uint64_t i = 0; i < n; i++)
            if (bit_get(c->inactive, first + i))
                bit_set(c->pooled, first + i);
        pthread_mutex_unlock(&e->budget_lock);
        for (uint64_t i = 0; i < n; i++) /* taken off probation during the copy: stale */
            if (!bit_get(c->inactive, first + i) && !bit_get(c->pooled, first + i))
                free_slot(e, c, first + i);
        return;
    }
    for (uint64_t i = 0; i < n; i++) {
        bit_clear(c->inactive, first + i);
        bit_clear(c->deactivating, first + i);
        bit_set(c->evicting, first + i);
    }
    if (evict_madvise(e, r->a.base + r->off, r->len)) {
        for (uint64_t i = 0; i < n; i++) {
            bit_clear(c->evicting, first + i);
            bit_clear(c->refilled, first + i);
        }
    }
}

/* Give pages back until the count is at the low watermark; 0 if there was nothing to give. */
static int evict_until_low(engine_t *e, uctx_t *c)
{
    victim_t v[64];
    int gave = 0;
    while (!LOAD(e->evict_stop) && LOAD(e->st->counters[C_resident_pages]) > e->low_pages) {
        pthread_mutex_lock(&e->lock);
        int runs = pick_victims(e, c, v, 64);
        pthread_mutex_unlock(&e->lock);
        if (!runs && !e->writable && LOAD(e->st->counters[C_dirty_pages]) && !e->pinned_warned) {
            e->pinned_warned = 1;
            uf_log(e, "%llu written pages of this read-only pager of %s fill its budget: they "
                   "stay in memory (nowhere to write them); map it writable=True to write them "
                   "back, or raise max_resident",
                   (unsigned long long)LOAD(e->st->counters[C_dirty_pages]), e->name);
        }
        if (!runs)
            return gave; /* nothing to give back (written, being evicted already, unmapped) */
        gave = 1;
        for (int i = 0; i < runs; i++) {
            victim_t *r = &v[i];
            uint64_t first = r->a.first_page + r->off / e->page, n = r->len / e->page, wrote = 0;
            if (r->op == CLEAN) {
                wake_held(e, c); /* a write-back may take a GIL a held thread holds */
                uf_writeback(e, e->evict_worker, c, first, n, &wrote, NULL);
                continue;
            }
            if (r->op == DEACTIVATE) {
                deactivate(e, c, r);
                uf_release(e, c, first, n, 1);
                continue;
            }
            uint64_t t0 = uf_now_ns();
            if (r->op == FREE_POOLED) { /* freed by pick_victims */
                uf_trace_install(e, t0, &r->a, r->off, r->len, CAUSE_EVICT);
                continue;
            }
            uint64_t addr = r->a.base + r->off;
            int err = evict_madvise(e, addr, r->len);
            if (!err)
                uf_trace_install(e, t0, &r->a, r->off, r->len, CAUSE_EVICT);
            uf_release(e, c, first, n, !err);
            if (err) {
                for (uint64_t p = first; p < first + n; p++) {
                    bit_clear(c->evicting, p);
                    bit_clear(c->refilled, p);
                }
            }
            if (err && err != ECANCELED)
                uf_state_error(e->st, err, addr, "evicting %#llx..+%llu failed: %s",
                               (unsigned long long)addr, (unsigned long long)r->len, strerror(err));
            if (err) {
                wake_held(e, c);
                return gave;
            }
        }
        wake_held(e, c);
        /* The REMOVE events were read before madvise returned; wait until they are handled
         * (counted), so the next round sees the count it left. */
        while (__atomic_load_n(&e->in_batch, __ATOMIC_ACQUIRE))
            sched_yield();
    }
    return gave;
}

static void *evictor_main(void *arg)
{
    engine_t *e = arg;
    pthread_setname_np(pthread_self(), "uf-evictor"); /* top -H, perf, gdb */
    uctx_t *c = e->ctxs;
    uf_worker_python(e, e->evict_worker, 1); /* write-backs of a Python source take its GIL */
    e->evictor_tid = (pid_t)gettid();
    int gave = 1;
    for (;;) {
        pthread_mutex_lock(&e->lock);
        /* nothing to give back last time (all written, say): wait a beat before looking again */
        int waited = 0;
        /* held faults wake it too: their accounting may have seen the count above the high
         * watermark just before REMOVEs read brought it down */
        while (!e->evict_stop && !LOAD(e->nparked)
               && (LOAD(e->st->counters[C_resident_pages]) <= e->high_pages
                   || (!gave && !waited))) {
            waited = 1;
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts); /* a signal sent just before the wait is lost */
            ts.tv_nsec += 100000000;
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            pthread_cond_timedwait(&e->evict_cond, &e->lock, &ts);
        }
        int stopping = e->evict_stop;
        pthread_mutex_unlock(&e->lock);
        if (stopping)
            break;
        if (LOAD(e->st->counters[C_resident_pages]) > e->high_pages) {
            gave = evict_until_low(e, c);
            wake_held_throttle(e, c, !gave); /* nothing to give: faults are not held meanwhile */
        } else {
            wake_held(e, c); /* held while the count came down: room now, or served anyway */
        }
    }
    uf_worker_python(e, e->evict_worker, 0);
    return NULL;
}

int uf_evictor_start(engine_t *e)
{
    if (!e->max_pages || e->evictor_started)
        return 0;
    e->throttle_off = 0;
    int r = pthread_create(&e->evictor, NULL, evictor_main, e);
    if (!r)
        e->evictor_started = 1;
    return r;
}

/* Stopped before the fault threads: its madvise may be waiting for one of them to read the
 * REMOVE event (stopping them first would leave it waiting for ever). */
void uf_evictor_stop(engine_t *e)
{
    if (!e->evictor_started)
        return;
    pthread_mutex_lock(&e->lock);
    e->evict_stop = 1;
    pthread_cond_broadcast(&e->evict_cond);
    pthread_mutex_unlock(&e->lock);
    pthread_join(e->evictor, NULL);
    wake_held_throttle(e, e->ctxs, 1); /* faults held since its last round: served from now on */
    e->evictor_started = 0;
    e->evict_stop = 0;
}
