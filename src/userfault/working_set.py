"""Working sets: the pages a run touched, in first-touch order, and what they were touched in.

A working set is recorded once (from a trace, :func:`from_trace`, or a fault log,
:func:`from_faults`) and installed in one batch by the next run (``pager.prefetch(
ws.ranges())``), REAP- and FaaSnap-style. It carries the identity of what it was recorded
against, so that :meth:`WorkingSet.check_compatible` can refuse a record made for another
source or page size, and tolerate drift (pages now beyond the source's end are dropped and
counted).

File format (little-endian), version 1::

    offset 0    8 bytes   magic b"UFWSET\\0\\0"
    offset 8    u32       format version (1)
    offset 12   u32       M, length of the metadata block
    offset 16   M bytes   UTF-8 JSON object: source, source_size, page_size, fingerprint
                          (or null), count, userfault_version, created_unix_ns; padded with
                          spaces so that the offsets start at a multiple of 8
    offset 16+M count x u64  source offsets of the pages, page aligned, unique, first-touch
                          order

:func:`read_working_set` also reads the Firecracker pager's older files (magic
``b"UFFCWS1\\0"``: the magic, a u64 page size, a u64 count, then the offsets), which hold
only a page size and the offsets: such a set has no source identity, so only its page size is
checked.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import struct
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    from .pager import FaultRecord
    from .trace.reader import Trace

__all__ = [
    "FIRECRACKER_MAGIC",
    "MAGIC",
    "VERSION",
    "WorkingSet",
    "WorkingSetMismatch",
    "describe",
    "fingerprint",
    "from_faults",
    "from_trace",
    "read_working_set",
    "write_working_set",
]

MAGIC: Final = b"UFWSET\0\0"
VERSION: Final = 1
FIRECRACKER_MAGIC: Final = b"UFFCWS1\0"
_HEADER = struct.Struct("<8sII")
_FC_HEADER = struct.Struct("<8sQQ")
_MAX_META = 1 << 20
# UFFD_PAGEFAULT_FLAG_WP: a write to a present, protected page is no first touch
_FLAG_WP = 1 << 1

Order = Literal["first-touch", "sorted"]


class WorkingSetMismatch(ValueError):
    """A working set that does not belong to this source or page size."""


@dataclass(frozen=True)
class WorkingSet:
    """Page offsets in first-touch order, and what they were recorded against."""

    #: source offsets, page aligned, unique, in first-touch order
    offsets: tuple[int, ...]
    page_size: int
    #: description of the recorded source (``None``: unknown, an old Firecracker file)
    source: str | None = None
    #: the source's size in bytes when recorded (``None``: unknown)
    source_size: int | None = None
    fingerprint: str | None = None
    #: pages :meth:`check_compatible` dropped because they lie beyond the source's end
    dropped: int = 0
    #: ``"userfault"`` or ``"firecracker"`` (the old format it was read from)
    format: str = "userfault"

    def __post_init__(self) -> None:
        page = self.page_size
        if page < 4096 or page & (page - 1):
            raise ValueError(f"page size {page} is not a power of two >= 4096")
        bad = next((o for o in self.offsets if o < 0 or o % page), None)
        if bad is not None:
            raise ValueError(f"offset {bad} is not a non-negative multiple of the page size "
                             f"{page}")
        if len(set(self.offsets)) != len(self.offsets):
            raise ValueError("offsets must be unique (a working set lists each page once)")

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def nbytes(self) -> int:
        """Bytes the set installs."""
        return len(self.offsets) * self.page_size

    def ranges(self, max_gap: int = 0, order: Order = "first-touch") -> list[tuple[int, int]]:
        """The pages as ``(offset, length)`` ranges for ``pager.prefetch``.

        ``order="first-touch"`` keeps the recorded order and merges a page into the range
        before it when it follows that range's end within ``max_gap`` bytes; ``"sorted"``
        merges in address order (fewer, larger ranges; the order of the run is lost). Gaps
        no wider than ``max_gap`` are installed too: one install ioctl costs about as much as
        copying a few pages, so bridging small gaps makes a scattered batch faster.
        """
        if max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, not {max_gap}")
        page = self.page_size
        offsets: Iterable[int] = sorted(self.offsets) if order == "sorted" else self.offsets
        if order not in ("first-touch", "sorted"):
            raise ValueError(f"order must be 'first-touch' or 'sorted', not {order!r}")
        runs: list[list[int]] = []
        bridged: set[int] = set()  # pages a bridged gap already covers (first-touch order)
        for off in offsets:
            if off in bridged:
                continue
            if runs and runs[-1][1] <= off <= runs[-1][1] + max_gap:
                last = runs[-1]
                if order == "first-touch":
                    bridged.update(range(last[1], off, page))
                last[1] = off + page
            else:
                runs.append([off, off + page])
        return [(start, end - start) for start, end in runs]

    def check_compatible(self, source_size: int, page_size: int,
                         description: str | None = None, *, fingerprint: str | None = None,
                         force: bool = False) -> WorkingSet:
        """This set, checked against the source it is about to be used with.

        Returns the set without the pages that now lie beyond ``source_size`` (their count
        in :attr:`dropped`): a source that grew or shrank is drift, tolerated.

        Raises:
            WorkingSetMismatch: another page size (never allowed); another description or
                content fingerprint than recorded, unless ``force``. Unknown identities
                (``None`` on either side) are not compared.
        """
        if page_size != self.page_size:
            raise WorkingSetMismatch(
                f"the working set was recorded with {self.page_size}-byte pages, this pager "
                f"uses {page_size}-byte pages: record a new working set for it")
        if not force and None not in (description, self.source) and description != self.source:
            raise WorkingSetMismatch(
                f"the working set was recorded against {self.source!r}, not {description!r}: "
                "record a new one, or force its use (force_prefetch=True, --force-prefetch)")
        if not force and None not in (fingerprint, self.fingerprint) \
                and fingerprint != self.fingerprint:
            raise WorkingSetMismatch(
                f"the source's content changed since the working set was recorded (fingerprint "
                f"{self.fingerprint}, now {fingerprint}): record a new one, or force its use "
                "(force_prefetch=True, --force-prefetch)")
        end = -(-source_size // page_size) * page_size
        kept = tuple(o for o in self.offsets if o < end)
        return replace(self, offsets=kept, dropped=len(self.offsets) - len(kept))


def from_trace(trace: Trace, *, installs: Iterable[int] = ()) -> WorkingSet:
    """The pages a trace's threads faulted (FAULT events of kind read, write or minor), in
    the order of their first fault; identity from the trace's metadata.

    ``installs`` names other causes whose installed pages count as touched too, every page
    of their ``length`` (e.g. ``(Cause.READAHEAD,)``: a run traced with readahead faults only
    on the first page of each window; including the windows over-approximates the set by
    what readahead fetched and nobody read).
    """
    import numpy as np

    from .trace.format import Cause, Kind

    meta = trace.meta
    page = np.uint64(meta.page_size)
    ev = trace.records
    faults = ev[(ev["cause"] == Cause.FAULT)
                & np.isin(ev["kind"], (Kind.READ, Kind.WRITE, Kind.MINOR))]
    times, pages = faults["t_ns"], faults["offset"] - faults["offset"] % page
    extra = ev[np.isin(ev["cause"], [int(c) for c in installs])]
    if len(extra):
        first = extra["offset"] - extra["offset"] % page
        n = np.maximum((extra["offset"] + extra["length"] - first + page - 1) // page,
                       1).astype(np.int64)
        within = (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)).astype(np.uint64)
        times = np.concatenate([times, np.repeat(extra["t_ns"], n)])
        pages = np.concatenate([pages, np.repeat(first, n) + within * page])
    order = np.argsort(times, kind="stable")  # threads append slightly out of time order
    pages = pages[order]
    _, idx = np.unique(pages, return_index=True)
    touched = pages[np.sort(idx)]
    return WorkingSet(tuple(touched.tolist()), meta.page_size, source=meta.source,
                      source_size=meta.region_size if meta.source_size is None
                      else meta.source_size, fingerprint=meta.fingerprint)


def from_faults(faults: Iterable[FaultRecord], *, page_size: int, source: str | None,
                source_size: int | None, fingerprint: str | None = None) -> WorkingSet:
    """The pages of a fault log (:meth:`userfault.Pager.faults`) in first-fault order.
    Write-protect faults (writes to present pages) are left out."""
    seen: dict[int, None] = {}
    for f in sorted((f for f in faults if not f.flags & _FLAG_WP), key=lambda f: f.time_ns):
        seen.setdefault(f.offset - f.offset % page_size, None)
    return WorkingSet(tuple(seen), page_size, source=source, source_size=source_size,
                      fingerprint=fingerprint)


def fingerprint(path: str | os.PathLike[str], samples: int = 16, sample_size: int = 4096
                ) -> str:
    """A cheap content fingerprint of a file: BLAKE2b of its size and of ``samples`` blocks
    at evenly spaced offsets (the first and the last included). It notices a replaced or
    resized file, not every edit."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(size.to_bytes(8, "little"))
        span = max(size - sample_size, 0)
        for i in range(samples):
            f.seek(span * i // max(samples - 1, 1))
            h.update(f.read(sample_size))
    return f"sample-blake2b:{h.hexdigest()}"


def write_working_set(path: str | os.PathLike[str], ws: WorkingSet) -> int:
    """Write ``ws`` to ``path`` atomically (a temporary file, then rename); return the number
    of pages written."""
    from . import __version__

    meta = {"source": ws.source, "source_size": ws.source_size, "page_size": ws.page_size,
            "fingerprint": ws.fingerprint, "count": len(ws.offsets),
            "userfault_version": __version__, "created_unix_ns": time.time_ns()}
    body = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    body += b" " * (-(_HEADER.size + len(body)) % 8)
    offsets = array.array("Q", ws.offsets)
    if sys.byteorder != "little":  # pragma: no cover
        offsets.byteswap()
    name = os.fspath(path)
    tmp = f"{name}.tmp.{os.getpid()}.{threading.get_ident()}"
    try:
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, len(body)) + body)
            f.write(offsets.tobytes())
        os.replace(tmp, name)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(ws.offsets)


