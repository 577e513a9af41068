"""Live migration of a memory region between two processes, over the page server.

The sender holds the region (a :class:`~userfault.Region`) while its own code keeps writing to
it; the destination ends up with a :class:`~userfault.Pager` holding the same bytes, and runs
as soon as the sender has stopped::

    # sender (host A)
    sender = MigrationSender(region, secret=secret, pause=stop_writers)
    sender.start("tcp://0.0.0.0:7070")
    report = sender.wait()                      # returns once the destination has every page

    # destination (host B)
    with receive("uf://hostA:7070/migration", secret=secret) as incoming:
        mem = incoming.memory                   # usable at once (post-copy)
        report = incoming.wait()                # every page is here; the sender may go

How it goes (everything travels on authenticated page-server connections; the sender is a
:class:`~userfault.remote.PageServer` with three exports: ``NAME`` (the region, read live),
``NAME.round`` (the pages of a pre-copy round, packed) and ``NAME.ctl`` (the migration's
commands: WRITEs of a small export, answered by the bytes read from it afterwards)):

1. **Pre-copy.** A :class:`~userfault.tracking.WriteTracker` write-protects the region
   (``WP_ASYNC``). Round 0 sends every page (resetting each piece's tracking just before its
   copy); each later round sends the pages written since the previous collect
   (``PAGEMAP_SCAN``), packed. The destination pulls them on the bulk lane into a staging
   memfd, shared with its pager process.
2. **Stop.** When a round's dirty set is at most ``max_dirty`` bytes, or after ``max_rounds``
   rounds, the sender calls its ``pause`` hook (which must stop every writer of the region and
   keep them stopped until :meth:`MigrationSender.wait` returns) and collects the last dirty set.
3. **Post-copy.** The destination marks those pages stale and runs at once: its pager serves a
   fault from the staging file, or, for a stale page, pulls it from the sender on the urgent
   lane. A background transfer pulls the remaining stale pages in chunks that grow from 64 KiB
   to 4 MiB and fall back to 64 KiB whenever a fault had to go to the network. When no page is
   stale any more the destination says so, and the sender is released.

A connection that fails is re-established with backoff (``reconnect_timeout``); a fault waits
meanwhile. If the sender is gone for good, the faults on stale pages get SIGBUS (the pager's
``on_error="poison"``) with the cause logged, never zeros.

:class:`MigrationReport` has the figures, per round: pages and bytes sent, pages sent again,
remote faults, and the downtime (from the pause hook's call to the destination running, as
the sender sees it: an upper bound, one network trip included) and total time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import SourceError
from ..pager import Pager
from ..region import Region
from ..remote.address import Endpoint, parse_url
from ..remote.exports import BufferExport, Export
from ..remote.server import PageServer
from ..remote.source import PageServerSource
from ..tracking import WriteTracker

__all__ = [
    "CHUNK_MAX",
    "CHUNK_MIN",
    "Incoming",
    "MigrationError",
    "MigrationReport",
    "MigrationSender",
    "RoundReport",
    "receive",
]

log = logging.getLogger("userfault.migrate")

#: The background transfer's first (and post-fault) chunk, and its largest.
CHUNK_MIN = 64 << 10
CHUNK_MAX = 4 << 20

_MAGIC = b"UFMG"
# destination -> sender, a WRITE at offset 0 of NAME.ctl: magic, op, reserved, round; then JSON
_COMMAND = struct.Struct("<4sHHI")
# sender -> destination, the first bytes of NAME.ctl: magic, kind, flags, round, page size,
# pages in the set, region size, digest; the page bitmap follows
_REPLY = struct.Struct("<4sHHIIQQ32s")
_OP_NEXT, _OP_RUNNING, _OP_COMPLETE, _OP_REPORT = 1, 2, 3, 4
_KIND_ROUND, _KIND_FINAL, _KIND_DONE = 1, 2, 3
_FLAG_ALL = 1
_NONZERO = re.compile(rb"[^\x00]+")
_READ_BATCH = 64 << 20  # pre-copy: bytes asked for in one read_many
_REPORT_ROOM = 64 << 10  # room in NAME.ctl for the final report (JSON)


class MigrationError(RuntimeError):
    """The migration could not be carried out (the message says which side and why)."""


@dataclass(frozen=True)
class RoundReport:
    """What one round sent. Round ``0`` is the full copy; the last round is the post-copy."""

    index: int
    phase: str  #: ``"pre-copy"`` or ``"post-copy"``
    pages: int  #: pages sent in this round
    bytes: int  #: bytes sent in this round
    pages_resent: int  #: of ``pages``, those that had been sent before
    remote_faults: int  #: destination faults that went to the sender (post-copy only)
    seconds: float


@dataclass(frozen=True)
class MigrationReport:
    """Figures of a whole migration (see the module docstring for what ``downtime`` counts)."""

    size: int
    page_size: int
    rounds: tuple[RoundReport, ...]
    downtime: float
    total_time: float
    dirty_at_stop: int  #: pages written after the last pre-copy round, sent in post-copy

    @property
    def bytes_sent(self) -> int:
        """Bytes of pages sent, every round."""
        return sum(r.bytes for r in self.rounds)

    @property
    def pages_sent(self) -> int:
        """Pages sent, every round (a page sent twice counts twice)."""
        return sum(r.pages for r in self.rounds)

    @property
    def pages_sent_twice(self) -> int:
        """Sends of a page that had been sent before."""
        return sum(r.pages_resent for r in self.rounds)

    @property
    def remote_faults(self) -> int:
        """Destination faults that had to ask the sender."""
        return sum(r.remote_faults for r in self.rounds)

    def as_dict(self) -> dict[str, Any]:
        """The report as plain data (for JSON)."""
        return {"size": self.size, "page_size": self.page_size, "downtime": self.downtime,
                "total_time": self.total_time, "dirty_at_stop": self.dirty_at_stop,
                "bytes_sent": self.bytes_sent, "pages_sent": self.pages_sent,
                "pages_sent_twice": self.pages_sent_twice, "remote_faults": self.remote_faults,
                "rounds": [r.__dict__ for r in self.rounds]}

    def summary(self) -> str:
        """A few lines for a person."""
        lines = [f"migrated {self.size} bytes in {self.total_time:.3f} s, downtime "
                 f"{self.downtime * 1e3:.1f} ms; {self.bytes_sent} bytes in {self.pages_sent} "
                 f"pages sent ({self.pages_sent_twice} again), {self.remote_faults} remote "
                 "faults"]
        lines += [f"  round {r.index} ({r.phase}): {r.pages} pages, {r.bytes} bytes, "
                  f"{r.pages_resent} again, {r.remote_faults} remote faults, "
                  f"{r.seconds:.3f} s" for r in self.rounds]
        return "\n".join(lines)


# -- the sender ----------------------------------------------------------------------------------


class _RegionExport(BufferExport):
    """The region, read live, with every page read counted in the current round. In round 0,
    the tracking of a piece is reset just before it is copied: a page written before its copy
    is sent once, with those writes, not again in round 1."""

    kind = "migration"

    def __init__(self, name: str, region: Region, session: _Session) -> None:
        super().__init__(name, region)
        self._session = session

    def _read_nowait(self, offset: int, view: memoryview) -> int:
        session = self._session
        if session.rounds and session.rounds[-1].index == 0 and len(view):
            page = session.page
            start = offset // page * page
            session.tracker.collect(offset=start,
                                    length=-(-(offset + len(view)) // page) * page - start)
        n = super()._read_nowait(offset, view)
        session.sent(offset, n)
        return n


class _PackedExport(BufferExport):
    """``NAME.round``: the pages of the current pre-copy round, packed in page order."""

    kind = "migration round"

    def __init__(self, name: str, session: _Session) -> None:
        super().__init__(name, session.packed)
        self._session = session

    def _read_nowait(self, offset: int, view: memoryview) -> int:
        n = super()._read_nowait(offset, view)
        self._session.sent_packed(offset, n)
        return n


class _ControlExport(Export):
    """``NAME.ctl``: a command is a WRITE at offset 0, its answer the bytes read after it."""

    kind = "migration control"

    def __init__(self, name: str, session: _Session) -> None:
        super().__init__(name, len(session.reply), writable=True)
        self._session = session

    def _read(self, offset: int, view: memoryview) -> None:
        view[:] = self._session.reply[offset:offset + len(view)]

    def _write(self, offset: int, data: memoryview) -> None:
        if offset != 0:
            raise ValueError(f"a migration command is written at offset 0, not {offset}")
        self._session.command(bytes(data))


@dataclass
class _Round:
    index: int
    phase: str
    started: float
    pages: int = 0
    bytes: int = 0
    resent: int = 0
    remote_faults: int = 0
    ended: float = 0.0


class _Session:
    """The sender's side of one migration (commands arrive on the server's worker threads;
    page reads are counted on its event loop)."""

    def __init__(self, region: Region, tracker: WriteTracker, pause: Callable[[], None] | None,
                 max_rounds: int, max_dirty: int) -> None:
        self.region = region
        self.tracker = tracker
        self.pause = pause
        self.max_rounds = max_rounds
        self.max_dirty_pages = max_dirty // region.page_size
        self.page = region.page_size
        self.npages = region.size // self.page
        self.bitmap_len = (self.npages + 7) // 8
        self.reply = bytearray(_REPLY.size + max(self.bitmap_len, _REPORT_ROOM))
        self.sent_once = bytearray(self.npages)
        self.packed = Region.anonymous(region.size)  # pages are allocated as rounds use them
        self.packed_pages: list[int] = []
        self.rounds: list[_Round] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.failure: BaseException | None = None
        self.paused_at = 0.0
        self.running_at = 0.0
        self.dirty_at_stop = 0
        self.stats: dict[str, Any] = {}
        self.digest = b""

    # page accounting (event loop)
    def sent(self, offset: int, n: int) -> None:
        if not n or not self.rounds:
            return
        r = self.rounds[-1]
        p0, p1 = offset // self.page, -(-(offset + n) // self.page)
        r.bytes += n
        r.pages += p1 - p0
        r.resent += self.sent_once.count(1, p0, p1)
        self.sent_once[p0:p1] = b"\x01" * (p1 - p0)

    def sent_packed(self, offset: int, n: int) -> None:
        if not n or not self.rounds:
            return
        r = self.rounds[-1]
        pages = self.packed_pages[offset // self.page:-(-(offset + n) // self.page)]
        r.bytes += n
        r.pages += len(pages)
        for p in pages:
            r.resent += self.sent_once[p]
            self.sent_once[p] = 1

    def _pack(self, bitmap: bytearray) -> None:
        """Copy the pages of ``bitmap`` to the start of the packed buffer, in page order."""
        page = self.page
        pages: list[int] = []
        pos = 0
        with memoryview(self.region) as src, memoryview(self.packed) as dst:
            for a, b in _bitmap_runs(memoryview(bitmap), self.npages):
                n = (b - a) * page
                dst[pos:pos + n] = src[a * page:b * page]
                pos += n
                pages.extend(range(a, b))
        old = len(self.packed_pages) * page
        if old > pos:  # give back what the last round used beyond this one
            self.packed.madvise(mmap.MADV_DONTNEED, pos, old - pos)
        self.packed_pages = pages

    # commands (worker threads)
    def command(self, raw: bytes) -> None:
        if len(raw) < _COMMAND.size:
            raise ValueError("a migration command is too short")
        magic, op, _, index = _COMMAND.unpack_from(raw)
        if magic != _MAGIC:
            raise ValueError("not a migration command")
        with self.lock:
            try:
                self._command(op, index, raw[_COMMAND.size:])
            except BaseException as err:
                log.error("migration: command %d (round %d) failed: %s", op, index, err)
                self.failure = err
                self.done.set()
                raise

    def _set_reply(self, kind: int, flags: int, index: int, pages: int,
                   body: bytes | bytearray | None = None, digest: bytes = b"") -> None:
        _REPLY.pack_into(self.reply, 0, _MAGIC, kind, flags, index, self.page, pages,
                         self.region.size, digest)
        if body is not None:
            self.reply[_REPLY.size:_REPLY.size + len(body)] = body

    def _command(self, op: int, index: int, payload: bytes) -> None:
        now = time.perf_counter()
        if op == _OP_NEXT:
            current = self.rounds[-1].index if self.rounds else -1
            if index == current:
                return  # a retry of the command before: its reply stands
            if index != current + 1 or (self.rounds and self.rounds[-1].phase != "pre-copy"):
                raise ValueError(f"round {index} asked for after round {current}")
            if self.rounds:
                self.rounds[-1].ended = now
            if index == 0:
                self.rounds.append(_Round(0, "pre-copy", now))
                self._set_reply(_KIND_ROUND, _FLAG_ALL, 0, self.npages)
                return
            bitmap = bytearray(self.bitmap_len)
            count = self._collect(bitmap)
            if count > self.max_dirty_pages and index < self.max_rounds:
                self.rounds.append(_Round(index, "pre-copy", now))
                self._pack(bitmap)
                self._set_reply(_KIND_ROUND, 0, index, count, bitmap)
                return
            self.paused_at = time.perf_counter()
            if self.pause is not None:
                self.pause()
            count = self._collect(bitmap)
            self.dirty_at_stop = count
            self.rounds.append(_Round(index, "post-copy", time.perf_counter()))
            self._set_reply(_KIND_FINAL, 0, index, count, bitmap)
        elif op == _OP_RUNNING:
            if not self.running_at:
                self.running_at = now
        elif op == _OP_REPORT:
            if not self.running_at:
                raise ValueError("the destination says it is complete before running")
            if not self.stats:
                self.stats = json.loads(payload.decode("utf-8"))
                last = self.rounds[-1]
                last.ended = now
                last.remote_faults = int(self.stats.get("remote_faults", 0))
                if self.stats.get("digest"):  # the memory is still, the writers stopped
                    self.digest = hashlib.blake2b(memoryview(self.region),
                                                  digest_size=32).digest()
            body = json.dumps(self.report().as_dict()).encode()
            self._set_reply(_KIND_DONE, 0, index, len(body), body, self.digest)
        elif op == _OP_COMPLETE:
            if not self.stats:
                raise ValueError("the destination completes before asking for the report")
            self.done.set()
        else:
            raise ValueError(f"unknown migration command {op}")

    def _collect(self, bitmap: bytearray) -> int:
        """Add the pages written since the last collect to ``bitmap``; the count of set bits."""
        base, page = self.region.address, self.page
        for r in self.tracker.collect():
            for p in range((r.start - base) // page, (r.end - base) // page):
                bitmap[p >> 3] |= 1 << (p & 7)
        return int.from_bytes(bitmap, "little").bit_count()

    def report(self) -> MigrationReport:
        rounds = tuple(RoundReport(r.index, r.phase, r.pages, r.bytes, r.resent,
                                   r.remote_faults, r.ended - r.started) for r in self.rounds)
        first = self.rounds[0].started
        return MigrationReport(self.region.size, self.page, rounds,
                               self.running_at - self.paused_at, self.rounds[-1].ended - first,
                               self.dirty_at_stop)


class MigrationSender:
    """Migrate ``region`` to whichever destination asks first (see the module docstring).

    Args:
        region: the memory to move (anonymous or memfd; tracked from now on).
        secret: the shared secret destinations must prove they hold; or
        server: a :class:`~userfault.remote.PageServer` of your own to add the three exports
            to (``NAME``, ``NAME.round``, ``NAME.ctl``).
        name: the export name (the destination's URL ends with it).
        pause: called once, on a server thread, when pre-copy ends: stop every writer of
            ``region`` and keep them stopped (the destination now owns the memory). ``None``
            if nothing writes.
        max_rounds: pre-copy rounds after the full copy, at most.
        max_dirty: stop pre-copy once a round's dirty set is at most this many bytes.

    Raises:
        UffdError: write tracking is not available (Linux >= 6.7 with ``WP_ASYNC``).
    """

    def __init__(self, region: Region, *, secret: bytes | None = None,
                 server: PageServer | None = None, name: str = "migration",
                 pause: Callable[[], None] | None = None, max_rounds: int = 8,
                 max_dirty: int = 1 << 20) -> None:
        if (secret is None) == (server is None):
            raise ValueError("give either secret= (a server is made) or server=")
        if max_rounds < 0 or max_dirty < 0:
            raise ValueError("max_rounds and max_dirty must be >= 0")
        self.name = name
        self._own_server = server is None
        self.server = server if server is not None else PageServer(secret)  # type: ignore[arg-type]
        tracker = WriteTracker(region)
        self._session = _Session(region, tracker, pause, max_rounds, max_dirty)
        self._exports: list[str] = []
        try:
            for export in (_RegionExport(name, region, self._session),
                           _PackedExport(f"{name}.round", self._session),
                           _ControlExport(f"{name}.ctl", self._session)):
                self.server.add_export(export)
                self._exports.append(export.name)
        except BaseException:
            self.close()
            raise

    def start(self, *listen: str | Endpoint) -> list[Endpoint]:
        """Serve on ``listen`` (``tcp://HOST:PORT``, ``unix:PATH``) from a thread; the bound
        addresses."""
        return self.server.start_in_thread(*listen)

    def wait(self, timeout: float | None = None) -> MigrationReport:
        """Block until the destination has every page; the report.

        Raises:
            TimeoutError: not done within ``timeout`` seconds.
            MigrationError: a command of the destination failed here (logged).
        """
        if not self._session.done.wait(timeout):
            raise TimeoutError(f"the migration of {self.name!r} did not complete within "
                               f"{timeout} s")
        if self._session.failure is not None:
            raise MigrationError(f"migration of {self.name!r} failed on the sender: "
                                 f"{self._session.failure}") from self._session.failure
        return self._session.report()

    def close(self) -> None:
        """Withdraw the exports (and stop the server made here); stop tracking."""
        while self._exports:
            self.server.unexport(self._exports.pop())
        if self._own_server:
            self.server.close()
        self._session.tracker.close()
        self._session.packed.close()

    def __enter__(self) -> MigrationSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the destination -----------------------------------------------------------------------------


class _Staging:
    """The destination's staging file: page data, one state byte per page (1: the bytes here
    are current), then counters (remote faults, pulls started, pulls done)."""

    COUNTERS = struct.Struct("<QQQ")

    def __init__(self, path: str, size: int, page: int, create: bool) -> None:
        self.path = path
        self.size = size
        self.page = page
        self.npages = size // page
        self.state_at = size
        self.counters_at = size + -(-self.npages // 8) * 8
        total = self.counters_at + self.COUNTERS.size
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if create:
                os.ftruncate(fd, total)
            self.map = mmap.mmap(fd, total, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        view = memoryview(self.map)
        self.data = view[:size]
        self.state = view[self.state_at:self.state_at + self.npages]
        self.lock = threading.Lock()

    def counters(self) -> tuple[int, int, int]:
        return self.COUNTERS.unpack_from(self.map, self.counters_at)  # type: ignore[return-value]

    def bump(self, i: int) -> None:
        with self.lock:  # one process (the pager's) writes the counters
            values = list(self.counters())
            values[i] += 1
            self.COUNTERS.pack_into(self.map, self.counters_at, *values)

    def stale_runs(self, start: int, limit: int) -> list[tuple[int, int]]:
        """``(first, end)`` runs of pages not current, from page ``start`` on, ``limit``
        pages at most."""
        runs: list[tuple[int, int]] = []
        state = self.map
        base, n = self.state_at, self.npages
        i = start
        while i < n and limit > 0:
            j = state.find(b"\x00", base + i, base + n)
            if j < 0:
                break
            j -= base
            k = state.find(b"\x01", base + j, base + min(n, j + limit))
            k = min(n, j + limit) if k < 0 else k - base
            runs.append((j, k))
            limit -= k - j
            i = k
        return runs

    def close(self) -> None:
        self.data.release()
        self.state.release()
        self.map.close()


class MigrationSource:
    """The destination pager's source: the staging file, and the sender for stale pages.

    Picklable (it runs in the pager process): it opens the staging file there.
    """

    def __init__(self, staging: str, size: int, page: int, remote: PageServerSource) -> None:
        self._path = staging
        self._size = size
        self._page = page
        self._remote = remote
        self._staging: _Staging | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self._path, "size": self._size, "page": self._page,
                "remote": self._remote}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["size"], state["page"],  # type: ignore[misc]
                      state["remote"])

    @property
    def size(self) -> int:
        """The region's size."""
        return self._size

    def __repr__(self) -> str:
        return f"MigrationSource({self._remote.url!r})"

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Current pages from the staging file; stale ones from the sender (then kept)."""
        if self._staging is None:
            self._staging = _Staging(self._path, self._size, self._page, create=False)
        st = self._staging
        buf = memoryview(buf).cast("B")
        end = min(offset + len(buf), self._size)
        if end < offset + len(buf):
            buf[max(0, end - offset):] = bytes(len(buf) - max(0, end - offset))
        pulls: list[tuple[int, memoryview]] = []
        page = self._page
        for first, last in _runs(st, offset // page, -(-end // page)):
            lo, hi = max(offset, first * page), min(end, last * page)
            if st.state[first]:
                buf[lo - offset:hi - offset] = st.data[lo:hi]
            else:
                pulls.append((lo, buf[lo - offset:hi - offset]))
        if not pulls:
            return
        st.bump(0)
        st.bump(1)
        try:
            self._remote.read_many(pulls)
            for lo, view in pulls:
                st.data[lo:lo + len(view)] = view
                p0, p1 = lo // page, -(-(lo + len(view)) // page)
                st.state[p0:p1] = b"\x01" * (p1 - p0)
        finally:
            st.bump(2)

    def close(self) -> None:
        """Close the connections and the staging file."""
        self._remote.close()
        if self._staging is not None:
            self._staging.close()
            self._staging = None


def _runs(st: _Staging, p0: int, p1: int) -> list[tuple[int, int]]:
    """``[p0, p1)`` cut into runs of one state."""
    out: list[tuple[int, int]] = []
    i = p0
    while i < p1:
        want = b"\x00" if st.state[i] else b"\x01"
        j = st.map.find(want, st.state_at + i, st.state_at + p1)
        j = p1 if j < 0 else j - st.state_at
        out.append((i, j))
        i = j
    return out


def _bitmap_runs(bitmap: memoryview, npages: int) -> list[tuple[int, int]]:
    """The ``(first, end)`` page runs whose bits are set."""
    runs: list[tuple[int, int]] = []
    for m in _NONZERO.finditer(bitmap):
        for i in range(m.start(), m.end()):
            byte = bitmap[i]
            if byte == 0xFF:
                first, end = i * 8, i * 8 + 8
                if runs and runs[-1][1] == first:
                    runs[-1] = (runs[-1][0], end)
                else:
                    runs.append((first, end))
                continue
            for bit in range(8):
                if byte >> bit & 1:
                    p = i * 8 + bit
                    if runs and runs[-1][1] == p:
                        runs[-1] = (runs[-1][0], p + 1)
                    else:
                        runs.append((p, p + 1))
    if runs and runs[-1][1] > npages:
        runs[-1] = (runs[-1][0], npages)
    return runs


class Incoming:
    """A region arriving from a :class:`MigrationSender`; made by :func:`receive`.

    :attr:`memory` (a :class:`~userfault.Pager`) is usable as soon as this object exists; the
    pages still at the sender come in the background. :meth:`wait` returns once they are all
    here and the sender was released.
    """

    def __init__(self, url: str, *, secret: bytes | None = None,
                 secret_file: str | os.PathLike[str] | None = None,
                 tls_ca: str | os.PathLike[str] | None = None, timeout: float = 10.0,
                 reconnect_timeout: float = 30.0, digest: bool = False,
                 **pager_options: Any) -> None:
        if pager_options.get("populate"):
            # The pager starts before the pre-copy rounds end; populating would install
            # pages the sender is still writing, and nothing fetches an installed page again.
            raise ValueError("receive() takes no populate=: it would install pages before "
                             "the last pre-copy round and keep their old bytes; call "
                             "incoming.memory.prefetch() once receive() has returned")
        parsed = parse_url(url)
        ctl_url = url.replace(f"/{parsed.export}", f"/{parsed.export}.ctl", 1)
        options: dict[str, Any] = {"secret": secret, "secret_file": secret_file,
                                   "tls_ca": tls_ca, "timeout": timeout,
                                   "reconnect_timeout": reconnect_timeout}
        self.url = url
        self._options = options
        self._reconnect_timeout = reconnect_timeout
        self._want_digest = digest
        self._digest = b""
        self.memory: Pager | None = None
        self._staging: _Staging | None = None
        self._memfd = -1
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._failure: BaseException | None = None
        self._report: MigrationReport | None = None
        self._ctl = PageServerSource(ctl_url, **options)
        try:
            self._pages = PageServerSource(url, **options)
            self._round = PageServerSource(
                url.replace(f"/{parsed.export}", f"/{parsed.export}.round", 1), **options)
            self._start(pager_options)
        except BaseException:
            self.close()
            raise

    # -- the exchange --------------------------------------------------------------------------

    def _command(self, op: int, index: int, payload: bytes = b"", *, body: int = 0
                 ) -> tuple[tuple[Any, ...], memoryview]:
        """Send a command; its reply's header fields and the ``body`` bytes after them, read
        in one request."""
        self._ctl.write_from(0, memoryview(_COMMAND.pack(_MAGIC, op, 0, index) + payload))
        reply = memoryview(bytearray(_REPLY.size + body))
        self._ctl.read_into(0, reply, urgent=True)
        fields = _REPLY.unpack(reply[:_REPLY.size])
        if fields[0] != _MAGIC:
            raise MigrationError(f"{self._ctl.url}: not a migration control export")
        return fields, reply[_REPLY.size:]

    def _start(self, pager_options: dict[str, Any]) -> None:
        _, kind, flags, index, page, _, size, _ = self._command(_OP_NEXT, 0)[0]
        if kind != _KIND_ROUND or not flags & _FLAG_ALL or size != self._pages.size:
            raise MigrationError(f"{self.url}: the sender's first round is not a full copy of "
                                 "the export")
        self._memfd = os.memfd_create("userfault-migrate", os.MFD_CLOEXEC)
        path = f"/proc/{os.getpid()}/fd/{self._memfd}"
        staging = self._staging = _Staging(path, size, page, create=True)
        # Made before the copy, so that its start is not part of the downtime.
        self.memory = Pager(MigrationSource(path, size, page, self._pages), size=size,
                            runtime="process", **pager_options)
        self._pull_all()
        while True:
            index += 1
            fields, bitmap = self._command(_OP_NEXT, index, body=(staging.npages + 7) // 8)
            kind = fields[1]
            runs = _bitmap_runs(bitmap, staging.npages)
            if kind == _KIND_FINAL:
                break
            if kind != _KIND_ROUND:
                raise MigrationError(f"{self.url}: unexpected reply {kind} to round {index}")
            self._pull_packed(runs)
        for first, end in runs:
            staging.state[first:end] = bytes(end - first)
        self._index = index  # this side runs from here on
        self._thread = threading.Thread(target=self._background, name="userfault-migrate",
                                        daemon=True)
        self._thread.start()

    def _pull_all(self) -> None:
        """Round 0: the whole region, straight into the staging file (one pipelined read)."""
        assert self._staging is not None
        st = self._staging
        self._pages.read_many([(0, st.data)], urgent=False)
        st.state[:] = b"\x01" * st.npages

    def _pull_packed(self, runs: Sequence[tuple[int, int]]) -> None:
        """A later pre-copy round: the sender packed the round's pages, in page order, at the
        start of ``NAME.round``; read them in big requests and put each where it belongs."""
        assert self._staging is not None
        st, page = self._staging, self._staging.page
        buf = memoryview(bytearray(min(_READ_BATCH, sum(b - a for a, b in runs) * page)))
        per_batch = len(buf) // page
        queue = list(runs)
        i = pos = 0
        while i < len(queue):
            pieces: list[tuple[int, int]] = []
            n = 0
            while i < len(queue) and n < per_batch:
                a, b = queue[i]
                take = min(b - a, per_batch - n)
                pieces.append((a, a + take))
                n += take
                if a + take < b:
                    queue[i] = (a + take, b)
                else:
                    i += 1
            self._round.read_many([(pos, buf[:n * page])], urgent=False)
            k = 0
            for a, b in pieces:
                length = (b - a) * page
                st.data[a * page:b * page] = buf[k:k + length]
                st.state[a:b] = b"\x01" * (b - a)
                k += length
            pos += n * page

    def _background(self) -> None:
        """Post-copy: pull what is stale, in growing chunks; then release the sender."""
        assert self._staging is not None
        st, page = self._staging, self._staging.page
        try:
            # The sender counts its downtime up to this message, sent once this side runs.
            self._ctl.write_from(0, memoryview(_COMMAND.pack(_MAGIC, _OP_RUNNING, 0,
                                                             self._index)))
            chunk = CHUNK_MIN
            seen = st.counters()[0]
            cursor = 0
            while not self._stop.is_set():
                pieces = st.stale_runs(cursor, limit=max(1, chunk // page))
                if not pieces:
                    if cursor == 0:
                        break
                    cursor = 0  # one more pass: nothing should be left
                    continue
                self._pages.read_many([(a * page, st.data[a * page:b * page])
                                       for a, b in pieces], urgent=False)
                for a, b in pieces:
                    st.state[a:b] = b"\x01" * (b - a)
                cursor = pieces[-1][1]
                faults = st.counters()[0]
                chunk = CHUNK_MIN if faults != seen else min(chunk * 2, CHUNK_MAX)
                seen = faults
            if self._stop.is_set():
                return
            # Let a fault's pull still in flight finish before the sender goes (it would be
            # retried and served from here anyway, but only once its reconnecting gave up).
            deadline = time.monotonic() + self._options["timeout"]
            while (c := st.counters())[1] != c[2] and time.monotonic() < deadline:
                time.sleep(0.001)
            stats = json.dumps({"remote_faults": st.counters()[0],
                                "digest": self._want_digest}).encode()
            fields, body = self._command(_OP_REPORT, self._index, stats, body=_REPORT_ROOM)
            length, self._digest = fields[5], fields[7]
            self._report = _report_from(json.loads(bytes(body[:length]).decode()))
            self._complete()
        except BaseException as err:
            log.error("migration from %s: the background transfer failed: %s", self.url, err)
            self._failure = err
        finally:
            self._done.set()

    def _complete(self) -> None:
        """Release the sender: the last message, whose answer may be lost (the sender may
        close at once), so it is sent once on a connection of its own, without retries."""
        deadline = time.monotonic() + self._reconnect_timeout
        delay = 0.05
        while True:
            try:
                last = PageServerSource(self._ctl.url, **{**self._options,
                                                           "reconnect_timeout": 0})
                break
            except SourceError:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        try:
            last.write_from(0, memoryview(_COMMAND.pack(_MAGIC, _OP_COMPLETE, 0, self._index)))
        except SourceError as err:
            log.info("migration from %s: the sender left before answering the last message "
                     "(%s)", self.url, err)
        finally:
            last.close()

    # -- public API ----------------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> MigrationReport:
        """Block until every page is here (the sender is released); the sender's report.

        Raises:
            TimeoutError: not done within ``timeout`` seconds.
            MigrationError: the background transfer failed (the sender is gone: stale pages
                SIGBUS when touched).
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"the migration from {self.url} did not complete within "
                               f"{timeout} s")
        if self._failure is not None:
            raise MigrationError(f"the migration from {self.url} failed: "
                                 f"{self._failure}") from self._failure
        assert self._report is not None
        return self._report

    def verify(self) -> None:
        """Compare a digest of :attr:`memory` with the one the sender computed once stopped
        (``receive(..., digest=True)``; meaningful only before this side writes to the
        memory); raises :class:`MigrationError` if they differ."""
        self.wait()
        if not self._want_digest:
            raise ValueError("verify() needs receive(..., digest=True)")
        assert self.memory is not None
        with memoryview(self.memory) as view:
            mine = hashlib.blake2b(view, digest_size=32).digest()
        if mine != self._digest:
            raise MigrationError(f"the memory received from {self.url} differs from the "
                                 "sender's (digests do not match)")

    def close(self) -> None:
        """Stop the background transfer, close the memory and the connections."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self._staging is not None:
            self._staging.close()
            self._staging = None
        if self._memfd >= 0:
            os.close(self._memfd)
            self._memfd = -1
        for src in (getattr(self, "_pages", None), getattr(self, "_round", None), self._ctl):
            if src is not None:
                src.close()

    def __enter__(self) -> Incoming:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def receive(url: str, **options: Any) -> Incoming:
    """Start receiving the region the sender at ``url`` (``uf://HOST:PORT/NAME``) migrates;
    returns once this side may run (post-copy). ``options``: ``secret`` or ``secret_file``,
    ``tls_ca``, ``timeout``, ``reconnect_timeout`` (seconds to keep reconnecting to a sender
    that went away, before its stale pages SIGBUS), ``digest`` (the sender hashes its stopped
    memory at the end, for :meth:`Incoming.verify`), and any :class:`~userfault.Pager`
    option.

    Raises:
        AuthenticationError: the secret does not match.
        SourceError: the sender is unreachable or has no such migration.
        MigrationError: the sender's answers make no sense.
    """
    return Incoming(url, **options)


def _report_from(data: dict[str, Any]) -> MigrationReport:
    rounds = tuple(RoundReport(**r) for r in data["rounds"])
    return MigrationReport(data["size"], data["page_size"], rounds, data["downtime"],
                           data["total_time"], data["dirty_at_stop"])
