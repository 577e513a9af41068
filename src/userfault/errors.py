"""The exception hierarchy of userfault.

Every failure of a userfaultfd operation is a :class:`UffdError` (itself an :class:`OSError`,
so ``errno`` checks keep working) carrying the operation, the address and the length involved.
:func:`error_from_errno` maps a kernel errno to the most specific subclass and writes a message
that says what was wrong and what to do.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import TypedDict

__all__ = [
    "AlreadyMappedError",
    "BadArgumentError",
    "ClosedError",
    "FeatureUnavailableError",
    "MappingChangedError",
    "PagerError",
    "PermissionDeniedError",
    "PrefetchError",
    "ProcessGoneError",
    "RangeNotRegisteredError",
    "SnapshotError",
    "SourceError",
    "UffdError",
    "UserModeOnlyWarning",
    "error_from_errno",
]


class UffdError(OSError):
    """A userfaultfd operation failed.

    Attributes:
        operation: the operation that failed, e.g. ``"UFFDIO_COPY"``.
        address: the start address of the range involved, or ``None``.
        length: the length of the range involved, or ``None``.
        done: bytes completed before the failure (partial copy, zeropage, move...), or 0.
    """

    def __init__(
        self,
        err: int,
        message: str,
        *,
        operation: str = "",
        address: int | None = None,
        length: int | None = None,
        done: int = 0,
    ) -> None:
        super().__init__(err, message)
        self.operation = operation
        self.address = address
        self.length = length
        self.done = done

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild,
            (type(self), self.errno, self.strerror, self.operation, self.address, self.length,
             self.done),
        )


def _rebuild(cls: type[UffdError], err: int, msg: str, op: str, addr: int | None,
             length: int | None, done: int) -> UffdError:
    return cls(err, msg, operation=op, address=addr, length=length, done=done)


class BadArgumentError(UffdError, ValueError):
    """An argument is invalid: unaligned, zero-length, outside a region, or refused (EINVAL)."""


class ClosedError(UffdError, ValueError):
    """The userfaultfd (or region) was already closed."""


class AlreadyMappedError(UffdError, FileExistsError):
    """EEXIST: a page in the range is already present; ``done`` says how far the call got."""


class MappingChangedError(UffdError, BlockingIOError):
    """EAGAIN: the mapping changed under the call (mremap, madvise, a pending REMOVE event).

    ``done`` holds the bytes completed; read pending events, then retry the rest.
    """


class RangeNotRegisteredError(UffdError):
    """ENOENT: the destination is not (or no longer) registered with this userfaultfd."""


class ProcessGoneError(UffdError, ProcessLookupError):
    """ESRCH: the process that owns the registered memory has exited."""


class PermissionDeniedError(UffdError, PermissionError):
    """EPERM/EACCES: creating or using a userfaultfd was refused."""


class FeatureUnavailableError(UffdError):
    """The kernel does not offer a feature or ioctl that was asked for.

    Attributes:
        missing: names of the missing features or ioctls.
    """

    def __init__(self, message: str, missing: list[str], *, operation: str = "UFFDIO_API") -> None:
        super().__init__(_errno.EINVAL, message, operation=operation)
        self.missing = missing

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_feature, (type(self), str(self.strerror), list(self.missing),
                                   self.operation))


def _rebuild_feature(cls: type[FeatureUnavailableError], msg: str, missing: list[str],
                     op: str) -> FeatureUnavailableError:
    return cls(msg, missing, operation=op)


class PagerError(RuntimeError):
    """A pager could not be started, stopped, or failed while serving faults."""


class PrefetchError(PagerError):
    """A prefetch could not install some pages: they were handled by ``on_error``, or the
    source timed out and the prefetch stopped (nothing poisoned: faults serve the rest).

    Attributes:
        installed: bytes the prefetch installed.
        poisoned: ``(source_offset, length)`` ranges poisoned (accesses get SIGBUS); at most
            the first 64 ranges are listed.
        poisoned_bytes: bytes poisoned in all.
    """

    def __init__(self, message: str, *, installed: int = 0,
                 poisoned: tuple[tuple[int, int], ...] = (), poisoned_bytes: int = 0) -> None:
        super().__init__(message)
        self.installed = installed
        self.poisoned = poisoned
        self.poisoned_bytes = poisoned_bytes

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_prefetch, (type(self), str(self.args[0]) if self.args else "",
                                    self.installed, self.poisoned, self.poisoned_bytes))


def _rebuild_prefetch(cls: type[PrefetchError], msg: str, installed: int,
                      poisoned: tuple[tuple[int, int], ...], poisoned_bytes: int
                      ) -> PrefetchError:
    return cls(msg, installed=installed, poisoned=poisoned, poisoned_bytes=poisoned_bytes)


class SourceError(OSError):
    """A page source could not deliver the bytes of a range.

    Attributes:
        source: a short description of the source (URL, path, key prefix).
        offset: the offset in the source that failed.
        length: the length that was asked for.
    """

    def __init__(self, message: str, *, source: str = "", offset: int = 0, length: int = 0) -> None:
        super().__init__(message)
        self.source = source
        self.offset = offset
        self.length = length

    @classmethod
    def for_range(cls, kind: str, source: str, what: str, offset: int, length: int,
                  cause: str) -> SourceError:
        """``"<kind> <source>: <what> [a, b) (n bytes) failed: <cause>"``, fields set."""
        return cls(f"{kind} {source}: {what} [{offset}, {offset + length}) ({length} bytes) "
                   f"failed: {cause}", source=source, offset=offset, length=length)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_source, (type(self), str(self.args[0]) if self.args else "", self.source,
                                  self.offset, self.length))


def _rebuild_source(cls: type[SourceError], msg: str, source: str, offset: int,
                    length: int) -> SourceError:
    return cls(msg, source=source, offset=offset, length=length)


class SnapshotError(SourceError, ValueError):
    """A snapshot file is malformed, truncated or corrupted (the message names the chunk)."""


class UserModeOnlyWarning(RuntimeWarning):
    """``Uffd()`` fell back to handling user-mode faults only (an unprivileged process with
    ``vm.unprivileged_userfaultfd=0``): kernel-mode accesses to pages not loaded yet, such as
    ``os.write()`` from them or ``read()`` into them, fail with EFAULT. Warned once per process.
    """


_EPERM_HINT = (
    "creating a userfaultfd was refused. As root this should not happen; otherwise either "
    "set `sysctl vm.unprivileged_userfaultfd=1`, grant read/write on /dev/userfaultfd "
    "(e.g. `chmod 0666 /dev/userfaultfd` or a udev rule), give the process CAP_SYS_PTRACE, "
    "or pass user_mode_only=True to handle user-mode faults only"
)


class _ErrorFields(TypedDict):
    operation: str
    address: int | None
    length: int | None
    done: int


def _describe(addr: int | None, length: int | None) -> str:
    if addr is None:
        return ""
    if length is None:
        return f" at {addr:#x}"
    return f" on [{addr:#x}, {addr + length:#x}) ({length} bytes)"


def error_from_errno(
    err: int,
    operation: str,
    *,
    address: int | None = None,
    length: int | None = None,
    done: int = 0,
    hint: str = "",
) -> UffdError:
    """Build the most specific :class:`UffdError` for ``err`` raised by ``operation``.

    ``hint`` names the argument at fault for EINVAL where the caller knows it.
    """
    where = _describe(address, length)
    base = f"{operation} failed{where}: {os.strerror(err)} (errno {err})"
    kw: _ErrorFields = {"operation": operation, "address": address, "length": length,
                        "done": done}
    if err == _errno.EEXIST:
        return AlreadyMappedError(
            err, f"{base}; a page is already present after {done} bytes "
            "(another thread or a prefetch installed it first)", **kw)
    if err == _errno.EAGAIN:
        return MappingChangedError(
            err, f"{base}; the mapping changed under the call after {done} bytes: "
            "read pending events (REMOVE, REMAP) then retry the remainder", **kw)
    if err == _errno.ENOENT:
        detail = f"; {hint}" if hint else ""
        return RangeNotRegisteredError(
            err, f"{base}; the range is not registered with this userfaultfd in the needed "
            f"mode (it was unregistered, unmapped or remapped){detail}", **kw)
    if err == _errno.ESRCH:
        return ProcessGoneError(err, f"{base}; the process owning the memory has exited", **kw)
    if err in (_errno.EPERM, _errno.EACCES):
        msg = f"{base}; {hint}" if hint else f"{base}; {_EPERM_HINT}"
        return PermissionDeniedError(err, msg, **kw)
    if err == _errno.EINVAL:
        detail = hint or (
            "the kernel refused an argument: check alignment to the page size, that the range "
            "lies inside one registered region, and that the mode is allowed for this memory")
        return BadArgumentError(err, f"{base}; {detail}", **kw)
    if err == _errno.EBADF:
        return ClosedError(err, f"{base}; the file descriptor is closed", **kw)
    return UffdError(err, f"{base}; {hint}" if hint else base, **kw)
