/* Serving: the contexts, the threads and the policy.
 *
 * Fault threads wait on one epoll set holding every context's uffd and the stop eventfd; each
 * serves a fault by installing its chunk, then feeds the readahead window. Two background
 * threads (when readahead or populate is on) install readahead windows, then populate, a
 * piece at a time; they never read a uffd, so a fault never waits behind background work
 * (except, for a Python source, on the readahead piece being read for its very page: one
 * round trip less).
 *
 * Contexts: UFFD_EVENT_FORK hands us a new uffd for a forked child's copy of the registered
 * ranges; it becomes a context served from the same source, with a copy of its parent's page
 * state. A context whose process is gone (an install says ESRCH, or the periodic probe does)
 * is dropped. Context structs are recycled, never freed while threads run: a stale pointer
 * from epoll then names a live context or one marked dead, both safe to look at. */
#define _GNU_SOURCE
#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

enum { SERVED, CTX_GONE };

area_t *uf_find_area(areas_t *as, uint64_t addr)
{
    for (int i = 0; i < as->n; i++)
        if (addr - as->a[i].base < as->a[i].len)
            return &as->a[i];
    return NULL;
}

static areas_t *areas_of(uctx_t *c) { return __atomic_load_n(&c->areas, __ATOMIC_ACQUIRE); }

/* Memory fault threads allocate while serving (a forked child's context, a remapped area
 * list) comes from mmap, never malloc: glibc's fork() holds the malloc locks while the kernel
 * waits for UFFD_EVENT_FORK to be read, and a second fork can follow the first at once. */
static void *uf_alloc(size_t n)
{
    size_t *p = mmap(NULL, n + 16, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    *p = n + 16;
    return (char *)p + 16;
}

static void uf_free(void *q)
{
    if (q) {
        size_t *p = (size_t *)((char *)q - 16);
        munmap(p, *p);
    }
}

static void retire(engine_t *e, void *p)
{
    retired_t *r = uf_alloc(sizeof(*r));
    if (!r)
        return; /* leak it rather than free memory another thread may read */
    r->p = p;
    r->next = e->retired;
    e->retired = r;
}

/* ---- contexts ---------------------------------------------------------------------------- */

/* A context for `uffd` over a copy of `areas`; page state copied from `from` (a fork's parent)
 * or empty. Under e->lock once threads run. */
uctx_t *uf_ctx_new(engine_t *e, int uffd, const areas_t *areas, int own_fd, const uctx_t *from)
{
    uctx_t *c = NULL, **tail = &e->ctxs;
    for (uctx_t *x = e->ctxs; x; x = x->next) {
        if (x->dead && !x->users && x->uffd < 0 && !c)
            c = x;
        tail = &x->next;
    }
    int fresh = !c;
    if (fresh && !(c = uf_alloc(sizeof(*c))))
        return NULL;
    size_t asize = sizeof(areas_t) + (size_t)areas->n * sizeof(area_t);
    uint64_t npages = 0;
    for (int i = 0; i < areas->n; i++)
        if (areas->a[i].first_page + areas->a[i].len / e->page > npages)
            npages = areas->a[i].first_page + areas->a[i].len / e->page;
    if (from && from->npages > npages)
        npages = from->npages;
    areas_t *as = uf_alloc(asize);
    uint8_t *inst = uf_alloc(npages / 8 + 1), *rem = uf_alloc(npages / 8 + 1);
    if (!as || !inst || !rem) {
        uf_free(as);
        uf_free(inst);
        uf_free(rem);
        if (fresh)
            uf_free(c);
        return NULL;
    }
    memcpy(as, areas, asize);
    if (from) {
        memcpy(inst, from->installed, from->npages / 8 + 1);
        memcpy(rem, from->removed, from->npages / 8 + 1);
    }
    uctx_t *next = c->next;
    memset(c, 0, sizeof(*c));
    c->next = fresh ? NULL : next;
    c->uffd = uffd;
    c->own_fd = own_fd;
    c->id = e->next_id++;
    c->areas = as;
    c->npages = npages;
    c->installed = inst;
    c->removed = rem;
    if (fresh)
        *tail = c;
    if (e->epfd >= 0) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(e->epfd, EPOLL_CTL_ADD, uffd, &ev);
    }
    return c;
}

/* To the supervisor (fork_sock): a child's descriptor and areas (TELL_CHILD), its end
 * (TELL_END), or its areas after an mremap (TELL_MOVED). Never blocks: a supervisor that
 * cannot take it loses only a restart's hold on the child. Returns 0, or -1 if not sent. */
enum { TELL_CHILD = 1, TELL_END = 2, TELL_MOVED = 3 };
static int tell_supervisor(engine_t *e, uctx_t *c, int kind)
{
    if (e->fork_sock < 0 || e->owner != getpid())
        return 0;
    areas_t *as = c->areas;
    int n = kind != TELL_END && as ? as->n : 0;
    size_t size = 16 + (size_t)n * 24;
    uint64_t *msg = uf_alloc(size); /* mmap, not malloc: this may run during a fork (see uf_alloc) */
    if (!msg)
        return -1;
    msg[0] = (uint64_t)kind | ((uint64_t)n << 32);
    msg[1] = c->key;
    for (int i = 0; i < n; i++) {
        msg[2 + 3 * i] = as->a[i].base;
        msg[3 + 3 * i] = as->a[i].len;
        msg[4 + 3 * i] = as->a[i].src_off;
    }
    struct iovec iov = {msg, size};
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } ctl;
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    if (kind == TELL_CHILD) {
        memset(&ctl, 0, sizeof(ctl));
        mh.msg_control = ctl.buf;
        mh.msg_controllen = sizeof(ctl.buf);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &c->uffd, sizeof(int));
    }
    int sent = sendmsg(e->fork_sock, &mh, MSG_DONTWAIT | MSG_NOSIGNAL) < 0 ? -1 : 0;
    if (sent && kind == TELL_CHILD)
        uf_log(e, "could not tell the pager process of a forked child (%s): if this worker "
               "dies, that child's pages not loaded yet read as zeros", strerror(errno));
    uf_free(msg);
    return sent;
}

/* Under e->lock, with no thread inside: let go of a dead context's descriptor and memory. */
static void ctx_release(engine_t *e, uctx_t *c)
{
    if (c->uffd < 0)
        return;
    if (c->id)
        tell_supervisor(e, c, TELL_END);
    if (c->moved_unsent && e->owner == getpid()) /* gone: nothing of it is lacking now */
        __atomic_sub_fetch(&e->st->children_unsent, 1, __ATOMIC_SEQ_CST);
    c->moved_unsent = 0;
    /* A forked copy of the engine shares the epoll instance with its parent: only the owner
     * may change it. */
    if (e->epfd >= 0 && e->owner == getpid())
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, c->uffd, NULL);
    if (c->own_fd)
        close(c->uffd);
    c->uffd = -1;
    uf_free(c->areas);
    uf_free(c->installed);
    uf_free(c->removed);
    c->areas = NULL;
    c->installed = c->removed = NULL;
    free(c->ref); /* the root's budget bitmaps (malloc'd before any thread ran) */
    free(c->evicting);
    free(c->evicted);
    free(c->inactive);
    free(c->deactivating);
    free(c->pooled);
    free(c->refilled);
    free(c->dirty);
    free(c->wbusy);
    free(c->deferred);
    c->ref = c->evicting = c->evicted = c->refilled = c->inactive = c->deactivating = c->pooled = NULL;
    c->dirty = c->wbusy = c->deferred = NULL;
    if (c->id)
        ADD(e, children, -1);
}

