"""A 10 GiB numpy array served lazily from HTTP or Redis: only the pages you touch travel.

    # serve a (sparse) 10 GiB file with nginx, or upload one to Redis, then:
    python examples/numpy_over_http.py http://127.0.0.1:8080/big.f64
    python examples/numpy_over_http.py redis://127.0.0.1:6379/0 --prefix big:

`--make FILE` writes the sample file this script expects (a sparse 10 GiB file whose element
``i`` is ``float(i)`` in every 64th MiB, zeros elsewhere).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np

import userfault
from userfault.sources.base import PageSource

GIB = 1 << 30
STRIDE = 64 << 20  # one populated MiB every 64 MiB


def make_sample(path: str, size: int = 10 * GIB) -> None:
    """A sparse file: element i == i inside each populated MiB, zeros (holes) elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for start in range(0, size, STRIDE):
            values = np.arange(start // 8, (start + (1 << 20)) // 8, dtype=np.float64)
            f.seek(start)
            f.write(values.tobytes())


def open_source(url: str, prefix: str) -> PageSource:
    if url.startswith(("http://", "https://")):
        from userfault.sources.http import HTTPSource

        return HTTPSource(url)
    if url.startswith("redis://"):
        from userfault.sources.redis import RedisSource

        return RedisSource(url, prefix=prefix, missing="zero")
    raise SystemExit(f"unsupported URL {url!r}: use http(s):// or redis://")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url", nargs="?", help="http(s):// or redis:// location of the data")
    parser.add_argument("--prefix", default="userfault:", help="Redis key prefix")
    parser.add_argument("--touches", type=int, default=1000, help="random elements to read")
    parser.add_argument("--make", metavar="FILE", help="write the sparse sample file and exit")
    args = parser.parse_args()
    if args.make:
        make_sample(args.make)
        print(f"wrote {args.make} ({os.path.getsize(args.make) / GIB:.0f} GiB, sparse)")
        return 0
    if not args.url:
        parser.error("give a URL (or --make FILE)")

    t0 = time.perf_counter()
    with userfault.map(open_source(args.url, args.prefix)) as mem:
        arr = mem.array(np.float64)
        print(f"mapped {arr.nbytes / GIB:.1f} GiB as a numpy array of {arr.size:,} float64 "
              f"in {time.perf_counter() - t0:.2f} s (nothing transferred yet: "
              f"{mem.stats().bytes_installed} bytes)")

        rng = random.Random(0)
        blocks = arr.size * 8 // STRIDE
        idx = [rng.randrange(blocks) * (STRIDE // 8) + rng.randrange((1 << 20) // 8)
               for _ in range(args.touches)]
        t1 = time.perf_counter()
        values = [arr[i] for i in idx]  # each first touch is one page fault, served remotely
        elapsed = time.perf_counter() - t1
        wrong = sum(v != float(i) for v, i in zip(values, idx, strict=True))
        stats = mem.stats()
        print(f"read {args.touches} random elements in {elapsed:.3f} s "
              f"({elapsed / args.touches * 1e6:.0f} us each); wrong values: {wrong}")
        print(f"transferred {stats.bytes_installed / 2**20:.1f} MiB of "
              f"{arr.nbytes / GIB:.0f} GiB ({stats.faults} faults); {stats.summary()}")

        t2 = time.perf_counter()
        total = float(arr[: (64 << 20) // 8].sum())  # a sequential 64 MiB scan: readahead
        scan = time.perf_counter() - t2
        print(f"summed the first 64 MiB sequentially in {scan:.3f} s "
              f"({64 / scan:.0f} MiB/s incl. numpy): {total:.6g}")
        del arr
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
