"""Pictures of a trace: offset-against-time heatmap, service-latency histogram, blocked time
per thread. :func:`bin_trace` bins with numpy (a million records in a fraction of a second);
:func:`write_png` draws with matplotlib's Agg canvas, :func:`write_html` writes a standalone
page (canvas + inline JavaScript, the binned data embedded as JSON, nothing fetched).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._units import human
from .format import Cause
from .reader import Trace

__all__ = ["PlotData", "bin_trace", "write_html", "write_png"]

#: records binned per step (the progress callback is called after each)
CHUNK = 1 << 20
#: quarter-octave latency bins
_LAT_STEPS_PER_OCTAVE = 4


@dataclass
class PlotData:
    """A trace reduced to what the pictures show."""

    source: str
    page_size: int
    records: int
    dropped: int
    #: seconds since the first event, ``time_bins + 1`` edges
    time_edges: np.ndarray[Any, Any]
    #: source offsets in bytes, ``offset_bins + 1`` edges
    offset_edges: np.ndarray[Any, Any]
    #: events per (offset bin, time bin): ``"all"`` and one grid per cause present
    heat: dict[str, np.ndarray[Any, Any]]
    #: service-latency histogram of FAULT events: edges in ns (log spaced) and counts
    latency_edges: np.ndarray[Any, Any]
    latency_counts: np.ndarray[Any, Any]
    #: (tid, faults, blocked ns), most blocked first
    threads: list[tuple[int, int, int]] = field(default_factory=list)


def bin_trace(trace: Trace, time_bins: int = 300, offset_bins: int = 150,
              progress: Callable[[int, int], None] | None = None) -> PlotData:
    """Bin ``trace`` for plotting; ``progress(done, total)`` is called per :data:`CHUNK`
    records."""
    if time_bins < 1 or offset_bins < 1:
        raise ValueError("time_bins and offset_bins must be positive")
    ev = trace.events
    meta = trace.meta
    n = len(ev)
    t0 = int(ev["t_ns"].min()) if n else 0
    span_ns = max(int(ev["t_ns"].max()) - t0, 1) if n else 1
    top = max(meta.region_size, meta.source_size or 0,
              int((ev["offset"] + ev["length"]).max()) if n else 0, meta.page_size)
    causes = sorted(int(c) for c in np.unique(ev["cause"])) if n else []
    slot = {c: i for i, c in enumerate(causes)}
    lut = np.zeros(256, dtype=np.int64)
    for c, i in slot.items():
        lut[c] = i
    cells = time_bins * offset_bins
    grid = np.zeros(max(len(causes), 1) * cells, dtype=np.int64)
    for start in range(0, n, CHUNK):
        part = ev[start: start + CHUNK]
        ti = ((part["t_ns"] - np.uint64(t0)).astype(np.float64) * (time_bins / span_ns))
        ti = np.minimum(ti.astype(np.int64), time_bins - 1)
        oi = np.minimum((part["offset"].astype(np.float64) * (offset_bins / top))
                        .astype(np.int64), offset_bins - 1)
        idx = lut[part["cause"]] * cells + oi * time_bins + ti
        grid += np.bincount(idx, minlength=len(grid))
        if progress is not None:
            progress(min(start + CHUNK, n), n)
    grids = grid.reshape(max(len(causes), 1), offset_bins, time_bins)
    heat = {"all": grids.sum(axis=0)}
    for c, i in slot.items():
        heat[_cause_name(c)] = grids[i]

    faults = ev[ev["cause"] == Cause.FAULT]
    lat = np.maximum(faults["service_ns"].astype(np.float64), 1.0)
    if len(lat):
        lo = math.floor(math.log2(lat.min()) * _LAT_STEPS_PER_OCTAVE)
        hi = max(math.ceil(math.log2(lat.max()) * _LAT_STEPS_PER_OCTAVE), lo + 1)
        if 2.0 ** (hi / _LAT_STEPS_PER_OCTAVE) <= lat.max():
            hi += 1
    else:
        lo, hi = 0, 1
    lat_edges = 2.0 ** (np.arange(lo, hi + 1) / _LAT_STEPS_PER_OCTAVE)
    lat_counts, _ = np.histogram(lat, bins=lat_edges)

    threads: list[tuple[int, int, int]] = []
    if len(faults):
        tids, inverse = np.unique(faults["tid"], return_inverse=True)
        blocked = np.zeros(len(tids), dtype=np.uint64)
        np.add.at(blocked, inverse, faults["service_ns"].astype(np.uint64))
        counts = np.bincount(inverse)
        threads = sorted(((int(t), int(c), int(b)) for t, c, b in
                          zip(tids, counts, blocked, strict=True)), key=lambda r: (-r[2], r[0]))
    return PlotData(
        source=meta.source, page_size=meta.page_size, records=n, dropped=trace.dropped,
        time_edges=np.linspace(0.0, span_ns / 1e9, time_bins + 1),
        offset_edges=np.linspace(0.0, float(top), offset_bins + 1), heat=heat,
        latency_edges=lat_edges, latency_counts=lat_counts, threads=threads)


def _cause_name(c: int) -> str:
    try:
        return Cause(c).name.lower()
    except ValueError:
        return f"cause-{c}"


def _title(data: PlotData) -> str:
    drop = f", {data.dropped} dropped" if data.dropped else ""
    return f"{data.source}: {data.records} records{drop}"


def write_png(data: PlotData, path: str, width: int = 1200, height: int = 1000,
              max_threads: int = 24) -> None:
    """Draw the three pictures into one ``width`` x ``height`` pixel PNG at ``path``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, MultipleLocator
    except ImportError as err:
        raise ImportError("drawing a PNG needs matplotlib: pip install 'userfault[plot]' "
                          "(or write only the HTML page with --html)") from err

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=(3, 2), hspace=0.35, wspace=0.3,
                            left=0.09, right=0.97, top=0.93, bottom=0.07)
    fig.suptitle(_title(data), fontsize=12)

    ax = fig.add_subplot(grid[0, :])
    heat = data.heat["all"]
    if heat.any():
        mesh = ax.pcolormesh(data.time_edges, data.offset_edges, np.ma.masked_equal(heat, 0),
                             norm=LogNorm(vmin=1, vmax=max(int(heat.max()), 2)),
                             cmap="viridis", shading="flat")
        fig.colorbar(mesh, ax=ax, label="events per bin", pad=0.01)
    ax.set_xlim(data.time_edges[0], data.time_edges[-1])
    ax.set_ylim(data.offset_edges[-1], data.offset_edges[0])  # offset 0 at the top
    top = float(data.offset_edges[-1])
    ax.yaxis.set_major_locator(MultipleLocator(2.0 ** math.floor(math.log2(max(top / 6, 1)))))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: human(v)))
    ax.set_xlabel("time since the first event (s)")
    ax.set_ylabel("source offset")
    ax.set_title("faults and installs: offset against time")

    ax = fig.add_subplot(grid[1, 0])
    edges, counts = data.latency_edges, data.latency_counts
    if counts.any():
        ax.stairs(counts, edges / 1000, fill=True, color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("service latency (us)")
    ax.set_ylabel("faults")
    ax.set_title(f"service latency ({int(counts.sum())} faults)")

    ax = fig.add_subplot(grid[1, 1])
    shown = data.threads[:max_threads]
    if shown:
        labels = [str(t) for t, _, _ in shown]
        ax.barh(range(len(shown)), [b / 1e6 for _, _, b in shown], color="tab:orange")
        ax.set_yticks(range(len(shown)), labels, fontsize=8 if len(shown) > 12 else 10)
        ax.set_ylim(max(len(shown), 6) - 0.5, -0.5)  # most blocked on top; few bars stay thin
    more = len(data.threads) - len(shown)
    ax.set_xlabel("blocked time (ms)")
    ax.set_ylabel("thread id")
    ax.set_title("blocked time per thread" + (f" (top {len(shown)}, {more} more)"
                                              if more else ""))
    fig.savefig(path, format="png", dpi=dpi)


def _payload(data: PlotData) -> dict[str, Any]:
    return {
        "title": _title(data),
        "source": data.source,
        "page_size": data.page_size,
        "records": data.records,
        "dropped": data.dropped,
        "time_edges": [round(float(x), 9) for x in data.time_edges],
        "offset_edges": [float(x) for x in data.offset_edges],
        "layers": {name: grid.tolist() for name, grid in data.heat.items()},
        "latency_edges": [float(x) for x in data.latency_edges],
        "latency_counts": data.latency_counts.tolist(),
        "threads": [list(t) for t in data.threads],
    }


def write_html(data: PlotData, path: str) -> None:
    """Write a standalone interactive page: drag on the heatmap to zoom (double-click to
    reset), hover any chart for its numbers. It loads nothing from the network."""
    doc = json.dumps(_payload(data), separators=(",", ":")).replace("</", "<\\/")
    page = (_HTML.replace("__TITLE__", html.escape(_title(data)))
            .replace("__DATA__", doc))
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)


