"""The Firecracker UFFD handshake: region parsing, validation, fuzzing, and the socket side."""

from __future__ import annotations

import array
import contextlib
import itertools
import json
import os
import socket
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from userfault.firecracker import (
    MAX_MESSAGE_BYTES,
    MAX_REGIONS,
    FirecrackerProtocolError,
    GuestRegion,
    PeerCred,
    parse_mappings,
    receive_handshake,
)

KIB4 = 4096
MIB2 = 2 * 1024 * 1024
BASE = 0x7F00_0000_0000


def region(**over: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "base_host_virt_addr": BASE, "size": 128 << 20, "offset": 0,
        "page_size": KIB4, "page_size_kib": KIB4,
    }
    r.update(over)
    return {k: v for k, v in r.items() if v is not ...}


def dump(*regions: Any) -> bytes:
    return json.dumps(list(regions)).encode()


# -- valid messages -------------------------------------------------------------------------


def test_firecracker_style_message() -> None:
    got = parse_mappings(dump(region()), mem_file_size=128 << 20)
    assert got == [GuestRegion(BASE, 128 << 20, 0, KIB4)]


def test_page_size_kib_only_holds_bytes() -> None:
    got = parse_mappings(dump(region(page_size=...)), mem_file_size=None)
    assert got[0].page_size == KIB4


def test_page_size_only() -> None:
    got = parse_mappings(dump(region(page_size_kib=...)), mem_file_size=None)
    assert got[0].page_size == KIB4


def test_two_mib_regions() -> None:
    msg = dump(region(page_size=MIB2, page_size_kib=MIB2, size=4 * MIB2, offset=MIB2,
                      base_host_virt_addr=0x7F00_0020_0000))
    (r,) = parse_mappings(msg, mem_file_size=5 * MIB2)
    assert r == GuestRegion(0x7F00_0020_0000, 4 * MIB2, MIB2, MIB2)
    assert r.page_of(0x7F00_0020_0000 + MIB2 + 5) == (0x7F00_0020_0000 + MIB2, 2 * MIB2)


def test_multiple_regions_any_order_and_gap() -> None:
    # x86 guests with > 3 GiB get two regions around the MMIO gap; order is the VMM's.
    a = region(base_host_virt_addr=BASE + (3 << 30), size=1 << 30, offset=3 << 30)
    b = region(base_host_virt_addr=BASE, size=3 << 30, offset=0)
    got = parse_mappings(dump(a, b), mem_file_size=4 << 30)
    assert [r.offset for r in got] == [3 << 30, 0]
    # adjacent (touching) host ranges are fine
    c = region(base_host_virt_addr=BASE + (3 << 30), size=KIB4, offset=0)
    assert len(parse_mappings(dump(b, c), mem_file_size=None)) == 2


def test_unknown_keys_ignored() -> None:
    got = parse_mappings(dump(region(future_field={"x": [1, 2]}, note="hi")), mem_file_size=None)
    assert len(got) == 1


def test_region_fills_file_exactly_and_max_u64() -> None:
    parse_mappings(dump(region(offset=KIB4, size=KIB4)), mem_file_size=2 * KIB4)
    top = (1 << 64) - KIB4
    parse_mappings(dump(region(base_host_virt_addr=top, size=KIB4)), mem_file_size=None)


def test_page_of() -> None:
    r = GuestRegion(BASE, 16 * KIB4, 8 * KIB4, KIB4)
    assert r.page_of(BASE + 3 * KIB4 + 17) == (BASE + 3 * KIB4, 11 * KIB4)
    assert r.contains(BASE) and not r.contains(r.end)
    with pytest.raises(ValueError, match="outside region"):
        r.page_of(r.end)


# -- malformed and hostile messages ---------------------------------------------------------

