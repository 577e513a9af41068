/* One thin function per userfaultfd syscall or ioctl. Each releases the GIL around the call
 * and returns plain values plus an errno (0 on success); Python turns errnos into exceptions. */
#define _GNU_SOURCE
#include "native.h"
#include "compat.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int uf_ioctl(int fd, unsigned long request, void *arg)
{
    int r;
    do {
        r = ioctl(fd, request, arg);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? errno : 0;
}

uint64_t uf_mmap_min_addr(void)
{
    unsigned long long v = 65536;
    FILE *f = fopen("/proc/sys/vm/mmap_min_addr", "re");
    if (f) {
        if (fscanf(f, "%llu", &v) != 1)
            v = 65536;
        fclose(f);
    }
    return (v + 4095) & ~4095ull;
}

/* Wake every thread waiting on a fault of this uffd, wherever it faulted. UFFDIO_WAKE needs
 * no registered range, only addresses the process could map (mmap_min_addr up to its task
 * size, which the kernel checks: the widest range it takes is used). Threads whose faults a
 * dead server had read are woken in memory no known area reaches (moved with mremap). */
int uf_wake_space(int uffd)
{
    uint64_t pg = (uint64_t)getpagesize(), lo = (uf_mmap_min_addr() + pg - 1) & ~(pg - 1);
    int err = EINVAL;
    for (int bits = 57; bits >= 39 && err == EINVAL; bits--) {
        struct uffdio_range r = {lo, (1ull << bits) - pg - lo};
        err = uf_ioctl(uffd, UFFDIO_WAKE, &r);
    }
    return err;
}

uint64_t uf_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The partial-progress field holds bytes done, or -errno when nothing was done. */
static long long progress(long long field) { return field > 0 ? field : 0; }

static PyObject *open_dev(PyObject *self, PyObject *args)
{
    int flags, fd, err = 0, uffd = -1;
    if (!PyArg_ParseTuple(args, "i", &flags))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    fd = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        err = errno;
    } else {
        uffd = ioctl(fd, USERFAULTFD_IOC_NEW, flags);
        if (uffd < 0)
            err = errno;
        close(fd);
    }
    Py_END_ALLOW_THREADS
    return Py_BuildValue("ii", uffd, err);
}

