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

``--only migration`` (root: two network namespaces joined by a veth pair, tests/netns.py,
shaped with tbf to ``--link`` (1 Gbit/s by default)): live migration (:mod:`userfault.migrate`)
of ``--migrate-size`` (1 GiB) from host A to host B while a thread on A writes ``--dirty``
percent of the pages a second (tests/migrate_tasks.py; the pause hook stops it). Figures from
the sender's report: downtime, total time, bytes sent, rounds, remote faults. The reference:
the same number of bytes sent A -> B as one plain TCP full copy (``sendall`` of a buffer,
``recv_into`` on B: an ``scp``-like copy minus ssh) through the same shaped link. Every
migration is checked: the destination's digest must equal the contents rebuilt from the
writer's seed and count.
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


_COPY_SEND = r"""
import socket, sys
size = int(sys.argv[2])
buf = bytearray(size)
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
c, _ = srv.accept()
c.sendall(buf)
c.close()
"""

_COPY_RECV = r"""
import socket, sys, time
size = int(sys.argv[3])
buf = bytearray(size)
view = memoryview(buf)
t0 = time.perf_counter()
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
got = 0
while got < size:
    k = c.recv_into(view[got:])
    if not k:
        sys.exit(f"closed after {got} bytes")
    got += k
print(time.perf_counter() - t0, flush=True)
"""

_LINK_BITS = {"k": 1e3, "m": 1e6, "g": 1e9}


def link_bytes_per_second(rate: str) -> float:
    """``"1gbit"`` -> bytes a second."""
    num = rate.lower().removesuffix("bit")
    scale = _LINK_BITS.get(num[-1:], 1.0)
    return float(num.rstrip("kmg")) * scale / 8


