/* Mapping: a base type exposing [address, address+length) through the buffer protocol, so a
 * Python subclass (userfault.Region) works with memoryview(), numpy and bytes() on every
 * supported Python. It owns nothing: the subclass maps and unmaps; exports block the unmap. */
#include "native.h"
#include "structmember.h"

typedef struct {
    PyObject_HEAD
    unsigned long long address;
    unsigned long long length;
    int readonly;
    Py_ssize_t exports;
} MappingObject;

static int mapping_getbuffer(PyObject *obj, Py_buffer *view, int flags)
{
    MappingObject *m = (MappingObject *)obj;
    if (m->address == 0) {
        PyErr_SetString(PyExc_ValueError, "the region is unmapped; map a new one");
        return -1;
    }
    if (PyBuffer_FillInfo(view, obj, (void *)(uintptr_t)m->address, (Py_ssize_t)m->length,
                          m->readonly, flags) < 0)
        return -1;
    m->exports++;
    return 0;
}

static void mapping_releasebuffer(PyObject *obj, Py_buffer *view)
{
    ((MappingObject *)obj)->exports--;
}

static PyBufferProcs mapping_as_buffer = {mapping_getbuffer, mapping_releasebuffer};

/* _attach(address, length, readonly): called by the subclass once it has mapped memory. */
static PyObject *mapping_attach(PyObject *obj, PyObject *args)
{
    MappingObject *m = (MappingObject *)obj;
    unsigned long long address, length;
    int readonly;
    if (!PyArg_ParseTuple(args, "KKp", &address, &length, &readonly))
        return NULL;
    m->address = address;
    m->length = length;
    m->readonly = readonly;
    Py_RETURN_NONE;
}

/* _detach(): forget the memory before the subclass unmaps it; refuses while views exist,
 * since a live memoryview over unmapped memory would crash the interpreter on use. */
static PyObject *mapping_detach(PyObject *obj, PyObject *unused)
{
    MappingObject *m = (MappingObject *)obj;
    if (m->exports > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot unmap: %zd buffer view(s) of the region are still alive; "
                     "release them (memoryview.release(), del the numpy array) first",
                     m->exports);
        return NULL;
    }
    m->address = 0;
    m->length = 0;
    Py_RETURN_NONE;
}

static PyMethodDef mapping_methods[] = {
    {"_attach", mapping_attach, METH_VARARGS, "Expose (address, length, readonly)."},
    {"_detach", mapping_detach, METH_NOARGS, "Stop exposing the memory; fails while views exist."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef mapping_members[] = {
    {"_exports", T_PYSSIZET, offsetof(MappingObject, exports), READONLY, "live buffer views"},
    {NULL, 0, 0, 0, NULL},
};

PyTypeObject userfault_MappingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "userfault._native.Mapping",
    .tp_basicsize = sizeof(MappingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Memory exposed through the buffer protocol (base of userfault.Region).",
    .tp_as_buffer = &mapping_as_buffer,
    .tp_methods = mapping_methods,
    .tp_members = mapping_members,
    .tp_new = PyType_GenericNew,
};
