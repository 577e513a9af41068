"""The Firecracker UFFD snapshot handshake: receive the userfaultfd and the guest regions.

When Firecracker restores a snapshot with ``mem_backend: {"backend_type": "Uffd", ...}`` it
connects to the handler's Unix socket and sends exactly one message: the userfaultfd as
``SCM_RIGHTS`` ancillary data, and as the payload a JSON array with one object per guest
memory region::

    [{"base_host_virt_addr": 140234..., "size": 134217728, "offset": 0,
      "page_size": 4096, "page_size_kib": 4096}]

``base_host_virt_addr`` is where the region lives in the VMM's address space, ``offset`` is
where its contents start in the snapshot memory file, ``page_size`` is the guest page size in
bytes. ``page_size_kib`` is a deprecated alias which, despite its name, also holds *bytes*; it
is used only when ``page_size`` is absent, and must agree with it when both are sent.

Everything in the message is untrusted. :func:`parse_mappings` checks it completely and
raises :class:`FirecrackerProtocolError` (a :class:`ValueError`) naming the region index, the
field and what was wrong; it never raises anything else, whatever the bytes. Unknown extra keys
in a region object are ignored so that a newer Firecracker adding fields keeps working;
duplicate known keys are refused because the message would be ambiguous.

:func:`receive_handshake` does the socket side in pure Python: one ``recvmsg`` with room for
the fd, more reads if the JSON arrives in pieces, and ``SO_PEERCRED`` so the caller can log
which VMM connected.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import json
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_REGIONS",
    "SUPPORTED_PAGE_SIZES",
    "FirecrackerProtocolError",
    "GuestRegion",
    "PeerCred",
    "parse_mappings",
    "receive_handshake",
]

#: Guest page sizes Firecracker uses: 4 KiB, and 2 MiB with hugetlbfs-backed guest memory.
SUPPORTED_PAGE_SIZES = frozenset({4096, 2 * 1024 * 1024})
#: The most regions one handshake may describe (Firecracker sends a handful).
MAX_REGIONS = 1024
#: The largest handshake payload accepted, in bytes (1024 regions fit with room to spare).
MAX_MESSAGE_BYTES = 256 * 1024
_U64_LIMIT = 1 << 64
_FIELDS = ("base_host_virt_addr", "size", "offset", "page_size", "page_size_kib")
_STRUCT_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_FD_SIZE = array.array("i").itemsize
_MAX_FDS = 8  # room for a misbehaving peer's extra fds, so that we can close them


class FirecrackerProtocolError(ValueError):
    """The VMM's handshake was malformed, hostile, or did not arrive in time."""


@dataclass(frozen=True)
class GuestRegion:
    """One guest memory region as announced by the VMM.

    Attributes:
        base_host_virt_addr: start of the region in the VMM's address space.
        size: length in bytes, a multiple of ``page_size``.
        offset: where the region's contents start in the snapshot memory file.
        page_size: the guest page size in bytes (4096 or 2097152).
    """

    base_host_virt_addr: int
    size: int
    offset: int
    page_size: int

    @property
    def end(self) -> int:
        """One past the last host address of the region."""
        return self.base_host_virt_addr + self.size

    def contains(self, addr: int) -> bool:
        """Whether host address ``addr`` falls inside the region."""
        return self.base_host_virt_addr <= addr < self.end

    def page_of(self, addr: int) -> tuple[int, int]:
        """Return ``(page_host_addr, file_offset)`` of the page holding host address ``addr``.

        ``page_host_addr`` is ``addr`` rounded down to the region's page size, and
        ``file_offset`` is where that page's contents are in the memory file.

        Raises:
            ValueError: ``addr`` is outside the region.
        """
        if not self.contains(addr):
            raise ValueError(
                f"address {addr:#x} is outside region "
                f"[{self.base_host_virt_addr:#x}, {self.end:#x})"
            )
        page = addr - (addr - self.base_host_virt_addr) % self.page_size
        return page, page - self.base_host_virt_addr + self.offset


class PeerCred(NamedTuple):
    """Credentials of the process at the other end of a Unix socket (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")


def _pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``object_pairs_hook`` for json: remember duplicate keys instead of silently dropping."""
    result: dict[str, object] = {}
    dups: list[str] = []
    for key, value in pairs:
        if key in result:
            dups.append(key)
        result[key] = value
    if dups:
        result["\x00duplicates"] = dups
    return result


