/* The engine's Python face: the Engine and Watchdog types and the state-block functions.
 * Configuration is validated in Python (userfault.serving.config); the checks here only keep
 * a wrong call from crashing. */
#define _GNU_SOURCE
#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <sched.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

typedef struct {
    PyObject_HEAD
    engine_t *e;
    Py_buffer src_view, state_view, wb_view; /* a buffer source (pinned while served); a shared
                                                 state; a buffer written pages go to */
    int has_view, has_state, has_wb;
    PyObject *pysource;
    int prefetching; /* prefetch calls in flight (changed with the GIL held) */
} EngineObject;

/* ---- the state block --------------------------------------------------------------------- */

static const char *counter_names[] = {
#define UF_NAME(n) #n,
    UF_COUNTERS(UF_NAME)
#undef UF_NAME
};

/* The state block in `obj` (a buffer made by state_init), or NULL with an exception. */
static uf_state_t *state_of(PyObject *obj, Py_buffer *view, int writable)
{
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return NULL;
    const char *why;
    if (uf_state_check(view->buf, (size_t)view->len, &why) < 0) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, why);
        return NULL;
    }
    return view->buf;
}

static PyObject *counters_dict(uf_state_t *st)
{
    PyObject *d = PyDict_New(), *hist = PyTuple_New(UF_HIST_BUCKETS);
    if (!d || !hist)
        goto fail;
    for (int i = 0; i < UF_N_COUNTERS; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(LOAD(st->counters[i]));
        if (!v || PyDict_SetItemString(d, counter_names[i], v) < 0) {
            Py_XDECREF(v);
            goto fail;
        }
        Py_DECREF(v);
    }
    for (int i = 0; i < UF_HIST_BUCKETS; i++)
        PyTuple_SET_ITEM(hist, i, PyLong_FromUnsignedLongLong(LOAD(st->hist[i])));
    if (PyDict_SetItemString(d, "latency_histogram", hist) < 0)
        goto fail;
    Py_DECREF(hist);
    return d;
fail:
    Py_XDECREF(d);
    Py_XDECREF(hist);
    return NULL;
}

/* Take the fault records written since the last drain (one reader at a time). */
static PyObject *drain_log(uf_state_t *st)
{
    uint64_t written = __atomic_load_n(&st->log_written, __ATOMIC_ACQUIRE), read = st->log_read;
    uint64_t n = st->log_cap ? written - read : 0;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * sizeof(uf_rec_t)));
    if (!out)
        return NULL;
    uf_rec_t *dst = (uf_rec_t *)PyBytes_AS_STRING(out);
    for (uint64_t i = 0; i < n; i++) {
        const uf_rec_t *src = &st->log[(read + i) % st->log_cap];
        for (int tries = 0; tries < UF_LOG_SPINS; tries++) { /* a seqlock: see uf_log_begin */
            uint32_t before = __atomic_load_n(&src->reserved, __ATOMIC_ACQUIRE);
            memcpy(&dst[i], src, sizeof(*src));
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (!(before & UF_LOG_WRITING) && before == __atomic_load_n(&src->reserved, __ATOMIC_RELAXED))
                break;
            sched_yield(); /* its writer may have been preempted mid-record */
        }
        dst[i].reserved = 0;
    }
    __atomic_store_n(&st->log_read, written, __ATOMIC_RELEASE);
    return out;
}

static PyObject *error_tuple(uf_state_t *st)
{
    int64_t err = __atomic_load_n(&st->err, __ATOMIC_ACQUIRE);
    if (err <= 0)
        Py_RETURN_NONE;
    return Py_BuildValue("(LKs)", (long long)err, (unsigned long long)st->err_addr, st->err_msg);
}

static PyObject *py_state_size(PyObject *self, PyObject *args)
{
    unsigned long long cap;
    if (!PyArg_ParseTuple(args, "K", &cap))
        return NULL;
    if (cap > UF_MAX_LOG)
        return PyErr_Format(PyExc_ValueError, "log_capacity is at most %llu records", (unsigned long long)UF_MAX_LOG);
    return PyLong_FromSize_t(uf_state_size(cap));
}

static PyObject *py_state_init(PyObject *self, PyObject *args)
{
    PyObject *obj;
    unsigned long long cap;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "OK", &obj, &cap) || PyObject_GetBuffer(obj, &view, PyBUF_WRITABLE) < 0)
        return NULL;
    if (cap > UF_MAX_LOG || (size_t)view.len < uf_state_size(cap)) {
        PyBuffer_Release(&view);
        return PyErr_Format(PyExc_ValueError, "a state block with %llu log records needs %zu bytes",
                            cap, uf_state_size(cap > UF_MAX_LOG ? 0 : cap));
    }
    uf_state_init(view.buf, uf_state_size(cap), cap);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

#define WITH_STATE(obj, writable, expr)                        \
    Py_buffer view;                                            \
    uf_state_t *st = state_of(obj, &view, writable);           \
    if (!st)                                                   \
        return NULL;                                           \
    PyObject *result = (expr);                                 \
    PyBuffer_Release(&view);                                   \
    return result;

static PyObject *py_state_counters(PyObject *self, PyObject *obj) { WITH_STATE(obj, 0, counters_dict(st)) }
static PyObject *py_state_drain_log(PyObject *self, PyObject *obj) { WITH_STATE(obj, 1, drain_log(st)) }
static PyObject *py_state_error(PyObject *self, PyObject *obj) { WITH_STATE(obj, 0, error_tuple(st)) }

static PyObject *py_state_set_error(PyObject *self, PyObject *args)
{
    PyObject *obj;
    int err;
    const char *msg;
    if (!PyArg_ParseTuple(args, "Ois", &obj, &err, &msg))
        return NULL;
    WITH_STATE(obj, 1, (uf_state_error(st, err, 0, "%s", msg), Py_NewRef(Py_None)))
}

static PyObject *py_state_add(PyObject *self, PyObject *args)
{
    PyObject *obj;
    const char *name;
    unsigned long long v;
    if (!PyArg_ParseTuple(args, "OsK", &obj, &name, &v))
        return NULL;
    int i = 0;
    while (i < UF_N_COUNTERS && strcmp(counter_names[i], name))
        i++;
    if (i == UF_N_COUNTERS)
        return PyErr_Format(PyExc_KeyError, "no counter named %s", name);
    WITH_STATE(obj, 1, (__atomic_add_fetch(&st->counters[i], v, __ATOMIC_RELAXED), Py_NewRef(Py_None)))
}

