"""The man-page demo: every missing page is served by a handler with a different letter.

A region of ``pages`` pages is registered; the native engine (C threads, no GIL) fills each
missing page with the next letter of A..T and logs the fault; the main thread, holding the GIL,
reads a byte every 1024 bytes starting 0xf bytes in (off a page boundary) and prints what it
read, after reporting the faults served for it.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .pager import Pager
from .sources.native import CyclingSource
from .uffd import PAGE_SIZE

__all__ = ["MAX_PAGES", "run_demo"]

#: The demo prints four lines per KiB read: more pages than this are not a demo any more.
MAX_PAGES = 4096


def run_demo(pages: int = 2, *, delay: float = 0.1, out: TextIO = sys.stdout) -> str:
    """Run the demo over ``pages`` pages; return the bytes read as a string of letters."""
    if pages < 1:
        raise ValueError(f"the demo needs at least one page, not {pages}")
    if pages > MAX_PAGES:
        raise ValueError(f"the demo shows at most {MAX_PAGES} pages, not {pages}")
    if not delay >= 0:
        raise ValueError(f"the delay must be 0 or more seconds, not {delay}")
    size = pages * PAGE_SIZE
    read = []
    # One page per fault and no readahead, so each fault is visible on its own.
    with Pager(CyclingSource(size), chunk=PAGE_SIZE, readahead=False,
               log_faults=pages + 16) as pager:
        print(f"Address returned by mmap() = {pager.address:#x}", file=out)
        # released even on an error, else closing the pager fails with BufferError
        with memoryview(pager) as view:
            offset = 0xF
            while offset < size:
                value = view[offset]  # may fault: the engine serves it while we hold the GIL
                for fault in pager.faults():
                    print(f"    UFFD_EVENT_PAGEFAULT event: flags = {fault.flags:x}; "
                          f"address = {fault.address:x}", file=out)
                    print(f"        (uffdio_copy.copy returned {PAGE_SIZE})", file=out)
                letter = chr(value)
                read.append(letter)
                print(f"Read address {pager.address + offset:#x} in main(): {letter}", file=out)
                offset += 1024
                if delay:
                    time.sleep(delay)
        stats = pager.stats()
    print(f"{stats.faults} faults served by the native engine; "
          f"service p50 {stats.latency_percentile(50) / 1000:.1f} us", file=out)
    return "".join(read)
