"""`PageServer`: an asyncio server of exports to authenticated clients.

One event loop serves every connection. Per connection, requests are parsed and checked as
they arrive (:class:`~userfault.remote.protocol.FrameReader`); a read that fits in one piece
and can be served without blocking (a memory copy, a page-cache hit) is answered at once, from
the loop callback that parsed it. Other reads queue in two lanes, urgent and normal, and one
pump task per connection sends them piece by piece (``piece`` bytes, 256 KiB by default), always
taking the next piece from the urgent lane first: a fault read that arrives while a 16 MiB
background read is being sent goes out after at most the piece in progress. Blocking reads run
on a small thread pool, so a cold disk or a slow source delays only the clients that asked.

Each connection is bounded: a handshake must finish within ``handshake_timeout``, a started
frame may not stall longer than ``frame_timeout``, silent peers are dropped by TCP keepalive
and ``TCP_USER_TIMEOUT`` (``peer_timeout``), and at most ``MAX_INFLIGHT`` requests may be
outstanding. A connection that breaks the protocol is answered with an ``ERROR`` naming what
was wrong, logged with its peer, and closed; the others are not affected.

Run it inside an asyncio program (``await server.start("tcp://0.0.0.0:7000")``), on a thread of
its own (:meth:`PageServer.start_in_thread`, for a process exporting its own memory), or from the
command line (``userfault serve``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import socket
import ssl
import stat
import struct
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..sources.base import PageSource
from .address import Endpoint, parse_listen
from .auth import check_auth, check_secret, hello_message, load_secret, new_nonce, welcome_message
from .exports import BufferExport, Export, FileExport, SourceExport, WithdrawnError, open_export
from .protocol import (
    AUTH,
    EXPORT_WRITABLE,
    FLAG_MORE,
    FLAG_URGENT,
    FRAME,
    MAX_HANDLES,
    MAX_INFLIGHT,
    MAX_MESSAGE,
    OPENED,
    ErrorCode,
    ExportInfo,
    Frame,
    FrameReader,
    FrameType,
    ProtocolError,
    check_export_name,
    encode_listing,
)
from .ratelimit import FailureLimiter, RateLimit

__all__ = ["PageServer", "ServerLimits", "tls_server_context"]

log = logging.getLogger("userfault.remote.server")

_HDR = FRAME.size
_DATA, _ERROR = int(FrameType.DATA), int(FrameType.ERROR)


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on what clients may cost the server (see the module docstring)."""

    max_connections: int = 1024
    max_unauthenticated: int = 64
    handshake_timeout: float = 10.0
    frame_timeout: float = 30.0
    peer_timeout: float = 30.0
    piece: int = 256 << 10
    workers: int = 4

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_unauthenticated < 1 or self.workers < 1:
            raise ValueError("max_connections, max_unauthenticated and workers must be >= 1")
        if min(self.handshake_timeout, self.frame_timeout, self.peer_timeout) <= 0:
            raise ValueError("timeouts must be positive")
        if not 4096 <= self.piece <= 16 << 20:
            raise ValueError(f"piece must be between 4 KiB and 16 MiB, not {self.piece}")


