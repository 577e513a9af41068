"""`Uffd`: a userfaultfd, one method per ioctl.

Every method is a call into the C extension that releases the GIL. Arguments are checked
before any syscall (alignment, zero length, closed fd) and kernel errors become typed
:mod:`userfault.errors` with the operation, address and length attached.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Literal, final

from . import _native
from ._events import MSG_SIZE, Event, Fork, parse_messages
from ._flags import (
    ContinueMode,
    CopyMode,
    Feature,
    Ioctl,
    MoveMode,
    PoisonMode,
    RegisterMode,
    WriteProtectMode,
    ZeropageMode,
)
from .errors import (
    BadArgumentError,
    ClosedError,
    FeatureUnavailableError,
    PermissionDeniedError,
    UffdError,
    UserModeOnlyWarning,
    error_from_errno,
)

__all__ = ["DEFAULT_FEATURES", "PAGE_SIZE", "CreationMethod", "Uffd", "offered_features",
           "recv_uffd", "send_uffd"]

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

#: Features that change nothing unless used: requested by default wherever the kernel has them.
#: The event features (FORK, REMAP, REMOVE, UNMAP) make the kernel block the process until the
#: event is read, and SIGBUS/WP_ASYNC change what faults do, so those are opt-in.
DEFAULT_FEATURES = (
    Feature.PAGEFAULT_FLAG_WP | Feature.MISSING_HUGETLBFS | Feature.MISSING_SHMEM
    | Feature.THREAD_ID | Feature.MINOR_HUGETLBFS | Feature.MINOR_SHMEM
    | Feature.WP_HUGETLBFS_SHMEM | Feature.POISON | Feature.MOVE
)

CreationMethod = Literal["dev", "syscall"]

_O_CLOEXEC = os.O_CLOEXEC
_O_NONBLOCK = os.O_NONBLOCK
_USER_MODE_ONLY = int(_native.UFFD_USER_MODE_ONLY)


def _open(order: Sequence[CreationMethod], flags: int) -> tuple[int, CreationMethod]:
    reasons = []
    for method in order:
        opener = _native.open_dev if method == "dev" else _native.open_syscall
        fd, err = opener(flags)
        if fd >= 0:
            return fd, method
        where = "/dev/userfaultfd" if method == "dev" else "the userfaultfd() syscall"
        reasons.append((err, f"{where}: {os.strerror(err)} (errno {err})"))
    err = reasons[-1][0]
    tried = "; ".join(r for _, r in reasons)
    if any(e in (errno.EPERM, errno.EACCES) for e, _ in reasons):
        raise error_from_errno(errno.EPERM, "userfaultfd creation").__class__(
            errno.EPERM,
            f"could not create a userfaultfd ({tried}). Either run as root, set "
            "`sysctl vm.unprivileged_userfaultfd=1`, grant access to /dev/userfaultfd "
            "(e.g. `chmod 0666 /dev/userfaultfd`), or pass user_mode_only=True to handle "
            "user-mode faults only",
            operation="userfaultfd creation")
    raise UffdError(err, f"could not create a userfaultfd ({tried})",
                    operation="userfaultfd creation")


def _feature_names(features: Feature) -> list[str]:
    """Names of the bits of ``features``; bits this binding does not know as hex."""
    names = [f.name or hex(int(f)) for f in Feature if f & features]
    unknown = int(features) & ~sum(int(f) for f in Feature)
    return names + [hex(1 << b) for b in range(64) if unknown >> b & 1]


_USER_MODE_ONLY_WARNING = (
    "userfaultfd: this process may not handle kernel-mode faults, so userfault falls back to "
    "user-mode-only fault handling (UFFD_USER_MODE_ONLY). Consequence: a kernel-mode access "
    "to a page that is not loaded yet, such as os.write() from it or read()/recv() into it, "
    "fails with EFAULT instead of waiting for the page. Fix: `sysctl "
    "vm.unprivileged_userfaultfd=1`, or read/write access to /dev/userfaultfd for this user; "
    "pass user_mode_only=True to choose this mode without the warning")
_warned_user_mode_only = False


def _warn_user_mode_only() -> None:
    """Warn (once per process) that only user-mode faults will be handled, pointing at the
    first caller outside this package (``userfault.map`` -> ``Pager`` -> ``Uffd``)."""
    global _warned_user_mode_only
    if _warned_user_mode_only:
        return
    _warned_user_mode_only = True
    level = 2  # stacklevel of sys._getframe(1), the caller of this function
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("userfault."):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(_USER_MODE_ONLY_WARNING, UserModeOnlyWarning, stacklevel=level)


# Keyed by effective uid too: a forked child that drops privileges must probe again.
_offered_cache: dict[tuple[bool, int], tuple[Feature, Ioctl]] = {}


def offered_features(*, user_mode_only: bool = False) -> tuple[Feature, Ioctl]:
    """What this kernel offers: ``(features, ioctls)`` from a throw-away handshake.

    A userfaultfd accepts one UFFDIO_API call only, so the probe uses its own descriptor.
    """
    key = (user_mode_only, os.geteuid())
    if key not in _offered_cache:
        flags = _O_CLOEXEC | (_USER_MODE_ONLY if user_mode_only else 0)
        fd, _ = _open(("dev", "syscall"), flags)
        try:
            feats, ioctls, err = _native.api(fd, 0)
        finally:
            os.close(fd)
        if err:
            raise error_from_errno(err, "UFFDIO_API")
        _offered_cache[key] = (Feature(feats), Ioctl(ioctls))
    return _offered_cache[key]


@final
class Uffd:
    """A userfaultfd file descriptor with the UFFDIO_API handshake done.

    Args:
        features: features to enable where the kernel offers them (default
            :data:`DEFAULT_FEATURES`).
        required: features without which construction fails with
            :class:`~userfault.errors.FeatureUnavailableError` naming them.
        nonblocking: open with O_NONBLOCK (``read_events`` then polls; engines require it).
        cloexec: open with O_CLOEXEC.
        user_mode_only: handle only faults from user mode (UFFD_USER_MODE_ONLY), which an
            unprivileged process may do while ``vm.unprivileged_userfaultfd`` is 0. ``None``
            (the default) tries full mode first and falls back to user-mode-only on EPERM.
        order: creation paths to try in turn: ``("dev", "syscall")`` or the reverse.

    Example::

        with Uffd() as uffd, Region.anonymous(4 * PAGE_SIZE) as region:
            uffd.register(region.address, region.size)
    """

    __slots__ = ("__weakref__", "_fd", "features", "ioctls", "method", "offered",
                 "user_mode_only")

    def __init__(
        self,
        features: Feature | None = None,
        *,
        required: Feature = Feature(0),
        nonblocking: bool = True,
        cloexec: bool = True,
        user_mode_only: bool | None = None,
        order: Sequence[CreationMethod] = ("dev", "syscall"),
    ) -> None:
        self._fd = -1  # first: __del__ runs even when the constructor raises
        if not order or any(m not in ("dev", "syscall") for m in order):
            raise ValueError(f"order must list 'dev' and/or 'syscall', not {order!r}")
        wanted = (DEFAULT_FEATURES if features is None else Feature(features)) | required
        flags = (_O_CLOEXEC if cloexec else 0) | (_O_NONBLOCK if nonblocking else 0)
        if user_mode_only is None:
            try:
                self._fd, self.method = _open(order, flags)
                user_mode_only = False
            except PermissionDeniedError:
                self._fd, self.method = _open(order, flags | _USER_MODE_ONLY)
                user_mode_only = True
                _warn_user_mode_only()
        else:
            self._fd, self.method = _open(order, flags | (_USER_MODE_ONLY if user_mode_only else 0))
        self.user_mode_only: bool = user_mode_only
        try:
            offered, _ = offered_features(user_mode_only=user_mode_only)
            missing = Feature(int(required) & ~int(offered))  # ~ on an IntFlag drops unknown bits
            if missing:
                names = _feature_names(missing)
                raise FeatureUnavailableError(
                    f"this kernel does not offer the required userfaultfd feature(s) "
                    f"{', '.join(names)} (offered: {offered!r}); upgrade the kernel or stop "
                    "requiring them", names)
            _, ioctls, err = _native.api(self._fd, int(wanted & offered))
            if err:
                hint = "the feature set was refused"
                if err == errno.EPERM and wanted & offered & Feature.EVENT_FORK:
                    hint = ("EVENT_FORK needs CAP_SYS_PTRACE (Linux 5.11+): run with that "
                            "capability or do not ask for EVENT_FORK")
                raise error_from_errno(err, "UFFDIO_API", hint=hint)
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise
        self.offered: Feature = offered
        self.features: Feature = wanted & offered
        self.ioctls: Ioctl = Ioctl(ioctls)

    # -- lifetime ---------------------------------------------------------------------------

    @classmethod
    def from_fd(cls, fd: int, *, features: Feature = Feature(0), handshake: bool = False,
                nonblocking: bool | None = None) -> Uffd:
        """Adopt an existing userfaultfd (received from another process, or a fork event).

        With ``handshake=True`` the UFFDIO_API call is made here with ``features``; otherwise
        the descriptor is taken to be handshaken already and ``features`` records what it has.
        ``nonblocking`` sets or clears O_NONBLOCK on the descriptor when given.
        """
        if fd < 0:
            raise ValueError(f"fd must be a non-negative descriptor, not {fd}")
        self = cls.__new__(cls)
        # Owns nothing until every step succeeded: a refused call leaves the caller's fd open
        # (the kernel allows UFFDIO_API again after a refused one) and unclosed by __del__.
        self._fd = -1
        self.method = "dev"
        self.user_mode_only = False
        self.offered = Feature(0)
        self.features = Feature(features)
        self.ioctls = Ioctl(0)
        if nonblocking is not None:
            os.set_blocking(fd, not nonblocking)
        if handshake:
            feats, ioctls, err = _native.api(fd, int(features))
            if err:
                raise error_from_errno(
                    err, "UFFDIO_API",
                    hint=f"the kernel refused features {Feature(features)!r} on fd {fd}; the "
                    "descriptor is still yours (open, and UFFDIO_API may be retried on it)")
            self.offered, self.ioctls = Feature(feats), Ioctl(ioctls)
        self._fd = fd
        return self

    def fileno(self) -> int:
        """The descriptor; raises :class:`ClosedError` once closed."""
        if self._fd < 0:
            raise ClosedError(errno.EBADF, "this userfaultfd is closed", operation="fileno")
        return self._fd

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` or :meth:`detach` was called."""
        return self._fd < 0

    def close(self) -> None:
        """Close the descriptor; idempotent. Registered ranges fall back to normal faults."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def detach(self) -> int:
        """Give up ownership: return the descriptor and leave this object closed."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def __enter__(self) -> Uffd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<Uffd {state} features={self.features!r}>"

    # -- argument checks --------------------------------------------------------------------

    def _check(self, op: str, address: int, length: int, *, align: int = PAGE_SIZE,
               name: str = "address") -> int:
        fd = self.fileno() if self._fd >= 0 else -1
        if fd < 0:
            raise ClosedError(errno.EBADF, f"{op} on a closed userfaultfd", operation=op)
        if length <= 0:
            raise BadArgumentError(errno.EINVAL, f"{op}: length must be positive, not {length}",
                                   operation=op, address=address, length=length)
        if address < 0 or address + length > 1 << 64:
            raise BadArgumentError(errno.EINVAL, f"{op}: [{address:#x}, +{length}) is out of range",
                                   operation=op, address=address, length=length)
        if address % align or length % align:
            raise BadArgumentError(
                errno.EINVAL,
                f"{op}: {name} {address:#x} and length {length} must be multiples of the "
                f"page size ({align}); round with userfault.align_down/align_up",
                operation=op, address=address, length=length)
        return fd

    @staticmethod
    def _until_error(call: Callable[[int], tuple[int, int]], length: int) -> tuple[int, int]:
        """Run a partial-progress ioctl over the whole range: ``call(offset)`` does the rest.

        The kernel reports any partial result as EAGAIN with the bytes done, whatever stopped
        it (a present page, a pending event...). Retrying the remainder while progress is made
        yields the real cause: EEXIST at a present page, or EAGAIN with nothing done while the
        mapping is changing. Returns ``(bytes done in total, errno or 0)``.
        """
        done = 0
        while True:
            n, err = call(done)
            done += max(0, int(n))
            if err != errno.EAGAIN or n <= 0 or done >= length:
                return done, err

    @staticmethod
    def _fail(err: int, op: str, address: int, length: int, done: int = 0,
              hint: str = "") -> UffdError:
        return error_from_errno(err, op, address=address, length=length, done=done, hint=hint)

    # -- ioctls -----------------------------------------------------------------------------

    def register(self, address: int, length: int,
                 mode: RegisterMode = RegisterMode.MISSING) -> Ioctl:
        """UFFDIO_REGISTER: route faults of the range to this descriptor.

        Returns the ioctls usable on the range (they depend on the memory type and mode).
        """
        fd = self._check("UFFDIO_REGISTER", address, length)
        if not mode or int(mode) & ~7:  # int(): ~ on an IntFlag drops unknown bits (8)
            raise BadArgumentError(errno.EINVAL, f"UFFDIO_REGISTER: bad mode {mode!r}",
                                   operation="UFFDIO_REGISTER", address=address, length=length)
        ioctls, err = _native.register(fd, address, length, int(mode))
        if err:
            hint = ""
            if err == errno.EINVAL:
                hint = (f"mode {mode!r} is not supported on this memory (MINOR needs shmem or "
                        "hugetlbfs and the MINOR_* feature; WP needs PAGEFAULT_FLAG_WP), or the "
                        "range is not one mapped vma set, or is not aligned to its page size")
            elif err == errno.EBUSY:
                hint = "the range is already registered with another userfaultfd"
            raise self._fail(err, "UFFDIO_REGISTER", address, length, hint=hint)
        return Ioctl(ioctls)

    def unregister(self, address: int, length: int) -> None:
        """UFFDIO_UNREGISTER: stop handling faults of the range (blocked threads are woken)."""
        fd = self._check("UFFDIO_UNREGISTER", address, length)
        err = _native.unregister(fd, address, length)
        if err:
            raise self._fail(err, "UFFDIO_UNREGISTER", address, length)

    def wake(self, address: int, length: int) -> None:
        """UFFDIO_WAKE: wake threads waiting on faults in the range."""
        fd = self._check("UFFDIO_WAKE", address, length)
        err = _native.wake(fd, address, length)
        if err:
            raise self._fail(err, "UFFDIO_WAKE", address, length)

    def wake_all(self) -> None:
        """UFFDIO_WAKE of every address the process could fault on: every thread waiting on
        a fault of this uffd faults again, wherever it is (also where memory was moved with
        ``mremap`` since it was registered). Waking a thread whose page is still missing is
        harmless: it faults again."""
        if self._fd < 0:
            raise ClosedError(errno.EBADF, "UFFDIO_WAKE on a closed userfaultfd",
                              operation="UFFDIO_WAKE")
        err = _native.wake_all(self.fileno())
        if err:
            raise self._fail(err, "UFFDIO_WAKE", 0, 0)

    def copy(self, dst: int, src: int | bytes | bytearray | memoryview, length: int | None = None,
             mode: CopyMode = CopyMode(0)) -> int:
        """UFFDIO_COPY: install ``length`` bytes from ``src`` (an address or a buffer) at ``dst``.

        Returns the bytes copied. On failure the error's ``done`` holds the bytes copied
        before it: :class:`AlreadyMappedError` (EEXIST) at a present page,
        :class:`MappingChangedError` (EAGAIN) when the mapping changed.
        """
        if length is None:
            if isinstance(src, int):
                raise BadArgumentError(errno.EINVAL, "UFFDIO_COPY: give length with an address src",
                                       operation="UFFDIO_COPY", address=dst)
            length = memoryview(src).nbytes
        fd = self._check("UFFDIO_COPY", dst, length, name="dst")
        if isinstance(src, int):
            addr = src

            def call(off: int) -> tuple[int, int]:
                return _native.copy(fd, dst + off, addr + off, length - off, int(mode))
        else:
            buf = memoryview(src).cast("B")
            if buf.nbytes < length:
                raise BadArgumentError(
                    errno.EINVAL, f"UFFDIO_COPY: src holds {buf.nbytes} bytes, fewer than the "
                    f"{length} to copy", operation="UFFDIO_COPY", address=dst, length=length)

            def call(off: int) -> tuple[int, int]:
                return _native.copy(fd, dst + off, buf[off:], length - off, int(mode))
        done, err = self._until_error(call, length)
        if err:
            raise self._fail(err, "UFFDIO_COPY", dst, length, done,
                             "dst must lie in a registered range and src must be readable")
        return int(done)

    def zeropage(self, address: int, length: int, mode: ZeropageMode = ZeropageMode(0)) -> int:
        """UFFDIO_ZEROPAGE: map zero pages (not on hugetlb). Returns bytes done."""
        fd = self._check("UFFDIO_ZEROPAGE", address, length)
        done, err = self._until_error(
            lambda off: _native.zeropage(fd, address + off, length - off, int(mode)), length)
        if err:
            raise self._fail(err, "UFFDIO_ZEROPAGE", address, length, done,
                             "ZEROPAGE is not available on hugetlb memory; use copy() instead")
        return int(done)

    def writeprotect(self, address: int, length: int, protect: bool = True, *,
                     dontwake: bool = False) -> None:
        """UFFDIO_WRITEPROTECT: set (``protect=True``) or clear write protection.

        The range must be registered in WP mode. Clearing wakes waiters unless ``dontwake``.
        """
        fd = self._check("UFFDIO_WRITEPROTECT", address, length)
        mode = (WriteProtectMode.WP if protect else 0) | (
            WriteProtectMode.DONTWAKE if dontwake else 0)
        err = _native.writeprotect(fd, address, length, int(mode))
        if err:
            raise self._fail(err, "UFFDIO_WRITEPROTECT", address, length,
                             hint="the range must be registered with RegisterMode.WP")

    def continue_(self, address: int, length: int, mode: ContinueMode = ContinueMode(0)) -> int:
        """UFFDIO_CONTINUE: map pages already in the page cache (MINOR faults). Bytes done."""
        fd = self._check("UFFDIO_CONTINUE", address, length)
        done, err = self._until_error(
            lambda off: _native.continue_(fd, address + off, length - off, int(mode)), length)
        if err:
            hint = ("CONTINUE needs shmem or hugetlbfs memory (register it with "
                    "RegisterMode.MINOR to receive minor faults)" if err == errno.EINVAL else "")
            if err == errno.EFAULT:
                hint = "a page of the range is not in the page cache: write it there first"
            raise self._fail(err, "UFFDIO_CONTINUE", address, length, done, hint)
        return int(done)

    def poison(self, address: int, length: int, mode: PoisonMode = PoisonMode(0)) -> int:
        """UFFDIO_POISON: make accesses to the range raise SIGBUS. Bytes done."""
        fd = self._check("UFFDIO_POISON", address, length)
        done, err = self._until_error(
            lambda off: _native.poison(fd, address + off, length - off, int(mode)), length)
        if err:
            raise self._fail(err, "UFFDIO_POISON", address, length, done,
                             "POISON needs the POISON feature and a registered range")
        return int(done)

    def move(self, dst: int, src: int, length: int, mode: MoveMode = MoveMode(0)) -> int:
        """UFFDIO_MOVE: move pages from ``src`` (private anonymous) to registered ``dst``.

        Returns bytes moved; ``src`` is left empty.
        """
        fd = self._check("UFFDIO_MOVE", dst, length, name="dst")
        self._check("UFFDIO_MOVE", src, length, name="src")
        done, err = self._until_error(
            lambda off: _native.move(fd, dst + off, src + off, length - off, int(mode)), length)
        if err:
            raise self._fail(err, "UFFDIO_MOVE", dst, length, done,
                             "both ranges must be private anonymous memory of one process, "
                             "dst registered and missing, src populated (or ALLOW_SRC_HOLES)")
        return int(done)

    # -- events -----------------------------------------------------------------------------

    def read_events(self, max_events: int = 64, timeout: float | None = None) -> list[Event]:
        """Read up to ``max_events`` pending events.

        ``timeout`` is seconds to wait for the first event (``None`` waits forever, 0 does
        not wait). No event within the timeout returns ``[]``: EAGAIN is not an error. A
        blocking descriptor (``nonblocking=False``) takes ``timeout=None`` only: the kernel
        cannot poll it.
        Fork events carry the child's descriptor wrapped as a :class:`Uffd`.
        """
        if not 1 <= max_events <= 4096:
            raise ValueError(f"max_events must be between 1 and 4096, not {max_events}")
        fd = self.fileno()
        if timeout is not None and os.get_blocking(fd):
            raise BadArgumentError(
                errno.EINVAL, "read_events: a timeout needs a non-blocking userfaultfd (the "
                "kernel cannot poll a blocking one); create it with nonblocking=True (the "
                "default) or pass timeout=None", operation="read")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is None:
                wait_ms = -1
            else:
                wait_ms = max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
            data, err = _native.read_msgs(fd, max_events, wait_ms)
            if err == errno.EINTR:
                continue  # signal handlers ran on return to Python; wait the rest
            if err:
                raise error_from_errno(err, "read", hint="the userfaultfd has had no UFFDIO_API "
                                       "handshake (use Uffd.from_fd(fd, handshake=True))")
            events = parse_messages(data)
            return [Fork(e.fd, Uffd.from_fd(e.fd, features=self.features))
                    if isinstance(e, Fork) else e for e in events]

    def read_event(self, timeout: float | None = None) -> Event | None:
        """Read one event, or ``None`` if none came within ``timeout`` seconds."""
        events = self.read_events(1, timeout)
        return events[0] if events else None


