"""Fault traces: a compact, versioned file of every fault and install, and tools to read,
summarize and plot it.

* :mod:`.format`: the file layout, :class:`TraceMeta`, :class:`TraceRecord`, :func:`create_trace`
  (write the header, get a descriptor the engine appends records to);
* :mod:`.writer`: :class:`TraceWriter`, the pure-Python writer, and fault-log conversion;
* :mod:`.reader`: :func:`read` -> :class:`Trace` (numpy columns, dataclass iteration);
* :mod:`.stats`: :func:`summarize`; :mod:`.plot`: PNG and offline HTML pictures.

Example::

    trace = userfault.trace.read("run.uftrace")
    print(len(trace), trace.dropped, trace["offset"][:10])
"""

from typing import TYPE_CHECKING, Any

from .format import (
    MAGIC,
    RECORD,
    VERSION,
    Cause,
    Kind,
    TraceError,
    TraceFlag,
    TraceMeta,
    TraceRecord,
    create_trace,
    encode_header,
)
from .writer import TraceWriter, records_from_fault_log, write_fault_log

if TYPE_CHECKING:
    from .reader import RECORD_DTYPE, Trace, TruncatedTraceWarning, read

_READER = ("RECORD_DTYPE", "Trace", "TruncatedTraceWarning", "read")


def __getattr__(name: str) -> Any:
    """The reader's names, imported on first use: the reader needs numpy, whose import would
    otherwise slow every ``import userfault`` (and so the start of every pager process)."""
    if name in _READER:
        from . import reader

        return getattr(reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MAGIC",
    "RECORD",
    "RECORD_DTYPE",
    "VERSION",
    "Cause",
    "Kind",
    "Trace",
    "TraceError",
    "TraceFlag",
    "TraceMeta",
    "TraceRecord",
    "TraceWriter",
    "TruncatedTraceWarning",
    "create_trace",
    "encode_header",
    "read",
    "records_from_fault_log",
    "write_fault_log",
]