def _decode(data: bytes) -> object:
    if len(data) > MAX_MESSAGE_BYTES:
        raise FirecrackerProtocolError(
            f"handshake is {len(data)} bytes, more than the {MAX_MESSAGE_BYTES} accepted"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FirecrackerProtocolError(
            f"handshake is not valid UTF-8 (byte {err.start}: {err.reason})"
        ) from None
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise FirecrackerProtocolError(
            f"handshake is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    except RecursionError:
        raise FirecrackerProtocolError("handshake JSON is nested too deeply") from None
    except ValueError as err:  # NaN/Infinity, or an integer with too many digits
        raise FirecrackerProtocolError(f"handshake is not valid JSON: {err}") from None


def _u64(index: int, obj: dict[str, object], field: str) -> int | None:
    if field not in obj:
        return None
    value = obj[field]
    # bool is an int subclass: refuse it explicitly, and floats even when integral.
    if type(value) is not int:
        raise FirecrackerProtocolError(
            f"region {index}: field {field!r} must be a non-negative integer, "
            f"got {type(value).__name__} {_short(value)}"
        )
    if value < 0:
        raise FirecrackerProtocolError(f"region {index}: field {field!r} is negative ({value})")
    if value >= _U64_LIMIT:
        raise FirecrackerProtocolError(
            f"region {index}: field {field!r} does not fit in 64 bits ({_short(value)})"
        )
    return value


def _short(value: object) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "<huge int>"
    return text if len(text) <= 40 else text[:37] + "..."


def _region(index: int, item: object, mem_file_size: int | None) -> GuestRegion:
    if not isinstance(item, dict):
        raise FirecrackerProtocolError(
            f"region {index}: expected a JSON object, got {_json_kind(item)}"
        )
    dups = item.get("\x00duplicates")
    if isinstance(dups, list):
        known = sorted({d for d in dups if d in _FIELDS})
        if known:
            raise FirecrackerProtocolError(
                f"region {index}: field {known[0]!r} appears more than once"
            )
    fields: dict[str, int] = {}
    for field in ("base_host_virt_addr", "size", "offset"):
        value = _u64(index, item, field)
        if value is None:
            raise FirecrackerProtocolError(f"region {index}: field {field!r} is missing")
        fields[field] = value
    page_size = _u64(index, item, "page_size")
    page_size_kib = _u64(index, item, "page_size_kib")
    if page_size is None and page_size_kib is None:
        raise FirecrackerProtocolError(
            f"region {index}: field 'page_size' is missing (and no 'page_size_kib' either)"
        )
    if page_size is not None and page_size_kib is not None and page_size != page_size_kib:
        raise FirecrackerProtocolError(
            f"region {index}: field 'page_size' ({page_size}) disagrees with the deprecated "
            f"'page_size_kib' ({page_size_kib}); both hold bytes"
        )
    psize = page_size if page_size is not None else page_size_kib
    pfield = "page_size" if page_size is not None else "page_size_kib"
    assert psize is not None
    if psize not in SUPPORTED_PAGE_SIZES:
        raise FirecrackerProtocolError(
            f"region {index}: field {pfield!r} is {psize}, not one of "
            f"{sorted(SUPPORTED_PAGE_SIZES)} (bytes)"
        )
    base, size, offset = fields["base_host_virt_addr"], fields["size"], fields["offset"]
    if size == 0:
        raise FirecrackerProtocolError(f"region {index}: field 'size' is 0")
    for field in ("base_host_virt_addr", "size", "offset"):
        if fields[field] % psize:
            raise FirecrackerProtocolError(
                f"region {index}: field {field!r} ({fields[field]:#x}) is not a multiple of "
                f"the page size {psize}"
            )
    if base + size > _U64_LIMIT:
        raise FirecrackerProtocolError(
            f"region {index}: field 'size' ({size:#x}) runs past the end of the address space "
            f"from base {base:#x}"
        )
    if mem_file_size is not None and offset + size > mem_file_size:
        raise FirecrackerProtocolError(
            f"region {index}: field 'offset' ({offset:#x}) + 'size' ({size:#x}) = "
            f"{offset + size:#x} runs past the end of the memory file ({mem_file_size:#x} bytes)"
        )
    return GuestRegion(base, size, offset, psize)


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean", int: "a number", float: "a number", str: "a string",
        list: "an array", dict: "an object",
    }.get(type(value), type(value).__name__)


def parse_mappings(data: bytes, *, mem_file_size: int | None) -> list[GuestRegion]:
    """Parse and validate the JSON region list of a Firecracker UFFD handshake.

    Args:
        data: the raw payload, UTF-8 JSON.
        mem_file_size: size in bytes of the snapshot memory file, to check every region's
            ``[offset, offset + size)`` lies inside it; ``None`` skips that check.

    Returns:
        The regions in the order the VMM sent them.

    Raises:
        FirecrackerProtocolError: anything wrong with the message; the message names the
            region index and the field. No other exception escapes, whatever ``data`` holds.
    """
    if mem_file_size is not None and (type(mem_file_size) is not int or mem_file_size < 0):
        raise TypeError("mem_file_size must be a non-negative int or None")
    doc = _decode(bytes(data))
    if not isinstance(doc, list):
        raise FirecrackerProtocolError(
            f"handshake must be a JSON array of region objects, got {_json_kind(doc)}"
        )
    if not doc:
        raise FirecrackerProtocolError("handshake describes no regions (empty array)")
    if len(doc) > MAX_REGIONS:
        raise FirecrackerProtocolError(
            f"handshake describes {len(doc)} regions, more than the {MAX_REGIONS} accepted"
        )
    regions = [_region(i, item, mem_file_size) for i, item in enumerate(doc)]
    order = sorted(range(len(regions)), key=lambda i: regions[i].base_host_virt_addr)
    for prev, cur in itertools.pairwise(order):
        if regions[cur].base_host_virt_addr < regions[prev].end:
            a, b = sorted((prev, cur))
            raise FirecrackerProtocolError(
                f"region {b}: field 'base_host_virt_addr' overlaps region {a} "
                f"([{regions[b].base_host_virt_addr:#x}, {regions[b].end:#x}) and "
                f"[{regions[a].base_host_virt_addr:#x}, {regions[a].end:#x}))"
            )
    return regions


def _peer_cred(conn: socket.socket) -> PeerCred:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _STRUCT_UCRED.size)
    pid, uid, gid = _STRUCT_UCRED.unpack(raw)
    return PeerCred(pid, uid, gid)


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    return fds


