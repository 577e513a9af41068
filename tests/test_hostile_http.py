"""HTTP servers that lie: wrong status, wrong range, lying lengths, stalls and trickles, an
object replaced under a reader. Each server is real (nginx, or a small TCP server on loopback
in a thread that speaks the lie). Each case ends in a clear :class:`SourceError` (exact text)
or, through ``userfault.map`` in a child process, in a logged SIGBUS: never a hang, a
traceback or wrong bytes.

(Chunked, close-delimited, gzip, junk after the body, truncated bodies, wrong ranges,
redirects, 404, servers ignoring Range, unresponsive and killed servers are in
test_http_source.py; they are not repeated here.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from servers import NginxServer
from test_http_source import nginx_etag, replace_same_size
from userfault.errors import SourceError
from userfault.sources.http import HTTPSource

pytestmark = pytest.mark.timeout(60)

PAGE = 4096
SIZE = 10 * PAGE
BODY = bytes(range(256)) * 16  # one page

# A reply is a list of steps: bytes to send, a float to sleep that many seconds, or None to
# close the connection.
Step = bytes | float | None
Script = Callable[[int, bytes], list[Step]]


class LyingHTTP:
    """A real TCP server on 127.0.0.1 that answers request ``n`` (counted over all
    connections) with ``script(n, request)``, recording the requests."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/f.bin"
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            data = b""
            try:
                while not self._stop.is_set():
                    while b"\r\n\r\n" not in data:
                        part = conn.recv(65536)
                        if not part:
                            return
                        data += part
                    req, _, data = data.partition(b"\r\n\r\n")
                    self.requests.append(req)
                    for step in self.script(len(self.requests) - 1, req):
                        if step is None:
                            return
                        if isinstance(step, float):
                            if self._stop.wait(step):
                                return
                        else:
                            conn.sendall(step)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


@pytest.fixture
def lying() -> Iterator[Callable[[Script], LyingHTTP]]:
    made: list[LyingHTTP] = []

    def make(script: Script) -> LyingHTTP:
        made.append(LyingHTTP(script))
        return made[-1]

    yield make
    for srv in made:
        srv.close()


