/* Writable memory: written pages go home (to a file, a buffer, or a Python source's
 * write_from) on flush, before they are evicted, and on close.
 *
 * Pages are installed write-protected; the first write to one faults (synchronous
 * UFFDIO_WRITEPROTECT, not WP_ASYNC: a write-back must be able to hold a writer back, and an
 * asynchronous write protection resolves writes in the kernel without asking). The fault
 * marks the page dirty and lifts the protection. A write-back protects the pages again first,
 * then copies them: a write that races it faults, and waits (deferred) until the copy is
 * taken, or until an evicted page is gone; then it proceeds, and the page is dirty again. So a
 * write is never lost, and a page is never dropped while dirty.
 *
 * In a pager process the engine cannot read the faulting process's memory: the watchdog
 * thread there copies the pages into the pool memfd, which the engine reads. */
#define _GNU_SOURCE
#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int uf_write_alloc(engine_t *e, uctx_t *c)
{
    size_t n = c->npages / 8 + 1;
    c->dirty = calloc(n, 1);
    c->wbusy = calloc(n, 1);
    c->deferred = calloc(n, 1);
    return c->dirty && c->wbusy && c->deferred ? 0 : ENOMEM;
}

/* Protect (wp) or lift the protection of a range; lifting it wakes its writers. (The kernel
 * refuses DONTWAKE with WP: protecting wakes nobody anyway.) A lift that fails wakes nobody
 * either, so the writers are woken by hand: they fault again (EAGAIN while an eviction's
 * REMOVE is pending, and later they find the page protected, or gone). */
static int protect(engine_t *e, uctx_t *c, uint64_t addr, uint64_t len, int wp)
{
    struct uffdio_writeprotect w = {.range = {addr, len}, .mode = wp ? UFFDIO_WRITEPROTECT_MODE_WP : 0};
    int err = uf_ioctl(c->uffd, UFFDIO_WRITEPROTECT, &w);
    if (err && !wp) {
        struct uffdio_range r = {addr, len};
        uf_ioctl(c->uffd, UFFDIO_WAKE, &r);
    }
    return err;
}

static void mark_dirty(engine_t *e, uctx_t *c, uint64_t p)
{
    if (!bit_test_set(c->dirty, p))
        ADD(e, dirty_pages, 1);
}

/* A first write to a protected page. */
void uf_wp_fault(engine_t *e, uctx_t *c, area_t *a, uint64_t off)
{
    uint64_t p = a->first_page + off / e->page;
    uctx_t *root = e->ctxs;
    if (c != root || !c->dirty) {
        /* A forked child's copy: its writes are its own, except in shared memory, where they
         * are the parent's too. */
        if (c != root && e->shared_mem && root->dirty) {
            pthread_mutex_lock(&e->wp_lock);
            mark_dirty(e, root, p);
            pthread_mutex_unlock(&e->wp_lock);
        }
        protect(e, c, a->base + off, e->page, 0);
        return;
    }
    pthread_mutex_lock(&e->wp_lock);
    if (bit_get(c->wbusy, p)) {
        bit_set(c->deferred, p); /* being written back: the writer waits for it */
    } else {
        mark_dirty(e, c, p);
        protect(e, c, a->base + off, e->page, 0); /* lifts it and wakes the writer */
    }
    pthread_mutex_unlock(&e->wp_lock);
}

/* The evictor holds a clean page it will drop: writes to it wait. 1: held; 0: the page is
 * dirty; -1: a write-back holds it. Such a page reads as clean (its dirty bit goes when it is
 * protected, before the copy), but dropping it before the copy is taken would make the copy
 * fault it in again from the source: the stale bytes would be written home. */
int uf_hold(engine_t *e, uctx_t *c, uint64_t p)
{
    if (!c->dirty)
        return 1;
    pthread_mutex_lock(&e->wp_lock);
    int held = bit_get(c->dirty, p) ? 0 : bit_test_set(c->wbusy, p) ? -1 : 1;
    pthread_mutex_unlock(&e->wp_lock);
    return held;
}

