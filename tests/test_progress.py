"""The progress API: off when not a terminal, forced on, the plain bar, rich and tqdm."""

from __future__ import annotations

import argparse
import io
import os
import pty
import select

import pytest

from userfault import _progress
from userfault._progress import Progress, ProgressBar, add_progress_arguments, progress


class Tty(io.StringIO):
    """A stream that says it is a terminal (the choice depends only on ``isatty``)."""

    def isatty(self) -> bool:
        return True


def test_off_when_not_a_terminal() -> None:
    out = io.StringIO()
    with progress("x", stream=out) as bar:
        bar(5, 10)
        bar(10, 10)
    assert bar.backend == "off" and out.getvalue() == ""
    assert progress(stream=Tty(), enabled=False).backend == "off"


def test_forced_on_a_non_terminal_is_the_plain_bar() -> None:
    out = io.StringIO()
    with progress("copying", stream=out, enabled=True, backend="auto") as bar:
        assert isinstance(bar, ProgressBar)
        bar(0, 4 << 20)
        bar(4 << 20, 4 << 20)
    text = out.getvalue()
    assert text.startswith("\r[") and "100.0%" in text and "MB/s" in text
    assert "ETA 0:00 copying" in text and text.endswith("\n")


def test_plain_bar_units_and_throttle() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, width=10, unit="records")
    bar(1, 100)
    bar(2, 100)  # within 0.1 s of the last draw: skipped
    bar(100, 100)  # the end is always drawn
    bar.finish()
    bar.finish()
    frames = out.getvalue().split("\r")[1:]
    assert len(frames) == 2 and "records/s" in frames[0]
    assert frames[1].startswith("[##########] 100.0%") and out.getvalue().count("\n") == 1


def test_auto_on_a_terminal_prefers_rich_then_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("rich")
    pytest.importorskip("tqdm")
    assert progress(stream=Tty()).backend == "rich"
    real = _progress._import
    monkeypatch.setattr(_progress, "_import",
                        lambda name: None if name.startswith("rich") else real(name))
    assert progress(stream=Tty()).backend == "tqdm"  # rich missing
    monkeypatch.setattr(_progress, "_import", lambda name: None)
    assert progress(stream=Tty()).backend == "plain"  # neither


@pytest.mark.parametrize("backend", ["rich", "tqdm"])
def test_named_backends_draw(backend: str) -> None:
    pytest.importorskip(backend)
    master, slave = pty.openpty()  # a real terminal for the libraries that check one
    try:
        with open(slave, "w", closefd=False) as stream:
            with progress("work", stream=stream, enabled=True,
                          backend=backend) as bar:  # type: ignore[arg-type]
                assert bar.backend == backend
                for done in range(0, 1 << 20, 1 << 16):
                    bar(done, 1 << 20)
                bar(1 << 20, 1 << 20)
            stream.flush()
        chunks = []
        while select.select([master], [], [], 0.5)[0]:  # everything the bar wrote
            chunks.append(os.read(master, 65536))
        drawn = b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        os.close(slave)
    assert "work" in drawn and "100%" in drawn


def test_cli_flag() -> None:
    parser = argparse.ArgumentParser()
    add_progress_arguments(parser)
    assert parser.parse_args([]).progress is None
    assert parser.parse_args(["--progress"]).progress is True
    assert parser.parse_args(["--no-progress"]).progress is False


def test_base_is_a_no_op() -> None:
    with Progress() as bar:
        bar(1, 2)
