"""The runtime interface, what it reports, and the one place engines and runtimes are built.

A *runtime* runs the C fault engine for one userfaultfd: in this process
(:class:`~userfault.serving.native.InProcessRuntime`) when the source is native, or in a pager
process (:class:`~userfault.serving.process.ProcessRuntime`) when it is a Python object,
whose code cannot run on the faulting process's GIL. ``Pager`` and the Firecracker pager both
get theirs from :func:`build_runtime`.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from .. import _native
from ..errors import PagerError, PrefetchError, error_from_errno
from ..sources.base import PageSource
from ..sources.native import NativeSource
from .config import ServeConfig

__all__ = [
    "RECORD",
    "FaultRecord",
    "PagerStats",
    "Runtime",
    "RuntimeKind",
    "ServingError",
    "build_runtime",
    "engine_args",
    "prefetch_result",
    "source_name",
]

RuntimeKind = Literal["auto", "native", "process"]

#: A fault record (engine.h uf_rec_t): t_ns, offset, address, length, tid, service_ns, kind,
#: cause, flags, reserved.
RECORD = struct.Struct("<QQQQIIBBHI")
assert RECORD.size == _native.RECORD_SIZE

INSTALL_CODES = {"copy": _native.INST_COPY, "zeropage": _native.INST_ZEROPAGE,
                 "move": _native.INST_MOVE, "continue": _native.INST_CONTINUE}
_ON_ERROR = {"poison": _native.ONERR_POISON, "retry": _native.ONERR_RETRY,
             "zero": _native.ONERR_ZERO}
_ON_REMOVE = {"reload": _native.ONREM_RELOAD, "zero": _native.ONREM_ZERO}
_KINDS = {_native.KIND_READ: "read", _native.KIND_WRITE: "write", _native.KIND_MINOR: "minor",
          _native.KIND_WP: "wp", _native.KIND_NONE: "none"}


@dataclass(frozen=True)
class FaultRecord:
    """One served fault: where, why, who, and how long the service took.

    ``flags`` are the kernel's ``UFFD_PAGEFAULT_FLAG_*`` and the outcome bits of
    :class:`userfault.trace.TraceFlag` (EEXIST, EAGAIN, HELD, WAITED); ``length`` is what this
    fault installed (0 when the page was present already or a background piece installed it).
    """

    address: int
    offset: int
    flags: int
    thread_id: int
    time_ns: int
    service_ns: int
    length: int = 0
    kind: str = "read"

    @classmethod
    def unpack_all(cls, data: bytes) -> list[FaultRecord]:
        """The records of a drained fault log."""
        return [cls(addr, off, flags, tid, t, svc, length, _KINDS.get(kind, "read"))
                for t, off, addr, length, tid, svc, kind, _cause, flags, _ in
                RECORD.iter_unpack(data)]


@dataclass(frozen=True)
class PagerStats:
    """Counters of a pager. ``blocked_ns`` sums, per fault, the time from reading the fault
    message to waking the thread: a lower bound of the time faulting threads spent blocked
    (the kernel's queueing before the read is not visible)."""

    faults: int = 0
    write_faults: int = 0
    minor_faults: int = 0
    wp_faults: int = 0
    bytes_installed: int = 0
    fault_bytes: int = 0
    readahead_bytes: int = 0
    populate_bytes: int = 0
    prefetch_bytes: int = 0
    eexist: int = 0
    eagain: int = 0
    poisoned: int = 0
    zeroed: int = 0
    remove_events: int = 0
    unmap_events: int = 0
    remap_events: int = 0
    fork_events: int = 0
    children: int = 0
    blocked_ns: int = 0
    service_max_ns: int = 0
    errors: int = 0
    retries: int = 0
    restarts: int = 0
    timeouts: int = 0
    log_dropped: int = 0
    log_suppressed: int = 0
    #: bytes installed now (counted under a budget, ``max_resident``)
    resident_bytes: int = 0
    evictions: int = 0
    #: evicted pages that faulted in again (thrashing shows as a high rate)
    refaults: int = 0
    #: pages on probation touched again: installed back from the pool, no source read
    reactivations: int = 0
    writebacks: int = 0
    writeback_bytes: int = 0
    #: pages written since they were last written back (writable pagers)
    dirty_pages: int = 0
    #: bucket ``i`` counts faults served in ``[2**i, 2**(i+1))`` nanoseconds
    latency_histogram: tuple[int, ...] = field(default=(), repr=False)

    @classmethod
    def from_counters(cls, counters: dict[str, Any], page_size: int = 4096) -> PagerStats:
        """Build from the engine's counter dict (``page_size`` turns pages into bytes)."""
        c = dict(counters)
        c["blocked_ns"] = c.pop("service_ns", 0)
        c["resident_bytes"] = c.pop("resident_pages", 0) * page_size
        c["latency_histogram"] = tuple(c.get("latency_histogram", ()))
        return cls(**{k: v for k, v in c.items() if k in cls.__dataclass_fields__})

    @property
    def refault_rate(self) -> float:
        """Re-faults per eviction: near 0 when the budget holds the working set, near 1 when
        the pager thrashes (every evicted page is needed again)."""
        return self.refaults / self.evictions if self.evictions else 0.0

    def latency_percentile(self, q: float) -> float:
        """Approximate service latency percentile in ns (geometric bucket midpoint)."""
        total = sum(self.latency_histogram)
        if not total:
            return 0.0
        target, seen = q / 100 * total, 0
        for i, n in enumerate(self.latency_histogram):
            seen += n
            if seen >= target:
                return float(2 ** i * 1.4142)
        return float(2 ** len(self.latency_histogram))

    def summary(self) -> str:
        """One human line: faults, bytes, latency percentiles, blocked time."""
        return (f"{self.faults} faults, {self.bytes_installed / 2**20:.1f} MiB installed "
                f"({self.readahead_bytes / 2**20:.1f} readahead, "
                f"{self.prefetch_bytes / 2**20:.1f} prefetch, "
                f"{self.populate_bytes / 2**20:.1f} populate), service p50 "
                f"{self.latency_percentile(50) / 1000:.1f} us p99 "
                f"{self.latency_percentile(99) / 1000:.1f} us, blocked "
                f"{self.blocked_ns / 1e6:.1f} ms")


@dataclass(frozen=True)
class ServingError:
    """The first thing that went wrong while serving."""

    errno: int
    message: str
    address: int = 0

    @classmethod
    def from_state(cls, raw: tuple[int, int, str] | None) -> ServingError | None:
        """From the engine's ``(errno, address, message)``."""
        return None if raw is None else cls(int(raw[0]), str(raw[2]), int(raw[1]))


class Runtime(Protocol):
    """What ``Pager`` and the Firecracker pager need of a runtime."""

    def start(self) -> None:
        """Start serving."""

    def stop(self) -> None:
        """Stop serving; idempotent."""

    def prefetch(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Install ``(source_offset, length)`` ranges in one batch; bytes installed.

        Raises :class:`~userfault.errors.PrefetchError` naming the pages it poisoned.
        """

    def willneed(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Queue ``(source_offset, length)`` ranges for the background threads, after those
        queued before, and return at once; bytes queued."""

    def counters(self) -> dict[str, Any]:
        """The engine's counters."""

    def drain_log(self) -> bytes:
        """Packed :data:`RECORD` fault records since the last call."""

    def error(self) -> ServingError | None:
        """The first serving error, if any."""

    def flush(self) -> int:
        """Write every dirty page back, durably; bytes written. Raises PagerError."""

    def at_exit(self) -> None:
        """This process exits while serving (no ``close()``): leave no forked child able to
        read zeros where the serving ends with it."""

    @property
    def process_exited(self) -> bool:
        """Whether the process whose memory is served is gone."""

    @property
    def keeper_pid(self) -> int:
        """The process whose death drops forked children's registrations (it holds their
        uffds): this one, or the pager process's supervisor."""


def source_name(source: object) -> str:
    """How log lines and working sets name a source: its repr, or, where the class has none of
    its own (``<... object at 0x...>`` differs every run), its class's qualified name."""
    cls = type(source)
    text = f"{cls.__module__}.{cls.__qualname__}" if cls.__repr__ is object.__repr__ \
        else repr(source)
    return text if len(text) <= 200 else text[:197] + "..."


def engine_args(source: PageSource, config: ServeConfig, page_size: int, *,
                install: str = "copy", memfd: int = -1, evict_advice: int = mmap.MADV_DONTNEED,
                pool_fd: int = -1, agent_fds: tuple[int, int] = (-1, -1),
                shared: bool = False, trace_fd: int = -1,
                preload: Sequence[tuple[int, int]] = (), beacon: int = 0,
                fork_table: int = -1) -> dict[str, Any]:
    """Keyword arguments of ``_native.Engine`` for ``source`` served with ``config``.

    ``evict_advice`` gives pages back under a budget (MADV_REMOVE for shared memory); ``pool_fd``
    is a memfd as large as the memory where the evictor keeps pages on probation (see
    engine_budget.c); ``agent_fds`` are
    the eventfds through which an engine in a pager process asks the faulting process to
    madvise; ``shared`` says the memory is shared (a memfd): a forked child's writes to it are
    the parent's too; ``trace_fd`` is a trace file the engine appends its records to
    (:mod:`userfault.serving.observe`); ``preload`` is a working set, ``(source_offset,
    length)`` ranges in first-touch order, installed by the background threads from the first
    fault on; ``beacon`` and ``fork_table`` let forked children find their uffd here
    (:mod:`userfault.serving.forks`).
    """
    chunk, ra_min, ra_max = config.for_page(page_size)
    max_resident, low, high = config.budget(page_size)
    args: dict[str, Any] = {
        "page_size": page_size, "install": INSTALL_CODES[install], "memfd": memfd,
        "chunk": chunk, "readahead_min": ra_min, "readahead_max": ra_max,
        "piece": config.piece, "populate": config.populate, "threads": config.threads,
        "log_capacity": config.log_faults, "on_error": _ON_ERROR[config.on_error],
        "on_remove": _ON_REMOVE[config.on_remove], "retries": config.retries,
        "name": source_name(source), "max_resident": max_resident, "high_watermark": high,
        "low_watermark": low, "evict_advice": evict_advice, "agent_fds": agent_fds,
        "pool_fd": pool_fd, "writable": config.writable, "shared": shared,
        "trace_fd": trace_fd, "preload": list(preload) if preload else None,
        "beacon": beacon, "fork_table": fork_table,
    }
    if isinstance(source, NativeSource):
        args["source"] = source.kind
        args.update(source.engine_args(writable=config.writable))
    else:
        args["source"] = _native.SRC_PYTHON
        args["pysource"] = source
        if config.writable:
            args["write_limit"] = source.size
    return args


def flush_result(raw: tuple[int, int, int, str]) -> int:
    """Bytes an engine flush wrote back, or :class:`PagerError` naming why some could not be
    (those pages stay dirty and in memory: nothing is lost, a later flush tries again)."""
    _pages, written, err, message = raw
    if err:
        raise PagerError(f"flush wrote {written} bytes back, then failed: {message} (every "
                         "page not known to be durable stays dirty and in memory; flush again)")
    return int(written)


def prefetch_result(raw: tuple[int, int, list[tuple[int, int]], int, str]) -> int:
    """Bytes installed by an engine prefetch, or :class:`PrefetchError` if it poisoned pages
    or stopped at a source's timeout."""
    installed, poisoned_bytes, poisoned, err, message = raw
    if poisoned_bytes:
        shown = ", ".join(f"{off:#x}..+{n}" for off, n in poisoned[:8])
        more = f" and {len(poisoned) - 8} more" if len(poisoned) > 8 else ""
        raise PrefetchError(
            f"prefetch installed {installed} bytes but poisoned {poisoned_bytes} bytes at source "
            f"offsets {shown}{more}: {message} (accesses there get SIGBUS)",
            installed=installed, poisoned=tuple(poisoned), poisoned_bytes=poisoned_bytes)
    if err == errno.ETIMEDOUT:
        raise PrefetchError(
            f"prefetch stopped after installing {installed} bytes: the source timed out "
            f"({message}); the rest is left to its faults, which read it on first touch",
            installed=installed)
    if err and err != errno.ESRCH:
        raise error_from_errno(err, "prefetch", done=installed)
    return int(installed)


def build_runtime(uffd: int, areas: Sequence[tuple[int, int, int]], page_size: int,
                  source: PageSource, config: ServeConfig, *, install: str = "copy",
                  memfd: int = -1, runtime: RuntimeKind = "auto",
                  evict_advice: int = mmap.MADV_DONTNEED, pool_fd: int = -1,
                  shared: bool = False, trace_fd: int = -1,
                  preload: Sequence[tuple[int, int]] = (), beacon: int = 0,
                  fork_table: int = -1) -> Runtime:
    """The runtime that serves ``uffd``'s ``areas`` (address, length, source offset) from
    ``source``: the engine in this process for native sources, a pager process otherwise.

    The runtime is built, not started. ``uffd`` stays the caller's. A budget
    (``config.max_resident``) needs ``uffd`` to have UFFD_FEATURE_EVENT_REMOVE. ``beacon``
    and ``fork_table`` are a :class:`~userfault.serving.forks.ForkGuard`'s.
    """
    native = isinstance(source, NativeSource)
    if runtime == "auto":
        runtime = "native" if native else "process"
    if runtime == "native":
        if not native:
            raise ValueError(
                f"{type(source).__name__} is a Python source: Python cannot serve faults of a "
                "process whose faulting thread holds the GIL, so it needs runtime='process'")
        from .native import InProcessRuntime

        os.set_blocking(uffd, False)
        return InProcessRuntime(_native.Engine(
            uffd, list(areas), **engine_args(source, config, page_size, install=install,
                                             memfd=memfd, evict_advice=evict_advice,
                                             pool_fd=pool_fd, shared=shared,
                                             trace_fd=trace_fd, preload=preload,
                                             beacon=beacon, fork_table=fork_table)))
    if runtime != "process":
        raise ValueError(f"runtime must be 'auto', 'native' or 'process', not {runtime!r}")
    if install != "copy":
        raise ValueError(f"a pager process installs with 'copy', not {install!r}")
    from .process import ProcessRuntime

    return ProcessRuntime(uffd, list(areas), page_size, source, config,
                          evict_advice=evict_advice, pool_fd=pool_fd, shared=shared,
                          trace_fd=trace_fd, preload=preload, beacon=beacon,
                          fork_table=fork_table)