/* The engine goes while a forked child still uses the memory: releasing its context would let
 * the child read zeros where pages were never loaded. Poison those pages instead. */
static void poison_orphan(engine_t *e, uctx_t *c)
{
    struct uffdio_zeropage probe = {.range = {e->probe_addr, 4096}, .mode = UFFDIO_ZEROPAGE_MODE_DONTWAKE};
    if (uf_ioctl(c->uffd, UFFDIO_ZEROPAGE, &probe) == ESRCH)
        return; /* the child is gone already */
    uint64_t poisoned = 0;
    areas_t *as = c->areas;
    for (int i = 0; i < as->n; i++) {
        area_t *a = &as->a[i];
        for (uint64_t off = 0; off < a->len;) {
            if (bit_get(c->installed, a->first_page + off / e->page)) {
                off += e->page;
                continue;
            }
            uint64_t end = off + e->page;
            while (end < a->len && !bit_get(c->installed, a->first_page + end / e->page))
                end += e->page;
            struct uffdio_poison ps = {.range = {a->base + off, end - off}};
            int err = uf_ioctl(c->uffd, UFFDIO_POISON, &ps);
            uint64_t done = ps.updated > 0 ? (uint64_t)ps.updated : 0;
            poisoned += done / e->page;
            off += done + (err ? e->page : 0); /* skip a page found present (EEXIST) */
            if (err && err != EEXIST && err != EAGAIN)
                break;
        }
    }
    if (poisoned)
        uf_log(e, "the pager of %s closed while a forked child still used its memory: the %llu "
               "pages it had not loaded are poisoned (SIGBUS), never zeros", e->name,
               (unsigned long long)poisoned);
}

/* This process is exiting with the engine running: its threads die with it, and forked
 * children would read zeros where pages were never loaded. Poison those pages now. */
void uf_orphan_children(engine_t *e)
{
    pthread_mutex_lock(&e->lock);
    for (uctx_t *c = e->ctxs; c; c = c->next)
        if (c->id && !c->dead && c->uffd >= 0)
            poison_orphan(e, c);
    pthread_mutex_unlock(&e->lock);
}

void uf_ctx_free_all(engine_t *e)
{
    for (uctx_t *c = e->ctxs; c; c = c->next)
        if (c->id && !c->dead && c->uffd >= 0 && e->owner == getpid())
            poison_orphan(e, c);
    for (uctx_t *c = e->ctxs, *next; c; c = next) {
        next = c->next;
        c->dead = 1;
        ctx_release(e, c);
        uf_free(c);
    }
    e->ctxs = NULL;
    for (retired_t *r = e->retired, *next; r; r = next) {
        next = r->next;
        uf_free(r->p);
        uf_free(r);
    }
    e->retired = NULL;
}

static int ctx_enter(engine_t *e, uctx_t *c)
{
    pthread_mutex_lock(&e->lock);
    int ok = !c->dead && c->uffd >= 0;
    if (ok)
        c->users++;
    pthread_mutex_unlock(&e->lock);
    return ok;
}

/* Leave a context; `gone` marks it dead (its process exited). The last one out lets go. */
static void ctx_leave(engine_t *e, uctx_t *c, int gone)
{
    pthread_mutex_lock(&e->lock);
    if (gone && !c->dead) {
        c->dead = 1;
        if (!c->id)
            __atomic_store_n(&e->st->root_gone, 1, __ATOMIC_RELEASE);
    }
    if (--c->users == 0 && c->dead)
        ctx_release(e, c);
    pthread_mutex_unlock(&e->lock);
}

/* Whether a forked child's process still exists: UFFDIO_ZEROPAGE on a page that no context
 * registers (below every mapping) answers ESRCH once the process is gone, ENOENT before. */
static void probe_children(engine_t *e)
{
    uint64_t now = uf_now_ns();
    if (now - e->last_probe_ns < 1000000000ull)
        return;
    e->last_probe_ns = now;
    for (uctx_t *c = e->ctxs; c; c = c->next) {
        if (!c->id || !ctx_enter(e, c))
            continue;
        struct uffdio_zeropage z = {.range = {e->probe_addr, 4096}, .mode = UFFDIO_ZEROPAGE_MODE_DONTWAKE};
        ctx_leave(e, c, uf_ioctl(c->uffd, UFFDIO_ZEROPAGE, &z) == ESRCH);
    }
}

/* ---- faults ------------------------------------------------------------------------------ */

/* A fault at [off, end) of area a: the stream it continues grows its window; a fault that
 * continues none starts a stream in the least recently used slot, with no window yet (a
 * random fault reads nothing ahead). Forward, a fault continues a stream when it starts
 * within a chunk of the stream's last fault, at most a chunk past its window; backward, when
 * it ends at most a chunk below the last fault's start (or below the window under it). */
static int behind_hint(engine_t *e, uctx_t *c, int ai, uint64_t off, uint64_t end);

static void update_readahead(engine_t *e, uctx_t *c, areas_t *as, area_t *a, uint64_t off, uint64_t end)
{
    if (!e->ra_max)
        return;
    pthread_mutex_lock(&e->lock);
    int ai = (int)(a - as->a), hit = -1, dir = 0, lru = 0;
    if (behind_hint(e, c, ai, off, end)) { /* willneed() reads on ahead of it already */
        pthread_mutex_unlock(&e->lock);
        return;
    }
    for (int i = 0; i < UF_STREAMS && hit < 0; i++) {
        __typeof__(c->ra[0]) *r = &c->ra[i];
        uint64_t back = r->last_end > e->chunk ? e->chunk : r->last_end;
        uint64_t below = e->chunk + (r->dir < 0 ? r->window : 0);
        if (r->area == ai && r->dir >= 0 && off >= r->last_end - back && off <= r->end + e->chunk)
            hit = i, dir = 1;
        else if (r->area == ai && r->dir <= 0 && off < r->first && r->first - end <= below)
            hit = i, dir = -1;
        else if (r->used < c->ra[lru].used)
            lru = i;
    }
    __typeof__(c->ra[0]) *r = &c->ra[hit >= 0 ? hit : lru];
    uint64_t ahead = 0, ahead_end = 0; /* what the window grew by, read ahead in one request */
    if (hit < 0) {
        *r = (__typeof__(*r)){.area = ai, .next = end, .end = end};
    } else {
        uint64_t grown = r->window * 2;
        r->window = grown < e->ra_min ? e->ra_min : grown > e->ra_max ? e->ra_max : grown;
        r->dir = dir;
        if (dir > 0) {
            if (r->next < end)
                r->next = end;
            ahead = r->end > end ? r->end : end;
            r->end = end + r->window > a->len ? a->len : end + r->window;
            ahead_end = r->end;
        } else { /* below the fault, installed from the top down */
            r->end = off;
            r->next = off > r->window ? off - r->window : 0;
        }
    }
    r->first = off;
    r->last_end = end;
    r->used = ++c->ra_tick;
    if (r->next < r->end)
        pthread_cond_signal(&e->work_cond);
    uint64_t src_off = a->src_off;
    pthread_mutex_unlock(&e->lock);
    if (ahead_end > ahead)
        uf_source_willneed(e, src_off + ahead, ahead_end - ahead);
}

static int fault_kind(uint64_t flags)
{
    if (flags & UFFD_PAGEFAULT_FLAG_MINOR)
        return KIND_MINOR;
    if (flags & UFFD_PAGEFAULT_FLAG_WP)
        return KIND_WP;
    return flags & UFFD_PAGEFAULT_FLAG_WRITE ? KIND_WRITE : KIND_READ;
}

/* Under e->lock: the end of the range of background thread b's readahead piece that holds
 * address addr of context c, or 0. */
static uint64_t read_by(const worker_t *b, const uctx_t *c, uint64_t addr)
{
    for (int k = 0; b->ra_ctx == c && k < b->nbatch; k++) {
        uint64_t at = b->ra_base + b->batch[2 * k];
        if (addr - at < b->batch[2 * k + 1])
            return at + b->batch[2 * k + 1];
    }
    return 0;
}

/* A Python source's read is a round trip: a fault in a readahead piece being read already is
 * left to the background thread reading it, which wakes each range of the piece when it is
 * done (installed or not: a page it could not install faults again and is served then).
 * Returns 0 (not in a piece), LEFT_HANDED (the piece's thread records the fault, rec, when
 * its wait ends) or LEFT_COUNTED (left, but more faults wait there than it records). */
enum { LEFT_HANDED = 1, LEFT_COUNTED = 2 };
static int left_to_readahead(engine_t *e, uctx_t *c, uint64_t addr, uf_rec_t *rec, uint64_t seq)
{
    if (e->kind != SRC_PYTHON)
        return 0;
    int left = 0;
    pthread_mutex_lock(&e->lock);
    for (int i = e->nthreads; i < e->nworkers && !left; i++) {
        worker_t *b = &e->workers[i];
        if (!read_by(b, c, addr))
            continue;
        left = b->ra_waiters < UF_RA_WAITS ? LEFT_HANDED : LEFT_COUNTED;
        if (left == LEFT_HANDED) {
            b->ra_wait[b->ra_waiters] = *rec;
            b->ra_wait[b->ra_waiters].flags |= REC_WAITED;
            b->ra_wait[b->ra_waiters].length = 0; /* the piece installs the page */
            b->ra_wait_seq[b->ra_waiters] = seq;
        }
        b->ra_waiters++;
    }
    pthread_mutex_unlock(&e->lock);
    return left;
}

/* Record the faults left to a background piece: their wait ended now, with the piece in. */
static void end_waits(engine_t *e, const uf_rec_t *wait, const uint64_t *seq, int n)
{
    uint64_t t1 = uf_now_ns();
    for (int k = 0; k < n; k++) {
        uf_rec_t rec = wait[k];
        uint64_t ns = t1 - rec.t_ns;
        uf_observe_latency(e, ns);
        rec.service_ns = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
        uf_log_end(e, seq[k], &rec);
        uf_trace(e, &rec);
    }
}

/* A forked child's at-fork hook touched the beacon: its thread id (the child's pid, the hook
 * runs on its only thread) names the context, whose descriptor goes to the fork table before
 * a zero page answers (and wakes) it. The child drops that page again for its own children. */
static void answer_beacon(engine_t *e, uctx_t *c, uint32_t tid)
{
    if (c->id && e->fork_table) {
        uf_forked_t *f = &e->fork_table[tid % UF_FORK_SLOTS];
        /* a seqlock of sorts: the child reads pid, the fields, then pid again (forks.py) */
        __atomic_store_n(&f->pid, 0, __ATOMIC_SEQ_CST);
        __atomic_store_n(&f->server, (int32_t)getpid(), __ATOMIC_SEQ_CST);
        __atomic_store_n(&f->fd, c->uffd, __ATOMIC_SEQ_CST);
        __atomic_store_n(&f->pid, (int32_t)tid, __ATOMIC_SEQ_CST);
    }
    struct uffdio_zeropage z = {.range = {e->beacon, (uint64_t)getpagesize()}};
    if (uf_ioctl(c->uffd, UFFDIO_ZEROPAGE, &z))
        uf_ioctl(c->uffd, UFFDIO_WAKE, &z.range); /* present already, or the mapping changes */
}

/* Serve one page fault. Returns ESRCH when the context's process is gone, else 0. */
static int serve_fault(engine_t *e, worker_t *w, uctx_t *c, struct uffd_msg *m, uint64_t t0)
{
    uint64_t addr = m->arg.pagefault.address, flags = m->arg.pagefault.flags;
    if (e->beacon && addr - e->beacon < (uint64_t)getpagesize()) {
        answer_beacon(e, c, m->arg.pagefault.feat.ptid);
        return 0;
    }
    areas_t *as = areas_of(c);
    area_t *a = uf_find_area(as, addr);
    ADD(e, faults, 1);
    if (flags & UFFD_PAGEFAULT_FLAG_WRITE)
        ADD(e, write_faults, 1);
    if (flags & UFFD_PAGEFAULT_FLAG_WP)
        ADD(e, wp_faults, 1);
    if (!a) {
        /* Registered but not ours to serve. Waking would only make the thread fault again at
         * once (a busy loop): poison it, so the access fails loudly. */
        struct uffdio_poison p = {.range = {addr & ~(e->page - 1), e->page}};
        uf_log(e, "poisoned a fault at %#llx outside every area served from %s",
               (unsigned long long)addr, e->name);
        uf_state_error(e->st, EFAULT, addr, "a fault at %#llx outside every area served from %s "
                       "was poisoned (SIGBUS)", (unsigned long long)addr, e->name);
        if (!uf_ioctl(c->uffd, UFFDIO_POISON, &p))
            ADD(e, poisoned, 1);
        return 0;
    }
    uint64_t page_off = (addr - a->base) & ~(e->page - 1), got = 0;
    uint64_t off = page_off - page_off % e->chunk, n = e->chunk;
    if (off + n > a->len)
        n = a->len - off;
    uf_rec_t rec = {t0, a->src_off + page_off, addr, n, (uint32_t)m->arg.pagefault.feat.ptid, 0,
                    (uint8_t)fault_kind(flags), CAUSE_FAULT, (uint16_t)flags, 0};
    uint64_t seq = uf_log_begin(e, &rec), reserved;
    int err = 0, left;
    if (e->npreload && !LOAD(e->preload_armed)) { /* the first fault starts the working set */
        pthread_mutex_lock(&e->lock);
        e->preload_armed = 1;
        pthread_cond_broadcast(&e->work_cond);
        pthread_mutex_unlock(&e->lock);
    }
    if (flags & UFFD_PAGEFAULT_FLAG_WP) {
        uf_wp_fault(e, c, a, page_off); /* a first write: the page is dirty now */
    } else if (flags & UFFD_PAGEFAULT_FLAG_MINOR) {
        /* The page cache holds the page already: just map it. */
        ADD(e, minor_faults, 1);
        /* write-protected when writes are tracked: mapped writable, a write would go unseen */
        struct uffdio_continue cont = {.range = {a->base + page_off, e->page},
                                       .mode = e->track_writes ? UFFDIO_CONTINUE_MODE_WP : 0};
        err = uf_ioctl(c->uffd, UFFDIO_CONTINUE, &cont);
        if (!err) {
            got = e->page;
            ADD(e, bytes_installed, got);
            ADD(e, fault_bytes, got);
        } else if (err == EEXIST) { /* mapped by another thread meanwhile: ours still waits */
            ADD(e, eexist, 1);
            err = uf_ioctl(c->uffd, UFFDIO_WAKE, &cont.range);
        }
        if (!err)
            uf_page_in(e, c, a->first_page + page_off / e->page);
    } else if (uf_reactivate(e, c, a, page_off, (pid_t)m->arg.pagefault.feat.ptid, &err)) {
        got = err ? 0 : e->page; /* back from the pool, no source read */
    } else if ((left = left_to_readahead(e, c, addr, &rec, seq))) {
        update_readahead(e, c, as, a, off, off + n); /* the piece's thread wakes this one */
        if (left == LEFT_HANDED)
            return 0; /* and records it */
        rec.flags |= REC_WAITED; /* the time is only this thread's (UF_RA_WAITS are recorded) */
    } else if (uf_throttle(e, c, a->base + page_off, n / e->page, (pid_t)m->arg.pagefault.feat.ptid,
                           &reserved)) {
        rec.flags |= REC_HELD; /* the budget is full until the evictor's round is over */
    } else {
        /* A COPY wakes what it installs; install_range wakes the faulting page itself if it was
         * present already (EEXIST), and failed pages get on_error. */
        err = uf_install_range(e, w, c, a, off, n, 0, CAUSE_FAULT, page_off, &got);
        uf_unreserve(e, reserved);
        if (!err)
            update_readahead(e, c, as, a, off, off + n);
    }
    if (err == EAGAIN) {
        /* The mapping is changing (a REMOVE or REMAP is pending): the thread faults again once
         * the event is handled; that fault is served then. Held until an eviction's madvise
         * returns, else woken now. */
        struct uffdio_range r = {a->base + page_off, e->page};
        ADD(e, eagain, 1);
        if (!uf_park(e, c, r.start, (pid_t)m->arg.pagefault.feat.ptid))
            uf_ioctl(c->uffd, UFFDIO_WAKE, &r);
    }
    uint64_t t1 = uf_now_ns();
    uf_observe_latency(e, t1 - t0);
    rec.length = got;
    rec.service_ns = t1 - t0 > UINT32_MAX ? UINT32_MAX : (uint32_t)(t1 - t0);
    if (!(rec.flags & (REC_HELD | REC_WAITED)))
        rec.flags |= (uint16_t)(err == EAGAIN ? REC_EAGAIN : !got ? REC_EEXIST : 0);
    uf_log_end(e, seq, &rec);
    uf_trace(e, &rec);
    return err == ESRCH ? ESRCH : 0;
}

