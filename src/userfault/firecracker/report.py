"""What one Firecracker VM did: :class:`VMReport`, its JSON object and its summary line."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..pager import PagerStats
from .protocol import GuestRegion, PeerCred

__all__ = ["VMReport"]


@dataclass
class VMReport:
    """What one VM did, reported when it ends."""

    vm: int
    peer: PeerCred | None = None
    regions: list[GuestRegion] = field(default_factory=list)
    page_size: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    end_reason: str = ""
    error: str | None = None
    stats: PagerStats = field(default_factory=PagerStats)
    prefetch_bytes: int = 0
    prefetch_s: float = 0.0
    recorded_pages: int = 0
    log_dropped: int = 0
    first_fault_s: float | None = None

    @property
    def duration_s(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def as_dict(self) -> dict[str, Any]:
        """The JSON object ``--json`` prints."""
        st = self.stats
        return {
            "vm": self.vm,
            "pid": self.peer.pid if self.peer else None,
            "uid": self.peer.uid if self.peer else None,
            "regions": [{"base_host_virt_addr": r.base_host_virt_addr, "size": r.size,
                         "offset": r.offset, "page_size": r.page_size} for r in self.regions],
            "guest_bytes": sum(r.size for r in self.regions),
            "page_size": self.page_size,
            "duration_s": round(self.duration_s, 6),
            "end_reason": self.end_reason,
            "error": self.error,
            "faults": st.faults,
            "write_faults": st.write_faults,
            "bytes_installed": st.bytes_installed,
            "fault_bytes": st.fault_bytes,
            "readahead_bytes": st.readahead_bytes,
            "prefetch_bytes": st.prefetch_bytes,
            "populate_bytes": st.populate_bytes,
            "prefetch_s": round(self.prefetch_s, 6),
            "eexist": st.eexist,
            "eagain": st.eagain,
            "remove_events": st.remove_events,
            "poisoned": st.poisoned,
            "latency_ns": {"p50": st.latency_percentile(50), "p90": st.latency_percentile(90),
                           "p99": st.latency_percentile(99), "max": st.service_max_ns},
            "latency_histogram_log2_ns": list(st.latency_histogram),
            "vcpu_blocked_ns": st.blocked_ns,
            "vcpu_blocked_is_lower_bound": True,
            "first_fault_s": self.first_fault_s,
            "recorded_pages": self.recorded_pages,
            "log_dropped": self.log_dropped,
        }

    def summary(self) -> str:
        """The one line printed to stderr when the VM ends."""
        st = self.stats
        pid = self.peer.pid if self.peer else "?"
        guest = sum(r.size for r in self.regions)
        line = (f"vm {self.vm} (pid {pid}) ended ({self.end_reason}) after "
                f"{self.duration_s:.2f} s: {len(self.regions)} region(s), "
                f"{guest / 2**20:.0f} MiB, {self.page_size // 1024} KiB pages; "
                f"{st.faults} faults, {st.bytes_installed / 2**20:.1f} MiB installed "
                f"({st.fault_bytes / 2**20:.1f} by faults, "
                f"{st.readahead_bytes / 2**20:.1f} readahead, "
                f"{st.prefetch_bytes / 2**20:.1f} prefetch, "
                f"{st.populate_bytes / 2**20:.1f} populate); service p50 "
                f"{st.latency_percentile(50) / 1000:.1f} us p99 "
                f"{st.latency_percentile(99) / 1000:.1f} us max {st.service_max_ns / 1000:.0f} us;"
                f" vCPUs blocked >= {st.blocked_ns / 1e6:.1f} ms (lower bound); "
                f"eexist {st.eexist} eagain {st.eagain} remove {st.remove_events}")
        if self.prefetch_bytes or self.prefetch_s:
            line += (f"; prefetched {self.prefetch_bytes / 2**20:.1f} MiB in "
                     f"{self.prefetch_s * 1e3:.1f} ms before serving faults")
        if self.recorded_pages:
            line += f"; recorded {self.recorded_pages} pages"
        if self.log_dropped:
            line += f" ({self.log_dropped} fault records DROPPED: the record is incomplete)"
        if self.error:
            line += f"; error: {self.error}"
        return line
