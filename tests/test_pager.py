"""Pager and native sources on the real kernel: every page checked against its source.

Each test maps real memory registered with userfaultfd and served by the C engine; data is
compared page by page (or by streaming checksum) with what the source holds.
"""

from __future__ import annotations

import gc
import hashlib
import mmap
import os
import random
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import userfault
from conftest import reserve_hugepages
from pager_helpers import run_script, settled, wait_until
from userfault import (
    BufferSource,
    FileSource,
    Pager,
    PagerError,
    PatternSource,
    PrefetchError,
    ZeroSource,
    _native,
)

np = pytest.importorskip("numpy")

PAGE = 4096
MiB = 1 << 20
HUGE = 2 * MiB


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def page_numbered(n: int) -> bytes:
    """Bytes whose every 8-byte word holds its own index: a misplaced page cannot match."""
    return np.arange(n // 8, dtype=np.uint64).tobytes()


def assert_same(pager: Pager, expected: bytes | memoryview) -> None:
    """Every byte of the pager equals ``expected``; name the first bad page otherwise."""
    with memoryview(pager) as view:
        assert view.nbytes == len(expected)
        if hashlib.sha1(view).digest() == hashlib.sha1(expected).digest():
            return
        for off in range(0, view.nbytes, PAGE):
            if view[off:off + PAGE] != expected[off:off + PAGE]:
                pytest.fail(f"page at offset {off:#x} differs from the source")


def proc_entries(what: str) -> set[str]:
    return set(os.listdir(f"/proc/self/{what}"))


def mapped(address: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return True
    return False


@pytest.fixture(scope="module")
def data8() -> bytes:
    return random_bytes(8 * MiB, seed=8)


# -- every native source ---------------------------------------------------------------------


def test_zero_source_served_with_zeropage() -> None:
    with userfault.map(ZeroSource(16 * MiB)) as p:
        assert p.install == "zeropage"
        assert_same(p, bytes(16 * MiB))
        s = settled(p, lambda s: s.bytes_installed == p.size)
        assert s.faults > 0 and s.bytes_installed == 16 * MiB
        assert p.check() is None


def test_zero_source_with_copy() -> None:
    with userfault.map(ZeroSource(4 * MiB), install="copy", readahead=False) as p:
        assert_same(p, bytes(4 * MiB))
        assert p.stats().faults == 1024


@pytest.mark.parametrize("pattern", [b"\xa5", b"userfault", random_bytes(5000, seed=3)])
def test_pattern_source(pattern: bytes) -> None:
    size = 3 * MiB + 123
    with userfault.map(PatternSource(pattern, size)) as p:
        assert p.size == 3 * MiB + PAGE  # rounded up to whole pages
        want = (pattern * (p.size // len(pattern) + 1))[:p.size]
        assert_same(p, want)


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "mmap", "numpy", "memoryview"])
def test_buffer_sources(kind: str, data8: bytes) -> None:
    if kind == "bytes":
        src = data8
    elif kind == "bytearray":
        src = bytearray(data8)
    elif kind == "mmap":
        src = mmap.mmap(-1, len(data8))
        src[:] = data8
    elif kind == "numpy":
        src = np.frombuffer(data8, dtype=np.uint32).copy().reshape(-1, 1024)
    else:
        src = memoryview(data8)
    with userfault.map(src) as p:
        assert isinstance(p.source, BufferSource)
        assert_same(p, data8)


def test_file_source_with_partial_tail_page(tmp_path: Path) -> None:
    size = 5 * MiB + 1234
    body = random_bytes(size, seed=5)
    path = tmp_path / "odd.bin"
    path.write_bytes(body)
    with userfault.map(str(path)) as p:
        assert isinstance(p.source, FileSource)
        assert p.size == 5 * MiB + PAGE
        assert_same(p, body + bytes(p.size - size))  # the tail page reads zeros past EOF
    with userfault.map(path, readahead=False) as p:  # the tail page alone, as its own fault
        with memoryview(p) as v:
            assert v[p.size - PAGE:] == body[5 * MiB:] + bytes(PAGE - 1234)
        assert p.stats().faults == 1


def test_file_source_object_and_size_option(tmp_path: Path) -> None:
    body = page_numbered(2 * MiB)
    path = tmp_path / "f.bin"
    path.write_bytes(body)
    src = FileSource(path)
    with userfault.map(src, size=4 * MiB) as p:  # larger than the file: zeros
        assert p.size == 4 * MiB
        assert_same(p, body + bytes(2 * MiB))
    src.close()  # a source object passed in stays the caller's to close


# -- every install path ----------------------------------------------------------------------

INSTALLS = [("copy", "anonymous"), ("move", "anonymous"), ("continue", "memfd"),
            ("copy", "memfd")]


@pytest.mark.parametrize("chunk", [PAGE, 64 << 10, MiB])
@pytest.mark.parametrize(("install", "region"), INSTALLS)
def test_install_paths_every_page(install: str, region: str, chunk: int, data8: bytes) -> None:
    with userfault.map(data8, install=install, region=region, chunk=chunk) as p:
        assert p.install == install and p.region_kind == region
        assert_same(p, data8)
        s = settled(p, lambda s: s.bytes_installed == p.size)
        assert s.bytes_installed == len(data8)
        assert s.poisoned == 0 and s.errors == 0
        assert p.check() is None
        if install == "continue":
            # A MINOR fault means the page was cached but not mapped: here only a background
            # thread (readahead) filling the page cache just before its CONTINUE causes one.
            assert s.minor_faults <= s.faults


@pytest.mark.parametrize(("install", "region"), INSTALLS)
def test_install_paths_random_order(install: str, region: str, data8: bytes) -> None:
    """Random single-page faults (no readahead): each page lands at its own address."""
    order = list(range(len(data8) // PAGE))
    random.Random(4).shuffle(order)
    with userfault.map(data8, install=install, region=region, readahead=False) as p:
        for i in order[:512]:
            want = sum(data8[i * PAGE:(i + 1) * PAGE:512])
            assert _native.touch(p.address + i * PAGE, PAGE, 512, 0, 0, True) == want
        assert p.stats().faults == 512
        assert_same(p, data8)


def test_continue_maps_page_cache_written_before_the_fault(data8: bytes) -> None:
    """On memfd, bytes already in the page cache are mapped as they are (MINOR + CONTINUE)."""
    with userfault.map(data8, install="continue", region="memfd", readahead=False) as p:
        os.pwrite(p.region.memfd, b"X" * PAGE, 3 * PAGE)
        with memoryview(p) as v:
            assert v[3 * PAGE:4 * PAGE] == b"X" * PAGE
            assert v[4 * PAGE:5 * PAGE] == data8[4 * PAGE:5 * PAGE]
        assert p.stats().minor_faults == 1


@pytest.mark.parametrize("chunk", [None, 4 * MiB])
def test_hugetlb_copy(hugepages: int, chunk: int | None) -> None:
    body = page_numbered(12 * MiB + 5000)
    with userfault.map(body, region="hugetlb", chunk=chunk) as p:
        assert p.install == "copy" and p.region.page_size == HUGE
        assert p.size == 14 * MiB
        assert_same(p, body + bytes(p.size - len(body)))
        assert p.stats().bytes_installed == 14 * MiB
    assert userfault.hugepages_free() >= 7  # the pages went back to the pool


@pytest.mark.parametrize("threads", [1, 2])
def test_hugetlb_populate_and_readahead(hugepages: int, threads: int) -> None:
    body = page_numbered(14 * MiB)
    with userfault.map(body, region="hugetlb", populate=True, threads=threads) as p:
        _native.touch(p.address + 10 * MiB, 1, 1, 0, 0, True)
        _native.touch(p.address, 6 * MiB, PAGE, 0, 0, False)
        s = settled(p, lambda s: s.bytes_installed == p.size)
        assert s.bytes_installed == p.size
        assert (s.fault_bytes + s.readahead_bytes + s.populate_bytes == p.size)
        assert p.check() is None
        assert_same(p, body)


def test_hugetlb_zero_source_uses_copy(hugepages: int) -> None:
    with userfault.map(ZeroSource(4 * MiB), region="hugetlb") as p:
        assert p.install == "copy"
        assert_same(p, bytes(4 * MiB))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_gib_file_streaming_checksum(tmp_path: Path) -> None:
    """A 1 GiB file whose every word is its own index, compared by a streaming checksum."""
    size = 1 << 30
    path = tmp_path / "gib.bin"
    step = 64 * MiB
    file_hash = hashlib.sha1()
    with open(path, "wb") as f:
        for off in range(0, size, step):
            block = np.arange(off // 8, (off + step) // 8, dtype=np.uint64).tobytes()
            file_hash.update(block)
            f.write(block)
    try:
        with userfault.map(path, threads=2) as p:
            assert p.size == size
            h = hashlib.sha1()
            with memoryview(p) as v:
                for off in range(0, size, step):
                    h.update(v[off:off + step])
                assert np.frombuffer(v, np.uint64, 1, size - 8)[0] == size // 8 - 1
            assert h.digest() == file_hash.digest()
            s = settled(p, lambda s: s.bytes_installed == p.size)
            # every byte was installed exactly once, by a fault or by readahead (how the two
            # share the work is the scheduler's choice: benchmarks/ measures it)
            assert s.fault_bytes + s.readahead_bytes == s.bytes_installed == size
            assert p.check() is None
    finally:
        path.unlink()


# -- concurrency -----------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_many_faulting_threads(threads: int) -> None:
    size = 32 * MiB
    body = page_numbered(size)
    npages = size // PAGE
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def toucher(t: int) -> None:
        try:
            pages = list(range(t, npages, 8))
            random.Random(t).shuffle(pages)
            start.wait()
            for i in pages:
                got = _native.touch(p.address + i * PAGE + 8 * t, 1, 1, 0, 0, t % 3 == 0)
                assert got == body[i * PAGE + 8 * t]
        except BaseException as err:
            errors.append(err)

    with userfault.map(body, threads=threads, readahead=False) as p:
        ts = [threading.Thread(target=toucher, args=(t,)) for t in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert not any(t.is_alive() for t in ts)
        assert not errors, errors
        s = settled(p, lambda s: s.bytes_installed == p.size)
        assert s.faults == npages  # one fault per page: each touched by exactly one thread
        assert_same(p, body)


@pytest.mark.parametrize(("install", "region"), INSTALLS[:3])
def test_threads_racing_on_the_same_pages(install: str, region: str) -> None:
    """Several threads fault the same pages at once: EEXIST is absorbed, data stays right."""
    size = 16 * MiB
    body = random_bytes(size, seed=9)
    sums = [sum(body[i:i + PAGE:256]) for i in range(0, size, PAGE)]
    bad: list[int] = []

    def toucher(seed: int) -> None:
        order = list(range(size // PAGE))
        random.Random(seed % 2).shuffle(order)  # pairs of threads walk the same order
        for i in order:
            if _native.touch(p.address + i * PAGE, PAGE, 256, 0, 0, seed >= 6) != sums[i]:
                bad.append(i)

    with userfault.map(body, threads=4, chunk=16 * PAGE, readahead=False, install=install,
                       region=region) as p:
        ts = [threading.Thread(target=toucher, args=(s,)) for s in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert not bad
        s = settled(p, lambda s: s.bytes_installed == p.size)
        assert s.bytes_installed == size
        assert s.poisoned == 0 and p.check() is None
        assert_same(p, body)


@pytest.mark.parametrize(("install", "region"), INSTALLS[:3])
def test_prefetch_racing_with_faults(install: str, region: str) -> None:
    size = 64 * MiB
    body = page_numbered(size)
    stop = threading.Event()
    bad: list[int] = []

    def toucher(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            i = rng.randrange(size // PAGE)
            if _native.touch(p.address + i * PAGE, 8, 1, 0, 0, False) != sum(
                    body[i * PAGE:i * PAGE + 8]):
                bad.append(i)

    with userfault.map(body, readahead=False, threads=2, install=install, region=region) as p:
        ts = [threading.Thread(target=toucher, args=(s,)) for s in range(3)]
        for t in ts:
            t.start()
        try:
            done = p.prefetch(None)
        finally:
            stop.set()
            for t in ts:
                t.join(10)
        s = settled(p, lambda s: s.bytes_installed == p.size)
        assert not bad
        assert done == s.prefetch_bytes
        assert done + s.fault_bytes == size  # every page exactly once, by one or the other
        assert s.bytes_installed == size
        assert s.eexist >= 0  # > 0 when a fault won a race with the prefetch (timing)
        faults = s.faults
        assert_same(p, body)
        assert p.stats().faults == faults


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("install", "region"), INSTALLS[:3])
def test_populate_in_background_while_faults_go_first(threads: int, install: str,
                                                      region: str) -> None:
    size = 64 * MiB
    body = page_numbered(size)
    with userfault.map(body, populate=True, threads=threads, readahead=False, install=install,
                       region=region) as p:
        for off in range(size - PAGE, 0, -size // 16):  # from the end, where populate is last
            assert _native.touch(p.address + off, 8, 1, 0, 0, True) == sum(body[off:off + 8])
        assert wait_until(lambda: p.stats().bytes_installed == size)
        s = p.stats()
        assert s.populate_bytes > 0
        assert s.populate_bytes + s.fault_bytes + s.readahead_bytes + s.prefetch_bytes == size
        faults = s.faults
        assert_same(p, body)
        assert p.stats().faults == faults  # everything was already there
        assert p.check() is None


# -- policy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [PAGE, 16 * PAGE, 64 * PAGE, MiB + 5])
def test_chunk_size(chunk: int) -> None:
    size = 8 * MiB
    with userfault.map(PatternSource(b"0123456789abcdef", size), chunk=chunk,
                       readahead=False) as p:
        assert p.chunk % PAGE == 0 and p.chunk >= chunk
        _native.touch(p.address + 4 * p.chunk - PAGE, 1, 1, 0, 0, True)  # last page of chunk 3
        s = settled(p, lambda s: s.bytes_installed == p.chunk)
        assert (s.faults, s.bytes_installed) == (1, p.chunk)
        _native.touch(p.address + 3 * p.chunk, p.chunk, PAGE, 0, 0, True)  # same chunk
        assert p.stats().faults == 1
        _native.touch(p.address, size, PAGE, 0, 0, True)
        s = settled(p, lambda s: s.bytes_installed == size)
        assert s.faults == -(-size // p.chunk)  # the last chunk is cut at the region's end
        assert s.bytes_installed == size


def test_readahead_grows_on_sequential_faults() -> None:
    """A fault at the start, then each fault that continues the last window, doubles the
    window (64 KiB up to 4 MiB), and the window is installed without faults. Every step waits
    for the background copy to finish, so nothing here depends on how fast the copier runs
    against the toucher."""
    size = 64 * MiB
    lo, hi = 64 << 10, 4 * MiB
    with userfault.map(ZeroSource(size), install="copy", readahead=(lo, hi)) as p:
        end, window, expected = 0, 0, 0
        for faults in range(10):
            _native.touch(p.address + end, 1, 1, 0, 0, True)  # the page after the window
            window = min(max(lo, 2 * window), hi)
            expected += window
            s = settled(p, lambda s, e=expected: s.readahead_bytes == e)
            assert (s.faults, s.readahead_bytes) == (faults + 1, expected)
            # the window behind the fault is present: touching it faults no more
            _native.touch(p.address + end + PAGE, window, PAGE, 0, 0, True)
            assert p.stats().faults == faults + 1
            end += PAGE + window
        assert window == hi


def test_random_faults_do_not_trigger_readahead() -> None:
    size = 64 * MiB
    order = list(range(size // PAGE))
    random.Random(1).shuffle(order)
    with userfault.map(ZeroSource(size), install="copy") as p:
        for i in order[:2000]:
            _native.touch(p.address + i * PAGE, 1, 1, 0, 0, True)
        s = settled(p)
        assert s.faults >= 1900
        assert s.readahead_bytes <= 2 * MiB  # a rare accidental neighbour at most


def test_readahead_disabled_and_bounded() -> None:
    size = 16 * MiB
    with userfault.map(ZeroSource(size), install="copy", readahead=False) as p:
        _native.touch(p.address, size, PAGE, 0, 0, False)
        s = settled(p, lambda s: s.bytes_installed == size)
        assert s.faults == size // PAGE and s.readahead_bytes == 0
    with userfault.map(ZeroSource(size), install="copy", readahead=(PAGE, 8 * PAGE)) as p:
        assert p.readahead == (PAGE, 8 * PAGE)
        _native.touch(p.address, size, PAGE, 0, 0, False)
        s = settled(p, lambda s: s.bytes_installed == size)
        assert s.bytes_installed == size
        assert s.faults >= size // PAGE // 9  # a window of at most 8 pages per fault


def test_prefetch_ranges_then_no_faults(data8: bytes) -> None:
    with userfault.map(data8, readahead=False) as p:
        ranges = [(0, MiB), (4 * MiB + 100, 256 << 10), (len(data8) - PAGE, PAGE)]
        done = p.prefetch(ranges)
        assert done == MiB + (256 << 10) + PAGE + PAGE  # unaligned range rounds out
        s = p.stats()
        assert s.faults == 0 and s.prefetch_bytes == done
        for off, n in ranges:
            _native.touch(p.address + off, n, PAGE, 0, 0, True)
        assert p.stats().faults == 0
        assert p.prefetch([(0, MiB)]) == 0  # present pages are skipped
        with memoryview(p) as v:
            assert v[:MiB] == data8[:MiB]
            assert v[4 * MiB:4 * MiB + PAGE] == data8[4 * MiB:4 * MiB + PAGE]
        assert p.stats().faults == 0


def test_prefetch_everything(data8: bytes) -> None:
    with userfault.map(data8, readahead=False) as p:
        _native.touch(p.address + MiB, 1, 1, 0, 0, True)
        assert p.prefetch(None) == len(data8) - PAGE
        s = settled(p, lambda s: s.bytes_installed == p.size)
        assert s.faults == 1 and s.bytes_installed == len(data8)
        assert_same(p, data8)
        assert p.stats().faults == 1


def test_prefetch_rejects_ranges_outside() -> None:
    with userfault.map(ZeroSource(MiB)) as p:
        for bad in [(-1, 10), (0, MiB + 1), (MiB, 1), (5, -3)]:
            with pytest.raises(ValueError, match="outside"):
                p.prefetch([bad])


# -- counters and the fault log --------------------------------------------------------------


def test_counters_histogram_and_fault_log() -> None:
    size = 16 * MiB
    with userfault.map(page_numbered(size), readahead=False, log_faults=4096) as p:
        tids: list[int] = []
        pages = [7, 3, 100, 1000, 5, 6]

        def toucher() -> None:
            tids.append(threading.get_native_id())
            for i in pages:
                _native.touch(p.address + i * PAGE + 17, 1, 1, 1, 0x5A, False)

        t = threading.Thread(target=toucher)
        t.start()
        t.join(10)
        _native.touch(p.address + 2000 * PAGE, 1, 1, 0, 0, True)
        s = settled(p, lambda s: s.bytes_installed == 7 * PAGE)
        assert s.faults == 7
        assert s.write_faults == 6
        assert s.bytes_installed == s.fault_bytes == 7 * PAGE
        assert sum(s.latency_histogram) == s.faults
        assert s.blocked_ns > 0 and s.service_max_ns > 0
        assert 0 < s.latency_percentile(50) <= s.latency_percentile(99)
        assert "7 faults" in s.summary()
        recs = p.faults()
        assert [r.offset for r in recs] == [i * PAGE for i in [*pages, 2000]]
        # without EXACT_ADDRESS the kernel reports the page, not the byte
        assert [r.address for r in recs] == [p.address + i * PAGE for i in [*pages, 2000]]
        assert {r.thread_id for r in recs[:-1]} == {tids[0]}
        assert recs[-1].thread_id == threading.get_native_id()
        assert all(r.flags & 1 for r in recs[:-1]) and not recs[-1].flags & 1  # WRITE bit
        assert all(r.service_ns > 0 and r.time_ns > 0 for r in recs)
        assert p.faults() == []  # drained
        with memoryview(p) as v:
            assert v[7 * PAGE + 17] == 0x5A
            assert v[7 * PAGE + 16] == ((7 * PAGE + 16) // 8) & 0xFF  # the rest is the source


def test_fault_log_overflow_is_counted() -> None:
    with userfault.map(ZeroSource(MiB), install="copy", readahead=False, log_faults=16) as p:
        _native.touch(p.address, MiB, PAGE, 0, 0, True)
        wait_until(lambda: p.stats().log_dropped == 256 - 16)
        assert p.stats().faults == 256
        assert p.stats().log_dropped == 256 - 16
        recs = p.faults()
        assert [r.offset for r in recs] == [i * PAGE for i in range(16)]
        assert p.stats().log_dropped == 240


def test_no_log_by_default() -> None:
    with userfault.map(ZeroSource(MiB), readahead=False) as p:
        _native.touch(p.address, MiB, PAGE, 0, 0, True)
        assert p.faults() == []


# -- numpy -----------------------------------------------------------------------------------


def test_numpy_array_and_close_with_live_array() -> None:
    src = np.linspace(0.0, 1.0, 3 * 1024 * 1024).reshape(3, 1024, 1024)
    p = userfault.map(src)
    arr = p.array("float64", src.shape)
    assert arr.shape == src.shape and arr.dtype == np.float64
    assert np.array_equal(arr, src)
    flat = p.array("float64")  # default: the source's size in items
    assert flat.shape == (src.size,)
    del flat
    with pytest.raises(BufferError):
        p.close()
    assert not p.closed
    assert arr[2, 1023, 1023] == 1.0
    del arr
    p.close()
    assert p.closed


# -- lifetime --------------------------------------------------------------------------------


def test_no_thread_or_fd_leak_over_50_pagers(data8: bytes) -> None:
    warm = userfault.map(data8, threads=2)
    warm.close()
    fds, tasks = proc_entries("fd"), proc_entries("task")
    for i in range(50):
        kw = [{}, {"install": "move"}, {"install": "continue", "region": "memfd"},
              {"populate": True, "threads": 3}][i % 4]
        p = userfault.map(data8[:MiB], **kw)
        assert len(proc_entries("task")) > len(tasks)
        _native.touch(p.address, MiB, PAGE * 3, 0, 0, False)
        p.close()
    assert proc_entries("fd") == fds
    assert proc_entries("task") == tasks


def test_close_idempotent_unmaps_and_rejects_use() -> None:
    p = userfault.map(ZeroSource(4 * MiB))
    addr = p.address
    _native.touch(addr, 4 * MiB, PAGE, 0, 0, True)
    assert mapped(addr)
    p.close()
    assert p.closed and not mapped(addr)
    p.close()
    with p:  # a context manager on a closed pager is harmless
        pass
    with pytest.raises(PagerError, match="closed"):
        p.prefetch(None)
    with pytest.raises((ValueError, BufferError)):
        memoryview(p)
    assert "closed" in repr(p)


def test_close_with_view_alive_raises_buffer_error() -> None:
    p = userfault.map(ZeroSource(MiB))
    v = p.view()
    with pytest.raises(BufferError):
        p.close()
    v.release()
    p.close()


def test_file_source_closed_with_pager(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"x" * 10000)
    fds = proc_entries("fd")
    with userfault.map(path) as p:
        assert len(proc_entries("fd")) > len(fds)
        with memoryview(p) as v:
            assert v[:10000] == b"x" * 10000
    assert proc_entries("fd") == fds


def test_interpreter_exit_with_open_pagers() -> None:
    r = run_script("""
        import userfault, numpy as np
        from userfault import _native
        pagers = [userfault.map(np.arange(1 << 20, dtype=np.uint64), threads=2)
                  for _ in range(3)]
        z = userfault.map(userfault.ZeroSource(1 << 24), populate=True)
        v = memoryview(pagers[0])            # a view alive at exit too
        assert int(np.frombuffer(v, np.uint64)[12345]) == 12345
        _native.touch(pagers[1].address, pagers[1].size, 4096, 0, 0, True)
        print("ok")
    """)
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr


def test_interpreter_exit_while_a_thread_is_mid_touch() -> None:
    """Daemon threads are not joined before atexit: the exit hook must not unmap memory
    under a thread that is touching it (it used to: SIGSEGV at exit)."""
    r = run_script("""
        import threading, time, userfault
        from userfault import _native
        p = userfault.map(userfault.ZeroSource(1 << 30), install="copy", readahead=False)
        started = threading.Event()
        def loop():
            started.set()
            while True:
                _native.touch(p.address, p.size, 4096, 0, 0, False)
        threading.Thread(target=loop, daemon=True).start()
        started.wait()
        time.sleep(0.2)
        print("exiting", p.stats().faults > 0)
    """)
    assert r.stdout.strip() == "exiting True", r.stderr
    assert r.returncode == 0, (r.returncode, r.stderr)


def test_atexit_handler_can_still_read_the_memory() -> None:
    r = run_script("""
        import atexit
        atexit.register(lambda: print("late", int(arr[-1000:].sum()), flush=True))
        import numpy as np, userfault     # its exit hook runs before the lambda
        p = userfault.map(np.arange(1 << 22, dtype=np.uint64))
        arr = p.array("uint64")
    """, timeout=5)
    assert r.returncode == 0 and r.stdout.split() == ["late", str(sum(range(4193304, 4194304)))]


# -- errors ----------------------------------------------------------------------------------


def test_truncated_file_gets_sigbus_not_zeros(tmp_path: Path) -> None:
    path = tmp_path / "shrinks.bin"
    r = run_script(f"""
        import os, userfault
        from userfault import _native
        path = {str(path)!r}
        with open(path, "wb") as f:
            f.write(b"\\x01" * (8 << 20))
        p = userfault.map(path, readahead=False, retries=1)
        assert _native.touch(p.address, 4096, 1, 0, 0, True) == 4096
        os.truncate(path, 4096)
        print("truncated", flush=True)
        s = _native.touch(p.address + (4 << 20), 4096, 1, 0, 0, True)
        print("read", s, flush=True)
    """)
    assert r.stdout.split() == ["truncated"], (r.stdout, r.stderr)
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stderr)
    # logged before the SIGBUS: which page, which file, why (the file's real size)
    assert "userfault: poisoned 0x" in r.stderr
    assert f"(offset 0x400000 of FileSource('{path}'), fault)" in r.stderr
    assert "the file is now 4096 bytes, it had 8388608 when it was opened" in r.stderr


def test_truncated_file_prefetch_names_the_poisoned_pages(tmp_path: Path) -> None:
    path = tmp_path / "shrinks.bin"
    path.write_bytes(page_numbered(16 * MiB))
    with userfault.map(path, readahead=False, retries=0) as p:
        _native.touch(p.address, PAGE, 1, 0, 0, True)
        os.truncate(path, 4 * MiB)
        with pytest.raises(PrefetchError, match=r"installed 4096 bytes but poisoned 20480 bytes "
                           r"at source offsets 0x400000\.\.\+12288, 0x7ff000\.\.\+8192: .*"
                           r"the file is now 4194304 bytes, it had 16777216") as info:
            p.prefetch([(4 * MiB - PAGE, 4 * PAGE), (8 * MiB - PAGE, 2 * PAGE)])
        # the page before the new end was installed; only the missing ones were poisoned
        assert info.value.installed == PAGE
        assert info.value.poisoned == ((4 * MiB, 3 * PAGE), (8 * MiB - PAGE, 2 * PAGE))
        assert p.prefetch([(MiB, PAGE)]) == PAGE  # before the new end: still fine
        with pytest.raises(PagerError, match="never zero-filled"):
            p.check()


def test_readahead_past_a_truncated_end_never_poisons(tmp_path: Path) -> None:
    """Readahead is speculative: pages it cannot read are left to their own faults."""
    path = tmp_path / "shrinks.bin"
    path.write_bytes(page_numbered(16 * MiB))
    with userfault.map(path, readahead=(64 << 10, 4 * MiB)) as p:
        os.truncate(path, 2 * MiB)
        _native.touch(p.address, 2 * MiB, PAGE, 0, 0, False)  # readahead runs past the end
        s = settled(p, lambda s: s.readahead_bytes + s.fault_bytes >= 2 * MiB)
        assert s.poisoned == 0 and p.check() is None
        assert s.bytes_installed == 2 * MiB


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"install": "move", "region": "memfd"}, "move.*anonymous"),
    ({"install": "continue"}, "continue.*memfd"),
    ({"install": "zeropage", "region": "hugetlb", "source": "zero"}, "ZEROPAGE.*hugetlb"),
    ({"install": "zeropage"}, "zeropage.*ZeroSource"),
    ({"install": "bogus"}, "install must be"),
    ({"region": "disk"}, "region must be"),
    ({"runtime": "thread"}, "runtime must be"),
    ({"threads": 0}, "threads must be"),
    ({"threads": 65}, "threads must be"),
    ({"on_error": "ignore"}, "on_error must be"),
    ({"size": 0}, "size must be positive"),
])
def test_bad_options(kwargs: dict, match: str, hugepages_if_needed: None) -> None:
    kwargs = dict(kwargs)
    src = ZeroSource(4 * MiB) if kwargs.pop("source", None) == "zero" else b"a" * MiB
    tasks = proc_entries("task")
    with pytest.raises(ValueError, match=match):
        Pager(src, **kwargs)
    assert proc_entries("task") == tasks


def maps_count() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@pytest.mark.parametrize("kwargs", [{"install": "move", "region": "memfd"}, {"threads": 0},
                                    {"install": "bogus"}])
def test_bad_options_leak_nothing(kwargs: dict, tmp_path: Path) -> None:
    """Options are checked before anything is opened or mapped, or torn down on failure
    (the file's fd, the memfd and the mapping used to leak)."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100000)
    gc.collect()  # what earlier tests left for the collector goes first
    fds, maps = proc_entries("fd"), maps_count()
    for _ in range(3):
        with pytest.raises(ValueError):
            Pager(path, **kwargs)
    gc.collect()
    assert proc_entries("fd") == fds and maps_count() <= maps


@pytest.fixture
def hugepages_if_needed(request: pytest.FixtureRequest) -> Iterator[None]:
    kwargs = request.node.callspec.params.get("kwargs", {})
    if kwargs.get("region") != "hugetlb":
        yield
        return
    yield from reserve_hugepages(4)


class PySource:
    size = 1 << 20

    def read_into(self, offset: int, buf: memoryview) -> None:
        buf[:] = bytes(len(buf))


def test_native_runtime_refuses_python_sources() -> None:
    with pytest.raises(ValueError, match=r"Python source.*runtime=.process."):
        Pager(PySource(), runtime="native")
    with pytest.raises(TypeError, match="cannot page from"):
        Pager(object())


def test_bad_sources() -> None:
    with pytest.raises(ValueError, match="positive size"):
        ZeroSource(0)
    with pytest.raises(ValueError, match="pattern must not be empty"):
        PatternSource(b"", 10)
    with pytest.raises(userfault.SourceError, match="cannot open"):
        FileSource("/nonexistent/file")


def test_non_contiguous_buffer_is_refused_clearly() -> None:
    strided = np.arange(1 << 16, dtype=np.uint32).reshape(256, 256)[:, ::2]
    with pytest.raises(TypeError, match=r"C-contiguous.*ascontiguousarray"):
        userfault.map(strided)
    with userfault.map(np.ascontiguousarray(strided)) as p:
        assert np.array_equal(p.array("uint32", strided.shape), strided)


def test_empty_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(userfault.SourceError, match="empty"):
        userfault.map(tmp_path / "empty")


# -- MADV_DONTNEED: UFFD_EVENT_REMOVE ----------------------------------------------------------


def test_dontneed_on_anonymous_region_refaults_from_source(data8: bytes) -> None:
    """MADV_DONTNEED gives pages back (UFFD_EVENT_REMOVE): they are missing again, fault
    again and are served again from the source (not zeros, not what was written before)."""
    with userfault.map(data8, readahead=False) as p:
        with memoryview(p) as v:
            assert v[:MiB] == data8[:MiB]
            v[:PAGE] = b"W" * PAGE
            assert v[:PAGE] == b"W" * PAGE
        faults = p.stats().faults
        p.region.madvise(mmap.MADV_DONTNEED, 0, MiB)
        s = settled(p, lambda s: s.remove_events == 1)  # counted just after it is read
        assert s.remove_events == 1 and s.faults == faults
        with memoryview(p) as v:
            assert v[:MiB] == data8[:MiB]
        assert p.stats().faults == 2 * faults
        # the engine knows they are gone: a prefetch installs them again, with no fault
        p.region.madvise(mmap.MADV_DONTNEED, 0, MiB)
        assert p.prefetch([(0, MiB)]) == MiB
        with memoryview(p) as v:
            assert v[:MiB] == data8[:MiB]
        assert p.stats().faults == 2 * faults


@pytest.mark.parametrize("install", ["copy", "continue"])
def test_dontneed_on_memfd_region_keeps_page_cache(install: str, data8: bytes) -> None:
    """On memfd, MADV_DONTNEED only drops the page table entries: the page cache keeps the
    bytes, written ones included. MISSING-only registration (copy) maps them back without a
    uffd fault; with MINOR registration (continue) they come back as minor faults, served
    by CONTINUE of what the cache holds."""
    with userfault.map(data8, region="memfd", install=install, readahead=False) as p:
        with memoryview(p) as v:
            assert v[:MiB] == data8[:MiB]
            v[:PAGE] = b"W" * PAGE
        s0 = p.stats()
        p.region.madvise(mmap.MADV_DONTNEED, 0, MiB)
        with memoryview(p) as v:
            assert v[:PAGE] == b"W" * PAGE
            assert v[PAGE:MiB] == data8[PAGE:MiB]
        s = settled(p, lambda s: s.remove_events == 1)
        assert s.remove_events == 1
        if install == "copy":
            assert s.faults == s0.faults
        else:
            assert s.faults == 2 * s0.faults and s.minor_faults == s0.faults
