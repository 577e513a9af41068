"""Trace a small workload: the engine writes every fault and background install to a file.

    python examples/trace_a_workload.py run.uftrace [--size 64M]
    userfault stats run.uftrace
    userfault plot run.uftrace -o run.png --html run.html
    userfault workingset from-trace run.uftrace -o run.ws

Three threads read a file through ``userfault.map(path, trace=...)``: one scans the first half
front to back (readahead streams it: most of its pages arrive as READAHEAD installs, not
faults), one reads random pages of the second half (one fault each), and after both, one
reads every 16th page (most are present by then). ``userfault trace -o FILE -- CMD`` does the
same for a program you do not want to change: its pagers pick the file up from the
environment.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading

import numpy as np

import userfault
from userfault._units import parse_size

PAGE = 4096


def workload(mem: userfault.Pager) -> None:
    arr = mem.array(np.uint8)
    pages = len(arr) // PAGE
    half = pages // 2

    def scan() -> None:
        for p in range(0, half, 16):  # 16 pages per step: a sequential reader
            int(arr[p * PAGE: (p + 16) * PAGE].sum())

    def random_reads() -> None:
        rng = random.Random(1)
        for _ in range(half // 2):
            int(arr[rng.randrange(half, pages) * PAGE])

    def strided() -> None:
        for p in range(0, pages, 16):
            int(arr[p * PAGE])

    first = [threading.Thread(target=scan), threading.Thread(target=random_reads)]
    for t in first:
        t.start()
    for t in first:
        t.join()
    last = threading.Thread(target=strided)
    last.start()
    last.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("output", help="trace file to write")
    ap.add_argument("--size", default="64M", help="file size (default 64M)")
    args = ap.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.bin")
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        with userfault.map(path, trace=args.output) as mem:
            workload(mem)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
