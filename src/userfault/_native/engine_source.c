/* Sources and installs: where a page's bytes come from, how they get into the region, and
 * what happens when they cannot be had.
 *
 * Sources: zero, a repeating pattern, memory (a buffer or a read-only file mapping, files read
 * with pread at the tail), a cycle of byte values (the man-page demo), a Python object with
 * read_into/read_many (called with the GIL of the process the engine runs in), or "fail"
 * (every read fails: what a dead pager process leaves behind).
 *
 * Failure policy, the same for every source and every cause: a range that fails as a batch is
 * retried page by page; pages that still fail get `retries` more rounds with backoff; then
 * on_error decides: poison (the access gets SIGBUS), zero (explicitly asked for), or retry
 * (a fault keeps waiting; background work leaves the page to its fault). Readahead is
 * speculative: it never poisons, the fault that comes for the page decides. A line naming the
 * pages, the source and the cause is logged before anything is poisoned. */
#define _GNU_SOURCE
#include "engine.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- the bounce buffer of a Python source ------------------------------------------------
 * A Python source gets memoryviews of a worker's bounce buffer. The exporter counts the views
 * still alive after the call: a source that kept one (or a slice of one) could write into
 * the buffer later, so its read fails and the worker moves to a fresh buffer, leaving the old
 * one to the views that hold it. */

typedef struct {
    PyObject_HEAD
    char *buf;
    Py_ssize_t size, off, len; /* the window the next view shows */
    Py_ssize_t exports;
} BounceObject;

