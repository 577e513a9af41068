"""Traces and working sets of real pagers: ``Pager(trace=, record=, prefetch=)`` in both
runtimes, ``userfault trace -o FILE -- CMD``, and the engine's trace writer under overload."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import userfault
from pager_helpers import settled, wait_until
from py_sources import Gated, PyBytes, PyFile
from userfault import FileSource, _native
from userfault._flags import RegisterMode
from userfault.serving.config import ServeConfig
from userfault.serving.runtime import RECORD, engine_args
from userfault.trace import Cause, Kind, TraceFlag, read
from userfault.working_set import (
    WorkingSet,
    WorkingSetMismatch,
    read_working_set,
    write_working_set,
)

pytest.importorskip("numpy")
pytestmark = pytest.mark.timeout(120)
PAGE = userfault.PAGE_SIZE
PAGES = 256
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def data() -> bytes:
    return random.Random(12).randbytes(PAGES * PAGE)



def make_source(runtime: str, data: bytes, tmp_path: Path) -> object:
    """The same bytes as a native file source or as a Python source (a pager process)."""
    if runtime == "process":
        return PyBytes(data)
    path = tmp_path / "data.bin"
    if not path.exists():
        path.write_bytes(data)
    return FileSource(path)


def touch(pager: userfault.Pager, pages: list[int], data: bytes) -> None:
    """Read the first byte of each page, in order, and check it."""
    for p in pages:
        assert _native.touch(pager.address + p * PAGE, 1, PAGE, 0, 0, False) == data[p * PAGE]


def scattered(n: int, seed: int = 3) -> list[int]:
    return random.Random(seed).sample(range(PAGES), n)


def test_a_trace_holds_every_fault(tmp_path: Path, runtime: str, data: bytes) -> None:
    order = scattered(120)
    trace_path = tmp_path / "run.uftrace"
    with userfault.map(make_source(runtime, data, tmp_path), readahead=False,
                       trace=trace_path) as p:
        touch(p, order, data)
        base = p.address
    trace = read(trace_path)
    assert trace.meta.page_size == PAGE and trace.meta.region_size == PAGES * PAGE
    assert trace.dropped == 0  # 120 records fit one buffer: nothing can be dropped
    faults = trace.events[trace.events["cause"] == Cause.FAULT]
    # one page read once each, readahead off: one read fault per page, at its source offset
    assert sorted(faults["offset"].tolist()) == sorted(o * PAGE for o in order)
    assert set(faults["kind"].tolist()) == {Kind.READ}
    assert (faults["address"] - faults["offset"]).tolist() == [base] * len(order)
    assert (faults["length"] >= PAGE).all()


def test_readahead_installs_are_traced(tmp_path: Path, runtime: str, data: bytes) -> None:
    trace_path = tmp_path / "ra.uftrace"
    with userfault.map(make_source(runtime, data, tmp_path), trace=trace_path) as p:
        touch(p, list(range(64)), data)
        settled(p)
    ev = read(trace_path).events
    covered: set[int] = set()
    for rec in ev[(ev["cause"] == Cause.FAULT) | (ev["cause"] == Cause.READAHEAD)]:
        first = int(rec["offset"]) - int(rec["offset"]) % PAGE
        covered.update(range(first, int(rec["offset"]) + int(rec["length"]), PAGE))
    # every page read came in by a fault or by readahead, and the trace says which
    assert set(range(0, 64 * PAGE, PAGE)) <= covered
    assert (ev["offset"] + ev["length"] <= PAGES * PAGE).all()


def test_a_fault_left_to_a_piece_in_flight_is_traced_with_its_whole_wait(
        tmp_path: Path, data: bytes) -> None:
    """A fault on a page that a background piece is reading already waits for that piece:
    its record says so (WAITED) and its service time runs until the piece was in, not just
    while the serving thread looked at it (that was a few microseconds)."""
    gate = str(tmp_path / "gate")
    hold = 0.3  # seconds the piece is held after the fault is in: a floor of its wait
    trace_path = tmp_path / "wait.uftrace"
    with userfault.map(Gated(data, 32 * PAGE, len(data), gate), trace=trace_path,
                       log_faults=64) as p:
        assert p.willneed([(32 * PAGE, 64 * PAGE)]) == 64 * PAGE  # read as readahead: held
        held = Path(gate + ".held")
        assert wait_until(lambda: held.exists() and "\n" in held.read_text(), 10), \
            "no readahead was held"
        start, length = (int(x) for x in held.read_text().split()[0].split("+"))
        page = (start + length) // PAGE - 1  # the held piece's last page, past the gate
        faults = p.stats().faults
        reader = threading.Thread(target=touch, args=(p, [page], data))
        reader.start()
        assert wait_until(lambda: p.stats().faults > faults, 10), "the fault was not seen"
        threading.Event().wait(hold)
        Path(gate).touch()
        reader.join(30)
        assert not reader.is_alive()
        assert p.stats().service_max_ns >= hold * 1e9
        logged = [r for r in p.faults() if r.offset == page * PAGE]  # the fault log's copy
    assert len(logged) == 1 and logged[0].length == 0
    assert logged[0].flags & TraceFlag.WAITED and not logged[0].flags & TraceFlag.EEXIST
    assert logged[0].service_ns >= hold * 1e9
    ev = read(trace_path).events
    mine = ev[(ev["cause"] == Cause.FAULT) & (ev["offset"] == page * PAGE)]
    assert len(mine) == 1
    assert mine["flags"][0] & TraceFlag.WAITED and not mine["flags"][0] & TraceFlag.EEXIST
    assert mine["length"][0] == 0  # the piece installed it, and its own record says so
    assert mine["service_ns"][0] >= hold * 1e9
    ra = ev[(ev["cause"] == Cause.READAHEAD) & (ev["offset"] <= page * PAGE)
            & (ev["offset"] + ev["length"] > page * PAGE)]
    assert len(ra) == 1


def test_fault_log_records_drained_while_faults_are_served_are_never_torn() -> None:
    """Six threads fault on pages a seventh keeps dropping (MADV_DONTNEED) while the log,
    two records deep, is drained: a record is copied whole, before or after its outcome was
    written, never half of each (a served fault of length 0 always says why: EEXIST, EAGAIN,
    HELD or WAITED), and every page read is right."""
    import ctypes
    import time
    libc = ctypes.CDLL(None)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    pages = 64
    body = b"".join(i.to_bytes(4, "little") * (PAGE // 4) for i in range(pages))
    outcome = TraceFlag.EEXIST | TraceFlag.EAGAIN | TraceFlag.HELD | TraceFlag.WAITED
    with userfault.Pager(userfault.BufferSource(body), log_faults=2, readahead=False,
                         threads=4) as p:
        stop = time.monotonic() + 2.0
        wrong = []

        def toucher() -> None:
            buf = ctypes.create_string_buffer(8)
            while time.monotonic() < stop:
                for pg in range(pages):
                    libc.memcpy(buf, ctypes.c_void_p(p.address + pg * PAGE + 8), 8)
                    if buf.raw[:4] != pg.to_bytes(4, "little"):
                        wrong.append(pg)

        def dropper() -> None:
            while time.monotonic() < stop:
                libc.madvise(ctypes.c_void_p(p.address), pages * PAGE, 4)  # MADV_DONTNEED
                time.sleep(0.0005)

        threads = [threading.Thread(target=toucher) for _ in range(6)]
        threads.append(threading.Thread(target=dropper))
        for t in threads:
            t.start()
        records = []
        while any(t.is_alive() for t in threads):
            records += p.faults()
        for t in threads:
            t.join()
        records += p.faults()
    assert not wrong
    assert len(records) > 100  # the log was drained while it filled
    torn = [r for r in records if r.length == 0 and not r.flags & outcome]
    assert not torn, torn[:3]


def test_record_then_prefetch(tmp_path: Path, runtime: str, data: bytes) -> None:
    order = scattered(40, seed=5)
    ws_path = tmp_path / "run.ws"
    with userfault.map(make_source(runtime, data, tmp_path), readahead=False,
                       record=ws_path) as p:
        touch(p, order, data)
    ws = read_working_set(ws_path)
    assert ws.offsets == tuple(o * PAGE for o in order)  # first-touch order
    assert ws.page_size == PAGE and ws.source_size == PAGES * PAGE and ws.source is not None

    trace_path = tmp_path / "again.uftrace"
    with userfault.map(make_source(runtime, data, tmp_path), readahead=False,
                       prefetch=ws_path, trace=trace_path) as p:
        assert p.working_set is not None and p.working_set.offsets == ws.offsets
        touch(p, order[:1], data)  # the first fault starts the batch
        # the rest of the set arrives without faults of its own
        assert wait_until(lambda: (lambda s: s.prefetch_bytes + s.fault_bytes)(p.stats())
                          >= len(order) * PAGE)
        before = settled(p).faults
        touch(p, order, data)
        assert p.stats().faults == before
    ev = read(trace_path).events
    prefetched = {int(o) for o in ev["offset"][ev["cause"] == Cause.PREFETCH]}
    assert prefetched and prefetched <= set(ws.offsets)


def test_prefetch_refuses_another_source_and_drops_drift(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    other = tmp_path / "other.ws"
    write_working_set(other, WorkingSet((0, PAGE), PAGE, source="FileSource('/elsewhere')"))
    with pytest.raises(WorkingSetMismatch, match="recorded against"):
        userfault.map(path, prefetch=other)
    with userfault.map(path, prefetch=other, force_prefetch=True) as p:
        assert p.working_set is not None and p.working_set.offsets == (0, PAGE)
    huge = tmp_path / "huge.ws"
    write_working_set(huge, WorkingSet((0,), 2 << 20))
    with pytest.raises(WorkingSetMismatch, match="2097152-byte pages"):
        userfault.map(path, prefetch=huge, force_prefetch=True)
    # recorded against a longer version of the file: pages past its end now are dropped
    drift = tmp_path / "drift.ws"
    with userfault.map(path, record=drift, readahead=False) as p:
        touch(p, [PAGES - 1, 0], data)
    path.write_bytes(data[:(PAGES // 2) * PAGE])
    with userfault.map(path, prefetch=drift) as p:
        assert p.working_set is not None
        assert (p.working_set.offsets, p.working_set.dropped) == ((0,), 1)
        touch(p, [0, 1], data)


def test_the_name_of_a_python_source_is_stable_across_runs(tmp_path: Path, data: bytes) -> None:
    # a Python source without a repr of its own is named by its class, not by its address, so
    # a working set it recorded applies to the next run's new object
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    ws_path = tmp_path / "py.ws"
    with userfault.map(PyFile(str(path)), readahead=False, record=ws_path) as p:
        touch(p, [3], data)
    assert read_working_set(ws_path).source == "py_sources.PyFile"
    with userfault.map(PyFile(str(path)), readahead=False, prefetch=ws_path) as p:
        assert p.working_set is not None and p.working_set.offsets == (3 * PAGE,)
        touch(p, [3], data)


def test_userfault_trace_command(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    out = tmp_path / "cmd.uftrace"
    script = (f"import userfault\n"
              f"with userfault.map({str(path)!r}, readahead=False) as p:\n"
              f"    head = open({str(path)!r}, 'rb').read({8 * PAGE})\n"
              f"    assert bytes(p.view()[:{8 * PAGE}]) == head\n"
              f"with userfault.map({str(path)!r}, readahead=False) as p:\n"
              f"    p.view()[{PAGE}]\n")
    res = subprocess.run([sys.executable, "-m", "userfault", "trace", "-o", str(out), "--",
                          sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=TESTS)
    assert res.returncode == 0, res.stderr
    second = [n for n in os.listdir(tmp_path) if n.startswith("cmd.uftrace.")]
    assert len(second) == 1, os.listdir(tmp_path)  # the second pager got a trace of its own
    first = read(out).events
    assert set(first["offset"][first["cause"] == Cause.FAULT].tolist()) == \
        set(range(0, 8 * PAGE, PAGE))
    again = read(tmp_path / second[0]).events
    assert again["offset"][again["cause"] == Cause.FAULT].tolist() == [PAGE]
    assert f"userfault trace: {out}: " in res.stderr and "(0 dropped)" in res.stderr
    res = subprocess.run([sys.executable, "-m", "userfault", "trace", "-o", str(out), "--",
                          sys.executable, "-c", "pass"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "created no pager: nothing was traced" in res.stderr


def test_an_overloaded_trace_counts_what_it_drops() -> None:
    """A trace written to a pipe nobody reads yet: the pipe and both buffers fill, the rest is
    dropped and counted; records plus the DROPPED counts are every fault, exactly."""
    n = 8192  # more faults than the pipe (64 KiB) and both buffers (2 x 64 KiB) hold
    r, w = os.pipe()
    faults_done = threading.Event()
    chunks: list[bytes] = []

    def reader() -> None:
        faults_done.wait(60)
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)

    t = threading.Thread(target=reader)
    t.start()
    try:
        with userfault.Region.anonymous(n * PAGE) as region, \
                userfault.Uffd() as uffd:
            uffd.register(region.address, region.size, RegisterMode.MISSING)
            os.set_blocking(uffd.fileno(), False)
            args = engine_args(userfault.PatternSource(b"x", n * PAGE),
                               ServeConfig(readahead=(0, 0)), PAGE, trace_fd=w)
            engine = _native.Engine(uffd.fileno(), [(region.address, region.size, 0)], **args)
            engine.start()
            try:
                assert _native.touch(region.address, region.size, PAGE, 0, 0, False) == n * ord("x")
            finally:
                faults_done.set()
                engine.stop()
            stats = engine.stats()
            del engine
    finally:
        faults_done.set()
        os.close(w)
        t.join(30)
        os.close(r)
    records = list(RECORD.iter_unpack(b"".join(chunks)))
    cause = [rec[7] for rec in records]
    dropped = sum(rec[3] for rec in records if rec[7] == Cause.DROPPED)
    assert cause.count(Cause.FAULT) + dropped == n == stats["faults"]
    assert dropped == stats["trace_dropped"] > 0


def test_a_pager_left_open_at_exit_still_writes_its_trace(tmp_path: Path, runtime: str,
                                                           data: bytes) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    src = "FileSource(path)" if runtime == "native" else "PyFile(path)"
    script = f"""
import sys
sys.path.insert(0, {TESTS!r})
import userfault
from userfault import FileSource, _native
from py_sources import PyFile
path = {str(path)!r}
p = userfault.map({src}, readahead=False, trace={str(tmp_path / 't.uftrace')!r},
                  record={str(tmp_path / 'r.ws')!r})
for page in (7, 3, 5):
    _native.touch(p.address + page * {PAGE}, 1, {PAGE}, 0, 0, False)
print("exiting with the pager open", flush=True)
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "exiting" in res.stdout, res.stderr
    ev = read(tmp_path / "t.uftrace").events
    assert ev["offset"][ev["cause"] == Cause.FAULT].tolist() == [7 * PAGE, 3 * PAGE, 5 * PAGE]
    assert read_working_set(tmp_path / "r.ws").offsets == (7 * PAGE, 3 * PAGE, 5 * PAGE)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".uftrace.tmp")]
