"""examples/weights_over_http.py end to end: a real safetensors checkpoint served by a real
nginx, loaded lazily through userfault.map, every tensor byte-exact."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

pytest.importorskip("safetensors")
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "weights_over_http.py"


def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("weights_over_http", EXAMPLE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(120)
def test_example_loads_a_checkpoint_over_http(nginx_server: Any) -> None:
    ckpt = Path(nginx_server.directory) / "tiny.safetensors"
    made = subprocess.run([sys.executable, str(EXAMPLE), "--make", str(ckpt), "--size", "3M"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    n = int(re.fullmatch(r"wrote .*: (\d+) float16 tensors\n", made.stdout).group(1))  # type: ignore[union-attr]
    url = nginx_server.url("tiny.safetensors")

    run = subprocess.run([sys.executable, str(EXAMPLE), url, "--check", str(ckpt)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"all {n} tensors byte-exact against {ckpt}" in run.stdout
    assert re.search(rf"^{n} tensors, .* first tensor after [\d.]+ ms", run.stdout, re.M)

    # and in this process, checked here rather than by the example itself
    ref = load_file(str(ckpt))
    mod = example()
    with mod.LazyCheckpoint(url) as lazy:
        assert sorted(lazy.names) == sorted(ref) and len(ref) == n
        first = lazy.names[0]
        t = lazy.tensor(first)
        assert t.dtype == np.float16 and t.shape == ref[first].shape
        del t  # views must be gone before the pager closes
        # a prefetched tensor reads the same; the prefetch installed at least its bytes
        last = lazy.names[-1]
        assert lazy.prefetch([last]) >= lazy.byte_range(last)[1] - 4096
        for name in lazy.names:
            assert lazy.tensor(name).tobytes() == ref[name].tobytes(), name
        assert lazy.pager.stats().bytes_installed <= lazy.pager.size
    # every tensor hinted in file order right after the header, then read: the same bytes
    with mod.LazyCheckpoint(url, willneed=True) as lazy:
        for name in lazy.names:
            assert lazy.tensor(name).tobytes() == ref[name].tobytes(), name
        assert lazy.pager.stats().bytes_installed <= lazy.pager.size


def test_parse_header_errors() -> None:
    mod = example()
    with pytest.raises(ValueError, match="too short"):
        mod.parse_header(memoryview(b"\x01"))
    with pytest.raises(ValueError, match="implausible safetensors header length"):
        mod.parse_header(memoryview((1 << 40).to_bytes(8, "little") + b"{}"))
