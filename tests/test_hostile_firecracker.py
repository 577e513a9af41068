"""Hostile use of ``userfault firecracker serve``: a second server on a live socket, floods of
connections, bad options, lying VMMs, corrupt working sets. Every case is a real server
process and real VMM stand-ins (tests/test_firecracker_serve.py); each ends in a clear refusal
or a logged error, and the server keeps serving the next real VM.

(The malformed-handshake catalogue is in test_firecracker_serve.py and
test_firecracker_protocol.py; this file does not repeat it.)
"""

from __future__ import annotations

import io
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from test_firecracker_serve import StandInVMM, _closed_by_peer, check_all, server, touch, vmm
from userfault import _native
from userfault.firecracker import FirecrackerPager
from userfault.working_set import WorkingSet, WorkingSetMismatch, write_working_set

pytestmark = pytest.mark.timeout(60)

PAGE = 4096


@pytest.fixture(scope="module")
def mem_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 MiB of random bytes: the snapshot memory file."""
    path = tmp_path_factory.mktemp("fchostile") / "vm.mem"
    path.write_bytes(random.Random(11).randbytes(8 << 20))
    return path


def serve_cmd(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """``userfault firecracker serve ARGS`` run to its end (for refusals at start)."""
    return subprocess.run([sys.executable, "-m", "userfault", "firecracker", "serve", *args],
                          capture_output=True, text=True, timeout=timeout)


def refused(res: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    """The command exited with ``code`` and said exactly ``message`` on its last stderr line,
    without a traceback."""
    assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1] == message, res.stderr


def served(srv: Any, data: bytes, offset: int = 0) -> None:
    """A real VM restored against ``srv`` is served every byte."""
    with vmm([(2 << 20, offset)]) as v:
        v.connect(srv.socket)
        touch(v.regions[0][0].address, 2 << 20)
        check_all(v, data)


# -- the socket ------------------------------------------------------------------------------


def test_a_second_server_refuses_a_live_socket(tmp_path: Path, mem_file: Path) -> None:
    data = mem_file.read_bytes()
    other = tmp_path / "other.mem"
    other.write_bytes(bytes(8 << 20))  # VMs must never be served from this one
    with server(tmp_path, mem_file) as srv:
        res = serve_cmd("--socket", str(srv.socket), "--mem-file", str(other))
        refused(res, 1, f"userfault firecracker: error: a server is already listening on "
                        f"{srv.socket}: stop it, or choose another --socket path (VMs restored "
                        "with this socket would be served by that server)")
        served(srv, data, 2 << 20)  # the first server still owns the socket
        assert srv.proc.poll() is None


def test_a_stale_socket_is_replaced_and_a_non_socket_refused(tmp_path: Path,
                                                             mem_file: Path) -> None:
    data = mem_file.read_bytes()
    stale = tmp_path / "srv.sock"
    with socket.socket(socket.AF_UNIX) as s:  # bound, then closed: nobody listens any more
        s.bind(str(stale))
    with server(tmp_path, mem_file) as srv:
        assert srv.socket == stale
        srv.wait_stderr("listening on")  # the stale file existed already: wait for the new one
        served(srv, data)
    plain = tmp_path / "plain"
    plain.write_text("not a socket")
    res = serve_cmd("--socket", str(plain), "--mem-file", str(mem_file))
    refused(res, 1, f"userfault firecracker: error: {plain} exists and is not a socket: remove "
                    "it or choose another --socket path")
    assert plain.read_text() == "not a socket"


def test_close_removes_only_the_socket_it_created(tmp_path: Path, mem_file: Path) -> None:
    """Server A's socket path is taken over by server B (A's file was removed): when A stops
    it must leave B's socket alone."""
    data = mem_file.read_bytes()
    with server(tmp_path, mem_file, name="shared") as a:
        path = a.socket
        path.unlink()
        with server(tmp_path, mem_file, name="shared") as b:
            assert b.socket == path
            b.wait_stderr("listening on")
            a.stop()
            assert a.proc.returncode == 0
            assert path.exists(), "server A removed server B's socket"
            served(b, data, 4 << 20)
            b.stop()
        assert not path.exists()  # B created it, B removed it


