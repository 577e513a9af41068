"""Forked children outlive the process serving them: never a zero where a page was not loaded.

A child's registration lives while some process holds its userfaultfd; the kernel drops it when
its holder (the owner with a native source, the pager process's supervisor otherwise) is
SIGKILLed, and the child would then read its never-loaded pages as zeros. Each test kills that
process for real (or closes the pager) while a forked child waits, then lets the child touch
pages: those it had loaded keep their bytes, the others end in a logged SIGBUS.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from pager_helpers import run_script

PAGE = 4096
pytestmark = pytest.mark.timeout(90)

#: The owner: maps the source, loads page 0, forks a child that loads page 1, says "ready"
#: (its at-fork hook is done by then), then waits for a line on stdin before touching pages 0,
#: 1 and 100.
OWNER = """
import os, sys, time
sys.path.insert(0, {tests!r})
import userfault
from userfault import _native
from py_sources import PyBytes

def pattern(n):
    return bytes((i * 7 + 3) % 251 for i in range(n))

if __name__ == "__main__":
    data = pattern(1 << 20)
    src = {path!r} if {kind!r} == "native" else PyBytes(data)
    p = userfault.map(src, readahead=False, region={region!r})
    with memoryview(p) as v:
        assert v[:{page}] == data[:{page}]                     # loaded before the fork
    keeper = p._runtime.proc.pid if {kind!r} == "process" else os.getpid()
    pid = os.fork()
    if pid == 0:
        with memoryview(p) as v:
            ok = v[{page}:2 * {page}] == data[{page}:2 * {page}]  # loaded by the child
        print("ready", os.getpid(), keeper, flush=True)
        sys.stdin.readline()                                       # the serving is gone now
        with memoryview(p) as v:
            print("child loaded pages", ok and v[:2 * {page}] == data[:2 * {page}], flush=True)
            got = bytes(v[100 * {page}:101 * {page}])              # never loaded: SIGBUS
        print("child read a page never loaded:", got == data[100 * {page}:101 * {page}],
              flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)                                 # (unless killed first)
    print("child status", os.waitstatus_to_exitcode(status), flush=True)
"""

#: Runs the owner, SIGKILLs the victim, lets the child go and reports how it ended. It is a
#: child subreaper, so that a child orphaned by its owner's death is its to wait for.
DRIVER = """
import ctypes, os, select, signal, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(36, 1, 0, 0, 0) == 0                            # PR_SET_CHILD_SUBREAPER
with open({log!r}, "w") as err:
    owner = subprocess.Popen([sys.executable, "-c", {owner!r}], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=err, text=True)
    ready = owner.stdout.readline().split()
    assert ready[:1] == ["ready"], ready
    child, keeper = int(ready[1]), int(ready[2])
    # the keeper and its pager worker, if any: nothing may serve the child once it goes on
    with open(f"/proc/{{keeper}}/task/{{keeper}}/children") as f:
        gone = [os.pidfd_open(pid) for pid in {{keeper, *map(int, f.read().split())}} - {{child}}]
    os.kill(keeper, signal.SIGKILL)
    for pidfd in gone:
        select.select([pidfd], [], [])                             # readable once it exited
    if keeper == owner.pid:
        owner.wait()                                               # the child is ours now
    owner.stdin.write("go\\n")
    owner.stdin.flush()
    if keeper == owner.pid:
        _, status = os.waitpid(child, 0)
        print("child status", os.waitstatus_to_exitcode(status), flush=True)
    out = owner.stdout.read()
    print(out, end="", flush=True)
    owner.stdin.close()
    owner.wait()
