"""Write tracking with asynchronous write-protection and PAGEMAP_SCAN (Linux ≥ 6.7).

`WriteTracker` write-protects a region with ``UFFD_FEATURE_WP_ASYNC``: the kernel resolves each
first write itself (no fault message, ~1 µs) and clears the page's protection, and
``PAGEMAP_SCAN`` lists the written pages, re-protecting them in the same call. This is how
dirty pages are found for incremental snapshots, migration rounds and write-back, with no
handler thread at all.

:func:`pagemap_scan` is the raw ioctl on ``/proc/self/pagemap``.
"""

from __future__ import annotations

import errno
import os
from typing import NamedTuple

from . import _native
from ._flags import Feature, PageCategory, RegisterMode, ScanFlag
from .errors import error_from_errno
from .region import Region
from .uffd import Uffd

__all__ = ["PageRange", "WriteTracker", "pagemap_scan"]


class PageRange(NamedTuple):
    """Pages ``[start, end)`` sharing ``categories``. A named tuple (so it also unpacks and
    compares as ``(start, end, categories)``): a scan of a GiB makes thousands, and a frozen
    dataclass cost three times as much to build."""

    start: int
    end: int
    categories: PageCategory

    @property
    def length(self) -> int:
        """Bytes in the range."""
        return self.end - self.start


def pagemap_scan(
    start: int,
    end: int,
    *,
    flags: ScanFlag = ScanFlag(0),
    category_mask: PageCategory = PageCategory(0),
    category_inverted: PageCategory = PageCategory(0),
    category_anyof: PageCategory = PageCategory(0),
    return_mask: PageCategory | None = None,
    max_pages: int = 0,
    max_ranges: int = 4096,
    pagemap_fd: int | None = None,
) -> tuple[list[PageRange], int]:
    """PAGEMAP_SCAN over ``[start, end)`` of this process.

    A page matches when its categories, XORed with ``category_inverted``, include all of
    ``category_mask`` and any of ``category_anyof`` (when given). Returns the matching ranges
    (their categories filtered by ``return_mask``) and the address where the walk stopped
    (``end`` unless ``max_pages`` or ``max_ranges`` cut it short).
    """
    if start % os.sysconf("SC_PAGE_SIZE") or end <= start:
        raise ValueError(f"scan range [{start:#x}, {end:#x}) must be page aligned and non-empty")
    ret = (category_mask | category_anyof) if return_mask is None else return_mask
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC) if pagemap_fd is None \
        else pagemap_fd
    try:
        ranges, walk_end, err = _native.pagemap_scan(
            fd, start, end, int(flags), int(category_inverted), int(category_mask),
            int(category_anyof), int(ret), max_pages, max_ranges, PageRange, PageCategory)
    finally:
        if pagemap_fd is None:
            os.close(fd)
    if err:
        raise error_from_errno(err, "PAGEMAP_SCAN", address=start, length=end - start,
                               hint="PAGEMAP_SCAN needs Linux >= 6.7; WP_MATCHING needs the "
                                    "range registered in WP mode with WP_ASYNC")
    return ranges, walk_end


class WriteTracker:
    """Find the pages of ``region`` written since the last :meth:`collect`.

    Example::

        with Region.anonymous(1 << 30) as region, WriteTracker(region) as tracker:
            ...                                  # writes
            dirty = tracker.collect()            # [PageRange(...)], protection re-armed
    """

    def __init__(self, region: Region) -> None:
        self.region = region
        self.uffd = Uffd(Feature.PAGEFAULT_FLAG_WP | Feature.WP_ASYNC | Feature.WP_UNPOPULATED,
                         required=Feature.WP_ASYNC | Feature.WP_UNPOPULATED)
        try:
            self.uffd.register(region.address, region.size, RegisterMode.WP)
            self.uffd.writeprotect(region.address, region.size, True)
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self.uffd.close()
            raise

    def collect(self, *, reset: bool = True, offset: int = 0,
                length: int | None = None) -> list[PageRange]:
        """Written ranges since the last reset; ``reset`` write-protects them again.

        ``offset`` and ``length`` (page aligned) limit the scan to part of the region.
        """
        if self._pagemap < 0:
            raise ValueError("the tracker is closed")
        size = self.region.size - offset if length is None else length
        if offset < 0 or size <= 0 or offset + size > self.region.size:
            raise ValueError(f"[{offset}, {offset + size}) is not a part of the "
                             f"{self.region.size}-byte region")
        flags = ScanFlag.CHECK_WPASYNC | (ScanFlag.WP_MATCHING if reset else ScanFlag(0))
        out: list[PageRange] = []
        start = self.region.address + offset
        end = start + size
        while start < end:
            ranges, walk_end = pagemap_scan(
                start, end, flags=flags, category_mask=PageCategory.WRITTEN,
                return_mask=PageCategory.WRITTEN, pagemap_fd=self._pagemap)
            out.extend(ranges)
            if walk_end <= start:
                raise OSError(errno.EIO, f"PAGEMAP_SCAN made no progress at {start:#x}")
            start = walk_end
        return out

    def written_ranges(self, *, reset: bool = True) -> list[tuple[int, int]]:
        """Like :meth:`collect`, as ``(offset, length)`` pairs from the region's start: the
        ``written=`` of a delta snapshot
        (:func:`~userfault.sources.snapshot.create_snapshot` with ``base=``)."""
        return [(r.start - self.region.address, r.length) for r in self.collect(reset=reset)]

    def written_bytes(self, *, reset: bool = True) -> int:
        """Bytes written since the last reset."""
        return sum(r.length for r in self.collect(reset=reset))

    def close(self) -> None:
        """Stop tracking (unregisters the region); idempotent."""
        if self._pagemap >= 0:
            os.close(self._pagemap)
            self._pagemap = -1
        self.uffd.close()

    def __enter__(self) -> WriteTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
