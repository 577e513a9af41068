"""`Pager`: a region whose pages are filled from a source on first touch.

The native runtime serves faults on C threads of this process that never take the GIL, so
any Python code, including code holding the GIL, can touch the memory. Python sources (HTTP,
Redis, snapshots, anything implementing :class:`~userfault.sources.base.PageSource`) are served
by a pager process instead (:mod:`userfault.pager_process`).

A ``Pager`` is itself a buffer: ``memoryview(pager)``, ``numpy.frombuffer(pager)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from . import _native
from ._flags import Feature, RegisterMode
from ._shared import RECORD
from .errors import PagerError, error_from_errno
from .fault_server import ON_ERROR
from .region import Region, RegionKind, align_up
from .sources.base import PageSource
from .sources.native import KIND_ZERO, NativeSource
from .sources.open import open_source
from .uffd import Uffd

if TYPE_CHECKING:
    import numpy as np

__all__ = ["FaultRecord", "Install", "Pager", "PagerStats", "Runtime", "map"]

Install = Literal["auto", "copy", "zeropage", "move", "continue"]
Runtime = Literal["auto", "native", "process"]
_INSTALL_CODES = {"copy": 0, "zeropage": 1, "move": 2, "continue": 3}



@dataclass(frozen=True)
class FaultRecord:
    """One served fault: where, why, who, and how long the service took."""

    address: int
    offset: int
    flags: int
    thread_id: int
    time_ns: int
    service_ns: int


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
    remove_events: int = 0
    unmap_events: int = 0
    remap_events: int = 0
    fork_events: int = 0
    blocked_ns: int = 0
    service_max_ns: int = 0
    errors: int = 0
    retries: int = 0
    restarts: int = 0
    #: bucket ``i`` counts faults served in ``[2**i, 2**(i+1))`` nanoseconds
    latency_histogram: tuple[int, ...] = field(default=(), repr=False)

    @classmethod
    def from_counters(cls, counters: dict[str, Any]) -> PagerStats:
        """Build from the engine's (or pager process's) counter dict."""
        c = dict(counters)
        c["blocked_ns"] = c.pop("service_ns", 0)
        c["latency_histogram"] = tuple(c.get("latency_histogram", ()))
        return cls(**{k: v for k, v in c.items() if k in cls.__dataclass_fields__})

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


class NativeRuntime:
    """Serves faults on the C engine's threads; the interface every runtime offers."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def start(self) -> None:
        """Start serving."""
        self.engine.start()

    def stop(self) -> None:
        """Stop serving and join the threads."""
        self.engine.stop()

    def prefetch(self, ranges: list[tuple[int, int]]) -> int:
        """Install the ranges in one batch; raise if the source failed."""
        done, err, addr = self.engine.prefetch(ranges)
        if err:
            raise error_from_errno(err, "prefetch", address=addr, done=done)
        return int(done)

    def counters(self) -> dict[str, Any]:
        """The engine's counters."""
        return dict(self.engine.stats())

    def drain_log(self) -> bytes:
        """Packed fault records (see ``_shared.RECORD``)."""
        return bytes(self.engine.drain_log())

    def log_dropped(self) -> int:
        """Fault records dropped because the log was full."""
        return int(self.engine.log_dropped)

    def error_info(self) -> tuple[int, str] | None:
        """The first serving error as ``(errno, what failed where)``, if any."""
        err = self.engine.error()
        return None if err is None else (int(err[0]), f"{err[1]} at {int(err[2]):#x}")

    def error(self) -> str | None:
        """The first serving error, if any, as a sentence."""
        info = self.error_info()
        if info is None:
            return None
        code, what = info
        return (f"{what} failed: {os.strerror(code)} (errno {code}); affected pages were "
                "poisoned (SIGBUS), never zero-filled")


