"""Redis replies that lie, and objects that change under a reader.

The lies come from a real TCP server on loopback (a thread) that speaks RESP2 and answers
``MGET`` with a scripted reply: wrong counts, wrong kinds, lying lengths, error replies,
stalls and trickles. Meta-key lies and re-uploads use a real redis-server. Each case ends in a
clear :class:`SourceError` (exact text) or, through ``userfault.map`` in a child process, in a
logged SIGBUS: never a hang, a traceback or wrong bytes.

(Missing keys, values longer than a page, killed servers and cluster nodes, wrong passwords
are in test_redis_source.py; they are not repeated here.)
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator

import pytest
import redis

from servers import RedisServer
from test_redis_source import make_data, new_prefix
from userfault.errors import SourceError
from userfault.sources.redis import RedisSource, upload

pytestmark = pytest.mark.timeout(60)

PAGE = 4096
SIZE = 8 * PAGE
Step = bytes | float | None  # bytes to send, seconds to wait, None to close


class LyingRedis:
    """A RESP server on 127.0.0.1: ``GET {prefix}meta`` answers ``meta`` (JSON or nothing),
    ``MGET`` answers ``mget(keys)`` (steps), ``HELLO`` a RESP3 map (redis-py opens with
    ``HELLO 3``), anything else ``+OK`` (the rest of redis-py's greeting)."""

    def __init__(self, mget: Callable[[list[bytes]], list[Step]], meta: bytes | None) -> None:
        self.mget, self.meta = mget, meta
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _command(f: socket.SocketIO | object) -> list[bytes] | None:
        assert hasattr(f, "readline") and hasattr(f, "read")
        head = f.readline()
        if not head:
            return None
        args = []
        for _ in range(int(head[1:])):
            n = int(f.readline()[1:])
            args.append(f.read(n + 2)[:n])
        return args

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            try:
                while not self._stop.is_set():
                    cmd = self._command(f)
                    if cmd is None:
                        return
                    name = cmd[0].upper()
                    if name == b"HELLO":
                        conn.sendall(b"%1\r\n+proto\r\n:3\r\n")
                    elif name == b"GET":
                        conn.sendall(b"$-1\r\n" if self.meta is None else
                                     b"$%d\r\n%s\r\n" % (len(self.meta), self.meta))
                    elif name == b"MGET":
                        for step in self.mget(cmd[1:]):
                            if step is None:
                                return
                            if isinstance(step, float):
                                if self._stop.wait(step):
                                    return
                            else:
                                conn.sendall(step)
                    else:
                        conn.sendall(b"+OK\r\n")
            except (OSError, ValueError):
                return

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


@pytest.fixture
def lying() -> Iterator[Callable[..., LyingRedis]]:
    made: list[LyingRedis] = []

    def make(mget: Callable[[list[bytes]], list[Step]],
             meta: bytes | None = b'{"size": 32768, "page_size": 4096, "version": 1}'
             ) -> LyingRedis:
        made.append(LyingRedis(mget, meta))
        return made[-1]

    yield make
    for srv in made:
        srv.close()


def pages(keys: list[bytes]) -> bytes:
    """An honest MGET reply: every page full of its index."""
    out = b"*%d\r\n" % len(keys)
    for k in keys:
        out += b"$%d\r\n%s\r\n" % (PAGE, bytes([int(k.rsplit(b":", 1)[-1]) % 256]) * PAGE)
    return out


def failure(url: str, offset: int, length: int, cause: str) -> str:
    return (f"RedisSource {url} prefix 'x:': read [{offset}, {offset + length}) "
            f"({length} bytes) failed: {cause}")


LIES: list[tuple[str, Callable[[list[bytes]], list[Step]], str]] = [
    ("count", lambda keys: [pages([*keys, b"x:0"])],
     "RespProtocolError: unexpected reply b'*3' to MGET of 2 keys"),
    ("kind", lambda keys: [b"*2\r\n:5\r\n:6\r\n"],
     "RespProtocolError: unexpected element b':5' in an MGET reply"),
    ("length not a number", lambda keys: [b"*2\r\n$abc\r\n"],
     "RespProtocolError: unexpected bulk length b'abc'"),
    ("negative length", lambda keys: [b"*2\r\n$-2\r\n"],
     "RespProtocolError: unexpected bulk length -2"),
    ("huge length", lambda keys: [b"*2\r\n$99999999999\r\n"],
     "page key 'x:0' holds 99999999999 bytes, more than the page size 4096: wrong prefix or "
     "page_size?"),
    ("error reply", lambda keys: [b"-ERR lying\r\n"], "RedisErrorReply: ERR lying"),
    ("closed mid-value", lambda keys: [b"*2\r\n$4096\r\n" + b"v" * 100, None],
     "ConnectionError: the server closed the connection"),
    ("stall", lambda keys: [30.0], "TimeoutError: timed out"),
    ("trickle", lambda keys: [s for b in pages(keys) for s in (bytes([b]), 0.02)],
     "TimeoutError: the server sent its reply too slowly"),
]


@pytest.mark.parametrize(("name", "mget", "cause"), LIES, ids=[x[0] for x in LIES])
def test_lying_mget_replies_are_refused(lying: Callable[..., LyingRedis], name: str,
                                        mget: Callable[[list[bytes]], list[Step]],
                                        cause: str) -> None:
    srv = lying(mget)
    src = RedisSource(srv.url, prefix="x:", timeout=1.0)
    assert src._lean is not None  # the lean RESP reader is the one under test
    buf = bytearray(b"\xaa" * 2 * PAGE)
    with pytest.raises(SourceError) as info:
        src.read_into(0, memoryview(buf))
    assert str(info.value) == failure(srv.url, 0, 2 * PAGE, cause)
    src.close()


def test_an_honest_reply_after_lies_reads_right(lying: Callable[..., LyingRedis]) -> None:
    """The lean connection is dropped after a lie: the next read starts a clean stream."""
    lies = iter([[b"*2\r\n$99999999999\r\n"]])
    srv = lying(lambda keys: next(lies, [pages(keys)]))
    src = RedisSource(srv.url, prefix="x:", timeout=2.0)
    with pytest.raises(SourceError, match="holds 99999999999 bytes"):
        src.read_into(0, memoryview(bytearray(2 * PAGE)))
    buf = bytearray(2 * PAGE)
    src.read_into(PAGE, memoryview(buf))
    assert buf == b"\x01" * PAGE + b"\x02" * PAGE


def test_lying_meta_keys_are_refused(redis_server: RedisServer) -> None:
    r = redis.Redis.from_url(redis_server.url)
    cases = [
        (b"not json", "Expecting value: line 1 column 1 (char 0)"),
        (b'{"size": 10}', "KeyError: 'page_size'"),
        (b'{"size": -5, "page_size": 4096}', "negative size -5"),
        (b'{"size": 10, "page_size": 6000}', "page_size must be a power of two >= 4096, not 6000"),
        (b'{"size": 10, "page_size": 4096, "version": 2, "generation": "../x"}',
         "generation '../x' is not alphanumeric"),
        (b'{"size": 10, "page_size": 4096, "version": 2}', "KeyError: 'generation'"),
        (b"[1, 2]", "TypeError: list indices must be integers or slices, not str"),
    ]
    for raw, why in cases:
        prefix = new_prefix()
        r.set(f"{prefix}meta", raw)
        with pytest.raises(SourceError) as info:
            RedisSource(redis_server.url, prefix=prefix)
        assert str(info.value) == (f"RedisSource {redis_server.url} prefix {prefix!r}: "
                                   f"'{prefix}meta' is not valid meta JSON ({raw!r}): {why}")
    r.close()


_MAP_AND_TOUCH = """
    import sys, userfault
    from userfault.sources.redis import RedisSource
    pager = userfault.map(RedisSource({url!r}, prefix={prefix!r}, timeout=2.0),
                          readahead=False, retries=1)
    view = memoryview(pager)
    print("first", view[0], flush=True)
    sys.stdin.readline()                    # the test changes the data now
    print("late", view[{far}], flush=True)  # poisoned: SIGBUS
"""


def map_and_touch(url: str, prefix: str, far: int,
                  meanwhile: Callable[[], object]) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(_MAP_AND_TOUCH.format(url=url, prefix=prefix, far=far))
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        first = proc.stdout.readline()
        assert first.startswith("first "), first
        meanwhile()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=45)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, first + out, err)


