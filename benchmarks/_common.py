"""Helpers shared by the benchmark scripts: build the C reference, time, summarise, print.

* :func:`build_reference` compiles ``ref_handler.c`` with the system ``cc`` into
  ``benchmarks/build/`` (gitignored), both as a program and as a shared library.
* :func:`page_order` / :func:`touch_pages` run the reference's C touch loop (``ref_touch``)
  over a region, timing every touch in C when asked.
* :func:`median` / :func:`median_runs` summarise repetitions.
* :func:`table` renders rows as an aligned text (and Markdown) table.
* :func:`machine` describes the machine for a results header.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
PAGE = 4096
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def progress(msg: str) -> None:
    """One progress line on stderr."""
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def build_reference(src: str = "ref_handler.c") -> tuple[Path, Path]:
    """Compile ``src`` into ``build/`` as a program and a shared library (if out of date)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler: install cc (build-essential)")
    BUILD.mkdir(exist_ok=True)
    source = HERE / src
    exe, lib = BUILD / source.stem, BUILD / f"lib{source.stem}.so"
    flags = ["-O2", "-Wall", "-Wextra", "-pthread"]
    for out, extra in ((exe, []), (lib, ["-shared", "-fPIC"])):
        if not out.exists() or out.stat().st_mtime < source.stat().st_mtime:
            subprocess.run([cc, *flags, *extra, "-o", str(out), str(source)], check=True)
    return exe, lib


def load_reference_lib(lib: Path) -> ctypes.CDLL:
    """The shared reference library with typed ``ref_shuffle`` and ``ref_touch``.

    ctypes releases the GIL around the calls (not that the native engine needs it).
    """
    dll = ctypes.CDLL(str(lib))
    dll.ref_shuffle.argtypes = [ctypes.c_uint64, ctypes.c_uint64,
                                ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint64]
    dll.ref_shuffle.restype = ctypes.c_int
    dll.ref_touch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint64,
                              ctypes.c_int, ctypes.POINTER(ctypes.c_uint64)]
    dll.ref_touch.restype = ctypes.c_uint64
    return dll


def page_order(lib: ctypes.CDLL, size: int, seed: int = 0, pages: int | None = None
               ) -> tuple[Any, int]:
    """Page indices of a ``size``-byte region for ``ref_touch``: in order (``seed`` 0) or a
    fixed shuffle (``ref_shuffle``), ``pages`` of them (all by default)."""
    total = size // PAGE
    n = min(pages or total, total)
    idx = (ctypes.c_uint32 * n)()
    if lib.ref_shuffle(total, seed, idx, n):
        raise MemoryError("ref_shuffle")
    return idx, n


def touch_pages(lib: ctypes.CDLL, address: int, idx: Any, n: int, latency: bool
                ) -> dict[str, float]:
    """``ref_touch`` over the pages ``idx`` of the region at ``address`` (per page a write at
    byte 0, a read of byte 64): seconds, µs per touch, GB/s, the checksum and, with
    ``latency``, the p50 and p99 of the touches (each timed in C)."""
    lat = (ctypes.c_uint64 * n)() if latency else None
    t0 = time.perf_counter_ns()
    checksum = lib.ref_touch(address, idx, n, 1, lat)
    secs = (time.perf_counter_ns() - t0) / 1e9
    out = {"seconds": secs, "per_touch_us": secs * 1e6 / n, "gbps": n * PAGE / secs / 1e9,
           "checksum": checksum}
    if lat is not None:
        vals = sorted(lat)
        out["p50_us"] = vals[n // 2] / 1e3
        out["p99_us"] = vals[n * 99 // 100] / 1e3
    return out


def run_json(cmd: Sequence[str]) -> dict[str, Any]:
    """Run a command that prints one JSON object; return it."""
    out = subprocess.run(list(cmd), check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def median(values: Sequence[float]) -> float:
    """Median (NaN for no values)."""
    return statistics.median(values) if values else float("nan")


def median_runs(fn: Callable[[], dict[str, float]], repeat: int) -> dict[str, float]:
    """Call ``fn`` ``repeat`` times; the median of each numeric key."""
    runs = [fn() for _ in range(repeat)]
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    return {k: median([r[k] for r in runs]) for k in keys}


def fmt(v: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant digits; strings unchanged; '-' for None/NaN."""
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    """Rows as an aligned text table, or a Markdown table."""
    cells = [[fmt(c) for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True)))
              for r in cells]
    return "\n".join(lines)


def machine() -> dict[str, str]:
    """Kernel, CPUs, CPU model, memory and date of this machine."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return {"kernel": platform.release(), "nproc": str(os.cpu_count()), "cpu": model,
            "memory": mem, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def rss_bytes() -> int:
    """This process's resident set (smaps_rollup Rss, else VmRSS), in bytes."""
    for path, key in (("/proc/self/smaps_rollup", "Rss:"), ("/proc/self/status", "VmRSS:")):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        except OSError:
            continue
    return 0


