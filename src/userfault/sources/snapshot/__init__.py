"""Compressed snapshots: a chunked, zstd-compressed, randomly readable file of page-able data.

:func:`create_snapshot` writes one (``*.ufs``) from a file or a buffer, :class:`SnapshotSource`
serves its pages to a pager, :func:`inspect_snapshot` describes and verifies it. The file
format is documented in :mod:`userfault.sources.snapshot.format`.
"""

from __future__ import annotations

from .format import DEFAULT_CHUNK_SIZE, MAGIC, SnapshotInfo
from .reader import CacheStats, SnapshotReader, SnapshotSource, inspect_snapshot
from .writer import create_snapshot

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAGIC",
    "CacheStats",
    "SnapshotInfo",
    "SnapshotReader",
    "SnapshotSource",
    "create_snapshot",
    "inspect_snapshot",
]