static PyObject *open_syscall(PyObject *self, PyObject *args)
{
    int flags, err = 0;
    long fd;
    if (!PyArg_ParseTuple(args, "i", &flags))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    fd = syscall(SYS_userfaultfd, flags);
    if (fd < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    return Py_BuildValue("li", fd, err);
}

static PyObject *api(PyObject *self, PyObject *args)
{
    int fd, err;
    struct uffdio_api a = {.api = UFFD_API};
    if (!PyArg_ParseTuple(args, "iK", &fd, &a.features))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    err = uf_ioctl(fd, UFFDIO_API, &a);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("KKi", (unsigned long long)a.features, (unsigned long long)a.ioctls, err);
}

static PyObject *do_register(PyObject *self, PyObject *args)
{
    int fd, err;
    struct uffdio_register r = {0};
    if (!PyArg_ParseTuple(args, "iKKK", &fd, &r.range.start, &r.range.len, &r.mode))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    err = uf_ioctl(fd, UFFDIO_REGISTER, &r);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("Ki", (unsigned long long)r.ioctls, err);
}

/* UNREGISTER and WAKE share struct uffdio_range. */
static PyObject *range_op(PyObject *args, unsigned long request)
{
    int fd, err;
    struct uffdio_range r;
    if (!PyArg_ParseTuple(args, "iKK", &fd, &r.start, &r.len))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    err = uf_ioctl(fd, request, &r);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(err);
}

static PyObject *unregister(PyObject *self, PyObject *args) { return range_op(args, UFFDIO_UNREGISTER); }
static PyObject *wake(PyObject *self, PyObject *args) { return range_op(args, UFFDIO_WAKE); }

static PyObject *wake_all(PyObject *self, PyObject *args)
{
    int fd, err;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    err = uf_wake_space(fd);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(err);
}

/* copy(fd, dst, src, len, mode): src is an address or any buffer (held during the call). */
static PyObject *copy(PyObject *self, PyObject *args)
{
    int fd, err;
    PyObject *src;
    Py_buffer view = {0};
    struct uffdio_copy c = {0};
    if (!PyArg_ParseTuple(args, "iKOKK", &fd, &c.dst, &src, &c.len, &c.mode))
        return NULL;
    if (PyLong_Check(src)) {
        c.src = PyLong_AsUnsignedLongLong(src);
        if (PyErr_Occurred())
            return NULL;
    } else {
        if (PyObject_GetBuffer(src, &view, PyBUF_SIMPLE) < 0)
            return NULL;
        if ((unsigned long long)view.len < c.len) {
            PyBuffer_Release(&view);
            PyErr_Format(PyExc_ValueError, "src holds %zd bytes, fewer than the %llu to copy",
                         view.len, (unsigned long long)c.len);
            return NULL;
        }
        c.src = (uintptr_t)view.buf;
    }
    Py_BEGIN_ALLOW_THREADS
    err = uf_ioctl(fd, UFFDIO_COPY, &c);
    Py_END_ALLOW_THREADS
    if (view.obj)
        PyBuffer_Release(&view);
    return Py_BuildValue("Li", err ? progress(c.copy) : (long long)c.copy, err);
}

static PyObject *zeropage(PyObject *self, PyObject *args)
{
    int fd, err;
    struct uffdio_zeropage z = {0};
    if (!PyArg_ParseTuple(args, "iKKK", &fd, &z.range.start, &z.range.len, &z.mode))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    err = uf_ioctl(fd, UFFDIO_ZEROPAGE, &z);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("Li", err ? progress(z.zeropage) : (long long)z.zeropage, err);
}

static PyObject *writeprotect(PyObject *self, PyObject *args)
{
    int fd, err;
    struct uffdio_writeprotect w = {0};
    if (!PyArg_ParseTuple(args, "iKKK", &fd, &w.range.start, &w.range.len, &w.mode))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    err = uf_ioctl(fd, UFFDIO_WRITEPROTECT, &w);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(err);
}

static PyObject *do_continue(PyObject *self, PyObject *args)
{
    int fd, err;
    struct uffdio_continue c = {0};
    if (!PyArg_ParseTuple(args, "iKKK", &fd, &c.range.start, &c.range.len, &c.mode))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    err = uf_ioctl(fd, UFFDIO_CONTINUE, &c);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("Li", err ? progress(c.mapped) : (long long)c.mapped, err);
}

static PyObject *poison(PyObject *self, PyObject *args)
{
    int fd, err;
    struct uffdio_poison p = {0};
    if (!PyArg_ParseTuple(args, "iKKK", &fd, &p.range.start, &p.range.len, &p.mode))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    err = uf_ioctl(fd, UFFDIO_POISON, &p);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("Li", err ? progress(p.updated) : (long long)p.updated, err);
}

static PyObject *move(PyObject *self, PyObject *args)
{
    int fd, err;
    struct uffdio_move m = {0};
    if (!PyArg_ParseTuple(args, "iKKKK", &fd, &m.dst, &m.src, &m.len, &m.mode))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    err = uf_ioctl(fd, UFFDIO_MOVE, &m);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("Li", err ? progress(m.move) : (long long)m.move, err);
}

/* Wait up to timeout_ms (-1: forever, 0: not at all) for the fd to be readable, then read up
 * to max_msgs messages. Returns (bytes, errno); EAGAIN and a timeout give (b"", 0), a signal
 * (b"", EINTR). The kernel's poll reports POLLERR on a blocking uffd (and before the API
 * handshake), so a blocking uffd is only read with timeout -1, by a plain blocking read(). */
static PyObject *read_msgs(PyObject *self, PyObject *args)
{
    int fd, max_msgs, timeout_ms, err = 0;
    ssize_t n = 0;
    if (!PyArg_ParseTuple(args, "iii", &fd, &max_msgs, &timeout_ms))
        return NULL;
    if (max_msgs < 1 || max_msgs > 4096) {
        PyErr_SetString(PyExc_ValueError, "max_msgs must be between 1 and 4096");
        return NULL;
    }
    PyObject *buf = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)max_msgs * sizeof(struct uffd_msg));
    if (!buf)
        return NULL;
    char *p = PyBytes_AS_STRING(buf);
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0) {
            err = errno;
            break;
        }
        if (fl & O_NONBLOCK) {
            struct pollfd pfd = {.fd = fd, .events = POLLIN};
            int r = poll(&pfd, 1, timeout_ms);
            if (r < 0) { /* EINTR too: the caller runs signal handlers, then calls again */
                err = errno;
                break;
            }
            if (r == 0)
                break;
            if (pfd.revents & (POLLERR | POLLNVAL)) {
                err = (pfd.revents & POLLNVAL) ? EBADF : EINVAL;
                break;
            }
        } else if (timeout_ms >= 0) {
            err = EWOULDBLOCK; /* Python refuses this before the call; never block here */
            break;
        }
        n = read(fd, p, (size_t)max_msgs * sizeof(struct uffd_msg));
        if (n < 0) {
            n = 0;
            if (errno != EAGAIN)
                err = errno;
        }
        break;
    }
    Py_END_ALLOW_THREADS
    if (_PyBytes_Resize(&buf, n) < 0)
        return NULL;
    return Py_BuildValue("Ni", buf, err);
}

