"""`Pager`: a region whose pages are filled from a source on first touch.

The C engine serves faults on threads that never take this process's GIL, so any Python code,
including code holding the GIL, can touch the memory. Native sources (zero, pattern, buffer,
file) are served by the engine in this process; Python sources (HTTP, Redis, snapshots,
anything implementing :class:`~userfault.sources.base.PageSource`) by the same engine in a
pager process (:mod:`userfault.serving.process`).

Forked children: with UFFD_EVENT_FORK (root, or CAP_SYS_PTRACE) a child's touches of pages not
loaded yet are served from the same source. When the serving ends while a child runs (the
pager closes, its process exits, or the process serving it is SIGKILLed: this one, or the
pager process), the pages the child had not loaded get a logged SIGBUS, never zeros, and those
it had loaded keep their bytes: a child forked through Python (``os.fork``,
``multiprocessing``) holds its own copy of its userfaultfd and a watchdog over it
(:mod:`userfault.serving.forks`); one forked from C without Python's at-fork hooks is
protected from close and exit only. Without EVENT_FORK the region is not inherited at all
(MADV_DONTFORK): a child that touches it gets SIGSEGV instead of reading zeros.

A ``Pager`` is itself a buffer: ``memoryview(pager)``, ``numpy.frombuffer(pager)``.
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import sys
import threading
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from . import _native
from ._flags import Feature, RegisterMode
from .errors import PagerError, PermissionDeniedError, UffdError
from .region import Region, RegionKind
from .serving.config import OnError, OnRemove, ServeConfig, SizeLike
from .serving.forks import ForkGuard
from .serving.observe import Observation, working_set_ranges
from .serving.progress import CounterWatch, watch_background
from .serving.progress import prefetch as prefetch_with_progress
from .serving.runtime import (
    INSTALL_CODES,
    FaultRecord,
    PagerStats,
    Runtime,
    RuntimeKind,
    build_runtime,
    source_name,
)
from .sources.base import PageSource
from .sources.native import KIND_ZERO, NativeSource
from .sources.open import open_source
from .uffd import Uffd
from .working_set import WorkingSet

if TYPE_CHECKING:
    import numpy as np

__all__ = ["FaultRecord", "Install", "Pager", "PagerStats", "RuntimeKind", "map"]

Install = Literal["auto", "copy", "zeropage", "move", "continue"]

#: Events served for every pager: mremap, munmap, MADV_DONTNEED/REMOVE, and fork when allowed.
_EVENTS = Feature.EVENT_REMAP | Feature.EVENT_REMOVE | Feature.EVENT_UNMAP


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
        runtime: ``"native"`` for native sources, ``"process"`` for Python sources;
            ``"auto"`` picks by source.
        chunk, readahead, populate, threads, log_faults, on_error, retries, timeout,
            on_remove, piece, max_restarts, max_resident, watermarks, writable: how faults are
            served, how much memory stays installed (``max_resident="256M"``) and whether
            written pages go back to the source (``writable=True``, see :meth:`flush`), see
            :class:`~userfault.serving.config.ServeConfig` (sizes may be strings such as
            ``"64K"``). ``readahead`` defaults to a 64 KiB window doubling up to 4 MiB;
            ``on_error="poison"`` makes a page that cannot be read SIGBUS on access, never
            zeros.
        trace: write every fault and install to this trace file (see :mod:`userfault.trace`;
            ``$USERFAULT_TRACE`` does the same for every pager of a command, which is what
            ``userfault trace -o FILE -- CMD`` sets).
        record: write the pages this pager's faults touched, in first-touch order, to this
            working-set file when it closes (:mod:`userfault.working_set`).
        prefetch: a working-set file (recorded by ``record=``) to install in one batch from
            the first fault on, in first-touch order, on the background threads; the rest is
            served lazily. A record made for another source (or content) is refused unless
            ``force_prefetch``, one for another page size always; pages beyond the source's
            end are dropped.
        force_prefetch: use a ``prefetch`` working set recorded against another source.
        progress: a progress bar on stderr for ``populate``, the ``prefetch`` working set
            (one bar for both, from the counters, until the work is over or the pager
            closes) and :meth:`prefetch`: ``None`` (default) when stderr is a terminal and
            the work is at least 64 MiB, ``True`` for any work (the plain bar when stderr is
            not a terminal), ``False`` never (see :mod:`userfault.serving.progress`).
        secret_file, tls_ca: for a page-server URL (``uf://HOST:PORT/NAME``): the shared
            secret, and the CA that the server's TLS certificate must chain to.

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
        runtime: RuntimeKind = "auto",
        chunk: SizeLike = 0,
        readahead: tuple[SizeLike, SizeLike] | bool = True,
        populate: bool = False,
        threads: int = 1,
        log_faults: int = 0,
        on_error: OnError = "poison",
        retries: int = 3,
        timeout: float = 30.0,
        on_remove: OnRemove = "reload",
        piece: SizeLike = 0,
        max_restarts: int = 20,
        max_resident: SizeLike = 0,
        watermarks: tuple[float, float] = (0.7, 0.9),
        writable: bool = False,
        trace: str | os.PathLike[str] | None = None,
        record: str | os.PathLike[str] | None = None,
        prefetch: str | os.PathLike[str] | None = None,
        force_prefetch: bool = False,
        progress: bool | None = None,
        secret_file: str | os.PathLike[str] | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
    ) -> None:
        self._closed = True
        self._runtime: Runtime | None = None
        self._pool_fd = -1
        self._forks: ForkGuard | None = None
        self._observation: Observation | None = None
        self._progress: CounterWatch | None = None
        self.progress = progress
        self.working_set: WorkingSet | None = None
        self._owner = os.getpid()
        self.uffd: Uffd
        self.region: Region
        self.config = ServeConfig(
            chunk=chunk, readahead=readahead,  # type: ignore[arg-type]
            populate=populate, threads=threads, log_faults=log_faults, on_error=on_error,
            retries=retries, timeout=timeout, on_remove=on_remove, piece=piece,  # type: ignore[arg-type]
            max_restarts=max_restarts, max_resident=max_resident,  # type: ignore[arg-type]
            watermarks=watermarks, writable=writable)
        src = open_source(source, secret_file=secret_file, tls_ca=tls_ca, writable=writable)
        self.source = src
        self._owns_source = src is not source  # made here from a path or buffer: ours to close
        try:
            self.runtime: RuntimeKind = self._pick_runtime(src, runtime)
            self.region_kind = region
            self.install = self._pick_install(install, src, region)
            want = src.size if size is None else size
            if want <= 0:
                raise ValueError(f"size must be positive, not {want}")
            self.region = self._make_region(region, want)
            page = self.region.page_size
            self.config.budget(page)  # refuse a budget too small for the pages
            self.chunk, ra_min, ra_max = self.config.for_page(page)
            self.readahead: tuple[int, int] = (ra_min, ra_max)
            if self.config.tracks_writes:
                self._check_tracking(src)
            # No fork from the registration until the serving runs: it would wait in the
            # kernel, holding the GIL, for a FORK event nobody reads yet.
            with _forking:
                self.uffd, self.fork_served = self._open_uffd()
                mode = RegisterMode.MISSING | (
                    RegisterMode.MINOR if self.install == "continue" else RegisterMode(0)) | (
                    RegisterMode.WP if self.config.tracks_writes else RegisterMode(0))
                self.uffd.register(self.region.address, self.region.size, mode)
                if not self.fork_served:
                    # A child would see the registration dropped and read zeros (for a memfd, the
                    # parent too): do not give it the region at all.
                    _native.madvise(self.region.address, self.region.size, mmap.MADV_DONTFORK)
                else:
                    self._forks = ForkGuard(self.uffd)
                if self.config.max_resident or (writable and self.runtime == "process"):
                    # where the evictor keeps pages on probation, and written pages pass through on
                    # their way home from a pager process (see engine_budget.c, engine_write.c)
                    self._pool_fd = os.memfd_create("userfault-pool", os.MFD_CLOEXEC)
                    os.ftruncate(self._pool_fd, self.region.size)
                name = source_name(src)
                preload: list[tuple[int, int]] = []
                if prefetch is not None:
                    self.working_set, preload = working_set_ranges(
                        prefetch, source=name, source_size=src.size, page_size=page,
                        force=force_prefetch)
                self._observation = Observation.open(
                    trace, record, source=name, region_size=self.region.size, page_size=page,
                    source_size=src.size)
                self._runtime = build_runtime(
                    self.uffd.fileno(), [(self.region.address, self.region.size, 0)], page, src,
                    self.config, install=self.install, memfd=self.region.memfd,
                    runtime=self.runtime, evict_advice=mmap.MADV_REMOVE if region == "memfd"
                    else mmap.MADV_DONTNEED, pool_fd=self._pool_fd, shared=region == "memfd",
                    trace_fd=self._observation.fd if self._observation else -1, preload=preload,
                    **(self._forks.engine_args() if self._forks else {}))
                self._runtime.start()
                if self._forks is not None:
                    self._forks.watch(self._runtime.keeper_pid)
            self._progress = watch_background(
                self._runtime, populate=populate, working_set=bool(preload), enabled=progress,
                stream=sys.stderr)
        except BaseException:
            if self._observation is not None:
                self._observation.record = None  # a pager that never ran records nothing
            self._teardown()
            raise
        self._closed = False
        _open_pagers.add(self)
        self._attach(self.region.address, self.region.size, False)

    def _check_tracking(self, src: PageSource) -> None:
        """Refuse, before anything is registered, writes that cannot be seen, or written home."""
        if self.install not in ("copy", "continue"):
            what = "a writable pager" if self.config.writable else \
                "a pager with max_resident (it keeps written pages, never drops them)"
            raise ValueError(f"install={self.install!r} cannot track writes: {what} installs "
                             "with 'copy' (or 'continue')")
        if not self.config.writable:
            return
        if isinstance(src, NativeSource):
            src.engine_args(writable=True)  # raises, naming why
        elif not callable(getattr(src, "write_from", None)):
            raise ValueError(f"{type(src).__name__} cannot be written to (it has no "
                             "write_from): writable=True needs a file, a writable buffer, Redis "
                             "or your own PageSource with write_from")

    def _open_uffd(self) -> tuple[Uffd, bool]:
        """The userfaultfd, with EVENT_FORK where this process may have it."""
        features = Feature.THREAD_ID | Feature.POISON | _EVENTS | (
            Feature.MOVE if self.install == "move" else Feature(0)) | (
            Feature.MINOR_SHMEM if self.install == "continue" else Feature(0))
        features |= Feature.MISSING_SHMEM | Feature.MISSING_HUGETLBFS
        if self.config.tracks_writes:
            features |= Feature.PAGEFAULT_FLAG_WP | Feature.WP_HUGETLBFS_SHMEM
        required = Feature.POISON if self.config.on_error == "poison" else Feature(0)
        try:
            return Uffd(features | Feature.EVENT_FORK, required=required), True
        except PermissionDeniedError:
            # EVENT_FORK needs CAP_SYS_PTRACE (Linux 5.11+)
            return Uffd(features, required=required), False

    @staticmethod
    def _pick_runtime(src: PageSource, runtime: RuntimeKind) -> RuntimeKind:
        if runtime == "auto":
            return "native" if isinstance(src, NativeSource) else "process"
        if runtime not in ("native", "process"):
            raise ValueError(f"runtime must be 'auto', 'native' or 'process', not {runtime!r}")
        if runtime == "native" and not isinstance(src, NativeSource):
            raise ValueError(
                f"{type(src).__name__} is a Python source: Python cannot serve faults of a "
                "process whose faulting thread holds the GIL, so it needs runtime='process'")
        return runtime

    @staticmethod
    def _make_region(kind: RegionKind, size: int) -> Region:
        makers = {"anonymous": Region.anonymous, "memfd": Region.shared_memfd,
                  "hugetlb": Region.hugetlb}
        return makers[kind](size)

    def _pick_install(self, install: Install, src: PageSource, kind: RegionKind) -> str:
        if kind not in ("anonymous", "memfd", "hugetlb"):
            raise ValueError(f"region must be 'anonymous', 'memfd' or 'hugetlb', not {kind!r}")
        zero_source = isinstance(src, NativeSource) and src.kind == KIND_ZERO
        if install == "auto":
            tracked = self.config.tracks_writes
            return "zeropage" if zero_source and kind != "hugetlb" and not tracked else "copy"
        if install not in INSTALL_CODES:
            raise ValueError(f"install must be one of auto, {', '.join(INSTALL_CODES)}, "
                             f"not {install!r}")
        if install == "move" and kind != "anonymous":
            raise ValueError("install='move' needs region='anonymous' (MOVE works on private "
                             "anonymous memory only)")
        if install == "continue" and kind != "memfd":
            raise ValueError("install='continue' needs region='memfd' (CONTINUE maps pages "
                             "of a page cache)")
        if install == "zeropage" and kind == "hugetlb":
            raise ValueError("the kernel has no ZEROPAGE for hugetlb memory; use 'copy'")
        if install == "zeropage" and not zero_source:
            raise ValueError("install='zeropage' only serves ZeroSource")
        if install != "copy" and self.runtime == "process":
            raise ValueError("Python sources are installed with 'copy'")
        return install

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
        With ``max_resident``, only what fits in the room left below the high watermark is
        installed, in order (more would start an eviction round that takes back the first
        pages), and faults serve the rest. A progress bar follows it as ``Pager(progress=)``
        says (ended before this returns).

        Raises:
            PrefetchError: pages could not be read after retries and were poisoned
                (``.poisoned`` lists them); the rest was installed. Or the source timed out
                (a read raised :class:`TimeoutError`, or an error raised from one): the
                prefetch stops there, without retrying or poisoning, and faults serve the
                rest (``.installed`` says how much went in).
        """
        self._check_open()
        todo = [(0, self.size)] if ranges is None else self._ranges(ranges, "prefetch")
        if os.getpid() != self._owner:
            raise PagerError("prefetch from a forked child is not supported: the engine "
                             "installs into the parent's memory (the child's faults are "
                             "served anyway)")
        return prefetch_with_progress(self._serving(), todo, self.region.page_size,
                                      enabled=self.progress)

    def willneed(self, ranges: Iterable[tuple[int, int]]) -> int:
        """Start installing ``(offset, length)`` ranges in the background and return at once,
        like ``madvise(MADV_WILLNEED)``: a hint of what will be read next, in that order.

        The background threads read the ranges piece by piece (``piece=``), in the order
        given and after the ranges of earlier calls, once no fault's readahead has a window
        left; pages present (or being read) are skipped, and a fault in a piece being read
        waits for it instead of reading it again. What they install counts as readahead (in
        :meth:`stats` and traces). Nothing is guaranteed: the memory is served on first touch
        whatever happens to the hint; with a budget (``max_resident``) the ranges are dropped
        once the count reaches the high watermark (more would start an eviction round that
        takes the first of them back); an ``mremap`` of the region, and a pager process that
        restarts, forget them. Returns the bytes queued (whole pages).

        Raises:
            ValueError: a range outside the region, a pager without background threads
                (``readahead=False`` and neither ``populate`` nor ``prefetch=``), or more than
                65536 ranges pending (adjacent ranges count as one; a pager process raises
                :class:`PagerError` for that).
        """
        self._check_open()
        if not (self.readahead[1] or self.config.populate or self.working_set):
            raise ValueError("willneed needs the background threads: readahead on (the "
                             "default), populate=True or a prefetch= working set")
        todo = self._ranges(ranges, "willneed")
        if os.getpid() != self._owner:
            raise PagerError("willneed from a forked child is not supported: the engine "
                             "installs into the parent's memory")
        return self._serving().willneed(todo)

    def _ranges(self, ranges: Iterable[tuple[int, int]], what: str) -> list[tuple[int, int]]:
        """``(offset, length)`` pairs as ints, each inside the region, or ValueError."""
        out = []
        for item in ranges:
            try:
                off, length = (int(x) for x in item)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{what} ranges are (offset, length) pairs of integers, not "
                                 f"{item!r}") from err
            if off < 0 or length < 0 or off + length > self.size:
                raise ValueError(f"{what} range ({off}, {length}) is outside the "
                                 f"{self.size}-byte region")
            out.append((off, length))
        return out

    def flush(self) -> int:
        """Write every page written since it was last written back to the source, and make
        it durable there (``fsync`` for a file, the source's ``flush()`` otherwise), like
        ``msync``. Returns the bytes written. A write that races the flush is either in the
        flushed copy or kept dirty for the next flush: never lost.

        Raises:
            PagerError: the pager is not writable, or writing back failed: every page not
                written, or written but not made durable (fsync, the source's ``flush()``
                failed), stays dirty and in memory for the next flush.
        """
        self._check_open()
        if not self.config.writable:
            raise PagerError("flush needs a writable pager: map it with writable=True")
        if os.getpid() != self._owner:
            raise PagerError("flush from a forked child is not supported: the pager belongs to "
                             "the parent")
        return self._serving().flush()

    def stats(self) -> PagerStats:
        """Current counters (cheap: no locks on the serving path)."""
        self._check_open()
        return PagerStats.from_counters(self._serving().counters(), self.region.page_size)

    def faults(self) -> list[FaultRecord]:
        """Take the fault records logged since the last call (needs ``log_faults > 0``)."""
        self._check_open()
        return FaultRecord.unpack_all(self._serving().drain_log())

    def check(self) -> None:
        """Raise :class:`PagerError` if serving has failed (the first error is kept)."""
        self._check_open()
        err = self._serving().error()
        if err is not None:
            raise PagerError(f"the pager failed: {err.message}")

    def _check_open(self) -> None:
        if self._closed:
            raise PagerError("the pager is closed")

    def _serving(self) -> Runtime:
        assert self._runtime is not None
        return self._runtime

    # -- lifetime ---------------------------------------------------------------------------

    def _teardown(self) -> None:
        if self._progress is not None:
            self._progress.detach()  # before the runtime goes: the bar ends where it is
            self._progress = None
        uffd: Uffd | None = getattr(self, "uffd", None)
        # Either may be missing when construction failed part-way.
        region: Region | None = getattr(self, "region", None)
        # No fork between the serving stopping and the region leaving the uffd: that fork
        # would wait in the kernel for its FORK event to be read, holding the GIL that this
        # thread needs to get there.
        with _forking:
            if self._forks is not None:
                self._forks.end()  # forked children's watchdogs take over from the serving
            if self._runtime is not None:
                self._runtime.stop()
                self._runtime = None  # the engine pins the source's buffer until it is freed
            if self._forks is not None:
                self._forks.close(uffd)
                self._forks = None
            if uffd is not None:
                if region is not None and os.getpid() == self._owner:
                    # Unregister explicitly: a forked child holds a copy of this descriptor, so
                    # closing ours would not, and munmap would then wait for an UNMAP event
                    # that no engine reads any more. (A child's copy must not: it would
                    # unregister the parent's memory, the descriptor's.)
                    with contextlib.suppress(UffdError):
                        uffd.unregister(region.address, region.size)
                uffd.close()
        if self._observation is not None and os.getpid() == self._owner:
            observation, self._observation = self._observation, None
            observation.close()  # the trace is complete now; a recorded working set written
        if region is not None:
            region.close()
        if self._pool_fd >= 0:
            os.close(self._pool_fd)
            self._pool_fd = -1
        close_source = getattr(self.source, "close", None)
        if self._owns_source and close_source is not None:
            close_source()

    def close(self) -> None:
        """Stop serving, unregister and unmap; idempotent. Views must be released first.

        A writable pager is flushed first (see :meth:`flush`): if that fails, the pager stays
        open and the error is raised, so nothing written is dropped.

        A pager left open at interpreter exit keeps serving until the process ends (other
        atexit handlers and daemon threads may still touch its memory); the kernel then
        unregisters and unmaps everything. At exit, before that, a writable pager is flushed,
        its trace written so far and its working set recorded, and the pages a forked child
        never loaded are poisoned (the child gets SIGBUS there, never zeros, once the serving
        ends with this process).
        """
        if self._closed:
            return
        if self.config.writable and os.getpid() == self._owner:
            self.flush()  # raises (and stays open) if the written pages cannot go home
        self._detach()
        self._closed = True
        _open_pagers.discard(self)
        self._teardown()

    def _at_exit(self) -> None:
        """The interpreter exits with this pager open (see :meth:`close`)."""
        if self._closed or os.getpid() != self._owner or self._runtime is None:
            return
        try:
            if self.config.writable:
                self.flush()
            self._runtime.at_exit()
            if self._forks is not None:
                self._forks.end()
            if self._observation is not None:
                self._observation.at_exit()
        except Exception as err:  # at exit there is no caller to raise to
            print(f"userfault: at exit, {self!r}: {err}", file=sys.stderr)

    def _after_fork(self) -> None:
        """In a forked child, first thing: keep its memory failing loudly, never reading
        zeros, once nobody serves it."""
        if self._closed or self._forks is None:
            return
        try:
            self._forks.after_fork(self.region.address, self.region.size,
                                   self.region.page_size, source_name(self.source),
                                   self.install == "continue")
        except Exception as err:  # an at-fork hook has no caller to raise to
            print(f"userfault: forked child {os.getpid()}, {self!r}: could not hold its "
                  f"userfaultfd ({err}): if the process serving it is killed, the pages it has "
                  "not loaded read as zeros", file=sys.stderr)

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


#: pagers not closed yet, for the exit hook
_open_pagers: weakref.WeakSet[Pager] = weakref.WeakSet()


#: held by a fork (from before it to its return in the parent) and by a closing pager from
#: the end of its serving until its region is unregistered (see ``Pager._teardown``)
_forking = threading.RLock()


def _after_fork_in_child() -> None:
    """Each open pager's memory in a forked child holds its own uffd (see
    :mod:`userfault.serving.forks`)."""
    global _forking
    _forking = threading.RLock()  # the parent's fork held it: this process has a fresh one
    for pager in list(_open_pagers):
        pager._after_fork()


def _before_fork() -> None:
    _forking.acquire()


def _after_fork_in_parent() -> None:
    _forking.release()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


@atexit.register
def _at_exit() -> None:
    for pager in list(_open_pagers):
        pager._at_exit()


def map(source: Any, **options: Any) -> Pager:
    """Map ``source`` lazily: ``userfault.map("file.bin")`` returns a started :class:`Pager`.

    Options are those of :class:`Pager`.
    """
    return Pager(source, **options)