BAD = [
    (b"\xff\xfe[]", "not valid UTF-8"),
    (b"[{", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"{}", "must be a JSON array of region objects, got an object"),
    (b'"x"', "got a string"),
    (b"[]", "no regions"),
    (b"[1]", "region 0: expected a JSON object, got a number"),
    (b"[null]", "region 0: expected a JSON object, got null"),
    (b"[[]]", "region 0: expected a JSON object, got an array"),
    (b"[" * 100_000, "nested too deeply|not valid JSON"),
    (b"[NaN]", "NaN is not allowed"),
    (b'[{"size": Infinity}]', "Infinity is not allowed"),
    (dump(region(size=...)), "region 0: field 'size' is missing"),
    (dump(region(offset=...)), "region 0: field 'offset' is missing"),
    (dump(region(base_host_virt_addr=...)), "region 0: field 'base_host_virt_addr' is missing"),
    (dump(region(page_size=..., page_size_kib=...)), "region 0: field 'page_size' is missing"),
    (dump(region(size=True)), "region 0: field 'size' must be a non-negative integer, got bool"),
    (dump(region(offset=0.0)), "region 0: field 'offset' must be .*got float"),
    (dump(region(offset="0")), "region 0: field 'offset' must be .*got str"),
    (dump(region(offset=None)), "region 0: field 'offset' must be .*got NoneType"),
    (dump(region(size=-KIB4)), "region 0: field 'size' is negative"),
    (dump(region(size=1 << 64)), "region 0: field 'size' does not fit in 64 bits"),
    (dump(region(offset=10**200)), "region 0: field 'offset' does not fit in 64 bits"),
    (b'[{"size": 1' + b"0" * 5000 + b"}]", "not valid JSON|does not fit"),
    (dump(region(page_size=8192, page_size_kib=8192)), "region 0: field 'page_size' is 8192"),
    (dump(region(page_size=..., page_size_kib=4)), "region 0: field 'page_size_kib' is 4"),
    (dump(region(page_size=KIB4, page_size_kib=MIB2)), "disagrees with the deprecated"),
    (dump(region(size=0)), "region 0: field 'size' is 0"),
    (dump(region(size=KIB4 + 1)), "region 0: field 'size' .* not a multiple of the page size"),
    (dump(region(offset=512)), "region 0: field 'offset' .* not a multiple"),
    (dump(region(base_host_virt_addr=BASE + 1)), "field 'base_host_virt_addr' .* not a multiple"),
    (dump(region(page_size=MIB2, page_size_kib=MIB2, size=MIB2, base_host_virt_addr=BASE + KIB4)),
     "region 0: field 'base_host_virt_addr' .* not a multiple of the page size 2097152"),
    (dump(region(base_host_virt_addr=(1 << 64) - KIB4, size=2 * KIB4)),
     "region 0: field 'size' .* runs past the end of the address space"),
    (dump(region(), region(base_host_virt_addr=BASE + KIB4, size=KIB4)),
     r"region 1: field 'base_host_virt_addr' overlaps region 0"),
    (dump(region(base_host_virt_addr=BASE + KIB4, size=KIB4), region()),
     r"region 1: field 'base_host_virt_addr' overlaps region 0"),
    (dump(region(), region(), region(base_host_virt_addr=0, size=KIB4)), "overlaps"),
    (b'[{"base_host_virt_addr": 0, "size": 4096, "size": 8192, "offset": 0, "page_size": 4096}]',
     "region 0: field 'size' appears more than once"),
    (dump(region(), 7), "region 1: expected a JSON object"),
    (dump(*[region(base_host_virt_addr=BASE + i * KIB4, size=KIB4)
            for i in range(MAX_REGIONS + 1)]),
     f"more than the {MAX_REGIONS} accepted"),
    (b" " * (MAX_MESSAGE_BYTES + 1), f"more than the {MAX_MESSAGE_BYTES} accepted"),
]


@pytest.mark.parametrize(("data", "pattern"), BAD, ids=range(len(BAD)))
def test_malformed_messages_name_the_problem(data: bytes, pattern: str) -> None:
    with pytest.raises(FirecrackerProtocolError, match=pattern):
        parse_mappings(data, mem_file_size=None)


def test_region_outside_memory_file() -> None:
    msg = dump(region(offset=KIB4, size=2 * KIB4))
    with pytest.raises(FirecrackerProtocolError,
                       match=r"region 0: field 'offset' \(0x1000\) \+ 'size' \(0x2000\) = 0x3000 "
                             r"runs past the end of the memory file \(0x2000 bytes\)"):
        parse_mappings(msg, mem_file_size=2 * KIB4)
    parse_mappings(msg, mem_file_size=None)  # unknown size: not checked


def test_protocol_error_is_value_error() -> None:
    assert issubclass(FirecrackerProtocolError, ValueError)


def test_bad_mem_file_size_argument() -> None:
    with pytest.raises(TypeError):
        parse_mappings(dump(region()), mem_file_size=-1)


# -- fuzzing: nothing but FirecrackerProtocolError ever escapes -----------------------------


def _parse_or_protocol_error(data: bytes, size: int | None) -> None:
    try:
        regions = parse_mappings(data, mem_file_size=size)
    except FirecrackerProtocolError:
        return
    # whatever was accepted really is valid
    assert 1 <= len(regions) <= MAX_REGIONS
    for r in regions:
        assert r.page_size in (KIB4, MIB2) and r.size > 0
        assert r.base_host_virt_addr % r.page_size == 0 and r.offset % r.page_size == 0
        assert r.size % r.page_size == 0 and r.end <= 1 << 64
        assert size is None or r.offset + r.size <= size
    spans = sorted((r.base_host_virt_addr, r.end) for r in regions)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.none() | st.integers(0, 1 << 40))