class Pager(_native.Mapping):
    """Memory of ``size`` bytes whose pages come from ``source`` on first touch.

    Args:
        source: a path, a URL, a buffer, a native source (zero, pattern, file, buffer) or
            any :class:`~userfault.sources.base.PageSource` (see
            :func:`~userfault.sources.open.open_source`).
        size: bytes to map (default: the source's size, rounded up to pages).
        region: ``"anonymous"`` (default), ``"memfd"`` or ``"hugetlb"``.
        install: ``"auto"``, ``"copy"``, ``"zeropage"``, ``"move"`` (anonymous memory, via a
            staging buffer) or ``"continue"`` (memfd: fill the page cache, then map).
        chunk: bytes installed per fault (a multiple of the page size; default one page).
        readahead: ``(min, max)`` window bytes for sequential faults (default 64 KiB doubling
            up to 4 MiB), ``False`` to disable.
        populate: fill the rest of the region in the background while faults go first.
        threads: handler threads (native runtime) or serving threads (process runtime).
        log_faults: capacity of the fault log read by :meth:`faults` (0: no log).
        runtime: ``"native"`` for native sources, ``"process"`` for Python sources;
            ``"auto"`` picks by source.
        on_error: what a page that cannot be read becomes after retries: ``"poison"``
            (SIGBUS on access; the default), ``"retry"`` (keep retrying) or ``"zero"``.
        retries: attempts per failed read before ``on_error`` applies (process runtime).

    A source object you pass stays yours to close; one made here from a path or a buffer is
    closed with the pager.

    Example::

        with userfault.map("/data/big.bin") as mem:
            print(bytes(memoryview(mem)[:16]))
    """

    def __init__(
        self,
        source: Any,
        *,
        size: int | None = None,
        region: RegionKind = "anonymous",
        install: Install = "auto",
        chunk: int | None = None,
        readahead: tuple[int, int] | bool = True,
        populate: bool = False,
        threads: int = 1,
        log_faults: int = 0,
        runtime: Runtime = "auto",
        on_error: str = "poison",
        retries: int = 3,
    ) -> None:
        self._closed = True
        self._runtime: Any = None
        self.uffd: Uffd
        self.region: Region
        src = open_source(source)
        self.source = src
        self._owns_source = src is not source  # made here from a path or buffer: ours to close
        try:
            runtime = self._check_options(src, runtime, on_error, threads)
            self.runtime: Runtime = runtime
            self.region_kind = region
            self.install = self._pick_install(install, src, region)
            want = src.size if size is None else size
            if want <= 0:
                raise ValueError(f"size must be positive, not {want}")
            self.region = self._make_region(region, want)
            page = self.region.page_size
            self.chunk = align_up(chunk or page, page)
            if readahead is True:
                readahead = (64 << 10, 4 << 20)
            self.readahead: tuple[int, int] = (0, 0) if readahead is False else (
                align_up(readahead[0], page), align_up(readahead[1], page))
            mode = RegisterMode.MISSING | (
                RegisterMode.MINOR if self.install == "continue" else RegisterMode(0))
            features = Feature.THREAD_ID | Feature.POISON | (
                Feature.MOVE if self.install == "move" else Feature(0)) | (
                Feature.MINOR_SHMEM if self.install == "continue" else Feature(0))
            self.uffd = Uffd(features | Feature.MISSING_SHMEM | Feature.MISSING_HUGETLBFS,
                             required=Feature.POISON if on_error == "poison" else Feature(0))
            self.uffd.register(self.region.address, self.region.size, mode)
            if runtime == "native":
                assert isinstance(src, NativeSource)
                self._runtime = self._native_engine(src, populate, threads, log_faults)
            else:
                from .pager_process import ProcessRuntime

                self._runtime = ProcessRuntime(
                    self, src, populate=populate, threads=threads, log_faults=log_faults,
                    on_error=on_error, retries=retries)
            self._runtime.start()
        except BaseException:
            self._teardown()
            raise
        self._closed = False
        self._attach(self.region.address, self.region.size, False)

    @staticmethod
    def _check_options(src: PageSource, runtime: Runtime, on_error: str, threads: int
                       ) -> Runtime:
        """Validate the runtime options before anything is mapped; return the runtime."""
        native = isinstance(src, NativeSource)
        if runtime == "auto":
            runtime = "native" if native else "process"
        if runtime not in ("native", "process"):
            raise ValueError(f"runtime must be 'auto', 'native' or 'process', not {runtime!r}")
        if runtime == "native" and not native:
            raise ValueError(
                f"{type(src).__name__} is a Python source: Python cannot serve faults of a "
                "process whose faulting thread holds the GIL, so it needs runtime='process'")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
        if runtime == "native" and on_error != "poison":
            raise ValueError("native sources only fail on I/O errors of the file itself, and "
                             "those pages are always poisoned: on_error must be 'poison'")
        if threads < 1 or threads > 64:
            raise ValueError(f"threads must be between 1 and 64, not {threads}")
        return runtime

    @staticmethod
    def _make_region(kind: RegionKind, size: int) -> Region:
        makers = {"anonymous": Region.anonymous, "memfd": Region.shared_memfd,
                  "hugetlb": Region.hugetlb}
        return makers[kind](size)

    @staticmethod
    def _pick_install(install: Install, src: PageSource, kind: RegionKind) -> str:
        if kind not in ("anonymous", "memfd", "hugetlb"):
            raise ValueError(f"region must be 'anonymous', 'memfd' or 'hugetlb', not {kind!r}")
        if install == "auto":
            if isinstance(src, NativeSource) and src.kind == KIND_ZERO and kind != "hugetlb":
                return "zeropage"
            return "copy"
        if install not in _INSTALL_CODES:
            raise ValueError(f"install must be one of auto, {', '.join(_INSTALL_CODES)}, "
                             f"not {install!r}")
        if install == "move" and kind != "anonymous":
            raise ValueError("install='move' needs region='anonymous' (MOVE works on private "
                             "anonymous memory only)")
        if install == "continue" and kind != "memfd":
            raise ValueError("install='continue' needs region='memfd' (CONTINUE maps pages "
                             "of a page cache)")
        if install == "zeropage" and kind == "hugetlb":
            raise ValueError("the kernel has no ZEROPAGE for hugetlb memory; use 'copy'")
        if install == "zeropage" and not (isinstance(src, NativeSource) and src.kind == KIND_ZERO):
            raise ValueError("install='zeropage' only serves ZeroSource")
        if install != "copy" and not isinstance(src, NativeSource):
            raise ValueError("Python sources are installed with 'copy'")
        return install

    def _native_engine(self, src: NativeSource, populate: bool, threads: int,
                       log_faults: int) -> NativeRuntime:
        os.set_blocking(self.uffd.fileno(), False)
        return NativeRuntime(_native.Engine(
            self.uffd.fileno(), [(self.region.address, self.region.size, 0)],
            self.region.page_size, src.kind, _INSTALL_CODES[self.install],
            memfd=self.region.memfd, chunk=self.chunk, readahead_min=self.readahead[0],
            readahead_max=self.readahead[1], populate=populate, threads=threads,
            log_capacity=log_faults, poison_on_error=True, **src.engine_args()))

    # -- the memory -------------------------------------------------------------------------

    @property
    def address(self) -> int:
        """Start address of the memory."""
        return self.region.address

    @property
    def size(self) -> int:
        """Mapped bytes (the source size rounded up to whole pages, or ``size=``)."""
        return self.region.size

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def view(self) -> memoryview:
        """A writable memoryview of the whole region (release it before :meth:`close`)."""
        return memoryview(self)

    def array(self, dtype: Any = "uint8", shape: int | tuple[int, ...] | None = None
              ) -> np.ndarray[Any, Any]:
        """The memory as a numpy array of ``dtype`` (and ``shape``); needs numpy."""
        try:
            import numpy as np
        except ImportError as err:
            raise ImportError("Pager.array needs numpy: pip install userfault[numpy]") from err
        dt = np.dtype(dtype)
        count = self.source.size // dt.itemsize if shape is None else -1
        arr: np.ndarray[Any, Any] = np.frombuffer(memoryview(self), dtype=dt, count=count)
        return arr if shape is None else arr.reshape(shape)

    # -- policy and observation ---------------------------------------------------------------

    def prefetch(self, ranges: Iterable[tuple[int, int]] | None = None) -> int:
        """Install ``(offset, length)`` ranges now, in one batch (DONTWAKE, one WAKE).

        ``None`` prefetches everything. Returns bytes installed (present pages are skipped).
        """
        self._check_open()
        todo = [(0, self.size)] if ranges is None else [(int(o), int(n)) for o, n in ranges]
        for off, length in todo:
            if off < 0 or length < 0 or off + length > self.size:
                raise ValueError(f"prefetch range ({off}, {length}) is outside the "
                                 f"{self.size}-byte region")
        return int(self._runtime.prefetch(todo))

    def stats(self) -> PagerStats:
        """Current counters (cheap: no locks on the serving path)."""
        self._check_open()
        return PagerStats.from_counters(self._runtime.counters())

    def faults(self) -> list[FaultRecord]:
        """Take the fault records logged since the last call (needs ``log_faults > 0``)."""
        self._check_open()
        data = self._runtime.drain_log()
        return [FaultRecord(*r) for r in RECORD.iter_unpack(data)]

    def check(self) -> None:
        """Raise :class:`PagerError` if serving has failed (the first error is kept)."""
        self._check_open()
        err = self._runtime.error()
        if err is not None:
            changed = getattr(self.source, "changed", None)  # e.g. a truncated FileSource
            note = changed() if callable(changed) else None
            raise PagerError(f"the pager failed: {err}" + (f"; {note}" if note else ""))

    def _check_open(self) -> None:
        if self._closed:
            raise PagerError("the pager is closed")

    # -- lifetime ---------------------------------------------------------------------------

    def _teardown(self) -> None:
        if self._runtime is not None:
            self._runtime.stop()
            self._runtime = None  # the engine pins the source's buffer until it is freed
        # Either may be missing when construction failed part-way.
        uffd: Uffd | None = getattr(self, "uffd", None)
        if uffd is not None:
            uffd.close()  # closing unregisters every range of this userfaultfd
        region: Region | None = getattr(self, "region", None)
        if region is not None:
            region.close()
        close_source = getattr(self.source, "close", None)
        if self._owns_source and close_source is not None:
            close_source()

    def close(self) -> None:
        """Stop serving, unregister and unmap; idempotent. Views must be released first.

        A pager left open at interpreter exit keeps serving until the process ends (other
        atexit handlers and daemon threads may still touch its memory); the kernel then
        unregisters and unmaps everything.
        """
        if self._closed:
            return
        self._detach()
        self._closed = True
        self._teardown()

    def __enter__(self) -> Pager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"at {self.address:#x}"
        return (f"<Pager {type(self.source).__name__} {self.size} bytes {state} "
                f"runtime={self.runtime} install={self.install}>")


def map(source: Any, **options: Any) -> Pager:
    """Map ``source`` lazily: ``userfault.map("file.bin")`` returns a started :class:`Pager`.

    Options are those of :class:`Pager`.
    """
    return Pager(source, **options)
