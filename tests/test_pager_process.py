"""The pager-process runtime against real sources, real servers and real failures.

The faulting thread here holds the GIL (``bytes(memoryview(pager))``, indexing): only a
separate pager process can serve it. Failures are caused for real: nginx and Redis are
stopped or killed, the pager worker is SIGKILLed.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import userfault
from pager_helpers import run_script, settled
from py_sources import SlowPieces
from userfault.errors import PagerError
from userfault.sources.http import HTTPSource
from userfault.sources.redis import RedisSource, upload
from userfault.sources.snapshot import SnapshotSource, create_snapshot

PAGE = userfault.PAGE_SIZE
pytestmark = pytest.mark.timeout(60)


def _data(size: int, seed: int = 1) -> bytes:
    """Data that differs on every page, so a misplaced page is caught."""
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest() * 128
        i += 1
    return bytes(out[:size])


@pytest.fixture
def snapshot_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = _data(8 << 20) + bytes(3 << 20) + _data(1 << 20, 2)[:12345]
    path = tmp_path / "data.ufs"
    create_snapshot(data, path, chunk_size=64 << 10)
    return path, data


def test_snapshot_served_while_the_faulting_thread_holds_the_gil(
        snapshot_file: tuple[Path, bytes]) -> None:
    path, data = snapshot_file
    with userfault.Pager(SnapshotSource(path), log_faults=64) as pager:
        assert pager.runtime == "process"
        view = memoryview(pager)
        assert bytes(view[:len(data)]) == data  # one GIL-holding memcpy over every page
        assert bytes(view[len(data):]) == bytes(pager.size - len(data))  # tail page padding
        view.release()
        installed = settled(pager, lambda s: s.bytes_installed >= pager.size).bytes_installed
        assert installed == pager.size
        stats = pager.stats()
        assert stats.faults > 0
        assert stats.readahead_bytes > 0  # sequential: the window grew
        assert sum(stats.latency_histogram) == stats.faults
        records = pager.faults()
        assert records and records[0].offset == 0
        assert records[0].thread_id == __import__("threading").get_native_id()


@pytest.mark.parametrize("fail", [False, True], ids=["piece-served", "piece-failed"])
def test_faults_inside_a_readahead_piece_being_read_are_served(fail: bool) -> None:
    """A fault in a readahead piece another thread is reading waits for that piece; if the
    piece fails, the fault is served on its own. Either way every byte is right."""
    data = _data(4 << 20)
    source = SlowPieces(data, delay=0.05, fail=fail)
    with userfault.Pager(source, readahead=(64 << 10, 1 << 20), piece=256 << 10) as pager:
        view = memoryview(pager)
        assert bytes(view) == data  # sequential, while the pieces ahead are still being read
        view.release()
        stats = pager.stats()
        assert stats.poisoned == 0
        pager.check()  # no serving error recorded


def test_random_access_faults_once_per_page_without_readahead(
        snapshot_file: tuple[Path, bytes]) -> None:
    path, data = snapshot_file
    import random

    pages = list(range(len(data) // PAGE))
    random.Random(7).shuffle(pages)
    with userfault.Pager(SnapshotSource(path), readahead=False) as pager:
        view = memoryview(pager)
        for p in pages[:500]:
            assert view[p * PAGE + 100] == data[p * PAGE + 100]
        view.release()
        assert settled(pager, lambda s: s.faults >= 500).faults == 500
        assert pager.stats().readahead_bytes == 0


def test_prefetch_installs_in_one_batch(snapshot_file: tuple[Path, bytes]) -> None:
    path, data = snapshot_file
    with userfault.Pager(SnapshotSource(path), readahead=False) as pager:
        done = pager.prefetch([(0, 1 << 20), (4 << 20, 64 << 10)])
        assert done == (1 << 20) + (64 << 10)
        view = memoryview(pager)
        assert bytes(view[:1 << 20]) == data[:1 << 20]
        assert bytes(view[4 << 20:(4 << 20) + (64 << 10)]) == data[4 << 20:(4 << 20) + (64 << 10)]
        view.release()
        stats = pager.stats()
        assert stats.faults == 0
        assert stats.prefetch_bytes == done
        with pytest.raises(ValueError, match="outside"):
            pager.prefetch([(pager.size, PAGE)])


def test_populate_fills_everything_in_the_background(snapshot_file: tuple[Path, bytes]) -> None:
    path, data = snapshot_file
    with userfault.Pager(SnapshotSource(path), populate=True) as pager:
        deadline = time.monotonic() + 30
        while pager.stats().bytes_installed < pager.size and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pager.stats().populate_bytes > 0
        assert pager.stats().bytes_installed == pager.size
        view = memoryview(pager)
        assert bytes(view[:len(data)]) == data
        view.release()


def _thread_names(pid: int) -> list[str]:
    return sorted(Path(f"/proc/{pid}/task/{t}/comm").read_text().strip()
                  for t in os.listdir(f"/proc/{pid}/task"))


def test_the_pager_process_and_its_threads_are_named_for_ps_and_perf(
        snapshot_file: tuple[Path, bytes]) -> None:
    path, data = snapshot_file
    with userfault.Pager(SnapshotSource(path), max_resident=1 << 20) as pager:
        assert bytes(memoryview(pager)[:PAGE]) == data[:PAGE]
        supervisor = pager._runtime.proc.pid  # type: ignore[union-attr]
        assert _thread_names(supervisor) == ["uf-pager"]
        worker = int(Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()[0])
        names = _thread_names(worker)
        assert {"uf-fault", "uf-background", "uf-evictor"} <= set(names), names
        assert "uf-watchdog" in _thread_names(os.getpid())  # the owner's eye on the process


def test_http_source_through_nginx(nginx_server: object, tmp_path: Path) -> None:
    data = _data(6 << 20, 3)
    (Path(nginx_server.directory) / "mem.bin").write_bytes(data)  # type: ignore[attr-defined]
    url = nginx_server.url("mem.bin")  # type: ignore[attr-defined]
    with userfault.map(HTTPSource(url), threads=2) as pager:
        view = memoryview(pager)
        assert view[5 << 20] == data[5 << 20]  # a random first touch
        assert bytes(view[:len(data)]) == data
        view.release()
        assert pager.stats().faults >= 2


def test_redis_source_through_redis_server(redis_server: object) -> None:
    data = _data(3 << 20, 4) + bytes(1 << 20) + b"tail"
    url = redis_server.url  # type: ignore[attr-defined]
    upload(data, url, prefix="proc:")
    with userfault.map(RedisSource(url, prefix="proc:")) as pager:
        view = memoryview(pager)
        assert bytes(view[:len(data)]) == data
        view.release()


def test_python_source_must_be_picklable() -> None:
    class Local:  # defined in a function: the pager process cannot import it
        size = PAGE

        def read_into(self, offset: int, buf: memoryview) -> None:
            buf[:] = bytes(len(buf))

    with pytest.raises(PagerError, match="cannot be sent to the pager process"):
        userfault.Pager(Local())
    with pytest.raises(ValueError, match="runtime='process'"):
        userfault.Pager(Local(), runtime="native")
    with pytest.raises(ValueError, match="on_error"):
        userfault.Pager(Local(), on_error="ignore")


# -- failures, caused for real --------------------------------------------------------------

_TOUCH_AFTER_SIGNAL = """
    import sys, userfault
    from userfault.sources.http import HTTPSource
    pager = userfault.Pager(HTTPSource(sys.argv[1] if len(sys.argv) > 1 else {url!r}),
                            readahead=False, retries=2, on_error={on_error!r})
    view = memoryview(pager)
    first = view[0]
    print("ready", first, flush=True)
    sys.stdin.readline()                    # the test stops nginx now
    value = view[{far}]                     # served after retries, or poisoned
    print("read", value, flush=True)
    pager.check()
