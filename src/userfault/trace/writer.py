"""A pure-Python trace writer, byte-identical to what the engine appends.

For tests, tools and conversions (:func:`write_fault_log` turns a :meth:`Pager.faults` log
into a trace). The engine writes the same records from C.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, BinaryIO

from .format import (
    RECORD,
    SERVICE_NS_MAX,
    Cause,
    Kind,
    TraceMeta,
    TraceRecord,
    create_trace,
    kind_from_fault_flags,
)

if TYPE_CHECKING:
    import numpy as np

    from ..pager import FaultRecord

__all__ = ["TraceWriter", "records_from_fault_log", "write_fault_log"]


class TraceWriter:
    """Write a trace file: the header now, then records as they come.

    Example::

        with TraceWriter("run.uftrace", TraceMeta.now("demo", size, 4096)) as w:
            w.write(t_ns, offset, address, 4096, tid, service_ns, Kind.READ, Cause.FAULT)
    """

    def __init__(self, path: str | os.PathLike[str], meta: TraceMeta) -> None:
        self.path = os.fspath(path)
        self.meta = meta
        self._file: BinaryIO = os.fdopen(create_trace(path, meta), "wb", buffering=1 << 20)
        self.records = 0

    def write(self, t_ns: int, offset: int, address: int, length: int, tid: int,
              service_ns: int, kind: int, cause: int, flags: int = 0) -> None:
        """Append one record (``service_ns`` saturated at 2**32-1)."""
        self._file.write(RECORD.pack(t_ns, offset, address, length, tid,
                                     min(service_ns, SERVICE_NS_MAX), kind, cause, flags, 0))
        self.records += 1

    def write_record(self, record: TraceRecord) -> None:
        """Append a :class:`TraceRecord`."""
        self._file.write(record.pack())
        self.records += 1

    def write_dropped(self, t_ns: int, count: int) -> None:
        """Append a DROPPED record: ``count`` records were lost since the previous one."""
        self.write(t_ns, 0, 0, count, 0, 0, Kind.NONE, Cause.DROPPED)

    def write_array(self, records: np.ndarray[Any, Any]) -> None:
        """Append a structured array of :data:`~userfault.trace.reader.RECORD_DTYPE` records."""
        from .reader import RECORD_DTYPE

        if records.dtype != RECORD_DTYPE:
            raise TypeError(f"records must have dtype RECORD_DTYPE, not {records.dtype}")
        self._file.write(records.tobytes())
        self.records += len(records)

    def flush(self) -> None:
        """Push buffered records to the file."""
        self._file.flush()

    def close(self) -> None:
        """Flush and close; idempotent."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def records_from_fault_log(faults: Iterable[FaultRecord], length: int) -> list[TraceRecord]:
    """Trace records for the entries of a fault log (:meth:`userfault.Pager.faults`).

    The log has no installed length or cause: every entry becomes a FAULT of ``length``
    bytes (the pager's chunk), its kind taken from the fault's flags.
    """
    return [TraceRecord(f.time_ns, f.offset, f.address, length, f.thread_id & 0xFFFFFFFF,
                        min(f.service_ns, SERVICE_NS_MAX), kind_from_fault_flags(f.flags),
                        Cause.FAULT, f.flags & 0xFF)
            for f in faults]


def write_fault_log(path: str | os.PathLike[str], meta: TraceMeta,
                    faults: Iterable[FaultRecord], length: int, dropped: int = 0) -> int:
    """Write a trace of a fault log; ``dropped`` log entries are recorded as one DROPPED
    record at the end. Returns the number of records written."""
    records = records_from_fault_log(faults, length)
    with TraceWriter(path, meta) as w:
        for r in records:
            w.write_record(r)
        if dropped:
            w.write_dropped(max((r.t_ns for r in records), default=meta.start_monotonic_ns),
                            dropped)
        return w.records
