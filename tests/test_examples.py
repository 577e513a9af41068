"""The README's runnable example prints exactly what the README says it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(60)
def test_quickstart_output_matches_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    shown = re.search(r"Its exact output:\n\n```text\n(.*?)```", readme, re.S)
    assert shown, "the README lost its 'Its exact output' block"
    code = re.search(r"\[`examples/quickstart.py`\]\(examples/quickstart.py\):\n\n```python\n"
                     r"(.*?)```", readme, re.S)
    assert code, "the README lost the quickstart listing"
    script = (ROOT / "examples" / "quickstart.py").read_text()
    assert code.group(1) in script, "the README's listing differs from examples/quickstart.py"
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                         capture_output=True, text=True, timeout=50)
    assert run.returncode == 0, run.stderr
    assert run.stdout == shown.group(1)


@pytest.mark.timeout(120)
def test_the_out_of_core_example_doubles_a_matrix_four_times_its_budget() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "out_of_core_numpy.py"),
                          "--size", "16M", "--budget", "4M"],
                         capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stderr
    assert "column sums doubled, in memory and in the file: ok" in run.stdout
    assert "evictions 0," not in run.stdout  # the budget was exceeded, and held


@pytest.mark.timeout(120)
def test_the_trace_example_writes_an_engine_trace(tmp_path: Path) -> None:
    """examples/trace_a_workload.py traces its three readers with ``trace=``: the file reads
    back with the faults of a 16 MiB region, and ``userfault stats`` summarizes it."""
    from userfault.trace import Cause, read

    out = tmp_path / "run.uftrace"
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "trace_a_workload.py"),
                          str(out), "--size", "16M"], capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, run.stderr
    trace = read(out)
    events = trace.events
    assert trace.meta.region_size == 16 << 20 and "data.bin" in trace.meta.source
    assert (events["cause"] == Cause.FAULT).any()
    assert (events["offset"] + events["length"] <= 16 << 20).all()
    stats = subprocess.run([sys.executable, "-m", "userfault", "stats", str(out)],
                           capture_output=True, text=True, timeout=60)
    assert stats.returncode == 0 and "faults:" in stats.stdout, stats.stderr