"""


def _touch_after_outage(url: str, on_error: str, far: int, during_outage: object
                        ) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(_TOUCH_AFTER_SIGNAL.format(url=url, on_error=on_error, far=far))
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().startswith("ready")
        during_outage()  # type: ignore[operator]
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_unreachable_server_poisons_the_page_never_zeros(fresh_servers: object) -> None:
    nginx = fresh_servers.nginx()  # type: ignore[attr-defined]
    data = _data(1 << 20, 5)
    (Path(nginx.directory) / "m.bin").write_bytes(data)
    result = _touch_after_outage(nginx.url("m.bin"), "poison", 700 * 1024, nginx.stop)
    assert result.returncode == -signal.SIGBUS, result.stderr
    assert "read" not in result.stdout  # the access never returned a value
    # logged before the SIGBUS: which page, which source, why
    assert "userfault: poisoned 0x" in result.stderr
    assert "(offset 0xaf000 of HTTPSource('http://127.0.0.1:" in result.stderr
    assert "after 2 retries: SourceError: HTTP" in result.stderr
    assert "connection refused (is the server running?)" in result.stderr


def test_on_error_zero_is_explicit(fresh_servers: object) -> None:
    nginx = fresh_servers.nginx()  # type: ignore[attr-defined]
    (Path(nginx.directory) / "m.bin").write_bytes(_data(1 << 20, 6))
    result = _touch_after_outage(nginx.url("m.bin"), "zero", 700 * 1024, nginx.stop)
    assert "read 0" in result.stdout
    assert "serving zeros" in result.stderr
    assert result.returncode == 1 and "PagerError" in result.stderr  # check() still reports it


def test_on_error_retry_waits_for_the_server_to_come_back(fresh_servers: object) -> None:
    nginx = fresh_servers.nginx()  # type: ignore[attr-defined]
    data = _data(1 << 20, 7)
    (Path(nginx.directory) / "m.bin").write_bytes(data)

    def outage() -> None:
        nginx.stop()
        import threading

        threading.Timer(1.0, nginx.start).start()  # back after a second, same port

    result = _touch_after_outage(nginx.url("m.bin"), "retry", 700 * 1024, outage)
    assert result.returncode == 0, result.stderr
    assert f"read {data[700 * 1024]}" in result.stdout
    assert "retry" in result.stderr


def test_killed_redis_poisons(fresh_servers: object) -> None:
    redis = fresh_servers.redis()  # type: ignore[attr-defined]
    upload(_data(1 << 20, 8), redis.url, prefix="k:")
    script = f"""
        import sys, userfault
        from userfault.sources.redis import RedisSource
        pager = userfault.Pager(RedisSource({redis.url!r}, prefix="k:", timeout=1.0),
                                readahead=False, retries=1)
        view = memoryview(pager)
        print("ready", view[0], flush=True)
        sys.stdin.readline()
        print("read", view[900 * 1024], flush=True)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().startswith("ready")
        redis.kill()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGBUS, err
    assert "read" not in out and "poisoned" in err


