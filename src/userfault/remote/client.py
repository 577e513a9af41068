"""`Connection`: one authenticated, blocking connection to a page server.

A connection is used by one thread at a time. Its socket calls block with the GIL released,
so several threads, each on its own connection, overlap their network waits. Replies are
received straight into the caller's buffers (``recv_into``); small replies arrive through a
64 KiB buffer, one ``recv`` for a header and a page together.

:meth:`Connection.read` pipelines: it sends up to ``window`` READ requests before it reads a
reply and keeps the window full, so one round trip is paid per batch, not per request. The
lower-level :meth:`Connection.send` and :meth:`Connection.receive` expose single frames (tests
use them to show that an urgent read overtakes a transfer in progress).

After any failure of the socket or of the protocol the connection is marked ``broken`` and must
be closed; a request the server refused (an ``ERROR`` reply with its id) leaves it usable.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from .address import Endpoint
from .auth import auth_message, check_welcome, new_nonce, parse_hello
from .errors import AuthenticationError, RemoteError
from .protocol import (
    EXPORT_WRITABLE,
    FLAG_MORE,
    FLAG_URGENT,
    FRAME,
    HELLO,
    MAX_INFLIGHT,
    MAX_WRITE,
    OPENED,
    VERSION,
    WELCOME,
    ErrorCode,
    ExportInfo,
    Frame,
    FrameType,
    ProtocolError,
    check_reply,
    decode_listing,
)

__all__ = ["Connection", "ConnectionClosed", "OpenedExport"]

_RBUF = 64 << 10
_DIRECT = 16 << 10  # payload left to receive beyond this goes straight into the destination
_HDR = FRAME.size
_DATA, _ERROR, _READ = int(FrameType.DATA), int(FrameType.ERROR), int(FrameType.READ)


class ConnectionClosed(ConnectionError):
    """The server closed the connection in the middle of an exchange."""


@dataclass(frozen=True)
class OpenedExport:
    """An export opened on a connection: its handle there, its size, whether it is writable."""

    handle: int
    size: int
    writable: bool


class _Pending:
    """A READ in flight: where its bytes go."""

    __slots__ = ("done", "handle", "offset", "targets", "tidx", "total", "tpos")

    def __init__(self, handle: int, offset: int, targets: Sequence[memoryview],
                 total: int) -> None:
        self.handle = handle
        self.offset = offset
        self.targets = targets
        self.total = total
        self.done = 0
        self.tidx = 0
        self.tpos = 0


class Connection:
    """An authenticated connection over ``sock`` (connected, not yet greeted).

    Args:
        sock: a connected stream socket (TCP or Unix).
        secret: the shared secret.
        tls: a client TLS context to wrap ``sock`` with, or ``None``.
        server_hostname: the name the server's certificate must carry (TLS only).
        timeout: seconds any single socket operation may take.
        peer: how to name the server in messages.

    Raises:
        AuthenticationError: the server refused our proof, or could not prove its own.
        RemoteError: the server refused the connection (busy, rate-limited, shutting down,
            another protocol version).
        ProtocolError: the peer is not a userfault page server.
        OSError: the connection failed.
    """

    def __init__(self, sock: socket.socket, secret: bytes, *, tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, timeout: float = 10.0,
                 peer: str = "the page server") -> None:
        self.peer = peer
        self.broken = False
        self._buf = bytearray(_RBUF)
        self._mv = memoryview(self._buf)
        self._start = self._end = 0
        self._next_id = 0
        sock.settimeout(timeout)
        self.sock = sock
        try:
            if tls is not None:
                self.sock = tls.wrap_socket(sock, server_hostname=server_hostname)
            self._handshake(secret)
        except BaseException:
            self.close()
            raise

    @classmethod
    def connect(cls, endpoint: Endpoint, secret: bytes, *, tls: ssl.SSLContext | None = None,
                timeout: float = 10.0) -> Connection:
        """Connect to ``endpoint`` and authenticate."""
        if endpoint.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(endpoint.path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except BaseException:
                sock.close()
                raise
        return cls(sock, secret, tls=tls, server_hostname=endpoint.host or None,
                   timeout=timeout, peer=str(endpoint))

    # -- handshake -----------------------------------------------------------------------------

    def _recv_exactly(self, n: int, what: str) -> bytes:
        out = bytearray(n)
        view = memoryview(out)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:])
            except TimeoutError:
                if what != "greeting" or got:
                    raise
                raise TimeoutError(f"no greeting from {self.peer} within "
                                   f"{self.sock.gettimeout():g} s: not a userfault page server, "
                                   "or one that speaks TLS (use ufs://)") from None
            if not k:
                if got == 0 and what == "greeting":
                    raise ConnectionClosed(f"{self.peer} closed the connection without a "
                                           "greeting")
                raise ConnectionClosed(f"{self.peer} closed the connection during the {what} "
                                       f"({got} of {n} bytes received)")
            got += k
        return bytes(out)

    def _handshake(self, secret: bytes) -> None:
        raw_hello = self._recv_exactly(HELLO.size, "greeting")
        try:
            hello = parse_hello(raw_hello)
        except ValueError as err:
            raise ProtocolError(f"{self.peer}: {err}") from None
        if hello.code != ErrorCode.OK:
            raise RemoteError(f"{self.peer} refused the connection: "
                              f"{_refusal(hello.code)}", code=hello.code, source=self.peer)
        if not hello.version_min <= VERSION <= hello.version_max:
            raise RemoteError(f"{self.peer} speaks protocol versions {hello.version_min}.."
                              f"{hello.version_max}; this client speaks {VERSION}: upgrade the "
                              "older side", code=ErrorCode.VERSION, source=self.peer)
        auth = auth_message(secret, raw_hello, new_nonce())
        self.sock.sendall(auth)
        welcome = self._recv_exactly(WELCOME.size, "authentication")
        code = check_welcome(secret, raw_hello, auth, welcome)
        if code is None:
            raise AuthenticationError(
                f"{self.peer} accepted us but could not prove it holds the secret: it is not "
                "the server you meant (or it was given a different secret); nothing was sent",
                code=ErrorCode.AUTH_FAILED, source=self.peer)
        if code == ErrorCode.AUTH_FAILED:
            raise AuthenticationError(
                f"{self.peer} refused our authentication: the secret does not match the "
                "server's (check --secret-file on both sides)", code=code, source=self.peer)
        if code != ErrorCode.OK:
            raise RemoteError(f"{self.peer} refused the handshake: {_refusal(code)}",
                              code=code, source=self.peer)

    # -- frames --------------------------------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id = self._next_id % 0xFFFFFFFF + 1
        return self._next_id

    def _fill(self, need: int) -> None:
        """Make at least ``need`` (<= 64 KiB) bytes available in the receive buffer."""
        if self._end - self._start >= need:
            return
        if self._start:
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start:self._end]
            self._start, self._end = 0, n
        mv = self._mv
        recv_into = self.sock.recv_into
        while self._end < need:
            k = recv_into(mv[self._end:])
            if not k:
                raise ConnectionClosed(f"{self.peer} closed the connection")
            self._end += k

    def _recv_into(self, dest: memoryview) -> None:
        """Receive exactly ``len(dest)`` bytes into ``dest``."""
        n = len(dest)
        avail = self._end - self._start
        if avail:
            k = min(avail, n)
            dest[:k] = self._mv[self._start:self._start + k]
            self._start += k
            if k == n:
                return
            dest = dest[k:]
            n -= k
        if n >= _DIRECT:
            recv_into = self.sock.recv_into
            while n:
                k = recv_into(dest)
                if not k:
                    raise ConnectionClosed(f"{self.peer} closed the connection in the middle "
                                           "of a reply")
                dest = dest[k:]
                n -= k
            return
        self._fill(n)
        dest[:] = self._mv[self._start:self._start + n]
        self._start += n

    def _header(self) -> tuple[int, int, int, int, int, int, int]:
        self._fill(_HDR)
        fields = FRAME.unpack_from(self._buf, self._start)
        self._start += _HDR
        check_reply(*fields)
        return fields  # type: ignore[no-any-return]

    def _payload(self, n: int) -> bytes:
        out = bytearray(n)
        self._recv_into(memoryview(out))
        return bytes(out)

    def send(self, type_: FrameType, *, handle: int = 0, offset: int = 0, length: int = 0,
             payload: bytes = b"", urgent: bool = False) -> int:
        """Send one request; return its id. ``length`` is a READ's byte count (otherwise the
        payload's length is sent)."""
        rid = self._new_id()
        n = length if type_ == _READ else len(payload)
        try:
            self.sock.sendall(FRAME.pack(type_, FLAG_URGENT if urgent else 0, 0, rid, handle, n,
                                         offset) + payload)
        except BaseException:
            self.broken = True
            raise
        return rid

    def receive(self) -> Frame:
        """Receive one reply frame (DATA payloads as bytes)."""
        try:
            type_, flags, code, rid, handle, length, offset = self._header()
            return Frame(type_, flags, code, rid, handle, length, offset, self._payload(length))
        except BaseException:
            self.broken = True
            raise

    def _error(self, frame: Frame) -> RemoteError:
        message = frame.payload.decode("utf-8", "replace")
        if frame.id == 0:
            self.broken = True
            return RemoteError(f"{self.peer} closed the connection: {message} "
                               f"({ErrorCode.describe(frame.code)})", code=frame.code,
                               source=self.peer)
        return RemoteError(f"{message} ({ErrorCode.describe(frame.code)})", code=frame.code,
                           source=self.peer)

    def _call(self, type_: FrameType, expect: FrameType, payload: bytes = b"") -> Frame:
        rid = self.send(type_, payload=payload, urgent=True)
        reply = self.receive()
        if reply.type == _ERROR:
            raise self._error(reply)
        if reply.id != rid or reply.type != expect:
            self.broken = True
            raise ProtocolError(f"{self.peer} answered {type_.name} {rid} with "
                                f"{FrameType(reply.type).name} {reply.id}")
        return reply

    # -- requests ------------------------------------------------------------------------------

    def open(self, name: str) -> OpenedExport:
        """Open export ``name``; raises :class:`RemoteError` (``UNKNOWN_EXPORT``) if absent."""
        reply = self._call(FrameType.OPEN, FrameType.OPENED, name.encode("ascii"))
        size, flags = OPENED.unpack(reply.payload)
        return OpenedExport(reply.handle, size, bool(flags & EXPORT_WRITABLE))

    def list(self) -> list[ExportInfo]:
        """The server's exports."""
        return decode_listing(self._call(FrameType.LIST, FrameType.LISTING).payload)

    def ping(self) -> None:
        """One round trip."""
        self._call(FrameType.PING, FrameType.PONG)

    def read(self, handle: int, groups: Sequence[tuple[int, Sequence[memoryview]]], *,
             urgent: bool = False, window: int = 64) -> None:
        """Read each ``(offset, buffers)`` group (at most ``MAX_READ`` bytes, received into the
        buffers in order), with up to ``window`` requests in flight.

        Raises the first :class:`RemoteError` the server answered once every reply is in (the
        connection stays usable), or the socket or protocol error that broke the connection.
        """
        window = max(1, min(window, MAX_INFLIGHT))
        flags = FLAG_URGENT if urgent else 0
        pending: dict[int, _Pending] = {}
        first: RemoteError | None = None
        i = 0
        try:
            while i < len(groups) or pending:
                if i < len(groups) and len(pending) <= window // 2:
                    out = bytearray()
                    while i < len(groups) and len(pending) < window:
                        off, targets = groups[i]
                        total = sum(len(t) for t in targets)
                        rid = self._new_id()
                        out += FRAME.pack(_READ, flags, 0, rid, handle, total, off)
                        pending[rid] = _Pending(handle, off, targets, total)
                        i += 1
                    self.sock.sendall(out)
                err = self._receive_data(pending)
                if err is not None and first is None:
                    first = err
        except BaseException:
            self.broken = True
            raise
        if first is not None:
            raise first

    def _receive_data(self, pending: dict[int, _Pending]) -> RemoteError | None:
        type_, flags, code, rid, handle, length, offset = self._header()
        p = pending.get(rid)
        if type_ == _DATA:
            if p is None or handle != p.handle:
                raise ProtocolError(f"{self.peer} sent DATA for request {rid}, which is not in "
                                    "flight")
            if offset != p.offset + p.done or length > p.total - p.done:
                raise ProtocolError(
                    f"{self.peer} sent bytes [{offset}, {offset + length}) for request {rid}, "
                    f"which expects [{p.offset + p.done}, {p.offset + p.total})")
            left = length
            while left:
                t = p.targets[p.tidx]
                k = min(len(t) - p.tpos, left)
                self._recv_into(t[p.tpos:p.tpos + k])
                left -= k
                p.tpos += k
                if p.tpos == len(t):
                    p.tidx += 1
                    p.tpos = 0
            p.done += length
            if not flags & FLAG_MORE:
                if p.done != p.total:
                    raise ProtocolError(f"{self.peer} ended request {rid} after {p.done} of "
                                        f"{p.total} bytes")
                del pending[rid]
            return None
        if type_ == _ERROR:
            err = self._error(Frame(type_, flags, code, rid, handle, length, offset,
                                    self._payload(length)))
            if rid == 0:
                raise err
            if p is None:
                raise ProtocolError(f"{self.peer} sent ERROR for request {rid}, which is not "
                                    "in flight")
            del pending[rid]
            err.offset, err.length = p.offset, p.total
            return err
        raise ProtocolError(f"{self.peer} answered a READ with {FrameType(type_).name}")

    def write(self, handle: int, offset: int, data: memoryview) -> None:
        """Store ``data`` at ``offset`` (in ``MAX_WRITE`` pieces, pipelined); returns once the
        server has stored all of it."""
        ids: dict[int, int] = {}
        first: RemoteError | None = None
        try:
            for pos in range(0, len(data), MAX_WRITE):
                piece = data[pos:pos + MAX_WRITE]
                rid = self._new_id()
                self.sock.sendall(FRAME.pack(FrameType.WRITE, 0, 0, rid, handle, len(piece),
                                             offset + pos))
                self.sock.sendall(piece)
                ids[rid] = offset + pos
            while ids:
                reply = self.receive()
                if reply.type == _ERROR and reply.id == 0:
                    raise self._error(reply)
                if reply.id not in ids or reply.type not in (FrameType.DONE, _ERROR):
                    raise ProtocolError(f"{self.peer} answered a WRITE with "
                                        f"{FrameType(reply.type).name} {reply.id}")
                del ids[reply.id]
                if reply.type == _ERROR and first is None:
                    first = self._error(reply)
        except BaseException:
            self.broken = True
            raise
        if first is not None:
            raise first

    def close(self) -> None:
        """Close the socket; idempotent."""
        self.broken = True
        try:
            self.sock.close()
        except OSError:
            pass


def _refusal(code: int) -> str:
    reasons: dict[int, str] = {
        ErrorCode.RATE_LIMITED: "too many failed authentications from this address; wait and "
                                "check the secret",
        ErrorCode.BUSY: "it has too many connections",
        ErrorCode.SHUTTING_DOWN: "it is shutting down",
        ErrorCode.VERSION: "it does not speak our protocol version",
        ErrorCode.BAD_FRAME: "our handshake was malformed",
    }
    return f"{reasons.get(code, 'refused')} ({ErrorCode.describe(code)})"
