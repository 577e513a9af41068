/* The engine's state block (counters, first error, fault log, pager-process bookkeeping) and
 * its log lines. The block may be shared with another process, which reads it without locks:
 * counters are relaxed atomics, the error is published last, the fault log is a ring with a
 * single writing process and a single reading one. */
#define _GNU_SOURCE
#include "engine.h"

#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

size_t uf_state_size(uint64_t log_cap)
{
    return sizeof(uf_state_t) + (size_t)log_cap * sizeof(uf_rec_t);
}

void uf_state_init(uf_state_t *st, size_t size, uint64_t log_cap)
{
    memset(st, 0, size);
    st->size = size;
    st->log_cap = log_cap;
    __atomic_store_n(&st->magic, UF_STATE_MAGIC, __ATOMIC_RELEASE);
}

int uf_state_check(const void *buf, size_t len, const char **why)
{
    const uf_state_t *st = buf;
    if (len < sizeof(uf_state_t) || st->magic != UF_STATE_MAGIC) {
        *why = "not an engine state block (made by state_init)";
        return -1;
    }
    if (st->size > len || st->size != uf_state_size(st->log_cap)) {
        *why = "the state block is shorter than its header says";
        return -1;
    }
    return 0;
}

/* Keep the first error (errno, address, message); later ones only count. */
void uf_state_error(uf_state_t *st, int err, uint64_t addr, const char *fmt, ...)
{
    __atomic_add_fetch(&st->counters[C_errors], 1, __ATOMIC_RELAXED);
    int64_t none = 0;
    if (!__atomic_compare_exchange_n(&st->err, &none, -1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(st->err_msg, sizeof(st->err_msg), fmt, ap);
    va_end(ap);
    st->err_addr = addr;
    __atomic_store_n(&st->err, err > 0 ? err : EIO, __ATOMIC_RELEASE);
}

/* A log line on log_fd, written at once (the faulting process may die of the SIGBUS that
 * follows). Rate-limited: a burst of 20 lines, then 5 a second; what is left out is counted
 * and said on the next line that gets through. */
void uf_log(engine_t *e, const char *fmt, ...)
{
    if (e->log_fd < 0)
        return;
    char line[1024];
    uint64_t now = uf_now_ns(), quiet = 0;
    pthread_mutex_lock(&e->log_lock);
    e->log_tokens += (double)(now - e->log_last_ns) * 5e-9;
    if (e->log_tokens > 20)
        e->log_tokens = 20;
    e->log_last_ns = now;
    if (e->log_tokens < 1) {
        e->log_quiet++;
        ADD(e, log_suppressed, 1);
        pthread_mutex_unlock(&e->log_lock);
        return;
    }
    e->log_tokens -= 1;
    quiet = e->log_quiet;
    e->log_quiet = 0;
    int n = snprintf(line, sizeof(line), "userfault: ");
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof(line) - 64)
        n = (int)sizeof(line) - 64;
    if (quiet)
        n += snprintf(line + n, sizeof(line) - (size_t)n, " (%llu similar lines were left out)",
                      (unsigned long long)quiet);
    line[n++] = '\n';
    for (int done = 0; done < n;) {
        ssize_t r = write(e->log_fd, line + done, (size_t)(n - done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        done += (int)r;
    }
    pthread_mutex_unlock(&e->log_lock);
}

/* The root context's areas after an mremap, for a new pager-process worker (uf_state_t):
 * areas_seq is odd while they are written. */
void uf_state_keep_areas(uf_state_t *st, const areas_t *as)
{
    __atomic_add_fetch(&st->areas_seq, 1, __ATOMIC_SEQ_CST); /* odd: being written */
    st->nareas = (uint64_t)as->n;
    for (int i = 0; i < as->n && i < UF_KEPT_AREAS; i++) {
        st->areas[3 * i] = as->a[i].base;
        st->areas[3 * i + 1] = as->a[i].len;
        st->areas[3 * i + 2] = as->a[i].src_off;
    }
    __atomic_add_fetch(&st->areas_seq, 1, __ATOMIC_SEQ_CST);
}

/* The fault log: a record is published before the fault is served, so the woken thread can
 * read it already; its service time, length and outcome flags (REC_*) are filled in afterwards
 * unless it was drained meanwhile. A record's `reserved` holds its sequence number's low 30
 * bits, with UF_LOG_WRITING while uf_log_begin or uf_log_end writes and UF_LOG_DONE after the
 * end: the drain copies a
 * record again until it reads the same tag, not being written, on both sides of its copy (an
 * end that ran whole during the copy changed it to DONE); an end whose slot holds another
 * record by now (drained, and the log wrapped) writes nothing.
 * Only this process writes; the reader (maybe another process) moves log_read. */
static uint32_t log_tag(uint64_t seq) { return (uint32_t)(seq & (UF_LOG_DONE - 1)); }

uint64_t uf_log_begin(engine_t *e, const uf_rec_t *r)
{
    uf_state_t *st = e->st;
    uint64_t seq = UINT64_MAX;
    if (!st->log_cap)
        return seq;
    pthread_mutex_lock(&e->lock);
    uint64_t written = st->log_written, read = __atomic_load_n(&st->log_read, __ATOMIC_ACQUIRE);
    if (written - read >= st->log_cap) {
        ADD(e, log_dropped, 1);
    } else {
        seq = written;
        uf_rec_t *slot = &st->log[seq % st->log_cap], rec = *r;
        /* Claim the slot (its tag becomes ours, WRITING), so that a late end of the record it
         * held fails its CAS. That end may be writing now: three stores, unless its thread
         * was preempted between them; or it died there (a pager-process worker killed), so
         * the wait is bounded. */
        uint32_t cur = __atomic_load_n(&slot->reserved, __ATOMIC_ACQUIRE);
        for (int spins = 0;; spins++) {
            if (cur & UF_LOG_WRITING && spins < UF_LOG_SPINS) {
                sched_yield();
                cur = __atomic_load_n(&slot->reserved, __ATOMIC_ACQUIRE);
            } else if (__atomic_compare_exchange_n(&slot->reserved, &cur, log_tag(seq) | UF_LOG_WRITING,
                                                   0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                break;
            }
        }
        rec.reserved = log_tag(seq) | UF_LOG_WRITING;
        *slot = rec;
        __atomic_store_n(&slot->reserved, log_tag(seq), __ATOMIC_RELEASE);
        __atomic_store_n(&st->log_written, written + 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&e->lock);
    return seq;
}

void uf_log_end(engine_t *e, uint64_t seq, const uf_rec_t *done)
{
    uf_state_t *st = e->st;
    if (seq == UINT64_MAX || seq < __atomic_load_n(&st->log_read, __ATOMIC_ACQUIRE))
        return;
    uf_rec_t *r = &st->log[seq % st->log_cap];
    uint32_t tag = log_tag(seq);
    if (!__atomic_compare_exchange_n(&r->reserved, &tag, tag | UF_LOG_WRITING, 0,
                                     __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
        return; /* drained, and the slot holds a newer record */
    __atomic_store_n(&r->length, done->length, __ATOMIC_RELAXED);
    __atomic_store_n(&r->flags, done->flags, __ATOMIC_RELAXED);
    __atomic_store_n(&r->service_ns, done->service_ns, __ATOMIC_RELAXED);
    __atomic_store_n(&r->reserved, log_tag(seq) | UF_LOG_DONE, __ATOMIC_RELEASE);
}

void uf_observe_latency(engine_t *e, uint64_t ns)
{
    uf_state_t *st = e->st;
    ADD(e, service_ns, ns);
    int b = ns ? 63 - __builtin_clzll(ns) : 0;
    __atomic_add_fetch(&st->hist[b < UF_HIST_BUCKETS ? b : UF_HIST_BUCKETS - 1], 1, __ATOMIC_RELAXED);
    uint64_t cur = LOAD(st->counters[C_service_max_ns]);
    while (ns > cur && !__atomic_compare_exchange_n(&st->counters[C_service_max_ns], &cur, ns, 1,
                                                    __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        ;
}

/* Publish (len > 0) or clear (len == 0) the source read slot `slot` is doing. */
void uf_inflight(engine_t *e, int slot, uint64_t src_off, uint64_t len, uint64_t addr)
{
    uf_inflight_t *f = &e->st->inflight[slot];
    if (!len) {
        __atomic_store_n(&f->start_ns, 0, __ATOMIC_RELEASE);
        return;
    }
    f->src_off = src_off;
    f->len = len;
    f->addr = addr;
    __atomic_store_n(&f->start_ns, uf_now_ns(), __ATOMIC_RELEASE);
}

/* Whether [off, off+len) overlaps one of the first n marks. */
int uf_marked(const uf_mark_t *marks, uint64_t n, uint64_t off, uint64_t len)
{
    if (n > UF_MAX_MARKS)
        n = UF_MAX_MARKS;
    for (uint64_t i = 0; i < n; i++)
        if (off < marks[i].off + marks[i].len && marks[i].off < off + len)
            return 1;
    return 0;
}
