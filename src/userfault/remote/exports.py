"""What a page server serves: a file, a Python buffer (live memory), or any page source.

An :class:`Export` is read by the server's event loop without blocking where it can
(:meth:`Export.read_nowait`: a memory copy, or ``preadv2(RWF_NOWAIT)`` from the page cache) and
by worker threads otherwise (:meth:`Export.read`: disk reads, decompression, network sources).
Withdrawing an export (:meth:`Export.close`) waits for no one: reads that start afterwards
fail with :class:`WithdrawnError`, and the resources are released when the last read in
progress ends.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import urllib.parse
from typing import Any

from ..sources.base import PageSource
from .protocol import check_export_name

__all__ = ["BufferExport", "Export", "FileExport", "SourceExport", "WithdrawnError", "open_export"]


class WithdrawnError(Exception):
    """The export was withdrawn while a request for it was being served."""


class Export:
    """One named, fixed-size byte range that clients may read (and write, if ``writable``)."""

    kind = "export"

    def __init__(self, name: str, size: int, writable: bool) -> None:
        self.name = check_export_name(name)
        if size <= 0:
            raise ValueError(f"export {name!r} is empty: nothing to serve")
        self.size = size
        self.writable = writable
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether the export was withdrawn."""
        return self._closed

    def _enter(self) -> None:
        with self._lock:
            if self._closed:
                raise WithdrawnError(f"export {self.name!r} was withdrawn")
            self._users += 1

    def _exit(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._closed and self._users == 0
        if last:
            self._release()

    def read_nowait(self, offset: int, view: memoryview) -> int:
        """Fill a prefix of ``view`` from ``offset`` without blocking; return its length."""
        self._enter()
        try:
            return self._read_nowait(offset, view)
        finally:
            self._exit()

    def read(self, offset: int, view: memoryview) -> None:
        """Fill all of ``view`` from ``offset`` (may block: call it on a worker thread)."""
        self._enter()
        try:
            self._read(offset, view)
        finally:
            self._exit()

    def write(self, offset: int, data: memoryview) -> None:
        """Store ``data`` at ``offset`` (the caller checked ``writable`` and the range)."""
        self._enter()
        try:
            self._write(offset, data)
        finally:
            self._exit()

    def close(self) -> None:
        """Withdraw the export; resources go when the last read in progress ends."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle = self._users == 0
        if idle:
            self._release()

    # -- what each kind implements -------------------------------------------------------------

    def _read_nowait(self, offset: int, view: memoryview) -> int:
        return 0

    def _read(self, offset: int, view: memoryview) -> None:
        raise NotImplementedError

    def _write(self, offset: int, data: memoryview) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        pass

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name!r} {self.size} bytes"
                f"{' writable' if self.writable else ''}>")


class BufferExport(Export):
    """Any C-contiguous Python buffer: ``bytes``, ``bytearray``, ``mmap``, a numpy array, a
    :class:`~userfault.Region` or a :class:`~userfault.Pager` (the memory of this process, read
    live: a client sees the bytes as they are when its piece is copied).

    The buffer is held (pinned) until the export is withdrawn. Copies run on the event loop:
    a buffer whose pages must themselves be fetched (a pager over a slow source) delays every
    client of the server while it is read.
    """

    kind = "buffer"

    def __init__(self, name: str, buffer: Any, *, writable: bool = False) -> None:
        view = memoryview(buffer)
        if not view.c_contiguous:
            view.release()
            raise TypeError(f"export {name!r}: the buffer must be C-contiguous")
        view = view.cast("B")
        if writable and view.readonly:
            view.release()
            raise ValueError(f"export {name!r}: writable=True needs a writable buffer, and "
                             f"this {type(buffer).__name__} is read-only")
        try:
            super().__init__(name, view.nbytes, writable)
        except BaseException:
            view.release()
            raise
        self._view = view

    def _read_nowait(self, offset: int, view: memoryview) -> int:
        n = len(view)
        view[:] = self._view[offset:offset + n]
        return n

    def _read(self, offset: int, view: memoryview) -> None:
        self._read_nowait(offset, view)

    def _write(self, offset: int, data: memoryview) -> None:
        self._view[offset:offset + len(data)] = data

    def _release(self) -> None:
        self._view.release()


class FileExport(Export):
    """A regular file or a block device, read with ``preadv`` (page-cache hits on the event
    loop with ``RWF_NOWAIT``, misses on a worker thread) and written with ``pwrite``."""

    kind = "file"

    def __init__(self, name: str, path: str | os.PathLike[str], *,
                 writable: bool = False) -> None:
        self.path = os.fspath(path)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
        # O_NONBLOCK: opening a FIFO must not hang; it is cleared again below.
        fd = os.open(self.path, flags)
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                size = st.st_size
            elif stat.S_ISBLK(st.st_mode):
                size = os.lseek(fd, 0, os.SEEK_END)
            else:
                raise ValueError(f"export {name!r}: {self.path!r} is not a regular file or a "
                                 "block device")
            os.set_blocking(fd, True)
            super().__init__(name, size, writable)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._nowait = hasattr(os, "RWF_NOWAIT")

    def _read_nowait(self, offset: int, view: memoryview) -> int:
        if not self._nowait:
            return 0
        try:
            return os.preadv(self._fd, [view], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0  # not (all) in the page cache
        except OSError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait = False  # this file system does not do RWF_NOWAIT
                return 0
            raise

    def _read(self, offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise OSError(errno.EIO, f"{self.path!r} ended at byte {offset + done}: it "
                              f"shrank since it was exported ({self.size} bytes)")
            done += n

    def _write(self, offset: int, data: memoryview) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], offset + done)

    def _release(self) -> None:
        os.close(self._fd)


class SourceExport(Export):
    """Any :class:`~userfault.sources.base.PageSource` (a compressed snapshot, an HTTP or Redis
    source, another page server...), read on worker threads. Writable only if the source has
    ``write_from``. ``own=True`` closes the source when the export is withdrawn."""

    kind = "source"

    def __init__(self, name: str, source: PageSource, *, writable: bool = False,
                 own: bool = False, kind: str = "source") -> None:
        if writable and not callable(getattr(source, "write_from", None)):
            raise ValueError(f"export {name!r}: writable=True needs a source with write_from, "
                             f"and {type(source).__name__} has none")
        super().__init__(name, int(source.size), writable)
        self.source = source
        self.kind = kind
        self._own = own

    def _read(self, offset: int, view: memoryview) -> None:
        self.source.read_into(offset, view)

    def _write(self, offset: int, data: memoryview) -> None:
        self.source.write_from(offset, data)  # type: ignore[attr-defined]

    def _release(self) -> None:
        close = getattr(self.source, "close", None)
        if self._own and close is not None:
            close()


def open_export(name: str, spec: str, *, writable: bool = False) -> Export:
    """The export a command line names: a file or block device, a ``*.ufs`` snapshot (or a file
    starting with the snapshot magic), or a URL (``http(s)://``, ``redis://``, ``uf://``...; see
    :func:`userfault.sources.open.open_source`)."""
    scheme = urllib.parse.urlsplit(spec).scheme.lower()
    if scheme and scheme != "file":
        from ..sources.open import open_source

        source = open_source(spec)
        try:
            return SourceExport(name, source, writable=writable, own=True)
        except BaseException:
            close = getattr(source, "close", None)
            if close is not None:
                close()
            raise
    path = urllib.parse.unquote(urllib.parse.urlsplit(spec).path) if scheme else spec
    if path.endswith(".ufs") or _starts_with_snapshot_magic(path):
        if writable:
            raise ValueError(f"export {name!r}: a compressed snapshot cannot be writable")
        from ..sources.snapshot import SnapshotSource

        snap = SnapshotSource(path)
        try:
            return SourceExport(name, snap, own=True, kind="snapshot")
        except BaseException:
            snap.close()
            raise
    return FileExport(name, path, writable=writable)


def _starts_with_snapshot_magic(path: str) -> bool:
    from ..sources.snapshot import MAGIC

    try:
        with open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NONBLOCK)) as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False  # FileExport says what is wrong with it
