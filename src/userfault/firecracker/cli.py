"""``userfault firecracker serve``: the command line of :mod:`userfault.firecracker.server`."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from .._progress import add_progress_arguments
from .._units import parse_size
from .server import DEFAULT_MAX_CONNECTIONS

__all__ = ["add_firecracker_commands"]


def _size(text: str, *, allow_zero: bool = False) -> int:
    try:
        value = parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if value < 0 or (value == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _size_or_zero(text: str) -> int:
    return _size(text, allow_zero=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _thread_count(text: str) -> int:
    value = _positive_int(text)
    if value > 64:
        raise argparse.ArgumentTypeError(f"must be between 1 and 64, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def _readahead(text: str) -> tuple[int, int] | bool:
    if text.lower() in ("off", "no", "0", "none"):
        return False
    lo, sep, hi = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"readahead is MIN:MAX (e.g. 64K:4M) or off: {text!r}")
    return _size(lo), _size(hi)


def _serve(args: argparse.Namespace) -> int:
    from .server import FirecrackerPager

    if args.max_vms is not None and args.max_vms > args.max_connections:
        print(f"userfault firecracker serve: error: --max-vms {args.max_vms} is more than "
              f"--max-connections {args.max_connections} allows: raise --max-connections too",
              file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    pager = FirecrackerPager(
        args.socket, args.mem_file, record=args.record, prefetch=args.prefetch,
        prefetch_concurrent=args.prefetch_concurrent, prefetch_gap=args.prefetch_gap,
        force_prefetch=args.force_prefetch,
        populate=args.populate, progress=args.progress,
        threads=args.threads, max_vms=args.max_vms, max_connections=args.max_connections,
        once=args.once, chunk=args.chunk,
        readahead=args.readahead, json_out=sys.stdout if args.json else None,
        redis_prefix=args.redis_prefix, handshake_timeout=args.handshake_timeout,
        secret_file=args.secret_file, tls_ca=args.tls_ca)
    with pager:
        reports = pager.serve_forever(stop)
    failed = [r for r in reports if r.error and r.end_reason != "refused"]
    return 1 if failed and args.once else 0


def add_firecracker_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``firecracker serve`` to an argparse ``subparsers`` object; return its parser."""
    fc: argparse.ArgumentParser = subparsers.add_parser(
        "firecracker", help="serve Firecracker snapshot memory over userfaultfd",
        description="A page-fault handler for Firecracker's Uffd snapshot memory backend.")
    sub = fc.add_subparsers(dest="firecracker_command", metavar="{serve}")
    sub.required = True
    serve = sub.add_parser(
        "serve", help="listen on a Unix socket and serve restored VMs' memory",
        description="Listen on SOCKET (the snapshot load's mem_backend.backend_path) and serve "
        "each connecting VM's guest memory from MEM_FILE. Logs and one summary line per VM go "
        "to stderr; --json prints one JSON object per VM to stdout when it ends.")
    serve.add_argument("--socket", required=True, metavar="PATH",
                       help="Unix socket to create (a stale socket there is replaced; one "
                       "where a server still listens is refused)")
    serve.add_argument("--mem-file", required=True, metavar="FILE|URL",
                       help="snapshot memory: a file, a .ufs compressed snapshot, an "
                       "http(s):// URL, or redis://host:port/db#prefix")
    serve.add_argument("--record", metavar="FILE",
                       help="write the faulted memory-file offsets (the working set) here when "
                       "a VM ends; turns readahead off unless --readahead is given")
    serve.add_argument("--prefetch", metavar="FILE",
                       help="install this recorded working set in one batch at the handshake")
    serve.add_argument("--prefetch-concurrent", action="store_true",
                       help="serve faults while the --prefetch batch is installed (default: "
                       "the batch goes first, faults wait for it)")
    serve.add_argument("--prefetch-gap", type=_size_or_zero, default=0, metavar="SIZE",
                       help="bridge gaps up to SIZE between working-set pages so the batch "
                       "needs fewer install calls, installing the bridged pages too "
                       "(default 0: exactly the recorded set)")
    serve.add_argument("--force-prefetch", action="store_true",
                       help="use a --prefetch working set recorded against another memory file")
    serve.add_argument("--populate", action="store_true",
                       help="fill all guest memory in the background while faults go first")
    add_progress_arguments(serve)
    serve.add_argument("--json", action="store_true",
                       help="print one JSON object per VM to stdout when it ends")
    serve.add_argument("--threads", type=_thread_count, default=1, metavar="N",
                       help="fault-serving threads per VM (default 1)")
    serve.add_argument("--max-vms", type=_positive_int, default=None, metavar="N",
                       help="most VMs served at once; more connections are refused "
                       "(default: no limit but --max-connections)")
    serve.add_argument("--max-connections", type=_positive_int,
                       default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                       help="most connections open at once, handshaking or serving; more are "
                       f"closed at once (default {DEFAULT_MAX_CONNECTIONS})")
    serve.add_argument("--once", action="store_true",
                       help="serve one VM, exit when it ends")
    serve.add_argument("--chunk", type=_size, default=None, metavar="SIZE",
                       help="bytes installed per fault (default: one guest page)")
    serve.add_argument("--readahead", type=_readahead, default=None, metavar="MIN:MAX|off",
                       help="sequential readahead window (default 64K:4M; off with --record)")
    serve.add_argument("--redis-prefix", default=None, metavar="PREFIX",
                       help="key prefix for a redis:// memory file without a #prefix")
    serve.add_argument("--secret-file", default=None, metavar="FILE",
                       help="the shared secret of a uf:// (page server) memory file")
    serve.add_argument("--tls-ca", default=None, metavar="FILE",
                       help="the CA a ufs:// page server's certificate must chain to")
    serve.add_argument("--handshake-timeout", type=_seconds, default=5.0, metavar="SECONDS",
                       help="time a connection has to send its handshake (default 5)")
    serve.set_defaults(func=_serve)
    return fc
