/* Traces: every fault and install as a 48-byte record (uf_rec_t), appended to a file whose
 * header Python wrote (userfault.trace.format). Serving threads never wait for the disk:
 * they fill one of two buffers, a writer thread writes the other. When both are full,
 * records are dropped and counted, and the count is written as a DROPPED record as soon as
 * there is room again: a trace never misses records silently. */
#define _GNU_SOURCE
#include "engine.h"

#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static void write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t r = write(fd, p, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return; /* a full disk: the trace ends there (its reader reports it short) */
        p += r;
        n -= (size_t)r;
    }
}

/* Under trace_lock: room for one record in the active buffer, swapping to the other one if
 * it is free; NULL if both are full. */
static uf_rec_t *slot(engine_t *e)
{
    int cur = e->trace_cur;
    if (e->trace_n[cur] < UF_TRACE_RECS)
        return &e->trace_buf[cur][e->trace_n[cur]++];
    int other = !cur;
    if (e->trace_n[other])
        return NULL; /* the writer has not taken it yet */
    e->trace_full = cur + 1; /* hand the full one to the writer */
    pthread_cond_signal(&e->trace_cond);
    e->trace_cur = other;
    return &e->trace_buf[other][e->trace_n[other]++];
}

void uf_trace(engine_t *e, const uf_rec_t *r)
{
    if (e->trace_fd < 0)
        return;
    pthread_mutex_lock(&e->trace_lock);
    if (e->trace_lost) {
        uf_rec_t *d = slot(e);
        if (d) {
            *d = (uf_rec_t){.t_ns = r->t_ns, .length = e->trace_lost, .kind = KIND_NONE,
                            .cause = CAUSE_DROPPED};
            e->trace_lost = 0;
        }
    }
    uf_rec_t *s = e->trace_lost ? NULL : slot(e);
    if (s) {
        *s = *r;
    } else {
        e->trace_lost++;
        ADD(e, trace_dropped, 1);
    }
    pthread_mutex_unlock(&e->trace_lock);
}

void uf_trace_install(engine_t *e, uint64_t t0, area_t *a, uint64_t off, uint64_t len, int cause)
{
    if (e->trace_fd < 0 || !len)
        return;
    uint64_t t1 = uf_now_ns();
    uf_rec_t r = {t0, a->src_off + off, a->base + off, len, 0,
                  t1 - t0 > UINT32_MAX ? UINT32_MAX : (uint32_t)(t1 - t0), KIND_NONE, (uint8_t)cause, 0, 0};
    uf_trace(e, &r);
}

static void *trace_main(void *arg)
{
    engine_t *e = arg;
    pthread_setname_np(pthread_self(), "uf-trace"); /* top -H, perf, gdb */
    pthread_mutex_lock(&e->trace_lock);
    for (;;) {
        while (!e->trace_full && !e->trace_stop)
            pthread_cond_wait(&e->trace_cond, &e->trace_lock);
        if (!e->trace_full)
            break;
        int b = e->trace_full - 1;
        e->trace_full = 0;
        size_t n = e->trace_n[b];
        pthread_mutex_unlock(&e->trace_lock);
        write_all(e->trace_fd, (const char *)e->trace_buf[b], n * sizeof(uf_rec_t));
        pthread_mutex_lock(&e->trace_lock);
        e->trace_n[b] = 0;
    }
    pthread_mutex_unlock(&e->trace_lock);
    return NULL;
}

int uf_trace_start(engine_t *e)
{
    if (e->trace_fd < 0 || e->trace_started)
        return 0;
    e->trace_stop = 0;
    int r = pthread_create(&e->trace_thread, NULL, trace_main, e);
    if (!r)
        e->trace_started = 1;
    return r;
}

static void join_writer(engine_t *e)
{
    pthread_mutex_lock(&e->trace_lock);
    e->trace_stop = 1;
    pthread_cond_signal(&e->trace_cond);
    pthread_mutex_unlock(&e->trace_lock);
    pthread_join(e->trace_thread, NULL);
    e->trace_started = 0;
}

/* Under trace_lock, or with the serving threads stopped: write both buffers, the older one
 * first, then the dropped count. */
static void write_buffers(engine_t *e)
{
    int cur = e->trace_cur, other = !cur;
    for (int b = 0; b < 2; b++) { /* the older buffer first */
        int i = b ? cur : other;
        write_all(e->trace_fd, (const char *)e->trace_buf[i], e->trace_n[i] * sizeof(uf_rec_t));
        e->trace_n[i] = 0;
    }
    e->trace_full = 0;
    if (e->trace_lost) {
        uf_rec_t d = {.t_ns = uf_now_ns(), .length = e->trace_lost, .kind = KIND_NONE, .cause = CAUSE_DROPPED};
        write_all(e->trace_fd, (const char *)&d, sizeof(d));
        e->trace_lost = 0;
    }
}

/* After the serving threads stopped: write what is left, the dropped count last. */
void uf_trace_stop(engine_t *e)
{
    if (!e->trace_started)
        return;
    join_writer(e);
    write_buffers(e);
}

/* While serving (this process is about to exit): everything recorded so far goes to the
 * file now; serving threads that record meanwhile wait for the lock. A fault's thread is woken
 * by its install, before the fault is traced: the faults under way are waited for first (at
 * most 200 ms: one may be stuck on a slow source, and its thread is not past it either). */
void uf_trace_sync(engine_t *e)
{
    if (!e->trace_started)
        return;
    struct timespec ms = {0, 1000000};
    for (int i = 0; i < 200 && __atomic_load_n(&e->faults_serving, __ATOMIC_ACQUIRE); i++)
        nanosleep(&ms, NULL);
    join_writer(e);
    pthread_mutex_lock(&e->trace_lock);
    write_buffers(e);
    pthread_mutex_unlock(&e->trace_lock);
    uf_trace_start(e);
}
