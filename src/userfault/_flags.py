"""The kernel's userfaultfd constants as :class:`enum.IntFlag` classes.

Values are the kernel's uapi (``<linux/userfaultfd.h>``, ``<linux/fs.h>`` for PAGEMAP_SCAN);
a test checks each against the values compiled into the C extension.
"""

from __future__ import annotations

import enum

__all__ = [
    "ContinueMode",
    "CopyMode",
    "FaultFlag",
    "Feature",
    "Ioctl",
    "MoveMode",
    "PageCategory",
    "PoisonMode",
    "RegisterMode",
    "ScanFlag",
    "WriteProtectMode",
    "ZeropageMode",
]


class Feature(enum.IntFlag):
    """UFFD_FEATURE_* bits, negotiated in the UFFDIO_API handshake."""

    PAGEFAULT_FLAG_WP = 1 << 0
    EVENT_FORK = 1 << 1
    EVENT_REMAP = 1 << 2
    EVENT_REMOVE = 1 << 3
    MISSING_HUGETLBFS = 1 << 4
    MISSING_SHMEM = 1 << 5
    EVENT_UNMAP = 1 << 6
    SIGBUS = 1 << 7
    THREAD_ID = 1 << 8
    MINOR_HUGETLBFS = 1 << 9
    MINOR_SHMEM = 1 << 10
    EXACT_ADDRESS = 1 << 11
    WP_HUGETLBFS_SHMEM = 1 << 12
    WP_UNPOPULATED = 1 << 13
    POISON = 1 << 14
    WP_ASYNC = 1 << 15
    MOVE = 1 << 16


class Ioctl(enum.IntFlag):
    """Bits of the ``ioctls`` masks returned by UFFDIO_API and UFFDIO_REGISTER (1 << _UFFDIO_x)."""

    REGISTER = 1 << 0x00
    UNREGISTER = 1 << 0x01
    WAKE = 1 << 0x02
    COPY = 1 << 0x03
    ZEROPAGE = 1 << 0x04
    MOVE = 1 << 0x05
    WRITEPROTECT = 1 << 0x06
    CONTINUE = 1 << 0x07
    POISON = 1 << 0x08
    API = 1 << 0x3F


class RegisterMode(enum.IntFlag):
    """UFFDIO_REGISTER_MODE_*: which faults of a range the userfaultfd receives."""

    MISSING = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class CopyMode(enum.IntFlag):
    """UFFDIO_COPY_MODE_*."""

    DONTWAKE = 1 << 0
    WP = 1 << 1


class ZeropageMode(enum.IntFlag):
    """UFFDIO_ZEROPAGE_MODE_*."""

    DONTWAKE = 1 << 0


class WriteProtectMode(enum.IntFlag):
    """UFFDIO_WRITEPROTECT_MODE_*."""

    WP = 1 << 0
    DONTWAKE = 1 << 1


class ContinueMode(enum.IntFlag):
    """UFFDIO_CONTINUE_MODE_*."""

    DONTWAKE = 1 << 0
    WP = 1 << 1


class PoisonMode(enum.IntFlag):
    """UFFDIO_POISON_MODE_*."""

    DONTWAKE = 1 << 0


class MoveMode(enum.IntFlag):
    """UFFDIO_MOVE_MODE_*."""

    DONTWAKE = 1 << 0
    ALLOW_SRC_HOLES = 1 << 1


class FaultFlag(enum.IntFlag):
    """UFFD_PAGEFAULT_FLAG_*: why a page fault was reported."""

    WRITE = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class ScanFlag(enum.IntFlag):
    """PM_SCAN_* flags of the PAGEMAP_SCAN ioctl."""

    WP_MATCHING = 1 << 0
    CHECK_WPASYNC = 1 << 1


class PageCategory(enum.IntFlag):
    """PAGE_IS_* categories reported by PAGEMAP_SCAN."""

    WPALLOWED = 1 << 0
    WRITTEN = 1 << 1
    FILE = 1 << 2
    PRESENT = 1 << 3
    SWAPPED = 1 << 4
    PFNZERO = 1 << 5
    HUGE = 1 << 6
    SOFT_DIRTY = 1 << 7
