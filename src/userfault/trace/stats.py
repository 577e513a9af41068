"""A trace's summary: counts by kind and cause, bytes, pages, re-faults, latency, threads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .._units import human
from .format import Cause, Kind
from .reader import Trace

__all__ = ["ThreadTime", "TraceStats", "format_stats", "percentile", "summarize"]


@dataclass(frozen=True)
class ThreadTime:
    """Faults a thread waited for and the service time it spent blocked on them."""

    tid: int
    faults: int
    blocked_ns: int


@dataclass(frozen=True)
class TraceStats:
    """What :func:`summarize` finds in a trace. Latency and blocked time count FAULT events
    only (the ones a thread waited for); pages are the source pages faulted."""

    source: str
    region_size: int
    page_size: int
    #: records other than DROPPED markers
    records: int
    duration_ns: int
    #: ``counts[cause][kind]``: events by cause and kind (names, non-zero only)
    counts: dict[str, dict[str, int]]
    bytes_by_cause: dict[str, int]
    faults: int
    distinct_pages: int
    #: pages faulted more than once, and the faults beyond the first of each
    refaulted_pages: int
    refaults: int
    latency_ns: dict[str, int]
    threads: list[ThreadTime] = field(default_factory=list)
    dropped: int = 0
    partial_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def percentile(sorted_values: np.ndarray[Any, Any], q: float) -> int:
    """Nearest-rank percentile of ascending values: the smallest value with at least ``q``
    percent of the values at or below it (0 for no values)."""
    n = len(sorted_values)
    if not n:
        return 0
    rank = max(1, -(-int(q * n * 1000) // 100_000))  # ceil(q/100 * n) without float drift
    return int(sorted_values[min(rank, n) - 1])


def _name(cls: Any, value: int) -> str:
    try:
        return str(cls(value).name.lower())
    except ValueError:
        return f"unknown-{value}"


def summarize(trace: Trace) -> TraceStats:
    """Summarize ``trace`` (vectorized: a million records take well under a second)."""
    ev = trace.events
    meta = trace.meta
    counts: dict[str, dict[str, int]] = {}
    bytes_by_cause: dict[str, int] = {}
    if len(ev):
        pairs, n = np.unique(ev["cause"].astype(np.uint16) * 256 + ev["kind"],
                             return_counts=True)
        for pair, count in zip(pairs.tolist(), n.tolist(), strict=True):
            cause, kind = _name(Cause, pair >> 8), _name(Kind, pair & 0xFF)
            counts.setdefault(cause, {})[kind] = count
        for c in np.unique(ev["cause"]).tolist():
            sel = ev["length"][ev["cause"] == c]
            bytes_by_cause[_name(Cause, c)] = int(sel.sum(dtype=np.uint64))
    faults = ev[ev["cause"] == Cause.FAULT]
    pages, per_page = np.unique(faults["offset"] // max(meta.page_size, 1), return_counts=True)
    latency = np.sort(faults["service_ns"])
    lat = {f"p{q}": percentile(latency, q) for q in (50, 90, 99)}
    lat["max"] = int(latency[-1]) if len(latency) else 0
    threads: list[ThreadTime] = []
    if len(faults):
        tids, inverse = np.unique(faults["tid"], return_inverse=True)
        blocked = np.zeros(len(tids), dtype=np.uint64)
        np.add.at(blocked, inverse, faults["service_ns"].astype(np.uint64))
        nfaults = np.bincount(inverse)
        threads = sorted((ThreadTime(int(t), int(c), int(b))
                          for t, c, b in zip(tids, nfaults, blocked, strict=True)),
                         key=lambda t: (-t.blocked_ns, t.tid))
    t = ev["t_ns"]
    return TraceStats(
        source=meta.source, region_size=meta.region_size, page_size=meta.page_size,
        records=len(ev), duration_ns=int(t.max() - t.min()) if len(t) else 0,
        counts=counts, bytes_by_cause=bytes_by_cause, faults=len(faults),
        distinct_pages=len(pages), refaulted_pages=int((per_page > 1).sum()),
        refaults=int(len(faults) - len(pages)), latency_ns=lat, threads=threads,
        dropped=trace.dropped, partial_bytes=trace.partial_bytes)


def _us(ns: int) -> str:
    return f"{ns / 1000:.1f} us"


def format_stats(s: TraceStats, max_threads: int = 10) -> str:
    """The summary table ``userfault stats`` prints."""
    rows = [
        ("source", s.source),
        ("region", f"{s.region_size} bytes ({human(s.region_size)}), pages of "
                   f"{human(s.page_size)}"),
        ("records", f"{s.records}"),
        ("duration", f"{s.duration_ns / 1e9:.3f} s"),
    ]
    if s.counts:
        rows.append(("events", "by cause (and kind):"))
    for cause, kinds in s.counts.items():
        detail = ", ".join(f"{k} {n}" for k, n in kinds.items())
        rows.append((f"  {cause}", f"{sum(kinds.values())} ({detail})"))
    for cause, n in s.bytes_by_cause.items():
        rows.append((f"bytes {cause}", f"{n} ({human(n)})"))
    rows += [
        ("faults", f"{s.faults}"),
        ("distinct pages", f"{s.distinct_pages}"),
        ("re-faults", f"{s.refaults} on {s.refaulted_pages} pages"),
        ("latency", " ".join(f"{k} {_us(v)}" for k, v in s.latency_ns.items())),
        ("dropped", f"{s.dropped} records"),
    ]
    if s.partial_bytes:
        rows.append(("partial record", f"{s.partial_bytes} bytes ignored (the writer stopped "
                                       "mid-record)"))
    lines = [f"{k + ':':16} {v}" for k, v in rows]
    if s.threads:
        lines.append("blocked time per thread:")
        lines.append(f"  {'tid':>10} {'faults':>10} {'blocked':>14}")
        for t in s.threads[:max_threads]:
            lines.append(f"  {t.tid:>10} {t.faults:>10} {t.blocked_ns / 1e6:>11.3f} ms")
        if len(s.threads) > max_threads:
            rest = s.threads[max_threads:]
            lines.append(f"  ({len(rest)} more threads, {sum(t.blocked_ns for t in rest) / 1e6:.3f}"
                         " ms blocked)")
    return "\n".join(lines)
