"""Region: anonymous, memfd and hugetlb memory with the buffer protocol."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import numpy as np
import pytest

from userfault import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    BadArgumentError,
    ClosedError,
    Ioctl,
    Region,
    RegisterMode,
    Uffd,
    UffdError,
    align_down,
    align_up,
    hugepages_free,
)

pytestmark = pytest.mark.timeout(20)
P = PAGE_SIZE


def test_anonymous_rounding_and_attributes() -> None:
    with Region.anonymous(1) as r:
        assert (r.size, r.page_size, r.kind, r.memfd, len(r)) == (P, P, "anonymous", -1, P)
        assert r.address % P == 0 and not r.closed
        assert repr(r) == f"<Region anonymous {P} bytes at {r.address:#x}>"
    assert r.closed and repr(r) == f"<Region anonymous {P} bytes unmapped>"
    r.close()  # idempotent
    with pytest.raises(ClosedError, match=r"^the region is unmapped$"):
        r.check_open()
    with pytest.raises(ValueError, match="the region is unmapped"):
        memoryview(r)


@pytest.mark.parametrize("maker", [Region.anonymous, Region.shared_memfd])
def test_zero_size(maker) -> None:
    with pytest.raises(BadArgumentError, match=r"^a region needs a positive size, not 0$"):
        maker(0)


def test_align() -> None:
    assert (align_down(P + 1), align_up(P + 1), align_up(0), align_up(P)) == (P, 2 * P, 0, P)
    assert align_up(1, HUGE_PAGE_SIZE) == HUGE_PAGE_SIZE


def test_buffer_protocol() -> None:
    with Region.anonymous(2 * P) as r:
        view = memoryview(r)
        assert (view.nbytes, view.readonly) == (2 * P, False)
        view[:3] = b"abc"
        arr = np.frombuffer(r, dtype=np.uint8)
        arr[P] = 7
        assert bytes(r)[:3] == b"abc" and bytes(r)[P] == 7
        with pytest.raises(BufferError, match=r"2 buffer view\(s\) of the region"):
            r.close()
        assert not r.closed
        view.release()
        del arr
        r.close()
        assert r.closed


def test_memfd_shares_its_page_cache() -> None:
    with Region.shared_memfd(2 * P, name="t") as r:
        assert (r.kind, r.page_size) == ("memfd", P)
        os.pwrite(r.memfd, b"via fd", P)
        assert bytes(memoryview(r)[P:P + 6]) == b"via fd"
        memoryview(r)[:4] = b"map!"
        assert os.pread(r.memfd, 4, 0) == b"map!"
        fd = r.memfd
    assert r.memfd == -1
    link = f"/proc/self/fd/{fd}"
    assert not os.path.exists(link) or not os.readlink(link).startswith("/memfd:t")


def test_madvise() -> None:
    with Region.anonymous(3 * P) as r:
        memoryview(r)[:] = b"x" * 3 * P
        r.madvise(mmap.MADV_DONTNEED, P, P)
        assert bytes(r) == b"x" * P + bytes(P) + b"x" * P
        r.madvise(mmap.MADV_DONTNEED)
        assert bytes(r) == bytes(3 * P)
        for offset, length in [(1, P), (-P, P), (0, 0), (2 * P, 2 * P)]:
            with pytest.raises(BadArgumentError, match=r"must be page aligned and inside the "
                                                       r"region's 12288 bytes"):
                r.madvise(mmap.MADV_DONTNEED, offset, length)
        with pytest.raises(UffdError) as info:
            r.madvise(12345)  # an advice the kernel does not know
        assert info.value.operation == "madvise"
    with pytest.raises(ClosedError):
        r.madvise(mmap.MADV_DONTNEED)


@pytest.fixture
def two_huge_pages() -> Iterator[None]:
    path = "/proc/sys/vm/nr_hugepages"
    if hugepages_free() >= 2:
        yield
        return
    try:
        with open(path) as f:
            old = int(f.read())
        with open(path, "w") as f:
            f.write(str(old + 2))
    except OSError as err:
        pytest.skip(f"cannot reserve huge pages: {err}")
    try:
        if hugepages_free() < 2:
            pytest.skip("the kernel could not reserve 2 free huge pages (fragmented memory)")
        yield
    finally:
        with open(path, "w") as f:
            f.write(str(old))


def test_hugetlb(two_huge_pages: None) -> None:
    with Region.hugetlb(1) as r, Uffd() as u:
        assert (r.size, r.page_size, r.kind) == (HUGE_PAGE_SIZE, HUGE_PAGE_SIZE, "hugetlb")
        ioctls = u.register(r.address, r.size)
        assert ioctls & Ioctl.COPY and not ioctls & Ioctl.ZEROPAGE
        with pytest.raises(BadArgumentError, match="ZEROPAGE is not available on hugetlb"):
            u.zeropage(r.address, r.size)
        assert u.copy(r.address, b"h" * HUGE_PAGE_SIZE) == HUGE_PAGE_SIZE
        assert bytes(memoryview(r)[-2:]) == b"hh"
    with Region.hugetlb(HUGE_PAGE_SIZE, shared=True) as r, Uffd() as u:
        assert r.memfd >= 0
        assert u.register(r.address, r.size, RegisterMode.MINOR) & Ioctl.CONTINUE


def test_hugetlb_without_free_pages_says_what_to_do() -> None:
    need = hugepages_free() + 1
    with pytest.raises(UffdError, match=rf"needs {need} free 2 MiB pages .* "
                                        rf"`echo {need} > /proc/sys/vm/nr_hugepages`"):
        Region.hugetlb(need * HUGE_PAGE_SIZE)
