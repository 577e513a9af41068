"""Compressed snapshots: a chunked, zstd-compressed, randomly readable file of page-able data.

:func:`create_snapshot` writes one (``*.ufs``) from a file or a buffer, or a delta holding only
the pages written since a base snapshot (``base=``, ``written=`` from write tracking, saved for
the command line by :func:`save_written`; :class:`DeltaSource` maps a snapshot writable and
commits the pages written as a delta); :class:`SnapshotSource` serves its pages to a pager
(a delta: its whole chain), :func:`inspect_snapshot` and :func:`inspect_chain` describe and
verify it, :func:`flatten_snapshot` turns a chain into one full snapshot. The file format is
documented in :mod:`userfault.sources.snapshot.format`.
"""

from __future__ import annotations

from .delta import DeltaSource
from .format import DEFAULT_CHUNK_SIZE, MAGIC, SnapshotInfo
from .reader import CacheStats, SnapshotReader, SnapshotSource, inspect_chain, inspect_snapshot
from .writer import create_snapshot, flatten_snapshot
from .written import load_written, save_written

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAGIC",
    "CacheStats",
    "DeltaSource",
    "SnapshotInfo",
    "SnapshotReader",
    "SnapshotSource",
    "create_snapshot",
    "flatten_snapshot",
    "inspect_chain",
    "inspect_snapshot",
    "load_written",
    "save_written",
]
