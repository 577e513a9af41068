"""The trace file format: a header written by Python, then fixed-size records.

Little-endian throughout::

    offset 0    8 bytes   magic b"UFTRACE\\0"
    offset 8    u32       format version (1)
    offset 12   u32       M, length of the metadata block
    offset 16   M bytes   metadata: UTF-8 JSON object (see :class:`TraceMeta`), padded with
                          spaces so that the records start at a multiple of 8
    offset 16+M N x 48    records, appended by the engine (or :class:`TraceWriter`)

One record (``struct`` format ``"<QQQQIIBBHI"``, :data:`RECORD`)::

    0   u64 t_ns        CLOCK_MONOTONIC time of the event (the fault message was read, or
                        the background install started)
    8   u64 offset      source offset of the page, page aligned
    16  u64 address     address of the fault (or of the first installed byte)
    24  u64 length      bytes installed by this event; for cause DROPPED: the number of
                        records dropped since the previous DROPPED record
    32  u32 tid         faulting thread id (0 for background work)
    36  u32 service_ns  time from reading the fault to waking the thread, saturated at 2**32-1
    40  u8  kind        :class:`Kind`
    41  u8  cause       :class:`Cause`
    42  u16 flags       :class:`TraceFlag`
    44  u32 reserved    0

A file may end inside a record (its writer crashed); readers ignore that partial record and
report its size. Versions other than :data:`VERSION` are refused.
"""

from __future__ import annotations

import enum
import json
import os
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Final

__all__ = [
    "HEADER",
    "MAGIC",
    "RECORD",
    "SERVICE_NS_MAX",
    "VERSION",
    "Cause",
    "Kind",
    "TraceError",
    "TraceFlag",
    "TraceMeta",
    "TraceRecord",
    "create_trace",
    "encode_header",
    "kind_from_fault_flags",
    "parse_header",
]

MAGIC: Final = b"UFTRACE\0"
VERSION: Final = 1
HEADER: Final = struct.Struct("<8sII")  # magic, version, metadata length
RECORD: Final = struct.Struct("<QQQQIIBBHI")
SERVICE_NS_MAX: Final = 2**32 - 1
#: a metadata block larger than this is corruption, not metadata
MAX_META: Final = 1 << 20

assert RECORD.size == 48


class Kind(enum.IntEnum):
    """What the event was: the kind of fault, or NONE for a background install."""

    READ = 0
    WRITE = 1
    MINOR = 2
    WP = 3
    NONE = 4


class Cause(enum.IntEnum):
    """Why the event happened."""

    FAULT = 0
    READAHEAD = 1
    PREFETCH = 2
    POPULATE = 3
    EVICT = 4
    WRITEBACK = 5
    #: not an event: ``length`` counts the records dropped since the previous DROPPED record
    DROPPED = 6
    #: a page that could not be served and was poisoned (its access gets SIGBUS)
    POISON = 7


class TraceFlag(enum.IntFlag):
    """Flags of a record. The low byte is the kernel's ``UFFD_PAGEFAULT_FLAG_*`` of the fault."""

    WRITE = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2
    #: the page was already present (another thread installed it): nothing installed here
    EEXIST = 1 << 8
    #: the mapping was changing (EAGAIN): the thread was woken to fault again
    EAGAIN = 1 << 9
    #: held back: the budget was full (max_resident + one eviction batch) until the
    #: evictor's round was over; the thread faulted again then
    HELD = 1 << 10
    #: left to a background piece already reading the page (a Python source): nothing
    #: installed by the fault itself, and its service time runs until the piece was in
    WAITED = 1 << 11


def kind_from_fault_flags(flags: int) -> Kind:
    """The :class:`Kind` of a fault from its ``UFFD_PAGEFAULT_FLAG_*`` bits."""
    if flags & TraceFlag.MINOR:
        return Kind.MINOR
    if flags & TraceFlag.WP:
        return Kind.WP
    if flags & TraceFlag.WRITE:
        return Kind.WRITE
    return Kind.READ


class TraceError(ValueError):
    """A file that is not a readable trace: bad magic, unsupported version, corrupt header."""


@dataclass(frozen=True)
class TraceRecord:
    """One record of a trace (see the module docstring for the fields)."""

    t_ns: int
    offset: int
    address: int
    length: int
    tid: int
    service_ns: int
    kind: Kind
    cause: Cause
    flags: int = 0

    def pack(self) -> bytes:
        """The 48 bytes of this record (``service_ns`` saturated)."""
        return RECORD.pack(self.t_ns, self.offset, self.address, self.length, self.tid,
                           min(self.service_ns, SERVICE_NS_MAX), self.kind, self.cause,
                           self.flags, 0)

    @classmethod
    def unpack(cls, data: bytes | memoryview, offset: int = 0) -> TraceRecord:
        """Decode one record from ``data`` at ``offset``."""
        t, off, addr, length, tid, svc, kind, cause, flags, _ = RECORD.unpack_from(data, offset)
        return cls(t, off, addr, length, tid, svc, _enum(Kind, kind), _enum(Cause, cause), flags)


