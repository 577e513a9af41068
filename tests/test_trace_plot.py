"""`userfault plot`: real PNG and HTML files, binned data that adds up, a million records."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from userfault.cli import main
from userfault.trace import RECORD_DTYPE, Cause, Kind, TraceMeta, TraceWriter, read
from userfault.trace.plot import bin_trace

PAGE = 4096
META = TraceMeta(source="plot test", region_size=1 << 30, page_size=PAGE)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def html_data(path: Path) -> dict[str, object]:
    page = path.read_text()
    found = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
    assert found, "the page lost its embedded data"
    return json.loads(found.group(1))  # type: ignore[no-any-return]


def assert_offline(path: Path) -> None:
    page = path.read_text()
    assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}/|\bsrc\s*=|<link\b|@import", page,
                         re.I), "the page refers to something outside itself"


def synthetic(n: int, seed: int = 0) -> np.ndarray:
    """``n`` records: a sequential fault scan over the first half of the time, random
    prefetch installs over the second half; 8 threads."""
    rng = np.random.default_rng(seed)
    a = np.zeros(n, RECORD_DTYPE)
    half = n // 2
    a["t_ns"][:half] = np.arange(half) * 1000
    a["offset"][:half] = (np.arange(half) % (1 << 18)) * PAGE
    a["cause"][:half] = Cause.FAULT
    a["kind"][:half] = Kind.READ
    a["tid"][:half] = 100 + np.arange(half) % 8
    a["service_ns"][:half] = 1000 + np.arange(half) % 7 * 1000
    a["t_ns"][half:] = half * 1000 + np.arange(n - half) * 1000
    a["offset"][half:] = rng.integers(0, 1 << 18, n - half) * PAGE
    a["cause"][half:] = Cause.PREFETCH
    a["kind"][half:] = Kind.NONE
    a["length"] = PAGE
    return a


def write(path: Path, records: np.ndarray, dropped: int = 0) -> Path:
    with TraceWriter(path, META) as w:
        w.write_array(records)
        if dropped:
            w.write_dropped(int(records["t_ns"].max()), dropped)
    return path


def test_bins_put_each_event_where_it_belongs(tmp_path: Path) -> None:
    a = np.zeros(4, RECORD_DTYPE)
    # t = 0, 1, 2, 3 s at offsets 0, 1/4, 1/2, 3/4 of the region; the last is readahead
    a["t_ns"] = np.arange(4) * 1_000_000_000
    a["offset"] = np.arange(4) * (META.region_size // 4)
    a["cause"] = [Cause.FAULT, Cause.FAULT, Cause.FAULT, Cause.READAHEAD]
    a["tid"] = [5, 5, 6, 0]
    a["service_ns"] = [1000, 3000, 2000, 0]
    data = bin_trace(read(write(tmp_path / "t", a)), time_bins=4, offset_bins=4)
    diag = np.zeros((4, 4), int)
    diag[[0, 1, 2, 3], [0, 1, 2, 3]] = 1  # offset bin i at time bin i (the last in the end bin)
    assert (data.heat["all"] == diag).all()
    assert data.heat["readahead"].sum() == 1 and data.heat["readahead"][3, 3] == 1
    assert data.heat["fault"].sum() == 3
    assert data.time_edges[-1] == pytest.approx(3.0)
    assert int(data.latency_counts.sum()) == 3
    assert data.latency_edges[0] <= 1000 and data.latency_edges[-1] > 3000
    assert data.threads == [(5, 2, 4000), (6, 1, 2000)]


def test_plot_cli_writes_png_and_offline_html(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    records = synthetic(20_000)
    trace = write(tmp_path / "t.uftrace", records, dropped=9)
    png, page = tmp_path / "out.png", tmp_path / "out.html"
    assert main(["plot", str(trace), "-o", str(png), "--html", str(page)]) == 0
    assert capsys.readouterr().out == f"wrote {png} (1200x1000)\nwrote {page}\n"
    assert png_size(png) == (1200, 1000)
    assert_offline(page)
    doc = html_data(page)
    assert doc["records"] == 20_000 and doc["dropped"] == 9
    layers = doc["layers"]
    assert isinstance(layers, dict) and set(layers) == {"all", "fault", "prefetch"}
    assert np.array(layers["all"]).sum() == 20_000
    assert np.array(layers["fault"]).sum() == 10_000
    assert sum(doc["latency_counts"]) == 10_000  # type: ignore[arg-type]
    faults = records[records["cause"] == Cause.FAULT]
    expected = sorted(([tid, int((faults["tid"] == tid).sum()),
                        int(faults["service_ns"][faults["tid"] == tid].sum())]
                       for tid in range(100, 108)), key=lambda t: (-t[2], t[0]))
    assert doc["threads"] == expected
    assert "plot test: 20000 records, 9 dropped" in page.read_text()

    assert main(["plot", str(trace), "-o", str(png), "--width", "800", "--height", "600"]) == 0
    assert png_size(png) == (800, 600)


def test_plot_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write(tmp_path / "t.uftrace", synthetic(10))
    assert main(["plot", str(trace)]) == 1
    assert capsys.readouterr().err == ("userfault plot: error: nothing to write: give "
                                       "-o OUT.png and/or --html OUT.html\n")
    assert main(["plot", str(tmp_path / "nope"), "-o", str(tmp_path / "x.png")]) == 1
    assert "No such file" in capsys.readouterr().err


def test_empty_trace_plots(tmp_path: Path) -> None:
    trace = write(tmp_path / "e.uftrace", np.zeros(0, RECORD_DTYPE))
    png, page = tmp_path / "e.png", tmp_path / "e.html"
    assert main(["plot", str(trace), "-o", str(png), "--html", str(page)]) == 0
    assert png_size(png) == (1200, 1000)
    assert html_data(page)["records"] == 0


def test_plot_progress_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write(tmp_path / "t.uftrace", synthetic(1000))
    assert main(["plot", str(trace), "--html", str(tmp_path / "p.html"), "--progress"]) == 0
    err = capsys.readouterr().err
    assert "\r[" in err and "100.0%" in err and "records/s" in err and "binning" in err
    assert main(["plot", str(trace), "--html", str(tmp_path / "p.html")]) == 0
    assert capsys.readouterr().err == ""  # not a terminal: no bar


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_a_million_records(tmp_path: Path) -> None:
    n = 1_000_000
    trace = write(tmp_path / "m.uftrace", synthetic(n, seed=3))
    png, page = tmp_path / "m.png", tmp_path / "m.html"
    assert main(["plot", str(trace), "-o", str(png), "--html", str(page)]) == 0
    assert png_size(png) == (1200, 1000)
    assert_offline(page)
    doc = html_data(page)
    grid = np.array(doc["layers"]["fault"])  # type: ignore[index]
    assert grid.shape == (150, 300) and grid.sum() == n // 2
    # the sequential scan fills the first half of the time only
    assert grid[:, :150].sum() == n // 2 and grid[:, 150:].sum() == 0
    prefetch = np.array(doc["layers"]["prefetch"])  # type: ignore[index]
    assert prefetch[:, 150:].sum() == n // 2 and prefetch[:, :149].sum() == 0
    assert sum(doc["latency_counts"]) == n // 2  # type: ignore[arg-type]
    blocked = {t[0]: t[2] for t in doc["threads"]}  # type: ignore[union-attr]
    assert sum(blocked.values()) == int(synthetic(n, seed=3)["service_ns"].sum())


@pytest.mark.timeout(90)
def test_html_page_runs_in_a_headless_browser(tmp_path: Path) -> None:
    """Where Chromium is installed: the page's script runs offline and fills in its view."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    page = tmp_path / "p.html"
    assert main(["plot", str(write(tmp_path / "t.uftrace", synthetic(5000))),
                 "--html", str(page)]) == 0
    run = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=80)
    shown = re.search(r'<span id="range" class="note">(.*?)</span>', run.stdout)
    assert shown, run.stderr[-2000:]
    assert shown.group(1).startswith("time 0.0 us .. ") and "busiest bin" in shown.group(1)
