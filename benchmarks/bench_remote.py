"""Benchmark the page server on loopback, with authentication, against a plain socket copy.

Usage: .venv/bin/python benchmarks/bench_remote.py [--size 256M] [--pages 3000] [--repeat 5]
           [--tls] [--markdown]

Two servers run as subprocesses, both serving the same ``--size`` file of random bytes (warm
in the page cache):

* ``userfault serve`` (the page server: HMAC-authenticated connections, framed, pipelined);
* the reference: a plain TCP server that answers ``(offset u64, length u64)`` with
  ``os.sendfile`` of those bytes, no authentication, no framing: the cheapest way to move the
  same bytes through the same loopback (an ``scp``-like full copy, minus ssh).

Cases, each repeated ``--repeat`` times round-robin with its reference; figures are medians:

* fault latency: ``userfault.map(PageServerSource(...), readahead=False)``, ``--pages``
  distinct random pages, each first touch timed alone in Python around a C read of one byte
  (``_native.touch``, GIL released); p50 and p99. Beside it the source alone
  (``PageServerSource.read_into`` of 4 KiB) and the reference: a 4 KiB request/response on the
  plain socket.
* sequential throughput: the whole file with ``PageServerSource.read_many`` (16 MiB requests,
  pipelined on one connection); the whole file through ``userfault.map`` (default readahead,
  every page touched by a C loop); the reference: one ``sendfile`` of the whole file received
  with ``recv_into``. ``--tls`` adds ``ufs://`` rows (a throwaway certificate made with openssl).

Every transfer is checked against the file (sha256, or the sum of the bytes touched).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PAGE, MiB, machine, median, progress, table

import userfault
from userfault import _native
from userfault._units import parse_size
from userfault.remote import PageServerSource

SECRET = b"benchmark-secret-0123456789abcdef"

_RAW_SERVER = r"""
import os, socket, struct, sys, threading
fd = os.open(sys.argv[1], os.O_RDONLY)
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with c:
        while True:
            req = c.recv(16, socket.MSG_WAITALL)
            if len(req) < 16:
                return
            off, n = struct.unpack("<QQ", req)
            while n:
                k = os.sendfile(c.fileno(), fd, off, n)
                off += k
                n -= k
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def percentile(values: list[int], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q / 100))] / 1e3


