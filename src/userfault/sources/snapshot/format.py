"""The snapshot format: a chunked, zstd-compressed, randomly readable file of page-able data.

A snapshot (conventionally ``*.ufs``) holds the bytes of a file or of a memory buffer (a
:class:`~userfault.region.Region`, an ``mmap``, a numpy array...) cut into fixed-size chunks,
each compressed on its own, so that reading one page decompresses only the chunk holding it.
All-zero chunks take no space at all, chunks that do not compress are stored raw, and every
chunk carries checksums, so a corrupted file fails loudly naming the bad chunk instead of
serving wrong pages.

File layout (all integers little-endian)::

    +----------------------------+  offset 0
    | header (64 bytes)          |
    +----------------------------+  offset 64
    | chunk payloads, in order,  |  zero chunks store nothing
    | back to back, no padding   |
    +----------------------------+  index_offset
    | index: chunk_count entries |  24 bytes each
    +----------------------------+
    | footer (32 bytes)          |
    +----------------------------+  end of file

Header, ``<8sHHIiQQ24xI``:

=============  =====  ============================================================
magic          8s     ``b"\\x89UFSNAP\\n"``
version        u16    1 (readers refuse versions they do not know)
flags          u16    0; a reader refuses any bit it does not know
chunk_size     u32    a power of two, multiple of 4096, 4 KiB .. 64 MiB
level          i32    the zstd level the chunks were compressed with (informative)
size           u64    total uncompressed size in bytes
chunk_count    u64    ``ceil(size / chunk_size)``; the last chunk may be short
(reserved)     24x    zero
header_crc     u32    ``zlib.crc32`` of the 60 bytes before it
=============  =====  ============================================================

Index entry ``i`` (chunk ``i`` holds bytes ``[i * chunk_size, min(size, (i + 1) * chunk_size))``),
``<QIB3xII``:

=============  =====  ============================================================
offset         u64    file offset of the payload (for zero chunks: where it would be)
stored_len     u32    payload length: 0 for ``zero``, the chunk length for ``raw``
kind           u8     0 = zero (all bytes zero, nothing stored), 1 = zstd (one zstd
                      frame with content size and its own xxh64 content checksum),
                      2 = raw (stored as is: zstd would not have saved >= 1/64)
(reserved)     3x     zero
stored_crc     u32    ``zlib.crc32`` of the payload as stored (0 for zero chunks)
data_crc       u32    ``zlib.crc32`` of the uncompressed chunk (0 for zero chunks)
=============  =====  ============================================================

Footer, ``<QQII8s``: ``index_offset`` (u64), ``chunk_count`` (u64, again), ``index_crc``
(u32, ``crc32`` of the whole index), ``footer_crc`` (u32, ``crc32`` of the 20 bytes before it)
and the end magic ``b"UFS-END\\n"``. Because the index and the footer come last, a snapshot is
written in one streaming pass; a file cut short loses its footer and is refused as truncated.

Checks: opening a snapshot checks the header, footer and index checksums and that the pieces
fit the file size. Every chunk read checks ``stored_crc`` before decompressing (zstd also checks
its frame checksum) and that the chunk decompresses to exactly its length; ``verify=True`` in
:func:`inspect_snapshot` additionally checks ``data_crc`` of every chunk. Any failure raises
:class:`~userfault.errors.SnapshotError` (a :class:`ValueError`) whose message names the file,
the chunk and its byte range and says what to do.

Reading past the end: :meth:`SnapshotReader.read_into` accepts ranges that end at most at
``size`` rounded up to the reader's ``page_size`` (4096 by default) and fills the bytes past
``size`` with zeros, the tail of the last page a pager installs; any range going further raises
:class:`SnapshotError`. An empty (0-byte) source makes a valid snapshot with no chunks.

The zstd binding is the optional dependency ``zstandard`` (``pip install userfault[snapshot]``).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final, TypeAlias

__all__ = [
    "DEFAULT_CACHE_CHUNKS", "DEFAULT_CHUNK_SIZE", "ENTRY", "FOOTER", "HEADER", "KIND_NAMES",
    "KIND_RAW", "KIND_ZERO", "KIND_ZSTD", "MAGIC", "SnapshotInfo", "check_chunk_size",
    "check_level", "zstd",
]

MAGIC: Final = b"\x89UFSNAP\n"
END_MAGIC: Final = b"UFS-END\n"
VERSION: Final = 1
KNOWN_FLAGS: Final = 0

HEADER: Final = struct.Struct("<8sHHIiQQ24xI")
ENTRY: Final = struct.Struct("<QIB3xII")
FOOTER: Final = struct.Struct("<QQII8s")
assert HEADER.size == 64 and ENTRY.size == 24 and FOOTER.size == 32

KIND_ZERO: Final = 0
KIND_ZSTD: Final = 1
KIND_RAW: Final = 2
KIND_NAMES: Final = {KIND_ZERO: "zero", KIND_ZSTD: "zstd", KIND_RAW: "raw"}

# 64 KiB: a page fault decompresses one chunk, so the chunk bounds first-touch latency
# (measured: a 4 KiB read from a cold 64 KiB chunk 25 us, from a 1 MiB chunk 300 us) while the
# ratio barely changes (3.93x vs 3.95x on mixed data). Use 1 MiB+ for archives read whole.
DEFAULT_CHUNK_SIZE: Final = 64 << 10
MIN_CHUNK_SIZE: Final = 4096
MAX_CHUNK_SIZE: Final = 64 << 20
DEFAULT_CACHE_CHUNKS: Final = 16
PAGE_SIZE: Final = 4096

RECREATE: Final = "recreate it with `userfault snapshot create`"

Source: TypeAlias = "str | os.PathLike[str] | bytes | bytearray | memoryview | Any"
Progress: TypeAlias = Callable[[int, int], object]


def zstd() -> ModuleType:
    try:
        import zstandard
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "snapshots need the `zstandard` package: pip install 'userfault[snapshot]'"
        ) from err
    return zstandard


@dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot holds and how well it compressed.

    Attributes:
        path: the snapshot file.
        version: the format version.
        size: uncompressed size in bytes.
        chunk_size: bytes per chunk (the last chunk may be shorter).
        chunk_count: number of chunks.
        zero_chunks: chunks that were all zeros and take no space.
        raw_chunks: chunks stored uncompressed because zstd did not shrink them.
        zstd_chunks: chunks stored as zstd frames.
        compressed_bytes: total bytes of chunk payloads.
        file_bytes: size of the snapshot file (payloads + header + index + footer).
        ratio: ``size / file_bytes`` (higher is better; 0.0 for an empty snapshot).
        level: the zstd level used.
        verified: every chunk was decompressed and checked against its checksum.
        seconds: time taken by :func:`create_snapshot` (0.0 from :func:`inspect_snapshot`).
    """

    path: str
    version: int
    size: int
    chunk_size: int
    chunk_count: int
    zero_chunks: int
    raw_chunks: int
    zstd_chunks: int
    compressed_bytes: int
    file_bytes: int
    ratio: float
    level: int
    verified: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


def check_chunk_size(chunk_size: int) -> None:
    if (
        not isinstance(chunk_size, int)
        or chunk_size < MIN_CHUNK_SIZE
        or chunk_size > MAX_CHUNK_SIZE
        or chunk_size & (chunk_size - 1)
    ):
        raise ValueError(
            f"chunk_size must be a power of two between 4 KiB and 64 MiB, got {chunk_size!r}"
        )


def check_level(level: int) -> None:
    top = int(zstd().MAX_COMPRESSION_LEVEL)
    if not isinstance(level, int) or not -(1 << 17) <= level <= top:
        raise ValueError(f"level must be an integer between -131072 and {top}, got {level!r}")
