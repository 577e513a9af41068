"""Trace tools on a large trace: read, stats, binning, PNG and HTML, against reading the raw
bytes of the same file.

Usage: PYTHONPATH=src python benchmarks/bench_trace.py [--records 1000000] [--runs 5]

The trace is synthetic (a sequential fault scan, random readahead and prefetch installs, 8
threads, log-normal service times) and written once with ``TraceWriter.write_array``. Each
stage is timed alone; figures are medians over ``--runs``; the ratio is to ``np.fromfile`` of
the record bytes (the floor for anything that reads the whole file). The issue's target: a
trace with a million records plots in seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, median, progress, table

from userfault.trace import RECORD_DTYPE, Cause, Kind, TraceMeta, TraceWriter, read
from userfault.trace.format import HEADER
from userfault.trace.plot import bin_trace, write_html, write_png
from userfault.trace.stats import summarize

PAGE = 4096


def synthetic(n: int) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(0)
    a = np.zeros(n, RECORD_DTYPE)
    a["t_ns"] = np.sort(rng.integers(0, 10 * 10**9, n))
    a["offset"] = rng.integers(0, 1 << 20, n) * PAGE
    seq = n // 2
    a["offset"][:seq] = (np.arange(seq) % (1 << 20)) * PAGE
    a["length"] = PAGE
    a["tid"] = rng.integers(1000, 1008, n)
    a["service_ns"] = rng.lognormal(9, 1, n).astype(np.uint32)
    a["cause"] = rng.choice([Cause.FAULT, Cause.READAHEAD, Cause.PREFETCH], n, p=[.7, .2, .1])
    a["kind"] = np.where(a["cause"] == Cause.FAULT, rng.integers(0, 2, n), Kind.NONE)
    return a


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    info = machine()
    print(f"# bench_trace: {info['kernel']}, {info['nproc']} CPUs, load {info['load']}, "
          f"{args.records} records, {args.runs} runs (medians)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.uftrace"
        records = synthetic(args.records)
        with TraceWriter(path, TraceMeta.now("synthetic", 4 << 30, PAGE)) as w:
            w.write_array(records)
        start = HEADER.size + HEADER.unpack(path.read_bytes()[:HEADER.size])[2]
        trace = read(path)
        data = bin_trace(trace)
        stages: dict[str, Callable[[], object]] = {
            "np.fromfile (reference)": lambda: np.fromfile(path, RECORD_DTYPE, offset=start),
            "read()": lambda: read(path),
            "summarize()": lambda: summarize(trace),
            "bin_trace()": lambda: bin_trace(trace),
            "write_png()": lambda: write_png(data, str(Path(tmp) / "o.png")),
            "write_html()": lambda: write_html(data, str(Path(tmp) / "o.html")),
            "userfault plot (read+bin+png+html)": lambda: (
                write_png(d := bin_trace(read(path)), str(Path(tmp) / "p.png")),
                write_html(d, str(Path(tmp) / "p.html"))),
        }
        times: dict[str, list[float]] = {k: [] for k in stages}
        for run in range(args.runs):
            for name, fn in stages.items():  # round-robin
                times[name].append(timed(fn))
            progress(f"run {run + 1}/{args.runs} done")
    ref = median(times["np.fromfile (reference)"])
    rows = [[name, median(t) * 1e3, f"{median(t) / ref:.1f}x"] for name, t in times.items()]
    print(table(["stage", "ms", "vs np.fromfile"], rows))
    print()
    print(table(["stage", "ms", "vs np.fromfile"], rows, markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
