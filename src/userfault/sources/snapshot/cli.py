"""``userfault snapshot create|inspect``: the command line of the snapshot format."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..._progress import add_progress_arguments, progress
from ..._units import human, size_arg
from .format import DEFAULT_CHUNK_SIZE
from .reader import inspect_snapshot
from .writer import create_snapshot

__all__ = ["add_snapshot_commands"]


def _cmd_create(args: argparse.Namespace) -> int:
    from ...cli import error_text

    try:
        with progress("compressing", enabled=False if args.quiet else args.progress) as bar:
            info = create_snapshot(args.src, args.dest, chunk_size=args.chunk_size,
                                   level=args.level, progress=bar, threads=args.threads,
                                   size=args.size)
    except (OSError, ValueError, TypeError, ImportError) as err:
        print(f"userfault snapshot create: error: {error_text(err)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    elif not args.quiet:
        rate = info.size / info.seconds / 1e6 if info.seconds > 0 else 0.0
        print(f"{info.path}: {human(info.size)} in {info.chunk_count} chunks of "
              f"{human(info.chunk_size)} ({info.zero_chunks} zero, {info.raw_chunks} raw) -> "
              f"{human(info.file_bytes)}, ratio {info.ratio:.2f}x, {info.seconds:.2f} s, "
              f"{rate:.1f} MB/s")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ...cli import error_text

    try:
        info = inspect_snapshot(args.file, verify=args.verify)
    except (OSError, ValueError, ImportError) as err:
        if args.json:
            print(json.dumps({"path": args.file, "error": error_text(err)}))
        print(f"userfault snapshot inspect: error: {error_text(err)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return 0
    rows = [
        ("file", info.path),
        ("format version", str(info.version)),
        ("size", f"{info.size} bytes ({human(info.size)})"),
        ("chunk size", f"{info.chunk_size} bytes ({human(info.chunk_size)})"),
        ("chunks", f"{info.chunk_count} ({info.zstd_chunks} zstd, {info.raw_chunks} raw, "
                   f"{info.zero_chunks} zero)"),
        ("compressed", f"{info.compressed_bytes} bytes ({human(info.compressed_bytes)})"),
        ("file size", f"{info.file_bytes} bytes ({human(info.file_bytes)})"),
        ("ratio", f"{info.ratio:.2f}x"),
        ("zstd level", str(info.level)),
    ]
    if args.verify:
        rows.append(("verified", "all chunks OK"))
    for key, value in rows:
        print(f"{key + ':':16} {value}")
    return 0


def add_snapshot_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``snapshot create`` and ``snapshot inspect`` to an argparse ``subparsers`` object.

    Each leaf parser sets ``func`` (``func(args) -> int`` exit status) as a default; the main
    CLI calls ``args.func(args)``. Returns the ``snapshot`` parser.
    """
    snap = subparsers.add_parser(
        "snapshot", help="create and inspect compressed snapshots",
        description="Compressed, chunked, randomly readable snapshots of files or memory.")
    sub = snap.add_subparsers(dest="snapshot_command", metavar="{create,inspect}")
    sub.required = True

    create = sub.add_parser("create", help="compress a file into a snapshot",
                            description="Compress SRC into the snapshot DEST (written atomically).")
    create.add_argument("src", metavar="SRC", help="file or block device to snapshot (a FIFO "
                        "or character device with --size)")
    create.add_argument("dest", metavar="DEST", help="snapshot file to write (e.g. mem.ufs)")
    create.add_argument("--chunk-size", type=size_arg, default=DEFAULT_CHUNK_SIZE,
                        metavar="SIZE",
                        help="chunk size, a power of two from 4K to 64M (default 64K: a fault "
                        "decompresses one chunk)")
    create.add_argument("--size", type=size_arg, default=None, metavar="SIZE",
                        help="snapshot only the first SIZE bytes of SRC; needed for a FIFO or "
                        "character device, which have no size")
    create.add_argument("--level", type=int, default=3, metavar="N",
                        help="zstd level (default 3)")
    create.add_argument("--threads", type=int, default=0, metavar="N",
                        help="compression threads: 0 = none (default), -1 = one per CPU")
    add_progress_arguments(create)
    create.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bar and no summary")
    create.add_argument("--json", action="store_true", help="print the summary as JSON")
    create.set_defaults(func=_cmd_create)

    inspect = sub.add_parser("inspect", help="describe (and verify) a snapshot",
                             description="Describe the snapshot FILE.")
    inspect.add_argument("file", metavar="FILE")
    inspect.add_argument("--verify", action="store_true",
                         help="decompress every chunk and check its checksums")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=_cmd_inspect)
    return snap  # type: ignore[no-any-return]
