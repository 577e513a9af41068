"""A turnkey Firecracker snapshot pager: ``userfault firecracker serve``.

:class:`FirecrackerPager` listens on a Unix socket for Firecracker's UFFD snapshot backend
(``"mem_backend": {"backend_type": "Uffd", "backend_path": SOCKET}``). Every connection is one
restored VM: its own userfaultfd, its own fault engine and a lifecycle thread that

1. receives the handshake (:func:`~userfault.firecracker.protocol.receive_handshake`) and
   validates the regions against the memory file
   (:func:`~userfault.firecracker.protocol.parse_mappings`); a malformed or hostile message is
   logged and that connection closed, the server keeps serving;
2. serves guest memory from the memory file with the C engine, built like every other by
   :func:`userfault.serving.runtime.build_runtime`: a plain file in this process (no Python
   on the fault path); compressed snapshots (``*.ufs``), ``http(s)://`` and ``redis://`` in a
   pager process, with its timeouts, restarts and watchdog. Pages the balloon gives back
   (UFFD_EVENT_REMOVE) read as zeros afterwards;
3. optionally installs a recorded working set in one batch (``prefetch``), fills everything in
   the background (``populate``) and records the faulted offsets (``record``);
4. notices the VMM exiting (its pidfd becomes readable, the connection closes, or the engine
   sees ``ESRCH``), stops the engine and reports the VM's metrics.

Working sets are :mod:`userfault.working_set` files, the same as ``Pager(record=, prefetch=)``
writes and reads (older ``UFFCWS1`` files of this pager are read too).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from ..serving.config import ServeConfig
from ..serving.progress import prefetch as prefetch_with_progress
from ..serving.runtime import RECORD, PagerStats, Runtime, build_runtime, source_name
from ..sources.native import NativeSource
from ..sources.open import open_source
from ..working_set import WorkingSet, WorkingSetMismatch, read_working_set, write_working_set
from .protocol import (
    FirecrackerProtocolError,
    GuestRegion,
    PeerCred,
    parse_mappings,
    receive_handshake,
)
from .report import VMReport

__all__ = ["FirecrackerPager", "serve"]

_UCRED = struct.Struct("iII")  # struct ucred
_LOG_CAPACITY = 1 << 17
_POLL_S = 0.05
#: Connections open at once by default (handshaking or serving).
DEFAULT_MAX_CONNECTIONS = 64
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 for the NUL


# -- the server -----------------------------------------------------------------------------


class FirecrackerPager:
    """Serve the guest memory of Firecracker VMs restored with the ``Uffd`` memory backend.

    Args:
        socket_path: the Unix socket to create and listen on (``backend_path``).
        mem_file: the snapshot memory file: a path, ``*.ufs``, ``http(s)://``, ``redis://``.
        record: write the faulted memory-file offsets of each VM here when it ends. Unless
            ``readahead`` is given explicitly, recording disables readahead so the record holds
            exactly the pages the guest touched.
        prefetch: a working-set file (:mod:`userfault.working_set`, e.g. written by
            ``record``) to install in one batch right after the handshake, before faults are
            served (they wait in the kernel meanwhile, then are answered). A set recorded
            against another memory file is refused (:class:`~userfault.working_set.
            WorkingSetMismatch`); pages past the memory file's end are dropped and logged; a
            VM whose page size differs from the set's is served without it.
        force_prefetch: use a ``prefetch`` set recorded against another memory file.
        prefetch_concurrent: serve faults while the batch is installed instead.
        prefetch_gap: bridge gaps of at most this many bytes between working-set pages, so
            the batch needs fewer install calls. Off by default: measured here, copying a
            bridged page costs about what the saved ioctl does, and a sparse working set
            bridges into most of memory (25% random pages of 256 MiB: 30 ms -> 53 ms).
        populate: fill all of guest memory in the background while faults go first.
        progress: a progress bar of each VM's ``prefetch`` on ``log``: ``None`` (default)
            when it is a terminal and the working set is at least 64 MiB, ``True`` always,
            ``False`` never (see :mod:`userfault.serving.progress`).
        threads: fault-serving threads per VM.
        max_vms: most VMs served at once (further connections are refused); ``None``: no limit
            but ``max_connections``. A connection counts from its accept, handshake included.
        max_connections: most connections open at once, whatever their state (handshaking,
            serving); further ones are closed at once, so a flood of connections cannot use up
            threads and descriptors. Default 64.
        once: stop after the first VM ends.
        chunk: bytes installed per fault (default: one guest page).
        readahead: ``(min, max)`` window for sequential faults, ``False`` to disable,
            ``None`` for the default (64 KiB..4 MiB, or off when recording).
        json_out: a stream to print one JSON object per VM to when it ends (``--json``).
        log: where log lines and summaries go (default ``sys.stderr``).
        redis_prefix: key prefix for ``redis://`` memory files without a ``#prefix``.
        secret_file, tls_ca: for a page-server memory file (``uf://HOST:PORT/NAME``).
        handshake_timeout: seconds a connection may take to send its handshake (positive).

    The socket is refused if a live server already listens on it (probed by connecting; that
    server sees a connection that closes without a handshake); a stale socket file is
    replaced. :meth:`close` removes the socket only while the path is still the one this
    server created.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        mem_file: str | os.PathLike[str],
        *,
        record: str | os.PathLike[str] | None = None,
        prefetch: str | os.PathLike[str] | None = None,
        prefetch_concurrent: bool = False,
        prefetch_gap: int = 0,
        force_prefetch: bool = False,
        populate: bool = False,
        progress: bool | None = None,
        threads: int = 1,
        max_vms: int | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        once: bool = False,
        chunk: int | None = None,
        readahead: tuple[int, int] | bool | None = None,
        json_out: IO[str] | None = None,
        log: IO[str] | None = None,
        redis_prefix: str | None = None,
        secret_file: str | os.PathLike[str] | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        handshake_timeout: float = 5.0,
        on_report: Callable[[VMReport], None] | None = None,
    ) -> None:
        if threads < 1 or threads > 64:
            raise ValueError(f"threads must be between 1 and 64, not {threads}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        if max_vms is not None and max_vms < 1:
            raise ValueError(f"max_vms must be at least 1, not {max_vms}")
        if max_vms is not None and max_vms > max_connections:
            raise ValueError(f"max_vms ({max_vms}) is more than max_connections "
                             f"({max_connections}) allows: raise max_connections too")
        if not (isinstance(handshake_timeout, (int, float))
                and 0 < handshake_timeout < float("inf")):
            raise ValueError("handshake_timeout must be a positive number of seconds, not "
                             f"{handshake_timeout!r}")
        self.socket_path = os.fspath(socket_path)
        self.mem_spec = os.fspath(mem_file)
        self.record = None if record is None else os.fspath(record)
        if self.record is not None:
            where = os.path.dirname(os.path.abspath(self.record))
            if not os.path.isdir(where) or os.path.isdir(self.record):
                raise ValueError(f"cannot record the working set to {self.record}: "
                                 + ("it is a directory" if os.path.isdir(self.record) else
                                    f"{where} is not a directory") + "; name a file to write")
        self.populate = populate
        self.progress = progress
        self.threads = threads
        self.max_vms = max_vms
        self.max_connections = max_connections
        self.once = once
        self.chunk = chunk
        self.readahead: tuple[int, int] | None
        if readahead is None:
            self.readahead = None if record is not None else (64 << 10, 4 << 20)
        elif readahead is True:
            self.readahead = (64 << 10, 4 << 20)
        else:
            self.readahead = readahead or None
        self.json_out = json_out
        self.log_stream = log if log is not None else sys.stderr
        self.redis_prefix = redis_prefix
        self.handshake_timeout = handshake_timeout
        self.on_report = on_report
        self.prefetch_concurrent = prefetch_concurrent
        ws_name = "" if prefetch is None else os.fspath(prefetch)
        recorded_ws = None if prefetch is None else read_working_set(prefetch)
        self.reports: list[VMReport] = []
        self._lock = threading.Lock()
        self._out_lock = threading.Lock()
        self._active: dict[int, threading.Thread] = {}
        self._next_vm = 1
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._socket_id: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self.source = open_source(self.mem_spec, redis_prefix=redis_prefix,
                                  secret_file=secret_file, tls_ca=tls_ca)
        try:
            self.native = isinstance(self.source, NativeSource)
            self.mem_size = int(self.source.size)
            #: the working set to install into every VM (None: no prefetch)
            self.working_set: WorkingSet | None = None
            if recorded_ws is not None:
                ws = recorded_ws.check_compatible(self.mem_size, recorded_ws.page_size,
                                                  source_name(self.source),
                                                  force=force_prefetch)
                if ws.dropped:
                    self.log(f"working set {ws_name!r}: {ws.dropped} of "
                             f"{len(recorded_ws)} pages lie past the end of the memory file "
                             f"({self.mem_size} bytes) and are not prefetched")
                self.working_set = ws if ws.offsets else None
            # installed before the VM runs: address order makes fewer, larger ranges; beside
            # a running VM: first-touch order, so the pages it needs first come first
            self.prefetch_ranges = [] if self.working_set is None else self.working_set.ranges(
                prefetch_gap, "first-touch" if prefetch_concurrent else "sorted")
            self.prefetch_pages = 0 if self.working_set is None else len(self.working_set)
            self._bind()
        except BaseException:
            self._close_source()
            raise

    # -- logging ----------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        """Write one log line (thread safe)."""
        with self._out_lock:
            try:
                print(f"userfault firecracker: {msg}", file=self.log_stream, flush=True)
            except (OSError, ValueError):
                pass

    # -- socket -----------------------------------------------------------------------------

    def _bind(self) -> None:
        path = self.socket_path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(
                    errno.EEXIST, f"{path} exists and is not a socket: remove it or choose "
                    "another --socket path", path)
            if _listening(path):
                raise FileExistsError(
                    errno.EADDRINUSE, f"a server is already listening on {path}: stop it, or "
                    "choose another --socket path (VMs restored with this socket would be "
                    "served by that server)", path)
            os.unlink(path)  # a stale socket of an earlier run: nobody accepts on it
        # Bind to a temporary name, listen, then rename: whoever sees the path can connect.
        tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                           f".{os.path.basename(path)}.{os.getpid()}.tmp")
        full = len(os.fsencode(os.path.abspath(path)))
        limit = _SUN_PATH_MAX - (len(os.fsencode(tmp)) - full)  # the temporary name is longer
        if full > limit:
            raise ValueError(f"the socket path {path} is too long for a Unix socket ({full} "
                             f"bytes as an absolute path, at most {limit} here): choose a "
                             "shorter --socket path")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            sock.bind(tmp)
            sock.listen(64)
            sock.settimeout(0.1)
            mine = os.stat(tmp)
            os.rename(tmp, path)
        except OSError as err:  # the temporary name is ours: say what went wrong with PATH
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise OSError(err.errno, f"cannot create the socket {path}: {err.strerror}") from err
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._listener = sock
        self._socket_id = (mine.st_dev, mine.st_ino)

    def _close_source(self) -> None:
        close = getattr(self.source, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return (every VM's engine is stopped and reported)."""
        self._stop.set()

    def close(self) -> None:
        """Stop, close the listening socket and remove it."""
        self._stop.set()
        with self._lock:
            threads = list(self._active.values())
        for t in threads:
            t.join(15)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(self.socket_path)
                # Only the socket this server created: another server may have taken the path.
                if (st.st_dev, st.st_ino) == self._socket_id:
                    os.unlink(self.socket_path)
        self._close_source()

    def __enter__(self) -> FirecrackerPager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def serve_forever(self, stop: threading.Event | None = None) -> list[VMReport]:
        """Accept VMs until :meth:`stop` (or ``stop`` is set, or ``once`` and a VM ended).

        Returns the reports of every VM served.
        """
        assert self._listener is not None
        self.log(f"listening on {self.socket_path}, memory {self.mem_spec} "
                 f"({self.mem_size} bytes, engine in "
                 f"{'this process' if self.native else 'a pager process'})"
                 + (f", prefetch {self.prefetch_pages} pages in {len(self.prefetch_ranges)} "
                    f"ranges" if self.prefetch_ranges else ""))
        accepted = 0
        try:
            while not self._stop.is_set() and not (stop is not None and stop.is_set()):
                if self.once and accepted and not self._active:
                    break
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError as err:
                    if self._stop.is_set():
                        break
                    self.log(f"accept failed: {err}")
                    time.sleep(0.05)
                    continue
                with self._lock:
                    busy = len(self._active)
                    vm = self._next_vm
                    self._next_vm += 1
                refusal = self._refusal(busy, accepted)
                if refusal is not None:
                    self.log(f"vm {vm}: refused: {refusal}")
                    conn.close()
                    continue
                accepted += 1
                t = threading.Thread(target=self._session, args=(vm, conn),
                                     name=f"fc-vm-{vm}", daemon=True)
                with self._lock:
                    self._active[vm] = t
                t.start()
        finally:
            self._stop.set()
            with self._lock:
                threads = list(self._active.values())
            for t in threads:
                t.join(15)
        return list(self.reports)

    def _refusal(self, busy: int, accepted: int) -> str | None:
        """Why a new connection is turned away (``busy`` open, ``accepted`` so far), or
        ``None``; the sentence names the option that refuses it."""
        if self.once and accepted:
            return f"--once serves a single VM, and it already accepted one ({busy} open)"
        if self.max_vms is not None and busy >= self.max_vms:
            return f"already serving {busy} VM(s) (--max-vms {self.max_vms})"
        if busy >= self.max_connections:
            return (f"{busy} connections are open, the most --max-connections allows "
                    f"({self.max_connections})")
        return None

    # -- one VM -----------------------------------------------------------------------------

    def _session(self, vm: int, conn: socket.socket) -> None:
        report = VMReport(vm)
        recorded: dict[int, None] = {}  # faulted offsets in first-fault order
        runtime: Runtime | None = None
        uffd = -1
        pidfd = -1
        try:
            try:
                report.peer = peer = _peer_cred(conn)
                self.log(f"vm {vm}: connection from pid {peer.pid} (uid {peer.uid}, "
                         f"gid {peer.gid})")
                uffd, payload, _ = receive_handshake(conn, timeout=self.handshake_timeout)
                regions = parse_mappings(payload, mem_file_size=self.mem_size)
                sizes = {r.page_size for r in regions}
                if len(sizes) != 1:
                    raise FirecrackerProtocolError(
                        f"regions use different page sizes {sorted(sizes)}: one VM's regions "
                        "must share a page size")
                _check_is_uffd(uffd)
            except (FirecrackerProtocolError, OSError) as err:
                pid = report.peer.pid if report.peer else "?"
                report.error = f"handshake refused: {err}"
                report.end_reason = "refused"
                self.log(f"vm {vm} (pid {pid}): handshake refused, closing the connection: "
                         f"{err}")
                return
            report.regions = regions
            report.page_size = page = regions[0].page_size
            self.log(f"vm {vm}: {len(regions)} region(s), "
                     f"{sum(r.size for r in regions) / 2**20:.0f} MiB of {page // 1024} KiB "
                     "pages: " + ", ".join(
                         f"[{r.base_host_virt_addr:#x}+{r.size:#x} @ file {r.offset:#x}]"
                         for r in regions))
            try:
                runtime = self._make_runtime(uffd, regions, page)
                prefetch = self._prefetch_for(vm, page)
                if prefetch and not self.prefetch_concurrent:
                    # REAP: install the working set first, in one batch (COPY + DONTWAKE, then
                    # one WAKE per region); faults taken meanwhile wait in the kernel and are
                    # answered (EEXIST -> wake, or served) once the engine starts.
                    self._prefetch(vm, runtime, page, report)
                runtime.start()
            except Exception as err:
                report.error = f"cannot serve: {err}"
                report.end_reason = "setup failed"
                self.log(f"vm {vm}: cannot serve this VM: {err}")
                return
            if report.peer and report.peer.pid > 0:
                try:
                    pidfd = os.pidfd_open(report.peer.pid)
                except OSError:
                    pidfd = -1
            if prefetch and self.prefetch_concurrent:
                self._prefetch(vm, runtime, page, report)
            report.end_reason = self._watch(vm, conn, pidfd, runtime, report, recorded)
        except Exception as err:
            report.error = f"internal error: {err!r}"
            report.end_reason = report.end_reason or "internal error"
            self.log(f"vm {vm}: internal error: {err!r}")
        finally:
            if runtime is not None:
                with contextlib.suppress(Exception):
                    runtime.stop()
                with contextlib.suppress(Exception):
                    self._drain(runtime, report, recorded)
                    report.stats = PagerStats.from_counters(runtime.counters())
                    report.log_dropped = report.stats.log_dropped
                    failure = runtime.error()
                    if failure is not None and failure.errno != errno.ESRCH and not report.error:
                        report.error = failure.message
            if pidfd >= 0:
                os.close(pidfd)
            if uffd >= 0:
                with contextlib.suppress(OSError):
                    os.close(uffd)
            with contextlib.suppress(OSError):
                conn.close()
            report.ended = time.monotonic()
            if runtime is not None:
                if self.record is not None:
                    try:
                        report.recorded_pages = write_working_set(self.record, WorkingSet(
                            tuple(recorded), report.page_size, source=source_name(self.source),
                            source_size=self.mem_size))
                    except OSError as err:
                        self.log(f"vm {vm}: cannot write the record {self.record}: {err}")
                self._finish(report)
            with self._lock:
                self.reports.append(report)
                self._active.pop(vm, None)

    def _prefetch_for(self, vm: int, page: int) -> bool:
        """Whether to install the working set into this VM (of ``page``-byte pages)."""
        if self.working_set is None:
            return False
        try:
            self.working_set.check_compatible(self.mem_size, page)
        except WorkingSetMismatch as err:
            self.log(f"vm {vm}: not prefetching: {err}")
            return False
        return True

    def _prefetch(self, vm: int, runtime: Runtime, page: int, report: VMReport) -> None:
        t0 = time.monotonic()
        try:
            report.prefetch_bytes = prefetch_with_progress(
                runtime, self.prefetch_ranges, page, enabled=self.progress,
                stream=self.log_stream, description=f"vm {vm}: prefetching")
        except Exception as err:  # faults are served regardless
            self.log(f"vm {vm}: prefetch failed (faults are still served): {err}")
        report.prefetch_s = time.monotonic() - t0

    def _make_runtime(self, uffd: int, regions: list[GuestRegion], page: int) -> Runtime:
        config = ServeConfig(
            chunk=self.chunk or 0, readahead=self.readahead or (0, 0), populate=self.populate,
            threads=self.threads, log_faults=_LOG_CAPACITY if self.record is not None else 0,
            on_remove="zero")
        areas = [(r.base_host_virt_addr, r.size, r.offset) for r in regions]
        return build_runtime(uffd, areas, page, self.source, config)

    def _drain(self, runtime: Runtime, report: VMReport, recorded: dict[int, None]) -> None:
        data = runtime.drain_log()
        if not data:
            return
        for rec in RECORD.iter_unpack(data):
            if report.first_fault_s is None:
                report.first_fault_s = time.monotonic() - report.started
            off = rec[1] - rec[1] % report.page_size
            if off not in recorded:
                recorded[off] = None

    def _watch(self, vm: int, conn: socket.socket, pidfd: int, runtime: Runtime,
               report: VMReport, recorded: dict[int, None]) -> str:
        """Wait until the VMM exits or the server stops; return why."""
        poller = select.poll()
        conn_fd = conn.fileno()
        poller.register(conn_fd, select.POLLIN | select.POLLHUP | select.POLLRDHUP)
        if pidfd >= 0:
            poller.register(pidfd, select.POLLIN)
        while True:
            if self._stop.is_set():
                return "server stopped"
            for fd, ev in poller.poll(_POLL_S * 1000):
                if fd == pidfd:
                    return "VMM exited"
                if fd == conn_fd:
                    closed = bool(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL))
                    if not closed and ev & select.POLLIN:
                        try:
                            extra = conn.recv(4096, socket.MSG_DONTWAIT)
                        except BlockingIOError:
                            extra = b"?"
                        except OSError:
                            extra = b""
                        closed = not extra
                        if extra and extra != b"?":
                            self.log(f"vm {vm}: ignoring {len(extra)} unexpected bytes from "
                                     "the VMM")
                    if closed:
                        poller.unregister(conn_fd)
                        if pidfd < 0:
                            return "VMM closed the connection"
                        # Firecracker keeps the socket open for the VM's life; if it ever
                        # closes it early, keep serving until the process itself is gone.
            if runtime.process_exited:
                return "VMM exited (ESRCH)"
            self._drain(runtime, report, recorded)

    def _finish(self, report: VMReport) -> None:
        # The JSON report first: whoever sees the summary line can then read the report.
        if self.json_out is not None:
            with self._out_lock:
                try:
                    print(json.dumps(report.as_dict()), file=self.json_out, flush=True)
                except (OSError, ValueError):
                    pass
        self.log(report.summary())
        if self.on_report is not None:
            with contextlib.suppress(Exception):
                self.on_report(report)


def _peer_cred(conn: socket.socket) -> PeerCred:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCred(*_UCRED.unpack(raw))


def _listening(path: str) -> bool:
    """Whether a server accepts connections on the Unix socket ``path`` (connect to see)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False  # a stale socket file (or gone meanwhile)
    except (TimeoutError, BlockingIOError):
        return True  # its backlog is full: it is alive, just busy
    except OSError as err:
        raise OSError(err.errno, f"cannot tell whether a server listens on {path}: "
                      f"{err.strerror}; remove it or choose another --socket path") from err
    finally:
        probe.close()
    return True


def _check_is_uffd(fd: int) -> None:
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return  # no /proc: trust the peer, the engine's ioctls will fail loudly otherwise
    if target != "anon_inode:[userfaultfd]":
        raise FirecrackerProtocolError(
            f"the descriptor sent is not a userfaultfd (it is {target!r})")


def serve(socket_path: str | os.PathLike[str], mem_file: str | os.PathLike[str],
          *, stop: threading.Event | None = None, **options: Any) -> list[VMReport]:
    """Run a :class:`FirecrackerPager` until ``stop`` is set (or ``once=True`` and the VM
    ended); return the per-VM reports. ``options`` are those of :class:`FirecrackerPager`."""
    with FirecrackerPager(socket_path, mem_file, **options) as pager:
        return pager.serve_forever(stop)