class Migration:
    """Migrations between two namespaced hosts over a shaped link, and the plain copy."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        tests = Path(__file__).resolve().parent.parent / "tests"
        sys.path.insert(0, str(tests))
        from netns import TwoHosts  # the tests' namespaced hosts

        if os.geteuid() != 0:
            raise SystemExit("--only migration needs root (network namespaces)")
        self.args = args
        self.size = args.migrate_size
        self.tasks = str(tests / "migrate_tasks.py")
        self.secret = work / "migrate.secret"
        self.secret.write_bytes(SECRET)
        self.secret.chmod(0o600)
        self.hosts = TwoHosts().create()
        self.hosts.shape(rate=args.link, burst="1mb")
        self.rate = int(self.size // PAGE * args.dirty / 100)

    def close(self) -> None:
        self.hosts.destroy()

    def _line(self, p: subprocess.Popen[str], what: str) -> str:
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            raise SystemExit(f"{what} exited ({p.wait()}) without a line")
        return line.strip()

    def migrate_run(self) -> dict[str, float]:
        import json

        from migrate_tasks import expected

        h = self.hosts
        sender = h.popen(h.a, [sys.executable, self.tasks, "send", "--listen",
                               f"tcp://{h.address_a}:0", "--secret-file", str(self.secret),
                               "--size", str(self.size), "--rate", str(self.rate),
                               "--max-dirty", str(self.args.max_dirty)],
                         stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        port = int(self._line(sender, "sender").rsplit(":", 1)[1])
        receiver = h.popen(h.b, [sys.executable, self.tasks, "receive",
                                 f"uf://{h.address_a}:{port}/mem", "--secret-file",
                                 str(self.secret)],
                           stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert self._line(sender, "sender") == "paused"
        assert self._line(receiver, "receiver") == "running"
        got = json.loads(self._line(receiver, "receiver"))
        sent = json.loads(self._line(sender, "sender"))
        if receiver.wait(60) or sender.wait(60):
            raise SystemExit("a side of the migration failed")
        if got["digest"] != expected(self.size, 1, sent["writes"], 0):
            raise SystemExit("the migrated memory differs from the sender's")
        r = sent["report"]
        progress("  " + ", ".join(f"round {x['index']} {x['phase']}: {x['pages']} pages in "
                                  f"{x['seconds']:.3f} s" for x in r["rounds"]))
        return {"downtime_ms": r["downtime"] * 1e3, "total_s": r["total_time"],
                "round0_s": r["rounds"][0]["seconds"],
                "sent_mib": r["bytes_sent"] / MiB, "rounds": len(r["rounds"]),
                "dirty_at_stop": r["dirty_at_stop"], "remote_faults": r["remote_faults"],
                "writes": sent["writes"]}

    def copy_run(self) -> dict[str, float]:
        h = self.hosts
        srv = h.popen(h.a, [sys.executable, "-c", _COPY_SEND, h.address_a, str(self.size)],
                      stdout=subprocess.PIPE, text=True)
        port = self._line(srv, "copy sender")
        cli = h.run(h.b, [sys.executable, "-c", _COPY_RECV, h.address_a, port,
                          str(self.size)], timeout=600)
        srv.wait(60)
        if cli.returncode:
            raise SystemExit(f"the plain copy failed: {cli.stderr}")
        return {"total_s": float(cli.stdout.strip())}


def bench_migration(args: argparse.Namespace, work: Path,
                    verdict: Callable[[str, bool, str], None]) -> None:
    mig = Migration(args, work)
    try:
        runs: dict[str, list[dict[str, float]]] = {"migrate": [], "copy": []}
        for rep in range(args.repeat):
            progress(f"  rep {rep + 1}/{args.repeat}: migration of {args.migrate_size // MiB} "
                     f"MiB, {args.dirty:g} %/s dirtied")
            runs["migrate"].append(mig.migrate_run())
            progress(f"  rep {rep + 1}/{args.repeat}: plain full copy")
            runs["copy"].append(mig.copy_run())
    finally:
        mig.close()
    m = {k: median([r[k] for r in runs["migrate"]]) for k in runs["migrate"][0]}
    c = median([r["total_s"] for r in runs["copy"]])
    ideal = args.migrate_size / link_bytes_per_second(args.link)
    print(f"\n## Live migration of {args.migrate_size // MiB} MiB between two netns hosts, "
          f"link {args.link} (tbf), {args.dirty:g} %/s of the pages dirtied "
          f"(median of {args.repeat})\n")
    rows = [["migration: downtime (ms)", m["downtime_ms"], ""],
            ["migration: total time (s)", m["total_s"], m["total_s"] / c],
            ["migration: round 0, the full copy (s)", m["round0_s"], m["round0_s"] / c],
            ["migration: MiB sent", m["sent_mib"], ""],
            ["migration: rounds (pre-copy + post-copy)", m["rounds"], ""],
            ["migration: pages dirty at the stop", m["dirty_at_stop"], ""],
            ["migration: remote faults", m["remote_faults"], ""],
            ["migration: writes during the migration", m["writes"], ""],
            ["reference: plain full copy, one TCP stream (s)", c, 1.0],
            ["size / link bandwidth (s)", ideal, ideal / c]]
    print(table(["figure", "value", "x copy"], rows, markdown=args.markdown), flush=True)
    verdict("migration downtime <= 50 ms", m["downtime_ms"] <= 50, f"{m['downtime_ms']:.1f} ms")
    verdict("migration total <= 1.2 x size/bandwidth", m["total_s"] <= 1.2 * ideal,
            f"{m['total_s']:.2f} s = {m['total_s'] / ideal:.2f} x {ideal:.2f} s")


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
    ap.add_argument("--migrate-size", type=parse_size, default=parse_size("1G"))
    ap.add_argument("--dirty", type=float, default=1.0, help="%% of the pages written a second")
    ap.add_argument("--link", default="1gbit", help="tbf rate of the netns link")
    ap.add_argument("--max-dirty", type=parse_size, default=parse_size("1M"),
                    help="the sender stops pre-copy at this dirty set")
    args = ap.parse_args()
    info = machine()
    print("# bench_remote: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        if "latency" in args.only or "throughput" in args.only:
            bench = Bench(args, Path(tmp))
            try:
                if "latency" in args.only:
                    bench.bench_latency()
                if "throughput" in args.only:
                    bench.bench_throughput()
            finally:
                bench.close()
        if "migration" in args.only:
            bench_migration(args, Path(tmp), lambda *v: Bench.verdicts.append(v))
    print("\n## Targets (issue 11)\n")
    print(table(["target", "measured", "met"],
                [[t, v, "yes" if ok else "NO"] for t, ok, v in Bench.verdicts],
                markdown=args.markdown))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
