"""Opening the files a user names: what is not a regular file is refused before ``open()``.

``open()`` of a FIFO blocks until a writer comes, ``open()`` of a device may have effects
(a tape rewinds, a terminal becomes the controlling one), and neither has a size to page from.
So the path is ``stat``-ed first and refused with a sentence naming what it is; it is then
opened with ``O_NONBLOCK`` (in case it was swapped for a FIFO meanwhile) and checked again on
the open descriptor.
"""

from __future__ import annotations

import os
import stat

__all__ = ["file_kind", "open_regular"]

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_kind(mode: int) -> str:
    """``"a regular file"``, ``"a directory"``, ``"a FIFO (named pipe)"``... for ``st_mode``."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str, *, allow_block: bool = False, advice: str = "",
                 writable: bool = False) -> int:
    """Open ``path`` read-only (read-write with ``writable``; ``O_CLOEXEC``) if it is a regular
    file (or, with ``allow_block``, a block device); return the descriptor.

    Raises:
        OSError: the path cannot be stat-ed or opened.
        ValueError: it is a directory, FIFO, socket or device; the message names the path,
            what it is and ``advice`` (what to do instead).
    """
    st = os.stat(path)
    _check_kind(path, st.st_mode, allow_block, advice)
    # O_NONBLOCK: if the path became a FIFO after the stat, open() still returns at once (and
    # the check below refuses it). Reads of regular files and block devices ignore the flag.
    mode = os.O_RDWR if writable else os.O_RDONLY
    fd = os.open(path, mode | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        _check_kind(path, os.fstat(fd).st_mode, allow_block, advice)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_kind(path: str, mode: int, allow_block: bool, advice: str) -> None:
    if stat.S_ISREG(mode) or (allow_block and stat.S_ISBLK(mode)):
        return
    kind = file_kind(mode)
    wanted = "a regular file or a block device" if allow_block else "a regular file"
    if stat.S_ISDIR(mode):
        advice = "name a file in it"
    raise ValueError(f"{path!r} is {kind}, not {wanted}" + (f": {advice}" if advice else ""))
