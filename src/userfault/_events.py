"""Typed userfaultfd events and the pure parser of ``struct uffd_msg`` records.

A message is 32 bytes: ``u8 event, u8, u16, u32`` reserved, then a 24-byte union whose layout
depends on the event. :func:`parse_messages` never touches the kernel, so it is tested alone.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from ._flags import FaultFlag

if TYPE_CHECKING:
    from .uffd import Uffd

__all__ = [
    "EVENT_FORK", "EVENT_PAGEFAULT", "EVENT_REMAP", "EVENT_REMOVE", "EVENT_UNMAP", "MSG_SIZE",
    "Event", "Fork", "IncompleteMessageError", "Pagefault", "Remap", "Remove",
    "UnknownEventError", "Unmap", "parse_messages",
]

MSG_SIZE = 32
EVENT_PAGEFAULT = 0x12
EVENT_FORK = 0x13
EVENT_REMAP = 0x14
EVENT_REMOVE = 0x15
EVENT_UNMAP = 0x16

_HEADER = struct.Struct("<BBHI")
_PAGEFAULT = struct.Struct("<QQI4x")
_FORK = struct.Struct("<I20x")
_REMAP = struct.Struct("<QQQ")
_RANGE = struct.Struct("<QQ8x")


class IncompleteMessageError(ValueError):
    """The data is not a whole number of 32-byte messages."""


class UnknownEventError(ValueError):
    """A message carries an event code this version does not know."""


@dataclass(frozen=True)
class Pagefault:
    """A thread touched a registered page (missing, write-protected or minor).

    ``thread_id`` is the faulting thread's TID when the THREAD_ID feature is on, else 0.
    """

    address: int
    flags: FaultFlag
    thread_id: int = 0

    @property
    def write(self) -> bool:
        """The access was a write."""
        return bool(self.flags & FaultFlag.WRITE)

    @property
    def wp(self) -> bool:
        """The fault is a write-protect fault."""
        return bool(self.flags & FaultFlag.WP)

    @property
    def minor(self) -> bool:
        """The page is in the page cache but not mapped (resolve with UFFDIO_CONTINUE)."""
        return bool(self.flags & FaultFlag.MINOR)


@dataclass(frozen=True)
class Fork:
    """The process forked; ``fd`` is a new userfaultfd for the child's copy of the ranges.

    :meth:`userfault.Uffd.read_events` wraps it in a :class:`Uffd` as ``uffd``.
    """

    fd: int
    uffd: Uffd | None = None


@dataclass(frozen=True)
class Remap:
    """A registered range moved with mremap()."""

    old_address: int
    new_address: int
    length: int


@dataclass(frozen=True)
class Remove:
    """Pages were dropped (madvise DONTNEED/REMOVE); faults on them come again."""

    start: int
    end: int


@dataclass(frozen=True)
class Unmap:
    """A registered range was unmapped (munmap, or mremap over it)."""

    start: int
    end: int


Event = Union[Pagefault, Fork, Remap, Remove, Unmap]  # noqa: UP007 (runtime alias on 3.9 syntax)


def parse_messages(data: bytes | bytearray | memoryview) -> list[Event]:
    """Parse a buffer of ``struct uffd_msg`` records read from a userfaultfd.

    Raises:
        IncompleteMessageError: ``len(data)`` is not a multiple of 32.
        UnknownEventError: an event code is not one of the five the kernel defines.
    """
    view = memoryview(data).cast("B")
    if len(view) % MSG_SIZE:
        raise IncompleteMessageError(
            f"{len(view)} bytes is not a whole number of {MSG_SIZE}-byte uffd_msg records")
    events: list[Event] = []
    for pos in range(0, len(view), MSG_SIZE):
        code = _HEADER.unpack_from(view, pos)[0]
        body = pos + _HEADER.size
        if code == EVENT_PAGEFAULT:
            flags, address, ptid = _PAGEFAULT.unpack_from(view, body)
            events.append(Pagefault(address, FaultFlag(flags), ptid))
        elif code == EVENT_FORK:
            events.append(Fork(_FORK.unpack_from(view, body)[0]))
        elif code == EVENT_REMAP:
            events.append(Remap(*_REMAP.unpack_from(view, body)))
        elif code == EVENT_REMOVE:
            events.append(Remove(*_RANGE.unpack_from(view, body)))
        elif code == EVENT_UNMAP:
            events.append(Unmap(*_RANGE.unpack_from(view, body)))
        else:
            raise UnknownEventError(f"unknown userfaultfd event code {code:#x} at byte {pos}")
    return events
