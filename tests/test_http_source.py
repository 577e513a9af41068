"""HTTPSource against a real nginx (tests/servers.py): bytes, ranges, pooling, failures."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_fixtures import FreshServers, require_servers
from servers import NginxServer
from userfault.errors import SourceError
from userfault.sources.base import BatchedPageSource, PageSource
from userfault.sources.http import HTTPSource

SIZE = (1 << 20) + 777  # not a multiple of the page size: the last page has a zero tail
PAGE = 4096


@pytest.fixture(scope="module")
def blob(nginx_server: NginxServer) -> tuple[str, bytes]:
    data = random.Random(1234).randbytes(SIZE)
    (nginx_server.directory / "http_blob.bin").write_bytes(data)
    return nginx_server.url("http_blob.bin"), data


def expected(data: bytes, offset: int, length: int) -> bytes:
    chunk = data[offset: offset + length]
    return chunk + bytes(length - len(chunk))


def read(src: HTTPSource, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    src.read_into(offset, memoryview(buf))
    return bytes(buf)


def entries_for(server: NginxServer, since: int, uri: str, expect: int) -> list[tuple[int, ...]]:
    """(conn, conn_requests, status) of the entries for ``uri``, once ``expect`` are logged."""
    return [e[:3] for e in server.log_entries(since, expect=expect, uri=uri)]


def tagged(url: str, tag: str) -> tuple[str, str]:
    """``url`` with a query of its own, and the request URI nginx logs for it: a test that
    counts log entries must not count a late entry of an earlier test (nginx logs a request
    after sending its response, so that entry may land after this test read the log size)."""
    path = "/" + url.split("/", 3)[3]
    return f"{url}?{tag}", f"{path}?{tag}"


def test_protocols_and_size(blob: tuple[str, bytes]) -> None:
    url, data = blob
    with HTTPSource(url) as src:
        assert isinstance(src, PageSource)
        assert isinstance(src, BatchedPageSource)
        assert src.size == len(data)
        assert src.url == url


def test_sequential_pages_one_keepalive_connection(
        nginx_server: NginxServer, blob: tuple[str, bytes]) -> None:
    url, data = blob
    url, uri = tagged(url, "sequential")
    since = nginx_server.log_size()
    pages = -(-SIZE // PAGE)
    with HTTPSource(url) as src:
        for i in range(pages):
            assert read(src, i * PAGE, PAGE) == expected(data, i * PAGE, PAGE)
        assert src.connections_opened == 1
    log = entries_for(nginx_server, since, uri, pages + 1)
    assert len(log) == pages + 1  # the size probe, then one GET per page
    assert {status for _, _, status in log} == {206}
    assert len({conn for conn, _, _ in log}) == 1, "keep-alive: one TCP connection"
    assert max(reqs for _, reqs, _ in log) == pages + 1


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, SIZE - 1), length=st.integers(1, 300_000))
def test_random_ranges(blob: tuple[str, bytes], offset: int, length: int) -> None:
    url, data = blob
    src = _shared_source(url)
    assert read(src, offset, length) == expected(data, offset, length)


_SOURCES: dict[str, HTTPSource] = {}


def _shared_source(url: str) -> HTTPSource:
    if url not in _SOURCES:
        _SOURCES[url] = HTTPSource(url, connections=3)
    return _SOURCES[url]


def page_runs(offsets: list[int], length: int) -> list[str]:
    """The Range headers read_many must send: one per run of adjacent requests."""
    runs: list[list[int]] = []
    for off in sorted(offsets):
        if runs and off == runs[-1][1]:
            runs[-1][1] = off + length
        else:
            runs.append([off, off + length])
    return sorted(f"bytes={a}-{min(b, SIZE) - 1}" for a, b in runs)


def test_read_many_parallel_random_pages(nginx_server: NginxServer,
                                         blob: tuple[str, bytes]) -> None:
    """120 random pages, some adjacent: read_many merges each run of adjacent pages (the
    seed-7 sample has 53 adjacent pairs: 67 runs), then asks for those inside the file 17 at
    a time (max(8, 66 / 4 connections)) in multi-range GETs, and for the one that runs past
    the file's end alone: 5 GETs that together name every run once, plus the size probe;
    never more connections than the pool."""
    url, data = blob
    url, uri = tagged(url, "parallel-random")
    rng = random.Random(7)
    offsets = rng.sample(range(0, SIZE, PAGE), 120)
    want = page_runs(offsets, PAGE)
    assert 1 < len(want) < 120  # the sample does have adjacent pages, and lone ones
    bufs = [bytearray(PAGE) for _ in offsets]
    since = nginx_server.log_size()
    with HTTPSource(url, connections=4) as src:
        src.read_many([(off, memoryview(b)) for off, b in zip(offsets, bufs, strict=True)])
        for off, b in zip(offsets, bufs, strict=True):
            assert bytes(b) == expected(data, off, PAGE)
        assert src.connections_opened <= 4
    whole = [r for r in want if not r.endswith(f"-{SIZE - 1}")]  # the last page: past SIZE
    gets = (len(want) - len(whole)) + -(-len(whole) // 17)  # a run past the end goes alone
    log = nginx_server.log_entries(since, expect=gets + 1, uri=uri)
    assert len(log) == gets + 1 and all(e[2] == 206 for e in log)
    named = [f"bytes={r}" for e in log for r in e[4].removeprefix("bytes=").split(",")]
    assert sorted(named) == sorted(["bytes=0-0", *want])  # every run once, in some GET
    assert 1 <= len({e[0] for e in log}) <= 4  # never more than the pool size


def test_read_many_falls_back_to_one_get_per_range(nginx_server: NginxServer,
                                                   blob: tuple[str, bytes]) -> None:
    """A server that answers a multi-range GET with 200 and the whole body (nginx with
    ``max_ranges 1``) is asked one range per GET from then on: every byte right, the whole
    body never read (the connection is dropped), and the next read_many sends single ranges."""
    url, data = blob
    url = url.replace("/http_blob.bin", "/onerange/http_blob.bin")
    url, uri = tagged(url, "fallback")
    offsets = [i * 5 * PAGE for i in range(12)]
    since = nginx_server.log_size()
    with HTTPSource(url, connections=2) as src:
        for _ in range(2):
            bufs = [bytearray(PAGE) for _ in offsets]
            src.read_many([(off, memoryview(b)) for off, b in zip(offsets, bufs, strict=True)])
            assert all(bytes(b) == expected(data, off, PAGE)
                       for off, b in zip(offsets, bufs, strict=True))
    log = nginx_server.log_entries(since, expect=1 + 2 + 2 * len(offsets), uri=uri)
    multi = [e for e in log if "," in e[4]]
    single = [e for e in log if "," not in e[4] and e[4] != "bytes=0-0"]
    assert 1 <= len(multi) <= 2 and all(e[2] == 200 for e in multi)  # before it knew
    assert sorted(e[4] for e in single) == sorted(
        [f"bytes={o}-{o + PAGE - 1}" for o in offsets] * 2)


class TimedNginx(NginxServer):
    """nginx that also logs when each request ended ($msec) and how long it took
    ($request_time, from its first request byte), per connection: enough to prove that
    requests were served at the same time without timing anything in the test. It also
    serves ``/noka/<name>`` with keep-alive off (every response says ``Connection: close``)."""

    @property
    def timing_log(self) -> Path:
        return self.workdir / "timing.log"

    def _config(self) -> str:
        conf = super()._config()
        extra = ("    log_format ufms '$connection $msec $request_time $request_uri "
                 "\"$http_range\"';\n"
                 f"    access_log {self.timing_log} ufms;\n")
        noka = (f"        location /noka/ {{ alias {self.directory}/; keepalive_timeout 0; }}\n"
                "        location /slow/ {")
        conf = conf.replace("        location /slow/ {", noka, 1)
        return conf.replace("    access_log ", extra + "    access_log ", 1)

    def intervals(self, uri: str, expect: int) -> list[tuple[int, float, float, str]]:
        """(connection, start, end, range) of the requests for ``uri``; waits (bounded) until
        ``expect`` are logged (nginx logs after the response)."""
        for _ in range(250):
            lines = [ln.split(" ", 4) for ln in self.timing_log.read_text().splitlines()]
            got = [(int(c), float(end) - float(took), float(end), rng.strip('"'))
                   for c, end, took, u, rng in lines if u == uri]
            if len(got) >= expect:
                return got
            time.sleep(0.02)
        return got


@pytest.fixture(scope="module")
def timed_nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TimedNginx]:
    work = tmp_path_factory.mktemp("timed-nginx")
    srv = require_servers(lambda: TimedNginx(workdir=work))  # skips if nginx is missing
    srv.start()
    yield srv
    srv.stop()


def test_read_many_runs_in_parallel(timed_nginx: TimedNginx) -> None:
    """Four non-adjacent ranges over /slow/ (limit_rate 512k: after a 512 KiB burst the rest of
    each 1 MiB body is sent over about 1 s): read_many runs them on four connections at once,
    so all four requests were in progress together on the server: the latest start precedes
    the earliest end. A serial client cannot produce that, however fast or slow the machine
    (nginx's clocks have 1 ms resolution, hence the 2 ms margin)."""
    data = os.urandom(5 << 20)
    (timed_nginx.directory / "parallel.bin").write_bytes(data)
    chunk = 1 << 20
    offsets = [i * (chunk + PAGE) for i in range(4)]
    bufs = [bytearray(chunk) for _ in offsets]
    with HTTPSource(timed_nginx.url("slow/parallel.bin"), size=len(data),
                    connections=4) as src:
        src.read_many([(o, memoryview(b)) for o, b in zip(offsets, bufs, strict=True)])
        assert src.connections_opened == 4
    for o, b in zip(offsets, bufs, strict=True):
        assert bytes(b) == data[o: o + chunk]
    got = timed_nginx.intervals("/slow/parallel.bin", 4)
    assert sorted(r for _, _, _, r in got) == sorted(
        f"bytes={o}-{o + chunk - 1}" for o in offsets)
    assert len({c for c, _, _, _ in got}) == 4, "one connection per GET"
    latest_start = max(s for _, s, _, _ in got)
    earliest_end = min(e for _, _, e, _ in got)
    assert latest_start + 0.002 < earliest_end, (
        f"the four GETs were not in progress together: {got}")


def test_read_many_merges_adjacent_ranges(nginx_server: NginxServer,
                                          blob: tuple[str, bytes]) -> None:
    url, data = blob
    url, uri = tagged(url, "merges")
    # 16 adjacent pages (in shuffled order) + 2 lone pages -> 3 runs: the two inside the file
    # in one multi-range GET, in file order; the last one, ending past SIZE, alone
    base = 40 * PAGE
    reqs = [base + i * PAGE for i in range(16)] + [3 * PAGE, (SIZE // PAGE) * PAGE]
    random.Random(3).shuffle(reqs)
    bufs = {off: bytearray(PAGE) for off in reqs}
    with HTTPSource(url, size=SIZE) as src:  # size given: no probe GET
        since = nginx_server.log_size()
        src.read_many([(off, memoryview(bufs[off])) for off in reqs])
    for off in reqs:
        assert bytes(bufs[off]) == expected(data, off, PAGE)
    ranges = sorted(e[4] for e in nginx_server.log_entries(since, expect=2, uri=uri))
    assert ranges == sorted([f"bytes={3 * PAGE}-{4 * PAGE - 1},{base}-{base + 16 * PAGE - 1}",
                             f"bytes={(SIZE // PAGE) * PAGE}-{SIZE - 1}"])


def test_read_many_big_sequential_batch_is_split_for_parallelism(
        blob: tuple[str, bytes]) -> None:
    url, data = blob
    chunk = 64 * 1024
    buf = bytearray(SIZE - SIZE % chunk)
    mv = memoryview(buf)
    with HTTPSource(url, connections=4) as src:
        src.read_many([(o, mv[o: o + chunk]) for o in range(0, len(buf), chunk)])
    assert hashlib.sha256(buf).digest() == hashlib.sha256(data[: len(buf)]).digest()


def test_last_partial_page_zero_tail_and_beyond_end(blob: tuple[str, bytes]) -> None:
    url, data = blob
    with HTTPSource(url) as src:
        last = (SIZE // PAGE) * PAGE
        buf = bytearray(b"\xaa" * PAGE)
        src.read_into(last, memoryview(buf))
        assert bytes(buf) == data[last:] + bytes(PAGE - (SIZE - last))
        with pytest.raises(SourceError, match=r"outside the source \(size 1049353\)"):
            src.read_into(SIZE + PAGE, memoryview(bytearray(PAGE)))


def test_404_is_a_clear_error(nginx_server: NginxServer) -> None:
    with pytest.raises(SourceError, match=r"HTTP 404 Not Found \(no such file on the server\)"):
        HTTPSource(nginx_server.url("does-not-exist.bin"))


def test_server_ignoring_range_is_refused(nginx_server: NginxServer,
                                          blob: tuple[str, bytes]) -> None:
    url = nginx_server.url("norange/http_blob.bin")
    with pytest.raises(SourceError, match="ignores Range requests") as info:
        HTTPSource(url)
    assert info.value.source.endswith("/norange/http_blob.bin")
    # Even when the size is given (no probe), a 200 reply is never taken as the page.
    src = HTTPSource(url, size=SIZE)
    buf = bytearray(PAGE)
    with pytest.raises(SourceError, match=r"\[8192, 12288\) \(4096 bytes\).*200 OK") as info:
        src.read_into(2 * PAGE, memoryview(buf))
    assert (info.value.offset, info.value.length) == (2 * PAGE, PAGE)


def nginx_etag(path: Path) -> str:
    """The ETag nginx sends for ``path``: its mtime (seconds) and size in hex."""
    st = path.stat()
    return f'"{int(st.st_mtime):x}-{st.st_size:x}"'


def test_file_changed_size_is_detected(nginx_server: NginxServer) -> None:
    path = nginx_server.directory / "shrinks.bin"
    path.write_bytes(b"a" * 10 * PAGE)
    src = HTTPSource(nginx_server.url("shrinks.bin"))
    old = nginx_etag(path)
    assert src.validator == ("ETag", old)
    path.write_bytes(b"b" * 9 * PAGE)
    with pytest.raises(SourceError) as info:
        src.read_into(0, memoryview(bytearray(PAGE)))
    assert str(info.value).endswith(
        f"GET [0, 4096) (4096 bytes) failed: the object changed on the server (ETag {old} when "
        f"this source opened it, {nginx_etag(path)} now; size 40960 then, 36864 now): pages of "
        "two versions must never be mixed, so these are not served; open the URL again to "
        "page the new version")


def test_https_with_ca_file_and_verification(nginx_server: NginxServer,
                                             blob: tuple[str, bytes]) -> None:
    if nginx_server.tls_port is None:
        pytest.skip("openssl missing: nginx started without TLS")
    _, data = blob
    url = nginx_server.tls_base_url + "/http_blob.bin"
    with HTTPSource(url, verify=str(nginx_server.cert)) as src:
        assert read(src, 5 * PAGE, 3 * PAGE) == expected(data, 5 * PAGE, 3 * PAGE)
    with HTTPSource(url, verify=False) as src:
        assert read(src, 0, PAGE) == data[:PAGE]
    with pytest.raises(SourceError, match="TLS certificate verification failed"):
        HTTPSource(url)


def test_dropped_keepalive_connection_is_retried_once(fresh_servers: FreshServers) -> None:
    data = os.urandom(8 * PAGE)
    server = fresh_servers.nginx()
    (server.directory / "f.bin").write_bytes(data)
    src = HTTPSource(server.url("f.bin"))
    assert read(src, 0, PAGE) == data[:PAGE]
    server.stop()  # the pooled connection dies with the server
    server.start()
    assert read(src, PAGE, PAGE) == data[PAGE: 2 * PAGE]
    assert src.connections_opened == 2


def test_server_stopped_mid_run_raises_not_zeros(fresh_servers: FreshServers) -> None:
    data = os.urandom(64 * PAGE)
    server = fresh_servers.nginx()
    (server.directory / "f.bin").write_bytes(data)
    src = HTTPSource(server.url("f.bin"), timeout=2.0)
    assert read(src, 0, PAGE) == data[:PAGE]
    server.stop()
    buf = bytearray(PAGE)
    with pytest.raises(SourceError, match=r"\[4096, 8192\).*connection refused"):
        src.read_into(PAGE, memoryview(buf))
    bufs = [bytearray(PAGE) for _ in range(8)]
    with pytest.raises(SourceError, match="connection refused"):
        src.read_many([(i * 3 * PAGE, memoryview(b)) for i, b in enumerate(bufs)])
    with pytest.raises(SourceError, match="connection refused"):
        HTTPSource(server.url("f.bin"))


def test_server_killed_during_a_transfer(fresh_servers: FreshServers) -> None:
    data = os.urandom(8 << 20)
    server = fresh_servers.nginx()
    (server.directory / "f.bin").write_bytes(data)
    src = HTTPSource(server.url("slow/f.bin"), timeout=5.0)  # 512 KB/s: 2 MiB take 3 s
    errors: list[BaseException] = []
    bufs = [bytearray(b"\xaa" * (1 << 20)) for _ in range(8)]

    def reader() -> None:
        try:
            src.read_many([(i << 20, memoryview(b)) for i, b in enumerate(bufs)])
        except BaseException as err:
            errors.append(err)

    t = threading.Thread(target=reader)
    t.start()
    deadline = time.monotonic() + 5
    while not server.log_entries(0) and time.monotonic() < deadline:
        time.sleep(0.02)  # the probe is logged: transfers are under way
    time.sleep(0.3)
    server.stop()
    t.join(20)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], SourceError), errors
    assert "failed:" in str(errors[0]) and "/slow/f.bin" in str(errors[0])


def test_connection_close_responses_are_read_then_dropped(timed_nginx: TimedNginx) -> None:
    """nginx with keep-alive off answers every GET with ``Connection: close``: each body is
    read whole, and the next GET opens a new connection instead of reusing a closed one."""
    data = os.urandom(16 * PAGE)
    (timed_nginx.directory / "noka.bin").write_bytes(data)
    with HTTPSource(timed_nginx.url("noka/noka.bin")) as src:  # the probe closes too
        for i in range(4):
            assert read(src, i * 3 * PAGE, 2 * PAGE) == data[i * 3 * PAGE: (i * 3 + 2) * PAGE]
        assert src.connections_opened == 5
    got = timed_nginx.intervals("/noka/noka.bin", 5)
    assert len({c for c, _, _, _ in got}) == 5


class ScriptedHTTP:
    """A real TCP listener that answers every request on every connection with ``reply``
    (HTTP the way a broken or unusual server speaks it), recording the requests."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/f.bin"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while True:
                    while b"\r\n\r\n" not in data:
                        part = conn.recv(65536)
                        if not part:
                            break
                        data += part
                    if b"\r\n\r\n" not in data:
                        break
                    req, _, data = data.partition(b"\r\n\r\n")
                    self.requests.append(req)
                    conn.sendall(self.reply)
                    if b"Connection: close" in self.reply:
                        break

    def close(self) -> None:
        self.listener.close()


BODY = bytes(range(256)) * 16  # one page


@pytest.mark.parametrize(("reply", "message"), [
    (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-4095/40960\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n1000\r\n" + BODY + b"\r\n0\r\n\r\n",
     r"Transfer-Encoding: chunked; only bodies with a Content-Length are supported"),
    (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-4095/40960\r\n"
     b"Connection: close\r\n\r\n" + BODY,
     r"no Content-Length \(a body delimited by closing the connection is not supported\)"),
    (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-4095/40960\r\n"
     b"Content-Length: 4096\r\nContent-Encoding: gzip\r\n\r\n" + BODY,
     r"the 206 body is encoded \(gzip\)"),
    (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-4095/40960\r\n"
     b"Content-Length: 4096\r\n\r\n" + BODY + b"junk",
     r"the server sent 4 bytes past the body"),
    (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-4095/40960\r\n"
     b"Content-Length: 4096\r\nConnection: close\r\n\r\n" + BODY[:1000],
     r"closed before the whole body arrived \(3096 bytes missing\)"),
    (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-4095/40960\r\n"
     b"Content-Length: 2048\r\n\r\n" + BODY[:2048],
     r"Content-Length 2048 does not match the range"),
    (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 4096-8191/40960\r\n"
     b"Content-Length: 4096\r\n\r\n" + BODY,
     r"the server sent bytes 4096-8191, not 0-4095"),
    (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-4095/36864\r\n"
     b"Content-Length: 4096\r\n\r\n" + BODY,
     r"the file changed size on the server \(40960 -> 36864\)"),  # no validator: size only
    (b"ICY 200 OK\r\n\r\n", r"not an HTTP/1.x status line: b'ICY 200 OK'"),
    (b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere/f.bin\r\nContent-Length: 0\r\n\r\n",
     r"HTTP 302 Found to 'http://elsewhere/f.bin' \(redirects are not followed\)"),
], ids=["chunked", "close-delimited", "gzip", "junk-after-body", "truncated", "length",
        "wrong-range", "size-changed", "not-http", "redirect"])
def test_unusable_responses_are_refused_clearly(reply: bytes, message: str) -> None:
    server = ScriptedHTTP(reply)
    try:
        src = HTTPSource(server.url, size=10 * PAGE, timeout=5.0)
        buf = bytearray(b"\xaa" * PAGE)
        prefix = r"GET \[0, 4096\) \(4096 bytes\) failed: .*"
        with pytest.raises(SourceError, match=prefix + message):
            src.read_into(0, memoryview(buf))
        src.close()
    finally:
        server.close()
    assert server.requests and server.requests[0].startswith(b"GET /f.bin HTTP/1.1\r\n")
    assert b"\r\nRange: bytes=0-4095" in server.requests[0]


def test_request_headers_are_sent_and_validated() -> None:
    server = ScriptedHTTP(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-4095/40960"
                          b"\r\nContent-Length: 4096\r\n\r\n" + BODY)
    try:
        with HTTPSource(server.url, size=10 * PAGE, headers={"Authorization": "Bearer x"}) as src:
            assert read(src, 0, PAGE) == BODY
            assert read(src, 0, PAGE) == BODY
            assert src.connections_opened == 1  # keep-alive (HTTP/1.1 default)
    finally:
        server.close()
    req = server.requests[0].split(b"\r\n")
    assert req[0] == b"GET /f.bin HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.url.split(':')[2].split('/')[0]}".encode() in req
    assert b"Authorization: Bearer x" in req and b"Accept-Encoding: identity" in req
    with pytest.raises(ValueError, match="invalid HTTP header"):
        HTTPSource(server.url, size=PAGE, headers={"X-Evil": "a\r\nRange: bytes=0-"})
    with pytest.raises(ValueError, match="invalid HTTP header"):
        HTTPSource(server.url, size=PAGE, headers={"Bad Name": "x"})


def test_unresponsive_server_times_out() -> None:
    with socket.socket() as listener:  # a real TCP listener that never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/f.bin"
        # The socket timeout, not a hang guard, ends each call: the cause is TimeoutError.
        # (A hang would be caught by the suite's pytest-timeout, not by a timed assert.)
        with pytest.raises(SourceError, match=r"size probe GET \[0, 1\).*timed out") as info:
            HTTPSource(url, timeout=0.5)
        assert isinstance(info.value.__cause__, TimeoutError)
        src = HTTPSource(url, size=10 * PAGE, timeout=0.5)
        with pytest.raises(SourceError, match=r"GET \[4096, 8192\).*timed out") as info:
            src.read_into(PAGE, memoryview(bytearray(PAGE)))
        assert isinstance(info.value.__cause__, TimeoutError)


def _child_read(src: HTTPSource, q: multiprocessing.Queue[object]) -> None:
    try:
        buf = bytearray(src.size)
        mv = memoryview(buf)
        src.read_many([(o, mv[o: o + 65536]) for o in range(0, src.size, 65536)])
        q.put((hashlib.sha256(buf).hexdigest(), src.connections_opened))
    except BaseException as err:  # report to the parent
        q.put(repr(err))


def test_pickle_then_read_in_forked_child(nginx_server: NginxServer,
                                          blob: tuple[str, bytes]) -> None:
    url, data = blob
    url, uri = tagged(url, "fork")
    since = nginx_server.log_size()
    src = HTTPSource(url, connections=2, timeout=5.0)
    assert read(src, 0, PAGE) == data[:PAGE]  # the parent now has a pooled connection
    # Both of the parent's requests, the size probe and the read: nginx logs a request after
    # its response, so the probe's entry may come after the read returned (CI once counted it
    # among the first child's).
    parent_conns = {c for c, _, _ in entries_for(nginx_server, since, uri, 2)}
    assert len(parent_conns) == 1
    state = pickle.dumps(src)
    assert b"socket" not in state and len(state) < 500
    clone = pickle.loads(state)
    assert clone.size == SIZE and clone.connections_opened == 0
    digest = hashlib.sha256(data).hexdigest()
    ctx = multiprocessing.get_context("fork")
    for obj in (src, clone):  # the parent's own object (with a live pool) and the clone
        q: multiprocessing.Queue[object] = ctx.Queue()
        since = nginx_server.log_size()
        p = ctx.Process(target=_child_read, args=(obj, q))
        p.start()
        result = q.get(timeout=30)
        p.join(10)
        assert isinstance(result, tuple) and result[0] == digest, result
        assert 1 <= result[1] <= 2  # connections the child opened itself
        child_conns = {c for c, _, _ in entries_for(nginx_server, since, uri, 2)}
        assert child_conns and not (child_conns & parent_conns), "child reused a parent socket"
    # The parent's pool still works after the fork, on its own connection.
    since = nginx_server.log_size()
    assert read(src, 7 * PAGE, PAGE) == data[7 * PAGE: 8 * PAGE]
    assert {c for c, _, _ in entries_for(nginx_server, since, uri, 1)} == parent_conns


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, SIZE // PAGE), st.integers(1, 40)), min_size=1,
                max_size=40))
def test_read_many_random_batches(blob: tuple[str, bytes],
                                  batch: list[tuple[int, int]]) -> None:
    """Random page runs (often adjacent or overlapping): merged and parallel GETs agree with
    the file byte for byte."""
    url, data = blob
    src = _shared_source(url)
    reqs = [(page * PAGE, bytearray(n * PAGE)) for page, n in batch]
    src.read_many([(off, memoryview(b)) for off, b in reqs])
    for off, b in reqs:
        assert bytes(b) == expected(data, off, len(b))


def replace_same_size(path: Path, content: bytes) -> None:
    """Replace ``path`` by a new file (a new inode) of the same size, its mtime a few seconds
    later: nginx's ETag (mtime and size) changes, as it does for a real new upload."""
    old = path.stat()
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(content)
    os.utime(tmp, (old.st_atime, old.st_mtime + 7))
    os.replace(tmp, path)


def test_a_replaced_object_is_refused_never_mixed(nginx_server: NginxServer) -> None:
    path = nginx_server.directory / "replaced.bin"
    v1, v2 = os.urandom(16 * PAGE), os.urandom(16 * PAGE)
    path.write_bytes(v1)
    old = nginx_etag(path)
    src = HTTPSource(nginx_server.url("replaced.bin"))
    assert src.validator == ("ETag", old)
    assert read(src, 0, PAGE) == v1[:PAGE]
    replace_same_size(path, v2)
    new = nginx_etag(path)
    assert new != old
    cause = (f"the object changed on the server (ETag {old} when this source opened it, {new} "
             "now): pages of two versions must never be mixed, so these are not served; open "
             "the URL again to page the new version")
    buf = bytearray(b"\xaa" * PAGE)
    with pytest.raises(SourceError) as info:
        src.read_into(5 * PAGE, memoryview(buf))
    assert str(info.value) == (f"HTTPSource {nginx_server.base_url}/replaced.bin: GET [20480, "
                               f"24576) (4096 bytes) failed: {cause}")
    assert bytes(buf) == b"\xaa" * PAGE  # nothing of the new version was written
    bufs = [bytearray(PAGE) for _ in range(4)]
    with pytest.raises(SourceError, match="the object changed on the server"):
        src.read_many([(i * 3 * PAGE, memoryview(b)) for i, b in enumerate(bufs)])
    # The pin travels with the source (to a pager process): a clone refuses the new version too.
    clone = pickle.loads(pickle.dumps(src))
    assert clone.validator == ("ETag", old)
    with pytest.raises(SourceError, match="the object changed on the server"):
        clone.read_into(0, memoryview(bytearray(PAGE)))
    # A new source pages the new version.
    assert read(HTTPSource(nginx_server.url("replaced.bin")), 5 * PAGE, PAGE) == v2[
        5 * PAGE: 6 * PAGE]


def test_the_precondition_is_sent_with_every_range(nginx_server: NginxServer) -> None:
    """With size= (no probe) the first response pins the version; every later GET carries
    If-Match with it (nginx answers 412 once the file is replaced)."""
    path = nginx_server.directory / "pinned.bin"
    path.write_bytes(os.urandom(8 * PAGE))
    old = nginx_etag(path)
    src = HTTPSource(nginx_server.url("pinned.bin"), size=8 * PAGE)
    assert src.validator is None
    read(src, 0, PAGE)
    assert src.validator == ("ETag", old)
    assert src._precondition() == f"If-Match: {old}\r\n".encode()
    replace_same_size(path, os.urandom(8 * PAGE))
    with pytest.raises(SourceError, match=rf"ETag {old} when this source opened it, "):
        read(src, PAGE, PAGE)


def test_last_modified_pins_when_there_is_no_etag(nginx_server: NginxServer) -> None:
    path = nginx_server.directory / "dated.bin"
    v1 = os.urandom(8 * PAGE)
    path.write_bytes(v1)
    src = HTTPSource(nginx_server.url("noetag/dated.bin"))
    assert src.validator is not None and src.validator[0] == "Last-Modified"
    was = src.validator[1]
    assert read(src, 0, PAGE) == v1[:PAGE]
    replace_same_size(path, os.urandom(8 * PAGE))
    with pytest.raises(SourceError) as info:
        read(src, PAGE, PAGE)
    now = HTTPSource(nginx_server.url("noetag/dated.bin")).validator
    assert now is not None and now[1] != was
    assert (f"failed: the object changed on the server (Last-Modified {was} when this source "
            f"opened it, {now[1]} now)") in str(info.value)
