"""Reading compressed snapshots: :class:`SnapshotReader`, :class:`SnapshotSource`."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from ..._files import open_regular
from ...errors import SnapshotError
from .format import (
    BASE_BLOCK,
    DEFAULT_CACHE_CHUNKS,
    DELTA_VERSION,
    END_MAGIC,
    ENTRY,
    FLAG_DELTA,
    FOOTER,
    HEADER,
    KIND_INHERIT,
    KIND_NAMES,
    KIND_RAW,
    KIND_ZERO,
    KIND_ZSTD,
    KNOWN_FLAGS,
    MAGIC,
    MAX_CHAIN,
    PAGE_SIZE,
    RECREATE,
    VERSIONS,
    SnapshotInfo,
    check_chunk_size,
    zeros,
    zstd,
)

__all__ = ["CacheStats", "SnapshotReader", "SnapshotSource", "inspect_chain", "inspect_snapshot"]

#: what a delta whose base cannot be used tells its user to do
FIND_BASE = ("put the base it was made from back there, or name it explicitly (base= in the API, "
             "--base on the command line)")


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


class SnapshotReader:
    """Random access to the bytes of a snapshot file.

    Opening checks the header, the footer and the index; each chunk is checked when it is
    first read. Decompressed chunks are kept in a small LRU cache (``cache_chunks`` chunks,
    0 disables it), so sequential page-sized reads decompress each chunk once. Reads use
    ``os.pread`` and are safe from several threads at once.

    A delta (see :mod:`.format`) opens its base too, checking that it is the snapshot the
    delta was made from, and so on down the chain: the reader reads the whole chain as one
    snapshot (:attr:`base` is the next link, :attr:`chain` all of them).

    Args:
        path: the snapshot file.
        cache_chunks: how many decompressed chunks to keep (default 16: 1 MiB at the default
            chunk size); each link of a chain has its own cache.
        page_size: reads may run past ``size`` up to the next multiple of ``page_size``; those
            bytes read as zeros (the tail of the last page).
        base: for a delta, its base snapshot, instead of the path the delta records (relative
            to the delta's directory). Ignored for a full snapshot.

    Raises:
        SnapshotError: the file, or a link of its chain, is not a snapshot, is truncated or
            corrupted; a delta's base is missing or is not the snapshot it was made from.
    """

    def __init__(self, path: str | os.PathLike[str], *, cache_chunks: int = DEFAULT_CACHE_CHUNKS,
                 page_size: int = PAGE_SIZE, base: str | os.PathLike[str] | None = None,
                 _links: tuple[tuple[int, int], ...] = ()) -> None:
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
        self._fd = -1
        self.base: SnapshotReader | None = None
        #: a delta's base path as the delta records it (relative to its directory)
        self.recorded_base = ""
        try:
            self._fd = open_regular(self._path)
        except ValueError as err:  # a directory, FIFO, socket or device: refused unopened
            raise SnapshotError(f"snapshot {err}", source=self._path) from None
        try:
            self._open()
            if self.flags & FLAG_DELTA:
                self._open_base(base, _links)
        except BaseException:
            self.close()
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
            raise self._fail(f"file is only {file_bytes} bytes: it is truncated; {RECREATE}")
        raw = self._pread(HEADER.size, 0)
        magic, version, flags, chunk_size, level, size, count, base_len, base_crc, crc = \
            HEADER.unpack(raw)
        if magic != MAGIC:
            raise self._fail(f"not a userfault snapshot (magic {magic!r}, expected {MAGIC!r})")
        if zlib.crc32(raw[:60]) != crc:
            raise self._fail(f"header failed its checksum: the file is corrupted; {RECREATE}",
                             length=HEADER.size)
        if version not in VERSIONS:
            raise self._fail(f"format version {version} is not supported (this userfault reads "
                             f"versions {', '.join(map(str, VERSIONS))}); upgrade userfault or "
                             "recreate the snapshot")
        if flags & ~KNOWN_FLAGS or (flags & FLAG_DELTA and version < DELTA_VERSION):
            raise self._fail(f"unknown flags {flags:#x} for version {version}: written by a "
                             "newer userfault; upgrade")
        if (base_len == 0) == bool(flags & FLAG_DELTA) or \
                base_len > file_bytes - HEADER.size - FOOTER.size:
            raise self._fail(f"header has a base block of {base_len} bytes "
                             f"{'for a delta' if flags & FLAG_DELTA else 'but is not a delta'}: "
                             f"the file is corrupted; {RECREATE}")
        head = raw + self._pread(base_len, HEADER.size)
        if base_len and zlib.crc32(head[HEADER.size:]) != base_crc:
            raise self._fail(f"base block failed its checksum: the file is corrupted; {RECREATE}",
                             offset=HEADER.size, length=base_len)
        data_start = HEADER.size + base_len
        try:
            check_chunk_size(chunk_size)
        except ValueError:
            raise self._fail(f"invalid chunk size {chunk_size} in header; {RECREATE}") from None
        if count != -(-size // chunk_size):
            raise self._fail(f"header says {count} chunks for {size} bytes of {chunk_size}; "
                             f"{RECREATE}")
        foot = self._pread(FOOTER.size, file_bytes - FOOTER.size)
        index_offset, fcount, index_crc, footer_crc, end = FOOTER.unpack(foot)
        if end != END_MAGIC:
            raise self._fail(
                f"footer missing ({file_bytes} bytes): the file is truncated or was not "
                f"completely written; {RECREATE}")
        if zlib.crc32(foot[:20]) != footer_crc:
            raise self._fail(f"footer failed its checksum: the file is corrupted; {RECREATE}",
                             offset=file_bytes - FOOTER.size, length=FOOTER.size)
        index_len = count * ENTRY.size
        if fcount != count or index_offset < data_start or \
                index_offset + index_len + FOOTER.size != file_bytes:
            raise self._fail(
                f"footer does not match the file ({fcount} chunks, index at {index_offset}, "
                f"file {file_bytes} bytes, header says {count} chunks): the file is truncated "
                f"or corrupted; {RECREATE}")
        index = self._pread(index_len, index_offset)
        if len(index) != index_len or zlib.crc32(index) != index_crc:
            raise self._fail(f"chunk index failed its checksum: the file is corrupted; "
                             f"{RECREATE}", offset=index_offset, length=index_len)
        self._index = index
        self._index_offset = index_offset
        self._head = head
        self._foot = foot
        self._data_start = data_start
        self.version: int = version
        self.flags: int = flags
        self.level: int = level
        self._size: int = size
        self._chunk_size: int = chunk_size
        self._count: int = count

    def _open_base(self, base: str | os.PathLike[str] | None,
                   links: tuple[tuple[int, int], ...]) -> None:
        """Open the base a delta names (or ``base``) and check it is the one it was made from."""
        block = self._head[HEADER.size:]
        want, path_len = BASE_BLOCK.unpack_from(block)
        if BASE_BLOCK.size + path_len != len(block):
            raise self._fail(f"base block of {len(block)} bytes holds a path of {path_len}: the "
                             f"file is corrupted; {RECREATE}")
        recorded = os.fsdecode(block[BASE_BLOCK.size:])
        self.recorded_base = recorded
        if base is None:
            where = os.path.join(os.path.dirname(self._path), recorded)
            told = f"its base {where} (recorded as {recorded!r}, relative to the delta)"
        else:
            where = os.fsdecode(os.fspath(base))
            told = f"its base {where}"
        st = os.fstat(self._fd)
        links = (*links, (st.st_dev, st.st_ino))
        if len(links) > MAX_CHAIN:
            raise self._fail(f"the chain of deltas is longer than {MAX_CHAIN} links: flatten it "
                             "(`userfault snapshot flatten`)")
        try:
            there = os.stat(where)
        except FileNotFoundError:
            raise self._fail(f"{told} does not exist; {FIND_BASE}") from None
        except OSError as err:
            raise self._fail(f"{told} cannot be opened: {err.strerror}; {FIND_BASE}") from None
        if (there.st_dev, there.st_ino) in links:
            raise self._fail(f"{told} is this delta or one of its own deltas: the chain loops; "
                             f"{FIND_BASE}")
        try:
            self.base = SnapshotReader(where, cache_chunks=self._cache_chunks,
                                       page_size=self._page_size, _links=links)
        except SnapshotError as err:
            raise self._fail(f"{told} cannot be used: {err}; {FIND_BASE}") from None
        got = self.base.identity
        if got != want:
            raise self._fail(
                f"{told} is not the snapshot this delta was made from (its identity is "
                f"{got.hex()[:16]}..., the delta expects {want.hex()[:16]}...): it was replaced "
                f"or rewritten since; {FIND_BASE}")
        if (self.base.size, self.base.chunk_size) != (self._size, self._chunk_size):
            raise self._fail(
                f"{told} holds {self.base.size} bytes in chunks of {self.base.chunk_size}, the "
                f"delta {self._size} in chunks of {self._chunk_size}: the file is corrupted; "
                f"{RECREATE}")

    # -- properties --------------------------------------------------------------------------

    @property
    def identity(self) -> bytes:
        """32 bytes naming this snapshot's content: a ``blake2b`` digest of its header, base
        block, index and footer (the index holds every chunk's checksums). A delta records
        its base's identity, and opening the delta checks it."""
        h = hashlib.blake2b(self._head, digest_size=32)
        h.update(self._index)
        h.update(self._foot)
        return h.digest()

    @property
    def is_delta(self) -> bool:
        """Whether this file is a delta over a base snapshot."""
        return self.base is not None

    @property
    def chain(self) -> list[SnapshotReader]:
        """This reader and its bases, down to the full snapshot (one reader if not a delta)."""
        links: list[SnapshotReader] = []
        link: SnapshotReader | None = self
        while link is not None:
            links.append(link)
            link = link.base
        return links

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
                          f"{RECREATE}", offset=start, length=end - start)

    def entry(self, i: int) -> tuple[int, int, int, int, int]:
        """The index entry of chunk ``i``: (offset, stored_len, kind, stored_crc, data_crc)."""
        if not 0 <= i < self._count:
            raise IndexError(f"chunk {i} out of range (the snapshot has {self._count} chunks)")
        off, slen, kind, scrc, dcrc = ENTRY.unpack_from(self._index, i * ENTRY.size)
        start, end = self._span(i)
        n = end - start
        if kind not in KIND_NAMES:
            raise self._chunk_fail(i, f"has unknown kind {kind} in the index")
        if kind == KIND_INHERIT and self.base is None:
            raise self._chunk_fail(i, "is inherited in a snapshot that is not a delta")
        if (kind in (KIND_ZERO, KIND_INHERIT) and slen != 0) or \
                (kind == KIND_RAW and slen != n) or \
                (kind == KIND_ZSTD and slen <= 0) or off < self._data_start or \
                off + slen > self._index_offset:
            raise self._chunk_fail(
                i, f"has an inconsistent index entry ({KIND_NAMES[kind]}, {slen} bytes at "
                   f"{off})")
        return off, slen, kind, scrc, dcrc

    def _load(self, i: int, *, check_data: bool = False) -> bytes | None:
        """Chunk ``i`` decompressed and checked, or ``None`` for a zero chunk (not cached).

        An inherited chunk is the base's (cached there); ``check_data`` checks only this link.
        """
        self._check_open()
        off, slen, kind, scrc, dcrc = self.entry(i)
        if kind == KIND_INHERIT:
            assert self.base is not None  # entry() refuses inherit outside a delta
            return None if check_data else self.base._load(i)
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
            d = self._local.d = zstd().ZstdDecompressor()
        try:
            params = zstd().get_frame_parameters(payload)
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

    def chunk_kind(self, i: int) -> int:
        """The kind of chunk ``i`` through the chain: an inherited chunk has its base's kind."""
        kind = self.entry(i)[2]
        if kind == KIND_INHERIT:
            assert self.base is not None
            return self.base.chunk_kind(i)
        return int(kind)

    def verify_chunk(self, i: int) -> None:
        """Read chunk ``i`` bypassing the cache and check both of its checksums (in this
        link only: an inherited chunk is checked by verifying the base)."""
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
                mv[pos - offset:] = zeros(end - pos)
                break
            i = pos // cs
            cstart = i * cs
            stop = min(end, cstart + cs, self._size)
            data = self._load(i)
            if data is None:
                mv[pos - offset:stop - offset] = zeros(stop - pos)
            else:
                mv[pos - offset:stop - offset] = memoryview(data)[pos - cstart:stop - cstart]
            pos = stop

    def read_many(self, requests: Sequence[tuple[int, memoryview]]) -> None:
        """Serve each ``(offset, buf)`` pair as :meth:`read_into` would."""
        for offset, buf in requests:
            self.read_into(offset, buf)

    def info(self, *, verify: bool = False) -> SnapshotInfo:
        """Count this link's chunks by kind; with ``verify``, decompress and check every chunk
        it stores (:func:`inspect_chain` does so for every link)."""
        counts = {KIND_ZERO: 0, KIND_ZSTD: 0, KIND_RAW: 0, KIND_INHERIT: 0}
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
            verified=verify, base=self.base.path if self.base is not None else "",
            inherited_chunks=counts[KIND_INHERIT])

    # -- lifetime ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._fd < 0:
            raise self._fail("the reader is closed")

    def close(self) -> None:
        """Close the file (and a delta's bases) and drop the cache. Idempotent."""
        fd, self._fd = self._fd, -1
        with self._lock:
            self._cache.clear()
        if fd >= 0:
            os.close(fd)
        if self.base is not None:
            self.base.close()

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


