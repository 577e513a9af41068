"""Pages over HTTP(S) with byte ranges, standard library only.

:class:`HTTPSource` serves a remote file with ``Range`` GETs over a small pool of HTTP/1.1
keep-alive connections (one connection per thread at a time). It learns the size with a
``Range: bytes=0-0`` GET (the ``Content-Range`` total), which also proves that the server honours
ranges: a server that answers ``200`` with the full body (nginx ``max_ranges 0``, many CDNs for
small objects, some proxies) is refused with a clear :class:`~userfault.errors.SourceError`
instead of serving wrong bytes. Every ``206`` is checked: its ``Content-Range`` and length must be
exactly the range asked for.

``read_into`` reads the body straight into the caller's buffer. ``read_many`` merges adjacent
requests into one GET (the body streams into the successive buffers) and runs the remaining
GETs in parallel, one per pooled connection.

A pooled connection that the server closed while it was idle (keep-alive timeout, restart) is
retried once on a fresh connection; any other failure raises ``SourceError`` naming the URL, the
range and the cause. The source is picklable (only its constructor arguments are kept) and
fork-safe: connections and threads are created lazily in the process that uses them.
"""

from __future__ import annotations

import http.client
import os
import queue
import re
import ssl
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from userfault.errors import SourceError

__all__ = ["HTTPSource"]

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*/\s*(\d+|\*)\s*$", re.IGNORECASE)
_RETRYABLE = (http.client.RemoteDisconnected, http.client.BadStatusLine,
              ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
_MIN_MERGE = 1 << 20  # merged GETs are capped at max(1 MiB, batch / connections)


class _Conn:
    """A pooled connection and whether it has served a request (then it may be stale)."""

    __slots__ = ("conn", "used")

    def __init__(self, conn: http.client.HTTPConnection) -> None:
        self.conn = conn
        self.used = False


class HTTPSource:
    """A remote file served by an HTTP/1.1 server that supports byte ranges.

    Args:
        url: ``http://`` or ``https://`` URL of the file.
        size: the size in bytes; when ``None`` it is learned (and range support is checked)
            with one ``Range: bytes=0-0`` GET at construction.
        headers: extra request headers (``Authorization``, ...). ``Range`` and ``Host`` are set
            by the source.
        timeout: socket timeout in seconds for connect and each read.
        connections: most connections open at once (and threads used by ``read_many``).
        verify: for HTTPS, ``True`` checks the certificate against the system CAs, a path
            names a CA bundle (PEM) to trust, ``False`` disables checking (testing only).

    Raises:
        SourceError: the size probe failed (unreachable, 404, ranges not supported, ...).
    """

    def __init__(
        self,
        url: str,
        *,
        size: int | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        connections: int = 4,
        verify: bool | str = True,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"HTTPSource needs an http:// or https:// URL, not {url!r}")
        if not parts.hostname:
            raise ValueError(f"HTTPSource URL {url!r} has no host")
        if connections < 1:
            raise ValueError(f"connections must be at least 1, not {connections}")
        if size is not None and size < 0:
            raise ValueError(f"size must be >= 0, not {size}")
        self._url = url
        self._args_size = size
        self._headers = {k: v for k, v in (headers or {}).items()
                         if k.lower() not in ("range", "host", "connection")}
        self._timeout = float(timeout)
        self._connections = int(connections)
        self._verify = verify
        self._setup()
        self._size = size if size is not None else self._probe()

    # -- pickling: constructor arguments (and the learned size) only ------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self._url, "size": self._size, "headers": self._headers,
                "timeout": self._timeout, "connections": self._connections,
                "verify": self._verify}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._url = state["url"]
        self._args_size = state["size"]
        self._size = state["size"]
        self._headers = state["headers"]
        self._timeout = state["timeout"]
        self._connections = state["connections"]
        self._verify = state["verify"]
        self._setup()

    def _setup(self) -> None:
        parts = urllib.parse.urlsplit(self._url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        netloc = self._host if ":" not in self._host else f"[{self._host}]"
        self._desc = f"{parts.scheme}://{netloc}:{self._port}{parts.path}"  # no credentials
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        """Fresh pool, locks and threads for this process (at setup, and after a fork)."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._idle: queue.LifoQueue[_Conn] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(self._connections)
        self._executor: ThreadPoolExecutor | None = None
        self._ssl: ssl.SSLContext | None = None
        self.connections_opened = 0

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            # Forked: the parent's sockets, locks and threads are not ours. Drop them without
            # closing (closing is harmless, but the parent still owns those streams).
            self._reset_process_state()

    # -- public API ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._url

    @property
    def size(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"HTTPSource({self._desc!r}, size={self._size})"

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with ``[offset, offset + len(buf))`` using one Range GET."""
        self._check_pid()
        buf = _bytes_view(buf)
        self._read_group(offset, [buf])

    def read_many(self, requests: Sequence[tuple[int, memoryview]]) -> None:
        """Fill every ``(offset, buf)``: adjacent requests share a GET, the GETs run in
        parallel over the connection pool. Raises the first failure after all have finished."""
        self._check_pid()
        if not requests:
            return
        reqs = sorted(((off, _bytes_view(b)) for off, b in requests), key=lambda r: r[0])
        total = sum(len(b) for _, b in reqs)
        cap = max(_MIN_MERGE, -(-total // self._connections))
        groups: list[tuple[int, list[memoryview]]] = []
        end = -1
        length = 0
        for off, b in reqs:
            if groups and off == end and length + len(b) <= cap:
                groups[-1][1].append(b)
                length += len(b)
            else:
                groups.append((off, [b]))
                length = len(b)
            end = off + len(b)
        if len(groups) == 1:
            self._read_group(*groups[0])
            return
        executor = self._get_executor()
        futures: list[Future[None]] = [executor.submit(self._read_group, off, bufs)
                                       for off, bufs in groups]
        first: BaseException | None = None
        for fut in futures:
            err = fut.exception()
            if err is not None and first is None:
                first = err
        if first is not None:
            raise first

    def close(self) -> None:
        """Close pooled connections and stop the worker threads (the source stays usable)."""
        if self._pid != os.getpid():
            self._reset_process_state()
            return
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        while True:
            try:
                self._idle.get_nowait().conn.close()
            except queue.Empty:
                break

    def __enter__(self) -> HTTPSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _error(self, what: str, offset: int, length: int, cause: str) -> SourceError:
        return SourceError(
            f"HTTPSource {self._desc}: {what} [{offset}, {offset + length}) ({length} bytes) "
            f"failed: {cause}", source=self._desc, offset=offset, length=length)

    def _get_executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._connections,
                                                    thread_name_prefix="userfault-http")
            return self._executor

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            if self._verify is False:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            elif isinstance(self._verify, str):
                ctx = ssl.create_default_context(cafile=self._verify)
            else:
                ctx = ssl.create_default_context()
            self._ssl = ctx
        return self._ssl

    def _new_conn(self) -> _Conn:
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout,
                                               context=self._ssl_context())
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        with self._lock:
            self.connections_opened += 1  # a statistic: TCP connections this process opened
        return _Conn(conn)

    def _acquire(self) -> _Conn:
        if not self._slots.acquire(timeout=max(self._timeout, 1.0) * 4):
            raise TimeoutError("no pooled connection became free")
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            return self._new_conn()

    def _release(self, c: _Conn | None) -> None:
        if c is not None:
            self._idle.put(c)
        self._slots.release()

    def _request(self, c: _Conn, start: int, end: int) -> http.client.HTTPResponse:
        hdrs = dict(self._headers)
        hdrs["Range"] = f"bytes={start}-{end}"
        c.conn.request("GET", self._target, headers=hdrs)
        return c.conn.getresponse()

    def _probe(self) -> int:
        """Learn the size from ``Content-Range`` of a ``Range: bytes=0-0`` GET."""
        c = self._acquire()
        keep: _Conn | None = None
        try:
            for attempt in (0, 1):
                try:
                    resp = self._request(c, 0, 0)
                    try:
                        if resp.status == 416:  # empty file: "bytes */0"
                            total = self._parse_total(resp, 0, 1)
                        else:
                            self._check_status(resp, "size probe GET", 0, 1)
                            first, last, total = self._parse_range(resp, 0, 1)
                            if (first, last) != (0, 0):
                                raise self._error("size probe GET", 0, 1,
                                                  f"Content-Range {first}-{last} is not 0-0")
                        resp.read()
                    finally:
                        resp.close()
                    if not resp.will_close:
                        keep = c
                    return total
                except SourceError:
                    c.conn.close()
                    raise
                except (OSError, http.client.HTTPException) as err:
                    c.conn.close()
                    if attempt == 0 and c.used and isinstance(err, _RETRYABLE):
                        c = self._new_conn()
                        continue
                    raise self._error("size probe GET", 0, 1, _cause(err)) from err
            raise AssertionError("unreachable")
        finally:
            if keep is not None:
                keep.used = True
            self._release(keep)

    def _check_status(self, resp: http.client.HTTPResponse, what: str, offset: int,
                      length: int) -> None:
        if resp.status == 206:
            return
        if resp.status == 200:
            raise self._error(
                what, offset, length,
                "the server answered 200 OK with the whole body instead of 206 Partial Content: "
                "it ignores Range requests (Accept-Ranges: "
                f"{resp.getheader('Accept-Ranges', 'absent')}), so pages cannot be fetched on "
                "demand; enable byte ranges on the server (nginx: remove 'max_ranges 0')")
        detail = f"HTTP {resp.status} {resp.reason}"
        if resp.status in (301, 302, 303, 307, 308):
            detail += f" to {resp.getheader('Location')!r} (redirects are not followed)"
        elif resp.status == 404:
            detail += " (no such file on the server)"
        elif resp.status == 416:
            detail += f" (range not satisfiable; Content-Range {resp.getheader('Content-Range')})"
        raise self._error(what, offset, length, detail)

    def _parse_range(self, resp: http.client.HTTPResponse, offset: int,
                     length: int) -> tuple[int, int, int]:
        value = resp.getheader("Content-Range")
        m = _CONTENT_RANGE.match(value or "")
        if not m or m.group(1) is None:
            raise self._error("GET", offset, length,
                              f"206 response with an unusable Content-Range {value!r}")
        if m.group(3) == "*":
            raise self._error("size probe GET", offset, length,
                              f"the server does not say the total size (Content-Range {value!r});"
                              " pass size=")
        return int(m.group(1)), int(m.group(2)), int(m.group(3))

    def _parse_total(self, resp: http.client.HTTPResponse, offset: int, length: int) -> int:
        value = resp.getheader("Content-Range") or ""
        m = _CONTENT_RANGE.match(value)
        if not m or m.group(3) == "*":
            raise self._error("size probe GET", offset, length,
                              f"HTTP 416 without a usable Content-Range ({value!r})")
        return int(m.group(3))

    def _read_group(self, offset: int, bufs: list[memoryview]) -> None:
        """One GET for ``[offset, offset + sum(len(bufs)))`` streamed into ``bufs`` in order."""
        total = sum(len(b) for b in bufs)
        if total == 0:
            return
        if offset < 0 or offset >= self._size:
            raise self._error("read", offset, total,
                              f"the range starts outside the source (size {self._size})")
        end = min(offset + total, self._size)  # bytes past the size are the final page's tail
        # Buffers (or their parts) past the end are zero-filled; the rest comes from the GET.
        targets: list[memoryview] = []
        pos = offset
        for b in bufs:
            n = max(0, min(len(b), end - pos))
            if n:
                targets.append(b[:n])
            if n < len(b):
                b[n:] = bytes(len(b) - n)
            pos += len(b)
        want = end - offset
        c: _Conn | None = None
        try:
            c = self._acquire()
        except TimeoutError as err:
            raise self._error("GET", offset, want, _cause(err)) from err
        keep: _Conn | None = None
        try:
            for attempt in (0, 1):
                try:
                    keep = self._get_into(c, offset, want, targets)
                    return
                except SourceError:
                    c.conn.close()
                    raise
                except (OSError, http.client.HTTPException) as err:
                    c.conn.close()
                    # A reused keep-alive connection may have been closed by the server while
                    # idle: reconnect once. A fresh connection failing is a real error.
                    if attempt == 0 and c.used and isinstance(err, _RETRYABLE):
                        c = self._new_conn()
                        continue
                    raise self._error("GET", offset, want, _cause(err)) from err
        finally:
            self._release(keep)

    def _get_into(self, c: _Conn, offset: int, want: int,
                  targets: list[memoryview]) -> _Conn | None:
        last = offset + want - 1
        resp = self._request(c, offset, last)
        try:
            self._check_status(resp, "GET", offset, want)
            first, got_last, total = self._parse_range(resp, offset, want)
            if (first, got_last) != (offset, last):
                raise self._error("GET", offset, want,
                                  f"the server sent bytes {first}-{got_last}, not {offset}-{last}")
            if total != self._size:
                raise self._error("GET", offset, want,
                                  f"the file changed size on the server ({self._size} -> {total})")
            clen = resp.getheader("Content-Length")
            if clen is not None and int(clen) != want:
                raise self._error("GET", offset, want,
                                  f"Content-Length {clen} does not match the range")
            done = 0
            for t in targets:
                got = 0
                while got < len(t):
                    n = resp.readinto(t[got:])
                    if not n:
                        raise http.client.IncompleteRead(b"", want - done - got)
                    got += n
                done += got
            reusable = not resp.will_close
        finally:
            resp.close()
        if reusable:
            c.used = True
            return c
        c.conn.close()
        return None


def _bytes_view(buf: memoryview) -> memoryview:
    mv = memoryview(buf)
    if mv.readonly:
        raise TypeError("read_into needs a writable buffer")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def _cause(err: BaseException) -> str:
    if isinstance(err, http.client.IncompleteRead):
        return (f"the connection closed before the whole body arrived ({err.expected} bytes "
                "missing)")
    if isinstance(err, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(err, TimeoutError):
        return f"timed out ({err})" if str(err) else "timed out"
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {err.verify_message}"
    return f"{type(err).__name__}: {err}"