/* ---- events ------------------------------------------------------------------------------ */

static void clear_range(engine_t *e, uctx_t *c, uint64_t start, uint64_t end, int zero)
{
    areas_t *as = areas_of(c);
    for (int i = 0; i < as->n; i++) {
        area_t *a = &as->a[i];
        uint64_t s = start > a->base ? start : a->base, t = end < a->base + a->len ? end : a->base + a->len;
        for (uint64_t x = s; x < t; x += e->page)
            uf_page_out(e, c, a->first_page + (x - a->base) / e->page, zero);
    }
}

static void note_jobs_over(engine_t *e);

/* Under e->lock: the rest of the working set is left to faults. After a REMAP: its runs name
 * areas by index and offset, which the split may give to other memory (read on, a run that
 * outgrew its shortened area would install its bytes over the part moved in after it); or
 * after the source timed out. Returns whether the pages it installed (DONTWAKE) are now to be
 * woken. */
static int end_preload(engine_t *e)
{
    if (e->preload_next >= e->npreload)
        return 0;
    uint64_t left = 0;
    for (int i = e->preload_next; i < e->npreload; i++)
        left += e->preload[3 * i + 2];
    left -= e->preload_off < left ? e->preload_off : left;
    ADD(e, preload_done, left);
    e->preload_next = e->npreload;
    e->preload_off = 0;
    /* with pieces in flight, the last one to end wakes them */
    int wake = e->preload_armed && !e->preload_inflight && !e->preload_woken;
    e->preload_woken |= wake;
    note_jobs_over(e);
    return wake;
}

/* The part [lo, hi) of area a (lo, hi within it). */
static area_t sub_area(area_t a, uint64_t lo, uint64_t hi, uint64_t page)
{
    return (area_t){lo, hi - lo, a.src_off + (lo - a.base), a.first_page + (lo - a.base) / page};
}

/* Append the parts of area a outside [lo, hi) to as (none, one or two). */
static void add_outside(areas_t *as, area_t a, uint64_t lo, uint64_t hi, uint64_t page)
{
    uint64_t end = a.base + a.len;
    if (end <= lo || a.base >= hi) {
        as->a[as->n++] = a;
        return;
    }
    if (a.base < lo)
        as->a[as->n++] = sub_area(a, a.base, lo, page);
    if (hi < end)
        as->a[as->n++] = sub_area(a, hi, end, page);
}

/* mremap moved [from, from+len) to `to`: the areas (or the parts of them) inside follow, and
 * what was mapped at [to, to+len) before is gone (MREMAP_FIXED unmaps it first: a stale
 * area there would be found first and serve its old bytes). */
static void remap(engine_t *e, uctx_t *c, uint64_t from, uint64_t to, uint64_t len)
{
    pthread_mutex_lock(&e->lock);
    areas_t *old = c->areas, *as = uf_alloc(sizeof(areas_t) + (size_t)old->n * 5 * sizeof(area_t));
    if (!as) {
        pthread_mutex_unlock(&e->lock);
        uf_log(e, "out of memory following an mremap of %#llx: faults at %#llx will be poisoned",
               (unsigned long long)from, (unsigned long long)to);
        return;
    }
    as->n = 0;
    for (int i = 0; i < old->n; i++) {
        area_t a = old->a[i];
        uint64_t end = a.base + a.len, lo = a.base > from ? a.base : from;
        uint64_t hi = end < from + len ? end : from + len;
        if (lo >= hi) {
            add_outside(as, a, to, to + len, e->page);
            continue;
        }
        if (a.base < lo)
            add_outside(as, sub_area(a, a.base, lo, e->page), to, to + len, e->page);
        area_t moved = sub_area(a, lo, hi, e->page);
        moved.base = to + (lo - from);
        as->a[as->n++] = moved;
        if (hi < end)
            add_outside(as, sub_area(a, hi, end, e->page), to, to + len, e->page);
    }
    __atomic_store_n(&c->areas, as, __ATOMIC_RELEASE);
    retire(e, old);
    if (c == e->ctxs) { /* where a new pager-process worker starts from */
        uf_state_keep_areas(e->st, as);
    } else { /* a child whose areas the supervisor lacks makes it give up at a death */
        int unsent = tell_supervisor(e, c, TELL_MOVED) != 0;
        if (unsent != c->moved_unsent)
            __atomic_add_fetch(&e->st->children_unsent, unsent ? 1 : (uint64_t)-1, __ATOMIC_SEQ_CST);
        c->moved_unsent = unsent;
    }
    memset(c->ra, 0, sizeof(c->ra));
    __atomic_add_fetch(&c->remaps, 1, __ATOMIC_SEQ_CST);
    int wake = 0;
    if (c == e->ctxs) { /* pending hints name areas by index: the numbers changed */
        e->hint_next = e->nhints;
        e->hint_off = 0;
        wake = end_preload(e);
    }
    pthread_mutex_unlock(&e->lock);
    if (wake)
        uf_wake_all(e);
}

