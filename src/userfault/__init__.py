"""userfault: on-demand paging from userland on Linux.

A complete typed binding of userfaultfd(2) (:class:`Uffd`, :class:`Region`), a GIL-free
fault engine (:class:`Pager`, :func:`map`) and page sources that serve memory lazily from
files, buffers, compressed snapshots, HTTP and Redis.

Quick start::

    import userfault
    with userfault.map("big.bin") as mem:      # nothing is read yet
        view = memoryview(mem)
        print(view[123456789])                 # one page (plus readahead) is read now
        view.release()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._events import Event, Fork, Pagefault, Remap, Remove, Unmap, parse_messages
from ._flags import (
    ContinueMode,
    CopyMode,
    FaultFlag,
    Feature,
    Ioctl,
    MoveMode,
    PageCategory,
    PoisonMode,
    RegisterMode,
    ScanFlag,
    WriteProtectMode,
    ZeropageMode,
)
from .errors import (
    AlreadyMappedError,
    BadArgumentError,
    ClosedError,
    FeatureUnavailableError,
    MappingChangedError,
    PagerError,
    PermissionDeniedError,
    PrefetchError,
    ProcessGoneError,
    RangeNotRegisteredError,
    SnapshotError,
    SourceError,
    UffdError,
    UserModeOnlyWarning,
)
from .pager import FaultRecord, Pager, PagerStats, map
from .region import HUGE_PAGE_SIZE, Region, align_down, align_up, hugepages_free
from .serving.config import ServeConfig
from .sources.base import BatchedPageSource, PageSource, WritablePageSource
from .sources.native import (
    BufferSource,
    CyclingSource,
    FileSource,
    PatternSource,
    ZeroSource,
)
from .tracking import PageRange, WriteTracker, pagemap_scan
from .uffd import DEFAULT_FEATURES, PAGE_SIZE, Uffd, offered_features, recv_uffd, send_uffd

if TYPE_CHECKING:
    from .serving.process import prestart

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_FEATURES",
    "HUGE_PAGE_SIZE",
    "PAGE_SIZE",
    "AlreadyMappedError",
    "BadArgumentError",
    "BatchedPageSource",
    "BufferSource",
    "ClosedError",
    "ContinueMode",
    "CopyMode",
    "CyclingSource",
    "Event",
    "FaultFlag",
    "FaultRecord",
    "Feature",
    "FeatureUnavailableError",
    "FileSource",
    "Fork",
    "Ioctl",
    "MappingChangedError",
    "MoveMode",
    "PageCategory",
    "PageRange",
    "PageSource",
    "Pagefault",
    "Pager",
    "PagerError",
    "PagerStats",
    "PatternSource",
    "PermissionDeniedError",
    "PoisonMode",
    "PrefetchError",
    "ProcessGoneError",
    "RangeNotRegisteredError",
    "Region",
    "RegisterMode",
    "Remap",
    "Remove",
    "ScanFlag",
    "ServeConfig",
    "SnapshotError",
    "SourceError",
    "Uffd",
    "UffdError",
    "Unmap",
    "UserModeOnlyWarning",
    "WritablePageSource",
    "WriteProtectMode",
    "WriteTracker",
    "ZeroSource",
    "ZeropageMode",
    "__version__",
    "align_down",
    "align_up",
    "hugepages_free",
    "map",
    "offered_features",
    "pagemap_scan",
    "parse_messages",
    "prestart",
    "recv_uffd",
    "send_uffd",
]

_LAZY_SUBMODULES = ("trace", "working_set")


def __getattr__(name: str) -> object:
    """``userfault.trace`` and ``userfault.working_set`` are imported on first use (they pull
    in numpy), and :func:`~userfault.serving.process.prestart` with the pager process's
    module."""
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    if name == "prestart":
        from .serving.process import prestart

        return prestart
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
