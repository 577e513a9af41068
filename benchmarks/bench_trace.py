"""Traces: what recording one costs the engine, and the trace tools on a large trace (read,
stats, binning, PNG and HTML) against reading the raw bytes of the same file.

Usage: PYTHONPATH=src python benchmarks/bench_trace.py [--only overhead,tools] [--runs 5]
           [--records 1000000] [--size 256M] [--cpus 0,1]

``overhead``: the native engine serving a fast source (``PatternSource``, installed with
UFFDIO_COPY; ``ZeroSource``, installed as the zero page) with readahead off, so that every
page is one fault: one pager per CPU of ``--cpus``, each faulted by a C reader thread
(``_native.touch``, the GIL released) on the same CPU as its serving thread (the fastest
placement; the trace writer thread shares it too), the readers started together. The same
runs with and without ``trace=PATH``, round-robin (the order alternating), medians of
``--runs``; the overhead is the median over runs of traced time / plain time - 1. Each traced
run checks that the traces' fault records plus their dropped counts equal the engines' faults.
The issue's target: at most 5 % overhead at 200k faults/s.

``tools``: a synthetic trace of ``--records`` records (a sequential fault scan, random
readahead and prefetch installs, 8 threads, log-normal service times), written once with
``TraceWriter.write_array``. Each stage is timed alone; figures are medians over ``--runs``;
the ratio is to ``np.fromfile`` of the record bytes (the floor for anything that reads the
whole file). The issue's target: a trace with a million records plots in seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, median, progress, table

import userfault
from userfault import _native
from userfault._units import parse_size
from userfault.sources.native import PatternSource, ZeroSource
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


def fault_run(make: Callable[[], Any], size: int, cpus: list[int],
              trace: Path | None) -> dict[str, float]:
    """Per CPU in ``cpus``, a fresh ``size``-byte pager and one reader thread faulting each of
    its pages once, every thread of it (the reader, the engine's serving thread, the trace
    writer) pinned to that CPU; all readers start together. Faults/s of them all, and for a
    traced run the traces' fault records and dropped counts."""
    old = os.sched_getaffinity(0)
    pagers: list[userfault.Pager] = []
    readers: list[threading.Thread] = []
    go = threading.Barrier(len(cpus) + 1)

    def reader(address: int) -> None:
        go.wait()
        _native.touch(address, size, PAGE, 0, 0, False)

    traces = [] if trace is None else [trace.with_suffix(f".{cpu}") for cpu in cpus]
    try:
        for i, cpu in enumerate(cpus):
            os.sched_setaffinity(0, {cpu})  # inherited by the threads started now
            pagers.append(userfault.Pager(make(), size=size, readahead=False,
                                          trace=str(traces[i]) if traces else None))
            readers.append(threading.Thread(target=reader, args=(pagers[-1].address,)))
            readers[-1].start()
        os.sched_setaffinity(0, old)
        t0 = time.perf_counter()
        go.wait()
        for r in readers:
            r.join()
        dt = time.perf_counter() - t0
        faults = sum(p.stats().faults for p in pagers)
    finally:
        os.sched_setaffinity(0, old)
        for p in pagers:
            p.close()
    out = {"s": dt, "faults": faults, "rate": faults / dt}
    if traces:
        out["recorded"] = out["dropped"] = 0
        for path in traces:
            t = read(path)
            out["recorded"] += int(np.count_nonzero(t.records["cause"] == Cause.FAULT))
            out["dropped"] += t.dropped
            os.unlink(path)
        if out["recorded"] + out["dropped"] != faults:
            raise SystemExit(f"the traces have {out['recorded']} fault records and "
                             f"{out['dropped']} dropped for {faults} faults")
    return out


def bench_overhead(args: argparse.Namespace) -> None:
    size = parse_size(args.size)
    cpus = [int(c) for c in args.cpus.split(",")]
    sources: dict[str, Callable[[], Any]] = {
        "pattern (COPY)": lambda: PatternSource(b"userfault", size),
        "zero (ZEROPAGE)": lambda: ZeroSource(size),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.uftrace"
        results: dict[tuple[str, bool], list[dict[str, float]]] = {}
        fault_run(sources["pattern (COPY)"], size, cpus, path)  # warm-up
        for run in range(args.runs):
            for name, make in sources.items():
                for traced in (run % 2 == 1, run % 2 == 0):  # round-robin, alternate order
                    results.setdefault((name, traced), []).append(
                        fault_run(make, size, cpus, path if traced else None))
            progress(f"overhead run {run + 1}/{args.runs} done")
    rows = []
    for name in sources:
        plain, traced = results[(name, False)], results[(name, True)]
        r0, r1 = median([r["rate"] for r in plain]), median([r["rate"] for r in traced])
        spread = sorted(a["s"] / b["s"] - 1 for a, b in zip(traced, plain, strict=True))
        paired = median(spread)
        rows.append([name, len(cpus) * size // PAGE, r0 / 1e3, r1 / 1e3,
                     f"{paired * 100:+.1f} %",
                     f"{spread[0] * 100:+.0f} .. {spread[-1] * 100:+.0f} %",
                     sum(int(r["dropped"]) for r in traced),
                     sum(int(r["recorded"]) for r in traced)])
    headers = ["source", "faults per run", "kfaults/s plain", "kfaults/s traced",
               "overhead (median of runs)", "overhead range", "dropped (all runs)",
               "fault records (all runs)"]
    print(f"# trace overhead: one pager of {args.size} per CPU of {args.cpus} (its reader, "
          f"serving and trace threads on that CPU), readahead off, medians of {args.runs}")
    print(table(headers, rows))
    print()
    print(table(headers, rows, markdown=True))
    print()


def bench_tools(args: argparse.Namespace) -> None:
    print(f"# trace tools: {args.records} records")
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


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--only", default="overhead,tools")
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", default="256M", help="memory faulted per pager and overhead run")
    ap.add_argument("--cpus", default="0,1",
                    help="one pager and reader per CPU listed (default 0,1); its reader and "
                         "serving thread share the CPU, the fastest placement")
    args = ap.parse_args()
    only = set(args.only.split(","))
    info = machine()
    print(f"# bench_trace: {info['kernel']}, {info['nproc']} CPUs, load {info['load']}, "
          f"{args.runs} runs (medians)")
    if "overhead" in only:
        bench_overhead(args)
    if "tools" in only:
        bench_tools(args)
    print(f"# /proc/loadavg at end: {Path('/proc/loadavg').read_text().strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