_HTML = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 18px; margin: 0 0 8px; }
.row { display: flex; gap: 24px; flex-wrap: wrap; }
.panel { margin-top: 12px; }
canvas { border: 1px solid #ccc; display: block; }
#tip { position: fixed; pointer-events: none; background: #fff; border: 1px solid #888;
       padding: 4px 6px; font-size: 12px; display: none; white-space: pre; }
.note { color: #666; font-size: 12px; }
</style>
</head>
<body>
<h1>__TITLE__</h1>
<div class="note">Drag on the heatmap to zoom into a region, double-click (or Reset) to see it
all; hover any chart for its numbers.</div>
<div class="panel">
  <label>events: <select id="layer"></select></label>
  <button id="reset">Reset zoom</button>
  <span id="range" class="note"></span>
  <canvas id="heat" width="1100" height="460"></canvas>
</div>
<div class="row">
  <div class="panel"><b>service latency of faults</b><canvas id="lat" width="540" height="300">
  </canvas></div>
  <div class="panel"><b>blocked time per thread</b><canvas id="thr" width="540" height="300">
  </canvas></div>
</div>
<div id="tip"></div>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const tip = document.getElementById("tip");
const VIRIDIS = [[68,1,84],[72,40,120],[62,74,137],[49,104,142],[38,130,142],[31,158,137],
                 [53,183,121],[109,205,89],[180,222,44],[253,231,37]];
function color(f) {
  const x = Math.max(0, Math.min(1, f)) * (VIRIDIS.length - 1), i = Math.floor(x);
  const a = VIRIDIS[i], b = VIRIDIS[Math.min(i + 1, VIRIDIS.length - 1)], t = x - i;
  return "rgb(" + [0, 1, 2].map(k => Math.round(a[k] + (b[k] - a[k]) * t)).join(",") + ")";
}
function bytes(n) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (Math.abs(n) >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n.toFixed(0)) + " " + u[i];
}
function secs(s) { return s < 1e-3 ? (s * 1e6).toFixed(1) + " us" : s < 1 ?
  (s * 1e3).toFixed(2) + " ms" : s.toFixed(3) + " s"; }
