"""Memory larger than the memory limit: the resident budget, eviction, re-faults.

A pager with ``max_resident`` gives pages back above its high watermark and serves them again
from the source when they are touched again. The main case runs for real in a cgroup v1
memory limit: a 1 GiB file, 512 MiB allowed, 256 MiB budget; the kernel's own mmap reads it
fine there, and so must the pager, every byte right.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import userfault
from cgroups import memory_cgroup, memory_cgroups_available
from pager_helpers import bytes_source, page_data, settled, wait_until
from userfault import BufferSource, _native
from userfault.working_set import WorkingSet, write_working_set

PAGE = 4096
MiB = 1 << 20
TESTS = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.timeout(120)
#: one eviction batch of a native source: two background pieces (engine_type.c), in pages
BATCH_PAGES = 2 * _native.UF_DEFAULT_PIECE // PAGE


@pytest.mark.parametrize("region", ["anonymous", "memfd"])
def test_a_stream_four_times_the_budget_stays_within_it(runtime: str, region: str) -> None:
    size, budget = 64 * MiB, 16 * MiB
    body = page_data(size)
    with userfault.map(bytes_source(runtime, body), region=region, max_resident=budget) as p:
        h = hashlib.sha256()
        with memoryview(p) as v:
            for off in range(0, size, MiB):
                h.update(v[off:off + MiB])
        assert h.digest() == hashlib.sha256(body).digest()
        # (how far over the budget it gets meanwhile is scheduling: bench_out_of_core.py)
        s = settled(p, lambda s: s.resident_bytes <= budget)
        assert s.evictions >= (size - budget) // PAGE
        assert s.resident_bytes <= budget and p.check() is None


def test_a_hugetlb_region_stays_within_its_budget(runtime: str, hugepages: int) -> None:
    huge = 2 * MiB
    size, budget = 8 * huge, 4 * huge
    body = page_data(size)
    with userfault.map(bytes_source(runtime, body), region="hugetlb", max_resident=budget,
                       readahead=False) as p:
        assert p.region.page_size == huge
        with memoryview(p) as v:
            v[3 * huge + 5] = 0xAB  # a written huge page is kept, not dropped
            for _ in range(2):
                for off in range(0, size, huge):
                    want = bytearray(body[off:off + huge])
                    if off == 3 * huge:
                        want[5] = 0xAB
                    assert v[off:off + huge] == want, f"huge page at {off:#x} differs"
        s = settled(p, lambda s: s.resident_bytes <= budget)
        assert s.evictions > 0 and s.dirty_pages == 1 and p.check() is None


def test_hot_pages_stay_cold_ones_go(runtime: str) -> None:
    size, budget = 32 * MiB, 8 * MiB
    body = page_data(size)
    hot = 2 * MiB
    with userfault.map(bytes_source(runtime, body), max_resident=budget, readahead=False) as p:
        with memoryview(p) as v:
            for off in range(hot, size, MiB):  # a cold stream, with the hot part read between
                assert v[off:off + MiB] == body[off:off + MiB]
                assert v[:hot] == body[:hot]
        s = settled(p)
        # Hot pages are spared: FIFO would read every one of them again after each cold MiB
        # (30 rounds of 512 pages). How often CLOCK's hand passes a hot page twice between
        # two reads of it (probation, then freed) is the scheduler's choice, hence the margin.
        rounds = (size - hot) // MiB
        assert s.refaults <= 4 * hot // PAGE < rounds * hot // PAGE
        assert s.refault_rate < 0.25


@pytest.mark.parametrize("region", ["anonymous", "memfd"])
def test_a_read_only_pager_keeps_what_was_written(runtime: str, region: str) -> None:
    """Writes to a read-only pager under a budget are the process's own, like a private
    mapping's: evicting the page would lose them, so it stays; everything else cycles."""
    size, budget = 32 * MiB, 4 * MiB
    body = page_data(size)
    written = list(range(0, size, 512 * 1024))  # 64 pages spread over the whole file
    with userfault.map(bytes_source(runtime, body), region=region, max_resident=budget,
                       readahead=False) as p:
        with memoryview(p) as v:
            for off in written:
                v[off:off + 8] = b"written!"
            for _ in range(2):  # stream the file twice: eight times the budget
                for off in range(0, size, MiB):
                    part = bytearray(body[off:off + MiB])
                    for w in written:
                        if off <= w < off + MiB:
                            part[w - off:w - off + 8] = b"written!"
                    assert v[off:off + MiB] == part, f"MiB at {off:#x} differs"
        s = settled(p, lambda s: s.resident_bytes <= budget + len(written) * PAGE)
        assert s.dirty_pages == len(written) and s.evictions > 0
        with pytest.raises(userfault.PagerError, match="flush needs a writable pager"):
            p.flush()
    # a budgeted pager must see writes: an install that cannot track them is refused
    with pytest.raises(ValueError, match="install='zeropage' cannot track writes: a pager "
                                         "with max_resident"):
        userfault.map(userfault.ZeroSource(size), install="zeropage", max_resident=budget)