def inspect_snapshot(path: str | os.PathLike[str], *, verify: bool = False,
                     base: str | os.PathLike[str] | None = None) -> SnapshotInfo:
    """Describe a snapshot; with ``verify=True`` decompress and check every chunk (of a delta:
    every link of its chain, see :func:`inspect_chain`).

    Raises:
        SnapshotError: the file is not a snapshot, is truncated or is corrupted; a delta's
            base is missing or is not the snapshot it was made from.
    """
    return inspect_chain(path, verify=verify, base=base)[0]


def inspect_chain(path: str | os.PathLike[str], *, verify: bool = False,
                  base: str | os.PathLike[str] | None = None) -> list[SnapshotInfo]:
    """Describe every link of a snapshot's chain: the file itself first, then its base, its
    base's base..., down to the full snapshot (one link for a full snapshot). Opening the
    chain checks every link against the next; ``verify=True`` also decompresses and checks
    every chunk of every link. ``base`` names the file's base (see :class:`SnapshotReader`).

    Raises:
        SnapshotError: as :func:`inspect_snapshot`.
    """
    with SnapshotReader(path, cache_chunks=0, base=base) as reader:
        return [link.info(verify=verify) for link in reader.chain]


class SnapshotSource:
    """A :class:`~userfault.sources.base.PageSource` serving pages from a snapshot file.

    Picklable: only the path and the options travel; the file is opened lazily in the process
    that reads (and reopened after a ``fork``). Errors are :class:`SnapshotError`.

    A delta serves its whole chain: the pages it holds and, for the rest, its base's.

    Args:
        path: the snapshot file.
        cache_chunks: decompressed chunks to keep (see :class:`SnapshotReader`).
        page_size: the page size of the region served (reads are zero-padded up to it).
        base: a delta's base, instead of the path it records (see :class:`SnapshotReader`).
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 cache_chunks: int = DEFAULT_CACHE_CHUNKS, page_size: int = PAGE_SIZE,
                 base: str | os.PathLike[str] | None = None) -> None:
        self.path = os.fsdecode(os.fspath(path))
        self.cache_chunks = cache_chunks
        self.page_size = page_size
        self.base = None if base is None else os.fsdecode(os.fspath(base))
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
                                                  page_size=self.page_size, base=self.base)
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
                "page_size": self.page_size, "base": self.base}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], cache_chunks=state["cache_chunks"],  # type: ignore[misc]
                      page_size=state["page_size"], base=state.get("base"))

    def __repr__(self) -> str:
        return f"SnapshotSource({self.path!r}, cache_chunks={self.cache_chunks})"
