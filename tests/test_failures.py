"""Failure semantics of the one engine, each failure caused for real.

A page that cannot be served ends in a logged SIGBUS within bounded time, never in zeros or
stale bytes, and only the pages that fail are poisoned. Accesses that must die run in a child
interpreter; the test checks its exit signal and the log line naming page, source and cause.
"""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import pytest

import userfault
from pager_helpers import page_data, run_script, settled, wait_until
from py_sources import BatchFails, Misbehaving, PyBatched, PyFile
from userfault import PagerError, PrefetchError

PAGE = 4096
MiB = 1 << 20
TESTS = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.timeout(60)


def data(n: int = MiB) -> bytes:
    return page_data(n)


def child(body: str, timeout: float = 45) -> tuple[int, str, str]:
    """Run ``body`` in a fresh interpreter with the test sources importable."""
    r = run_script(f"import sys\nsys.path.insert(0, {TESTS!r})\n" + textwrap.dedent(body),
                   timeout=timeout)
    return r.returncode, r.stdout, r.stderr


# -- batches fail page by page -----------------------------------------------------------


def test_prefetch_poisons_only_the_page_that_fails() -> None:
    body = data()
    with userfault.map(Misbehaving(body, [10 * PAGE], "raise"), readahead=False,
                       retries=1) as p:
        with pytest.raises(PrefetchError, match=r"poisoned 4096 bytes at source offsets "
                           r"0xa000\.\.\+4096: OSError: injected failure at 0xa000") as info:
            p.prefetch([(0, 64 * PAGE)])
        assert info.value.installed == 63 * PAGE
        assert info.value.poisoned == ((10 * PAGE, PAGE),)
        s = p.stats()
        assert (s.poisoned, s.faults, s.prefetch_bytes) == (1, 0, 63 * PAGE)
        with memoryview(p) as v:  # the 63 good pages are there, without a fault
            assert v[:10 * PAGE] == body[:10 * PAGE]
            assert v[11 * PAGE:64 * PAGE] == body[11 * PAGE:64 * PAGE]
        assert p.stats().faults == 0
        with pytest.raises(PagerError, match=r"prefetch at .* \(offset 0xa000 of Misbehaving"):
            p.check()


def test_a_failed_batch_is_read_again_page_by_page() -> None:
    """read_many failing for a batch fails none of its pages yet: each is read alone."""
    body = data()
    with userfault.map(BatchFails(body, [3 * PAGE]), readahead=False, retries=1) as p:
        with pytest.raises(PrefetchError, match=r"0x3000\.\.\+4096: OSError: page 0x3000 is bad"
                           ) as info:
            p.prefetch([(0, 16 * PAGE)])
        assert info.value.installed == 15 * PAGE and info.value.poisoned == ((3 * PAGE, PAGE),)
        with memoryview(p) as v:
            assert v[4 * PAGE:16 * PAGE] == body[4 * PAGE:16 * PAGE]


def test_populate_poisons_only_the_bad_page() -> None:
    body = data(4 * MiB)
    bad = 300 * PAGE
    with userfault.map(Misbehaving(body, [bad], "raise"), populate=True, readahead=False,
                       retries=0) as p:
        s = settled(p, lambda s: s.populate_bytes + s.poisoned * PAGE >= p.size, timeout=20)
        assert s.poisoned == 1 and s.populate_bytes == p.size - PAGE
        with memoryview(p) as v:
            assert v[:bad] == body[:bad] and v[bad + PAGE:] == body[bad + PAGE:]
        with pytest.raises(PagerError, match=r"populate at .*offset 0x12c000 of Misbehaving"):
            p.check()


def test_readahead_never_poisons_the_fault_decides() -> None:
    rc, out, err = child("""
        import userfault
        from py_sources import Misbehaving
        from test_failures import data
        if __name__ == "__main__":
            body = data()
            p = userfault.map(Misbehaving(body, [40 * 4096], "raise"), retries=1)
            v = memoryview(p)
            assert bytes(v[:40 * 4096]) == body[:40 * 4096]   # readahead ran over page 40
            print("poisoned by readahead:", p.stats().poisoned, flush=True)
            print(v[40 * 4096 + 1], flush=True)                # the fault for it: SIGBUS
    """)
    assert "poisoned by readahead: 0" in out
    assert rc == -signal.SIGBUS, err
    assert "(offset 0x28000 of Misbehaving(raise, bad=[163840]), fault) after 1 retries" in err


