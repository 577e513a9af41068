"""The page server for real: `userfault serve` subprocesses and PageServers on threads, real
clients (PageServerSource, Connection) and hostile raw sockets, on loopback."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remote_helpers import (
    OTHER_SECRET,
    SECRET,
    ServeProcess,
    connect_raw,
    make_tls,
    recv_hello,
    recv_until_closed,
    serve_process,
    thread_server,
    write_secret,
)
from userfault.errors import SourceError
from userfault.remote import (
    AuthenticationError,
    PageServer,
    PageServerSource,
    RateLimit,
    RemoteError,
    ServerLimits,
    list_exports,
    tls_server_context,
)
from userfault.remote.auth import auth_message, new_nonce
from userfault.remote.client import Connection
from userfault.remote.protocol import (
    FRAME,
    HELLO,
    MAX_READ,
    WELCOME,
    ErrorCode,
    FrameType,
)
from userfault.sources.base import BatchedPageSource, PageSource, WritablePageSource
from userfault.sources.native import FileSource
from userfault.sources.snapshot import create_snapshot

SIZE = (3 << 20) + 777  # not a multiple of the page size: the last page has a zero tail
PAGE = 4096
LOG = "userfault.remote.server"


@pytest.fixture(scope="module")
def blob(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    data = random.Random(11).randbytes(SIZE)
    path = tmp_path_factory.mktemp("remote") / "blob.bin"
    path.write_bytes(data)
    return path, data


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, blob: tuple[Path, bytes]
           ) -> Iterator[ServeProcess]:
    """One `userfault serve` for the read-only tests: the blob as a file and as a snapshot."""
    path, data = blob
    tmp = tmp_path_factory.mktemp("served")
    ufs = tmp / "blob.ufs"
    create_snapshot(data, ufs, chunk_size=64 << 10)
    with serve_process(tmp, [f"file={path}", f"snap={ufs}"]) as srv:
        yield srv


def source(srv: ServeProcess, name: str = "file", **kw: object) -> PageServerSource:
    return PageServerSource(srv.url(name), secret_file=srv.secret_file, **kw)  # type: ignore[arg-type]


def expected(data: bytes, offset: int, length: int) -> bytes:
    chunk = data[offset:offset + length]
    return chunk + bytes(length - len(chunk))


def read(src: PageServerSource, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    src.read_into(offset, memoryview(buf))
    return bytes(buf)


def authenticate(sock: socket.socket, secret: bytes = SECRET) -> None:
    """The client side of the handshake on a raw socket; asserts the server accepted."""
    hello = recv_hello(sock)
    sock.sendall(auth_message(secret, hello, new_nonce()))
    welcome = b""
    while len(welcome) < WELCOME.size:
        chunk = sock.recv(WELCOME.size - len(welcome))
        assert chunk, "closed during the handshake"
        welcome += chunk
    assert struct.unpack_from("<H", welcome)[0] == ErrorCode.OK


def parse_frames(raw: bytes) -> list[tuple[int, int, int, bytes]]:
    """``(type, code, id, payload)`` of every complete frame in ``raw``."""
    out = []
    pos = 0
    while len(raw) - pos >= FRAME.size:
        t, _f, code, rid, _h, n, _o = FRAME.unpack_from(raw, pos)
        out.append((t, code, rid, raw[pos + FRAME.size:pos + FRAME.size + n]))
        pos += FRAME.size + n
    return out


# -- serving the bytes -----------------------------------------------------------------------


def test_file_and_snapshot_exports_are_byte_exact(served: ServeProcess,
                                                  blob: tuple[Path, bytes]) -> None:
    _, data = blob
    rng = random.Random(3)
    for name in ("file", "snap"):
        with source(served, name) as src:
            assert isinstance(src, PageSource) and isinstance(src, BatchedPageSource)
            assert src.size == SIZE and not src.writable
            assert read(src, 0, PAGE) == data[:PAGE]
            last = SIZE // PAGE * PAGE
            assert read(src, last, PAGE) == expected(data, last, PAGE)  # zero tail
            for _ in range(50):
                off, n = rng.randrange(SIZE), rng.choice([1, 4096, 70000, 1 << 20])
                assert read(src, off, n) == expected(data, off, n), (name, off, n)
            # A batch: scattered, adjacent (merged) and past-the-end pieces, pipelined.
            reqs = [(rng.randrange(SIZE // PAGE) * PAGE, bytearray(PAGE)) for _ in range(300)]
            reqs += [(i * PAGE, bytearray(PAGE)) for i in range(40, 60)]
            reqs.append((SIZE - 10, bytearray(3 * PAGE)))
            src.read_many([(o, memoryview(b)) for o, b in reqs])
            for o, b in reqs:
                assert bytes(b) == expected(data, o, len(b)), (name, o)
            whole = bytearray(SIZE)
            src.read_many([(0, memoryview(whole))], urgent=False)
            assert whole == data


def test_listing_and_unknown_export(served: ServeProcess) -> None:
    infos = list_exports(served.url("file"), secret_file=served.secret_file)
    assert [(i.name, i.size, i.writable) for i in infos] == [("file", SIZE, False),
                                                             ("snap", SIZE, False)]
    with pytest.raises(RemoteError, match="this server has no export 'nope'") as err:
        source(served, "nope")
    assert err.value.code == ErrorCode.UNKNOWN_EXPORT


def test_out_of_range_read_is_an_error_reply_and_the_connection_stays(
        served: ServeProcess) -> None:
    conn = Connection.connect(_endpoint(served), SECRET)
    try:
        opened = conn.open("file")
        with pytest.raises(RemoteError, match=r"outside export 'file' \(3146505 bytes\)") as e:
            conn.read(opened.handle, [(SIZE - 10, [memoryview(bytearray(20))])])
        assert e.value.code == ErrorCode.OUT_OF_RANGE and not conn.broken
        conn.ping()  # still usable
    finally:
        conn.close()


def _endpoint(srv: ServeProcess) -> object:
    from userfault.remote import parse_url

    return parse_url(srv.url("file")).endpoint


def test_buffer_and_source_exports_and_writes(tmp_path: Path, blob: tuple[Path, bytes]) -> None:
    path, data = blob
    live = bytearray(data[:1 << 20])
    server = PageServer(SECRET)
    server.export_buffer("live", live, writable=True)
    server.export_buffer("ro", bytes(data[:8192]))
    fsrc = FileSource(path)
    server.export_source("src", fsrc)
    ufs = tmp_path / "b.ufs"
    create_snapshot(data[:100000], ufs)
    assert server.export("snap", str(ufs)).kind == "snapshot"
    with pytest.raises(ValueError, match="an export named 'snap' exists already"):
        server.export("snap", str(path))
    with thread_server(server) as (_, addr):
        with PageServerSource(f"uf://{addr}/live", secret=SECRET) as src:
            assert isinstance(src, WritablePageSource) and src.writable
            assert read(src, 5000, 3000) == data[5000:8000]
            live[5000:5004] = b"LIVE"  # the process changes its memory: clients see it
            assert read(src, 5000, 4) == b"LIVE"
            payload = random.Random(5).randbytes(6 << 20)[: (1 << 20) - 4096]
            src.write_from(4096, memoryview(payload))  # several WRITE frames, pipelined
            assert bytes(live[4096:]) == payload
            assert read(src, 4096, len(payload)) == payload
            with pytest.raises(ValueError, match="outside the 1048576-byte export"):
                src.write_from((1 << 20) - 1, memoryview(b"xy"))
        with PageServerSource(f"uf://{addr}/ro", secret=SECRET) as ro:
            with pytest.raises(SourceError, match="the export is read-only"):
                ro.write_from(0, memoryview(b"x"))
            conn = Connection.connect(ro._parsed.endpoint, SECRET)
            try:
                h = conn.open("ro").handle
                with pytest.raises(RemoteError, match="export 'ro' is read-only"):
                    conn.write(h, 0, memoryview(b"x"))
            finally:
                conn.close()
        with PageServerSource(f"uf://{addr}/src", secret=SECRET) as src:
            assert read(src, SIZE - 100, 100) == data[-100:]
            assert src.ping() > 0
        with PageServerSource(f"uf://{addr}/snap", secret=SECRET) as src:
            assert src.size == 100000 and read(src, 99000, 2000) == expected(data[:100000],
                                                                            99000, 2000)
    fsrc.close()


def test_withdrawn_export_fails_and_releases_the_buffer() -> None:
    mem = bytearray(b"m" * 65536)
    server = PageServer(SECRET)
    server.export_buffer("mem", mem)
    with thread_server(server) as (_, addr):
        src = PageServerSource(f"uf://{addr}/mem", secret=SECRET)
        assert read(src, 0, 4) == b"mmmm"
        server.unexport("mem")
        mem.extend(b"x")  # no view of the bytearray is left: it can be resized again
        with pytest.raises(RemoteError, match="export 'mem' was withdrawn") as err:
            read(src, 0, 4)
        assert err.value.code == ErrorCode.WITHDRAWN
        with pytest.raises(KeyError):
            server.unexport("mem")
        src.close()


# -- authentication --------------------------------------------------------------------------


def test_wrong_secret_receives_no_bytes(served: ServeProcess, blob: tuple[Path, bytes]) -> None:
    _, data = blob
    s = connect_raw(served.port)
    try:
        hello = recv_hello(s)
        s.sendall(auth_message(OTHER_SECRET, hello, new_nonce()))
        # And, as if authenticated, requests for the export list, an export, data:
        s.sendall(FRAME.pack(FrameType.LIST, 0, 0, 1, 0, 0, 0)
                  + FRAME.pack(FrameType.OPEN, 0, 0, 2, 0, 4, 0) + b"file"
                  + FRAME.pack(FrameType.READ, 0, 0, 3, 1, 4096, 0))
        rest = recv_until_closed(s)
    finally:
        s.close()
    # Exactly one refusal, then the close: no listing, no size, not a byte of data.
    assert len(rest) == WELCOME.size, rest
    code, _, _, proof = WELCOME.unpack(rest)
    assert code == ErrorCode.AUTH_FAILED and proof == bytes(32)
    assert data[:16] not in rest and b"file" not in rest and b"snap" not in rest
    served.wait_stderr("wrong proof (the client does not have the secret)")
    assert "refused 127.0.0.1:" in served.stderr()


def test_frames_before_authentication_get_nothing(served: ServeProcess) -> None:
    s = connect_raw(served.port)
    try:
        recv_hello(s)
        s.sendall((FRAME.pack(FrameType.LIST, 0, 0, 1, 0, 0, 0) * 4)[:80])  # no AUTH at all
        rest = recv_until_closed(s)
    finally:
        s.close()
    assert len(rest) == WELCOME.size and struct.unpack_from("<H", rest)[0] != ErrorCode.OK


def test_wrong_secret_is_a_clear_error(tmp_path: Path, served: ServeProcess) -> None:
    wrong = write_secret(tmp_path / "wrong", OTHER_SECRET)
    with pytest.raises(AuthenticationError, match="refused our authentication: the secret "
                       "does not match the server's") as err:
        PageServerSource(served.url("file"), secret_file=wrong)
    assert err.value.code == ErrorCode.AUTH_FAILED
    assert "uf://127.0.0.1:" in str(err.value)


def test_client_refuses_an_impostor_server() -> None:
    """A server without the secret cannot pass as the real one: the client sends nothing."""
    listener = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def impostor() -> None:
        conn, _ = listener.accept()
        with conn:
            from userfault.remote.auth import hello_message

            conn.sendall(hello_message(new_nonce()))
            auth = b""
            while len(auth) < 80:
                auth += conn.recv(80 - len(auth))
            conn.sendall(WELCOME.pack(0, 0, 0, os.urandom(32)))  # "welcome", with a fake proof
            conn.settimeout(5)
            got.append(recv_until_closed(conn, timeout=5))

    t = threading.Thread(target=impostor, daemon=True)
    t.start()
    port = listener.getsockname()[1]
    with pytest.raises(AuthenticationError, match="could not prove it holds the secret"):
        PageServerSource(f"uf://127.0.0.1:{port}/file", secret=SECRET)
    t.join(10)
    listener.close()
    assert got == [b""]  # not even an OPEN


def test_failed_attempts_are_rate_limited_per_peer(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOG)
    server = PageServer(SECRET, rate_limit=RateLimit(burst=3, refill_per_second=0.0,
                                                     base_delay=0.01, max_delay=1.0))
    server.export_buffer("mem", b"x" * 8192)
    with thread_server(server) as (_, addr):
        url = f"uf://{addr}/mem"
        port = int(addr.rsplit(":", 1)[1])
        for _ in range(3):  # three wrong guesses from 127.0.0.2
            s = connect_raw(port, source="127.0.0.2")
            hello = recv_hello(s)
            s.sendall(auth_message(OTHER_SECRET, hello, new_nonce()))
            assert struct.unpack_from("<H", recv_until_closed(s))[0] == ErrorCode.AUTH_FAILED
            s.close()
        # The fourth attempt from that address is refused before any challenge, even with
        # the right secret...
        s = connect_raw(port, source="127.0.0.2")
        hello = recv_until_closed(s)
        s.close()
        assert len(hello) == HELLO.size
        assert struct.unpack_from("<H", hello, 8)[0] == ErrorCode.RATE_LIMITED
        assert hello[-32:] == bytes(32)  # no nonce: nothing to answer
        # A real client from there is told why.
        sock = socket.create_connection((addr.rsplit(":", 1)[0], port), timeout=10,
                                        source_address=("127.0.0.2", 0))
        with pytest.raises(RemoteError, match="refused the connection: too many failed "
                           "authentications from this address; wait and check the secret"):
            Connection(sock, SECRET)
        # ... while another address is served.
        with PageServerSource(url, secret=SECRET) as src:
            assert read(src, 0, 4) == b"xxxx"
        assert server.stats()["auth_failures"] == 3
    log = caplog.text
    assert log.count("refused 127.0.0.2:") == 5
    # The refusal delay doubles per failure (computed, not measured).
    for delay in ("0.01 s", "0.02 s", "0.04 s"):
        assert f"refusal sent in {delay}" in log
    assert "too many failed authentications from this peer" in log


def test_rate_limited_client_gets_a_clear_error_and_recovers_after_refill() -> None:
    server = PageServer(SECRET, rate_limit=RateLimit(burst=1, refill_per_second=20.0,
                                                     base_delay=0.0))
    server.export_buffer("mem", b"y" * 4096)
    with thread_server(server) as (_, addr):
        url = f"uf://{addr}/mem"
        with pytest.raises(AuthenticationError):
            PageServerSource(url, secret=OTHER_SECRET)
        deadline = time.monotonic() + 10
        while True:  # refused while the bucket is empty (if we are quick), then served again
            try:
                src = PageServerSource(url, secret=SECRET, reconnect_timeout=0)
                break
            except RemoteError as err:
                assert err.code == ErrorCode.RATE_LIMITED, err
                assert time.monotonic() < deadline, "never allowed again"
                time.sleep(0.01)
        with src:
            assert read(src, 0, 2) == b"yy"


def test_busy_server_refuses_clearly() -> None:
    server = PageServer(SECRET, limits=ServerLimits(max_connections=2))
    server.export_buffer("mem", b"b" * 4096)
    with thread_server(server) as (_, addr):
        first = PageServerSource(f"uf://{addr}/mem", secret=SECRET)
        second = PageServerSource(f"uf://{addr}/mem", secret=SECRET)
        with pytest.raises(RemoteError, match="refused the connection: it has too many "
                           "connections") as err:
            PageServerSource(f"uf://{addr}/mem", secret=SECRET, reconnect_timeout=0)
        assert err.value.code == ErrorCode.BUSY
        assert read(first, 0, 1) == b"b" and read(second, 1, 1) == b"b"
        first.close()
        second.close()


# -- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tls(tmp_path_factory.mktemp("tls"))


def test_tls_with_a_verified_certificate(tmp_path: Path, tls_files: dict[str, Path],
                                         blob: tuple[Path, bytes]) -> None:
    path, data = blob
    with serve_process(tmp_path, [f"file={path}"], "--tls-cert", str(tls_files["cert"]),
                       "--tls-key", str(tls_files["key"])) as srv:
        url = srv.url("file", scheme="ufs")
        with PageServerSource(url, secret_file=srv.secret_file, tls_ca=tls_files["ca"]) as src:
            assert read(src, 123, 100000) == data[123:100123]
            whole = bytearray(SIZE)
            src.read_many([(0, memoryview(whole))])
            assert whole == data
        # The CA in the URL works the same (for callers that pass only a string).
        with PageServerSource(f"{url}?tls_ca={tls_files['ca']}",
                              secret_file=srv.secret_file) as src:
            assert read(src, 0, 10) == data[:10]
        # A client trusting another CA refuses the server (and the server logs the refusal).
        with pytest.raises(SourceError, match="TLS certificate verification failed"):
            PageServerSource(url, secret_file=srv.secret_file, tls_ca=tls_files["other_ca"])
        srv.wait_stderr("the TLS handshake failed: TLSV1_ALERT_UNKNOWN_CA")
        # A plain client gets no greeting from a TLS server: a clear failure, not bytes.
        with pytest.raises(SourceError, match=r"connecting failed: no greeting from "
                           r"tcp://127\.0\.0\.1:\d+ within 1 s: not a userfault page server, "
                           r"or one that speaks TLS \(use ufs://\)"):
            PageServerSource(srv.url("file"), secret_file=srv.secret_file, timeout=1.0)
        srv.wait_stderr("the client closed the connection during the handshake (a plain "
                        "client? it should use ufs://)")
        assert srv.proc.poll() is None


def test_tls_thread_server_and_a_tls_client_against_plain(tls_files: dict[str, Path]) -> None:
    ctx = tls_server_context(tls_files["cert"], tls_files["key"])
    server = PageServer(SECRET, tls=ctx)
    server.export_buffer("m", b"t" * 10000)
    with thread_server(server) as (_, addr), \
            PageServerSource(f"ufs://{addr}/m", secret=SECRET, tls_ca=tls_files["ca"]) as s:
        assert read(s, 9990, 10) == b"t" * 10
    plain = PageServer(SECRET)
    plain.export_buffer("m", b"p" * 100)
    with thread_server(plain) as (_, addr), pytest.raises(SourceError):
        PageServerSource(f"ufs://{addr}/m", secret=SECRET, tls_ca=tls_files["ca"], timeout=2)


# -- hostile clients -------------------------------------------------------------------------


@pytest.fixture
def limited(caplog: pytest.LogCaptureFixture) -> Iterator[tuple[PageServer, str, bytes]]:
    caplog.set_level(logging.INFO, LOG)
    data = random.Random(8).randbytes(1 << 20)
    server = PageServer(SECRET, limits=ServerLimits(handshake_timeout=0.5, frame_timeout=0.5))
    server.export_buffer("mem", data)
    with thread_server(server) as (srv, addr):
        yield srv, addr, data


@pytest.mark.parametrize(("garbage", "reason"), [
    (b"\x00" * 24, "unknown request type 0x0"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "unknown request type 0x47"),
    (FRAME.pack(FrameType.READ, 0, 0, 1, 1, MAX_READ + 1, 0), "READ of 16777217 bytes"),
    (FRAME.pack(FrameType.WRITE, 0, 0, 1, 1, 1 << 30, 0), "WRITE of 1073741824 bytes"),
    # Reads larger than a piece queue (they are not answered at once), so they stay in flight.
    (FRAME.pack(FrameType.READ, 0, 0, 7, 1, 1 << 20, 0) * 2, "request id 7 is already in flight"),
    (b"".join(FRAME.pack(FrameType.READ, 0, 0, i, 1, 1 << 20, 0) for i in range(1, 300)),
     "more than 256 requests in flight"),
])
def test_garbage_closes_that_connection_only(limited: tuple[PageServer, str, bytes],
                                             caplog: pytest.LogCaptureFixture, garbage: bytes,
                                             reason: str) -> None:
    server, addr, data = limited
    good = PageServerSource(f"uf://{addr}/mem", secret=SECRET)
    assert read(good, 0, 100) == data[:100]
    s = connect_raw(int(addr.rsplit(":", 1)[1]))
    try:
        authenticate(s)
        # A valid OPEN first, so that handle 1 exists for the READ cases.
        s.sendall(FRAME.pack(FrameType.OPEN, 0, 0, 1000, 0, 3, 0) + b"mem" + garbage)
        rest = recv_until_closed(s, limit=64 << 20)
    finally:
        s.close()
    frames = parse_frames(rest)
    last = frames[-1]
    assert last[0] == FrameType.ERROR and last[1] == ErrorCode.BAD_FRAME and last[2] == 0
    assert reason in last[3].decode()
    assert reason in caplog.text
    assert "closing the connection from 127.0.0.1:" in caplog.text
    # The well-behaved client was not disturbed.
    assert read(good, 4096, 8192) == data[4096:12288]
    good.close()
    assert server.stats()["protocol_errors"] >= 1


def test_half_open_connections_are_closed(limited: tuple[PageServer, str, bytes],
                                          caplog: pytest.LogCaptureFixture) -> None:
    server, addr, data = limited
    port = int(addr.rsplit(":", 1)[1])
    silent = connect_raw(port)  # never authenticates
    half = connect_raw(port)
    authenticate(half)
    half.sendall(FRAME.pack(FrameType.PING, 0, 0, 1, 0, 0, 0)[:10])  # half a header, then quiet
    idle = PageServerSource(f"uf://{addr}/mem", secret=SECRET)
    try:
        assert len(recv_until_closed(silent)) == HELLO.size  # the challenge, then the close
        rest = parse_frames(recv_until_closed(half))
        assert rest[-1][0] == FrameType.ERROR and rest[-1][1] == ErrorCode.TIMEOUT
        assert b"a frame started but did not complete within 0.5 s" in rest[-1][3]
        time.sleep(1.0)  # idle longer than frame_timeout, with no frame started: kept open
        assert read(idle, 0, 8) == data[:8]
        assert idle.connections_opened == 1
    finally:
        silent.close()
        half.close()
        idle.close()
    assert "no authentication within 0.5 s" in caplog.text
    assert server.stats()["timeouts"] >= 2


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=2000), auth=st.booleans(), valid_open=st.booleans())
def test_fuzzed_clients_never_disturb_the_server(fuzz_server: tuple[PageServer, str, bytes],
                                                 data: bytes, auth: bool,
                                                 valid_open: bool) -> None:
    _, addr, content = fuzz_server
    s = connect_raw(int(addr.rsplit(":", 1)[1]), timeout=10)
    try:
        if auth:
            authenticate(s)
            if valid_open:
                s.sendall(FRAME.pack(FrameType.OPEN, 0, 0, 99999, 0, 3, 0) + b"mem")
        else:
            recv_hello(s)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)  # the server closes a half-closed connection
        rest = recv_until_closed(s, limit=64 << 20)
    except (ConnectionResetError, BrokenPipeError):
        rest = b""
    finally:
        s.close()
    if not auth:  # an unauthenticated peer gets at most a refusal
        assert len(rest) <= WELCOME.size
        if rest:
            assert struct.unpack_from("<H", rest)[0] != ErrorCode.OK
    with PageServerSource(f"uf://{addr}/mem", secret=SECRET, reconnect_timeout=0) as good:
        off = len(data) * 97 % (len(content) - 4096)
        assert read(good, off, 4096) == content[off:off + 4096]


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[tuple[PageServer, str, bytes]]:
    content = random.Random(9).randbytes(1 << 20)
    server = PageServer(SECRET, limits=ServerLimits(handshake_timeout=0.5, frame_timeout=0.5),
                        rate_limit=RateLimit(burst=10**6, base_delay=0.0))
    server.export_buffer("mem", content)
    with thread_server(server) as (srv, addr):
        yield srv, addr, content


# -- concurrency and the urgent lane ---------------------------------------------------------


def test_many_clients_at_once(served: ServeProcess, blob: tuple[Path, bytes]) -> None:
    _, data = blob
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        try:
            rng = random.Random(seed)
            with source(served, "file" if seed % 2 else "snap", connections=2) as src:
                for _ in range(20):
                    reqs = [(rng.randrange(SIZE // PAGE) * PAGE, bytearray(PAGE))
                            for _ in range(rng.randrange(1, 40))]
                    src.read_many([(o, memoryview(b)) for o, b in reqs])
                    for o, b in reqs:
                        assert bytes(b) == expected(data, o, PAGE)
                    off = rng.randrange(SIZE)
                    assert read(src, off, 200000) == expected(data, off, 200000)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]


def test_threads_share_one_source(served: ServeProcess, blob: tuple[Path, bytes]) -> None:
    _, data = blob
    src = source(served, connections=3)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(100):
                off = rng.randrange(SIZE)
                n = rng.choice([PAGE, 64 << 10])
                assert read(src, off, n) == expected(data, off, n)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert not errors, errors[0]
    assert src.connections_opened <= 6  # 3 per lane at most
    src.close()


def _wmem_max() -> int:
    with open("/proc/sys/net/ipv4/tcp_wmem") as f:
        return int(f.read().split()[2])


@pytest.mark.parametrize("urgent_size", [PAGE, 1 << 20])
def test_urgent_read_overtakes_a_background_transfer(tmp_path: Path, urgent_size: int) -> None:
    """On one connection: two 16 MiB background reads are in flight (the first piece has
    arrived), then an urgent read is sent. It completes before either background read.

    Not a matter of timing: until the client reads, the server can have sent at most its
    socket buffer (tcp_wmem max), its transport buffer (4 pieces) and our small receive buffer,
    far less than the 32 MiB of background data; the urgent request is already in its hands by
    then, and it serves urgent pieces first (a 4 KiB one at once, a 1 MiB one between two
    background pieces)."""
    backlog = 2 * MAX_READ
    if backlog < 2 * (_wmem_max() + (2 << 20)):
        pytest.skip("tcp_wmem allows the server to buffer most of the background transfer")
    data = random.Random(4).randbytes(backlog + (2 << 20))
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    with serve_process(tmp_path, [f"big={path}"]) as srv:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # no autotuning
        sock.connect(("127.0.0.1", srv.port))
        conn = Connection(sock, SECRET)
        try:
            h = conn.open("big").handle
            bg = [conn.send(FrameType.READ, handle=h, offset=i * MAX_READ, length=MAX_READ)
                  for i in range(2)]
            first = conn.receive()
            assert first.type == FrameType.DATA and first.id == bg[0]  # transfer under way
            off = backlog + 4096
            urgent = conn.send(FrameType.READ, handle=h, offset=off, length=urgent_size,
                               urgent=True)
            got: dict[int, bytearray] = {bg[0]: bytearray(first.payload), bg[1]: bytearray(),
                                         urgent: bytearray()}
            done: list[int] = []
            while len(done) < 3:
                f = conn.receive()
                assert f.type == FrameType.DATA, f
                got[f.id] += f.payload
                if not f.flags & 1:  # the last piece
                    done.append(f.id)
        finally:
            conn.close()
    assert done[0] == urgent, f"completion order {done}, urgent was {urgent}"
    assert bytes(got[urgent]) == data[off:off + urgent_size]
    assert bytes(got[bg[0]]) == data[:MAX_READ]
    assert bytes(got[bg[1]]) == data[MAX_READ:backlog]


# -- sockets, lifetime, the command line -----------------------------------------------------


def test_unix_socket_server(tmp_path: Path, blob: tuple[Path, bytes]) -> None:
    path, data = blob
    sock = tmp_path / "pages.sock"
    with serve_process(tmp_path, [f"mem={path}"], listen=f"unix:{sock}") as srv:
        assert srv.address == f"unix:{sock}"
        url = f"uf+unix://{sock}/mem"
        with PageServerSource(url, secret_file=srv.secret_file) as src:
            assert read(src, 77, 300000) == data[77:300077]
        # A second server on the same live socket is refused, the first keeps serving.
        r = subprocess.run([sys.executable, "-m", "userfault", "serve", "--listen",
                            f"unix:{sock}", "--secret-file", str(srv.secret_file),
                            f"mem={path}"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "another server is listening on this socket" in r.stderr
        with PageServerSource(url, secret_file=srv.secret_file) as src:
            assert read(src, 0, 10) == data[:10]
        assert srv.stop() == 0
    assert not sock.exists()  # removed on shutdown
    # A stale socket file (nobody listening) is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()
    with serve_process(tmp_path, [f"mem={path}"], listen=f"unix:{sock}", name="again") as srv, \
            PageServerSource(f"uf+unix://{sock}/mem", secret_file=srv.secret_file) as src:
        assert read(src, 5, 5) == data[5:10]


def test_writable_file_export_on_the_command_line(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    with serve_process(tmp_path, [f"disk={disk}", f"ro={disk}"], "--writable", "disk") as srv:
        assert "export disk: file, 1048576 bytes (1.0 MiB), writable" in srv.lines
        with source(srv, "disk") as src:
            assert src.writable
            src.write_from(8192, memoryview(b"written remotely"))
            assert read(src, 8192, 16) == b"written remotely"
        with source(srv, "ro") as ro:
            assert not ro.writable
    assert disk.read_bytes()[8192:8208] == b"written remotely"


@pytest.mark.parametrize(("args", "message"), [
    (["mem"], "export 'mem': write NAME=PATH"),
    (["a/b=/etc/hostname"], "invalid export name"),
    (["m=/nonexistent/file"], "No such file or directory"),
    (["m={dir}"], "is not a regular file or a block device"),
    (["m={fifo}"], "is not a regular file or a block device"),
    (["m={file}", "m={file}"], "export name 'm' is given twice"),
    (["m={file}", "--writable", "x"], "--writable names no export: x"),
    (["m={file}", "--tls-cert", "{file}"], "--tls-cert and --tls-key go together"),
])
def test_command_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * 100)
    secret = write_secret(tmp_path / "secret")
    argv = [a.format(dir=tmp_path, fifo=fifo, file=f) for a in args]
    r = subprocess.run([sys.executable, "-m", "userfault", "serve", "--listen",
                        "tcp://127.0.0.1:0", "--secret-file", str(secret), *argv],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr


def test_secret_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "secret")
    secret.chmod(0o644)
    f = tmp_path / "f.bin"
    f.write_bytes(b"x")
    r = subprocess.run([sys.executable, "-m", "userfault", "serve", "--listen",
                        "tcp://127.0.0.1:0", "--secret-file", str(secret), f"m={f}"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "is accessible to other users (mode 0644): chmod o-rwx" in r.stderr


def test_source_pickles_without_connections_and_is_fork_safe(served: ServeProcess,
                                                             blob: tuple[Path, bytes],
                                                             child: object) -> None:
    _, data = blob
    src = source(served)
    assert read(src, 0, 8) == data[:8]
    copy = pickle.loads(pickle.dumps(src))
    assert copy.size == SIZE and copy.connections_opened == 0
    assert read(copy, 100, 8) == data[100:108]
    assert SECRET.decode() not in repr(copy) and "?" not in repr(copy)

    def body(wfd: int) -> None:  # the child uses the inherited source: its own connection
        got = read(src, 4096, 32)
        os.write(wfd, hashlib.sha256(got).hexdigest().encode())
        assert src.connections_opened == 1

    status, out = child(body)  # type: ignore[operator]
    assert status == 0, out
    assert out.decode() == hashlib.sha256(data[4096:4128]).hexdigest()
    assert read(src, 8192, 8) == data[8192:8200]  # the parent's connection is intact
    src.close()
    copy.close()


def test_reads_wait_for_a_restarted_server(tmp_path: Path, blob: tuple[Path, bytes]) -> None:
    path, data = blob
    srv = ServeProcess(tmp_path, [f"file={path}"])
    port = srv.port
    src = PageServerSource(srv.url("file"), secret_file=srv.secret_file, reconnect_timeout=20)
    try:
        assert read(src, 0, 8) == data[:8]
        srv.kill()
        result: list[object] = []
        t = threading.Thread(target=lambda: result.append(read(src, 40960, 100000)))
        t.start()  # reconnecting with backoff while the server is down
        srv = ServeProcess(tmp_path, [f"file={path}"], listen=f"tcp://127.0.0.1:{port}",
                           name="restarted")
        t.join(30)
        assert result == [data[40960:140960]]
    finally:
        srv.kill()
        src.close()


def test_unreachable_server_fails_clearly(tmp_path: Path, blob: tuple[Path, bytes]) -> None:
    path, _ = blob
    with serve_process(tmp_path, [f"file={path}"]) as srv:
        src = PageServerSource(srv.url("file"), secret_file=srv.secret_file,
                               reconnect_timeout=0.5)
        srv.kill()
        for _ in range(2):  # the second call, once marked down, tries once
            with pytest.raises(SourceError, match=r"read \[0, 4096\) \(4096 bytes\) failed: "
                               r"connection refused \(is the server running\?\); gave up "
                               r"after 0.5 s of reconnecting"):
                read(src, 0, PAGE)
        src.close()


def test_export_replaced_by_other_data_is_refused(tmp_path: Path, blob: tuple[Path, bytes]
                                                  ) -> None:
    path, data = blob
    other = tmp_path / "other.bin"
    other.write_bytes(data[:SIZE // 2])
    srv = ServeProcess(tmp_path, [f"file={path}"])
    port = srv.port
    src = PageServerSource(srv.url("file"), secret_file=srv.secret_file)
    try:
        assert read(src, 0, 8) == data[:8]
        srv.kill()
        srv = ServeProcess(tmp_path, [f"file={other}"], listen=f"tcp://127.0.0.1:{port}",
                           name="other")
        with pytest.raises(SourceError, match=r"size changed from 3146505 to 1573252 bytes"):
            read(src, 0, 8)
    finally:
        srv.kill()
        src.close()