function ns(v) { return v < 1e3 ? v.toFixed(0) + " ns" : v < 1e6 ? (v / 1e3).toFixed(1) +
  " us" : (v / 1e6).toFixed(2) + " ms"; }
function showTip(ev, text) {
  tip.textContent = text; tip.style.display = "block";
  tip.style.left = (ev.clientX + 14) + "px"; tip.style.top = (ev.clientY + 14) + "px";
}
function hideTip() { tip.style.display = "none"; }

// -- heatmap ---------------------------------------------------------------------------
const heat = document.getElementById("heat"), hc = heat.getContext("2d");
const layerSel = document.getElementById("layer");
for (const name of Object.keys(D.layers)) {
  const o = document.createElement("option"); o.value = o.textContent = name;
  layerSel.appendChild(o);
}
const NT = D.time_edges.length - 1, NO = D.offset_edges.length - 1;
const M = {l: 80, r: 20, t: 10, b: 40};
let view = {t0: 0, t1: NT, o0: 0, o1: NO}, drag = null;
function plotArea() { return {x: M.l, y: M.t, w: heat.width - M.l - M.r,
                              h: heat.height - M.t - M.b}; }
function drawHeat() {
  const g = D.layers[layerSel.value], A = plotArea();
  hc.clearRect(0, 0, heat.width, heat.height);
  let max = 1;
  for (let o = view.o0; o < view.o1; o++)
    for (let t = view.t0; t < view.t1; t++) max = Math.max(max, g[o][t]);
  const cw = A.w / (view.t1 - view.t0), ch = A.h / (view.o1 - view.o0), lm = Math.log(max + 1);
  hc.fillStyle = "#f4f4f4"; hc.fillRect(A.x, A.y, A.w, A.h);
  for (let o = view.o0; o < view.o1; o++)
    for (let t = view.t0; t < view.t1; t++) {
      const v = g[o][t]; if (!v) continue;
      hc.fillStyle = color(Math.log(v + 1) / lm);
      hc.fillRect(A.x + (t - view.t0) * cw, A.y + (o - view.o0) * ch,
                  Math.ceil(cw), Math.ceil(ch));
    }
  hc.fillStyle = "#222"; hc.font = "12px sans-serif"; hc.textAlign = "right";
  for (let k = 0; k <= 5; k++) {
    const o = view.o0 + (view.o1 - view.o0) * k / 5;
    hc.fillText(bytes(D.offset_edges[0] + (D.offset_edges[NO] - D.offset_edges[0]) * o / NO),
                A.x - 4, A.y + A.h * k / 5 + 4);
  }
  hc.textAlign = "center";
  for (let k = 0; k <= 6; k++) {
    const t = view.t0 + (view.t1 - view.t0) * k / 6;
    hc.fillText(secs(D.time_edges[NT] * t / NT), A.x + A.w * k / 6, A.y + A.h + 16);
  }
  hc.fillText("time since the first event", A.x + A.w / 2, A.y + A.h + 34);
  document.getElementById("range").textContent = "time " +
    secs(D.time_edges[view.t0]) + " .. " + secs(D.time_edges[view.t1]) + ", offsets " +
    bytes(D.offset_edges[view.o0]) + " .. " + bytes(D.offset_edges[view.o1]) +
    ", busiest bin " + max + " events";
  if (drag && drag.x1 !== undefined) {
    hc.strokeStyle = "#e33"; hc.lineWidth = 1.5;
    hc.strokeRect(drag.x0, drag.y0, drag.x1 - drag.x0, drag.y1 - drag.y0);
  }
}
function cellAt(ev) {
  const r = heat.getBoundingClientRect(), A = plotArea();
  const x = (ev.clientX - r.left) * heat.width / r.width, y = (ev.clientY - r.top) *
    heat.height / r.height;
  if (x < A.x || y < A.y || x >= A.x + A.w || y >= A.y + A.h) return null;
  return {x: x, y: y,
          t: view.t0 + Math.floor((x - A.x) / A.w * (view.t1 - view.t0)),
          o: view.o0 + Math.floor((y - A.y) / A.h * (view.o1 - view.o0))};
}
heat.addEventListener("mousedown", ev => { const c = cellAt(ev); if (c) drag = {x0: c.x,
  y0: c.y, c0: c}; });
