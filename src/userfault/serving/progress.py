"""Progress bars of a pager's long work: populate, a working set, ``prefetch()``.

The engine counts, in the counters every runtime reads without a lock or a round trip, what
its jobs are finished with: ``populate_done`` of ``populate_total`` bytes, ``preload_done``
of ``preload_total`` for a working set (``Pager(prefetch=PATH)``), ``prefetch_done`` for
:meth:`~userfault.serving.runtime.Runtime.prefetch` calls, and when a background job is over
(``populate_over``, ``preload_over``: done, stopped by the ``max_resident`` budget, or given
up). A :class:`CounterWatch` polls them every :data:`POLL_S` on a daemon thread and draws a
:func:`~userfault._progress.progress` bar until the job is over, the pager closes or its
pager process dies.

The rule, for every caller: ``progress=None`` draws when stderr is a terminal and the work is
at least :data:`MIN_BYTES`; ``True`` draws any work (the plain bar on a non-terminal);
``False`` never draws.
"""

from __future__ import annotations

import errno
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import IO

from .._progress import Progress, progress, wanted
from .runtime import Runtime

__all__ = ["MIN_BYTES", "POLL_S", "CounterWatch", "prefetch", "watch_background"]

#: work smaller than this draws no bar unless forced (``progress=True``)
MIN_BYTES = 64 << 20
#: how often a bar's counters are read
POLL_S = 0.1

#: counters -> (bytes done, bytes in all, over)
Measure = Callable[[Mapping[str, int]], tuple[int, int, bool]]


class CounterWatch:
    """A daemon thread drawing ``measure(runtime.counters())`` as a bar every :data:`POLL_S`.

    It holds the runtime weakly and reads it under a lock of its own, never taken on the
    fault path: :meth:`detach` (a pager closing) waits at most for one counter read, never
    for a draw, and the bar ends at the next poll.
    """

    def __init__(self, runtime: Runtime, measure: Measure, description: str, *,
                 enabled: bool | None, stream: IO[str] | None) -> None:
        self._runtime: weakref.ref[Runtime] | None = weakref.ref(runtime)
        self._measure = measure
        self._description = description
        self._enabled = enabled
        self._stream = stream
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._complete = False
        self._thread = threading.Thread(target=self._run, name="userfault-progress", daemon=True)
        self._thread.start()

    def detach(self) -> None:
        """Let go of the runtime (it is being stopped): the bar ends where it is."""
        with self._lock:
            self._runtime = None
        self._stop.set()

    def end(self, complete: bool) -> None:
        """End the bar after a last read, at 100 % if ``complete``, and wait for it (for the
        caller of a synchronous job: the bar's line is finished when this returns)."""
        self._complete = complete
        self._stop.set()
        self._thread.join()

    def _read(self) -> tuple[int, int, bool] | None:
        """(done, total, over), or None once detached."""
        with self._lock:
            runtime = None if self._runtime is None else self._runtime()
            if runtime is None:
                return None
            got = self._measure(runtime.counters())
            if got[2]:  # over: its last bytes were counted before it said so
                got = (*self._measure(runtime.counters())[:2], True)
            failure = runtime.error()
            del runtime  # never the last reference outside the lock: see detach
        if failure is not None and failure.errno == errno.ESRCH:
            return (got[0], got[1], True)  # the pager process died: no more progress
        return got

    def _run(self) -> None:
        bar: Progress | None = None
        try:
            while True:
                last = self._stop.is_set()
                got = self._read()
                if got is None:
                    return
                done, total, over = got
                if last and self._complete:
                    done = total
                if bar is None and total and (self._enabled or total >= MIN_BYTES):
                    bar = progress(self._description, enabled=self._enabled,
                                   stream=self._stream)
                if bar is not None:
                    bar(min(done, total), total)
                if over or last:
                    return
                self._stop.wait(POLL_S)
        finally:
            if bar is not None:
                bar.finish()


def watch_background(runtime: Runtime, *, populate: bool, working_set: bool,
                     enabled: bool | None, stream: IO[str] | None = None) -> CounterWatch | None:
    """A bar of the background jobs configured (one bar for both), or None when none is
    configured or the bar would not draw. The totals come from the engine (a pager
    process's engine sets them when its worker starts: no bar until then)."""
    jobs = [job for job, on in (("populate", populate), ("preload", working_set)) if on]
    if not jobs or not wanted(enabled, stream):
        return None

    def measure(c: Mapping[str, int]) -> tuple[int, int, bool]:
        total = sum(c[f"{job}_total"] for job in jobs)
        done = sum(min(c[f"{job}_done"], c[f"{job}_total"]) for job in jobs)
        return done, total, all(c[f"{job}_over"] for job in jobs)

    what = {"populate": "populating", "preload": "working set"}
    return CounterWatch(runtime, measure, " + ".join(what[job] for job in jobs),
                        enabled=enabled, stream=stream)


def prefetch(runtime: Runtime, ranges: Sequence[tuple[int, int]], page_size: int, *,
             enabled: bool | None, stream: IO[str] | None = None,
             description: str = "prefetching") -> int:
    """``runtime.prefetch(ranges)`` with a bar of the bytes it is finished with (installed,
    or skipped as present), ended before this returns: at 100 % once it went through every
    range (one that stopped at the ``max_resident`` budget ends where it stopped)."""
    total = sum(-(-(off + n) // page_size) * page_size - off // page_size * page_size
                for off, n in ranges if n > 0)
    if not total or not wanted(enabled, stream) or (enabled is None and total < MIN_BYTES):
        return runtime.prefetch(ranges)
    base = runtime.counters()["prefetch_done"]
    watch = CounterWatch(runtime, lambda c: (c["prefetch_done"] - base, total, False),
                         description, enabled=enabled, stream=stream)
    complete = False
    try:
        installed = runtime.prefetch(ranges)
        complete = runtime.counters()["prefetch_done"] - base >= total  # the counters are shared
        return installed
    finally:
        watch.end(complete)
