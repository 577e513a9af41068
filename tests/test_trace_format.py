"""The trace file format: round trips, the exact record layout, truncated and corrupt files."""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import userfault
from userfault.trace import (
    MAGIC,
    RECORD,
    RECORD_DTYPE,
    Cause,
    Kind,
    TraceError,
    TraceMeta,
    TraceRecord,
    TraceWriter,
    TruncatedTraceWarning,
    create_trace,
    encode_header,
    read,
)
from userfault.trace.format import HEADER, kind_from_fault_flags

META = TraceMeta(source="FileSource('/data/x')", region_size=1 << 30, page_size=4096, pid=7,
                 start_monotonic_ns=123, start_unix_ns=456, command=("python", "x.py"),
                 userfault_version="0.1.0")

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
records = st.builds(TraceRecord, u64, u64, u64, u64, u32, u32,
                    st.sampled_from(list(Kind)), st.sampled_from(list(Cause)),
                    st.integers(0, 2**16 - 1))


def test_record_layout_is_the_engines_struct() -> None:
    assert RECORD.format == "<QQQQIIBBHI" and RECORD.size == 48
    assert RECORD_DTYPE.itemsize == 48
    r = TraceRecord(1, 2, 3, 4, 5, 6, Kind.WP, Cause.POISON, 0x102)
    assert r.pack() == struct.pack("<QQQQIIBBHI", 1, 2, 3, 4, 5, 6, 3, 7, 0x102, 0)
    # field by field, the numpy view of those bytes agrees
    row = np.frombuffer(r.pack(), dtype=RECORD_DTYPE)[0]
    assert [int(row[f]) for f in RECORD_DTYPE.names] == [1, 2, 3, 4, 5, 6, 3, 7, 0x102, 0]
    assert [k.value for k in Kind] == [0, 1, 2, 3, 4]
    assert [c.value for c in Cause] == [0, 1, 2, 3, 4, 5, 6, 7]


def test_service_ns_saturates() -> None:
    r = TraceRecord(0, 0, 0, 0, 0, 2**40, Kind.READ, Cause.FAULT)
    assert struct.unpack_from("<I", r.pack(), 36)[0] == 2**32 - 1


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recs=st.lists(records, max_size=40), extra=st.dictionaries(
    st.text(min_size=1, max_size=8).filter(lambda k: k not in TraceMeta.__dataclass_fields__),
    st.one_of(st.integers(), st.text(max_size=10)), max_size=3))
def test_round_trip(tmp_path: Path, recs: list[TraceRecord], extra: dict[str, object]) -> None:
    meta = TraceMeta(**{**META.__dict__, "extra": extra})
    path = tmp_path / "t.uftrace"
    with TraceWriter(path, meta) as w:
        for r in recs:
            w.write_record(r)
    raw = path.read_bytes()
    assert raw.startswith(encode_header(meta)) and len(encode_header(meta)) % 8 == 0
    assert raw[len(encode_header(meta)):] == b"".join(r.pack() for r in recs)
    t = read(path)
    assert t.meta == meta and t.partial_bytes == 0
    assert list(t) == recs
    assert len(t) == len(recs)
    if recs:
        assert t.record(-1) == recs[-1]
        assert t["offset"].tolist() == [r.offset for r in recs]
    assert t.dropped == sum(r.length for r in recs if r.cause == Cause.DROPPED)


def test_writer_fields_and_array(tmp_path: Path) -> None:
    arr = np.zeros(3, RECORD_DTYPE)
    arr["offset"] = [0, 4096, 8192]
    arr["cause"] = Cause.PREFETCH
    arr["kind"] = Kind.NONE
    with TraceWriter(tmp_path / "a", META) as w:
        w.write(10, 4096, 0x7F0000001000, 4096, 42, 999, Kind.WRITE, Cause.FAULT, 1)
        w.write_array(arr)
        w.write_dropped(20, 5)
        with pytest.raises(TypeError, match="RECORD_DTYPE"):
            w.write_array(np.zeros(2, np.uint64))
    t = read(tmp_path / "a")
    assert t.record(0) == TraceRecord(10, 4096, 0x7F0000001000, 4096, 42, 999, Kind.WRITE,
                                      Cause.FAULT, 1)
    assert t["offset"][1:4].tolist() == [0, 4096, 8192]
    assert t.dropped == 5 and len(t.events) == 4 and len(t) == 5