/* One ``range_type(start, end, category(c))`` per range, built here: a scan of a GiB makes
 * thousands, and building them in Python cost twice the ioctl. range_type is a tuple
 * subclass of three (PageRange), filled as tuple.__new__ fills one; the few distinct
 * category values are converted once each. The ranges are built into a C array and the list
 * made last: category() runs Python code, which must never meet a list with empty slots
 * (gc.get_objects() would hand it out). */
static PyObject *scan_ranges(const struct page_region *vec, long n, PyTypeObject *range_type,
                             PyObject *category)
{
    enum { NCATS = 8 };
    unsigned long long seen[NCATS];
    PyObject *cats[NCATS] = {NULL};
    int ncats = 0;
    long built = 0;
    PyObject **items = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(PyObject *));
    if (!items)
        return PyErr_NoMemory();
    for (; built < n; built++) {
        int k = 0;
        while (k < ncats && seen[k] != vec[built].categories)
            k++;
        PyObject *cat;
        if (k < ncats) {
            cat = Py_NewRef(cats[k]);
        } else {
            cat = PyObject_CallFunction(category, "K", (unsigned long long)vec[built].categories);
            if (cat && ncats < NCATS) {
                seen[ncats] = vec[built].categories;
                cats[ncats++] = Py_NewRef(cat);
            }
        }
        PyObject *s = cat ? PyLong_FromUnsignedLongLong(vec[built].start) : NULL;
        PyObject *e = s ? PyLong_FromUnsignedLongLong(vec[built].end) : NULL;
        PyObject *t = e ? range_type->tp_alloc(range_type, 3) : NULL;
        if (!t) {
            Py_XDECREF(cat);
            Py_XDECREF(s);
            Py_XDECREF(e);
            break;
        }
        PyTuple_SET_ITEM(t, 0, s);
        PyTuple_SET_ITEM(t, 1, e);
        PyTuple_SET_ITEM(t, 2, cat);
#if PY_VERSION_HEX >= 0x030E0000
        ((PyTupleObject *)t)->ob_hash = -1; /* 3.14 caches a tuple's hash; tp_alloc zeroed it */
#endif
        items[built] = t;
    }
    for (int k = 0; k < ncats; k++)
        Py_DECREF(cats[k]);
    PyObject *list = built == n ? PyList_New(n) : NULL;
    for (long i = 0; i < built; i++) {
        if (list)
            PyList_SET_ITEM(list, i, items[i]);
        else
            Py_DECREF(items[i]);
    }
    PyMem_Free(items);
    return list;
}

