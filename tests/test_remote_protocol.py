"""The page-server protocol without a network: frames, limits, the handshake's proofs, the
per-peer failure limiter, URLs and the secret file. The frame reader is fuzzed."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from userfault.remote.address import parse_listen, parse_url
from userfault.remote.auth import (
    auth_message,
    check_auth,
    check_welcome,
    hello_message,
    load_secret,
    new_nonce,
    parse_hello,
    welcome_message,
)
from userfault.remote.protocol import (
    AUTH,
    FLAG_MORE,
    FLAG_URGENT,
    FRAME,
    HELLO,
    MAX_NAME,
    MAX_READ,
    MAX_WRITE,
    WELCOME,
    ErrorCode,
    ExportInfo,
    FrameReader,
    FrameType,
    ProtocolError,
    check_export_name,
    check_reply,
    decode_listing,
    encode_listing,
)
from userfault.remote.ratelimit import FailureLimiter, RateLimit

SECRET = b"k" * 32


def frame(type_: int, *, flags: int = 0, code: int = 0, id_: int = 1, handle: int = 0,
          length: int | None = None, offset: int = 0, payload: bytes = b"") -> bytes:
    n = len(payload) if length is None else length
    return FRAME.pack(type_, flags, code, id_, handle, n, offset) + payload


# -- frames ----------------------------------------------------------------------------------


def test_message_sizes_are_the_documented_ones() -> None:
    assert (HELLO.size, AUTH.size, WELCOME.size, FRAME.size) == (52, 80, 40, 24)


def test_reader_splits_a_stream_at_any_byte_boundary() -> None:
    stream = (frame(FrameType.OPEN, payload=b"mem")
              + frame(FrameType.READ, id_=2, handle=1, length=4096, offset=8192,
                      flags=FLAG_URGENT)
              + frame(FrameType.WRITE, id_=3, handle=1, offset=4096, payload=b"x" * 5000)
              + frame(FrameType.PING, id_=4))
    for cut in range(len(stream) + 1):
        r = FrameReader(requests=True)
        frames = r.feed(stream[:cut]) + r.feed(stream[cut:])
        assert [f.type for f in frames] == [FrameType.OPEN, FrameType.READ, FrameType.WRITE,
                                            FrameType.PING]
        assert frames[0].payload == b"mem"
        assert (frames[1].length, frames[1].offset, frames[1].payload) == (4096, 8192, b"")
        assert frames[2].payload == b"x" * 5000
        assert r.pending == 0


@pytest.mark.parametrize(("raw", "message"), [
    (frame(0x42), "unknown request type 0x42"),
    (frame(FrameType.DATA, handle=1, length=5), "unknown request type 0x82"),
    (frame(FrameType.READ, handle=1, length=MAX_READ + 1), f"must be 1..{MAX_READ}"),
    (frame(FrameType.READ, handle=1, length=0), "READ of 0 bytes"),
    (frame(FrameType.READ, handle=0, length=1), "READ with handle 0"),
    (frame(FrameType.WRITE, handle=1, length=MAX_WRITE + 1), f"must be 1..{MAX_WRITE}"),
    (frame(FrameType.OPEN, length=MAX_NAME + 1), "OPEN with a 256-byte name"),
    (frame(FrameType.PING, length=1), "PING with a 1-byte payload"),
    (frame(FrameType.READ, id_=0, handle=1, length=1), "request id 0"),
    (frame(FrameType.READ, flags=0x80, handle=1, length=1), "unknown flags 0x80"),
    (frame(FrameType.LIST, code=3), "non-zero code field"),
    (frame(FrameType.LIST, handle=7), "non-zero handle or offset"),
])
def test_reader_refuses_invalid_headers_before_their_payload(raw: bytes, message: str) -> None:
    r = FrameReader(requests=True)
    with pytest.raises(ProtocolError, match=message.replace("(", r"\(").replace(".", r"\.")):
        r.feed(raw[:FRAME.size])  # the header alone is enough: nothing more is buffered


def test_reply_checks() -> None:
    check_reply(FrameType.DATA, FLAG_MORE, 0, 5, 1, 4096, 123)
    check_reply(FrameType.ERROR, 0, ErrorCode.IO_ERROR, 0, 0, 10, 0)
    for args in [(FrameType.DATA, 0x2, 0, 5, 1, 1, 0), (FrameType.ERROR, 0, 0, 5, 0, 1, 0),
                 (FrameType.DONE, 0, 0, 0, 0, 0, 0), (FrameType.OPENED, 0, 0, 1, 1, 11, 0),
                 (FrameType.PONG, FLAG_MORE, 0, 1, 0, 0, 0), (FrameType.READ, 0, 0, 1, 1, 1, 0),
                 (FrameType.DATA, 0, 0, 1, 1, MAX_READ + 1, 0)]:
        with pytest.raises(ProtocolError):
            check_reply(*args)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(1, 64), max_size=20))
def test_fuzzed_bytes_parse_or_raise_protocol_error(data: bytes, cuts: list[int]) -> None:
    """Arbitrary bytes, fed in arbitrary pieces: frames or ProtocolError, nothing else, and
    never more buffered than one header plus the payload it announced."""
    r = FrameReader(requests=True)
    pos = 0
    try:
        for n in [*cuts, len(data)]:
            for f in r.feed(data[pos:pos + n]):
                assert f.type in set(FrameType)
            pos += n
            assert r.pending <= FRAME.size + MAX_WRITE
    except ProtocolError:
        pass


_valid = st.one_of(
    st.builds(lambda i, n: frame(FrameType.OPEN, id_=i, payload=b"e" * n),
              st.integers(1, 2**32 - 1), st.integers(1, MAX_NAME)),
    st.builds(lambda i, h, n, o, u: frame(FrameType.READ, id_=i, handle=h, length=n, offset=o,
                                          flags=FLAG_URGENT if u else 0),
              st.integers(1, 2**32 - 1), st.integers(1, 2**32 - 1), st.integers(1, MAX_READ),
              st.integers(0, 2**64 - 1), st.booleans()),
    st.builds(lambda i, h, p: frame(FrameType.WRITE, id_=i, handle=h, payload=p),
              st.integers(1, 2**32 - 1), st.integers(1, 99), st.binary(min_size=1, max_size=64)),
    st.builds(lambda i: frame(FrameType.PING, id_=i), st.integers(1, 2**32 - 1)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_valid, min_size=1, max_size=12), st.integers(1, 50))
def test_fuzzed_valid_streams_round_trip(frames: list[bytes], chunk: int) -> None:
    stream = b"".join(frames)
    r = FrameReader(requests=True)
    got = []
    for i in range(0, len(stream), chunk):
        got += r.feed(stream[i:i + chunk])
    assert len(got) == len(frames)
    for raw, f in zip(frames, got, strict=True):
        assert FRAME.pack(f.type, f.flags, f.code, f.id, f.handle, f.length,
                          f.offset) + f.payload == raw


def test_listing_round_trip_and_malformed() -> None:
    exports = [ExportInfo("mem", 1 << 30, True), ExportInfo("disk.img", 5, False)]
    assert decode_listing(encode_listing(exports)) == exports
    raw = encode_listing(exports)
    for bad in (raw[:-1], b"\x00" + raw, b"\x03ab/" + raw[4:]):
        with pytest.raises(ProtocolError):
            decode_listing(bad)


@pytest.mark.parametrize("name", ["", "a/b", ".hidden", "x" * 256, "é", "a b", "-x"])
def test_bad_export_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid export name"):
        check_export_name(name)


# -- the handshake ---------------------------------------------------------------------------


def test_proofs_verify_both_ways_and_bind_the_transcript() -> None:
    hello = hello_message(new_nonce())
    auth = auth_message(SECRET, hello, new_nonce())
    assert check_auth(SECRET, hello, auth) == (ErrorCode.OK, "")
    welcome = welcome_message(SECRET, hello, auth)
    assert check_welcome(SECRET, hello, auth, welcome) == ErrorCode.OK
    # Wrong secret on either side.
    assert check_auth(b"x" * 32, hello, auth)[0] == ErrorCode.AUTH_FAILED
    assert check_welcome(b"x" * 32, hello, auth, welcome) is None
    # A proof replayed against another challenge fails.
    other = hello_message(new_nonce())
    assert check_auth(SECRET, other, auth)[0] == ErrorCode.AUTH_FAILED
    # The client's proof does not pass as the server's (distinct labels).
    forged = WELCOME.pack(0, 0, 0, auth[-32:])
    assert check_welcome(SECRET, hello, auth, forged) is None
    # A refusal carries no proof.
    refusal = welcome_message(None, hello, auth, ErrorCode.AUTH_FAILED)
    assert check_welcome(SECRET, hello, auth, refusal) == ErrorCode.AUTH_FAILED
    assert refusal[-32:] == bytes(32)


def test_hello_parsing() -> None:
    h = parse_hello(hello_message(b"n" * 32))
    assert (h.code, h.version_min, h.version_max, h.nonce) == (0, 1, 1, b"n" * 32)
    with pytest.raises(ValueError, match="not a userfault page server"):
        parse_hello(b"HTTP/1.1 400 Bad Request\r\n".ljust(52, b" "))
    assert parse_hello(hello_message(None, ErrorCode.RATE_LIMITED)).code == ErrorCode.RATE_LIMITED


def test_auth_with_another_version_is_refused_with_version() -> None:
    hello = hello_message(new_nonce())
    auth = bytearray(auth_message(SECRET, hello, new_nonce()))
    struct.pack_into("<H", auth, 8, 2)
    assert check_auth(SECRET, hello, bytes(auth))[0] == ErrorCode.VERSION


def test_load_secret(tmp_path: Path) -> None:
    f = tmp_path / "s"
    f.write_bytes(b"0123456789abcdefXYZ\n")
    f.chmod(0o640)
    assert load_secret(f) == b"0123456789abcdefXYZ"
    f.chmod(0o644)
    with pytest.raises(ValueError, match=r"accessible to other users .*chmod o-rwx"):
        load_secret(f)
    f.write_bytes(b"short\n")
    f.chmod(0o600)
    with pytest.raises(ValueError, match="holds 5 bytes; at least 16 are needed"):
        load_secret(f)
    with pytest.raises(FileNotFoundError):
        load_secret(tmp_path / "missing")


# -- the failure limiter (a fake clock) ------------------------------------------------------


def test_limiter_blocks_after_burst_and_refills() -> None:
    lim = FailureLimiter(RateLimit(burst=3, refill_per_second=0.5, base_delay=0.1, max_delay=1))
    delays = [lim.failure("10.0.0.1", 0.0) for _ in range(3)]
    assert delays == [0.1, 0.2, 0.4]  # doubling
    assert not lim.allowed("10.0.0.1", 0.0)
    assert lim.allowed("10.0.0.2", 0.0)  # per peer
    assert lim.allowed("10.0.0.1", 2.0)  # one token back after 2 s at 0.5/s
    assert lim.failure("10.0.0.1", 2.0) == 0.8
    assert lim.failure("10.0.0.1", 2.0) == 1.0  # capped
    lim.success("10.0.0.1", 100.0)
    assert lim.failure("10.0.0.1", 100.0) == 0.1  # the delay starts over after a success


def test_limiter_table_is_bounded() -> None:
    lim = FailureLimiter(RateLimit(burst=2, refill_per_second=0.0, max_peers=10))
    lim.failure("bad", 0.0)
    lim.failure("bad", 0.0)
    for i in range(1000):
        lim.allowed(f"10.1.{i // 256}.{i % 256}", 1.0)
        assert len(lim) <= 10
    assert len(lim) == 10


def test_limiter_many_failures_do_not_overflow() -> None:
    lim = FailureLimiter(RateLimit(burst=1, base_delay=0.1, max_delay=3))
    for _ in range(5000):
        d = lim.failure("p", 0.0)
    assert d == 3


# -- addresses -------------------------------------------------------------------------------


def test_urls() -> None:
    u = parse_url("uf://127.0.0.1:7000/mem?secret_file=/etc/s")
    assert (u.endpoint.host, u.endpoint.port, u.export, u.tls, u.secret_file) == (
        "127.0.0.1", 7000, "mem", False, "/etc/s")
    assert str(u) == "uf://127.0.0.1:7000/mem"  # no query: safe to log
    v6 = parse_url("ufs://[::1]:7000/vm.mem?tls_ca=/ca.pem")
    assert (v6.endpoint.host, v6.tls, v6.tls_ca, str(v6)) == ("::1", True, "/ca.pem",
                                                              "ufs://[::1]:7000/vm.mem")
    ux = parse_url("uf+unix:///run/uf/sock/mem")
    assert (ux.endpoint.kind, ux.endpoint.path, ux.export) == ("unix", "/run/uf/sock", "mem")


@pytest.mark.parametrize(("url", "message"), [
    ("http://h:1/x", "scheme must be"),
    ("uf://h/x", "give HOST:PORT"),
    ("uf://h:0/x", "port 0"),
    ("uf://h:99999/x", "port is not a number"),
    ("uf://h:1/", "invalid export name"),
    ("uf://h:1/a/b", "exactly one export name"),
    ("uf://h:1/x?secret=abc", "unknown query parameter 'secret'"),
    ("uf://h:1/x?tls_ca=/ca", "tls_ca is for TLS"),
    ("uf+unix://host/sock/x", "three slashes"),
    ("uf://h:1/x#frag", "fragment"),
])
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_url(url)


def test_listen_addresses() -> None:
    assert str(parse_listen("tcp://0.0.0.0:0")) == "tcp://0.0.0.0:0"
    assert str(parse_listen("tcp://[::1]:7000")) == "tcp://[::1]:7000"
    assert parse_listen("unix:/run/x.sock").path == "/run/x.sock"
    for bad in ("127.0.0.1:7000", "tcp://h", "tcp://h:1/path", "unix:", "udp://h:1"):
        with pytest.raises(ValueError, match="listen address"):
            parse_listen(bad)