static PyObject *inflight_list(uf_state_t *st)
{
    PyObject *out = PyList_New(0);
    for (int i = 0; out && i < UF_SLOTS; i++) {
        uf_inflight_t *f = &st->inflight[i];
        uint64_t start = __atomic_load_n(&f->start_ns, __ATOMIC_ACQUIRE);
        if (!start)
            continue;
        PyObject *t = Py_BuildValue("(iKKKK)", i, (unsigned long long)start, (unsigned long long)f->src_off,
                                    (unsigned long long)f->len, (unsigned long long)f->addr);
        if (!t || PyList_Append(out, t) < 0)
            Py_CLEAR(out);
        Py_XDECREF(t);
    }
    return out;
}

static PyObject *py_state_inflight(PyObject *self, PyObject *obj) { WITH_STATE(obj, 0, inflight_list(st)) }

/* (kept, areas, children_unsent), once per worker death: kept 0 while no mremap moved the
 * root's areas, 1 with them in `areas`, -1 if they could not be kept (too many, torn by a
 * worker that died writing them, or an mremap it had read and not applied: remaps_in_hand,
 * which this call sets back to 0 for the next worker); children_unsent: forked children
 * whose areas after an mremap the supervisor lacks. */
static PyObject *moved_areas(uf_state_t *st)
{
    uint64_t in_hand = __atomic_exchange_n(&st->counters[C_remaps_in_hand], 0, __ATOMIC_SEQ_CST);
    uint64_t seq = __atomic_load_n(&st->areas_seq, __ATOMIC_ACQUIRE), n = st->nareas;
    int kept = in_hand ? -1 : !seq ? 0 : (seq & 1 || n > UF_KEPT_AREAS) ? -1 : 1;
    PyObject *areas = PyList_New(0);
    for (uint64_t i = 0; areas && kept == 1 && i < n; i++) {
        PyObject *t = Py_BuildValue("(KKK)", (unsigned long long)st->areas[3 * i],
                                    (unsigned long long)st->areas[3 * i + 1],
                                    (unsigned long long)st->areas[3 * i + 2]);
        if (!t || PyList_Append(areas, t) < 0)
            Py_CLEAR(areas);
        Py_XDECREF(t);
    }
    if (!areas)
        return NULL;
    return Py_BuildValue("(iNK)", kept, areas,
                         (unsigned long long)__atomic_load_n(&st->children_unsent, __ATOMIC_ACQUIRE));
}

static PyObject *py_state_moved_areas(PyObject *self, PyObject *obj) { WITH_STATE(obj, 0, moved_areas(st)) }
static PyObject *py_state_process_exited(PyObject *self, PyObject *obj)
{
    WITH_STATE(obj, 0, PyBool_FromLong((long)__atomic_load_n(&st->root_gone, __ATOMIC_ACQUIRE)))
}

static int parse_marks(PyObject *seq, uf_mark_t *marks, uint64_t *n)
{
    PyObject *fast = PySequence_Fast(seq, "marks must be a sequence of (offset, length)");
    if (!fast)
        return -1;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(fast);
    if (len > UF_MAX_MARKS) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "at most %d marks", UF_MAX_MARKS);
        return -1;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        unsigned long long off, l;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "KK", &off, &l)) {
            Py_DECREF(fast);
            return -1;
        }
        marks[i] = (uf_mark_t){off, l};
    }
    __atomic_store_n(n, (uint64_t)len, __ATOMIC_RELEASE);
    Py_DECREF(fast);
    return 0;
}

