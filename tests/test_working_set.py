"""Working sets: the file format, the old Firecracker format, ranges, compatibility and drift,
from traces and from a real pager's fault log, and the CLI."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import userfault
from userfault.cli import main
from userfault.trace import RECORD_DTYPE, Cause, Kind, TraceMeta, TraceWriter, read
from userfault.trace.writer import write_fault_log
from userfault.working_set import (
    MAGIC,
    WorkingSet,
    WorkingSetMismatch,
    fingerprint,
    from_faults,
    from_trace,
    read_working_set,
    write_working_set,
)

PAGE = 4096


def ws_of(*pages: int, **kw: object) -> WorkingSet:
    return WorkingSet(tuple(p * PAGE for p in pages), PAGE, **kw)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pages=st.lists(st.integers(0, 2**40), unique=True, max_size=200),
       page=st.sampled_from([4096, 2 << 20]),
       source=st.one_of(st.none(), st.text(max_size=30)),
       size=st.one_of(st.none(), st.integers(0, 2**50)),
       fp=st.one_of(st.none(), st.text(max_size=20)))
def test_round_trip(tmp_path: Path, pages: list[int], page: int, source: str | None,
                    size: int | None, fp: str | None) -> None:
    ws = WorkingSet(tuple(p * page for p in pages), page, source=source, source_size=size,
                    fingerprint=fp)
    path = tmp_path / "ws"
    assert write_working_set(path, ws) == len(pages)
    assert read_working_set(path) == ws
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]


def test_file_layout(tmp_path: Path) -> None:
    path = tmp_path / "ws"
    write_working_set(path, ws_of(3, 1, 2, source="src", source_size=5 * PAGE))
    data = path.read_bytes()
    magic, version, meta_len = struct.unpack_from("<8sII", data)
    assert magic == MAGIC == b"UFWSET\0\0" and version == 1 and (16 + meta_len) % 8 == 0
    meta = json.loads(data[16:16 + meta_len])
    assert meta["source"] == "src" and meta["count"] == 3 and meta["page_size"] == PAGE
    assert struct.unpack_from("<3Q", data, 16 + meta_len) == (3 * PAGE, PAGE, 2 * PAGE)


def _write_old(path: Path, offsets: list[int]) -> None:
    """A file of the Firecracker pager's older format: magic, page size, count, offsets."""
    path.write_bytes(struct.pack(f"<8sQQ{len(offsets)}Q", b"UFFCWS1\0", PAGE, len(offsets),
                                 *offsets))


def test_reads_the_old_firecracker_files(tmp_path: Path) -> None:
    path = tmp_path / "vm.ws"
    _write_old(path, [5 * PAGE, 0, 9 * PAGE])
    ws = read_working_set(path)
    assert ws.format == "firecracker" and ws.offsets == (5 * PAGE, 0, 9 * PAGE)
    assert ws.page_size == PAGE and ws.source is None and ws.source_size is None
    # no identity to compare: only the page size is checked; drift is still trimmed
    checked = ws.check_compatible(8 * PAGE, PAGE, "FileSource('/vm/mem')")
    assert checked.offsets == (5 * PAGE, 0) and checked.dropped == 1
    with pytest.raises(WorkingSetMismatch, match="recorded with 4096-byte pages"):
        ws.check_compatible(8 * PAGE, 2 << 20)
    # and it converts: written back in the new format with an identity
    write_working_set(tmp_path / "new.ws", checked)
    assert read_working_set(tmp_path / "new.ws").offsets == (5 * PAGE, 0)


def _bad(tmp_path: Path, data: bytes) -> str:
    p = tmp_path / "bad"
    p.write_bytes(data)
    with pytest.raises(ValueError) as info:
        read_working_set(p)
    return str(info.value).replace(repr(str(p)), "P")


def test_corrupt_files(tmp_path: Path) -> None:
    good = tmp_path / "good"
    write_working_set(good, ws_of(1, 2))
    data = good.read_bytes()
    assert _bad(tmp_path, b"nonsense") == "P is too short to be a working-set file"
    assert _bad(tmp_path, b"nonsense" * 4) == (
        "P is not a working-set file (magic b'nonsense', expected b'UFWSET\\x00\\x00' or the "
        "Firecracker pager's b'UFFCWS1\\x00')")
    assert _bad(tmp_path, data[:8] + struct.pack("<I", 9) + data[12:]) == (
        "P: working-set format version 9 is not supported (this userfault reads version 1)")
    assert _bad(tmp_path, data[:-3]).startswith("P: the header says 2 pages, the file holds ")
    assert _bad(tmp_path, data[:40]).startswith("P: truncated or corrupt working-set header")
    misaligned = data[:-8] + struct.pack("<Q", 5)
    assert _bad(tmp_path, misaligned) == (
        "P: corrupt working set: offset 5 is not a non-negative multiple of the page size 4096")
    dup = data[:-8] + struct.pack("<Q", PAGE)
    assert _bad(tmp_path, dup) == (
        "P: corrupt working set: offsets must be unique (a working set lists each page once)")
    fc = struct.pack("<8sQQ", b"UFFCWS1\0", PAGE, 3) + struct.pack("<2Q", 0, PAGE)
    assert _bad(tmp_path, fc).startswith("P: the header says 3 pages, the file holds 2")


