/* ref_handler.c: the hand-written C reference the pager benchmarks compare against.
 *
 * One program, several ways of making a region's pages appear on first touch:
 *
 *   uffd    an anonymous region registered MISSING with userfaultfd; a handler thread
 *           (poll + read + UFFDIO_COPY) serves each fault with `--chunk` bytes (4096: one page
 *           per fault) aligned to the chunk, from a constant buffer (`--source const`) or from
 *           a file mapped read-only (`--source file --file PATH`). `--handlers N` runs N such
 *           threads polling the same uffd (default 1).
 *   kernel  mmap(MAP_PRIVATE) of the file; write touches make the kernel copy each page out of
 *           the page cache (its own copy-on-write paging).
 *   read    read() (sequential) or pread() of each page (random) of the file into a freshly
 *           allocated buffer, so the buffer's own first-touch faults are included.
 *   anon    demand-zero first touch of anonymous memory (the kernel's cheapest fault).
 *
 * The faulting thread touches one byte per page, sequentially or in a pre-shuffled random page
 * order (fixed seed), and writes one byte per page (a write fault) and reads one back (a
 * checksum that lets the caller compare the bytes served). With `--latency` every touch is
 * timed with clock_gettime. The result is one JSON object on stdout.
 *
 * The same file also builds as a shared library (cc -shared -fPIC): bench_pager.py calls
 * ref_shuffle() and ref_touch() through ctypes so the engine is measured with exactly the same
 * touch loop and page order as this reference.
 *
 * Usage: ref_handler MODE [--size BYTES] [--pages N] [--order seq|random] [--seed S]
 *                         [--chunk BYTES] [--source const|file] [--file PATH] [--latency]
 *                         [--pin-handler CPU] [--pin-faulter CPU] [--handlers N]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096ul

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "ref_handler: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* ---- shared with bench_pager.py (ctypes) --------------------------------------------- */

/* splitmix64: a small, good, reproducible generator. */
static uint64_t next_rand(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* out[0..n_out) = the first n_out entries of a Fisher-Yates shuffle of 0..n_total-1, or
 * 0..n_out-1 in order when seed is 0. Returns 0, or -1 if out of memory. */
int ref_shuffle(uint64_t n_total, uint64_t seed, uint32_t *out, uint64_t n_out)
{
    if (!seed) {
        for (uint64_t i = 0; i < n_out; i++)
            out[i] = (uint32_t)i;
        return 0;
    }
    uint32_t *perm = malloc(n_total * sizeof(*perm));
    if (!perm)
        return -1;
    for (uint64_t i = 0; i < n_total; i++)
        perm[i] = (uint32_t)i;
    for (uint64_t i = n_total - 1; i > 0; i--) {
        uint64_t j = next_rand(&seed) % (i + 1);
        uint32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    memcpy(out, perm, n_out * sizeof(*perm));
    free(perm);
    return 0;
}

/* Touch page idx[i] of base for i < n: write `value` at byte 0 (the first access: a write
 * fault), then read byte 64 into the checksum. lat_ns (optional) gets each touch's duration. */
uint64_t ref_touch(char *base, const uint32_t *idx, uint64_t n, int value, uint64_t *lat_ns)
{
    uint64_t sum = 0;
    for (uint64_t i = 0; i < n; i++) {
        volatile char *p = base + (uint64_t)idx[i] * PAGE;
        if (lat_ns) {
            uint64_t t0 = now_ns();
            p[0] = (char)value;
            lat_ns[i] = now_ns() - t0;
        } else {
            p[0] = (char)value;
        }
        sum += (unsigned char)p[64];
    }
    return sum;
}

/* ---- the userfaultfd handler --------------------------------------------------------- */

typedef struct {
    int uffd, stopfd;
    char *base;         /* the registered region */
    uint64_t size, chunk;
    const char *src;    /* file mapping, or NULL: serve the constant buffer */
    uint64_t src_size;
    char *constant;     /* `chunk` bytes of one value */
    uint64_t faults, bytes;
    int pin;
} handler_t;

static void pin_to(int cpu)
{
    if (cpu < 0)
        return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) < 0)
        die("sched_setaffinity");
}

/* Serve one fault: COPY the chunk that contains it. Chunks are aligned, and only one thread
 * faults, so a chunk is installed once; EEXIST (a page someone else installed) just wakes. */