"""


def _pattern(n: int) -> bytes:
    return bytes((i * 7 + 3) % 251 for i in range(n))


@pytest.mark.parametrize("region", ["anonymous", "memfd"])
@pytest.mark.parametrize("kind", ["native", "process"])
def test_child_of_a_killed_server_gets_sigbus_never_zeros(tmp_path: Path, kind: str,
                                                          region: str) -> None:
    """SIGKILL the process holding the child's uffd (the owner; the supervisor): the child
    reads the pages it had loaded, and dies of a logged SIGBUS on one it had not."""
    path = tmp_path / "src.bin"
    path.write_bytes(_pattern(1 << 20))
    log = tmp_path / "stderr.txt"
    owner = OWNER.format(tests=os.path.dirname(__file__), path=str(path), kind=kind,
                         region=region, page=PAGE)
    r = run_script(DRIVER.format(log=str(log), owner=owner), timeout=60)
    err = log.read_text()
    assert r.returncode == 0, (r.stdout, r.stderr, err)
    assert "child loaded pages True" in r.stdout, (r.stdout, err)
    assert "never loaded" not in r.stdout, (r.stdout, err)
    assert f"child status {-signal.SIGBUS}" in r.stdout, (r.stdout, err)
    if kind == "native":  # nobody else is left to poison: the child's own watchdog does
        assert "the process serving this forked child's memory" in err, err
        assert "died: faults on pages not loaded yet get SIGBUS" in err, err
    else:  # the worker may poison first, seeing its supervisor go
        assert ("the process serving this forked child's memory" in err
                or "closed while a forked child still used its memory" in err), err


def assert_dropped_page_got_sigbus(r: subprocess.CompletedProcess[str]) -> None:
    """The child read its loaded page right, then died of SIGBUS touching a dropped one."""
    assert r.returncode == 0, r.stderr
    assert "child loaded page True" in r.stdout, (r.stdout, r.stderr)
    assert "dropped page" not in r.stdout, (r.stdout, r.stderr)
    assert f"child status {-signal.SIGBUS}" in r.stdout, (r.stdout, r.stderr)


@pytest.mark.parametrize("region", ["anonymous", "memfd"])
@pytest.mark.parametrize("kind", ["native", "process"])
def test_owner_closing_then_a_dropped_page_gets_sigbus_not_a_hang(kind: str, region: str) -> None:
    """The owner closes its pager while a child runs; the child then drops a page it had
    loaded (MADV_DONTNEED; MADV_REMOVE for a memfd) and touches it: nobody serves it any more,
    so that ends in a logged SIGBUS, not a fault that waits forever."""
    advice = "MADV_REMOVE" if region == "memfd" else "MADV_DONTNEED"
    r = run_script(f"""
        import mmap, os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import userfault
        from userfault import _native
        from py_sources import PyBytes
        if __name__ == "__main__":
            data = bytes((i * 7 + 3) % 251 for i in range(1 << 20))
            src = userfault.BufferSource(data) if {kind!r} == "native" else PyBytes(data)
            p = userfault.map(src, readahead=False, region={region!r})
            r, w = os.pipe()
            ready_r, ready_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(w)
                with memoryview(p) as v:
                    ok = v[{PAGE}:{2 * PAGE}] == data[{PAGE}:{2 * PAGE}]
                os.write(ready_w, b"1")                             # (its at-fork hook ran)
                os.read(r, 1)                                       # the owner closed
                with memoryview(p) as v:
                    ok = ok and v[{PAGE}:{2 * PAGE}] == data[{PAGE}:{2 * PAGE}]
                print("child loaded page", ok, flush=True)
                assert _native.madvise(p.address + {PAGE}, {PAGE}, mmap.{advice}) == 0
                _native.touch(p.address + {PAGE}, 1, 1, 0, 0, False)
                print("child read a dropped page", flush=True)
                os._exit(0)
            os.close(r)
            os.read(ready_r, 1)
            p.close()
            os.write(w, b"x")
            _, status = os.waitpid(pid, 0)
            print("child status", os.waitstatus_to_exitcode(status), flush=True)
    """, timeout=60)
    assert_dropped_page_got_sigbus(r)
    assert "the process serving this forked child's memory" in r.stderr or \
        "while this forked child still used its memory" in r.stderr, r.stderr


def test_a_child_whose_serving_ended_before_its_hook_registers_its_own() -> None:
    """The at-fork hook finds the serving over already (the kernel dropped the child's
    registration before it could take a copy): it registers the memory with a uffd of its
    own, so loaded pages keep their bytes and the others get SIGBUS, never zeros. (Forked
    from C, no hook ran; the test runs it once the owner has closed its pager.)"""
    r = run_script(f"""
        import ctypes, mmap, os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import userfault
        from userfault import _native, pager as pager_module
        if __name__ == "__main__":
            data = bytes((i * 7 + 3) % 251 for i in range(1 << 20))
            p = userfault.map(userfault.BufferSource(data), readahead=False)
            with memoryview(p) as v:
                assert v[:{PAGE}] == data[:{PAGE}]
            r, w = os.pipe()
            pid = ctypes.PyDLL(None).fork()                     # no at-fork hooks
            if pid == 0:
                os.close(w)
                os.read(r, 1)                                   # the owner closed: unregistered
                pager_module._after_fork_in_child()
                with memoryview(p) as v:
                    print("child loaded page", v[:{PAGE}] == data[:{PAGE}], flush=True)
                # dropped: only the child's own registration can fail it now (the engine that
                # closed poisoned the pages never loaded, not this one)
                assert _native.madvise(p.address, {PAGE}, mmap.MADV_DONTNEED) == 0
                with memoryview(p) as v:
                    got = bytes(v[:{PAGE}])
                print("child read a dropped page:", got == data[:{PAGE}], flush=True)
                os._exit(0)
            os.close(r)
            p.close()
            os.write(w, b"x")
            _, status = os.waitpid(pid, 0)
            print("child status", os.waitstatus_to_exitcode(status), flush=True)
    """, timeout=60)
    assert_dropped_page_got_sigbus(r)
    assert "before this child could hold its memory" in r.stderr, r.stderr


@pytest.mark.timeout(150)
def test_forks_racing_close_never_deadlock() -> None:
    """A thread forking while another closes the pager: a fork between the serving's stop and
    the region's unregistering would wait in the kernel for a FORK event nobody reads, holding
    the GIL the closing thread needs (it deadlocked in 1 run of 3 of 60 rounds). Forks and close now
    take turns; every child reads right or gets SIGBUS, never zeros, and every round ends."""
    r = run_script(f"""
        import os, threading, time
        import userfault
        data = bytes((i * 7 + 3) % 251 for i in range(1 << 20))
        bad = []
        for round in range(200):
            p = userfault.map(userfault.BufferSource(data), readahead=False)
            pids = []

            def forker():
                for _ in range(5):
                    pid = os.fork()
                    if pid == 0:
                        try:
                            with memoryview(p) as v:
                                ok = v[{PAGE}:{PAGE} + 64] == data[{PAGE}:{PAGE} + 64]
                        except ValueError:  # the pager was closed before the fork
                            ok = True
                        os._exit(0 if ok else 1)
                    pids.append(pid)

            t = threading.Thread(target=forker)
            t.start()
            time.sleep((round % 10) * 0.0003)
            p.close()
            t.join()
            for pid in pids:
                _, status = os.waitpid(pid, 0)
                code = os.waitstatus_to_exitcode(status)
                if code not in (0, -7):  # right bytes, or SIGBUS (closed before it read)
                    bad.append(code)
        print("rounds done, bad", bad, flush=True)
    """, timeout=120)
    assert "rounds done, bad []" in r.stdout, (r.stdout, r.stderr[-3000:])
