"""Pages from any fsspec filesystem (s3://, gs://, http://, file://, memory://, ...).

:class:`FsspecSource` reads ranges with ``fs.cat_file(path, start, end)`` and batches with
``fs.cat_ranges`` (which async filesystems such as s3fs, gcsfs and HTTP run concurrently). It
needs the optional ``fsspec`` dependency: ``pip install userfault[fsspec]``, plus the package of
the filesystem itself (``s3fs``, ``gcsfs``, ``aiohttp`` for http, ...).

The source is pickled as ``(url, storage_options)`` and the filesystem is re-created lazily
in the process that reads, and again after a fork. Note: ``memory://`` files live in the
memory of the process that wrote them; a *forked* child sees a copy, a spawned process (or
another machine) sees nothing. Use ``memory://`` for tests only.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

from userfault.errors import SourceError

__all__ = ["FsspecSource"]


def _import_fsspec() -> Any:
    try:
        import fsspec  # type: ignore[import-untyped]
        import fsspec.core  # type: ignore[import-untyped]
    except ImportError as err:
        raise ImportError(
            "FsspecSource needs the fsspec package: pip install userfault[fsspec]") from err
    return fsspec


class FsspecSource:
    """A file on an fsspec filesystem.

    Args:
        url: an fsspec URL (``"s3://bucket/disk.img"``, ``"file:///srv/img"``, ...).
        **storage_options: passed to the filesystem (credentials, endpoint, ...). They are
            pickled with the source.

    Raises:
        ImportError: fsspec is not installed.
        SourceError: the file does not exist or its size cannot be learned.
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        _import_fsspec()
        self._url = url
        self._options = dict(storage_options)
        self._reset_process_state()
        try:
            fs, path = self._fs()
            size = fs.size(path)
        except Exception as err:
            raise SourceError(f"FsspecSource {url}: cannot get the size of the file: "
                              f"{type(err).__name__}: {err}", source=url) from err
        if size is None:
            raise SourceError(f"FsspecSource {url}: the filesystem does not report a size",
                              source=url)
        self._size = int(size)

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self._url, "storage_options": self._options, "size": self._size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._url = state["url"]
        self._options = state["storage_options"]
        self._size = state["size"]
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._fs_obj: Any = None
        self._path = ""

    def _fs(self) -> tuple[Any, str]:
        if self._pid != os.getpid():
            self._reset_process_state()
        if self._fs_obj is None:
            with self._lock:
                if self._fs_obj is None:
                    fsspec = _import_fsspec()
                    fs, path = fsspec.core.url_to_fs(self._url, **self._options)
                    self._path = path
                    self._fs_obj = fs
        return self._fs_obj, self._path

    @property
    def size(self) -> int:
        return self._size

    @property
    def url(self) -> str:
        return self._url

    def __repr__(self) -> str:
        return f"FsspecSource({self._url!r}, size={self._size})"

    def _error(self, what: str, offset: int, length: int, cause: str) -> SourceError:
        return SourceError.for_range("FsspecSource", self._url, what, offset, length, cause)

    def _span(self, offset: int, buf: memoryview) -> int:
        """Bytes of ``buf`` that come from the file (the rest is the final page's tail)."""
        if offset < 0 or offset >= self._size:
            raise self._error("read", offset, len(buf),
                              f"the range starts outside the file (size {self._size})")
        return min(len(buf), self._size - offset)

    def _fill(self, offset: int, buf: memoryview, want: int, data: object) -> None:
        if isinstance(data, BaseException):
            raise self._error("read", offset, len(buf),
                              f"{type(data).__name__}: {data}") from data
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise self._error("read", offset, len(buf),
                              f"the filesystem returned {type(data).__name__}, not bytes")
        if len(data) != want:
            raise self._error("read", offset, len(buf),
                              f"short read: got {len(data)} of {want} bytes (file truncated?)")
        buf[:want] = data
        if want < len(buf):
            buf[want:] = bytes(len(buf) - want)

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with ``cat_file(path, offset, offset + len(buf))``."""
        buf = _bytes_view(buf)
        if not len(buf):
            return
        want = self._span(offset, buf)
        try:
            fs, path = self._fs()
            data: object = fs.cat_file(path, start=offset, end=offset + want)
        except Exception as err:
            data = err
        self._fill(offset, buf, want, data)

    def read_many(self, requests: Sequence[tuple[int, memoryview]]) -> None:
        """Fill every ``(offset, buf)`` with one ``cat_ranges`` call."""
        views = [(off, _bytes_view(b)) for off, b in requests if len(b)]
        if not views:
            return
        wants = [self._span(off, b) for off, b in views]
        try:
            fs, path = self._fs()
            results: list[object] = list(fs.cat_ranges(
                [path] * len(views), [off for off, _ in views],
                [off + w for (off, _), w in zip(views, wants, strict=True)], on_error="return"))
        except Exception as err:
            results = [err] * len(views)
        if len(results) != len(views):
            raise self._error("read", views[0][0], len(views[0][1]),
                              f"cat_ranges returned {len(results)} results for {len(views)}")
        for (off, b), want, data in zip(views, wants, results, strict=True):
            self._fill(off, b, want, data)


def _bytes_view(buf: memoryview) -> memoryview:
    mv = memoryview(buf)
    if mv.readonly:
        raise TypeError("read_into needs a writable buffer")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv
