"""End to end with a real Firecracker: boot our tiny guest, snapshot it, restore it with guest
memory served over userfaultfd, and check the guest carries on where it stopped.

Runs only when ``FIRECRACKER_BIN`` names a Firecracker >= 1.14 and /dev/kvm is usable; CI has
neither, so it is skipped there. Timings are printed (``pytest -s``) for the record.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firecracker_harness import (
    MIN_VERSION,
    Snapshot,
    boot,
    build_guest,
    command_handler,
    firecracker_version,
    python_uffd_handler,
    restore_with_handler,
    snapshot,
)

FIRECRACKER_BIN = os.environ.get("FIRECRACKER_BIN", "")
TOUCH_START, TOUCH_END = 64 << 20, 120 << 20  # the guest's stamped range (guest.S)
TOUCH_PAGES = (TOUCH_END - TOUCH_START) // 4096


def _skip_reason() -> str | None:
    if not FIRECRACKER_BIN:
        return "FIRECRACKER_BIN is not set"
    if not os.access(FIRECRACKER_BIN, os.X_OK):
        return f"FIRECRACKER_BIN={FIRECRACKER_BIN} is not executable"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not usable"
    version = firecracker_version(FIRECRACKER_BIN)
    if version is None or version[:2] < MIN_VERSION:
        return f"Firecracker >= {MIN_VERSION} needed, found {version}"
    return None


pytestmark = [
    pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())),
    pytest.mark.timeout(120),
]


@pytest.fixture(scope="module")
def snap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Snapshot]:
    """Boot the guest, let it tick, pause and take one full snapshot shared by the tests."""
    workdir = tmp_path_factory.mktemp("fc-boot")
    kernel = build_guest(workdir / "guest")
    t0 = time.monotonic()
    vm = boot(FIRECRACKER_BIN, kernel, workdir)
    try:
        vm.wait_ticks(1, 30)
        t_first = time.monotonic()
        ticks = vm.wait_ticks(4, 30)
        assert all(ok for _, ok in ticks), ticks
        s = snapshot(vm, workdir)
    finally:
        vm.kill()
    s.timings["boot_to_first_tick"] = t_first - t0
    print(f"\nboot to first tick {s.timings['boot_to_first_tick'] * 1e3:.0f} ms, "
          f"pause {s.timings['pause'] * 1e3:.1f} ms, "
          f"snapshot create {s.timings['snapshot_create'] * 1e3:.0f} ms, last tick {s.last_tick}")
    yield s


def test_restore_with_python_handler_continues_counting(snap: Snapshot, tmp_path: Path) -> None:
    t0 = time.monotonic()
    with restore_with_handler(FIRECRACKER_BIN, snap, tmp_path, python_uffd_handler) as (vm, st):
        t_loaded = time.monotonic()
        first = vm.wait_ticks(1, 30)
        t_first = time.monotonic()
        ticks = vm.wait_ticks(3, 30)
    serve = t_first - (st.first_fault_at or t_first)
    print(f"\nrestore: snapshot/load {(t_loaded - t0) * 1e3:.0f} ms, "
          f"restore to first tick {(t_first - t0) * 1e3:.0f} ms "
          f"(first fault to first tick {serve * 1e3:.0f} ms), "
          f"faults {st.faults} ({st.bytes_copied >> 20} MiB), eexist {st.eexist}, "
          f"ticks {ticks}")
    assert st.error is None, st.error
    assert st.peer_pid == vm.proc.pid
    assert len(st.regions) == 1 and st.regions[0].size == 128 << 20
    # the counter carries on from the snapshot, and every stamp the guest wrote before the
    # snapshot came back through our handler intact ("ok")
    assert first[0][0] > snap.last_tick, (first, snap.last_tick)
    assert [n for n, _ in ticks] == list(range(ticks[0][0], ticks[0][0] + len(ticks)))
    assert all(ok for _, ok in ticks), ticks
    assert st.faults >= TOUCH_PAGES


def test_wrong_page_contents_are_noticed_by_the_guest(snap: Snapshot, tmp_path: Path) -> None:
    # Serve zeros for the guest's stamped range: its next check must print "bad".
    handler: Any = functools.partial(python_uffd_handler,
                                     zero_file_range=(TOUCH_START, TOUCH_END))
    with restore_with_handler(FIRECRACKER_BIN, snap, tmp_path, handler) as (vm, st):
        ticks = vm.wait_ticks(3, 30)
    assert st.error is None, st.error
    assert ticks[0][0] > snap.last_tick
    # The pause fell somewhere in the tick after last_tick: in its check phase (or its delay),
    # and that same tick sees the zeros; or in its write phase, and the next one does. Either
    # way exactly one of the first two ticks is bad, and once the guest has rewritten every
    # stamp itself it is happy again.
    assert [ok for _, ok in ticks[:2]].count(False) == 1, ticks
    assert ticks[2][1], ticks


_STANDIN_COMMAND = """
import signal, sys, threading
from pathlib import Path
from firecracker_harness import python_uffd_handler
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
with python_uffd_handler(Path(sys.argv[1]), Path(sys.argv[2])) as st:
    done.wait(100)
