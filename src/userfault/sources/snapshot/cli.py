"""``userfault snapshot create|inspect|flatten``: the command line of the snapshot format."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..._progress import add_progress_arguments, progress
from ..._units import human, size_arg
from .format import SnapshotInfo
from .reader import inspect_chain
from .writer import create_snapshot, flatten_snapshot
from .written import load_written

#: why ``create --base`` needs ``--changed``
NEEDS_CHANGED = (
    "--base needs --changed FILE: a delta holds the pages written since the base as write "
    "tracking found them (userfault does not find them by comparing SRC with the base, which "
    "would read and decompress all of both). Save the ranges where the memory is tracked: "
    "save_written(FILE, tracker.written_ranges()) (userfault.sources.snapshot, with a "
    "userfault.tracking.WriteTracker), or give the SCRATCH.written file of a DeltaSource; one "
    "'OFFSET LENGTH' line per range")

__all__ = ["add_snapshot_commands"]


def _cmd_create(args: argparse.Namespace) -> int:
    from ...cli import error_text

    if (args.base is None) != (args.changed is None):
        args.create_parser.error(  # exits 2, after the usage
            NEEDS_CHANGED if args.changed is None else
            "--changed needs --base BASE.ufs: the snapshot the written ranges are relative to")
    try:
        written = None if args.changed is None else load_written(args.changed)
        with progress("compressing", enabled=False if args.quiet else args.progress) as bar:
            info = create_snapshot(args.src, args.dest, chunk_size=args.chunk_size,
                                   level=args.level, progress=bar, threads=args.threads,
                                   size=args.size, base=args.base, written=written)
    except (OSError, ValueError, TypeError, ImportError) as err:
        print(f"userfault snapshot create: error: {error_text(err)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    elif not args.quiet and info.base:
        print(f"{info.path}: delta of {info.base}: {info.stored_chunks} of {info.chunk_count} "
              f"chunks of {human(info.chunk_size)} stored ({info.inherited_chunks} inherited) -> "
              f"{human(info.file_bytes)}, {info.seconds:.2f} s")
    elif not args.quiet:
        _print_written(info)
    return 0


def _print_written(info: SnapshotInfo) -> None:
    rate = info.size / info.seconds / 1e6 if info.seconds > 0 else 0.0
    print(f"{info.path}: {human(info.size)} in {info.chunk_count} chunks of "
          f"{human(info.chunk_size)} ({info.zero_chunks} zero, {info.raw_chunks} raw) -> "
          f"{human(info.file_bytes)}, ratio {info.ratio:.2f}x, {info.seconds:.2f} s, "
          f"{rate:.1f} MB/s")


def _cmd_flatten(args: argparse.Namespace) -> int:
    from ...cli import error_text

    try:
        with progress("flattening", enabled=False if args.quiet else args.progress) as bar:
            info = flatten_snapshot(args.file, args.dest, level=args.level, progress=bar,
                                    threads=args.threads, base=args.base)
    except (OSError, ValueError, ImportError) as err:
        print(f"userfault snapshot flatten: error: {error_text(err)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    elif not args.quiet:
        _print_written(info)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ...cli import error_text

    try:
        chain = inspect_chain(args.file, verify=args.verify, base=args.base)
    except (OSError, ValueError, ImportError) as err:
        if args.json:
            print(json.dumps({"path": args.file, "error": error_text(err)}))
        print(f"userfault snapshot inspect: error: {error_text(err)}", file=sys.stderr)
        return 1
    info = chain[0]
    if args.json:
        doc = info.to_dict()
        if len(chain) > 1:
            doc["chain"] = [link.to_dict() for link in chain]
        print(json.dumps(doc, indent=2))
        return 0
    kinds = f"{info.zstd_chunks} zstd, {info.raw_chunks} raw, {info.zero_chunks} zero"
    if info.base:
        kinds += f", {info.inherited_chunks} inherited from the base"
    rows = [
        ("file", info.path),
        ("format version", str(info.version)),
        ("size", f"{info.size} bytes ({human(info.size)})"),
        ("chunk size", f"{info.chunk_size} bytes ({human(info.chunk_size)})"),
        ("chunks", f"{info.chunk_count} ({kinds})"),
        ("compressed", f"{info.compressed_bytes} bytes ({human(info.compressed_bytes)})"),
        ("file size", f"{info.file_bytes} bytes ({human(info.file_bytes)})"),
        ("ratio", f"{info.ratio:.2f}x" + (" (the whole size over this file's: a delta holds "
                                          "only its chunks)" if info.base else "")),
        ("zstd level", str(info.level)),
    ]
    if len(chain) > 1:
        rows.append(("chain", f"{len(chain)} links, each checked against its base (identity, "
                              "size, chunk size)"))
        for link in chain:
            what = f"delta, {link.stored_chunks} of {link.chunk_count} chunks stored, " \
                f"{link.inherited_chunks} inherited" if link.base else "full snapshot"
            rows.append(("", f"{link.path}: {human(link.file_bytes)}, {what}"))
    if args.verify:
        rows.append(("verified", "all chunks OK" if len(chain) == 1 else
                     f"all chunks of all {len(chain)} links OK"))
    for key, value in rows:
        print(f"{key + ':' if key else '':16} {value}")
    return 0


def _add_writing_options(parser: argparse.ArgumentParser) -> None:
    """The options of every command that writes a snapshot: compression, progress, summary."""
    parser.add_argument("--level", type=int, default=3, metavar="N",
                        help="zstd level (default 3)")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="compression threads: 0 = none (default), -1 = one per CPU")
    add_progress_arguments(parser)
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bar and no summary")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def add_snapshot_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``snapshot create``, ``inspect`` and ``flatten`` to an argparse ``subparsers`` object.

    Each leaf parser sets ``func`` (``func(args) -> int`` exit status) as a default; the main
    CLI calls ``args.func(args)``. Returns the ``snapshot`` parser.
    """
    snap = subparsers.add_parser(
        "snapshot", help="create and inspect compressed snapshots",
        description="Compressed, chunked, randomly readable snapshots of files or memory.")
    sub = snap.add_subparsers(dest="snapshot_command", metavar="{create,inspect,flatten}")
    sub.required = True

    create = sub.add_parser(
        "create", help="compress a file into a snapshot, or a delta over a base",
        description="Compress SRC into the snapshot DEST (written atomically). With --base and "
        "--changed, DEST is a delta: only the chunks holding the pages written since BASE (as "
        "write tracking listed them in the --changed file), the rest read from BASE.")
    create.add_argument("src", metavar="SRC", help="file or block device to snapshot (a FIFO "
                        "or character device with --size)")
    create.add_argument("dest", metavar="DEST", help="snapshot file to write (e.g. mem.ufs)")
    create.add_argument("--chunk-size", type=size_arg, default=None,
                        metavar="SIZE",
                        help="chunk size, a power of two from 4K to 64M (default 64K: a fault "
                        "decompresses one chunk; a delta has its base's)")
    create.add_argument("--size", type=size_arg, default=None, metavar="SIZE",
                        help="snapshot only the first SIZE bytes of SRC; needed for a FIFO or "
                        "character device, which have no size")
    create.add_argument("--base", metavar="BASE.ufs", default=None,
                        help="write a delta over this snapshot (full or itself a delta); SRC "
                        "is the memory image now, at least BASE's size")
    create.add_argument("--changed", metavar="FILE", default=None,
                        help="with --base: the ranges written since BASE, from write tracking "
                        "(one 'OFFSET LENGTH' line per range, as save_written writes them)")
    _add_writing_options(create)
    create.set_defaults(func=_cmd_create, create_parser=create)

    inspect = sub.add_parser("inspect", help="describe (and verify) a snapshot or a chain",
                             description="Describe the snapshot FILE; of a delta, every link "
                             "of its chain, each checked against its base.")
    inspect.add_argument("file", metavar="FILE")
    inspect.add_argument("--verify", action="store_true",
                         help="decompress every chunk (of every link) and check its checksums")
    inspect.add_argument("--base", metavar="BASE.ufs", default=None,
                         help="a delta's base, instead of the path it records")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=_cmd_inspect)

    flatten = sub.add_parser("flatten", help="write a chain of deltas as one full snapshot",
                             description="Write the snapshot FILE (a delta: its whole chain) "
                             "as the full snapshot DEST (written atomically).")
    flatten.add_argument("file", metavar="FILE")
    flatten.add_argument("dest", metavar="DEST")
    flatten.add_argument("--base", metavar="BASE.ufs", default=None,
                         help="FILE's base, instead of the path it records")
    _add_writing_options(flatten)
    flatten.set_defaults(func=_cmd_flatten)
    return snap  # type: ignore[no-any-return]
