"""Incremental snapshots: deltas of write-tracked pages over a base, chains, broken links."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import userfault
from userfault import PAGE_SIZE, Region
from userfault.errors import SnapshotError
from userfault.sources.snapshot import (
    DeltaSource,
    SnapshotReader,
    SnapshotSource,
    create_snapshot,
    flatten_snapshot,
    inspect_chain,
    load_written,
    save_written,
)
from userfault.sources.snapshot.cli import NEEDS_CHANGED
from userfault.sources.snapshot.format import ENTRY, FOOTER, HEADER, KIND_INHERIT
from userfault.tracking import WriteTracker

pytestmark = pytest.mark.timeout(60)

CS = 16384  # 4 pages a chunk
SIZE = 48 * CS + 1234  # not a multiple of the chunk or page size


def base_data(seed: int = 1) -> bytearray:
    """Random, zero and text chunks."""
    rng = random.Random(seed)
    text = b"".join(b"line %d of the base\n" % i for i in range(40000))
    body = rng.randbytes(16 * CS) + bytes(8 * CS) + text[:16 * CS]
    return bytearray(body + rng.randbytes(SIZE - len(body)))


def chunks_of(ranges: list[tuple[int, int]], size: int = SIZE) -> set[int]:
    """The chunks holding bytes of ``ranges`` (below ``size``)."""
    return {i for off, n in ranges for i in range(off // CS, (min(off + n, size) - 1) // CS + 1)
            if off < size}


def restore(path: Path, **options: object) -> bytes:
    """Every byte of the snapshot (chain) ``path``, through a real pager."""
    with userfault.map(SnapshotSource(path, **options)) as mem:  # type: ignore[arg-type]
        view = memoryview(mem)
        data = bytes(view[:SIZE])
        view.release()
    return data


@pytest.fixture
def base(tmp_path: Path) -> tuple[Path, bytearray]:
    data = base_data()
    create_snapshot(bytes(data), tmp_path / "base.ufs", chunk_size=CS)
    return tmp_path / "base.ufs", data


# ------------------------------------------------------------------------------- round trip


def test_a_chain_of_deltas_from_tracked_writes_restores_through_a_pager(
        tmp_path: Path, base: tuple[Path, bytearray]) -> None:
    """Three rounds of writes to a region tracked by WP_ASYNC: each round's delta holds just
    the chunks written, and every link of the chain restores its own state, byte for byte."""
    base_path, _ = base
    rng = random.Random(7)
    states: list[tuple[Path, bytes]] = []
    with Region.anonymous(SIZE) as region:
        view = memoryview(region)
        with SnapshotReader(base_path) as reader:
            reader.read_into(0, view[:SIZE])
        with WriteTracker(region) as tracker:
            assert tracker.written_ranges() == []
            prev = base_path
            for round_ in range(3):
                for _ in range(12):  # single bytes, whole pages, page runs across chunks
                    off = rng.randrange(SIZE)
                    n = rng.choice([1, PAGE_SIZE, 3 * PAGE_SIZE + 5])
                    n = min(n, SIZE - off)
                    view[off:off + n] = rng.randbytes(n)
                view[SIZE - 1] = round_ + 1  # the short last chunk
                view[20 * CS:21 * CS] = bytes(CS)  # a chunk that becomes all zeros
                written = tracker.written_ranges()
                dest = tmp_path / f"d{round_}.ufs"
                info = create_snapshot(region, dest, base=prev, written=written)
                assert info.base == str(prev) and info.version == 2
                assert info.stored_chunks == len(chunks_of(written))
                assert info.inherited_chunks == info.chunk_count - len(chunks_of(written))
                assert info.chunk_size == CS and info.size == SIZE
                states.append((dest, bytes(view[:SIZE])))
                prev = dest
        view.release()
    for path, expected in states:
        assert restore(path) == expected
    chain = inspect_chain(states[-1][0], verify=True)
    assert [link.path for link in chain] == [str(p) for p, _ in reversed(states)] + \
        [str(base_path)]
    assert all(link.verified for link in chain) and not chain[-1].base
    assert chain[0].file_bytes < chain[-1].file_bytes


@pytest.mark.parametrize("budget", [0, 16 * PAGE_SIZE])
def test_a_writable_pager_over_a_snapshot_commits_the_pages_written(
        tmp_path: Path, base: tuple[Path, bytearray], budget: int) -> None:
    """A pager maps the base lazily with writes tracked by the engine (write-protected
    installs); the delta holds the chunks written, and the next round maps that delta. Under a
    budget the written pages are written back, dropped and read again from the scratch file."""
    base_path, data = base
    rng = random.Random(11)
    expected = bytearray(data)
    prev = base_path
    for round_ in range(2):
        source = DeltaSource(prev, tmp_path / f"scratch{round_}")
        touched: list[tuple[int, int]] = []
        with userfault.map(source, writable=True, max_resident=budget) as mem:
            view = memoryview(mem)
            for _ in range(30):
                off = rng.randrange(SIZE)
                n = min(rng.choice([1, 100, PAGE_SIZE + 7]), SIZE - off)
                chunk = rng.randbytes(n)
                view[off:off + n] = chunk
                expected[off:off + n] = chunk
                touched.append((off, n))
            assert bytes(view[:SIZE]) == bytes(expected)  # read back, through the budget
            view.release()
        written = source.written_ranges()
        assert chunks_of(written) == chunks_of(touched)  # the engine saw exactly those pages
        dest = tmp_path / f"d{round_}.ufs"
        info = source.commit(dest)
        source.close()
        assert info.stored_chunks == len(chunks_of(touched)) and info.base == str(prev)
        assert restore(dest) == bytes(expected)
        prev = dest
    assert len(inspect_chain(prev, verify=True)) == 3
    r = cli("create", "--base", str(tmp_path / "d0.ufs"), "--changed",
            str(tmp_path / "scratch1.written"), str(tmp_path / "scratch1"),
            str(tmp_path / "again.ufs"))  # the scratch pair, on the command line
    assert r.returncode == 0, r.stderr
    assert restore(tmp_path / "again.ufs") == bytes(expected)


def test_a_delta_source_in_this_process(tmp_path: Path, base: tuple[Path, bytearray]) -> None:
    """Pages written in part keep the snapshot's other bytes; the temporary scratch goes."""
    base_path, data = base
    source = DeltaSource(base_path)
    source.write_from(PAGE_SIZE + 10, memoryview(b"abc"))
    buf = bytearray(2 * PAGE_SIZE)
    source.read_into(0, memoryview(buf))
    assert buf == data[:PAGE_SIZE + 10] + b"abc" + data[PAGE_SIZE + 13:2 * PAGE_SIZE]
    assert source.written_ranges() == [(PAGE_SIZE + 10, 3)]
    copy = pickle.loads(pickle.dumps(source))  # another process would learn the pages so
    other = bytearray(PAGE_SIZE)
    copy.read_into(PAGE_SIZE, memoryview(other))
    assert other == buf[PAGE_SIZE:]
    copy.close()
    info = source.commit(tmp_path / "d.ufs")
    assert info.stored_chunks == 1
    source.close()
    assert not os.path.exists(source.scratch) and not os.path.exists(source.written_file)