def tls_server_context(cert: str | os.PathLike[str], key: str | os.PathLike[str]
                       ) -> ssl.SSLContext:
    """A TLS (1.2 or later) server context presenting ``cert`` (PEM chain) with ``key``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    return ctx


class _Transfer:
    """A READ being sent: what remains of it."""

    __slots__ = ("export", "handle", "id", "pos", "remaining")

    def __init__(self, id_: int, handle: int, export: Export, offset: int, length: int) -> None:
        self.id = id_
        self.handle = handle
        self.export = export
        self.pos = offset
        self.remaining = length


@dataclass
class _Stats:
    connections: int = 0
    authenticated: int = 0
    auth_failures: int = 0
    refused: int = 0
    protocol_errors: int = 0
    timeouts: int = 0
    reads: int = 0
    urgent_reads: int = 0
    writes: int = 0
    errors: int = 0
    bytes_sent: int = 0
    bytes_written: int = 0


class _Connection(asyncio.Protocol):
    """One client connection: handshake, then frames (see the module docstring)."""

    def __init__(self, server: PageServer) -> None:
        self.server = server
        self.loop = server._require_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown peer"
        self.peer_key = "unknown"
        self.state = "new"  # new -> [tls ->] auth -> ready | refusing -> closing -> closed
        self.hello = b""
        self.buf = bytearray()
        self.reader = FrameReader(requests=True)
        self.handles: dict[int, Export] = {}
        self.inflight: set[int] = set()
        self.urgent: deque[_Transfer] = deque()
        self.normal: deque[_Transfer] = deque()
        self.pump: asyncio.Task[None] | None = None
        self.tls_task: asyncio.Task[None] | None = None  # referenced: the loop holds tasks weakly
        self.paused = False
        self.resumed: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.last_rx = 0.0
        self.authenticated = False

    # -- lifetime ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer, self.peer_key = _describe_peer(transport)
        self._tune_socket(transport)
        srv = self.server
        srv._stats.connections += 1
        code, why = srv._admit(self)
        if code != ErrorCode.OK:
            srv._stats.refused += 1
            log.warning("refused %s: %s", self.peer, why)
        sock = transport.get_extra_info("socket")
        local = sock is not None and sock.family == socket.AF_UNIX
        if srv._tls is None or local:  # TLS is for TCP listeners
            self._greet(code)
        else:  # TLS first (the refusal, if any, is sent inside it)
            self.state = "tls"
            self.tls_task = self.loop.create_task(self._start_tls(transport, code))

    async def _start_tls(self, raw: asyncio.Transport, code: ErrorCode) -> None:
        srv = self.server
        assert srv._tls is not None
        try:
            tls = await self.loop.start_tls(raw, self, srv._tls, server_side=True,
                                            ssl_handshake_timeout=srv.limits.handshake_timeout)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as err:
            # A failed handshake never reaches connection_lost: forget the connection here.
            log.warning("refused %s: the TLS handshake failed: %s", self.peer,
                        _describe_tls_error(err))
            srv._stats.refused += 1
            self.state = "closed"
            srv._forget(self)
            raw.abort()
            return
        if self.state != "tls":
            return
        assert isinstance(tls, asyncio.Transport)
        self.transport = tls
        self._greet(code)

    def _greet(self, code: ErrorCode) -> None:
        """Send the challenge (or the refusal), start the handshake clock."""
        srv = self.server
        transport = self.transport
        assert transport is not None
        if code != ErrorCode.OK:
            self.state = "refusing"
            transport.write(hello_message(None, code))
            transport.close()
            return
        transport.set_write_buffer_limits(high=4 * srv.limits.piece, low=srv.limits.piece)
        self.state = "auth"
        self.hello = hello_message(new_nonce())
        transport.write(self.hello)
        self.timer = self.loop.call_later(srv.limits.handshake_timeout, self._expire,
                                          "no authentication within "
                                          f"{srv.limits.handshake_timeout:g} s")

    def _tune_socket(self, transport: asyncio.Transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        t = self.server.limits.peer_timeout
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(t / 3)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(t / 9)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
            # Data unacknowledged this long means the peer is gone (keepalive does not run
            # while data is in flight).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(t * 1000))

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        self.state = "closed"
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.pump is not None:
            self.pump.cancel()
        if self.resumed is not None and not self.resumed.done():
            self.resumed.cancel()
        self.urgent.clear()
        self.normal.clear()
        self.server._forget(self)
        if was == "ready":
            log.debug("%s disconnected%s", self.peer, f": {exc}" if exc else "")

    def eof_received(self) -> bool:
        return False  # a half-closed connection is closed: replies would go nowhere useful

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.resumed is not None and not self.resumed.done():
            self.resumed.set_result(None)

    def _close(self, reason: str, code: ErrorCode, *, counter: str | None) -> None:
        """Log ``reason``, send an ERROR for the whole connection (when frames are in use),
        close, and abort if the peer does not read what is left within a few seconds."""
        if self.state in ("closing", "closed"):
            return
        log.warning("closing the connection from %s: %s", self.peer, reason)
        if counter is not None:
            setattr(self.server._stats, counter, getattr(self.server._stats, counter) + 1)
        ready = self.state == "ready"
        self.state = "closing"
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        transport = self.transport
        assert transport is not None
        if ready:
            transport.write(_error_frame(0, code, reason))
        transport.close()
        self.loop.call_later(5.0, transport.abort)

    def _expire(self, reason: str) -> None:
        self.timer = None
        if self.state == "ready":
            if not self.reader.pending:
                return
            idle = self.loop.time() - self.last_rx
            limit = self.server.limits.frame_timeout
            if idle < limit:  # bytes arrived since the timer was set: wait for the rest
                self.timer = self.loop.call_later(limit - idle, self._expire, reason)
                return
        self._close(reason, ErrorCode.TIMEOUT, counter="timeouts")

    # -- handshake -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.state == "ready":
            self._feed(data)
        elif self.state == "auth":
            self.buf += data
            if len(self.buf) >= AUTH.size:
                auth, rest = bytes(self.buf[:AUTH.size]), bytes(self.buf[AUTH.size:])
                self.buf.clear()
                self._authenticate(auth, rest)

    def _authenticate(self, auth: bytes, rest: bytes) -> None:
        srv = self.server
        assert self.transport is not None and self.timer is not None
        self.timer.cancel()
        self.timer = None
        code, reason = check_auth(srv._secret, self.hello, auth)
        now = self.loop.time()
        if code != ErrorCode.OK:
            delay = srv._limiter.failure(self.peer_key, now)
            srv._stats.auth_failures += 1
            log.warning("refused %s: %s; refusal sent in %.2f s", self.peer, reason, delay)
            self.state = "refusing"
            self.transport.pause_reading()
            self.timer = self.loop.call_later(delay, self._refuse, auth, code)
            return
        srv._limiter.success(self.peer_key, now)
        srv._stats.authenticated += 1
        self.authenticated = True
        self.state = "ready"
        srv._unauthenticated -= 1
        self.transport.write(welcome_message(srv._secret, self.hello, auth))
        log.info("%s authenticated", self.peer)
        if rest:
            self._feed(rest)

    def _refuse(self, auth: bytes, code: ErrorCode) -> None:
        self.timer = None
        if self.state != "refusing" or self.transport is None:
            return
        self.transport.write(welcome_message(None, self.hello, auth, code))
        self.transport.close()

    # -- frames --------------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except ProtocolError as err:
            self._close(f"protocol error: {err}", ErrorCode.BAD_FRAME, counter="protocol_errors")
            return
        for f in frames:
            if self.state != "ready":
                return
            self._dispatch(f)
        if self.state != "ready":
            return
        if self.reader.pending:
            self.last_rx = self.loop.time()
            if self.timer is None:
                limit = self.server.limits.frame_timeout
                self.timer = self.loop.call_later(
                    limit, self._expire, f"a frame started but did not complete within {limit:g} s")
        elif self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _reply(self, type_: FrameType, id_: int, payload: bytes = b"", handle: int = 0) -> None:
        assert self.transport is not None
        self.transport.write(FRAME.pack(type_, 0, 0, id_, handle, len(payload), 0) + payload)

    def _fail(self, id_: int, code: ErrorCode, message: str) -> None:
        assert self.transport is not None
        self.server._stats.errors += 1
        self.transport.write(_error_frame(id_, code, message))
        self._done(id_)

    def _done(self, id_: int) -> None:
        self.inflight.discard(id_)

    def _dispatch(self, f: Frame) -> None:
        if f.id in self.inflight:
            self._close(f"request id {f.id} is already in flight", ErrorCode.BAD_FRAME,
                        counter="protocol_errors")
            return
        self.inflight.add(f.id)
        if len(self.inflight) > MAX_INFLIGHT:
            self._close(f"more than {MAX_INFLIGHT} requests in flight", ErrorCode.BAD_FRAME,
                        counter="protocol_errors")
            return
        t = f.type
        if t == FrameType.READ:
            self._read(f)
        elif t == FrameType.WRITE:
            self._write(f)
        elif t == FrameType.OPEN:
            self._open(f)
        elif t == FrameType.LIST:
            exports = self.server.listing()
            self._reply(FrameType.LISTING, f.id, encode_listing(exports))
            self._done(f.id)
        else:  # PING
            self._reply(FrameType.PONG, f.id)
            self._done(f.id)

    def _open(self, f: Frame) -> None:
        try:
            name = check_export_name(f.payload.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            self._fail(f.id, ErrorCode.UNKNOWN_EXPORT,
                       f"{f.payload[:64]!r} is not a valid export name")
            return
        export = self.server._lookup(name)
        if export is None:
            self._fail(f.id, ErrorCode.UNKNOWN_EXPORT, f"this server has no export {name!r}")
            return
        if len(self.handles) >= MAX_HANDLES:
            self._fail(f.id, ErrorCode.TOO_MANY_HANDLES,
                       f"a connection may open at most {MAX_HANDLES} exports")
            return
        handle = len(self.handles) + 1
        self.handles[handle] = export
        self._reply(FrameType.OPENED, f.id,
                    OPENED.pack(export.size, EXPORT_WRITABLE if export.writable else 0), handle)
        self._done(f.id)

    def _target(self, f: Frame) -> Export | None:
        export = self.handles.get(f.handle)
        if export is None:
            self._fail(f.id, ErrorCode.BAD_HANDLE, f"handle {f.handle} is not open")
            return None
        if export.closed:
            self._fail(f.id, ErrorCode.WITHDRAWN, f"export {export.name!r} was withdrawn")
            return None
        if f.offset + f.length > export.size:
            self._fail(f.id, ErrorCode.OUT_OF_RANGE,
                       f"bytes [{f.offset}, {f.offset + f.length}) are outside export "
                       f"{export.name!r} ({export.size} bytes)")
            return None
        return export

    def _read(self, f: Frame) -> None:
        export = self._target(f)
        if export is None:
            return
        stats = self.server._stats
        stats.reads += 1
        urgent = bool(f.flags & FLAG_URGENT)
        stats.urgent_reads += urgent
        length = f.length
        if length <= self.server.limits.piece and (urgent or not (self.urgent or self.normal)):
            # Fast path: answer now, between two pieces of whatever transfer is in progress.
            out = bytearray(_HDR + length)
            try:
                got = export.read_nowait(f.offset, memoryview(out)[_HDR:])
            except WithdrawnError as err:
                self._fail(f.id, ErrorCode.WITHDRAWN, str(err))
                return
            except Exception as err:
                self._read_failed(f.id, export, f.offset, length, err)
                return
            if got == length:
                FRAME.pack_into(out, 0, _DATA, 0, 0, f.id, f.handle, length, f.offset)
                assert self.transport is not None
                self.transport.write(out)
                stats.bytes_sent += length
                self._done(f.id)
                return
        (self.urgent if urgent else self.normal).append(
            _Transfer(f.id, f.handle, export, f.offset, length))
        if self.pump is None:
            self.pump = self.loop.create_task(self._pump())

    def _read_failed(self, id_: int, export: Export, offset: int, length: int,
                     err: BaseException) -> None:
        log.error("export %r: reading [%d, %d) for %s failed: %s", export.name, offset,
                  offset + length, self.peer, err)
        self._fail(id_, ErrorCode.IO_ERROR,
                   f"export {export.name!r}: reading [{offset}, {offset + length}) failed: "
                   f"{type(err).__name__}: {err}")

    async def _pump(self) -> None:
        """Send queued reads piece by piece, urgent lane first."""
        limits = self.server.limits
        executor = self.server._executor
        stats = self.server._stats
        try:
            while self.state == "ready":
                lane = self.urgent or self.normal
                if not lane:
                    break
                t = lane[0]
                n = min(limits.piece, t.remaining)
                out = bytearray(_HDR + n)
                view = memoryview(out)[_HDR:]
                try:
                    got = t.export.read_nowait(t.pos, view)
                    if got < n:
                        await self.loop.run_in_executor(executor, t.export.read, t.pos + got,
                                                        view[got:])
                except WithdrawnError as err:
                    lane.popleft()
                    self._fail(t.id, ErrorCode.WITHDRAWN, str(err))
                    continue
                except Exception as err:
                    lane.popleft()
                    self._read_failed(t.id, t.export, t.pos, t.remaining, err)
                    continue
                if self.state != "ready":
                    return
                t.remaining -= n
                FRAME.pack_into(out, 0, _DATA, FLAG_MORE if t.remaining else 0, 0, t.id,
                                t.handle, n, t.pos)
                t.pos += n
                assert self.transport is not None
                self.transport.write(out)
                stats.bytes_sent += n
                if not t.remaining:
                    lane.popleft()
                    self._done(t.id)
                if self.paused:
                    self.resumed = self.loop.create_future()
                    await self.resumed
                else:
                    await asyncio.sleep(0)  # let other connections and our reader in
        finally:
            self.pump = None

    def _write(self, f: Frame) -> None:
        export = self._target(f)
        if export is None:
            return
        if not export.writable:
            self._fail(f.id, ErrorCode.READ_ONLY, f"export {export.name!r} is read-only")
            return
        if isinstance(export, BufferExport):
            self._store(f, export)
        else:  # a file or a source may block: store on a worker thread
            self.loop.run_in_executor(self.server._executor, self._store_blocking, f, export)

    def _store(self, f: Frame, export: Export) -> None:
        try:
            export.write(f.offset, memoryview(f.payload))
        except WithdrawnError as err:
            self._fail(f.id, ErrorCode.WITHDRAWN, str(err))
            return
        except Exception as err:
            log.error("export %r: writing [%d, %d) for %s failed: %s", export.name, f.offset,
                      f.offset + f.length, self.peer, err)
            self._fail(f.id, ErrorCode.IO_ERROR,
                       f"export {export.name!r}: writing [{f.offset}, {f.offset + f.length}) "
                       f"failed: {type(err).__name__}: {err}")
            return
        self.server._stats.writes += 1
        self.server._stats.bytes_written += f.length
        self._reply(FrameType.DONE, f.id)
        self._done(f.id)

    def _store_blocking(self, f: Frame, export: Export) -> None:
        """On a worker thread: store, then answer from the loop."""
        try:
            export.write(f.offset, memoryview(f.payload))
        except Exception as err:
            exc: BaseException | None = err
        else:
            exc = None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to answer
            self.loop.call_soon_threadsafe(self._stored, f, export, exc)

    def _stored(self, f: Frame, export: Export, exc: BaseException | None) -> None:
        if self.state != "ready":
            return
        if isinstance(exc, WithdrawnError):
            self._fail(f.id, ErrorCode.WITHDRAWN, str(exc))
        elif exc is not None:
            log.error("export %r: writing [%d, %d) for %s failed: %s", export.name, f.offset,
                      f.offset + f.length, self.peer, exc)
            self._fail(f.id, ErrorCode.IO_ERROR,
                       f"export {export.name!r}: writing [{f.offset}, {f.offset + f.length}) "
                       f"failed: {type(exc).__name__}: {exc}")
        else:
            self.server._stats.writes += 1
            self.server._stats.bytes_written += f.length
            self._reply(FrameType.DONE, f.id)
            self._done(f.id)

    def shutdown(self) -> None:
        """The server is closing: tell the peer, close."""
        if self.state == "ready":
            self._close("the server is shutting down", ErrorCode.SHUTTING_DOWN, counter=None)
        elif self.transport is not None and self.state != "closed":
            self.transport.abort()


def _describe_tls_error(err: BaseException) -> str:
    plain = " (a plain client? it should use ufs://)"
    if isinstance(err, TimeoutError):
        return f"no TLS handshake in time{plain}"
    if isinstance(err, ssl.SSLError):
        return str(err.reason or err)
    if isinstance(err, ConnectionError):
        return f"the client closed the connection during the handshake{plain}"
    return str(err) or type(err).__name__


def _error_frame(id_: int, code: ErrorCode, message: str) -> bytes:
    raw = message.encode("utf-8", "replace")[:MAX_MESSAGE]
    return FRAME.pack(_ERROR, 0, code, id_, 0, len(raw), 0) + raw


def _describe_peer(transport: asyncio.BaseTransport) -> tuple[str, str]:
    """``(description, rate-limit key)``: the IP address, or the Unix peer's user."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        host = str(peer[0])
        if host.startswith("::ffff:"):
            host = host[len("::ffff:"):]
        shown = f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
        return shown, host
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            pid, uid, _ = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            return f"unix peer pid {pid} uid {uid}", f"uid:{uid}"
    return "unix peer", "unix"


