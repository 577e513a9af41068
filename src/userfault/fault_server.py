"""`FaultServer`: serve a userfaultfd's faults from a Python page source.

It must run where the faulting threads' GIL is not needed: in a pager process
(:mod:`userfault.pager_process`) or in a process that serves another one (Firecracker).
Policy mirrors the native engine: a chunk per fault, a readahead window that doubles on
sequential faults and resets on random ones, background populate, batched prefetch.

Failure semantics: a failed read is retried ``retries`` times with exponential backoff; then
``on_error`` decides: ``"poison"`` (UFFDIO_POISON, the access gets SIGBUS), ``"zero"``
(explicitly opt-in zeros) or ``"retry"`` (keep trying; the faulting thread stays blocked).
A page that could not be read never silently reads as zeros unless ``"zero"`` was asked for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ._events import Fork, Pagefault, Remap, Remove, Unmap
from ._flags import CopyMode
from ._shared import SharedState
from .errors import (
    AlreadyMappedError,
    ClosedError,
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
ON_ERROR = ("poison", "retry", "zero")


@dataclass
class Area:
    """A registered range served from ``source_offset`` onwards."""

    address: int
    length: int
    source_offset: int


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
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
        if not areas:
            raise ValueError("a fault server needs at least one area")
        self.uffd = uffd
        self.areas = [Area(*a) for a in areas]
        self.source = source
        self.page = page_size
        self.chunk = max(chunk or page_size, page_size)
        self.readahead = readahead
        self.on_error = on_error
        self.retries = retries
        self.state = state or SharedState(log_faults)
        self._populate = [(a, 0) for a in self.areas] if populate else []
        self._installed = {id(a): bytearray(a.length // page_size) for a in self.areas}
        self._removed = {id(a): bytearray(a.length // page_size) for a in self.areas}
        self._lock = threading.Lock()
        self._ra: tuple[Area, int, int] | None = None  # area, next offset, end offset
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
                    self.state.add("errors")
                    return False
                self.state.add("retries")
                delay = min(0.005 * 2 ** (attempt - 1), 1.0)
                log.warning("page source read at %#x failed (%s); retry %d in %.3fs",
                            first, err, attempt, delay)
                time.sleep(delay)

    # -- installing -------------------------------------------------------------------------

    def _install(self, area: Area, off: int, length: int, *, skip_installed: bool,
                 dontwake: bool = False) -> int:
        """Install ``[off, off+length)`` of ``area``; returns bytes installed."""
        installed = self._installed[id(area)]
        removed = self._removed[id(area)]
        page = self.page
        runs: list[tuple[int, int]] = []
        start = None
        for p in range(off // page, (off + length) // page):
            want = not (skip_installed and installed[p])
            if want and start is None:
                start = p
            elif not want and start is not None:
                runs.append((start, p))
                start = None
        if start is not None:
            runs.append((start, (off + length) // page))
        total = 0
        for first, end in runs:
            buf = memoryview(bytearray((end - first) * page))
            zero_pages = [p for p in range(first, end) if removed[p]]
            if len(zero_pages) < end - first:
                ok = self._read([(area.source_offset + first * page, buf)])
                if not ok:
                    total += self._fail(area, first * page, (end - first) * page)
                    continue
            for p in zero_pages:  # like anonymous memory, a removed page reads as zeros
                buf[(p - first) * page:(p - first + 1) * page] = bytes(page)
            total += self._copy(area, first * page, buf, dontwake)
        return total

    def _copy(self, area: Area, off: int, buf: memoryview, dontwake: bool) -> int:
        installed = self._installed[id(area)]
        page, pos, done_total = self.page, 0, 0
        mode = CopyMode.DONTWAKE if dontwake else CopyMode(0)
        while pos < len(buf):
            try:
                done = self.uffd.copy(area.address + off + pos, buf[pos:], len(buf) - pos, mode)
            except AlreadyMappedError as err:
                done = err.done
                self.state.add("eexist")
                installed[(off + pos + done) // page] = 1
                pos += page  # skip the page that is already there
            except MappingChangedError as err:
                done = err.done
                self.state.add("eagain")
                pos = len(buf)  # the mapping changes: faults come again after the event
            for p in range((off + pos) // page, (off + pos + done) // page):
                installed[p] = 1
            pos += done
            done_total += done
        self.state.add("bytes_installed", done_total)
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
            self.state.add("poisoned", length // self.page)
        except UffdError as err:
            log.error("could not poison %#x..+%d: %s", addr, length, err)
        return 0

    # -- faults and events ------------------------------------------------------------------

    def _area(self, address: int) -> Area | None:
        for a in self.areas:
            if a.address <= address < a.address + a.length:
                return a
        return None

    def _serve_fault(self, ev: Pagefault, t0: int) -> None:
        st = self.state
        st.add("faults")
        if ev.write:
            st.add("write_faults")
        area = self._area(ev.address)
        if area is None:
            st.set_error(f"fault at {ev.address:#x} outside every served area")
            self.uffd.wake(ev.address & ~(self.page - 1), self.page)
            return
        page_off = (ev.address - area.address) & ~(self.page - 1)
        off = page_off - page_off % self.chunk
        n = min(self.chunk, area.length - off)
        got = self._install(area, off, n, skip_installed=False)
        st.add("fault_bytes", got)
        try:
            self.uffd.wake(area.address + page_off, self.page)
        except UffdError:
            pass  # the range went away: nobody waits on it
        self._update_readahead(area, off, off + n)
        t1 = time.monotonic_ns()
        st.observe(t1 - t0, (ev.address, area.source_offset + page_off, int(ev.flags),
                             ev.thread_id, t0, t1 - t0))

    def _update_readahead(self, area: Area, off: int, end: int) -> None:
        lo, hi = self.readahead
        if not hi:
            return
        with self._lock:
            last_area, last_end = self._last
            sequential = last_area == id(area) and last_end - self.chunk <= off <= last_end
            if sequential:
                self._ra_window = min(max(self._ra_window * 2, lo), hi)
                nxt = max(end, self._ra[1] if self._ra and self._ra[0] is area else end)
                self._ra = (area, nxt, min(area.length, end + self._ra_window))
            else:
                self._ra_window = 0
                self._ra = None
            self._last = (id(area), end)

    def _claim(self) -> tuple[Area, int, int, str] | None:
        with self._lock:
            if self._ra is not None:
                area, nxt, end = self._ra
                if nxt < end:
                    n = min(_PIECE, end - nxt)
                    self._ra = (area, nxt + n, end)
                    return area, nxt, n, "readahead_bytes"
            while self._populate:
                area, nxt = self._populate[0]
                if nxt >= area.length:
                    self._populate.pop(0)
                    continue
                n = min(_PIECE, area.length - nxt)
                self._populate[0] = (area, nxt + n)
                return area, nxt, n, "populate_bytes"
        return None

    def _clear(self, start: int, end: int, removed: bool) -> None:
        for a in self.areas:
            lo, hi = max(start, a.address), min(end, a.address + a.length)
            for p in range((lo - a.address) // self.page, (hi - a.address) // self.page):
                self._installed[id(a)][p] = 0
                if removed:
                    self._removed[id(a)][p] = 1

    def _handle(self, ev: object, t0: int) -> None:
        if isinstance(ev, Pagefault):
            self._serve_fault(ev, t0)
        elif isinstance(ev, Remove):
            self.state.add("remove_events")
            self._clear(ev.start, ev.end, True)
        elif isinstance(ev, Unmap):
            self.state.add("unmap_events")
            self._clear(ev.start, ev.end, False)
        elif isinstance(ev, Remap):
            self.state.add("remap_events")
            for a in self.areas:
                if a.address == ev.old_address and a.length == ev.length:
                    a.address = ev.new_address
        elif isinstance(ev, Fork):
            self.state.add("fork_events")
            if ev.uffd is not None:
                ev.uffd.close()

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        """Serve until ``stop`` is set, the uffd is closed, or the target process exits."""
        while not self._stopped and not (stop is not None and stop.is_set()):
            try:
                events = self.uffd.read_events(64, timeout=0 if self._has_work() else 0.2)
            except (ClosedError, OSError) as err:
                if not isinstance(err, ClosedError):
                    log.info("fault server stops: %s", err)
                return
            t0 = time.monotonic_ns()
            try:
                for ev in events:
                    self._handle(ev, t0)
                if not events:
                    work = self._claim()
                    if work is not None:
                        area, off, n, counter = work
                        self.state.add(counter, self._install(area, off, n,
                                                              skip_installed=True))
            except ProcessGoneError:
                log.info("the process owning the memory exited; fault server stops")
                return
            except RangeNotRegisteredError:
                continue  # unregistered under us: its waiters were woken by the kernel

    def _has_work(self) -> bool:
        with self._lock:
            ra = self._ra is not None and self._ra[1] < self._ra[2]
            return ra or bool(self._populate)

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
            try:
                self.uffd.wake(a.address, a.length)
            except UffdError:
                pass
        self.state.add("prefetch_bytes", total)
        return total

    def counters(self) -> dict[str, object]:
        """Counters (same keys as the native engine's)."""
        return self.state.counters()

    def drain_log(self) -> bytes:
        """Packed fault records since the last call."""
        return self.state.drain_log()