def test_engine_style_appends_through_create_trace(tmp_path: Path) -> None:
    """What the engine will do: get a descriptor from create_trace, write(2) whole records."""
    path = tmp_path / "e.uftrace"
    meta = TraceMeta.now("engine test", 8192, 4096, source_size=5000, fingerprint="fp")
    fd = create_trace(path, meta)
    try:
        for i in range(2):
            os.write(fd, RECORD.pack(i, i * 4096, 0x1000 + i, 4096, 9, 50, 0, 0, 0, 0))
    finally:
        os.close(fd)
    t = read(path)
    assert [r.offset for r in t] == [0, 4096]
    assert t.meta.pid == os.getpid() and t.meta.source_size == 5000
    assert t.meta.fingerprint == "fp" and t.meta.userfault_version == userfault.__version__
    assert t.meta.start_monotonic_ns > 0 and t.meta.start_unix_ns > 1_500_000_000 * 10**9
    assert t.meta.command and "python" in t.meta.command[0]
    assert userfault.trace.read is read  # the package attribute the issue names


def test_partial_last_record_is_ignored_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "crash.uftrace"
    with TraceWriter(path, META) as w:
        for i in range(3):
            w.write(i, 0, 0, 4096, 1, 1, Kind.READ, Cause.FAULT)
    with open(path, "ab") as f:
        f.write(RECORD.pack(3, 0, 0, 4096, 1, 1, 0, 0, 0, 0)[:30])
    with pytest.warns(TruncatedTraceWarning, match=r"ends inside a record \(30 of 48 bytes"):
        t = read(path)
    assert len(t) == 3 and t.partial_bytes == 30
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read(_header_only(tmp_path)).partial_bytes == 0


def _header_only(tmp_path: Path) -> Path:
    p = tmp_path / "empty.uftrace"
    p.write_bytes(encode_header(META))
    return p


def test_empty_trace(tmp_path: Path) -> None:
    t = read(_header_only(tmp_path))
    assert len(t) == 0 and t.dropped == 0 and list(t) == []


def _corrupt(tmp_path: Path, data: bytes) -> str:
    p = tmp_path / "bad"
    p.write_bytes(data)
    with pytest.raises(TraceError) as info:
        read(p)
    return str(info.value).replace(repr(str(p)), "P")


def test_bad_magic_version_and_header(tmp_path: Path) -> None:
    good = encode_header(META)
    assert _corrupt(tmp_path, b"") == ("P: too short for a trace header (0 bytes, a header has "
                                       "at least 16)")
    assert _corrupt(tmp_path, b"UFFCWS1\0" + good[8:]) == (
        "P: not a userfault trace (magic b'UFFCWS1\\x00', expected b'UFTRACE\\x00')")
    assert _corrupt(tmp_path, HEADER.pack(MAGIC, 2, 0)) == (
        "P: trace format version 2 is not supported (this userfault reads version 1); use a "
        "matching userfault")
    assert _corrupt(tmp_path, good[:40]) == (
        f"P: truncated header: metadata needs {len(good) - 16} bytes, the file has 24")
    assert _corrupt(tmp_path, HEADER.pack(MAGIC, 1, 1 << 30)) == (
        "P: corrupt header: metadata length 1073741824 exceeds 1048576 bytes")
    body = b"{not json"
    assert _corrupt(tmp_path, HEADER.pack(MAGIC, 1, len(body)) + body).startswith(
        "P: corrupt header: metadata is not a valid trace description (")
    body = json.dumps({"source": "x", "page_size": 4096}).encode()
    assert _corrupt(tmp_path, HEADER.pack(MAGIC, 1, len(body)) + body) == (
        "P: corrupt header: metadata is not a valid trace description (missing key "
        "'region_size')")
    body = json.dumps({"source": "x", "region_size": 1, "page_size": 3000}).encode()
    assert _corrupt(tmp_path, HEADER.pack(MAGIC, 1, len(body)) + body) == (
        "P: corrupt header: page size 3000 is not a power of two")


def test_unknown_enum_values_read_as_ints(tmp_path: Path) -> None:
    """A newer writer's kind or cause reads as a plain int, not an error."""
    p = tmp_path / "new"
    p.write_bytes(encode_header(META) + RECORD.pack(1, 0, 0, 0, 0, 0, 9, 12, 0, 0))
    r = read(p).record(0)
    assert r.kind == 9 and r.cause == 12


def test_kind_from_fault_flags() -> None:
    assert kind_from_fault_flags(0) == Kind.READ
    assert kind_from_fault_flags(1) == Kind.WRITE
    assert kind_from_fault_flags(1 | 2) == Kind.WP
    assert kind_from_fault_flags(4) == Kind.MINOR
