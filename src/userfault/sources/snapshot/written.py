"""Lists of written ranges on disk: how a delta's pages travel from write tracking to
``userfault snapshot create --base BASE --changed FILE``.

The file is text: one ``OFFSET LENGTH`` line per range written, byte offsets into the memory
(decimal, or hex with ``0x``), in any order, overlaps allowed; blank lines and lines starting
with ``#`` are ignored. :func:`save_written` writes one, with a ``#`` header line::

    # userfault written ranges: OFFSET LENGTH per line
    0 4096
    1048576 8192
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["HEADER_LINE", "load_written", "save_written"]

HEADER_LINE = "# userfault written ranges: OFFSET LENGTH per line"


def save_written(path: str | os.PathLike[str], ranges: Iterable[tuple[int, int]]) -> int:
    """Write ``(offset, length)`` ranges (e.g.
    :meth:`~userfault.tracking.WriteTracker.written_ranges`) to ``path``; returns how many."""
    lines = [HEADER_LINE]
    for off, length in ranges:
        if off < 0 or length < 0:
            raise ValueError(f"a written range has a non-negative offset and length, not "
                             f"({off}, {length})")
        lines.append(f"{int(off)} {int(length)}")
    with open(path, "w", encoding="ascii") as f:
        f.write("\n".join(lines) + "\n")
    return len(lines) - 1


def load_written(path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """The ``(offset, length)`` ranges of a written-ranges file (format in this module).

    Raises:
        ValueError: a line is not two non-negative integers (the message names the line).
        OSError: the file cannot be read.
    """
    name = os.fsdecode(os.fspath(path))
    out: list[tuple[int, int]] = []
    with open(path, encoding="ascii", errors="replace") as f:
        for number, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                off, length = (int(x, 0) for x in text.split())
            except ValueError:
                off = length = -1
            if off < 0 or length < 0:
                raise ValueError(f"{name}, line {number}: expected 'OFFSET LENGTH' (two "
                                 f"non-negative integers), got {text[:80]!r}")
            out.append((off, length))
    return out