static int Bounce_getbuffer(BounceObject *self, Py_buffer *view, int flags)
{
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->buf + self->off, self->len, 0, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void Bounce_releasebuffer(BounceObject *self, Py_buffer *view) { self->exports--; }

static void Bounce_dealloc(BounceObject *self)
{
    free(self->buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyBufferProcs Bounce_as_buffer = {(getbufferproc)Bounce_getbuffer, (releasebufferproc)Bounce_releasebuffer};

PyTypeObject userfault_BounceType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "userfault._native.Bounce",
    .tp_basicsize = sizeof(BounceObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A worker's read buffer, handed to Python sources as memoryviews.",
    .tp_dealloc = (destructor)Bounce_dealloc,
    .tp_as_buffer = &Bounce_as_buffer,
};

/* With the GIL held: a new exporter of `size` bytes, or NULL (exception set). */
static BounceObject *bounce_new(uint64_t size)
{
    BounceObject *b = PyObject_New(BounceObject, &userfault_BounceType);
    if (!b)
        return NULL;
    b->buf = malloc(size);
    b->size = (Py_ssize_t)size;
    b->off = b->len = b->exports = 0;
    if (!b->buf) {
        Py_DECREF(b);
        PyErr_NoMemory();
        return NULL;
    }
    return b;
}

/* ---- threads and their buffers ----------------------------------------------------------- */

static __thread PyGILState_STATE thread_gil;
static __thread PyThreadState *thread_ts;

/* Engine threads of a Python source keep a thread state for their whole life (enter = 1 at
 * start, 0 at exit), so each read only takes and drops the GIL. */
void uf_worker_python(engine_t *e, worker_t *w, int enter)
{
    if (e->kind != SRC_PYTHON)
        return;
    if (enter) {
        thread_gil = PyGILState_Ensure();
        thread_ts = PyEval_SaveThread();
    } else {
        PyEval_RestoreThread(thread_ts);
        if (w->exporter) { /* the bounce buffer goes with it */
            Py_CLEAR(w->exporter);
            w->bounce = NULL;
        }
        PyGILState_Release(thread_gil);
    }
}

/* 2 MiB-aligned, so whole-PMD moves of transparent huge pages are possible. */
static char *staging_start(char *p) { return (char *)(((uintptr_t)p + (2u << 20) - 1) & ~(uintptr_t)((2u << 20) - 1)); }

/* Everything a thread uses is allocated here, before it starts. A fault thread must never
 * call malloc: glibc's fork() holds the malloc locks while the kernel waits for the engine to
 * read the fork's UFFD_EVENT_FORK, so a fault thread waiting for malloc would never read it.
 * (A Python source's buffer is made lazily: that engine runs in a pager process, which the
 * faulting process's forks do not involve.) */
int uf_worker_buffers(engine_t *e, worker_t *w)
{
    uint64_t pages = e->unit_max / e->page + 1;
    w->msgs = calloc(UF_MSG_BATCH, sizeof(struct uffd_msg));
    w->runs = calloc(pages, sizeof(run_t));
    w->pages = calloc(pages, sizeof(uint64_t));
    if (!w->msgs || !w->runs || !w->pages)
        return ENOMEM;
    if ((e->kind == SRC_MEMORY || e->kind == SRC_CYCLE) && !(w->bounce = malloc(e->unit_max)))
        return ENOMEM; /* file tails, cycles */
    if (e->install == INST_MOVE) {
        char *p = mmap(NULL, e->unit_max + (2u << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            return errno;
        w->staging_map = p;
        w->staging = staging_start(p);
        madvise(w->staging, e->unit_max, MADV_HUGEPAGE);
    }
    return 0;
}

/* Frees what a worker holds; a Python exporter is dropped by whoever holds the GIL. */
void uf_worker_free(worker_t *w)
{
    engine_t *e = w->e;
    free(w->msgs);
    free(w->runs);
    free(w->pages);
    w->msgs = NULL;
    w->runs = NULL;
    w->pages = NULL;
    if (!w->exporter)
        free(w->bounce);
    w->bounce = NULL;
    if (w->staging_map)
        munmap(w->staging_map, e->unit_max + (2u << 20));
    w->staging_map = w->staging = NULL;
}

/* A bounce buffer of unit_max bytes for this worker (native sources have theirs already). */
static int ensure_bounce(engine_t *e, worker_t *w)
{
    if (w->bounce)
        return 0;
    if (e->kind != SRC_PYTHON)
        return ENOMEM;
    PyGILState_STATE g = PyGILState_Ensure();
    BounceObject *b = bounce_new(e->unit_max);
    if (b) {
        w->exporter = (PyObject *)b;
        w->bounce = b->buf;
    } else {
        PyErr_Clear();
    }
    PyGILState_Release(g);
    return w->bounce ? 0 : ENOMEM;
}

const char *uf_cause_name(int cause)
{
    static const char *names[] = {"fault", "readahead", "prefetch", "populate", "evict", "writeback"};
    return cause >= 0 && cause <= CAUSE_WRITEBACK ? names[cause] : "read";
}

/* ---- native sources ---------------------------------------------------------------------- */

/* Read n bytes of the source at `off` into dst, zeros past its end. Files are read with pread
 * so that a file truncated under us is an error, never zeros in place of data. */
static int native_fill(engine_t *e, worker_t *w, char *dst, uint64_t off, uint64_t n)
{
    switch (e->kind) {
    case SRC_ZERO:
        memset(dst, 0, n);
        return 0;
    case SRC_PATTERN:
        memcpy(dst, e->pattern + off % e->pat_len, n);
        return 0;
    case SRC_CYCLE: /* the man-page demo: each fill is the next letter */
        memset(dst, e->cycle[__atomic_fetch_add(&e->cycle_next, 1, __ATOMIC_RELAXED) % e->cycle_len], n);
        return 0;
    }
    uint64_t avail = off < e->src_len ? e->src_len - off : 0;
    if (avail > n)
        avail = n;
    if (e->src_fd >= 0) {
        for (uint64_t got = 0; got < avail;) {
            ssize_t r = pread(e->src_fd, dst + got, avail - got, (off_t)(off + got));
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0) {
                snprintf(w->msg, sizeof(w->msg), "pread: %s", strerror(errno));
                return errno;
            }
            if (r == 0) {
                struct stat sb;
                long long now = fstat(e->src_fd, &sb) ? -1 : (long long)sb.st_size;
                snprintf(w->msg, sizeof(w->msg), "the file is now %lld bytes, it had %llu when it "
                         "was opened: it was truncated", now, (unsigned long long)e->src_len);
                return EIO;
            }
            got += (uint64_t)r;
        }
    } else {
        memcpy(dst, e->src + off, avail);
    }
    memset(dst + avail, 0, n - avail);
    return 0;
}

/* A pointer to n source bytes at `off`, without copying where the source allows it. */
static const char *native_ptr(engine_t *e, worker_t *w, uint64_t off, uint64_t n, int *err)
{
    *err = 0;
    if (e->kind == SRC_ZERO)
        return e->zero;
    if (e->kind == SRC_PATTERN)
        return e->pattern + off % e->pat_len;
    if (e->kind == SRC_MEMORY && off + n <= e->src_len)
        return e->src + off;
    if ((*err = ensure_bounce(e, w))) {
        snprintf(w->msg, sizeof(w->msg), "out of memory for the read buffer");
        return NULL;
    }
    *err = native_fill(e, w, w->bounce, off, n);
    return w->bounce;
}

/* ---- Python sources ---------------------------------------------------------------------- */

/* Whether exception x, or one it was raised from (`raise ... from err`, a few deep: a
 * source's SourceError from a socket's), is a TimeoutError. Not an error raised while
 * handling one (its context): a source may fail over after a timeout and fail otherwise. */
static int timed_out(PyObject *x)
{
    Py_XINCREF(x);
    for (int depth = 0; x && depth < 8; depth++) {
        if (PyErr_GivenExceptionMatches(x, PyExc_TimeoutError)) {
            Py_DECREF(x);
            return 1;
        }
        PyObject *next = PyException_GetCause(x);
        Py_DECREF(x);
        x = next;
    }
    Py_XDECREF(x);
    return 0;
}

/* With the GIL held: the pending exception as "Type: message", cleared. Returns ETIMEDOUT
 * if it comes from a timeout (the source did not answer in time), else EIO. */
int uf_take_exception(char *msg, size_t len)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    int err = value && timed_out(value) ? ETIMEDOUT : EIO;
    const char *name = type ? ((PyTypeObject *)type)->tp_name : "error";
    PyObject *text = value ? PyObject_Str(value) : NULL;
    const char *s = text ? PyUnicode_AsUTF8(text) : NULL;
    if (s && *s)
        snprintf(msg, len, "%s: %s", name, s);
    else
        snprintf(msg, len, "%s", name);
    Py_XDECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    PyErr_Clear();
    return err;
}

/* A read's result: None, or a byte count, which must be the whole buffer. */
static int check_count(PyObject *res, uint64_t want, uint64_t off, char *msg, size_t len)
{
    if (res == Py_None || !PyLong_Check(res) || PyBool_Check(res))
        return 0;
    long long got = PyLong_AsLongLong(res);
    if (got == -1 && PyErr_Occurred())
        PyErr_Clear();
    if (got == (long long)want)
        return 0;
    snprintf(msg, len, "read_into(%#llx, <%llu bytes>) returned %lld: a short read is a failed read",
             (unsigned long long)off, (unsigned long long)want, got);
    return EIO;
}

/* Read the runs that have a buffer and no error yet (buffers are parts of the bounce buffer):
 * one read_many for all of them where the source has it, else one read_into each. Sets each
 * run's err; w->msg says why for a failed one. */
static void python_read(engine_t *e, worker_t *w, area_t *a, run_t *runs, int n)
{
    int todo = 0;
    uint64_t lo = UINT64_MAX, hi = 0;
    const char *buf = w->bounce, *buf_end = w->bounce + e->unit_max;
    for (int i = 0; i < n; i++) {
        if (runs[i].buf && !runs[i].err && (runs[i].buf < buf || runs[i].buf + runs[i].len > buf_end)) {
            snprintf(w->msg, sizeof(w->msg), "a read outside the worker's buffer (an engine bug)");
            runs[i].err = EIO; /* never a view of memory that is not the buffer's */
        }
        if (runs[i].buf && !runs[i].err) {
            todo++;
            lo = runs[i].off < lo ? runs[i].off : lo;
            hi = runs[i].off + runs[i].len > hi ? runs[i].off + runs[i].len : hi;
        }
    }
    if (!todo)
        return;
    /* the span of all the runs (a batch's are scattered): the supervisor blames it if the
     * worker dies in the call */
    uf_inflight(e, w->slot, a->src_off + lo, hi - lo, a->base + lo);
    PyGILState_STATE g = PyGILState_Ensure();
    BounceObject *b = (BounceObject *)w->exporter;
    PyObject **views = PyMem_Calloc((size_t)n, sizeof(PyObject *));
    int failed = 0;
    if (!views) {
        snprintf(w->msg, sizeof(w->msg), "out of memory");
        failed = ENOMEM;
    }
    for (int i = 0; !failed && i < n; i++) {
        if (!runs[i].buf || runs[i].err)
            continue;
        b->off = runs[i].buf - b->buf;
        b->len = (Py_ssize_t)runs[i].len;
        if (!(views[i] = PyMemoryView_FromObject((PyObject *)b))) {
            uf_take_exception(w->msg, sizeof(w->msg));
            failed = ENOMEM;
        }
    }
    if (failed) {
        for (int i = 0; i < n; i++)
            if (runs[i].buf && !runs[i].err)
                runs[i].err = failed;
    } else if (todo == 1 || !e->read_many) {
        int timeout = 0;
        for (int i = 0; i < n; i++) {
            if (!views[i])
                continue;
            if (timeout) { /* each would wait as long: the message stays the timeout's */
                runs[i].err = ETIMEDOUT;
                runs[i].unread = 1;
                continue;
            }
            uint64_t off = a->src_off + runs[i].off;
            PyObject *args[2] = {PyLong_FromUnsignedLongLong(off), views[i]};
            PyObject *res = args[0] ? PyObject_Vectorcall(e->read_into, args, 2, NULL) : NULL;
            Py_XDECREF(args[0]);
            if (!res) {
                runs[i].err = uf_take_exception(w->msg, sizeof(w->msg));
                timeout = runs[i].err == ETIMEDOUT;
            } else {
                runs[i].err = check_count(res, runs[i].len, off, w->msg, sizeof(w->msg));
                Py_DECREF(res);
            }
        }
    } else {
        PyObject *list = PyList_New(todo), *res = NULL;
        for (int i = 0, k = 0; list && i < n; i++) {
            if (!views[i])
                continue;
            PyObject *t = Py_BuildValue("(KO)", (unsigned long long)(a->src_off + runs[i].off), views[i]);
            if (!t) {
                Py_CLEAR(list);
                break;
            }
            PyList_SET_ITEM(list, k++, t);
        }
        if (list)
            res = PyObject_CallOneArg(e->read_many, list);
        Py_XDECREF(list);
        if (!res) {
            int err = uf_take_exception(w->msg, sizeof(w->msg));
            for (int i = 0; i < n; i++)
                if (views[i])
                    runs[i].err = err;
        } else {
            /* None, or one count per request */
            if (res != Py_None && PySequence_Check(res) && PySequence_Size(res) == todo) {
                for (int i = 0, k = 0; i < n; i++) {
                    if (!views[i])
                        continue;
                    PyObject *item = PySequence_GetItem(res, k++);
                    runs[i].err = item ? check_count(item, runs[i].len, a->src_off + runs[i].off,
                                                     w->msg, sizeof(w->msg)) : EIO;
                    Py_XDECREF(item);
                }
            }
            PyErr_Clear();
            Py_DECREF(res);
        }
    }
    for (int i = 0; views && i < n; i++)
        Py_XDECREF(views[i]);
    PyMem_Free(views);
    if (b->exports) {
        /* The source kept a view (or a slice of one, or an exception it keeps holds one):
         * these bytes cannot be trusted, nor the buffer reused. The old buffer now belongs to
         * the views that hold it. A read that failed keeps its own reason. */
        int failed_already = 0;
        for (int i = 0; i < n; i++)
            failed_already |= runs[i].buf && runs[i].err;
        if (!failed_already)
            snprintf(w->msg, sizeof(w->msg), "the source kept a reference to the buffer it was "
                     "given (read_into must not keep it past the call)");
        for (int i = 0; i < n; i++)
            if (runs[i].buf && !runs[i].err)
                runs[i].err = EIO;
        BounceObject *fresh = bounce_new(e->unit_max);
        if (fresh) {
            Py_DECREF(b);
            w->exporter = (PyObject *)fresh;
            w->bounce = fresh->buf;
        } else {
            PyErr_Clear(); /* keep the old one: its next reads fail the same way */
        }
    }
    PyGILState_Release(g);
    uf_inflight(e, w->slot, 0, 0, 0);
}

/* Whether a run can be read at all: a failing source fails, and a Python source does not read
 * pages the supervisor condemned. Returns 0 or the run's error (w->msg set). */
static int source_check(engine_t *e, worker_t *w, area_t *a, run_t *r)
{
    if (r->zero)
        return 0;
    if (e->kind == SRC_FAIL) {
        snprintf(w->msg, sizeof(w->msg), "%s", e->fail_msg);
        return e->fail_errno ? e->fail_errno : EIO;
    }
    if (e->kind == SRC_PYTHON && uf_marked(e->st->condemned, LOAD(e->st->ncondemned), a->src_off + r->off, r->len)) {
        snprintf(w->msg, sizeof(w->msg), "the pager worker died or hung reading this page too often");
        return ECANCELED;
    }
    return 0;
}

/* A file source is mapped with MADV_RANDOM (sources/native.py): the kernel's read-around
 * would read its whole window (read_ahead_kb, up to megabytes) around every miss, random ones
 * too. So the engine's own readahead decides: a readahead window is asked for in one read as
 * it grows, and so is a run of more than a page (a chunk, a populate piece, a prefetch) before
 * it is copied. */
void uf_source_willneed(engine_t *e, uint64_t at, uint64_t len)
{
    if (e->kind != SRC_MEMORY || e->src_fd < 0 || len <= e->page || at >= e->src_len)
        return;
    if (len > e->src_len - at)
        len = e->src_len - at;
    madvise((void *)(uintptr_t)(e->src + at), len, MADV_WILLNEED); /* advice: no error */
}

/* Before installing the runs of a range: a Python source reads all of them at once, each
 * into its own part of the bounce buffer (kept by the run even when it cannot be read, for
 * its retries). Native sources are read run by run as they are installed. */
static void prepare_runs(engine_t *e, worker_t *w, area_t *a, run_t *runs, int n)
{
    uint64_t pos = 0;
    int bounce_err = e->kind == SRC_PYTHON ? ensure_bounce(e, w) : 0;
    for (int i = 0; i < n; i++) {
        run_t *r = &runs[i];
        r->buf = NULL;
        r->err = 0;
        if (r->zero)
            continue;
        uf_source_willneed(e, a->src_off + r->off, r->len);
        if (e->kind == SRC_PYTHON && !bounce_err) {
            r->buf = w->bounce + pos;
            pos += r->len;
        }
        r->err = source_check(e, w, a, r);
        if (!r->err && e->kind == SRC_PYTHON && bounce_err) {
            snprintf(w->msg, sizeof(w->msg), "out of memory for the read buffer");
            r->err = bounce_err;
        }
    }
    if (e->kind == SRC_PYTHON)
        python_read(e, w, a, runs, n);
}

/* The runs of [off, off+n) to install: pages not present (with skip), cut where the removed
 * state changes, at unit_max, and around every page of a suspect range. */
static int collect_runs(engine_t *e, uctx_t *c, area_t *a, uint64_t off, uint64_t n, int skip, run_t *runs)
{
    uint64_t end = off + n, page = e->page;
    int nr = 0, suspect = e->kind == SRC_PYTHON && LOAD(e->st->nsuspect) > 0;
    while (off < end) {
        uint64_t p = a->first_page + off / page;
        if ((skip && bit_get(c->installed, p)) || (c->pooled && bit_get(c->pooled, p))) {
            off += page; /* present, or in the pool (where its next fault finds it) */
            continue;
        }
        int zero = bit_get(c->removed, p);
        int alone = suspect && uf_marked(e->st->suspect, LOAD(e->st->nsuspect), a->src_off + off, page);
        uint64_t run = off + page;
        while (!alone && run < end && run - off < e->unit_max) {
            uint64_t q = a->first_page + run / page;
            if ((skip && bit_get(c->installed, q)) || bit_get(c->removed, q) != zero
                || (c->pooled && bit_get(c->pooled, q)))
                break;
            if (suspect && uf_marked(e->st->suspect, LOAD(e->st->nsuspect), a->src_off + run, page))
                break;
            run += page;
        }
        runs[nr++] = (run_t){off, run - off, zero, 0, NULL};
        off = run;
    }
    return nr;
}

/* ---- installing -------------------------------------------------------------------------- */

/* Write the source into the holes of the memfd's page cache within [off, off+n), so that
 * UFFDIO_CONTINUE can map them. Holes are found with SEEK_HOLE/SEEK_DATA, which count a page
 * swapped out as data: a page that exists, cached or swapped, may hold user data and is never
 * written (mincore would call a swapped page absent). The memfd backs the region from offset
 * 0, so area offsets are file offsets. */
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
        if (data < 0 && errno != ENXIO)
            return errno;
        uint64_t stop = data < 0 ? end : (uint64_t)data < end ? (uint64_t)data : end;
        uint64_t roff = (uint64_t)hole & ~(uint64_t)4095, rlen = stop - roff;
        int err = 0;
        const char *p = zero ? e->zero : native_ptr(e, w, a->src_off + roff, rlen, &err);
        if (err)
            return err;
        for (uint64_t done = 0; done < rlen;) {
            ssize_t r = pwrite(e->memfd, p + done, rlen - done, (off_t)(roff + done));
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0) {
                snprintf(w->msg, sizeof(w->msg), "filling the memfd: %s", strerror(r < 0 ? errno : EIO));
                return r < 0 ? errno : EIO;
            }
            done += (uint64_t)r;
        }
        off = stop;
    }
    return 0;
}

