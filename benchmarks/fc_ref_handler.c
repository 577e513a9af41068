/* fc_ref_handler.c: a one-page-per-fault Firecracker UFFD handler, the baseline of
 * bench_firecracker.py. It does what the example handlers in Firecracker's repository do:
 *
 *   listen on a Unix socket; accept one VMM; receive the userfaultfd (SCM_RIGHTS) and the JSON
 *   region list in one message; mmap the memory file read-only; then poll + read the uffd and
 *   serve every missing-page fault with one UFFDIO_COPY of one page from the file mapping
 *   (EEXIST: wake; EAGAIN: wake so the thread refaults; REMOVE events: ignored, later faults
 *   get the file's page again, which is what the simplest handlers do).
 *
 * It exits when the VMM closes the connection (or the uffd reports POLLERR/POLLHUP) and prints
 * one JSON line: {"faults": N, "eexist": N, "eagain": N, "service_ns": total}.
 * The JSON parser only picks the four numbers per region; it trusts its input (baseline only).
 *
 * Usage: fc_ref_handler SOCKET MEM_FILE
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_REGIONS 64

typedef struct {
    uint64_t base, size, offset, page;
} region_t;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "fc_ref_handler: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int field(const char *obj, const char *end, const char *name, uint64_t *out)
{
    const char *p = strstr(obj, name);
    if (!p || p >= end)
        return 0;
    p = strchr(p + strlen(name), ':');
    if (!p)
        return 0;
    *out = strtoull(p + 1, NULL, 10);
    return 1;
}

static int parse(const char *json, region_t *r)
{
    int n = 0;
    const char *p = json;
    while (n < MAX_REGIONS && (p = strchr(p, '{'))) {
        const char *end = strchr(p, '}');
        if (!end)
            break;
        if (!field(p, end, "\"base_host_virt_addr\"", &r[n].base) || !field(p, end, "\"size\"", &r[n].size)
            || !field(p, end, "\"offset\"", &r[n].offset))
            break;
        if (!field(p, end, "\"page_size\"", &r[n].page))
            r[n].page = 4096;
        n++;
        p = end + 1;
    }
    return n;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: fc_ref_handler SOCKET MEM_FILE\n");
        return 2;
    }
    int mfd = open(argv[2], O_RDONLY);
    struct stat st;
    if (mfd < 0 || fstat(mfd, &st) < 0)
        die("open memory file");
    char *mem = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, mfd, 0);
    if (mem == MAP_FAILED)
        die("mmap memory file");

    int ls = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    char tmp[sizeof(sa.sun_path)];
    snprintf(tmp, sizeof(tmp), "%s.tmp", argv[1]);
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", tmp);
    unlink(tmp);
    if (bind(ls, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(ls, 1) < 0)
        die("bind/listen");
    if (rename(tmp, argv[1]) < 0) /* the path appears once we listen */
        die("rename socket");
    int conn = accept(ls, NULL, NULL);
    if (conn < 0)
        die("accept");

    static char json[256 * 1024];
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {json, sizeof(json) - 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf)};
    ssize_t got = recvmsg(conn, &msg, 0);
    if (got <= 0)
        die("recvmsg");
    json[got] = 0;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (!c || c->cmsg_type != SCM_RIGHTS)
        die("no fd in the handshake");
    int uffd;
    memcpy(&uffd, CMSG_DATA(c), sizeof(int));
    region_t regions[MAX_REGIONS];
    int nreg = parse(json, regions);
    if (nreg <= 0) {
        fprintf(stderr, "fc_ref_handler: cannot parse %s\n", json);
        return 1;
    }

    uint64_t faults = 0, eexist = 0, eagain = 0, service = 0;
    struct uffd_msg msgs[64];
    struct pollfd p[2] = {{.fd = uffd, .events = POLLIN}, {.fd = conn, .events = POLLIN}};
    for (;;) {
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (p[1].revents) {
            char b;
            if (recv(conn, &b, 1, MSG_DONTWAIT) <= 0)
                break; /* the VMM hung up */
        }
        if (p[0].revents & (POLLERR | POLLHUP | POLLNVAL))
            break;
        if (!(p[0].revents & POLLIN))
            continue;
        ssize_t n = read(uffd, msgs, sizeof(msgs));
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            die("read uffd");
        }
        uint64_t t0 = now_ns();
        for (size_t i = 0; i < (size_t)n / sizeof(msgs[0]); i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            uint64_t addr = msgs[i].arg.pagefault.address;
            region_t *r = NULL;
            for (int k = 0; k < nreg; k++)
                if (addr - regions[k].base < regions[k].size)
                    r = &regions[k];
            if (!r)
                continue;
            uint64_t page = addr & ~(r->page - 1);
            struct uffdio_copy cp = {.dst = page, .src = (uint64_t)(uintptr_t)(mem + r->offset + (page - r->base)),
                                     .len = r->page, .mode = 0};
            faults++;
            if (ioctl(uffd, UFFDIO_COPY, &cp) < 0) {
                struct uffdio_range wr = {page, r->page};
                if (errno == EEXIST)
                    eexist++;
                else if (errno == EAGAIN)
                    eagain++;
                else if (errno == ESRCH)
                    goto out;
                else
                    die("UFFDIO_COPY");
                ioctl(uffd, UFFDIO_WAKE, &wr);
            }
        }
        service += now_ns() - t0;
    }
out:
    printf("{\"faults\": %llu, \"eexist\": %llu, \"eagain\": %llu, \"service_ns\": %llu}\n",
           (unsigned long long)faults, (unsigned long long)eexist, (unsigned long long)eagain,
           (unsigned long long)service);
    unlink(argv[1]);
    return 0;
}
