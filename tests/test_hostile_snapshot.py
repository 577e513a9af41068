"""Hostile use of snapshots: ``userfault snapshot create`` asked to destroy its source or to
read what is not a file, a missing ``zstandard``, a full disk; corrupt snapshots read through
the CLI and through ``userfault.map`` (the faulting process dies of a logged SIGBUS, never
reads wrong bytes). Every case runs the real command or a real child process.

(Corruption of every metadata byte and fuzzed corruption at the API level are in
test_snapshot.py; they are not repeated here.)
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from userfault.sources.snapshot import SnapshotReader, create_snapshot, inspect_snapshot

pytestmark = pytest.mark.timeout(60)

CS = 16384
DATA = random.Random(42).randbytes(20 * CS + 333)


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "userfault", *args], capture_output=True,
                          text=True, timeout=timeout)


def refused(res: subprocess.CompletedProcess[str], message: str, code: int = 1) -> None:
    """Exit ``code``, exactly ``message`` on stderr, no traceback, nothing on stdout."""
    assert (res.returncode, res.stdout) == (code, ""), (res.returncode, res.stdout, res.stderr)
    assert res.stderr == message + "\n", res.stderr


def read_all(path: Path) -> bytes:
    with SnapshotReader(path) as r:
        buf = bytearray(r.size)
        r.read_into(0, memoryview(buf))
    return bytes(buf)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "mem.bin"
    path.write_bytes(DATA)
    return path


# -- create: never destroy the source ------------------------------------------------------


def _same_file_message(dest: str, src: Path) -> str:
    st = src.stat()
    return (f"userfault snapshot create: error: the destination {dest!r} is the source "
            f"{str(src)!r} itself (same file: device {st.st_dev}, inode {st.st_ino}); writing "
            "the snapshot there would destroy the source: choose another destination")


def test_create_refuses_the_source_as_destination(src: Path, tmp_path: Path) -> None:
    hard = tmp_path / "hard.bin"
    os.link(src, hard)
    sym = tmp_path / "sym.bin"
    sym.symlink_to(src)
    roundabout = str(tmp_path / "sub" / ".." / "mem.bin")
    (tmp_path / "sub").mkdir()
    for dest in (str(src), roundabout, str(hard), str(sym)):
        refused(cli("snapshot", "create", str(src), dest), _same_file_message(dest, src))
        assert src.read_bytes() == DATA, f"the source was changed via {dest}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.bin", "mem.bin", "sub",
                                                          "sym.bin"]  # no temporary left


def test_create_refuses_a_directory_as_source_or_destination(src: Path, tmp_path: Path) -> None:
    refused(cli("snapshot", "create", str(tmp_path), str(tmp_path / "x.ufs")),
            f"userfault snapshot create: error: {str(tmp_path)!r} is a directory, not a regular "
            "file or a block device: name a file in it")
    refused(cli("snapshot", "create", str(tmp_path), str(tmp_path / "x.ufs"), "--size", "1M"),
            f"userfault snapshot create: error: {str(tmp_path)!r} is a directory, not a regular "
            "file or a block device: name a file in it")
    refused(cli("snapshot", "create", str(src), str(tmp_path)),
            f"userfault snapshot create: error: the destination {str(tmp_path)!r} is a "
            f"directory: name the snapshot file, e.g. {str(tmp_path / 'memory.ufs')!r}")


def test_create_refuses_sizeless_sources_unless_a_size_is_given(tmp_path: Path) -> None:
    refused(cli("snapshot", "create", "/dev/zero", str(tmp_path / "z.ufs")),
            "userfault snapshot create: error: '/dev/zero' is a character device: it has no "
            "size; give the number of bytes to read from it (--size, or size=)")
    res = cli("snapshot", "create", "/dev/zero", str(tmp_path / "z.ufs"), "--size", "1M",
              "--chunk-size", "64K", "-q")
    assert res.returncode == 0, res.stderr
    info = inspect_snapshot(tmp_path / "z.ufs", verify=True)
    assert (info.size, info.zero_chunks) == (1 << 20, 16)


def test_create_from_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    # No writer: without --size it is refused at once (a blocking open would hang here).
    refused(cli("snapshot", "create", str(fifo), str(tmp_path / "f.ufs")),
            f"userfault snapshot create: error: {str(fifo)!r} is a FIFO (named pipe): it has no "
            "size; give the number of bytes to read from it (--size, or size=)")

    def write(payload: bytes) -> threading.Thread:
        def run() -> None:
            with open(fifo, "wb") as f:  # blocks until the snapshot command opens the FIFO
                f.write(payload)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    t = write(DATA)
    res = cli("snapshot", "create", str(fifo), str(tmp_path / "f.ufs"), "--size",
              str(len(DATA)), "--chunk-size", "16K", "-q")
    t.join(10)
    assert res.returncode == 0, res.stderr
    assert read_all(tmp_path / "f.ufs") == DATA
    t = write(DATA[:5000])  # fewer bytes than --size: an error, and no snapshot
    refused(cli("snapshot", "create", str(fifo), str(tmp_path / "g.ufs"), "--size", "64K"),
            f"userfault snapshot create: error: source {fifo} ended after 5000 bytes, before the "
            "size 65536 asked for")
    t.join(10)
    assert not (tmp_path / "g.ufs").exists()


def test_create_refuses_a_socket_and_a_size_past_the_end(src: Path, tmp_path: Path) -> None:
    sock_path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        refused(cli("snapshot", "create", str(sock_path), str(tmp_path / "s.ufs"), "--size",
                    "4K"),
                f"userfault snapshot create: error: {str(sock_path)!r} is a socket, not a "
                "regular file or a block device: name a file or a block device")
    refused(cli("snapshot", "create", str(src), str(tmp_path / "s.ufs"), "--size", "1M"),
            f"userfault snapshot create: error: {str(src)!r} holds {len(DATA)} bytes, fewer "
            "than the size 1048576 asked for")
    assert cli("snapshot", "create", str(src), str(tmp_path / "s.ufs"), "--size", "40K",
               "-q").returncode == 0
    assert read_all(tmp_path / "s.ufs") == DATA[:40 << 10]


def test_create_without_zstandard_says_how_to_install_it(src: Path, tmp_path: Path) -> None:
    # The interpreter cannot import zstandard (None in sys.modules makes import raise).
    code = textwrap.dedent(f"""
        import sys
        sys.modules["zstandard"] = None
        from userfault.cli import main
        sys.exit(main(["snapshot", "create", {str(src)!r}, {str(tmp_path / "z.ufs")!r}]))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30)
    refused(res, "userfault snapshot create: error: snapshots need the `zstandard` package: "
                 "pip install 'userfault[snapshot]'")