static const char *install_name(engine_t *e, int zero)
{
    if ((zero || e->kind == SRC_ZERO) && e->install == INST_ZEROPAGE)
        return "UFFDIO_ZEROPAGE";
    if (e->install == INST_CONTINUE)
        return "UFFDIO_CONTINUE";
    return e->install == INST_MOVE && !zero ? "UFFDIO_MOVE" : "UFFDIO_COPY";
}

/* One install ioctl for area offset [off, off+n) from `data` (COPY) or zeros. Returns bytes
 * installed; *err: 0, EEXIST (stopped at a present page), EAGAIN, or another errno. */
static uint64_t install_once(engine_t *e, worker_t *w, int uffd, area_t *a, uint64_t off,
                             uint64_t n, int zero, const char *data, int dontwake, int *err)
{
    uint64_t dst = a->base + off;
    long long done = 0;
    *err = 0;
    if ((zero || e->kind == SRC_ZERO) && e->install == INST_ZEROPAGE) {
        struct uffdio_zeropage z = {.range = {dst, n}, .mode = dontwake ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0};
        *err = uf_ioctl(uffd, UFFDIO_ZEROPAGE, &z);
        done = z.zeropage;
    } else if (e->install == INST_CONTINUE) {
        pthread_mutex_lock(&e->lock);
        *err = fill_page_cache(e, w, a, off, n, zero);
        if (!*err) {
            struct uffdio_continue c = {.range = {dst, n}, .mode = (dontwake ? UFFDIO_CONTINUE_MODE_DONTWAKE : 0)
                                                               | (e->track_writes ? UFFDIO_CONTINUE_MODE_WP : 0)};
            *err = uf_ioctl(uffd, UFFDIO_CONTINUE, &c);
            done = c.mapped;
        }
        pthread_mutex_unlock(&e->lock);
    } else if (e->install == INST_MOVE && !zero) {
        *err = native_fill(e, w, w->staging, a->src_off + off, n);
        if (!*err) {
            struct uffdio_move m = {.dst = dst, .src = (uintptr_t)w->staging, .len = n,
                                    .mode = dontwake ? UFFDIO_MOVE_MODE_DONTWAKE : 0};
            *err = uf_ioctl(uffd, UFFDIO_MOVE, &m);
            done = m.move;
        }
    } else {
        struct uffdio_copy c = {.dst = dst, .src = (uintptr_t)(zero ? e->zero : data), .len = n,
                                .mode = (dontwake ? UFFDIO_COPY_MODE_DONTWAKE : 0)
                                        | (e->track_writes ? UFFDIO_COPY_MODE_WP : 0)};
        *err = uf_ioctl(uffd, UFFDIO_COPY, &c);
        done = c.copy;
    }
    if (!*err)
        return n;
    return done > 0 ? (uint64_t)done : 0;
}

