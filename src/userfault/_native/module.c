/* userfault._native: the C half of userfault. ops.c wraps each syscall and ioctl, mapping.c
 * gives Region the buffer protocol, engine.c serves faults on GIL-free threads. */
#include "native.h"
#include "compat.h"

#include <sys/mman.h>

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "userfault._native",
    "Thin syscall/ioctl layer and the GIL-free fault engine of userfault.", -1,
    userfault_ops_methods, NULL, NULL, NULL, NULL,
};

#define ADD_INT(m, name) PyModule_AddObject(m, #name, PyLong_FromUnsignedLongLong((unsigned long long)(name)))

PyMODINIT_FUNC PyInit__native(void)
{
    if (PyType_Ready(&userfault_MappingType) < 0 || PyType_Ready(&userfault_EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (!m)
        return NULL;
    Py_INCREF(&userfault_MappingType);
    PyModule_AddObject(m, "Mapping", (PyObject *)&userfault_MappingType);
    Py_INCREF(&userfault_EngineType);
    PyModule_AddObject(m, "Engine", (PyObject *)&userfault_EngineType);
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