def test_written_pages_over_the_budget_are_kept_and_logged(capfd: pytest.CaptureFixture[str]
                                                           ) -> None:
    size, budget = 16 * MiB, 1 * MiB
    body = page_data(size)
    with userfault.map(BufferSource(body), max_resident=budget, readahead=False) as p:
        with memoryview(p) as v:
            for off in range(0, 2 * MiB, PAGE):  # twice the budget, written
                v[off] = 0xEE
            assert v[4 * MiB:5 * MiB] == body[4 * MiB:5 * MiB]  # still served, slowly
            assert all(v[off] == 0xEE for off in range(0, 2 * MiB, PAGE))
        assert settled(p).dirty_pages == 2 * MiB // PAGE
    # the engine logs to stderr, once
    assert capfd.readouterr().err.count("fill its budget: they stay in memory") == 1


def test_thrashing_is_slower_never_wrong() -> None:
    """A working set larger than the budget: every pass re-faults, every byte is right."""
    size, budget = 16 * MiB, 4 * MiB
    body = page_data(size)
    with userfault.map(body, max_resident=budget, readahead=False) as p:
        with memoryview(p) as v:
            for _ in range(3):
                assert v == body
        s = settled(p)
        assert s.refaults >= size // PAGE  # the second and third passes fault again
        assert s.refault_rate > 0.5 and p.check() is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("budget", "chunk"), [(4 * MiB, 1536 * 1024), (1 * MiB, 2 * MiB)])
