"""Compressed snapshots: a chunked, zstd-compressed, randomly readable file of page-able data.

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

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any, Final, TypeAlias

from userfault.errors import SnapshotError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "CacheStats",
    "SnapshotInfo",
    "SnapshotReader",
    "SnapshotSource",
    "add_snapshot_commands",
    "create_snapshot",
    "inspect_snapshot",
    "parse_size",
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

_RECREATE: Final = "recreate it with `userfault snapshot create`"

Source: TypeAlias = "str | os.PathLike[str] | bytes | bytearray | memoryview | Any"
Progress: TypeAlias = Callable[[int, int], object]


def _zstd() -> ModuleType:
    try:
        import zstandard
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "snapshots need the `zstandard` package: pip install 'userfault[snapshot]'"
        ) from err
    return zstandard


# --------------------------------------------------------------------------------------------
# Results


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


@dataclass(frozen=True)
class CacheStats:
    """Counters of a :class:`SnapshotReader`'s chunk cache.

    Attributes:
        hits: chunk lookups served from the cache.
        misses: chunk lookups that had to read the file.
        decompressions: zstd chunks decompressed.
        bytes_read: payload bytes read from the file.
        cached_chunks: chunks held now.
    """

    hits: int
    misses: int
    decompressions: int
    bytes_read: int
    cached_chunks: int


# --------------------------------------------------------------------------------------------
# Writing


def _check_chunk_size(chunk_size: int) -> None:
    if (
        not isinstance(chunk_size, int)
        or chunk_size < MIN_CHUNK_SIZE
        or chunk_size > MAX_CHUNK_SIZE
        or chunk_size & (chunk_size - 1)
    ):
        raise ValueError(
            f"chunk_size must be a power of two between 4 KiB and 64 MiB, got {chunk_size!r}"
        )


def _check_level(level: int) -> None:
    top = int(_zstd().MAX_COMPRESSION_LEVEL)
    if not isinstance(level, int) or not -(1 << 17) <= level <= top:
        raise ValueError(f"level must be an integer between -131072 and {top}, got {level!r}")


class _FileInput:
    """A source file read chunk by chunk, skipping holes of sparse files without reading them."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.name = os.fsdecode(path)
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self.fd)
            raise
        self._data_at = -1  # next offset holding data (SEEK_DATA), -1: unknown

    def is_hole(self, start: int, end: int) -> bool:
        if self._data_at < start:
            try:
                self._data_at = os.lseek(self.fd, start, os.SEEK_DATA)
            except OSError as err:
                # ENXIO: no data after start. Anything else: SEEK_DATA unsupported.
                self._data_at = self.size if err.errno == errno.ENXIO else start
        return self._data_at >= end

    def read(self, start: int, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        done = 0
        while done < n:
            got = os.preadv(self.fd, [view[done:]], start + done)
            if got == 0:
                raise SnapshotError(
                    f"source {self.name} shrank while being snapshotted: expected "
                    f"{self.size} bytes, got only {start + done}",
                    source=self.name, offset=start + done, length=n - done)
            done += got
        return buf

    def close(self) -> None:
        os.close(self.fd)


class _BufferInput:
    def __init__(self, source: Any) -> None:
        try:
            view = memoryview(source)
        except TypeError as err:
            raise TypeError(
                "source must be a path (str or os.PathLike) or an object supporting the buffer "
                f"protocol (bytes, bytearray, memoryview, mmap, numpy array, Region), got "
                f"{type(source).__name__}") from err
        if not view.c_contiguous:
            raise ValueError("source buffer must be C-contiguous (use numpy.ascontiguousarray)")
        self.name = f"<{type(source).__name__}>"
        self.view = view.cast("B") if (view.format != "B" or view.ndim != 1) else view
        self.size = self.view.nbytes

    def is_hole(self, start: int, end: int) -> bool:
        return False

    def read(self, start: int, n: int) -> bytearray:
        return bytearray(self.view[start:start + n])

    def close(self) -> None:
        self.view.release()


_Encoded: TypeAlias = "tuple[int, bytes | bytearray, int, int]"
_ZERO_CHUNK_CACHE: dict[int, bytes] = {}


def _zeros(n: int) -> bytes:
    z = _ZERO_CHUNK_CACHE.get(n)
    if z is None:
        z = bytes(n)
        if len(_ZERO_CHUNK_CACHE) < 8:
            _ZERO_CHUNK_CACHE[n] = z
    return z


def _encode(compressor: Any, data: bytearray) -> _Encoded:
    """Return (kind, payload, stored_crc, data_crc) for one chunk."""
    n = len(data)
    if data == _zeros(n):
        return KIND_ZERO, b"", 0, 0
    data_crc = zlib.crc32(data)
    packed: bytes = compressor.compress(data)
    if len(packed) >= n - n // 64:
        return KIND_RAW, data, data_crc, data_crc
    return KIND_ZSTD, packed, zlib.crc32(packed), data_crc


def create_snapshot(
    source: Source,
    dest_path: str | os.PathLike[str],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int = 3,
    progress: Progress | None = None,
    threads: int = 0,
) -> SnapshotInfo:
    """Write a compressed snapshot of ``source`` to ``dest_path``.

    Args:
        source: a path to a file (or block device), or any C-contiguous buffer: ``bytes``,
            ``bytearray``, ``memoryview``, ``mmap``, a numpy array, a live ``Region``.
        dest_path: the snapshot to write. It is written to a temporary file in the same
            directory, flushed to disk and renamed into place, so it either appears complete
            or not at all (an existing file is replaced only on success).
        chunk_size: bytes per chunk, the unit of random access: a power of two, a multiple
            of 4096, between 4 KiB and 64 MiB.
        level: zstd compression level (1 is fast, 3 the default, 19+ slow; negative is faster
            still).
        progress: called as ``progress(done_bytes, total_bytes)`` after each chunk.
        threads: 0 compresses in the calling thread; ``n > 0`` compresses up to ``n`` chunks
            in parallel worker threads; -1 uses one thread per CPU. The output is the same.

    Memory stays bounded: at most ``2 * max(threads, 1) + 1`` chunks are held at once, so
    sources bigger than RAM work. Holes of sparse source files are recognised with
    ``SEEK_DATA`` and become zero chunks without being read.

    Returns:
        the :class:`SnapshotInfo` of the new file.

    Raises:
        ValueError: a bad ``chunk_size``, ``level`` or ``threads``, or a non-contiguous buffer.
        TypeError: ``source`` is neither a path nor a buffer.
        OSError: the source cannot be read or the destination written.
    """
    _check_chunk_size(chunk_size)
    _check_level(level)
    if not isinstance(threads, int) or threads < -1:
        raise ValueError(f"threads must be -1, 0 or a positive integer, got {threads!r}")
    if threads == -1:
        threads = os.cpu_count() or 1
    zstd = _zstd()
    started = time.perf_counter()
    dest = os.fspath(dest_path)
    inp: _FileInput | _BufferInput = (
        _FileInput(source) if isinstance(source, (str, os.PathLike)) else _BufferInput(source)
    )
    counts = {KIND_ZERO: 0, KIND_ZSTD: 0, KIND_RAW: 0}
    try:
        size = inp.size
        count = -(-size // chunk_size)
        directory = os.path.dirname(os.path.abspath(dest))
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".tmp",
                                   dir=directory)
        try:
            with os.fdopen(fd, "wb", buffering=1 << 20) as out:
                header = HEADER.pack(MAGIC, VERSION, 0, chunk_size, level, size, count, 0)
                out.write(HEADER.pack(MAGIC, VERSION, 0, chunk_size, level, size, count,
                                      zlib.crc32(header[:60])))
                index = bytearray(ENTRY.size * count)
                pos = HEADER.size
                for i, (kind, payload, scrc, dcrc) in enumerate(
                        _encoded_chunks(inp, zstd, level, chunk_size, count, threads)):
                    out.write(payload)
                    ENTRY.pack_into(index, i * ENTRY.size, pos, len(payload), kind, scrc, dcrc)
                    pos += len(payload)
                    counts[kind] += 1
                    if progress is not None:
                        progress(min(size, (i + 1) * chunk_size), size)
                index_offset = pos
                out.write(index)
                tail = struct.pack("<QQI", index_offset, count, zlib.crc32(index))
                out.write(FOOTER.pack(index_offset, count, zlib.crc32(index),
                                      zlib.crc32(tail), END_MAGIC))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(directory)
    finally:
        inp.close()
    file_bytes = index_offset + ENTRY.size * count + FOOTER.size
    return SnapshotInfo(
        path=dest, version=VERSION, size=size, chunk_size=chunk_size, chunk_count=count,
        zero_chunks=counts[KIND_ZERO], raw_chunks=counts[KIND_RAW],
        zstd_chunks=counts[KIND_ZSTD], compressed_bytes=index_offset - HEADER.size,
        file_bytes=file_bytes, ratio=size / file_bytes if size else 0.0, level=level,
        verified=False, seconds=time.perf_counter() - started)


def _fsync_dir(directory: str) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _encoded_chunks(
    inp: _FileInput | _BufferInput, zstd: ModuleType, level: int, chunk_size: int, count: int,
    threads: int,
) -> Iterator[_Encoded]:
    def make() -> Any:
        return zstd.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)

    def load(i: int) -> bytearray | None:
        start = i * chunk_size
        n = min(chunk_size, inp.size - start)
        if inp.is_hole(start, start + n):
            return None
        return inp.read(start, n)

    if threads <= 0:
        compressor = make()
        for i in range(count):
            data = load(i)
            yield (KIND_ZERO, b"", 0, 0) if data is None else _encode(compressor, data)
        return

    local = threading.local()

    def work(data: bytearray) -> _Encoded:
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = make()
        return _encode(c, data)

    zero: Future[_Encoded] = Future()
    zero.set_result((KIND_ZERO, b"", 0, 0))
    pending: list[Future[_Encoded]] = []
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ufs-compress") as pool:
        try:
            for i in range(count):
                data = load(i)
                pending.append(zero if data is None else pool.submit(work, data))
                while len(pending) > 2 * threads:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for f in pending:
                f.cancel()


