"""Serving faults: one C engine for every source, run in this process or in a pager process.

* :class:`~userfault.serving.config.ServeConfig`: how faults are served (validated once);
* :func:`~userfault.serving.runtime.build_runtime`: the runtime for a uffd and a source;
* :class:`~userfault.serving.native.InProcessRuntime`,
  :class:`~userfault.serving.process.ProcessRuntime`: the two runtimes;
* :mod:`~userfault.serving.progress`: progress bars of populate, working sets and prefetch;
* :mod:`~userfault.serving.forks`: forked children hold their own uffd, so the death of the
  process serving them gives SIGBUS, never zeros.
"""

from __future__ import annotations

from .config import ServeConfig
from .runtime import FaultRecord, PagerStats, Runtime, ServingError, build_runtime

__all__ = ["FaultRecord", "PagerStats", "Runtime", "ServeConfig", "ServingError",
           "build_runtime"]