def test_killed_pager_worker_is_replaced_and_the_workload_completes(tmp_path: Path) -> None:
    data = _data(96 << 20, 9)
    path = tmp_path / "big.ufs"
    create_snapshot(data, path, chunk_size=64 << 10, level=1)
    digest = hashlib.sha256(data).hexdigest()
    script = f"""
        import hashlib, subprocess, sys, userfault
        from userfault.sources.snapshot import SnapshotSource
        pager = userfault.Pager(SnapshotSource({str(path)!r}), readahead=False)
        sup = pager._runtime.proc.pid
        worker = subprocess.run(["pgrep", "-P", str(sup)], capture_output=True,
                                text=True).stdout.split()[0]
        view = memoryview(pager)
        h = hashlib.sha256()
        for off in range(0, {len(data)}, 4096):
            if off == 1000 * 4096:
                # A killer outside this process, armed a thousand pages in: it strikes while
                # this thread faults (holding the GIL) on the pages that follow.
                subprocess.Popen(["sh", "-c", "sleep 0.05; kill -9 " + worker])
            h.update(view[off:off + 4096])     # one fault per page, GIL held throughout
        print(h.hexdigest(), pager.stats().restarts, pager.stats().faults)
    """
    result = run_script(script, timeout=60)
    assert result.returncode == 0, result.stderr
    got, restarts, _faults = result.stdout.split()
    assert got == digest
    assert int(restarts) >= 1, "the worker was not killed mid-run; make the workload longer"
    assert "was killed by SIGKILL" in result.stderr
    assert "waking blocked threads and restarting it" in result.stderr


def test_pager_process_exits_with_its_parent(snapshot_file: tuple[Path, bytes]) -> None:
    path, _ = snapshot_file
    script = f"""
        import os, userfault
        from userfault.sources.snapshot import SnapshotSource
        pager = userfault.Pager(SnapshotSource({str(path)!r}))
        print(pager._runtime.proc.pid, flush=True)
        os._exit(0)                              # no close, no atexit
    """
    result = run_script(script, timeout=60)
    pid = int(result.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # an exited child of the dead parent is reaped by init; a live one still answers
        time.sleep(0.05)
    pytest.fail(f"pager process {pid} outlived its parent")


def test_a_pager_outlives_the_thread_that_created_it(snapshot_file: tuple[Path, bytes]) -> None:
    # PR_SET_PDEATHSIG would kill the pager process when this thread ends; it must not.
    path, data = snapshot_file
    made: list[userfault.Pager] = []
    t = threading.Thread(target=lambda: made.append(userfault.Pager(SnapshotSource(path))))
    t.start()
    t.join()
    with made[0] as pager:
        time.sleep(0.2)  # give a wrongly killed supervisor time to die
        assert pager._runtime.error() is None
        view = memoryview(pager)
        assert bytes(view[3 << 20:(3 << 20) + 4096]) == data[3 << 20:(3 << 20) + 4096]
        view.release()


def test_no_process_fd_or_thread_leak(snapshot_file: tuple[Path, bytes]) -> None:
    path, data = snapshot_file

    def count() -> tuple[int, int]:
        return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))

    before = count()
    for _ in range(5):
        source = SnapshotSource(path)  # ours to close: the pager closes only what it made
        try:
            with userfault.Pager(source) as pager:
                view = memoryview(pager)
                assert view[123] == data[123]
                view.release()
                proc = pager._runtime.proc
        finally:
            source.close()
        assert proc is not None and proc.returncode == 0
    assert count() == before