class RawClient:
    """The reference client: one request, ``recv_into`` until all bytes are in."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def read_into(self, offset: int, buf: memoryview) -> None:
        self.sock.sendall(struct.pack("<QQ", offset, len(buf)))
        got = 0
        while got < len(buf):
            n = self.sock.recv_into(buf[got:])
            if not n:
                raise ConnectionError("the reference server closed")
            got += n

    def close(self) -> None:
        self.sock.close()


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.size = args.size
        self.data_path = work / "mem.bin"
        progress(f"writing {self.size // MiB} MiB of random bytes")
        rng = random.Random(1)
        with open(self.data_path, "wb") as f:
            for _ in range(0, self.size, 16 * MiB):
                f.write(rng.randbytes(min(16 * MiB, self.size - f.tell())))
        self.data = self.data_path.read_bytes()
        self.digest = hashlib.sha256(self.data).digest()
        self.secret = work / "secret"
        self.secret.write_bytes(SECRET)
        self.secret.chmod(0o600)
        self.procs: list[subprocess.Popen[str]] = []
        extra: list[str] = []
        self.tls_ca: Path | None = None
        if args.tls:
            self.tls_ca, cert, key = make_cert(work)
            extra = ["--tls-cert", str(cert), "--tls-key", str(key)]
        self.port = self.start([sys.executable, "-m", "userfault", "serve", "--listen",
                                "tcp://127.0.0.1:0", "--secret-file", str(self.secret),
                                f"mem={self.data_path}"], "listening on ")
        self.tls_port = self.start([sys.executable, "-m", "userfault", "serve", "--listen",
                                    "tcp://127.0.0.1:0", "--secret-file", str(self.secret),
                                    *extra, f"mem={self.data_path}"],
                                   "listening on ") if args.tls else 0
        self.raw_port = self.start([sys.executable, "-c", textwrap.dedent(_RAW_SERVER),
                                    str(self.data_path)], "")
        self.url = f"uf://127.0.0.1:{self.port}/mem"
        self.results: list[tuple[str, list[str], list[list[Any]]]] = []

    def start(self, cmd: list[str], marker: str) -> int:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.procs.append(p)
        assert p.stdout is not None
        while True:
            line = p.stdout.readline()
            if not line:
                raise SystemExit(f"{cmd[:4]} exited: {p.wait()}")
            if line.startswith(marker):
                return int(line.strip().rsplit(":", 1)[-1].split()[0])

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()

    def source(self, tls: bool = False) -> PageServerSource:
        if tls:
            return PageServerSource(f"ufs://127.0.0.1:{self.tls_port}/mem",
                                    secret_file=self.secret, tls_ca=self.tls_ca)
        return PageServerSource(self.url, secret_file=self.secret)

    def interleave(self, cases: list[tuple[str, Callable[[], dict[str, float]]]]
                   ) -> dict[str, dict[str, float]]:
        runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in cases}
        for rep in range(self.args.repeat):
            for name, fn in cases:
                progress(f"  rep {rep + 1}/{self.args.repeat}: {name}")
                runs[name].append(fn())
        return {n: {k: median([r[k] for r in rs]) for k in rs[0]} for n, rs in runs.items()}

    def add_table(self, title: str, headers: list[str], rows: list[list[Any]]) -> None:
        self.results.append((title, headers, rows))
        print(f"\n## {title}\n")
        print(table(headers, rows, markdown=self.args.markdown), flush=True)

    # -- latency -------------------------------------------------------------------------------

    def pages(self, seed: int) -> list[int]:
        return random.Random(seed).sample(range(self.size // PAGE), self.args.pages)

    def fault_run(self, seed: int) -> dict[str, float]:
        pages = self.pages(seed)
        src = self.source()
        with userfault.map(src, readahead=False) as pager:
            base, touch, clock = pager.address, _native.touch, time.perf_counter_ns
            times = []
            total = 0
            for p in pages:
                t0 = clock()
                total += touch(base + p * PAGE, 1, PAGE, 0, 0, False)
                times.append(clock() - t0)
            floor = []
            for p in pages[:200]:  # the same call on a page now present: the timing's own cost
                t0 = clock()
                touch(base + p * PAGE, 1, PAGE, 0, 0, False)
                floor.append(clock() - t0)
        src.close()
        if total != sum(self.data[p * PAGE] for p in pages):
            raise SystemExit("fault latency run: wrong bytes")
        times.sort()
        floor.sort()
        return {"p50": percentile(times, 50), "p99": percentile(times, 99),
                "floor": percentile(floor, 50)}

    def read_run(self, make: Callable[[], Any], seed: int) -> dict[str, float]:
        pages = self.pages(seed)
        src = make()
        buf = bytearray(PAGE)
        mv = memoryview(buf)
        clock = time.perf_counter_ns
        times = []
        bad = 0
        for p in pages:
            t0 = clock()
            src.read_into(p * PAGE, mv)
            times.append(clock() - t0)
            bad += buf[0] != self.data[p * PAGE]
        src.close()
        if bad:
            raise SystemExit("read latency run: wrong bytes")
        times.sort()
        return {"p50": percentile(times, 50), "p99": percentile(times, 99), "floor": 0.0}

    def bench_latency(self) -> None:
        progress(f"latency: {self.args.pages} random 4 KiB pages")
        seeds = iter(range(10**6))
        got = self.interleave([
            ("map", lambda: self.fault_run(next(seeds))),
            ("source", lambda: self.read_run(self.source, next(seeds))),
            ("raw", lambda: self.read_run(lambda: RawClient(self.raw_port), next(seeds))),
        ])
        raw = got["raw"]
        rows = []
        for key, label in (("map", "fault through userfault.map(PageServerSource)"),
                           ("source", "PageServerSource.read_into (4 KiB)"),
                           ("raw", "reference: plain socket 4 KiB request/response")):
            g = got[key]
            rows.append([label, g["p50"], g["p50"] / raw["p50"], g["p99"], g["p99"] / raw["p99"]])
        self.add_table(f"4 KiB first-touch latency on loopback, authenticated (µs, median of "
                       f"{self.args.repeat} runs of {self.args.pages} pages; timer floor "
                       f"{got['map']['floor']:.1f} µs)",
                       ["case", "p50 µs", "x ref", "p99 µs", "x ref"], rows)
        m = got["map"]
        self.verdict("fault p50 <= 150 µs", m["p50"] <= 150, f"{m['p50']:.1f} µs")
        self.verdict("fault p99 <= 1 ms", m["p99"] <= 1000, f"{m['p99']:.1f} µs")

    # -- throughput ----------------------------------------------------------------------------

    def seq_source_run(self, tls: bool = False) -> dict[str, float]:
        src = self.source(tls)
        out = bytearray(self.size)
        t0 = time.perf_counter()
        src.read_many([(0, memoryview(out))], urgent=False)
        secs = time.perf_counter() - t0
        src.close()
        if hashlib.sha256(out).digest() != self.digest:
            raise SystemExit("sequential read_many: wrong bytes")
        return {"gbs": self.size / secs / 1e9}

    def seq_map_run(self) -> dict[str, float]:
        src = self.source()
        with userfault.map(src) as pager:
            t0 = time.perf_counter()
            total = _native.touch(pager.address, self.size, PAGE, 0, 0, False)
            secs = time.perf_counter() - t0
        src.close()
        if total != sum(self.data[::PAGE]):
            raise SystemExit("sequential map: wrong bytes")
        return {"gbs": self.size / secs / 1e9}

    def seq_raw_run(self) -> dict[str, float]:
        c = RawClient(self.raw_port)
        out = bytearray(self.size)
        t0 = time.perf_counter()
        c.read_into(0, memoryview(out))
        secs = time.perf_counter() - t0
        c.close()
        if hashlib.sha256(out).digest() != self.digest:
            raise SystemExit("sequential raw: wrong bytes")
        return {"gbs": self.size / secs / 1e9}

    def bench_throughput(self) -> None:
        progress(f"sequential: {self.size // MiB} MiB")
        cases = [("source", self.seq_source_run), ("map", self.seq_map_run),
                 ("raw", self.seq_raw_run)]
        if self.args.tls:
            cases.insert(1, ("tls", lambda: self.seq_source_run(tls=True)))
        got = self.interleave(cases)
        raw = got["raw"]["gbs"]
        labels = {"source": "PageServerSource.read_many (one connection, pipelined)",
                  "tls": "PageServerSource.read_many over TLS (ufs://)",
                  "map": "userfault.map(PageServerSource), C loop touching every page",
                  "raw": "reference: plain socket, one sendfile of the whole file"}
        rows = [[labels[k], got[k]["gbs"], got[k]["gbs"] / raw] for k, _ in cases]
        self.add_table(f"Sequential {self.size // MiB} MiB on loopback (GB/s, median of "
                       f"{self.args.repeat})", ["case", "GB/s", "x ref"], rows)
        self.verdict("sequential read_many >= 1 GB/s", got["source"]["gbs"] >= 1,
                     f"{got['source']['gbs']:.2f} GB/s")
        self.verdict("sequential through userfault.map >= 1 GB/s", got["map"]["gbs"] >= 1,
                     f"{got['map']['gbs']:.2f} GB/s")

    verdicts: list[tuple[str, bool, str]] = []

    def verdict(self, target: str, ok: bool, value: str) -> None:
        self.verdicts.append((target, ok, value))


def make_cert(work: Path) -> tuple[Path, Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise SystemExit("--tls needs the openssl command")
    key, cert = work / "key.pem", work / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=bench", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, cert, key  # self-signed: the certificate is its own CA


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("256M"))
    ap.add_argument("--pages", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--only", default="latency,throughput")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    info = machine()
    print("# bench_remote: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            if "latency" in args.only:
                bench.bench_latency()
            if "throughput" in args.only:
                bench.bench_throughput()
        finally:
            bench.close()
    print("\n## Targets (issue 11)\n")
    print(table(["target", "measured", "met"],
                [[t, v, "yes" if ok else "NO"] for t, ok, v in bench.verdicts],
                markdown=args.markdown))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
