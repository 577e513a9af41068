"""Python page sources for the tests: importable by name, so a pager process can rebuild them.

``PyBytes`` serves a byte string like ``BufferSource`` does, but as a Python source: the same
workload then runs through the native runtime and through the pager process. The others
misbehave on purpose, on the pages a test names; where a misbehaviour must stop at some point,
a marker file (shared across processes) says when.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

PAGE = 4096


class PyBytes:
    """``data`` (zeros past its end), as a Python source with ``read_into`` only."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def size(self) -> int:
        return len(self.data)

    def read_into(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        part = self.data[offset:offset + n]
        buf[:len(part)] = part
        buf[len(part):] = bytes(n - len(part))

    def __repr__(self) -> str:
        return f"PyBytes({len(self.data)} bytes)"


class PyBatched(PyBytes):
    """:class:`PyBytes` with ``read_many``, counting its calls in a file (one line each)."""

    def __init__(self, data: bytes, log: str) -> None:
        super().__init__(data)
        self.log = log

    def read_many(self, requests: Sequence[tuple[int, memoryview]]) -> None:
        with open(self.log, "a") as f:
            f.write(" ".join(f"{o}+{len(b)}" for o, b in requests) + "\n")
        for offset, buf in requests:
            self.read_into(offset, buf)


class BatchFails(PyBytes):
    """``read_many`` always fails; ``read_into`` fails on the pages in ``bad`` only."""

    def __init__(self, data: bytes, bad: Sequence[int]) -> None:
        super().__init__(data)
        self.bad = set(bad)

    def read_many(self, requests: Sequence[tuple[int, memoryview]]) -> None:
        raise ConnectionError(f"the batch of {len(requests)} failed")

    def read_into(self, offset: int, buf: memoryview) -> None:
        if any(offset <= b < offset + len(buf) for b in self.bad):
            raise OSError(f"page {offset:#x} is bad")
        super().read_into(offset, buf)


class SlowPieces(PyBytes):
    """Reads of more than one page (readahead pieces) take ``delay`` seconds, then fail if
    ``fail``; reads of one page (faults) are served at once."""

    def __init__(self, data: bytes, delay: float, fail: bool) -> None:
        super().__init__(data)
        self.delay = delay
        self.fail = fail

    def read_into(self, offset: int, buf: memoryview) -> None:
        if len(buf) > PAGE:
            time.sleep(self.delay)
            if self.fail:
                raise ConnectionError(f"the piece at {offset}+{len(buf)} failed")
        super().read_into(offset, buf)


class Gated(PyBytes):
    """Reads touching ``[lo, hi)`` wait (30 s at most) until the file ``gate`` exists; each
    such read writes a line to ``gate.held`` when it begins and to ``gate.done`` when it
    ends, so that a test can hold background reads across what it does meanwhile."""

    def __init__(self, data: bytes, lo: int, hi: int, gate: str) -> None:
        super().__init__(data)
        self.lo, self.hi, self.gate = lo, hi, gate

    def read_into(self, offset: int, buf: memoryview) -> None:
        held = offset < self.hi and offset + len(buf) > self.lo
        if held:
            with open(self.gate + ".held", "a") as f:
                f.write(f"{offset}+{len(buf)}\n")
            end = time.monotonic() + 30
            while not os.path.exists(self.gate) and time.monotonic() < end:
                time.sleep(0.01)
        super().read_into(offset, buf)
        if held:
            with open(self.gate + ".done", "a") as f:
                f.write(f"{offset}+{len(buf)}\n")


class Misbehaving(PyBytes):
    """:class:`PyBytes` except on the pages in ``bad`` (source offsets of pages).

    ``how``: ``"raise"`` (an exception), ``"timeout"`` (after 50 ms, an error raised from a
    :class:`TimeoutError`, as a network source's), ``"short"`` (returns fewer bytes than
    asked, having written only that many), ``"keep"`` (keeps the buffer it was given),
    ``"keep-drop"`` (keeps it until its next read, which lets it go first), ``"hang"`` (sleeps
    for an hour), ``"crash"`` (the process exits at once), ``"crash-once"`` (creates ``until``,
    then exits: the next read is fine). The bad pages misbehave until the file ``until``
    exists (always, without one); create it and they read normally.
    """

    kept: list[memoryview] = []

    def __init__(self, data: bytes, bad: Sequence[int], how: str, until: str = "") -> None:
        super().__init__(data)
        self.bad = set(bad)
        self.how = how
        self.until = until

    def _bad(self, offset: int, n: int) -> bool:
        if self.until and os.path.exists(self.until):
            return False
        return any(offset <= b < offset + n for b in self.bad)

    def read_into(self, offset: int, buf: memoryview) -> int | None:
        if self.how == "keep-drop":
            Misbehaving.kept.clear()  # the buffer kept last time is freed now
        if not self._bad(offset, len(buf)):
            super().read_into(offset, buf)
            return None
        if self.how == "raise":
            raise OSError(f"injected failure at {offset:#x}")
        if self.how == "timeout":
            time.sleep(0.05)
            raise OSError(f"reading {offset:#x} failed") from TimeoutError("timed out")
        if self.how == "short":
            half = len(buf) // 2
            buf[:half] = self.data[offset:offset + half]
            return half
        if self.how in ("keep", "keep-drop"):
            super().read_into(offset, buf)
            Misbehaving.kept.append(buf)
            return None
        if self.how == "hang":
            time.sleep(3600)
        if self.how == "crash-once":
            open(self.until, "w").close()
        if self.how in ("crash", "crash-once"):
            os._exit(3)
        raise ValueError(f"unknown misbehaviour {self.how!r}")

    def __repr__(self) -> str:
        return f"Misbehaving({self.how}, bad={sorted(self.bad)})"


class PyFile:
    """A file read with pread, as a Python source (a short file is a short read)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._size = os.path.getsize(path)

    @property
    def size(self) -> int:
        return self._size

    def read_into(self, offset: int, buf: memoryview) -> int:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.readinto(buf)


class PyFileRW(PyFile):
    """:class:`PyFile` that can be written: a writable Python source (``write_from``), and a
    ``flush`` that makes the writes durable."""

    def write_from(self, offset: int, data: memoryview) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def flush(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class FlushFails(PyFileRW):
    """:class:`PyFileRW` whose ``flush`` (making writes durable) fails until ``until``
    exists."""

    def __init__(self, path: str, until: str) -> None:
        super().__init__(path)
        self.until = until

    def flush(self) -> None:
        if not os.path.exists(self.until):
            raise OSError("the disk is gone (injected)")
        super().flush()