def _offsets(data: bytes | memoryview, start: int, count: int) -> tuple[int, ...]:
    values = array.array("Q")
    values.frombytes(data[start: start + 8 * count])
    if sys.byteorder != "little":  # pragma: no cover
        values.byteswap()
    return tuple(values)


def read_working_set(path: str | os.PathLike[str]) -> WorkingSet:
    """Read a working-set file: this module's format or the Firecracker pager's older one.

    The file is checked before anything large is read: a FIFO or device is refused unopened,
    a count the file cannot hold is refused before the offsets are read.

    Raises:
        OSError: the file cannot be opened.
        ValueError: not a regular file, not a working-set file, an unsupported version,
            truncated or corrupt.
    """
    from ._files import open_regular

    name = os.fspath(path)
    fd = open_regular(os.fsdecode(name), advice="name a working-set file written by record= "
                      "or --record")
    try:
        size = os.fstat(fd).st_size

        def read(n: int, at: int) -> bytes:
            data = os.pread(fd, n, at)
            if len(data) != n:
                raise ValueError(f"{name!r} changed while being read")
            return data

        if size < _FC_HEADER.size:
            raise ValueError(f"{name!r} is too short to be a working-set file")
        head = read(_FC_HEADER.size, 0)
        if head[:8] == FIRECRACKER_MAGIC:
            _, page, count = _FC_HEADER.unpack(head)
            meta: dict[str, Any] = {}
            start, fmt = _FC_HEADER.size, "firecracker"
        elif head[:8] == MAGIC:
            _, version, meta_len = _HEADER.unpack_from(head)
            if version != VERSION:
                raise ValueError(f"{name!r}: working-set format version {version} is not "
                                 f"supported (this userfault reads version {VERSION})")
            start, fmt = _HEADER.size + meta_len, "userfault"
            if meta_len > _MAX_META or size < start:
                raise ValueError(f"{name!r}: truncated or corrupt working-set header "
                                 f"(metadata of {meta_len} bytes)")
            try:
                meta = json.loads(read(meta_len, _HEADER.size).decode())
                count, page = int(meta["count"]), int(meta["page_size"])
            except (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as err:
                raise ValueError(f"{name!r}: corrupt working-set metadata ({err!r})") from None
        else:
            raise ValueError(f"{name!r} is not a working-set file (magic {head[:8]!r}, "
                             f"expected {MAGIC!r} or the Firecracker pager's "
                             f"{FIRECRACKER_MAGIC!r})")
        if size != start + 8 * count:  # checked before reading: no huge reads
            raise ValueError(f"{name!r}: the header says {count} pages, the file holds "
                             f"{(size - start) / 8:g} (truncated or corrupt)")
        offsets = _offsets(read(8 * count, start), 0, count)
    finally:
        os.close(fd)
    try:
        return WorkingSet(offsets, page, format=fmt,
                          source=None if meta.get("source") is None else str(meta["source"]),
                          source_size=None if meta.get("source_size") is None
                          else int(meta["source_size"]),
                          fingerprint=None if meta.get("fingerprint") is None
                          else str(meta["fingerprint"]))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{name!r}: corrupt working set: {err}") from None


def describe(ws: WorkingSet, max_gap: int = 0) -> list[tuple[str, str]]:
    """Rows for ``userfault workingset inspect``."""
    from ._units import human

    ranges = ws.ranges(max_gap)
    rows = [
        ("format", f"{ws.format} (version {VERSION if ws.format == 'userfault' else 1})"),
        ("source", ws.source if ws.source is not None else "(not recorded)"),
        ("source size", "(not recorded)" if ws.source_size is None
         else f"{ws.source_size} bytes ({human(ws.source_size)})"),
        ("page size", f"{ws.page_size} bytes ({human(ws.page_size)})"),
        ("fingerprint", ws.fingerprint or "(none)"),
        ("pages", f"{len(ws)} ({human(ws.nbytes)})"),
        ("ranges", f"{len(ranges)} in first-touch order, {len(ws.ranges(max_gap, 'sorted'))} "
                   "sorted"),
    ]
    if ws.offsets:
        rows.append(("first pages", ", ".join(f"{o:#x}" for o in ws.offsets[:8])
                     + (" ..." if len(ws) > 8 else "")))
    return rows
