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
    | base block (deltas only)   |  base_len bytes: which snapshot this one extends
    +----------------------------+  offset 64 + base_len: the payloads' start
    | chunk payloads, in order,  |  zero and inherited chunks store nothing
    | back to back, no padding   |
    +----------------------------+  index_offset
    | index: chunk_count entries |  24 bytes each
    +----------------------------+
    | footer (32 bytes)          |
    +----------------------------+  end of file

Header, ``<8sHHIiQQII16xI``:

=============  =====  ============================================================
magic          8s     ``b"\\x89UFSNAP\\n"``
version        u16    1: a full snapshot; 2: a snapshot that may be a delta (below).
                      :func:`create_snapshot` writes 1 for a full snapshot (older readers
                      read it) and 2 for a delta; readers refuse versions they do not know
flags          u16    bit 0 ``DELTA`` (version 2 only): the file is a delta of the snapshot
                      its base block names; a reader refuses any bit it does not know
chunk_size     u32    a power of two, multiple of 4096, 4 KiB .. 64 MiB
level          i32    the zstd level the chunks were compressed with (informative)
size           u64    total uncompressed size in bytes
chunk_count    u64    ``ceil(size / chunk_size)``; the last chunk may be short
base_len       u32    bytes of the base block (0 unless ``DELTA``)
base_crc       u32    ``zlib.crc32`` of the base block (0 unless ``DELTA``)
(reserved)     16x    zero
header_crc     u32    ``zlib.crc32`` of the 60 bytes before it
=============  =====  ============================================================

Base block (deltas), ``<32sH`` then the path: ``base_id`` (32 bytes, the base's
:attr:`~SnapshotReader.identity`: ``blake2b`` with a 32-byte digest of everything in the base
file but its payloads, i.e. its header, base block, index and footer; the index holds every
chunk's checksums, so another content gives another identity), ``path_len`` (u16) and the
base's path, ``path_len`` bytes of UTF-8, relative to the delta's directory. A delta has its
base's ``size`` and ``chunk_size``; a delta's base may itself be a delta (a chain, at most
:data:`MAX_CHAIN` links).

Index entry ``i`` (chunk ``i`` holds bytes ``[i * chunk_size, min(size, (i + 1) * chunk_size))``),
``<QIB3xII``:

=============  =====  ============================================================
offset         u64    file offset of the payload (zero, inherit: where it would be)
stored_len     u32    payload length: 0 for ``zero``, the chunk length for ``raw``
kind           u8     0 = zero (all bytes zero, nothing stored), 1 = zstd (one zstd
                      frame with content size and its own xxh64 content checksum),
                      2 = raw (stored as is: zstd would not have saved >= 1/64),
                      3 = inherit (deltas only: nothing stored, the chunk is the base's)
(reserved)     3x     zero
stored_crc     u32    ``zlib.crc32`` of the payload as stored (0 for zero and inherit)
data_crc       u32    ``zlib.crc32`` of the uncompressed chunk (0 for zero and inherit)
=============  =====  ============================================================

Footer, ``<QQII8s``: ``index_offset`` (u64), ``chunk_count`` (u64, again), ``index_crc``
(u32, ``crc32`` of the whole index), ``footer_crc`` (u32, ``crc32`` of the 20 bytes before it)
and the end magic ``b"UFS-END\\n"``. Because the index and the footer come last, a snapshot is
written in one streaming pass; a file cut short loses its footer and is refused as truncated.

Deltas: a delta holds only the chunks holding pages written since its base (found by write
tracking, :class:`~userfault.tracking.WriteTracker`, never by comparing bytes); a chunk partly
written is stored whole, its other pages taken from the base when the delta is written. Every
other chunk is ``inherit``. Opening a delta opens its base (the recorded path, or one named
explicitly) and checks that the base's identity is ``base_id``: a base missing, replaced,
rewritten, truncated or corrupted is refused naming both files. A chain reads as one snapshot.

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
    "BASE_BLOCK", "DEFAULT_CACHE_CHUNKS", "DEFAULT_CHUNK_SIZE", "DELTA_VERSION", "ENTRY",
    "FLAG_DELTA", "FOOTER", "HEADER", "KIND_INHERIT", "KIND_NAMES", "KIND_RAW", "KIND_ZERO",
    "KIND_ZSTD", "MAGIC", "MAX_CHAIN", "SnapshotInfo", "check_chunk_size", "check_level",
    "zeros", "zstd",
]

MAGIC: Final = b"\x89UFSNAP\n"
END_MAGIC: Final = b"UFS-END\n"
VERSION: Final = 1
DELTA_VERSION: Final = 2
VERSIONS: Final = (VERSION, DELTA_VERSION)
FLAG_DELTA: Final = 1
KNOWN_FLAGS: Final = FLAG_DELTA
MAX_CHAIN: Final = 64

HEADER: Final = struct.Struct("<8sHHIiQQII16xI")
BASE_BLOCK: Final = struct.Struct("<32sH")
ENTRY: Final = struct.Struct("<QIB3xII")
FOOTER: Final = struct.Struct("<QQII8s")
assert HEADER.size == 64 and ENTRY.size == 24 and FOOTER.size == 32

KIND_ZERO: Final = 0
KIND_ZSTD: Final = 1
KIND_RAW: Final = 2
KIND_INHERIT: Final = 3
KIND_NAMES: Final = {KIND_ZERO: "zero", KIND_ZSTD: "zstd", KIND_RAW: "raw",
                     KIND_INHERIT: "inherit"}

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


_ZERO_CHUNKS: dict[int, bytes] = {}


def zeros(n: int) -> bytes:
    """``n`` zero bytes (the few sizes asked for most are kept)."""
    z = _ZERO_CHUNKS.get(n)
    if z is None:
        z = bytes(n)
        if len(_ZERO_CHUNKS) < 8:
            _ZERO_CHUNKS[n] = z
    return z


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
        base: for a delta, the path of its base snapshot (``""`` for a full snapshot).
        inherited_chunks: for a delta, the chunks not stored, read from the base.
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
    base: str = ""
    inherited_chunks: int = 0

    @property
    def stored_chunks(self) -> int:
        """Chunks this file holds itself (zero chunks included): all but the inherited."""
        return self.chunk_count - self.inherited_chunks

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
