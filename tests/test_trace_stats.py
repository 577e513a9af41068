"""summarize() and `userfault stats` on a trace whose every number is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from userfault.cli import main
from userfault.trace import Cause, Kind, TraceMeta, TraceWriter, read
from userfault.trace.stats import ThreadTime, percentile, summarize

PAGE = 4096


def known_trace(path: Path) -> Path:
    """Thread 11 faults pages 0..9 once each (service 1..10 us), thread 22 re-faults pages
    0 and 1 (100 us each, page 1 twice), a readahead and a prefetch install 64 KiB each, a
    poisoned page, and two drop records (3 + 4 records lost)."""
    meta = TraceMeta(source="known", region_size=1 << 20, page_size=PAGE)
    with TraceWriter(path, meta) as w:
        t = 1_000_000_000
        for i in range(10):
            w.write(t + i * 1000, i * PAGE, 0x10000 + i * PAGE, PAGE, 11, (i + 1) * 1000,
                    Kind.READ if i % 2 else Kind.WRITE, Cause.FAULT, 1 if i % 2 == 0 else 0)
        w.write_dropped(t + 10_500, 3)
        for j, page in enumerate((0, 1, 1)):
            w.write(t + 20_000 + j, page * PAGE, 0x10000 + page * PAGE, PAGE, 22, 100_000,
                    Kind.MINOR, Cause.FAULT)
        w.write(t + 30_000, 10 * PAGE, 0x10000 + 10 * PAGE, 65536, 0, 0, Kind.NONE,
                Cause.READAHEAD)
        w.write(t + 40_000, 32 * PAGE, 0x10000 + 32 * PAGE, 65536, 0, 0, Kind.NONE,
                Cause.PREFETCH)
        w.write(t + 2_000_000, 50 * PAGE, 0x10000 + 50 * PAGE, 0, 0, 0, Kind.NONE,
                Cause.POISON)
        w.write_dropped(t + 2_000_001, 4)
    return path


def test_percentile_is_nearest_rank() -> None:
    v = np.arange(1, 101)
    assert [percentile(v, q) for q in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile(np.array([7]), 50) == 7 and percentile(np.array([], int), 50) == 0
    assert percentile(np.array([1, 2, 3]), 50) == 2


def test_summarize_known_trace(tmp_path: Path) -> None:
    s = summarize(read(known_trace(tmp_path / "k.uftrace")))
    assert s.records == 16 and s.dropped == 7
    assert s.duration_ns == 2_000_000
    assert s.counts == {"fault": {"read": 5, "write": 5, "minor": 3},
                        "readahead": {"none": 1}, "prefetch": {"none": 1},
                        "poison": {"none": 1}}
    assert s.bytes_by_cause == {"fault": 13 * PAGE, "readahead": 65536, "prefetch": 65536,
                                "poison": 0}
    assert s.faults == 13 and s.distinct_pages == 10
    assert s.refaulted_pages == 2 and s.refaults == 3
    # 13 latencies: 1..10 us, then 100 us x 3
    assert s.latency_ns == {"p50": 7000, "p90": 100_000, "p99": 100_000, "max": 100_000}
    assert s.threads == [ThreadTime(22, 3, 300_000), ThreadTime(11, 10, 55_000)]


def test_stats_cli_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = known_trace(tmp_path / "k.uftrace")
    assert main(["stats", str(path)]) == 0
    out = capsys.readouterr().out
    for line in ("records:         16", "  fault:         13 (read 5, write 5, minor 3)",
                 "bytes readahead: 65536 (64.0 KiB)", "distinct pages:  10",
                 "re-faults:       3 on 2 pages",
                 "latency:         p50 7.0 us p90 100.0 us p99 100.0 us max 100.0 us",
                 "dropped:         7 records", "          22          3       0.300 ms",
                 "          11         10       0.055 ms"):
        assert line in out.splitlines(), (line, out)
    assert main(["stats", "--json", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["faults"] == 13 and doc["dropped"] == 7
    assert doc["threads"][0] == {"tid": 22, "faults": 3, "blocked_ns": 300_000}


def test_stats_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"not a trace at all")
    assert main(["stats", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"userfault stats: error: {str(bad)!r}: not a userfault trace")
    assert main(["stats", str(tmp_path / "missing")]) == 1
    assert "No such file" in capsys.readouterr().err


def test_stats_cli_reports_a_partial_record(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = known_trace(tmp_path / "k.uftrace")
    with open(path, "ab") as f:
        f.write(b"\0" * 20)
    assert main(["stats", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "note: " in err and "ends inside a record (20 of 48 bytes" in err
    assert "partial record:  20 bytes ignored (the writer stopped mid-record)" in out
