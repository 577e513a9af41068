"""Benchmark the pager process (``runtime="process"``) end to end, through ``userfault.Pager``.

Usage: .venv/bin/python benchmarks/bench_pager_process.py [--quick] [--repeat N]
           [--only fault,http,redis,cluster] [--pages N] [--size 256M]
           [--redis-page-sizes 4096,65536] [--masters 3] [--pieces 256K] [--markdown]

The pager process is the one C engine (src/userfault/_native/engine_*.c) running in a worker
process of its own (src/userfault/serving/process.py), calling a Python source's
``read_into`` / ``read_many`` with that process's GIL.

* fault    per 4 KiB fault, one page per fault (``chunk=4096, readahead=False``), 64 MiB
           (16384 faults), sequential page order: the pager process over a Python source
           (``read_into`` in Python) and over ``PatternSource`` (read in C by the engine in the
           pager process) vs the C reference ``ref_handler uffd --chunk 4096`` (poll + read +
           UFFDIO_COPY in a C thread, benchmarks/ref_handler.c) vs the native runtime
           (``runtime="native"``, the engine's threads in this process). Mean per fault and
           p50 / p99 per touch, each touch timed in C.
* http     HTTPSource on a real nginx (tests/servers.py) serving a ``--size`` file of random
           bytes: first-touch latency of ``--pages`` distinct random pages (readahead off), then
           sequential throughput over the whole file (readahead on, the defaults), and again
           with each ``--pieces`` size as ``piece=`` (the background install unit; the
           engine's default for a Python source is ``UF_PYTHON_PIECE``), in the same rounds.
* redis    RedisSource on one real redis-server (keys of ``--redis-page-sizes`` bytes, uploaded
           with ``upload``): the same.
* cluster  RedisSource on a Redis Cluster of ``--masters`` masters (the keys spread over
           every master; one pipelined read per master): the same.

The faulting workload is C: ``ref_touch`` from the reference built as a shared library
(per page a write at byte 0 and a read of byte 64, every touch timed with ``clock_gettime``;
the same loop the reference runs) for the per-fault case, and
``userfault._native.touch(addr, length, 4096, 0, 0, False)`` (one read per page, GIL released)
for the network cases, whose first touches are timed in Python with ``perf_counter_ns``; the
cost of that timing itself (the same call on a page already present) is the "timer floor".
Every case is repeated ``--repeat`` times, round-robin with the cases it is compared with;
figures are medians. Sums of the bytes read are checked, so a pager serving wrong bytes fails
loudly.
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

import redis
import redis.cluster
from _common import (
    PAGE,
    MiB,
    build_reference,
    load_reference_lib,
    machine,
    median,
    page_order,
    progress,
    run_json,
    table,
    touch_pages,
)

import userfault
from servers import NginxServer, RedisCluster, RedisServer
from userfault import _native
from userfault._units import parse_size
from userfault.sources.http import HTTPSource
from userfault.sources.native import PatternSource
from userfault.sources.redis import upload

HTTP_TARGET = 1.5  # GB/s, sequential, issue 8
REDIS_TARGET = 1.0


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


class PyPattern:
    """A Python source: every byte is ``byte`` (``PatternSource`` in Python, so the pager
    process calls Python for every read)."""

    def __init__(self, byte: bytes, size: int) -> None:
        self._byte = byte
        self._size = size
        self._bytes = byte * (256 << 10)
        self._block = memoryview(self._bytes)  # slices of it are views, not copies

    def __getstate__(self) -> dict[str, Any]:
        return {"byte": self._byte, "size": self._size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["byte"], state["size"])  # type: ignore[misc]

    @property
    def size(self) -> int:
        return self._size

    def read_into(self, offset: int, buf: memoryview) -> None:
        # As lean as a Python read can be (one slice assignment, ~0.3 us here), so that the
        # figure is the pager process's cost, not this method's.
        n, step = len(buf), len(self._block)
        if n <= step:
            buf[:] = self._block[:n]
            return
        for at in range(0, n, step):
            k = min(step, n - at)
            buf[at: at + k] = self._block[:k]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.exe, libpath = build_reference()
        self.lib = load_reference_lib(libpath)
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

    def pager_fault_run(self, make: Callable[[], Any], runtime: str, size: int, idx: Any,
                        n: int) -> dict[str, float]:
        opts: dict[str, Any] = {"chunk": PAGE, "readahead": False, "runtime": runtime}
        with userfault.Pager(make(), size=size, **opts) as pager:
            out = touch_pages(self.lib, pager.address, idx, n, latency=True)
            st = settled_stats(pager, n)
        if out["checksum"] != n * ord("R") or st.faults != n:
            raise SystemExit(f"{runtime}: checksum {out['checksum']} / faults {st.faults}, "
                             f"expected {n * ord('R')} / {n}")
        return {"per_fault_us": out["seconds"] * 1e6 / st.faults, "p50_us": out["p50_us"],
                "p99_us": out["p99_us"], "service_us": st.latency_percentile(50) / 1e3}

    def bench_fault(self) -> None:
        size = 8 * MiB if self.args.quick else 64 * MiB
        idx, n = page_order(self.lib, size)
        progress(f"per-fault: {size // MiB} MiB, {n} faults")

        def ref() -> dict[str, float]:
            out = run_json([str(self.exe), "uffd", "--size", str(size), "--chunk", str(PAGE),
                            "--order", "seq", "--source", "const", "--latency"])
            if out["faults"] != n or out["checksum"] != n * ord("R"):
                raise SystemExit(f"ref_handler: {out['faults']} faults, checksum "
                                 f"{out['checksum']}")
            return {"per_fault_us": out["per_fault_us"], "p50_us": out["p50_us"],
                    "p99_us": out["p99_us"], "service_us": float("nan")}

        cases: dict[str, tuple[str, Callable[[], dict[str, float]]]] = {
            "python": ('pager process, Python source (read_into in Python)',
                       lambda: self.pager_fault_run(lambda: PyPattern(b"R", size), "process",
                                                    size, idx, n)),
            "pattern": ('pager process, PatternSource (read in C)',
                        lambda: self.pager_fault_run(lambda: PatternSource(b"R", size),
                                                     "process", size, idx, n)),
            "ref": ("C reference (ref_handler uffd)", ref),
            "native": ('native runtime, PatternSource',
                       lambda: self.pager_fault_run(lambda: PatternSource(b"R", size),
                                                    "native", size, idx, n)),
        }
        got = self.interleave([(k, fn) for k, (_, fn) in cases.items()])
        ref_mean, ref_p50 = got["ref"]["per_fault_us"], got["ref"]["p50_us"]
        rows: list[list[Any]] = []
        for k, (label, _) in cases.items():
            g = got[k]
            mean_x, p50_x = g["per_fault_us"] / ref_mean, g["p50_us"] / ref_p50
            verdict = "-"
            if k in ("python", "pattern"):
                verdict = "met" if max(mean_x, p50_x) <= 1.2 else "missed"
            rows.append([label, g["per_fault_us"], mean_x, g["p50_us"], p50_x, g["p99_us"],
                         g["service_us"], verdict])
        self.add_table(f"Per 4 KiB fault, one page per fault ({size // MiB} MiB, {n} faults, "
                       f"sequential; µs, median of {self.repeat})",
                       ["handler", "mean µs per fault", "x C ref", "p50 µs per touch", "x C ref",
                        "p99 µs per touch", "engine service p50 µs", "≤ 1.2x (mean and p50)"],
                       rows)

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

    def sequential_run(self, make: Callable[[], Any], size: int, checksum: int,
                       piece: int = 0) -> dict[str, float]:
        with userfault.Pager(make(), size=size, piece=piece) as pager:
            secs, got = touch_all(pager.address, size)
            st = pager.stats()
        if got != checksum:
            raise SystemExit(f"sequential: checksum {got}, expected {checksum}")
        return {"gbps": size / secs / 1e9, "faults": st.faults,
                "readahead_mib": st.readahead_bytes / MiB}

    def bench_network(self, name: str, make: Callable[[], Any], size: int,
                      data: bytes, target: float) -> None:
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
        ] + [(f"seq piece={p // 1024}K",
              lambda p=p: self.sequential_run(make, size, checksum, piece=p))
             for p in self.args.pieces]
        got = self.interleave(cases)
        ft, so, seq = got["pager"], got["source"], got["seq"]
        self.results[name] = got
        self.net_rows.append([
            name, ft["p50_us"], ft["p99_us"], ft["service_us"], so["p50_us"], ft["floor_us"],
            seq["gbps"], seq["faults"], f"≥ {target:g}: " + (
                "met" if seq["gbps"] >= target else "missed")] + [
            f"{got[f'seq piece={p // 1024}K']['gbps']:.3g} "
            f"(x{seq['gbps'] / got[f'seq piece={p // 1024}K']['gbps']:.2f})"
            for p in self.args.pieces])

    def bench_redis(self, name: str, url: str, cluster: bool, size: int, data: bytes) -> None:
        for ps in self.args.redis_page_sizes:
            src = upload(data, url, prefix=f"bpp{ps}:", page_size=ps, cluster=cluster)
            self.bench_network(f"{name}, {ps // 1024} KiB keys", lambda src=src: src, size,
                               data, REDIS_TARGET)
            src.close()
            flush_all(url, cluster)

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
                                   data, HTTP_TARGET)
        if "redis" in only:
            with RedisServer(work / "redis") as server:
                self.bench_redis("redis", server.url, False, size, data)
        if "cluster" in only:
            with RedisCluster(work / "cluster", masters=self.args.masters) as cluster:
                self.bench_redis(f"redis cluster ({self.args.masters} masters)", cluster.url,
                                 True, size, data)
        if self.net_rows:
            self.add_table(
                f"Network sources through Pager (pager process), loopback, {size // MiB} MiB; "
                f"first touch of {min(self.args.pages, size // PAGE)} random pages "
                f"(readahead off), sequential touch of all of it (readahead on); median of "
                f"{self.repeat}",
                ["source", "first touch p50 µs", "p99 µs", "pager service mean µs",
                 "source.read_into p50 µs", "timer floor µs", "sequential GB/s",
                 "sequential faults", "sequential target GB/s"] + [
                     f"sequential GB/s with piece={p // 1024}K (x default)"
                     for p in self.args.pieces], self.net_rows)


def flush_all(url: str, cluster: bool) -> None:
    """Drop every key (the next page size's upload must fit in memory), on every master."""
    if cluster:
        rc = redis.cluster.RedisCluster.from_url(url)
        rc.flushall(target_nodes=redis.cluster.RedisCluster.PRIMARIES)
        rc.close()
    else:
        r = redis.Redis.from_url(url)
        r.flushall()
        r.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", default="fault,http,redis,cluster")
    ap.add_argument("--pages", type=int, default=2000, help="random pages per first-touch run")
    ap.add_argument("--size", default="", help="network file size (default 256M, quick 64M)")
    ap.add_argument("--redis-page-sizes", default="4096,65536",
                    help="Redis key sizes to measure (bytes, comma-separated)")
    ap.add_argument("--masters", type=int, default=3, help="masters of the Redis Cluster")
    ap.add_argument("--pieces", default="",
                    help="also read sequentially with these piece= sizes (comma-separated, "
                         "e.g. 256K: the native sources' default), in the same rounds")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    args.redis_page_sizes = [int(p) for p in args.redis_page_sizes.split(",")]
    args.pieces = [parse_size(p) for p in args.pieces.split(",") if p]
    only = set(args.only.split(","))
    m = machine()
    print(f"{m['date']}: kernel {m['kernel']}, {m['nproc']} CPUs ({m['cpu']}), {m['memory']}, "
          f"python {m['python']}, load {m['load']}", flush=True)
    bench = Bench(args)
    if "fault" in only:
        bench.bench_fault()
    if only & {"http", "redis", "cluster"}:
        bench.run_network(only)


if __name__ == "__main__":
    main()