static area_t *area_of(uctx_t *c, uint64_t p, uint64_t page)
{
    for (int i = 0; i < c->areas->n; i++) {
        area_t *a = &c->areas->a[i];
        if (p >= a->first_page && p < a->first_page + a->len / page)
            return a;
    }
    return NULL;
}

/* Under wp_lock: let a held page go; a writer that waited writes again (to the page, or, if
 * it was dropped, to the page its fault brings back). */
static void release_page(engine_t *e, uctx_t *c, uint64_t p, int dropped)
{
    bit_clear(c->wbusy, p);
    if (!bit_test_clear(c->deferred, p))
        return;
    area_t *a = area_of(c, p, e->page);
    if (!a)
        return;
    uint64_t addr = a->base + (p - a->first_page) * e->page;
    if (dropped) {
        struct uffdio_range r = {addr, e->page};
        uf_ioctl(c->uffd, UFFDIO_WAKE, &r);
    } else {
        mark_dirty(e, c, p);
        protect(e, c, addr, e->page, 0);
    }
}

void uf_release(engine_t *e, uctx_t *c, uint64_t first, uint64_t n, int dropped)
{
    if (!c->dirty)
        return;
    pthread_mutex_lock(&e->wp_lock);
    for (uint64_t p = first; p < first + n; p++)
        release_page(e, c, p, dropped);
    pthread_mutex_unlock(&e->wp_lock);
}

/* Copy [off, off+len) of area a home. Returns an errno; w->msg says why. */
static int write_out(engine_t *e, worker_t *w, area_t *a, uint64_t off, uint64_t len)
{
    uint64_t src = a->src_off + off, addr = a->base + off;
    uint64_t size = e->src_len ? e->src_len : e->wb_len;
    if (size && src >= size)
        return 0; /* the zeros past the source's end have no home */
    if (size && src + len > size)
        len = size - src;
    if (e->wb_fd >= 0) {
        for (uint64_t done = 0; done < len;) {
            ssize_t r = pwrite(e->wb_fd, (const char *)(uintptr_t)addr + done, len - done, (off_t)(src + done));
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0) {
                int err = r < 0 ? errno : EIO;
                snprintf(w->msg, sizeof(w->msg), "pwrite: %s", strerror(err));
                return err;
            }
            done += (uint64_t)r;
        }
        return 0;
    }
    if (e->wb_buf) {
        memcpy(e->wb_buf + src, (const void *)(uintptr_t)addr, len);
        return 0;
    }
    /* A Python source in a pager process: the faulting process copies the pages into the
     * pool (free at these pages: a dirty page is never on probation), write_from reads them. */
    uint64_t pool_off = (a->first_page + off / e->page) * e->page;
    int err = 0;
    if (e->agent_req >= 0)
        err = uf_ask_target(e, AGENT_COPY_OUT, addr, len, pool_off);
    else
        memcpy(e->pool_map + pool_off, (const void *)(uintptr_t)addr, len);
    if (err) {
        snprintf(w->msg, sizeof(w->msg), "copying the pages out of the faulting process: %s",
                 strerror(err));
        return err;
    }
    uf_inflight(e, w->slot, src, len, addr);
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *view = PyMemoryView_FromMemory(e->pool_map + pool_off, (Py_ssize_t)len, PyBUF_READ);
    PyObject *args[2] = {PyLong_FromUnsignedLongLong(src), view};
    PyObject *res = view && args[0] ? PyObject_Vectorcall(e->write_from, args, 2, NULL) : NULL;
    if (!res) {
        uf_take_exception(w->msg, sizeof(w->msg));
        err = EIO;
    }
    Py_XDECREF(res);
    Py_XDECREF(args[0]);
    Py_XDECREF(view);
    PyGILState_Release(g);
    uf_inflight(e, w->slot, 0, 0, 0);
    fallocate(e->pool_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)pool_off, (off_t)len);
    return err;
}

