"""A cgroup v1 memory limit for a test or a benchmark, removed afterwards (also on failure)."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
_groups = itertools.count()


def memory_cgroups_available() -> bool:
    """Root, and the cgroup v1 memory controller mounted at :data:`CGROUP_ROOT`."""
    return os.geteuid() == 0 and (CGROUP_ROOT / "memory.limit_in_bytes").exists()


@contextlib.contextmanager
def memory_cgroup(limit: int, prefix: str = "userfault-test") -> Iterator[Path]:
    """A new memory cgroup limited to ``limit`` bytes (write pids to its ``cgroup.procs``)."""
    group = CGROUP_ROOT / f"{prefix}-{os.getpid()}-{next(_groups)}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        with contextlib.suppress(OSError):  # no swap here; where there is, no escape into it
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
        yield group
    finally:
        for _ in range(100):
            try:
                group.rmdir()
                break
            except OSError:  # the last process is still leaving
                time.sleep(0.1)
        else:
            print(f"could not remove {group}: remove it by hand (rmdir)")
