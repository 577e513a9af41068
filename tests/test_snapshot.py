"""Tests of the compressed snapshot format (userfault.sources.snapshot)."""

from __future__ import annotations

import argparse
import json
import mmap
import os
import pickle
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from userfault._units import parse_size
from userfault.errors import SnapshotError, SourceError
from userfault.sources.base import BatchedPageSource, PageSource
from userfault.sources.snapshot import (
    SnapshotReader,
    SnapshotSource,
    create_snapshot,
    inspect_snapshot,
)
from userfault.sources.snapshot.cli import add_snapshot_commands
from userfault.sources.snapshot.format import (
    ENTRY,
    FOOTER,
    HEADER,
    KIND_RAW,
    KIND_ZERO,
    KIND_ZSTD,
)

CS = 16384  # small chunks keep the tests fast


def mixed_data(seed: int = 1, size: int = 10 * CS + 1234) -> bytes:
    """Random, zero, text and random again; size not a multiple of the chunk or page size."""
    rng = random.Random(seed)
    text = b"".join(b"line %d of some repetitive text\n" % i for i in range(100000))
    parts = [
        rng.randbytes(2 * CS),        # chunks 0-1: raw
        bytes(3 * CS),                # chunks 2-4: zero
        text[: 3 * CS],               # chunks 5-7: zstd
        rng.randbytes(CS // 2) + bytes(CS // 2),  # chunk 8: zstd (half zero)
    ]
    data = b"".join(parts)
    return (data + rng.randbytes(size))[:size]


class Snap(tuple):  # type: ignore[type-arg]
    """(path, data) with a short repr, so hypothesis failure reports stay readable."""

    def __repr__(self) -> str:
        return f"Snap({self[0]}, <{len(self[1])} bytes>)"


@pytest.fixture(scope="module")
def snap(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("snap") / "mixed.ufs"
    data = mixed_data()
    create_snapshot(data, path, chunk_size=CS)
    return Snap((path, data))


# ---------------------------------------------------------------------------------- round trips


def test_round_trip_counts_kinds(snap: tuple[Path, bytes]) -> None:
    path, data = snap
    info = inspect_snapshot(path, verify=True)
    assert info.size == len(data)
    assert info.chunk_size == CS
    assert info.chunk_count == -(-len(data) // CS) == 11
    assert info.zero_chunks == 3
    assert info.raw_chunks >= 2  # chunks 0, 1 and the random tail
    assert info.zero_chunks + info.raw_chunks + info.zstd_chunks == info.chunk_count
    assert info.file_bytes == path.stat().st_size
    assert info.compressed_bytes == info.file_bytes - HEADER.size - FOOTER.size - 11 * ENTRY.size
    assert info.verified
    with SnapshotReader(path) as r:
        kinds = [r.entry(i)[2] for i in range(r.chunk_count)]
        assert kinds[:8] == [KIND_RAW] * 2 + [KIND_ZERO] * 3 + [KIND_ZSTD] * 3
        out = bytearray(len(data))
        r.read_into(0, memoryview(out))
        assert out == data
        assert b"".join(r.read_chunk(i) for i in range(r.chunk_count)) == data


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, CS - 1, CS, CS + 1, 3 * CS + 17])
def test_odd_sizes(tmp_path: Path, size: int) -> None:
    data = mixed_data(size, size)
    info = create_snapshot(data, tmp_path / "s.ufs", chunk_size=CS)
    assert info.size == size and info.chunk_count == -(-size // CS)
    with SnapshotReader(tmp_path / "s.ufs") as r:
        padded = -(-size // 4096) * 4096
        out = bytearray(b"\xff" * padded)
        r.read_into(0, memoryview(out))
        assert out[:size] == data
        assert out[size:] == bytes(padded - size)  # tail of the last page is zero
        with pytest.raises(SnapshotError, match="outside the snapshot"):
            r.read_into(padded - 1, memoryview(bytearray(2)))
        with pytest.raises(SnapshotError, match="outside the snapshot"):
            r.read_into(-1, memoryview(bytearray(1)))


def test_empty_source_makes_empty_snapshot(tmp_path: Path) -> None:
    info = create_snapshot(b"", tmp_path / "e.ufs")
    assert (info.size, info.chunk_count, info.ratio) == (0, 0, 0.0)
    assert inspect_snapshot(tmp_path / "e.ufs", verify=True).chunk_count == 0
    with SnapshotReader(tmp_path / "e.ufs") as r:
        r.read_into(0, memoryview(bytearray(0)))
        with pytest.raises(SnapshotError, match="outside the snapshot"):
            r.read_into(0, memoryview(bytearray(1)))


def test_incompressible_stored_raw_and_zero_elided(tmp_path: Path) -> None:
    data = os.urandom(4 * CS) + bytes(60 * CS)
    info = create_snapshot(data, tmp_path / "r.ufs", chunk_size=CS)
    assert info.raw_chunks == 4 and info.zero_chunks == 60 and info.zstd_chunks == 0
    assert info.compressed_bytes == 4 * CS
    assert info.file_bytes == HEADER.size + 4 * CS + 64 * ENTRY.size + FOOTER.size


def test_buffer_kinds(tmp_path: Path) -> None:
    arr = np.arange(3 * CS // 4, dtype=np.float32).reshape(3, -1)
    create_snapshot(arr, tmp_path / "a.ufs", chunk_size=CS)
    with SnapshotReader(tmp_path / "a.ufs") as r:
        assert r.read_chunk(1) == arr.tobytes()[CS : 2 * CS]
    m = mmap.mmap(-1, 5 * CS)
    m[CS : CS + 5] = b"hello"
    info = create_snapshot(m, tmp_path / "m.ufs", chunk_size=CS)
    assert info.zero_chunks == 4
    create_snapshot(memoryview(bytearray(b"abc" * 5000)), tmp_path / "v.ufs")
    with pytest.raises(ValueError, match="C-contiguous"):
        create_snapshot(arr[:, ::2], tmp_path / "x.ufs")
    with pytest.raises(TypeError, match="buffer protocol"):
        create_snapshot(42, tmp_path / "x.ufs")


def test_file_source_and_threads_give_same_bytes(tmp_path: Path) -> None:
    data = mixed_data(7, 40 * CS + 99)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    a = create_snapshot(src, tmp_path / "a.ufs", chunk_size=CS)
    b = create_snapshot(str(src), tmp_path / "b.ufs", chunk_size=CS, threads=2)
    c = create_snapshot(data, tmp_path / "c.ufs", chunk_size=CS, threads=-1)
    assert (tmp_path / "a.ufs").read_bytes() == (tmp_path / "b.ufs").read_bytes()
    assert (tmp_path / "a.ufs").read_bytes() == (tmp_path / "c.ufs").read_bytes()
    assert a.file_bytes == b.file_bytes == c.file_bytes


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunk_size": 2048}, "power of two"),
        ({"chunk_size": 3 * 4096}, "power of two"),
        ({"chunk_size": 128 << 20}, "power of two"),
        ({"level": 99}, "level must be"),
        ({"threads": -2}, "threads must be"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_snapshot(b"x", tmp_path / "s.ufs", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "s.ufs").exists()


def test_progress_callback(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    create_snapshot(bytes(5 * CS + 1), tmp_path / "p.ufs", chunk_size=CS,
                    progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (5 * CS + 1, 5 * CS + 1)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and len(calls) == 6


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "s.ufs"
    dest.write_bytes(b"old contents")

    def boom(done: int, total: int) -> None:
        if done >= 3 * CS:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        create_snapshot(os.urandom(8 * CS), dest, chunk_size=CS, progress=boom)
    assert dest.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.ufs"]  # temp file removed
    create_snapshot(b"new", dest)
    assert inspect_snapshot(dest).size == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.ufs"]


# --------------------------------------------------------------------------------- random access


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_access_matches_original(snap: tuple[Path, bytes], data: st.DataObject) -> None:
    path, original = snap
    size = len(original)
    padded = -(-size // 4096) * 4096
    cache = data.draw(st.sampled_from([0, 1, 4]))
    with SnapshotReader(path, cache_chunks=cache) as r:
        for _ in range(5):
            offset = data.draw(st.integers(0, padded))
            length = data.draw(st.integers(0, min(padded - offset, 3 * CS)))
            out = bytearray(length)
            r.read_into(offset, memoryview(out))
            expect = (original + bytes(padded - size))[offset : offset + length]
            assert out == expect


def test_reader_decompresses_only_the_needed_chunk(snap: tuple[Path, bytes]) -> None:
    path, original = snap
    with SnapshotReader(path, cache_chunks=2) as r:
        assert r.stats.decompressions == 0  # opening decompresses nothing
        page = bytearray(4096)
        base = 6 * CS  # a zstd chunk
        for off in range(base, base + CS, 4096):  # sequential 4 KiB reads of one chunk
            r.read_into(off, memoryview(page))
            assert page == original[off : off + 4096]
        st1 = r.stats
        assert st1.decompressions == 1 and st1.misses == 1 and st1.hits == CS // 4096 - 1
        r.read_into(2 * CS, memoryview(page))  # a zero chunk: nothing read at all
        assert r.stats.bytes_read == st1.bytes_read
        r.read_into(5 * CS, memoryview(page))
        r.read_into(7 * CS, memoryview(page))  # evicts chunk 6 (cache of 2)
        r.read_into(6 * CS, memoryview(page))
        assert r.stats.decompressions == 4 and r.stats.cached_chunks == 2
    with SnapshotReader(path, cache_chunks=0) as r:
        for _ in range(3):
            r.read_into(6 * CS, memoryview(page))
        assert r.stats.decompressions == 3 and r.stats.cached_chunks == 0


def test_threaded_reads(snap: tuple[Path, bytes]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    path, original = snap
    with SnapshotReader(path, cache_chunks=2) as r:
        def work(seed: int) -> bool:
            rng = random.Random(seed)
            for _ in range(200):
                off = rng.randrange(0, len(original) - 4096)
                buf = bytearray(4096)
                r.read_into(off, memoryview(buf))
                if buf != original[off : off + 4096]:
                    return False
            return True

        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(work, range(8)))


def test_closed_reader(snap: tuple[Path, bytes]) -> None:
    r = SnapshotReader(snap[0])
    r.close()
    r.close()
    assert r.closed
    with pytest.raises(SnapshotError, match="closed"):
        r.read_chunk(0)


# --------------------------------------------------------------------------------- big and sparse


@pytest.mark.timeout(60)
def test_big_sparse_file_streams_in_bounded_memory(tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    size = 256 << 20
    rng = random.Random(3)
    text = b"".join(b"record %08d: the same few words again\n" % i for i in range(30000))
    with open(src, "wb") as f:
        f.truncate(size)
        for k in range(0, size, 8 << 20):  # 3 MiB of data every 8 MiB, the rest holes
            f.seek(k)
            f.write(rng.randbytes(1 << 20))
            f.write(text[: 1 << 20])
            f.write(bytes(1 << 20))  # zeros that are real data, not a hole
    tracemalloc.start()
    try:
        info = create_snapshot(src, tmp_path / "big.ufs", chunk_size=1 << 20, threads=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak Python allocations {peak} bytes for a 256 MiB source"
    assert info.size == size and info.chunk_count == 256
    assert info.raw_chunks == 32 and info.zstd_chunks == 32 and info.zero_chunks == 192
    assert info.file_bytes < 40 << 20
    src_s = SnapshotSource(tmp_path / "big.ufs")
    buf = bytearray(4096)
    with open(src, "rb") as f:
        for off in (0, (1 << 20) + 8192, (32 << 20) + 12345, size - 4096):
            src_s.read_into(off, memoryview(buf))
            f.seek(off)
            assert buf == f.read(4096)


# --------------------------------------------------------------------------------- PageSource


def test_snapshot_source_is_a_picklable_page_source(snap: tuple[Path, bytes]) -> None:
    path, original = snap
    src = SnapshotSource(path, cache_chunks=3)
    blob = pickle.dumps(src)
    assert src._reader is None  # nothing opened yet: the file is opened lazily
    # (on Python < 3.12 this isinstance evaluates the `size` property, which opens the file)
    assert isinstance(src, PageSource) and isinstance(src, BatchedPageSource)
    assert src.size == len(original)
    blob2 = pickle.dumps(src)  # an open source pickles only its path and options
    assert len(blob2) == len(blob) < 300
    clone = pickle.loads(blob2)
    assert clone._reader is None and clone.cache_chunks == 3
    bufs = [(off, memoryview(bytearray(4096))) for off in (0, 5 * CS, 9 * CS + 4096)]
    clone.read_many(bufs)
    for off, b in bufs:
        assert b == original[off : off + 4096]
    clone.close()
    src.close()


def test_snapshot_source_errors_are_snapshot_errors(tmp_path: Path) -> None:
    src = SnapshotSource(tmp_path / "missing.ufs")
    pickle.loads(pickle.dumps(src))  # constructing and pickling never touch the file
    with pytest.raises(FileNotFoundError):
        _ = src.size
    bad = tmp_path / "bad.ufs"
    bad.write_bytes(b"hello, this is not a snapshot at all" * 10)
    with pytest.raises(SnapshotError, match="not a userfault snapshot") as ei:
        SnapshotSource(bad).read_into(0, memoryview(bytearray(1)))
    assert isinstance(ei.value, SourceError) and ei.value.source == str(bad)
    err = pickle.loads(pickle.dumps(ei.value))
    assert type(err) is SnapshotError and str(err) == str(ei.value)


# --------------------------------------------------------------------------------- corruption


def test_chunk_corruption_message(snap: tuple[Path, bytes], tmp_path: Path) -> None:
    path, _ = snap
    blob = bytearray(path.read_bytes())
    with SnapshotReader(path) as r:
        off, slen, _, _, _ = r.entry(6)
    blob[off + slen // 2] ^= 0x40
    bad = tmp_path / "bad.ufs"
    bad.write_bytes(blob)
    with SnapshotReader(bad) as r:
        r.read_chunk(5)  # the other chunks still read fine
        with pytest.raises(SnapshotError) as ei:
            r.read_into(6 * CS + 100, memoryview(bytearray(10)))
    assert str(ei.value) == (
        f"snapshot {bad}: chunk 6 (bytes {6 * CS}..{7 * CS}) failed its checksum: the file is "
        "corrupted; recreate it with `userfault snapshot create`")
    assert (ei.value.offset, ei.value.length) == (6 * CS, CS)
    with pytest.raises(SnapshotError, match="chunk 6 "):
        inspect_snapshot(bad, verify=True)
    inspect_snapshot(bad)  # without verify only the index is read


def test_truncated_file_message(snap: tuple[Path, bytes], tmp_path: Path) -> None:
    path, _ = snap
    bad = tmp_path / "cut.ufs"
    bad.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SnapshotError, match=r"footer missing .*truncated or was not completely"):
        inspect_snapshot(bad)
    bad.write_bytes(path.read_bytes()[:10])
    with pytest.raises(SnapshotError, match="only 10 bytes: it is truncated"):
        inspect_snapshot(bad)


def test_every_metadata_byte_is_checked(snap: tuple[Path, bytes], tmp_path: Path) -> None:
    path, _ = snap
    good = path.read_bytes()
    with SnapshotReader(path) as r:
        index_offset = r.entry(r.chunk_count - 1)[0] + r.entry(r.chunk_count - 1)[1]
    metadata = [*range(HEADER.size), *range(index_offset, len(good))]
    bad = tmp_path / "bad.ufs"
    for pos in metadata:
        blob = bytearray(good)
        blob[pos] ^= 0x01
        bad.write_bytes(blob)
        with pytest.raises(SnapshotError, match=r"corrupted|truncated|not a userfault|version"):
            SnapshotReader(bad)


def _chunk_of(pos: int, entries: list[tuple[int, int, int, int, int]]) -> int | None:
    for i, (off, slen, _, _, _) in enumerate(entries):
        if off <= pos < off + slen:
            return i
    return None


@pytest.mark.timeout(60)
@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=0, max_size=3),
    cut=st.one_of(st.none(), st.integers(0, 10**9)),
)
def test_fuzz_corruption_is_always_a_snapshot_error(
    snap: tuple[Path, bytes], tmp_path: Path, flips: list[tuple[int, int]], cut: int | None
) -> None:
    path, original = snap
    good = path.read_bytes()
    with SnapshotReader(path) as r:
        entries = [r.entry(i) for i in range(r.chunk_count)]
    blob = bytearray(good)
    touched: set[int] = set()
    for pos, x in flips:
        if pos % len(blob) not in touched:  # a second flip could undo the first
            blob[pos % len(blob)] ^= x
            touched.add(pos % len(blob))
    if cut is not None:
        del blob[cut % (len(blob) + 1):]
    if not flips and cut is None:
        return
    bad = tmp_path / "fuzz.ufs"
    bad.write_bytes(blob)
    assert bytes(blob) != good
    try:
        reader = SnapshotReader(bad, cache_chunks=1)
    except SnapshotError:
        return  # refused at open: header, footer or index damaged
    failed: list[int] = []
    with reader:
        for i in range(reader.chunk_count):
            try:
                chunk = reader.read_chunk(i)
            except SnapshotError as err:
                assert f"chunk {i} (bytes " in str(err)
                failed.append(i)
            else:
                assert chunk == original[i * CS : (i + 1) * CS], f"chunk {i} silently wrong"
        try:
            reader.info(verify=True)
        except SnapshotError as err:
            assert "chunk " in str(err)
    # Corruption is never silent: if the file opened, the bytes hit are all in chunk payloads
    # and each such chunk fails, naming itself.
    assert cut is None
    hit = {_chunk_of(p, entries) for p in touched}
    assert None not in hit
    assert sorted(hit) == failed  # type: ignore[type-var]


# --------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="userfault")
    add_snapshot_commands(parser.add_subparsers(dest="command"))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return int(args.func(args))


def test_parse_size() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("64K") == 65536
    assert parse_size("1M") == parse_size("1MiB") == parse_size("1mb") == 1 << 20
    assert parse_size("2G") == 2 << 30
    assert parse_size("1.5K") == 1536
    for bad in ("", "M", "1X", "-1K", "abc"):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)


def test_cli_create_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "mem.bin"
    src.write_bytes(mixed_data(5, 20 * CS))
    dest = tmp_path / "mem.ufs"
    assert _run(["snapshot", "create", str(src), str(dest), "--chunk-size", "16K",
                 "--level", "5", "--progress"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{dest}: 320.0 KiB in 20 chunks of 16.0 KiB (3 zero, ")
    assert "ratio " in out and "MB/s" in out
    assert "\r[" in err and "100.0%" in err and "ETA" in err

    assert _run(["snapshot", "create", str(src), str(dest), "--chunk-size", "16K", "-q"]) == 0
    assert capsys.readouterr() == ("", "")

    assert _run(["snapshot", "inspect", str(dest), "--verify"]) == 0
    out, _ = capsys.readouterr()
    assert "chunk size:      16384 bytes (16.0 KiB)" in out
    assert "verified:        all chunks OK" in out

    assert _run(["snapshot", "inspect", str(dest), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["size"] == 20 * CS and doc["chunk_count"] == 20 and doc["zero_chunks"] == 3
    assert doc["level"] == 3 and doc["verified"] is False


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["snapshot", "create", str(tmp_path / "nope"), str(tmp_path / "x.ufs")]) == 1
    assert "No such file" in capsys.readouterr().err
    src = tmp_path / "s.bin"
    src.write_bytes(b"x" * 100)
    assert _run(["snapshot", "create", str(src), str(tmp_path / "x.ufs"),
                 "--chunk-size", "3K"]) == 1
    assert "power of two" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["snapshot", "create", "a", "b", "--chunk-size", "lots"])
    assert "invalid size" in capsys.readouterr().err
    src.write_bytes(b"not a snapshot" * 100)
    assert _run(["snapshot", "inspect", str(src), "--json"]) == 1
    out, err = capsys.readouterr()
    assert "not a userfault snapshot" in json.loads(out)["error"]
    assert "error:" in err
