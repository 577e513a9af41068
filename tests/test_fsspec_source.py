"""FsspecSource with fsspec's file:// and memory:// filesystems, and http:// on a real nginx
when aiohttp is installed (fsspec's HTTP filesystem needs it; it is not a dependency)."""

from __future__ import annotations

import hashlib
import importlib.util
import multiprocessing
import pickle
import random
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servers import NginxServer
from userfault.errors import SourceError
from userfault.sources.base import BatchedPageSource
from userfault.sources.fsspec import FsspecSource

PAGE = 4096
SIZE = 200 * PAGE + 99
DATA = random.Random(42).randbytes(SIZE)


def expected(offset: int, length: int) -> bytes:
    chunk = DATA[offset: offset + length]
    return chunk + bytes(length - len(chunk))


def read(src: FsspecSource, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    src.read_into(offset, memoryview(buf))
    return bytes(buf)


@pytest.fixture(scope="module")
def file_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("fsspec") / "blob.bin"
    path.write_bytes(DATA)
    return f"file://{path}"


@pytest.fixture(scope="module")
def memory_url() -> str:
    url = "memory://userfault-tests/blob.bin"
    with fsspec.open(url, "wb") as f:
        f.write(DATA)
    return url


@pytest.fixture(params=["file", "memory"])
def src(request: pytest.FixtureRequest, file_url: str, memory_url: str) -> FsspecSource:
    return FsspecSource(file_url if request.param == "file" else memory_url)


def test_size_and_protocol(src: FsspecSource) -> None:
    assert src.size == SIZE
    assert isinstance(src, BatchedPageSource)


def test_every_page(src: FsspecSource) -> None:
    for off in range(0, SIZE, PAGE):
        assert read(src, off, PAGE) == expected(off, PAGE)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, SIZE - 1), length=st.integers(1, 100_000))
def test_random_ranges(file_url: str, offset: int, length: int) -> None:
    assert read(FsspecSource(file_url), offset, length) == expected(offset, length)


def test_read_many(src: FsspecSource) -> None:
    rng = random.Random(1)
    reqs = [(rng.randrange(SIZE), rng.choice([PAGE, 2 * PAGE, 17])) for _ in range(100)]
    bufs = [bytearray(n) for _, n in reqs]
    src.read_many([(o, memoryview(b)) for (o, _), b in zip(reqs, bufs, strict=True)])
    for (o, n), b in zip(reqs, bufs, strict=True):
        assert bytes(b) == expected(o, n)


def test_missing_file_and_out_of_range(tmp_path: Path, file_url: str) -> None:
    with pytest.raises(SourceError, match="cannot get the size of the file: FileNotFoundError"):
        FsspecSource(f"file://{tmp_path}/nope.bin")
    with pytest.raises(SourceError, match="outside the file"):
        FsspecSource(file_url).read_into(SIZE, memoryview(bytearray(PAGE)))


def test_truncated_file_is_a_short_read_error(tmp_path: Path) -> None:
    path = tmp_path / "shrinks.bin"
    path.write_bytes(DATA)
    src = FsspecSource(f"file://{path}")
    path.write_bytes(DATA[: 10 * PAGE])
    with pytest.raises(SourceError, match=r"\[45056, 49152\).*short read: got 0 of 4096"):
        src.read_into(11 * PAGE, memoryview(bytearray(PAGE)))
    with pytest.raises(SourceError, match="short read"):
        src.read_many([(0, memoryview(bytearray(PAGE))), (20 * PAGE, memoryview(bytearray(PAGE)))])


def _child(src: FsspecSource, q: multiprocessing.Queue[object]) -> None:
    try:
        buf = bytearray(src.size)
        src.read_into(0, memoryview(buf))
        q.put(hashlib.sha256(buf).hexdigest())
    except BaseException as err:
        q.put(repr(err))


def test_pickle_and_forked_child(src: FsspecSource) -> None:
    read(src, 0, PAGE)  # the filesystem object exists in the parent
    state = pickle.dumps(src)
    assert len(state) < 400
    clone = pickle.loads(state)
    ctx = multiprocessing.get_context("fork")  # memory:// survives a fork (copied memory)
    for obj in (src, clone):
        q: multiprocessing.Queue[object] = ctx.Queue()
        p = ctx.Process(target=_child, args=(obj, q))
        p.start()
        assert q.get(timeout=30) == hashlib.sha256(DATA).hexdigest()
        p.join(10)


def test_missing_fsspec_gives_install_hint() -> None:
    code = ("import sys; sys.modules['fsspec'] = None\n"
            "from userfault.sources.fsspec import FsspecSource\n"
            "try:\n    FsspecSource('file:///etc/hostname')\n"
            "except ImportError as e:\n    print(e)\n")
    # The interpreter running the tests has userfault installed (editable or not): no
    # PYTHONPATH to src/, which has no built extension in a plain checkout.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True)
    assert "pip install userfault[fsspec]" in out.stdout


@pytest.mark.skipif(importlib.util.find_spec("aiohttp") is None,
                    reason="fsspec's http filesystem needs aiohttp (not a dependency)")
def test_http_via_fsspec_on_nginx(nginx_server: NginxServer) -> None:
    (nginx_server.directory / "fsspec_blob.bin").write_bytes(DATA)
    src = FsspecSource(nginx_server.url("fsspec_blob.bin"))
    assert src.size == SIZE
    offsets = random.Random(4).sample(range(0, SIZE, PAGE), 50)
    bufs = [bytearray(PAGE) for _ in offsets]
    src.read_many([(o, memoryview(b)) for o, b in zip(offsets, bufs, strict=True)])
    for o, b in zip(offsets, bufs, strict=True):
        assert bytes(b) == expected(o, PAGE)
