"""Shared fixtures of the binding tests, and registration of the real-server fixtures.

``tests/`` has no ``__init__.py``: pytest puts it on ``sys.path`` while importing this file,
so ``server_fixtures`` (nginx, redis) and ``netns`` (two namespaced hosts) register as plugins
by module name.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import userfault
from userfault import PAGE_SIZE, Region, Uffd, _native

pytest_plugins = ["netns", "server_fixtures"]


@pytest.fixture
def uffd() -> Iterator[Uffd]:
    """A non-blocking userfaultfd with the default features, closed afterwards."""
    with Uffd() as u:
        yield u


@pytest.fixture
def region() -> Iterator[Region]:
    """Four pages of private anonymous memory."""
    with Region.anonymous(4 * PAGE_SIZE) as r:
        yield r


def wait_in_userfault(thread: threading.Thread, timeout: float = 5.0) -> None:
    """Wait until ``thread`` sleeps in the kernel's handle_userfault (deterministic, no sleep)."""
    deadline = time.monotonic() + timeout
    path = f"/proc/self/task/{thread.native_id}/wchan"
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                if f.read().strip() in ("handle_userfault", "userfaultfd_event_wait_completion"):
                    return
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    raise AssertionError(f"thread {thread.native_id} never blocked in a userfault")


class Toucher(threading.Thread):
    """A thread that touches memory with the GIL released and records the checksum."""

    def __init__(self, address: int, length: int = PAGE_SIZE, *, write: bool = False,
                 value: int = 0) -> None:
        super().__init__(daemon=True)
        self.args_ = (address, length, PAGE_SIZE, int(write), value, False)
        self.result: int | None = None

    def run(self) -> None:
        self.result = _native.touch(*self.args_)


@pytest.fixture
def toucher() -> Callable[..., Toucher]:
    """Start a :class:`Toucher`; returns the running thread."""
    def start(address: int, length: int = PAGE_SIZE, **kw: object) -> Toucher:
        t = Toucher(address, length, **kw)  # type: ignore[arg-type]
        t.start()
        return t
    return start


def run_in_child(body: Callable[[int], None], timeout: float = 20.0) -> tuple[int, bytes]:
    """Fork; run ``body(write_fd)`` in the child, then ``os._exit(0)`` (1 on an exception).

    Returns ``(wait status, bytes the child wrote)``. The child is killed after ``timeout``.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(rfd)
            signal.alarm(int(timeout) + 1)
            body(wfd)
            code = 0
        except BaseException as err:  # report, never return into pytest
            with contextlib.suppress(OSError):
                os.write(wfd, f"child error: {err!r}".encode())
        finally:
            os._exit(code)
    os.close(wfd)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                break
            ready, _, _ = select.select([rfd], [], [], left)
            if not ready:
                continue
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(rfd)
    _, status = os.waitpid(pid, 0)
    return status, data


@pytest.fixture
def child() -> Callable[..., tuple[int, bytes]]:
    """:func:`run_in_child` as a fixture."""
    return run_in_child


@pytest.fixture(params=["native", "process"])
def runtime(request: pytest.FixtureRequest) -> str:
    """Each runtime in turn: a native source in this process, or a Python source served by
    the pager process (see ``pager_helpers.bytes_source``)."""
    return str(request.param)


@pytest.fixture
def hugepages() -> Iterator[int]:
    """Reserve 16 huge pages for the test; restore the pool size afterwards."""
    try:
        grow_hugepage_pool(16)
    except OSError as err:
        pytest.skip(f"cannot reserve hugetlb pages: {err}")
    try:
        if userfault.hugepages_free() < 8:
            pytest.skip(f"reserved hugetlb pages but only {userfault.hugepages_free()} are free")
        yield userfault.hugepages_free()
    finally:
        grow_hugepage_pool(-16)


def grow_hugepage_pool(delta: int) -> None:
    """Grow or shrink the hugetlb pool by ``delta`` pages relative to what it is now, so that
    other users of the pool changing it meanwhile keep their share."""
    path = Path("/proc/sys/vm/nr_hugepages")
    path.write_text(str(max(0, int(path.read_text()) + delta)))


def reserve_hugepages(n: int) -> Iterator[None]:
    """Grow the hugetlb pool by ``n`` pages while the caller runs (a generator to yield from)."""
    grow_hugepage_pool(n)
    try:
        yield
    finally:
        grow_hugepage_pool(-n)