/* A child was forked: serve its copy of the registered ranges from the same source. */
static void adopt_child(engine_t *e, uctx_t *parent, int fd)
{
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    fcntl(fd, F_SETFD, FD_CLOEXEC);
    pthread_mutex_lock(&e->lock);
    uctx_t *c = uf_ctx_new(e, fd, areas_of(parent), 1, parent);
    if (c) {
        ADD(e, children, 1);
        c->key = e->key_base + (uint64_t)c->id;
        tell_supervisor(e, c, TELL_CHILD); /* before the fork returns: the child cannot fault yet */
    }
    pthread_mutex_unlock(&e->lock);
    if (!c) {
        /* Keep the descriptor: closing it would let the child read zeros. Its faults wait. */
        uf_log(e, "out of memory serving a forked child of the process using %s: its faults on "
               "pages not loaded yet will wait", e->name);
    }
}

static void handle_event(engine_t *e, uctx_t *c, struct uffd_msg *m)
{
    switch (m->event) {
    case UFFD_EVENT_REMOVE:
        ADD(e, remove_events, 1);
        clear_range(e, c, m->arg.remove.start, m->arg.remove.end, e->on_remove == ONREM_ZERO);
        break;
    case UFFD_EVENT_UNMAP:
        ADD(e, unmap_events, 1);
        clear_range(e, c, m->arg.remove.start, m->arg.remove.end, 0);
        break;
    case UFFD_EVENT_REMAP:
        ADD(e, remap_events, 1);
        remap(e, c, m->arg.remap.from, m->arg.remap.to, m->arg.remap.len);
        break;
    case UFFD_EVENT_FORK:
        ADD(e, fork_events, 1);
        adopt_child(e, c, (int)m->arg.fork.ufd);
        break;
    }
}

/* Read and serve what a context has queued. Returns CTX_GONE when its process is gone. */
static int serve_ctx(engine_t *e, worker_t *w, uctx_t *c, struct uffd_msg *msgs)
{
    uint64_t *in_hand = &e->st->counters[C_remaps_in_hand];
    for (;;) {
        __atomic_add_fetch(&e->in_batch, 1, __ATOMIC_ACQ_REL);
        ssize_t got = read(c->uffd, msgs, sizeof(struct uffd_msg) * UF_MSG_BATCH);
        uint64_t t0 = uf_now_ns();
        if (got <= 0) {
            __atomic_sub_fetch(&e->in_batch, 1, __ATOMIC_ACQ_REL);
            if (got < 0 && (errno == EAGAIN || errno == EINTR))
                return SERVED;
            uf_state_error(e->st, got < 0 ? errno : EIO, 0, "reading the userfaultfd failed: %s",
                           strerror(got < 0 ? errno : EIO));
            return CTX_GONE;
        }
        /* A REMAP read is gone from the kernel: until it is applied (and noted for the next
         * worker, remap()), a worker that dies takes the move along, and the supervisor must
         * not start another from the areas it knows. Counted as soon as the batch is seen to
         * hold one (counting every read made every death under REMOVE traffic final). */
        size_t count = (size_t)got / sizeof(msgs[0]);
        int remaps = 0;
        for (size_t i = 0; i < count; i++)
            remaps |= msgs[i].event == UFFD_EVENT_REMAP;
        if (remaps)
            __atomic_add_fetch(in_hand, 1, __ATOMIC_SEQ_CST);
        /* Non-fault events first: a REMOVE read here lets installs into its range succeed
         * again, so its pages must be marked before any fault of the batch (or a background
         * install) fills them. */
        for (size_t i = 0; i < count; i++)
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                handle_event(e, c, &msgs[i]);
        if (remaps)
            __atomic_sub_fetch(in_hand, 1, __ATOMIC_SEQ_CST);
        __atomic_sub_fetch(&e->in_batch, 1, __ATOMIC_ACQ_REL);
        for (size_t i = 0; i < count; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            /* counted while under way: the install wakes the thread before the fault is
             * traced, and a trace_sync must not miss a fault whose thread already went on */
            __atomic_add_fetch(&e->faults_serving, 1, __ATOMIC_ACQ_REL);
            int gone = serve_fault(e, w, c, &msgs[i], t0) == ESRCH;
            __atomic_sub_fetch(&e->faults_serving, 1, __ATOMIC_ACQ_REL);
            if (gone)
                return CTX_GONE;
        }
    }
}

/* A fault thread: serves events as they come, and nothing else. */
static void *fault_main(void *arg)
{
    worker_t *w = arg;
    pthread_setname_np(pthread_self(), "uf-fault"); /* top -H, perf, gdb */
    engine_t *e = w->e;
    uf_worker_python(e, w, 1);
    for (;;) {
        struct epoll_event evs[8];
        /* the first thread also looks after forked children once a second */
        int timeout = w->slot == 0 && LOAD(e->st->counters[C_children]) ? 1000 : -1;
        int n = epoll_wait(e->epfd, evs, 8, timeout);
        if (n < 0 && errno != EINTR) {
            uf_state_error(e->st, errno, 0, "epoll_wait failed: %s", strerror(errno));
            break;
        }
        if (LOAD(e->stopping))
            break;
        if (w->slot == 0 && LOAD(e->st->counters[C_children]))
            probe_children(e);
        for (int i = 0; i < n; i++) {
            uctx_t *c = evs[i].data.ptr;
            if (!c || !ctx_enter(e, c))
                continue; /* the stop eventfd (seen above), or a context dropped meanwhile */
            ctx_leave(e, c, serve_ctx(e, w, c, w->msgs) == CTX_GONE);
        }
    }
    uf_worker_python(e, w, 0);
    return NULL;
}

/* ---- background work --------------------------------------------------------------------- */

static int preload_left(engine_t *e)
{
    return e->npreload && e->preload_armed && e->preload_next < e->npreload;
}

/* Under e->lock: mark the jobs that are over (progress bars wait for it). Their positions move
 * on lazily, at the next claim, so this runs after every claim and every finished piece. */
static void note_jobs_over(engine_t *e)
{
    uctx_t *root = e->ctxs;
    if (e->populate && !e->pop_inflight && root && e->pop_area >= areas_of(root)->n)
        __atomic_store_n(&e->st->counters[C_populate_over], 1, __ATOMIC_RELEASE);
    if (e->npreload && e->preload_next >= e->npreload && !e->preload_inflight)
        __atomic_store_n(&e->st->counters[C_preload_over], 1, __ATOMIC_RELEASE);
}

/* Before the threads start: the jobs' totals; a pager process's restarted engine starts over. */
void uf_jobs_init(engine_t *e)
{
    uint64_t *ct = e->st->counters, total = 0;
    if (e->populate) {
        areas_t *as = areas_of(e->ctxs);
        for (int i = 0; i < as->n; i++)
            total += as->a[i].len;
        ct[C_populate_total] = total;
        ct[C_populate_done] = ct[C_populate_over] = 0;
    }
    if (e->preload) {
        total = 0;
        for (int i = 0; i < e->npreload; i++)
            total += e->preload[3 * i + 2];
        ct[C_preload_total] = total;
        ct[C_preload_done] = 0;
        ct[C_preload_over] = !e->npreload;
    }
}

/* ---- willneed: ranges to read ahead of the reader ----------------------------------------- */

static int hint_left(engine_t *e)
{
    return e->hint_next < e->nhints && e->ctxs && !e->ctxs->dead;
}

/* Under e->lock: whether [off, end) of area ai lies in the part of the current willneed()
 * range already claimed (being read, or read): a fault there starts no readahead of its own,
 * which would read what the range's next pieces read. */
