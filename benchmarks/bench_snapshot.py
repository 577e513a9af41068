"""Benchmark the compressed snapshot format: create throughput, ratio and 4 KiB read latency,
and incremental snapshots (deltas) against full ones.

Usage: python benchmarks/bench_snapshot.py [--size 1G] [--chunk-size 1M] [--runs 5] [--dir /tmp]
       [--written 0.01] [--delta-only]

The source is mixed data laid out in 4 MiB groups: 2 MiB of zeros (written, not holes),
1 MiB of random bytes and 1 MiB of repeated text, i.e. half zeros, a quarter incompressible
and a quarter very compressible. Every figure is the median of ``--runs`` runs.

Deltas: ``--written`` of the pages (1 %) of a copy of the source are overwritten with random
bytes, scattered (single 4 KiB pages anywhere) or clustered (runs of 64 pages), and the copy is
snapshotted twice: in full (the reference) and as a delta of the source's snapshot given the
pages written (the list write tracking would give; the tracking itself is not timed here).
Both at the format's default 64 KiB chunks and at 1 MiB.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

from userfault._units import parse_size
from userfault.sources.snapshot import SnapshotSource, create_snapshot
from userfault.sources.snapshot.format import DEFAULT_CHUNK_SIZE

MiB = 1 << 20


def make_source(path: str, size: int) -> None:
    rng = random.Random(42)
    text = b"".join(b"%06d the quick brown fox jumps over the lazy dog\n" % i
                    for i in range(30000))[:MiB]
    zeros = bytes(2 * MiB)
    with open(path, "wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(zeros)
            f.write(rng.randbytes(MiB))
            f.write(text)
        f.flush()
        os.fsync(f.fileno())


def p50_read_ns(source: SnapshotSource, offsets: list[int]) -> float:
    buf = memoryview(bytearray(4096))
    times = []
    for off in offsets:
        t0 = time.perf_counter_ns()
        source.read_into(off, buf)
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times)


def written_pages(size: int, fraction: float, clustered: bool) -> list[tuple[int, int]]:
    """``fraction`` of the 4 KiB pages of ``size`` bytes, as (offset, length) ranges."""
    rng = random.Random(3)
    pages = size // 4096
    want = max(1, int(pages * fraction))
    if not clustered:
        return [(p * 4096, 4096) for p in sorted(rng.sample(range(pages), want))]
    run = 64
    starts = sorted(rng.sample(range(pages // run), max(1, want // run)))
    return [(s * run * 4096, run * 4096) for s in starts]


def bench_deltas(src: str, d: str, size: int, fraction: float, runs: int) -> None:
    image = os.path.join(d, "image.bin")
    print(f"\ndeltas: {fraction:.0%} of the pages of the {size / MiB:.0f} MiB source written, "
          f"zstd level 3, median of {runs} runs (create s, file MiB)")
    print("| chunks | pattern | written MiB | full: create s | full: MiB | delta: create s | "
          "delta: MiB | delta chunks stored | delta/full time | delta/full size | "
          "4 KiB cold read p50, full / chain us |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rng = random.Random(9)
    for cs in (DEFAULT_CHUNK_SIZE, MiB):
        base = os.path.join(d, f"base-{cs}.ufs")
        create_snapshot(src, base, chunk_size=cs)
        for clustered in (False, True):
            ranges = written_pages(size, fraction, clustered)
            with open(src, "rb") as fin, open(image, "wb") as fout:
                while block := fin.read(64 * MiB):
                    fout.write(block)
            fd = os.open(image, os.O_WRONLY)
            for off, n in ranges:
                os.pwrite(fd, rng.randbytes(n), off)
            os.fsync(fd)
            os.close(fd)
            full_s, delta_s, full, delta = [], [], None, None
            # Not interleaved: a delta's fsync would wait for the full file's write-back.
            for _ in range(runs):
                delta = create_snapshot(image, os.path.join(d, "delta.ufs"), base=base,
                                        written=ranges)
                delta_s.append(delta.seconds)
            for _ in range(runs):
                full = create_snapshot(image, os.path.join(d, "full.ufs"), chunk_size=cs)
                full_s.append(full.seconds)
            assert full is not None and delta is not None
            offs = [random.Random(5).randrange(size // 4096) * 4096 for _ in range(2000)]
            reads: dict[str, list[float]] = {"full.ufs": [], "delta.ufs": []}
            for _ in range(runs):
                for name in reads:
                    source = SnapshotSource(os.path.join(d, name), cache_chunks=0)
                    reads[name].append(p50_read_ns(source, offs))
                    source.close()
            fs, ds = statistics.median(full_s), statistics.median(delta_s)
            print(f"| {cs // 1024} KiB | {'clustered' if clustered else 'scattered'} | "
                  f"{sum(n for _, n in ranges) / MiB:.1f} | {fs:.2f} | "
                  f"{full.file_bytes / MiB:.1f} | {ds:.3f} | {delta.file_bytes / MiB:.1f} | "
                  f"{delta.stored_chunks} of {delta.chunk_count} | {ds / fs:.3f} | "
                  f"{delta.file_bytes / full.file_bytes:.3f} | "
                  f"{statistics.median(reads['full.ufs']) / 1000:.1f} / "
                  f"{statistics.median(reads['delta.ufs']) / 1000:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=parse_size, default=1 << 30)
    ap.add_argument("--chunk-size", type=parse_size, default=MiB)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--written", type=float, default=0.01,
                    help="fraction of the pages written for the delta case (default 0.01)")
    ap.add_argument("--delta-only", action="store_true", help="run the delta case only")
    args = ap.parse_args()
    size, cs = args.size, args.chunk_size
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        src, dest = os.path.join(d, "src.bin"), os.path.join(d, "snap.ufs")
        make_source(src, size)
        if args.delta_only:
            bench_deltas(src, d, size, args.written, args.runs)
            return
        print(f"source: {size / MiB:.0f} MiB mixed (1/2 zeros, 1/4 random, 1/4 text), "
              f"chunk size {cs // 1024} KiB, zstd level 3, median of {args.runs} runs")
        for threads in (0, 2):
            rates, info = [], None
            for _ in range(args.runs):
                info = create_snapshot(src, dest, chunk_size=cs, threads=threads)
                rates.append(size / info.seconds / 1e6)
            assert info is not None
            print(f"create threads={threads}: {statistics.median(rates):7.0f} MB/s "
                  f"(ratio {info.ratio:.2f}x, {info.file_bytes / MiB:.1f} MiB file, "
                  f"{info.zero_chunks} zero / {info.raw_chunks} raw / {info.zstd_chunks} zstd)")

        rng = random.Random(1)
        group = 4 * MiB
        n = 2000
        # offsets inside text (zstd) chunks, inside random (raw) chunks, anywhere
        zstd_offs = [g * group + 3 * MiB + rng.randrange(0, MiB // 4096) * 4096
                     for g in (rng.randrange(size // group) for _ in range(n))]
        raw_offs = [g * group + 2 * MiB + rng.randrange(0, MiB // 4096) * 4096
                    for g in (rng.randrange(size // group) for _ in range(n))]
        any_offs = [rng.randrange(size // 4096) * 4096 for _ in range(n)]
        results: dict[str, list[float]] = {}
        for _ in range(args.runs):
            cold = SnapshotSource(dest, cache_chunks=0)
            results.setdefault("cold zstd chunk", []).append(p50_read_ns(cold, zstd_offs))
            results.setdefault("cold raw chunk", []).append(p50_read_ns(cold, raw_offs))
            results.setdefault("cold any offset", []).append(p50_read_ns(cold, any_offs))
            cold.close()
            warm = SnapshotSource(dest, cache_chunks=4)
            base = zstd_offs[0] - zstd_offs[0] % cs
            seq = [base + i * 4096 for i in range(cs // 4096)] * 8
            warm.read_into(base, memoryview(bytearray(4096)))
            results.setdefault("cached chunk", []).append(p50_read_ns(warm, seq))
            warm.close()
        for name, vals in results.items():
            print(f"4 KiB read p50, {name:16}: {statistics.median(vals) / 1000:8.1f} us")
        bench_deltas(src, d, size, args.written, args.runs)


if __name__ == "__main__":
    main()
