"""Stress the fault engine: every policy at once (faults from many threads, readahead,
background populate, concurrent prefetch) on every install path, then check that every page
holds its source bytes and that the counters add up exactly."""

from __future__ import annotations

import hashlib
import random
import threading
import time

import pytest

import userfault
from userfault import _native

np = pytest.importorskip("numpy")

PAGE = 4096
MiB = 1 << 20
SIZE = 32 * MiB
BODY = np.arange(SIZE // 8, dtype=np.uint64).tobytes()  # every word is its own index


def page_word(i: int) -> int:
    """Byte sum of the first 8 bytes of page ``i`` in BODY."""
    return sum((i * PAGE // 8).to_bytes(8, "little"))


def hammer(p: userfault.Pager, seed: int, until: float, bad: list[str]) -> None:
    rng = random.Random(seed)
    npages = SIZE // PAGE
    hold = seed % 3 == 0
    while time.monotonic() < until:
        i = rng.randrange(npages)
        if rng.random() < 0.5:  # a sequential run: feeds readahead
            n = min(rng.randrange(1, 512), npages - i)
            for k in range(i, i + n, max(1, n // 8)):
                if _native.touch(p.address + k * PAGE, 8, 1, 0, 0, hold) != page_word(k):
                    bad.append(f"page {k}")
        elif _native.touch(p.address + i * PAGE, 8, 1, 0, 0, hold) != page_word(i):
            bad.append(f"page {i}")


def prefetcher(p: userfault.Pager, seed: int, until: float, bad: list[str]) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        off = rng.randrange(SIZE // PAGE) * PAGE
        n = min(rng.randrange(1, 256) * PAGE, SIZE - off)
        try:
            p.prefetch([(off, n)])
        except Exception as err:  # every failure is a finding
            bad.append(f"prefetch({off}, {n}): {err!r}")
        time.sleep(0.001)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("populate", [False, True])
@pytest.mark.parametrize(("install", "region"), [
    ("copy", "anonymous"), ("move", "anonymous"), ("continue", "memfd"), ("copy", "memfd")])
def test_everything_at_once(install: str, region: str, populate: bool) -> None:
    chunk = {"copy": PAGE, "move": 16 * PAGE, "continue": 4 * PAGE}[install] * (
        64 if populate and region == "memfd" else 1)
    bad: list[str] = []
    with userfault.map(BODY, install=install, region=region, populate=populate, threads=2,
                       chunk=chunk) as p:
        until = time.monotonic() + 1.0
        ts = [threading.Thread(target=hammer, args=(p, s, until, bad)) for s in range(5)]
        ts.append(threading.Thread(target=prefetcher, args=(p, 99, until, bad)))
        for t in ts:
            t.start()
        for t in ts:
            t.join(20)
        assert not any(t.is_alive() for t in ts)
        assert not bad, bad[:5]
        p.prefetch(None)  # the rest
        end = time.monotonic() + 5
        while time.monotonic() < end:
            s = p.stats()
            if sum(s.latency_histogram) == s.faults and s.bytes_installed == SIZE:
                break
            time.sleep(0.01)
        s = p.stats()
        assert s.bytes_installed == SIZE, s
        assert (s.fault_bytes + s.readahead_bytes + s.populate_bytes + s.prefetch_bytes
                == SIZE), s
        assert s.poisoned == 0 and s.errors == 0 and p.check() is None
        faults = s.faults
        with memoryview(p) as v:
            assert hashlib.sha1(v).digest() == hashlib.sha1(BODY).digest()
        assert p.stats().faults == faults  # everything was installed
