"""``userfault serve``: run a page server from the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from .._units import human
from .auth import load_secret
from .exports import Export, open_export
from .protocol import check_export_name
from .ratelimit import RateLimit
from .server import PageServer, ServerLimits, log_loop_exception, tls_server_context

__all__ = ["add_serve_command"]


def _parse_exports(specs: list[str], writable: list[str]) -> list[tuple[str, str, bool]]:
    out: list[tuple[str, str, bool]] = []
    names: set[str] = set()
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq or not path:
            raise ValueError(f"export {spec!r}: write NAME=PATH (or NAME=URL)")
        check_export_name(name)
        if name in names:
            raise ValueError(f"export name {name!r} is given twice")
        names.add(name)
        out.append((name, path, name in writable))
    unknown = sorted(set(writable) - names)
    if unknown:
        raise ValueError(f"--writable names no export: {', '.join(unknown)}")
    return out


async def _serve(args: argparse.Namespace) -> int:
    exports = _parse_exports(args.exports, args.writable)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    tls = tls_server_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    limits = ServerLimits(max_connections=args.max_connections,
                          handshake_timeout=args.handshake_timeout, workers=args.workers)
    server = PageServer(load_secret(args.secret_file), tls=tls, limits=limits,
                        rate_limit=RateLimit())
    opened: list[Export] = []
    try:
        for name, path, writable in exports:
            opened.append(server.add_export(open_export(name, path, writable=writable)))
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(log_loop_exception)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        for e in opened:
            print(f"export {e.name}: {e.kind}, {e.size} bytes ({human(e.size)})"
                  f"{', writable' if e.writable else ''}", flush=True)
        bound = await server.start(*args.listen)
        for ep in bound:
            print(f"listening on {ep}{' (TLS)' if tls and ep.kind == 'tcp' else ''}", flush=True)
        await stop.wait()
    finally:
        await server.aclose()
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="userfault serve: %(levelname)s %(message)s")
    try:
        return asyncio.run(_serve(args))
    except (OSError, ValueError) as err:
        print(f"userfault serve: error: {err}", file=sys.stderr)
        return 1


def add_serve_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to an argparse ``subparsers`` object (it sets ``func``)."""
    serve = subparsers.add_parser(
        "serve", help="serve files, snapshots and sources to authenticated page clients",
        description="Serve NAME=PATH exports (files, block devices, *.ufs snapshots, or source "
        "URLs) to clients that prove they hold the secret. Clients read them as "
        "uf://HOST:PORT/NAME (ufs:// with TLS, uf+unix:///SOCKET/NAME). Prints one line per "
        "export, then one 'listening on ADDRESS' line per listener once it is serving.")
    serve.add_argument("exports", nargs="+", metavar="NAME=PATH",
                       help="an export: a name (letters, digits, '.', '_', '-') and a file, "
                       "block device, *.ufs snapshot or source URL")
    serve.add_argument("--listen", action="append", required=True, metavar="ADDRESS",
                       help="tcp://HOST:PORT (port 0: any free port) or unix:PATH; repeatable")
    serve.add_argument("--secret-file", required=True, metavar="FILE",
                       help="the shared secret (at least 16 bytes; not readable by others)")
    serve.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain")
    serve.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    serve.add_argument("--writable", action="append", default=[], metavar="NAME",
                       help="let clients write to export NAME; repeatable")
    serve.add_argument("--max-connections", type=int, default=1024, metavar="N",
                       help="connections at once (default 1024)")
    serve.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="time a client has to authenticate (default 10)")
    serve.add_argument("--workers", type=int, default=4, metavar="N",
                       help="threads for reads that block (disk, snapshots; default 4)")
    serve.add_argument("--verbose", "-v", action="store_true", help="log every connection")
    serve.set_defaults(func=_cmd_serve)
    return serve  # type: ignore[no-any-return]