def _enum(cls: Any, value: int) -> Any:
    """``cls(value)``, or the plain int for a value a newer writer may have added."""
    try:
        return cls(value)
    except ValueError:
        return value


@dataclass(frozen=True)
class TraceMeta:
    """The metadata block: what was traced, where and when.

    Unknown keys of a newer writer are kept in ``extra``.
    """

    #: description of the source (e.g. ``"FileSource('/data/ckpt.safetensors')"``)
    source: str
    #: bytes of the traced region
    region_size: int
    page_size: int
    #: bytes of the source (``None``: the region's size); offsets are below it
    source_size: int | None = None
    #: optional content fingerprint of the source (see :func:`userfault.working_set.fingerprint`)
    fingerprint: str | None = None
    pid: int = 0
    #: CLOCK_MONOTONIC at the start, the clock of the records' ``t_ns``
    start_monotonic_ns: int = 0
    #: wall clock (``time.time_ns()``) at the same instant
    start_unix_ns: int = 0
    command: tuple[str, ...] = ()
    userfault_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def now(cls, source: str, region_size: int, page_size: int, *,
            source_size: int | None = None, fingerprint: str | None = None,
            **extra: Any) -> TraceMeta:
        """Metadata for a trace starting now in this process (pid, clocks, command line)."""
        from .. import __version__

        return cls(source=source, region_size=int(region_size), page_size=int(page_size),
                   source_size=None if source_size is None else int(source_size),
                   fingerprint=fingerprint, pid=os.getpid(), start_monotonic_ns=time.monotonic_ns(),
                   start_unix_ns=time.time_ns(), command=tuple(_command_line()),
                   userfault_version=__version__, extra=dict(extra))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written in the header."""
        d = asdict(self)
        d["command"] = list(self.command)
        extra = d.pop("extra")
        return {**extra, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TraceMeta:
        """Inverse of :meth:`to_dict`; raises ``KeyError``/``TypeError``/``ValueError``."""
        known = {k for k in cls.__dataclass_fields__ if k != "extra"}
        return cls(source=str(d["source"]), region_size=int(d["region_size"]),
                   page_size=int(d["page_size"]),
                   source_size=None if d.get("source_size") is None else int(d["source_size"]),
                   fingerprint=None if d.get("fingerprint") is None else str(d["fingerprint"]),
                   pid=int(d.get("pid", 0)),
                   start_monotonic_ns=int(d.get("start_monotonic_ns", 0)),
                   start_unix_ns=int(d.get("start_unix_ns", 0)),
                   command=tuple(str(a) for a in d.get("command", ())),
                   userfault_version=str(d.get("userfault_version", "")),
                   extra={k: v for k, v in d.items() if k not in known})


def _command_line() -> list[str]:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return list(sys.argv)


def encode_header(meta: TraceMeta) -> bytes:
    """The header bytes for ``meta``; its length is a multiple of 8 (records start aligned)."""
    body = json.dumps(meta.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    body += b" " * (-(HEADER.size + len(body)) % 8)
    return HEADER.pack(MAGIC, VERSION, len(body)) + body


def parse_header(data: bytes, name: str = "trace") -> tuple[TraceMeta, int]:
    """Decode the header at the start of ``data``: ``(meta, offset of the first record)``.

    ``data`` must hold the whole header (read :data:`HEADER` first for its length).

    Raises:
        TraceError: bad magic, unsupported version, truncated or corrupt metadata.
    """
    if len(data) < HEADER.size:
        raise TraceError(f"{name}: too short for a trace header ({len(data)} bytes, a header "
                         f"has at least {HEADER.size})")
    magic, version, meta_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise TraceError(f"{name}: not a userfault trace (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise TraceError(f"{name}: trace format version {version} is not supported (this "
                         f"userfault reads version {VERSION}); use a matching userfault")
    if meta_len > MAX_META:
        raise TraceError(f"{name}: corrupt header: metadata length {meta_len} exceeds "
                         f"{MAX_META} bytes")
    end = HEADER.size + meta_len
    if len(data) < end:
        raise TraceError(f"{name}: truncated header: metadata needs {meta_len} bytes, the "
                         f"file has {len(data) - HEADER.size}")
    try:
        doc = json.loads(data[HEADER.size:end].decode())
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        meta = TraceMeta.from_dict(doc)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError, ValueError) as err:
        what = f"missing key {err}" if isinstance(err, KeyError) else str(err)
        raise TraceError(f"{name}: corrupt header: metadata is not a valid trace description "
                         f"({what})") from None
    if meta.page_size <= 0 or meta.page_size & (meta.page_size - 1):
        raise TraceError(f"{name}: corrupt header: page size {meta.page_size} is not a power "
                         "of two")
    return meta, end


def create_trace(path: str | os.PathLike[str], meta: TraceMeta) -> int:
    """Create (or truncate) ``path``, write its header and return a file descriptor for records.

    The descriptor is opened ``O_WRONLY | O_APPEND | O_CLOEXEC``: a writer (the engine) appends
    whole 48-byte records with ``write(2)``; the caller owns and closes it.
    """
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
                 | os.O_CLOEXEC, 0o644)
    try:
        header = encode_header(meta)
        view = memoryview(header)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return fd