static int behind_hint(engine_t *e, uctx_t *c, int ai, uint64_t off, uint64_t end)
{
    if (c != e->ctxs || !hint_left(e))
        return 0;
    const uint64_t *h = &e->hints[3 * e->hint_next];
    return (int)h[0] == ai && off >= h[1] && end <= h[1] + e->hint_off;
}

/* Under e->lock: the end of the piece another background thread is reading at `addr` of
 * context c, or 0. */
static uint64_t being_read(engine_t *e, uctx_t *c, uint64_t addr)
{
    for (int i = e->nthreads; i < e->nworkers; i++) {
        uint64_t end = read_by(&e->workers[i], c, addr);
        if (end)
            return end;
    }
    return 0;
}

/* Under e->lock: the next piece of the willneed() ranges for worker w, in their order, from
 * the first page neither installed nor being read by another background thread, gathering
 * the ranges that follow in the same area into w->batch (a piece and UF_BATCH ranges at
 * most): scattered hints cost one source read. Read as readahead: a fault in it waits for
 * it, and it reserves its room in the budget (a full budget drops every range: like
 * readahead, never read past it). *n is the piece's length in all. */
#define UF_HINT_LOOK 16384 /* present pages one claim passes over (then it lets go of the lock) */
static int claim_hint(engine_t *e, worker_t *w, area_t *a, uint64_t *off, uint64_t *n)
{
    uctx_t *root = e->ctxs;
    uint64_t piece = piece_of(e), looked = 0;
    int area = -1, most = batch_of(e);
    *n = 0;
    while (hint_left(e) && w->nbatch < most && *n < piece) {
        const uint64_t *h = &e->hints[3 * e->hint_next];
        areas_t *as = areas_of(root);
        /* done, or its area is gone or shorter now (a REMAP since) */
        if ((int)h[0] >= as->n || e->hint_off >= h[2] || h[1] + e->hint_off >= as->a[h[0]].len) {
            e->hint_next++;
            e->hint_off = 0;
            continue;
        }
        if (w->nbatch && (int)h[0] != area)
            break; /* another area: the next piece */
        area_t *ar = &as->a[h[0]];
        uint64_t at = h[1] + e->hint_off, busy;
        uint64_t p = ar->first_page + at / e->page;
        if (bit_get(root->installed, p)) { /* present: eight at a time where a byte says so */
            uint64_t step = !(p & 7) && LOAD(root->installed[p >> 3]) == 0xff ? 8 : 1;
            e->hint_off += step * e->page;
            if ((looked += step) >= UF_HINT_LOOK)
                break; /* the next claim goes on from here */
            continue;
        }
        if ((busy = being_read(e, root, ar->base + at))) {
            e->hint_off = busy - ar->base - h[1];
            continue;
        }
        uint64_t len = h[2] - e->hint_off < piece - *n ? h[2] - e->hint_off : piece - *n;
        if (len > ar->len - at)
            len = ar->len - at;
        uint64_t room = UINT64_MAX; /* willneed may fill what is left below the high watermark */
        if (e->max_pages && !uf_take_room(e, &len, &room)) { /* like populate: then no more */
            e->hint_next = e->nhints;
            e->hint_off = 0; /* the next willneed() starts its first range at its start */
            break;
        }
        if (!w->nbatch)
            *a = *ar, area = (int)h[0];
        w->batch[2 * w->nbatch] = at;
        w->batch[2 * w->nbatch++ + 1] = len;
        *n += len;
        e->hint_off += len;
    }
    if (w->nbatch)
        *off = w->batch[0];
    return w->nbatch > 0;
}

/* The part of source range [s, end) that area `a` maps, as whole pages of the area:
 * [*lo, *hi). 0 if none. */
static int area_span(engine_t *e, const area_t *a, uint64_t s, uint64_t end, uint64_t *lo,
                     uint64_t *hi)
{
    uint64_t l = s > a->src_off ? s : a->src_off;
    uint64_t h = end < a->src_off + a->len ? end : a->src_off + a->len;
    if (l >= h)
        return 0;
    *lo = (l - a->src_off) & ~(e->page - 1);
    *hi = ((h - a->src_off) + e->page - 1) & ~(e->page - 1);
    return 1;
}

/* Queue the (source_offset, length) ranges of the root context for the background threads,
 * after those queued before (the ones read already are let go); whole pages. *queued: bytes
 * queued. EINVAL past UF_MAX_HINTS ranges pending, ENOMEM. */
int uf_willneed(engine_t *e, const uint64_t *ranges, Py_ssize_t n, uint64_t *queued)
{
    uctx_t *c = e->ctxs;
    int err = 0;
    *queued = 0;
    if (!c || !ctx_enter(e, c))
        return ESRCH;
    pthread_mutex_lock(&e->lock);
    if (!e->hints && !(e->hints = malloc(UF_MAX_HINTS * 3 * sizeof(uint64_t))))
        err = ENOMEM;
    if (!err && e->hint_next) { /* let go of the ranges claimed already */
        e->nhints -= e->hint_next;
        memmove(e->hints, e->hints + 3 * e->hint_next, (size_t)e->nhints * 3 * sizeof(uint64_t));
        e->hint_next = 0;
    }
    areas_t *as = areas_of(c);
    for (Py_ssize_t i = 0; !err && i < n; i++) {
        uint64_t s = ranges[2 * i], end = ranges[2 * i] + ranges[2 * i + 1];
        for (int k = 0; !err && k < as->n; k++) {
            area_t *a = &as->a[k];
            uint64_t lo, hi;
            if (!area_span(e, a, s, end, &lo, &hi))
                continue;
            uint64_t *last = e->nhints > e->hint_next ? &e->hints[3 * (e->nhints - 1)] : NULL;
            if (last && last[0] == (uint64_t)k && last[1] + last[2] == lo) {
                last[2] += hi - lo; /* adjacent to the one before (tensors in file order) */
            } else if (e->nhints >= UF_MAX_HINTS) {
                err = EINVAL;
                break;
            } else {
                uint64_t *r = &e->hints[3 * e->nhints++];
                r[0] = (uint64_t)k;
                r[1] = lo;
                r[2] = hi - lo;
            }
            *queued += hi - lo;
        }
    }
    if (*queued)
        pthread_cond_broadcast(&e->work_cond);
    pthread_mutex_unlock(&e->lock);
    ctx_leave(e, c, 0);
    return err;
}

static int has_background_work(engine_t *e)
{
    if (preload_left(e) || hint_left(e))
        return 1;
    for (uctx_t *c = e->ctxs; c; c = c->next)
        for (int i = 0; !c->dead && c->uffd >= 0 && i < UF_STREAMS; i++)
            if (c->ra[i].next < c->ra[i].end)
                return 1;
    return e->populate && e->ctxs && !e->ctxs->dead && e->pop_area < areas_of(e->ctxs)->n;
}

/* Under e->lock: the next piece of background work for worker w, the working set first, then
 * readahead, then populate. The area is copied: a REMAP may replace the array meanwhile. A
 * piece of the working set gathers the set's next runs in the same area, up to a piece in
 * all and UF_BATCH runs (w->batch), so scattered runs cost one source read; other pieces are
 * one range [*off, +*n). *n is the piece's length in all. A piece of the working set or of
 * readahead reserves its room in the budget (the claimer gives it back once installed). */
