"""The `userfault` command: demo, features, snapshot, firecracker, serve."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


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

    parser.add_argument("--version", action="version", version=f"userfault {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="the man-page demo: a handler serves each page on touch")
    demo.add_argument("--pages", type=int, default=2, help="pages to touch (default 2)")
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
    from .remote.cli import add_serve_command

    add_serve_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError) as err:
        print(f"userfault {args.command}: error: {err}", file=sys.stderr)
        return 1