def test_only_the_tracked_pages_are_taken_from_the_source(
        tmp_path: Path, base: tuple[Path, bytearray]) -> None:
    """The pages named written come from the source, every other byte from the base, even where
    the source differs: nothing is found by comparing bytes."""
    base_path, data = base
    changed = bytearray(data)
    changed[3 * CS:3 * CS + PAGE_SIZE] = b"w" * PAGE_SIZE  # written, chunk 3 page 0
    changed[3 * CS + PAGE_SIZE:3 * CS + 2 * PAGE_SIZE] = b"u" * PAGE_SIZE  # not reported
    changed[30 * CS] ^= 0xFF  # not reported: chunk 30 is inherited
    info = create_snapshot(bytes(changed), tmp_path / "d.ufs", base=base_path,
                           written=[(3 * CS, PAGE_SIZE)])
    assert info.stored_chunks == 1
    expected = bytearray(data)
    expected[3 * CS:3 * CS + PAGE_SIZE] = b"w" * PAGE_SIZE
    with SnapshotReader(tmp_path / "d.ufs") as reader:
        assert reader.read_chunk(3) == expected[3 * CS:4 * CS]
        assert reader.entry(30)[2] == KIND_INHERIT
    assert restore(tmp_path / "d.ufs") == bytes(expected)
    empty = create_snapshot(bytes(changed), tmp_path / "e.ufs", base=base_path, written=[])
    assert empty.stored_chunks == 0 and restore(tmp_path / "e.ufs") == bytes(data)