# --------------------------------------------------------------------------------------------
# Reading


class SnapshotReader:
    """Random access to the bytes of a snapshot file.

    Opening checks the header, the footer and the index; each chunk is checked when it is
    first read. Decompressed chunks are kept in a small LRU cache (``cache_chunks`` chunks,
    0 disables it), so sequential page-sized reads decompress each chunk once. Reads use
    ``os.pread`` and are safe from several threads at once.

    Args:
        path: the snapshot file.
        cache_chunks: how many decompressed chunks to keep (default 16: 1 MiB at the default
            chunk size).
        page_size: reads may run past ``size`` up to the next multiple of ``page_size``; those
            bytes read as zeros (the tail of the last page).
    """

    def __init__(self, path: str | os.PathLike[str], *, cache_chunks: int = DEFAULT_CACHE_CHUNKS,
                 page_size: int = PAGE_SIZE) -> None:
        if cache_chunks < 0:
            raise ValueError(f"cache_chunks must be >= 0, got {cache_chunks}")
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        self._path = os.fsdecode(os.fspath(path))
        self._cache_chunks = cache_chunks
        self._page_size = page_size
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._local = threading.local()
        self._hits = self._misses = self._decompressions = self._bytes_read = 0
        self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._open()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    def _fail(self, what: str, *, offset: int = 0, length: int = 0) -> SnapshotError:
        return SnapshotError(f"snapshot {self._path}: {what}", source=self._path,
                             offset=offset, length=length)

    def _pread(self, n: int, offset: int) -> bytes:
        data = os.pread(self._fd, n, offset)
        while len(data) < n:
            more = os.pread(self._fd, n - len(data), offset + len(data))
            if not more:
                break
            data += more
        return data

    def _open(self) -> None:
        file_bytes = os.fstat(self._fd).st_size
        self.file_bytes = file_bytes
        if file_bytes < HEADER.size + FOOTER.size:
            head = self._pread(len(MAGIC), 0)
            if head != MAGIC[:len(head)] or not head:
                raise self._fail(f"not a userfault snapshot ({file_bytes} bytes, no "
                                 f"{MAGIC!r} magic)")
            raise self._fail(f"file is only {file_bytes} bytes: it is truncated; {_RECREATE}")
        raw = self._pread(HEADER.size, 0)
        magic, version, flags, chunk_size, level, size, count, crc = HEADER.unpack(raw)
        if magic != MAGIC:
            raise self._fail(f"not a userfault snapshot (magic {magic!r}, expected {MAGIC!r})")
        if zlib.crc32(raw[:60]) != crc:
            raise self._fail(f"header failed its checksum: the file is corrupted; {_RECREATE}",
                             length=HEADER.size)
        if version != VERSION:
            raise self._fail(f"format version {version} is not supported (this userfault reads "
                             f"version {VERSION}); upgrade userfault or recreate the snapshot")
        if flags & ~KNOWN_FLAGS:
            raise self._fail(f"unknown flags {flags:#x}: written by a newer userfault; upgrade")
        try:
            _check_chunk_size(chunk_size)
        except ValueError:
            raise self._fail(f"invalid chunk size {chunk_size} in header; {_RECREATE}") from None
        if count != -(-size // chunk_size):
            raise self._fail(f"header says {count} chunks for {size} bytes of {chunk_size}; "
                             f"{_RECREATE}")
        foot = self._pread(FOOTER.size, file_bytes - FOOTER.size)
        index_offset, fcount, index_crc, footer_crc, end = FOOTER.unpack(foot)
        if end != END_MAGIC:
            raise self._fail(
                f"footer missing ({file_bytes} bytes): the file is truncated or was not "
                f"completely written; {_RECREATE}")
        if zlib.crc32(foot[:20]) != footer_crc:
            raise self._fail(f"footer failed its checksum: the file is corrupted; {_RECREATE}",
                             offset=file_bytes - FOOTER.size, length=FOOTER.size)
        index_len = count * ENTRY.size
        if fcount != count or index_offset < HEADER.size or \
                index_offset + index_len + FOOTER.size != file_bytes:
            raise self._fail(
                f"footer does not match the file ({fcount} chunks, index at {index_offset}, "
                f"file {file_bytes} bytes, header says {count} chunks): the file is truncated "
                f"or corrupted; {_RECREATE}")
        index = self._pread(index_len, index_offset)
        if len(index) != index_len or zlib.crc32(index) != index_crc:
            raise self._fail(f"chunk index failed its checksum: the file is corrupted; "
                             f"{_RECREATE}", offset=index_offset, length=index_len)
        self._index = index
        self._index_offset = index_offset
        self.version: int = version
        self.level: int = level
        self._size: int = size
        self._chunk_size: int = chunk_size
        self._count: int = count

    # -- properties --------------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The snapshot file."""
        return self._path

    @property
    def size(self) -> int:
        """Uncompressed size in bytes."""
        return self._size

    @property
    def chunk_size(self) -> int:
        """Bytes per chunk (the last one may be shorter)."""
        return self._chunk_size

    @property
    def chunk_count(self) -> int:
        """Number of chunks."""
        return self._count

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._fd < 0

    @property
    def stats(self) -> CacheStats:
        """Cache and decompression counters."""
        with self._lock:
            return CacheStats(self._hits, self._misses, self._decompressions, self._bytes_read,
                              len(self._cache))

    # -- chunks ------------------------------------------------------------------------------

    def _span(self, i: int) -> tuple[int, int]:
        start = i * self._chunk_size
        return start, min(self._size, start + self._chunk_size)

    def _chunk_fail(self, i: int, what: str) -> SnapshotError:
        start, end = self._span(i)
        return self._fail(f"chunk {i} (bytes {start}..{end}) {what}: the file is corrupted; "
                          f"{_RECREATE}", offset=start, length=end - start)

    def entry(self, i: int) -> tuple[int, int, int, int, int]:
        """The index entry of chunk ``i``: (offset, stored_len, kind, stored_crc, data_crc)."""
        if not 0 <= i < self._count:
            raise IndexError(f"chunk {i} out of range (the snapshot has {self._count} chunks)")
        off, slen, kind, scrc, dcrc = ENTRY.unpack_from(self._index, i * ENTRY.size)
        start, end = self._span(i)
        n = end - start
        if kind not in KIND_NAMES:
            raise self._chunk_fail(i, f"has unknown kind {kind} in the index")
        if (kind == KIND_ZERO and slen != 0) or (kind == KIND_RAW and slen != n) or \
                (kind == KIND_ZSTD and slen <= 0) or off < HEADER.size or \
                off + slen > self._index_offset:
            raise self._chunk_fail(
                i, f"has an inconsistent index entry ({KIND_NAMES[kind]}, {slen} bytes at "
                   f"{off})")
        return off, slen, kind, scrc, dcrc

    def _load(self, i: int, *, check_data: bool = False) -> bytes | None:
        """Chunk ``i`` decompressed and checked, or ``None`` for a zero chunk (not cached)."""
        self._check_open()
        off, slen, kind, scrc, dcrc = self.entry(i)
        if kind == KIND_ZERO:
            return None
        if not check_data and self._cache_chunks:
            with self._lock:
                data = self._cache.get(i)
                if data is not None:
                    self._cache.move_to_end(i)
                    self._hits += 1
                    return data
                self._misses += 1
        start, end = self._span(i)
        try:
            payload = self._pread(slen, off)
        except OSError as err:
            raise self._fail(f"chunk {i} (bytes {start}..{end}) could not be read: {err}",
                             offset=start, length=end - start) from err
        if len(payload) != slen:
            raise self._chunk_fail(i, "is cut short")
        if zlib.crc32(payload) != scrc:
            raise self._chunk_fail(i, "failed its checksum")
        data = payload if kind == KIND_RAW else self._decompress(i, payload, end - start)
        if check_data and zlib.crc32(data) != dcrc:
            raise self._chunk_fail(i, "failed its data checksum after decompression")
        with self._lock:
            self._bytes_read += slen
            if kind == KIND_ZSTD:
                self._decompressions += 1
            if self._cache_chunks:
                self._cache[i] = data
                self._cache.move_to_end(i)
                while len(self._cache) > self._cache_chunks:
                    self._cache.popitem(last=False)
        return data

    def _decompress(self, i: int, payload: bytes, n: int) -> bytes:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = _zstd().ZstdDecompressor()
        try:
            params = _zstd().get_frame_parameters(payload)
            if params.content_size != n:
                raise self._chunk_fail(
                    i, f"declares {params.content_size} bytes instead of {n}")
            data: bytes = d.decompress(payload, max_output_size=n)
        except SnapshotError:
            raise
        except Exception as err:  # zstd.ZstdError and friends
            raise self._chunk_fail(i, f"failed to decompress ({err})") from err
        if len(data) != n:
            raise self._chunk_fail(i, f"decompressed to {len(data)} bytes instead of {n}")
        return data

    def read_chunk(self, i: int) -> bytes:
        """The uncompressed bytes of chunk ``i`` (the last chunk may be short)."""
        data = self._load(i)
        if data is None:
            start, end = self._span(i)
            return bytes(end - start)
        return data

    def verify_chunk(self, i: int) -> None:
        """Read chunk ``i`` bypassing the cache and check both of its checksums."""
        self._load(i, check_data=True)

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``[offset, offset + len(buf))``.

        The range may span chunks. It may end past ``size`` only up to ``size`` rounded up to
        ``page_size``; those bytes are zeros. Anything further raises :class:`SnapshotError`.
        """
        mv = buf if (buf.format == "B" and buf.ndim == 1) else buf.cast("B")
        length = mv.nbytes
        end = offset + length
        limit = -(-self._size // self._page_size) * self._page_size
        if offset < 0 or end > limit:
            raise self._fail(
                f"read of bytes {offset}..{end} is outside the snapshot ({self._size} bytes, "
                f"readable up to {limit} with the last page zero-padded)",
                offset=offset, length=length)
        pos = offset
        cs = self._chunk_size
        while pos < end:
            if pos >= self._size:
                mv[pos - offset:] = _zeros(end - pos)
                break
            i = pos // cs
            cstart = i * cs
            stop = min(end, cstart + cs, self._size)
            data = self._load(i)
            if data is None:
                mv[pos - offset:stop - offset] = _zeros(stop - pos)
            else:
                mv[pos - offset:stop - offset] = memoryview(data)[pos - cstart:stop - cstart]
            pos = stop

    def read_many(self, requests: Sequence[tuple[int, memoryview]]) -> None:
        """Serve each ``(offset, buf)`` pair as :meth:`read_into` would."""
        for offset, buf in requests:
            self.read_into(offset, buf)

    def info(self, *, verify: bool = False) -> SnapshotInfo:
        """Count the chunks by kind; with ``verify``, decompress and check every chunk."""
        counts = {KIND_ZERO: 0, KIND_ZSTD: 0, KIND_RAW: 0}
        stored = 0
        for i in range(self._count):
            _, slen, kind, _, _ = self.entry(i)
            counts[kind] += 1
            stored += slen
            if verify:
                self.verify_chunk(i)
        return SnapshotInfo(
            path=self._path, version=self.version, size=self._size, chunk_size=self._chunk_size,
            chunk_count=self._count, zero_chunks=counts[KIND_ZERO], raw_chunks=counts[KIND_RAW],
            zstd_chunks=counts[KIND_ZSTD], compressed_bytes=stored, file_bytes=self.file_bytes,
            ratio=self._size / self.file_bytes if self._size else 0.0, level=self.level,
            verified=verify)

    # -- lifetime ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._fd < 0:
            raise self._fail("the reader is closed")

    def close(self) -> None:
        """Close the file and drop the cache. Idempotent."""
        fd, self._fd = self._fd, -1
        with self._lock:
            self._cache.clear()
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self._size} bytes, {self._count} chunks"
        return f"<SnapshotReader {self._path!r} {state}>"


def inspect_snapshot(path: str | os.PathLike[str], *, verify: bool = False) -> SnapshotInfo:
    """Describe a snapshot; with ``verify=True`` decompress and check every chunk.

    Raises:
        SnapshotError: the file is not a snapshot, is truncated or is corrupted.
    """
    with SnapshotReader(path, cache_chunks=0) as reader:
        return reader.info(verify=verify)


class SnapshotSource:
    """A :class:`~userfault.sources.base.PageSource` serving pages from a snapshot file.

    Picklable: only the path and the options travel; the file is opened lazily in the process
    that reads (and reopened after a ``fork``). Errors are :class:`SnapshotError`.

    Args:
        path: the snapshot file.
        cache_chunks: decompressed chunks to keep (see :class:`SnapshotReader`).
        page_size: the page size of the region served (reads are zero-padded up to it).
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 cache_chunks: int = DEFAULT_CACHE_CHUNKS, page_size: int = PAGE_SIZE) -> None:
        self.path = os.fsdecode(os.fspath(path))
        self.cache_chunks = cache_chunks
        self.page_size = page_size
        self._reader: SnapshotReader | None = None
        self._pid = -1
        self._lock = threading.Lock()

    @property
    def reader(self) -> SnapshotReader:
        """The open :class:`SnapshotReader` of this process (opened on first use)."""
        reader = self._reader
        if reader is None or self._pid != os.getpid():
            with self._lock:
                if self._reader is None or self._pid != os.getpid():
                    self._reader = SnapshotReader(self.path, cache_chunks=self.cache_chunks,
                                                  page_size=self.page_size)
                    self._pid = os.getpid()
                reader = self._reader
        return reader

    @property
    def size(self) -> int:
        """Uncompressed size in bytes."""
        return self.reader.size

    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset`` (see :meth:`SnapshotReader.read_into`)."""
        self.reader.read_into(offset, buf)

    def read_many(self, requests: Sequence[tuple[int, memoryview]]) -> None:
        """Serve each ``(offset, buf)`` pair, in order."""
        self.reader.read_many(requests)

    def close(self) -> None:
        """Close the file in this process; it is reopened on the next read."""
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "cache_chunks": self.cache_chunks,
                "page_size": self.page_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], cache_chunks=state["cache_chunks"],  # type: ignore[misc]
                      page_size=state["page_size"])

    def __repr__(self) -> str:
        return f"SnapshotSource({self.path!r}, cache_chunks={self.cache_chunks})"


# --------------------------------------------------------------------------------------------
# Command line

_SUFFIXES: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse ``"4096"``, ``"64K"``, ``"1M"``, ``"2GiB"``... (binary multiples) into bytes."""
    s = text.strip().upper().replace(" ", "")
    for tail in ("IB", "B"):
        if s.endswith(tail) and len(s) > len(tail):
            s = s[: -len(tail)]
            break
    suffix = s[-1:] if s[-1:] in _SUFFIXES else ""
    number = s[: len(s) - len(suffix)]
    try:
        value = float(number) * _SUFFIXES[suffix] if "." in number else \
            int(number) * _SUFFIXES[suffix]
    except ValueError:
        raise ValueError(f"invalid size {text!r}: use bytes or a K, M, G suffix") from None
    if value < 0:
        raise ValueError(f"invalid size {text!r}: negative")
    return int(value)


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class _ProgressBar:
    """A one-line ``\\r`` progress bar: percent, MB/s and ETA."""

    def __init__(self, stream: Any, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.start = time.monotonic()
        self.last = 0.0
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        frac = done / total if total else 1.0
        filled = int(frac * self.width)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else 0.0
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r[{bar}] {frac * 100:5.1f}%  {rate / 1e6:7.1f} MB/s  "
                          f"ETA {int(eta) // 60:d}:{int(eta) % 60:02d} ")
        self.stream.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def _cmd_create(args: argparse.Namespace) -> int:
    bar: _ProgressBar | None = None
    if not args.quiet and (args.progress or sys.stderr.isatty()):
        bar = _ProgressBar(sys.stderr)
    try:
        info = create_snapshot(args.src, args.dest, chunk_size=args.chunk_size, level=args.level,
                               progress=bar, threads=args.threads)
    except (OSError, ValueError, TypeError) as err:
        if bar is not None:
            bar.finish()
        print(f"userfault snapshot create: error: {err}", file=sys.stderr)
        return 1
    if bar is not None:
        bar.finish()
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
    elif not args.quiet:
        rate = info.size / info.seconds / 1e6 if info.seconds > 0 else 0.0
        print(f"{info.path}: {_human(info.size)} in {info.chunk_count} chunks of "
              f"{_human(info.chunk_size)} ({info.zero_chunks} zero, {info.raw_chunks} raw) -> "
              f"{_human(info.file_bytes)}, ratio {info.ratio:.2f}x, {info.seconds:.2f} s, "
              f"{rate:.1f} MB/s")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    try:
        info = inspect_snapshot(args.file, verify=args.verify)
    except (OSError, ValueError) as err:
        if args.json:
            print(json.dumps({"path": args.file, "error": str(err)}))
        print(f"userfault snapshot inspect: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return 0
    rows = [
        ("file", info.path),
        ("format version", str(info.version)),
        ("size", f"{info.size} bytes ({_human(info.size)})"),
        ("chunk size", f"{info.chunk_size} bytes ({_human(info.chunk_size)})"),
        ("chunks", f"{info.chunk_count} ({info.zstd_chunks} zstd, {info.raw_chunks} raw, "
                   f"{info.zero_chunks} zero)"),
        ("compressed", f"{info.compressed_bytes} bytes ({_human(info.compressed_bytes)})"),
        ("file size", f"{info.file_bytes} bytes ({_human(info.file_bytes)})"),
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
    create.add_argument("src", metavar="SRC", help="file or block device to snapshot")
    create.add_argument("dest", metavar="DEST", help="snapshot file to write (e.g. mem.ufs)")
    create.add_argument("--chunk-size", type=_size_arg, default=DEFAULT_CHUNK_SIZE,
                        metavar="SIZE",
                        help="chunk size, a power of two from 4K to 64M (default 64K: a fault "
                        "decompresses one chunk)")
    create.add_argument("--level", type=int, default=3, metavar="N",
                        help="zstd level (default 3)")
    create.add_argument("--threads", type=int, default=0, metavar="N",
                        help="compression threads: 0 = none (default), -1 = one per CPU")
    create.add_argument("--progress", action="store_true",
                        help="show the progress bar even when stderr is not a terminal")
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