/* Errors that end a range without being a failure of its pages: the mapping is changing
 * (EAGAIN: a REMOVE or REMAP is pending, faults come again), the range was unregistered
 * (ENOENT) or its process exited (ESRCH). */
static int is_final(int err) { return err == EAGAIN || err == ENOENT || err == ESRCH; }

/* Install one run. Returns 0, a final error, or a failure; *pos is where it stopped (pages
 * before it are installed or were present). A present page is skipped, and woken by hand if
 * it is the faulting one (the COPY that installs a page wakes it; a skipped one must be). */
static int put_run(engine_t *e, worker_t *w, uctx_t *c, area_t *a, run_t *r, int flags,
                   uint64_t wake_off, uint64_t *installed, uint64_t *pos)
{
    uint64_t off = r->off, end = r->off + r->len;
    *installed = 0;
    *pos = off;
    if (r->err) /* a source's error is a failure of its pages, whatever its errno */
        return is_final(r->err) ? EIO : r->err;
    int copies = !r->zero && (e->install == INST_COPY || (e->install == INST_ZEROPAGE && e->kind != SRC_ZERO));
    if (copies && e->kind == SRC_PYTHON && !r->buf) {
        snprintf(w->msg, sizeof(w->msg), "out of memory for the read buffer");
        return ENOMEM;
    }
    while (off < end) {
        int err = 0;
        const char *data = NULL;
        if (copies)
            data = r->buf ? r->buf + (off - r->off) : native_ptr(e, w, a->src_off + off, end - off, &err);
        if (err && is_final(err))
            err = EIO;
        if (!err && w->claimed && __atomic_load_n(&c->remaps, __ATOMIC_SEQ_CST) != w->claimed_remaps)
            return EAGAIN; /* the areas moved since the claim: faults serve these pages */
        uint64_t done = err ? 0 : install_once(e, w, c->uffd, a, off, end - off, r->zero, data,
                                               flags & IR_DONTWAKE, &err);
        uint64_t p = a->first_page + off / e->page;
        for (uint64_t i = 0; i < done / e->page; i++) {
            uf_refill(e, c, p + i);
            uf_page_in(e, c, p + i);
        }
        if (w->cause != CAUSE_FAULT) /* a record per install ioctl (faults: by serve_fault) */
            uf_trace_install(e, w->t0, a, off, done, w->cause);
        *installed += done;
        off += done;
        if (!err)
            continue;
        if (err == EAGAIN && done) {
            /* The kernel reports a short install as EAGAIN with the bytes done, whatever stopped
             * it (mostly EEXIST: another thread installed the next page). Go on from there: the
             * next ioctl returns the real error with nothing done. */
            continue;
        }
        if (err == EEXIST) {
            ADD(e, eexist, 1);
            uf_page_in(e, c, a->first_page + off / e->page);
            if (off == wake_off) { /* present already, but its faulting thread still waits */
                struct uffdio_range rg = {a->base + off, e->page};
                uf_ioctl(c->uffd, UFFDIO_WAKE, &rg);
            }
            off += e->page;
            continue;
        }
        *pos = off;
        if (!is_final(err) && !w->msg[0]) {
            if (err == EFAULT && e->kind == SRC_MEMORY && e->src_fd >= 0) {
                struct stat sb;
                long long now = fstat(e->src_fd, &sb) ? -1 : (long long)sb.st_size;
                snprintf(w->msg, sizeof(w->msg), "%s: %s; the file is now %lld bytes, it had %llu "
                         "when it was opened: was it truncated?", install_name(e, r->zero),
                         strerror(err), now, (unsigned long long)e->src_len);
            } else {
                snprintf(w->msg, sizeof(w->msg), "%s: %s", install_name(e, r->zero), strerror(err));
            }
        }
        return err;
    }
    *pos = end;
    return 0;
}