heat.addEventListener("mousemove", ev => {
  const c = cellAt(ev);
  if (drag && c) { drag.x1 = c.x; drag.y1 = c.y; drag.c1 = c; drawHeat(); }
  if (!c) { hideTip(); return; }
  const v = D.layers[layerSel.value][c.o][c.t];
  showTip(ev, "time " + secs(D.time_edges[c.t]) + " .. " + secs(D.time_edges[c.t + 1]) +
    "\noffset " + bytes(D.offset_edges[c.o]) + " .. " + bytes(D.offset_edges[c.o + 1]) +
    "\n" + v + " events (" + layerSel.value + ")");
});
heat.addEventListener("mouseleave", hideTip);
window.addEventListener("mouseup", () => {
  if (drag && drag.c1) {
    const a = drag.c0, b = drag.c1;
    const t0 = Math.min(a.t, b.t), t1 = Math.max(a.t, b.t) + 1;
    const o0 = Math.min(a.o, b.o), o1 = Math.max(a.o, b.o) + 1;
    if (t1 - t0 >= 2 || o1 - o0 >= 2) view = {t0: t0, t1: t1, o0: o0, o1: o1};
  }
  drag = null; drawHeat();
});
function resetZoom() { view = {t0: 0, t1: NT, o0: 0, o1: NO}; drawHeat(); }
heat.addEventListener("dblclick", resetZoom);
document.getElementById("reset").addEventListener("click", resetZoom);
layerSel.addEventListener("change", drawHeat);

