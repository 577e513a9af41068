"""`ServeConfig`: how faults are served, one frozen object validated once.

The same object configures the engine in this process, crosses into a pager process as itself
(pickled, not as a dict) and configures the Firecracker pager. Bounds come from the C engine
(``userfault._native``), so the two cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

from .. import _native
from .._units import human, parse_size

__all__ = ["DEFAULT_READAHEAD", "OnError", "OnRemove", "ServeConfig", "SizeLike"]

OnError = Literal["poison", "retry", "zero"]
OnRemove = Literal["reload", "zero"]
SizeLike = int | str

MAX_THREADS: int = _native.UF_MAX_THREADS
MAX_CHUNK: int = _native.UF_MAX_CHUNK
MAX_PIECE: int = _native.UF_MAX_PIECE
MAX_LOG: int = _native.UF_MAX_LOG
MAX_RETRIES: int = _native.UF_MAX_RETRIES
MAX_READAHEAD = 1 << 30
MAX_TIMEOUT = 86400.0
MAX_RESTARTS = 10_000
MAX_RESIDENT = 1 << 50
DEFAULT_READAHEAD = (64 << 10, 4 << 20)
ON_ERROR: tuple[OnError, ...] = ("poison", "retry", "zero")
ON_REMOVE: tuple[OnRemove, ...] = ("reload", "zero")


def _size(option: str, value: object, top: int, *, low: int = 0) -> int:
    """A byte count given as an int or a size string, within [low, top]; None is 0."""
    if value is None:
        return 0
    if isinstance(value, str):
        try:
            value = parse_size(value)
        except ValueError as err:
            raise ValueError(f"{option}: {err}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{option} must be a byte count (an int or a size such as '64K'), "
                         f"not {value!r}")
    if not low <= value <= top:
        raise ValueError(f"{option} must be between {low} and {top} bytes ({human(top)}), "
                         f"not {value}")
    return value


def _int(option: str, value: object, low: int, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{option} must be an integer between {low} and {top}, not {value!r}")
    if not low <= value <= top:
        raise ValueError(f"{option} must be between {low} and {top}, not {value}")
    return value


def _readahead(value: object) -> tuple[int, int]:
    if value is True:
        return DEFAULT_READAHEAD
    if value is False or value is None or value == 0:
        return (0, 0)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError("readahead must be True, False or (min, max) window sizes, "
                         f"not {value!r}")
    lo = _size("readahead min", value[0], MAX_READAHEAD)
    hi = _size("readahead max", value[1], MAX_READAHEAD)
    if lo > hi:
        raise ValueError(f"readahead min ({human(lo)}) is larger than readahead max "
                         f"({human(hi)}): give (min, max)")
    return (lo, hi)


@dataclass(frozen=True)
class ServeConfig:
    """How an engine serves faults, in every runtime.

    Sizes are bytes, as ints or strings (``"64K"``, ``"4MiB"``); they are rounded up to the
    page size of the memory served (:meth:`for_page`).

    Attributes:
        chunk: bytes installed per fault (0: one page).
        readahead: ``(min, max)`` window for sequential faults (``(0, 0)``: off). ``True``
            and ``False`` are accepted and normalised.
        populate: fill everything in the background while faults go first.
        threads: fault-serving threads.
        log_faults: capacity of the fault log (0: no log).
        on_error: what a page that cannot be read becomes after ``retries``: ``"poison"``
            (the access gets SIGBUS), ``"zero"`` (explicit zeros, still reported) or
            ``"retry"`` (a fault keeps waiting for the source to come back).
        retries: extra attempts for a page whose read failed.
        timeout: seconds one read of a Python source may take before it is cut (the pager
            process's worker is replaced; the read counts as failed).
        on_remove: what a page given back with ``MADV_DONTNEED`` or ``MADV_REMOVE`` reads
            afterwards: ``"reload"`` (from the source; the default) or ``"zero"`` (zeros, as a
            balloon-inflated guest page should).
        piece: bytes per background install (readahead, populate, prefetch; 0: the engine's
            default, ``UF_DEFAULT_PIECE`` = 256 KiB for native sources and ``UF_PYTHON_PIECE``
            = 512 KiB for Python sources, which pay a call per piece).
        max_restarts: worker deaths in a row after which a pager process stops replacing it
            and every fault gets SIGBUS.
        max_resident: the most memory the pager keeps installed (0: no limit). Above the high
            watermark, pages are given back (CLOCK: pages faulted in since the last turn stay)
            until the low watermark; they fault in again from the source. Pages written in
            memory are never given back unwritten: a writable pager writes them home first; a
            read-only one keeps them (they are the process's own, as a private mapping's
            written pages are), so they can hold memory above the budget.
        watermarks: ``(low, high)`` fractions of ``max_resident`` (default 70 % and 90 %).
        writable: write the pages written in memory back to the source: on ``flush()``,
            before a written page is evicted, and on ``close()`` (like ``msync``).
    """

    chunk: int = 0
    readahead: tuple[int, int] = DEFAULT_READAHEAD
    populate: bool = False
    threads: int = 1
    log_faults: int = 0
    on_error: OnError = "poison"
    retries: int = 3
    timeout: float = 30.0
    on_remove: OnRemove = "reload"
    piece: int = 0
    max_restarts: int = 20
    max_resident: int = 0
    watermarks: tuple[float, float] = (0.7, 0.9)
    writable: bool = False

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "chunk", _size("chunk", self.chunk, MAX_CHUNK))
        put(self, "readahead", _readahead(self.readahead))
        if not isinstance(self.populate, bool):
            raise ValueError(f"populate must be True or False, not {self.populate!r}")
        _int("threads", self.threads, 1, MAX_THREADS)
        _int("log_faults", self.log_faults, 0, MAX_LOG)
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, "
                             f"not {self.on_error!r}")
        _int("retries", self.retries, 0, MAX_RETRIES)
        timeout = self.timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
                not math.isfinite(timeout) or not 0 < timeout <= MAX_TIMEOUT:
            raise ValueError(f"timeout must be a number of seconds in (0, {MAX_TIMEOUT:g}], "
                             f"not {timeout!r}")
        put(self, "timeout", float(timeout))
        if self.on_remove not in ON_REMOVE:
            raise ValueError(f"on_remove must be one of {', '.join(ON_REMOVE)}, "
                             f"not {self.on_remove!r}")
        piece = _size("piece", self.piece, MAX_PIECE)
        if piece % 4096:
            raise ValueError(f"piece must be a multiple of 4096 bytes, not {piece}")
        put(self, "piece", piece)
        _int("max_restarts", self.max_restarts, 0, MAX_RESTARTS)
        put(self, "max_resident", _size("max_resident", self.max_resident, MAX_RESIDENT))
        wm = self.watermarks
        if not isinstance(wm, (tuple, list)) or len(wm) != 2 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in wm) or \
                not 0 < wm[0] < wm[1] <= 1:
            raise ValueError(f"watermarks must be (low, high) fractions with 0 < low < high "
                             f"<= 1, not {wm!r}")
        put(self, "watermarks", (float(wm[0]), float(wm[1])))
        if not isinstance(self.writable, bool):
            raise ValueError(f"writable must be True or False, not {self.writable!r}")

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The names a config takes (``Pager`` and ``map`` accept them as keywords)."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> ServeConfig:
        """A config from the serving options among ``options`` (the rest is left alone)."""
        return cls(**{k: options[k] for k in cls.option_names() if k in options})

    @property
    def tracks_writes(self) -> bool:
        """Whether pages are installed write-protected so that writes are seen: to write
        them back (``writable``), or to keep them under a budget rather than drop them."""
        return self.writable or self.max_resident > 0

    def budget(self, page_size: int) -> tuple[int, int, int]:
        """``(max_resident, low, high)`` in bytes, whole pages (zeros: no budget).

        Raises:
            ValueError: the budget holds fewer than 4 pages of ``page_size``.
        """
        if not self.max_resident:
            return 0, 0, 0
        if self.max_resident < 4 * page_size:
            raise ValueError(f"max_resident must hold at least 4 pages of {human(page_size)}, "
                             f"not {self.max_resident} bytes")
        low, high = (max(1, int(self.max_resident * f) // page_size) for f in self.watermarks)
        return self.max_resident, low * page_size, max(high, low + 1) * page_size

    def for_page(self, page_size: int) -> tuple[int, int, int]:
        """``(chunk, readahead_min, readahead_max)`` rounded up to ``page_size``."""
        def up(n: int) -> int:
            return -(-n // page_size) * page_size

        lo, hi = self.readahead
        return max(page_size, up(self.chunk)), up(lo), up(hi)
