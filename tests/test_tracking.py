"""Write tracking with WP_ASYNC + PAGEMAP_SCAN on the real kernel."""

from __future__ import annotations

import os

import pytest

from userfault import PAGE_SIZE, PageCategory, Region, ScanFlag, _native
from userfault.errors import UffdError
from userfault.tracking import PageRange, WriteTracker, pagemap_scan

pytestmark = pytest.mark.timeout(30)


def test_written_pages_are_found_and_rearmed() -> None:
    with Region.anonymous(64 * PAGE_SIZE) as region, WriteTracker(region) as tracker:
        assert tracker.collect() == []
        view = memoryview(region)
        for page in (3, 4, 5, 40):
            view[page * PAGE_SIZE + 7] = 1  # resolved by the kernel, no handler thread
        base = region.address
        assert tracker.collect() == [
            PageRange(base + 3 * PAGE_SIZE, base + 6 * PAGE_SIZE, PageCategory.WRITTEN),
            PageRange(base + 40 * PAGE_SIZE, base + 41 * PAGE_SIZE, PageCategory.WRITTEN),
        ]
        assert tracker.collect() == []  # the scan write-protected them again
        view[10 * PAGE_SIZE] = 2
        assert tracker.written_bytes(reset=False) == PAGE_SIZE
        assert tracker.written_bytes() == PAGE_SIZE  # not reset by the previous call
        assert tracker.written_bytes() == 0
        # Reads never count as writes, and the data written is intact.
        assert bytes(view[3 * PAGE_SIZE + 7:3 * PAGE_SIZE + 8]) == b"\x01"
        view.release()


def test_writes_from_c_threads_and_the_kernel_count() -> None:
    with Region.anonymous(256 * PAGE_SIZE) as region, WriteTracker(region) as tracker:
        _native.touch(region.address, 100 * PAGE_SIZE, PAGE_SIZE, 1, 9, False)
        r, w = os.pipe()
        os.write(w, b"k" * 100)
        # A kernel-mode write (read() into the region) is tracked like a user write.
        os.readv(r, [memoryview(region)[200 * PAGE_SIZE:200 * PAGE_SIZE + 100]])
        os.close(r)
        os.close(w)
        assert tracker.written_bytes() == 101 * PAGE_SIZE


def test_pagemap_scan_lists_present_pages() -> None:
    with Region.anonymous(16 * PAGE_SIZE) as region:
        memoryview(region)[5 * PAGE_SIZE] = 1
        ranges, walk_end = pagemap_scan(region.address, region.address + region.size,
                                        category_mask=PageCategory.PRESENT)
        assert [(r.start - region.address) // PAGE_SIZE for r in ranges] == [5]
        assert type(ranges[0]) is PageRange and ranges[0].length == PAGE_SIZE
        assert type(ranges[0].categories) is PageCategory
        assert ranges[0].categories == PageCategory.PRESENT
        same = PageRange(*ranges[0])  # built in C, it is what Python builds
        assert ranges[0] == same and hash(ranges[0]) == hash(same) and same in set(ranges)
        assert walk_end == region.address + region.size
        with pytest.raises(ValueError, match="page aligned"):
            pagemap_scan(region.address + 1, region.address + PAGE_SIZE)


def test_wp_matching_without_wp_registration_is_a_clear_error() -> None:
    with Region.anonymous(4 * PAGE_SIZE) as region:
        memoryview(region)[0] = 1
        with pytest.raises(UffdError, match="PAGEMAP_SCAN"):
            pagemap_scan(region.address, region.address + region.size,
                         flags=ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC,
                         category_mask=PageCategory.WRITTEN)


def test_one_percent_written_of_a_large_region_is_reported_exactly() -> None:
    size = 256 << 20
    with Region.anonymous(size) as region, WriteTracker(region) as tracker:
        stride = 100 * PAGE_SIZE
        _native.touch(region.address, size, stride, 1, 1, False)
        assert tracker.written_bytes() == len(range(0, size, stride)) * PAGE_SIZE
