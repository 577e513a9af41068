"""Model weights on demand: a real safetensors checkpoint loaded lazily through userfault.map
from nginx (HTTP), Redis and a compressed snapshot, against downloading it first.

Usage: PYTHONPATH=src python benchmarks/bench_weights.py [--size 2G] [--runs 3]
           [--subset 0.15] [--prompt 256] [--only http,redis,snapshot] [--dir DIR]
           [--no-verify] [--tuned piece=4M,readahead=1M:32M]

The checkpoint (float16 tensors shaped like a transformer's, written by the ``safetensors``
package; see examples/weights_over_http.py) is served by a private nginx and redis-server on
loopback (tests/servers.py) and compressed into a snapshot. Each run measures, per source:

* ``stream``: what the source alone delivers, reading the whole file sequentially with its
  ``read_many`` (4 MiB chunks, 8 per call) into a reused buffer;
* ``cold``: ``userfault.map`` + the safetensors header parsed from the mapping, with no pager
  process started ahead (an interpreter starts and imports userfault on the way);
* ``lazy``: the same with a spare pager process ready (``userfault.prestart(wait=30)``
  before each case; each map takes the spare and starts the next a second later), + every
  tensor copied out in file order: ``map+header``, time to the first tensor (from the ``map``
  call to its bytes copied out), time to all, bytes fetched; with the pager defaults (one
  serving thread, two background threads installing 512 KiB pieces, a Python source's
  default, readahead 64 KiB doubling to 4 MiB);
* ``willneed``: ``lazy`` with every tensor hinted in file order right after the header
  (``LazyCheckpoint(willneed=True)``: ``Pager.willneed`` of their byte ranges, so that the
  background threads read them ahead of the reader, from the first one on, instead of
  readahead ramping up behind its faults); the pager defaults otherwise;
* ``tuned``: ``lazy`` with ``--tuned`` options (default: 4 MiB pieces, readahead 1 MiB
  doubling to 32 MiB, so that each background read is one ``read_many`` large enough for
  the HTTP source to split over its connections);
* ``subset lazy`` / ``subset prefetch`` / ``subset ws`` / ``subset willneed``: whole
  tensors "a model touches" (a seeded random ``--subset`` fraction, read in file order),
  plainly lazily, after ``pager.prefetch(their byte ranges)``, with a working set recorded
  once beforehand (``record=``) and installed from the first fault on by the background
  threads (``prefetch=``: one batch, DONTWAKE then one WAKE, in first-touch order), and with
  ``willneed`` of them after the header; lazy and willneed with the pager defaults, prefetch
  and ws with the ``--tuned`` piece size (a large readahead window would fetch far past the
  small tensors' ends). Working sets are recorded with readahead off, so that they hold the
  pages touched and no others;
* ``prompt lazy`` / ``prompt ws`` / ``prompt willneed``: scattered touches, those of a
  prompt's forward pass outside the layers' big matrices: the embedding rows of ``--prompt``
  seeded token ids (one 4 KiB row each, in prompt order), both norms of every layer, and the
  lm_head rows of the same ids (scoring those tokens), each range copied out; lazily, with
  a working set recorded once, and with ``willneed`` of the ranges right after the header
  (all with the pager defaults);
* the reference, once per run: a plain HTTP GET of the whole file to a local file, then
  ``safetensors.numpy.load_file`` (time to the first tensor = time to all);
* the floors, once per run: the same copy-out from the checkpoint on local disk, cached,
  through the kernel's own ``mmap`` and through ``userfault.map(path)`` (a native file
  source): what no source over a network can beat on this machine.

Before each case the files it reads (the checkpoint nginx serves, the snapshot) are read
through once, so that each case finds them in the page cache: on the 2-vCPU VM of
BENCHMARKS.md the page cache shrinks with most memory free (the cause is not known; the VM
has a virtio-balloon device), and part of a 4 GiB file is otherwise read from disk in one
case and not in the next.

Cases run round-robin within a run; figures are medians over ``--runs``. Targets (issue 12):
first tensor <= 50 ms (for 4 GiB on loopback), all tensors >= 90 % of the source's stream,
working set >= 4x faster to the tensors a model touches than plain lazy loading (the
``subset`` and ``prompt`` tables).
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import mmap
import os
import random
import shutil
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import fmt, machine, median, progress, table

import userfault
from servers import NginxServer, RedisServer
from userfault._units import human, parse_size
from userfault.serving import process
from userfault.sources.open import open_source
from userfault.sources.redis import upload
from userfault.sources.snapshot import create_snapshot

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
LOCAL = "local file (cached)"
REDIS_PAGE = 64 << 10


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location(
        "weights_over_http", ROOT / "examples" / "weights_over_http.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


EX = load_example()


def stream_rate(spec: str, size: int) -> float:
    """Bytes/s the source delivers on its own, read front to back."""
    src: Any = open_source(spec)
    chunk, batch = 4 * MiB, 8
    buf = memoryview(bytearray(chunk * batch))
    t0 = time.perf_counter()
    for base in range(0, size, chunk * batch):
        reqs = [(o, buf[o - base: o - base + min(chunk, size - o)])
                for o in range(base, min(base + chunk * batch, size), chunk)]
        read_many = getattr(src, "read_many", None)
        if read_many is not None:
            read_many(reqs)
        else:
            for o, b in reqs:
                src.read_into(o, b)
    dt = time.perf_counter() - t0
    close = getattr(src, "close", None)
    if close is not None:
        close()
    return size / dt


def parse_options(text: str) -> dict[str, Any]:
    """``piece=4M,readahead=1M:32M,threads=2`` -> Pager keyword arguments."""
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        out[key] = tuple(value.split(":")) if ":" in value else \
            int(value) if value.isdigit() else value
    return out


def map_cold(spec: str) -> dict[str, float]:
    """map + header with no spare pager process (then one is started again for the rest)."""
    process.prestart(False)
    t0 = time.perf_counter()
    with EX.LazyCheckpoint(spec):
        dt = time.perf_counter() - t0
    userfault.prestart(wait=30)  # its imports done before the next case
    return {"open_s": dt}


def lazy_all(spec: str, **options: Any) -> dict[str, float]:
    t0 = time.perf_counter()
    with EX.LazyCheckpoint(spec, **options) as ckpt:
        t_open = time.perf_counter() - t0
        first = EX.read_all(ckpt, ckpt.names)
        t_all = time.perf_counter() - t0
        fetched = ckpt.pager.stats().bytes_installed
        size = ckpt.pager.size
    return {"open_s": t_open, "first_s": t_open + first, "all_s": t_all, "fetched": fetched,
            "rate": size / t_all}


def subset(spec: str, names: list[str], how: str, ws: Path,
           **options: Any) -> dict[str, float]:
    """The subset read lazily (``how="lazy"``), after ``pager.prefetch`` of its ranges
    (``"prefetch"``), with ``willneed`` of them (``"willneed"``) or with the working set at
    ``ws`` (``"ws"``)."""
    if how == "ws":
        options = {**options, "prefetch": str(ws)}
    t0 = time.perf_counter()
    with EX.LazyCheckpoint(spec, willneed=names if how == "willneed" else False,
                           **options) as ckpt:
        if how == "prefetch":
            ckpt.prefetch(names)
        EX.read_all(ckpt, names)
        dt = time.perf_counter() - t0
        fetched = ckpt.pager.stats().bytes_installed
    return {"s": dt, "fetched": fetched}


def prompt_ranges(ckpt: Any, ids: list[int]) -> list[tuple[int, int]]:
    """The bytes a prompt's forward pass touches outside the layers' big matrices, in the
    order it touches them: the embedding rows of its token ids, both norms of every layer,
    and the lm_head rows of the same ids (scores of those tokens only)."""
    def rows(name: str) -> list[tuple[int, int]]:
        offset, length = ckpt.byte_range(name)
        row = length // ckpt.entries[name]["shape"][0]
        return [(offset + i * row, row) for i in ids]

    norms = [ckpt.byte_range(n) for n in ckpt.names if n.endswith("norm.weight")]
    return rows("embed.weight") + norms + rows("lm_head.weight")


def prompt(spec: str, ids: list[int], how: str, ws: Path, **options: Any) -> dict[str, float]:
    """A prompt's scattered touches (:func:`prompt_ranges`, copied out one by one) read
    lazily (``how="lazy"``), with ``willneed`` of those ranges right after the header
    (``"willneed"``) or with the working set at ``ws`` (``"ws"``)."""
    if how == "ws":
        options = {**options, "prefetch": str(ws)}
    t0 = time.perf_counter()
    with EX.LazyCheckpoint(spec, **options) as ckpt:
        ranges = prompt_ranges(ckpt, ids)
        if how == "willneed":
            ckpt.pager.willneed(ranges)
        view = memoryview(ckpt.pager)
        for off, n in ranges:
            bytes(view[off: off + n])
        view.release()
        dt = time.perf_counter() - t0
        fetched = ckpt.pager.stats().bytes_installed
    return {"s": dt, "fetched": fetched}


def download_first(url: str, dest: Path) -> dict[str, float]:
    """A plain HTTP GET of the whole file to ``dest``, then safetensors.numpy.load_file."""
    from safetensors.numpy import load_file

    parts = urllib.parse.urlsplit(url)
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("GET", parts.path)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"GET {url}: {resp.status}")
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    with open(dest, "wb") as f:
        while True:
            n = resp.readinto(buf)
            if not n:
                break
            f.write(view[:n])
    conn.close()
    t_get = time.perf_counter() - t0
    tensors = load_file(str(dest))
    t_all = time.perf_counter() - t0
    nbytes = sum(t.nbytes for t in tensors.values())
    del tensors
    size = dest.stat().st_size
    dest.unlink()  # its dirty pages go unwritten, not flushed to disk during the next cases
    return {"get_s": t_get, "all_s": t_all, "get_rate": size / t_get, "nbytes": nbytes}


def warm(paths: list[Path]) -> None:
    """Read each file through once, so that the next case finds it in the page cache."""
    buf = bytearray(16 * MiB)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def kernel_mmap(path: Path) -> dict[str, float]:
    """The floor: every tensor copied out of the kernel's own mmap of the cached file."""
    import numpy as np

    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    view = memoryview(m)
    start, entries = EX.parse_header(view)
    first = 0.0
    for i, e in enumerate(sorted(entries.values(), key=lambda e: e["data_offsets"][0])):
        begin, end = e["data_offsets"]
        np.array(np.frombuffer(view, dtype=np.uint8, count=end - begin, offset=start + begin),
                 copy=True)
        if i == 0:
            first = time.perf_counter() - t0
    t_all = time.perf_counter() - t0
    view.release()
    m.close()
    return {"first_s": first, "all_s": t_all}


