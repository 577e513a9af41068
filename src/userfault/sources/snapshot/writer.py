"""Writing compressed snapshots: :func:`create_snapshot` (format in :mod:`.format`)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import ModuleType
from typing import Any, TypeAlias

from ..._files import file_kind, open_regular
from ...errors import SnapshotError, SourceError
from .format import (
    BASE_BLOCK,
    DEFAULT_CHUNK_SIZE,
    DELTA_VERSION,
    END_MAGIC,
    ENTRY,
    FLAG_DELTA,
    FOOTER,
    HEADER,
    KIND_INHERIT,
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
    zeros,
    zstd,
)
from .reader import SnapshotReader

__all__ = ["create_snapshot", "flatten_snapshot"]


class _FileInput:
    """A source file or block device read chunk by chunk, skipping holes of sparse files
    without reading them (``size``: only that many leading bytes)."""

    def __init__(self, name: str, fd: int, size: int | None) -> None:
        self.name = name
        self.fd = fd
        whole = os.lseek(fd, 0, os.SEEK_END)
        if size is not None and size > whole:
            raise ValueError(f"{name!r} holds {whole} bytes, fewer than the size {size} asked "
                             "for")
        self.size = whole if size is None else size
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
            try:
                got = os.preadv(self.fd, [view[done:]], start + done)
            except OSError as err:
                raise _read_error(self.name, start + done, n - done, err) from err
            if got == 0:
                raise SnapshotError(
                    f"source {self.name} shrank while being snapshotted: expected "
                    f"{self.size} bytes, got only {start + done}",
                    source=self.name, offset=start + done, length=n - done)
            done += got
        return buf

    def close(self) -> None:
        os.close(self.fd)


class _StreamInput:
    """The first ``size`` bytes of a FIFO or character device, read in order (such files
    have neither a size nor random access: the chunks are asked for in order)."""

    def __init__(self, name: str, fd: int, size: int) -> None:
        self.name = name
        self.fd = fd
        self.size = size
        self._pos = 0

    def is_hole(self, start: int, end: int) -> bool:
        return False

    def read(self, start: int, n: int) -> bytearray:
        assert start == self._pos, "a stream is read in order"
        buf = bytearray(n)
        view = memoryview(buf)
        done = 0
        while done < n:
            try:
                got = os.readv(self.fd, [view[done:]])
            except OSError as err:
                raise _read_error(self.name, start + done, n - done, err) from err
            if got == 0:
                raise SnapshotError(
                    f"source {self.name} ended after {start + done} bytes, before the size "
                    f"{self.size} asked for", source=self.name, offset=start + done,
                    length=n - done)
            done += got
        self._pos += n
        return buf

    def close(self) -> None:
        os.close(self.fd)


def _read_error(name: str, offset: int, length: int, err: OSError) -> SourceError:
    return SourceError(f"reading the source {name} failed at byte {offset}: {err.strerror}",
                       source=name, offset=offset, length=length)


def _open_input(path: str, size: int | None, *,
                random_access: bool = False) -> _FileInput | _StreamInput:
    """The source named by ``path``: a regular file or block device, or (with ``size``) the
    leading bytes of a FIFO or character device. Anything else is refused before it is
    opened, and so is a FIFO or character device without ``size``: they have no size (and
    ``/dev/zero`` would never end, a FIFO's open waits for a writer), or when the chunks are
    not read in order (``random_access``: a delta reads only the chunks written)."""
    mode = os.stat(path).st_mode
    if random_access and (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        raise ValueError(f"{path!r} is {file_kind(mode)}: a delta reads only the chunks "
                         "written, so its source must be a file, a block device or a buffer")
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        if size is None:
            raise ValueError(f"{path!r} is {file_kind(mode)}: it has no size; give the number "
                             "of bytes to read from it (--size, or size=)")
        return _StreamInput(path, os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY),
                            size)
    fd = open_regular(path, allow_block=True, advice="name a file or a block device")
    try:
        return _FileInput(path, fd, size)
    except BaseException:
        os.close(fd)
        raise


class _BufferInput:
    def __init__(self, source: Any, size: int | None) -> None:
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
        if size is not None and size > self.view.nbytes:
            raise ValueError(f"the buffer holds {self.view.nbytes} bytes, fewer than the size "
                             f"{size} asked for")
        self.size = self.view.nbytes if size is None else size

    def is_hole(self, start: int, end: int) -> bool:
        return False

    def read(self, start: int, n: int) -> bytearray:
        return bytearray(self.view[start:start + n])

    def close(self) -> None:
        self.view.release()


class _ReaderInput:
    """A snapshot (a delta: its whole chain) read chunk by chunk, for :func:`flatten_snapshot`."""

    def __init__(self, reader: SnapshotReader) -> None:
        self.name = reader.path
        self.reader = reader
        self.size = reader.size

    def is_hole(self, start: int, end: int) -> bool:
        return self.reader.chunk_kind(start // self.reader.chunk_size) == KIND_ZERO

    def read(self, start: int, n: int) -> bytearray:
        return bytearray(self.reader.read_chunk(start // self.reader.chunk_size))

    def close(self) -> None:
        self.reader.close()


_Input: TypeAlias = "_FileInput | _StreamInput | _BufferInput | _ReaderInput"
_Encoded: TypeAlias = "tuple[int, bytes | bytearray, int, int]"
#: what a loader gives :func:`_encoded_chunks` for a chunk: bytes to encode, or its encoding
_Loaded: TypeAlias = "bytearray | _Encoded"
_ZERO: _Encoded = (KIND_ZERO, b"", 0, 0)
_INHERIT: _Encoded = (KIND_INHERIT, b"", 0, 0)


def _encode(compressor: Any, data: bytearray) -> _Encoded:
    """Return (kind, payload, stored_crc, data_crc) for one chunk."""
    n = len(data)
    if data == zeros(n):
        return _ZERO
    data_crc = zlib.crc32(data)
    packed: bytes = compressor.compress(data)
    if len(packed) >= n - n // 64:
        return KIND_RAW, data, data_crc, data_crc
    return KIND_ZSTD, packed, zlib.crc32(packed), data_crc


def create_snapshot(
    source: Source,
    dest_path: str | os.PathLike[str],
    *,
    chunk_size: int | None = None,
    level: int = 3,
    progress: Progress | None = None,
    threads: int = 0,
    size: int | None = None,
    base: str | os.PathLike[str] | None = None,
    written: Iterable[tuple[int, int]] | None = None,
) -> SnapshotInfo:
    """Write a compressed snapshot of ``source`` to ``dest_path``; with ``base``, a delta.

    Args:
        source: a path to a file or block device (or, with ``size``, a FIFO or character
            device), or any C-contiguous buffer: ``bytes``, ``bytearray``, ``memoryview``,
            ``mmap``, a numpy array, a live ``Region``.
        dest_path: the snapshot to write. It is written to a temporary file in the same
            directory, flushed to disk and renamed into place, so it either appears complete
            or not at all (an existing file is replaced only on success). It must not be the
            source itself (under any name or hard link), nor a link of the base's chain.
        chunk_size: bytes per chunk, the unit of random access: a power of two, a multiple
            of 4096, between 4 KiB and 64 MiB (default 64 KiB; a delta has its base's).
        level: zstd compression level (1 is fast, 3 the default, 19+ slow; negative is faster
            still).
        progress: called as ``progress(done_bytes, total_bytes)`` after each chunk.
        threads: 0 compresses in the calling thread; ``n > 0`` compresses up to ``n`` chunks
            in parallel worker threads; -1 uses one thread per CPU. The output is the same.
        size: snapshot only the first ``size`` bytes of a path source; needed for a FIFO or
            character device, which have no size of their own. Not for a delta.
        base: write a delta over this snapshot (a full one or itself a delta): the file holds
            only the chunks holding ``written`` pages and inherits every other chunk from the
            base. A chunk partly written is stored whole, its unwritten bytes read from the
            base, not from ``source``. ``source`` holds the memory now (a ``Region``, a memory
            image file...), at least the base's size; the delta has the base's size.
        written: with ``base``, the ``(offset, length)`` byte ranges of ``source`` written
            since the base, as write tracking finds them
            (:meth:`~userfault.tracking.WriteTracker.written_ranges`, or a file read with
            :func:`load_written`). They are trusted: nothing is compared with the base, so a
            page written but left out here keeps the base's bytes in the delta.

    Memory stays bounded: at most ``2 * max(threads, 1) + 1`` chunks are held at once, so
    sources bigger than RAM work. Holes of sparse source files are recognised with
    ``SEEK_DATA`` and become zero chunks without being read.

    Returns:
        the :class:`SnapshotInfo` of the new file.

    Raises:
        ValueError: a bad ``chunk_size``, ``level``, ``threads``, ``size`` or ``written``
            range, a non-contiguous buffer, a destination that is the source, a link of the
            base's chain or a directory, a source that is a directory or socket (or a FIFO or
            character device without ``size``, or with ``base``).
        SnapshotError: ``base`` (or a link of its chain) cannot be read.
        TypeError: ``source`` is neither a path nor a buffer.
        ImportError: the ``zstandard`` package is missing (the message says how to install
            it).
        OSError: the source cannot be read or the destination written; the message names
            the destination the caller gave, never the temporary file.
    """
    check_level(level)
    if not isinstance(threads, int) or threads < -1:
        raise ValueError(f"threads must be -1, 0 or a positive integer, got {threads!r}")
    if size is not None and (not isinstance(size, int) or size < 0):
        raise ValueError(f"size must be a non-negative integer, got {size!r}")
    if (base is None) != (written is None):
        raise ValueError("a delta needs both base= (the snapshot it extends) and written= (the "
                         "ranges written since, from write tracking); a full snapshot neither")
    if base is not None and size is not None:
        raise ValueError("size= does not apply to a delta: it has its base's size")
    if threads == -1:
        threads = os.cpu_count() or 1
    codec = zstd()
    started = time.perf_counter()
    dest = os.fspath(dest_path)
    if os.path.isdir(dest):
        raise ValueError(f"the destination {dest!r} is a directory: name the snapshot file, "
                         f"e.g. {os.path.join(dest, 'memory.ufs')!r}")
    stack = contextlib.ExitStack()
    try:
        reader = None
        if base is not None:
            reader = stack.enter_context(SnapshotReader(base))
            if chunk_size is not None and chunk_size != reader.chunk_size:
                raise ValueError(f"chunk_size {chunk_size} differs from the base's "
                                 f"{reader.chunk_size}: a delta has its base's chunks")
            chunk_size = reader.chunk_size
            for link in reader.chain:
                _refuse_same_file(os.stat(link.path), link.path, dest,
                                  what="the base snapshot")
        chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
        check_chunk_size(chunk_size)
        inp: _FileInput | _StreamInput | _BufferInput
        if isinstance(source, (str, os.PathLike)):
            inp = _open_input(os.fsdecode(source), size, random_access=reader is not None)
        else:
            inp = _BufferInput(source, size)
        stack.callback(inp.close)
        if not isinstance(inp, _BufferInput):
            _refuse_same_file(os.fstat(inp.fd), inp.name, dest)
        if reader is None:
            return _write(dest, inp.size, chunk_size, level, _full_loader(inp, chunk_size),
                          codec, threads, progress, started)
        assert written is not None
        if inp.size < reader.size:
            raise ValueError(f"the source {inp.name} holds {inp.size} bytes, fewer than the "
                             f"base {reader.path} ({reader.size}): a delta has its base's size")
        load = _delta_loader(inp, reader, _written_chunks(written, inp, reader))
        return _write(dest, reader.size, chunk_size, level, load, codec, threads, progress,
                      started, base=reader)
    finally:
        stack.close()


def flatten_snapshot(
    path: str | os.PathLike[str],
    dest_path: str | os.PathLike[str],
    *,
    level: int = 3,
    progress: Progress | None = None,
    threads: int = 0,
    base: str | os.PathLike[str] | None = None,
) -> SnapshotInfo:
    """Write the bytes of the snapshot ``path`` (a delta: its whole chain) as one full
    snapshot ``dest_path``, with the same chunk size; the chain is left as it is.

    ``base`` names the delta's base (see :class:`SnapshotReader`); ``level``, ``progress``,
    ``threads`` and the atomic write are those of :func:`create_snapshot`.

    Raises:
        SnapshotError: a link of the chain cannot be read or is not the one it should be.
        ValueError: ``dest_path`` is a directory or a link of the chain.
        OSError: the destination cannot be written.
    """
    check_level(level)
    if not isinstance(threads, int) or threads < -1:
        raise ValueError(f"threads must be -1, 0 or a positive integer, got {threads!r}")
    started = time.perf_counter()
    dest = os.fspath(dest_path)
    if os.path.isdir(dest):
        raise ValueError(f"the destination {dest!r} is a directory: name the snapshot file")
    inp = _ReaderInput(SnapshotReader(path, base=base))
    try:
        for link in inp.reader.chain:
            _refuse_same_file(os.stat(link.path), link.path, dest, what="the snapshot")
        return _write(dest, inp.size, inp.reader.chunk_size, level,
                      _full_loader(inp, inp.reader.chunk_size), zstd(),
                      os.cpu_count() or 1 if threads == -1 else threads, progress, started)
    finally:
        inp.close()


def _full_loader(inp: _Input,
                 chunk_size: int) -> Callable[[int], _Loaded]:
    def load(i: int) -> _Loaded:
        start = i * chunk_size
        n = min(chunk_size, inp.size - start)
        return _ZERO if inp.is_hole(start, start + n) else inp.read(start, n)
    return load


def _written_chunks(written: Iterable[tuple[int, int]],
                    inp: _Input,
                    reader: SnapshotReader) -> dict[int, list[tuple[int, int]]]:
    """The byte ranges written, cut at the base's size, merged, by chunk index."""
    cs, size = reader.chunk_size, reader.size
    per: dict[int, list[tuple[int, int]]] = {}
    for item in written:
        try:
            off, length = (int(x) for x in item)
        except (TypeError, ValueError):
            raise ValueError(f"a written range is an (offset, length) pair of integers, not "
                             f"{item!r}") from None
        if off < 0 or length < 0 or off + length > inp.size:
            raise ValueError(f"written range ({off}, {length}) is outside the source {inp.name} "
                             f"({inp.size} bytes)")
        pos, end = off, min(off + length, size)
        while pos < end:
            stop = min(end, (pos // cs + 1) * cs)
            per.setdefault(pos // cs, []).append((pos, stop))
            pos = stop
    merged: dict[int, list[tuple[int, int]]] = {}
    for i in sorted(per):
        spans: list[tuple[int, int]] = []
        for s, e in sorted(per[i]):
            if spans and s <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], e))
            else:
                spans.append((s, e))
        merged[i] = spans
    return merged


def _delta_loader(inp: _Input, reader: SnapshotReader,
                  chunks: dict[int, list[tuple[int, int]]]) -> Callable[[int], _Loaded]:
    cs, size = reader.chunk_size, reader.size

    def load(i: int) -> _Loaded:
        spans = chunks.get(i)
        if spans is None:
            return _INHERIT
        start = i * cs
        n = min(cs, size - start)
        if spans == [(start, start + n)]:
            return inp.read(start, n)
        data = bytearray(reader.read_chunk(i))
        for s, e in spans:
            data[s - start:e - start] = inp.read(s, e - s)
        return data
    return load


def _base_block(reader: SnapshotReader, dest: str) -> bytes:
    """A delta's base block: the base's identity and its path relative to the delta."""
    rel = os.fsencode(os.path.relpath(os.path.abspath(reader.path),
                                      os.path.dirname(os.path.abspath(dest))))
    if len(rel) > 0xFFFF:
        raise ValueError(f"the base's path {reader.path!r} is too long to record")
    return BASE_BLOCK.pack(reader.identity, len(rel)) + rel


def _write(dest: str, size: int, chunk_size: int, level: int, load: Callable[[int], _Loaded],
           codec: ModuleType, threads: int, progress: Progress | None, started: float, *,
           base: SnapshotReader | None = None) -> SnapshotInfo:
    """Write the snapshot file ``dest`` (a delta of ``base``, if given) atomically: to a
    temporary file, fsync, rename."""
    count = -(-size // chunk_size)
    base_block = b"" if base is None else _base_block(base, dest)
    version, flags = (VERSION, 0) if base is None else (DELTA_VERSION, FLAG_DELTA)
    counts = {KIND_ZERO: 0, KIND_ZSTD: 0, KIND_RAW: 0, KIND_INHERIT: 0}
    directory = os.path.dirname(os.path.abspath(dest))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".tmp",
                                   dir=directory)
    except OSError as err:
        raise _dest_error(dest, err) from err
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as out:
            fields = (MAGIC, version, flags, chunk_size, level, size, count, len(base_block),
                      zlib.crc32(base_block) if base_block else 0)
            header = HEADER.pack(*fields, 0)
            out.write(HEADER.pack(*fields, zlib.crc32(header[:60])))
            out.write(base_block)
            data_start = pos = HEADER.size + len(base_block)
            index = bytearray(ENTRY.size * count)
            for i, (kind, payload, scrc, dcrc) in enumerate(
                    _encoded_chunks(load, codec, level, count, threads)):
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
    except SourceError:
        _unlink_quietly(tmp)
        raise  # the source failed (named in the message), not the destination
    except OSError as err:
        _unlink_quietly(tmp)
        raise _dest_error(dest, err) from err
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(directory)
    file_bytes = index_offset + ENTRY.size * count + FOOTER.size
    return SnapshotInfo(
        path=dest, version=version, size=size, chunk_size=chunk_size, chunk_count=count,
        zero_chunks=counts[KIND_ZERO], raw_chunks=counts[KIND_RAW],
        zstd_chunks=counts[KIND_ZSTD], compressed_bytes=index_offset - data_start,
        file_bytes=file_bytes, ratio=size / file_bytes if size else 0.0, level=level,
        verified=False, seconds=time.perf_counter() - started,
        base="" if base is None else base.path,
        inherited_chunks=counts[KIND_INHERIT])


def _refuse_same_file(here: os.stat_result, name: str, dest: str, *,
                      what: str = "the source") -> None:
    """Refuse a destination that is the source (another path, a symlink or a hard link to
    it), or a snapshot the new one needs: renaming the snapshot over it would destroy it."""
    try:
        there = os.stat(dest)
    except FileNotFoundError:
        return
    except OSError as err:
        raise _dest_error(dest, err) from err
    if (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino):
        raise ValueError(f"the destination {dest!r} is {what} {name!r} itself (same file: "
                         f"device {here.st_dev}, inode {here.st_ino}); writing the snapshot "
                         f"there would destroy {what}: choose another destination")


def _dest_error(dest: str, err: OSError) -> OSError:
    """``err`` about the temporary file, retold about the destination the caller named."""
    return OSError(err.errno, f"cannot write the snapshot {dest!r}: {err.strerror}")


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


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


def _encoded_chunks(load: Callable[[int], _Loaded], codec: ModuleType, level: int, count: int,
                    threads: int) -> Iterator[_Encoded]:
    """Chunk ``i``'s encoding for ``i`` in ``range(count)``, in order; ``load(i)`` gives its
    bytes (compressed here, or on ``threads`` workers) or an encoding already made."""
    def make() -> Any:
        return codec.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)

    if threads <= 0:
        compressor = make()
        for i in range(count):
            data = load(i)
            yield _encode(compressor, data) if isinstance(data, bytearray) else data
        return

    local = threading.local()

    def work(data: bytearray) -> _Encoded:
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = make()
        return _encode(c, data)

    pending: list[Future[_Encoded]] = []
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ufs-compress") as pool:
        try:
            for i in range(count):
                data = load(i)
                if isinstance(data, bytearray):
                    pending.append(pool.submit(work, data))
                else:
                    done: Future[_Encoded] = Future()
                    done.set_result(data)
                    pending.append(done)
                while len(pending) > 2 * threads:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for f in pending:
                f.cancel()
