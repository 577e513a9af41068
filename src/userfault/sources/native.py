"""Sources the native engine serves without Python: zero, a pattern, a buffer, a file.

Each also implements :class:`~userfault.sources.base.PageSource`, so the same object works
with a pager process or any code that reads pages in Python.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

from .. import _native
from .._files import open_regular
from ..errors import SourceError

__all__ = ["BufferSource", "CyclingSource", "FileSource", "NativeSource", "PatternSource",
           "ZeroSource"]

_NOT_A_FILE = ("pages are served from regular files, compressed snapshots (.ufs) and URLs; "
               "copy the data into a file first")

# Engine source kinds, as the extension defines them.
KIND_ZERO: int = _native.SRC_ZERO
KIND_PATTERN: int = _native.SRC_PATTERN
KIND_MEMORY: int = _native.SRC_MEMORY
KIND_CYCLE: int = _native.SRC_CYCLE


class NativeSource:
    """Base of the sources the C engine serves directly."""

    kind: int = KIND_ZERO

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"a source needs a positive size, not {size}")
        self._size = size

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self._size

    def engine_args(self, writable: bool = False) -> dict[str, Any]:
        """Keyword arguments for ``_native.Engine`` describing this source (and, with
        ``writable``, where written pages go).

        Raises:
            ValueError: ``writable`` and the source cannot be written.
        """
        if writable:
            raise ValueError(f"{type(self).__name__} cannot be written to: writable=True needs "
                             "a file, a writable buffer or a source with write_from")
        return {}

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset`` (zeros past the end)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the source holds (files, mappings)."""

    def _check(self, offset: int, buf: memoryview) -> int:
        if offset < 0:
            raise ValueError(f"offset must be non-negative, not {offset}")
        return len(buf)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._size} bytes)"


class ZeroSource(NativeSource):
    """All zeros (installed with ZEROPAGE where the memory allows it)."""

    def read_into(self, offset: int, buf: memoryview) -> None:
        n = self._check(offset, buf)
        buf[:n] = bytes(n)


class PatternSource(NativeSource):
    """``pattern`` repeated: byte ``i`` of the source is ``pattern[i % len(pattern)]``."""

    kind = KIND_PATTERN

    def __init__(self, pattern: bytes, size: int) -> None:
        super().__init__(size)
        if not pattern:
            raise ValueError("the pattern must not be empty")
        self.pattern = bytes(pattern)

    def engine_args(self, writable: bool = False) -> dict[str, Any]:
        return {**super().engine_args(writable), "pattern": self.pattern}

    def read_into(self, offset: int, buf: memoryview) -> None:
        n = self._check(offset, buf)
        p = len(self.pattern)
        start = offset % p
        reps = (start + n) // p + 1
        buf[:n] = (self.pattern * reps)[start:start + n]


class CyclingSource(NativeSource):
    """Each served fault fills its pages with the next byte of ``alphabet``, in turn.

    This is the man-page demo's handler: it shows that every fault is served separately.
    """

    kind = KIND_CYCLE

    def __init__(self, size: int, alphabet: bytes = b"ABCDEFGHIJKLMNOPQRST") -> None:
        super().__init__(size)
        if not alphabet:
            raise ValueError("the alphabet must not be empty")
        self.alphabet = bytes(alphabet)
        self._next = 0

    def engine_args(self, writable: bool = False) -> dict[str, Any]:
        return {**super().engine_args(writable), "cycle": self.alphabet}

    def read_into(self, offset: int, buf: memoryview) -> None:
        n = self._check(offset, buf)
        buf[:n] = bytes([self.alphabet[self._next % len(self.alphabet)]]) * n
        self._next += 1


