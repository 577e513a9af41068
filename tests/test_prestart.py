"""A pager process started ahead (``userfault.prestart``): the next pager of a Python source
takes it, with every descriptor it needs, and a new spare is started a second later; a spare
that does not fit (another environment) is not used; one nobody takes exits with its
process."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import userfault
from pager_helpers import run_script, wait_until
from py_sources import PyBytes
from userfault.serving import process
from userfault.trace import Cause, read

PAGE = userfault.PAGE_SIZE
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def no_spare_left() -> Iterator[None]:
    yield
    process.prestart(False)


def _spare_pid() -> int:
    spare = process._spare
    assert spare is not None
    return spare.proc.pid


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_the_next_pager_takes_the_spare_and_a_new_one_is_started(tmp_path: Path) -> None:
    data = b"".join(i.to_bytes(4, "little") * (PAGE // 4) for i in range(64))
    userfault.prestart()
    first = _spare_pid()
    userfault.prestart()  # again: the same spare
    assert _spare_pid() == first
    trace = tmp_path / "run.uftrace"
    # a budget (agent eventfds, the pool memfd) and a trace: every descriptor goes across
    with userfault.Pager(PyBytes(data), max_resident=16 * PAGE, readahead=False,
                         trace=trace) as pager:
        assert pager._runtime.proc.pid == first  # type: ignore[union-attr]
        view = memoryview(pager)
        assert bytes(view) == data  # four times the budget: the evictor gives pages back
        assert wait_until(lambda: pager.stats().evictions > 0, 10)
        assert bytes(view) == data  # and they come back
        view.release()
        assert wait_until(lambda: process._spare is not None, 10)  # NEXT_SPARE_DELAY later
        second = _spare_pid()
        assert second != first
    faults = read(trace).records
    assert (faults["cause"] == Cause.FAULT).sum() >= len(data) // PAGE
    userfault.prestart(False)
    assert process._spare is None
    assert wait_until(lambda: _gone(second), 10)


def test_the_next_spare_waits_until_the_pager_that_took_one_has_started(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The next spare's imports would compete with the new pager's first faults: it starts
    NEXT_SPARE_DELAY later, or at once when asked for (``prestart()``)."""
    monkeypatch.setattr(process, "NEXT_SPARE_DELAY", 3600.0)
    userfault.prestart(wait=30)
    with userfault.Pager(PyBytes(b"z" * PAGE)) as pager:
        assert bytes(memoryview(pager)[:1]) == b"z"
        assert process._spare is None and process._next_spare is not None
        userfault.prestart()  # asked for: now, and the later one is dropped
        assert process._spare is not None and process._next_spare is None
        asked = _spare_pid()
    with userfault.Pager(PyBytes(b"w" * PAGE)) as pager:  # takes it; the next one is due
        assert pager._runtime.proc.pid == asked  # type: ignore[union-attr]
        assert process._next_spare is not None
        userfault.prestart(False)  # not kept: nor started later
        assert process._spare is None and process._next_spare is None
        assert bytes(memoryview(pager)[:1]) == b"w"


def test_a_spare_started_under_another_environment_is_not_used(
        monkeypatch: pytest.MonkeyPatch) -> None:
    userfault.prestart()
    stale = _spare_pid()
    monkeypatch.setenv("USERFAULT_TEST_PRESTART", "changed")
    with userfault.Pager(PyBytes(b"x" * PAGE)) as pager:
        assert bytes(memoryview(pager)[:1]) == b"x"
        assert pager._runtime.proc.pid != stale  # type: ignore[union-attr]
    assert wait_until(lambda: _gone(stale), 10)
    assert process._spare is None  # not at once: the next one starts a second later


def test_a_spare_that_died_is_replaced_after_the_next_map() -> None:
    userfault.prestart(wait=30)
    dead = _spare_pid()
    os.kill(dead, signal.SIGKILL)
    assert wait_until(lambda: process._spare.proc.poll() is not None, 10)  # type: ignore[union-attr]
    with userfault.Pager(PyBytes(b"d" * PAGE)) as pager:  # a pager process of its own
        assert pager._runtime.proc.pid != dead  # type: ignore[union-attr]
        assert bytes(memoryview(pager)[:1]) == b"d"
    assert wait_until(lambda: process._spare is not None, 10)  # spares are kept still
    assert _spare_pid() != dead


