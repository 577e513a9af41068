"""``userfault migrate send|receive``: move a memory image between hosts, live-migration style.

``send`` loads an image file into memory and migrates it to the first destination that
authenticates; ``receive`` pulls it, checks it against the sender's digest and writes it out.
From Python, :mod:`userfault.migrate` migrates memory that is being written meanwhile.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from ..region import Region

__all__ = ["add_migrate_commands"]


def _log_setup(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, stream=sys.stderr,
                        format="userfault migrate: %(levelname)s %(message)s")


def _print_report(report: Any, as_json: bool) -> None:
    print(json.dumps(report.as_dict()) if as_json else report.summary(), flush=True)


def _failed(args: argparse.Namespace, err: BaseException) -> int:
    print(f"userfault migrate {args.migrate_command}: error: {err}", file=sys.stderr)
    return 1


def _send(args: argparse.Namespace) -> int:
    from ..remote.auth import load_secret
    from . import MigrationError, MigrationSender

    _log_setup(args.verbose)
    secret = load_secret(args.secret_file)
    size = os.path.getsize(args.image)
    if size == 0:
        raise ValueError(f"{args.image!r} is empty: nothing to migrate")
    with Region.anonymous(size) as region:
        with open(args.image, "rb") as f, memoryview(region) as view:
            got = f.readinto(view[:size])
            if got != size:
                raise OSError(f"{args.image!r}: read {got} of {size} bytes (it changed?)")
        with MigrationSender(region, secret=secret, name=args.name, max_rounds=args.max_rounds,
                             max_dirty=args.max_dirty) as sender:
            for ep in sender.start(*args.listen):
                print(f"listening on {ep}", flush=True)
            try:
                _print_report(sender.wait(args.timeout), args.json)
            except MigrationError as err:
                return _failed(args, err)
            # the destination's connections are still open, as they should be: closing them
            # is not worth a warning each
            logging.getLogger("userfault.remote.server").setLevel(logging.ERROR)
    return 0


def _receive(args: argparse.Namespace) -> int:
    from . import MigrationError, receive

    _log_setup(args.verbose)
    try:
        return _receive_into(args, receive)
    except MigrationError as err:
        return _failed(args, err)


def _receive_into(args: argparse.Namespace, receive: Any) -> int:
    with receive(args.url, secret_file=args.secret_file, tls_ca=args.tls_ca,
                 reconnect_timeout=args.reconnect_timeout, digest=not args.no_verify) as incoming:
        report = incoming.wait(args.timeout)
        if not args.no_verify:
            incoming.verify()
        assert incoming.memory is not None
        with open(args.output, "wb") as f, memoryview(incoming.memory) as view:
            f.write(view)
        _print_report(report, args.json)
    return 0


def add_migrate_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``migrate send`` and ``migrate receive`` to an argparse ``subparsers`` object."""
    migrate = subparsers.add_parser(
        "migrate", help="live-migrate memory between hosts over the page server",
        description="Move a memory image from one host to another with pre-copy rounds and "
        "post-copy (see docs/migration.md). Both sides need the same --secret-file.")
    sub = migrate.add_subparsers(dest="migrate_command", required=True, metavar="SIDE")
    send = sub.add_parser(
        "send", help="serve an image until a destination has received it",
        description="Load IMAGE into memory and migrate it to the first destination that "
        "authenticates; prints 'listening on ADDRESS', then the report once the destination "
        "has every page. The destination receives the image rounded up to whole pages.")
    send.add_argument("image", help="the memory image (a file)")
    send.add_argument("--listen", action="append", required=True, metavar="ADDRESS",
                      help="tcp://HOST:PORT (port 0: any free port) or unix:PATH; repeatable")
    send.add_argument("--secret-file", required=True, metavar="FILE",
                      help="the shared secret (at least 16 bytes; not readable by others)")
    send.add_argument("--name", default="migration",
                      help="the export name, the last part of the destination's URL "
                      "(default: migration)")
    send.add_argument("--max-rounds", type=int, default=8, metavar="N",
                      help="pre-copy rounds after the full copy, at most (default 8)")
    send.add_argument("--max-dirty", type=int, default=1 << 20, metavar="BYTES",
                      help="stop pre-copy once a round has at most this much to send "
                      "(default 1 MiB)")
    send.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                      help="give up if no destination completes within this time")
    send.add_argument("--json", action="store_true", help="print the report as JSON")
    send.add_argument("--verbose", "-v", action="store_true")
    send.set_defaults(func=_send)
    recv = sub.add_parser(
        "receive", help="receive a migrating image and write it to a file",
        description="Receive the region a 'migrate send' serves at URL "
        "(uf://HOST:PORT/NAME, ufs:// with TLS), check it against the sender's digest and "
        "write it to --output; prints the report.")
    recv.add_argument("url", help="uf://HOST:PORT/NAME of the sender")
    recv.add_argument("--secret-file", required=True, metavar="FILE", help="the shared secret")
    recv.add_argument("--output", "-o", required=True, metavar="FILE",
                      help="where to write the memory received")
    recv.add_argument("--tls-ca", metavar="PEM", help="CA bundle for a ufs:// sender")
    recv.add_argument("--reconnect-timeout", type=float, default=30.0, metavar="SECONDS",
                      help="how long to keep reconnecting to a sender that went away "
                      "(default 30)")
    recv.add_argument("--no-verify", action="store_true",
                      help="skip the digest comparison with the sender")
    recv.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                      help="give up if the migration does not complete within this time")
    recv.add_argument("--json", action="store_true", help="print the report as JSON")
    recv.add_argument("--verbose", "-v", action="store_true")
    recv.set_defaults(func=_receive)
    return migrate  # type: ignore[no-any-return]