static uctx_t *claim_piece(engine_t *e, worker_t *w, area_t *a, uint64_t *off, uint64_t *n,
                           int *cause)
{
    uint64_t piece = piece_of(e);
    uctx_t *root = e->ctxs;
    int area = -1;
    w->nbatch = 0;
    *n = 0;
    int most = batch_of(e);
    while (preload_left(e) && root && !root->dead && w->nbatch < most && *n < piece) {
        uint64_t *r = &e->preload[3 * e->preload_next];
        areas_t *as = areas_of(root);
        if ((int)r[0] >= as->n || e->preload_off >= r[2]) {
            ADD(e, preload_done, r[2] - (e->preload_off < r[2] ? e->preload_off : r[2]));
            e->preload_next++;
            e->preload_off = 0;
            continue;
        }
        if (w->nbatch && (int)r[0] != area)
            break; /* another area: the next piece */
        uint64_t len = r[2] - e->preload_off < piece - *n ? r[2] - e->preload_off : piece - *n;
        len = (len + e->page - 1) & ~(e->page - 1); /* whole pages (a run is; the rest of a piece is) */
        if (e->max_pages) { /* the room below the high watermark when the set began */
            if (!e->preload_sized)
                e->preload_room = uf_room_below_high(e), e->preload_sized = 1;
            if (!uf_take_room(e, &len, &e->preload_room)) {
                /* full: faults serve the rest. The pieces in flight (this one too) end with
                 * the one WAKE; with none, there is nothing to wake (a fault on a page
                 * installed DONTWAKE meets EEXIST and its fault thread wakes it) */
                e->preload_next = e->npreload;
                e->preload_woken |= !e->preload_inflight && !w->nbatch;
                break;
            }
        }
        if (!w->nbatch)
            *a = as->a[area = (int)r[0]];
        w->batch[2 * w->nbatch] = r[1] + e->preload_off;
        w->batch[2 * w->nbatch++ + 1] = len;
        *n += len;
        e->preload_off += len;
        if (e->preload_off >= r[2]) { /* claimed to its end: the last piece's end can see it */
            e->preload_next++;
            e->preload_off = 0;
        }
    }
    if (w->nbatch) {
        *off = w->batch[0];
        *cause = CAUSE_PREFETCH;
        e->preload_inflight++;
        root->users++;
        return root;
    }
    for (uctx_t *c = e->ctxs; c; c = c->next) {
        if (c->dead || c->uffd < 0)
            continue;
        areas_t *as = areas_of(c);
        for (int i = 0; i < UF_STREAMS; i++) {
            if (c->ra[i].next >= c->ra[i].end)
                continue;
            if (c->ra[i].area >= as->n) {
                c->ra[i].next = c->ra[i].end;
                continue;
            }
            *n = c->ra[i].end - c->ra[i].next < piece ? c->ra[i].end - c->ra[i].next : piece;
            if (e->max_pages && !uf_reserve(e, *n / e->page, e->max_pages)) {
                c->ra[i].next = c->ra[i].end; /* speculative: never past the budget (faults are) */
                pthread_cond_signal(&e->evict_cond);
                continue;
            }
            *a = as->a[c->ra[i].area];
            if (c->ra[i].dir < 0) { /* nearest the fault first: from the top */
                c->ra[i].end -= *n;
                *off = c->ra[i].end;
            } else {
                *off = c->ra[i].next;
                c->ra[i].next += *n;
            }
            *cause = CAUSE_READAHEAD;
            c->users++;
            return c;
        }
    }
    if (claim_hint(e, w, a, off, n)) { /* after the faults' streams: they are the reader's now */
        *cause = CAUSE_READAHEAD;
        root->users++;
        return root;
    }
    while (e->populate && root && !root->dead && e->pop_area < areas_of(root)->n) {
        areas_t *as = areas_of(root);
        if (e->pop_next >= as->a[e->pop_area].len) {
            e->pop_area++;
            e->pop_next = 0;
            continue;
        }
        *n = as->a[e->pop_area].len - e->pop_next < piece ? as->a[e->pop_area].len - e->pop_next
                                                           : piece;
        if (e->max_pages && !uf_reserve(e, *n / e->page, e->high_pages)) {
            e->pop_area = INT32_MAX; /* with a budget, it fills the room below the high mark */
            break;
        }
        *a = as->a[e->pop_area];
        *off = e->pop_next;
        e->pop_next += *n;
        e->pop_inflight++;
        *cause = CAUSE_POPULATE;
        root->users++;
        return root;
    }
    return NULL;
}

/* Under e->lock: the source timed out on a piece (fail_range left its pages to their faults),
 * so the job the piece was part of ends: each next piece would wait as long. */
static void end_job(engine_t *e, uctx_t *c, int cause)
{
    const char *job = "readahead";
    if (cause == CAUSE_PREFETCH) {
        job = "the working set";
        if (e->preload_next >= e->npreload)
            return; /* ended already (by the other background thread) */
        end_preload(e); /* this piece is in flight: its end wakes the set */
    } else if (cause == CAUSE_POPULATE) {
        job = "populate";
        if (e->pop_area == INT32_MAX)
            return;
        e->pop_area = INT32_MAX;
    } else {
        memset(c->ra, 0, sizeof(c->ra));
        if (c == e->ctxs) { /* and the willneed hints */
            e->hint_next = e->nhints;
            e->hint_off = 0;
        }
    }
    uf_log(e, "%s of %s stops: the source timed out; faults serve the rest", job, e->name);
}

static void *background_main(void *arg)
{
    worker_t *w = arg;
    pthread_setname_np(pthread_self(), "uf-background"); /* top -H, perf, gdb */
    engine_t *e = w->e;
    uf_worker_python(e, w, 1);
    for (;;) {
        area_t a;
        uint64_t off, n, done;
        int cause;
        pthread_mutex_lock(&e->lock);
        while (!e->stopping && !has_background_work(e))
            pthread_cond_wait(&e->work_cond, &e->lock);
        uctx_t *c = e->stopping ? NULL : claim_piece(e, w, &a, &off, &n, &cause);
        note_jobs_over(e);
        int stopping = e->stopping;
        if (c && !w->nbatch) { /* one range (under the lock: read_by reads it) */
            w->batch[0] = off;
            w->batch[1] = n;
            w->nbatch = 1;
        }
        if (c)
            w->claimed = 1, w->claimed_remaps = c->remaps;
        if (c && cause == CAUSE_READAHEAD)
            w->ra_ctx = c, w->ra_base = a.base, w->ra_waiters = 0;
        pthread_mutex_unlock(&e->lock);
        if (stopping)
            break;
        if (!c)
            continue;
        /* A Python source's readahead wakes by hand, after the faults left to it are
         * recorded (end_waits) and its pages counted: a woken thread that reads the stats or
         * the trace at once finds them (the COPY's own wake came first) */
        int quiet = cause == CAUSE_PREFETCH || (cause == CAUSE_READAHEAD && e->kind == SRC_PYTHON);
        int flags = IR_SKIP_INSTALLED | (quiet ? IR_DONTWAKE : 0);
        int err = uf_install_ranges(e, w, c, &a, w->batch, w->nbatch, flags, cause, NO_WAKE, &done);
        if (e->max_pages)
            uf_unreserve(e, n / e->page); /* counted now (claim_piece reserved it) */
        if (err == EAGAIN)
            ADD(e, eagain, 1);
        if (err == ETIMEDOUT) {
            pthread_mutex_lock(&e->lock);
            end_job(e, c, cause);
            pthread_mutex_unlock(&e->lock);
        }
        if (cause == CAUSE_READAHEAD) {
            uf_rec_t wait[UF_RA_WAITS];
            uint64_t seq[UF_RA_WAITS];
            pthread_mutex_lock(&e->lock);
            int waiters = w->ra_waiters, recorded = waiters < UF_RA_WAITS ? waiters : UF_RA_WAITS;
            memcpy(wait, w->ra_wait, sizeof(*wait) * (size_t)recorded);
            memcpy(seq, w->ra_wait_seq, sizeof(*seq) * (size_t)recorded);
            w->ra_ctx = NULL;
            pthread_mutex_unlock(&e->lock);
            end_waits(e, wait, seq, recorded); /* recorded before they run on (trace_sync) */
            /* DONTWAKE: a fault still queued for the fault thread finds its page present and
             * is woken there (EEXIST); the ones left to this piece are woken here */
            for (int k = 0; waiters && err != ESRCH && k < w->nbatch; k++) {
                struct uffdio_range r = {w->ra_base + w->batch[2 * k], w->batch[2 * k + 1]};
                uf_ioctl(c->uffd, UFFDIO_WAKE, &r);
            }
        }
        ctx_leave(e, c, err == ESRCH);
        if (cause == CAUSE_PREFETCH || cause == CAUSE_POPULATE) {
            if (cause == CAUSE_PREFETCH)
                ADD(e, preload_done, n);
            else
                ADD(e, populate_done, n);
            pthread_mutex_lock(&e->lock);
            e->pop_inflight -= cause == CAUSE_POPULATE;
            /* the working set is in: one wake for all of it */
            int last = cause == CAUSE_PREFETCH && --e->preload_inflight == 0 &&
                       e->preload_next >= e->npreload && !e->preload_woken;
            e->preload_woken |= last;
            note_jobs_over(e);
            pthread_mutex_unlock(&e->lock);
            if (last)
                uf_wake_all(e);
        }
    }
    uf_worker_python(e, w, 0);
    return NULL;
}