def send_uffd(sock: socket.socket, uffd: Uffd | int, data: bytes = b"\0") -> None:
    """Send a userfaultfd over a Unix socket (SCM_RIGHTS) with ``data`` as the payload."""
    fd = uffd.fileno() if isinstance(uffd, Uffd) else uffd
    socket.send_fds(sock, [data or b"\0"], [fd])


def recv_uffd(sock: socket.socket, bufsize: int = 65536, *,
              features: Feature = Feature(0)) -> tuple[Uffd, bytes]:
    """Receive a userfaultfd sent with :func:`send_uffd` (or by Firecracker).

    Returns the descriptor as a :class:`Uffd` (handshake already done by the sender) and the
    payload. Extra descriptors are closed; a message without one raises :class:`UffdError`.
    """
    data, fds, _flags, _ = socket.recv_fds(sock, bufsize, 4)
    if not fds:
        raise UffdError(errno.EBADMSG, "the message carried no file descriptor "
                        "(the peer must send the userfaultfd with SCM_RIGHTS)",
                        operation="recv_uffd")
    for extra in fds[1:]:
        os.close(extra)
    # The descriptors received are ours alone: on any refusal they are closed, nothing leaks.
    try:
        what = _fd_kind(fds[0])
        if what is not None and what != "anon_inode:[userfaultfd]":
            raise UffdError(errno.EBADMSG, f"the descriptor received is not a userfaultfd "
                            f"(it is {what!r}); it was closed", operation="recv_uffd")
        return Uffd.from_fd(fds[0], features=features), data
    except BaseException:
        os.close(fds[0])
        raise


def _fd_kind(fd: int) -> str | None:
    """What ``fd`` is, as ``/proc/self/fd`` names it (``None`` without /proc)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


assert MSG_SIZE == _native.MSG_SIZE
