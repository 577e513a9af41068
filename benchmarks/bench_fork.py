"""What a pager costs ``fork()``: fork + exit + wait with a pager open, against the same
fork with no pager, measured in the same rounds.

Usage: .venv/bin/python benchmarks/bench_fork.py [--forks 40] [--repeat 5] [--markdown]

With UFFD_EVENT_FORK (root, or CAP_SYS_PTRACE) the kernel gives every child a userfaultfd of
its own, and the fork waits until the serving engine has read that event. On top of it, a
child forked through Python holds its own copy of that descriptor and a watchdog
(``userfault.serving.forks``): a beacon fault, ``pidfd_getfd``, a standby engine and its
thread. Cases, each ``--forks`` forks timed one by one, round-robin over ``--repeat`` rounds:

* ``no pager``: the reference;
* ``native``: a pager over a ``BufferSource`` (the engine in this process);
* ``process``: a pager over a Python source (the engine in a pager process);
* ``native, child touches``: the child also reads 64 pages it never loaded (served from the
  source, the bytes checked) before it exits.

Figures: the median fork + exit + wait per case (median over rounds of each round's
median), and its ratio to ``no pager`` of the same rounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import PAGE, MiB, machine, median, progress, table

import userfault
from py_sources import PyBytes

TOUCHED = 64


def fork_once(pager: userfault.Pager | None, data: bytes, touch: bool) -> float:
    """One fork + exit + wait, in ms. The child exits 0 only if the bytes it read are right."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        ok = True
        if touch and pager is not None:
            with memoryview(pager) as v:
                for i in range(TOUCHED):  # pages of the second half: the parent never read them
                    off = len(data) // 2 + i * PAGE
                    ok = ok and v[off:off + 8] == data[off:off + 8]
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    ms = (time.perf_counter() - t0) * 1e3
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"a forked child read wrong bytes or failed: status {status}")
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forks", type=int, default=40, help="forks timed per case and round")
    ap.add_argument("--repeat", type=int, default=5, help="rounds")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    m = machine()
    print(f"{m['date']}: kernel {m['kernel']}, {m['nproc']} CPUs ({m['cpu']}), "
          f"python {m['python']}, load {m['load']}", flush=True)
    data = bytes((i * 7 + 3) % 251 for i in range(4 * MiB))
    native = userfault.map(userfault.BufferSource(data), readahead=False)
    process = userfault.map(PyBytes(data), readahead=False)
    if not (native.fork_served and process.fork_served):
        raise SystemExit("no UFFD_EVENT_FORK here (needs CAP_SYS_PTRACE): run as root")
    with memoryview(native) as v, memoryview(process) as w:  # the first half loaded
        assert v[:len(data) // 2] == data[:len(data) // 2] == w[:len(data) // 2]
    cases: list[tuple[str, Callable[[], float]]] = [
        ("no pager", lambda: fork_once(None, data, False)),
        ("native", lambda: fork_once(native, data, False)),
        ("process", lambda: fork_once(process, data, False)),
        ("native, child touches", lambda: fork_once(native, data, True)),
    ]
    rounds: dict[str, list[float]] = {name: [] for name, _ in cases}
    for r in range(args.repeat):
        progress(f"round {r + 1}/{args.repeat}")
        for name, fn in cases:
            rounds[name].append(median([fn() for _ in range(args.forks)]))
    native.close()
    process.close()
    base = median(rounds["no pager"])
    rows = [[name, median(v), median(v) / base, f"{min(v):.3g}-{max(v):.3g}"]
            for name, v in rounds.items()]
    print(f"\n## fork + exit + wait, median of {args.repeat} rounds of {args.forks} forks "
          f"(load at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())})\n")
    print(table(["case", "ms", "x no pager", "round medians ms"], rows,
                markdown=args.markdown))


if __name__ == "__main__":
    main()
