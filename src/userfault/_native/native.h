/* Shared declarations of the userfault._native extension. */
#ifndef USERFAULT_NATIVE_H
#define USERFAULT_NATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

extern PyMethodDef userfault_ops_methods[];
extern PyTypeObject userfault_MappingType;
extern PyTypeObject userfault_EngineType;
extern PyTypeObject userfault_WatchdogType;
extern PyTypeObject userfault_BounceType;
extern PyMethodDef userfault_engine_methods[];

/* ioctl() that retries EINTR; returns 0 or an errno value. */
int uf_ioctl(int fd, unsigned long request, void *arg);
uint64_t uf_now_ns(void);
/* The lowest address a process may map, page aligned (/proc/sys/vm/mmap_min_addr). */
uint64_t uf_mmap_min_addr(void);
/* UFFDIO_WAKE of every address the process could fault on; 0 or an errno value. */
int uf_wake_space(int uffd);

#endif