def test_ranges_first_touch_and_sorted() -> None:
    ws = ws_of(10, 11, 12, 0, 1, 30, 13, 2, 32)
    assert ws.ranges() == [(10 * PAGE, 3 * PAGE), (0, 2 * PAGE), (30 * PAGE, PAGE),
                           (13 * PAGE, PAGE), (2 * PAGE, PAGE), (32 * PAGE, PAGE)]
    assert ws.ranges(order="sorted") == [(0, 3 * PAGE), (10 * PAGE, 4 * PAGE),
                                         (30 * PAGE, PAGE), (32 * PAGE, PAGE)]
    # one-page gaps bridged; the bridged page 31 is not installed twice
    assert ws.ranges(max_gap=PAGE, order="sorted") == [(0, 3 * PAGE), (10 * PAGE, 4 * PAGE),
                                                       (30 * PAGE, 3 * PAGE)]
    bridged = ws_of(0, 2, 1, 5).ranges(max_gap=PAGE)
    assert bridged == [(0, 3 * PAGE), (5 * PAGE, PAGE)]
    covered = [o for off, n in ws.ranges(max_gap=PAGE) for o in range(off, off + n, PAGE)]
    assert len(covered) == len(set(covered)) and set(ws.offsets) <= set(covered)
    with pytest.raises(ValueError, match="max_gap must be >= 0"):
        ws.ranges(max_gap=-1)
    assert ws_of().ranges() == []


def test_check_compatible_refuses_other_sources_and_tolerates_drift() -> None:
    ws = ws_of(0, 7, 3, 9, source="HTTPSource('http://h/m.bin')", source_size=10 * PAGE,
               fingerprint="fp1")
    same = ws.check_compatible(10 * PAGE, PAGE, "HTTPSource('http://h/m.bin')",
                               fingerprint="fp1")
    assert same.offsets == ws.offsets and same.dropped == 0
    grown = ws.check_compatible(20 * PAGE, PAGE, "HTTPSource('http://h/m.bin')")
    assert grown.offsets == ws.offsets
    shrunk = ws.check_compatible(7 * PAGE + 1, PAGE, "HTTPSource('http://h/m.bin')")
    assert shrunk.offsets == (0, 7 * PAGE, 3 * PAGE) and shrunk.dropped == 1  # page 7 is partial
    with pytest.raises(WorkingSetMismatch) as info:
        ws.check_compatible(10 * PAGE, 2 << 20, "HTTPSource('http://h/m.bin')")
    assert str(info.value) == ("the working set was recorded with 4096-byte pages, this pager "
                               "uses 2097152-byte pages: record a new working set for it")
    with pytest.raises(WorkingSetMismatch) as info:
        ws.check_compatible(10 * PAGE, PAGE, "FileSource('/other')")
    assert str(info.value) == (
        "the working set was recorded against \"HTTPSource('http://h/m.bin')\", not "
        "\"FileSource('/other')\": record a new one, or force its use (force_prefetch=True, "
        "--force-prefetch)")
    forced = ws.check_compatible(5 * PAGE, PAGE, "FileSource('/other')", force=True)
    assert forced.offsets == (0, 3 * PAGE) and forced.dropped == 2
    with pytest.raises(WorkingSetMismatch, match=r"content changed .* \(fingerprint fp1, now "
                                                 r"fp2\)"):
        ws.check_compatible(10 * PAGE, PAGE, "HTTPSource('http://h/m.bin')", fingerprint="fp2")
    with pytest.raises(WorkingSetMismatch, match="recorded with 4096-byte pages"):
        ws.check_compatible(10 * PAGE, 2 << 20, force=True)  # a page size is never forced


def test_invalid_sets() -> None:
    with pytest.raises(ValueError, match="page size 1000 is not a power of two"):
        WorkingSet((), 1000)
    with pytest.raises(ValueError, match="offset 12 is not"):
        WorkingSet((12,), PAGE)