def test_a_delta_and_its_base_move_together_or_the_base_is_named(
        tmp_path: Path, base: tuple[Path, bytearray]) -> None:
    base_path, data = base
    changed = bytearray(data)
    changed[:10] = b"0123456789"
    create_snapshot(bytes(changed), tmp_path / "d.ufs", base=base_path, written=[(0, 10)])
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(tmp_path / "d.ufs", moved / "d.ufs")
    shutil.move(base_path, moved / "base.ufs")  # recorded relative: still found
    assert restore(moved / "d.ufs") == bytes(changed)
    with userfault.map(str(moved / "d.ufs")) as mem:  # a path: recognised by its magic
        view = memoryview(mem)
        assert bytes(view[:SIZE]) == bytes(changed)
        view.release()
    shutil.move(moved / "base.ufs", tmp_path / "renamed.ufs")
    assert restore(moved / "d.ufs", base=tmp_path / "renamed.ufs") == bytes(changed)
    source = SnapshotSource(moved / "d.ufs", base=tmp_path / "renamed.ufs")
    copy = pickle.loads(pickle.dumps(source))
    buf = bytearray(10)
    copy.read_into(0, memoryview(buf))
    assert buf == b"0123456789"
    copy.close()


def test_flatten_writes_the_chain_as_one_full_snapshot(
        tmp_path: Path, base: tuple[Path, bytearray]) -> None:
    base_path, data = base
    changed = bytearray(data)
    changed[17 * CS:17 * CS + 3] = b"abc"
    create_snapshot(bytes(changed), tmp_path / "d.ufs", base=base_path,
                    written=[(17 * CS, PAGE_SIZE)])
    info = flatten_snapshot(tmp_path / "d.ufs", tmp_path / "flat.ufs")
    assert info.version == 1 and not info.base and info.inherited_chunks == 0
    assert info.zero_chunks == 8 - 1  # chunk 17 was written: no longer zero
    assert restore(tmp_path / "flat.ufs") == bytes(changed)
    with pytest.raises(ValueError, match=r"is the snapshot .* itself"):
        flatten_snapshot(tmp_path / "d.ufs", base_path)


# ------------------------------------------------------------------------------- broken links


def _delta(tmp_path: Path, base_path: Path, data: bytearray) -> Path:
    changed = bytearray(data)
    changed[5] = 0x55
    create_snapshot(bytes(changed), tmp_path / "d.ufs", base=base_path, written=[(0, 4096)])
    return tmp_path / "d.ufs"


def test_a_missing_base_is_a_clear_error(tmp_path: Path, base: tuple[Path, bytearray]) -> None:
    base_path, data = base
    delta = _delta(tmp_path, base_path, data)
    os.unlink(base_path)
    with pytest.raises(SnapshotError) as err:
        SnapshotReader(delta)
    assert str(err.value) == (
        f"snapshot {delta}: its base {tmp_path}/base.ufs (recorded as 'base.ufs', relative to "
        "the delta) does not exist; put the base it was made from back there, or name it "
        "explicitly (base= in the API, --base on the command line)")


def test_a_replaced_base_is_refused(tmp_path: Path, base: tuple[Path, bytearray]) -> None:
    """Another snapshot of the same size and chunks, or the same bytes recompressed."""
    base_path, data = base
    delta = _delta(tmp_path, base_path, data)
    create_snapshot(bytes(base_data(seed=2)), base_path, chunk_size=CS)
    with pytest.raises(SnapshotError, match=(
            rf"^snapshot {delta}: its base {base_path} \(recorded as 'base.ufs', relative to the "
            r"delta\) is not the snapshot this delta was made from \(its identity is "
            r"[0-9a-f]{16}\.\.\., the delta expects [0-9a-f]{16}\.\.\.\): it was replaced or "
            r"rewritten since; put the base it was made from back there")):
        SnapshotReader(delta)
    create_snapshot(bytes(data), base_path, chunk_size=CS, level=1)  # same bytes, other frames
    with pytest.raises(SnapshotError, match="is not the snapshot this delta was made from"):
        inspect_chain(delta)