class BufferSource(NativeSource):
    """Any Python buffer (bytes, bytearray, mmap, numpy array...), read in place.

    The buffer is held (and so pinned) for the source's lifetime.
    """

    kind = KIND_MEMORY

    def __init__(self, data: Any) -> None:
        view = memoryview(data)
        if not view.c_contiguous:
            view.release()
            raise TypeError("a buffer source must be C-contiguous (the engine copies pages "
                            "straight out of it): pass a copy, e.g. "
                            "numpy.ascontiguousarray(data)")
        view = view.cast("B")
        super().__init__(view.nbytes)
        self._view = view

    def engine_args(self, writable: bool = False) -> dict[str, Any]:
        if writable and self._view.readonly:
            raise ValueError("a read-only buffer cannot be written to: writable=True needs a "
                             "writable buffer (a bytearray, a writable mmap, a numpy array)")
        return {"data": self._view, **({"write_buffer": self._view} if writable else {})}

    def read_into(self, offset: int, buf: memoryview) -> None:
        n = self._check(offset, buf)
        avail = max(0, min(n, self._size - offset))
        buf[:avail] = self._view[offset:offset + avail]
        buf[avail:n] = bytes(n - avail)

    def close(self) -> None:
        self._view.release()


class FileSource(NativeSource):
    """A file, mapped read-only; the engine copies straight from the page cache.

    Files larger than RAM work: only touched pages are read. A file that shrinks while served
    yields errors (poisoned pages), never zeros in place of data. ``writable=True`` opens it
    read-write, for a writable pager (written pages go back with ``pwrite``).
    """

    kind = KIND_MEMORY

    def __init__(self, path: str | os.PathLike[str], *, writable: bool = False) -> None:
        self.path = os.fspath(path)
        self.writable = writable
        self._fd = -1
        try:
            self._fd = open_regular(self.path, advice=_NOT_A_FILE, writable=writable)
        except OSError as err:
            raise SourceError(f"cannot open {self.path!r}: {err.strerror}",
                              source=self.path) from err
        except ValueError as err:  # a directory, FIFO, socket or device: refused unopened
            raise SourceError(str(err), source=self.path) from None
        try:
            size = os.fstat(self._fd).st_size
            if size == 0:
                raise SourceError(f"{self.path!r} is empty: nothing to page in", source=self.path)
            super().__init__(size)
            self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            # No kernel read-around (its whole read_ahead_kb window around every miss, random
            # ones too): the engine reads ahead itself (engine_source.c, uf_source_willneed).
            self._map.madvise(mmap.MADV_RANDOM)
        except BaseException:
            os.close(self._fd)
            raise

    def engine_args(self, writable: bool = False) -> dict[str, Any]:
        if writable and not self.writable:
            raise ValueError(f"{self.path!r} was opened read-only: open it with "
                             "FileSource(path, writable=True)")
        return {"data": self._map, "src_fd": self._fd, **({"write_fd": self._fd} if writable
                                                           else {})}

    def read_into(self, offset: int, buf: memoryview) -> None:
        n = self._check(offset, buf)
        got = os.preadv(self._fd, [buf[:n]], offset) if offset < self._size else 0
        want = max(0, min(n, self._size - offset))
        if got < want:
            raise SourceError(f"{self.path!r} ended at byte {offset + got}, before "
                              f"{offset + want}: {self.changed() or 'a short read'}",
                              source=self.path, offset=offset, length=n)
        buf[got:n] = bytes(n - got)

    def changed(self) -> str | None:
        """Why the file can no longer be served as mapped, or ``None``: it shrank below the
        size it had when opened (its pages past the new end cannot be read: they are
        poisoned, never served as zeros)."""
        if self._fd < 0:
            return None
        now = os.fstat(self._fd).st_size
        if now >= self._size:
            return None
        return (f"the file was truncated: it is now {now} bytes, it was {self._size} when "
                "mapped")

    def close(self) -> None:
        if self._fd >= 0:
            self._map.close()
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"FileSource({self.path!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "writable": self.writable}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], writable=state.get("writable", False))  # type: ignore[misc]
