"""Drive a real Firecracker for end-to-end snapshot tests: build the tiny guest, boot it,
snapshot it, and restore it with guest memory served by a pluggable userfaultfd handler.

Everything here is test support, used only when ``FIRECRACKER_BIN`` names a Firecracker
binary (>= 1.14). Every step is bounded by a timeout and every process is killed in
``finally``/``close``.

The handler is pluggable: :func:`restore_with_handler` takes ``start_handler(socket_path,
mem_file)`` returning a context manager that must be listening on ``socket_path`` when it is
entered and that is exited after the restored VM has been checked and killed.
:func:`python_uffd_handler` is a minimal stand-in written with ``fcntl.ioctl``; the real pager
(``userfault firecracker serve``) plugs in the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import http.client
import json
import mmap
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from userfault.firecracker import GuestRegion, parse_mappings, receive_handshake

GUEST_DIR = Path(__file__).parent / "firecracker_guest"
TICK_RE = re.compile(rb"tick (\d+) (ok|bad)")
MIN_VERSION = (1, 14)


# -- the guest ------------------------------------------------------------------------------


def build_guest(out_dir: Path) -> Path:
    """Assemble and link ``firecracker_guest/guest.S`` into ``out_dir/guest.elf``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    obj, elf = out_dir / "guest.o", out_dir / "guest.elf"
    cc = shutil.which("gcc") or shutil.which("cc")
    ld = shutil.which("ld")
    if cc is None or ld is None:
        raise RuntimeError("building the guest needs gcc (or cc) and ld")
    subprocess.run([cc, "-c", "-o", str(obj), str(GUEST_DIR / "guest.S")],
                   check=True, timeout=60, capture_output=True)
    subprocess.run([ld, "-nostdlib", "-static", "-z", "max-page-size=0x1000",
                    "--no-warn-rwx-segments", "-T", str(GUEST_DIR / "guest.ld"),
                    "-o", str(elf), str(obj)],
                   check=True, timeout=60, capture_output=True)
    return elf