/* Read and install the one page at `p`; a Python source reads into `slot`. */
static int try_page(engine_t *e, worker_t *w, uctx_t *c, area_t *a, uint64_t p, int zero,
                    char *slot, int flags, uint64_t wake_off, uint64_t *installed)
{
    run_t one = {p, e->page, zero, 0, NULL};
    uint64_t pos;
    w->msg[0] = 0;
    one.err = source_check(e, w, a, &one);
    if (!one.err && !zero && e->kind == SRC_PYTHON) {
        one.buf = slot;
        python_read(e, w, a, &one, 1);
    }
    return put_run(e, w, c, a, &one, flags, wake_off, installed, &pos);
}

static void sleep_ns(engine_t *e, uint64_t ns)
{
    while (ns && !LOAD(e->stopping)) { /* in slices, so stop() is not kept waiting */
        uint64_t slice = ns < 50000000 ? ns : 50000000;
        struct timespec ts = {(time_t)(slice / 1000000000), (long)(slice % 1000000000)};
        nanosleep(&ts, NULL);
        ns -= slice;
    }
}

/* On_error for pages that failed every attempt: one log line and one decision per run of
 * consecutive pages. The line comes first: the faulting process may die of the SIGBUS. */
static void settle(engine_t *e, worker_t *w, uctx_t *c, area_t *a, uint64_t *pages, int np,
                   int flags, int cause, int rounds, int err, uint64_t *installed)
{
    uint64_t page = e->page;
    for (int i = 0; i < np;) {
        int j = i + 1;
        while (j < np && pages[j] == pages[j - 1] + page)
            j++;
        uint64_t off = pages[i], len = (uint64_t)(j - i) * page;
        uint64_t addr = a->base + off, src = a->src_off + off;
        if (e->on_error == ONERR_RETRY) {
            /* background work and prefetch leave the pages to their faults */
        } else if (e->on_error == ONERR_ZERO) {
            uf_log(e, "serving zeros for %#llx..+%llu (offset %#llx of %s) as on_error='zero' "
                   "asks: %s", (unsigned long long)addr, (unsigned long long)len,
                   (unsigned long long)src, e->name, w->msg);
            uf_state_error(e->st, err, addr, "%s at %#llx..+%llu (offset %#llx of %s) served as "
                           "zeros: %s", uf_cause_name(cause), (unsigned long long)addr,
                           (unsigned long long)len, (unsigned long long)src, e->name, w->msg);
            for (uint64_t p = off; p < off + len; p += page) {
                run_t z = {p, page, 1, 0, NULL};
                uint64_t got, pos;
                if (!put_run(e, w, c, a, &z, flags, NO_WAKE, &got, &pos) && got)
                    ADD(e, zeroed, 1);
                *installed += got;
            }
        } else {
            uf_log(e, "poisoned %#llx..+%llu (offset %#llx of %s, %s) after %d retries: %s; "
                   "accesses get SIGBUS, never wrong bytes", (unsigned long long)addr,
                   (unsigned long long)len, (unsigned long long)src, e->name,
                   uf_cause_name(cause), rounds, w->msg);
            uf_state_error(e->st, err, addr, "%s at %#llx..+%llu (offset %#llx of %s) failed "
                           "after %d retries: %s; the pages were poisoned (SIGBUS), never "
                           "zero-filled", uf_cause_name(cause), (unsigned long long)addr,
                           (unsigned long long)len, (unsigned long long)src, e->name, rounds, w->msg);
            for (uint64_t p = off; p < off + len; p += page) {
                struct uffdio_poison ps = {.range = {a->base + p, page},
                                           .mode = flags & IR_DONTWAKE ? UFFDIO_POISON_MODE_DONTWAKE : 0};
                if (!uf_ioctl(c->uffd, UFFDIO_POISON, &ps)) {
                    ADD(e, poisoned, 1);
                    w->poisoned_bytes += page;
                }
            }
            if (w->npoisoned < UF_MAX_MARKS)
                w->poisoned[w->npoisoned++] = (uf_mark_t){src, len};
            uf_rec_t rec = {uf_now_ns(), src, addr, len, 0, 0, KIND_NONE, CAUSE_POISON, 0, 0};
            uf_trace(e, &rec);
        }
        i = j;
    }
}