def verify(spec: str, path: Path, what: str) -> None:
    with EX.LazyCheckpoint(spec) as ckpt:
        wrong = EX.check(ckpt, str(path))
    if wrong:
        raise SystemExit(f"{what}: {len(wrong)} tensors differ from the file: {wrong[:3]}")
    progress(f"{what}: every tensor byte-exact")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", default="2G", help="checkpoint size (default 2G)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--subset", type=float, default=0.15,
                    help="fraction of the tensors 'a model touches' (default 0.15)")
    ap.add_argument("--prompt", type=int, default=256,
                    help="token ids of the prompt case (default 256)")
    ap.add_argument("--only", default="http,redis,snapshot")
    ap.add_argument("--dir", help="work directory (kept; an existing checkpoint of the same "
                                  "size is reused)")
    ap.add_argument("--no-verify", action="store_true", help="skip the byte-exact checks")
    ap.add_argument("--tuned", default="piece=4M,readahead=1M:32M",
                    help="pager options of the tuned and subset cases")
    args = ap.parse_args()
    tuned = parse_options(args.tuned)
    big_pieces = {k: v for k, v in tuned.items() if k == "piece"}
    size = parse_size(args.size)
    only = set(args.only.split(","))
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="uf-weights-"))
    www = work / "www"
    www.mkdir(parents=True, exist_ok=True)
    ckpt = www / "model.safetensors"
    info = machine()
    print(f"# bench_weights: {info['kernel']}, {info['nproc']} CPUs, {info['cpu']}, "
          f"{info['memory']}, python {info['python']}, {info['date']}")
    print(f"# /proc/loadavg at start: {Path('/proc/loadavg').read_text().strip()}")
    marker = work / f"model.{size}.ok"
    if not (ckpt.exists() and marker.exists()):
        progress(f"writing a {human(size)} safetensors checkpoint")
        EX.make_checkpoint(str(ckpt), size)
        marker.write_text("ok")
    fsize = ckpt.stat().st_size
    with EX.LazyCheckpoint(str(ckpt)) as local:
        names = list(local.names)
        sub = sorted(random.Random(7).sample(names, max(1, int(len(names) * args.subset))),
                     key=names.index)
        sub_bytes = sum(local.byte_range(n)[1] for n in sub)
        vocab = local.entries["embed.weight"]["shape"][0]
        ids = random.Random(11).sample(range(vocab), args.prompt)
        touched = prompt_ranges(local, ids)
    print(f"# checkpoint {human(fsize)}, {len(names)} float16 tensors; subset {len(sub)} "
          f"tensors, {human(sub_bytes)}; prompt {len(ids)} token ids: {len(touched)} ranges, "
          f"{human(sum(n for _, n in touched))}; {args.runs} runs, medians")

    specs: dict[str, str] = {}
    servers: list[Any] = []
    try:
        (work / "nginx").mkdir(exist_ok=True)
        nginx = NginxServer(www, workdir=work / "nginx").start()
        servers.append(nginx)
        url = nginx.url(ckpt.name)
        if "http" in only:
            specs["http (nginx)"] = url
        if "redis" in only:
            (work / "redis").mkdir(exist_ok=True)
            redis = RedisServer(work / "redis").start()
            servers.append(redis)
            progress(f"uploading to Redis ({REDIS_PAGE // 1024} KiB values)")
            upload(ckpt, redis.url, prefix="w:", page_size=REDIS_PAGE).close()
            specs[f"redis ({REDIS_PAGE // 1024} KiB values)"] = f"{redis.url}#w:"
        if "snapshot" in only:
            snap = work / "model.ufs"
            if not snap.exists() or snap.stat().st_mtime < ckpt.stat().st_mtime:
                progress("compressing a snapshot")
                create_snapshot(ckpt, snap, threads=-1)
            specs[f"snapshot ({human(snap.stat().st_size)} zstd)"] = str(snap)
        # the files each case reads: nginx's and the local ones the checkpoint, Redis none
        reads = {what: [Path(spec)] if spec.endswith(".ufs") else [] if spec.startswith(
            "redis") else [ckpt] for what, spec in specs.items()}
        if not args.no_verify:
            for what, spec in specs.items():
                verify(spec, ckpt, what)
        ws_files: dict[str, Path] = {}
        prompt_ws: dict[str, Path] = {}
        for i, (what, spec) in enumerate(specs.items()):
            ws_files[what] = work / f"subset.{i}.uws"
            prompt_ws[what] = work / f"prompt.{i}.uws"
            # readahead off: every page the subset touches faults, and nothing else is in the
            # set (a recording counts readahead installs as touched)
            with EX.LazyCheckpoint(spec, record=str(ws_files[what]), readahead=False) as rec:
                EX.read_all(rec, sub)
            with EX.LazyCheckpoint(spec, record=str(prompt_ws[what]), readahead=False) as rec:
                view = memoryview(rec.pager)
                for off, n in prompt_ranges(rec, ids):
                    bytes(view[off: off + n])
                view.release()
        progress("working sets recorded; a spare pager process started")
        userfault.prestart(wait=30)

        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        dl_path = work / "downloaded.safetensors"
        for run in range(args.runs):
            cases: list[tuple[str, str, Callable[[], dict[str, float]]]] = []
            for what, spec in specs.items():
                ws = ws_files[what]
                cases += [(what, "stream", lambda spec=spec: {"rate": stream_rate(spec, fsize)}),
                          (what, "cold", lambda spec=spec: map_cold(spec)),
                          (what, "lazy", lambda spec=spec: lazy_all(spec)),
                          (what, "tuned", lambda spec=spec: lazy_all(spec, **tuned))]
                cases.append((what, "willneed", lambda spec=spec: lazy_all(spec, willneed=True)))
                cases += [(what, f"subset {how}", lambda spec=spec, how=how, ws=ws: subset(
                               spec, sub, how, ws,
                               **({} if how in ("lazy", "willneed") else big_pieces)))
                          for how in ("lazy", "prefetch", "ws", "willneed")]
                cases += [(what, f"prompt {how}", lambda spec=spec, how=how: prompt(
                               spec, ids, how, prompt_ws[what])) for how in ("lazy", "ws",
                                                                                "willneed")]
            cases.append(("download first", "get+load_file", lambda: download_first(url, dl_path)))
            cases += [(LOCAL, "kernel mmap", lambda: kernel_mmap(ckpt)),
                      (LOCAL, "userfault.map", lambda: lazy_all(str(ckpt)))]
            for what, case, fn in cases:
                warm(reads.get(what, [ckpt]))
                # every case starts with a spare ready: a map right after another would start
                # a pager process of its own (the next spare starts a second after a map)
                userfault.prestart(wait=30)
                r = fn()
                results.setdefault((what, case), []).append(r)
                progress(f"run {run + 1}/{args.runs} {what} {case}: "
                         + ", ".join(f"{k} {fmt(v)}" for k, v in r.items()))
    finally:
        process.prestart(False)
        for s in reversed(servers):
            s.stop()
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    def med(what: str, case: str, key: str) -> float:
        return median([r[key] for r in results[(what, case)]])

    ref = "download first"
    ref_all = med(ref, "get+load_file", "all_s")
    rows, sub_rows, hint_rows, prompt_rows = [], [], [], []
    for what in specs:
        stream = med(what, "stream", "rate")
        first, all_s = med(what, "lazy", "first_s"), med(what, "lazy", "all_s")
        t_first, t_all = med(what, "tuned", "first_s"), med(what, "tuned", "all_s")
        rows.append([what, stream / MiB, med(what, "cold", "open_s") * 1e3,
                     med(what, "lazy", "open_s") * 1e3, first * 1e3, all_s,
                     f"{fsize / all_s / stream * 100:.0f} %", t_first * 1e3, t_all,
                     f"{fsize / t_all / stream * 100:.0f} %",
                     human(med(what, "lazy", "fetched")), f"{ref_all / min(first, t_first):.0f}x",
                     f"{ref_all / min(all_s, t_all):.2f}x"])
        h_first, h_all = med(what, "willneed", "first_s"), med(what, "willneed", "all_s")
        hint_rows.append([what, stream / MiB, first * 1e3, h_first * 1e3,
                          f"{first / h_first:.2f}x", all_s, h_all,
                          f"{fsize / all_s / stream * 100:.0f} %",
                          f"{fsize / h_all / stream * 100:.0f} %",
                          human(med(what, "willneed", "fetched"))])
        lazy_sub = med(what, "subset lazy", "s")
        pf_sub, ws_sub = med(what, "subset prefetch", "s"), med(what, "subset ws", "s")
        wn_sub = med(what, "subset willneed", "s")
        sub_rows.append([what, lazy_sub, pf_sub, ws_sub, wn_sub, f"{lazy_sub / pf_sub:.2f}x",
                         f"{lazy_sub / ws_sub:.2f}x", f"{lazy_sub / wn_sub:.2f}x",
                         human(med(what, "subset ws", "fetched")),
                         f"{lazy_sub * stream / sub_bytes:.2f}x"])
        lazy_p, ws_p = med(what, "prompt lazy", "s"), med(what, "prompt ws", "s")
        wn_p = med(what, "prompt willneed", "s")
        prompt_rows.append([what, lazy_p * 1e3, ws_p * 1e3, wn_p * 1e3, f"{lazy_p / ws_p:.2f}x",
                            f"{lazy_p / wn_p:.2f}x", human(med(what, "prompt lazy", "fetched")),
                            human(med(what, "prompt ws", "fetched"))])
    rows.append([f"{ref} (GET {med(ref, 'get+load_file', 'get_rate') / MiB:.0f} MiB/s)",
                 med(ref, "get+load_file", "get_rate") / MiB, "-", "-", ref_all * 1e3, ref_all,
                 "-", "-", "-", "-", human(fsize), "1x", "1x"])
    floor_rows = [[f"{LOCAL}: {case}", med(LOCAL, case, "first_s") * 1e3,
                   med(LOCAL, case, "all_s"), fsize / med(LOCAL, case, "all_s") / MiB]
                  for case in ("kernel mmap", "userfault.map")]
    floor_headers = ["floor", "first tensor ms", "all s", "all MiB/s"]
    headers = ["source", "stream MiB/s", "map+header cold ms", "map+header ms",
               "first tensor ms", "all s", "all / stream", "tuned: first ms", "tuned: all s",
               "tuned: all / stream", "fetched", "ref / first", "ref / all"]
    hint_headers = ["source", "stream MiB/s", "lazy: first ms", "willneed: first ms",
                    "lazy / willneed first", "lazy: all s", "willneed: all s", "lazy: all / stream",
                    "willneed: all / stream", "willneed fetched"]
    sub_headers = ["source", "subset lazy s", "subset prefetch s", "subset ws s",
                   "subset willneed s", "lazy / prefetch", "lazy / ws", "lazy / willneed",
                   "ws fetched", "ceiling: lazy / stream time"]
    prompt_headers = ["source", "prompt lazy ms", "prompt ws ms", "prompt willneed ms",
                      "lazy / ws", "lazy / willneed", "lazy fetched", "ws fetched"]
    for h, r in ((headers, rows), (hint_headers, hint_rows), (sub_headers, sub_rows),
                 (prompt_headers, prompt_rows), (floor_headers, floor_rows)):
        print(table(h, r))
        print()
        print(table(h, r, markdown=True))
        print()
    print(f"\n# /proc/loadavg at end: {Path('/proc/loadavg').read_text().strip()}")
    print("# targets: first tensor <= 50 ms (4 GiB); all / stream >= 90 %; lazy / ws >= 4x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