def test_a_truncated_or_corrupted_base_is_refused(
        tmp_path: Path, base: tuple[Path, bytearray]) -> None:
    base_path, data = base
    delta = _delta(tmp_path, base_path, data)
    good = base_path.read_bytes()
    base_path.write_bytes(good[:len(good) // 2])
    with pytest.raises(SnapshotError) as err:
        SnapshotReader(delta)
    assert str(err.value) == (
        f"snapshot {delta}: its base {base_path} (recorded as 'base.ufs', relative to the "
        f"delta) cannot be used: snapshot {base_path}: footer missing ({len(good) // 2} "
        "bytes): the file is truncated or was not completely written; recreate it with "
        "`userfault snapshot create`; put the base it was made from back there, or name it "
        "explicitly (base= in the API, --base on the command line)")
    # A payload byte flipped: the identity (header, index, footer) still matches, so the
    # chain opens, and the read of that chunk fails naming the base and the chunk.
    bad = bytearray(good)
    bad[HEADER.size + CS + 100] ^= 1  # chunks 0 and 1 are raw: chunk 1's payload
    base_path.write_bytes(bytes(bad))
    with SnapshotReader(delta) as reader:
        assert reader.read_chunk(0)[5] == 0x55  # the delta's own
        with pytest.raises(SnapshotError, match=rf"^snapshot {base_path}: chunk 1 .*checksum"):
            reader.read_chunk(1)  # inherited from the corrupted base
    with pytest.raises(SnapshotError, match=rf"^snapshot {base_path}: chunk 1 .*checksum"):
        inspect_chain(delta, verify=True)


def test_a_loop_and_malformed_deltas_are_refused(
        tmp_path: Path, base: tuple[Path, bytearray]) -> None:
    base_path, data = base
    delta = _delta(tmp_path, base_path, data)
    os.replace(delta, base_path)  # base.ufs is now a delta whose base is base.ufs
    with pytest.raises(SnapshotError, match="is this delta or one of its own deltas: the "
                                            "chain loops"):
        SnapshotReader(base_path)
    # A full snapshot with an inherited chunk, a version 1 file with the delta flag.
    create_snapshot(bytes(data), base_path, chunk_size=CS)
    raw = bytearray(base_path.read_bytes())
    index_offset = struct.unpack_from("<Q", raw, len(raw) - FOOTER.size)[0]
    off, _, _, _, _ = ENTRY.unpack_from(raw, index_offset)
    ENTRY.pack_into(raw, index_offset, off, 0, KIND_INHERIT, 0, 0)
    count = (len(raw) - FOOTER.size - index_offset) // ENTRY.size
    index = bytes(raw[index_offset:index_offset + count * ENTRY.size])
    tail = struct.pack("<QQI", index_offset, count, zlib.crc32(index))
    raw[len(raw) - FOOTER.size:] = FOOTER.pack(index_offset, count, zlib.crc32(index),
                                               zlib.crc32(tail), b"UFS-END\n")
    base_path.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match=r"chunk 0 .* is inherited in a snapshot that is "
                                            r"not a delta"):
        SnapshotReader(base_path).read_chunk(0)
    struct.pack_into("<H", raw, 10, 1)  # flags: DELTA, in a version 1 header
    struct.pack_into("<I", raw, 60, zlib.crc32(bytes(raw[:60])))
    base_path.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match="unknown flags 0x1 for version 1"):
        SnapshotReader(base_path)


def test_every_metadata_byte_of_a_delta_is_checked(
        tmp_path: Path, base: tuple[Path, bytearray]) -> None:
    """Header, base block (the base's identity and path), index and footer: one bit flipped
    anywhere is refused when the delta opens, never read as another base or other chunks."""
    base_path, data = base
    delta = _delta(tmp_path, base_path, data)
    good = delta.read_bytes()
    base_len = struct.unpack_from("<I", good, 44)[0]
    index_offset = struct.unpack_from("<Q", good, len(good) - FOOTER.size)[0]
    bad = tmp_path / "bad.ufs"
    for pos in [*range(HEADER.size + base_len), *range(index_offset, len(good))]:
        blob = bytearray(good)
        blob[pos] ^= 0x01
        bad.write_bytes(blob)
        with pytest.raises(SnapshotError, match=r"corrupted|truncated|not a userfault|version"):
            SnapshotReader(bad)


def test_bad_delta_arguments_are_refused(tmp_path: Path, base: tuple[Path, bytearray]) -> None:
    base_path, data = base
    with pytest.raises(ValueError, match=r"needs both base= .* and written="):
        create_snapshot(bytes(data), tmp_path / "d.ufs", base=base_path)
    with pytest.raises(ValueError, match=r"written range \(0, 99999999\) is outside the source"):
        create_snapshot(bytes(data), tmp_path / "d.ufs", base=base_path,
                        written=[(0, 99999999)])
    with pytest.raises(ValueError, match="fewer than the base"):
        create_snapshot(bytes(100), tmp_path / "d.ufs", base=base_path, written=[])
    with pytest.raises(ValueError, match="differs from the base's 16384"):
        create_snapshot(bytes(data), tmp_path / "d.ufs", base=base_path, written=[],
                        chunk_size=4 * CS)
    with pytest.raises(ValueError, match=r"is the base snapshot .* itself"):
        create_snapshot(bytes(data), base_path, base=base_path, written=[])
    assert SnapshotReader(base_path).size == SIZE  # still there
    assert not os.path.exists(tmp_path / "d.ufs")


