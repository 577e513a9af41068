"""Benchmark the native pager (``userfault.Pager``) against a hand-written C reference.

Usage: .venv/bin/python benchmarks/bench_pager.py [--quick] [--repeat N] [--only NAMES]
           [--json FILE] [--markdown]

NAMES (comma-separated): latency, file, install, memory, tune.

* latency  4 KiB per-fault latency, sequential and random page order: the engine with
           chunk=4096, readahead=False (one page per fault) vs ``ref_handler uffd --chunk 4096``
           over a 64 MiB region (16384 faults), unpinned and with the handler pinned to the
           faulting CPU ("same") or to the other CPU ("cross").
* file     first touch of a 1 GiB region served from a file in page cache: the engine with its
           defaults (readahead on) vs the C reference (one page per fault, and 256 KiB chunks)
           vs the kernel's mmap(MAP_PRIVATE) with write touches vs read() into a fresh buffer.
           Sequential over all pages; random over 65536 pages (a fixed shuffle).
* install  throughput of each installation path (copy, move, continue on memfd, hugetlb copy)
           by chunk size, touching a 256 MiB region with readahead off, and prefetch(None).
* memory   RSS growth from starting a Pager over a 1 GiB region (before any touch), and
           ``engine.memory_bytes``; measured in a fresh child process.
* tune     engine variants on the sequential and random file workloads (readahead window,
           chunk, threads, populate, CPU placement).

The faulting workload is ``ref_touch`` from the reference compiled as a shared library, called
with ctypes, so the engine and the reference run the very same C touch loop and page order:
one write at byte 0 of each page (a write fault) and one read of byte 64 (a checksum that must
agree between engine and reference). Every figure is a median over ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BUILD,
    PAGE,
    GiB,
    KiB,
    MiB,
    build_reference,
    load_reference_lib,
    machine,
    median,
    page_order,
    progress,
    rss_bytes,
    run_json,
    table,
    touch_pages,
)

import userfault
from userfault.sources.native import BufferSource, FileSource, PatternSource

SEED = 12345


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.exe, libpath = build_reference()
        self.lib = load_reference_lib(libpath)
        self.repeat = args.repeat
        q = args.quick
        self.lat_size = 8 * MiB if q else 64 * MiB
        self.file_size = 64 * MiB if q else 1 * GiB
        self.rand_pages = 4096 if q else 65536
        self.inst_size = 32 * MiB if q else 256 * MiB
        self.mem_size = 64 * MiB if q else 1 * GiB
        self.results: dict[str, Any] = {"machine": machine(), "repeat": self.repeat,
                                        "quick": q}
        self.tables: list[tuple[str, str, list[str], list[list[Any]]]] = []

    # -- page orders and the touch loop ---------------------------------------------------

    def order(self, size: int, random: bool, pages: int | None = None) -> tuple[Any, int]:
        return page_order(self.lib, size, SEED if random else 0, pages)

    def touch(self, address: int, idx: Any, n: int, latency: bool) -> dict[str, float]:
        return touch_pages(self.lib, address, idx, n, latency)

    def engine_run(self, make_source: Any, size: int, idx: Any, n: int, *, latency: bool = False,
                   placement: str = "any", **options: Any) -> dict[str, float]:
        with pinned(placement):
            src = make_source()
            pager = userfault.Pager(src, size=size, **options)
            try:
                with pinned_main(placement):
                    out = self.touch(pager.address, idx, n, latency)
                st = pager.stats()
            finally:
                pager.close()
        out["faults"] = st.faults
        out["per_fault_us"] = out["seconds"] * 1e6 / max(st.faults, 1)
        out["service_p50_us"] = st.latency_percentile(50) / 1e3
        out["readahead_mib"] = st.readahead_bytes / MiB
        return out

    def ref_run(self, mode: str, size: int, *, order: str = "seq", pages: int = 0,
                chunk: int = PAGE, source: str = "const", latency: bool = False,
                placement: str = "any") -> dict[str, float]:
        cmd = [str(self.exe), mode, "--size", str(size), "--order", order, "--seed", str(SEED),
               "--chunk", str(chunk), "--source", source, "--file", str(self.file_path())]
        if pages:
            cmd += ["--pages", str(pages)]
        if latency:
            cmd.append("--latency")
        if placement == "same":
            cmd += ["--pin-faulter", "0", "--pin-handler", "0"]
        elif placement == "cross":
            cmd += ["--pin-faulter", "0", "--pin-handler", "1"]
        return run_json(cmd)

    def medians(self, fn: Any) -> dict[str, float]:
        runs = [fn() for _ in range(self.repeat)]
        keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and k != "checksum"]
        out = {k: median([r[k] for r in runs]) for k in keys}
        out["checksum"] = runs[0].get("checksum", 0)
        return out

    def interleave(self, cases: list[tuple[str, Any]]) -> dict[str, dict[str, Any]]:
        """Run each case once per repetition, round-robin, so slow drifts of the machine (other
        processes, the host backing guest memory) hit every case alike; medians per case."""
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in cases}
        for rep in range(self.repeat):
            for name, fn in cases:
                progress(f"  rep {rep + 1}/{self.repeat}: {name}")
                runs[name].append(fn())
        out = {}
        for name, rs in runs.items():
            ok = [r for r in rs if "error" not in r]
            if not ok:
                out[name] = {"error": rs[0]["error"]}
                continue
            keys = [k for k, v in ok[0].items() if isinstance(v, (int, float)) and k != "checksum"]
            med: dict[str, Any] = {k: median([r[k] for r in ok]) for k in keys}
            med["checksum"] = ok[0].get("checksum", 0)
            med["runs_seconds"] = [round(r["seconds"], 6) for r in ok]
            med["best_seconds"] = min(r["seconds"] for r in ok)
            out[name] = med
        return out

    def add_table(self, name: str, title: str, headers: list[str], rows: list[list[Any]]) -> None:
        self.tables.append((name, title, headers, rows))
        print(f"\n## {title}\n")
        print(table(headers, rows, markdown=self.args.markdown), flush=True)

    # -- the data file ------------------------------------------------------------------------

    def file_path(self) -> Path:
        return BUILD / f"pager-file-{self.file_size // MiB}M.bin"

    def ensure_file(self) -> Path:
        path = self.file_path()
        if not path.exists() or path.stat().st_size != self.file_size:
            progress(f"creating {path} ({self.file_size // MiB} MiB)")
            block = os.urandom(16 * MiB)
            with open(path, "wb") as f:
                for _ in range(self.file_size // len(block)):
                    f.write(block)
        with open(path, "rb", buffering=0) as f:  # into the page cache
            buf = bytearray(8 * MiB)
            while f.readinto(buf):
                pass
        return path

    # -- 1. per-fault latency ---------------------------------------------------------------

    def bench_latency(self) -> None:
        size = self.lat_size
        rows, res = [], {}
        for order in ("seq", "random"):
            idx, n = self.order(size, order == "random")
            for placement in ("any", "same", "cross"):
                progress(f"latency {order} {placement}")
                got = self.interleave([
                    ("engine", lambda: self.engine_run(
                        lambda: PatternSource(b"R", size), size, idx, n, latency=True,
                        placement=placement, chunk=PAGE, readahead=False, install="copy")),
                    ("ref", lambda: self.ref_run(
                        "uffd", size, order=order, latency=True, placement=placement))])
                eng, ref = got["engine"], got["ref"]
                check(eng, ref, f"latency {order} {placement}")
                ratio = eng["per_fault_us"] / ref["per_fault_us"]
                res[f"{order}/{placement}"] = {"engine": eng, "ref": ref, "ratio": ratio}
                best = eng["best_seconds"] / ref["best_seconds"]
                res[f"{order}/{placement}"]["best_ratio"] = best
                rows.append([order, placement, eng["per_fault_us"], ref["per_fault_us"], ratio,
                             best, eng["p50_us"], ref["p50_us"], eng["p99_us"], ref["p99_us"],
                             eng["service_p50_us"]])
        self.results["latency"] = res
        self.add_table("latency", f"4 KiB per-fault latency ({size // MiB} MiB, {size // PAGE} "
                       "faults, one page per fault; µs)",
                       ["order", "cpus", "engine mean", "ref mean", "ratio", "ratio of best runs",
                        "engine p50",
                        "ref p50", "engine p99", "ref p99", "engine service p50"], rows)

    # -- 2. file first touch -------------------------------------------------------------------

    def bench_file(self) -> None:
        path, size = self.ensure_file(), self.file_size
        rows, res = [], {}
        for order in ("seq", "random"):
            random = order == "random"
            idx, n = self.order(size, random, self.rand_pages if random else None)
            pages = n if random else 0
            cases: list[tuple[str, Any]] = [
                ("engine (defaults)", lambda: self.engine_run(
                    lambda: FileSource(path), size, idx, n)),
                ("C ref uffd 4K/fault", lambda: self.ref_run(
                    "uffd", size, order=order, pages=pages, source="file")),
                ("C ref uffd 256K/fault", lambda: self.ref_run(
                    "uffd", size, order=order, pages=pages, source="file", chunk=256 * KiB)),
                ("kernel MAP_PRIVATE write", lambda: self.ref_run(
                    "kernel", size, order=order, pages=pages)),
                ("read() into buffer", lambda: self.ref_run(
                    "read", size, order=order, pages=pages)),
                ("anonymous demand-zero (floor)", lambda: self.ref_run(
                    "anon", size, order=order, pages=pages)),
            ]
            progress(f"file {order}")
            got = self.interleave(cases)
            eng = got["engine (defaults)"]
            for name in ("C ref uffd 4K/fault", "C ref uffd 256K/fault",
                         "kernel MAP_PRIVATE write"):
                check(eng, got[name], f"file {order} {name}")
            for name, r in got.items():
                best_gbps = r["gbps"] * r["seconds"] / r["best_seconds"]
                rows.append([order, name, r["gbps"], best_gbps, r["seconds"] * 1e3,
                             r["per_touch_us"], eng["gbps"] / r["gbps"],
                             r["best_seconds"] / eng["best_seconds"]])
            res[order] = got
        self.results["file"] = res
        self.add_table("file", f"First touch of a {size // MiB} MiB file in page cache "
                       f"(sequential: all pages; random: {self.rand_pages} pages)",
                       ["order", "method", "GB/s", "GB/s best run", "ms", "µs/page",
                        "engine speedup", "speedup of best runs"], rows)

    # -- 3. installation paths ------------------------------------------------------------------

    def bench_install(self) -> None:
        size = self.inst_size
        data = bytes(range(256)) * (size // 256)  # resident, no page-cache effects
        chunks = [4 * KiB, 64 * KiB, 256 * KiB, 2 * MiB]
        idx, n = self.order(size, False)
        paths: list[tuple[str, dict[str, Any]]] = [
            ("copy (anonymous)", {"install": "copy"}),
            ("move (anonymous)", {"install": "move"}),
            ("continue (memfd)", {"region": "memfd", "install": "continue"}),
            ("copy (memfd)", {"region": "memfd", "install": "copy"}),
        ]
        res: dict[str, dict[str, Any]] = {}
        with hugepages(size // (2 * MiB) + 8) as huge_ok:
            if huge_ok:
                paths.append(("copy (hugetlb 2 MiB)", {"region": "hugetlb", "install": "copy"}))
            for name, _ in paths:
                res[name] = {}
            for chunk in [*chunks, "prefetch"]:
                cases = []
                for name, opts in paths:
                    if opts.get("region") == "hugetlb" and chunk != "prefetch" and chunk < 2 * MiB:
                        continue
                    if chunk == "prefetch":
                        fn = lambda o=opts: self.prefetch_run(data, size, o)  # noqa: E731
                    else:
                        fn = lambda o=opts, c=chunk: self.engine_run(  # noqa: E731
                            lambda: BufferSource(data), size, idx, n, chunk=c, readahead=False, **o)
                    cases.append((name, guarded(fn)))
                progress(f"install, chunk {chunk}")
                for name, r in self.interleave(cases).items():
                    res[name][str(chunk)] = r
        rows = [[name, *(res[name][str(c)].get("gbps", "error") if str(c) in res[name] else None
                         for c in [*chunks, "prefetch"])] for name, _ in paths]
        self.results["install"] = res
        self.add_table("install", f"Installation paths, GB/s ({size // MiB} MiB from a resident "
                       "buffer; sequential touches with readahead off, one fault per chunk; "
                       "prefetch(None) installs 256 KiB pieces)",
                       ["path", "4K", "64K", "256K", "2M", "prefetch(None)"], rows)

    def prefetch_run(self, data: bytes, size: int, opts: dict[str, Any]) -> dict[str, float]:
        pager = userfault.Pager(BufferSource(data), size=size, readahead=False, **opts)
        try:
            t0 = time.perf_counter_ns()
            done = pager.prefetch(None)
            secs = (time.perf_counter_ns() - t0) / 1e9
            idx, n = self.order(size, False)
            checksum = self.lib.ref_touch(pager.address, idx, n, 1, None)
            faults = pager.stats().faults
        finally:
            pager.close()
        if done != size or faults:
            raise RuntimeError(f"prefetch installed {done} of {size} bytes, {faults} faults after")
        return {"seconds": secs, "gbps": size / secs / 1e9, "checksum": checksum}

    # -- 4. memory -----------------------------------------------------------------------------

    def bench_memory(self) -> None:
        rows, res = [], {}
        cases = [("FileSource, 1 thread", "file", 1), ("PatternSource, 1 thread", "pattern", 1),
                 ("FileSource, 4 threads", "file", 4), ("FileSource, move", "file-move", 1)]
        path = self.ensure_file() if self.mem_size == self.file_size else None
        for name, kind, threads in cases:
            progress(f"memory {name}")
            runs = []
            for _ in range(self.repeat):
                cmd = [sys.executable, __file__, "--_memory-child", kind, str(self.mem_size),
                       str(threads), str(path or self.ensure_file())]
                runs.append(json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                                      text=True).stdout))
            r = {k: median([x[k] for x in runs]) for k in runs[0]}
            per_gib = GiB / self.mem_size
            res[name] = r
            rows.append([name, r["rss_delta"] / KiB, r["rss_delta"] / KiB * per_gib,
                         r["engine_bytes"] / KiB * per_gib, r["region_rss"] / KiB])
        self.results["memory"] = res
        self.add_table("memory", f"Engine memory per GiB mapped (Pager over {self.mem_size // MiB} "
                       "MiB, started, nothing touched; KiB)",
                       ["case", "RSS delta", "RSS delta / GiB", "engine.memory_bytes / GiB",
                        "region RSS"], rows)

    # -- 5. tuning experiments --------------------------------------------------------------------

    def bench_tune(self) -> None:
        path, size = self.ensure_file(), self.file_size
        variants: list[tuple[str, dict[str, Any], str]] = [
            ("defaults: chunk 4K, ra 64K..4M", {}, "any"),
            ("same CPU (pinned)", {}, "same"),
            ("cross CPU (pinned)", {}, "cross"),
            ("ra 64K..16M", {"readahead": (64 * KiB, 16 * MiB)}, "any"),
            ("ra 1M..4M", {"readahead": (1 * MiB, 4 * MiB)}, "any"),
            ("ra 256K..1M", {"readahead": (256 * KiB, 1 * MiB)}, "any"),
            ("chunk 64K, ra default", {"chunk": 64 * KiB}, "any"),
            ("chunk 2M (2M pieces), ra default", {"chunk": 2 * MiB}, "any"),
            ("chunk 2M, ra off", {"chunk": 2 * MiB, "readahead": False}, "any"),
            ("chunk 4K, ra off", {"readahead": False}, "any"),
            ("threads 2", {"threads": 2}, "any"),
            ("populate", {"populate": True}, "any"),
            ("install move", {"install": "move"}, "any"),
        ]
        rows, res = [], {}
        for order in ("seq", "random"):
            random = order == "random"
            idx, n = self.order(size, random, self.rand_pages if random else None)
            base = None
            cases = [(name, lambda o=opts, pl=placement: self.engine_run(
                         lambda: FileSource(path), size, idx, n, placement=pl, **o))
                     for name, opts, placement in variants
                     if not (random and name.startswith(("ra ", "chunk 2M, ra off")))]
            progress(f"tune {order}")
            got = self.interleave(cases)
            for name, r in got.items():
                base = base or r
                res[f"{order}/{name}"] = r
                rows.append([order, name, r["gbps"], r["seconds"] * 1e3, r["faults"],
                             r["readahead_mib"], r["gbps"] / base["gbps"]])
        self.results["tune"] = res
        self.add_table("tune", f"Engine variants, first touch of the {size // MiB} MiB file "
                       f"(random: {self.rand_pages} pages)",
                       ["order", "variant", "GB/s", "ms", "faults", "readahead MiB",
                        "vs defaults"], rows)


def guarded(fn: Any) -> Any:
    """fn, but an exception becomes a result without numbers (reported, the run goes on)."""
    def run() -> dict[str, Any]:
        try:
            return fn()
        except Exception as err:
            progress(f"  failed: {type(err).__name__}: {err}")
            return {"error": f"{type(err).__name__}: {err}"}
    return run


def check(eng: dict[str, Any], ref: dict[str, Any], what: str) -> None:
    """The engine must have served the same bytes as the reference."""
    if eng.get("checksum") != ref.get("checksum"):
        progress(f"WARNING {what}: checksum engine {eng.get('checksum')} != "
                 f"reference {ref.get('checksum')}")


@contextlib.contextmanager
def pinned(placement: str) -> Iterator[None]:
    """Pin this thread (and so the engine threads it starts) for "same"/"cross" placement."""
    if placement == "any":
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0} if placement == "same" else {1})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


@contextlib.contextmanager
def pinned_main(placement: str) -> Iterator[None]:
    """Once the engine threads run: the faulting thread goes to CPU 0."""
    if placement == "cross":
        os.sched_setaffinity(0, {0})
    yield


@contextlib.contextmanager
def hugepages(count: int) -> Iterator[bool]:
    """Reserve ``count`` more 2 MiB pages for the block; restore the old pool size after."""
    knob = Path("/proc/sys/vm/nr_hugepages")
    try:
        old = int(knob.read_text())
        knob.write_text(str(old + count))
    except OSError as err:
        progress(f"hugetlb skipped: cannot reserve 2 MiB pages ({err})")
        yield False
        return
    try:
        ok = int(knob.read_text()) >= old + count
        if not ok:
            progress("hugetlb skipped: the kernel could not reserve enough 2 MiB pages")
        yield ok
    finally:
        knob.write_text(str(old))


def memory_child(kind: str, size: int, threads: int, path: str) -> None:
    """In a fresh process: RSS before and after starting a Pager (nothing touched)."""
    import gc

    src: Any = FileSource(path) if kind.startswith("file") else PatternSource(b"R", size)
    opts: dict[str, Any] = {"threads": threads}
    if kind == "file-move":
        opts["install"] = "move"
    # warm up the import and allocation paths with a tiny pager first
    userfault.Pager(PatternSource(b"x", 1 * MiB), **opts).close()
    gc.collect()
    time.sleep(0.05)
    before = rss_bytes()
    pager = userfault.Pager(src, size=size, **opts)
    time.sleep(0.1)  # let the threads start and settle in poll()
    after = rss_bytes()
    region_rss = 0
    smaps = Path("/proc/self/smaps").read_text().split("\n")
    start = f"{pager.address:x}-"
    for i, line in enumerate(smaps):
        if line.startswith(start):
            for sub in smaps[i + 1:i + 25]:
                if sub.startswith("Rss:"):
                    region_rss = int(sub.split()[1]) * 1024
                    break
            break
    engine_bytes = pager._runtime.engine.memory_bytes
    pager.close()
    print(json.dumps({"rss_delta": after - before - region_rss, "engine_bytes": engine_bytes,
                      "region_rss": region_rss}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_memory-child":
        memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repetition (smoke test)")
    p.add_argument("--repeat", type=int, default=None, help="repetitions (default 5, quick 1)")
    p.add_argument("--only", default="latency,file,install,memory,tune",
                   help="comma-separated: latency,file,install,memory,tune")
    p.add_argument("--json", type=Path, help="write all results to this file")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="first wait up to SECONDS for the 1-minute load average to drop below 0.5")
    args = p.parse_args()
    args.repeat = args.repeat or (1 if args.quick else 5)
    deadline = time.monotonic() + args.wait_quiet
    while os.getloadavg()[0] >= 0.5 and time.monotonic() < deadline:
        progress(f"waiting for a quiet machine (load {os.getloadavg()[0]:.2f})")
        time.sleep(10)
    bench = Bench(args)
    m = bench.results["machine"]
    print(f"# bench_pager: {m['kernel']}, {m['nproc']} CPUs, {m['cpu']}, {m['memory']}, "
          f"{m['date']}, load {m['load']}, medians of {args.repeat}")
    wanted = [x.strip() for x in args.only.split(",") if x.strip()]
    for name in wanted:
        fn = getattr(bench, f"bench_{name}", None)
        if fn is None:
            p.error(f"unknown benchmark {name!r}")
        fn()
    bench.results["tables"] = [{"name": n, "title": t, "headers": h, "rows": r}
                               for n, t, h, r in bench.tables]
    if args.json:
        args.json.write_text(json.dumps(bench.results, indent=1, default=str))


if __name__ == "__main__":
    main()