class PageServer:
    """Serve exports to clients that prove they hold ``secret``.

    Args:
        secret: the shared secret (at least 16 bytes; see :func:`load_secret`).
        tls: a server TLS context (:func:`tls_server_context`) for every TCP listener, or
            ``None`` for plain TCP.
        limits: :class:`ServerLimits`.
        rate_limit: the per-peer policy for failed handshakes
            (:class:`~userfault.remote.ratelimit.RateLimit`).

    Exports may be added and withdrawn at any time, from any thread. Example::

        server = PageServer(load_secret("secret"))
        server.export_file("disk", "/data/disk.img")
        server.export_buffer("mem", pager)          # a live Pager, Region, bytearray...
        server.start_in_thread("tcp://0.0.0.0:7000")
        ...
        server.close()
    """

    def __init__(self, secret: bytes, *, tls: ssl.SSLContext | None = None,
                 limits: ServerLimits | None = None, rate_limit: RateLimit | None = None
                 ) -> None:
        self._secret = check_secret(secret)
        self._tls = tls
        self.limits = limits or ServerLimits()
        self._limiter = FailureLimiter(rate_limit)
        self._exports: dict[str, Export] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._unix_paths: list[str] = []
        self._conns: set[_Connection] = set()
        self._unauthenticated = 0
        self._stats = _Stats()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.addresses: list[Endpoint] = []

    @classmethod
    def from_secret_file(cls, path: str | os.PathLike[str], **options: Any) -> PageServer:
        """A server whose secret is read from ``path`` (see :func:`load_secret`)."""
        return cls(load_secret(path), **options)

    # -- exports -------------------------------------------------------------------------------

    def add_export(self, export: Export) -> Export:
        """Serve ``export`` under its name; ``ValueError`` if the name is taken."""
        with self._lock:
            if export.name in self._exports:
                raise ValueError(f"an export named {export.name!r} exists already")
            self._exports[export.name] = export
        return export

    def export_file(self, name: str, path: str | os.PathLike[str], *,
                    writable: bool = False) -> Export:
        """Serve a regular file or block device (opened now; read-only unless ``writable``)."""
        return self.add_export(FileExport(name, path, writable=writable))

    def export_buffer(self, name: str, buffer: Any, *, writable: bool = False) -> Export:
        """Serve a Python buffer live: a :class:`~userfault.Pager`, a
        :class:`~userfault.Region`, a ``bytearray``, an ``mmap``, a numpy array. It is pinned
        until withdrawn (:meth:`unexport`) or the server closes."""
        return self.add_export(BufferExport(name, buffer, writable=writable))

    def export_source(self, name: str, source: PageSource, *, writable: bool = False) -> Export:
        """Serve any :class:`~userfault.sources.base.PageSource` (read on worker threads; the
        source stays the caller's to close)."""
        return self.add_export(SourceExport(name, source, writable=writable))

    def export(self, name: str, spec: str, *, writable: bool = False) -> Export:
        """Serve what ``spec`` names: a file, a ``*.ufs`` snapshot, or a source URL."""
        return self.add_export(open_export(name, spec, writable=writable))

    def unexport(self, name: str) -> None:
        """Withdraw an export: new requests for it fail with ``WITHDRAWN``; returns once no read
        of it is in progress (a buffer is released, a file closed)."""
        with self._lock:
            export = self._exports.pop(name, None)
        if export is None:
            raise KeyError(f"no export named {name!r}")
        export.close()

    def listing(self) -> list[ExportInfo]:
        """The exports, sorted by name."""
        with self._lock:
            exports = sorted(self._exports.values(), key=lambda e: e.name)
        return [ExportInfo(e.name, e.size, e.writable) for e in exports]

    def _lookup(self, name: str) -> Export | None:
        with self._lock:
            return self._exports.get(name)

    # -- connections ---------------------------------------------------------------------------

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def _admit(self, conn: _Connection) -> tuple[ErrorCode, str]:
        if self._closed:
            return ErrorCode.SHUTTING_DOWN, "the server is shutting down"
        if not self._limiter.allowed(conn.peer_key, self._require_loop().time()):
            return ErrorCode.RATE_LIMITED, "too many failed authentications from this peer"
        if len(self._conns) >= self.limits.max_connections:
            return ErrorCode.BUSY, f"{len(self._conns)} connections already"
        if self._unauthenticated >= self.limits.max_unauthenticated:
            return ErrorCode.BUSY, f"{self._unauthenticated} handshakes already in progress"
        self._conns.add(conn)
        self._unauthenticated += 1
        return ErrorCode.OK, ""

    def _forget(self, conn: _Connection) -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            if not conn.authenticated:
                self._unauthenticated -= 1

    def stats(self) -> dict[str, int]:
        """Counters: connections, authenticated, auth_failures, refused, protocol_errors,
        timeouts, reads, urgent_reads, writes, errors, bytes_sent, bytes_written, and
        open_connections."""
        s = self._stats
        out = {k: v for k, v in vars(s).items() if isinstance(v, int)}
        out["open_connections"] = len(self._conns)
        return out

    # -- serving -------------------------------------------------------------------------------

    async def start(self, *listen: str | Endpoint) -> list[Endpoint]:
        """Listen on each address (``tcp://HOST:PORT``, ``unix:PATH``); return the bound
        addresses (a TCP port 0 becomes the one the kernel chose)."""
        if not listen:
            raise ValueError("give at least one address to listen on")
        if self._closed:
            raise RuntimeError("the server is closed")
        endpoints = [parse_listen(x) if isinstance(x, str) else x for x in listen]
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise RuntimeError("the server already runs on another event loop")
        self._loop = loop
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.limits.workers, thread_name_prefix="userfault-serve")
        bound: list[Endpoint] = []
        for ep in endpoints:
            if ep.kind == "unix":
                _claim_unix_path(ep.path)
                srv = await loop.create_unix_server(lambda: _Connection(self), ep.path)
                self._unix_paths.append(ep.path)
                bound.append(ep)
            else:
                srv = await loop.create_server(lambda: _Connection(self), ep.host, ep.port,
                                               reuse_address=True)
                for sock in srv.sockets:
                    host, port = sock.getsockname()[:2]
                    bound.append(Endpoint("tcp", host=host, port=port))
            self._servers.append(srv)
        self.addresses += bound
        for ep in bound:
            log.info("listening on %s%s", ep, " (TLS)" if self._tls and ep.kind == "tcp" else "")
        return bound

    async def aclose(self) -> None:
        """Stop listening, close every connection, withdraw every export."""
        if self._closed:
            return
        self._closed = True
        for srv in self._servers:
            srv.close()
        for conn in list(self._conns):
            conn.shutdown()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 10)
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            exports, self._exports = list(self._exports.values()), {}
        for export in exports:
            export.close()

    def start_in_thread(self, *listen: str | Endpoint, timeout: float = 30.0) -> list[Endpoint]:
        """Serve from an event loop on a daemon thread of this process; return the bound
        addresses once listening. Stop with :meth:`close`."""
        if self._thread is not None:
            raise RuntimeError("the server already runs on a thread")
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(log_loop_exception)
        ready: concurrent.futures.Future[list[Endpoint]] = concurrent.futures.Future()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                ready.set_result(loop.run_until_complete(self.start(*listen)))
            except BaseException as err:
                ready.set_exception(err)
                loop.close()
                return
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.aclose())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="userfault-page-server", daemon=True)
        self._thread.start()
        try:
            return ready.result(timeout)
        except BaseException:
            self._thread.join(timeout)
            self._thread = None
            raise

    def close(self) -> None:
        """Stop the server started by :meth:`start_in_thread` (or withdraw the exports of one
        that never started); idempotent."""
        thread, loop = self._thread, self._loop
        if thread is not None and loop is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(30)
                loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
            if self._executor is not None:
                self._executor.shutdown(wait=True)
        elif self._loop is None:
            self._closed = True
            with self._lock:
                exports, self._exports = list(self._exports.values()), {}
            for export in exports:
                export.close()

    def __enter__(self) -> PageServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def log_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Event-loop exception handler: TLS handshake failures and the like are logged as one
    warning naming the peer, not as a traceback."""
    exc = context.get("exception")
    transport = context.get("transport")
    peer = ""
    if transport is not None:
        with contextlib.suppress(Exception):
            peer = f" from {_describe_peer(transport)[0]}"
    if isinstance(exc, (ssl.SSLError, ConnectionError, TimeoutError)):
        log.warning("connection%s failed: %s: %s", peer, context.get("message", ""), exc)
    else:
        log.error("%s%s", context.get("message", "event loop error"), peer,
                  exc_info=exc if isinstance(exc, BaseException) else None)


def _claim_unix_path(path: str) -> None:
    """Remove a stale socket at ``path``; refuse a live one or anything that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket: refusing to replace "
                              "it", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # stale: nobody listens
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another server is listening on this socket", path)
