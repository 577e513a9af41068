"""Reading traces: :func:`read` gives columns (numpy structured arrays) and metadata."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any, Final

from .format import (
    HEADER,
    MAX_META,
    RECORD,
    Cause,
    TraceError,
    TraceMeta,
    TraceRecord,
    parse_header,
)

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is in the trace extras
    np = None  # type: ignore[assignment]

__all__ = ["RECORD_DTYPE", "Trace", "TruncatedTraceWarning", "read"]


def _record_dtype() -> Any:
    if np is None:  # pragma: no cover
        return None
    return np.dtype([("t_ns", "<u8"), ("offset", "<u8"), ("address", "<u8"), ("length", "<u8"),
                     ("tid", "<u4"), ("service_ns", "<u4"), ("kind", "u1"), ("cause", "u1"),
                     ("flags", "<u2"), ("reserved", "<u4")])


#: numpy dtype of one record, field for field the layout of :data:`~.format.RECORD`
RECORD_DTYPE: Final[Any] = _record_dtype()
assert RECORD_DTYPE is None or RECORD_DTYPE.itemsize == RECORD.size


class TruncatedTraceWarning(UserWarning):
    """The trace ends inside a record (its writer stopped mid-write); that record is ignored."""


def _need_numpy() -> None:
    if np is None:  # pragma: no cover
        raise ImportError("reading traces needs numpy: pip install 'userfault[numpy]'")


class Trace:
    """A trace in memory: :attr:`meta` and :attr:`records`, one structured array.

    ``trace["offset"]`` is a column; iterating yields :class:`~.format.TraceRecord` objects.
    DROPPED records stay in :attr:`records` (they are where the loss happened);
    :attr:`events` leaves them out and :attr:`dropped` sums what they count.
    """

    def __init__(self, meta: TraceMeta, records: np.ndarray[Any, Any], *, path: str = "",
                 partial_bytes: int = 0) -> None:
        _need_numpy()
        if records.dtype != RECORD_DTYPE:
            raise TypeError(f"records must have dtype RECORD_DTYPE, not {records.dtype}")
        self.meta = meta
        self.records = records
        self.path = path
        #: bytes of a partial last record that were ignored (0: the file ended cleanly)
        self.partial_bytes = partial_bytes

    @property
    def events(self) -> np.ndarray[Any, Any]:
        """The records without the DROPPED markers."""
        events: np.ndarray[Any, Any] = self.records[self.records["cause"] != Cause.DROPPED]
        return events

    @property
    def dropped(self) -> int:
        """Records the writer dropped under overload (counted by its DROPPED records)."""
        drops = self.records["length"][self.records["cause"] == Cause.DROPPED]
        return sum(int(n) for n in drops)  # exact: u64 counts must not wrap in numpy

    def __getitem__(self, column: str) -> np.ndarray[Any, Any]:
        return self.records[column]  # type: ignore[no-any-return]

    def __len__(self) -> int:
        return len(self.records)

    def record(self, i: int) -> TraceRecord:
        """Record ``i`` as a dataclass."""
        return TraceRecord.unpack(self.records[i].tobytes())

    def __iter__(self) -> Iterator[TraceRecord]:
        data = self.records.tobytes()
        for at in range(0, len(data), RECORD.size):
            yield TraceRecord.unpack(data, at)

    def __repr__(self) -> str:
        return (f"<Trace {self.path or '(memory)'} {len(self)} records, source "
                f"{self.meta.source!r}>")


def read(path: str | os.PathLike[str]) -> Trace:
    """Read the trace file ``path``.

    A partial last record (a writer that stopped mid-write) is ignored: the trace's
    :attr:`~Trace.partial_bytes` says how many bytes, and a :class:`TruncatedTraceWarning`
    is issued.

    Raises:
        TraceError: not a trace, an unsupported version, or a corrupt header.
        OSError: the file cannot be read.
    """
    _need_numpy()
    name = os.fspath(path)
    with open(name, "rb") as f:
        head = f.read(HEADER.size)
        if len(head) == HEADER.size:
            _, _, meta_len = HEADER.unpack(head)
            head += f.read(min(meta_len, MAX_META + 1))
        meta, start = parse_header(head, repr(name))
        size = os.fstat(f.fileno()).st_size
        count, partial = divmod(max(size - start, 0), RECORD.size)
        f.seek(start)
        records = np.fromfile(f, dtype=RECORD_DTYPE, count=count)
    if len(records) != count:  # the file shrank while we read it
        raise TraceError(f"{name!r}: the file changed while it was read")
    if partial:
        warnings.warn(f"{name!r}: the trace ends inside a record ({partial} of {RECORD.size} "
                      "bytes, the writer stopped mid-write): that record is ignored",
                      TruncatedTraceWarning, stacklevel=2)
    return Trace(meta, records, path=name, partial_bytes=partial)
