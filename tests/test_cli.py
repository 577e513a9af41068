"""The `userfault` command line: help, argument errors, error messages."""

from __future__ import annotations

import subprocess
import sys

import pytest

from userfault.cli import build_parser, main

pytestmark = pytest.mark.timeout(30)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "userfault", *args], capture_output=True,
                          text=True, timeout=30)


def test_help() -> None:
    proc = cli("--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: userfault")
    for command in ("demo", "features"):
        assert command in proc.stdout
    assert "--pages" in cli("demo", "--help").stdout
    assert "--json" in cli("features", "--help").stdout


@pytest.mark.parametrize("args", [[], ["nonsense"], ["demo", "--pages", "x"],
                                  ["features", "--bogus"]])
def test_bad_arguments_exit_2(args: list[str]) -> None:
    proc = cli(*args)
    assert proc.returncode == 2
    assert "usage: userfault" in proc.stderr and "error:" in proc.stderr


def test_errors_print_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--pages", "0"]) == 1
    assert capsys.readouterr().err == (
        "userfault demo: error: the demo needs at least one page, not 0\n")


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["demo"])
    assert (args.pages, args.delay) == (2, 0.1)
