"""Progress bars of real pagers: populate, a working set, ``prefetch()``, in both runtimes.

The bars go to ``sys.stderr``, replaced here by a stream that is not a terminal (so a forced
bar is the plain one) or that says it is one. Only what is deterministic is asserted: the last
frame (100 % once the work is done), the end of the line, and what is drawn at all.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import userfault
from pager_helpers import PAGE, page_data, wait_until
from py_sources import PyFile, SlowPieces

SIZE = 16 << 20


class Tty(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@contextlib.contextmanager
def captured(out: io.StringIO | None = None) -> Iterator[io.StringIO]:
    """``sys.stderr`` replaced by ``out`` (a non-terminal by default); in the test's body, as
    pytest's capture sets its own between a fixture's setup and the call."""
    out = io.StringIO() if out is None else out
    with contextlib.redirect_stderr(out):
        yield out


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(page_data(SIZE))
    return path


def source(runtime: str, path: Path) -> object:
    """The file as a native source, or as a Python one served by the pager process."""
    return str(path) if runtime == "native" else PyFile(str(path))


def ended(out: io.StringIO) -> bool:
    return out.getvalue().endswith("\n")


def last_frame(out: io.StringIO) -> str:
    return out.getvalue().split("\r")[-1]


def bar_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "userfault-progress"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("runtime", ["native", "process"])
def test_populate_bar_reaches_100_percent(runtime: str, data_file: Path) -> None:
    with captured() as err, userfault.map(source(runtime, data_file), populate=True,
                                          readahead=False, progress=True) as p:
        assert wait_until(lambda: ended(err), timeout=30), err.getvalue()
        frame = last_frame(err)
        assert frame.startswith("[" + "#" * 30 + "] 100.0%") and "populating" in frame
        assert bytes(memoryview(p)) == data_file.read_bytes()
    assert err.getvalue().count("\n") == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("runtime", ["native", "process"])
def test_working_set_bar_reaches_100_percent(runtime: str, data_file: Path,
                                             tmp_path: Path) -> None:
    ws = tmp_path / "ws.uws"
    with captured() as err:
        with userfault.map(source(runtime, data_file), readahead=False, record=ws) as p:
            view = memoryview(p)
            for off in range(0, SIZE, 4 * PAGE):
                view[off]
            view.release()
        with userfault.map(source(runtime, data_file), readahead=False, prefetch=ws,
                           progress=True) as p:
            view = memoryview(p)
            view[0]  # the first fault starts the working set
            assert wait_until(lambda: ended(err), timeout=30), err.getvalue()
            frame = last_frame(err)
            assert "100.0%" in frame and "working set" in frame
            assert bytes(view) == data_file.read_bytes()
            view.release()
    assert err.getvalue().count("\n") == 1  # the recording pager drew nothing


@pytest.mark.timeout(60)
@pytest.mark.parametrize("runtime", ["native", "process"])
def test_prefetch_call_draws_to_100_percent(runtime: str, data_file: Path) -> None:
    with captured() as err, userfault.map(source(runtime, data_file), readahead=False,
                                          progress=True) as p:
        view = memoryview(p)
        view[5 * PAGE]  # present pages count as done too
        assert p.prefetch([(0, SIZE // 2), (SIZE // 2 + 100, 5000)]) > 0
        frame = last_frame(err)  # ended when prefetch returned
        assert "100.0%" in frame and "prefetching" in frame and frame.endswith("\n")
        assert bytes(view) == data_file.read_bytes()
        view.release()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("runtime", ["native", "process"])
def test_a_prefetch_stopped_by_the_budget_ends_its_bar_where_it_stopped(runtime: str,
                                                                        data_file: Path) -> None:
    with captured() as err, userfault.map(source(runtime, data_file), readahead=False,
                                          max_resident="4M", progress=True) as p:
        assert 0 < p.prefetch() <= 4 << 20  # ended when prefetch returned
        frame = last_frame(err)
        assert "prefetching" in frame and "100.0%" not in frame, frame
        assert bytes(memoryview(p)) == data_file.read_bytes()


@pytest.mark.timeout(60)
def test_a_populate_stopped_by_the_budget_ends_its_bar(data_file: Path) -> None:
    with captured() as err, userfault.map(str(data_file), populate=True, readahead=False,
                                          max_resident="4M", progress=True) as p:
        assert wait_until(lambda: ended(err), timeout=30), err.getvalue()
        assert "populating" in last_frame(err) and "100.0%" not in last_frame(err)
        assert bytes(memoryview(p)) == data_file.read_bytes()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("runtime", ["native", "process"])
def test_not_a_terminal_draws_nothing(runtime: str, data_file: Path) -> None:
    with captured() as err, userfault.map(source(runtime, data_file), populate=True,
                                          readahead=False) as p:
        assert wait_until(lambda: p.stats().populate_bytes == SIZE, timeout=30)
        p.prefetch()
        assert bytes(memoryview(p)[:PAGE]) == data_file.read_bytes()[:PAGE]
    assert err.getvalue() == ""


@pytest.mark.timeout(60)
def test_on_a_terminal_only_work_of_64_mib_draws(tmp_path: Path) -> None:
    small, big = tmp_path / "small.bin", tmp_path / "big.bin"
    small.write_bytes(page_data(SIZE))
    big.write_bytes(page_data(64 << 20))
    with captured(Tty()) as err:
        with userfault.map(str(small), populate=True, readahead=False) as p:
            assert wait_until(lambda: p.stats().populate_bytes == SIZE, timeout=30)
            p.prefetch()
        assert err.getvalue() == ""
        with userfault.map(str(big), readahead=False, progress=False) as p:
            p.prefetch()
        assert err.getvalue() == ""
        with userfault.map(str(big), readahead=False) as p:
            p.prefetch()
        assert "prefetching" in err.getvalue()  # whichever backend a terminal gets


@pytest.mark.timeout(60)
def test_closing_mid_populate_ends_the_bar() -> None:
    body = page_data(SIZE)
    with captured() as err:
        p = userfault.map(SlowPieces(body, 0.2, False), populate=True, readahead=False,
                          progress=True)
        try:
            assert wait_until(lambda: "populating" in err.getvalue(), timeout=30)
            assert bytes(memoryview(p)[:PAGE]) == body[:PAGE]
        finally:
            p.close()
        assert wait_until(lambda: not bar_threads(), timeout=5)
    assert "100.0%" not in last_frame(err) and ended(err)


@pytest.mark.timeout(60)
def test_a_dead_pager_process_ends_the_bar() -> None:
    with captured() as err:
        p = userfault.map(SlowPieces(page_data(SIZE), 0.2, False), populate=True,
                          readahead=False, progress=True)
        try:
            assert wait_until(lambda: "populating" in err.getvalue(), timeout=30)
            os.kill(p._runtime.proc.pid, signal.SIGKILL)
            assert wait_until(lambda: not bar_threads(), timeout=10)
            assert ended(err) and "100.0%" not in last_frame(err)
        finally:
            p.close()
