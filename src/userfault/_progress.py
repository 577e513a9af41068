"""Progress bars for long work: snapshot creation, populate, working-set prefetch, plotting.

One entry point, :func:`progress`: it draws with rich or tqdm when installed and stderr is a
terminal, with the built-in one-line :class:`ProgressBar` otherwise, and not at all when the
stream is not a terminal (unless forced: ``enabled=True``, a CLI's ``--progress``; a forced bar
on a non-terminal is always the plain one, which logs well). Every bar is called as
``bar(done, total)``, the callback shape of :func:`~userfault.sources.snapshot.create_snapshot`
and :func:`~userfault.sources.redis.upload`, and is a context manager that ends its line.

Example::

    with progress(total, "compressing") as bar:
        for done in work():
            bar(done, total)
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import IO, Any, Literal

__all__ = ["Backend", "Progress", "ProgressBar", "add_progress_arguments", "progress", "wanted"]

Backend = Literal["auto", "rich", "tqdm", "plain"]


class Progress:
    """A bar that draws nothing: the base of every backend, and what a disabled bar is."""

    #: the backend drawing it: ``"off"``, ``"plain"``, ``"rich"`` or ``"tqdm"``
    backend = "off"

    def __call__(self, done: int, total: int) -> None:
        """Report ``done`` of ``total`` units."""

    def finish(self) -> None:
        """End the bar (idempotent)."""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


class ProgressBar(Progress):
    """The built-in ``\\r`` bar on ``stream``: percent, rate, ETA and the description, redrawn
    at most 10 times a second. Bytes show as MB/s, other units as units/s; the rate counts
    from the first report (work may have begun before the bar)."""

    backend = "plain"

    def __init__(self, stream: IO[str], width: int = 30, *, description: str = "",
                 unit: str = "B") -> None:
        self.stream = stream
        self.width = width
        self.description = description
        self.unit = unit
        self.start = time.monotonic()
        self.first: int | None = None
        self.last = 0.0
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first, self.start = done, now
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        frac = done / total if total else 1.0
        filled = int(frac * self.width)
        rate = (done - self.first) / elapsed
        eta = (total - done) / rate if rate > 0 else 0.0
        bar = "#" * filled + "-" * (self.width - filled)
        speed = f"{rate / 1e6:7.1f} MB/s" if self.unit == "B" else f"{rate:9.0f} {self.unit}/s"
        self.stream.write(f"\r[{bar}] {frac * 100:5.1f}%  {speed}  "
                          f"ETA {int(eta) // 60:d}:{int(eta) % 60:02d} {self.description}")
        self.stream.flush()
        self.shown = True

    def finish(self) -> None:
        """End the bar's line (if it was shown)."""
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False


class _RichBar(Progress):
    backend = "rich"

    def __init__(self, stream: IO[str], description: str, unit: str) -> None:
        p = importlib.import_module("rich.progress")
        columns = [p.TextColumn("{task.description}"), p.BarColumn(),
                   p.TaskProgressColumn(),
                   p.TransferSpeedColumn() if unit == "B" else p.MofNCompleteColumn(),
                   p.TimeRemainingColumn()]
        console = importlib.import_module("rich.console").Console(file=stream)
        self._bar = p.Progress(*columns, console=console, transient=False)
        self._task = self._bar.add_task(description or "working", total=None)
        self._bar.start()
        self._done = False

    def __call__(self, done: int, total: int) -> None:
        self._bar.update(self._task, completed=done, total=total)

    def finish(self) -> None:
        if not self._done:
            self._done = True
            self._bar.stop()


class _TqdmBar(Progress):
    backend = "tqdm"

    def __init__(self, tqdm: Any, stream: IO[str], description: str, unit: str) -> None:
        self._args = {"desc": description or None, "unit": unit, "unit_scale": unit == "B",
                      "unit_divisor": 1024, "file": stream}
        self._tqdm = tqdm
        self._bar: Any = None  # made at the first report, when the total is known
        self._seen = 0

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:  # from ``done``: work may have begun before the bar
            self._bar = self._tqdm.tqdm(total=total, initial=done, **self._args)
            self._seen = done
        elif self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._seen)
        self._seen = done

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def wanted(enabled: bool | None, stream: IO[str] | None = None) -> bool:
    """Whether :func:`progress` would draw: ``enabled``, or (``None``) ``stream`` (default
    ``sys.stderr``) is a terminal."""
    out = sys.stderr if stream is None else stream
    return bool(getattr(out, "isatty", lambda: False)()) if enabled is None else enabled


def progress(description: str = "", *, unit: str = "B", enabled: bool | None = None,
             stream: IO[str] | None = None, backend: Backend = "auto") -> Progress:
    """A progress bar for work reported as ``bar(done, total)``.

    Args:
        description: what is being done (shown before the bar).
        unit: ``"B"`` for bytes (shown as a transfer rate), or a name such as ``"records"``.
        enabled: ``None`` (default): only when ``stream`` is a terminal; ``True``: always;
            ``False``: never (the bar draws nothing).
        stream: where to draw (default ``sys.stderr``).
        backend: ``"auto"`` picks rich, then tqdm, then the plain bar on a terminal, and the
            plain bar on anything else; or name one (``ImportError`` if it is not installed).
    """
    out = sys.stderr if stream is None else stream
    tty = wanted(None, out)
    if not wanted(enabled, out):
        return Progress()
    if backend == "rich":
        return _RichBar(out, description, unit)
    if backend == "tqdm":
        return _TqdmBar(importlib.import_module("tqdm"), out, description, unit)
    if backend == "auto" and tty:
        if _import("rich.progress") is not None:
            return _RichBar(out, description, unit)
        tqdm = _import("tqdm")
        if tqdm is not None:
            return _TqdmBar(tqdm, out, description, unit)
    return ProgressBar(out, description=description, unit=unit)


def add_progress_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--progress`` / ``--no-progress`` (``args.progress``: ``True``, ``False`` or
    ``None`` for "only on a terminal"), to pass as :func:`progress`'s ``enabled``."""
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar (default: only when stderr is a terminal)")
