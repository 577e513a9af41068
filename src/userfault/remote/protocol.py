"""The page server's wire protocol, version 1: messages, limits and a validating frame reader.

Everything is little-endian. A connection (TCP, optionally TLS, or a Unix stream socket) starts
with a three-message handshake, then carries frames.

Handshake (see :mod:`userfault.remote.auth` for the proofs)::

    server -> client  HELLO    52 bytes  magic "UFREMOTE", code u16, version_min u16,
                                         version_max u16, reserved u16 (0), features u32,
                                         server nonce 32 bytes
    client -> server  AUTH     80 bytes  magic, version u16, reserved u16 (0), features u32,
                                         client nonce 32 bytes, client proof 32 bytes
    server -> client  WELCOME  40 bytes  code u16, reserved u16 (0), features u32,
                                         server proof 32 bytes (zeros unless code is 0)

A HELLO with a non-zero ``code`` (``RATE_LIMITED``, ``BUSY``, ``SHUTTING_DOWN``) is a refusal:
its nonce is zeros and the server closes. The client proves first; a server that is not
satisfied answers ``WELCOME`` with ``AUTH_FAILED`` (after a per-peer delay) and closes, so a
client without the secret receives nothing but these two fixed messages: no export names, no
sizes, no data. The client checks the server's proof before it sends a request.

Frames (both directions) have one 24-byte header::

    type u8 | flags u8 | code u16 | id u32 | handle u32 | length u32 | offset u64

``length`` counts the payload bytes that follow, except in ``READ`` requests, where it is the
number of bytes asked for and nothing follows. Requests (client -> server):

=========  ====  ==============================================================================
type       code  meaning
=========  ====  ==============================================================================
``OPEN``   1     payload: an export name; reply ``OPENED``
``READ``   2     ``handle``, ``offset``, ``length`` (1..``MAX_READ``); reply ``DATA`` pieces
``WRITE``  3     ``handle``, ``offset``, payload (1..``MAX_WRITE`` bytes); reply ``DONE``
``LIST``   4     no payload; reply ``LISTING``
``PING``   5     no payload; reply ``PONG``
=========  ====  ==============================================================================

Replies (server -> client) echo the request's ``id``:

============  ====  ===========================================================================
type          code  meaning
============  ====  ===========================================================================
``OPENED``    0x81  ``handle`` (per connection), payload ``size u64, flags u32``
``DATA``      0x82  ``length`` bytes at ``offset``; flag ``MORE`` on every piece but the last
``DONE``      0x83  a ``WRITE`` is stored
``LISTING``   0x84  payload: per export ``name_len u8, name, size u64, flags u32``
``PONG``      0x85  answer to ``PING``
``ERROR``     0xFF  ``code`` (:class:`ErrorCode`), payload: a UTF-8 message; ``id`` 0 means the
                    whole connection (the server closes it after sending)
============  ====  ===========================================================================

Replies to different requests come in any order. WRITEs in flight together may be stored in
any order; a READ sent after a WRITE's ``DONE`` sees its bytes.

A request may set flag ``URGENT``: the server sends it ahead of every transfer in progress on
that connection. Large reads are sent in pieces (256 KiB by default) in offset order; between
two pieces the server serves whatever urgent request has arrived, so a fault read overtakes
readahead or background transfers on the same connection. A client keeps at most
``MAX_INFLIGHT`` requests outstanding per connection (the server stops reading beyond it).

Every field is checked: an unknown type or flag, a non-zero reserved field, a zero id, an id
already in flight, or a length beyond its limit is a protocol error. The server answers it with
``ERROR`` (id 0, ``BAD_FRAME``), logs the reason with the peer and closes that connection only.
A request that is well formed but cannot be served (unknown export, out of range, read-only,
I/O error) gets an ``ERROR`` reply with its id and the connection stays open.

Versions: a server offers ``[version_min, version_max]`` and the client picks one; this module
speaks version 1 only. ``features`` bits are reserved for later versions (must be 0 in v1).
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "AUTH",
    "EXPORT_WRITABLE",
    "FLAG_MORE",
    "FLAG_URGENT",
    "FRAME",
    "HELLO",
    "MAGIC",
    "MAX_HANDLES",
    "MAX_INFLIGHT",
    "MAX_LISTING",
    "MAX_MESSAGE",
    "MAX_NAME",
    "MAX_READ",
    "MAX_WRITE",
    "NONCE_SIZE",
    "OPENED",
    "PROOF_SIZE",
    "VERSION",
    "WELCOME",
    "ErrorCode",
    "ExportInfo",
    "Frame",
    "FrameReader",
    "FrameType",
    "ProtocolError",
    "check_export_name",
    "check_reply",
    "check_request",
    "decode_listing",
    "encode_listing",
    "payload_length",
]

MAGIC = b"UFREMOTE"
VERSION = 1
NONCE_SIZE = 32
PROOF_SIZE = 32

HELLO = struct.Struct("<8sHHHHI32s")
AUTH = struct.Struct("<8sHHI32s32s")
WELCOME = struct.Struct("<HHI32s")
FRAME = struct.Struct("<BBHIIIQ")
OPENED = struct.Struct("<QI")
_LISTING_ENTRY = struct.Struct("<QI")

#: Most bytes one READ may ask for.
MAX_READ = 16 << 20
#: Most payload bytes of one WRITE (the server holds a whole WRITE in memory before storing it).
MAX_WRITE = 4 << 20
#: Longest export name, in bytes.
MAX_NAME = 255
#: Longest ERROR message, in bytes.
MAX_MESSAGE = 1024
#: Largest LISTING payload.
MAX_LISTING = 1 << 20
#: Most requests a client may have outstanding on one connection.
MAX_INFLIGHT = 256
#: Most exports one connection may have open.
MAX_HANDLES = 64

FLAG_URGENT = 0x01  # request: serve ahead of transfers in progress
FLAG_MORE = 0x01  # DATA reply: more pieces of this request follow

EXPORT_WRITABLE = 0x01  # OPENED / LISTING flags: the export accepts WRITE

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class FrameType(enum.IntEnum):
    """The ``type`` byte of a frame."""

    OPEN = 1
    READ = 2
    WRITE = 3
    LIST = 4
    PING = 5
    OPENED = 0x81
    DATA = 0x82
    DONE = 0x83
    LISTING = 0x84
    PONG = 0x85
    ERROR = 0xFF


class ErrorCode(enum.IntEnum):
    """Why a request, a handshake or a connection was refused."""

    OK = 0
    BAD_FRAME = 1
    UNKNOWN_EXPORT = 2
    BAD_HANDLE = 3
    OUT_OF_RANGE = 4
    TOO_LARGE = 5
    READ_ONLY = 6
    IO_ERROR = 7
    AUTH_FAILED = 8
    RATE_LIMITED = 9
    VERSION = 10
    BUSY = 11
    SHUTTING_DOWN = 12
    TIMEOUT = 13
    TOO_MANY_HANDLES = 14
    WITHDRAWN = 15

    @classmethod
    def describe(cls, code: int) -> str:
        """``"NAME (n)"`` for a known code, ``"unknown code n"`` otherwise."""
        try:
            return f"{cls(code).name} ({code})"
        except ValueError:
            return f"unknown code {code}"


class ProtocolError(Exception):
    """A peer sent something this protocol does not allow; the connection must be closed."""


class Frame(NamedTuple):
    """One parsed frame. ``payload`` is empty for READ requests (``length`` is the count)."""

    type: int
    flags: int
    code: int
    id: int
    handle: int
    length: int
    offset: int
    payload: bytes = b""


@dataclass(frozen=True)
class ExportInfo:
    """What a LISTING says about one export."""

    name: str
    size: int
    writable: bool


_REQUESTS = {FrameType.OPEN, FrameType.READ, FrameType.WRITE, FrameType.LIST, FrameType.PING}
_REPLIES = {FrameType.OPENED, FrameType.DATA, FrameType.DONE, FrameType.LISTING,
            FrameType.PONG, FrameType.ERROR}


def _name(t: int) -> str:
    try:
        return FrameType(t).name
    except ValueError:
        return f"type {t:#x}"


def check_request(type_: int, flags: int, code: int, id_: int, handle: int, length: int,
                  offset: int) -> None:
    """Check a request header (client -> server); raise :class:`ProtocolError` if invalid."""
    if type_ not in _REQUESTS:
        raise ProtocolError(f"unknown request type {type_:#x}")
    if flags & ~FLAG_URGENT:
        raise ProtocolError(f"{_name(type_)} with unknown flags {flags:#x}")
    if code:
        raise ProtocolError(f"{_name(type_)} with a non-zero code field ({code})")
    if id_ == 0:
        raise ProtocolError(f"{_name(type_)} with request id 0")
    if type_ == FrameType.READ or type_ == FrameType.WRITE:
        if handle == 0:
            raise ProtocolError(f"{_name(type_)} with handle 0")
        limit = MAX_READ if type_ == FrameType.READ else MAX_WRITE
        if not 1 <= length <= limit:
            raise ProtocolError(f"{_name(type_)} of {length} bytes (must be 1..{limit})")
        return
    if handle or offset:
        raise ProtocolError(f"{_name(type_)} with a non-zero handle or offset")
    if type_ == FrameType.OPEN:
        if not 1 <= length <= MAX_NAME:
            raise ProtocolError(f"OPEN with a {length}-byte name (must be 1..{MAX_NAME})")
    elif length:
        raise ProtocolError(f"{_name(type_)} with a {length}-byte payload (must be empty)")


_REPLY_LIMITS = {FrameType.OPENED: OPENED.size, FrameType.LISTING: MAX_LISTING,
                 FrameType.ERROR: MAX_MESSAGE, FrameType.DONE: 0, FrameType.PONG: 0}


def check_reply(type_: int, flags: int, code: int, id_: int, handle: int, length: int,
                offset: int) -> None:
    """Check a reply header (server -> client); raise :class:`ProtocolError` if invalid."""
    if type_ == FrameType.DATA:  # the common case first
        if flags & ~FLAG_MORE or code or id_ == 0 or handle == 0 or length > MAX_READ:
            raise ProtocolError(f"DATA with flags {flags:#x}, code {code}, id {id_}, handle "
                                f"{handle} and {length} bytes")
        return
    if type_ not in _REPLIES:
        raise ProtocolError(f"unknown reply type {type_:#x}")
    name = _name(type_)
    if flags:
        raise ProtocolError(f"{name} with unknown flags {flags:#x}")
    if (code != 0) != (type_ == FrameType.ERROR):
        raise ProtocolError(f"{name} with code {code}")
    if id_ == 0 and type_ != FrameType.ERROR:
        raise ProtocolError(f"{name} with request id 0")
    if offset or (handle and type_ != FrameType.OPENED):
        raise ProtocolError(f"{name} with a non-zero handle or offset")
    limit = _REPLY_LIMITS[FrameType(type_)]
    if length > limit or (type_ == FrameType.OPENED and length != OPENED.size):
        raise ProtocolError(f"{name} with a {length}-byte payload")
    if type_ == FrameType.OPENED and handle == 0:
        raise ProtocolError("OPENED with handle 0")


def payload_length(type_: int, length: int) -> int:
    """Bytes that follow a header of this type (READ requests carry none)."""
    return 0 if type_ == FrameType.READ else length


class FrameReader:
    """Incremental, validating parser of a byte stream into :class:`Frame` objects.

    ``requests=True`` parses what a server receives, ``False`` what a client receives.
    :meth:`feed` returns the complete frames; bytes of an incomplete frame stay buffered
    (at most one header plus its payload, whose length was checked against its limit first).
    Raises :class:`ProtocolError` on the first invalid header; the reader is then unusable.
    """

    def __init__(self, *, requests: bool) -> None:
        self._check = check_request if requests else check_reply
        self._buf = bytearray()
        self._need = 0  # payload bytes of the frame whose header is at the start of _buf

    @property
    def pending(self) -> int:
        """Bytes buffered towards an incomplete frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add ``data``; return the frames it completes, in order."""
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        pos = 0
        size = FRAME.size
        while len(buf) - pos >= size:
            fields = FRAME.unpack_from(buf, pos)
            self._check(*fields)
            n = payload_length(fields[0], fields[5])
            if len(buf) - pos - size < n:
                break
            type_, flags, code, id_, handle, length, offset = fields
            frames.append(Frame(type_, flags, code, id_, handle, length, offset,
                                bytes(buf[pos + size:pos + size + n])))
            pos += size + n
        if pos:
            del buf[:pos]
        return frames


def check_export_name(name: str) -> str:
    """``name`` if it can name an export: 1..255 ASCII letters, digits, ``.``, ``_``, ``-``,
    starting with a letter or digit (no ``/``, so it fits in a URL path)."""
    if (not isinstance(name, str) or not _NAME.fullmatch(name) or not name.isascii()
            or len(name) > MAX_NAME):
        raise ValueError(f"invalid export name {name!r}: use 1..{MAX_NAME} letters, digits, "
                         "'.', '_' or '-', starting with a letter or digit")
    return name


def encode_listing(exports: list[ExportInfo]) -> bytes:
    """The LISTING payload for ``exports``; raises ``ValueError`` past ``MAX_LISTING``."""
    out = bytearray()
    for e in exports:
        raw = e.name.encode("ascii")
        out += bytes([len(raw)]) + raw + _LISTING_ENTRY.pack(
            e.size, EXPORT_WRITABLE if e.writable else 0)
    if len(out) > MAX_LISTING:
        raise ValueError(f"{len(exports)} exports do not fit in one listing")
    return bytes(out)


def decode_listing(payload: bytes) -> list[ExportInfo]:
    """Parse a LISTING payload; raises :class:`ProtocolError` if it is malformed."""
    out: list[ExportInfo] = []
    pos = 0
    while pos < len(payload):
        n = payload[pos]
        end = pos + 1 + n + _LISTING_ENTRY.size
        if n == 0 or end > len(payload):
            raise ProtocolError(f"a malformed LISTING entry at byte {pos}")
        try:
            name = check_export_name(payload[pos + 1:pos + 1 + n].decode("ascii"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ProtocolError(f"LISTING entry at byte {pos}: {err}") from None
        size, flags = _LISTING_ENTRY.unpack_from(payload, pos + 1 + n)
        out.append(ExportInfo(name, size, bool(flags & EXPORT_WRITABLE)))
        pos = end
    return out
