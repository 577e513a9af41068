"""Counters and a fault log in shared memory, written by a server, read by anyone.

The pager process writes them; the faulting process reads them with no round trip, so
``Pager.stats()`` costs the same whatever the runtime. The layout is private to userfault.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from typing import Any

__all__ = ["COUNTER_NAMES", "HIST_BUCKETS", "RECORD", "SharedState"]

COUNTER_NAMES = (
    "faults", "write_faults", "minor_faults", "wp_faults", "bytes_installed", "fault_bytes",
    "readahead_bytes", "populate_bytes", "prefetch_bytes", "eexist", "eagain", "poisoned",
    "remove_events", "unmap_events", "remap_events", "fork_events", "service_ns",
    "service_max_ns", "errors", "retries", "restarts",
)
HIST_BUCKETS = 40
RECORD = struct.Struct("<6Q")  # address, source offset, flags, thread id, time ns, service ns
_ERROR_BYTES = 1024
_U64 = struct.Struct("<Q")
_COUNTERS = struct.Struct(f"<{len(COUNTER_NAMES) + HIST_BUCKETS}Q")
_LOG_HEAD = struct.Struct("<QQQ")  # capacity, written, read
_INDEX = {name: i * 8 for i, name in enumerate(COUNTER_NAMES)}


class SharedState:
    """Counters, a latency histogram, the first error and a fault log over one buffer.

    Writers serialize on a process-local lock; readers take plain snapshots (each field is
    an aligned 8-byte word, so values are never torn on the supported architectures).
    """

    def __init__(self, log_capacity: int = 0, fd: int | None = None) -> None:
        self.log_capacity = log_capacity
        self.size = _COUNTERS.size + _ERROR_BYTES + _LOG_HEAD.size + log_capacity * RECORD.size
        if fd is None:
            fd = os.memfd_create("userfault-state", os.MFD_CLOEXEC)
            os.ftruncate(fd, self.size)
        self.fd = fd
        self.buf = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._lock = threading.Lock()
        self._log_at = _COUNTERS.size + _ERROR_BYTES
        if _LOG_HEAD.unpack_from(self.buf, self._log_at)[0] == 0:
            _LOG_HEAD.pack_into(self.buf, self._log_at, log_capacity, 0, 0)

    @classmethod
    def attach(cls, fd: int) -> SharedState:
        """Map the state another process created (its size is read from the log header)."""
        probe = mmap.mmap(fd, _COUNTERS.size + _ERROR_BYTES + _LOG_HEAD.size, mmap.MAP_SHARED,
                          mmap.PROT_READ)
        cap = _LOG_HEAD.unpack_from(probe, _COUNTERS.size + _ERROR_BYTES)[0]
        probe.close()
        return cls(cap, fd)

    def add(self, name: str, value: int = 1) -> None:
        """Add to one counter."""
        at = _INDEX[name]
        with self._lock:
            _U64.pack_into(self.buf, at, _U64.unpack_from(self.buf, at)[0] + value)

    def fault_served(self, write: bool, nbytes: int, service_ns: int,
                     record: tuple[int, int, int, int, int, int]) -> None:
        """Account one served fault under one lock: counts, latency, histogram, log record."""
        bucket = min(max(service_ns, 1).bit_length() - 1, HIST_BUCKETS - 1)
        with self._lock:
            buf = self.buf
            for name, v in (("faults", 1), ("write_faults", int(write)), ("fault_bytes", nbytes)):
                at = _INDEX[name]
                _U64.pack_into(buf, at, _U64.unpack_from(buf, at)[0] + v)
            at = _INDEX["service_ns"]
            _U64.pack_into(buf, at, _U64.unpack_from(buf, at)[0] + service_ns)
            if service_ns > _U64.unpack_from(buf, _INDEX["service_max_ns"])[0]:
                _U64.pack_into(buf, _INDEX["service_max_ns"], service_ns)
            at = (len(COUNTER_NAMES) + bucket) * 8
            _U64.pack_into(buf, at, _U64.unpack_from(buf, at)[0] + 1)
            if self.log_capacity:
                cap, written, read = _LOG_HEAD.unpack_from(buf, self._log_at)
                if written - read < cap:
                    RECORD.pack_into(buf, self._log_at + _LOG_HEAD.size
                                     + (written % cap) * RECORD.size, *record)
                    _U64.pack_into(buf, self._log_at + 8, written + 1)

    def set_error(self, message: str) -> None:
        """Keep the first error message."""
        with self._lock:
            at = _COUNTERS.size
            if self.buf[at] == 0:
                data = message.encode("utf-8", "replace")[:_ERROR_BYTES - 1]
                self.buf[at:at + len(data)] = data

    def error(self) -> str | None:
        """The first error message, if any."""
        raw = bytes(self.buf[_COUNTERS.size:_COUNTERS.size + _ERROR_BYTES]).rstrip(b"\0")
        return raw.decode("utf-8", "replace") if raw else None

    def counters(self) -> dict[str, Any]:
        """All counters, with the histogram as ``latency_histogram``."""
        values = _COUNTERS.unpack_from(self.buf, 0)
        out: dict[str, Any] = dict(zip(COUNTER_NAMES, values))
        out["latency_histogram"] = values[len(COUNTER_NAMES):]
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
