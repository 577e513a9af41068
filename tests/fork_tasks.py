"""Tasks run by ``multiprocessing`` children forked in tests/test_fork.py.

With the fork start method, children inherit this module's globals: ``ARRAY`` is set to a
pager's numpy view before the pool forks, so the tasks read the pager's memory itself, not a
pickled copy of it.
"""

from __future__ import annotations

from typing import Any

ARRAY: Any = None


def slice_sum(bounds: tuple[int, int]) -> int:
    """The sum of ``ARRAY[lo:hi]``, computed in the child."""
    lo, hi = bounds
    return int(ARRAY[lo:hi].sum())
