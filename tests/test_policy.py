"""The serving policy, once, against both runtimes.

Each test runs with a native source served in this process and with the same bytes as a
Python source served by the pager process: chunking, readahead, prefetch, populate, the fault
log and the memory events (REMOVE, REMAP, UNMAP) behave the same. Counts asserted here are
set by the policy (one fault per chunk, a window per sequential fault), never by scheduling:
every step waits until the engine has settled.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import userfault
from pager_helpers import bytes_source, page_data, settled, wait_until
from py_sources import Gated, PyBatched
from userfault import _native
from userfault.working_set import WorkingSet, write_working_set

PAGE = 4096
MiB = 1 << 20
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
pytestmark = pytest.mark.timeout(60)





def touch(p: userfault.Pager, offset: int, length: int = 1, stride: int = PAGE) -> int:
    return _native.touch(p.address + offset, length, stride, 0, 0, False)


@pytest.mark.parametrize("chunk", [PAGE, 16 * PAGE, MiB + 5])
def test_one_fault_installs_one_chunk(runtime: str, chunk: int) -> None:
    size = 8 * MiB
    with userfault.map(bytes_source(runtime, page_data(size)), chunk=chunk, readahead=False) as p:
        touch(p, 4 * p.chunk - PAGE)  # the last page of chunk 3
        s = settled(p, lambda s: s.bytes_installed == p.chunk)
        assert (s.faults, s.fault_bytes) == (1, p.chunk)
        touch(p, 3 * p.chunk, p.chunk)  # the same chunk: no fault
        assert p.stats().faults == 1
        touch(p, 0, size)
        s = settled(p, lambda s: s.bytes_installed == size)
        assert s.faults == -(-size // p.chunk)  # the last chunk is cut at the region's end
        with memoryview(p) as v:
            assert v == page_data(size)


def test_readahead_doubles_while_faults_are_sequential(runtime: str) -> None:
    lo, hi = 64 << 10, 4 * MiB
    size = 64 * MiB
    with userfault.map(bytes_source(runtime, page_data(size)), readahead=(lo, hi)) as p:
        end, window, expected = 0, 0, 0
        for faults in range(1, 11):
            touch(p, end)  # the page after the last window
            window = min(max(lo, 2 * window), hi)
            expected += window
            s = settled(p, lambda s, e=expected: s.readahead_bytes == e, timeout=20)
            assert (s.faults, s.readahead_bytes) == (faults, expected)
            touch(p, end + PAGE, window)  # the window is there: no fault
            assert p.stats().faults == faults
            end += PAGE + window
        assert window == hi


def test_readahead_follows_faults_going_backward(runtime: str) -> None:
    # glibc's memcpy copies large blocks from the top down: bytes(view) faults backward
    lo, hi = 64 << 10, 4 * MiB
    size = 64 * MiB
    with userfault.map(bytes_source(runtime, page_data(size)), readahead=(lo, hi)) as p:
        low = size - PAGE
        touch(p, low)  # a fault far from every stream: no window yet
        assert settled(p).readahead_bytes == 0
        window, expected = 0, 0
        for faults in range(2, 12):
            low -= PAGE
            touch(p, low)  # the page below the last fault or window
            window = min(max(lo, 2 * window), hi)
            expected += window
            s = settled(p, lambda s, e=expected: s.readahead_bytes == e, timeout=20)
            assert (s.faults, s.readahead_bytes) == (faults, expected)
            touch(p, low - window, window)  # the window below is there: no fault
            assert p.stats().faults == faults
            low -= window
        assert window == hi


def test_random_faults_do_not_read_ahead(runtime: str) -> None:
    size = 32 * MiB
    pages = list(range(size // PAGE))
    random.Random(1).shuffle(pages)
    with userfault.map(bytes_source(runtime, page_data(size)), readahead=(64 << 10, 4 * MiB)) as p:
        for i in pages[:300]:
            touch(p, i * PAGE)
        s = settled(p)
        # with a fixed order, the sequential test decides the same way every run
        assert s.faults >= 290 and s.readahead_bytes <= 4 * (64 << 10)


def test_prefetch_installs_in_one_batch_then_no_faults(runtime: str) -> None:
    body = page_data(8 * MiB)
    with userfault.map(bytes_source(runtime, body), readahead=False) as p:
        ranges = [(0, MiB), (4 * MiB + 100, 256 << 10), (len(body) - PAGE, PAGE)]
        done = p.prefetch(ranges)
        assert done == MiB + (256 << 10) + PAGE + PAGE  # an unaligned range rounds out
        s = p.stats()
        assert (s.faults, s.prefetch_bytes) == (0, done)
        for off, n in ranges:
            touch(p, off, n)
        assert p.stats().faults == 0
        assert p.prefetch([(0, MiB)]) == 0  # present pages are skipped
        with memoryview(p) as v:
            assert v[:MiB] == body[:MiB]


def read_many_calls(log: Path) -> list[list[int]]:
    """The page numbers of each read_many call a :class:`PyBatched` source logged."""
    return [[int(r.split("+")[0]) // PAGE for r in line.split()]
            for line in (log.read_text() if log.exists() else "").splitlines()]


def test_a_scattered_working_set_is_read_a_batch_of_runs_at_a_time(tmp_path: Path) -> None:
    """A working set of 40 scattered pages (first-touch order, not file order): the background
    threads read up to UF_BATCH (64) of its runs with one read_many, in the set's order, so
    a source that pipelines (Redis) or fans out its reads pays one call for them."""
    size = 8 * MiB
    body = page_data(size)
    order = random.Random(5).sample(range(0, size // PAGE, 5), 40)
    ws = tmp_path / "scattered.uws"
    write_working_set(ws, WorkingSet(tuple(i * PAGE for i in order), PAGE, source_size=size))
    log = tmp_path / "calls.log"
    with userfault.map(PyBatched(body, str(log)), readahead=False, prefetch=ws,
                       force_prefetch=True) as p:
        touch(p, order[0] * PAGE)  # the first fault starts the set
        s = settled(p, lambda s: s.prefetch_bytes + s.fault_bytes >= 40 * PAGE, timeout=30)
        assert s.prefetch_bytes + s.fault_bytes == 40 * PAGE and s.poisoned == 0
        with memoryview(p) as v:
            assert all(v[i * PAGE:(i + 1) * PAGE] == body[i * PAGE:(i + 1) * PAGE] for i in order)
    calls = read_many_calls(log)
    batches = [c for c in calls if len(c) > 1]
    assert batches, calls  # the set's runs went in batches, not one call each
    for c in batches:  # each in the set's order
        assert c == [i for i in order if i in c], c


def test_willneed_installs_in_the_background_then_no_faults(runtime: str) -> None:
    body = page_data(8 * MiB)
    with userfault.map(bytes_source(runtime, body)) as p:
        ranges = [(MiB, 2 * MiB), (5 * MiB + 100, 2 * PAGE)]
        queued = p.willneed(ranges)
        assert queued == 2 * MiB + 3 * PAGE  # an unaligned range rounds out to whole pages
        s = settled(p, lambda s: s.bytes_installed == queued, timeout=30)
        assert (s.faults, s.readahead_bytes) == (0, queued)  # counted as readahead
        for off, n in ranges:
            touch(p, off, n)
        assert p.stats().faults == 0
        assert p.willneed([(MiB, MiB)]) == MiB  # queued again; present pages are skipped
        with memoryview(p) as v:
            assert v[MiB: 3 * MiB] == body[MiB: 3 * MiB]
            assert v[5 * MiB: 5 * MiB + 3 * PAGE] == body[5 * MiB: 5 * MiB + 3 * PAGE]
        assert settled(p).bytes_installed == queued


def test_scattered_willneed_hints_are_read_a_batch_at_a_time(tmp_path: Path) -> None:
    """40 scattered one-page hints: a background thread gathers the hints that follow the
    first into its piece (up to 64) and reads them with one read_many, in the order given."""
    size = 8 * MiB
    body = page_data(size)
    order = random.Random(6).sample(range(0, size // PAGE, 5), 40)
    log = tmp_path / "calls.log"
    with userfault.map(PyBatched(body, str(log))) as p:
        queued = p.willneed([(i * PAGE, PAGE) for i in order])
        assert queued == 40 * PAGE
        s = settled(p, lambda s: s.readahead_bytes == queued, timeout=30)
        assert s.readahead_bytes == queued and s.faults == 0
        with memoryview(p) as v:
            assert all(v[i * PAGE:(i + 1) * PAGE] == body[i * PAGE:(i + 1) * PAGE] for i in order)
        assert p.stats().faults == 0
    calls = read_many_calls(log)
    assert any(len(c) > 1 for c in calls), calls  # batches, not one call per hint
    assert sorted(i for c in calls for i in c) == sorted(order)  # each page read once
    for c in calls:
        assert c == [i for i in order if i in c], c  # in the order given


def test_willneed_racing_with_a_sequential_reader_installs_each_page_once(runtime: str) -> None:
    size = 16 * MiB
    body = page_data(size)
    with userfault.map(bytes_source(runtime, body)) as p:
        p.willneed([(0, size)])
        touch(p, 0, size)  # faults meet pieces being read, installed, or not claimed yet
        s = settled(p, lambda s: s.bytes_installed == size, timeout=30)
        assert s.bytes_installed == size and s.poisoned == 0
        with memoryview(p) as v:
            assert v == body


def test_willneed_past_a_budget_still_serves_every_page(runtime: str) -> None:
    size = 16 * MiB
    body = page_data(size)
    with userfault.map(bytes_source(runtime, body), max_resident=4 * MiB) as p:
        p.willneed([(0, size)])  # four budgets' worth: dropped once the budget is full
        with memoryview(p) as v:
            for off in range(0, size, MiB):
                assert v[off: off + MiB] == body[off: off + MiB]
        p.check()


def test_willneed_after_the_budget_dropped_the_last_hint_reads_its_whole_range(
        runtime: str) -> None:
    """A hint the budget cut short is dropped; once the memory is given back, the next
    willneed() reads its first range from its start (it began where the dropped one
    stopped, and read nothing). Each piece is cut to the room below the high watermark, so
    the first hint fills it exactly."""
    size, budget = 64 * MiB, 16 * MiB
    body = page_data(size)
    with userfault.map(bytes_source(runtime, body), max_resident=budget) as p:
        p.willneed([(0, size)])
        high = int(budget * 0.9) // PAGE * PAGE
        # where the hint stops is scheduling's (two threads take room in turn); wait until
        # nothing more comes in, and it never passes the high watermark
        def still() -> bool:
            now = p.stats().bytes_installed
            time.sleep(0.3)
            return now > 0 and p.stats().bytes_installed == now

        assert wait_until(still, timeout=30)
        assert p.stats().resident_bytes <= high
        p.region.madvise(mmap.MADV_DONTNEED, 0, size)  # everything back: room again
        assert settled(p, lambda s: s.resident_bytes == 0, timeout=30).resident_bytes == 0
        before = p.stats().readahead_bytes
        assert p.willneed([(32 * MiB, 4 * MiB)]) == 4 * MiB
        s = settled(p, lambda s: s.readahead_bytes - before == 4 * MiB, timeout=30)
        assert s.readahead_bytes - before == 4 * MiB and s.faults == 0
        with memoryview(p) as v:
            assert v[32 * MiB: 36 * MiB] == body[32 * MiB: 36 * MiB]


def test_willneed_refuses_bad_ranges_and_pagers_without_background_threads(runtime: str) -> None:
    body = page_data(MiB)
    with userfault.map(bytes_source(runtime, body)) as p:
        with pytest.raises(ValueError, match=r"willneed range \(0, 1048577\) is outside"):
            p.willneed([(0, MiB + 1)])
        with pytest.raises(ValueError, match="outside"):
            p.willneed([(-1, 10)])
        with pytest.raises(ValueError, match=r"willneed ranges are \(offset, length\) pairs"):
            p.willneed([(0,)])  # type: ignore[list-item]
    with pytest.raises(userfault.PagerError, match="closed"):
        p.willneed([(0, PAGE)])
    with userfault.map(bytes_source(runtime, body), readahead=False) as p, \
            pytest.raises(ValueError, match="willneed needs the background threads"):
        p.willneed([(0, PAGE)])


def test_willneed_refuses_more_than_its_pending_ranges() -> None:
    with userfault.map(userfault.ZeroSource(((1 << 17) + 1) * PAGE)) as p:
        every_other = [(2 * i * PAGE, PAGE) for i in range(65537)]
        with pytest.raises(ValueError, match="more than 65536 ranges pending"):
            p.willneed(every_other)
        settled(p, lambda s: s.readahead_bytes == 65536 * PAGE, timeout=60)
        assert p.willneed([(PAGE, PAGE)]) == PAGE  # room again once the queue is read


def test_populate_fills_everything_faults_first(runtime: str) -> None:
    size = 16 * MiB
    body = page_data(size)
    with userfault.map(bytes_source(runtime, body), populate=True, readahead=False) as p:
        touch(p, size - PAGE)  # served by a fault, or populate got there first
        s = settled(p, lambda s: s.bytes_installed == size, timeout=30)
        assert s.populate_bytes + s.fault_bytes == size
        with memoryview(p) as v:
            assert v == body


def test_many_threads_each_page_faults_once(runtime: str) -> None:
    size = 16 * MiB
    body = page_data(size)
    with userfault.map(bytes_source(runtime, body), readahead=False, threads=2) as p:
        def run(t: int) -> None:
            touch(p, t * PAGE, size - t * PAGE, 4 * PAGE)  # threads take interleaved pages

        threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        s = settled(p, lambda s: s.bytes_installed == size)
        assert s.faults + s.eexist >= size // PAGE and s.bytes_installed == size
        with memoryview(p) as v:
            assert v == body


def test_the_fault_log(runtime: str) -> None:
    body = page_data(MiB)
    with userfault.map(bytes_source(runtime, body), readahead=False, log_faults=64) as p:
        for i in (3, 1, 7):
            touch(p, i * PAGE + 5)
        settled(p, lambda s: s.faults == 3)
        recs = p.faults()
        assert [r.offset for r in recs] == [3 * PAGE, PAGE, 7 * PAGE]
        # the kernel reports the page (the exact address needs UFFD_FEATURE_EXACT_ADDRESS)
        assert [r.address for r in recs] == [p.address + o for o in (3 * PAGE, PAGE, 7 * PAGE)]
        assert all(r.kind == "read" and r.length == PAGE for r in recs)
        assert p.faults() == []  # drained


@pytest.mark.parametrize("region", ["anonymous", "memfd"])
def test_removed_pages_reload_from_the_source(runtime: str, region: str) -> None:
    body = page_data(2 * MiB)
    with userfault.map(bytes_source(runtime, body), region=region, readahead=False) as p:
        with memoryview(p) as v:
            assert v == body
            v[:PAGE] = b"W" * PAGE
        before = settled(p).faults
        advice = mmap.MADV_DONTNEED if region == "anonymous" else mmap.MADV_REMOVE
        p.region.madvise(advice, 0, MiB)
        settled(p, lambda s: s.remove_events == 1)
        with memoryview(p) as v:
            assert v == body  # from the source again: not zeros, not the write
        assert p.stats().faults > before


def test_a_remapped_region_keeps_being_served(runtime: str) -> None:
    size = 4 * MiB
    half = size // 2
    body = page_data(size)

    def move(frm: int, length: int, to: int) -> None:
        got, err = _native.mremap(frm, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, to)
        assert (got, err) == (to, 0)

    def page_sum(addr: int, off: int) -> bool:
        return _native.touch(addr, PAGE, 1, 0, 0, False) == sum(body[off:off + PAGE])

    with userfault.map(bytes_source(runtime, body), readahead=False) as p:
        old = p.address
        touch(p, 0)
        new, err = _native.mmap(0, size, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        # (PROT_NONE: a place to move it to)
        assert err == 0
        move(old, size, new)
        try:
            settled(p, lambda s: s.remap_events == 1)
            # the whole area moved: pages never loaded are served at the new address
            assert page_sum(new + 3 * PAGE, 3 * PAGE)
            # half of it moves back: the engine splits the area and follows both halves
            move(new + half, half, old + half)
            settled(p, lambda s: s.remap_events == 2)
            assert page_sum(old + half + 5 * PAGE, half + 5 * PAGE)
            assert page_sum(new + 7 * PAGE, 7 * PAGE)
        finally:
            move(new, half, old)
        settled(p, lambda s: s.remap_events == 3)
        with memoryview(p) as v:
            assert v == body
        assert p.check() is None


def move_range(frm: int, length: int, to: int) -> None:
    got, err = _native.mremap(frm, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, to)
    assert (got, err) == (to, 0)


@contextlib.contextmanager
def quarters_swapped(p: userfault.Pager, body: bytes) -> Iterator[int]:
    """Move the pager's second quarter away and its fourth into the hole (two REMAPs); yields
    where the second went. Then both go back, and every byte is checked."""
    q, old = p.size // 4, p.address
    far, err = _native.mmap(0, q, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert err == 0
    move_range(old + q, q, far)
    move_range(old + 3 * q, q, old + q)
    try:
        settled(p, lambda s: s.remap_events == 2)
        yield far
    finally:
        move_range(old + q, q, old + 3 * q)
        move_range(far, q, old + q)
    settled(p, lambda s: s.remap_events == 4)
    with memoryview(p) as v:
        assert v == body


def each_quarter_holds_its_own(p: userfault.Pager, far: int, body: bytes) -> None:
    q, old = p.size // 4, p.address
    for addr, src in ((old, 0), (old + q, 3 * q), (old + 2 * q, 2 * q), (far, q)):
        got = bytes((ctypes.c_char * q).from_address(addr))
        assert got == body[src:src + q], f"{addr - old:#x} holds the wrong bytes"
    assert settled(p).poisoned == 0


def test_a_working_set_after_a_remap_serves_each_part_its_own_bytes(
        runtime: str, tmp_path: Path) -> None:
    """A working set of the whole region, its first fault after two mremaps: the second part
    moved away, the fourth into its place. The set named the old area: read on, it would
    install the second part's bytes where the fourth's now are. The engine leaves the rest
    of the set to faults."""
    size = 4 * MiB
    body = page_data(size)
    ws = tmp_path / "all.uws"
    write_working_set(ws, WorkingSet(tuple(range(0, size, PAGE)), PAGE, source_size=size))

    with userfault.map(bytes_source(runtime, body), readahead=False, prefetch=ws,
                       force_prefetch=True) as p, quarters_swapped(p, body) as far:
        each_quarter_holds_its_own(p, far, body)  # the first fault starts the set


@pytest.mark.parametrize("how", ["working set", "willneed"])
def test_a_piece_read_across_two_remaps_is_not_installed_at_its_old_addresses(
        tmp_path: Path, how: str) -> None:
    """A background piece of the second quarter, read while the process moves that quarter
    away and the fourth into its place: installed with the area it was claimed with, it
    would put the second quarter's bytes where the fourth's now are. The engine leaves its
    pages to faults. (A Python source, whose reads the test can hold.)"""
    size = 4 * MiB
    q = size // 4
    body = page_data(size)
    gate = str(tmp_path / "gate")
    ws = tmp_path / "all.uws"
    write_working_set(ws, WorkingSet(tuple(range(0, size, PAGE)), PAGE, source_size=size))

    def lines(suffix: str) -> int:
        path = Path(gate + suffix)
        return len(path.read_text().splitlines()) if path.exists() else 0

    options: dict[str, object] = dict(readahead=False, prefetch=ws, force_prefetch=True) \
        if how == "working set" else {}
    with userfault.map(Gated(body, q, size, gate), **options) as p:
        touch(p, 0)  # the first fault starts the set
        if how == "willneed":
            assert p.willneed([(q, q)]) == q
        assert wait_until(lambda: lines(".held") > 0, 10), "no background read was held"
        with quarters_swapped(p, body) as far:
            before = p.stats()
            Path(gate).touch()  # the held reads go on
            assert wait_until(lambda: lines(".done") == lines(".held"), 30)
            # their pieces end: installed (the bug) or given up (EAGAIN)
            assert wait_until(lambda: p.stats().eagain > before.eagain
                              or p.stats().bytes_installed >= before.bytes_installed + PAGE, 10)
            each_quarter_holds_its_own(p, far, body)


def test_memory_moved_onto_another_part_reads_the_moved_bytes(runtime: str) -> None:
    """mremap(MREMAP_FIXED) of the fourth quarter onto the first: what was mapped there is
    gone, so its pages not loaded yet read the fourth quarter's bytes, not the first's (a
    stale area at the destination was found first)."""
    size = 1 * MiB
    body = page_data(size)
    q = size // 4
    with userfault.map(bytes_source(runtime, body), readahead=False) as p:
        old = p.address
        touch(p, q, q, 1)  # the second quarter loaded before, the rest not
        move_range(old + 3 * q, q, old)
        settled(p, lambda s: s.remap_events == 1)
        for addr, src in ((old, 3 * q), (old + q, q), (old + 2 * q, 2 * q)):
            got = bytes((ctypes.c_char * q).from_address(addr))
            assert got == body[src:src + q], f"{addr - old:#x} holds the wrong bytes"
        assert settled(p).poisoned == 0


def test_unmapped_pages_are_forgotten(runtime: str) -> None:
    size = 2 * MiB
    body = page_data(size)
    with userfault.map(bytes_source(runtime, body), readahead=False) as p:
        touch(p, 0, size)
        settled(p, lambda s: s.bytes_installed == size)
        assert _native.munmap(p.address + size - PAGE, PAGE) == 0  # close unmaps the rest
        assert settled(p, lambda s: s.unmap_events == 1).unmap_events == 1
        assert touch(p, 0, size - PAGE, 1) == sum(body[:size - PAGE])
