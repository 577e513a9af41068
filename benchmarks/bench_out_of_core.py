"""Benchmark out-of-core paging: a file 4x the resident budget, against the kernel's mmap.

Usage: .venv/bin/python benchmarks/bench_out_of_core.py [--quick] [--size 1G] [--budget 256M]
           [--limit 512M] [--readers 4] [--pages N] [--cold-pages N] [--repeat 3]
           [--only random,seq,mix,scan,flush] [--dir DIR] [--markdown]

Needs root and the cgroup v1 memory controller (/sys/fs/cgroup/memory).

Every measured workload runs in a fresh child process placed in a memory cgroup of its own
(``memory.limit_in_bytes = --limit``, default twice the budget; removed at the end, also on
failure), the same limit for both sides:

* ``userfault``  ``userfault.map(path, max_resident=--budget, threads=R)`` (``writable=True``
                 for the mix, then ``flush()``, timed);
* ``mmap``       the kernel's ``mmap`` of the same file, ``MAP_SHARED`` (``PROT_WRITE`` for the
                 mix, then ``msync``, timed), default advice: a miss reads ``read_ahead_kb``
                 of the device around it (printed in the header);
* ``mmap MADV_RANDOM``  the same with ``madvise(MADV_RANDOM)``: a miss reads its page (random
                 and mix only; the kernel at its best for random access).

Workloads (one byte read at offset 64 of each page touched, so a page is one fault):

* random  distinct pages of the file in a seeded random order (4 KiB reads): ``--pages``
          warm (default 1.25x the budget's pages, so the budget is exceeded), ``--cold-pages``
          cold (default 4096: each miss is a disk read, and the kernel's default read-around
          takes milliseconds);
* seq     every page, in order;
* mix     random pages as above, 70 % read (byte 64), 30 % written (byte 0).

Readers: one Python reader (a loop over a memoryview, holding the GIL), and ``--readers``
numpy threads that release the GIL (fancy indexing of ``pager.array()``, or of
``numpy.frombuffer`` over the mmap; strided sums for seq), each over its own share, so that
several faults are outstanding. With R readers the pager serves with ``threads=R``.

Each case runs cold (``posix_fadvise(DONTNEED)`` on the file before the run) and warm (the
file read into the page cache, charged outside the cgroup, before the run); both sides take
turns, round-robin, ``--repeat`` times; figures are medians, ratios are mmap time / userfault
time (above 1: userfault faster). The sum of the bytes read is checked against the file and
the written bytes are read back from the file after each mix run, so wrong bytes fail loudly.

During each run a thread samples ``pager.stats().resident_bytes`` and the cgroup's
``memory.usage_in_bytes`` every 2 ms: the most seen over the budget is reported, against one
eviction batch (the evictor's unit, ``max(64, 2 * piece / page)`` pages).

Then, in this process: ``scan``, the dirty-page scan of ``--size`` of memory, all resident,
with 1 % of its pages written at random: ``WriteTracker.collect()`` (PAGEMAP_SCAN with
WP_ASYNC) and a writable pager's ``flush()`` with nothing dirty (its dirty-bitmap walk, plus an
fsync of a clean file); ``flush``, a writable pager over the cached file with 1 % of its
pages written at random: ``flush()`` (pwrite of the dirty runs and fsync), against ``msync`` of
the same writes through a ``MAP_SHARED`` mapping; on the file's file system, then on a copy in
tmpfs (``/dev/shm``, where fsync costs nothing: the write-back alone).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np
from _common import PAGE, MiB, machine, median, progress, table

import userfault
from cgroups import memory_cgroup, memory_cgroups_available
from userfault import _native
from userfault._units import human, parse_size
from userfault.region import Region
from userfault.tracking import WriteTracker

#: the evictor's unit: at least 64 pages, at least two background pieces (engine_type.c)
EVICT_BATCH = max(64 << 10, 2 * _native.UF_DEFAULT_PIECE)  # engine_type.c, a file source
READ_AT = 64  # the byte of each page read (byte 0 is the one the mix writes)
WRITE_SHARE = 0.3
#: the kernel's mmap with its default advice, and with MADV_RANDOM (random and mix only)
SYSTEMS = ("userfault", "mmap", "mmap-random")


# -- the child: one measured run ------------------------------------------------------------


def pick_pages(npages: int, count: int, seed: int) -> np.ndarray[Any, Any]:
    """``count`` distinct page indices in a seeded random order."""
    return np.random.default_rng(seed).permutation(npages)[:count].astype(np.int64)


class Sampler(threading.Thread):
    """Samples the pager's resident bytes and the cgroup's usage every 2 ms."""

    def __init__(self, pager: userfault.Pager | None, cgroup: Path) -> None:
        super().__init__(daemon=True)
        self.pager, self.usage_file = pager, cgroup / "memory.usage_in_bytes"
        self.max_resident = self.max_usage = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with open(self.usage_file, "rb", buffering=0) as usage:
            while not self.stop.wait(0.002):
                if self.pager is not None:
                    self.max_resident = max(self.max_resident, self.pager.stats().resident_bytes)
                usage.seek(0)
                self.max_usage = max(self.max_usage, int(usage.read()))


def in_threads(work: Callable[[int], int], n: int) -> int:
    """``work(i)`` on ``n`` threads; the sum of what they return (errors raised)."""
    results: list[int] = [0] * n
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = work(i)
        except BaseException as err:  # re-raised below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(results)


def run_reader(spec: dict[str, Any], arr: np.ndarray[Any, Any], view: memoryview,
               pages: np.ndarray[Any, Any], writes: np.ndarray[Any, Any]) -> int:
    """The workload over ``arr`` (numpy readers) or ``view`` (one Python reader): the sum of
    the bytes read."""
    workload, readers, value = spec["workload"], spec["readers"], spec["value"]
    size = len(arr)
    if workload == "seq":
        if readers == 0:
            total = 0
            for off in range(READ_AT, size, PAGE):
                total += view[off]
            return total
        share = -(-size // PAGE // readers) * PAGE
        return in_threads(lambda i: int(
            arr[i * share + READ_AT:(i + 1) * share:PAGE].sum(dtype=np.uint64)), readers)
    offsets = pages * PAGE
    if readers == 0:
        total = 0
        for off, w in zip(offsets.tolist(), writes.tolist(), strict=True):
            if w:
                view[off] = value
            else:
                total += view[off + READ_AT]
        return total
    share = -(-len(offsets) // readers)
    batch = 4096

    def part(i: int) -> int:
        total = 0
        mine, kinds = offsets[i * share:(i + 1) * share], writes[i * share:(i + 1) * share]
        for b in range(0, len(mine), batch):
            offs, w = mine[b:b + batch], kinds[b:b + batch]
            if w.any():
                arr[offs[w]] = value
            total += int(arr[offs[~w] + READ_AT].sum(dtype=np.uint64))
        return total

    return in_threads(part, readers)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One run; returns its figures (raises if a byte read is wrong)."""
    col = np.load(spec["col"])
    npages, path, workload = len(col), spec["path"], spec["workload"]
    size = npages * PAGE
    if workload == "seq":
        pages = np.arange(npages, dtype=np.int64)
    else:
        pages = pick_pages(npages, spec["pages"], spec["seed"])
    writes = (np.random.default_rng(spec["seed"] + 1).random(len(pages)) < WRITE_SHARE
              if workload == "mix" else np.zeros(len(pages), dtype=bool))
    want = int(col[pages[~writes]].sum(dtype=np.uint64))
    cgroup = Path(spec["cgroup"])
    with contextlib.ExitStack() as stack:
        pager: userfault.Pager | None = None
        mapping: mmap.mmap | None = None
        if spec["system"] == "userfault":
            pager = stack.enter_context(userfault.map(
                path, max_resident=spec["budget"], writable=workload == "mix",
                threads=max(1, spec["readers"])))
            arr = pager.array()
        else:
            f = stack.enter_context(open(path, "r+b" if workload == "mix" else "rb"))
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if workload == "mix" else 0)
            mapping = stack.enter_context(mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, prot))
            if spec["system"] == "mmap-random":
                mapping.madvise(mmap.MADV_RANDOM)
            arr = np.frombuffer(mapping, dtype=np.uint8)
        view = stack.enter_context(memoryview(arr))
        sampler = Sampler(pager, cgroup)
        sampler.start()
        t0 = time.perf_counter()
        got = run_reader(spec, arr, view, pages, writes)
        if workload == "mix":
            if pager is not None:
                pager.flush()
            elif mapping is not None:
                mapping.flush()
        secs = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        st = pager.stats() if pager is not None else None
        del view, arr
    if got != want:
        raise SystemExit(f"{spec['system']} {workload}: the bytes read sum to {got}, the "
                         f"file's to {want}")
    out: dict[str, Any] = {"secs": secs, "max_usage": sampler.max_usage,
                           "max_resident": sampler.max_resident,
                           "written": pages[writes].tolist() if workload == "mix" else []}
    if st is not None:
        out.update(faults=st.faults, eagain=st.eagain, evictions=st.evictions, refaults=st.refaults,
                   reactivations=st.reactivations, writebacks=st.writebacks)
    return out


