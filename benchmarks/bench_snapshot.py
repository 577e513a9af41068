"""Benchmark the compressed snapshot format: create throughput, ratio and 4 KiB read latency.

Usage: python benchmarks/bench_snapshot.py [--size 1G] [--chunk-size 1M] [--runs 5] [--dir /tmp]

The source is mixed data laid out in 4 MiB groups: 2 MiB of zeros (written, not holes),
1 MiB of random bytes and 1 MiB of repeated text, i.e. half zeros, a quarter incompressible
and a quarter very compressible. Every figure is the median of ``--runs`` runs.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=parse_size, default=1 << 30)
    ap.add_argument("--chunk-size", type=parse_size, default=MiB)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    size, cs = args.size, args.chunk_size
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        src, dest = os.path.join(d, "src.bin"), os.path.join(d, "snap.ufs")
        make_source(src, size)
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


if __name__ == "__main__":
    main()