# -- a source that times out ----------------------------------------------------------------
# Its other pages would wait as long: the first timeout ends the work nobody waits for, and
# leaves those pages to their faults, neither retried nor poisoned.


def test_a_prefetch_stops_at_the_first_timeout_and_poisons_nothing(tmp_path: Path) -> None:
    """Read in pieces of 512 KiB: the first is installed, the second times out, as a batch,
    and the prefetch stops there. (It read the 128 bad pages 4 times each, 26 s, and
    poisoned them all.)"""
    body, until = data(), str(tmp_path / "back")
    with userfault.map(Misbehaving(body, range(MiB // 2, MiB, PAGE), "timeout", until),
                       readahead=False, retries=3) as p:
        with pytest.raises(PrefetchError, match=r"prefetch stopped after installing 524288 "
                           r"bytes: the source timed out \(OSError: reading 0x80000 failed\)"
                           ) as info:
            p.prefetch()
        assert info.value.installed == MiB // 2 and info.value.poisoned == ()
        open(until, "w").close()  # the source answers again: faults read the rest
        with memoryview(p) as v:
            assert v == body
        assert p.stats().poisoned == 0 and p.check() is None


def test_populate_stops_at_a_timeout_and_faults_serve_the_rest(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    body, until = data(4 * MiB), str(tmp_path / "back")
    with userfault.map(Misbehaving(body, range(2 * MiB, 4 * MiB, PAGE), "timeout", until),
                       populate=True, readahead=False, retries=3) as p:
        assert wait_until(lambda: "populate of Misbehaving" in capfd.readouterr().err, 20)
        s = p.stats()
        assert s.populate_bytes <= 2 * MiB and s.poisoned == 0
        open(until, "w").close()
        with memoryview(p) as v:
            assert v == body
        assert p.stats().poisoned == 0 and p.check() is None


def test_a_fault_whose_chunk_times_out_elsewhere_poisons_nothing(tmp_path: Path) -> None:
    """The chunk's batch read times out on page 0; the faulting page 5 is read first and
    served; page 0 is left to its own fault (it was retried, then poisoned)."""
    body, until = data(), str(tmp_path / "back")
    with userfault.map(Misbehaving(body, [0], "timeout", until), readahead=False, retries=2,
                       chunk=16 * PAGE) as p:
        with memoryview(p) as v:
            assert v[5 * PAGE:6 * PAGE] == body[5 * PAGE:6 * PAGE]
            s = settled(p)
            assert s.poisoned == 0 and s.faults == 1
            open(until, "w").close()
            assert v[:PAGE] == body[:PAGE]
        assert p.stats().poisoned == 0 and p.check() is None


# -- what a source returns ------------------------------------------------------------------


@pytest.mark.parametrize(("how", "why"), [
    ("short", r"read_into\(0x5000, <4096 bytes>\) returned 2048: a short read is a failed read"),
    ("keep", r"the source kept a reference to the buffer it was given"),
])
def test_a_bad_read_is_a_failed_page_never_stale_bytes(how: str, why: str) -> None:
    body = data()
    with userfault.map(Misbehaving(body, [5 * PAGE], how), readahead=False, retries=0) as p:
        with memoryview(p) as v:
            assert v[4 * PAGE:5 * PAGE] == body[4 * PAGE:5 * PAGE]  # the page before: fine
        with pytest.raises(PrefetchError, match=why) as info:
            p.prefetch([(5 * PAGE, PAGE)])
        assert info.value.poisoned == ((5 * PAGE, PAGE),)
        assert p.prefetch([(6 * PAGE, PAGE)]) == PAGE


def test_a_batch_whose_source_kept_the_buffer_is_read_again_page_by_page() -> None:
    """The source keeps the buffer of a batch read until its next read: the worker moves to
    a fresh buffer (the old one belongs to the views, and goes with them) and reads the batch
    again page by page, into the fresh one. Only the bad page fails. The retries read into
    the old buffer, freed by then: the worker crashed (SIGSEGV)."""
    body = data()
    with userfault.map(Misbehaving(body, [5 * PAGE], "keep-drop"), readahead=False,
                       retries=1) as p:
        with pytest.raises(PrefetchError, match="kept a reference") as info:
            p.prefetch([(4 * PAGE, 4 * PAGE)])
        assert info.value.poisoned == ((5 * PAGE, PAGE),)
        with memoryview(p) as v:
            for page in (4, 6, 7):
                assert v[page * PAGE:(page + 1) * PAGE] == body[page * PAGE:(page + 1) * PAGE]
        assert p.stats().restarts == 0


def test_a_short_read_on_a_fault_gets_sigbus() -> None:
    rc, out, err = child("""
        import userfault
        from py_sources import Misbehaving
        from test_failures import data
        if __name__ == "__main__":
            p = userfault.map(Misbehaving(data(), [8192], "short"), readahead=False, retries=1)
            v = memoryview(p)
            print("page 1", v[4096], flush=True)
            print("page 2", v[8192], flush=True)  # half of it would be the last read's
    """)
    assert "page 1 1" in out and "page 2" not in out
    assert rc == -signal.SIGBUS, err
    assert "returned 2048: a short read is a failed read" in err


# -- hangs and crashes ----------------------------------------------------------------------


def test_a_worker_that_dies_after_a_remap_restarts_where_the_parts_are_now(
        tmp_path: Path) -> None:
    """The process moved its second quarter away and its fourth into the hole, then the
    pager worker died. The new worker starts from the areas the engine kept after each
    mremap, not from the pager's first ones (which would serve the second quarter's bytes
    where the fourth is now): every part reads its own bytes."""
    once = tmp_path / "crashed"
    rc, out, err = child(f"""
        import ctypes, mmap, userfault
        from userfault import _native
        from py_sources import Misbehaving
        from test_failures import data
        if __name__ == "__main__":
            body = data()
            q = len(body) // 4
            p = userfault.map(Misbehaving(body, [0], "crash-once", {str(once)!r}),
                              readahead=False, retries=1)
            old = p.address
            far, err = _native.mmap(0, q, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
            assert err == 0
            for frm, to in ((old + q, far), (old + 3 * q, old + q)):
                assert _native.mremap(frm, q, q, 3, to) == (to, 0)  # MAYMOVE | FIXED
            print("page 0", ctypes.c_char.from_address(old).value, flush=True)  # kills it
            for name, addr, src in (("first", old, 0), ("second", far, q),
                                    ("third", old + 2 * q, 2 * q), ("fourth", old + q, 3 * q)):
                got = bytes((ctypes.c_char * q).from_address(addr))
                print(name, "part right:", got == body[src:src + q], flush=True)
            print("restarts", p.stats().restarts, flush=True)
    """)
    assert once.exists()  # the worker did die
    assert rc == 0, (out, err)
    for name in ("first", "second", "third", "fourth"):
        assert f"{name} part right: True" in out, (out, err)
    assert "restarts 1" in out
    assert "restarting it" in err


def test_a_worker_that_dies_with_an_mremap_in_hand_is_not_replaced() -> None:
    """A worker that dies between reading an mremap's event and applying it took the move
    along: the kernel will not tell it again, and a new worker would serve the moved part
    from where it was. The engine counts its threads in that window in the shared state
    (here set by hand: the window is a few instructions), and the supervisor gives up on
    such a death: the access ends in a logged SIGBUS, never another part's bytes."""
    rc, out, err = child("""
        import ctypes, userfault
        from userfault import _native
        from py_sources import Misbehaving
        from test_failures import data
        if __name__ == "__main__":
            p = userfault.map(Misbehaving(data(), [8 * 4096], "crash"), readahead=False)
            print("page 0", ctypes.c_char.from_address(p.address).value, flush=True)
            _native.state_add(p._runtime.state, "remaps_in_hand", 1)  # as if mid-batch
            print("touching", flush=True)
            print("read", ctypes.c_char.from_address(p.address + 8 * 4096).value, flush=True)
    """, timeout=40)
    assert "page 0" in out and "touching" in out and "read" not in out, (out, err)
    assert rc == -signal.SIGBUS, (out, err)
    assert "giving up" in err and "died between reading an mremap and noting where" in err


@pytest.mark.timeout(120)  # the restart backoff doubles with each death in a row: ~12 s
def test_a_worker_killed_while_pages_are_given_back_is_restarted_every_time() -> None:
    """Threads fault while another gives the pages back (MADV_DONTNEED: REMOVE events
    flow), and the worker is SIGKILLed again and again. Nothing was moved: every death is a
    restart, never a give-up, and every byte read is right."""
    rc, out, err = child("""
        import ctypes, os, random, signal, threading, time, userfault
        from py_sources import PyBytes
        if __name__ == "__main__":
            libc = ctypes.CDLL(None)
            page, n = 4096, 2048
            body = b"".join(i.to_bytes(4, "little") * (page // 4) for i in range(n))
            p = userfault.map(PyBytes(body), readahead=False, max_restarts=1000)
            supervisor = p._runtime.proc.pid
            stop, wrong = False, []
            def reader():
                r, buf = random.Random(), ctypes.create_string_buffer(4)
                while not stop:
                    i = r.randrange(n)
                    ctypes.memmove(buf, p.address + i * page + 4 * r.randrange(1024), 4)
                    if int.from_bytes(buf.raw, "little") != i:
                        wrong.append(i)
            def dropper():
                while not stop:
                    libc.madvise(ctypes.c_void_p(p.address), ctypes.c_size_t(n * page), 4)
                    time.sleep(0.005)
            threads = [threading.Thread(target=reader) for _ in range(3)]
            threads.append(threading.Thread(target=dropper))
            for t in threads:
                t.start()
            kills, deadline = 0, time.monotonic() + 100
            while kills < 8 and time.monotonic() < deadline:
                path = f"/proc/{supervisor}/task/{supervisor}/children"
                workers = [int(w) for w in open(path).read().split()]
                if workers and p.stats().restarts == kills:  # the last one is back
                    time.sleep(0.1)
                    os.kill(workers[0], signal.SIGKILL)
                    kills += 1
                time.sleep(0.02)
            while p.stats().restarts < kills and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)
            stop = True
            for t in threads:
                t.join()
            print("kills", kills, "restarts", p.stats().restarts, "wrong", len(wrong), flush=True)
            p.close()
    """, timeout=120)
    assert rc == 0, (out, err)
    assert "kills 8 restarts 8 wrong 0" in out, (out, err)
    assert "giving up" not in err


@pytest.mark.parametrize("how", ["no restarts left", "too many parts"])
def test_a_worker_that_dies_serving_moved_memory_and_is_not_replaced_ends_in_sigbus(
        how: str) -> None:
    """The worker dies reading a page the process had moved (mremap), and the supervisor
    gives up: with ``max_restarts=0``, or with the memory in more parts than the engine
    notes. The thread that faulted there must be woken, and its access ends in a logged
    SIGBUS, not in a hang."""
    rc, out, err = child(f"""
        import ctypes, mmap, userfault
        from userfault import _native
        from py_sources import Misbehaving
        from test_failures import data
        if __name__ == "__main__":
            body = data()
            page = 4096
            crash = 200 * page  # moved below: the fault the worker dies on is at its new place
            p = userfault.map(Misbehaving(body, [crash], "crash"), readahead=False, retries=1,
                              max_restarts=0 if {how!r} == "no restarts left" else 20)
            moved = [200] if {how!r} == "no restarts left" else list(range(10, 210, 5))
            new = {{}}
            for i in moved:  # 40 single pages moved out: 81 parts, more than are noted
                new[i], e = _native.mmap(0, page, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
                assert e == 0
                assert _native.mremap(p.address + i * page, page, page, 3, new[i]) == (new[i], 0)
            print("touching", flush=True)
            print("read", ctypes.c_char.from_address(new[200]).value, flush=True)
    """, timeout=60)
    assert "touching" in out and "read" not in out, (out, err)
    assert rc == -signal.SIGBUS, (out, err)
    assert "giving up" in err
    if how == "too many parts":
        assert "more than 64 parts" in err


def test_a_hanging_read_is_cut_by_the_timeout() -> None:
    rc, out, err = child("""
        import time, userfault
        from py_sources import Misbehaving
        from test_failures import data
        if __name__ == "__main__":
            p = userfault.map(Misbehaving(data(), [3 * 4096], "hang"), readahead=False,
                              retries=1, timeout=0.5)
            v = memoryview(p)
            print("page 2", v[2 * 4096], flush=True)
            t = time.monotonic()
            try:
                v[3 * 4096]
            finally:
                print(f"after {time.monotonic() - t:.1f} s", flush=True)
    """)
    assert "page 2 2" in out
    assert rc == -signal.SIGBUS, err
    assert "took longer than timeout=0.5 s: cutting it, the pager worker is replaced" in err
    assert "offset 0x3000..+4096 of Misbehaving(hang, bad=[12288]) killed or hung the pager " \
           "worker 2 times: it fails from now on without being read" in err
    assert "the pager worker died or hung reading this page too often" in err


def test_a_crashing_read_restarts_with_backoff_then_poisons_the_page() -> None:
    rc, out, err = child("""
        import userfault
        from py_sources import Misbehaving
        from test_failures import data
        if __name__ == "__main__":
            body = data()
            p = userfault.map(Misbehaving(body, [7 * 4096], "crash"), readahead=False,
                              retries=2)
            v = memoryview(p)
            print("page 6", v[6 * 4096], flush=True)
            try:
                v[7 * 4096]
            finally:
                s = p.stats()
                print("restarts", s.restarts, flush=True)
    """)
    assert "page 6 6" in out
    assert rc == -signal.SIGBUS, err
    died = err.count("waking blocked threads and restarting it in")
    assert died == 3, err  # retries=2: the third death condemns the page
    assert "exited with status 3 while reading offset 0x7000..+4096 of Misbehaving" in err
    assert "restarting it in 0.05 s" in err and "restarting it in 0.10 s" in err
    assert "killed or hung the pager worker 3 times" in err


def test_a_page_that_crashes_a_batch_of_a_working_set_is_found_and_poisoned_alone(
        tmp_path: Path) -> None:
    """A scattered working set is read 64 runs to a read_many: a crash in one page of such a
    batch is blamed on the batch's whole span, and from then on the engine reads one run at a
    time: the set's other 39 pages read right, and the bad page, once touched, is found,
    condemned alone and gets SIGBUS. (Blaming only the batch's first run's offset for its
    total length never found it: the worker was restarted until the pager gave up.)"""
    ws = tmp_path / "scattered.uws"
    rc, out, err = child(f"""
        import random
        import userfault
        from py_sources import Misbehaving
        from test_failures import data
        from userfault.working_set import WorkingSet, write_working_set
        if __name__ == "__main__":
            body = data()
            order = random.Random(5).sample(range(0, len(body) // 4096, 5), 40)
            bad = order[20]
            write_working_set({str(ws)!r}, WorkingSet(tuple(i * 4096 for i in order), 4096,
                                                     source_size=len(body)))
            p = userfault.map(Misbehaving(body, [bad * 4096], "crash"), readahead=False,
                              prefetch={str(ws)!r}, force_prefetch=True, retries=2,
                              max_restarts=6)
            v = memoryview(p)
            ok = sum(v[i * 4096] == body[i * 4096] for i in order if i != bad)
            print("others right", ok, "bad", hex(bad * 4096), flush=True)
            v[bad * 4096]  # SIGBUS, once the page is condemned
    """)
    assert rc == -signal.SIGBUS, err
    assert "others right 39 bad " in out, (out, err)
    bad = out.split("bad ")[1].split()[0]
    assert f"offset {bad}..+4096 of Misbehaving(crash, bad=[{int(bad, 16)}]) killed or hung " \
           "the pager worker 3 times" in err, err
    assert "giving up" not in err


def test_a_worker_that_keeps_dying_is_given_up() -> None:
    rc, _, err = child("""
        import userfault
        from py_sources import Misbehaving
        from test_failures import data
        if __name__ == "__main__":
            bad = [i * 4096 for i in range(256)]
            p = userfault.map(Misbehaving(data(), bad, "crash"), readahead=False, retries=100,
                              max_restarts=3)
            v = memoryview(p)
            v[0]
    """)
    assert rc == -signal.SIGBUS, err
    assert "the pager worker died 4 times in a row" in err and "giving up" in err
    assert err.count("waking blocked threads and restarting it in") == 3


def test_a_killed_supervisor_leaves_sigbus_not_a_hang() -> None:
    rc, out, err = child("""
        import os, signal, userfault
        from py_sources import PyBytes
        from test_failures import data
        if __name__ == "__main__":
            p = userfault.map(PyBytes(data()), readahead=False)
            v = memoryview(p)
            print("page 1", v[4096], flush=True)
            os.kill(p._runtime.proc.pid, signal.SIGKILL)
            p._runtime.proc.wait()
            print("killed", flush=True)
            print(v[9 * 4096], flush=True)
    """)
    assert "page 1 1" in out and "killed" in out
    assert rc == -signal.SIGBUS, err
    assert "userfault: the pager process (pid" in err and "died: faults on pages not loaded " \
           "yet get SIGBUS from now on" in err
    assert "poisoned 0x" in err and "the pager process serving it died" in err


def test_a_fault_blocked_when_the_supervisor_dies_gets_sigbus() -> None:
    rc, _, err = child("""
        import subprocess, userfault
        from py_sources import Misbehaving
        from test_failures import data
        if __name__ == "__main__":
            p = userfault.map(Misbehaving(data(), [4096], "hang"), readahead=False)
            # a killer outside this process: the fault below holds the GIL while it waits
            subprocess.Popen(["sh", "-c", f"sleep 0.5; kill -9 {p._runtime.proc.pid}"])
            memoryview(p)[4096]
    """)
    assert rc == -signal.SIGBUS, err
    assert "the pager process (pid" in err


def test_a_fault_blocked_in_moved_memory_when_the_supervisor_dies_gets_sigbus() -> None:
    """The process moved a page (mremap) and faulted there; the worker took the fault and
    its read hangs; then the supervisor is killed. The standby engine knows only the first
    areas, where that thread no longer is: it must be woken anyway (a wake of every
    address), fault again, and get SIGBUS, not hang."""
    rc, out, err = child("""
        import ctypes, mmap, subprocess, userfault
        from userfault import _native
        from py_sources import Misbehaving
        from test_failures import data
        if __name__ == "__main__":
            page = 4096
            p = userfault.map(Misbehaving(data(), [200 * page], "hang"), readahead=False)
            new, e = _native.mmap(0, page, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
            assert e == 0
            assert _native.mremap(p.address + 200 * page, page, page, 3, new) == (new, 0)
            # a killer outside this process: the fault below holds the GIL while it waits
            subprocess.Popen(["sh", "-c", f"sleep 0.5; kill -9 {p._runtime.proc.pid}"])
            print("touching", flush=True)
            print("read", ctypes.c_char.from_address(new).value, flush=True)
    """, timeout=40)
    assert "touching" in out and "read" not in out, (out, err)
    assert rc == -signal.SIGBUS, (out, err)
    assert "the pager process (pid" in err


# -- on_error -------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["native", "process"])
def test_on_error_zero_is_explicit_and_still_reported(tmp_path: Path, runtime: str) -> None:
    path = tmp_path / "shrinks.bin"
    path.write_bytes(data(2 * MiB))
    src = userfault.FileSource(path) if runtime == "native" else PyFile(str(path))
    with userfault.map(src, readahead=False, on_error="zero", retries=0) as p:
        os.truncate(path, MiB)
        with memoryview(p) as v:
            assert v[MiB:MiB + PAGE] == bytes(PAGE)
        assert settled(p, lambda s: s.zeroed == 1).zeroed == 1  # counted after the wake
        with pytest.raises(PagerError, match="served as zeros"):
            p.check()
    if runtime == "native":
        src.close()


def test_log_lines_are_rate_limited() -> None:
    rc, out, err = child("""
        import userfault
        from py_sources import Misbehaving
        from test_failures import data
        if __name__ == "__main__":
            bad = [i * 4096 for i in range(0, 256, 2)]            # 128 separate bad pages
            p = userfault.map(Misbehaving(data(), bad, "raise"), readahead=False, retries=0)
            try:
                p.prefetch([(0, 256 * 4096)])
            except userfault.PrefetchError as e:
                print("poisoned", e.poisoned_bytes // 4096, flush=True)
            print("suppressed", p.stats().log_suppressed > 0, flush=True)
    """)
    assert rc == 0, err
    assert "poisoned 128" in out and "suppressed True" in out
    assert 20 <= err.count("userfault: poisoned") < 128, err  # a burst of 20, then 5 a second


def test_python_sources_get_the_missing_runs_of_a_range_in_one_call(tmp_path: Path) -> None:
    log = tmp_path / "calls"
    body = data()
    with userfault.map(PyBatched(body, str(log)), readahead=False) as p:
        assert p.prefetch([(2 * PAGE, PAGE), (5 * PAGE, PAGE)]) == 2 * PAGE  # read_into each
        assert not log.exists()
        assert p.prefetch([(0, 8 * PAGE)]) == 6 * PAGE  # the three holes: one read_many
        with memoryview(p) as v:
            assert v[:8 * PAGE] == body[:8 * PAGE]
    assert log.read_text().splitlines() == [f"0+{2 * PAGE} {3 * PAGE}+{2 * PAGE} "
                                            f"{6 * PAGE}+{2 * PAGE}"]
