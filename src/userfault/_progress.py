"""A one-line progress bar for long work (snapshot creation, populate, prefetch)."""

from __future__ import annotations

import time
from typing import TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """A ``\\r`` progress bar on ``stream``: percent, MB/s and ETA; call it as
    ``bar(done, total)``, then :meth:`finish`."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.start = time.monotonic()
        self.last = 0.0
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        frac = done / total if total else 1.0
        filled = int(frac * self.width)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else 0.0
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r[{bar}] {frac * 100:5.1f}%  {rate / 1e6:7.1f} MB/s  "
                          f"ETA {int(eta) // 60:d}:{int(eta) % 60:02d} ")
        self.stream.flush()
        self.shown = True

    def finish(self) -> None:
        """End the bar's line (if it was shown)."""
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
