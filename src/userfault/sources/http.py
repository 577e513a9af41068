"""Pages over HTTP(S) with byte ranges, standard library only.

:class:`HTTPSource` serves a remote file with ``Range`` GETs over a small pool of HTTP/1.1
keep-alive connections (one connection per thread at a time). It learns the size with a
``Range: bytes=0-0`` GET (the ``Content-Range`` total), which also proves that the server honours
ranges: a server that answers ``200`` with the full body (nginx ``max_ranges 0``, many CDNs for
small objects, some proxies) is refused with a clear :class:`~userfault.errors.SourceError`
instead of serving wrong bytes. Every ``206`` is checked: its ``Content-Range`` and length must be
exactly the range asked for.

The source pins the version of the object it started with. The first response's validator
(its strong ``ETag``, else its ``Last-Modified``) is recorded, and every later range request
carries it as a precondition (``If-Match``, or ``If-Unmodified-Since`` for a date); the validator
of each ``206`` is compared as well, for servers that ignore preconditions. A replaced object
(``412 Precondition Failed``, or another validator) is a ``SourceError`` naming the URL and both
validators: a pager then poisons those pages (SIGBUS), and never mixes pages of two versions.
A server that sends neither validator (or only a weak ETag) cannot be pinned: then only a
change of size is noticed (:attr:`HTTPSource.validator` is ``None``). nginx derives its ETag
from the file's modification time (seconds) and size, so a same-size replacement within the
same second of the old file's mtime goes unseen there.

The client is a lean HTTP/1.1 speaker of its own, because a page fault waits on it: one socket
per connection (``TCP_NODELAY``; TLS through an ``ssl``-wrapped socket), a request preformatted
up to the range numbers, the status line and headers parsed with bytes operations, and the body
received straight into the caller's buffer (``recv_into``). It accepts what a range server
sends: ``206`` bodies delimited by ``Content-Length``, identity-coded; chunked, compressed or
close-delimited bodies are refused clearly. ``Connection: close`` (or an HTTP/1.0 reply without
keep-alive) is honoured: the body is read, the connection dropped.

``read_into`` reads the body straight into the caller's buffer. ``read_many`` merges adjacent
requests into one GET (the body streams into the successive buffers), asks for small scattered
ones together in multi-range GETs (``Range: bytes=a-b,c-d,...``, answered ``multipart/
byteranges``: one round trip for up to 64 of them), and runs the GETs in parallel, one per
pooled connection. A server that answers a multi-range GET otherwise (``200`` with the whole
body, as nginx does past ``max_ranges``; one coalesced range; no ``Content-Length``) gets one
GET per range from then on; a multipart body that lies (a part missing, short, of another file
size) is a ``SourceError`` like any other lie.

A pooled connection that the server closed while it was idle (keep-alive timeout, restart) is
retried once on a fresh connection; any other failure raises ``SourceError`` naming the URL, the
range and the cause. The source is picklable (only its constructor arguments are kept) and
fork-safe: connections and threads are created lazily in the process that uses them.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from userfault.errors import SourceError

__all__ = ["HTTPSource"]

_CONTENT_RANGE = re.compile(rb"^\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*/\s*(\d+|\*)\s*$", re.IGNORECASE)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an HTTP header name
_MIN_MERGE = 1 << 20  # merged GETs are capped at max(1 MiB, batch / connections)
_MULTI_PART_MAX = 256 << 10  # ranges this small (after merging) share multi-range GETs,
_MULTI_PARTS = 64  # up to this many in one
_BOUNDARY = re.compile(rb'^\s*multipart/byteranges\s*;.*?\bboundary\s*=\s*"?([^";\s]+)"?',
                       re.IGNORECASE)
_HEAD_BUF = 16 << 10  # per-connection buffer for the status line and headers (and body start)
# A server trickling bytes slower than this (after the timeout's grace) fails the request: the
# socket timeout alone bounds only the wait for each byte, not for the whole response.
_MIN_RATE = 16 << 10
_REASONS = {200: "OK", 206: "Partial Content", 301: "Moved Permanently", 302: "Found",
            303: "See Other", 307: "Temporary Redirect", 308: "Permanent Redirect",
            404: "Not Found", 416: "Range Not Satisfiable"}


class _Changed(Exception):
    """The server no longer has the version of the object this source pinned."""

    def __init__(self, now: tuple[str, str] | None, size: int | None) -> None:
        super().__init__("the object changed")
        self.now = now  # the new validator, when the response said it
        self.size = size


class _Unranged(Exception):
    """The server did not answer a multi-range GET with the parts asked for (it may still
    serve one range per GET)."""


class _Closed(ConnectionError):
    """The server closed the connection before sending a byte of the answer."""


class _Incomplete(ConnectionError):
    """The connection closed in the middle of a response."""

    def __init__(self, missing: int, where: str = "body") -> None:
        super().__init__(f"{missing} bytes of the {where} missing")
        self.missing = missing
        self.where = where


# A reused keep-alive connection failing like this was most likely closed by the server while
# idle (keep-alive timeout, restart): reconnect once.
_RETRYABLE = (_Closed, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class _Conn:
    """A pooled HTTP/1.1 connection: its socket (``None`` until connected), a buffer for the
    response head, and whether it has served a request (then it may be stale)."""

    __slots__ = ("head", "head_view", "sock", "used")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.used = False
        self.head = bytearray(_HEAD_BUF)
        self.head_view = memoryview(self.head)

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None


class _Response:
    """Status and headers of one response, and the body bytes that arrived with them."""

    __slots__ = ("extra", "headers", "keep_alive", "reason", "status")

    def __init__(self, status: int, reason: str, headers: dict[bytes, bytes], keep_alive: bool,
                 extra: memoryview) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.keep_alive = keep_alive
        self.extra = extra

    def header(self, name: bytes, default: str | None = None) -> str | None:
        value = self.headers.get(name)
        return default if value is None else value.decode("latin-1")


class HTTPSource:
    """A remote file served by an HTTP/1.1 server that supports byte ranges.

    Args:
        url: ``http://`` or ``https://`` URL of the file.
        size: the size in bytes; when ``None`` it is learned (and range support is checked)
            with one ``Range: bytes=0-0`` GET at construction.
        headers: extra request headers (``Authorization``, ...). ``Range`` and ``Host`` are set
            by the source.
        timeout: socket timeout in seconds for connect and each read. A response head must
            also be complete within it, and a body must arrive at 16 KiB/s or more after that
            grace: a server trickling bytes cannot hold a request forever.
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
        for k, v in self._headers.items():
            if not _TOKEN.fullmatch(k) or any(ch in v for ch in "\r\n\0"):
                raise ValueError(f"invalid HTTP header {k!r}: {v!r}")
        self._timeout = float(timeout)
        self._connections = int(connections)
        self._verify = verify
        self._validator: tuple[str, str] | None = None
        self._setup()
        if size is None:
            size, self._validator = self._probe()
        self._size = size

    # -- pickling: constructor arguments (and the learned size) only ------------------------

    def __getstate__(self) -> dict[str, Any]:
        # The pinned validator travels: a pager process serves the version this one opened.
        return {"url": self._url, "size": self._size, "headers": self._headers,
                "timeout": self._timeout, "connections": self._connections,
                "verify": self._verify, "validator": self._validator}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._url = state["url"]
        self._args_size = state["size"]
        self._size = state["size"]
        self._headers = state["headers"]
        self._timeout = state["timeout"]
        self._connections = state["connections"]
        self._verify = state["verify"]
        self._validator = state["validator"]
        self._setup()

    def _setup(self) -> None:
        parts = urllib.parse.urlsplit(self._url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in self._target):
            raise ValueError(f"HTTPSource URL {self._url!r}: the path has spaces or control "
                             "characters (percent-encode them)")
        netloc = self._host if ":" not in self._host else f"[{self._host}]"
        self._desc = f"{parts.scheme}://{netloc}:{self._port}{parts.path}"  # no credentials
        # The request, preformatted up to the ranges: b"0-4095\r\n\r\n" completes it.
        host = netloc if self._port == (443 if self._https else 80) else f"{netloc}:{self._port}"
        lines = [f"GET {self._target} HTTP/1.1", f"Host: {host}"]
        if not any(k.lower() == "accept-encoding" for k in self._headers):
            lines.append("Accept-Encoding: identity")
        lines += [f"{k}: {v}" for k, v in self._headers.items()]
        lines.append("Range: bytes=")
        self._request_head = "\r\n".join(lines).encode("latin-1")
        self._reset_process_state()

    def _precondition(self) -> bytes:
        """The request header line that pins the version, once a validator is known."""
        v = self._validator
        if v is None:
            return b""
        name = "If-Match" if v[0] == "ETag" else "If-Unmodified-Since"
        return f"{name}: {v[1]}\r\n".encode("latin-1")

    def _reset_process_state(self) -> None:
        """Fresh pool, locks and threads for this process (at setup, and after a fork)."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self._idle: list[_Conn] = []
        self._busy = 0  # connections handed out (at most self._connections)
        self._executor: ThreadPoolExecutor | None = None
        self._ssl: ssl.SSLContext | None = None
        self._multirange = True  # until the server answers a multi-range GET otherwise
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

    @property
    def validator(self) -> tuple[str, str] | None:
        """The pinned version: ``("ETag", '"..."')`` or ``("Last-Modified", date)``, or
        ``None`` while none is known (the server sent no usable validator yet)."""
        return self._validator

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
        futures: list[Future[None]] = [
            executor.submit(self._read_group, *gets[0]) if len(gets) == 1
            else executor.submit(self._read_ranges, gets) for gets in self._plan(groups)]
        first: BaseException | None = None
        for fut in futures:
            err = fut.exception()
            if err is not None and first is None:
                first = err
        if first is not None:
            raise first

    def _plan(self, groups: list[tuple[int, list[memoryview]]]
              ) -> list[list[tuple[int, list[memoryview]]]]:
        """The GETs for ``groups``: a large one alone, small ones (inside the file) several
        to a multi-range GET, spread over the connections."""
        if not self._multirange:
            return [[g] for g in groups]
        alone: list[list[tuple[int, list[memoryview]]]] = []
        small: list[tuple[int, list[memoryview]]] = []
        for g in groups:
            n = sum(len(b) for b in g[1])
            if n <= _MULTI_PART_MAX and g[0] + n <= self._size:
                small.append(g)
            else:
                alone.append([g])
        per = min(_MULTI_PARTS, max(8, -(-len(small) // self._connections)))
        return alone + [small[i:i + per] for i in range(0, len(small), per)]

    def close(self) -> None:
        """Close pooled connections and stop the worker threads (the source stays usable)."""
        if self._pid != os.getpid():
            self._reset_process_state()
            return
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    def __enter__(self) -> HTTPSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _error(self, what: str, offset: int, length: int, cause: str) -> SourceError:
        return SourceError.for_range("HTTPSource", self._desc, what, offset, length, cause)

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
        return _Conn()  # connected by _exchange, inside its error handling

    def _connect(self, c: _Conn) -> socket.socket:
        raw = socket.create_connection((self._host, self._port), timeout=self._timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = raw
            if self._https:
                sock = self._ssl_context().wrap_socket(raw, server_hostname=self._host)
        except BaseException:
            raw.close()
            raise
        c.sock = sock
        with self._lock:
            self.connections_opened += 1  # a statistic: TCP connections this process opened
        return sock

    def _acquire(self) -> _Conn:
        with self._freed:
            if self._busy >= self._connections and not self._freed.wait_for(
                    lambda: self._busy < self._connections, max(self._timeout, 1.0) * 4):
                raise TimeoutError("no pooled connection became free")
            self._busy += 1
            if self._idle:
                return self._idle.pop()  # the most recently used: the least likely stale
        return self._new_conn()

    def _release(self, c: _Conn | None) -> None:
        with self._freed:
            if c is not None:
                self._idle.append(c)
            self._busy -= 1
            self._freed.notify()

    def _exchange(self, c: _Conn, ranges: bytes, condition: bytes = b"") -> _Response:
        """Send ``GET`` for the byte ``ranges`` (``b"0-4095"``, or several joined by commas;
        with the ``condition`` header line) and read the status line and headers.

        The response's body bytes that arrived with the head are in ``extra``.
        """
        sock = c.sock or self._connect(c)
        sock.sendall(b"%s%s\r\n%s\r\n" % (self._request_head, ranges, condition))
        head, view = c.head, c.head_view
        got = 0
        deadline = time.monotonic() + self._timeout
        while True:
            n = sock.recv_into(view[got:])
            if not n:
                if got == 0:
                    raise _Closed("the server closed the connection without answering")
                raise _Incomplete(0, "response head")
            got += n
            end = head.find(b"\r\n\r\n", max(0, got - n - 3), got)
            if end >= 0:
                break
            if got == len(head):
                raise _ProtocolError(f"a response head larger than {len(head)} bytes")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server sent its response head too slowly ({got} bytes "
                                   f"in {self._timeout:g} s)")
        eol = head.find(b"\r\n", 0, end + 2)
        status_line = bytes(view[:eol])
        version, _, rest = status_line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
            raise _ProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        headers: dict[bytes, bytes] = {}
        for line in bytes(view[eol + 2:end]).split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if not colon:
                raise _ProtocolError(f"a malformed header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get(b"connection", b"").lower()
        keep_alive = (b"close" not in connection if version == b"HTTP/1.1"
                      else b"keep-alive" in connection)
        return _Response(int(code), reason.decode("latin-1"), headers, keep_alive,
                         view[end + 4:got])

    def _probe(self) -> tuple[int, tuple[str, str] | None]:
        """Learn the size (from ``Content-Range``) and the validator of the object as it is
        now, with an unconditional ``Range: bytes=0-0`` GET."""
        c = self._acquire()
        keep: _Conn | None = None
        try:
            for attempt in (0, 1):
                try:
                    resp = self._exchange(c, b"0-0")
                    if resp.status == 416:  # empty file: "bytes */0"
                        total = self._parse_total(resp, 0, 1)
                        c.close()  # its body (if any) is not worth reading
                        return total, _validator(resp)
                    self._check_status(resp, "size probe GET", 0, 1)
                    first, last, total = self._parse_range(resp, 0, 1, "size probe GET")
                    if (first, last) != (0, 0):
                        raise self._error("size probe GET", 0, 1,
                                          f"Content-Range {first}-{last} is not 0-0")
                    self._check_body(resp, "size probe GET", 0, 1)
                    self._read_body(c, resp, [memoryview(bytearray(1))], 1)
                    keep = _kept(c, resp)
                    return total, _validator(resp)
                except SourceError:
                    c.close()
                    raise
                except _ProtocolError as err:
                    c.close()
                    raise self._error("size probe GET", 0, 1, str(err)) from err
                except OSError as err:
                    c.close()
                    if attempt == 0 and c.used and isinstance(err, _RETRYABLE):
                        c = self._new_conn()
                        continue
                    raise self._error("size probe GET", 0, 1, _cause(err)) from err
            raise AssertionError("unreachable")
        finally:
            self._release(keep)

    def _check_status(self, resp: _Response, what: str, offset: int, length: int) -> None:
        if resp.status == 206:
            return
        if resp.status == 200:
            raise self._error(
                what, offset, length,
                "the server answered 200 OK with the whole body instead of 206 Partial Content: "
                "it ignores Range requests (Accept-Ranges: "
                f"{resp.header(b'accept-ranges', 'absent')}), so pages cannot be fetched on "
                "demand; enable byte ranges on the server (nginx: remove 'max_ranges 0')")
        detail = f"HTTP {resp.status} {resp.reason or _REASONS.get(resp.status, '')}".rstrip()
        if resp.status in (301, 302, 303, 307, 308):
            detail += f" to {resp.header(b'location')!r} (redirects are not followed)"
        elif resp.status == 404:
            detail += " (no such file on the server)"
        elif resp.status == 416:
            detail += (f" (range not satisfiable; Content-Range "
                       f"{resp.header(b'content-range')})")
        raise self._error(what, offset, length, detail)

    def _check_body(self, resp: _Response, what: str, offset: int, want: int) -> None:
        """The body must be exactly ``want`` identity-coded bytes delimited by Content-Length:
        chunked or close-delimited bodies, and compressed ones, are refused."""
        h = resp.headers
        te = h.get(b"transfer-encoding")
        if te is not None and te.lower() != b"identity":
            raise self._error(what, offset, want,
                              f"the 206 body is sent with Transfer-Encoding: {te.decode('latin-1')}"
                              "; only bodies with a Content-Length are supported")
        ce = h.get(b"content-encoding")
        if ce is not None and ce.lower() != b"identity":
            raise self._error(what, offset, want,
                              f"the 206 body is encoded ({ce.decode('latin-1')}); the source "
                              "asks for identity and cannot use encoded bytes")
        clen = h.get(b"content-length")
        if clen is None:
            raise self._error(what, offset, want,
                              "the 206 response has no Content-Length (a body delimited by "
                              "closing the connection is not supported)")
        if not clen.isdigit() or int(clen) != want:
            raise self._error(what, offset, want,
                              f"Content-Length {clen.decode('latin-1')} does not match the range")

    def _parse_range(self, resp: _Response, offset: int, length: int,
                     what: str = "GET") -> tuple[int, int, int]:
        value = resp.headers.get(b"content-range", b"")
        m = _CONTENT_RANGE.match(value)
        if not m or m.group(1) is None:
            raise self._error(what, offset, length,
                              f"206 response with an unusable Content-Range "
                              f"{resp.header(b'content-range')!r}")
        if m.group(3) == b"*":
            raise self._error(what, offset, length,
                              "the server does not say the total size (Content-Range "
                              f"{resp.header(b'content-range')!r}); pass size=")
        return int(m.group(1)), int(m.group(2)), int(m.group(3))

    def _parse_total(self, resp: _Response, offset: int, length: int) -> int:
        m = _CONTENT_RANGE.match(resp.headers.get(b"content-range", b""))
        if not m or m.group(3) == b"*":
            raise self._error("size probe GET", offset, length,
                              "HTTP 416 without a usable Content-Range "
                              f"({resp.header(b'content-range', '')!r})")
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
        if end - offset == total:
            targets = bufs
        else:  # buffers (or their parts) past the end are zero-filled; the rest is fetched
            targets = []
            pos = offset
            for b in bufs:
                n = max(0, min(len(b), end - pos))
                if n:
                    targets.append(b[:n])
                if n < len(b):
                    b[n:] = bytes(len(b) - n)
                pos += len(b)
        want = end - offset
        self._attempt(offset, want, lambda c: self._get_into(c, offset, want, targets))

    def _read_ranges(self, groups: list[tuple[int, list[memoryview]]]) -> None:
        """One multi-range GET for ``groups`` (each inside the file), every part copied into
        its group's buffers; one GET per group instead if the server does not answer with
        those parts."""
        spans = [(off, sum(len(b) for b in bufs)) for off, bufs in groups]
        first = spans[0][0]
        want = spans[-1][0] + spans[-1][1] - first  # the extent, for error messages
        try:
            self._attempt(first, want, lambda c: self._get_ranges(c, groups, spans, first, want))
        except _Unranged:
            self._multirange = False  # this server: one range per GET from now on
            for off, bufs in groups:
                self._read_group(off, bufs)

    def _attempt(self, offset: int, want: int, get: Callable[[_Conn], _Conn | None]) -> None:
        """``get`` on a pooled connection (it returns the connection to keep, or ``None``);
        once more on a fresh connection if a reused one was closed by the server while idle.
        Failures are ``SourceError``s naming ``[offset, offset + want)``."""
        try:
            c = self._acquire()
        except TimeoutError as err:
            raise self._error("GET", offset, want, _cause(err)) from err
        keep: _Conn | None = None
        changed: _Changed | None = None
        try:
            for attempt in (0, 1):
                try:
                    keep = get(c)
                    return
                except _Changed as err:
                    c.close()
                    changed = err
                    break
                except (SourceError, _Unranged):
                    c.close()  # (an unread body, maybe the whole file)
                    raise
                except _ProtocolError as err:
                    c.close()
                    raise self._error("GET", offset, want, str(err)) from err
                except OSError as err:
                    c.close()
                    # A reused keep-alive connection may have been closed by the server while
                    # idle: reconnect once. A fresh connection failing is a real error.
                    if attempt == 0 and c.used and isinstance(err, _RETRYABLE):
                        c = self._new_conn()
                        continue
                    raise self._error("GET", offset, want, _cause(err)) from err
        finally:
            self._release(keep)
        assert changed is not None
        raise self._error("GET", offset, want, self._changed_cause(changed))

    def _changed_cause(self, changed: _Changed) -> str:
        """The sentence for a replaced object, naming both validators (a 412 does not say
        the new one: it is asked for, once, on a connection of its own)."""
        now, size = changed.now, changed.size
        if now is None or size is None:
            try:
                size, now = self._probe()
            except SourceError:
                pass
        old = self._validator
        assert old is not None
        if now == old:
            return (f"the server refused the pinned version ({old[0]} {old[1]}) with 412 "
                    "Precondition Failed, yet still reports that version: it does not serve "
                    "it consistently, so these pages are not served")
        was = f"{old[0]} {old[1]} when this source opened it"
        if now is None:
            is_now = "no usable validator now"
        elif now[0] == old[0]:
            is_now = f"{now[1]} now"
        else:
            is_now = f"{now[0]} {now[1]} now"
        sizes = f"; size {self._size} then, {size} now" if size not in (None, self._size) else ""
        return (f"the object changed on the server ({was}, {is_now}{sizes}): pages of two "
                "versions must never be mixed, so these are not served; open the URL again "
                "to page the new version")

    def _check_version(self, resp: _Response) -> None:
        """Pin the validator of the first response; any later one must be the same."""
        got = _validator(resp)
        if self._validator is None:
            if got is not None:
                with self._lock:
                    if self._validator is None:
                        self._validator = got
                        return
            else:
                return
        pinned = self._validator
        assert pinned is not None
        value = resp.header(b"etag" if pinned[0] == "ETag" else b"last-modified")
        if value is not None and value != pinned[1]:
            raise _Changed(got, self._size)  # (its Content-Range total was checked already)

    def _check_total(self, total: int, now: tuple[str, str] | None, offset: int,
                     want: int) -> None:
        """A response's total size must be the pinned one: else the object was replaced
        (``now`` is the response's validator, if it says one)."""
        if total != self._size:
            if self._validator is not None:
                raise _Changed(now, total)
            raise self._error("GET", offset, want,
                              f"the file changed size on the server ({self._size} -> {total})")

    def _get_into(self, c: _Conn, offset: int, want: int,
                  targets: list[memoryview]) -> _Conn | None:
        last = offset + want - 1
        resp = self._exchange(c, b"%d-%d" % (offset, last), self._precondition())
        if resp.status == 412 and self._validator is not None:
            raise _Changed(None, None)  # If-Match / If-Unmodified-Since failed: replaced
        if resp.status != 206:
            self._check_status(resp, "GET", offset, want)
        value = resp.headers.get(b"content-range")
        if value != b"bytes %d-%d/%d" % (offset, last, self._size):  # else: say what is wrong
            first, got_last, total = self._parse_range(resp, offset, want)
            if (first, got_last) != (offset, last):
                raise self._error("GET", offset, want,
                                  f"the server sent bytes {first}-{got_last}, not {offset}-{last}")
            self._check_total(total, _validator(resp), offset, want)
        self._check_version(resp)
        h = resp.headers
        if (h.get(b"content-length") != b"%d" % want or b"transfer-encoding" in h
                or b"content-encoding" in h):
            self._check_body(resp, "GET", offset, want)
        self._read_body(c, resp, targets, want)
        return _kept(c, resp)

    def _get_ranges(self, c: _Conn, groups: list[tuple[int, list[memoryview]]],
                    spans: list[tuple[int, int]], offset: int, want: int) -> _Conn | None:
        resp = self._exchange(c, b",".join(b"%d-%d" % (o, o + n - 1) for o, n in spans),
                              self._precondition())
        if resp.status == 412 and self._validator is not None:
            raise _Changed(None, None)
        if resp.status == 200:
            raise _Unranged("200 with the whole body")
        if resp.status != 206:
            self._check_status(resp, "GET", offset, want)
        h = resp.headers
        m = _BOUNDARY.match(h.get(b"content-type", b""))
        clen = h.get(b"content-length", b"")
        # the parts' own heads: a boundary line, Content-Type and Content-Range, ~150 bytes
        room = sum(n for _, n in spans) + len(spans) * 512 + 1024
        if (not m or not clen.isdigit() or int(clen) > room or b"transfer-encoding" in h
                or b"content-encoding" in h):
            raise _Unranged("not a multipart/byteranges body of the parts asked for")
        self._check_version(resp)
        body = bytearray(int(clen))
        self._read_body(c, resp, [memoryview(body)], len(body))
        parts = self._parts(body, m.group(1), offset, want)
        where = []  # every group's part is found before any byte is copied
        for off, n in spans:
            at = next((start + off - a for a, start, length in parts
                       if a <= off and off + n <= a + length), None)
            if at is None:
                raise _ProtocolError(f"the multipart answer has no part for bytes "
                                     f"{off}-{off + n - 1}")
            where.append(at)
        for at, (_, bufs) in zip(where, groups, strict=True):
            for b in bufs:
                b[:] = body[at:at + len(b)]
                at += len(b)
        return _kept(c, resp)

    def _parts(self, body: bytearray, boundary: bytes, offset: int,
               want: int) -> list[tuple[int, int, int]]:
        """The parts of a ``multipart/byteranges`` body: (first byte, where its bytes start in
        ``body``, length) each."""
        delim = b"--" + boundary
        parts: list[tuple[int, int, int]] = []
        pos = body.find(delim)
        while True:
            if pos < 0:
                raise _ProtocolError("a multipart answer without its closing boundary")
            pos += len(delim)
            if body[pos:pos + 2] == b"--":
                return parts
            end = body.find(b"\r\n\r\n", pos)
            if end < 0:
                raise _ProtocolError("a multipart part without the end of its headers")
            value = b""
            for line in bytes(body[pos:end]).split(b"\r\n"):
                name, _, v = line.partition(b":")
                if name.strip().lower() == b"content-range":
                    value = v
            m = _CONTENT_RANGE.match(value)
            if not m or m.group(1) is None or m.group(3) == b"*":
                raise _ProtocolError(f"a multipart part with an unusable Content-Range "
                                     f"{value.decode('latin-1').strip()!r}")
            first, last, total = (int(g) for g in m.groups())
            self._check_total(total, None, offset, want)
            start = end + 4
            pos = start + last - first + 1  # where the part's bytes end: CRLF, the boundary
            if last < first or body[pos:pos + 2 + len(delim)] != b"\r\n" + delim:
                raise _ProtocolError(f"a multipart part of another length than its "
                                     f"Content-Range bytes {first}-{last}")
            parts.append((first, start, last - first + 1))
            pos += 2

    def _read_body(self, c: _Conn, resp: _Response, targets: list[memoryview], want: int) -> None:
        """Receive the ``want`` body bytes into ``targets``, in order (straight into them, after
        the body bytes that came with the head), at no less than ``_MIN_RATE`` on average
        after a grace of one timeout."""
        started = time.monotonic()
        allowed = self._timeout + want / _MIN_RATE
        extra = resp.extra
        if len(extra) > want:
            raise _ProtocolError(f"the server sent {len(extra) - want} bytes past the body")
        sock = c.sock
        assert sock is not None
        pos = 0  # in extra
        done = 0
        for t in targets:
            got = 0
            size = len(t)
            if pos < len(extra):
                got = min(size, len(extra) - pos)
                t[:got] = extra[pos:pos + got]
                pos += got
            while got < size:
                n = sock.recv_into(t[got:])
                if not n:
                    raise _Incomplete(want - done - got)
                got += n
                if got < size and time.monotonic() - started > allowed:
                    raise TimeoutError(
                        f"the server sent the body too slowly: {done + got} of {want} bytes in "
                        f"{allowed:.1f} s (below {_MIN_RATE >> 10} KiB/s)")
            done += size


class _ProtocolError(Exception):
    """The server's response is not HTTP/1.1 as this client speaks it."""


def _kept(c: _Conn, resp: _Response) -> _Conn | None:
    """After a whole response: the connection to pool again, or ``None`` (closed) if the
    server ends it."""
    if resp.keep_alive:
        c.used = True
        return c
    c.close()
    return None


def _validator(resp: _Response) -> tuple[str, str] | None:
    """What identifies this version of the object: its strong ETag, else its Last-Modified
    (a weak ETag, ``W/"..."``, cannot be used with If-Match)."""
    etag = resp.header(b"etag")
    if etag and not etag.startswith("W/"):
        return ("ETag", etag)
    modified = resp.header(b"last-modified")
    return ("Last-Modified", modified) if modified else None


def _bytes_view(buf: memoryview) -> memoryview:
    mv = memoryview(buf)
    if mv.readonly:
        raise TypeError("read_into needs a writable buffer")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def _cause(err: BaseException) -> str:
    if isinstance(err, _Incomplete):
        if err.where == "body":
            return (f"the connection closed before the whole body arrived ({err.missing} bytes "
                    "missing)")
        return "the connection closed in the middle of the response head"
    if isinstance(err, _Closed):
        return "the server closed the connection without answering"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(err, TimeoutError):
        return f"timed out ({err})" if str(err) else "timed out"
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {err.verify_message}"
    return f"{type(err).__name__}: {err}"
