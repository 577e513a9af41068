"""What waiting for a replica costs a write-back to Redis: ``flush()`` of a writable pager on a
RedisSource with ``replicas=0`` (no WAIT), with ``replicas=1`` (WAIT on every master's pipeline
of every ``write_from``: what RedisSource does), and, for reference, the ``replicas=0`` flush
followed by one ``WAIT 1`` per master (the cost of waiting once per flush instead).

Servers (started here, see tests/servers.py): a standalone master with one replica, and a
Redis Cluster of 3 masters with one replica each, all on loopback.

Usage: PYTHONPATH=src python benchmarks/bench_redis_writeback.py [--runs 5] [--scattered 256]
           [--contiguous 1024]

* scattered: every 4th page of the first ``4 * --scattered`` pages is written, so the flush
  writes each page in a ``write_from`` of its own (the worst case for a WAIT per call);
* contiguous: ``--contiguous`` adjacent pages, written back in runs of up to 1024 pages.

Each figure is the median of ``--runs`` flushes (after one warm-up round) of one pager per
mode, its pages written again before each; the three pagers (all on the same object) take
turns. After the last round the data is checked through a fresh reader.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis
from _common import machine, median, table

import userfault
from servers import HOST, RedisCluster, RedisServer
from userfault.sources.redis import RedisSource, upload

PAGE = 4096


def written_pages(pattern: str, count: int) -> list[int]:
    return list(range(0, 4 * count, 4)) if pattern == "scattered" else list(range(count))


def flush_times(url: str, prefix: str, cluster: bool, pages: list[int], runs: int,
                modes: list[tuple[str, int, Callable[[], None] | None]]) -> dict[str, float]:
    """Median seconds of a flush (plus its ``after``, when given) of the pages written again,
    per mode ``(name, replicas, after)``; the modes take turns, one flush each per round."""
    times: dict[str, list[float]] = {name: [] for name, _, _ in modes}
    with contextlib.ExitStack() as stack:
        pagers = []
        for name, replicas, after in modes:
            src = RedisSource(url, prefix=prefix, cluster=cluster, replicas=replicas)
            pager = stack.enter_context(userfault.map(src, writable=True, readahead=False))
            pagers.append((name, pager, stack.enter_context(pager.view()), after))
        for run in range(runs + 1):
            for name, pager, v, after in pagers:
                for i in pages:
                    v[i * PAGE: i * PAGE + 8] = b"%08d" % run
                t0 = time.perf_counter()
                assert pager.flush() == len(pages) * PAGE
                if after is not None:
                    after()
                if run:  # the first round warms up
                    times[name].append(time.perf_counter() - t0)
    check = RedisSource(url, prefix=prefix, cluster=cluster)
    buf = bytearray(PAGE)
    for i in pages[:: max(1, len(pages) // 16)]:
        check.read_into(i * PAGE, memoryview(buf))
        assert buf[:8] == b"%08d" % runs, (i, bytes(buf[:8]))
    check.close()
    return {name: median(t) for name, t in times.items()}


def wait_each(ports: list[int]) -> Callable[[], None]:
    clients = [redis.Redis(host=HOST, port=p, socket_timeout=10) for p in ports]

    def after() -> None:
        for c in clients:
            acked = c.execute_command("WAIT", 1, 1000)
            assert acked >= 1, acked
    return after


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--scattered", type=int, default=256)
    ap.add_argument("--contiguous", type=int, default=1024)
    args = ap.parse_args()
    size = max(4 * args.scattered, args.contiguous) * PAGE
    data = os.urandom(size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="uf-bench-rwb-") as work:
        master = RedisServer(Path(work) / "m", extra_args=[
            "--repl-diskless-sync-delay", "0"]).start()
        replica = RedisServer(Path(work) / "r", extra_args=[
            "--replicaof", HOST, str(master.port)]).start()
        cluster = RedisCluster(Path(work) / "c", replicas=1).start()
        try:
            r = redis.Redis(host=HOST, port=replica.port)
            deadline = time.monotonic() + 30
            while r.info("replication")["master_link_status"] != "up":
                assert time.monotonic() < deadline, "the replica did not sync"
                time.sleep(0.05)
            r.close()
            targets = [("standalone + 1 replica", master.url, False, [master.port]),
                       ("cluster 3+3", cluster.url, True, [m.port for m in cluster.primaries()])]
            for name, url, is_cluster, masters in targets:
                for pattern, count in (("scattered", args.scattered),
                                       ("contiguous", args.contiguous)):
                    pages = written_pages(pattern, count)
                    prefix = f"bench:{pattern}:"
                    upload(data, url, prefix, cluster=is_cluster, replicas=0)
                    res = flush_times(url, prefix, is_cluster, pages, args.runs, [
                        ("no WAIT", 0, None), ("WAIT per write_from", 1, None),
                        ("WAIT once per flush", 0, wait_each(masters))])
                    base = res["no WAIT"]
                    for mode, t in res.items():
                        rows.append([name, f"{pattern} {len(pages)}", mode, t * 1e3,
                                     len(pages) * PAGE / t / 1e6, t / base])
        finally:
            cluster.close()
            replica.close()
            master.close()
    print(machine())
    print(table(["server", "pages", "mode", "flush ms (median)", "MB/s", "x no WAIT"], rows))


if __name__ == "__main__":
    main()