def test_a_reupload_mid_read_poisons_never_mixes(redis_server: RedisServer) -> None:
    prefix = new_prefix()
    v1 = make_data(21)
    first = upload(v1, redis_server.url, prefix)
    later: list[str | None] = []
    res = map_and_touch(redis_server.url, prefix, 200 * PAGE, lambda: later.append(
        upload(make_data(22), redis_server.url, prefix).generation))
    assert res.returncode == -signal.SIGBUS, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == f"first {v1[0]}\n"
    assert (f"page key '{prefix}{first.generation}:200' does not exist: the object was uploaded "
            f"again (generation {first.generation} when this source opened it, {later[0]} now)"
            ) in res.stderr
    assert "poisoned" in res.stderr and "Traceback" not in res.stderr


def test_a_lying_server_through_map_poisons(lying: Callable[..., LyingRedis]) -> None:
    started = threading.Event()

    def mget(keys: list[bytes]) -> list[Step]:
        return [b"*%d\r\n$99999999999\r\n" % len(keys)] if started.is_set() else [pages(keys)]

    srv = lying(mget)
    res = map_and_touch(srv.url, "x:", 5 * PAGE, started.set)
    assert res.returncode == -signal.SIGBUS, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == "first 0\n"
    assert ("page key 'x:5' holds 99999999999 bytes, more than the page size 4096"
            in res.stderr)
    assert "poisoned" in res.stderr
