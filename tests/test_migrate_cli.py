"""``userfault migrate send|receive`` as processes on loopback: an image moves byte for byte,
a destination without the secret gets nothing (and the migration still completes)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from netns import read_line
from remote_helpers import OTHER_SECRET, write_secret

pytestmark = pytest.mark.timeout(120)


def userfault(*args: str, **kw: object) -> list[str]:
    return [sys.executable, "-m", "userfault", "migrate", *args]


def test_send_receive_an_image(tmp_path: Path) -> None:
    data = random.Random(5).randbytes((6 << 20) + 123)
    image = tmp_path / "image.bin"
    image.write_bytes(data)
    secret = write_secret(tmp_path / "secret")
    wrong = write_secret(tmp_path / "wrong", OTHER_SECRET)
    sender = subprocess.Popen(userfault("send", str(image), "--listen", "tcp://127.0.0.1:0",
                                        "--secret-file", str(secret), "--name", "img", "--json"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = read_line(sender, 30)
        assert line.startswith("listening on tcp://127.0.0.1:"), line
        url = f"uf://127.0.0.1:{line.rsplit(':', 1)[1]}/img"
        out = tmp_path / "out.bin"
        bad = subprocess.run(userfault("receive", url, "--secret-file", str(wrong), "-o",
                                       str(out)), capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1
        assert "secret does not match" in bad.stderr and not out.exists()
        got = subprocess.run(userfault("receive", url, "--secret-file", str(secret), "-o",
                                       str(out), "--json"), capture_output=True, text=True,
                             timeout=60)
        assert got.returncode == 0, got.stderr
        sent = read_line(sender, 30)
        assert sender.wait(30) == 0
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    pad = -len(data) % 4096
    assert out.read_bytes() == data + bytes(pad)  # whole pages
    assert json.loads(got.stdout) == json.loads(sent)
    report = json.loads(sent)
    assert report["size"] == len(data) + pad
    assert report["pages_sent"] == report["size"] // 4096  # nothing wrote: each page once