static int by_offset(const void *x, const void *y)
{
    uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
    return (a > b) - (a < b);
}

/* The source timed out on [a page of] a range: the pages left of it no thread waits for go to
 * their own faults (logged once for the range). */
static void leave_to_faults(engine_t *e, area_t *a, uint64_t off, int cause, int n, const char *why)
{
    uf_log(e, "reading offset %#llx of %s (%s) timed out: %s; %d pages from there are left "
           "to their own faults", (unsigned long long)(a->src_off + off), e->name,
           uf_cause_name(cause), why, n);
}

/* Pages [off, off+len) of a run failed (w->msg says why): retry them page by page, then in
 * `retries` rounds with backoff, then settle what still fails. Returns 0, a final error, or
 * ETIMEDOUT (below).
 *
 * A read that timed out (the source did not answer in time: a server stopped or cut off)
 * ends its round: every other page would wait as long, so a batch of n pages would take
 * n × (retries + 1) timeouts. The pages no thread waits for (background work's, a fault's
 * chunk beyond the faulting page) are then left to their own faults, neither poisoned nor
 * retried here; only the faulting page goes on, read alone first, then through its retries.
 * Returns ETIMEDOUT then (once the faulting page is settled): the caller reads no more of the
 * range. */
static int fail_range(engine_t *e, worker_t *w, uctx_t *c, area_t *a, run_t *r, uint64_t off,
                      int flags, int cause, uint64_t wake_off, int err, uint64_t *installed)
{
    uint64_t page = e->page, end = r->off + r->len;
    char last[UF_ERR_MSG], fault_msg[UF_ERR_MSG] = "";
    int np = 0;
    for (uint64_t p = off; p < end; p += page) {
        w->pages[np++] = p;
        if (p == wake_off && np > 1) { /* the faulting page first (NO_WAKE matches none) */
            memmove(w->pages + 1, w->pages, (size_t)(np - 1) * sizeof(w->pages[0]));
            w->pages[0] = p;
        }
    }
    snprintf(last, sizeof(last), "%s", w->msg);
    int forever = e->on_error == ONERR_RETRY && cause == CAUSE_FAULT, left = 0;
    /* A failed batch is first read page by page; a lone page goes straight to the retries
     * (unless it was not read at all: after an earlier run's timeout). */
    int round = np > 1 || r->unread ? 0 : 1;
    if (err == ETIMEDOUT) { /* the read of the batch timed out */
        int faulting = w->pages[0] == wake_off;
        if (np > faulting)
            leave_to_faults(e, a, w->pages[faulting], cause, np - faulting, last);
        left = 1;
        if (!faulting)
            return ETIMEDOUT;
        np = 1;
    }
    for (;; round++) {
        if (round > 0) {
            if (cause == CAUSE_READAHEAD || err == ECANCELED || (round > e->retries && !forever))
                break;
            if (LOAD(e->stopping))
                return 0;
            uint64_t delay = 5000000ull << (round - 1 < 8 ? round - 1 : 8);
            if (delay > 1000000000ull)
                delay = 1000000000ull;
            /* the lowest page: the faulting one is first, the rest in order */
            uint64_t lo = np > 1 && w->pages[1] < w->pages[0] ? w->pages[1] : w->pages[0];
            uf_log(e, "reading %d pages from %#llx (offset %#llx of %s, %s) failed: %s; retry %d in "
                   "%.3f s", np, (unsigned long long)(a->base + lo), (unsigned long long)(a->src_off + lo),
                   e->name, uf_cause_name(cause), last, round, (double)delay / 1e9);
            ADD(e, retries, 1);
            sleep_ns(e, delay);
        }
        int kept = 0, timeout = 0, fault_err = 0;
        for (int i = 0; i < np; i++) {
            uint64_t got;
            if (timeout) { /* the source did not answer the last read in time */
                w->pages[kept++] = w->pages[i];
                continue;
            }
            /* one page at the start of the worker's buffer as it is now: a source that kept
             * a view of it made python_read move to a fresh one, and r->buf points into the
             * old one, which the views own (and may free) */
            char *slot = r->buf ? w->bounce : NULL;
            int e2 = try_page(e, w, c, a, w->pages[i], r->zero, slot, flags, wake_off, &got);
            *installed += got;
            if (!e2)
                continue;
            if (is_final(e2))
                return e2;
            err = e2;
            timeout = e2 == ETIMEDOUT;
            snprintf(last, sizeof(last), "%s", w->msg);
            if (!kept && w->pages[i] == wake_off) { /* the faulting page's own failure */
                fault_err = e2;
                snprintf(fault_msg, sizeof(fault_msg), "%s", w->msg);
            }
            w->pages[kept++] = w->pages[i];
        }
        np = kept;
        if (timeout && !left) {
            int faulting = np && w->pages[0] == wake_off;
            if (np > faulting)
                leave_to_faults(e, a, w->pages[faulting], cause, np - faulting, last);
            left = 1;
            np = faulting;
            if (faulting) { /* it goes on alone: with its own error, not the timeout's */
                err = fault_err;
                snprintf(last, sizeof(last), "%s", fault_msg);
            }
        }
        if (!np)
            break;
    }
    snprintf(w->msg, sizeof(w->msg), "%s", last);
    /* in order again, the faulting page among the rest: one log line per run of pages */
    qsort(w->pages, (size_t)np, sizeof(w->pages[0]), by_offset);
    if (np && cause != CAUSE_READAHEAD) /* readahead is speculative: the page's fault decides */
        settle(e, w, c, a, w->pages, np, flags, cause, round - 1 < 0 ? 0 : round - 1, err, installed);
    return left ? ETIMEDOUT : 0;
}

