"""From what the user names to a page source: :func:`open_source`.

``userfault.map(x)``, ``Pager(x)`` and ``userfault firecracker serve --mem-file x`` all take
``x`` through here, so a path, a buffer or a URL means the same thing everywhere.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

from .._files import open_regular
from .base import PageSource
from .native import BufferSource, FileSource, NativeSource

__all__ = ["open_source"]

_UF = ("uf", "ufs", "uf+unix")


def open_source(spec: Any, *, redis_prefix: str | None = None, page_size: int = 4096,
                secret_file: str | os.PathLike[str] | None = None,
                tls_ca: str | os.PathLike[str] | None = None, writable: bool = False
                ) -> PageSource:
    """The page source ``spec`` names (a path opened read-write with ``writable``).

    * a :class:`~userfault.sources.base.PageSource` (an object with ``size`` and
      ``read_into``): itself;
    * a buffer (``bytes``, ``bytearray``, ``mmap``, a numpy array...):
      :class:`~userfault.sources.native.BufferSource`;
    * ``http://`` / ``https://``: :class:`~userfault.sources.http.HTTPSource`;
    * ``redis://`` / ``rediss://``: :class:`~userfault.sources.redis.RedisSource`, the key
      prefix from the URL fragment (``redis://host:6379/0#vm1:``) or ``redis_prefix``;
    * ``uf://``, ``ufs://`` (TLS), ``uf+unix://``: an export of a userfault page server
      (:class:`~userfault.remote.PageServerSource`), authenticated with ``secret_file`` (or the
      URL's ``?secret_file=``, or ``$USERFAULT_SECRET_FILE``); ``tls_ca`` for ``ufs://``;
    * a path (or ``file://`` URL) ending in ``.ufs`` or starting with the snapshot magic:
      :class:`~userfault.sources.snapshot.SnapshotSource`;
    * any other path: :class:`~userfault.sources.native.FileSource` (served by the C engine).

    Raises:
        TypeError: ``spec`` is none of these.
        ValueError: ``secret_file`` or ``tls_ca`` given for something other than a page
            server URL.
    """
    if (secret_file is not None or tls_ca is not None) and not (
            isinstance(spec, str) and urllib.parse.urlsplit(spec).scheme.lower() in _UF):
        raise ValueError("secret_file and tls_ca are options of page server URLs (uf://, "
                         "ufs://, uf+unix://)")
    if isinstance(spec, NativeSource):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        return _open_named(os.fspath(spec), redis_prefix, page_size, secret_file, tls_ca,
                           writable)
    if isinstance(spec, (bytes, bytearray, memoryview)) or hasattr(spec, "__array_interface__"):
        return BufferSource(spec)
    try:
        memoryview(spec)
    except TypeError:
        pass
    else:
        return BufferSource(spec)
    # Not isinstance(spec, PageSource): on Python < 3.12 that reads .size, which may open
    # a file or a connection just to look.
    if hasattr(type(spec), "size") and callable(getattr(spec, "read_into", None)):
        return spec  # type: ignore[no-any-return]
    raise TypeError(
        f"cannot page from {type(spec).__name__}: give a path, a URL, a buffer, a native "
        "source (ZeroSource, PatternSource...) or an object with .size and "
        ".read_into(offset, buf)")


def _open_named(spec: str, redis_prefix: str | None, page_size: int,
                secret_file: str | os.PathLike[str] | None,
                tls_ca: str | os.PathLike[str] | None, writable: bool) -> PageSource:
    scheme = urllib.parse.urlsplit(spec).scheme.lower()
    if scheme in _UF:
        from ..remote.source import PageServerSource

        return PageServerSource(spec, secret_file=secret_file, tls_ca=tls_ca)
    if scheme in ("http", "https"):
        from .http import HTTPSource

        return HTTPSource(spec)
    if scheme in ("redis", "rediss"):
        from .redis import RedisSource

        url, _, fragment = spec.partition("#")
        prefix = urllib.parse.unquote(fragment) if fragment else redis_prefix
        return RedisSource(url) if prefix is None else RedisSource(url, prefix=prefix)
    if scheme == "file":
        spec = urllib.parse.unquote(urllib.parse.urlsplit(spec).path)
    elif scheme and "://" in spec:
        raise ValueError(f"cannot page from {spec!r}: {scheme}:// URLs are not supported (http, "
                         "https, redis, rediss and file are; other filesystems through "
                         "userfault.sources.fsspec.FsspecSource)")
    if spec.endswith(".ufs") or _looks_like_snapshot(spec):
        from .snapshot import SnapshotSource

        src = SnapshotSource(spec, page_size=page_size)
        _ = src.size  # open now: a bad file fails here, not at the first fault
        return src
    return FileSource(spec, writable=writable)


def _looks_like_snapshot(path: str) -> bool:
    from .snapshot.format import MAGIC

    try:
        fd = open_regular(path)  # never opens a FIFO or a device: FileSource refuses those
    except (OSError, ValueError):
        return False
    try:
        return os.pread(fd, len(MAGIC), 0) == MAGIC
    finally:
        os.close(fd)