static PyObject *py_state_set_marks(PyObject *self, PyObject *args)
{
    PyObject *obj, *condemned, *suspect;
    if (!PyArg_ParseTuple(args, "OOO", &obj, &condemned, &suspect))
        return NULL;
    Py_buffer view;
    uf_state_t *st = state_of(obj, &view, 1);
    if (!st)
        return NULL;
    /* the counts go to zero first: a reader never sees a count over entries being rewritten */
    __atomic_store_n(&st->ncondemned, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&st->nsuspect, 0, __ATOMIC_RELEASE);
    int r = parse_marks(condemned, st->condemned, &st->ncondemned);
    if (!r)
        r = parse_marks(suspect, st->suspect, &st->nsuspect);
    PyBuffer_Release(&view);
    if (r < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *clear_inflight(uf_state_t *st)
{
    for (int i = 0; i < UF_SLOTS; i++)
        __atomic_store_n(&st->inflight[i].start_ns, 0, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *py_state_clear_inflight(PyObject *self, PyObject *obj) { WITH_STATE(obj, 1, clear_inflight(st)) }

static PyObject *py_now_ns(PyObject *self, PyObject *unused) { return PyLong_FromUnsignedLongLong(uf_now_ns()); }

PyMethodDef userfault_engine_methods[] = {
    {"state_size", py_state_size, METH_VARARGS, "state_size(log_capacity) -> bytes of a state block"},
    {"state_init", py_state_init, METH_VARARGS, "state_init(buffer, log_capacity): make a state block"},
    {"state_counters", py_state_counters, METH_O, "state_counters(state) -> counters dict"},
    {"state_drain_log", py_state_drain_log, METH_O, "state_drain_log(state) -> packed fault records"},
    {"state_error", py_state_error, METH_O, "state_error(state) -> None or (errno, address, message)"},
    {"state_set_error", py_state_set_error, METH_VARARGS, "state_set_error(state, errno, message)"},
    {"state_add", py_state_add, METH_VARARGS, "state_add(state, counter, n)"},
    {"state_moved_areas", py_state_moved_areas, METH_O,
     "state_moved_areas(state) -> (kept, [(address, length, source_offset)], children_unsent): the "
     "root's areas after an mremap (kept 1; 0: none moved; -1: not kept)"},
    {"state_inflight", py_state_inflight, METH_O,
     "state_inflight(state) -> [(slot, start_ns, source_offset, length, address)] reads in progress"},
    {"state_process_exited", py_state_process_exited, METH_O,
     "state_process_exited(state) -> whether the served memory's process is gone"},
    {"state_clear_inflight", py_state_clear_inflight, METH_O,
     "state_clear_inflight(state): forget the reads of a worker that is gone"},
    {"state_set_marks", py_state_set_marks, METH_VARARGS,
     "state_set_marks(state, condemned, suspect): pages failed unread, ranges read page by page"},
    {"now_ns", py_now_ns, METH_NOARGS, "CLOCK_MONOTONIC in ns (the clock of fault records)"},
    {NULL, NULL, 0, NULL},
};

/* ---- Engine ------------------------------------------------------------------------------ */

static void engine_free(engine_t *e)
{
    if (!e)
        return;
    if (e->stopfd >= 0)
        close(e->stopfd);
    if (e->epfd >= 0)
        close(e->epfd);
    for (int i = 0; e->workers && i < e->nworkers; i++)
        uf_worker_free(&e->workers[i]);
    free(e->workers);
    uf_ctx_free_all(e);
    free(e->pattern);
    free(e->zero);
    free(e->cycle);
    if (e->st_owned)
        free(e->st);
    if (e->pool_map)
        munmap(e->pool_map, e->pool_len);
    if (e->fork_table)
        munmap(e->fork_table, UF_FORK_SLOTS * sizeof(uf_forked_t));
    if (e->evict_worker) {
        uf_worker_free(e->evict_worker);
        free(e->evict_worker);
    }
    pthread_mutex_destroy(&e->lock);
    pthread_mutex_destroy(&e->stop_lock);
    pthread_mutex_destroy(&e->log_lock);
    pthread_cond_destroy(&e->work_cond);
    pthread_cond_destroy(&e->evict_cond);
    pthread_mutex_destroy(&e->agent_lock);
    pthread_mutex_destroy(&e->budget_lock);
    pthread_mutex_destroy(&e->wp_lock);
    pthread_cond_destroy(&e->wb_cond);
    pthread_mutex_destroy(&e->trace_lock);
    pthread_cond_destroy(&e->trace_cond);
    free(e->trace_buf[0]);
    free(e->trace_buf[1]);
    free(e->preload);
    free(e->hints);
    free(e);
}

static void Engine_dealloc(EngineObject *self)
{
    engine_t *e = self->e;
    if (e) {
        Py_BEGIN_ALLOW_THREADS
        uf_engine_stop(e);
        Py_END_ALLOW_THREADS
        Py_XDECREF(e->read_into);
        Py_XDECREF(e->read_many);
        Py_XDECREF(e->write_from);
        Py_XDECREF(e->src_flush);
        engine_free(e);
    }
    if (self->has_wb)
        PyBuffer_Release(&self->wb_view);
    if (self->has_view)
        PyBuffer_Release(&self->src_view);
    if (self->has_state)
        PyBuffer_Release(&self->state_view);
    Py_XDECREF(self->pysource);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static areas_t *parse_areas(PyObject *obj, uint64_t page);

/* children: (uffd, key, areas) of forked children a previous worker served; their page
 * state is unknown (a present page answers EEXIST and is woken). The descriptors become ours. */
static int adopt_children(engine_t *e, PyObject *children, uint64_t page)
{
    PyObject *seq = PySequence_Fast(children, "children must be a sequence of (uffd, key, areas)");
    if (!seq)
        return -1;
    int ret = 0;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq) && !ret; i++) {
        int fd;
        unsigned long long key;
        PyObject *areas_obj;
        areas_t *as = NULL;
        uctx_t *c = NULL;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "iKO;a child is (uffd, key, areas)",
                              &fd, &key, &areas_obj) || !(as = parse_areas(areas_obj, page))) {
            ret = -1;
        } else if (!(c = uf_ctx_new(e, fd, as, 1, NULL))) {
            PyErr_NoMemory();
            ret = -1;
        } else {
            c->key = key;
            ADD(e, children, 1);
            fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        }
        free(as);
    }
    Py_DECREF(seq);
    return ret;
}

static areas_t *parse_areas(PyObject *obj, uint64_t page)
{
    PyObject *seq = PySequence_Fast(obj, "areas must be a sequence of (address, length, source_offset)");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    areas_t *as = NULL;
    if (n < 1 || n > UF_MAX_AREAS) {
        PyErr_Format(PyExc_ValueError, "an engine serves between 1 and %d areas", UF_MAX_AREAS);
        goto done;
    }
    if (!(as = calloc(1, sizeof(areas_t) + (size_t)n * sizeof(area_t)))) {
        PyErr_NoMemory();
        goto done;
    }
    uint64_t pages = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        area_t *a = &as->a[i];
        unsigned long long base, len, src;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KKK;area must be (address, length, source_offset)",
                              &base, &len, &src))
            goto fail;
        if (base % page || len % page || !len) {
            PyErr_Format(PyExc_ValueError, "area %zd is not a non-empty range aligned to %llu bytes",
                         i, (unsigned long long)page);
            goto fail;
        }
        *a = (area_t){base, len, src, pages};
        pages += len / page;
    }
    as->n = (int)n;
    goto done;
fail:
    free(as);
    as = NULL;
done:
    Py_DECREF(seq);
    return as;
}

/* The working set to install from the first fault on: (source_offset, length) ranges in
 * first-touch order, kept as (area index, offset, length) runs of whole pages. */
static int parse_preload(engine_t *e, PyObject *obj, areas_t *as)
{
    PyObject *seq = PySequence_Fast(obj, "preload must be a sequence of (source_offset, length)");
    if (!seq)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    e->preload = calloc((size_t)(n * as->n + 1), 3 * sizeof(uint64_t));
    if (!e->preload) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long off, len;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KK;preload range must be "
                              "(source_offset, length)", &off, &len)) {
            Py_DECREF(seq);
            return -1;
        }
        for (int k = 0; k < as->n; k++) {
            area_t *a = &as->a[k];
            uint64_t lo = off > a->src_off ? off : a->src_off;
            uint64_t hi = off + len < a->src_off + a->len ? off + len : a->src_off + a->len;
            if (lo >= hi)
                continue;
            lo = (lo - a->src_off) & ~(e->page - 1);
            hi = ((hi - a->src_off) + e->page - 1) & ~(e->page - 1);
            uint64_t *r = &e->preload[3 * e->npreload++];
            r[0] = (uint64_t)k;
            r[1] = lo;
            r[2] = hi - lo;
        }
    }
    Py_DECREF(seq);
    return 0;
}

#define BAD(...) do { PyErr_Format(PyExc_ValueError, __VA_ARGS__); goto done; } while (0)

static int Engine_init(EngineObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"uffd", "areas", "page_size", "source", "install", "data", "src_fd",
                             "pattern", "cycle", "memfd", "pysource", "name", "fail_errno",
                             "fail_message", "chunk", "readahead_min", "readahead_max", "piece",
                             "populate", "threads", "log_capacity", "on_error", "on_remove",
                             "retries", "state", "log_fd", "max_resident", "high_watermark",
                             "low_watermark", "evict_advice", "evict_batch", "agent_fds", "pool_fd",
                             "writable", "write_fd", "write_buffer", "shared", "write_limit",
                             "trace_fd", "preload", "fork_sock", "key_base", "children", "beacon",
                             "fork_table", NULL};
    int uffd, kind, install, src_fd = -1, memfd = -1, populate = 0, threads = 1, fail_errno = 0;
    int on_error = ONERR_POISON, on_remove = ONREM_RELOAD, retries = 3, log_fd = 2;
    unsigned long long page, chunk = 0, ra_min = 0, ra_max = 0, piece = 0, log_cap = 0;
    PyObject *areas_obj, *data = Py_None, *pysource = Py_None, *state = Py_None;
    unsigned long long max_resident = 0, high = 0, low = 0, evict_batch = 0;
    int pool_fd = -1, writable = 0, write_fd = -1, shared = 0;
    PyObject *write_buffer = Py_None;
    unsigned long long write_limit = 0;
    int trace_fd = -1;
    PyObject *preload = Py_None, *children = Py_None;
    int fork_sock = -1;
    unsigned long long key_base = 0, beacon = 0;
    int fork_table = -1;
    int evict_advice = MADV_DONTNEED, agent_req = -1, agent_done = -1;
    const char *name = "", *fail_message = "";
    Py_buffer pat = {0}, cyc = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iOKii|Oiy*y*iOsisKKKKpiKiiiOiKKKiK(ii)ipiOpKiOiKOKi", kwlist,
                                     &uffd, &areas_obj, &page, &kind, &install, &data, &src_fd, &pat,
                                     &cyc, &memfd, &pysource, &name, &fail_errno, &fail_message,
                                     &chunk, &ra_min, &ra_max, &piece, &populate, &threads, &log_cap,
                                     &on_error, &on_remove, &retries, &state, &log_fd, &max_resident,
                                     &high, &low, &evict_advice, &evict_batch, &agent_req,
                                     &agent_done, &pool_fd, &writable, &write_fd, &write_buffer,
                                     &shared, &write_limit, &trace_fd, &preload, &fork_sock,
                                     &key_base, &children, &beacon, &fork_table))
        return -1;
    if (self->e) {
        PyErr_SetString(PyExc_RuntimeError, "an engine is initialised once");
        return -1;
    }
    engine_t *e = calloc(1, sizeof(*e));
    areas_t *areas = NULL;
    int ok = 0;
    if (!e) {
        PyErr_NoMemory();
        goto done;
    }
    e->stopfd = e->epfd = -1;
    pthread_mutex_init(&e->lock, NULL);
    pthread_mutex_init(&e->stop_lock, NULL);
    pthread_mutex_init(&e->log_lock, NULL);
    pthread_cond_init(&e->work_cond, NULL);
    pthread_cond_init(&e->evict_cond, NULL);
    pthread_mutex_init(&e->agent_lock, NULL);
    pthread_mutex_init(&e->budget_lock, NULL);
    pthread_mutex_init(&e->wp_lock, NULL);
    pthread_cond_init(&e->wb_cond, NULL);
    pthread_mutex_init(&e->trace_lock, NULL);
    pthread_cond_init(&e->trace_cond, NULL);
    e->trace_fd = trace_fd;
    e->fork_sock = fork_sock;
    e->key_base = key_base;
    e->beacon = beacon;
    e->pool_fd = pool_fd;
    e->writable = writable;
    e->wb_fd = write_fd;
    e->shared_mem = shared;
    e->wb_len = write_limit; /* a Python source's size: nothing is written past it */
    e->owner = getpid();
    e->agent_req = agent_req;
    e->agent_done = agent_done;
    e->evict_advice = evict_advice;
    e->evict_batch = evict_batch;
    e->page = page;
    e->kind = kind;
    e->install = install;
    e->src_fd = src_fd;
    e->memfd = memfd;
    e->chunk = chunk ? chunk : page;
    e->ra_min = ra_min;
    e->ra_max = ra_max;
    e->piece = piece ? piece : kind == SRC_PYTHON ? UF_PYTHON_PIECE : UF_DEFAULT_PIECE;
    e->populate = populate;
    e->nthreads = threads;
    e->on_error = on_error;
    e->on_remove = on_remove;
    e->retries = retries;
    e->log_fd = log_fd;
    e->log_tokens = 20;
    e->log_last_ns = uf_now_ns();
    e->fail_errno = fail_errno;
    e->probe_addr = uf_mmap_min_addr();
    snprintf(e->name, sizeof(e->name), "%s", *name ? name : "the source");
    snprintf(e->fail_msg, sizeof(e->fail_msg), "%s", fail_message);
    if (page < 4096 || (page & (page - 1)))
        BAD("page_size must be a power of two >= 4096, not %llu", page);
    if (e->chunk % page || e->chunk > UF_MAX_CHUNK)
        BAD("chunk must be a multiple of the page size up to %llu bytes, not %llu",
            (unsigned long long)UF_MAX_CHUNK, (unsigned long long)e->chunk);
    if (e->piece > UF_MAX_PIECE || e->piece % 4096)
        BAD("piece must be a multiple of 4096 up to %llu bytes", (unsigned long long)UF_MAX_PIECE);
    if (ra_min > ra_max)
        BAD("readahead_min (%llu) is larger than readahead_max (%llu)", ra_min, ra_max);
    if (threads < 1 || threads > UF_MAX_THREADS)
        BAD("threads must be between 1 and %d, not %d", UF_MAX_THREADS, threads);
    if (log_cap > UF_MAX_LOG)
        BAD("log_capacity is at most %llu records", (unsigned long long)UF_MAX_LOG);
    if (retries < 0 || retries > UF_MAX_RETRIES)
        BAD("retries must be between 0 and %d, not %d", UF_MAX_RETRIES, retries);
    if (kind < SRC_ZERO || kind > SRC_FAIL || install < INST_COPY || install > INST_CONTINUE)
        BAD("unknown source kind %d or install %d", kind, install);
    if (on_error < ONERR_POISON || on_error > ONERR_ZERO || on_remove < ONREM_RELOAD || on_remove > ONREM_ZERO)
        BAD("unknown on_error %d or on_remove %d", on_error, on_remove);
    if (install == INST_CONTINUE && memfd < 0)
        BAD("install CONTINUE needs the memfd");
    if ((kind == SRC_PYTHON || kind == SRC_FAIL) && install != INST_COPY)
        BAD("Python and failing sources are installed with COPY");
    e->track_writes = writable || max_resident;
    if (e->track_writes && (install == INST_ZEROPAGE || install == INST_MOVE))
        BAD("writable memory, and memory under a budget (max_resident), is installed with COPY "
            "or CONTINUE: writes to it are tracked (installed write-protected)");
    if (!(areas = parse_areas(areas_obj, page)))
        goto done;
    if (max_resident) {
        e->max_pages = max_resident / page;
        e->high_pages = high / page;
        e->low_pages = low / page;
        if (e->max_pages < 1 || e->low_pages >= e->high_pages || e->high_pages > e->max_pages)
            BAD("max_resident (%llu) must hold a page and low < high <= max_resident "
                "(%llu, %llu)", max_resident, low, high);
    }
    e->unit_max = e->chunk > e->piece ? e->chunk : e->piece;
    /* a batch gives back at least what two background pieces install, and 64 KiB: in pages
     * of the region (two for 2 MiB hugetlb pages, not 64 of them) */
    if (e->evict_batch < 2 * piece_of(e) / page)
        e->evict_batch = 2 * piece_of(e) / page;
    if (e->evict_batch < (64u << 10) / page)
        e->evict_batch = (64u << 10) / page;
    if (e->unit_max < page)
        e->unit_max = page;
    if (!(e->zero = calloc(1, e->unit_max))) {
        PyErr_NoMemory();
        goto done;
    }
    if (kind == SRC_PATTERN) {
        if (!pat.len)
            BAD("the pattern must not be empty");
        e->pat_len = (uint64_t)pat.len;
        if (!(e->pattern = malloc(e->unit_max + e->pat_len))) {
            PyErr_NoMemory();
            goto done;
        }
        for (uint64_t i = 0; i < e->unit_max + e->pat_len; i++)
            e->pattern[i] = ((char *)pat.buf)[i % e->pat_len];
    } else if (kind == SRC_CYCLE) {
        if (!cyc.len)
            BAD("the cycle must not be empty");
        e->cycle_len = (uint64_t)cyc.len;
        if (!(e->cycle = malloc(e->cycle_len))) {
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
    } else if (kind == SRC_PYTHON) {
        if (!(e->read_into = PyObject_GetAttrString(pysource, "read_into")))
            goto done;
        e->read_many = PyObject_GetAttrString(pysource, "read_many");
        if (!e->read_many)
            PyErr_Clear();
        if (writable) {
            if (!(e->write_from = PyObject_GetAttrString(pysource, "write_from")))
                goto done;
            if (pool_fd < 0)
                BAD("a writable Python source needs the pool (pool_fd) to copy pages through");
            e->src_flush = PyObject_GetAttrString(pysource, "flush");
            if (!e->src_flush)
                PyErr_Clear();
        }
        self->pysource = Py_NewRef(pysource);
    }
    if (writable && write_buffer != Py_None) {
        if (PyObject_GetBuffer(write_buffer, &self->wb_view, PyBUF_WRITABLE) < 0)
            goto done;
        self->has_wb = 1;
        e->wb_buf = self->wb_view.buf;
        e->wb_len = (uint64_t)self->wb_view.len;
    }
    if (writable && e->wb_fd < 0 && !e->wb_buf && !e->write_from)
        BAD("writable memory needs somewhere to write to: write_fd, write_buffer or a Python "
            "source with write_from");
    if (state != Py_None) {
        if (!(e->st = state_of(state, &self->state_view, 1)))
            goto done;
        self->has_state = 1;
    } else {
        e->st_size = uf_state_size(log_cap);
        if (!(e->st = calloc(1, e->st_size))) {
            PyErr_NoMemory();
            goto done;
        }
        e->st_owned = 1;
        uf_state_init(e->st, e->st_size, log_cap);
    }
    e->stopfd = eventfd(0, EFD_CLOEXEC);
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event stop_ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (e->stopfd < 0 || e->epfd < 0 || epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->stopfd, &stop_ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    if ((e->max_pages || writable) && pool_fd >= 0) {
        uint64_t pages = 0;
        for (int i = 0; i < areas->n; i++)
            pages += areas->a[i].len / page;
        e->pool_len = pages * page;
        e->pool_map = mmap(NULL, e->pool_len, PROT_READ | PROT_WRITE, MAP_SHARED, pool_fd, 0);
        if (e->pool_map == MAP_FAILED) {
            e->pool_map = NULL;
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
    }
    if (fork_table >= 0) {
        void *t = mmap(NULL, UF_FORK_SLOTS * sizeof(uf_forked_t), PROT_READ | PROT_WRITE,
                       MAP_SHARED, fork_table, 0);
        if (t == MAP_FAILED) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
        e->fork_table = t;
    }
    if (!uf_ctx_new(e, uffd, areas, 0, NULL) || (e->max_pages && uf_budget_alloc(e, e->ctxs))
        || (e->track_writes && uf_write_alloc(e, e->ctxs))) {
        PyErr_NoMemory();
        goto done;
    }
    if (trace_fd >= 0 && (!(e->trace_buf[0] = malloc(UF_TRACE_RECS * sizeof(uf_rec_t)))
                          || !(e->trace_buf[1] = malloc(UF_TRACE_RECS * sizeof(uf_rec_t))))) {
        PyErr_NoMemory();
        goto done;
    }
    if (preload != Py_None && parse_preload(e, preload, areas) < 0)
        goto done;
    if (children != Py_None && adopt_children(e, children, page) < 0)
        goto done;
    uf_jobs_init(e);
    e->nworkers = threads + ((ra_max > 0 || populate || e->npreload) ? UF_BG_THREADS : 0);
    if (!(e->workers = calloc((size_t)e->nworkers, sizeof(worker_t)))) {
        PyErr_NoMemory();
        goto done;
    }
    for (int i = 0; i < e->nworkers; i++) {
        worker_t *w = &e->workers[i];
        w->e = e;
        w->background = i >= threads;
        w->slot = w->background ? UF_MAX_THREADS + (i - threads) : i;
        int err = uf_worker_buffers(e, w);
        if (err) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
    }
    if (e->max_pages) {
        if (!(e->evict_worker = calloc(1, sizeof(worker_t)))) {
            PyErr_NoMemory();
            goto done;
        }
        e->evict_worker->e = e;
        e->evict_worker->slot = UF_EVICTOR_SLOT;
    }
    ok = 1;
done:
    free(areas);
    if (pat.obj)
        PyBuffer_Release(&pat);
    if (cyc.obj)
        PyBuffer_Release(&cyc);
    if (!ok) {
        if (e) {
            Py_CLEAR(e->read_into);
            Py_CLEAR(e->read_many);
            Py_CLEAR(e->write_from);
            Py_CLEAR(e->src_flush);
            engine_free(e);
        }
        if (self->has_wb)
            PyBuffer_Release(&self->wb_view);
        self->has_wb = 0;
        if (self->has_view)
            PyBuffer_Release(&self->src_view);
        if (self->has_state)
            PyBuffer_Release(&self->state_view);
        self->has_view = self->has_state = 0;
        Py_CLEAR(self->pysource);
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
    int r = uf_engine_start(e);
    if (r) {
        errno = r;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* stop() joins the threads and lets go of a buffer source at once: a stopped engine may stay
 * referenced for long (a traceback through prefetch keeps it alive) and must not keep the
 * source's buffer exported, or closing the source (mmap.close) fails. Counters and the log
 * stay readable; start and prefetch refuse afterwards. A prefetch still running on another
 * Python thread reads the buffer: the last one to finish lets go instead. */
static void release_source(EngineObject *self)
{
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
    uf_engine_stop(e);
    Py_END_ALLOW_THREADS
    if (self->has_view)
        e->released = 1;
    release_source(self);
    Py_RETURN_NONE;
}

/* [(source_offset, length), ...] -> a PyMem array of 2 * *n offsets and lengths, or NULL with
 * an exception set. */
static uint64_t *parse_ranges(PyObject *ranges, Py_ssize_t *n)
{
    PyObject *seq = PySequence_Fast(ranges, "ranges must be a sequence of (source_offset, length)");
    if (!seq)
        return NULL;
    *n = PySequence_Fast_GET_SIZE(seq);
    uint64_t *rs = PyMem_Malloc(sizeof(*rs) * 2 * (size_t)(*n ? *n : 1));
    if (!rs) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        PyObject *o, *l;
        unsigned long long off = 0, len = 0;
        int ok = PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i),
                                  "OO;range must be (source_offset, length)", &o, &l);
        if (ok) { /* not "K": it wraps out-of-range integers silently */
            off = PyLong_AsUnsignedLongLong(o);
            len = PyErr_Occurred() ? 0 : PyLong_AsUnsignedLongLong(l);
            ok = !PyErr_Occurred();
            if (ok && len > ULLONG_MAX - off) {
                PyErr_Format(PyExc_OverflowError, "range (%llu, %llu) ends past 2**64", off, len);
                ok = 0;
            }
        }
        if (!ok) {
            PyMem_Free(rs);
            Py_DECREF(seq);
            return NULL;
        }
        rs[2 * i] = off;
        rs[2 * i + 1] = len;
    }
    Py_DECREF(seq);
    return rs;
}

/* prefetch([(source_offset, length), ...]) -> (bytes installed, bytes poisoned,
 * [(source_offset, length) poisoned], errno, message). */
static PyObject *Engine_prefetch(EngineObject *self, PyObject *ranges)
{
    ENGINE_OR_RAISE(self)
    if (e->released) {
        PyErr_SetString(PyExc_RuntimeError, "the engine was stopped and let go of its source");
        return NULL;
    }
    Py_ssize_t n;
    uint64_t *rs = parse_ranges(ranges, &n);
    if (!rs)
        return NULL;
    worker_t *w = calloc(1, sizeof(worker_t));
    int err = w ? 0 : ENOMEM;
    if (w) {
        w->e = e;
        w->slot = UF_PREFETCH_SLOT;
        err = uf_worker_buffers(e, w);
    }
    uint64_t installed = 0;
    self->prefetching++;
    if (!err) {
        Py_BEGIN_ALLOW_THREADS
        err = uf_prefetch(e, w, rs, n, &installed);
        Py_END_ALLOW_THREADS
    }
    self->prefetching--;
    PyMem_Free(rs);
    if (e->released)
        release_source(self);
    PyObject *poisoned = PyList_New(0);
    for (int i = 0; w && poisoned && i < w->npoisoned; i++) {
        PyObject *t = Py_BuildValue("(KK)", (unsigned long long)w->poisoned[i].off, (unsigned long long)w->poisoned[i].len);
        if (!t || PyList_Append(poisoned, t) < 0)
            Py_CLEAR(poisoned);
        Py_XDECREF(t);
    }
    PyObject *out = poisoned ? Py_BuildValue("(KKNis)", (unsigned long long)installed,
                                             (unsigned long long)(w ? w->poisoned_bytes : 0), poisoned,
                                             err, w && (err || w->npoisoned) ? w->msg : "") : NULL;
    if (w) {
        if (w->exporter) {
            Py_CLEAR(w->exporter);
            w->bounce = NULL;
        }
        uf_worker_free(w);
        free(w);
    }
    return out;
}

/* willneed([(source_offset, length), ...]) -> bytes queued for the background threads
 * (uf_willneed); returns at once. */
static PyObject *Engine_willneed(EngineObject *self, PyObject *ranges)
{
    ENGINE_OR_RAISE(self)
    if (e->nworkers == e->nthreads) {
        PyErr_SetString(PyExc_ValueError, "willneed needs the background threads: readahead "
                        "on (the default), populate or a preload");
        return NULL;
    }
    Py_ssize_t n;
    uint64_t *rs = parse_ranges(ranges, &n);
    if (!rs)
        return NULL;
    uint64_t queued = 0;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = uf_willneed(e, rs, n, &queued);
    Py_END_ALLOW_THREADS
    PyMem_Free(rs);
    if (err == EINVAL) {
        PyErr_Format(PyExc_ValueError, "willneed: more than %d ranges pending (the ones queued "
                     "before this one were kept, %llu bytes of this call)", UF_MAX_HINTS,
                     (unsigned long long)queued);
        return NULL;
    }
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromUnsignedLongLong(queued);
}

/* flush() -> (pages, bytes, errno, message): every dirty page home, then made durable. */
static PyObject *Engine_flush(EngineObject *self, PyObject *unused)
{
    ENGINE_OR_RAISE(self)
    if (e->owner != getpid()) {
        PyErr_SetString(PyExc_RuntimeError, "a forked copy of an engine cannot flush");
        return NULL;
    }
    worker_t *w = calloc(1, sizeof(worker_t));
    if (!w)
        return PyErr_NoMemory();
    w->e = e;
    w->slot = UF_PREFETCH_SLOT;
    uint64_t pages = 0, bytes = 0;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = uf_flush(e, w, &pages, &bytes);
    Py_END_ALLOW_THREADS
    PyObject *out = Py_BuildValue("(KKis)", (unsigned long long)pages, (unsigned long long)bytes,
                                  err, err ? w->msg : "");
    free(w);
    return out;
}

/* fn(e) without the GIL, in the engine's own process only (a forked copy does nothing). */
static PyObject *in_owner(EngineObject *self, void (*fn)(engine_t *))
{
    ENGINE_OR_RAISE(self)
    if (e->owner == getpid()) {
        Py_BEGIN_ALLOW_THREADS
        fn(e);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_orphan_children(EngineObject *self, PyObject *unused)
{
    return in_owner(self, uf_orphan_children);
}

static PyObject *Engine_trace_sync(EngineObject *self, PyObject *unused)
{
    return in_owner(self, uf_trace_sync);
}

static PyObject *Engine_stats(EngineObject *self, PyObject *unused)
{
    ENGINE_OR_RAISE(self)
    return counters_dict(e->st);
}

static PyObject *Engine_drain_log(EngineObject *self, PyObject *unused)
{
    ENGINE_OR_RAISE(self)
    pthread_mutex_lock(&e->lock);
    PyObject *out = drain_log(e->st);
    pthread_mutex_unlock(&e->lock);
    return out;
}

static PyObject *Engine_error(EngineObject *self, PyObject *unused)
{
    ENGINE_OR_RAISE(self)
    return error_tuple(e->st);
}

static PyObject *Engine_running(EngineObject *self, void *closure)
{
    ENGINE_OR_RAISE(self)
    return PyBool_FromLong(e->started && e->owner == getpid());
}

static PyObject *Engine_process_exited(EngineObject *self, void *closure)
{
    ENGINE_OR_RAISE(self)
    return PyBool_FromLong((long)__atomic_load_n(&e->st->root_gone, __ATOMIC_ACQUIRE));
}

static PyObject *Engine_memory(EngineObject *self, void *closure)
{
    ENGINE_OR_RAISE(self)
    pthread_mutex_lock(&e->lock);
    uint64_t bytes = sizeof(*e) + e->unit_max + (e->kind == SRC_PATTERN ? e->unit_max + e->pat_len : 0)
                     + (e->st_owned ? e->st_size : 0);
    for (uctx_t *c = e->ctxs; c; c = c->next)
        bytes += sizeof(*c) + (c->areas ? sizeof(areas_t) + (uint64_t)c->areas->n * sizeof(area_t)
                                           + 2 * (c->npages / 8 + 1) : 0);
    for (int i = 0; i < e->nworkers; i++) { /* bounce buffers exist once a source needed them */
        worker_t *w = &e->workers[i];
        bytes += sizeof(worker_t) + (e->unit_max / e->page + 1) * (sizeof(run_t) + sizeof(uint64_t))
                 + (w->bounce ? e->unit_max : 0) + (w->staging_map ? e->unit_max + (2u << 20) : 0);
    }
    pthread_mutex_unlock(&e->lock);
    return PyLong_FromUnsignedLongLong(bytes);
}

static PyMethodDef Engine_methods[] = {
    {"start", (PyCFunction)Engine_start, METH_NOARGS, "Start the threads."},
    {"stop", (PyCFunction)Engine_stop, METH_NOARGS, "Stop and join the threads."},
    {"prefetch", (PyCFunction)Engine_prefetch, METH_O,
     "prefetch(ranges) -> (installed, poisoned_bytes, poisoned_ranges, errno, message)"},
    {"willneed", (PyCFunction)Engine_willneed, METH_O,
     "willneed(ranges) -> bytes queued for the background threads (returns at once)"},
    {"orphan_children", (PyCFunction)Engine_orphan_children, METH_NOARGS,
     "orphan_children(): this process exits serving: poison what forked children never loaded"},
    {"trace_sync", (PyCFunction)Engine_trace_sync, METH_NOARGS,
     "trace_sync(): write every trace record so far to the trace file, while serving"},
    {"flush", (PyCFunction)Engine_flush, METH_NOARGS,
     "flush() -> (pages, bytes, errno, message): write every dirty page back, durably"},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, "Counters as a dict."},
    {"drain_log", (PyCFunction)Engine_drain_log, METH_NOARGS, "Take the logged fault records."},
    {"error", (PyCFunction)Engine_error, METH_NOARGS, "The first error (errno, address, message), or None."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"running", (getter)Engine_running, NULL, "Whether the threads run (in this process).", NULL},
    {"process_exited", (getter)Engine_process_exited, NULL, "Whether the memory's process is gone.", NULL},
    {"memory_bytes", (getter)Engine_memory, NULL, "Heap the engine holds.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject userfault_EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "userfault._native.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "GIL-free fault-serving threads (configured by userfault.serving).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

/* ---- Watchdog ----------------------------------------------------------------------------
 * A thread of the faulting process that needs no GIL: it waits on the pager process's pidfd
 * (a forked child's: on the process serving it, and on `ended`, an eventfd its owner writes
 * when the pager closes). When that process dies unasked, or the pager ends, it starts a
 * standby engine (a failing source on the same uffd) and wakes every blocked thread: each
 * later fault ends in a logged SIGBUS, none hangs. */

typedef struct {
    PyObject_HEAD
    EngineObject *engine;
    int pidfd, stopfd, pid, started, fired, agent_req, agent_done, ended;
    char what[128]; /* the process watched, for the log line */
    char *pool_map; /* the engine's pool, mapped here too (deactivations copy into it) */
    uint64_t pool_len;
    pid_t owner;
    pthread_t thread;
} WatchdogObject;

/* Carry out the pager process's request in this process's address space. */
static void answer(WatchdogObject *self)
{
    uf_state_t *st = self->engine->e->st;
    uf_mail_t *m = &st->mail;
    uint64_t one, seq = __atomic_load_n(&m->seq, __ATOMIC_ACQUIRE);
    if (read(self->agent_req, &one, sizeof(one)) < 0 && errno != EAGAIN)
        return;
    if (seq == m->done)
        return;
    int err = EINVAL;
    if (m->op == AGENT_MADVISE)
        err = madvise((void *)(uintptr_t)m->addr, m->len, (int)m->arg) ? errno : 0;
    else if (m->op == AGENT_COPY_OUT && self->pool_map && m->arg + m->len <= self->pool_len)
        err = (memcpy(self->pool_map + m->arg, (const void *)(uintptr_t)m->addr, m->len), 0);
    else if (m->op == AGENT_DEACTIVATE && self->pool_map
             && (m->arg & ((1ull << 48) - 1)) + m->len <= self->pool_len)
        err = uf_deactivate_local(self->pool_map, m->addr, m->len, m->arg & ((1ull << 48) - 1),
                                  (int)(m->arg >> 48));
    m->result = err;
    __atomic_store_n(&m->done, seq, __ATOMIC_RELEASE);
    one = 1;
    if (write(self->agent_done, &one, sizeof(one)) < 0) {
        /* the eventfd cannot overflow with one pending write */
    }
}

static void *watchdog_main(void *arg)
{
    WatchdogObject *self = arg;
    pthread_setname_np(pthread_self(), "uf-watchdog"); /* top -H, perf, gdb */
    if (self->agent_req >= 0) /* the pager process's engine may hold every other thread's faults */
        __atomic_store_n(&self->engine->e->st->agent_tid, (uint64_t)gettid(), __ATOMIC_RELEASE);
    /* poll ignores the descriptors that are -1 */
    struct pollfd p[4] = {{.fd = self->pidfd, .events = POLLIN}, {.fd = self->stopfd, .events = POLLIN},
                          {.fd = self->agent_req, .events = POLLIN}, {.fd = self->ended, .events = POLLIN}};
    for (;;) {
        int r = poll(p, 4, -1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 || p[1].revents)
            return NULL;
        if (p[0].revents || p[3].revents)
            break;
        if (p[2].revents)
            answer(self);
    }
    engine_t *e = self->engine->e;
    __atomic_store_n(&self->fired, 1, __ATOMIC_RELEASE);
    if (p[0].revents) {
        uf_log(e, "%s (pid %d) died: faults on pages not loaded yet get SIGBUS from now on, "
               "never wrong bytes", self->what, self->pid);
        uf_state_error(e->st, ESRCH, 0, "%s (pid %d) died: pages not loaded yet can no longer be "
                       "served (they are poisoned: SIGBUS)", self->what, self->pid);
    } else {
        uf_log(e, "the pager of %s closed (or its process exited) while this forked child still "
               "used its memory: faults on pages not loaded yet get SIGBUS from now on, never "
               "zeros", e->name);
        uf_state_error(e->st, EPIPE, 0, "the pager closed while this forked child still used its "
                       "memory: pages not loaded yet are poisoned (SIGBUS)");
    }
    if (!uf_engine_start(e))
        uf_wake_anywhere(e); /* faults the dead pager had read, in moved memory too */
    return NULL;
}

static int Watchdog_init(WatchdogObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"pidfd", "engine", "pid", "agent_fds", "pool_fd", "pool_len", "ended",
                             "what", NULL};
    PyObject *engine;
    int pidfd, pid, pool_fd = -1;
    unsigned long long pool_len = 0;
    const char *what = "the pager process";
    self->agent_req = self->agent_done = self->ended = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iO!i|(ii)iKis", kwlist, &pidfd, &userfault_EngineType,
                                     &engine, &pid, &self->agent_req, &self->agent_done, &pool_fd,
                                     &pool_len, &self->ended, &what))
        return -1;
    snprintf(self->what, sizeof(self->what), "%s", what);
    if (pool_fd >= 0 && pool_len) {
        void *m = mmap(NULL, pool_len, PROT_READ | PROT_WRITE, MAP_SHARED, pool_fd, 0);
        if (m == MAP_FAILED) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        self->pool_map = m;
        self->pool_len = pool_len;
    }
    if (self->started || !((EngineObject *)engine)->e) {
        PyErr_SetString(PyExc_RuntimeError, "a watchdog is started once, over an initialised engine");
        return -1;
    }
    self->engine = (EngineObject *)Py_NewRef(engine);
    self->owner = getpid();
    self->pidfd = pidfd;
    self->pid = pid;
    if ((self->stopfd = eventfd(0, EFD_CLOEXEC)) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    int r = pthread_create(&self->thread, NULL, watchdog_main, self);
    if (r) {
        errno = r;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->started = 1;
    return 0;
}

static void watchdog_stop(WatchdogObject *self)
{
    if (!self->started)
        return;
    if (self->owner != getpid()) { /* a forked copy: the thread and its eventfd are the parent's */
        self->started = 0;
        return;
    }
    uint64_t one = 1;
    if (write(self->stopfd, &one, sizeof(one)) < 0) {
        /* cannot fail for one write */
    }
    Py_BEGIN_ALLOW_THREADS
    pthread_join(self->thread, NULL);
    Py_END_ALLOW_THREADS
    self->started = 0;
}

static PyObject *Watchdog_stop(WatchdogObject *self, PyObject *unused)
{
    watchdog_stop(self);
    Py_RETURN_NONE;
}

static void Watchdog_dealloc(WatchdogObject *self)
{
    watchdog_stop(self);
    if (self->stopfd > 0)
        close(self->stopfd);
    if (self->pool_map && self->owner == getpid())
        munmap(self->pool_map, self->pool_len);
    Py_XDECREF(self->engine);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Watchdog_fired(WatchdogObject *self, void *closure)
{
    return PyBool_FromLong(__atomic_load_n(&self->fired, __ATOMIC_ACQUIRE));
}

static PyMethodDef Watchdog_methods[] = {
    {"stop", (PyCFunction)Watchdog_stop, METH_NOARGS, "Stop watching (before a planned stop of the pager process)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Watchdog_getset[] = {
    {"fired", (getter)Watchdog_fired, NULL, "Whether the process watched died (or the pager ended) and the standby engine took over.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject userfault_WatchdogType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "userfault._native.Watchdog",
    .tp_basicsize = sizeof(WatchdogObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Watchdog(pidfd, engine, pid, agent_fds=(-1, -1), pool_fd=-1, pool_len=0, ended=-1, "
              "what='the pager process'): start `engine` when the process behind pidfd dies (or "
              "the eventfd `ended` is written); meanwhile carry out its madvise requests (agent_fds).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Watchdog_init,
    .tp_dealloc = (destructor)Watchdog_dealloc,
    .tp_methods = Watchdog_methods,
    .tp_getset = Watchdog_getset,
};
