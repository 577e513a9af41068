"""`PageServerSource`: an export of a userfault page server, as a page source.

It works wherever a source does: ``userfault.map(PageServerSource(url, secret_file=...))``,
``userfault.map("uf://host:port/name?secret_file=...")``, a Firecracker pager's memory file,
or any code calling ``read_into``.

Two lanes of connections, like QEMU's postcopy preempt channel: small reads (at most
``urgent_max`` bytes: page faults) go on *urgent* connections with the ``URGENT`` flag, larger
ones (readahead, populate, prefetch) on *bulk* connections. A fault therefore never waits behind
megabytes of readahead queued in the same TCP stream, and on a shared connection the server
would still send it between two pieces. Each lane holds up to ``connections`` connections, one
caller per connection at a time; ``read_many`` pipelines its requests on one connection.

Failures: a socket error or a timeout closes that connection and the request is sent again on a
new one, reconnecting with exponential backoff (50 ms doubling to 1 s) for at most
``reconnect_timeout`` seconds; reads are idempotent, so a request caught by a dropped link is
simply asked again. Once that budget is spent the source raises :class:`SourceError` and is
marked down: later calls try once, without waiting, until a connection succeeds again (so a
pager's own retries do not multiply the outage). A refusal by the server (unknown export, out of
range, an I/O error on its side), an authentication failure or a protocol violation is never
retried here. A read either fills the whole buffer or raises: never short, stale or zero bytes
in place of data.

Picklable and fork-safe: the pickle holds the URL, the secret and the options (and the size
learned at construction); connections are opened lazily in the process that reads, and a
forked child never touches its parent's sockets.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

from ..errors import SourceError
from .address import ExportURL, parse_url
from .auth import check_secret, load_secret
from .client import Connection, OpenedExport
from .errors import AuthenticationError, RemoteError
from .protocol import MAX_READ, ErrorCode, ExportInfo, ProtocolError

__all__ = ["ENV_SECRET_FILE", "ENV_TLS_CA", "PageServerSource", "list_exports"]

log = logging.getLogger("userfault.remote.client")

#: Environment variable naming the secret file when neither the call nor the URL does.
ENV_SECRET_FILE = "USERFAULT_SECRET_FILE"
#: Environment variable naming the CA bundle for ``ufs://`` when neither the call nor the URL does.
ENV_TLS_CA = "USERFAULT_TLS_CA"

T = TypeVar("T")

_RETRIABLE_CODES = (ErrorCode.BUSY, ErrorCode.SHUTTING_DOWN, ErrorCode.TIMEOUT)
_FIRST_DELAY, _MAX_DELAY = 0.05, 1.0


class _Entry(NamedTuple):
    conn: Connection
    handle: int


class _Lane:
    """Connections of one lane: idle ones, and how many are in use."""

    __slots__ = ("busy", "idle", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.idle: list[_Entry] = []
        self.busy = 0


def _retriable(err: BaseException) -> bool:
    if isinstance(err, RemoteError):
        return not isinstance(err, AuthenticationError) and err.code in _RETRIABLE_CODES
    if isinstance(err, (SourceError, ProtocolError, ssl.SSLCertVerificationError)):
        return False
    return isinstance(err, OSError)


def _cause(err: BaseException) -> str:
    if isinstance(err, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(err, TimeoutError):
        return "timed out" if str(err) in ("", "timed out") else str(err)
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {err.verify_message}"
    if isinstance(err, FileNotFoundError) and err.filename is None:
        return f"no such socket ({err})"
    text = str(err)
    return text if isinstance(err, SourceError) else f"{type(err).__name__}: {text}"


def _resolve_secret(url: ExportURL, secret: bytes | None,
                    secret_file: str | os.PathLike[str] | None) -> bytes:
    if secret is not None:
        return check_secret(secret)
    path = secret_file or url.secret_file or os.environ.get(ENV_SECRET_FILE)
    if not path:
        raise ValueError(f"{url}: no secret; pass secret_file=..., add ?secret_file=PATH to the "
                         f"URL, or set {ENV_SECRET_FILE}")
    return load_secret(path)


class PageServerSource:
    """The export a ``uf://``, ``ufs://`` or ``uf+unix://`` URL names (see the module docstring
    and :mod:`userfault.remote.address`).

    Args:
        url: the export's URL.
        secret: the shared secret; or
        secret_file: a file holding it (default: the URL's ``secret_file``, else
            ``$USERFAULT_SECRET_FILE``).
        tls_ca: for ``ufs://``, a PEM bundle of the CAs to trust (default: the URL's
            ``tls_ca``, else ``$USERFAULT_TLS_CA``, else the system's CAs).
        timeout: seconds a connect or any single socket operation may take.
        connections: connections per lane (urgent and bulk).
        reconnect_timeout: seconds to keep reconnecting after a connection fails.
        urgent_max: reads of at most this many bytes use the urgent lane.

    Connects once at construction, to authenticate and learn the export's size: a wrong
    secret, an unknown export or an unreachable server fails here, with a clear message.

    Raises:
        AuthenticationError: the secret does not match, or the server could not prove it has it.
        SourceError: the server is unreachable, refused, or has no such export.
        ValueError: the URL or the secret is malformed.
    """

    def __init__(self, url: str, *, secret: bytes | None = None,
                 secret_file: str | os.PathLike[str] | None = None,
                 tls_ca: str | os.PathLike[str] | None = None, timeout: float = 10.0,
                 connections: int = 4, reconnect_timeout: float = 10.0,
                 urgent_max: int = 32 << 10) -> None:
        parsed = parse_url(url)
        if connections < 1:
            raise ValueError(f"connections must be at least 1, not {connections}")
        if timeout <= 0 or reconnect_timeout < 0:
            raise ValueError("timeout must be positive and reconnect_timeout >= 0")
        if tls_ca is not None and not parsed.tls:
            raise ValueError(f"{parsed}: tls_ca is for TLS; use a ufs:// URL")
        self._url = url
        self._secret = _resolve_secret(parsed, secret, secret_file)
        ca = tls_ca or parsed.tls_ca or (os.environ.get(ENV_TLS_CA) if parsed.tls else None)
        self._tls_ca = os.fspath(ca) if ca else None
        self._timeout = float(timeout)
        self._connections = int(connections)
        self._reconnect_timeout = float(reconnect_timeout)
        self._urgent_max = int(urgent_max)
        self._size = -1
        self._writable = False
        self._setup()
        try:
            entry, opened = self._connect()
        except (OSError, ProtocolError) as err:
            raise self._failure("connecting", 0, 0, err) from err
        self._size = opened.size
        self._writable = opened.writable
        with self._cond:
            self._urgent.idle.append(entry)  # kept for reads in this process

    # -- per-process state ---------------------------------------------------------------------

    def _setup(self) -> None:
        self._parsed = parse_url(self._url)
        self._desc = f"PageServerSource {self._parsed}"
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        """Fresh lanes, lock and TLS context for this process (at setup, and after a fork)."""
        self._pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._urgent = _Lane("urgent")
        self._bulk = _Lane("bulk")
        self._tls: ssl.SSLContext | None = None
        self._down = False
        self.connections_opened = 0

    def _check_pid(self) -> None:
        if self._pid != os.getpid():
            # Forked: the parent's sockets are not ours to use (or to close).
            self._reset_process_state()

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self._url, "secret": self._secret, "tls_ca": self._tls_ca,
                "timeout": self._timeout, "connections": self._connections,
                "reconnect_timeout": self._reconnect_timeout, "urgent_max": self._urgent_max,
                "size": self._size, "writable": self._writable}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._url = state["url"]
        self._secret = state["secret"]
        self._tls_ca = state["tls_ca"]
        self._timeout = state["timeout"]
        self._connections = state["connections"]
        self._reconnect_timeout = state["reconnect_timeout"]
        self._urgent_max = state["urgent_max"]
        self._size = state["size"]
        self._writable = state["writable"]
        self._setup()

    # -- public API ----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """The export's size in bytes."""
        return self._size

    @property
    def writable(self) -> bool:
        """Whether the export accepts :meth:`write_from`."""
        return self._writable

    @property
    def url(self) -> str:
        """The URL given (with its query, if any)."""
        return self._url

    def __repr__(self) -> str:
        return f"PageServerSource({str(self._parsed)!r}, size={self._size})"

    def read_into(self, offset: int, buf: memoryview, *, urgent: bool | None = None) -> None:
        """Fill all of ``buf`` with the bytes at ``offset`` (zeros past the end of the export).

        ``urgent`` picks the lane; by default reads of at most ``urgent_max`` bytes are urgent.
        """
        self.read_many([(offset, buf)], urgent=urgent)

    def read_many(self, requests: Sequence[tuple[int, memoryview]], *,
                  urgent: bool | None = None) -> None:
        """Fill every ``(offset, buf)``, pipelined on one connection: adjacent requests are
        merged (up to 16 MiB a request), all are in flight at once."""
        self._check_pid()
        groups, total = self._plan(requests)
        if not groups:
            return
        if urgent is None:
            urgent = total <= self._urgent_max
        lane = self._urgent if urgent else self._bulk

        def read(entry: _Entry) -> None:
            entry.conn.read(entry.handle, groups, urgent=urgent)

        self._run(lane, read, "read", groups[0][0], total)

    def write_from(self, offset: int, data: memoryview) -> None:
        """Store ``data`` at ``offset`` on the server (a writable export only)."""
        self._check_pid()
        view = memoryview(data).cast("B") if memoryview(data).format != "B" else memoryview(data)
        if not self._writable:
            raise SourceError(f"{self._desc}: the export is read-only (serve it with "
                              "--writable)", source=str(self._parsed), offset=offset,
                              length=len(view))
        if offset < 0 or offset + len(view) > self._size:
            raise ValueError(f"{self._desc}: writing [{offset}, {offset + len(view)}) is "
                             f"outside the {self._size}-byte export")
        if not len(view):
            return
        self._run(self._bulk, lambda e: e.conn.write(e.handle, offset, view), "write", offset,
                  len(view))

    def ping(self) -> float:
        """Seconds one round trip to the server takes (on the urgent lane)."""
        self._check_pid()
        t0 = time.perf_counter()
        self._run(self._urgent, lambda e: e.conn.ping(), "ping", 0, 0)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Close the idle connections of this process (the source stays usable)."""
        if self._pid != os.getpid():
            self._reset_process_state()
            return
        with self._cond:
            idle = self._urgent.idle + self._bulk.idle
            self._urgent.idle, self._bulk.idle = [], []
        for entry in idle:
            entry.conn.close()

    def __enter__(self) -> PageServerSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _plan(self, requests: Sequence[tuple[int, memoryview]]
              ) -> tuple[list[tuple[int, list[memoryview]]], int]:
        """Zero-fill what lies past the end; merge adjacent ranges into READ-sized groups."""
        size = self._size
        if len(requests) == 1:  # the fault path: one page, inside the export
            off, b = requests[0]
            v = _bytes_view(b)
            if off >= 0 and off + len(v) <= size and 0 < len(v) <= MAX_READ:
                return [(off, [v])], len(v)
        items: list[tuple[int, memoryview]] = []
        for off, b in requests:
            v = _bytes_view(b)
            if off < 0:
                raise ValueError(f"{self._desc}: negative offset {off}")
            inside = max(0, min(len(v), size - off))
            if inside < len(v):
                v[inside:] = bytes(len(v) - inside)
            for pos in range(0, inside, MAX_READ):
                items.append((off + pos, v[pos:min(inside, pos + MAX_READ)]))
        items.sort(key=lambda r: r[0])
        groups: list[tuple[int, list[memoryview]]] = []
        end = -1
        length = 0
        total = 0
        for off, v in items:
            if groups and off == end and length + len(v) <= MAX_READ:
                groups[-1][1].append(v)
                length += len(v)
            else:
                groups.append((off, [v]))
                length = len(v)
            end = off + len(v)
            total += len(v)
        return groups, total

    def _tls_context(self) -> ssl.SSLContext | None:
        if not self._parsed.tls:
            return None
        if self._tls is None:
            self._tls = ssl.create_default_context(cafile=self._tls_ca)
        return self._tls

    def _connect(self) -> tuple[_Entry, OpenedExport]:
        """A new authenticated connection with the export open on it."""
        conn = Connection.connect(self._parsed.endpoint, self._secret, tls=self._tls_context(),
                                  timeout=self._timeout)
        try:
            opened = conn.open(self._parsed.export)
        except BaseException:
            conn.close()
            raise
        if self._size >= 0 and opened.size != self._size:
            conn.close()
            raise SourceError(f"{self._desc}: the export's size changed from {self._size} to "
                              f"{opened.size} bytes: it is not the same data any more; "
                              "refusing to mix the two", source=str(self._parsed))
        self.connections_opened += 1
        return _Entry(conn, opened.handle), opened

    def _acquire(self, lane: _Lane) -> _Entry:
        with self._cond:
            # Bounded in practice: every holder is bounded by its socket timeout and
            # reconnect budget.
            self._cond.wait_for(lambda: lane.busy < self._connections)
            lane.busy += 1
            if lane.idle:
                return lane.idle.pop()
        try:
            return self._connect()[0]
        except BaseException:
            with self._cond:
                lane.busy -= 1
                self._cond.notify()
            raise

    def _release(self, lane: _Lane, entry: _Entry) -> None:
        with self._cond:
            if entry.conn.broken:
                entry.conn.close()
            else:
                lane.idle.append(entry)
            lane.busy -= 1
            self._cond.notify()

    def _failure(self, what: str, offset: int, length: int, err: BaseException,
                 note: str = "") -> SourceError:
        if isinstance(err, SourceError) and not isinstance(err, RemoteError):
            return err
        where = f" [{offset}, {offset + length}) ({length} bytes)" if length else ""
        message = f"{self._desc}: {what}{where} failed: {_cause(err)}{note}"
        if isinstance(err, RemoteError):
            return type(err)(message, code=err.code, source=str(self._parsed), offset=offset,
                             length=length)
        return SourceError(message, source=str(self._parsed), offset=offset, length=length)

    def _run(self, lane: _Lane, fn: Callable[[_Entry], T], what: str, offset: int,
             length: int) -> T:
        """``fn(entry)`` on a connection of ``lane``, reconnecting on connection failures."""
        deadline: float | None = None
        delay = 0.0
        while True:
            try:
                entry = self._acquire(lane)
            except (OSError, ProtocolError) as err:
                failed: BaseException = err
            else:
                try:
                    result = fn(entry)
                except (OSError, ProtocolError) as err:
                    self._release(lane, entry)
                    failed = err
                except BaseException:
                    self._release(lane, entry)
                    raise
                else:
                    self._release(lane, entry)
                    self._down = False
                    return result
            if not _retriable(failed):
                raise self._failure(what, offset, length, failed) from failed
            now = time.monotonic()
            if deadline is None:
                deadline = now + (0.0 if self._down else self._reconnect_timeout)
            if now + delay >= deadline:
                self._down = True
                note = "" if self._reconnect_timeout == 0 else (
                    f"; gave up after {self._reconnect_timeout:g} s of reconnecting")
                raise self._failure(what, offset, length, failed, note) from failed
            log.warning("%s: %s %s failed (%s); reconnecting%s", self._desc, lane.name, what,
                        _cause(failed), f" in {delay:.2f} s" if delay else "")
            if delay:
                time.sleep(delay)
            delay = min(delay * 2, _MAX_DELAY) if delay else _FIRST_DELAY


def list_exports(url: str, **options: Any) -> list[ExportInfo]:
    """The exports of the server ``url`` points at (its export name is not used; ``options``
    as for :class:`PageServerSource`: ``secret_file``, ``tls_ca``, ``timeout``)."""
    parsed = parse_url(url)
    secret = _resolve_secret(parsed, options.get("secret"), options.get("secret_file"))
    ca = options.get("tls_ca") or parsed.tls_ca or os.environ.get(ENV_TLS_CA)
    tls = ssl.create_default_context(cafile=ca) if parsed.tls else None
    conn = Connection.connect(parsed.endpoint, secret, tls=tls,
                              timeout=float(options.get("timeout", 10.0)))
    try:
        return conn.list()
    finally:
        conn.close()


def _bytes_view(buf: memoryview) -> memoryview:
    mv = memoryview(buf)
    if mv.readonly:
        raise TypeError("read_into needs a writable buffer")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv
