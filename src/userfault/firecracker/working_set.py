"""Working-set files: the guest-memory pages a VM faulted, in first-fault order.

Written by ``--record``, installed in one batch by ``--prefetch``. Little-endian binary::

    offset 0   8 bytes  magic b"UFFCWS1\\0"
    offset 8   u64      page size in bytes (4096 or 2097152)
    offset 16  u64      count N
    offset 24  N x u64  memory-file offsets of the faulted pages, page aligned, unique,
                        in first-fault order
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable

from .._files import open_regular

__all__ = ["WORKING_SET_MAGIC", "coalesce", "read_working_set", "write_working_set"]

WORKING_SET_MAGIC = b"UFFCWS1\0"
_WS_HEADER = struct.Struct("<8sQQ")


def write_working_set(path: str | os.PathLike[str], offsets: Iterable[int],
                      page_size: int) -> int:
    """Write a working-set file atomically; return the number of offsets written."""
    offs = list(offsets)
    data = _WS_HEADER.pack(WORKING_SET_MAGIC, page_size, len(offs)) + struct.pack(
        f"<{len(offs)}Q", *offs)
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(offs)


def read_working_set(path: str | os.PathLike[str]) -> tuple[int, list[int]]:
    """Read a working-set file: ``(page_size, offsets)``.

    Raises:
        OSError: the file cannot be opened.
        ValueError: not a regular file, not a working-set file, truncated, or an offset that
            is not a multiple of the page size.
    """
    name = os.fspath(path)
    fd = open_regular(os.fsdecode(name), advice="name a working-set file written by --record")
    try:
        file_bytes = os.fstat(fd).st_size
        head = os.pread(fd, _WS_HEADER.size, 0)
        if len(head) < _WS_HEADER.size:
            raise ValueError(f"{name!r} is too short to be a working-set file")
        magic, page, count = _WS_HEADER.unpack(head)
        if magic != WORKING_SET_MAGIC:
            raise ValueError(f"{name!r} is not a working-set file (bad magic)")
        if page < 4096 or page & (page - 1):
            raise ValueError(f"{name!r}: page size {page} is not a power of two >= 4096")
        if file_bytes != _WS_HEADER.size + 8 * count:  # checked before reading: no huge reads
            raise ValueError(f"{name!r}: header says {count} offsets, the file holds "
                             f"{(file_bytes - _WS_HEADER.size) / 8:g}")
        data = os.pread(fd, 8 * count, _WS_HEADER.size)
    finally:
        os.close(fd)
    if len(data) != 8 * count:
        raise ValueError(f"{name!r} changed while being read")
    offsets = list(struct.unpack(f"<{count}Q", data))
    for i, off in enumerate(offsets):
        if off % page:
            raise ValueError(f"{name!r}: offset {i} ({off:#x}) is not a multiple of the page "
                             f"size {page}: the file is corrupted")
    return page, offsets


def coalesce(offsets: Iterable[int], page_size: int, max_gap: int = 0
             ) -> list[tuple[int, int]]:
    """Merge page offsets into sorted ``(offset, length)`` ranges.

    Pages closer than ``max_gap`` bytes are merged with the gap between them: one install
    ioctl costs about as much as copying a few pages, so bridging small gaps makes a batch of
    scattered pages faster, at the price of installing the bridged pages too.
    """
    ranges: list[list[int]] = []
    for off in sorted(set(offsets)):
        if ranges and ranges[-1][0] + ranges[-1][1] + max_gap >= off:
            ranges[-1][1] = max(ranges[-1][1], off + page_size - ranges[-1][0])
        else:
            ranges.append([off, page_size])
    return [(o, n) for o, n in ranges]
