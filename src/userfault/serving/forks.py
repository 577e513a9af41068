"""Forked children: never zeros, even when the process serving them is killed.

With UFFD_EVENT_FORK a forked child's copy of the memory is registered with a new userfaultfd
that the kernel gives to the process reading the parent's: the engine (in the owner for a
native source, in the pager process's worker otherwise, which passes it on to its supervisor).
That registration lives while some process holds the descriptor: when its last holder dies
(SIGKILL), the kernel drops it and the child reads the pages it never loaded as zeros (holes
of a memfd). So every child holds a copy of its own. In the child, right after ``fork()``
(``os.register_at_fork``; ``multiprocessing``'s fork start method goes through it), on the
child's only thread, before any of its code runs:

1. it touches the *beacon*, a page registered with the pager's uffd that no area covers: the
   engine serving the child sees the fault's thread id (the child's pid), writes which of its
   descriptors is that child's uffd to the *fork table* (a shared memfd), then answers it;
2. it takes a copy of that descriptor (``pidfd_getfd``: CAP_SYS_PTRACE, which EVENT_FORK
   needs anyway) and starts a native watchdog over a standby engine on it. The watchdog fires
   when the process that keeps the child served dies (the owner; the pager process's
   supervisor), or when the owner ends the pager (``close()``, or its exit: the *ended*
   eventfd). The standby then answers every blocked and later fault with a logged SIGBUS,
   and pages the child had loaded keep their bytes.

If the serving process died before the child took its copy, the kernel has dropped the
registration already; nothing of the child ran since, so it registers the memory with a uffd
of its own and fails every fault from there. Children forked without the Python hook (a
``fork()`` from C that does not call ``PyOS_AfterFork_Child``) keep the older behaviour: they
are served while the owner serves and poisoned when it closes or exits, but read zeros where
they loaded nothing if the serving process is killed.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import sys

from .. import _native
from .._flags import Feature, RegisterMode
from ..errors import UffdError
from ..uffd import Uffd

__all__ = ["ForkGuard"]

_PAGE = mmap.PAGESIZE
_SLOT = struct.Struct("<iiii")  # uf_forked_t: pid, server, fd, reserved
_TABLE_SIZE = _native.UF_FORK_SLOTS * _SLOT.size
_UNNAMED = "the engine serving it did not name it"
_FAIL_MESSAGE = ("the process serving this forked child's memory is gone (killed, or its pager "
                 "closed)")


class ForkGuard:
    """The owner's beacon, fork table and *ended* eventfd, inherited by forked children; and,
    in a child, the copy of its uffd and the watchdog over it."""

    def __init__(self, uffd: Uffd) -> None:
        self.owner = os.getpid()
        self.beacon = 0
        self.table_fd = self.ended = self.keeper_pidfd = -1
        self.keeper_pid = 0
        self.table: mmap.mmap | None = None
        # in a child: its uffd copy, the standby engine and its watchdog
        self._child_fd = -1
        self._standby: _native.Engine | None = None
        self._watchdog: _native.Watchdog | None = None
        try:
            address, err = _native.mmap(0, _PAGE, mmap.PROT_READ | mmap.PROT_WRITE,
                                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
            if err:
                raise OSError(err, f"mapping the fork beacon: {os.strerror(err)}")
            self.beacon = address
            uffd.register(address, _PAGE, RegisterMode.MISSING)
            self.table_fd = os.memfd_create("userfault-forks", os.MFD_CLOEXEC)
            os.ftruncate(self.table_fd, _TABLE_SIZE)
            self.table = mmap.mmap(self.table_fd, _TABLE_SIZE)
            self.ended = os.eventfd(0, os.EFD_CLOEXEC)
        except BaseException:
            self.close()
            raise

    def engine_args(self) -> dict[str, int]:
        """``_native.Engine`` keywords: the engine answers the beacon and fills the table."""
        return {"beacon": self.beacon, "fork_table": self.table_fd}

    def watch(self, keeper_pid: int) -> None:
        """Serving has started; ``keeper_pid`` is the process whose death drops the children's
        registrations (this one, or the pager process's supervisor)."""
        self.keeper_pid = keeper_pid
        self.keeper_pidfd = os.pidfd_open(keeper_pid)

    def end(self) -> None:
        """The owner's serving is over (the pager closes, or this process exits): every forked
        child's watchdog takes over."""
        if os.getpid() == self.owner and self.ended >= 0:
            os.eventfd_write(self.ended, 1)

    def close(self, uffd: Uffd | None = None) -> None:
        """Let go; idempotent. The owner unregisters the beacon through ``uffd`` first (a
        forked child must not: that descriptor acts on the owner's memory)."""
        self._stop_child()
        if self.beacon:
            if uffd is not None and not uffd.closed and os.getpid() == self.owner:
                try:
                    uffd.unregister(self.beacon, _PAGE)
                except UffdError:
                    pass
            _native.munmap(self.beacon, _PAGE)
            self.beacon = 0
        if self.table is not None:
            self.table.close()
            self.table = None
        for name in ("table_fd", "ended", "keeper_pidfd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    # -- in a forked child ------------------------------------------------------------------

    def after_fork(self, address: int, size: int, page_size: int, name: str,
                   minor: bool) -> None:
        """In a forked child (the at-fork hook): hold this child's uffd and watch over it.

        ``address`` and ``size`` are the memory, ``minor`` whether it is registered for MINOR
        faults too (``install="continue"``)."""
        self._drop_inherited()
        if not self.beacon or self.table is None or self.keeper_pidfd < 0:
            return
        for _ in range(3):  # a child forked meanwhile with a pid of the same slot took it
            _native.touch(self.beacon, 1, 1, 0, 0, True)  # the engine writes our slot, answers
            fd, why = self._take_uffd()
            if why != _UNNAMED:
                break
            self._drop_beacon()
        if fd >= 0:
            self._child_fd = fd
            self._standby = self._failing_engine(fd, address, size, page_size, name)
            self._watchdog = _native.Watchdog(
                self.keeper_pidfd, self._standby, self.keeper_pid, ended=self.ended,
                what="the process serving this forked child's memory")
            # Only now: its REMOVE event waits to be read, by the engine or by our standby,
            # and meanwhile an engine that stops could not poison this child's pages.
            self._drop_beacon()
            return
        self._drop_beacon()
        try:
            own = Uffd(Feature.THREAD_ID | Feature.POISON | Feature.MISSING_SHMEM |
                       Feature.MISSING_HUGETLBFS | (Feature.MINOR_SHMEM if minor else Feature(0)))
            own.register(address, size, RegisterMode.MISSING | (
                RegisterMode.MINOR if minor else RegisterMode(0)))
        except UffdError as err:
            if err.errno == errno.EBUSY:  # still registered, and served: just not kept safe
                print(f"userfault: forked child {os.getpid()} could not hold its userfaultfd "
                      f"({why}): if the process serving {name} is killed, the pages this child "
                      "has not loaded read as zeros", file=sys.stderr)
                return
            raise
        # The registration was dropped: its serving ended (the process died, or the pager
        # closed), and nothing ran here since the fork. Every fault fails from now on.
        self._child_fd = own.detach()
        self._standby = self._failing_engine(self._child_fd, address, size, page_size, name)
        print(f"userfault: forked child {os.getpid()}: the serving of {name} ended (its process "
              "died, or the pager closed) before this child could hold its memory: pages it "
              "has not loaded get SIGBUS, never zeros", file=sys.stderr)
        self._standby.start()

    def _drop_beacon(self) -> None:
        """Our own children must fault on the beacon too."""
        _native.madvise(self.beacon, _PAGE, mmap.MADV_DONTNEED)

    def _take_uffd(self) -> tuple[int, str]:
        """A copy of this child's uffd from the engine serving it (-1 and why not)."""
        assert self.table is not None
        pid = os.getpid()
        slot = (pid % _native.UF_FORK_SLOTS) * _SLOT.size
        got, server, fd, _ = _SLOT.unpack_from(self.table, slot)
        # pid again: a child whose pid shares the slot may have been written meanwhile
        if got != pid or struct.unpack_from("<i", self.table, slot)[0] != pid:
            return -1, _UNNAMED
        try:
            pidfd = os.pidfd_open(server)
        except OSError as why:
            return -1, f"the serving process {server}: {why.strerror}"
        try:
            copy, err = _native.pidfd_getfd(pidfd, fd)
        finally:
            os.close(pidfd)
        if err:
            return -1, f"pidfd_getfd from process {server}: {os.strerror(err)}"
        return copy, ""

    def _failing_engine(self, fd: int, address: int, size: int, page_size: int,
                        name: str) -> _native.Engine:
        return _native.Engine(
            fd, [(address, size, 0)], page_size, _native.SRC_FAIL, _native.INST_COPY,
            fail_errno=errno.EPIPE, fail_message=_FAIL_MESSAGE, name=name, retries=0,
            **self.engine_args())

    def _drop_inherited(self) -> None:
        """A grandchild inherits its parent's copy of the child side: not ours to use."""
        self._watchdog = None  # a forked copy of a watchdog neither joins nor stops anything
        self._standby = None
        if self._child_fd >= 0:
            os.close(self._child_fd)  # the parent's uffd: holding it would keep that alive
            self._child_fd = -1

    def _stop_child(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        if self._standby is not None:
            self._standby.stop()
            self._standby = None
        if self._child_fd >= 0:
            os.close(self._child_fd)
            self._child_fd = -1