static void serve(handler_t *h, uint64_t addr)
{
    uint64_t off = (addr - (uint64_t)h->base) & ~(h->chunk - 1);
    uint64_t len = off + h->chunk > h->size ? h->size - off : h->chunk;
    const char *from = h->src ? h->src + off : h->constant;
    struct uffdio_copy c = {.dst = (uint64_t)h->base + off, .src = (uint64_t)from, .len = len};
    __atomic_add_fetch(&h->faults, 1, __ATOMIC_RELAXED);
    if (ioctl(h->uffd, UFFDIO_COPY, &c) == 0) {
        __atomic_add_fetch(&h->bytes, len, __ATOMIC_RELAXED);
        return;
    }
    if (errno != EEXIST && errno != EAGAIN)
        die("UFFDIO_COPY");
    struct uffdio_range r = {addr & ~(PAGE - 1), PAGE};
    if (ioctl(h->uffd, UFFDIO_WAKE, &r) < 0)
        die("UFFDIO_WAKE");
}

/* poll until a fault is pending, then read every queued message (non-blocking) and serve it. */
static void *handler_main(void *arg)
{
    handler_t *h = arg;
    struct uffd_msg msgs[64];
    pin_to(h->pin);
    for (;;) {
        struct pollfd p[2] = {{.fd = h->uffd, .events = POLLIN}, {.fd = h->stopfd, .events = POLLIN}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (p[1].revents)
            return NULL;
        for (;;) {
            ssize_t got = read(h->uffd, msgs, sizeof(msgs));
            if (got < 0) {
                if (errno == EAGAIN)
                    break;
                if (errno == EINTR)
                    continue;
                die("read uffd");
            }
            for (size_t i = 0; i < (size_t)got / sizeof(msgs[0]); i++)
                if (msgs[i].event == UFFD_EVENT_PAGEFAULT)
                    serve(h, msgs[i].arg.pagefault.address);
        }
    }
}

static int open_uffd(void)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        die("userfaultfd");
    struct uffdio_api api = {.api = UFFD_API};
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        die("UFFDIO_API");
    return fd;
}

/* ---- the program --------------------------------------------------------------------- */

typedef struct {
    const char *mode, *order, *source, *file;
    uint64_t size, pages, chunk, seed;
    int latency, pin_handler, pin_faulter, handlers;
} options_t;

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static const char *map_file(const char *path, uint64_t size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        die(path);
    struct stat st;
    if (fstat(fd, &st) < 0)
        die("fstat");
    if ((uint64_t)st.st_size < size) {
        fprintf(stderr, "ref_handler: %s is smaller than --size\n", path);
        exit(1);
    }
    const char *p = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        die("mmap file");
    close(fd);
    return p;
}

