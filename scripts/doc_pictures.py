"""Regenerate the pictures of docs/tracing.md and docs/working-sets.md from real runs.

Usage: PYTHONPATH=src python scripts/doc_pictures.py [--out docs/img]

1. docs/img/trace-workload.png: examples/trace_a_workload.py (three reader threads over a
   64 MiB file), traced by the engine (``trace=``), then ``userfault plot``.
2. docs/img/working-set-weights.png: 15 % of the tensors of a 256 MiB safetensors checkpoint
   read lazily over HTTP from a private nginx (examples/weights_over_http.py), traced, then
   plotted; the trace becomes a working set, and a cold load with that set prefetched is
   timed against a plain lazy one (medians of 5, printed).

The weights trace is the pager's fault log (``log_faults``) converted with
:func:`userfault.trace.write_fault_log` (one FAULT record per logged fault; readahead is off
while recording so that every touched page faults and the working set holds exactly them).
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from userfault.cli import main as cli
from userfault.trace import TraceMeta, read, write_fault_log
from userfault.working_set import from_trace, read_working_set, write_working_set

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from servers import NginxServer  # noqa: E402  (tests/ is not a package)

PAGE = 4096


def load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def workload_picture(out: Path, tmp: Path) -> None:
    trace = tmp / "workload.uftrace"
    subprocess.run([sys.executable, str(ROOT / "examples" / "trace_a_workload.py"),
                    str(trace)], check=True)
    cli(["stats", str(trace)])
    cli(["plot", str(trace), "-o", str(out / "trace-workload.png")])


def weights_picture(out: Path, tmp: Path) -> None:
    ex = load("weights_over_http")
    www = tmp / "www"
    www.mkdir()
    ckpt = www / "model.safetensors"
    ex.make_checkpoint(str(ckpt), 256 << 20)
    (tmp / "nginx").mkdir()
    with NginxServer(www, workdir=tmp / "nginx") as nginx:
        url = nginx.url(ckpt.name)
        with ex.LazyCheckpoint(str(ckpt)) as local:
            names = list(local.names)
        touched = sorted(random.Random(7).sample(names, len(names) * 15 // 100),
                         key=names.index)
        trace = tmp / "weights.uftrace"
        with ex.LazyCheckpoint(url, readahead=False,
                               log_faults=(ckpt.stat().st_size // PAGE) + 1) as lazy:
            meta = TraceMeta.now(url, lazy.pager.size, PAGE,
                                 source_size=ckpt.stat().st_size,
                                 workload="15 % of the tensors, file order")
            ex.read_all(lazy, touched)
            faults = lazy.pager.faults()
        write_fault_log(trace, meta, faults, PAGE)
        cli(["stats", str(trace)])
        cli(["plot", str(trace), "-o", str(out / "working-set-weights.png")])
        ws_path = tmp / "weights.ws"
        cli(["workingset", "from-trace", str(trace), "-o", str(ws_path)])
        cli(["workingset", "inspect", str(ws_path)])
        ws = read_working_set(ws_path).check_compatible(ckpt.stat().st_size, PAGE, url)

        def cold(prefetch: bool) -> float:
            t0 = time.perf_counter()
            with ex.LazyCheckpoint(url) as c:
                if prefetch:
                    c.pager.prefetch(ws.ranges())
                ex.read_all(c, touched)
            return time.perf_counter() - t0

        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(5):
            for mode in (False, True):
                runs[mode].append(cold(mode))
        lazy_s, ws_s = statistics.median(runs[False]), statistics.median(runs[True])
        print(f"cold load of the touched tensors over HTTP, medians of 5: lazy {lazy_s:.3f} s,"
              f" working set prefetched {ws_s:.3f} s ({lazy_s / ws_s:.2f}x)")
        assert from_trace(read(trace)).offsets == ws.offsets
        write_working_set(tmp / "again.ws", ws)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        workload_picture(out, Path(tmp))
        weights_picture(out, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
