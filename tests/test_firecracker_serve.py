"""`userfault firecracker serve` against a protocol-faithful stand-in VMM.

The stand-in does what Firecracker does when it restores a snapshot with the ``Uffd`` memory
backend: it creates a userfaultfd *without* user-mode-only (so faults taken by the kernel on
the guest's behalf are delivered too), with ``EVENT_REMOVE`` when a balloon is configured,
maps and registers the guest regions, connects to the handler's socket and sends the JSON
region list and the fd in one ``sendmsg`` (SCM_RIGHTS). Then it touches guest memory from
user mode (C loops, GIL released) and from kernel mode (``preadv`` from a file *into* the
region, ``write`` of the region to a pipe), and checks every byte against the memory file.

The server runs in a subprocess (``python -m userfault firecracker serve``) for the main tests,
is killed in ``finally``, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from userfault import Region, Uffd, _native
from userfault._flags import Feature
from userfault.firecracker import FirecrackerPager
from userfault.working_set import WorkingSet, read_working_set, write_working_set

PAGE = 4096
HUGE = 2 << 20
pytestmark = pytest.mark.timeout(60)


# -- the stand-in VMM -----------------------------------------------------------------------


class StandInVMM:
    """Guest memory regions registered on a full-mode userfaultfd, as Firecracker sets up."""

    def __init__(self, layout: list[tuple[int, int]], *, huge: bool = False,
                 balloon: bool = False) -> None:
        """``layout``: ``(size, file_offset)`` per region."""
        self.uffd = Uffd(Feature.EVENT_REMOVE if balloon else Feature(0),
                         required=Feature.EVENT_REMOVE if balloon else Feature(0),
                         user_mode_only=False)
        assert not self.uffd.user_mode_only
        self.page = HUGE if huge else PAGE
        self.regions: list[tuple[Region, int]] = []
        for size, offset in layout:
            r = Region.hugetlb(size) if huge else Region.anonymous(size)
            self.uffd.register(r.address, r.size)
            self.regions.append((r, offset))
        self.sock: socket.socket | None = None

    def mappings(self) -> list[dict[str, int]]:
        return [{"base_host_virt_addr": r.address, "size": r.size, "offset": off,
                 "page_size": self.page, "page_size_kib": self.page}
                for r, off in self.regions]

    def connect(self, path: str | Path, payload: bytes | None = None) -> None:
        """Connect and send the handshake exactly like Firecracker: one sendmsg, JSON + fd."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(path))
        data = payload if payload is not None else json.dumps(self.mappings()).encode()
        sent = socket.send_fds(s, [data], [self.uffd.fileno()])
        assert sent == len(data)
        self.sock = s

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.uffd.close()
        for r, _ in self.regions:
            r.close()