def firecracker_version(binary: str) -> tuple[int, int, int] | None:
    """Return ``(major, minor, patch)`` of a Firecracker binary, or None if unknown."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(rb"Firecracker v(\d+)\.(\d+)\.(\d+)", out)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


# -- the Firecracker API over a Unix socket -------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class FirecrackerError(RuntimeError):
    """Firecracker refused an API call, died, or did not produce what was expected."""


class Firecracker:
    """One Firecracker process: its API socket and the serial output on its stdout."""

    def __init__(self, binary: str, workdir: Path, name: str, *, api_timeout: float = 15.0):
        self.workdir = workdir
        self.api_sock = workdir / f"{name}.api.sock"
        self.api_timeout = api_timeout
        self.output = bytearray()
        self._cond = threading.Condition()
        with contextlib.suppress(FileNotFoundError):
            self.api_sock.unlink()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [binary, "--api-sock", str(self.api_sock), "--no-seccomp", "--level", "Warning"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 10
        while not self.api_sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise FirecrackerError(f"firecracker did not open its API socket: {self.text()}")
            time.sleep(0.002)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            with self._cond:
                if not chunk:
                    self._cond.notify_all()
                    return
                self.output += chunk
                self._cond.notify_all()

    def text(self) -> str:
        with self._cond:
            return self.output.decode(errors="replace")[-4000:]

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Call the API; raise FirecrackerError unless the status is 2xx."""
        conn = _UnixHTTPConnection(str(self.api_sock), self.api_timeout)
        try:
            payload = json.dumps(body) if body is not None else None
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as err:
            raise FirecrackerError(
                f"{method} {path} failed: {err}; firecracker output: {self.text()}"
            ) from err
        finally:
            conn.close()
        if not 200 <= resp.status < 300:
            body_text = data.decode(errors="replace")
            raise FirecrackerError(f"{method} {path} -> {resp.status} {body_text}")
        return json.loads(data) if data.strip() else None

    def ticks(self, since: int = 0) -> list[tuple[int, bool]]:
        """``(N, ok)`` for every complete "tick N ok|bad" line at or after byte ``since``."""
        with self._cond:
            out = bytes(self.output[since:])
        return [(int(m[1]), m[2] == b"ok") for m in TICK_RE.finditer(out)]

    def wait_ticks(self, count: int, timeout: float, since: int = 0) -> list[tuple[int, bool]]:
        """Wait until ``count`` ticks were printed after byte ``since``; return them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [(int(m[1]), m[2] == b"ok")
                       for m in TICK_RE.finditer(bytes(self.output[since:]))]
                if len(got) >= count:
                    return got
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise FirecrackerError(
                        f"saw {len(got)} of {count} ticks in {timeout}s; output: "
                        f"{self.output[-3000:].decode(errors='replace')}"
                    )
                self._cond.wait(min(left, 0.05))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# -- boot, snapshot, restore ----------------------------------------------------------------


@dataclass
class Snapshot:
    snapshot_path: Path
    mem_file_path: Path
    last_tick: int
    timings: dict[str, float] = field(default_factory=dict)


def boot(binary: str, kernel: Path, workdir: Path, *, mem_mib: int = 128) -> Firecracker:
    """Start Firecracker and boot ``kernel`` with 1 vCPU and ``mem_mib`` MiB."""
    vm = Firecracker(binary, workdir, "boot")
    try:
        vm.api("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": mem_mib})
        vm.api("PUT", "/boot-source",
               {"kernel_image_path": str(kernel), "boot_args": "console=ttyS0"})
        vm.api("PUT", "/actions", {"action_type": "InstanceStart"})
    except BaseException:
        vm.kill()
        raise
    return vm


def snapshot(vm: Firecracker, out_dir: Path) -> Snapshot:
    """Pause ``vm`` and write a full snapshot; the VM stays paused."""
    t0 = time.monotonic()
    vm.api("PATCH", "/vm", {"state": "Paused"})
    t1 = time.monotonic()
    snap = out_dir / "vm.snap"
    mem = out_dir / "vm.mem"
    vm.api("PUT", "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": str(snap),
                                       "mem_file_path": str(mem)})
    t2 = time.monotonic()
    time.sleep(0.05)  # let the reader drain what the guest printed before the pause
    ticks = vm.ticks()
    if not ticks:
        raise FirecrackerError(f"no tick before the snapshot: {vm.text()}")
    return Snapshot(snap, mem, ticks[-1][0], {"pause": t1 - t0, "snapshot_create": t2 - t1})


HandlerFactory = Callable[[Path, Path], AbstractContextManager[Any]]


@contextlib.contextmanager
def restore_with_handler(
    binary: str, snap: Snapshot, workdir: Path, start_handler: HandlerFactory
) -> Iterator[tuple[Firecracker, Any]]:
    """Restore ``snap`` in a new Firecracker with memory served over userfaultfd.

    ``start_handler(socket_path, mem_file)`` is entered first (it must be listening when it
    returns); then Firecracker loads the snapshot with the ``Uffd`` backend and resumes.
    Yields ``(vm, handler)``; the VM is killed and the handler exited afterwards.
    """
    sock_path = workdir / "uffd.sock"
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    with start_handler(sock_path, snap.mem_file_path) as handler:
        vm = Firecracker(binary, workdir, "restore")
        try:
            vm.api("PUT", "/snapshot/load", {
                "snapshot_path": str(snap.snapshot_path),
                "mem_backend": {"backend_type": "Uffd", "backend_path": str(sock_path)},
                "resume_vm": True,
            })
            yield vm, handler
        finally:
            vm.kill()


@contextlib.contextmanager
def command_handler(
    argv: list[str], sock_path: Path, mem_file: Path, *, ready_timeout: float = 10.0,
    stdout: Any = None, stderr: Any = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run an external handler command, e.g. ``userfault firecracker serve``.

    The literal strings ``{socket}`` and ``{mem_file}`` in ``argv`` are replaced by the
    paths (plain substitution, not ``str.format``). The command must
    create and listen on the socket; it is terminated (then killed) on exit. Use it with
    ``functools.partial(command_handler, [...])`` as ``start_handler``. ``stdout`` and
    ``stderr`` go to :class:`subprocess.Popen` (to capture the handler's output).
    """
    args = [a.replace("{socket}", str(sock_path)).replace("{mem_file}", str(mem_file))
            for a in argv]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
    try:
        deadline = time.monotonic() + ready_timeout
        while not sock_path.exists():
            if proc.poll() is not None:
                raise FirecrackerError(f"handler {args} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise FirecrackerError(f"handler {args} did not create {sock_path}")
            time.sleep(0.005)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


# -- a minimal pure-Python stand-in page-fault handler --------------------------------------

_UFFD_EVENT_PAGEFAULT = 0x12
_UFFD_MSG = struct.Struct("=BBHIQQQ")  # struct uffd_msg: event, pad, pagefault.{flags,address,ptid}


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (0xAA << 8) | nr


_UFFDIO_WAKE = _ioc(2, 0x02, 16)   # _IOR(UFFDIO, _UFFDIO_WAKE, struct uffdio_range)
_UFFDIO_COPY = _ioc(3, 0x03, 40)   # _IOWR(UFFDIO, _UFFDIO_COPY, struct uffdio_copy)


@dataclass
class PyHandlerStats:
    peer_pid: int = 0
    regions: list[GuestRegion] = field(default_factory=list)
    faults: int = 0
    eexist: int = 0
    other_events: int = 0
    bytes_copied: int = 0
    first_fault_at: float | None = None
    error: BaseException | None = None


@contextlib.contextmanager
def python_uffd_handler(
    sock_path: Path, mem_file: Path, *, zero_file_range: tuple[int, int] | None = None
) -> Iterator[PyHandlerStats]:
    """Serve one VMM's faults from ``mem_file`` with UFFDIO_COPY, one page per fault.

    ``zero_file_range=(start, end)`` serves zeros instead of the file's contents for memory
    file offsets in ``[start, end)``: a deliberately wrong handler, to prove the guest's
    check notices.

    Runs in a thread of the test process: the faulting process is Firecracker, so the GIL is
    no concern here. Handles EEXIST (wake the waiter) and EAGAIN (retry); ignores non-fault
    events (Firecracker sends REMOVE only with a balloon, which these tests do not use).
    """
    stats = PyHandlerStats()
    stop = threading.Event()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    listener.settimeout(0.1)

    def serve() -> None:
        conn: socket.socket | None = None
        uffd = -1
        try:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                    break
                except TimeoutError:
                    continue
            if conn is None:
                return
            uffd, payload, peer = receive_handshake(conn, timeout=10)
            stats.peer_pid = peer.pid
            size = mem_file.stat().st_size
            stats.regions = parse_mappings(payload, mem_file_size=size)
            with open(mem_file, "rb") as f:
                mem = mmap.mmap(f.fileno(), size, mmap.MAP_PRIVATE,
                                mmap.PROT_READ | mmap.PROT_WRITE)
            view = ctypes.c_char.from_buffer(mem)
            src_base = ctypes.addressof(view)
            zeros = ctypes.create_string_buffer(max(r.page_size for r in stats.regions))
            zero_addr = ctypes.addressof(zeros)
            copy = bytearray(40)
            wake = bytearray(16)
            try:
                poller = select.poll()
                poller.register(uffd, select.POLLIN)
                while not stop.is_set():
                    events = poller.poll(50)
                    if not events:
                        continue
                    if events[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                        break  # the VMM is gone
                    try:
                        data = os.read(uffd, 32 * 64)
                    except BlockingIOError:
                        continue
                    for off in range(0, len(data) - 31, 32):
                        event, _, _, _, _flags, addr, _ = _UFFD_MSG.unpack_from(data, off)
                        if event != _UFFD_EVENT_PAGEFAULT:
                            stats.other_events += 1
                            continue
                        if stats.first_fault_at is None:
                            stats.first_fault_at = time.monotonic()
                        region = next(r for r in stats.regions if r.contains(addr))
                        page, file_off = region.page_of(addr)
                        src = src_base + file_off
                        if zero_file_range and zero_file_range[0] <= file_off < zero_file_range[1]:
                            src = zero_addr
                        struct.pack_into("=QQQQq", copy, 0, page, src,
                                         region.page_size, 0, 0)
                        while True:
                            try:
                                fcntl.ioctl(uffd, _UFFDIO_COPY, copy, True)
                                stats.faults += 1
                                stats.bytes_copied += region.page_size
                                break
                            except OSError as err:
                                if err.errno == errno.EAGAIN:
                                    continue
                                if err.errno != errno.EEXIST:
                                    raise
                                stats.eexist += 1
                                struct.pack_into("=QQ", wake, 0, page, region.page_size)
                                fcntl.ioctl(uffd, _UFFDIO_WAKE, wake, True)
                                break
            finally:
                del view
                mem.close()
        except BaseException as err:
            stats.error = err
        finally:
            if uffd >= 0:
                os.close(uffd)
            if conn is not None:
                conn.close()

    thread = threading.Thread(target=serve, name="py-uffd-handler", daemon=True)
    thread.start()
    try:
        yield stats
    finally:
        stop.set()
        thread.join(10)
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