def test_from_trace_first_touch_order(tmp_path: Path) -> None:
    a = np.zeros(9, RECORD_DTYPE)
    # (t, offset, kind, cause): out of time order in the file, as threads append
    rows = [(30, 5 * PAGE, Kind.READ, Cause.FAULT),
            (10, 2 * PAGE + 100, Kind.WRITE, Cause.FAULT),   # unaligned: page 2
            (20, 9 * PAGE, Kind.MINOR, Cause.FAULT),
            (25, 2 * PAGE, Kind.READ, Cause.FAULT),          # re-fault of page 2
            (5, 7 * PAGE, Kind.NONE, Cause.READAHEAD),        # not a touch
            (6, 8 * PAGE, Kind.NONE, Cause.PREFETCH),         # not a touch
            (40, 1 * PAGE, Kind.WP, Cause.FAULT),             # a write to a present page
            (50, 3 * PAGE, Kind.NONE, Cause.POISON),          # not served
            (30, 4 * PAGE, Kind.READ, Cause.FAULT)]           # same time: file order kept
    for i, (t, off, kind, cause) in enumerate(rows):
        a[i]["t_ns"], a[i]["offset"], a[i]["kind"], a[i]["cause"] = t, off, kind, cause
    path = tmp_path / "t.uftrace"
    meta = TraceMeta(source="S", region_size=16 * PAGE, page_size=PAGE, source_size=12 * PAGE,
                     fingerprint="F")
    with TraceWriter(path, meta) as w:
        w.write_array(a)
    ws = from_trace(read(path))
    assert ws.offsets == (2 * PAGE, 9 * PAGE, 5 * PAGE, 4 * PAGE)
    assert (ws.source, ws.source_size, ws.fingerprint) == ("S", 12 * PAGE, "F")
    # installs by readahead and prefetch count as touched when asked; every page of them
    a[4]["length"], a[5]["length"] = 2 * PAGE + 1, PAGE
    with TraceWriter(path, meta) as w:
        w.write_array(a)
    both = from_trace(read(path), installs=(Cause.READAHEAD, Cause.PREFETCH))
    assert both.offsets == (7 * PAGE, 8 * PAGE, 9 * PAGE, 2 * PAGE, 5 * PAGE, 4 * PAGE)


def _pattern(n: int) -> bytes:
    return b"".join(bytes([i % 251]) * PAGE for i in range(n))


@pytest.mark.timeout(60)
def test_from_a_real_pager_fault_log(tmp_path: Path) -> None:
    """A real pager serves pages in a known order; its fault log becomes a working set
    directly and through a trace file, both in that order."""
    order = [5, 0, 9, 3, 3, 12, 1]
    data = _pattern(16)
    with userfault.Pager(data, readahead=False, log_faults=64) as pager:
        view = memoryview(pager)
        for p in order:
            assert view[p * PAGE] == p % 251
        view.release()
        faults = pager.faults()
        desc = repr(pager.source)
    expected = tuple(p * PAGE for p in dict.fromkeys(order))
    ws = from_faults(faults, page_size=PAGE, source=desc, source_size=len(data))
    assert ws.offsets == expected
    meta = TraceMeta.now(desc, len(data), PAGE)
    assert write_fault_log(tmp_path / "log.uftrace", meta, faults, PAGE, dropped=2) == \
        len(faults) + 1
    trace = read(tmp_path / "log.uftrace")
    assert trace.dropped == 2 and set(trace.events["kind"].tolist()) == {Kind.READ}
    assert from_trace(trace).offsets == expected


def test_fingerprint(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(_pattern(64))
    first = fingerprint(f)
    assert first.startswith("sample-blake2b:") and fingerprint(f) == first
    with open(f, "r+b") as fh:
        fh.write(b"\xff")  # the first block is always sampled
    assert fingerprint(f) != first
    f.write_bytes(_pattern(64) + b"x")
    assert fingerprint(f) != first
    (tmp_path / "empty").write_bytes(b"")
    assert fingerprint(tmp_path / "empty").startswith("sample-blake2b:")


def test_cli_from_trace_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = np.zeros(3, RECORD_DTYPE)
    a["t_ns"] = [1, 2, 3]
    a["offset"] = [4 * PAGE, 5 * PAGE, 0]
    path = tmp_path / "t.uftrace"
    with TraceWriter(path, TraceMeta(source="S", region_size=8 * PAGE, page_size=PAGE)) as w:
        w.write_array(a)
        w.write_dropped(4, 1)
    out_ws = tmp_path / "t.ws"
    assert main(["workingset", "from-trace", str(path), "-o", str(out_ws)]) == 0
    out, err = capsys.readouterr()
    assert out == (f"{out_ws}: 3 pages (12288 bytes) in first-touch order, 2 ranges, from 4 "
                   "records of 'S'\n")
    assert err == "warning: the trace dropped 1 records: the working set may miss pages\n"
    assert read_working_set(out_ws).offsets == (4 * PAGE, 5 * PAGE, 0)

    assert main(["workingset", "inspect", str(out_ws)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "format:       userfault (version 1)" in out
    assert "source size:  32768 bytes (32.0 KiB)" in out
    assert "pages:        3 (12.0 KiB)" in out
    assert "ranges:       2 in first-touch order, 2 sorted" in out
    assert "first pages:  0x4000, 0x5000, 0x0" in out

    assert main(["workingset", "inspect", "--json", str(out_ws)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ranges"] == [[4 * PAGE, 2 * PAGE], [0, PAGE]] and doc["pages"] == 3

    old = tmp_path / "vm.ws"
    _write_old(old, [0, PAGE])
    assert main(["workingset", "inspect", str(old)]) == 0
    out = capsys.readouterr().out
    assert "format:       firecracker (version 1)" in out and "(not recorded)" in out

    assert main(["workingset", "inspect", str(path)]) == 1
    assert "is not a working-set file" in capsys.readouterr().err