def test_write_errors_name_the_destination_not_the_temporary_file(src: Path,
                                                                  tmp_path: Path) -> None:
    refused(cli("snapshot", "create", str(src), str(tmp_path / "no" / "x.ufs")),
            f"userfault snapshot create: error: cannot write the snapshot "
            f"{str(tmp_path / 'no' / 'x.ufs')!r}: No such file or directory")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) for a private tmpfs")
def test_a_full_disk_names_the_destination(tmp_path: Path) -> None:
    """A real full file system: a 64 KiB tmpfs in a private mount namespace."""
    big = tmp_path / "big.bin"
    big.write_bytes(random.Random(3).randbytes(1 << 20))  # incompressible: 1 MiB to write
    small = tmp_path / "small"
    small.mkdir()
    script = (f"mount -t tmpfs -o size=64k none {small} && "
              f"{sys.executable} -m userfault snapshot create {big} {small}/x.ufs; "
              f"status=$?; ls -A {small}; exit $status")
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1, res.stderr
    assert res.stderr == (f"userfault snapshot create: error: cannot write the snapshot "
                          f"'{small}/x.ufs': No space left on device\n")
    assert res.stdout == ""  # the temporary file was removed from the full file system


# -- corrupt snapshots ---------------------------------------------------------------------


@pytest.fixture
def corrupt(tmp_path: Path) -> tuple[Path, int]:
    """A snapshot of DATA whose chunk 7 has one flipped bit; returns (path, chunk)."""
    path = tmp_path / "bad.ufs"
    create_snapshot(DATA, path, chunk_size=CS)
    blob = bytearray(path.read_bytes())
    with SnapshotReader(path) as r:
        off, length, _, _, _ = r.entry(7)
    blob[off + length // 3] ^= 0x10
    path.write_bytes(blob)
    return path, 7


def test_inspect_verify_names_the_corrupt_chunk(corrupt: tuple[Path, int]) -> None:
    path, k = corrupt
    assert cli("snapshot", "inspect", str(path)).returncode == 0  # the index is intact
    refused(cli("snapshot", "inspect", str(path), "--verify"),
            f"userfault snapshot inspect: error: snapshot {path}: chunk {k} (bytes "
            f"{k * CS}..{(k + 1) * CS}) failed its checksum: the file is corrupted; recreate it "
            "with `userfault snapshot create`")


def test_a_corrupt_chunk_mapped_ends_in_a_logged_sigbus(corrupt: tuple[Path, int]) -> None:
    """The pages of good chunks read right; the first touch of the corrupt chunk kills the
    process with SIGBUS (never zeros, never a hang), and the log names the chunk."""
    path, k = corrupt
    code = textwrap.dedent(f"""
        import userfault
        pager = userfault.map({str(path)!r}, readahead=False, retries=1)
        view = memoryview(pager)
        print("good", bytes(view[:4]).hex(), bytes(view[{(k + 1) * CS}:{(k + 1) * CS + 4}]).hex(),
              flush=True)
        print("bad", view[{k * CS + 100}], flush=True)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == -signal.SIGBUS, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == f"good {DATA[:4].hex()} {DATA[(k + 1) * CS:(k + 1) * CS + 4].hex()}\n"
    assert f"chunk {k} (bytes {k * CS}..{(k + 1) * CS}) failed its checksum" in res.stderr
    assert "poisoned" in res.stderr


def test_a_snapshot_truncated_after_open_ends_in_a_logged_sigbus(tmp_path: Path) -> None:
    path = tmp_path / "cut.ufs"
    create_snapshot(DATA, path, chunk_size=CS)
    code = textwrap.dedent(f"""
        import os, userfault
        pager = userfault.map({str(path)!r}, readahead=False, retries=1)
        view = memoryview(pager)
        print("first", view[0] == {DATA[0]}, flush=True)
        os.truncate({str(path)!r}, 2 * {CS})  # the chunks past this are gone
        print("late", view[{15 * CS}], flush=True)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == -signal.SIGBUS, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == "first True\n"
    assert "chunk 15 " in res.stderr and "poisoned" in res.stderr
