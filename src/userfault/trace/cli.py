"""``userfault trace``, ``plot``, ``stats`` and ``workingset from-trace|inspect``."""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import warnings
from typing import Any

from .._progress import add_progress_arguments, progress

__all__ = ["add_trace_commands", "add_working_set_commands"]

#: traces with at least this many records get a progress bar while they are binned
LARGE_TRACE = 1 << 20


def _read(path: str) -> Any:
    """Read a trace; a partial last record is reported on stderr, not raised."""
    from .reader import TruncatedTraceWarning, read

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncatedTraceWarning)
        trace = read(path)
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    return trace


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plot import bin_trace, write_html, write_png

    if not args.output and not args.html:
        raise ValueError("nothing to write: give -o OUT.png and/or --html OUT.html")
    trace = _read(args.trace)
    enabled = args.progress if len(trace) >= LARGE_TRACE or args.progress is not None \
        else False
    with progress("binning", unit="records", enabled=enabled) as bar:
        data = bin_trace(trace, time_bins=args.time_bins, offset_bins=args.offset_bins,
                         progress=bar)
    if args.output:
        write_png(data, args.output, width=args.width, height=args.height)
        print(f"wrote {args.output} ({args.width}x{args.height})")
    if args.html:
        write_html(data, args.html)
        print(f"wrote {args.html}")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from .stats import format_stats, summarize

    stats = summarize(_read(args.trace))
    print(json.dumps(stats.to_dict(), indent=2) if args.json else format_stats(stats))
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    from ..serving.observe import TRACE_ENV

    command = args.command_line[1:] if args.command_line[:1] == ["--"] else args.command_line
    if not command:
        raise ValueError("no command to trace: userfault trace -o FILE -- CMD ARGS...")
    out = os.path.abspath(args.output)
    for old in [out, *glob.glob(glob.escape(out) + ".*-*")]:  # this run's pagers claim them anew
        if os.path.exists(old):
            os.unlink(old)
    status = subprocess.call(command, env={**os.environ, TRACE_ENV: out})
    traces = sorted(p for p in [out, *glob.glob(glob.escape(out) + ".*-*")] if os.path.exists(p))
    if not traces:
        print(f"userfault trace: {command[0]} created no pager: nothing was traced",
              file=sys.stderr)
    for path in traces:
        from .stats import summarize

        s = summarize(_read(path))
        print(f"userfault trace: {path}: {s.records} records over {s.duration_ns / 1e9:.3f} s, "
              f"{s.distinct_pages} pages ({s.dropped} dropped)", file=sys.stderr)
    return status


def add_trace_commands(subparsers: Any) -> None:
    """Add ``trace``, ``plot`` and ``stats`` to an argparse ``subparsers`` object (each leaf
    parser sets ``func``, called as ``func(args) -> int``)."""
    trace = subparsers.add_parser(
        "trace", help="run a command, tracing every fault of its pagers",
        description="Run CMD with USERFAULT_TRACE=FILE: every pager it creates writes a trace "
                    "(the first to FILE, others to FILE.<pid>-<n>). Exits with CMD's status.")
    trace.add_argument("-o", "--output", required=True, metavar="FILE", help="trace file")
    trace.add_argument("command_line", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    trace.set_defaults(func=_cmd_trace)

    plot = subparsers.add_parser(
        "plot", help="pictures of a trace (PNG, offline HTML)",
        description="Draw a trace: a heatmap of source offset against time, a service-latency "
                    "histogram and the blocked time of each thread.")
    plot.add_argument("trace", metavar="TRACE")
    plot.add_argument("-o", "--output", metavar="OUT.png", help="PNG to write (matplotlib)")
    plot.add_argument("--html", metavar="OUT.html",
                      help="standalone interactive page to write (opens offline)")
    plot.add_argument("--width", type=int, default=1200, help="PNG width in pixels")
    plot.add_argument("--height", type=int, default=1000, help="PNG height in pixels")
    plot.add_argument("--time-bins", type=int, default=300, metavar="N")
    plot.add_argument("--offset-bins", type=int, default=150, metavar="N")
    add_progress_arguments(plot)
    plot.set_defaults(func=_cmd_plot)

    stats = subparsers.add_parser(
        "stats", help="summary table of a trace",
        description="Records, duration, events by kind and cause, bytes, distinct and "
                    "re-faulted pages, latency percentiles, blocked time per thread, drops.")
    stats.add_argument("trace", metavar="TRACE")
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(func=_cmd_stats)


def _cmd_ws_from_trace(args: argparse.Namespace) -> int:
    from ..working_set import from_trace, write_working_set

    trace = _read(args.trace)
    ws = from_trace(trace)
    write_working_set(args.output, ws)
    print(f"{args.output}: {len(ws)} pages ({ws.nbytes} bytes) in first-touch order, "
          f"{len(ws.ranges())} ranges, from {len(trace)} records of {ws.source!r}")
    if trace.dropped:
        print(f"warning: the trace dropped {trace.dropped} records: the working set may miss "
              "pages", file=sys.stderr)
    return 0


def _cmd_ws_inspect(args: argparse.Namespace) -> int:
    from ..working_set import describe, read_working_set

    ws = read_working_set(args.file)
    if args.json:
        print(json.dumps({"path": args.file, "format": ws.format, "source": ws.source,
                          "source_size": ws.source_size, "page_size": ws.page_size,
                          "fingerprint": ws.fingerprint, "pages": len(ws),
                          "ranges": ws.ranges(args.max_gap)}, indent=2))
        return 0
    for key, value in describe(ws, args.max_gap):
        print(f"{key + ':':13} {value}")
    return 0


def add_working_set_commands(subparsers: Any) -> None:
    """Add ``workingset from-trace`` and ``workingset inspect``."""
    ws = subparsers.add_parser(
        "workingset", help="make and inspect working sets",
        description="Working sets: the pages a run touched, in first-touch order, to prefetch "
                    "in one batch next time.")
    sub = ws.add_subparsers(dest="workingset_command", metavar="{from-trace,inspect}")
    sub.required = True
    make = sub.add_parser("from-trace", help="the faulted pages of a trace",
                          description="Write the pages TRACE faulted, in first-touch order.")
    make.add_argument("trace", metavar="TRACE")
    make.add_argument("-o", "--output", required=True, metavar="WS",
                      help="working-set file to write (atomically)")
    make.set_defaults(func=_cmd_ws_from_trace)
    inspect = sub.add_parser("inspect", help="describe a working set",
                             description="Describe the working-set FILE (also the Firecracker "
                                         "pager's older format).")
    inspect.add_argument("file", metavar="FILE")
    inspect.add_argument("--max-gap", type=int, default=0, metavar="BYTES",
                         help="bridge gaps up to this many bytes when counting ranges")
    inspect.add_argument("--json", action="store_true", help="print JSON (with the ranges)")
    inspect.set_defaults(func=_cmd_ws_inspect)