int main(int argc, char **argv)
{
    options_t o = {.order = "seq", .source = "const", .size = 64ul << 20, .chunk = PAGE,
                   .seed = 1, .pin_handler = -1, .pin_faulter = -1, .handlers = 1};
    if (argc < 2) {
        fprintf(stderr, "usage: ref_handler uffd|kernel|read|anon [options] (see the source)\n");
        return 2;
    }
    o.mode = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--latency")) { o.latency = 1; continue; }
        if (!v) { fprintf(stderr, "ref_handler: %s needs a value\n", a); return 2; }
        i++;
        if (!strcmp(a, "--size")) o.size = strtoull(v, NULL, 0);
        else if (!strcmp(a, "--pages")) o.pages = strtoull(v, NULL, 0);
        else if (!strcmp(a, "--order")) o.order = v;
        else if (!strcmp(a, "--seed")) o.seed = strtoull(v, NULL, 0);
        else if (!strcmp(a, "--chunk")) o.chunk = strtoull(v, NULL, 0);
        else if (!strcmp(a, "--source")) o.source = v;
        else if (!strcmp(a, "--file")) o.file = v;
        else if (!strcmp(a, "--pin-handler")) o.pin_handler = atoi(v);
        else if (!strcmp(a, "--pin-faulter")) o.pin_faulter = atoi(v);
        else if (!strcmp(a, "--handlers")) o.handlers = atoi(v);
        else { fprintf(stderr, "ref_handler: unknown option %s\n", a); return 2; }
    }
    o.size &= ~(PAGE - 1);
    if (!o.size || !o.chunk || o.chunk % PAGE || (o.chunk & (o.chunk - 1))) {
        fprintf(stderr, "ref_handler: --size must be >= 4096, --chunk a power-of-two page multiple\n");
        return 2;
    }
    uint64_t total = o.size / PAGE, n = o.pages && o.pages < total ? o.pages : total;
    int random_order = !strcmp(o.order, "random");
    int use_file = !strcmp(o.source, "file");
    if ((use_file || !strcmp(o.mode, "kernel") || !strcmp(o.mode, "read")) && !o.file) {
        fprintf(stderr, "ref_handler: this mode needs --file\n");
        return 2;
    }

    /* The page order, prepared before anything is timed. */
    uint32_t *idx = malloc(n * sizeof(*idx));
    uint64_t *lat = o.latency ? malloc(n * sizeof(*lat)) : NULL;
    if (!idx || (o.latency && !lat) || ref_shuffle(total, random_order ? o.seed : 0, idx, n) < 0)
        die("malloc");
    if (lat)
        memset(lat, 0, n * sizeof(*lat)); /* fault the latency array in, untimed */
    pin_to(o.pin_faulter);

    handler_t h = {.uffd = -1, .pin = o.pin_handler};
    pthread_t threads[16];
    char *base = NULL;
    uint64_t sum = 0, t0 = 0, t1 = 0;
    if (!strcmp(o.mode, "uffd")) {
        base = mmap(NULL, o.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (base == MAP_FAILED)
            die("mmap region");
        h.uffd = open_uffd();
        h.stopfd = eventfd(0, EFD_CLOEXEC);
        h.base = base;
        h.size = o.size;
        h.chunk = o.chunk;
        if (use_file) {
            h.src = map_file(o.file, o.size);
        } else {
            h.constant = aligned_alloc(PAGE, o.chunk);
            memset(h.constant, 'R', o.chunk);
        }
        struct uffdio_register reg = {.range = {(uint64_t)base, o.size}, .mode = UFFDIO_REGISTER_MODE_MISSING};
        if (ioctl(h.uffd, UFFDIO_REGISTER, &reg) < 0)
            die("UFFDIO_REGISTER");
        if (o.handlers < 1 || o.handlers > 16) {
            fprintf(stderr, "ref_handler: --handlers must be 1..16\n");
            return 2;
        }
        for (int i = 0; i < o.handlers; i++) /* all poll the same uffd */
            if (pthread_create(&threads[i], NULL, handler_main, &h))
                die("pthread_create");
        t0 = now_ns();
        sum = ref_touch(base, idx, n, 1, lat);
        t1 = now_ns();
        uint64_t one = 1;
        if (write(h.stopfd, &one, sizeof(one)) != sizeof(one))
            die("eventfd write");
        for (int i = 0; i < o.handlers; i++)
            pthread_join(threads[i], NULL);
    } else if (!strcmp(o.mode, "kernel") || !strcmp(o.mode, "anon")) {
        if (!strcmp(o.mode, "kernel")) {
            int fd = open(o.file, O_RDONLY | O_CLOEXEC);
            if (fd < 0)
                die(o.file);
            base = mmap(NULL, o.size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
            close(fd);
        } else {
            base = mmap(NULL, o.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        }
        if (base == MAP_FAILED)
            die("mmap");
        t0 = now_ns();
        sum = ref_touch(base, idx, n, 1, lat);
        t1 = now_ns();
    } else if (!strcmp(o.mode, "read")) {
        int fd = open(o.file, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            die(o.file);
        base = malloc(o.size); /* fresh: its first-touch faults are part of the cost */
        if (!base)
            die("malloc");
        t0 = now_ns();
        if (random_order) {
            for (uint64_t i = 0; i < n; i++) {
                uint64_t off = (uint64_t)idx[i] * PAGE;
                if (pread(fd, base + off, PAGE, (off_t)off) != (ssize_t)PAGE)
                    die("pread");
                sum += (unsigned char)base[off + 64];
            }
        } else {
            for (uint64_t done = 0; done < o.size;) {
                ssize_t r = read(fd, base + done, o.size - done);
                if (r <= 0)
                    die("read");
                done += (uint64_t)r;
            }
            for (uint64_t i = 0; i < n; i++)
                sum += (unsigned char)base[i * PAGE + 64];
        }
        t1 = now_ns();
        close(fd);
    } else {
        fprintf(stderr, "ref_handler: unknown mode %s\n", o.mode);
        return 2;
    }

    double secs = (double)(t1 - t0) / 1e9;
    uint64_t faults = h.uffd >= 0 ? h.faults : n;
    printf("{\"mode\": \"%s\", \"order\": \"%s\", \"source\": \"%s\", \"chunk\": %llu, "
           "\"size\": %llu, \"touches\": %llu, \"faults\": %llu, \"seconds\": %.9f, "
           "\"per_fault_us\": %.4f, \"per_touch_us\": %.4f, \"gbps\": %.4f, \"checksum\": %llu",
           o.mode, o.order, use_file || !strcmp(o.mode, "kernel") || !strcmp(o.mode, "read") ? "file" : !strcmp(o.mode, "anon") ? "zero" : "const", (unsigned long long)o.chunk,
           (unsigned long long)o.size, (unsigned long long)n, (unsigned long long)faults, secs,
           faults ? secs * 1e6 / (double)faults : 0.0, secs * 1e6 / (double)n,
           (double)(n * PAGE) / secs / 1e9, (unsigned long long)sum);
    if (lat) {
        qsort(lat, n, sizeof(*lat), cmp_u64);
        printf(", \"p50_us\": %.4f, \"p99_us\": %.4f", lat[n / 2] / 1e3, lat[(n * 99) / 100] / 1e3);
    }
    printf("}\n");
    return 0;
}
