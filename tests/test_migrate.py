"""Live migration (userfault.migrate) on loopback: a region written by a thread at a controlled
rate during pre-copy, stopped by the pause hook, arrives byte for byte; the report adds up."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest

from remote_helpers import OTHER_SECRET, SECRET, connect_raw, recv_hello, recv_until_closed
from userfault import Region
from userfault.migrate import MigrationSender, receive
from userfault.remote import AuthenticationError
from userfault.remote.auth import auth_message, new_nonce
from userfault.remote.protocol import FRAME, WELCOME, ErrorCode, FrameType

pytestmark = pytest.mark.timeout(120)

PAGE = 4096


class Writer:
    """Writes random pages of ``region`` at about ``rate`` pages a second until stopped."""

    def __init__(self, region: Region, rate: float, seed: int = 7) -> None:
        self.region = region
        self.rate = rate
        self.rng = random.Random(seed)
        self.stop_flag = threading.Event()
        self.stopped = threading.Event()
        self.writes = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        view = memoryview(self.region)
        pages = len(self.region) // PAGE
        t0 = time.monotonic()
        try:
            while not self.stop_flag.is_set():
                p = self.rng.randrange(pages)
                view[p * PAGE:p * PAGE + 8] = self.writes.to_bytes(8, "little")
                self.writes += 1
                ahead = self.writes / self.rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(min(ahead, 0.01))
        finally:
            view.release()
            self.stopped.set()

    def pause(self) -> None:
        self.stop_flag.set()
        self.stopped.wait(10)


@pytest.fixture(params=["anonymous", "memfd"])
def region(request: pytest.FixtureRequest) -> Iterator[Region]:
    size = 64 << 20
    with Region.anonymous(size) if request.param == "anonymous" else \
            Region.shared_memfd(size) as r:
        memoryview(r)[:] = random.Random(3).randbytes(len(r))
        yield r


def test_migrate_under_writes_loopback(region: Region) -> None:
    writer = Writer(region, rate=2000)
    with MigrationSender(region, secret=SECRET, name="mem", pause=writer.pause,
                         max_rounds=5, max_dirty=64 << 10) as sender:
        ep = sender.start("tcp://127.0.0.1:0")[0]
        with receive(f"uf://127.0.0.1:{ep.port}/mem", secret=SECRET, digest=True) as incoming:
            assert writer.stopped.is_set()  # receive returns in post-copy, after the pause
            report = incoming.wait(60)
            incoming.verify()
            assert incoming.memory is not None
            assert bytes(memoryview(incoming.memory)) == bytes(memoryview(region))
        assert sender.wait(5) == report
    pages = len(region) // PAGE
    assert writer.writes > 0
    assert report.size == len(region) and report.page_size == PAGE
    assert report.rounds[0].pages == pages and report.rounds[0].pages_resent == 0
    assert [r.index for r in report.rounds] == list(range(len(report.rounds)))
    assert all(r.phase == "pre-copy" for r in report.rounds[:-1])
    assert report.rounds[-1].phase == "post-copy"
    # every page went once in round 0; whatever went again counts as sent twice
    assert report.pages_sent == pages + report.pages_sent_twice
    assert report.bytes_sent == report.pages_sent * PAGE
    assert report.rounds[-1].pages >= report.dirty_at_stop
    assert 0 <= report.downtime <= report.total_time
    assert all(r.remote_faults == 0 for r in report.rounds[:-1])


def test_unauthenticated_clients_get_nothing(region: Region) -> None:
    with MigrationSender(region, secret=SECRET, name="mem") as sender:
        ep = sender.start("tcp://127.0.0.1:0")[0]
        with pytest.raises(AuthenticationError, match="secret does not match"):
            receive(f"uf://127.0.0.1:{ep.port}/mem", secret=OTHER_SECRET)
        s = connect_raw(ep.port)
        try:
            hello = recv_hello(s)
            s.sendall(auth_message(OTHER_SECRET, hello, new_nonce()))
            s.sendall(FRAME.pack(FrameType.OPEN, 0, 0, 1, 0, 3, 0) + b"mem"
                      + FRAME.pack(FrameType.READ, 0, 0, 2, 1, 4096, 0))
            rest = recv_until_closed(s)
        finally:
            s.close()
        assert len(rest) == WELCOME.size
        assert WELCOME.unpack(rest)[0] == ErrorCode.AUTH_FAILED
        # the migration was not disturbed: a destination with the secret still gets it all
        with receive(f"uf://127.0.0.1:{ep.port}/mem", secret=SECRET) as incoming:
            incoming.wait(60)
            assert incoming.memory is not None
            assert bytes(memoryview(incoming.memory)) == bytes(memoryview(region))
        assert sender.wait(5).rounds[0].index == 0


def test_receive_refuses_populate() -> None:
    # Refused before any connection: the URL need not answer.
    with pytest.raises(ValueError, match=r"receive\(\) takes no populate=: it would install "
                       r"pages before the last pre-copy round"):
        receive("uf://127.0.0.1:9/migration", secret=b"s" * 32, populate=True)
