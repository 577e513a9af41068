"""Counters and a fault log in shared memory, written by servers, read by anyone.

The pager process writes them; the faulting process reads them with no round trip, so
``Pager.stats()`` costs the same whatever the runtime. Each writing thread owns a *slot* of
counters that it keeps in Python ints and flushes with one ``pack_into`` (no locks, no
read-modify-write on the fault path); readers sum the slots. The layout is private.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from typing import Any

__all__ = ["COUNTER_NAMES", "HIST_BUCKETS", "RECORD", "CounterSlot", "SharedState"]

COUNTER_NAMES = (
    "faults", "write_faults", "minor_faults", "wp_faults", "bytes_installed", "fault_bytes",
    "readahead_bytes", "populate_bytes", "prefetch_bytes", "eexist", "eagain", "poisoned",
    "remove_events", "unmap_events", "remap_events", "fork_events", "service_ns",
    "service_max_ns", "errors", "retries", "restarts",
)
HIST_BUCKETS = 40
SLOTS = 66  # the supervisor, the helpers, and up to 64 serving threads
RECORD = struct.Struct("<6Q")  # address, source offset, flags, thread id, time ns, service ns
INDEX = {name: i for i, name in enumerate(COUNTER_NAMES)}
HIST_AT = len(COUNTER_NAMES)
_ERROR_BYTES = 1024
_U64 = struct.Struct("<Q")
_COUNTERS = struct.Struct(f"<{len(COUNTER_NAMES) + HIST_BUCKETS}Q")
_LOG_HEAD = struct.Struct("<QQQ")  # capacity, written, read
_MAX_AT = INDEX["service_max_ns"]


class CounterSlot:
    """One writer's counters: plain list arithmetic, then :meth:`flush` to shared memory.

    ``values`` is indexed by :data:`INDEX` (counters) and ``HIST_AT + bucket`` (histogram).
    """

    __slots__ = ("_at", "_buf", "dirty", "last_flush", "values")

    def __init__(self, buf: mmap.mmap, at: int) -> None:
        self._buf, self._at = buf, at
        self.values = list(_COUNTERS.unpack_from(buf, at))  # a restarted worker carries on
        self.dirty = False
        self.last_flush = time.monotonic_ns()

    def add(self, name: str, value: int = 1) -> None:
        """Add to a counter (visible after the next flush)."""
        self.values[INDEX[name]] += value
        self.dirty = True

    def observe(self, service_ns: int) -> None:
        """Account one served fault's latency."""
        v = self.values
        v[INDEX["service_ns"]] += service_ns
        if service_ns > v[_MAX_AT]:
            v[_MAX_AT] = service_ns
        v[HIST_AT + min(service_ns.bit_length() - 1 if service_ns else 0, HIST_BUCKETS - 1)] += 1
        self.dirty = True

    def flush(self) -> None:
        """Publish the values (one ``pack_into``)."""
        _COUNTERS.pack_into(self._buf, self._at, *self.values)
        self.dirty = False
        self.last_flush = time.monotonic_ns()


class SharedState:
    """Counter slots, the first error and a fault log over one shared memfd mapping."""

    def __init__(self, log_capacity: int = 0, fd: int | None = None) -> None:
        self.log_capacity = log_capacity
        self._err_at = SLOTS * _COUNTERS.size
        self._log_at = self._err_at + _ERROR_BYTES
        self.size = self._log_at + _LOG_HEAD.size + log_capacity * RECORD.size
        if fd is None:
            fd = os.memfd_create("userfault-state", os.MFD_CLOEXEC)
            os.ftruncate(fd, self.size)
        self.fd = fd
        self.buf = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._lock = threading.Lock()
        self._next_slot = 0
        if _LOG_HEAD.unpack_from(self.buf, self._log_at)[0] == 0:
            _LOG_HEAD.pack_into(self.buf, self._log_at, log_capacity, 0, 0)

    @classmethod
    def attach(cls, fd: int) -> SharedState:
        """Map the state another process created (its size is read from the log header)."""
        at = SLOTS * _COUNTERS.size + _ERROR_BYTES
        probe = mmap.mmap(fd, at + _LOG_HEAD.size, mmap.MAP_SHARED, mmap.PROT_READ)
        cap = _LOG_HEAD.unpack_from(probe, at)[0]
        probe.close()
        return cls(cap, fd)

    def after_fork(self) -> None:
        """In a forked child: a fresh lock (another thread may have held it at the fork)."""
        self._lock = threading.Lock()

    def slot(self, index: int | None = None) -> CounterSlot:
        """The counters of one writer: slot ``index``, or the next unused one."""
        with self._lock:
            if index is None:
                index, self._next_slot = self._next_slot, self._next_slot + 1
        if not 0 <= index < SLOTS:
            raise ValueError(f"counter slot {index} is out of range (at most {SLOTS} writers)")
        return CounterSlot(self.buf, index * _COUNTERS.size)

    def log(self, record: tuple[int, int, int, int, int, int]) -> None:
        """Append a fault record (dropped when the reader is a full log behind)."""
        if not self.log_capacity:
            return
        with self._lock:
            cap, written, read = _LOG_HEAD.unpack_from(self.buf, self._log_at)
            if written - read < cap:
                RECORD.pack_into(self.buf, self._log_at + _LOG_HEAD.size
                                 + (written % cap) * RECORD.size, *record)
                _U64.pack_into(self.buf, self._log_at + 8, written + 1)

    def set_error(self, message: str) -> None:
        """Keep the first error message."""
        with self._lock:
            if self.buf[self._err_at] == 0:
                data = message.encode("utf-8", "replace")[:_ERROR_BYTES - 1]
                self.buf[self._err_at:self._err_at + len(data)] = data

    def error(self) -> str | None:
        """The first error message, if any."""
        raw = bytes(self.buf[self._err_at:self._err_at + _ERROR_BYTES]).rstrip(b"\0")
        return raw.decode("utf-8", "replace") if raw else None

    def counters(self) -> dict[str, Any]:
        """All slots summed (``service_max_ns`` is the maximum), histogram included."""
        total = [0] * (len(COUNTER_NAMES) + HIST_BUCKETS)
        for s in range(SLOTS):
            for i, v in enumerate(_COUNTERS.unpack_from(self.buf, s * _COUNTERS.size)):
                total[i] = max(total[i], v) if i == _MAX_AT else total[i] + v
        out: dict[str, Any] = dict(zip(COUNTER_NAMES, total, strict=False))
        out["latency_histogram"] = tuple(total[HIST_AT:])
        return out

    def drain_log(self) -> bytes:
        """Take the records written since the last drain (one reader at a time)."""
        cap, written, read = _LOG_HEAD.unpack_from(self.buf, self._log_at)
        if not cap or written == read:
            return b""
        base = self._log_at + _LOG_HEAD.size
        out = bytearray()
        for i in range(read, written):
            at = base + (i % cap) * RECORD.size
            out += self.buf[at:at + RECORD.size]
        _U64.pack_into(self.buf, self._log_at + 16, written)
        return bytes(out)

    def close(self) -> None:
        """Unmap and close the descriptor; idempotent."""
        if self.fd >= 0:
            self.buf.close()
            os.close(self.fd)
            self.fd = -1