/* Write one run [p, q) of held pages home, retrying with backoff. Returns an errno. */
static int write_run(engine_t *e, worker_t *w, uctx_t *c, area_t *a, uint64_t p, uint64_t q,
                     uint64_t *bytes, uint8_t *written)
{
    uint64_t off = (p - a->first_page) * e->page, len = (q - p) * e->page, t0 = uf_now_ns();
    int err = 0;
    for (int round = 0;; round++) {
        w->msg[0] = 0;
        if (!(err = write_out(e, w, a, off, len)) || round >= e->retries || LOAD(e->stopping))
            break;
        uf_log(e, "writing %#llx..+%llu back to %s failed: %s; retry %d", (unsigned long long)(a->base + off),
               (unsigned long long)len, e->name, w->msg, round + 1);
        ADD(e, retries, 1);
        struct timespec ts = {0, 5000000L << (round < 7 ? round : 7)};
        nanosleep(&ts, NULL);
    }
    if (err) {
        uf_log(e, "cannot write %#llx..+%llu (offset %#llx) back to %s: %s; the pages stay "
               "dirty and in memory", (unsigned long long)(a->base + off), (unsigned long long)len,
               (unsigned long long)(a->src_off + off), e->name, w->msg);
        uf_state_error(e->st, err, a->base + off, "writing %#llx..+%llu (offset %#llx) back "
                       "to %s failed: %s; the pages stay dirty", (unsigned long long)(a->base + off),
                       (unsigned long long)len, (unsigned long long)(a->src_off + off), e->name, w->msg);
        pthread_mutex_lock(&e->wp_lock);
        for (uint64_t i = p; i < q; i++)
            mark_dirty(e, c, i);
        pthread_mutex_unlock(&e->wp_lock);
        return err;
    }
    ADD(e, writebacks, q - p);
    ADD(e, writeback_bytes, len);
    for (uint64_t i = p; written && i < q; i++)
        bit_set(written, i);
    *bytes += len;
    uf_trace_install(e, t0, a, off, len, CAUSE_WRITEBACK);
    return 0;
}

#define WB_WINDOW 1024 /* pages taken, protected and released at a time */

/* Write the dirty pages among [first, first+n) home (page indices of one area). A window's
 * dirty pages are taken at once and protected with one UFFDIO_WRITEPROTECT over the span from
 * the first to the last (the clean pages between are protected already: a page's protection
 * is lifted only by a write, which marks it dirty, under wp_lock), then written out a run of
 * adjacent pages at a time, then released. Pages that cannot be written stay dirty, and
 * resident. Pages written are set in `written` (if not NULL). */
int uf_writeback(engine_t *e, worker_t *w, uctx_t *c, uint64_t first, uint64_t n, uint64_t *bytes,
                 uint8_t *written)
{
    area_t *a = area_of(c, first, e->page);
    int ret = 0;
    if (!a || !c->dirty)
        return 0;
    for (uint64_t base = first; base < first + n; base += WB_WINDOW) {
        uint64_t end = first + n - base < WB_WINDOW ? first + n : base + WB_WINDOW, lo = end, hi = base;
        uint8_t mine[WB_WINDOW / 8] = {0}; /* the pages this call holds (others may hold some) */
        pthread_mutex_lock(&e->wp_lock);
        for (uint64_t p = base; p < end; p++) {
            if (!bit_get(c->dirty, p) || bit_test_set(c->wbusy, p))
                continue; /* clean, or held by another write-back: it takes care of the page */
            bit_set(mine, p - base);
            lo = p < lo ? p : lo;
            hi = p + 1;
        }
        /* protected, the pages are clean until written again (if the span cannot be
         * protected, they are written out while held, and stay dirty) */
        if (lo < hi && protect(e, c, a->base + (lo - a->first_page) * e->page, (hi - lo) * e->page, 1) == 0)
            for (uint64_t p = lo; p < hi; p++)
                if (bit_get(mine, p - base) && bit_test_clear(c->dirty, p))
                    ADD(e, dirty_pages, -1);
        if (lo < hi)
            e->wb_active++;
        pthread_mutex_unlock(&e->wp_lock);
        for (uint64_t p = lo; p < hi;) {
            if (!bit_get(mine, p - base)) {
                p++;
                continue;
            }
            uint64_t q = p;
            while (q < hi && bit_get(mine, q - base))
                q++;
            int err = write_run(e, w, c, a, p, q, bytes, written);
            ret = ret ? ret : err;
            p = q;
        }
        if (lo < hi) {
            pthread_mutex_lock(&e->wp_lock);
            for (uint64_t p = lo; p < hi; p++)
                if (bit_get(mine, p - base))
                    release_page(e, c, p, 0);
            if (--e->wb_active == 0) {
                e->wb_idle++;
                pthread_cond_broadcast(&e->wb_cond);
            }
            pthread_mutex_unlock(&e->wp_lock);
        }
    }
    return ret;
}

