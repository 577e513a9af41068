"""`Region`: page-aligned memory to register with a userfaultfd.

Three kinds: private anonymous memory (MISSING, WP, MOVE), a shared mapping of a memfd (also
MINOR + CONTINUE, since its page cache can be filled separately) and hugetlb memory (2 MiB
pages, when pages are reserved in ``/proc/sys/vm/nr_hugepages``). A region supports the
buffer protocol: ``memoryview(region)``, ``numpy.frombuffer(region)``, ``bytes(region)``.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import Literal, final

from . import _native
from .errors import BadArgumentError, ClosedError, UffdError, error_from_errno
from .uffd import PAGE_SIZE

__all__ = ["HUGE_PAGE_SIZE", "Region", "RegionKind", "align_down", "align_up", "hugepages_free"]

HUGE_PAGE_SIZE = 2 << 20
_MAP_NORESERVE = 0x4000
_MAP_HUGETLB = 0x40000
_MAP_HUGE_2MB = 21 << 26
_MFD_HUGETLB = 0x4

RegionKind = Literal["anonymous", "memfd", "hugetlb"]


def align_down(value: int, alignment: int = PAGE_SIZE) -> int:
    """Round ``value`` down to a multiple of ``alignment`` (a power of two)."""
    return value & ~(alignment - 1)


def align_up(value: int, alignment: int = PAGE_SIZE) -> int:
    """Round ``value`` up to a multiple of ``alignment`` (a power of two)."""
    return (value + alignment - 1) & ~(alignment - 1)


def hugepages_free() -> int:
    """Free 2 MiB huge pages in the pool (``HugePages_Free`` of /proc/meminfo)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


@final
class Region(_native.Mapping):
    """A mapping of ``size`` bytes at ``address``; create it with a class method.

    Attributes:
        address: start address (page aligned).
        size: length in bytes (a multiple of ``page_size``).
        page_size: 4 KiB, or 2 MiB for hugetlb.
        kind: ``"anonymous"``, ``"memfd"`` or ``"hugetlb"``.
        memfd: the backing memfd descriptor for memfd regions (and shared hugetlb), else -1.
    """

    address: int
    size: int
    page_size: int
    kind: RegionKind
    memfd: int

    def __init__(self, address: int, size: int, page_size: int, kind: RegionKind,
                 memfd: int = -1) -> None:
        """Adopt a mapping made by a class method; use those instead."""
        self.address, self.size, self.page_size, self.kind, self.memfd = (
            address, size, page_size, kind, memfd)
        self._attach(address, size, False)

    @staticmethod
    def _map(size: int, flags: int, fd: int, what: str) -> int:
        addr, err = _native.mmap(0, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
        if err:
            raise error_from_errno(err, f"mmap of {what}", length=size)
        return int(addr)

    @staticmethod
    def _size(size: int, page: int) -> int:
        if size <= 0:
            raise BadArgumentError(errno.EINVAL, f"a region needs a positive size, not {size}",
                                   operation="Region", length=size)
        return align_up(size, page)

    @classmethod
    def anonymous(cls, size: int) -> Region:
        """Private anonymous memory, rounded up to whole pages. Supports MISSING, WP, MOVE."""
        size = cls._size(size, PAGE_SIZE)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        return cls(cls._map(size, flags, -1, "an anonymous region"), size, PAGE_SIZE, "anonymous")

    @classmethod
    def shared_memfd(cls, size: int, name: str = "userfault") -> Region:
        """A shared mapping of a new memfd. Supports MISSING, WP and MINOR (+ CONTINUE)."""
        size = cls._size(size, PAGE_SIZE)
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            addr = cls._map(size, mmap.MAP_SHARED, fd, "a memfd region")
        except BaseException:
            os.close(fd)
            raise
        return cls(addr, size, PAGE_SIZE, "memfd", fd)

    @classmethod
    def hugetlb(cls, size: int, *, shared: bool = False) -> Region:
        """2 MiB hugetlb pages, rounded up to whole huge pages.

        Needs free pages in the pool (``echo N > /proc/sys/vm/nr_hugepages``). ``shared``
        backs it with a hugetlb memfd, which MINOR mode needs. No ZEROPAGE on hugetlb.
        """
        size = cls._size(size, HUGE_PAGE_SIZE)
        need, free = size // HUGE_PAGE_SIZE, hugepages_free()
        if free < need:
            raise UffdError(
                errno.ENOMEM,
                f"a {size}-byte hugetlb region needs {need} free 2 MiB pages and the pool has "
                f"{free}; reserve them with `echo {need} > /proc/sys/vm/nr_hugepages` (as root)",
                operation="Region.hugetlb", length=size)
        if not shared:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_HUGETLB | _MAP_HUGE_2MB
            addr = cls._map(size, flags, -1, "a hugetlb region")
            return cls(addr, size, HUGE_PAGE_SIZE, "hugetlb")
        fd = os.memfd_create("userfault-huge", os.MFD_CLOEXEC | _MFD_HUGETLB)
        try:
            os.ftruncate(fd, size)
            addr = cls._map(size, mmap.MAP_SHARED, fd, "a hugetlb memfd region")
        except BaseException:
            os.close(fd)
            raise
        return cls(addr, size, HUGE_PAGE_SIZE, "hugetlb", fd)

    @property
    def closed(self) -> bool:
        """Whether the region was unmapped."""
        return self.address == 0

    def check_open(self) -> None:
        """Raise :class:`ClosedError` if the region was unmapped."""
        if self.closed:
            raise ClosedError(errno.EBADF, "the region is unmapped", operation="Region")

    def madvise(self, advice: int, offset: int = 0, length: int | None = None) -> None:
        """madvise() on part of the region, e.g. ``mmap.MADV_DONTNEED`` to drop pages."""
        self.check_open()
        length = self.size - offset if length is None else length
        if offset < 0 or length <= 0 or offset + length > self.size or offset % self.page_size:
            raise BadArgumentError(
                errno.EINVAL, f"madvise range [{offset}, +{length}) must be page aligned and "
                f"inside the region's {self.size} bytes", operation="madvise",
                address=self.address + offset, length=length)
        err = _native.madvise(self.address + offset, align_up(length, self.page_size), advice)
        if err:
            raise error_from_errno(err, "madvise", address=self.address + offset, length=length)

    def close(self) -> None:
        """Unmap the region (idempotent). Fails with BufferError while views are alive."""
        if self.closed:
            return
        self._detach()
        address, self.address = self.address, 0
        err = _native.munmap(address, self.size)
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1
        if err:
            raise error_from_errno(err, "munmap", address=address, length=self.size)

    unmap = close

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        where = "unmapped" if self.closed else f"at {self.address:#x}"
        return f"<Region {self.kind} {self.size} bytes {where}>"
