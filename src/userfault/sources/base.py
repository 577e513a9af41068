"""The page-source protocol: where a pager gets the bytes of a page.

A *native* source (zero, pattern, buffer, file) is served by C threads in the faulting
process. Any other object that follows :class:`PageSource` is a *Python* source: it runs in a
pager process (see :mod:`userfault.serving.process`), because Python code cannot serve faults of a
process whose faulting thread holds the GIL. Python sources are therefore pickled and sent to
that process: keep their constructor arguments picklable and open connections lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["BatchedPageSource", "PageSource", "WritablePageSource", "read_many_fallback"]


@runtime_checkable
class PageSource(Protocol):
    """Anything that can fill a range of bytes on demand.

    Implementations raise :class:`userfault.errors.SourceError` (or any exception) when the bytes
    cannot be had; the pager retries, then applies its ``on_error`` policy. They must never
    return a short or zero-filled buffer in place of data they could not read.
    """

    @property
    def size(self) -> int:
        """Total size in bytes."""
        ...

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill all of ``buf`` with the bytes at ``[offset, offset + len(buf))``.

        Bytes past ``size`` (the tail of the last page) must be written as zeros.
        """
        ...


@runtime_checkable
class BatchedPageSource(PageSource, Protocol):
    """A source that serves several ranges in one round trip (pipelined or parallel)."""

    def read_many(self, requests: Sequence[tuple[int, memoryview]]) -> None:
        """Fill each ``(offset, buf)`` pair as :meth:`PageSource.read_into` would."""
        ...


@runtime_checkable
class WritablePageSource(PageSource, Protocol):
    """A source that accepts written-back pages."""

    def write_from(self, offset: int, data: memoryview) -> None:
        """Store ``data`` at ``offset``."""
        ...


def read_many_fallback(source: PageSource, requests: Sequence[tuple[int, memoryview]]) -> None:
    """Serve a batch with :meth:`PageSource.read_into`, one request at a time."""
    read_many = getattr(source, "read_many", None)
    if read_many is not None:
        read_many(requests)
        return
    for offset, buf in requests:
        source.read_into(offset, buf)