static PyObject *pagemap_scan(PyObject *self, PyObject *args)
{
    int fd, err;
    unsigned long long start, end, flags, cat_inv, cat_mask, cat_any, ret_mask, max_pages;
    Py_ssize_t vec_len;
    PyTypeObject *range_type;
    PyObject *category;
    if (!PyArg_ParseTuple(args, "iKKKKKKKKnO!O", &fd, &start, &end, &flags, &cat_inv,
                          &cat_mask, &cat_any, &ret_mask, &max_pages, &vec_len, &PyType_Type,
                          &range_type, &category))
        return NULL;
    if (vec_len < 1 || vec_len > (1 << 20)) {
        PyErr_SetString(PyExc_ValueError, "vec_len must be between 1 and 1048576");
        return NULL;
    }
    if (!PyType_IsSubtype(range_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "range_type must be a tuple subclass");
        return NULL;
    }
    struct page_region *vec = PyMem_RawCalloc((size_t)vec_len, sizeof(*vec));
    if (!vec)
        return PyErr_NoMemory();
    struct pm_scan_arg a = {
        .size = sizeof(a), .flags = flags, .start = start, .end = end,
        .vec = (uintptr_t)vec, .vec_len = (uint64_t)vec_len, .max_pages = max_pages,
        .category_inverted = cat_inv, .category_mask = cat_mask,
        .category_anyof_mask = cat_any, .return_mask = ret_mask,
    };
    long n;
    Py_BEGIN_ALLOW_THREADS
    do {
        n = ioctl(fd, PAGEMAP_SCAN, &a);
    } while (n < 0 && errno == EINTR);
    err = n < 0 ? errno : 0;
    Py_END_ALLOW_THREADS
    PyObject *list = scan_ranges(vec, n < 0 ? 0 : n, range_type, category);
    PyMem_RawFree(vec);
    if (!list)
        return NULL;
    return Py_BuildValue("NKi", list, (unsigned long long)a.walk_end, err);
}

static PyObject *do_mmap(PyObject *self, PyObject *args)
{
    unsigned long long addr, len, off;
    int prot, flags, fd, err = 0;
    void *p;
    if (!PyArg_ParseTuple(args, "KKiiiK", &addr, &len, &prot, &flags, &fd, &off))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    p = mmap((void *)(uintptr_t)addr, len, prot, flags, fd, (off_t)off);
    if (p == MAP_FAILED)
        err = errno;
    Py_END_ALLOW_THREADS
    return Py_BuildValue("Ki", err ? 0ull : (unsigned long long)(uintptr_t)p, err);
}

