"""The `userfault` command: demo, features, snapshot, firecracker, serve, migrate, plot,
stats, workingset."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "error_text", "main"]


def error_text(err: BaseException) -> str:
    """The sentence of an error for a command line: an ``OSError`` without its
    ``[Errno N]`` prefix (the path it names is kept)."""
    if isinstance(err, OSError) and err.strerror:
        text = str(err.strerror)
        if err.filename is not None and os.fsdecode(err.filename) not in text:
            text += f": {os.fsdecode(err.filename)!r}"
        return text
    return str(err)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.pages, delay=args.delay)
    return 0


def _features(args: argparse.Namespace) -> int:
    from .features import format_report, probe

    report = probe()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="userfault", description="On-demand paging from userland with userfaultfd.")
    from . import __version__
    from .demo import MAX_PAGES

    parser.add_argument("--version", action="version", version=f"userfault {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="the man-page demo: a handler serves each page on touch")
    demo.add_argument("--pages", type=int, default=2,
                      help=f"pages to touch, 1 to {MAX_PAGES} (default 2)")
    demo.add_argument("--delay", type=float, default=0.1,
                      help="seconds between reads (default 0.1)")
    demo.set_defaults(func=_demo)

    feats = sub.add_parser("features", help="what this kernel offers, and what to change")
    feats.add_argument("--json", action="store_true", help="machine-readable output")
    feats.set_defaults(func=_features)

    from .sources.snapshot.cli import add_snapshot_commands

    add_snapshot_commands(sub)
    from .firecracker.cli import add_firecracker_commands
    add_firecracker_commands(sub)
    from .trace.cli import add_trace_commands, add_working_set_commands

    add_trace_commands(sub)
    add_working_set_commands(sub)

    from .remote.cli import add_serve_command

    add_serve_command(sub)
    from .migrate.cli import add_migrate_commands

    add_migrate_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, ImportError) as err:  # ImportError: an optional extra
        print(f"userfault {args.command}: error: {error_text(err)}", file=sys.stderr)
        return 1
