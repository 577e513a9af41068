"""The man-page demo, and the GIL test: a thread holding the GIL faults and still finishes."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(40)


def run(code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)


def test_demo_command_output() -> None:
    proc = subprocess.run([sys.executable, "-m", "userfault", "demo", "--pages", "3",
                           "--delay", "0"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    base = int(re.search(r"^Address returned by mmap\(\) = (0x[0-9a-f]+)$", out, re.M)[1], 16)
    reads = re.findall(r"^Read address (0x[0-9a-f]+) in main\(\): (\w)$", out, re.M)
    assert "".join(letter for _, letter in reads) == "AAAABBBBCCCC"
    assert [int(a, 16) - base for a, _ in reads] == [0xF + 1024 * i for i in range(12)]
    faults = re.findall(r"^    UFFD_EVENT_PAGEFAULT event: flags = 0; address = ([0-9a-f]+)$",
                        out, re.M)
    assert [int(a, 16) - base for a in faults] == [0, 4096, 8192]  # page addresses
    assert out.count("(uffdio_copy.copy returned 4096)") == 3
    assert re.search(r"^3 faults served by the native engine", out, re.M)


def test_run_demo_returns_the_letters(child) -> None:
    def body(wfd: int) -> None:
        from userfault.demo import run_demo

        out = io.StringIO()
        os.write(wfd, run_demo(3, delay=0, out=out).encode())

    status, data = child(body, timeout=20)
    assert os.waitstatus_to_exitcode(status) == 0, data
    assert data == b"AAAABBBBCCCC"
    with pytest.raises(ValueError, match="at least one page, not 0"):
        from userfault.demo import run_demo

        run_demo(0)


def test_a_thread_holding_the_gil_touches_every_page() -> None:
    """THE key test: the engine serves faults without the faulting thread's GIL."""
    proc = run("""
        import threading
        from userfault import PAGE_SIZE, CyclingSource, Pager, _native
        pages = 64
        with Pager(CyclingSource(pages * PAGE_SIZE), chunk=PAGE_SIZE, readahead=False) as p:
            result = []
            t = threading.Thread(target=lambda: result.append(
                _native.touch(p.address, p.size, PAGE_SIZE, 0, 0, True)))  # hold_gil=True
            t.start()
            t.join(20)
            assert not t.is_alive(), "deadlock"
            view = memoryview(p)
            letters = bytes(view[i * PAGE_SIZE] for i in range(pages))  # pure-Python indexing
            view.release()
            print(result[0], letters.decode(), p.stats().faults)
    """)
    assert proc.returncode == 0, proc.stderr
    total, letters, faults = proc.stdout.split()
    alphabet = "ABCDEFGHIJKLMNOPQRST"
    assert letters == "".join(alphabet[i % 20] for i in range(64))
    assert int(total) == sum(map(ord, letters)) and int(faults) == 64


def test_pure_python_indexing_of_a_fresh_pager() -> None:
    proc = run("""
        from userfault import PAGE_SIZE, CyclingSource, Pager
        with Pager(CyclingSource(8 * PAGE_SIZE), chunk=PAGE_SIZE, readahead=False) as p:
            v = memoryview(p)
            print(bytes(v[i * PAGE_SIZE + 5] for i in range(8)).decode())
            v.release()
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ABCDEFGH"