static int flush_all(engine_t *e, worker_t *w, uctx_t *c, uint64_t *pages, uint64_t *bytes);

/* Everything dirty goes home, then the source is asked to make it durable (fsync, or the
 * source's flush()). If that fails, the pages written this time are dirty again: a later
 * flush writes them again (after a failed fsync the kernel may have dropped them). */
int uf_flush(engine_t *e, worker_t *w, uint64_t *pages, uint64_t *bytes)
{
    uctx_t *c = e->ctxs;
    *bytes = 0;
    if (!c || !c->dirty || !e->writable) /* a read-only pager's written pages have no home */
        return 0;
    pid_t me = (pid_t)gettid(), none = 0;
    int slot = -1;
    for (int i = 0; slot < 0 && i < UF_FLUSHERS; i++)
        if (__atomic_compare_exchange_n(&e->flushers[i], &none, me, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            slot = i;
        else
            none = 0;
    int ret = flush_all(e, w, c, pages, bytes);
    if (slot >= 0)
        __atomic_store_n(&e->flushers[slot], 0, __ATOMIC_SEQ_CST);
    return ret;
}

/* uf_flush's work, its thread known as a flusher. */
static int flush_all(engine_t *e, worker_t *w, uctx_t *c, uint64_t *pages, uint64_t *bytes)
{
    int ret = 0;
    uint8_t *written = calloc(c->npages / 8 + 1, 1);
    if (!written) {
        snprintf(w->msg, sizeof(w->msg), "out of memory");
        return ENOMEM;
    }
    uint64_t before = LOAD(e->st->counters[C_writebacks]);
    for (int i = 0; i < c->areas->n; i++) {
        area_t *a = &c->areas->a[i];
        for (uint64_t p = a->first_page; p < a->first_page + a->len / e->page; p += 1024) {
            uint64_t n = a->first_page + a->len / e->page - p;
            int err = uf_writeback(e, w, c, p, n < 1024 ? n : 1024, bytes, written);
            ret = ret ? ret : err;
        }
    }
    /* A page another write-back holds (the evictor's) was passed as clean, its bytes maybe
     * not home yet: wait until every write-back begun before now has ended. */
    pthread_mutex_lock(&e->wp_lock);
    for (uint64_t idle = e->wb_idle; e->wb_active && e->wb_idle == idle;)
        pthread_cond_wait(&e->wb_cond, &e->wp_lock);
    pthread_mutex_unlock(&e->wp_lock);
    *pages = LOAD(e->st->counters[C_writebacks]) - before;
    if (e->wb_fd >= 0 && fsync(e->wb_fd) && !ret) {
        ret = errno;
        snprintf(w->msg, sizeof(w->msg), "fsync: %s", strerror(ret));
    }
    if (e->src_flush && !ret) {
        PyGILState_STATE g = PyGILState_Ensure();
        PyObject *res = PyObject_CallNoArgs(e->src_flush);
        if (!res) {
            uf_take_exception(w->msg, sizeof(w->msg));
            ret = EIO;
        }
        Py_XDECREF(res);
        PyGILState_Release(g);
    }
    if (ret && *bytes) { /* not durable: written again next time */
        pthread_mutex_lock(&e->wp_lock);
        for (uint64_t p = 0; p < c->npages; p++)
            if (bit_get(written, p) && bit_get(c->installed, p))
                mark_dirty(e, c, p);
        pthread_mutex_unlock(&e->wp_lock);
    }
    free(written);
    return ret;
}
