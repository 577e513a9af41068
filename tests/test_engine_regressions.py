"""Regressions found by review of the C engine, each checked on the real kernel."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading

import pytest

import userfault
from userfault import _native
from userfault._flags import RegisterMode

pytestmark = pytest.mark.timeout(30)
PAGE = userfault.PAGE_SIZE


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_stopped_engine_serves_again_after_start() -> None:
    with userfault.Pager(userfault.PatternSource(b"AB", 1 << 20), readahead=False) as p:
        engine = p._runtime.engine
        assert _native.touch(p.address, 1, PAGE, 0, 0, False) == ord("A")
        engine.stop()
        engine.start()  # the old stop request must not end the new threads
        assert _native.touch(p.address + 8 * PAGE, 1, PAGE, 0, 0, False) == ord("A")
        assert engine.stats()["faults"] == 2


def test_zero_source_maps_the_shared_zero_page() -> None:
    size = 64 << 20
    with userfault.map(userfault.ZeroSource(size), readahead=False) as p:
        assert p.install == "zeropage"
        before = _rss_kib()
        assert _native.touch(p.address, size, PAGE, 0, 0, False) == 0
        grown = _rss_kib() - before
    assert grown < 4 << 10, f"reading {size >> 20} MiB of zeros made {grown} KiB resident"


def test_an_uninitialised_engine_raises_instead_of_crashing() -> None:
    engine = _native.Engine.__new__(_native.Engine)
    for call in (engine.stats, engine.start, engine.stop, engine.drain_log, engine.error):
        with pytest.raises(RuntimeError, match="not initialised"):
            call()
    with pytest.raises(RuntimeError, match="not initialised"):
        _ = engine.running


def test_an_engine_is_initialised_once_and_log_capacity_is_bounded() -> None:
    with userfault.Region.anonymous(PAGE) as region, userfault.Uffd() as uffd:
        uffd.register(region.address, region.size, RegisterMode.MISSING)
        with pytest.raises(ValueError, match="log_capacity is at most"):
            _native.Engine(uffd.fileno(), [(region.address, PAGE, 0)], PAGE, 0, 0, chunk=PAGE,
                           log_capacity=2**59)
        engine = _native.Engine(uffd.fileno(), [(region.address, PAGE, 0)], PAGE, 0, 0)
        assert engine.memory_bytes < 1 << 20  # chunk defaults to a page, not stack garbage
        with pytest.raises(RuntimeError, match="initialised once"):
            engine.__init__(uffd.fileno(), [(region.address, PAGE, 0)], PAGE, 0, 0)


def test_a_fault_outside_every_area_is_poisoned_not_spun_on() -> None:
    script = textwrap.dedent("""
        import os, userfault
        from userfault import _native
        from userfault._flags import Feature, RegisterMode
        r = userfault.Region.anonymous(1 << 20)
        u = userfault.Uffd(Feature.POISON)
        os.set_blocking(u.fileno(), False)
        u.register(r.address, r.size, RegisterMode.MISSING)
        e = _native.Engine(u.fileno(), [(r.address, 4096, 0)], 4096, 0, 0, chunk=4096)
        e.start()
        print("touching", flush=True)
        _native.touch(r.address + 8192, 1, 4096, 0, 0, False)   # registered, in no area
        print("NOT REACHED", flush=True)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=20)
    assert run.stdout.split() == ["touching"]
    assert run.returncode == -signal.SIGBUS, run.stderr


def test_two_threads_may_stop_an_engine_at_once() -> None:
    with userfault.Pager(userfault.PatternSource(b"x", 1 << 20)) as p:
        engine = p._runtime.engine
        threads = [threading.Thread(target=engine.stop) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads)
        assert not engine.running