# -- options -------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_bad_handshake_timeout_is_refused(tmp_path: Path, mem_file: Path, value: str) -> None:
    res = serve_cmd("--socket", str(tmp_path / "s"), "--mem-file", str(mem_file),
                    "--handshake-timeout", value)
    why = (f"not a number of seconds: {value!r}" if value == "soon"
           else f"must be a positive number of seconds, not {value!r}")
    refused(res, 2, f"userfault firecracker serve: error: argument --handshake-timeout: {why}")
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match=r"^handshake_timeout must be a positive number of "
                                         r"seconds, not -1$"):
        FirecrackerPager(tmp_path / "s", mem_file, handshake_timeout=-1)


def test_bad_connection_limits_are_refused(tmp_path: Path, mem_file: Path) -> None:
    base = ["--socket", str(tmp_path / "s"), "--mem-file", str(mem_file)]
    refused(serve_cmd(*base, "--max-connections", "0"), 2,
            "userfault firecracker serve: error: argument --max-connections: must be at least "
            "1, not 0")
    refused(serve_cmd(*base, "--max-vms", "-3"), 2,
            "userfault firecracker serve: error: argument --max-vms: must be at least 1, not -3")
    refused(serve_cmd(*base, "--max-vms", "100"), 2,
            "userfault firecracker serve: error: --max-vms 100 is more than --max-connections "
            "64 allows: raise --max-connections too")
    refused(serve_cmd(*base, "--threads", "many"), 2,
            "userfault firecracker serve: error: argument --threads: not a whole number: 'many'")
    assert not (tmp_path / "s").exists()
    with FirecrackerPager(tmp_path / "api.sock", mem_file) as pager:
        assert pager.max_connections == 64  # the default cap


def _silent_connections(path: Path, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(path))
        out.append(s)
    return out


def test_default_connection_cap_holds_a_flood(tmp_path: Path, mem_file: Path) -> None:
    """64 connections that never handshake hold every slot; the 65th is closed at once and
    the log says which option refused it. Once they go, a real VM is served."""
    data = mem_file.read_bytes()
    with server(tmp_path, mem_file, "--handshake-timeout", "50") as srv:
        flood = _silent_connections(srv.socket, 64)
        try:
            srv.wait_stderr("vm 64: connection from", timeout=20)
            (extra,) = _silent_connections(srv.socket, 1)
            with extra:
                assert _closed_by_peer(extra)
            srv.wait_stderr("vm 65: refused: 64 connections are open, the most "
                            "--max-connections allows (64)")
        finally:
            for s in flood:
                s.close()
        srv.wait_stderr("vm 64 (pid", timeout=20)  # every silent one was refused in turn
        served(srv, data)
        assert srv.proc.poll() is None


def test_once_refusal_says_once(tmp_path: Path, mem_file: Path) -> None:
    data = mem_file.read_bytes()
    with server(tmp_path, mem_file, "--once") as srv, vmm([(2 << 20, 0)]) as a, \
            vmm([(2 << 20, 0)]) as b:
        a.connect(srv.socket)
        srv.wait_stderr("vm 1: 1 region(s)")
        try:
            b.connect(srv.socket)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the handshake was even sent
        else:
            assert b.sock is not None and _closed_by_peer(b.sock)
        err = srv.wait_stderr("vm 2: refused")
        assert "vm 2: refused: --once serves a single VM, and it already accepted one (1 open)" \
            in err
        touch(a.regions[0][0].address, 2 << 20)
        check_all(a, data)


# -- lying VMMs ------------------------------------------------------------------------------


_LIAR = """
import json, socket, sys
from userfault import _native, Region, Uffd
from userfault._flags import Feature
uffd = Uffd(Feature(0), user_mode_only=False)
real, announced = Region.anonymous(1 << 20), Region.anonymous(1 << 20)
uffd.register(real.address, real.size)  # registers one range, announces another
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
regions = [{"base_host_virt_addr": announced.address, "size": announced.size, "offset": 0,
            "page_size": 4096}]
socket.send_fds(s, [json.dumps(regions).encode()], [uffd.fileno()])
print(f"touching {real.address:#x}", flush=True)
_native.touch(real.address, 4096, 4096, 0, 0, False)
print("served", flush=True)
"""


