/* userfault._native: the C half of userfault. ops.c wraps each syscall and ioctl, mapping.c
 * gives Region the buffer protocol, engine_*.c serve faults on GIL-free threads. */
#include "engine.h"

#include <sys/mman.h>

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "userfault._native",
    "Thin syscall/ioctl layer and the GIL-free fault engine of userfault.", -1,
    userfault_ops_methods, NULL, NULL, NULL, NULL,
};

#define ADD_INT(m, name) PyModule_AddObject(m, #name, PyLong_FromUnsignedLongLong((unsigned long long)(name)))

PyMODINIT_FUNC PyInit__native(void)
{
    if (PyType_Ready(&userfault_MappingType) < 0 || PyType_Ready(&userfault_EngineType) < 0
        || PyType_Ready(&userfault_WatchdogType) < 0 || PyType_Ready(&userfault_BounceType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (!m || PyModule_AddFunctions(m, userfault_engine_methods) < 0)
        return NULL;
    Py_INCREF(&userfault_MappingType);
    PyModule_AddObject(m, "Mapping", (PyObject *)&userfault_MappingType);
    Py_INCREF(&userfault_EngineType);
    PyModule_AddObject(m, "Engine", (PyObject *)&userfault_EngineType);
    Py_INCREF(&userfault_WatchdogType);
    PyModule_AddObject(m, "Watchdog", (PyObject *)&userfault_WatchdogType);
    /* The engine's enums, bounds and defaults: Python mirrors none of them by hand. */
    ADD_INT(m, SRC_ZERO);
    ADD_INT(m, SRC_PATTERN);
    ADD_INT(m, SRC_MEMORY);
    ADD_INT(m, SRC_CYCLE);
    ADD_INT(m, SRC_PYTHON);
    ADD_INT(m, SRC_FAIL);
    ADD_INT(m, INST_COPY);
    ADD_INT(m, INST_ZEROPAGE);
    ADD_INT(m, INST_MOVE);
    ADD_INT(m, INST_CONTINUE);
    ADD_INT(m, ONERR_POISON);
    ADD_INT(m, ONERR_RETRY);
    ADD_INT(m, ONERR_ZERO);
    ADD_INT(m, ONREM_RELOAD);
    ADD_INT(m, ONREM_ZERO);
    ADD_INT(m, KIND_READ);
    ADD_INT(m, KIND_WRITE);
    ADD_INT(m, KIND_MINOR);
    ADD_INT(m, KIND_WP);
    ADD_INT(m, KIND_NONE);
    ADD_INT(m, CAUSE_FAULT);
    ADD_INT(m, CAUSE_READAHEAD);
    ADD_INT(m, CAUSE_PREFETCH);
    ADD_INT(m, CAUSE_POPULATE);
    ADD_INT(m, CAUSE_EVICT);
    ADD_INT(m, CAUSE_WRITEBACK);
    ADD_INT(m, CAUSE_DROPPED);
    ADD_INT(m, CAUSE_POISON);
    ADD_INT(m, UF_MAX_THREADS);
    ADD_INT(m, UF_MAX_CHUNK);
    ADD_INT(m, UF_MAX_PIECE);
    ADD_INT(m, UF_DEFAULT_PIECE);
    ADD_INT(m, UF_PYTHON_PIECE);
    ADD_INT(m, UF_MAX_LOG);
    ADD_INT(m, UF_MAX_RETRIES);
    ADD_INT(m, UF_MAX_MARKS);
    ADD_INT(m, UF_KEPT_AREAS);
    ADD_INT(m, UF_FORK_SLOTS);
    ADD_INT(m, UF_HIST_BUCKETS);
    PyModule_AddIntConstant(m, "RECORD_SIZE", (long)sizeof(uf_rec_t));
    PyObject *names = PyTuple_New(UF_N_COUNTERS);
    static const char *counters[] = {
#define UF_NAME(n) #n,
        UF_COUNTERS(UF_NAME)
#undef UF_NAME
    };
    for (int i = 0; names && i < UF_N_COUNTERS; i++)
        PyTuple_SET_ITEM(names, i, PyUnicode_FromString(counters[i]));
    PyModule_AddObject(m, "COUNTER_NAMES", names);
    /* The values compiled in, so a test can check the Python flags against the header. */
    ADD_INT(m, UFFD_API);
    ADD_INT(m, UFFD_USER_MODE_ONLY);
    ADD_INT(m, USERFAULTFD_IOC_NEW);
    ADD_INT(m, UFFDIO_API);
    ADD_INT(m, UFFDIO_REGISTER);
    ADD_INT(m, UFFDIO_UNREGISTER);
    ADD_INT(m, UFFDIO_WAKE);
    ADD_INT(m, UFFDIO_COPY);
    ADD_INT(m, UFFDIO_ZEROPAGE);
    ADD_INT(m, UFFDIO_WRITEPROTECT);
    ADD_INT(m, UFFDIO_CONTINUE);
    ADD_INT(m, UFFDIO_POISON);
    ADD_INT(m, UFFDIO_MOVE);
    ADD_INT(m, PAGEMAP_SCAN);
    ADD_INT(m, _UFFDIO_REGISTER);
    ADD_INT(m, _UFFDIO_UNREGISTER);
    ADD_INT(m, _UFFDIO_WAKE);
    ADD_INT(m, _UFFDIO_COPY);
    ADD_INT(m, _UFFDIO_ZEROPAGE);
    ADD_INT(m, _UFFDIO_MOVE);
    ADD_INT(m, _UFFDIO_WRITEPROTECT);
    ADD_INT(m, _UFFDIO_CONTINUE);
    ADD_INT(m, _UFFDIO_POISON);
    ADD_INT(m, _UFFDIO_API);
    ADD_INT(m, UFFD_FEATURE_PAGEFAULT_FLAG_WP);
    ADD_INT(m, UFFD_FEATURE_EVENT_FORK);
    ADD_INT(m, UFFD_FEATURE_EVENT_REMAP);
    ADD_INT(m, UFFD_FEATURE_EVENT_REMOVE);
    ADD_INT(m, UFFD_FEATURE_MISSING_HUGETLBFS);
    ADD_INT(m, UFFD_FEATURE_MISSING_SHMEM);
    ADD_INT(m, UFFD_FEATURE_EVENT_UNMAP);
    ADD_INT(m, UFFD_FEATURE_SIGBUS);
    ADD_INT(m, UFFD_FEATURE_THREAD_ID);
    ADD_INT(m, UFFD_FEATURE_MINOR_HUGETLBFS);
    ADD_INT(m, UFFD_FEATURE_MINOR_SHMEM);
    ADD_INT(m, UFFD_FEATURE_EXACT_ADDRESS);
    ADD_INT(m, UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
    ADD_INT(m, UFFD_FEATURE_WP_UNPOPULATED);
    ADD_INT(m, UFFD_FEATURE_POISON);
    ADD_INT(m, UFFD_FEATURE_WP_ASYNC);
    ADD_INT(m, UFFD_FEATURE_MOVE);
    ADD_INT(m, UFFDIO_REGISTER_MODE_MISSING);
    ADD_INT(m, UFFDIO_REGISTER_MODE_WP);
    ADD_INT(m, UFFDIO_REGISTER_MODE_MINOR);
    ADD_INT(m, UFFDIO_COPY_MODE_DONTWAKE);
    ADD_INT(m, UFFDIO_COPY_MODE_WP);
    ADD_INT(m, UFFDIO_ZEROPAGE_MODE_DONTWAKE);
    ADD_INT(m, UFFDIO_WRITEPROTECT_MODE_WP);
    ADD_INT(m, UFFDIO_WRITEPROTECT_MODE_DONTWAKE);
    ADD_INT(m, UFFDIO_CONTINUE_MODE_DONTWAKE);
    ADD_INT(m, UFFDIO_CONTINUE_MODE_WP);
    ADD_INT(m, UFFDIO_POISON_MODE_DONTWAKE);
    ADD_INT(m, UFFDIO_MOVE_MODE_DONTWAKE);
    ADD_INT(m, UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES);
    ADD_INT(m, UFFD_EVENT_PAGEFAULT);
    ADD_INT(m, UFFD_EVENT_FORK);
    ADD_INT(m, UFFD_EVENT_REMAP);
    ADD_INT(m, UFFD_EVENT_REMOVE);
    ADD_INT(m, UFFD_EVENT_UNMAP);
    ADD_INT(m, UFFD_PAGEFAULT_FLAG_WRITE);
    ADD_INT(m, UFFD_PAGEFAULT_FLAG_WP);
    ADD_INT(m, UFFD_PAGEFAULT_FLAG_MINOR);
    ADD_INT(m, PM_SCAN_WP_MATCHING);
    ADD_INT(m, PM_SCAN_CHECK_WPASYNC);
    ADD_INT(m, PAGE_IS_WPALLOWED);
    ADD_INT(m, PAGE_IS_WRITTEN);
    ADD_INT(m, PAGE_IS_FILE);
    ADD_INT(m, PAGE_IS_PRESENT);
    ADD_INT(m, PAGE_IS_SWAPPED);
    ADD_INT(m, PAGE_IS_PFNZERO);
    ADD_INT(m, PAGE_IS_HUGE);
    ADD_INT(m, PAGE_IS_SOFT_DIRTY);
    PyModule_AddIntConstant(m, "MSG_SIZE", (long)sizeof(struct uffd_msg));
    return m;
}