// -- bar charts ------------------------------------------------------------------------
function bars(canvas, values, title, tick, tipText, horizontal) {
  const c = canvas.getContext("2d"), A = {x: 70, y: 10, w: canvas.width - 90,
                                          h: canvas.height - 50};
  const max = Math.max(1, ...values), n = Math.max(values.length, 1);
  c.clearRect(0, 0, canvas.width, canvas.height);
  c.fillStyle = horizontal ? "#f28e2b" : "#4e79a7";
  values.forEach((v, i) => {
    if (horizontal) c.fillRect(A.x, A.y + A.h * i / n + 1, A.w * v / max,
                               Math.max(A.h / n - 2, 1));
    else c.fillRect(A.x + A.w * i / n, A.y + A.h * (1 - v / max), Math.max(A.w / n - 1, 1),
                    A.h * v / max);
  });
  c.fillStyle = "#222"; c.font = "11px sans-serif"; c.textAlign = "center";
  c.fillText(title, A.x + A.w / 2, A.y + A.h + 34);
  if (horizontal) {
    c.textAlign = "right";
    if (n <= 24) values.forEach((v, i) => c.fillText(tick(i), A.x - 4, A.y + A.h * (i + 0.6) / n));
  } else {
    for (let k = 0; k <= 4; k++) {
      const i = Math.min(n - 1, Math.round((n - 1) * k / 4));
      if (values.length) c.fillText(tick(i), A.x + A.w * (i + 0.5) / n, A.y + A.h + 16);
    }
  }
  canvas.addEventListener("mousemove", ev => {
    const r = canvas.getBoundingClientRect();
    const x = (ev.clientX - r.left) * canvas.width / r.width - A.x;
    const y = (ev.clientY - r.top) * canvas.height / r.height - A.y;
    const i = Math.floor((horizontal ? y / A.h : x / A.w) * n);
    if (i < 0 || i >= values.length || x < 0 || y < 0) { hideTip(); return; }
    showTip(ev, tipText(i));
  });
  canvas.addEventListener("mouseleave", hideTip);
}
const LE = D.latency_edges;
bars(document.getElementById("lat"), D.latency_counts, "service latency (log scale)",
     i => ns(LE[i]),
     i => ns(LE[i]) + " .. " + ns(LE[i + 1]) + ": " + D.latency_counts[i] + " faults", false);
const TH = D.threads.slice(0, 40);
bars(document.getElementById("thr"), TH.map(t => t[2]),
     "blocked time (most blocked first; the thread id on the left)", i => String(TH[i][0]),
     i => "thread " + TH[i][0] + ": " + TH[i][1] + " faults, blocked " + ns(TH[i][2]), true);
drawHeat();
</script>
</body>
</html>
"""
