"""Benchmark the pager process end to end, through ``userfault.Pager``.

Usage: .venv/bin/python benchmarks/bench_pager_process.py [--quick] [--repeat N]
           [--only fault,http,redis] [--pages N] [--size 256M]
           [--redis-page-sizes 4096,65536] [--markdown]

* fault  per 4 KiB fault, one page per fault (``readahead=False``): ``Pager(PatternSource,
         runtime="process")`` (the Python FaultServer in a pager process) vs the C reference
         ``ref_handler uffd --chunk 4096`` (poll + read + UFFDIO_COPY in a C thread, from
         benchmarks/ref_handler.c via _common.py) vs the native engine (``runtime="native"``),
         over a 64 MiB region (16384 faults), sequential page order.
* http   HTTPSource on a real nginx (tests/servers.py) serving a ``--size`` file of random bytes:
         first-touch latency of ``--pages`` distinct random pages (readahead off, each touch
         timed alone), then sequential throughput over the whole file (readahead on, default).
* redis  RedisSource on a real redis-server (keys of ``--redis-page-sizes`` bytes, uploaded with
         ``upload``): the same. With 64 KiB keys a 4 KiB first touch fetches a whole 64 KiB key.

The faulting workload is C: ``userfault._native.touch(addr, length, 4096, 0, 0, False)``, one
read per page with the GIL released. First touches are timed in Python with ``perf_counter_ns``
around ``touch(page_address, 1, 4096, 0, 0, False)``; the cost of that timing itself (the same
call on a page already present) is reported as "timer floor". Every case is repeated
``--repeat`` times, round-robin with the cases it is compared with; figures are medians. Sums of
the bytes read are checked against the data, so a pager serving wrong bytes fails loudly.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import (
    PAGE,
    MiB,
    build_reference,
    machine,
    median,
    progress,
    run_json,
    table,
)

import userfault
from servers import NginxServer, RedisServer
from userfault import _native
from userfault._units import parse_size
from userfault.sources.http import HTTPSource
from userfault.sources.native import PatternSource
from userfault.sources.redis import upload


def touch_all(address: int, size: int) -> tuple[float, int]:
    """Read one byte of every page (C loop, GIL released): (seconds, checksum)."""
    t0 = time.perf_counter_ns()
    checksum = _native.touch(address, size, PAGE, 0, 0, False)
    return (time.perf_counter_ns() - t0) / 1e9, checksum


def settled_stats(pager: userfault.Pager, faults: int) -> userfault.PagerStats:
    """The pager's counters once ``faults`` faults are in them: a pager process publishes its
    counters within a millisecond or so, not at once."""
    deadline = time.monotonic() + 2.0
    st = pager.stats()
    while st.faults < faults and time.monotonic() < deadline:
        time.sleep(0.005)
        st = pager.stats()
    return st


def percentile(sorted_values: list[int], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q / 100))] / 1e3


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.repeat = args.repeat
        self.rows: list[tuple[str, list[str], list[list[Any]]]] = []

    def interleave(self, cases: list[tuple[str, Callable[[], dict[str, float]]]]
                   ) -> dict[str, dict[str, float]]:
        """Each case once per repetition, round-robin; the median of every key per case."""
        runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in cases}
        for rep in range(self.repeat):
            for name, fn in cases:
                progress(f"  rep {rep + 1}/{self.repeat}: {name}")
                runs[name].append(fn())
        return {name: {k: median([r[k] for r in rs]) for k in rs[0]} for name, rs in runs.items()}

    def add_table(self, title: str, headers: list[str], rows: list[list[Any]]) -> None:
        self.rows.append((title, headers, rows))
        print(f"\n## {title}\n")
        print(table(headers, rows, markdown=self.args.markdown), flush=True)

    # -- 1. per-fault cost, in-memory source ------------------------------------------------

    def pager_fault_run(self, size: int, runtime: str) -> dict[str, float]:
        opts: dict[str, Any] = {"chunk": PAGE, "readahead": False, "runtime": runtime}
        if runtime == "native":
            opts["install"] = "copy"
        pages = size // PAGE
        with userfault.Pager(PatternSource(b"R", size), **opts) as pager:
            secs, checksum = touch_all(pager.address, size)
            st = settled_stats(pager, pages)
        if checksum != pages * ord("R") or st.faults != pages:
            raise SystemExit(f"{runtime}: checksum {checksum} / faults {st.faults}, expected "
                             f"{pages * ord('R')} / {pages}")
        # A second pager, each touch timed alone in Python: the typical fault, apart from tails.
        with userfault.Pager(PatternSource(b"R", size), **opts) as pager:
            base, touch, clock = pager.address, _native.touch, time.perf_counter_ns
            times = []
            for p in range(pages):
                t0 = clock()
                touch(base + p * PAGE, 1, PAGE, 0, 0, False)
                times.append(clock() - t0)
        times.sort()
        return {"per_fault_us": secs * 1e6 / st.faults, "p50_us": percentile(times, 50),
                "p99_us": percentile(times, 99), "service_us": st.blocked_ns / st.faults / 1e3}

    def bench_fault(self) -> None:
        size = 8 * MiB if self.args.quick else 64 * MiB
        exe, _ = build_reference()
        progress(f"per-fault: {size // MiB} MiB, {size // PAGE} faults")

        def ref() -> dict[str, float]:
            cmd = [str(exe), "uffd", "--size", str(size), "--chunk", str(PAGE), "--order", "seq"]
            out = run_json(cmd)
            timed = run_json([*cmd, "--latency"])  # each touch timed alone (in C)
            if out["faults"] != size // PAGE:
                raise SystemExit(f"ref_handler served {out['faults']} faults")
            return {"per_fault_us": out["per_fault_us"], "p50_us": timed["p50_us"],
                    "p99_us": timed["p99_us"], "service_us": float("nan")}

        got = self.interleave([
            ("process", lambda: self.pager_fault_run(size, "process")),
            ("ref", ref),
            ("native", lambda: self.pager_fault_run(size, "native")),
        ])
        ref_us = got["ref"]["per_fault_us"]
        labels = {"process": 'Pager(runtime="process"), PatternSource',
                  "ref": "C reference (ref_handler uffd)",
                  "native": 'Pager(runtime="native"), PatternSource'}
        rows: list[list[Any]] = [
            [label, got[k]["per_fault_us"], got[k]["per_fault_us"] / ref_us, got[k]["p50_us"],
             got[k]["p50_us"] / got["ref"]["p50_us"], got[k]["p99_us"], got[k]["service_us"]]
            for k, label in labels.items()]
        self.add_table(f"Per 4 KiB fault, one page per fault ({size // MiB} MiB, "
                       f"{size // PAGE} faults, sequential; µs, median of {self.repeat})",
                       ["handler", "mean µs per fault", "x C ref", "p50 µs per touch", "x C ref",
                        "p99 µs per touch", "service mean µs"], rows)

    # -- 2. network sources through the Pager -------------------------------------------------

    def first_touch_run(self, make: Callable[[], Any], size: int, pages: list[int],
                        expect: bytes) -> dict[str, float]:
        with userfault.Pager(make(), size=size, readahead=False) as pager:
            base = pager.address
            touch = _native.touch
            clock = time.perf_counter_ns
            times = []
            total = 0
            for p in pages:
                addr = base + p * PAGE
                t0 = clock()
                total += touch(addr, 1, PAGE, 0, 0, False)
                times.append(clock() - t0)
            floor = []
            for p in pages[:200]:  # the same call on a page that is now present
                addr = base + p * PAGE
                t0 = clock()
                touch(addr, 1, PAGE, 0, 0, False)
                floor.append(clock() - t0)
            st = settled_stats(pager, len(pages))
        if total != sum(expect[p * PAGE] for p in pages) or st.faults != len(pages):
            raise SystemExit(f"first touch: wrong bytes or {st.faults} faults for "
                             f"{len(pages)} pages")
        times.sort()
        floor.sort()
        return {"p50_us": percentile(times, 50), "p99_us": percentile(times, 99),
                "mean_us": sum(times) / len(times) / 1e3,
                "service_us": st.blocked_ns / st.faults / 1e3,
                "floor_us": percentile(floor, 50)}

    def source_run(self, make: Callable[[], Any], size: int, pages: list[int]
                   ) -> dict[str, float]:
        """The source alone, in this process: read_into of the same pages, timed alike."""
        src = make()
        buf = memoryview(bytearray(PAGE))
        clock = time.perf_counter_ns
        times = []
        for p in pages:
            t0 = clock()
            src.read_into(p * PAGE, buf)
            times.append(clock() - t0)
        src.close()
        times.sort()
        return {"p50_us": percentile(times, 50), "p99_us": percentile(times, 99)}

    def sequential_run(self, make: Callable[[], Any], size: int, checksum: int
                       ) -> dict[str, float]:
        with userfault.Pager(make(), size=size) as pager:
            secs, got = touch_all(pager.address, size)
            st = pager.stats()
        if got != checksum:
            raise SystemExit(f"sequential: checksum {got}, expected {checksum}")
        return {"gbps": size / secs / 1e9, "faults": st.faults,
                "readahead_mib": st.readahead_bytes / MiB}

    def bench_network(self, name: str, make: Callable[[], Any], size: int,
                      data: bytes) -> None:
        rng = random.Random(7)
        npages = min(self.args.pages, size // PAGE)
        checksum = sum(data[::PAGE])
        progress(f"{name}: first touch of {npages} random pages, sequential {size // MiB} MiB")
        page_sets = [rng.sample(range(size // PAGE), npages) for _ in range(self.repeat)]
        it = iter(page_sets)
        it2 = iter(page_sets)
        cases: list[tuple[str, Callable[[], dict[str, float]]]] = [
            ("pager", lambda: self.first_touch_run(make, size, next(it), data)),
            ("source", lambda: self.source_run(make, size, next(it2))),
            ("seq", lambda: self.sequential_run(make, size, checksum)),
        ]
        got = self.interleave(cases)
        ft, so, seq = got["pager"], got["source"], got["seq"]
        self.results[name] = got
        self.net_rows.append([
            name, ft["p50_us"], ft["p99_us"], ft["service_us"], so["p50_us"], ft["floor_us"],
            seq["gbps"], seq["faults"], "met" if ft["p50_us"] <= 100 else "missed",
            "met" if seq["gbps"] >= 1.0 else "missed"])

    def run_network(self, only: set[str]) -> None:
        size = parse_size(self.args.size) if self.args.size else (
            64 * MiB if self.args.quick else 256 * MiB)
        self.results: dict[str, Any] = {}
        self.net_rows: list[list[Any]] = []
        data = os.urandom(size)
        work = Path(tempfile.mkdtemp(prefix="uf-bench-pp-"))
        if "http" in only:
            with NginxServer(workdir=work / "nginx") as nginx:
                (nginx.directory / "blob.bin").write_bytes(data)
                url = nginx.url("blob.bin")
                self.bench_network("http (nginx)", lambda: HTTPSource(url, size=size), size,
                                   data)
        if "redis" in only:
            with RedisServer(work / "redis") as server:
                for ps in self.args.redis_page_sizes:
                    src = upload(data, server.url, prefix=f"bpp{ps}:", page_size=ps)
                    self.bench_network(f"redis ({ps // 1024} KiB keys)", lambda src=src: src, size,
                                       data)
                    src.close()
                    src_flush(server.url)
        if self.net_rows:
            self.add_table(
                f"Network sources through Pager (pager process), loopback, {size // MiB} MiB; "
                f"first touch of {min(self.args.pages, size // PAGE)} random pages "
                f"(readahead off), sequential touch of all of it (readahead on); median of "
                f"{self.repeat}",
                ["source", "first touch p50 µs", "p99 µs", "pager service mean µs",
                 "source.read_into p50 µs", "timer floor µs", "sequential GB/s",
                 "sequential faults", "≤ 100 µs p50", "≥ 1 GB/s"], self.net_rows)


def src_flush(url: str) -> None:
    """Drop every key (the next page size's upload must fit in memory)."""
    import redis

    r = redis.Redis.from_url(url)
    r.flushall()
    r.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", default="fault,http,redis")
    ap.add_argument("--pages", type=int, default=2000, help="random pages per first-touch run")
    ap.add_argument("--size", default="", help="network file size (default 256M, quick 64M)")
    ap.add_argument("--redis-page-sizes", default="4096,65536",
                    help="Redis key sizes to measure (bytes, comma-separated)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    args.redis_page_sizes = [int(p) for p in args.redis_page_sizes.split(",")]
    only = set(args.only.split(","))
    m = machine()
    print(f"{m['date']}: kernel {m['kernel']}, {m['nproc']} CPUs ({m['cpu']}), {m['memory']}, "
          f"python {m['python']}, load {m['load']}", flush=True)
    bench = Bench(args)
    if "fault" in only:
        bench.bench_fault()
    if only & {"http", "redis"}:
        bench.run_network(only)


if __name__ == "__main__":
    main()