def test_fuzz_arbitrary_bytes(data: bytes, size: int | None) -> None:
    _parse_or_protocol_error(data, size)


_ints = st.one_of(
    st.sampled_from([0, 1, KIB4, MIB2, 8192, 1 << 30, (1 << 64) - KIB4, 1 << 64, -1, -KIB4]),
    st.integers(-(1 << 70), 1 << 70),
    st.integers(0, 64).map(lambda n: n * KIB4),
    st.integers(0, 8).map(lambda n: n * MIB2),
)
_json_leaf = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=8),
                       _ints)
_json_value = st.recursive(_json_leaf, lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=6)
_field_value = st.one_of(_ints, _ints, _ints, _json_value)
_keys = st.sampled_from(["base_host_virt_addr", "size", "offset", "page_size", "page_size_kib",
                         "extra"])


@st.composite
def _mutated_message(draw: st.DrawFn) -> bytes:
    regions: list[Any] = []
    for _ in range(draw(st.integers(0, 4))):
        r: Any = region(
            base_host_virt_addr=draw(st.sampled_from([BASE, BASE + MIB2 * 64, 0, MIB2])),
            size=draw(st.sampled_from([KIB4, MIB2, 64 * KIB4])),
            offset=draw(st.sampled_from([0, KIB4, MIB2])),
        )
        for _ in range(draw(st.integers(0, 3))):
            action = draw(st.integers(0, 2))
            key = draw(_keys)
            if not isinstance(r, dict):
                break
            if action == 0:
                r[key] = draw(_field_value)
            elif action == 1:
                r.pop(key, None)
            else:
                r = draw(_json_value)
        regions.append(r)
    text = json.dumps(regions)
    if draw(st.booleans()):  # byte-level damage too
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.text(max_size=4)) + text[pos + draw(st.integers(0, 3)):]
    return text.encode("utf-8", "surrogatepass")


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated_message(), st.none() | st.sampled_from([0, KIB4, MIB2, 1 << 30]))
def test_fuzz_structurally_valid_mutated_json(data: bytes, size: int | None) -> None:
    _parse_or_protocol_error(data, size)


# -- the socket side ------------------------------------------------------------------------