static PyObject *do_munmap(PyObject *self, PyObject *args)
{
    unsigned long long addr, len;
    int err = 0;
    if (!PyArg_ParseTuple(args, "KK", &addr, &len))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (munmap((void *)(uintptr_t)addr, len) < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(err);
}

/* A copy of descriptor `fd` of the process behind `pidfd` (PTRACE_MODE_ATTACH: root or
 * CAP_SYS_PTRACE); close-on-exec. */
static PyObject *do_pidfd_getfd(PyObject *self, PyObject *args)
{
    int pidfd, fd, got, err = 0;
    if (!PyArg_ParseTuple(args, "ii", &pidfd, &fd))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    got = (int)syscall(SYS_pidfd_getfd, pidfd, fd, 0);
    if (got < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(ii)", got, err);
}

static PyObject *do_madvise(PyObject *self, PyObject *args)
{
    unsigned long long addr, len;
    int advice, err = 0;
    if (!PyArg_ParseTuple(args, "KKi", &addr, &len, &advice))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (madvise((void *)(uintptr_t)addr, len, advice) < 0)
        err = errno;
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(err);
}

static PyObject *do_mremap(PyObject *self, PyObject *args)
{
    unsigned long long old, old_len, new_len, new_addr;
    int flags, err = 0;
    void *p;
    if (!PyArg_ParseTuple(args, "KKKiK", &old, &old_len, &new_len, &flags, &new_addr))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    p = mremap((void *)(uintptr_t)old, old_len, new_len, flags, (void *)(uintptr_t)new_addr);
    if (p == MAP_FAILED)
        err = errno;
    Py_END_ALLOW_THREADS
    return Py_BuildValue("Ki", err ? 0ull : (unsigned long long)(uintptr_t)p, err);
}

/* Touch one byte every `stride` bytes of [addr, addr+len): read (write=0) or write (write=1,
 * stores `value`). With hold_gil the faults happen while this thread holds the GIL, which is
 * exactly what must not deadlock. Returns the sum of the bytes read (a cheap checksum). */
static PyObject *touch(PyObject *self, PyObject *args)
{
    unsigned long long addr, len, stride;
    int write, value, hold_gil;
    if (!PyArg_ParseTuple(args, "KKKiip", &addr, &len, &stride, &write, &value, &hold_gil))
        return NULL;
    if (stride == 0) {
        PyErr_SetString(PyExc_ValueError, "stride must be positive");
        return NULL;
    }
    unsigned long long sum = 0;
    volatile unsigned char *p = (volatile unsigned char *)(uintptr_t)addr;
    PyThreadState *ts = hold_gil ? NULL : PyEval_SaveThread();
    for (unsigned long long i = 0; i < len; i += stride) {
        if (write)
            p[i] = (unsigned char)value;
        else
            sum += p[i];
    }
    if (ts)
        PyEval_RestoreThread(ts);
    return PyLong_FromUnsignedLongLong(sum);
}

PyMethodDef userfault_ops_methods[] = {
    {"open_dev", open_dev, METH_VARARGS, "open_dev(flags) -> (fd, errno) via /dev/userfaultfd"},
    {"open_syscall", open_syscall, METH_VARARGS, "open_syscall(flags) -> (fd, errno)"},
    {"api", api, METH_VARARGS, "api(fd, features) -> (features, ioctls, errno)"},
    {"register", do_register, METH_VARARGS, "register(fd, start, len, mode) -> (ioctls, errno)"},
    {"unregister", unregister, METH_VARARGS, "unregister(fd, start, len) -> errno"},
    {"wake", wake, METH_VARARGS, "wake(fd, start, len) -> errno"},
    {"wake_all", wake_all, METH_VARARGS, "wake_all(fd) -> errno: every fault waiting, anywhere"},
    {"copy", copy, METH_VARARGS, "copy(fd, dst, src, len, mode) -> (bytes_done, errno)"},
    {"zeropage", zeropage, METH_VARARGS, "zeropage(fd, start, len, mode) -> (bytes_done, errno)"},
    {"writeprotect", writeprotect, METH_VARARGS, "writeprotect(fd, start, len, mode) -> errno"},
    {"continue_", do_continue, METH_VARARGS, "continue_(fd, start, len, mode) -> (bytes_done, errno)"},
    {"poison", poison, METH_VARARGS, "poison(fd, start, len, mode) -> (bytes_done, errno)"},
    {"move", move, METH_VARARGS, "move(fd, dst, src, len, mode) -> (bytes_done, errno)"},
    {"read_msgs", read_msgs, METH_VARARGS, "read_msgs(fd, max_msgs, timeout_ms) -> (bytes, errno)"},
    {"pagemap_scan", pagemap_scan, METH_VARARGS,
     "pagemap_scan(fd, start, end, flags, inverted, mask, anyof, return_mask, max_pages, vec_len, range_type, category)"
     " -> ([range_type(start, end, category(categories))], walk_end, errno)"},
    {"mmap", do_mmap, METH_VARARGS, "mmap(addr, len, prot, flags, fd, offset) -> (addr, errno)"},
    {"munmap", do_munmap, METH_VARARGS, "munmap(addr, len) -> errno"},
    {"madvise", do_madvise, METH_VARARGS, "madvise(addr, len, advice) -> errno"},
    {"pidfd_getfd", do_pidfd_getfd, METH_VARARGS, "pidfd_getfd(pidfd, fd) -> (fd, errno)"},
    {"mremap", do_mremap, METH_VARARGS, "mremap(old, old_len, new_len, flags, new_addr) -> (addr, errno)"},
    {"touch", touch, METH_VARARGS, "touch(addr, len, stride, write, value, hold_gil) -> checksum"},
    {NULL, NULL, 0, NULL},
};