def touch(addr: int, length: int, stride: int = PAGE, timeout: float = 20.0) -> None:
    """Read one byte every ``stride`` bytes from a C loop on a thread (GIL released)."""
    t = threading.Thread(target=_native.touch, args=(addr, length, stride, 0, 0, False),
                         daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "user-mode touch did not finish: faults are not being served"


def kernel_read_into(region: Region, offset: int, length: int, src_path: Path,
                     src_off: int) -> None:
    """``preadv`` from a file into the registered region: the kernel faults (write access)."""
    fd = os.open(src_path, os.O_RDONLY)
    try:
        with memoryview(region) as mv:
            got = os.preadv(fd, [mv[offset:offset + length]], src_off)
        assert got == length
    finally:
        os.close(fd)


def kernel_write_out(region: Region, offset: int, length: int) -> bytes:
    """``write`` the region to a pipe: the kernel faults (read access); return what came out."""
    rfd, wfd = os.pipe()
    out = bytearray()
    try:
        os.set_blocking(rfd, False)
        with memoryview(region) as mv:
            pos = offset
            while pos < offset + length:
                n = os.write(wfd, mv[pos:min(pos + 65536, offset + length)])
                pos += n
                while True:
                    try:
                        chunk = os.read(rfd, 1 << 20)
                    except BlockingIOError:
                        break
                    out += chunk
    finally:
        os.close(rfd)
        os.close(wfd)
    return bytes(out)


# -- the server in a subprocess -------------------------------------------------------------


class Server:
    """``python -m userfault firecracker serve`` with stdout/stderr captured to files."""

    def __init__(self, tmp: Path, mem_file: str | Path, *extra: str, name: str = "srv") -> None:
        self.socket = tmp / f"{name}.sock"
        self.out_path, self.err_path = tmp / f"{name}.out", tmp / f"{name}.err"
        self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in kill()
        self._err = open(self.err_path, "wb")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "userfault", "firecracker", "serve", "--socket",
             str(self.socket), "--mem-file", str(mem_file), "--json", *extra],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err)
        deadline = time.monotonic() + 15
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.stderr()}")
            assert time.monotonic() < deadline, "server did not create its socket"
            time.sleep(0.005)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_stderr(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in (err := self.stderr()):
            assert time.monotonic() < deadline, f"{text!r} never logged; stderr:\n{err}"
            time.sleep(0.01)
        return err

    def reports(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out_path.read_text().splitlines() if line]

    def stop(self) -> list[dict[str, Any]]:
        """SIGTERM: every VM is stopped and reported; return the JSON reports."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"server ignored SIGTERM: {self.stderr()}") from None
        return self.reports()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._out.close()
        self._err.close()


@contextlib.contextmanager
def server(tmp: Path, mem_file: str | Path, *extra: str, name: str = "srv") -> Iterator[Server]:
    srv = Server(tmp, mem_file, *extra, name=name)
    try:
        yield srv
    finally:
        srv.kill()


@contextlib.contextmanager
def vmm(*args: Any, **kw: Any) -> Iterator[StandInVMM]:
    v = StandInVMM(*args, **kw)
    try:
        yield v
    finally:
        v.close()


@pytest.fixture(scope="module")
def mem_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 MiB of random bytes: the snapshot memory file."""
    path = tmp_path_factory.mktemp("fcmem") / "vm.mem"
    path.write_bytes(random.Random(7).randbytes(32 << 20))
    return path


def check_all(v: StandInVMM, data: bytes) -> None:
    for r, off in v.regions:
        with memoryview(r) as mv:
            assert bytes(mv) == data[off:off + r.size], f"region at file {off:#x} differs"


# -- tests ----------------------------------------------------------------------------------


def test_user_and_kernel_mode_faults_serve_every_byte(tmp_path: Path, mem_file: Path) -> None:
    data = mem_file.read_bytes()
    with server(tmp_path, mem_file, "--readahead", "off") as srv, \
            vmm([(8 << 20, 0), (4 << 20, 16 << 20), (4 << 20, 28 << 20)]) as v:
        v.connect(srv.socket)
        r0, r1, r2 = (r for r, _ in v.regions)
        # user mode: every other page of region 0 from a C loop
        touch(r0.address, r0.size, 2 * PAGE)
        # kernel mode, write access: preadv from a file into region 1 (not page aligned)
        src = tmp_path / "payload"
        src.write_bytes(random.Random(1).randbytes(3 << 20))
        kernel_read_into(r1, 5000, 3 << 20, src, 0)
        # kernel mode, read access: write region 2 to a pipe
        assert kernel_write_out(r2, 0, r2.size) == data[28 << 20:32 << 20]
        with memoryview(r1) as mv:
            assert bytes(mv[5000:5000 + (3 << 20)]) == src.read_bytes()
            assert bytes(mv[:5000]) == data[16 << 20:(16 << 20) + 5000]
            assert bytes(mv[5000 + (3 << 20):]) == data[(16 << 20) + 5000 + (3 << 20):20 << 20]
        with memoryview(r0) as mv:
            assert bytes(mv) == data[:8 << 20]
        reports = srv.stop()
    err = srv.stderr()
    assert f"connection from pid {os.getpid()}" in err
    assert "ended (server stopped)" in err and "vCPUs blocked >=" in err
    (rep,) = reports
    assert rep["pid"] == os.getpid() and rep["page_size"] == PAGE
    assert len(rep["regions"]) == 3 and rep["guest_bytes"] == 16 << 20
    # readahead off, one page per fault: every page of 16 MiB faulted once (a few EEXIST)
    assert rep["faults"] >= (16 << 20) // PAGE
    assert rep["bytes_installed"] == 16 << 20
    assert rep["vcpu_blocked_ns"] > 0 and rep["vcpu_blocked_is_lower_bound"] is True
    assert rep["latency_ns"]["p50"] > 0 and sum(rep["latency_histogram_log2_ns"]) == rep["faults"]


def test_balloon_remove_then_pages_read_as_zeros(tmp_path: Path, mem_file: Path) -> None:
    data = mem_file.read_bytes()
    with server(tmp_path, mem_file) as srv, vmm([(8 << 20, 4 << 20)], balloon=True) as v:
        v.connect(srv.socket)
        (r, off), = v.regions
        touch(r.address, r.size)
        check_all(v, data)
        # The balloon inflates: MADV_DONTNEED blocks until the handler reads the REMOVE event.
        done = threading.Event()

        def inflate() -> None:
            r.madvise(mmap.MADV_DONTNEED, 1 << 20, 2 << 20)
            done.set()

        t = threading.Thread(target=inflate, daemon=True)
        t.start()
        assert done.wait(10), "madvise(MADV_DONTNEED) never returned: REMOVE not read"
        # removed pages fault again and read as zeros (user and kernel mode); others are intact
        touch(r.address + (1 << 20), 1 << 20)
        assert kernel_write_out(r, 2 << 20, 1 << 20) == bytes(1 << 20)
        with memoryview(r) as mv:
            assert bytes(mv[1 << 20:3 << 20]) == bytes(2 << 20)
            assert bytes(mv[:1 << 20]) == data[off:off + (1 << 20)]
            assert bytes(mv[3 << 20:]) == data[off + (3 << 20):off + r.size]
        (rep,) = srv.stop()
    assert rep["remove_events"] == 1


def test_hugetlb_2mib_pages(tmp_path: Path, mem_file: Path, hugepages: int) -> None:
    data = mem_file.read_bytes()
    with server(tmp_path, mem_file) as srv, vmm([(8 << 20, 2 << 20), (4 << 20, 20 << 20)],
                                                huge=True) as v:
        v.connect(srv.socket)
        (r0, _), (r1, _) = v.regions
        touch(r0.address + 12345, 1, PAGE)       # user mode, one huge page
        src = tmp_path / "payload"
        src.write_bytes(b"\xa5" * 10000)
        kernel_read_into(r1, HUGE + 100, 10000, src, 0)  # kernel mode into a huge page
        with memoryview(r1) as mv:
            assert bytes(mv[HUGE + 100:HUGE + 10100]) == b"\xa5" * 10000
            assert bytes(mv[HUGE:HUGE + 100]) == data[(22 << 20):(22 << 20) + 100]
        assert kernel_write_out(r0, 0, r0.size) == data[2 << 20:10 << 20]
        with memoryview(r1) as mv:
            assert bytes(mv[:HUGE]) == data[20 << 20:22 << 20]
        (rep,) = srv.stop()
    assert rep["page_size"] == HUGE
    assert rep["bytes_installed"] == 12 << 20
    assert rep["faults"] >= 1


def test_mixed_page_sizes_are_refused(tmp_path: Path, mem_file: Path) -> None:
    with server(tmp_path, mem_file) as srv, vmm([(4 << 20, 0)]) as v:
        (r, _), = v.regions
        bad = [{"base_host_virt_addr": r.address, "size": 2 << 20, "offset": 0,
                "page_size": PAGE},
               {"base_host_virt_addr": r.address + (2 << 20), "size": 2 << 20,
                "offset": 2 << 20, "page_size": HUGE}]
        v.connect(srv.socket, json.dumps(bad).encode())
        err = srv.wait_stderr("handshake refused")
        assert "different page sizes [4096, 2097152]" in err
        assert srv.proc.poll() is None


HOSTILE: list[tuple[str, bytes | None, str]] = [
    ("not json", b"{nope", "not valid JSON"),
    ("not an array", b'{"a": 1}', "must be a JSON array"),
    ("empty", b"[]", "no regions"),
    ("past the file", json.dumps([{"base_host_virt_addr": 1 << 30, "size": 1 << 30,
                                   "offset": 0, "page_size": 4096}]).encode(),
     "runs past the end of the memory file"),
    ("unaligned", json.dumps([{"base_host_virt_addr": 4097, "size": 4096, "offset": 0,
                               "page_size": 4096}]).encode(), "not a multiple of the page size"),
    ("bad page size", json.dumps([{"base_host_virt_addr": 0, "size": 4096, "offset": 0,
                                   "page_size": 8192}]).encode(), "not one of"),
    ("overlap", json.dumps([{"base_host_virt_addr": 1 << 20, "size": 8192, "offset": 0,
                             "page_size": 4096},
                            {"base_host_virt_addr": (1 << 20) + 4096, "size": 4096,
                             "offset": 0, "page_size": 4096}]).encode(), "overlaps"),
    ("huge message", b"[" + b" " * (300 << 10), "exceeds"),
]


def _closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(10) == b""
    except ConnectionResetError:  # closed with our unread bytes in its buffer
        return True


def test_hostile_handshakes_are_refused_and_the_server_keeps_serving(
        tmp_path: Path, mem_file: Path) -> None:
    data = mem_file.read_bytes()
    with server(tmp_path, mem_file, "--handshake-timeout", "1") as srv:
        for name, payload, expect in HOSTILE:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(str(srv.socket))
            rfd, wfd = os.pipe()
            try:
                if name == "huge message":
                    socket.send_fds(s, [payload[:1000]], [rfd])
                    with contextlib.suppress(OSError):
                        s.sendall(payload[1000:])
                else:
                    assert payload is not None
                    socket.send_fds(s, [payload], [rfd])
                # the server closes the connection after refusing
                assert _closed_by_peer(s), name
            finally:
                s.close()
                os.close(rfd)
                os.close(wfd)
            assert expect in srv.wait_stderr(expect), name
        # a descriptor that is not a userfaultfd, with a valid message
        with vmm([(4 << 20, 0)]) as v:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(str(srv.socket))
            rfd, wfd = os.pipe()
            socket.send_fds(s, [json.dumps(v.mappings()).encode()], [rfd])
            assert _closed_by_peer(s)
            s.close()
            os.close(rfd)
            os.close(wfd)
        srv.wait_stderr("not a userfaultfd")
        # no fd at all; garbage and hang up; connect and say nothing (timeout)
        for raw in (b"[]", b"\xff\xfe garbage"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(srv.socket))
            s.sendall(raw)
            s.close()
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(str(srv.socket))
        try:
            # the next real VMM is served normally, concurrently with the silent one
            with vmm([(4 << 20, 8 << 20)]) as v:
                v.connect(srv.socket)
                touch(v.regions[0][0].address, 4 << 20)
                check_all(v, data)
        finally:
            silent.close()
        assert srv.proc.poll() is None, "the server died"
        reports = srv.stop()
    assert [r["faults"] > 0 for r in reports] == [True]
    assert srv.stderr().count("handshake refused") >= len(HOSTILE) + 3


def test_two_vms_at_once(tmp_path: Path, mem_file: Path) -> None:
    data = mem_file.read_bytes()
    with server(tmp_path, mem_file, "--readahead", "off", "--threads", "2") as srv, \
            vmm([(8 << 20, 0)]) as a, vmm([(8 << 20, 8 << 20), (4 << 20, 24 << 20)]) as b:
        a.connect(srv.socket)
        b.connect(srv.socket)
        threads = [threading.Thread(target=touch, args=(r.address, r.size))
                   for v in (a, b) for r, _ in v.regions]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        check_all(a, data)
        check_all(b, data)
        reports = srv.stop()
    assert sorted(r["guest_bytes"] for r in reports) == [8 << 20, 12 << 20]
    assert sorted(r["bytes_installed"] for r in reports) == [8 << 20, 12 << 20]
    assert {r["vm"] for r in reports} == {1, 2}


def _working_set(size: int, seed: int = 3) -> list[int]:
    pages = list(range(size // PAGE))
    rng = random.Random(seed)
    return sorted(rng.sample(pages, len(pages) // 4))


def _touch_pages(base: int, pages: list[int]) -> None:
    for p in pages:
        _native.touch(base + p * PAGE, 1, PAGE, 0, 0, False)


def test_record_then_prefetch_faults_far_less(tmp_path: Path, mem_file: Path) -> None:
    data = mem_file.read_bytes()
    ws = _working_set(16 << 20)
    record = tmp_path / "ws.bin"
    with server(tmp_path, mem_file, "--record", str(record), name="rec") as srv, \
            vmm([(16 << 20, 8 << 20)]) as v:
        v.connect(srv.socket)
        base = v.regions[0][0].address
        t = threading.Thread(target=_touch_pages, args=(base, ws))
        t.start()
        t.join(30)
        (rec,) = srv.stop()
    recorded = read_working_set(record)
    offsets = recorded.offsets
    assert recorded.page_size == PAGE and recorded.source_size == mem_file.stat().st_size
    assert recorded.source is not None and str(mem_file) in recorded.source
    # exactly the touched pages (readahead is off while recording), as memory-file offsets
    assert sorted(offsets) == [(8 << 20) + p * PAGE for p in ws]
    assert len(set(offsets)) == len(offsets) == rec["recorded_pages"]
    assert rec["faults"] >= len(ws)

    with server(tmp_path, mem_file, "--prefetch", str(record), "--readahead", "off",
                "--progress", name="pre") as srv, vmm([(16 << 20, 8 << 20)]) as v:
        v.connect(srv.socket)
        base = v.regions[0][0].address
        t = threading.Thread(target=_touch_pages, args=(base, ws))
        t.start()
        t.join(30)
        with memoryview(v.regions[0][0]) as mv:
            for p in ws:
                assert mv[p * PAGE:(p + 1) * PAGE] == data[(8 << 20) + p * PAGE:
                                                          (8 << 20) + (p + 1) * PAGE]
        (pre,) = srv.stop()
    # the working set came in by the batch, except pages whose touch raced ahead of it
    assert pre["bytes_installed"] == len(ws) * PAGE
    assert pre["prefetch_bytes"] >= len(ws) * PAGE // 2
    # only touches that raced ahead of the batch fault
    assert pre["faults"] < rec["faults"] / 4, (pre["faults"], rec["faults"])
    assert "prefetch" in srv.stderr()
    # --progress: the batch's bar (stderr is a pipe: the plain one), ended at 100 %
    assert re.search(r"\] 100\.0% .* vm 1: prefetching\n", srv.stderr()), srv.stderr()


def test_populate_fills_everything(tmp_path: Path, mem_file: Path) -> None:
    data = mem_file.read_bytes()
    with server(tmp_path, mem_file, "--populate") as srv, vmm([(16 << 20, 0)]) as v:
        v.connect(srv.socket)
        touch(v.regions[0][0].address + (5 << 20), PAGE)  # a fault goes first
        deadline = time.monotonic() + 20
        while True:  # wait for the background fill, then check without faulting
            time.sleep(0.05)
            if time.monotonic() > deadline:
                break
            mincore = _resident_pages(v.regions[0][0])
            if mincore == (16 << 20) // PAGE:
                break
        check_all(v, data)
        (rep,) = srv.stop()
    assert rep["populate_bytes"] >= (15 << 20)
    assert rep["faults"] < 64


def _resident_pages(region: Region) -> int:
    """Pages of ``region`` present in our page tables (without faulting): /proc/self/pagemap."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(region.address // PAGE * 8)
        raw = f.read(region.size // PAGE * 8)
    return sum(1 for (e,) in struct.iter_unpack("<Q", raw) if e >> 63)


def test_vmm_exit_is_detected_and_summarised(tmp_path: Path, mem_file: Path,
                                             child: Any) -> None:
    data = mem_file.read_bytes()
    with server(tmp_path, mem_file) as srv:
        def body(wfd: int) -> None:
            with vmm([(4 << 20, 4 << 20)]) as v:
                v.connect(srv.socket)
                touch(v.regions[0][0].address, 4 << 20)
                with memoryview(v.regions[0][0]) as mv:
                    ok = bytes(mv) == data[4 << 20:8 << 20]
                os.write(wfd, b"ok" if ok else b"bad")
            # the child exits without closing anything else: like a VMM that dies

        status, out = child(body, timeout=30)
        assert out == b"ok" and status == 0
        err = srv.wait_stderr("ended (VMM exited", timeout=10)
        assert "4 MiB" in err and "faults" in err
        (rep,) = srv.reports()  # printed at the exit, not at the server's stop
        assert rep["end_reason"].startswith("VMM exited")
        assert rep["bytes_installed"] == 4 << 20
        assert srv.proc.poll() is None
        srv.stop()


def test_once_exits_after_the_vm(tmp_path: Path, mem_file: Path, child: Any) -> None:
    with server(tmp_path, mem_file, "--once") as srv:
        def body(wfd: int) -> None:
            with vmm([(4 << 20, 0)]) as v:
                v.connect(srv.socket)
                touch(v.regions[0][0].address, 4 << 20)

        status, _ = child(body, timeout=30)
        assert status == 0
        assert srv.proc.wait(10) == 0
    assert len(srv.reports()) == 1


def test_compressed_snapshot_memory_file(tmp_path: Path, mem_file: Path) -> None:
    from userfault.sources.snapshot import create_snapshot

    data = mem_file.read_bytes()
    ufs = tmp_path / "vm.mem.ufs"
    create_snapshot(mem_file, ufs)
    with server(tmp_path, ufs) as srv, vmm([(8 << 20, 0), (4 << 20, 20 << 20)]) as v:
        v.connect(srv.socket)
        (r0, _), (r1, _) = v.regions
        touch(r0.address, r0.size, 3 * PAGE)
        assert kernel_write_out(r1, 0, r1.size) == data[20 << 20:24 << 20]
        check_all(v, data)
        (rep,) = srv.stop()
    assert "engine in a pager process" in srv.stderr()
    assert rep["bytes_installed"] >= 12 << 20


def test_http_memory_file(tmp_path: Path, mem_file: Path, nginx_server: Any) -> None:
    data = mem_file.read_bytes()
    (nginx_server.directory / "fc.mem").write_bytes(data)
    with server(tmp_path, nginx_server.url("fc.mem")) as srv, \
            vmm([(4 << 20, 12 << 20)]) as v:
        v.connect(srv.socket)
        (r, _), = v.regions
        touch(r.address, r.size, 5 * PAGE)
        src = tmp_path / "payload"
        src.write_bytes(b"\x5a" * 3000)
        kernel_read_into(r, 100, 3000, src, 0)
        with memoryview(r) as mv:
            assert bytes(mv[:100]) == data[12 << 20:(12 << 20) + 100]
            assert bytes(mv[100:3100]) == b"\x5a" * 3000
            assert bytes(mv[3100:]) == data[(12 << 20) + 3100:16 << 20]
        (rep,) = srv.stop()
    assert rep["faults"] > 0


def test_python_api_in_process(tmp_path: Path, mem_file: Path, child: Any) -> None:
    """FirecrackerPager in this process; the VMM is a forked child (different process)."""
    data = mem_file.read_bytes()
    reports: list[Any] = []
    pager = FirecrackerPager(tmp_path / "api.sock", mem_file, once=True,
                             on_report=reports.append, log=sys.stderr)
    t = threading.Thread(target=pager.serve_forever, daemon=True)
    t.start()
    try:
        def body(wfd: int) -> None:
            with vmm([(4 << 20, 16 << 20)]) as v:
                v.connect(tmp_path / "api.sock")
                touch(v.regions[0][0].address, 4 << 20)
                with memoryview(v.regions[0][0]) as mv:
                    os.write(wfd, b"ok" if bytes(mv) == data[16 << 20:20 << 20] else b"bad")

        status, out = child(body, timeout=30)
        assert (status, out) == (0, b"ok")
        t.join(10)
        assert not t.is_alive()
    finally:
        pager.close()
    (rep,) = reports
    assert rep.end_reason.startswith("VMM exited") and rep.stats.bytes_installed == 4 << 20
    assert rep.as_dict()["regions"][0]["offset"] == 16 << 20


def test_working_sets_old_and_new_format(tmp_path: Path) -> None:
    """The pager reads its older UFFCWS1 files and writes userfault.working_set files."""
    old = tmp_path / "old.ws"
    old.write_bytes(struct.pack("<8sQQ4Q", b"UFFCWS1\0", PAGE, 4, 8192, 0, 4096, 65536))
    ws = read_working_set(old)
    assert (ws.format, ws.page_size, ws.offsets, ws.source) == (
        "firecracker", PAGE, (8192, 0, 4096, 65536), None)
    assert ws.ranges(order="sorted") == [(0, 12288), (65536, 4096)]
    assert ws.ranges() == [(8192, 4096), (0, 8192), (65536, 4096)]
    assert WorkingSet((0, 8192, 65536), PAGE).ranges(4096) == [(0, 12288), (65536, 4096)]
    new = tmp_path / "new.ws"
    assert write_working_set(new, ws) == 4
    assert new.read_bytes()[:8] == b"UFWSET\0\0" and read_working_set(new).offsets == ws.offsets


def test_redis_memory_file(tmp_path: Path, mem_file: Path, redis_server: Any) -> None:
    pytest.importorskip("redis")
    from userfault.sources.redis import upload

    data = mem_file.read_bytes()[:8 << 20]
    upload(data, redis_server.url, prefix="fcvm:")
    with server(tmp_path, f"{redis_server.url}#fcvm:") as srv, vmm([(4 << 20, 4 << 20)]) as v:
        v.connect(srv.socket)
        (r, _), = v.regions
        touch(r.address, r.size, 7 * PAGE)
        assert kernel_write_out(r, 0, r.size) == data[4 << 20:8 << 20]
        (rep,) = srv.stop()
    assert rep["bytes_installed"] >= 4 << 20
    assert "engine in a pager process" in srv.stderr()


def test_max_vms_refuses_extra_connections(tmp_path: Path, mem_file: Path) -> None:
    data = mem_file.read_bytes()
    with server(tmp_path, mem_file, "--max-vms", "1") as srv, vmm([(4 << 20, 0)]) as a, \
            vmm([(4 << 20, 4 << 20)]) as b:
        a.connect(srv.socket)
        srv.wait_stderr("vm 1: 1 region(s)")
        try:
            b.connect(srv.socket)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the handshake was even sent
        else:
            assert b.sock is not None and _closed_by_peer(b.sock)
        assert "vm 2: refused: already serving 1 VM(s)" in srv.wait_stderr("refused")
        touch(a.regions[0][0].address, 4 << 20)
        check_all(a, data)
        (rep,) = srv.stop()
    assert rep["vm"] == 1
