"""Events: the pure parser, and every event kind read from the real kernel."""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import wait_in_userfault
from userfault import (
    PAGE_SIZE,
    FaultFlag,
    Feature,
    Fork,
    Pagefault,
    Region,
    Remap,
    Remove,
    Uffd,
    Unmap,
    _native,
    parse_messages,
    recv_uffd,
    send_uffd,
)
from userfault._events import IncompleteMessageError, UnknownEventError

pytestmark = pytest.mark.timeout(20)
P = PAGE_SIZE


def msg(code: int, body: bytes) -> bytes:
    return struct.pack("<BBHI", code, 0, 0, 0) + body.ljust(24, b"\0")


# -- the pure parser --------------------------------------------------------------------------


def test_parse_each_layout() -> None:
    data = (msg(0x12, struct.pack("<QQI", 3, 0x7000_1234, 4242))
            + msg(0x13, struct.pack("<I", 17))
            + msg(0x14, struct.pack("<QQQ", 0x1000, 0x9000, 0x3000))
            + msg(0x15, struct.pack("<QQ", 0x2000, 0x4000))
            + msg(0x16, struct.pack("<QQ", 0x5000, 0x6000)))
    events = parse_messages(data)
    assert events == [Pagefault(0x7000_1234, FaultFlag.WRITE | FaultFlag.WP, 4242), Fork(17),
                      Remap(0x1000, 0x9000, 0x3000), Remove(0x2000, 0x4000),
                      Unmap(0x5000, 0x6000)]
    pf = events[0]
    assert isinstance(pf, Pagefault) and pf.write and pf.wp and not pf.minor
    minor = parse_messages(bytearray(msg(0x12, struct.pack("<QQI", 4, 0x1000, 0))))[0]
    assert isinstance(minor, Pagefault) and minor.minor and not minor.write
    assert parse_messages(b"") == []
    assert parse_messages(memoryview(data)[32:64]) == [Fork(17)]


def test_parse_errors() -> None:
    with pytest.raises(IncompleteMessageError,
                       match=r"^33 bytes is not a whole number of 32-byte uffd_msg records$"):
        parse_messages(bytes(33))
    with pytest.raises(UnknownEventError,
                       match=r"^unknown userfaultfd event code 0x11 at byte 32$"):
        parse_messages(msg(0x15, b"") + msg(0x11, b""))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0xFF]),
                          st.binary(min_size=31, max_size=31)), max_size=8),
       st.binary(max_size=70))
def test_parse_fuzz(records: list[tuple[int, bytes]], raw: bytes) -> None:
    for data in (b"".join(bytes([c]) + rest for c, rest in records), raw):
        try:
            events = parse_messages(data)
        except (IncompleteMessageError, UnknownEventError):
            continue
        assert len(events) == len(data) // 32
        assert all(isinstance(e, Pagefault | Fork | Remap | Remove | Unmap) for e in events)


# -- reading from the kernel ------------------------------------------------------------------


def test_nonblocking_read_and_timeout(uffd: Uffd) -> None:
    assert uffd.read_events(timeout=0) == []
    assert uffd.read_event(timeout=0) is None
    start = time.monotonic()
    assert uffd.read_events(timeout=0.2) == []
    assert time.monotonic() - start >= 0.15  # poll(2) waits its timeout (ms rounding aside)


def test_blocking_read_waits_for_the_event(region: Region) -> None:
    with Uffd(nonblocking=False) as u:
        u.register(region.address, region.size)
        t = threading.Thread(target=_native.touch, args=(region.address, P, P, 0, 0, False))
        t.start()
        event = u.read_event()  # blocking read(), no poll
        assert isinstance(event, Pagefault) and event.address == region.address
        u.zeropage(region.address, P)
        t.join(5)
        assert not t.is_alive()


