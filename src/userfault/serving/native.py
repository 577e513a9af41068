"""`InProcessRuntime`: the C engine's threads in this process.

For native sources (zero, pattern, buffer, file) in the faulting process itself, and for any
source when the faulting process is another one (the Firecracker pager's VMMs, the pager
process's worker): the threads take no GIL, or only the GIL of a process that does not fault.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .. import _native
from .runtime import ServingError, flush_result, prefetch_result

__all__ = ["InProcessRuntime"]


class InProcessRuntime:
    """Serves faults on an engine's threads in this process (a :class:`Runtime`)."""

    def __init__(self, engine: _native.Engine) -> None:
        self.engine = engine
        self._pid = os.getpid()

    def start(self) -> None:
        """Start the engine's threads."""
        self.engine.start()

    def stop(self) -> None:
        """Stop and join the threads; idempotent (a forked child's copy does nothing)."""
        self.engine.stop()

    def prefetch(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Install the ranges in one batch; raise if pages had to be poisoned."""
        return prefetch_result(self.engine.prefetch(list(ranges)))

    def willneed(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Queue the ranges for the background threads; bytes queued."""
        return int(self.engine.willneed(list(ranges)))

    def flush(self) -> int:
        """Write every dirty page back, durably; bytes written."""
        return flush_result(self.engine.flush())

    def at_exit(self) -> None:
        """The threads die with this process: write the trace so far, and poison what forked
        children never loaded."""
        self.engine.trace_sync()
        self.engine.orphan_children()

    def counters(self) -> dict[str, Any]:
        """The engine's counters."""
        return dict(self.engine.stats())

    def drain_log(self) -> bytes:
        """Packed fault records (see :data:`~userfault.serving.runtime.RECORD`)."""
        return bytes(self.engine.drain_log())

    def error(self) -> ServingError | None:
        """The first serving error, if any."""
        return ServingError.from_state(self.engine.error())

    @property
    def process_exited(self) -> bool:
        """Whether the process whose memory is served is gone (an install said ESRCH)."""
        return bool(self.engine.process_exited)

    @property
    def keeper_pid(self) -> int:
        """This process: the engine holds forked children's uffds."""
        return self._pid

    @property
    def memory_bytes(self) -> int:
        """Heap the engine holds."""
        return int(self.engine.memory_bytes)
