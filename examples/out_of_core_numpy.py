"""A numpy array larger than the memory it may use: a float32 matrix on disk, scaled in place.

Usage: python examples/out_of_core_numpy.py [--size 64M] [--budget 16M] [--path FILE]

The matrix file is ``--size`` bytes (made here, unless ``--path`` names one already there);
the pager keeps at most ``--budget`` of it in memory (``max_resident``): pages beyond it are
evicted (written ones written home first) and fault in again when touched. Each row block
is read, scaled by 2 and written back; ``flush()`` makes it durable; the column sums are then
checked against the same sums computed from the file with plain reads.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

import userfault
from userfault._units import human, parse_size

COLS = 1024  # float32: 4 KiB a row, one page


def make_matrix(path: str, size: int) -> None:
    rows = size // (4 * COLS)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for start in range(0, rows, 4096):
            f.write(rng.random((min(4096, rows - start), COLS), dtype=np.float32).tobytes())


def column_sums(path: str) -> np.ndarray:
    """The same sums, from plain reads of the file (the check)."""
    total = np.zeros(COLS, dtype=np.float64)
    with open(path, "rb") as f:
        while block := f.read(4096 * 4 * COLS):
            total += np.frombuffer(block, dtype=np.float32).reshape(-1, COLS).sum(axis=0)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="64M", help="matrix file size")
    ap.add_argument("--budget", default="16M", help="max_resident: memory the pager may keep")
    ap.add_argument("--path", default="", help="matrix file (default: a temporary one)")
    args = ap.parse_args()
    size, budget = parse_size(args.size), parse_size(args.budget)
    path = args.path or os.path.join(tempfile.mkdtemp(prefix="uf-ooc-"), "matrix.f32")
    if not os.path.exists(path):
        make_matrix(path, size)
    before = column_sums(path)

    t0 = time.perf_counter()
    with userfault.map(path, max_resident=budget, writable=True) as mem:
        rows = mem.size // (4 * COLS)
        matrix = mem.array("float32", (rows, COLS))
        for start in range(0, rows, 1024):  # 4 MiB a block: numpy releases the GIL inside
            matrix[start:start + 1024] *= 2
        sums = matrix.sum(axis=0, dtype=np.float64)  # a second pass: everything faults again
        del matrix
        wrote = mem.flush()  # what is still dirty goes home, then fsync
        st = mem.stats()
    secs = time.perf_counter() - t0

    print(f"{human(mem.size)} matrix, max_resident {human(budget)}: {secs:.2f} s")
    print(f"faults {st.faults}, evictions {st.evictions}, re-faults {st.refaults} "
          f"(re-fault rate {st.refault_rate:.2f}), written back {human(st.writeback_bytes)} "
          f"({human(wrote)} by the last flush)")
    after = column_sums(path)
    assert np.allclose(sums, after, rtol=1e-5), "the pager's sums differ from the file's"
    assert np.allclose(after, 2 * before, rtol=1e-5), "the file does not hold the doubled matrix"
    print("column sums doubled, in memory and in the file: ok")
    if not args.path:
        os.unlink(path)
        os.rmdir(os.path.dirname(path))


if __name__ == "__main__":
    main()