print(f"served {st.faults} faults, error {st.error!r}", flush=True)
sys.exit(1 if st.error else 0)
"""


def test_restore_with_handler_command(snap: Snapshot, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The pager plugs in as a command; here the stand-in handler runs in its own process.
    here = Path(__file__).parent
    # tests/ for firecracker_harness; userfault itself is installed (not src/: a plain checkout
    # has no built extension there).
    path = os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path)
    handler: Any = functools.partial(
        command_handler, [sys.executable, "-c", _STANDIN_COMMAND, "{socket}", "{mem_file}"])
    with restore_with_handler(FIRECRACKER_BIN, snap, tmp_path, handler) as (vm, proc):
        ticks = vm.wait_ticks(2, 30)
    assert proc.returncode == 0
    assert ticks[0][0] > snap.last_tick and all(ok for _, ok in ticks), ticks


def _serve_argv(*extra: str) -> list[str]:
    return [sys.executable, "-m", "userfault", "firecracker", "serve", "--socket", "{socket}",
            "--mem-file", "{mem_file}", "--json", *extra]


def test_restore_with_serve_via_command_handler(snap: Snapshot, tmp_path: Path) -> None:
    # `userfault firecracker serve` plugged in through the harness's command_handler.
    handler: Any = functools.partial(command_handler, _serve_argv("--once"))
    with restore_with_handler(FIRECRACKER_BIN, snap, tmp_path, handler) as (vm, proc):
        ticks = vm.wait_ticks(3, 30)
    assert ticks[0][0] > snap.last_tick and all(ok for _, ok in ticks), ticks
    # --once: the server exits by itself once the killed VMM is gone
    assert proc.wait(10) == 0


def test_restore_with_userfault_firecracker_serve(snap: Snapshot, tmp_path: Path) -> None:
    # The real pager, as a command: lazy service, then record the working set and restore
    # again with it prefetched, and once with --populate.
    record = tmp_path / "ws.bin"
    results: dict[str, Any] = {}
    for mode, extra in (("lazy", ("--readahead", "off")),
                        ("record", ("--record", str(record))),
                        ("prefetch", ("--prefetch", str(record), "--readahead", "off")),
                        ("populate", ("--populate",))):
        log = tmp_path / f"{mode}.log"
        out = tmp_path / f"{mode}.json"
        workdir = tmp_path / mode
        workdir.mkdir()
        with open(out, "wb") as o, open(log, "wb") as e:
            handler: Any = functools.partial(
                command_handler, _serve_argv(*extra), stdout=o, stderr=e)
            t0 = time.monotonic()
            with restore_with_handler(FIRECRACKER_BIN, snap, workdir, handler) as (vm, _):
                first = vm.wait_ticks(1, 30)
                t_first = time.monotonic()
                ticks = vm.wait_ticks(3, 30)
                vm_pid = vm.proc.pid
            # the VM was killed: the server notices the exit and reports it before SIGTERM
            deadline = time.monotonic() + 10
            while b"ended (VMM exited" not in log.read_bytes() and time.monotonic() < deadline:
                time.sleep(0.02)
        text = log.read_text()
        assert f"connection from pid {vm_pid}" in text, text
        assert "ended (VMM exited" in text, text
        assert first[0][0] > snap.last_tick and all(ok for _, ok in ticks), ticks
        (rep,) = [json.loads(line) for line in out.read_text().splitlines() if line]
        assert rep["pid"] == vm_pid and rep["guest_bytes"] == 128 << 20
        results[mode] = (t_first - t0, rep)
    for mode, (dt, rep) in results.items():
        print(f"\n{mode:9s} restore to first tick {dt * 1e3:6.0f} ms, faults {rep['faults']:6d}, "
              f"prefetch {rep['prefetch_bytes'] >> 20} MiB, populate "
              f"{rep['populate_bytes'] >> 20} MiB, "
              f"blocked >= {rep['vcpu_blocked_ns'] / 1e6:.1f} ms",
              end="")
    assert results["lazy"][1]["faults"] >= TOUCH_PAGES
    assert results["record"][1]["recorded_pages"] >= TOUCH_PAGES
    assert results["prefetch"][1]["prefetch_bytes"] >= TOUCH_PAGES * 4096 // 2
    assert results["prefetch"][1]["faults"] < results["lazy"][1]["faults"] / 4
    assert results["populate"][1]["populate_bytes"] > 0