def test_full_snapshots_are_still_version_1(base: tuple[Path, bytearray]) -> None:
    """Older readers read them: the fields a delta adds are zero."""
    base_path, _ = base
    raw = base_path.read_bytes()
    magic, version, flags, *_rest, base_len, base_crc, _ = HEADER.unpack_from(raw)
    assert (version, flags, base_len, base_crc) == (1, 0, 0, 0)
    assert raw[36:60] == bytes(24)  # the 24 bytes reserved in version 1
    assert struct.Struct("<8sHHIiQQ24xI").unpack_from(raw)[:3] == (magic, 1, 0)


def test_written_files_round_trip(tmp_path: Path) -> None:
    ranges = [(0, 4096), (1 << 20, 8192)]
    assert save_written(tmp_path / "w.txt", ranges) == 2
    assert load_written(tmp_path / "w.txt") == ranges
    (tmp_path / "bad.txt").write_text("# comment\n\n0x1000 4096\n12 -3\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 4: expected 'OFFSET LENGTH'"):
        load_written(tmp_path / "bad.txt")


# --------------------------------------------------------------------------------------- CLI


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "userfault", "snapshot", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_cli_delta_inspect_flatten(tmp_path: Path, base: tuple[Path, bytearray]) -> None:
    """A program tracks its writes and saves the ranges with its memory image; the command
    line makes the delta, shows and verifies the chain, and flattens it."""
    base_path, data = base
    with Region.anonymous(SIZE) as region:
        view = memoryview(region)
        view[:SIZE] = data
        with WriteTracker(region) as tracker:
            view[7 * CS + 1] = 1
            view[40 * CS:40 * CS + 2 * PAGE_SIZE] = b"z" * 2 * PAGE_SIZE
            save_written(tmp_path / "w.txt", tracker.written_ranges())
        (tmp_path / "mem.img").write_bytes(view[:SIZE])
        view.release()
    image = (tmp_path / "mem.img").read_bytes()

    r = cli("create", "--base", str(base_path), str(tmp_path / "mem.img"),
            str(tmp_path / "d.ufs"))
    assert r.returncode == 2 and r.stderr.startswith("usage: userfault snapshot create")
    assert r.stderr.endswith(f"\nuserfault snapshot create: error: {NEEDS_CHANGED}\n")
    r = cli("create", "--base", str(base_path), "--changed", str(tmp_path / "w.txt"),
            str(tmp_path / "mem.img"), str(tmp_path / "d.ufs"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{tmp_path}/d.ufs: delta of {base_path}: 2 of 49 chunks of "
                               "16.0 KiB stored (47 inherited) -> ")
    r = cli("inspect", "--verify", str(tmp_path / "d.ufs"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "chunks:          49 (1 zstd, 1 raw, 0 zero, 47 inherited from the base)" in lines
    assert "chain:           2 links, each checked against its base (identity, size, chunk " \
        "size)" in lines
    assert any(line.startswith(f"                 {tmp_path}/d.ufs: ") and
               line.endswith("delta, 2 of 49 chunks stored, 47 inherited") for line in lines)
    assert any(line.startswith(f"                 {base_path}: ") and
               line.endswith("full snapshot") for line in lines)
    assert "verified:        all chunks of all 2 links OK" in lines
    doc = json.loads(cli("inspect", "--json", str(tmp_path / "d.ufs")).stdout)
    assert [link["path"] for link in doc["chain"]] == [f"{tmp_path}/d.ufs", str(base_path)]
    assert doc["inherited_chunks"] == 47

    r = cli("flatten", "-q", str(tmp_path / "d.ufs"), str(tmp_path / "flat.ufs"))
    assert r.returncode == 0, r.stderr
    assert restore(tmp_path / "flat.ufs") == image == restore(tmp_path / "d.ufs")

    os.replace(base_path, tmp_path / "moved.ufs")
    r = cli("inspect", str(tmp_path / "d.ufs"))
    assert r.returncode == 1 and "does not exist; put the base it was made from back there" \
        in r.stderr
    r = cli("inspect", "--base", str(tmp_path / "moved.ufs"), str(tmp_path / "d.ufs"))
    assert r.returncode == 0, r.stderr