def test_a_vmm_faulting_outside_its_regions_gets_sigbus_logged(tmp_path: Path,
                                                               mem_file: Path) -> None:
    """The VMM registers one range and announces another, then faults on the first: the
    server cannot serve it (it has no file offset), so the fault ends in SIGBUS for the VMM,
    never zeros or a hang; the log names the address; the server serves the next VM."""
    data = mem_file.read_bytes()
    with server(tmp_path, mem_file) as srv:
        res = subprocess.run([sys.executable, "-c", _LIAR, str(srv.socket)],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == -signal.SIGBUS, (res.returncode, res.stdout, res.stderr)
        lines = res.stdout.split("\n")
        assert lines[0].startswith("touching 0x") and "served" not in res.stdout
        address = lines[0].split()[1]
        err = srv.wait_stderr(address)
        line = next(line for line in err.splitlines() if address in line)
        assert "poisoned a fault at" in line and "outside every area" in line  # and why
        served(srv, data)


def test_a_vmm_killed_mid_fault_storm(tmp_path: Path, mem_file: Path, child: Any) -> None:
    """A VMM SIGKILLed while a thread of it faults page after page: the server notices,
    reports the VM, and the next VM is served every byte."""
    data = mem_file.read_bytes()
    with server(tmp_path, mem_file, "--readahead", "off") as srv:
        def body(wfd: int) -> None:
            v = StandInVMM([(4 << 20, 0)])  # never closed: the process is killed
            v.connect(srv.socket)
            base = v.regions[0][0].address
            _native.touch(base, PAGE, PAGE, 0, 0, False)  # served: the engine runs
            threading.Thread(target=_native.touch, args=(base, 4 << 20, PAGE, 0, 0, False),
                             daemon=True).start()
            os.write(wfd, b"faulting")
            os.kill(os.getpid(), signal.SIGKILL)

        status, out = child(body, timeout=30)
        assert out == b"faulting" and os.WIFSIGNALED(status)
        assert os.WTERMSIG(status) == signal.SIGKILL
        srv.wait_stderr("vm 1 (pid", timeout=10)
        served(srv, data, 4 << 20)
        reports = srv.stop()
    assert reports[0]["vm"] == 1 and reports[0]["end_reason"].startswith("VMM exited")
    assert reports[1]["vm"] == 2 and not reports[1]["error"]


# -- working sets ----------------------------------------------------------------------------


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "ws.fifo"
    os.mkfifo(path)
    yield path


def _old_format(offsets: list[int], page: int = PAGE) -> bytes:
    """A working set in the Firecracker pager's older format (still read)."""
    return struct.pack(f"<8sQQ{len(offsets)}Q", b"UFFCWS1\0", page, len(offsets), *offsets)


def test_corrupt_working_sets_are_refused_at_start(tmp_path: Path, mem_file: Path,
                                                   fifo: Path) -> None:
    raw = _old_format([0, 8192, 4096])
    write_working_set(tmp_path / "new.ws", WorkingSet((0, 4096), PAGE, source="x"))
    new = (tmp_path / "new.ws").read_bytes()
    advice = "name a working-set file written by record= or --record"
    cases: list[tuple[str, bytes | Path, str]] = [
        ("garbage", b"garbage" * 10, "{p!r} is not a working-set file (magic b'garbageg', "
                                     "expected b'UFWSET\\x00\\x00' or the Firecracker "
                                     "pager's b'UFFCWS1\\x00')"),
        ("short", raw[:10], "{p!r} is too short to be a working-set file"),
        ("truncated", raw[:-3], "{p!r}: the header says 3 pages, the file holds 2.625 "
                                "(truncated or corrupt)"),
        ("huge count", raw[:16] + (1 << 60).to_bytes(8, "little") + raw[24:],
         "{p!r}: the header says 1152921504606846976 pages, the file holds 3 (truncated or "
         "corrupt)"),
        ("bad page", raw[:8] + (3000).to_bytes(8, "little") + raw[16:],
         "{p!r}: corrupt working set: page size 3000 is not a power of two >= 4096"),
        ("unaligned", raw[:32] + (8193).to_bytes(8, "little") + raw[40:],
         "{p!r}: corrupt working set: offset 8193 is not a non-negative multiple of the page "
         "size 4096"),
        ("repeated", _old_format([0, 4096, 0]),
         "{p!r}: corrupt working set: offsets must be unique (a working set lists each page "
         "once)"),
        ("new version", new[:8] + (7).to_bytes(4, "little") + new[12:],
         "{p!r}: working-set format version 7 is not supported (this userfault reads version "
         "1)"),
        ("new metadata", new[:16] + b"}" + new[17:],
         "{p!r}: corrupt working-set metadata (JSONDecodeError("),
        ("fifo", fifo, "{p!r} is a FIFO (named pipe), not a regular file: " + advice),
        ("zero device", Path("/dev/zero"), "{p!r} is a character device, not a regular file: "
                                           + advice),
        ("directory", tmp_path, "{p!r} is a directory, not a regular file: name a file in it"),
    ]
    for name, content, message in cases:
        if isinstance(content, Path):
            path = content
        else:
            path = tmp_path / f"{name.replace(' ', '-')}.ws"
            path.write_bytes(content)
        res = serve_cmd("--socket", str(tmp_path / "s"), "--mem-file", str(mem_file),
                        "--prefetch", str(path))
        expected = "userfault firecracker: error: " + message.format(p=str(path))
        if message.endswith("("):  # the decoder's own words follow
            assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
            assert res.stderr.strip().splitlines()[-1].startswith(expected), res.stderr
        else:
            refused(res, 1, expected)
    assert not (tmp_path / "s").exists()


def test_working_set_of_another_source_is_refused_drift_is_dropped(tmp_path: Path,
                                                                   mem_file: Path) -> None:
    other = tmp_path / "other.ws"
    write_working_set(other, WorkingSet((0,), PAGE, source="FileSource('/elsewhere.mem')"))
    with pytest.raises(WorkingSetMismatch,
                       match=re.escape("recorded against \"FileSource('/elsewhere")):
        FirecrackerPager(tmp_path / "s", mem_file, prefetch=other)
    assert not (tmp_path / "s").exists()
    with FirecrackerPager(tmp_path / "s", mem_file, prefetch=other, force_prefetch=True) as pager:
        assert pager.prefetch_ranges == [(0, PAGE)]
    # a page past the memory file's end (8 MiB) is drift: dropped, logged, the rest kept
    drift = tmp_path / "drift.ws"
    drift.write_bytes(_old_format([8 << 20, 0, 4096]))
    log = io.StringIO()
    with FirecrackerPager(tmp_path / "s", mem_file, prefetch=drift, log=log) as pager:
        assert pager.working_set is not None and pager.working_set.offsets == (0, 4096)
        assert pager.prefetch_pages == 2 and pager.prefetch_ranges == [(0, 8192)]
    assert f"working set {str(drift)!r}: 1 of 3 pages lie past the end of the memory file " \
           "(8388608 bytes) and are not prefetched" in log.getvalue()


def test_corrupt_memory_files_are_refused_at_start(tmp_path: Path, fifo: Path) -> None:
    bad = tmp_path / "bad.ufs"
    bad.write_bytes(b"UFS not really" * 100)
    cases = [
        (bad, f"snapshot {bad}: not a userfault snapshot"),
        (fifo, f"{str(fifo)!r} is a FIFO (named pipe), not a regular file"),
        (tmp_path / "none.mem", f"cannot open {str(tmp_path / 'none.mem')!r}: No such file"),
    ]
    for path, start in cases:
        res = serve_cmd("--socket", str(tmp_path / "s"), "--mem-file", str(path))
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.startswith("userfault firecracker: error: " + start), res.stderr
    assert not (tmp_path / "s").exists()
