"""Forked children of a process with a pager: never a wrong byte, in either runtime.

With UFFD_EVENT_FORK the engine gets a userfaultfd for each child's copy of the region and
serves it from the same source. Each test forks for real and checks every byte the child
reads, and that the child's touches never change what the parent reads (memfd regions share
their page cache with the child).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import fork_tasks
import userfault
from conftest import reserve_hugepages
from pager_helpers import bytes_source, run_script, settled, wait_until
from userfault import PagerError

np = pytest.importorskip("numpy")

PAGE = 4096
MiB = 1 << 20
pytestmark = pytest.mark.timeout(60)


def numbered(n: int) -> bytes:
    return np.arange(n // 8, dtype=np.uint64).tobytes()




@pytest.fixture(params=["anonymous", "memfd", "hugetlb"])
def region(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param != "hugetlb":
        yield str(request.param)
        return
    for _ in reserve_hugepages(8):
        if userfault.hugepages_free() < 4:
            pytest.skip("the kernel could not reserve 4 huge pages")
        yield "hugetlb"


def test_child_reads_pages_never_loaded(runtime: str, region: str,
                                        child: Callable[..., tuple[int, bytes]]) -> None:
    size = 8 * MiB
    data = numbered(size)
    with userfault.map(bytes_source(runtime, data), region=region, readahead=False) as p:
        assert p.fork_served
        with memoryview(p) as v:
            assert v[:PAGE] == data[:PAGE]  # one page loaded before the fork

        def body(wfd: int) -> None:
            with memoryview(p) as v:
                got = hashlib.sha256(v[:size]).hexdigest()
            os.write(wfd, got.encode())

        status, out = child(body)
        assert os.waitstatus_to_exitcode(status) == 0, out
        assert out.decode() == hashlib.sha256(data).hexdigest()
        # the child's touches (memfd: into the shared page cache) changed nothing here
        with memoryview(p) as v:
            assert hashlib.sha256(v[:size]).digest() == hashlib.sha256(data).digest()
        s = settled(p, lambda s: s.children == 0, timeout=10)  # its context is dropped
        assert s.fork_events == 1 and s.children == 0
        assert p.check() is None


def test_grandchild_is_served_too(runtime: str, child: Callable[..., tuple[int, bytes]]) -> None:
    data = numbered(4 * MiB)
    with userfault.map(bytes_source(runtime, data), readahead=False) as p:
        def body(wfd: int) -> None:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                with memoryview(p) as v:
                    os.write(w, hashlib.sha256(v[:len(data)]).hexdigest().encode())
                os._exit(0)
            os.close(w)
            got = os.read(r, 200)
            os.waitpid(pid, 0)
            os.write(wfd, got)

        status, out = child(body)
        assert os.waitstatus_to_exitcode(status) == 0, out
        assert out.decode() == hashlib.sha256(data).hexdigest()
        assert settled(p, lambda s: s.fork_events == 2).fork_events == 2


def test_multiprocessing_fork_pool_over_an_array(runtime: str) -> None:
    n = 1 << 20  # uint64 values 0..n-1, 8 MiB
    data = np.arange(n, dtype=np.uint64).tobytes()
    with userfault.map(bytes_source(runtime, data), readahead=False) as p:
        fork_tasks.ARRAY = p.array("uint64")
        try:
            with multiprocessing.get_context("fork").Pool(2) as pool:
                sums = pool.map(fork_tasks.slice_sum, [(i * n // 8, (i + 1) * n // 8)
                                                       for i in range(8)])
        finally:
            fork_tasks.ARRAY = None
        assert sums == [sum(range(i * n // 8, (i + 1) * n // 8)) for i in range(8)]
        assert p.check() is None


def test_prefetch_from_a_child_is_refused(child: Callable[..., tuple[int, bytes]]) -> None:
    with userfault.map(numbered(MiB), readahead=False) as p:
        def body(wfd: int) -> None:
            try:
                p.prefetch([(0, PAGE)])
            except PagerError as err:
                os.write(wfd, str(err).encode())

        status, out = child(body)
        assert os.waitstatus_to_exitcode(status) == 0
        assert b"prefetch from a forked child is not supported" in out
        # the child's copy of the pager did nothing to the parent's engine
        assert p.prefetch([(0, PAGE)]) == PAGE


def test_child_closing_its_copy_leaves_the_parent_serving(
        runtime: str, child: Callable[..., tuple[int, bytes]]) -> None:
    data = numbered(2 * MiB)
    with userfault.map(bytes_source(runtime, data), readahead=False) as p:
        def body(wfd: int) -> None:
            with memoryview(p) as v:
                first = bytes(v[:PAGE])
            p.close()  # the child's copy: must not stop the parent's engine or pager process
            os.write(wfd, b"ok" if first == data[:PAGE] else b"bad")

        status, out = child(body)
        assert os.waitstatus_to_exitcode(status) == 0 and out == b"ok"
        with memoryview(p) as v:
            assert bytes(v) == data
        assert p.check() is None


@pytest.mark.parametrize("kind", ["native", "process"])
def test_parent_closing_first_gives_the_child_sigbus_not_zeros(kind: str) -> None:
    """A child still running when the parent closes its pager: pages it had not loaded are
    poisoned (a logged SIGBUS), never left to read as zeros."""
    src = "BufferSource(data)" if kind == "native" else "PyBytes(data)"
    r = run_script(f"""
        import os, signal, sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import userfault
        from userfault import _native, BufferSource
        from py_sources import PyBytes
        if __name__ == "__main__":
            data = b"\\x07" * (1 << 20)
            p = userfault.map({src}, readahead=False)
            assert _native.touch(p.address, 1, 1, 0, 0, True) == 7
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.read(r, 1)                                   # wait for the parent's close
                print("child first page", _native.touch(p.address, 1, 1, 0, 0, True),
                      flush=True)
                _native.touch(p.address + (512 << 10), 1, 1, 0, 0, True)  # never loaded
                print("child read a page the parent never loaded", flush=True)
                os._exit(0)
            p.close()
            os.write(w, b"x")
            _, status = os.waitpid(pid, 0)
            print("child", os.waitstatus_to_exitcode(status), flush=True)
    """)
    assert r.returncode == 0, r.stderr
    assert "child first page 7" in r.stdout
    assert "never loaded" not in r.stdout
    assert f"child {-signal.SIGBUS}" in r.stdout
    # logged by the engine that stops, or (when the close races the child's at-fork hook, or
    # finds the child's beacon event pending) by the child's own watchdog
    assert any(why in r.stderr for why in (
        "closed while a forked child still used its memory",
        "while this forked child still used its memory",
        "before this child could hold its memory")), r.stderr


@pytest.mark.parametrize("kind", ["native", "process"])
def test_parent_exiting_without_close_gives_the_child_sigbus_not_zeros(kind: str) -> None:
    """The parent exits with the pager open; its engine dies with it (native) or the pager
    process stops (a Python source): a child left behind gets SIGBUS on pages it had not
    loaded, never zeros, and what it had loaded stays readable."""
    src = "BufferSource(data)" if kind == "native" else "PyBytes(data)"
    r = run_script(f"""
        import os, signal, sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import userfault
        from userfault import _native, BufferSource
        from py_sources import PyBytes
        if __name__ == "__main__":
            data = b"\\x07" * (1 << 20)
            p = userfault.map({src}, readahead=False)
            r, w = os.pipe()
            done_r, done_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(w)
                _native.touch(p.address, 1, 1, 0, 0, False)     # loaded by the child
                os.write(done_w, b"1")
                os.read(r, 1)                                   # EOF: the parent is gone
                time.sleep(0.5)                                 # its pager process too
                print("child first page", _native.touch(p.address, 1, 1, 0, 0, False),
                      flush=True)
                _native.touch(p.address + (512 << 10), 1, 1, 0, 0, False)  # never loaded
                print("child read a page the parent never loaded", flush=True)
                os._exit(0)
            os.read(done_r, 1)
            print("parent exits, pager open", flush=True)       # no close()
    """)
    assert r.returncode == 0, r.stderr
    assert "parent exits, pager open" in r.stdout
    # (the child is not the test's to wait for; its output arrives before the pipe closes)
    assert "child first page 7" in r.stdout, (r.stdout, r.stderr)
    assert "never loaded" not in r.stdout, (r.stdout, r.stderr)
    assert "still used its memory: the" in r.stderr


#: The owner of a pager whose worker dies once, at page 40 (data page i holds the byte i):
#: it loads page 0, forks a child that runs {child} (which touches page 40, killing the
#: worker, and exits 0 if every byte it read was right), then reports how the child ended.
CRASHING_OWNER = """
import mmap, os, sys
sys.path.insert(0, {tests!r})
import userfault
from userfault import _native
from py_sources import Misbehaving
if __name__ == "__main__":
    page = 4096
    data = b"".join(i.to_bytes(4, "little") * (page // 4) for i in range(256))
    src = Misbehaving(data, [40 * page], "crash-once", until={marker!r})
    p = userfault.map(src, readahead=False)
    assert _native.touch(p.address, 1, 1, 0, 0, False) == 0
    pid = os.fork()
    if pid == 0:
{child}
    _, status = os.waitpid(pid, 0)
    print("child", os.waitstatus_to_exitcode(status), "restarts", p.stats().restarts,
          flush=True)
    p.close()
"""


def run_crashing_owner(marker: Path, child: str) -> subprocess.CompletedProcess[str]:
    """Run :data:`CRASHING_OWNER` with ``child`` as its child's code; the worker did die."""
    r = run_script(CRASHING_OWNER.format(tests=os.path.dirname(__file__), marker=str(marker),
                                         child=textwrap.indent(textwrap.dedent(child), " " * 8)),
                   timeout=60)
    assert marker.exists(), (r.stdout, r.stderr)
    assert "restarting it" in r.stderr
    return r


def test_a_worker_that_dies_keeps_serving_forked_children(tmp_path: Path) -> None:
    """The pager process's worker holds the forked children's uffds; one that dies must not
    take them along (the child would read zeros): the next worker serves them."""
    r = run_crashing_owner(tmp_path / "crashed", """
        first = _native.touch(p.address + 40 * page, 1, 1, 0, 0, False)  # kills it
        os._exit(0 if first == 40 and bytes(memoryview(p)) == data else 1)
    """)
    assert r.returncode == 0, r.stderr
    assert "child 0 restarts 1" in r.stdout, (r.stdout, r.stderr)


def test_a_worker_that_dies_after_a_child_moved_its_memory_serves_it_where_it_is_now(
        tmp_path: Path) -> None:
    """A forked child moved its second quarter away and its fourth into the hole, then the
    pager worker died. The worker told the supervisor the child's areas after each mremap,
    so the next one serves each part of the child its own bytes (not the second quarter's
    where the fourth is now)."""
    r = run_crashing_owner(tmp_path / "crashed", """
        q = len(data) // 4
        far, err = _native.mmap(0, q, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        assert err == 0 and _native.mremap(p.address + q, q, q, 3, far) == (far, 0)
        assert _native.mremap(p.address + 3 * q, q, q, 3, p.address + q) == (p.address + q, 0)
        assert _native.touch(p.address + 40 * page, 1, 1, 0, 0, False) == 40  # kills it
        right = all(_native.touch(addr + i * page, 1, 1, 0, 0, False) == first + i
                    for addr, first in ((p.address, 0), (far, 64), (p.address + 2 * q, 128),
                                        (p.address + q, 192))
                    for i in range(64))
        os._exit(0 if right else 1)
    """)
    assert "child 0 restarts 1" in r.stdout, (r.stdout, r.stderr)


def test_unprivileged_child_fails_loudly(child: Callable[..., tuple[int, bytes]]) -> None:
    """Without CAP_SYS_PTRACE there is no EVENT_FORK: the region is not inherited at all
    (MADV_DONTFORK), so a child touching it dies of SIGSEGV instead of reading zeros."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")

    def body(wfd: int) -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        data = b"\x05" * MiB
        with userfault.map(data, readahead=False) as p:
            report: dict[str, object] = {"fork_served": p.fork_served}
            pid = os.fork()
            if pid == 0:
                userfault._native.touch(p.address + PAGE, 1, 1, 0, 0, True)
                os._exit(0)  # never reached: the mapping is not there
            _, status = os.waitpid(pid, 0)
            report["child"] = os.waitstatus_to_exitcode(status)
            with memoryview(p) as v:
                report["parent"] = bytes(v) == data
        os.write(wfd, json.dumps(report).encode())

    status, out = child(body)
    assert os.waitstatus_to_exitcode(status) == 0, out
    report = json.loads(out)
    assert report == {"fork_served": False, "child": -signal.SIGSEGV, "parent": True}


def test_children_of_many_forks_are_all_dropped(runtime: str) -> None:
    data = numbered(MiB)
    with userfault.map(bytes_source(runtime, data), readahead=False) as p:
        pids = []
        for i in range(8):
            pid = os.fork()
            if pid == 0:
                at = i * 8 * PAGE  # each child reads its own 8 pages, never loaded before
                got = userfault._native.touch(p.address + at, 8 * PAGE, 1, 0, 0, True)
                os._exit(0 if got == sum(data[at:at + 8 * PAGE]) else 1)
            pids.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        assert codes == [0] * 8
        assert wait_until(lambda: p.stats().children == 0, 10)
        assert p.stats().fork_events == 8


@pytest.mark.parametrize("source", ["native", "process"])
def test_a_fork_while_a_pager_is_being_made_neither_hangs(source: str) -> None:
    """A thread forks in a loop while another makes and closes pagers. A fork between the
    region's registration (with EVENT_FORK) and the serving's start would wait in the
    kernel for a FORK event nobody reads yet, holding the GIL the making thread needs: both
    hung for good. Such a fork now waits until the pager serves."""
    tests = str(Path(__file__).parent)
    result = run_script(f"""
        import faulthandler, os, sys, threading, time
        sys.path.insert(0, {tests!r})
        import userfault
        from py_sources import PyBytes
        faulthandler.dump_traceback_later(40, exit=True)
        stop = time.monotonic() + 2.0
        forks = 0
        def forker():
            global forks
            while time.monotonic() < stop:
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                os.waitpid(pid, 0)
                forks += 1
        t = threading.Thread(target=forker)
        t.start()
        maps = 0
        data = b"n" * 4 * 4096
        while time.monotonic() < stop:
            src = userfault.BufferSource(data) if {source!r} == "native" else PyBytes(data)
            with userfault.Pager(src) as p:
                assert bytes(memoryview(p)[:1]) == b"n"
            maps += 1
        t.join()
        print("maps", maps > 0, "forks", forks > 0, flush=True)
    """, timeout=50)
    assert result.stdout.split() == ["maps", "True", "forks", "True"], \
        result.stdout + result.stderr