def _json_state(data: bytes) -> str:
    """Classify a payload read so far: ``"complete"``, ``"incomplete"`` or ``"invalid"``.

    ``"incomplete"`` means more bytes could still make it valid JSON (a truncated UTF-8
    sequence, or a syntax error found at the very end or inside an unterminated string).
    The test is a heuristic (a split inside ``true``/``null`` is seen as invalid); it only
    decides whether to keep reading, and :func:`parse_mappings` has the final word.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        return "incomplete" if err.end == len(data) and len(data) - err.start < 4 else "invalid"
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        if err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string"):
            return "incomplete"
        return "invalid"
    except (ValueError, RecursionError):
        return "invalid"
    return "complete"


def receive_handshake(
    conn: socket.socket, timeout: float | None = 5.0
) -> tuple[int, bytes, PeerCred]:
    """Receive the VMM's userfaultfd, its raw region JSON, and its credentials.

    Reads from a connected ``AF_UNIX`` stream socket until exactly one fd has arrived with
    ``SCM_RIGHTS`` and the payload parses as JSON (Firecracker sends both in one ``sendmsg``;
    a payload split across reads is reassembled). The payload is returned unvalidated: pass it
    to :func:`parse_mappings`. The socket's own timeout is restored afterwards.

    Args:
        conn: the accepted connection from the VMM.
        timeout: seconds for the whole handshake; ``None`` waits forever.

    Returns:
        ``(uffd, payload, peer)``: the received fd (the caller owns and must close it), the
        JSON bytes, and the peer's pid/uid/gid from ``SO_PEERCRED`` for logging.

    Raises:
        FirecrackerProtocolError: no fd or several fds were sent, the ancillary data was
            truncated (``MSG_CTRUNC``), the peer closed before a complete message, the payload
            exceeded :data:`MAX_MESSAGE_BYTES`, or the deadline passed. Every fd received is
            closed before raising.
        OSError: the socket itself failed.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    old_timeout = conn.gettimeout()
    fds: list[int] = []
    data = bytearray()
    ok = False
    try:
        peer = _peer_cred(conn)
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FirecrackerProtocolError(
                        f"handshake timed out after {timeout}s "
                        f"({len(data)} bytes and {len(fds)} fd(s) received)"
                    )
                conn.settimeout(left)
            else:
                conn.settimeout(None)
            try:
                chunk, ancdata, flags, _addr = conn.recvmsg(
                    MAX_MESSAGE_BYTES + 1 - len(data), socket.CMSG_SPACE(_MAX_FDS * _FD_SIZE)
                )
            except TimeoutError:
                continue  # loop re-checks the deadline and reports
            fds.extend(_fds_from(ancdata))
            if flags & socket.MSG_CTRUNC:
                raise FirecrackerProtocolError(
                    "handshake ancillary data was truncated (MSG_CTRUNC): the peer sent more "
                    "control data than one userfaultfd"
                )
            if len(fds) > 1:
                raise FirecrackerProtocolError(
                    f"handshake carried {len(fds)} file descriptors, expected exactly one "
                    "(the userfaultfd)"
                )
            if not chunk:
                if not fds:
                    raise FirecrackerProtocolError(
                        f"peer closed the connection after {len(data)} bytes without sending "
                        "the userfaultfd"
                    )
                if not data.strip():
                    raise FirecrackerProtocolError(
                        "peer closed the connection after sending the userfaultfd but no "
                        "region JSON"
                    )
                ok = True  # peer stopped sending: parse_mappings reports what is wrong
                return fds[0], bytes(data), peer
            data += chunk
            if len(data) > MAX_MESSAGE_BYTES:
                raise FirecrackerProtocolError(
                    f"handshake payload exceeds {MAX_MESSAGE_BYTES} bytes"
                )
            if fds and _json_state(bytes(data)) != "incomplete":
                ok = True
                return fds[0], bytes(data), peer
    finally:
        if not ok:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        with contextlib.suppress(OSError):
            conn.settimeout(old_timeout)
