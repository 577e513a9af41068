"""Writing compressed snapshots: :func:`create_snapshot` (format in :mod:`.format`)."""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import ModuleType
from typing import Any, TypeAlias

from ...errors import SnapshotError
from .format import (
    DEFAULT_CHUNK_SIZE,
    END_MAGIC,
    ENTRY,
    FOOTER,
    HEADER,
    KIND_RAW,
    KIND_ZERO,
    KIND_ZSTD,
    MAGIC,
    VERSION,
    Progress,
    SnapshotInfo,
    Source,
    check_chunk_size,
    check_level,
    zstd,
)

__all__ = ["create_snapshot"]


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
_ZERO_CHUNKS: dict[int, bytes] = {}


def zeros(n: int) -> bytes:
    z = _ZERO_CHUNKS.get(n)
    if z is None:
        z = bytes(n)
        if len(_ZERO_CHUNKS) < 8:
            _ZERO_CHUNKS[n] = z
    return z


def _encode(compressor: Any, data: bytearray) -> _Encoded:
    """Return (kind, payload, stored_crc, data_crc) for one chunk."""
    n = len(data)
    if data == zeros(n):
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
    check_chunk_size(chunk_size)
    check_level(level)
    if not isinstance(threads, int) or threads < -1:
        raise ValueError(f"threads must be -1, 0 or a positive integer, got {threads!r}")
    if threads == -1:
        threads = os.cpu_count() or 1
    codec = zstd()
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
                        _encoded_chunks(inp, codec, level, chunk_size, count, threads)):
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
    inp: _FileInput | _BufferInput, codec: ModuleType, level: int, chunk_size: int, count: int,
    threads: int,
) -> Iterator[_Encoded]:
    def make() -> Any:
        return codec.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)

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
