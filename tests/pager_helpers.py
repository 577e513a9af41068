"""Helpers shared by the pager test files (imported as a module: tests/ is on sys.path)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import userfault
from py_sources import PyBytes

PAGE = 4096


def page_data(n: int) -> bytes:
    """``n`` bytes in which every page differs from every other one (its index, repeated)."""
    return b"".join(i.to_bytes(4, "little") * (PAGE // 4) for i in range(n // PAGE))


def bytes_source(runtime: str, body: bytes) -> object:
    """``body`` as a native source (``runtime="native"``) or as a Python one (the pager
    process serves it)."""
    return userfault.BufferSource(body) if runtime == "native" else PyBytes(body)


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` passes; its last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


def settled(pager: userfault.Pager, pred: Callable[[userfault.PagerStats], bool] = lambda s: True,
            timeout: float = 5.0) -> userfault.PagerStats:
    """Counters once ``pred`` holds. Servers wake the faulting thread inside the install ioctl
    and count just after (the pager process publishes within 1 ms), so a thread returning
    from a touch may read them a little early."""
    def done() -> bool:
        s = pager.stats()
        return sum(s.latency_histogram) == s.faults and pred(s)
    wait_until(done, timeout)
    return pager.stats()


def run_script(code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) in a fresh interpreter; output captured as text."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)