# -- the parent -----------------------------------------------------------------------------


def device_of(directory: str | None) -> str:
    """The block device under ``directory`` and its read_ahead_kb (what mmap reads around)."""
    dev = os.stat(directory or tempfile.gettempdir()).st_dev
    sysfs = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    try:
        name = sysfs.resolve().name
        queue = sysfs / "queue" if (sysfs / "queue").exists() else sysfs / ".." / "queue"
        ra = (queue / "read_ahead_kb").read_text().strip()
        rot = "rotational" if (queue / "rotational").read_text().strip() == "1" else "SSD/virtual"
        return f"{name} ({rot}), read_ahead_kb {ra}"
    except OSError:
        return f"device {os.major(dev)}:{os.minor(dev)}"


def make_file(path: Path, size: int) -> np.ndarray[Any, Any]:
    """Random bytes; returns byte READ_AT of every page (what the readers sum)."""
    cols = []
    with open(path, "wb") as f:
        for off in range(0, size, 64 * MiB):
            block = os.urandom(min(64 * MiB, size - off))
            cols.append(np.frombuffer(block, dtype=np.uint8)[READ_AT::PAGE].copy())
            f.write(block)
        os.fsync(f.fileno())
    return np.concatenate(cols)


def set_cache(path: Path, cached: bool) -> None:
    """Drop the file from the page cache, then (``cached``) read it all in again, so that it
    is charged to this process's cgroup, not to a child's."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if cached:
            while os.read(fd, 16 * MiB):
                pass
    finally:
        os.close(fd)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size, self.budget, self.limit = args.size, args.budget, args.limit
        self.npages = self.size // PAGE
        self.work = Path(tempfile.mkdtemp(prefix="uf-bench-ooc-", dir=args.dir))
        self.path = self.work / "data.bin"
        self.col_path = self.work / "col.npy"
        self.results: dict[str, Any] = {}
        self.resident_rows: list[list[Any]] = []
        self.seed = 0

    def close(self) -> None:
        for p in (self.path, self.col_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self.work.rmdir()

    def spawn(self, spec: dict[str, Any]) -> dict[str, Any]:
        """One run in a child, in a fresh memory cgroup (nothing charged to it yet)."""
        with memory_cgroup(self.limit, "userfault-bench-ooc") as group:
            spec = {**spec, "path": str(self.path), "col": str(self.col_path),
                    "budget": self.budget, "cgroup": str(group)}
            cmd = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh",
                   sys.executable, __file__, "--child", json.dumps(spec)]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        if r.returncode != 0:
            why = "killed by the OOM killer" if r.returncode == -9 else f"exit {r.returncode}"
            raise SystemExit(f"{spec['system']} {spec['workload']} ({why}):\n{r.stderr[-3000:]}")
        out: dict[str, Any] = json.loads(r.stdout)
        return out

    def check_written(self, pages: list[int], value: int, path: Path | None = None) -> None:
        with open(path or self.path, "rb") as f:
            for p in pages[:: max(1, len(pages) // 2000)]:
                f.seek(p * PAGE)
                if f.read(1)[0] != value:
                    raise SystemExit(f"page {p} of the file does not hold the byte written")

    def case(self, workload: str, readers: int, cached: bool) -> None:
        systems = SYSTEMS if workload != "seq" else SYSTEMS[:2]
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
        pages = self.args.pages if cached else self.args.cold_pages
        label = f"{workload}, {'1 Python reader' if not readers else f'{readers} numpy readers'}"
        label += ", warm" if cached else ", cold"
        for rep in range(self.args.repeat):
            self.seed += 2
            value = 1 + self.seed % 255
            for system in systems if rep % 2 == 0 else systems[::-1]:
                progress(f"  {label}: rep {rep + 1}/{self.args.repeat} {system}")
                set_cache(self.path, cached)
                out = self.spawn({"system": system, "workload": workload,
                                         "readers": readers, "pages": pages,
                                         "seed": self.seed, "value": value})
                if workload == "mix":
                    self.check_written(out.pop("written"), value)
                runs[system].append(out)
        self.results[label] = (pages if workload != "seq" else self.npages, runs)

    def run_workloads(self) -> None:
        only = self.args.only
        workloads = [w for w in ("random", "seq", "mix") if w in only]
        if not workloads:
            return
        progress(f"file {human(self.size)}, budget {human(self.budget)}, cgroup limit "
                 f"{human(self.limit)}")
        for workload in workloads:
            for cached in (False, True):
                for readers in (0, self.args.readers):
                    self.case(workload, readers, cached)
        self.report_workloads()

    def report_workloads(self) -> None:
        rows: list[list[Any]] = []
        for label, (count, runs) in self.results.items():
            uf = runs["userfault"]
            t = {s: median([r["secs"] for r in rs]) for s, rs in runs.items()}
            t_rand = t.get("mmap-random", float("nan"))
            rows.append([label, count, t["mmap"] * 1e3, t_rand * 1e3, t["userfault"] * 1e3,
                         t["mmap"] / t["userfault"], t_rand / t["userfault"],
                         median([r["faults"] for r in uf]),
                         median([r["eagain"] for r in uf]),
                         median([r["evictions"] for r in uf]),
                         median([r["refaults"] for r in uf]),
                         median([r["writebacks"] for r in uf]),
                         max(r["max_usage"] for r in runs["mmap"]) / MiB,
                         max(r["max_usage"] for r in uf) / MiB])
            over = max(r["max_resident"] for r in uf) - self.budget
            self.resident_rows.append([label, max(r["max_resident"] for r in uf) / MiB,
                                       over / 1024, "met" if over <= EVICT_BATCH else "missed"])
        self.add_table(
            f"Out of core: {human(self.size)} file, max_resident={human(self.budget)}, cgroup "
            f"limit {human(self.limit)}; ms, median of {self.args.repeat}; x = mmap ms / "
            "userfault ms (above 1: userfault faster)",
            ["workload", "pages", "mmap ms", "mmap MADV_RANDOM ms", "userfault ms", "x mmap",
             "x mmap MADV_RANDOM", "faults", "EAGAIN", "evictions", "re-faults", "write-backs",
             "mmap cgroup max MiB", "userfault cgroup max MiB"], rows)
        self.add_table(
            f"Resident memory, sampled every 2 ms (budget {human(self.budget)}, one eviction "
            f"batch = {human(EVICT_BATCH)})",
            ["workload", "max resident MiB", "over budget KiB", "≤ one batch over"],
            self.resident_rows)

    # -- scan and flush, in this process ---------------------------------------------------

    def dirty_pages(self, rep: int) -> np.ndarray[Any, Any]:
        return np.sort(pick_pages(self.npages, self.npages // 100, 1000 + rep))

    def run_scan(self) -> None:
        size, repeat = self.size, self.args.repeat
        progress(f"scan: {human(size)}, 1 % written")
        tracker_ms, walk_ms = [], []
        with Region.anonymous(size) as region, WriteTracker(region) as tracker, \
                memoryview(region) as view:
            arr = np.frombuffer(view, dtype=np.uint8)
            arr[::PAGE] = 1  # all resident
            tracker.collect()
            for rep in range(repeat):
                dirty = self.dirty_pages(rep)
                arr[dirty * PAGE] = 2
                t0 = time.perf_counter()
                found = tracker.collect()
                tracker_ms.append((time.perf_counter() - t0) * 1e3)
                if sum(r.length for r in found) != len(dirty) * PAGE:
                    raise SystemExit(f"WriteTracker found {len(found)} ranges, not the "
                                     f"{len(dirty)} pages written")
            del arr
        set_cache(self.path, True)
        with userfault.map(self.path, writable=True) as pager:
            _native.touch(pager.address, pager.size, PAGE, 0, 0, False)  # all resident
            for _ in range(repeat):
                t0 = time.perf_counter()
                pager.flush()
                walk_ms.append((time.perf_counter() - t0) * 1e3)
        rows = [["WriteTracker.collect(), 1 % written", median(tracker_ms),
                 "met" if median(tracker_ms) <= 1 else "missed"],
                ["writable pager flush(), nothing written (bitmap walk + fsync)",
                 median(walk_ms), "met" if median(walk_ms) <= 1 else "missed"]]
        self.add_table(f"Dirty scan of {human(size)}, all resident; ms, median of {repeat}",
                       ["scan", "ms", "≤ 1 ms"], rows)

    def run_flush(self) -> None:
        """flush() of 1 % of the file, on its file system and on tmpfs (where fsync is free:
        the write-back alone)."""
        size, repeat = self.size, self.args.repeat
        rows: list[list[Any]] = []
        shm = Path(tempfile.mkdtemp(prefix="uf-bench-ooc-", dir="/dev/shm"))
        try:
            with open(self.path, "rb") as src, open(shm / "data.bin", "wb") as dst:
                while block := src.read(64 * MiB):
                    dst.write(block)
            for path, where in ((self.path, str(self.path.parent)), (shm / "data.bin", "tmpfs")):
                progress(f"flush: {human(size)} cached file in {where}, 1 % written")
                uf, km = self.flush_runs(path, repeat)
                rows += [[f"userfault flush(), {where}", uf, uf / km,
                          "met" if uf >= 1 else "missed"],
                         [f"kernel mmap msync(MS_SYNC), {where}", km, 1.0, ""]]
        finally:
            with contextlib.suppress(FileNotFoundError):
                (shm / "data.bin").unlink()
            shm.rmdir()
        self.add_table(f"flush() of 1 % of {human(size)} ({self.npages // 100} random pages) "
                       f"to a cached file; GB/s, median of {repeat}",
                       ["write-back", "GB/s", "x msync", "≥ 1 GB/s"], rows)

    def flush_runs(self, path: Path, repeat: int) -> tuple[float, float]:
        """Median GB/s of flush() and of msync, the same pages written."""
        set_cache(path, True)
        runs: dict[str, list[float]] = {"userfault": [], "mmap": []}
        for rep in range(repeat):
            dirty = self.dirty_pages(rep)
            value = 100 + rep
            for system in runs:
                if system == "userfault":
                    with userfault.map(path, writable=True) as pager, \
                            memoryview(pager) as view:
                        arr = np.frombuffer(view, dtype=np.uint8)
                        arr[dirty * PAGE] = value
                        t0 = time.perf_counter()
                        wrote = pager.flush()
                        secs = time.perf_counter() - t0
                        del arr
                    if wrote != len(dirty) * PAGE:
                        raise SystemExit(f"flush wrote {wrote} bytes, not {len(dirty) * PAGE}")
                else:
                    with open(path, "r+b") as f, mmap.mmap(f.fileno(), self.size) as m:
                        arr = np.frombuffer(m, dtype=np.uint8)
                        arr[dirty * PAGE] = value + 50
                        t0 = time.perf_counter()
                        m.flush()
                        secs = time.perf_counter() - t0
                        del arr
                runs[system].append(len(dirty) * PAGE / secs / 1e9)
            self.check_written(dirty.tolist(), value + 50, path)
        return median(runs["userfault"]), median(runs["mmap"])

    def add_table(self, title: str, headers: list[str], rows: list[list[Any]]) -> None:
        print(f"\n## {title}\n")
        print(table(headers, rows, markdown=self.args.markdown), flush=True)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256M file, 64M budget, 1 repeat")
    ap.add_argument("--size", default="", help="file size (default 1G, quick 256M)")
    ap.add_argument("--budget", default="", help="max_resident (default size / 4)")
    ap.add_argument("--limit", default="", help="cgroup memory limit (default 2 x budget)")
    ap.add_argument("--readers", type=int, default=4, help="numpy reader threads")
    ap.add_argument("--pages", type=int, default=0,
                    help="random pages per warm run (default: 1.25 x the budget's)")
    ap.add_argument("--cold-pages", type=int, default=4096,
                    help="random pages per cold run (each may be a disk read, or a "
                         "read-around of read_ahead_kb)")
    ap.add_argument("--repeat", type=int, default=0, help="runs per case (default 3, quick 1)")
    ap.add_argument("--only", default="random,seq,mix,scan,flush")
    ap.add_argument("--dir", default=None, help="where the file goes (default: $TMPDIR)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    args.size = parse_size(args.size or ("256M" if args.quick else "1G"))
    args.budget = parse_size(args.budget) if args.budget else args.size // 4
    args.limit = parse_size(args.limit) if args.limit else 2 * args.budget
    args.pages = args.pages or args.budget // PAGE * 5 // 4
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.only = set(args.only.split(","))
    if not memory_cgroups_available():
        raise SystemExit("needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory")
    m = machine()
    print(f"{m['date']}: kernel {m['kernel']}, {m['nproc']} CPUs ({m['cpu']}), {m['memory']}, "
          f"python {m['python']}, numpy {np.__version__}, load {m['load']}", flush=True)
    print(f"file system of {args.dir or tempfile.gettempdir()}: {device_of(args.dir)}", flush=True)
    bench = Bench(args)
    try:
        progress(f"writing {human(args.size)} of random bytes to {bench.path}")
        np.save(bench.col_path, make_file(bench.path, args.size))
        bench.run_workloads()
        if "scan" in args.only:
            bench.run_scan()
        if "flush" in args.only:
            bench.run_flush()
    finally:
        bench.close()
    print(f"\nload after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
