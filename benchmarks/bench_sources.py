"""Benchmark the network page sources on loopback: HTTPSource on nginx, RedisSource on
redis-server (both started here, see tests/servers.py).

Usage: PYTHONPATH=src python benchmarks/bench_sources.py [--size 256M] [--runs 5]
           [--reads 2000] [--chunks 1M,4M] [--batch 8] [--connections 4]
           [--redis-page-sizes 4096,65536] [--only http,redis]

* first-touch latency: ``--reads`` calls of ``read_into`` of one 4 KiB page at random
  page-aligned offsets, each timed alone; p50 and p99.
* sequential throughput: the whole file read front to back with ``read_many``, each call
  asking for ``--batch`` adjacent chunks of ``--chunks`` bytes (HTTP merges them and fetches
  the merged ranges in parallel over ``--connections`` connections; Redis pipelines MGETs).

Every figure is the median over ``--runs`` runs. The first throughput run of each case is
checked byte for byte against the file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from servers import NginxServer, RedisServer
from userfault._units import parse_size
from userfault.sources.http import HTTPSource
from userfault.sources.redis import upload

PAGE = 4096
MiB = 1 << 20


def latency(src: object, size: int, reads: int, seed: int) -> tuple[float, float]:
    read_into = src.read_into  # type: ignore[attr-defined]
    rng = random.Random(seed)
    pages = size // PAGE
    buf = memoryview(bytearray(PAGE))
    times = []
    for _ in range(reads):
        off = rng.randrange(pages) * PAGE
        t0 = time.perf_counter_ns()
        read_into(off, buf)
        times.append(time.perf_counter_ns() - t0)
    times.sort()
    return times[len(times) // 2] / 1e3, times[int(len(times) * 0.99)] / 1e3


def throughput(src: object, out: bytearray, chunk: int, batch: int) -> float:
    read_many = src.read_many  # type: ignore[attr-defined]
    mv = memoryview(out)
    size = len(out)
    step = chunk * batch
    t0 = time.perf_counter()
    for base in range(0, size, step):
        read_many([(o, mv[o: min(o + chunk, size)])
                   for o in range(base, min(base + step, size), chunk)])
    return size / (time.perf_counter() - t0) / MiB


def run_case(name: str, make: object, args: argparse.Namespace, size: int,
             digest: bytes, rows: list[tuple[str, str, str]]) -> None:
    p50s, p99s = [], []
    for r in range(args.runs):
        src = make()  # type: ignore[operator]
        p50, p99 = latency(src, size, args.reads, seed=r)
        p50s.append(p50)
        p99s.append(p99)
        src.close()
    rows.append((name, "4 KiB read_into p50 / p99",
                 f"{statistics.median(p50s):8.1f} / {statistics.median(p99s):8.1f} us"))
    out = bytearray(size)
    for chunk in args.chunks:
        rates = []
        for r in range(args.runs):
            src = make()  # type: ignore[operator]
            rates.append(throughput(src, out, chunk, args.batch))
            src.close()
            if r == 0 and hashlib.sha256(out).digest() != digest:
                raise SystemExit(f"{name}: data read back does not match the file!")
        rows.append((name, f"read_many {chunk // MiB} MiB chunks x{args.batch}",
                     f"{statistics.median(rates):8.0f} MiB/s"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--chunks", default="1M,4M")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--redis-page-sizes", default="4096,65536")
    ap.add_argument("--only", default="http,redis")
    args = ap.parse_args()
    size = parse_size(args.size)
    args.chunks = [parse_size(c) for c in args.chunks.split(",")]
    only = set(args.only.split(","))

    work = Path(tempfile.mkdtemp(prefix="uf-bench-"))
    data = os.urandom(size)
    digest = hashlib.sha256(data).digest()
    rows: list[tuple[str, str, str]] = []
    print(f"size {size // MiB} MiB, {args.runs} runs (medians), {args.reads} random 4 KiB reads, "
          f"{os.cpu_count()} CPUs, loopback", flush=True)

    if "http" in only:
        with NginxServer(workdir=work / "nginx") as nginx:
            (nginx.directory / "blob.bin").write_bytes(data)
            url = nginx.url("blob.bin")
            run_case(f"http (nginx, {args.connections} conns)",
                     lambda: HTTPSource(url, size=size, connections=args.connections),
                     args, size, digest, rows)
    if "redis" in only:
        with RedisServer(work / "redis") as server:
            for ps in (int(p) for p in args.redis_page_sizes.split(",")):
                src = upload(data, server.url, prefix=f"b{ps}:", page_size=ps)
                run_case(f"redis (page_size {ps // 1024} KiB)",
                         lambda src=src: src, args, size, digest, rows)
                server_flush(server)
    shutil.rmtree(work, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    wop = max(len(r[1]) for r in rows)
    print(f"{'source':<{width}}  {'measure':<{wop}}  result")
    for name, op, res in rows:
        print(f"{name:<{width}}  {op:<{wop}}  {res}")


def server_flush(server: RedisServer) -> None:
    import redis

    r = redis.Redis.from_url(server.url)
    r.flushall()
    r.close()


if __name__ == "__main__":
    main()
