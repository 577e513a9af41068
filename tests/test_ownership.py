"""A failed constructor owns nothing: every factory of the binding, refused for real.

Each case makes the kernel (or the peer) refuse, then checks ``/proc/self/fd`` (and the
mappings) before and after: nothing leaked, and a descriptor the caller passed in is still
open and still works.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import socket

import pytest

from userfault import (
    HUGE_PAGE_SIZE,
    PAGE_SIZE,
    BadArgumentError,
    Feature,
    FeatureUnavailableError,
    Ioctl,
    PermissionDeniedError,
    Region,
    Uffd,
    UffdError,
    _native,
    hugepages_free,
    recv_uffd,
)

pytestmark = pytest.mark.timeout(20)

UNKNOWN = Feature(1 << 30)  # a feature bit no kernel defines


def open_fds() -> dict[int, str]:
    """``/proc/self/fd``: descriptor -> what it is (garbage of earlier tests collected first,
    so that its sockets do not close in the middle of a comparison)."""
    gc.collect()
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the descriptor listdir itself used
            pass
    return out


def leaked(before: dict[int, str]) -> dict[int, str]:
    """Descriptors open now that were not (as the same thing) in ``before``."""
    return {fd: what for fd, what in open_fds().items() if before.get(fd) != what}


def memfd_maps() -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f.read().splitlines() if "memfd:" in line]


def new_uffd_fd() -> int:
    fd, err = _native.open_syscall(os.O_CLOEXEC | os.O_NONBLOCK)
    assert err == 0
    return int(fd)


# -- Uffd.from_fd ----------------------------------------------------------------------------


def test_from_fd_refused_handshake_keeps_the_callers_fd() -> None:
    fd = new_uffd_fd()
    before = open_fds()
    with pytest.raises(BadArgumentError) as info:
        Uffd.from_fd(fd, features=UNKNOWN, handshake=True)
    assert str(info.value) == (
        f"UFFDIO_API failed: Invalid argument (errno 22); the kernel refused features "
        f"{UNKNOWN!r} on fd {fd}; the descriptor is still yours (open, and UFFDIO_API may be "
        "retried on it)")
    del info  # the half-built object dies with the traceback: its __del__ must not close fd
    assert leaked(before) == {}
    assert open_fds()[fd] == "anon_inode:[userfaultfd]"  # still open: the caller's
    # The kernel allows UFFDIO_API again after a refused one: the caller retries on its fd.
    with Uffd.from_fd(fd, features=Feature.THREAD_ID, handshake=True) as u, \
            Region.anonymous(PAGE_SIZE) as r:
        assert u.features == Feature.THREAD_ID and u.ioctls & Ioctl.REGISTER
        assert u.register(r.address, r.size) & Ioctl.COPY
    assert fd not in open_fds()  # the successful adoption did own it, and closed it


def test_from_fd_on_a_closed_number_never_closes_its_next_owner() -> None:
    """``from_fd(n, nonblocking=...)`` on a closed number fails; the number is then reused by
    an unrelated open. The failed object must not close it when it is collected."""
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    os.close(fd)
    with pytest.raises(OSError) as info:
        Uffd.from_fd(fd, nonblocking=True)
    assert info.value.errno == errno.EBADF
    reused = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert reused == fd  # the lowest free number: the one the failed call was given
        del info
        gc.collect()
        assert os.readlink(f"/proc/self/fd/{reused}") == "/dev/null"
    finally:
        os.close(reused)


# -- Uffd() ----------------------------------------------------------------------------------


def test_uffd_refused_for_an_unknown_required_feature_leaks_nothing() -> None:
    before = open_fds()
    with pytest.raises(FeatureUnavailableError) as info:
        Uffd(required=UNKNOWN)
    assert info.value.missing == ["0x40000000"]
    assert str(info.value).startswith(
        "this kernel does not offer the required userfaultfd feature(s) 0x40000000 (offered: ")
    del info
    assert leaked(before) == {}


def test_uffd_refused_by_the_kernel_unprivileged_leaks_nothing(child) -> None:
    """EVENT_FORK without CAP_SYS_PTRACE: the kernel refuses the handshake with EPERM."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges")

    def body(wfd: int) -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        before = open_fds()
        report: dict[str, object] = {}
        try:
            Uffd(Feature.EVENT_FORK)
        except PermissionDeniedError as err:
            report["error"] = str(err)
        report["same_fds"] = leaked(before) == {}
        os.write(wfd, json.dumps(report).encode())

    status, out = child(body)
    assert os.waitstatus_to_exitcode(status) == 0, out
    report = json.loads(out)
    assert report["error"] == (
        "UFFDIO_API failed: Operation not permitted (errno 1); EVENT_FORK needs CAP_SYS_PTRACE "
        "(Linux 5.11+): run with that capability or do not ask for EVENT_FORK")
    assert report["same_fds"] is True


# -- recv_uffd -------------------------------------------------------------------------------


def test_recv_uffd_closes_the_extra_descriptors() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    with a, b, Uffd() as sent:
        socket.send_fds(a, [b"x"], [sent.fileno(), r, w])
        before = open_fds()
        got, payload = recv_uffd(b)
        with got:
            assert payload == b"x"
            # Only the userfaultfd is new: the two pipe ends that came with it were closed.
            assert leaked(before) == {got.fileno(): "anon_inode:[userfaultfd]"}
    os.close(r)
    os.close(w)


def test_recv_uffd_refuses_a_descriptor_that_is_not_a_userfaultfd() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    with a, b:
        socket.send_fds(a, [b"x"], [r])
        before = open_fds()
        with pytest.raises(UffdError) as info:
            recv_uffd(b)
        assert info.value.errno == errno.EBADMSG
        assert str(info.value) == (f"the descriptor received is not a userfaultfd (it is "
                                   f"{os.readlink(f'/proc/self/fd/{r}')!r}); it was closed")
        assert leaked(before) == {}
    os.close(r)
    os.close(w)


def test_recv_uffd_without_a_descriptor_leaks_nothing() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"no fd")  # no SCM_RIGHTS
        before = open_fds()
        with pytest.raises(UffdError, match=r"^the message carried no file descriptor"):
            recv_uffd(b)
        assert leaked(before) == {}


# -- Region ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("maker", "what"), [
    (lambda: Region.anonymous(1 << 60), "an anonymous region"),
    (lambda: Region.shared_memfd(1 << 60), "a memfd region"),  # memfd made, then mmap fails
], ids=["anonymous", "memfd"])
def test_region_refused_by_mmap_leaks_nothing(maker, what: str) -> None:
    fds, mapped = open_fds(), memfd_maps()
    with pytest.raises(UffdError) as info:
        maker()
    assert str(info.value) == f"mmap of {what} failed: Cannot allocate memory (errno 12)"
    assert info.value.errno == errno.ENOMEM
    assert leaked(fds) == {}  # the memfd was closed
    assert memfd_maps() == mapped


def test_region_hugetlb_refused_leaks_nothing() -> None:
    need = hugepages_free() + 1
    fds, mapped = open_fds(), memfd_maps()
    with pytest.raises(UffdError, match=rf"needs {need} free 2 MiB pages"):
        Region.hugetlb(need * HUGE_PAGE_SIZE, shared=True)
    assert leaked(fds) == {} and memfd_maps() == mapped
