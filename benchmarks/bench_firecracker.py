"""Benchmark `userfault firecracker serve` against a one-page-per-fault C handler.

Usage: .venv/bin/python benchmarks/bench_firecracker.py [--sizes 256M,1G] [--repeat N]
           [--fraction 0.25] [--json FILE] [--markdown]

A stand-in VMM (this process) does what Firecracker does on a snapshot restore with the Uffd
backend: it creates a full-mode userfaultfd, maps and registers the guest memory (anonymous,
4 KiB pages), connects to the handler's socket and sends the JSON regions + the fd. Right
after the handshake ("resume") it touches the working set: ``--fraction`` of the pages in a
fixed random order (one write at byte 0 and one read of byte 64 per page, ``ref_touch`` from
benchmarks/ref_handler.c via ctypes, GIL released). Handlers:

* ``ref``       benchmarks/fc_ref_handler.c: one UFFDIO_COPY of one page per fault;
* ``lazy``      serve --chunk 4K --readahead off (one page per fault, the C engine);
* ``prefetch``  serve --prefetch WS --readahead off, WS recorded by a ``serve --record`` run of
                the same workload: the working set is installed in one batch at the handshake;
* ``populate``  serve --populate --readahead off: background fill of everything, faults first.

Two working sets, both ``--fraction`` of the pages touched in a fixed random order:
``random`` single pages (the worst case for a batch: one UFFDIO_COPY per page either way) and
``clustered`` 64 KiB runs (closer to how a guest's memory is laid out).

Reported per size and working set (medians of ``--repeat`` runs): resume-to-working-set
(handshake sent -> last page of the working set touched), total fault-service time (the
handler's sum of per-fault service times: a lower bound of the vCPU blocked time), faults
served, and the ratio of each mode's resume time to the C reference's and to lazy's.

With FIRECRACKER_BIN set, the tiny guest of tests/firecracker_guest is also restored with
each handler (restore -> first tick after resume, faults).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PAGE,
    GiB,
    MiB,
    build_reference,
    fmt,
    load_reference_lib,
    machine,
    median,
    progress,
    table,
)

from userfault import Region, Uffd
from userfault._flags import Feature
from userfault._units import parse_size

MODES = ("ref", "lazy", "prefetch", "populate")


def make_mem_file(path: Path, size: int) -> None:
    """A memory file of ``size`` bytes (random 4 MiB blocks repeated), left in page cache."""
    if path.exists() and path.stat().st_size == size:
        return
    block = random.Random(11).randbytes(4 * MiB)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)


def wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"handler exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"handler did not create {path}")
        time.sleep(0.002)


@contextlib.contextmanager
def handler(mode: str, sock: Path, mem: Path, ref_exe: Path, ws: Path,
            record: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    if mode == "ref":
        argv = [str(ref_exe), str(sock), str(mem)]
    else:
        argv = [sys.executable, "-m", "userfault", "firecracker", "serve", "--socket", str(sock),
                "--mem-file", str(mem), "--json", "--chunk", "4K", "--readahead", "off"]
        if mode == "prefetch":
            argv += ["--prefetch", str(ws)]
        elif mode == "populate":
            argv += ["--populate"]
        elif mode == "record":
            assert record is not None
            argv += ["--record", str(record)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        wait_socket(sock, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def one_run(mode: str, size: int, order: Any, n: int, lib: ctypes.CDLL, workdir: Path,
            mem: Path, ref_exe: Path, ws: Path, record: Path | None = None) -> dict[str, float]:
    sock = workdir / f"{mode}.sock"
    with handler(mode, sock, mem, ref_exe, ws, record) as proc:
        uffd = Uffd(Feature(0), user_mode_only=False)
        region = Region.anonymous(size)
        try:
            uffd.register(region.address, region.size)
            payload = json.dumps([{"base_host_virt_addr": region.address, "size": size,
                                   "offset": 0, "page_size": PAGE,
                                   "page_size_kib": PAGE}]).encode()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sock))
            t0 = time.perf_counter()
            socket.send_fds(s, [payload], [uffd.fileno()])
            lib.ref_touch(region.address, order, n, 1, None)
            t1 = time.perf_counter()
            if mode == "ref":
                s.close()  # the reference exits on hang-up and prints its JSON
                out, _ = proc.communicate(timeout=30)
                rep = json.loads(out)
                blocked, faults = rep["service_ns"], rep["faults"]
            else:
                proc.send_signal(signal.SIGTERM)
                out, _ = proc.communicate(timeout=30)
                s.close()
                rep = json.loads(out.decode().splitlines()[0])
                blocked, faults = rep["vcpu_blocked_ns"], rep["faults"]
        finally:
            uffd.close()
            region.close()
    return {"resume_ms": (t1 - t0) * 1e3, "service_ms": blocked / 1e6, "faults": float(faults)}


def working_set(workload: str, total: int, fraction: float, lib: ctypes.CDLL) -> Any:
    """The touch order: ``random`` pages, or ``clustered`` 64 KiB runs (both fixed seeds)."""
    n = int(total * fraction)
    if workload == "random":
        order = (ctypes.c_uint32 * n)()
        if lib.ref_shuffle(total, 42, order, n) != 0:
            raise MemoryError("ref_shuffle")
        return order
    cluster = 16  # pages: 64 KiB runs, like a guest's allocations
    rng = random.Random(42)
    runs = rng.sample(range(total // cluster), n // cluster)
    pages = [r * cluster + i for r in runs for i in range(cluster)]
    rng.shuffle(pages)  # the runs' pages are still touched in a random order
    return (ctypes.c_uint32 * len(pages))(*pages)


def bench_size(size: int, workload: str, repeat: int, fraction: float, lib: ctypes.CDLL,
               ref_exe: Path, workdir: Path) -> dict[str, dict[str, float]]:
    mem = workdir / f"mem-{size >> 20}M.bin"
    progress(f"{size >> 20} MiB: writing the memory file")
    make_mem_file(mem, size)
    order = working_set(workload, size // PAGE, fraction, lib)
    n = len(order)
    ws = workdir / f"ws-{size >> 20}M-{workload}.bin"
    progress(f"{size >> 20} MiB {workload}: recording the working set ({n} pages)")
    one_run("record", size, order, n, lib, workdir, mem, ref_exe, ws, record=ws)
    results: dict[str, dict[str, float]] = {}
    for mode in MODES:
        runs = []
        for i in range(repeat):
            runs.append(one_run(mode, size, order, n, lib, workdir, mem, ref_exe, ws))
            progress(f"{size >> 20} MiB {workload} {mode} run {i + 1}: "
                     f"resume {runs[-1]['resume_ms']:.1f} ms, faults {runs[-1]['faults']:.0f}")
        results[mode] = {k: median([r[k] for r in runs]) for k in runs[0]}
    return results


def bench_tiny_guest(binary: str, ref_exe: Path, workdir: Path,
                     repeat: int) -> dict[str, dict[str, float]]:
    tests = Path(__file__).resolve().parent.parent / "tests"
    sys.path.insert(0, str(tests))
    import functools

    from firecracker_harness import (  # type: ignore[import-not-found]
        boot,
        build_guest,
        command_handler,
        restore_with_handler,
        snapshot,
    )

    kernel = build_guest(workdir / "guest")
    vm = boot(binary, kernel, workdir)
    try:
        vm.wait_ticks(3, 30)
        snap = snapshot(vm, workdir)
    finally:
        vm.kill()
    ws = workdir / "guest-ws.bin"
    serve = [sys.executable, "-m", "userfault", "firecracker", "serve", "--socket", "{socket}",
             "--mem-file", "{mem_file}", "--readahead", "off"]
    argvs = {"ref": [str(ref_exe), "{socket}", "{mem_file}"],
             "record": [*serve, "--record", str(ws)],
             "lazy": serve, "prefetch": [*serve, "--prefetch", str(ws)],
             "populate": [*serve, "--populate"]}
    results: dict[str, dict[str, float]] = {}
    for mode in ("record", *MODES):
        runs = []
        for i in range(1 if mode == "record" else repeat):
            d = workdir / f"restore-{mode}-{i}"
            d.mkdir()
            h: Any = functools.partial(command_handler, argvs[mode])
            with restore_with_handler(binary, snap, d, h) as (rvm, _):
                t0 = time.monotonic()  # snapshot/load returned: the VM runs (resume_vm)
                rvm.wait_ticks(1, 30)
                runs.append((time.monotonic() - t0) * 1e3)
        if mode != "record":
            results[mode] = {"first_tick_ms": median(runs)}
            progress(f"tiny guest {mode}: resume to first tick {median(runs):.0f} ms")
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256M,1G", help="guest memory sizes (default 256M,1G)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per mode (default 5)")
    ap.add_argument("--fraction", type=float, default=0.25, help="working set (default 0.25)")
    ap.add_argument("--workloads", default="random,clustered",
                    help="random (single pages) and/or clustered (64 KiB runs)")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
    args = ap.parse_args()
    ref_exe, _ = build_reference("fc_ref_handler.c")
    _, ref_lib = build_reference("ref_handler.c")
    lib = load_reference_lib(ref_lib)
    out: dict[str, Any] = {"machine": machine(), "fraction": args.fraction,
                           "repeat": args.repeat, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-fc-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        for size in [parse_size(s) for s in args.sizes.split(",")]:
            for wl in args.workloads.split(","):
                out["sizes"][f"{size}:{wl}"] = bench_size(size, wl, args.repeat, args.fraction,
                                                          lib, ref_exe, work)
        fc = os.environ.get("FIRECRACKER_BIN")
        if fc:
            gdir = work / "guest"
            gdir.mkdir()
            out["tiny_guest"] = bench_tiny_guest(fc, ref_exe, gdir, max(1, args.repeat // 2))
    rows = []
    for key, res in out["sizes"].items():
        size, wl = int(key.split(":")[0]), key.split(":")[1]
        ref, lazy = res["ref"]["resume_ms"], res["lazy"]["resume_ms"]
        for mode in MODES:
            r = res[mode]
            rows.append([f"{size / GiB:g} GiB" if size >= GiB else f"{size >> 20} MiB", wl, mode,
                         fmt(r["resume_ms"]), fmt(r["service_ms"]), int(r["faults"]),
                         fmt(ref / r["resume_ms"]) + "x", fmt(lazy / r["resume_ms"]) + "x"])
    print(f"working set {args.fraction:.0%} of pages, random order; medians of "
          f"{args.repeat} runs; {out['machine'].get('nproc', '?')} CPUs, "
          f"kernel {out['machine'].get('kernel', '?')}")
    print(table(["guest memory", "working set", "handler", "resume->working set ms",
                 "fault service ms",
                 "faults", "speed-up vs ref", "vs lazy"], rows, markdown=args.markdown))
    if "tiny_guest" in out:
        ref = out["tiny_guest"]["ref"]["first_tick_ms"]
        print()
        print(table(["tiny guest (128 MiB)", "resume->first tick ms", "vs ref"],
                    [[m, fmt(v["first_tick_ms"]), fmt(ref / v["first_tick_ms"]) + "x"]
                     for m, v in out["tiny_guest"].items()], markdown=args.markdown))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