/* ---- start, stop, prefetch --------------------------------------------------------------- */

int uf_engine_start(engine_t *e)
{
    e->stopping = 0;
    int er = uf_trace_start(e);
    if (!er)
        er = uf_evictor_start(e);
    if (er)
        return er;
    for (int i = 0; i < e->nworkers; i++) {
        worker_t *w = &e->workers[i];
        int r = pthread_create(&w->thread, NULL, w->background ? background_main : fault_main, w);
        if (r) {
            e->started = 1;
            uf_engine_stop(e); /* the ones already running */
            return r;
        }
        e->nstarted = i + 1;
    }
    e->started = 1;
    return 0;
}

void uf_engine_stop(engine_t *e)
{
    pthread_mutex_lock(&e->stop_lock); /* two Python threads may call stop() at once */
    if (!e->started || e->owner != getpid()) {
        /* not running, or a forked copy of an engine whose threads live in the parent */
        e->started = 0;
        pthread_mutex_unlock(&e->stop_lock);
        return;
    }
    uf_evictor_stop(e); /* first: it may wait for a fault thread */
    pthread_mutex_lock(&e->lock);
    e->stopping = 1;
    pthread_cond_broadcast(&e->work_cond);
    pthread_mutex_unlock(&e->lock);
    uint64_t one = 1;
    if (write(e->stopfd, &one, sizeof(one)) < 0) {
        /* an eventfd write fails only on overflow, which one write cannot cause */
    }
    for (int i = 0; i < e->nstarted; i++)
        pthread_join(e->workers[i].thread, NULL);
    uf_trace_stop(e);
    if (read(e->stopfd, &one, sizeof(one)) < 0) {
        /* drained: a restarted engine must not see the old stop request */
    }
    e->nstarted = 0;
    e->started = 0;
    pthread_mutex_unlock(&e->stop_lock);
}

/* Wake every thread blocked on any context's uffd, at any address (they fault again): those
 * whose faults a dead server had read, in memory moved where no area of ours reaches too. */
void uf_wake_anywhere(engine_t *e)
{
    for (uctx_t *c = e->ctxs; c; c = c->next) {
        if (!ctx_enter(e, c))
            continue;
        uf_wake_space(c->uffd);
        ctx_leave(e, c, 0);
    }
}

/* Wake every thread blocked on any area of any context (they fault again). */
void uf_wake_all(engine_t *e)
{
    for (uctx_t *c = e->ctxs; c; c = c->next) {
        if (!ctx_enter(e, c))
            continue;
        areas_t *as = areas_of(c);
        for (int i = 0; i < as->n; i++) {
            struct uffdio_range r = {as->a[i].base, as->a[i].len};
            uf_ioctl(c->uffd, UFFDIO_WAKE, &r);
        }
        ctx_leave(e, c, 0);
    }
}

/* Install every missing page of the (source_offset, length) ranges of the root context with
 * DONTWAKE, then wake each area once. Pages that fail get on_error; w->poisoned lists them. A
 * source that times out ends it (ETIMEDOUT, w->msg says where).
 * With a budget, only what fits below the high watermark now (uf_room_below_high): the rest
 * is left to faults. */
int uf_prefetch(engine_t *e, worker_t *w, const uint64_t *ranges, Py_ssize_t n, uint64_t *installed)
{
    uctx_t *c = e->ctxs;
    int err = 0;
    *installed = 0;
    if (!c || !ctx_enter(e, c))
        return ESRCH;
    /* An event the kernel handed over before this call (madvise returns once its REMOVE is
     * read) is handled first: the page states must say what is gone. */
    while (__atomic_load_n(&e->in_batch, __ATOMIC_ACQUIRE))
        sched_yield();
    pthread_mutex_lock(&e->lock);
    areas_t *as = areas_of(c);
    w->claimed = 1, w->claimed_remaps = c->remaps;
    pthread_mutex_unlock(&e->lock);
    int full = 0;
    uint64_t room = e->max_pages ? uf_room_below_high(e) : UINT64_MAX; /* pages it may fill */
    for (Py_ssize_t i = 0; !err && !full && i < n; i++) {
        uint64_t s = ranges[2 * i], end = ranges[2 * i] + ranges[2 * i + 1];
        for (int k = 0; !err && !full && k < as->n; k++) {
            area_t *a = &as->a[k];
            uint64_t lo, hi;
            if (!area_span(e, a, s, end, &lo, &hi))
                continue;
            for (uint64_t off = lo; !err && off < hi && !LOAD(e->stopping); off += e->unit_max) {
                uint64_t len = hi - off < e->unit_max ? hi - off : e->unit_max, done;
                if (e->max_pages && !uf_take_room(e, &len, &room)) {
                    full = 1; /* with a budget, what fits below the high watermark */
                    break;
                }
                err = uf_install_range(e, w, c, a, off, len, IR_SKIP_INSTALLED | IR_DONTWAKE,
                                       CAUSE_PREFETCH, NO_WAKE, &done);
                if (e->max_pages)
                    uf_unreserve(e, len / e->page);
                *installed += done;
                ADD(e, prefetch_done, len);
                if (err == EAGAIN) { /* a REMOVE is pending there: skip it, faults will decide */
                    ADD(e, eagain, 1);
                    err = 0;
                } /* ETIMEDOUT (the source timed out) ends it: faults serve the rest */
            }
        }
    }
    for (int k = 0; k < as->n; k++) {
        struct uffdio_range r = {as->a[k].base, as->a[k].len};
        uf_ioctl(c->uffd, UFFDIO_WAKE, &r);
    }
    w->claimed = 0;
    ctx_leave(e, c, err == ESRCH);
    return err;
}
