"""Bad arguments to every ``userfault`` command, run for real: each is refused with its exit
status (2: a usage error, 1: refused after parsing) and one clear line naming what was wrong
and what to do; never a traceback, never a hang (FIFOs and devices are refused unopened).

(Snapshot and Firecracker refusals that need files or servers set up are in
test_hostile_snapshot.py and test_hostile_firecracker.py.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from userfault.sources.snapshot import MAGIC

pytestmark = pytest.mark.timeout(60)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "userfault", *args], capture_output=True,
                          text=True, timeout=30)


def last_line(res: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in res.stderr, res.stderr
    return res.stderr.strip().splitlines()[-1]


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


USAGE: list[tuple[list[str], str]] = [
    ([], "userfault: error: the following arguments are required: COMMAND"),
    (["bogus"], "userfault: error: argument COMMAND: invalid choice: 'bogus' (choose from "
                "'demo', 'features', 'snapshot', 'firecracker', 'trace', 'plot', 'stats', "
                "'workingset', 'serve', 'migrate')"),
    (["migrate"], "userfault migrate: error: the following arguments are required: SIDE"),
    (["migrate", "receive", "uf://h:1/m", "--secret-file", "s"],
     "userfault migrate receive: error: the following arguments are required: --output/-o"),
    (["demo", "--pages", "abc"], "userfault demo: error: argument --pages: invalid int value: "
                                 "'abc'"),
    (["snapshot"], "userfault snapshot: error: the following arguments are required: "
                   "{create,inspect,flatten}"),
    (["snapshot", "create", "a"], "userfault snapshot create: error: the following arguments "
                                  "are required: DEST"),
    (["snapshot", "create", "a", "b", "--size", "-1"],
     "userfault snapshot create: error: argument --size: invalid size '-1': negative"),
    (["snapshot", "create", "a", "b", "--chunk-size", "lots"],
     "userfault snapshot create: error: argument --chunk-size: invalid size 'lots': use bytes "
     "or a K, M, G suffix"),
    (["firecracker", "serve", "--mem-file", "m"],
     "userfault firecracker serve: error: the following arguments are required: --socket"),
    (["firecracker", "serve", "--socket", "s", "--mem-file", "m", "--chunk", "0"],
     "userfault firecracker serve: error: argument --chunk: size must be positive: '0'"),
    (["firecracker", "serve", "--socket", "s", "--mem-file", "m", "--readahead", "4M"],
     "userfault firecracker serve: error: argument --readahead: readahead is MIN:MAX (e.g. "
     "64K:4M) or off: '4M'"),
    (["firecracker", "serve", "--socket", "s", "--mem-file", "m", "--threads", "65"],
     "userfault firecracker serve: error: argument --threads: must be between 1 and 64, not 65"),
    (["firecracker", "serve", "--socket", "s", "--mem-file", "m", "--prefetch-gap", "-1"],
     "userfault firecracker serve: error: argument --prefetch-gap: invalid size '-1': "
     "negative"),
]


@pytest.mark.parametrize(("args", "message"), USAGE, ids=[" ".join(a) or "none" for a, _ in USAGE])
def test_usage_errors_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    res = cli(*args)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("usage: userfault")
    assert last_line(res) == message
    assert not list(tmp_path.iterdir())


def test_demo_refusals(tmp_path: Path) -> None:
    for args, message in [
        (["--pages", "0"], "the demo needs at least one page, not 0"),
        (["--pages", "100000000"], "the demo shows at most 4096 pages, not 100000000"),
        (["--pages", "1", "--delay", "-1"], "the delay must be 0 or more seconds, not -1.0"),
        (["--pages", "1", "--delay", "nan"], "the delay must be 0 or more seconds, not nan"),
    ]:
        res = cli("demo", *args)
        assert (res.returncode, res.stdout) == (1, ""), res.stderr
        assert res.stderr == f"userfault demo: error: {message}\n"


def test_inspect_refuses_what_is_not_a_snapshot_file(tmp_path: Path, fifo: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("hello " * 100)
    for path, message in [
        (fifo, f"snapshot {str(fifo)!r} is a FIFO (named pipe), not a regular file"),
        (Path("/dev/zero"), "snapshot '/dev/zero' is a character device, not a regular file"),
        (tmp_path, f"snapshot {str(tmp_path)!r} is a directory, not a regular file: name a "
                   "file in it"),
        (tmp_path / "none.ufs", f"No such file or directory: "
                                f"{str(tmp_path / 'none.ufs')!r}"),
        (text, f"snapshot {text}: not a userfault snapshot (magic b'hello he', expected "
               f"{MAGIC!r})"),
    ]:
        res = cli("snapshot", "inspect", str(path))
        assert res.returncode == 1, res.stderr
        assert res.stderr == f"userfault snapshot inspect: error: {message}\n"


def test_serve_refusals_at_start(tmp_path: Path, fifo: Path) -> None:
    mem = tmp_path / "vm.mem"
    mem.write_bytes(bytes(1 << 20))
    long_dir = tmp_path / ("d" * 100)
    long_dir.mkdir()
    long_sock = long_dir / "serve.sock"
    full = len(os.fsencode(long_sock))
    cases = [
        (["--socket", str(tmp_path / "no" / "s"), "--mem-file", str(mem)],
         f"cannot create the socket {tmp_path / 'no' / 's'}: No such file or directory"),
        (["--socket", str(long_sock), "--mem-file", str(mem)],
         f"the socket path {long_sock} is too long for a Unix socket ({full} bytes as an "
         "absolute path, at most N here): choose a shorter --socket path"),  # N: the server's pid
        (["--socket", str(tmp_path / "s"), "--mem-file", "/dev/zero"],
         "'/dev/zero' is a character device, not a regular file: pages are served from regular "
         "files, compressed snapshots (.ufs) and URLs; copy the data into a file first"),
        (["--socket", str(tmp_path / "s"), "--mem-file", str(fifo)],
         f"{str(fifo)!r} is a FIFO (named pipe), not a regular file: pages are served from "
         "regular files, compressed snapshots (.ufs) and URLs; copy the data into a file first"),
        (["--socket", str(tmp_path / "s"), "--mem-file", str(mem), "--record",
          str(tmp_path / "no" / "ws")],
         f"cannot record the working set to {tmp_path / 'no' / 'ws'}: {tmp_path / 'no'} is not "
         "a directory; name a file to write"),
        (["--socket", str(tmp_path / "s"), "--mem-file", str(mem), "--record", str(tmp_path)],
         f"cannot record the working set to {tmp_path}: it is a directory; name a file to "
         "write"),
        (["--socket", str(tmp_path / "s"), "--mem-file", "http://127.0.0.1:1/vm.mem"],
         "HTTPSource http://127.0.0.1:1/vm.mem: size probe GET [0, 1) (1 bytes) failed: "
         "connection refused (is the server running?)"),
        (["--socket", str(tmp_path / "s"), "--mem-file", "ftp://example.invalid/vm.mem"],
         "cannot page from 'ftp://example.invalid/vm.mem': ftp:// URLs are not supported "
         "(http, https, redis, rediss and file are; other filesystems through "
         "userfault.sources.fsspec.FsspecSource)"),
    ]
    for args, message in cases:
        res = cli("firecracker", "serve", *args)
        assert (res.returncode, res.stdout) == (1, ""), (args, res.stderr)
        # The temporary name this server binds first holds its pid: N depends on its digits.
        got = re.sub(r"at most \d+ here", "at most N here", res.stderr)
        assert got == f"userfault firecracker: error: {message}\n", args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d" * 100, "fifo", "vm.mem"]