def _send(sock: socket.socket, payload: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([payload], anc)


def _fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def pair() -> Any:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def test_receive_handshake_socketpair_passes_real_fd(pair: Any) -> None:
    vmm, handler = pair
    efd = os.eventfd(0)
    try:
        payload = dump(region())
        _send(vmm, payload, [efd])
        fd, data, peer = receive_handshake(handler, timeout=5)
        try:
            assert data == payload
            assert peer == PeerCred(os.getpid(), os.getuid(), os.getgid())
            assert fd != efd and os.path.samestat(os.fstat(fd), os.fstat(efd))
            os.eventfd_write(efd, 3)  # same kernel object: what one writes the other reads
            assert os.eventfd_read(fd) == 3
            assert parse_mappings(data, mem_file_size=128 << 20)[0].size == 128 << 20
        finally:
            os.close(fd)
    finally:
        os.close(efd)


def test_receive_handshake_over_listening_unix_socket(tmp_path: Any) -> None:
    path = str(tmp_path / "uffd.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    r, w = os.pipe()
    payload = dump(region(), region(base_host_virt_addr=BASE + (1 << 30), size=MIB2))

    def vmm() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(path)
            _send(c, payload, [w])
            c.recv(1)  # stay connected, like Firecracker, until the handler is done

    t = threading.Thread(target=vmm)
    t.start()
    conn, _ = srv.accept()
    try:
        fd, data, peer = receive_handshake(conn, timeout=5)
        assert conn.gettimeout() is None  # restored
        assert peer.pid == os.getpid() and peer.uid == os.getuid()
        assert len(parse_mappings(data, mem_file_size=None)) == 2
        os.write(fd, b"x")
        assert os.read(r, 1) == b"x"
        os.close(fd)
    finally:
        conn.close()
        t.join(5)
        srv.close()
        os.close(r)
        os.close(w)


def test_receive_handshake_json_split_over_reads(pair: Any) -> None:
    vmm, handler = pair
    r, w = os.pipe()
    payload = dump(region(), region(base_host_virt_addr=0, size=KIB4))
    done = threading.Event()

    def sender() -> None:
        _send(vmm, payload[:7], [w])
        for i in range(7, len(payload), 9):
            done.wait(0.01)
            vmm.send(payload[i:i + 9])

    t = threading.Thread(target=sender)
    t.start()
    try:
        fd, data, _ = receive_handshake(handler, timeout=5)
        os.close(fd)
        assert data == payload
    finally:
        t.join(5)
        os.close(r)
        os.close(w)


def test_receive_handshake_split_inside_utf8_and_string(pair: Any) -> None:
    vmm, handler = pair
    r, w = os.pipe()
    payload = json.dumps([region(note="h\u00e9llo")], ensure_ascii=False).encode()
    cut = payload.index("\u00e9".encode()) + 1  # in the middle of the 2-byte sequence
    _send(vmm, payload[:cut], [w])
    threading.Timer(0.05, vmm.send, (payload[cut:],)).start()
    fd, data, _ = receive_handshake(handler, timeout=5)
    os.close(fd)
    os.close(r)
    os.close(w)
    assert data == payload


def test_receive_handshake_invalid_json_returns_for_parse_to_report(pair: Any) -> None:
    vmm, handler = pair
    r, w = os.pipe()
    _send(vmm, b"[1, 2]]garbage", [w])
    fd, data, _ = receive_handshake(handler, timeout=5)  # does not wait for the deadline
    os.close(fd)
    os.close(r)
    os.close(w)
    with pytest.raises(FirecrackerProtocolError, match="not valid JSON"):
        parse_mappings(data, mem_file_size=None)


def test_receive_handshake_no_fd(pair: Any) -> None:
    vmm, handler = pair
    vmm.sendall(dump(region()))
    vmm.shutdown(socket.SHUT_WR)
    with pytest.raises(FirecrackerProtocolError, match="without sending the userfaultfd"):
        receive_handshake(handler, timeout=5)


def test_receive_handshake_fd_but_no_json(pair: Any) -> None:
    vmm, handler = pair
    r, w = os.pipe()
    _send(vmm, b" ", [w])
    vmm.shutdown(socket.SHUT_WR)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(FirecrackerProtocolError):
        receive_handshake(handler, timeout=5)
    assert set(os.listdir("/proc/self/fd")) <= before  # the received fd was closed
    os.close(r)
    os.close(w)


def test_receive_handshake_extra_fds_are_closed(pair: Any) -> None:
    vmm, handler = pair
    pipes = [os.pipe() for _ in range(3)]
    fds = [p[1] for p in pipes]
    before = set(os.listdir("/proc/self/fd"))
    _send(vmm, dump(region()), fds)
    with pytest.raises(FirecrackerProtocolError, match="carried 3 file descriptors"):
        receive_handshake(handler, timeout=5)
    assert set(os.listdir("/proc/self/fd")) <= before
    for p in pipes:
        os.close(p[0])
        os.close(p[1])


def test_receive_handshake_ctrunc_is_an_error(pair: Any) -> None:
    vmm, handler = pair
    pipes = [os.pipe() for _ in range(12)]  # more than the room reserved for fds
    before = set(os.listdir("/proc/self/fd"))
    _send(vmm, dump(region()), [p[1] for p in pipes])
    with pytest.raises(FirecrackerProtocolError, match="MSG_CTRUNC"):
        receive_handshake(handler, timeout=5)
    assert set(os.listdir("/proc/self/fd")) <= before
    for p in pipes:
        os.close(p[0])
        os.close(p[1])


def test_receive_handshake_timeout_closes_fd(pair: Any) -> None:
    vmm, handler = pair
    r, w = os.pipe()
    before = set(os.listdir("/proc/self/fd"))
    _send(vmm, b'[{"size": 40', [w])  # incomplete and the peer stays silent
    with pytest.raises(FirecrackerProtocolError, match=r"timed out after 0\.2s"):
        receive_handshake(handler, timeout=0.2)
    assert set(os.listdir("/proc/self/fd")) <= before
    os.close(r)
    os.close(w)


def test_receive_handshake_oversized_payload(pair: Any) -> None:
    vmm, handler = pair
    r, w = os.pipe()
    big = b"[" + b" " * (MAX_MESSAGE_BYTES + 10)

    def sender() -> None:
        _send(vmm, big[:100], [w])
        with contextlib.suppress(OSError):
            vmm.sendall(big[100:])

    t = threading.Thread(target=sender)
    t.start()
    with pytest.raises(FirecrackerProtocolError, match="exceeds"):
        receive_handshake(handler, timeout=5)
    handler.close()
    t.join(5)
    os.close(r)
    os.close(w)
