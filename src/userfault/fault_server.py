"""`FaultServer`: serve a userfaultfd's faults from a Python page source.

It must run where the faulting threads' GIL is not needed: in a pager process
(:mod:`userfault.pager_process`) or in a process that serves another one (Firecracker).
Policy follows the native engine: a chunk per fault, a readahead window that doubles on
sequential faults and resets on random ones, background populate, batched prefetch. One
difference: readahead is installed right after each sequential fault's wake, as one batched
read, because a Python source pays a round trip per read.

Failure semantics: a failed read is retried ``retries`` times with exponential backoff; then
``on_error`` decides: ``"poison"`` (UFFDIO_POISON, the access gets SIGBUS), ``"zero"``
(explicitly opt-in zeros) or ``"retry"`` (keep trying; the faulting thread stays blocked).
A page that could not be read never silently reads as zeros unless ``"zero"`` was asked for.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from . import _native
from ._events import EVENT_PAGEFAULT, MSG_SIZE, Fork, Remap, Remove, Unmap, parse_messages
from ._flags import CopyMode, FaultFlag
from ._shared import INDEX, CounterSlot, SharedState
from .errors import (
    AlreadyMappedError,
    MappingChangedError,
    ProcessGoneError,
    RangeNotRegisteredError,
    UffdError,
)
from .sources.base import PageSource, read_many_fallback
from .uffd import PAGE_SIZE, Uffd

__all__ = ["Area", "FaultServer"]

log = logging.getLogger("userfault.pager")

_PIECE = 256 << 10  # background install unit, as in the native engine
_PAGEFAULT = struct.Struct("<B7xQQI4x")  # struct uffd_msg of a page fault: event, flags, addr, tid
_FLUSH_NS = 1_000_000  # counters reach shared memory at most this late while busy
_F_FAULTS, _F_WRITES, _F_BYTES = INDEX["faults"], INDEX["write_faults"], INDEX["fault_bytes"]
_F_INSTALLED = INDEX["bytes_installed"]
_WRITE = int(FaultFlag.WRITE)
ON_ERROR = ("poison", "retry", "zero")


@dataclass(eq=False)
class Area:
    """A registered range served from ``source_offset`` onwards, with its page states."""

    address: int
    length: int
    source_offset: int
    page_size: int = PAGE_SIZE
    installed: bytearray = field(init=False, repr=False)
    removed: bytearray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.installed = bytearray(self.length // self.page_size)
        self.removed = bytearray(self.length // self.page_size)


class FaultServer:
    """Serve the faults of ``uffd`` over ``areas`` from ``source``.

    Args:
        uffd: the userfaultfd (registered by its owner; this server only reads and installs).
        areas: ``(address, length, source_offset)`` triples.
        source: any :class:`~userfault.sources.base.PageSource`.
        page_size: 4096 or 2 MiB (hugetlb).
        chunk: bytes installed per fault (default one page).
        readahead: ``(min, max)`` window for sequential faults; ``(0, 0)`` disables.
        populate: fill everything in the background while faults go first.
        on_error, retries: see the module docstring.
        state: shared counters and fault log (a private one by default).
        slot_base: first counter slot of this server's threads in ``state`` (default: the
            next free ones); a restarted worker passes its predecessor's to carry on.
    """

    def __init__(
        self,
        uffd: Uffd,
        areas: Sequence[tuple[int, int, int]],
        source: PageSource,
        *,
        page_size: int = PAGE_SIZE,
        chunk: int | None = None,
        readahead: tuple[int, int] = (64 << 10, 4 << 20),
        populate: bool = False,
        on_error: str = "poison",
        retries: int = 3,
        log_faults: int = 0,
        state: SharedState | None = None,
        slot_base: int | None = None,
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
        if not areas:
            raise ValueError("a fault server needs at least one area")
        self.uffd = uffd
        self.areas = [Area(*a, page_size) for a in areas]
        self.source = source
        self.page = page_size
        self.chunk = max(chunk or page_size, page_size)
        self.readahead = readahead
        self.on_error = on_error
        self.retries = retries
        self.state = state or SharedState(log_faults)
        self._slot_base = slot_base
        self._populate = [(a, 0) for a in self.areas] if populate else []
        self._removed_count = 0
        self._fd = uffd.fileno()
        self._read_into = source.read_into
        self._local = threading.local()
        self._logging = self.state.log_capacity > 0
        self._readahead = _Readahead(self)
        self._unit = max(self.chunk, _PIECE, readahead[1])
        self._lock = threading.Lock()
        self._ra_window = 0
        self._last: tuple[int, int] = (-1, -1)  # id(area), end of the last fault's chunk
        self._stopped = False

    # -- reading the source ----------------------------------------------------------------

    def _read(self, requests: list[tuple[int, memoryview]]) -> bool:
        """Fill the requests, retrying; False once retries are exhausted (error logged)."""
        attempt = 0
        while True:
            try:
                read_many_fallback(self.source, requests)
                return True
            except Exception as err:  # any source failure: network, decode, checksum...
                attempt += 1
                first = requests[0][0]
                total = sum(len(b) for _, b in requests)
                if self.on_error != "retry" and attempt > self.retries:
                    msg = (f"page source {self.source!r} failed for bytes {first:#x}..+{total} "
                           f"after {attempt} attempts: {err}")
                    log.error("%s; applying on_error=%r", msg, self.on_error)
                    self.state.set_error(msg)
                    self._c.add("errors")
                    return False
                self._c.add("retries")
                delay = min(0.005 * 2 ** (attempt - 1), 1.0)
                log.warning("page source read at %#x failed (%s); retry %d in %.3fs",
                            first, err, attempt, delay)
                time.sleep(delay)

    # -- installing -------------------------------------------------------------------------

    @property
    def _c(self) -> CounterSlot:
        """This thread's counter slot."""
        slot: CounterSlot | None = getattr(self._local, "slot", None)
        if slot is None:
            with self._lock:
                index = None
                if self._slot_base is not None:
                    index, self._slot_base = self._slot_base, self._slot_base + 1
            slot = self._local.slot = self.state.slot(index)
        return slot

    def flush(self) -> None:
        """Publish this thread's counters now."""
        self._c.flush()

    def _buffer(self, size: int) -> memoryview:
        """A per-thread scratch buffer of at least ``size`` bytes (reused across faults)."""
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            buf = self._local.buf = bytearray(max(size, self._unit))
        return memoryview(buf)[:size]

    def _runs(self, area: Area, off: int, length: int, skip_installed: bool
              ) -> list[tuple[int, int]]:
        """Page runs of ``[off, off+length)`` to install (all of it, or the missing pages)."""
        page = self.page
        if not skip_installed:
            return [(off // page, (off + length) // page)]
        installed = area.installed
        runs: list[tuple[int, int]] = []
        start = None
        for p in range(off // page, (off + length) // page):
            if not installed[p] and start is None:
                start = p
            elif installed[p] and start is not None:
                runs.append((start, p))
                start = None
        if start is not None:
            runs.append((start, (off + length) // page))
        return runs

    def _install(self, area: Area, off: int, length: int, *, skip_installed: bool,
                 dontwake: bool = False) -> int:
        """Install ``[off, off+length)`` of ``area``; returns bytes installed.

        The missing runs are read from the source in one batch (``read_many``: pipelined or
        parallel where the source supports it), then copied in.
        """
        page = self.page
        runs = self._runs(area, off, length, skip_installed)
        if not runs:
            return 0
        total_len = sum(e - f for f, e in runs) * page
        scratch = self._buffer(total_len)
        views, pos = [], 0
        for first, end in runs:
            views.append(scratch[pos:pos + (end - first) * page])
            pos += (end - first) * page
        requests = [(area.source_offset + f * page, v)
                    for (f, _), v in zip(runs, views, strict=True)]
        if not self._read(requests):
            return sum(self._fail(area, f * page, (e - f) * page) for f, e in runs)
        total = 0
        for (first, end), view in zip(runs, views, strict=True):
            if self._removed_count:  # like anonymous memory, a removed page reads as zeros
                removed = area.removed
                for p in range(first, end):
                    if removed[p]:
                        view[(p - first) * page:(p - first + 1) * page] = bytes(page)
            total += self._copy(area, first * page, view, dontwake)
        return total

    def _copy(self, area: Area, off: int, buf: memoryview, dontwake: bool) -> int:
        installed = area.installed
        page, pos, done_total = self.page, 0, 0
        mode = CopyMode.DONTWAKE if dontwake else CopyMode(0)
        while pos < len(buf):
            skip = 0
            try:
                done = self.uffd.copy(area.address + off + pos, buf[pos:], len(buf) - pos, mode)
            except AlreadyMappedError as err:
                done, skip = err.done, page  # then skip the page that is already there
                self._c.add("eexist")
            except MappingChangedError as err:
                done, skip = err.done, len(buf)  # the mapping changes: faults come again
                self._c.add("eagain")
            first = (off + pos) // page
            installed[first:first + done // page] = b"\1" * (done // page)
            if skip == page:
                installed[first + done // page] = 1
            pos += done + skip
            done_total += done
        self._c.add("bytes_installed", done_total)
        return done_total

    def _fail(self, area: Area, off: int, length: int) -> int:
        addr = area.address + off
        if self.on_error == "zero":
            log.warning("serving zeros for %#x..+%d as on_error='zero' asks", addr, length)
            return self._copy(area, off, memoryview(bytearray(length)), False)
        # Log first: the faulting process may die of the SIGBUS, and this process with it.
        log.error("poisoned %#x..+%d: accesses get SIGBUS instead of wrong data", addr, length)
        try:
            self.uffd.poison(addr, length)
            self._c.add("poisoned", length // self.page)
        except UffdError as err:
            log.error("could not poison %#x..+%d: %s", addr, length, err)
        return 0

    # -- faults and events ------------------------------------------------------------------

    def _area(self, address: int) -> Area | None:
        a = self.areas[0]
        if a.address <= address < a.address + a.length:
            return a
        for a in self.areas:
            if a.address <= address < a.address + a.length:
                return a
        return None

    def _serve_fault(self, c: CounterSlot, chunk_buf: memoryview, address: int, flags: int,
                     tid: int, t0: int) -> None:
        """Serve one page fault: its chunk, a wake, then readahead when sequential.

        The common case (source read succeeds, the copy installs everything) costs one
        ``read_into`` and one UFFDIO_COPY, which also wakes the faulting thread.
        """
        area = self._area(address)
        page = self.page
        if area is None:
            # Registered but not ours: waking would make the thread fault again at once (a
            # busy loop). Poison it so the access fails loudly (or leave it blocked).
            self.state.set_error(f"fault at {address:#x} outside every served area")
            if self.on_error == "poison":
                _native.poison(self._fd, address & ~(page - 1), page, 0)
            return
        page_off = (address - area.address) & ~(page - 1)
        off = page_off - page_off % self.chunk
        n = min(self.chunk, area.length - off)
        got, woken, tried = 0, False, False
        if not self._removed_count:
            buf = chunk_buf if n == self.chunk else self._buffer(n)
            try:
                self._read_into(area.source_offset + off, buf)
            except Exception:  # the slow path below retries and applies on_error
                pass
            else:
                tried = True
                got, err = _native.copy(self._fd, area.address + off, buf, n, 0)
                woken = not err  # a successful copy woke the range, faulting page included
                area.installed[off // page:(off + got) // page] = b"\1" * (got // page)
                c.values[_F_INSTALLED] += got  # _copy below counts its own share
                if err:
                    got += self._copy(area, off + got, buf[got:], False)
        if not woken:
            if not tried:
                got = self._install(area, off, n, skip_installed=False)
            try:
                self.uffd.wake(area.address + page_off, page)
            except UffdError:
                pass  # the range went away: nobody waits on it
        v = c.values
        v[_F_FAULTS] += 1
        v[_F_BYTES] += got
        if flags & _WRITE:
            v[_F_WRITES] += 1
        t1 = time.monotonic_ns()
        c.observe(t1 - t0)
        if self._logging:
            self.state.log((address, area.source_offset + page_off, flags, tid, t0, t1 - t0))
        if not self.readahead[1]:
            return
        window = self._next_window(area, off, off + n)
        if window:
            end = off + n
            self._readahead.install(c, area, end, min(end + window, area.length))

    def _next_window(self, area: Area, off: int, end: int) -> int:
        """The readahead window after a fault on ``[off, end)``: doubles while sequential."""
        lo, hi = self.readahead
        if not hi:
            return 0
        with self._lock:
            last_area, last_end = self._last
            # sequential: this fault starts where the last one's chunk or window ended
            sequential = last_area == id(area) and last_end - self.chunk <= off <= (
                last_end + self._ra_window)
            self._ra_window = min(max(self._ra_window * 2, lo), hi) if sequential else 0
            self._last = (id(area), end)
            return self._ra_window

    def _claim(self) -> tuple[Area, int, int] | None:
        """The next piece of background populate work, if any."""
        with self._lock:
            while self._populate:
                area, nxt = self._populate[0]
                if nxt >= area.length:
                    self._populate.pop(0)
                    continue
                n = min(_PIECE, area.length - nxt)
                self._populate[0] = (area, nxt + n)
                return area, nxt, n
        return None

    def _clear(self, start: int, end: int, removed: bool) -> None:
        for a in self.areas:
            lo, hi = max(start, a.address), min(end, a.address + a.length)
            for p in range((lo - a.address) // self.page, (hi - a.address) // self.page):
                a.installed[p] = 0
                if removed and not a.removed[p]:
                    a.removed[p] = 1
                    self._removed_count += 1

    def _handle(self, ev: object) -> None:
        if isinstance(ev, Remove):
            self._c.add("remove_events")
            self._clear(ev.start, ev.end, True)
        elif isinstance(ev, Unmap):
            self._c.add("unmap_events")
            self._clear(ev.start, ev.end, False)
        elif isinstance(ev, Remap):
            self._c.add("remap_events")
            for a in self.areas:
                if a.address == ev.old_address and a.length == ev.length:
                    a.address = ev.new_address
        elif isinstance(ev, Fork):
            self._c.add("fork_events")
            os.close(ev.fd)  # children are not served: their uffd is closed

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        """Serve until ``stop`` is set, the uffd is closed, or the target process exits."""
        c = self._c
        try:
            self._serve(c, stop)
        finally:
            c.flush()
            self._readahead.close()

    def _serve(self, c: CounterSlot, stop: threading.Event | None) -> None:
        read_msgs, unpack = _native.read_msgs, _PAGEFAULT.unpack_from
        chunk_buf = memoryview(bytearray(self.chunk))  # this thread's fault buffer
        while not self._stopped and not (stop is not None and stop.is_set()):
            # Busy: poll without waiting. Idle: wait, but publish counters within 1 ms.
            timeout = 0 if self._has_work() else (1 if c.dirty else 200)
            data, err = read_msgs(self._fd, 64, timeout)
            if err == errno.EINTR:
                continue
            if err:
                log.info("fault server stops: %s", os.strerror(err))
                return
            t0 = time.monotonic_ns()
            try:
                faults = []
                for pos in range(0, len(data), MSG_SIZE):
                    event, flags, address, tid = unpack(data, pos)
                    if event == EVENT_PAGEFAULT:
                        faults.append((address, flags, tid))
                    else:  # events first: a REMOVE's pages must be marked before any fault
                        self._handle(parse_messages(data[pos:pos + MSG_SIZE])[0])
                for address, flags, tid in faults:
                    self._serve_fault(c, chunk_buf, address, flags, tid, t0)
                if data:
                    c.dirty = True
                    if t0 - c.last_flush > _FLUSH_NS:
                        c.flush()
                    continue
                if c.dirty:
                    c.flush()
                work = self._claim()
                if work is not None:
                    area, off, n = work
                    c.add("populate_bytes", self._install(area, off, n, skip_installed=True))
            except ProcessGoneError:
                log.info("the process owning the memory exited; fault server stops")
                return
            except RangeNotRegisteredError:
                continue  # unregistered under us: its waiters were woken by the kernel

    def _has_work(self) -> bool:
        return bool(self._populate)  # a hint: _claim() decides under the lock

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return (within its 0.2 s poll)."""
        self._stopped = True

    def prefetch(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Install ``(source_offset, length)`` ranges with DONTWAKE, then wake each area once."""
        total = 0
        for start, length in ranges:
            for a in self.areas:
                lo = max(start, a.source_offset)
                hi = min(start + length, a.source_offset + a.length)
                if lo >= hi:
                    continue
                off = (lo - a.source_offset) & ~(self.page - 1)
                end = -(-(hi - a.source_offset) // self.page) * self.page
                while off < end:
                    n = min(_PIECE, end - off)
                    total += self._install(a, off, n, skip_installed=True, dontwake=True)
                    off += n
        for a in self.areas:
            with contextlib.suppress(UffdError):
                self.uffd.wake(a.address, a.length)
        self._c.add("prefetch_bytes", total)
        self._c.flush()
        return total

    def counters(self) -> dict[str, object]:
        """Counters (same keys as the native engine's)."""
        return self.state.counters()

    def drain_log(self) -> bytes:
        """Packed fault records since the last call."""
        return self.state.drain_log()



class _Readahead:
    """Installs a readahead window in pieces, fetching the next piece (on a fetch thread)
    while the current one is copied in: a sequential reader gets about the slower of the
    source's and the copy's bandwidth, not their harmonic mean. The faulting thread does not
    wait for the window: each COPY wakes whoever is blocked on the pages it installs.
    Readahead is speculative: a piece the source fails to deliver is skipped, never poisoned;
    faults on it are then served (and retried, and reported) normally.
    """

    PIECE = 1 << 20

    def __init__(self, server: FaultServer) -> None:
        self.server = server
        self._fetcher: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def install(self, c: CounterSlot, area: Area, start: int, end: int) -> None:
        """Install ``[start, end)`` of ``area`` (present pages are skipped)."""
        with self._lock:
            if self._fetcher is None:
                self._fetcher = ThreadPoolExecutor(1, thread_name_prefix="userfault-fetch")
            fetcher = self._fetcher
        piece = max(self.server.page, min(self.PIECE, (end - start) // 4))
        pending: Future[_Fetched] | None = None
        for off in range(start, end, piece):
            nxt = fetcher.submit(self._fetch, area, off, min(piece, end - off))
            self._copy(c, pending)
            pending = nxt
        self._copy(c, pending)

    def close(self) -> None:
        """Stop the fetch thread."""
        with self._lock:
            fetcher, self._fetcher = self._fetcher, None
        if fetcher is not None:
            fetcher.shutdown(wait=True)

    def _fetch(self, area: Area, off: int, n: int) -> _Fetched:
        server, page = self.server, self.server.page
        runs = server._runs(area, off, n, skip_installed=True)
        if not runs:
            return None
        requests = [(first * page, memoryview(bytearray((end - first) * page)))
                    for first, end in runs]
        try:
            read_many_fallback(server.source, [(area.source_offset + o, b) for o, b in requests])
        except Exception as err:  # speculative: the faults will retry and report it
            log.info("readahead at %#x skipped: %s", area.source_offset + off, err)
            return None
        return area, requests

    def _copy(self, c: CounterSlot, pending: Future[_Fetched] | None) -> None:
        fetched = None if pending is None else pending.result()
        if fetched is None:
            return
        area, requests = fetched
        page = self.server.page
        for off, buf in requests:
            if self.server._removed_count and any(area.removed[off // page:
                                                              (off + len(buf)) // page]):
                continue  # removed meanwhile: those pages must read as zeros; faults decide
            c.add("readahead_bytes", self.server._copy(area, off, buf, False))


_Fetched = tuple[Area, list[tuple[int, memoryview]]] | None
