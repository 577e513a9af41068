"""`DeltaSource`: map a snapshot writable, and write the pages written as a delta of it.

A pager mapped with ``writable=True`` write-protects the pages it installs, so the engine
sees every first write (no byte is compared), and writes the written pages back to its source
on :meth:`~userfault.Pager.flush`, on close, and under a budget before it drops them. A
:class:`DeltaSource` is that source for a snapshot: it serves the snapshot (a delta: its whole
chain), keeps the pages written back in a scratch file and lists them in a written-ranges file
beside it (the format of :mod:`.written`), and :meth:`DeltaSource.commit` writes them as a
delta of the snapshot::

    source = DeltaSource("base.ufs")
    with userfault.map(source, writable=True) as mem:
        ...                                  # run: only the pages touched are read
    source.commit("delta.ufs")               # the chunks written, the rest inherited
    source.close()

The scratch pair (``SCRATCH`` and ``SCRATCH.written``) is also what ``userfault snapshot create
--base BASE --changed SCRATCH.written SCRATCH DEST`` takes.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

from .format import DEFAULT_CACHE_CHUNKS, PAGE_SIZE, Progress, SnapshotInfo
from .reader import SnapshotReader
from .writer import create_snapshot
from .written import HEADER_LINE, load_written

__all__ = ["DeltaSource"]


class DeltaSource:
    """A writable :class:`~userfault.sources.base.PageSource` over the snapshot ``base``.

    Reads serve the pages written back (:meth:`write_from`) from the scratch file, every other
    page from ``base``. Picklable: a pager process reopens the files, and learns the pages
    written from the written-ranges file (so does one restarted after a crash).

    Args:
        base: the snapshot (full, or a delta: the chain) to map and make the delta of.
        scratch: the file keeping the pages written, created (emptied) here; the ranges go to
            ``scratch + ".written"``. Default: a temporary file, removed by :meth:`close`.
        cache_chunks, page_size: as :class:`~userfault.sources.snapshot.SnapshotSource`.

    Raises:
        SnapshotError: ``base`` cannot be read (see :class:`SnapshotReader`).
    """

    def __init__(self, base: str | os.PathLike[str], scratch: str | os.PathLike[str] | None = None,
                 *, cache_chunks: int = DEFAULT_CACHE_CHUNKS, page_size: int = PAGE_SIZE) -> None:
        self.base = os.fsdecode(os.fspath(base))
        with SnapshotReader(self.base, cache_chunks=0) as reader:
            self._size = reader.size
        self._owned = scratch is None
        if scratch is None:
            fd, path = tempfile.mkstemp(prefix="userfault-delta-", suffix=".scratch")
            os.close(fd)
            scratch = path
        self.scratch = os.fsdecode(os.fspath(scratch))
        self.written_file = self.scratch + ".written"
        with open(self.scratch, "wb") as f:
            f.truncate(self._size)  # sparse: only the pages written take space
        with open(self.written_file, "w", encoding="ascii") as f:
            f.write(HEADER_LINE + "\n")
        self._setup(cache_chunks, page_size)
        self._owner = os.getpid()

    def _setup(self, cache_chunks: int, page_size: int) -> None:
        self.cache_chunks = cache_chunks
        self.page_size = page_size
        self._lock = threading.Lock()
        self._pid = -1
        self._reader: SnapshotReader | None = None
        self._fd = self._log = -1
        self._pages: set[int] = set()

    @property
    def size(self) -> int:
        """The snapshot's size in bytes."""
        return self._size

    def _open(self) -> SnapshotReader:
        """This process's reader, files and pages written (opened on first use, after fork)."""
        with self._lock:
            if self._pid != os.getpid() or self._reader is None:
                for fd in (self._fd, self._log):  # forked: our copies of the parent's files
                    if fd >= 0:
                        os.close(fd)
                self._reader = SnapshotReader(self.base, cache_chunks=self.cache_chunks,
                                              page_size=self.page_size)
                self._fd = os.open(self.scratch, os.O_RDWR | os.O_CLOEXEC)
                self._log = os.open(self.written_file, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                ps = self.page_size
                self._pages = {p for off, n in load_written(self.written_file)
                               for p in range(off // ps, -(-(off + n) // ps))}
                self._pid = os.getpid()
            return self._reader

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset``: pages written from the scratch file, the
        rest from the snapshot."""
        reader = self._open()
        mv = buf if (buf.format == "B" and buf.ndim == 1) else buf.cast("B")
        ps, end, pos = self.page_size, offset + mv.nbytes, offset
        while pos < end:
            written = pos // ps in self._pages
            stop = min(end, (pos // ps + 1) * ps)
            while stop < end and (stop // ps in self._pages) == written:
                stop = min(end, stop + ps)
            part = mv[pos - offset:stop - offset]
            if written:
                got = os.preadv(self._fd, [part], pos)
                if got < len(part):  # past the end of the scratch file: the zero tail
                    part[got:] = bytes(len(part) - got)
            else:
                reader.read_into(pos, part)
            pos = stop

    def read_many(self, requests: Sequence[tuple[int, memoryview]]) -> None:
        """Serve each ``(offset, buf)`` pair, in order."""
        for offset, buf in requests:
            self.read_into(offset, buf)

    def write_from(self, offset: int, data: memoryview) -> None:
        """Keep ``data``, written at ``offset``, in the scratch file and list its range."""
        reader = self._open()
        mv = data if (data.format == "B" and data.ndim == 1) else data.cast("B")
        end = min(offset + mv.nbytes, self._size)
        if end <= offset:
            return
        ps = self.page_size
        first, last = offset // ps, -(-end // ps)
        partial = {first} if offset % ps else set()
        if end % ps and end < self._size:
            partial.add(last - 1)
        with self._lock:
            for page in partial - self._pages:  # written in part: the rest is the snapshot's
                start = page * ps
                whole = bytearray(min(ps, self._size - start))
                reader.read_into(start, memoryview(whole))
                os.pwrite(self._fd, whole, start)
            done = 0
            while done < end - offset:
                done += os.pwrite(self._fd, mv[done:end - offset], offset + done)
            os.write(self._log, f"{offset} {end - offset}\n".encode())
            self._pages.update(range(first, last))

    def flush(self) -> None:
        """Make the pages written and their list durable (fsync)."""
        self._open()
        os.fsync(self._fd)
        os.fsync(self._log)

    def written_ranges(self) -> list[tuple[int, int]]:
        """The ``(offset, length)`` ranges written back so far (from any process)."""
        return load_written(self.written_file)

    def commit(self, dest: str | os.PathLike[str], *, level: int = 3, threads: int = 0,
               progress: Progress | None = None) -> SnapshotInfo:
        """Write the pages written back so far as a delta of :attr:`base` to ``dest`` (see
        :func:`~userfault.sources.snapshot.create_snapshot`). Flush the pager first (or close
        it): pages written but not yet written back are not in the scratch file. Every commit
        holds every page written since the base; map the delta to start the next link."""
        return create_snapshot(self.scratch, dest, base=self.base,
                               written=self.written_ranges(), level=level, threads=threads,
                               progress=progress)

    def close(self) -> None:
        """Close the files in this process; the one that made a temporary scratch removes it."""
        with self._lock:
            for fd in (self._fd, self._log):
                if fd >= 0 and self._pid == os.getpid():
                    os.close(fd)
            self._fd = self._log = -1
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            self._pid = -1
        if self._owned and os.getpid() == self._owner:
            for path in (self.scratch, self.written_file):
                if os.path.exists(path):
                    os.unlink(path)
            self._owned = False

    def __getstate__(self) -> dict[str, Any]:
        return {"base": self.base, "scratch": self.scratch, "size": self._size,
                "cache_chunks": self.cache_chunks, "page_size": self.page_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.base, self.scratch, self._size = state["base"], state["scratch"], state["size"]
        self.written_file = self.scratch + ".written"
        self._owned, self._owner = False, -1
        self._setup(state["cache_chunks"], state["page_size"])

    def __repr__(self) -> str:
        return f"DeltaSource({self.base!r}, scratch={self.scratch!r})"