def test_a_chunk_larger_than_the_room_left_is_served(runtime: str, budget: int, chunk: int,
                                                      toucher: Callable[..., Any]) -> None:
    """A fault's chunk that would take the count past the budget, with the count still below
    the high watermark (or a chunk larger than the whole budget): no evictor round is coming
    to wake a held fault, so it is served (it hung when it was held). The touch runs on a
    thread, so that a hang fails the test (a signal cannot stop a C loop held in a fault)."""
    size = 16 * MiB
    body = page_data(size)
    with userfault.map(bytes_source(runtime, body), max_resident=budget, chunk=chunk,
                       readahead=False) as p:
        t = toucher(p.address, size)
        t.join(30)
        assert not t.is_alive(), f"a fault was never served: {p.stats()}"
        assert t.result == sum(body[::PAGE])
        with memoryview(p) as v:
            got = bytes(v)
        wrong = [i // PAGE for i in range(0, size, PAGE) if got[i:i + PAGE] != body[i:i + PAGE]]
        # (seen once in CI, not reproduced since: the pages, what they held, and the stats)
        first = got[wrong[0] * PAGE:(wrong[0] + 1) * PAGE] if wrong else b""
        held = "zeros" if first == bytes(PAGE) else "not zeros"
        assert not wrong, f"{len(wrong)} pages wrong, first {wrong[:8]} ({held}); {p.stats()}"
        assert p.check() is None


def touch_while_rereading(p: userfault.Pager, want: Any, seed: int) -> list[str]:
    """Two threads touch every page of ``p`` while two re-read random pages (numpy gathers,
    the GIL released); the pages the re-readers found wrong."""
    np = pytest.importorskip("numpy")
    got = np.frombuffer(p, dtype=np.uint8).reshape(-1, PAGE)
    stop = threading.Event()
    errors: list[str] = []

    def reread(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(2000):
            if stop.is_set():
                return
            idx = rng.integers(0, len(want), 256)
            read = got[idx]
            bad = np.flatnonzero((read != want[idx]).any(axis=1))
            if bad.size:
                zeros = int((~read[bad].any(axis=1)).sum())
                errors.append(f"pages {idx[bad][:4].tolist()} wrong, {zeros} of {bad.size} "
                              "all zeros")
    touchers = [threading.Thread(target=_native.touch, args=(p.address, p.size, PAGE, 0, 0,
                                                             False)) for _ in range(2)]
    readers = [threading.Thread(target=reread, args=(seed + k,)) for k in range(2)]
    for t in touchers + readers:
        t.start()
    for t in touchers:
        t.join(60)
    stop.set()
    for t in readers:
        t.join(60)
    assert not any(t.is_alive() for t in touchers + readers), f"never served: {p.stats()}"
    return errors


@pytest.mark.timeout(120)
def test_a_page_put_on_probation_that_was_not_in_memory_reads_right(runtime: str) -> None:
    """A chunk's install finds pages present between the REMOVE of their eviction being read
    and that madvise dropping them, and counts them. Put on probation later, such a page's
    copy into the pool faults, and that fault was answered from the slot the copy had not
    written yet: readers saw zero pages while the copy ran (about 1 load in 14 of this one,
    in a stress loop). A race: each load below is a new chance; every page read must be
    right."""
    np = pytest.importorskip("numpy")
    size = 16 * MiB
    body = page_data(size)
    want = np.frombuffer(body, dtype=np.uint8).reshape(-1, PAGE)
    for load in range(8):
        with userfault.map(bytes_source(runtime, body), max_resident=1 * MiB, chunk=2 * MiB,
                           readahead=False, threads=4) as p:
            errors = touch_while_rereading(p, want, seed=10 * load)
            assert not errors, f"load {load}: {errors[:4]}; {p.stats()}"
            with memoryview(p) as v:
                assert v == body
            assert p.check() is None


def test_random_faults_racing_evictions_read_every_byte_right(runtime: str) -> None:
    """Four threads fault random pages (numpy gathers, the GIL released) into a budget an
    eighth of the memory: faults keep meeting evictions in flight (installs answered EAGAIN,
    held until the eviction's madvise returns). Every page read is the source's."""
    np = pytest.importorskip("numpy")
    size, budget = 32 * MiB, 4 * MiB
    body = page_data(size)
    want = np.frombuffer(body, dtype=np.uint8).reshape(-1, PAGE)
    errors: list[str] = []
    with userfault.map(bytes_source(runtime, body), max_resident=budget, readahead=False,
                       threads=4) as p:
        got = np.frombuffer(p, dtype=np.uint8).reshape(-1, PAGE)

        def reader(got: Any, seed: int) -> None:
            rng = np.random.default_rng(seed)
            for _ in range(8):
                idx = rng.integers(0, size // PAGE, 512)
                bad = np.flatnonzero((got[idx] != want[idx]).any(axis=1))
                if bad.size:
                    errors.append(f"reader {seed}: pages {idx[bad][:5].tolist()} differ")

        threads = [threading.Thread(target=reader, args=(got, i)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        del got, threads  # the last exports of the memory
        assert not errors
        with memoryview(p) as v:
            assert v == body  # and a stream through it all afterwards
        s = settled(p, lambda s: s.resident_bytes <= budget)
        assert s.evictions > 0 and s.resident_bytes <= budget and p.check() is None


def test_close_while_evicting_does_not_deadlock(runtime: str) -> None:
    body = page_data(32 * MiB)
    for _ in range(3):
        p = userfault.map(bytes_source(runtime, body), max_resident=4 * MiB)
        _native.touch(p.address, p.size, PAGE, 0, 0, False)  # the evictor is busy now
        p.close()


def test_a_prefetch_larger_than_the_budget_installs_what_fits(runtime: str) -> None:
    """``prefetch()`` of memory 4x ``max_resident`` fills the room below the high watermark
    and returns that count, so no eviction round starts to take its pages back; faults serve
    the rest (it installed everything before: 4x over)."""
    size, budget = 64 * MiB, 16 * MiB
    body = page_data(size)
    with userfault.map(bytes_source(runtime, body), max_resident=budget) as p:
        installed = p.prefetch()
        s = p.stats()
        assert 0 < installed <= budget * 9 // 10 and s.resident_bytes == installed
        assert s.evictions == 0  # nothing faulted meanwhile: the count never passed 90 %
        with memoryview(p) as v:
            assert v == body
        assert p.check() is None


def test_a_working_set_larger_than_the_budget_fills_what_fits(runtime: str,
                                                              tmp_path: Path) -> None:
    """A working set 4x ``max_resident`` (``Pager(prefetch=)``) is installed up to the room
    below the high watermark and its job ends there (the progress bar's ``preload_over``);
    faults serve the rest. Never past the budget by more than the one batch a fault may
    take."""
    size, budget = 64 * MiB, 16 * MiB
    path = tmp_path / "data.bin"
    path.write_bytes(page_data(size))
    ws = tmp_path / "all.uws"
    write_working_set(ws, WorkingSet(tuple(range(0, size, PAGE)), PAGE, source_size=size))
    with userfault.map(path, runtime=runtime, readahead=False, prefetch=ws,
                       force_prefetch=True, max_resident=budget) as p:
        _native.touch(p.address, PAGE, PAGE, 0, 0, False)  # the first fault starts the set
        counters = p._serving().counters
        assert wait_until(lambda: counters()["preload_over"] == 1, timeout=30), counters()
        assert 0 < counters()["preload_done"] < counters()["preload_total"] == size
        assert p.stats().resident_bytes <= budget + BATCH_PAGES * PAGE
        with memoryview(p) as v:
            assert v == path.read_bytes()
        assert p.check() is None


def test_a_budget_too_small_is_refused() -> None:
    with pytest.raises(ValueError, match=r"max_resident must hold at least 4 pages of 4\.0 KiB"):
        userfault.map(b"x" * MiB, max_resident=PAGE)
    with pytest.raises(ValueError, match=r"watermarks must be \(low, high\) fractions"):
        userfault.map(b"x" * MiB, max_resident=MiB, watermarks=(0.9, 0.7))


# -- a real memory limit ---------------------------------------------------------------------


_READER = """
    import hashlib, mmap, sys
    sys.path.insert(0, {tests!r})
    import userfault
    how, path = sys.argv[1], sys.argv[2]
    if __name__ == "__main__":
        h = hashlib.sha256()
        if how == "mmap":
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                for off in range(0, len(m), 1 << 20):
                    h.update(m[off:off + (1 << 20)])
        else:
            from py_sources import PyFile
            src = path if how == "native" else PyFile(path)
            budget = 0 if how == "unbounded" else 256 << 20
            with userfault.map(src, max_resident=budget) as p, memoryview(p) as v:
                for off in range(0, p.size, 1 << 20):
                    h.update(v[off:off + (1 << 20)])
                print("resident", p.stats().resident_bytes >> 20, flush=True)
        print(h.hexdigest(), flush=True)
"""


def run_limited(group: Path, *args: str) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(_READER.format(tests=TESTS))
    return subprocess.run(
        ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", sys.executable,
         "-c", script, *args], capture_output=True, text=True, timeout=100)


@pytest.mark.slow
def test_a_gib_file_in_a_512_mib_limit(tmp_path: Path) -> None:
    path = tmp_path / "gib.bin"
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(1024):
            block = (i.to_bytes(4, "little") * (MiB // 4))
            h.update(block)
            f.write(block)
    want = h.hexdigest()
    if not memory_cgroups_available():
        pytest.skip("needs root and the cgroup v1 memory controller")
    with memory_cgroup(512 * MiB) as group:
        kernel = run_limited(group, "mmap", str(path))
        assert (kernel.returncode, kernel.stdout.split()[-1:]) == (0, [want]), kernel.stderr
        for how in ("native", "process"):
            r = run_limited(group, how, str(path))
            assert r.returncode == 0, (how, r.stderr[-2000:])
            resident, digest = r.stdout.split()[1], r.stdout.split()[2]
            assert digest == want and int(resident) <= 256
        unbounded = run_limited(group, "unbounded", str(path))
        assert unbounded.returncode == -signal.SIGKILL  # what max_resident prevents: the OOM


# -- faults held back at the budget ------------------------------------------------------------

_STREAM = """
    import os, sys, threading, time
    import numpy as np
    import userfault
    from userfault import _native
    path, budget, runtime = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    size, readers, block = os.path.getsize(path), 4, 1 << 20
    fd = os.open(path, os.O_RDONLY)
    with userfault.map(path, max_resident=budget, threads=readers, runtime=runtime) as p:
        peak, done = [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], p.stats().resident_bytes)
                time.sleep(0.0002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        # a fast sequential stream: a C loop touching every page, the GIL released
        _native.touch(p.address, p.size, 4096, 0, 0, False)
        arr, bad = p.array(), []

        def reader(i):  # numpy readers, each its quarter, every byte against the file
            for off in range(i * size // readers, (i + 1) * size // readers, block):
                want = np.frombuffer(os.pread(fd, block, off), dtype=np.uint8)
                if not np.array_equal(arr[off:off + block], want):
                    bad.append(off)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(readers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        sampler.join()
        del arr
        s = p.stats()
        print("peak", peak[0], "bad", len(bad), "evictions", s.evictions, flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_fast_streams_in_a_memory_limit_stay_within_one_batch_of_the_budget(tmp_path: Path,
                                                                            runtime: str) -> None:
    """A fast C stream, then four numpy readers, over a file 8x the budget, in a cgroup
    limit of 3x the budget: every byte right, and the resident count never above the budget
    by more than one eviction batch. That bound is the engine's, not the scheduler's: a fault
    install reserves its chunk under the budget lock (a readahead piece likewise, below the
    budget) and one that would pass budget + batch is held, unserved, until the evictor's
    round is over, so every sample of the count is within it. In a pager process too (the
    faulting process's watchdog, which copies and drops pages for the evictor, is never
    held)."""
    pytest.importorskip("numpy")
    if not memory_cgroups_available():
        pytest.skip("needs root and the cgroup v1 memory controller")
    size, budget = 256 * MiB, 32 * MiB
    path = tmp_path / "stream.bin"
    path.write_bytes(page_data(size))
    script = textwrap.dedent(_STREAM)
    for _ in range(2):
        with memory_cgroup(3 * budget) as group:
            r = subprocess.run(
                ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", sys.executable,
                 "-c", script, str(path), str(budget), runtime], capture_output=True, text=True,
                timeout=90)
        assert r.returncode == 0, r.stderr[-2000:]
        out = r.stdout.split()
        peak, bad, evictions = int(out[1]), int(out[3]), int(out[5])
        assert bad == 0 and evictions >= (size - budget) // PAGE
        assert budget // 2 < peak <= budget + BATCH_PAGES * PAGE, (peak - budget) // 1024


_CLOSE_MID_STREAM = """
    import ctypes, errno, os, sys, threading, time
    import userfault
    path, out, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    size, block = os.path.getsize(path), 1 << 20
    sink = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    for _ in range(3):
        p = userfault.map(path, max_resident=budget, threads=2)
        # not an export of the pager (close would refuse): the kernel reads the memory in
        # pwrite, so a read after the unmap is EFAULT, not a crash
        mem = memoryview((ctypes.c_char * size).from_address(p.address)).cast("B")
        ended = []

        def stream(i):
            try:
                for _ in range(4):
                    for off in range(i * block, size, 4 * block):
                        os.pwrite(sink, mem[off:off + block], off)
                ended.append("done")
            except OSError as err:
                ended.append(errno.errorcode[err.errno])

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        while p.stats().evictions < 4 * budget // 4096:  # well past the budget: faults held
            time.sleep(0.001)
        p.close()
        for t in threads:
            t.join(30)
        print("closed", *sorted(ended), flush=True)
"""


@pytest.mark.timeout(120)
def test_close_mid_stream_while_faults_are_held(tmp_path: Path) -> None:
    """Four threads stream a file 8x the budget (faults held at the budget) while close()
    runs: close stops the evictor, which lets every held fault go, and returns; the streams
    end (EFAULT once the memory is unmapped), never hang."""
    size, budget = 64 * MiB, 8 * MiB
    path = tmp_path / "data.bin"
    path.write_bytes(page_data(size))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_CLOSE_MID_STREAM), str(path),
                        str(tmp_path / "sink.bin"), str(budget)],
                       capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 3, r.stdout
    for line in lines:
        words = line.split()
        assert words[0] == "closed" and len(words) == 5, line  # every stream ended
        assert set(words[1:]) <= {"done", "EFAULT"}, line
