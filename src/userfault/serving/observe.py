"""Traces and working sets for any pager: what ``Pager(trace=, record=, prefetch=)`` and
``userfault trace`` use, and the Firecracker pager with them.

The engine appends trace records itself (no GIL, engine_trace.c); here the file is created
with its header, named (``USERFAULT_TRACE`` for pagers of a traced command), and a trace is
turned into a working set, or a working set into the ranges the engine installs from the
first fault on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..trace.format import Cause, TraceMeta, create_trace
from ..working_set import WorkingSet, from_trace, read_working_set, write_working_set

__all__ = ["TRACE_ENV", "Observation", "working_set_ranges"]

#: Set by ``userfault trace -o FILE -- CMD``: every pager of CMD traces (FILE, FILE.<pid>-<n>).
TRACE_ENV = "USERFAULT_TRACE"
_count = 0


def _claim(path: str) -> str:
    """``path`` if this is the first trace there; else a name of this process's own."""
    global _count
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        return path
    except FileExistsError:
        _count += 1
        return f"{path}.{os.getpid()}-{_count}"


@dataclass
class Observation:
    """The trace file of one pager, and the working set to write from it at the end."""

    trace_path: str
    fd: int
    record: str | None
    temporary: bool

    @classmethod
    def open(cls, trace: str | os.PathLike[str] | None, record: str | os.PathLike[str] | None,
             *, source: str, region_size: int, page_size: int, source_size: int
             ) -> Observation | None:
        """Start a trace (``trace``, else ``$USERFAULT_TRACE``, else a temporary one beside
        ``record`` if a working set is to be recorded); ``None`` when nothing is asked."""
        path = os.fspath(trace) if trace is not None else None
        temporary = False
        if path is None and os.environ.get(TRACE_ENV):
            path = _claim(os.environ[TRACE_ENV])
        if path is None and record is not None:
            path, temporary = f"{os.fspath(record)}.{os.getpid()}.uftrace.tmp", True
        if path is None:
            return None
        meta = TraceMeta.now(source, region_size, page_size, source_size=source_size)
        return cls(path, create_trace(path, meta), None if record is None else os.fspath(record),
                   temporary)

    def close(self) -> int | None:
        """After the engine stopped (its records are written): close the trace; write the
        working set if one was asked for; return its page count."""
        if self.fd < 0:
            return None
        os.close(self.fd)
        self.fd = -1
        return self._finish()

    def at_exit(self) -> None:
        """This process exits serving, and the engine wrote the trace so far: write the
        working set from it. The file stays open: the engine may still append to it."""
        if self.fd >= 0:
            self._finish()

    def _finish(self) -> int | None:
        record, self.record = self.record, None  # written once
        try:
            if record is None:
                return None
            from ..trace import read

            # readahead installs count as touched: a page it brought in is not faulted for
            return write_working_set(record, from_trace(read(self.trace_path),
                                                        installs=(Cause.READAHEAD,)))
        finally:
            if self.temporary:
                self.temporary = False
                os.unlink(self.trace_path)


def working_set_ranges(path: str | os.PathLike[str], *, source: str, source_size: int,
                       page_size: int, max_gap: int = 0, force: bool = False
                       ) -> tuple[WorkingSet, list[tuple[int, int]]]:
    """The working set at ``path``, checked against the source it will be installed from,
    and its ``(offset, length)`` ranges in first-touch order.

    Raises:
        ValueError: not a working-set file, or one recorded for another source or page size
            (unless ``force``; drift in size is tolerated, see
            :meth:`~userfault.working_set.WorkingSet.check_compatible`).
    """
    ws = read_working_set(path).check_compatible(source_size, page_size, source, force=force)
    return ws, ws.ranges(max_gap=max_gap)