def partial(first: int, last: int, body: bytes, *extra: str, etag: str | None = None) -> bytes:
    head = ["HTTP/1.1 206 Partial Content", f"Content-Range: bytes {first}-{last}/{SIZE}",
            f"Content-Length: {len(body)}", *extra]
    if etag is not None:
        head.append(f"ETag: {etag}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def requested_range(req: bytes) -> tuple[int, int]:
    (span,) = requested_spans(req)
    return span


def requested_spans(req: bytes) -> list[tuple[int, int]]:
    line = next(ln for ln in req.split(b"\r\n") if ln.lower().startswith(b"range: bytes="))
    return [(int(a), int(b)) for a, b in
            (r.split(b"-") for r in line.split(b"=", 1)[1].split(b","))]


def honest(n: int, req: bytes, etag: str | None = None) -> list[Step]:
    """A correct 206 for whatever range was asked (the bytes of BODY repeated)."""
    a, b = requested_range(req)
    return [partial(a, b, (BODY * (SIZE // PAGE))[a:b + 1], etag=etag)]


def message(url: str, what: str, offset: int, length: int, cause: str) -> str:
    host = url.split("/")[2]
    return (f"HTTPSource http://{host}/f.bin: {what} [{offset}, {offset + length}) "
            f"({length} bytes) failed: {cause}")


# -- lies about status, range and length ------------------------------------------------------


LIES: list[tuple[str, Script, str, str]] = [
    ("500", lambda n, r: [b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"],
     "GET", "HTTP 500 Internal Server Error"),
    ("503 no reason", lambda n, r: [b"HTTP/1.1 503\r\nContent-Length: 0\r\n\r\n"],
     "GET", "HTTP 503"),
    ("416 for a range inside the file",
     lambda n, r: [b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */40960\r\n"
                   b"Content-Length: 0\r\n\r\n"],
     "GET", "HTTP 416 Range Not Satisfiable (range not satisfiable; Content-Range bytes */40960)"),
    ("multipart",
     lambda n, r: [b"HTTP/1.1 206 Partial Content\r\nContent-Type: multipart/byteranges; "
                   b"boundary=X\r\nContent-Length: 4096\r\n\r\n" + BODY],
     "GET", "206 response with an unusable Content-Range None"),
    ("negative length",
     lambda n, r: [partial(0, 4095, b"").replace(b"Content-Length: 0", b"Content-Length: -1")],
     "GET", "Content-Length -1 does not match the range"),
    ("lying total", lambda n, r: [partial(0, 4095, BODY).replace(b"/40960", b"/100")],
     "GET", "the file changed size on the server (40960 -> 100)"),
    ("huge head",
     lambda n, r: [b"HTTP/1.1 206 Partial Content\r\n" + b"X-Pad: " + b"a" * (20 << 10)],
     "GET", "a response head larger than 16384 bytes"),
]


@pytest.mark.parametrize(("name", "script", "what", "cause"), LIES, ids=[x[0] for x in LIES])
def test_lying_replies_are_refused_clearly(lying: Callable[[Script], LyingHTTP], name: str,
                                           script: Script, what: str, cause: str) -> None:
    srv = lying(script)
    src = HTTPSource(srv.url, size=SIZE, timeout=5.0)
    buf = bytearray(b"\xaa" * PAGE)
    with pytest.raises(SourceError) as info:
        src.read_into(0, memoryview(buf))
    assert str(info.value) == message(srv.url, what, 0, PAGE, cause)
    assert bytes(buf) == b"\xaa" * PAGE  # no lie was taken as data
    src.close()


# -- lies in multi-range answers (read_many of scattered pages) -------------------------------


FILE = BODY * (SIZE // PAGE)


def multipart(req: bytes, *, short: bool = False, drop: bool = False,
              total: int = SIZE) -> bytes:
    """A multipart/byteranges 206 for the ranges asked, maybe with a part cut short, the last
    part left out, or another file size in the parts."""
    spans = requested_spans(req)[:-1] if drop else requested_spans(req)
    body = b""
    for a, b in spans:
        data = FILE[a:b + 1][:-10] if short else FILE[a:b + 1]
        body += (f"\r\n--BND\r\nContent-Type: application/octet-stream\r\n"
                 f"Content-Range: bytes {a}-{b}/{total}\r\n\r\n").encode() + data
    body += b"\r\n--BND--\r\n"
    return (b"HTTP/1.1 206 Partial Content\r\nContent-Type: multipart/byteranges; boundary=BND"
            b"\r\nContent-Length: %d\r\n\r\n" % len(body)) + body


def one_or_many(lie: Callable[[bytes], bytes]) -> Script:
    return lambda n, r: [lie(r)] if b"," in r.split(b"\r\n\r\n")[0] else honest(n, r)


MULTI_LIES: list[tuple[str, Script, str]] = [
    ("short part", one_or_many(lambda r: multipart(r, short=True)),
     "a multipart part of another length than its Content-Range bytes 4096-8191"),
    ("missing part", one_or_many(lambda r: multipart(r, drop=True)),
     "the multipart answer has no part for bytes 28672-32767"),
    ("other size", one_or_many(lambda r: multipart(r, total=SIZE + PAGE)),
     f"the file changed size on the server ({SIZE} -> {SIZE + PAGE})"),
    ("another closing boundary",
     one_or_many(lambda r: multipart(r).replace(b"--BND--", b"--XXX--")),
     "a multipart part of another length than its Content-Range bytes 28672-32767"),
    ("no boundary at all", one_or_many(lambda r: multipart(r).replace(b"--BND", b"--XXX")),
     "a multipart answer without its closing boundary"),
]


@pytest.mark.parametrize(("name", "script", "cause"), MULTI_LIES, ids=[x[0] for x in MULTI_LIES])
def test_lying_multipart_answers_are_refused_clearly(
        lying: Callable[[Script], LyingHTTP], name: str, script: Script, cause: str) -> None:
    """Pages 1, 3, 5 and 7 in one read_many: one multi-range GET. A multipart answer that lies
    is a SourceError naming the span it covered; no lie is taken as data."""
    srv = lying(script)
    src = HTTPSource(srv.url, size=SIZE, timeout=5.0)
    bufs = [bytearray(b"\xaa" * PAGE) for _ in range(4)]
    with pytest.raises(SourceError) as info:
        src.read_many([(i * PAGE, memoryview(b)) for i, b in zip((1, 3, 5, 7), bufs, strict=True)])
    assert str(info.value) == message(srv.url, "GET", PAGE, 7 * PAGE, cause)
    assert all(bytes(b) == b"\xaa" * PAGE for b in bufs)
    assert len(srv.requests) == 1


def test_a_coalesced_multi_range_answer_falls_back_to_one_get_each(
        lying: Callable[[Script], LyingHTTP]) -> None:
    """A server may answer several ranges with one 206 covering them all (allowed by RFC 9110):
    not a multipart body, so the source asks for each range alone, and from then on sends one
    range per GET."""
    def coalesce(r: bytes) -> bytes:
        spans = requested_spans(r)
        a, b = spans[0][0], spans[-1][1]
        return partial(a, b, FILE[a:b + 1])
    srv = lying(one_or_many(coalesce))
    src = HTTPSource(srv.url, size=SIZE, timeout=5.0)
    for _ in range(2):
        bufs = [bytearray(PAGE) for _ in range(4)]
        src.read_many([(i * PAGE, memoryview(b)) for i, b in zip((1, 3, 5, 7), bufs, strict=True)])
        assert all(bytes(b) == FILE[i * PAGE:(i + 1) * PAGE]
                   for i, b in zip((1, 3, 5, 7), bufs, strict=True))
    multi = [r for r in srv.requests if b"," in r]
    assert len(multi) == 1 and len(srv.requests) == 1 + 2 * 4


def test_lies_in_the_size_probe(lying: Callable[[Script], LyingHTTP]) -> None:
    cases: list[tuple[Script, str]] = [
        (lambda n, r: [b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"],
         "HTTP 503 Service Unavailable"),
        (lambda n, r: [partial(0, 0, b"x").replace(b"/40960", b"/*")],
         "the server does not say the total size (Content-Range 'bytes 0-0/*'); pass size="),
        (lambda n, r: [partial(0, 9, b"0123456789")],
         "Content-Range 0-9 is not 0-0"),
    ]
    for script, cause in cases:
        srv = lying(script)
        with pytest.raises(SourceError) as info:
            HTTPSource(srv.url, timeout=5.0)
        assert str(info.value) == message(srv.url, "size probe GET", 0, 1, cause)


# -- stalls and trickles: bounded by the timeout ----------------------------------------------


def test_a_body_that_stalls_times_out(lying: Callable[[Script], LyingHTTP]) -> None:
    srv = lying(lambda n, r: [partial(0, 4095, BODY)[:1000], 30.0])
    src = HTTPSource(srv.url, size=SIZE, timeout=1.0)
    with pytest.raises(SourceError) as info:
        src.read_into(0, memoryview(bytearray(PAGE)))
    assert str(info.value) == message(srv.url, "GET", 0, PAGE, "timed out (timed out)")
    assert isinstance(info.value.__cause__, TimeoutError)


def test_a_trickled_head_fails_within_its_deadline(lying: Callable[[Script], LyingHTTP]) -> None:
    """One byte every 0.1 s never trips the socket timeout (1 s): the head's own deadline
    ends the request."""
    reply = partial(0, 4095, BODY)
    srv = lying(lambda n, r: [s for b in reply[:200] for s in (bytes([b]), 0.1)])
    src = HTTPSource(srv.url, size=SIZE, timeout=1.0)
    with pytest.raises(SourceError) as info:
        src.read_into(0, memoryview(bytearray(PAGE)))
    text = str(info.value)
    assert text.startswith(message(srv.url, "GET", 0, PAGE,
                                   "timed out (the server sent its response head too slowly ("))
    assert text.endswith(" bytes in 1 s))")


def test_a_trickled_body_fails_below_the_minimum_rate(
        lying: Callable[[Script], LyingHTTP]) -> None:
    reply = partial(0, 4095, BODY)
    head, body = reply[:reply.index(b"\r\n\r\n") + 4], reply[reply.index(b"\r\n\r\n") + 4:]
    srv = lying(lambda n, r: [head, *[s for i in range(0, 400, 4) for s in (body[i:i + 4], 0.05)]])
    src = HTTPSource(srv.url, size=SIZE, timeout=1.0)
    buf = bytearray(b"\xaa" * PAGE)
    with pytest.raises(SourceError) as info:
        src.read_into(0, memoryview(buf))
    text = str(info.value)
    prefix = message(srv.url, "GET", 0, PAGE, "timed out (the server sent the body too slowly: ")
    assert text.startswith(prefix) and text.endswith(" of 4096 bytes in 1.2 s (below 16 KiB/s))")
    assert text[len(prefix):].split(" ")[0].isdigit()


# -- a replaced object ----------------------------------------------------------------------


def test_a_server_that_ignores_if_match_is_caught_by_the_etag(
        lying: Callable[[Script], LyingHTTP]) -> None:
    """Version "v1" at the probe; afterwards the server ignores If-Match and serves "v2"."""
    srv = lying(lambda n, r: honest(n, r, etag='"v1"' if n == 0 else '"v2"'))
    src = HTTPSource(srv.url, timeout=5.0)
    assert src.validator == ("ETag", '"v1"')
    buf = bytearray(b"\xaa" * PAGE)
    with pytest.raises(SourceError) as info:
        src.read_into(PAGE, memoryview(buf))
    assert str(info.value) == message(
        srv.url, "GET", PAGE, PAGE,
        'the object changed on the server (ETag "v1" when this source opened it, "v2" now): '
        "pages of two versions must never be mixed, so these are not served; open the URL "
        "again to page the new version")
    assert b'\r\nIf-Match: "v1"' in srv.requests[1]


def test_a_server_answering_412_for_the_same_version(
        lying: Callable[[Script], LyingHTTP]) -> None:
    def script(n: int, req: bytes) -> list[Step]:
        if b"If-Match" in req:
            return [b"HTTP/1.1 412 Precondition Failed\r\nContent-Length: 0\r\n\r\n"]
        return honest(n, req, etag='"v1"')

    srv = lying(script)
    src = HTTPSource(srv.url, timeout=5.0)
    with pytest.raises(SourceError) as info:
        src.read_into(0, memoryview(bytearray(PAGE)))
    assert str(info.value) == message(
        srv.url, "GET", 0, PAGE,
        'the server refused the pinned version (ETag "v1") with 412 Precondition Failed, yet '
        "still reports that version: it does not serve it consistently, so these pages are not "
        "served")


_MAP_AND_TOUCH = """
    import sys, userfault
    from userfault.sources.http import HTTPSource
    pager = userfault.map(HTTPSource({url!r}, timeout={timeout}), readahead=False, retries=1)
    view = memoryview(pager)
    print("first", view[0], flush=True)
    sys.stdin.readline()                    # the test changes the server now
    print("late", view[{far}], flush=True)  # poisoned: SIGBUS
"""


def map_and_touch(url: str, far: int, meanwhile: Callable[[], object], *,
                  timeout: float = 5.0) -> subprocess.CompletedProcess[str]:
    """A child maps ``url``, reads byte 0, waits until ``meanwhile()`` ran, reads ``far``."""
    code = textwrap.dedent(_MAP_AND_TOUCH.format(url=url, far=far, timeout=timeout))
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        first = proc.stdout.readline()
        assert first.startswith("first "), (first, proc.stderr.read() if proc.stderr else "")
        meanwhile()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=45)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, first + out, err)


def test_a_file_replaced_mid_read_poisons_never_mixes(nginx_server: NginxServer) -> None:
    """Real nginx; the file is replaced (same size, new content, new inode and mtime) between
    two faults of a mapped HTTPSource: the second fault is never served from the new file,
    the process dies of SIGBUS and the log names the URL and both ETags."""
    path: Path = nginx_server.directory / "mid-read.bin"
    v1 = os.urandom(1 << 20)
    path.write_bytes(v1)
    old = nginx_etag(path)
    url = nginx_server.url("mid-read.bin")
    res = map_and_touch(url, 700 * 1024,
                        lambda: replace_same_size(path, bytes(b ^ 0xFF for b in v1)))
    new = nginx_etag(path)
    assert res.returncode == -signal.SIGBUS, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == f"first {v1[0]}\n"  # no "late": the access never returned a value
    assert (f"HTTPSource {nginx_server.base_url}/mid-read.bin: GET [716800, 720896) (4096 "
            f"bytes) failed: the object changed on the server (ETag {old} when this source "
            f"opened it, {new} now)") in res.stderr
    assert "poisoned" in res.stderr and "Traceback" not in res.stderr


def test_a_server_turning_to_errors_poisons(lying: Callable[[Script], LyingHTTP]) -> None:
    broken = threading.Event()

    def script(n: int, req: bytes) -> list[Step]:
        if broken.is_set():
            return [b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"]
        return honest(n, req, etag='"v1"')

    srv = lying(script)
    res = map_and_touch(srv.url, 5 * PAGE, broken.set)
    assert res.returncode == -signal.SIGBUS, (res.returncode, res.stdout, res.stderr)
    assert message(srv.url, "GET", 5 * PAGE, PAGE, "HTTP 500 Internal Server Error") \
        in res.stderr
    assert "poisoned" in res.stderr


def test_a_server_that_stalls_poisons_within_the_timeouts(
        lying: Callable[[Script], LyingHTTP]) -> None:
    stalled = threading.Event()

    def script(n: int, req: bytes) -> list[Step]:
        if stalled.is_set():
            return [30.0]  # accepts the request, never answers
        return honest(n, req, etag='"v1"')

    srv = lying(script)
    res = map_and_touch(srv.url, 6 * PAGE, stalled.set, timeout=1.0)
    assert res.returncode == -signal.SIGBUS, (res.returncode, res.stdout, res.stderr)
    assert message(srv.url, "GET", 6 * PAGE, PAGE, "timed out") in res.stderr
