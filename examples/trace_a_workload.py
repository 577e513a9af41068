"""Trace a small workload with a pager's fault log and write it as a trace file.

    python examples/trace_a_workload.py run.uftrace [--size 64M]
    userfault stats run.uftrace
    userfault plot run.uftrace -o run.png --html run.html
    userfault workingset from-trace run.uftrace -o run.ws

Three threads read a file through ``userfault.map`` with readahead off (so every page they
touch is a fault): one scans the first half front to back, one reads random pages of the
second half, and after both, one reads every 16th page. The pager's bounded fault log
(``log_faults``) is converted with :func:`userfault.trace.write_fault_log`; log entries carry
no installed length or cause, so each becomes a FAULT of one page. (When the engine writes
traces itself, they also hold readahead, prefetch and populate installs.)
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
from userfault.trace import TraceMeta, write_fault_log

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
        # each page faults at most once (nothing is evicted): the log cannot overflow
        with userfault.map(path, readahead=False, log_faults=size // PAGE + 1) as mem:
            meta = TraceMeta.now(f"FileSource('data.bin', {size} random bytes)", mem.size, PAGE,
                                 source_size=size,
                                 workload="examples/trace_a_workload.py")
            workload(mem)
            faults = mem.faults()
    n = write_fault_log(args.output, meta, faults, PAGE)
    print(f"wrote {args.output}: {n} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
