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