/* Install the (offset, length) ranges of area a, page-aligned and unit_max bytes at most in
 * all, read at once (one read_many for a Python source). With IR_SKIP_INSTALLED, pages
 * marked installed are left alone (readahead, populate, prefetch); IR_DONTWAKE batches the
 * wake. The page at wake_off is woken if found present. Failed pages go through the failure
 * policy above. Returns 0, a final error (EAGAIN, ENOENT, ESRCH), or ETIMEDOUT when the
 * source timed out and pages were left unread (fail_range); *installed gets bytes installed. */
int uf_install_ranges(engine_t *e, worker_t *w, uctx_t *c, area_t *a, const uint64_t *ranges,
                      int nranges, int flags, int cause, uint64_t wake_off, uint64_t *installed)
{
    int nr = 0, ret = 0;
    for (int i = 0; i < nranges; i++)
        nr += collect_runs(e, c, a, ranges[2 * i], ranges[2 * i + 1], flags & IR_SKIP_INSTALLED,
                           w->runs + nr);
    w->t0 = e->trace_fd >= 0 ? uf_now_ns() : 0;
    w->cause = cause;
    *installed = 0;
    w->msg[0] = 0;
    prepare_runs(e, w, a, w->runs, nr);
    int timed_out = 0;
    for (int i = 0; i < nr; i++) {
        run_t *r = &w->runs[i];
        uint64_t got, pos;
        if (timed_out && r->err && (wake_off < r->off || wake_off >= r->off + r->len))
            continue; /* the source timed out: of what failed, only the faulting page is read */
        if (!r->err)
            w->msg[0] = 0;
        int err = put_run(e, w, c, a, r, flags, wake_off, &got, &pos);
        *installed += got;
        if (!err)
            continue;
        if (is_final(err)) {
            ret = err;
            break;
        }
        err = fail_range(e, w, c, a, r, pos, flags, cause, wake_off, err, installed);
        if (err == ETIMEDOUT)
            timed_out = ret = err;
        else if ((ret = err))
            break;
    }
    ADD(e, bytes_installed, *installed);
    switch (cause) {
    case CAUSE_FAULT: ADD(e, fault_bytes, *installed); break;
    case CAUSE_READAHEAD: ADD(e, readahead_bytes, *installed); break;
    case CAUSE_POPULATE: ADD(e, populate_bytes, *installed); break;
    case CAUSE_PREFETCH: ADD(e, prefetch_bytes, *installed); break;
    }
    return ret;
}

/* Install [off, off+n) of area a (n <= unit_max): uf_install_ranges of one range. */
int uf_install_range(engine_t *e, worker_t *w, uctx_t *c, area_t *a, uint64_t off, uint64_t n,
                     int flags, int cause, uint64_t wake_off, uint64_t *installed)
{
    uint64_t range[2] = {off, n};
    return uf_install_ranges(e, w, c, a, range, 1, flags, cause, wake_off, installed);
}
