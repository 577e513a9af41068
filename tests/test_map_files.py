"""``userfault.map(path)`` of what is not a regular file, and of a file that shrinks.

A FIFO's ``open()`` blocks until a writer comes: these tests have no writer, so a map that
opened it would hang (and be stopped by the timeout) instead of refusing it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

import userfault
from userfault import FileSource, PagerError, SnapshotError, SourceError, _native
from userfault.sources.snapshot import SnapshotSource

pytestmark = pytest.mark.timeout(20)

ADVICE = ("pages are served from regular files, compressed snapshots (.ufs) and URLs; copy "
          "the data into a file first")


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen(1)
        yield path


def test_map_of_a_fifo_is_refused_without_opening_it(fifo: Path) -> None:
    with pytest.raises(SourceError) as info:
        userfault.map(fifo)
    assert str(info.value) == f"{str(fifo)!r} is a FIFO (named pipe), not a regular file: {ADVICE}"
    assert info.value.source == str(fifo)
    with pytest.raises(SourceError, match="is a FIFO"):
        userfault.map(f"file://{fifo}")
    with pytest.raises(SourceError, match="is a FIFO"):
        FileSource(fifo)


def test_a_fifo_named_like_a_snapshot_is_refused_too(fifo: Path) -> None:
    named = fifo.with_name("mem.ufs")
    os.rename(fifo, named)
    with pytest.raises(SnapshotError) as info:
        userfault.map(named)
    assert str(info.value) == f"snapshot {str(named)!r} is a FIFO (named pipe), not a regular file"
    with pytest.raises(SnapshotError, match="is a FIFO"):
        SnapshotSource(named).size  # noqa: B018 - opening is what is refused


def test_map_of_a_socket_directory_and_devices(unix_socket: Path, tmp_path: Path) -> None:
    cases = [(unix_socket, "a socket", ADVICE), (tmp_path, "a directory", "name a file in it"),
             (Path("/dev/zero"), "a character device", ADVICE)]
    block = next((p for p in (Path("/dev/loop0"), Path("/dev/vda"), Path("/dev/sda"))
                  if p.is_block_device()), None)
    if block is not None:
        cases.append((block, "a block device", ADVICE))
    for path, kind, advice in cases:
        with pytest.raises(SourceError) as info:
            userfault.map(path)
        assert str(info.value) == f"{str(path)!r} is {kind}, not a regular file: {advice}"


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as info:
        userfault.map(tmp_path / "nope.bin")
    assert str(info.value) == (f"cannot open {str(tmp_path / 'nope.bin')!r}: No such file or "
                               "directory")
    (tmp_path / "empty.bin").touch()
    with pytest.raises(SourceError, match=r"is empty: nothing to page in"):
        userfault.map(tmp_path / "empty.bin")


def test_a_truncated_file_names_its_real_size(tmp_path: Path) -> None:
    path = tmp_path / "shrinks.bin"
    path.write_bytes(b"\x01" * (4 << 20))
    src = FileSource(path)
    try:
        os.truncate(path, 12345)
        with pytest.raises(SourceError) as info:
            src.read_into(1 << 20, memoryview(bytearray(4096)))
        assert str(info.value) == (
            f"{str(path)!r} ended at byte 1048576, before 1052672: the file was truncated: it "
            "is now 12345 bytes, it was 4194304 when mapped")
        assert src.changed() == ("the file was truncated: it is now 12345 bytes, it was "
                                 "4194304 when mapped")
    finally:
        src.close()
    path.write_bytes(b"\x02" * (4 << 20))
    with userfault.map(path, readahead=(64 << 10, 4 << 20), retries=0) as p:
        os.truncate(path, 1 << 20)
        # Sequential faults inside the file: readahead runs into the missing part, which it
        # leaves to the faults (readahead never poisons); the touched pages are served.
        assert _native.touch(p.address, 1 << 20, 4096, 0, 0, False) == 2 * 256
        assert p.check() is None
        with pytest.raises(PagerError) as perr:
            p.prefetch([(2 << 20, 4096)])
        assert "the file is now 1048576 bytes, it had 4194304 when it was opened" in str(
            perr.value)
        with pytest.raises(PagerError) as perr:
            p.check()
        assert str(perr.value).startswith("the pager failed: prefetch at 0x")
        assert "the file is now 1048576 bytes, it had 4194304 when it was opened" in str(
            perr.value)
