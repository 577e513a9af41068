"""`userfault features`: the probe, the text report and --json."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from userfault.features import format_report, probe

pytestmark = pytest.mark.timeout(30)
KEYS = {"kernel", "creation", "dev_userfaultfd", "unprivileged_userfaultfd", "euid", "features",
        "missing_features", "api_ioctls", "memory_types", "hugepages_free", "advice"}


def features_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "userfault", "features", *args],
                          capture_output=True, text=True, timeout=30)


def test_json_report() -> None:
    proc = features_cmd("--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) >= KEYS
    assert len(report["features"]) == 17 and report["missing_features"] == []
    assert "MOVE" in report["features"] and "POISON" in report["features"]
    assert all(path["ok"] for path in report["creation"].values())  # root here
    assert report["unprivileged_userfaultfd"] == 0
    anon = report["memory_types"]["anonymous"]
    assert "COPY" in anon["missing"] and "error" in anon["minor"]
    assert "CONTINUE" in report["memory_types"]["shmem"]["minor"]
    assert report["dev_userfaultfd"]["exists"] is True


def test_text_report() -> None:
    proc = features_cmd()
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("kernel ")
    assert "features offered (17):" in out
    assert "creation paths:" in out and "ioctls per memory type and register mode:" in out
    assert "shmem      minor    " in out
    assert format_report(probe()).splitlines()[0] == out.splitlines()[0]