def test_a_spare_nobody_takes_exits_with_its_process() -> None:
    result = run_script("""
        import os, socket, userfault
        from userfault.serving import process
        userfault.prestart()
        process._spare.sock.recv(1, socket.MSG_PEEK)  # ready, its "ready" byte left unread
        print(process._spare.proc.pid, flush=True)
        os._exit(0)                              # no atexit, no close
    """)
    pid = int(result.stdout.split()[0])
    assert "Traceback" not in result.stderr  # the spare's stderr is the script's
    deadline = time.monotonic() + 10
    while not _gone(pid):  # an exited child of the dead parent is reaped by init
        assert time.monotonic() < deadline, f"spare pager process {pid} outlived its parent"
        time.sleep(0.05)


def test_a_spare_exits_with_its_process_while_a_child_holds_its_socket() -> None:
    """A child forked while the spare was being started (before the at-fork hook could know
    its socket) keeps the socket's end open after its parent exits: the spare watches the
    parent itself (a pidfd), and exits with it."""
    result = run_script("""
        import os, socket, time, userfault
        from userfault.serving import process
        userfault.prestart(wait=30)
        held = os.dup(process._spare.sock.fileno())  # as that fork's copy would be
        child = os.fork()
        if child == 0:
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 1)                     # the script's output ends with its parent
            os.dup2(null, 2)
            time.sleep(20)                       # outlives the parent, the socket open
            os._exit(0)
        print(process._spare.proc.pid, child, flush=True)
        os._exit(0)
    """)
    pid, child = (int(x) for x in result.stdout.split()[:2])
    try:
        deadline = time.monotonic() + 10
        while not _gone(pid):
            assert time.monotonic() < deadline, f"spare pager process {pid} outlived its parent"
            time.sleep(0.05)
        # the script's output ended with the spare (it had the same stdout): the child, with
        # the socket's end, must still be there, or the spare only went when the child did
        assert not _gone(child)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_prestart_can_wait_until_the_spare_is_ready() -> None:
    assert userfault.prestart(wait=30)
    spare = process._spare
    assert spare is not None and spare.ready
    assert userfault.prestart(wait=30)  # again: the same spare, ready already
    assert process._spare is spare
    with userfault.Pager(PyBytes(b"y" * PAGE)) as pager:
        assert pager._runtime.proc.pid == spare.proc.pid  # type: ignore[union-attr]
        assert bytes(memoryview(pager)[:1]) == b"y"
    assert not userfault.prestart(False)


def test_a_spare_that_exits_during_its_imports_is_a_clear_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONHOME", "/nonexistent")  # the interpreter cannot start
    with pytest.raises(userfault.PagerError, match=r"ended before its imports were done "
                                                   r"\(exit status \d+\)"):
        userfault.prestart(wait=30)
    assert process._spare is None


def test_a_fork_while_prestart_waits_leaves_the_child_free_to_map() -> None:
    """prestart(wait=...) waits outside the module's lock: a child forked by another thread
    meanwhile takes no lock held for ever, and starts pagers of its own."""
    result = run_script(f"""
        import os, sys, threading, userfault
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from userfault.serving import process
        from py_sources import PyBytes
        waiter = threading.Thread(target=userfault.prestart, kwargs={{"wait": 30}})
        waiter.start()
        pid = os.fork()                          # most likely while the spare imports
        if pid == 0:
            with userfault.Pager(PyBytes(b"c" * 4096)) as p:
                ok = bytes(memoryview(p)[:1]) == b"c"
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        waiter.join()
        print("child", os.waitstatus_to_exitcode(status), process._spare.ready, flush=True)
    """, timeout=60)
    assert result.stdout.split() == ["child", "0", "True"], result.stdout + result.stderr


def test_prestart_can_wait_for_ever() -> None:
    assert userfault.prestart(wait=math.inf)