def test_batches_and_thread_ids(uffd: Uffd, region: Region, toucher) -> None:
    uffd.register(region.address, region.size)
    threads = [toucher(region.address + i * P) for i in range(3)]
    for t in threads:
        wait_in_userfault(t)
    first = uffd.read_events(2)
    assert len(first) == 2
    rest = uffd.read_events(64, timeout=5)
    assert len(rest) == 1
    events = first + rest
    assert all(isinstance(e, Pagefault) for e in events)
    by_addr = {e.address: e.thread_id for e in events if isinstance(e, Pagefault)}
    assert by_addr == {region.address + i * P: t.native_id for i, t in enumerate(threads)}
    uffd.zeropage(region.address, 3 * P)
    for t in threads:
        t.join(5)
        assert t.result == 0


def test_no_thread_id_without_the_feature(region: Region, toucher) -> None:
    with Uffd(Feature(0)) as u:
        u.register(region.address, region.size)
        t = toucher(region.address)
        event = u.read_event(timeout=5)
        assert isinstance(event, Pagefault) and event.thread_id == 0
        u.zeropage(region.address, P)
        t.join(5)


def test_remove_event(region: Region) -> None:
    with Uffd(Feature.EVENT_REMOVE) as u:
        u.register(region.address, region.size)
        u.copy(region.address, b"x" * 2 * P)
        t = threading.Thread(target=region.madvise, args=(4,))  # MADV_DONTNEED, blocks
        t.start()
        assert u.read_events(timeout=5) == [Remove(region.address, region.address + region.size)]
        t.join(5)
        assert not t.is_alive()


def test_unmap_event() -> None:
    r = Region.anonymous(3 * P)
    start, end = r.address, r.address + r.size
    with Uffd(Feature.EVENT_UNMAP) as u:
        u.register(r.address, r.size)
        t = threading.Thread(target=r.close)  # munmap waits until the event is read
        t.start()
        assert u.read_events(timeout=5) == [Unmap(start, end)]
        t.join(5)
        assert r.closed


def test_remap_event() -> None:
    size = 2 * P
    prot, flags = 3, 0x22  # PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS
    old, err = _native.mmap(0, size, prot, flags, -1, 0)
    assert err == 0
    new, err = _native.mmap(0, size, prot, flags, -1, 0)  # the destination, replaced by mremap
    assert err == 0
    try:
        with Uffd(Feature.EVENT_REMAP) as u:
            u.register(old, size)
            result: list[tuple[int, int]] = []
            t = threading.Thread(target=lambda: result.append(
                _native.mremap(old, size, size, 1 | 2, new)))  # MAYMOVE | FIXED
            t.start()
            assert u.read_events(timeout=5) == [Remap(old, new, size)]
            t.join(5)
            assert result == [(new, 0)]
    finally:
        _native.munmap(new, size)
        _native.munmap(old, size)


def test_fork_event_gives_the_childs_uffd(region: Region) -> None:
    """A handler process receives the Fork event and serves a fault of the forked child."""
    ours, theirs = socket.socketpair()
    handler = os.fork()
    if handler == 0:  # pragma: no cover - the handler process
        code = 1
        try:
            signal.alarm(15)
            ours.close()
            u, _ = recv_uffd(theirs, features=Feature.EVENT_FORK)
            event = u.read_event(timeout=10)
            assert isinstance(event, Fork) and isinstance(event.uffd, Uffd), event
            assert event.uffd.fileno() == event.fd
            fault = event.uffd.read_event(timeout=10)
            assert isinstance(fault, Pagefault), fault
            event.uffd.copy(fault.address & ~(P - 1), b"F" * P)
            theirs.sendall(b"served")
            code = 0
        finally:
            os._exit(code)
    theirs.close()
    with Uffd(Feature.EVENT_FORK) as u:
        u.register(region.address, region.size)
        send_uffd(ours, u)
    # Only the handler holds the uffd now: if it dies, fork() is released instead of hanging.
    child = os.fork()
    if child == 0:  # pragma: no cover - the forked child: its copy of the region is registered
        os._exit(0 if _native.touch(region.address, P, P, 0, 0, False) == ord("F") else 3)
    try:
        ours.settimeout(10)
        assert ours.recv(16) == b"served"
    finally:
        ours.close()
        _, child_status = os.waitpid(child, 0)
        _, handler_status = os.waitpid(handler, 0)
    assert os.waitstatus_to_exitcode(handler_status) == 0
    assert os.waitstatus_to_exitcode(child_status) == 0
