"""The pager-process runtime: Python page sources served from another process.

Python cannot serve faults of a process whose faulting thread holds the GIL, so a Python
source is served by a *pager process*. Layout::

    your process ──uffd + config (SCM_RIGHTS)──▶ supervisor ──fork──▶ worker (FaultServer)
          ▲                                          │
          └──────── shared memory: counters, fault log ◀┘

The supervisor is single-threaded and only watches: when the worker dies (killed, crashed),
it wakes every thread blocked on the areas (UFFDIO_WAKE) so they fault again, and forks a new
worker, which serves the new faults. The supervisor exits with your process (it watches it
through a pidfd and the socket); the worker dies with the supervisor (PR_SET_PDEATHSIG, safe
there: the supervisor is single-threaded).
``python -m userfault.pager_process SOCK_FD STATE_FD`` is the supervisor's entry point.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any

from ._shared import SharedState
from .errors import PagerError
from .fault_server import FaultServer
from .sources.base import PageSource
from .uffd import Uffd, recv_uffd, send_uffd

if TYPE_CHECKING:
    from .pager import Pager

__all__ = ["ProcessRuntime", "main"]

log = logging.getLogger("userfault.pager")
_FRAME = struct.Struct("<I")
_PR_SET_PDEATHSIG = 1
START_TIMEOUT = 30.0
_WORKER_SLOTS = 2  # counter slots: 0 prefetch, 1 the supervisor, 2.. the worker's threads


def _send(sock: socket.socket, obj: object) -> None:
    data = pickle.dumps(obj)
    sock.sendall(_FRAME.pack(len(data)) + data)


def _recv(sock: socket.socket) -> Any:
    head = _recv_exact(sock, _FRAME.size)
    if head is None:
        return None
    body = _recv_exact(sock, _FRAME.unpack(head)[0])
    return None if body is None else pickle.loads(body)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        part = sock.recv(n - got)
        if not part:
            return None
        chunks.append(part)
        got += len(part)
    return b"".join(chunks)


class ProcessRuntime:
    """Parent side: starts the supervisor, forwards prefetch, reads the shared counters."""

    def __init__(self, pager: Pager, source: PageSource, *, populate: bool, threads: int,
                 log_faults: int, on_error: str, retries: int) -> None:
        try:
            pickled_source = pickle.dumps(source)
        except Exception as err:
            raise PagerError(
                f"{type(source).__name__} cannot be sent to the pager process ({err}): keep "
                "only picklable constructor arguments and open connections lazily") from err
        self.state = SharedState(log_faults)
        self._config = {
            "areas": [(pager.region.address, pager.region.size, 0)],
            "source": pickled_source, "page_size": pager.region.page_size,
            "chunk": pager.chunk, "readahead": pager.readahead, "populate": populate,
            "threads": threads, "on_error": on_error, "retries": retries,
            "log_faults": log_faults,
        }
        self._uffd = pager.uffd
        self._sock: socket.socket | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Spawn the supervisor, hand it the uffd and wait until its worker serves."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "userfault.pager_process", str(theirs.fileno()),
                 str(self.state.fd)],
                pass_fds=(theirs.fileno(), self.state.fd), stdin=subprocess.DEVNULL)
        self._sock = mine
        send_uffd(mine, self._uffd, b"U")
        _send(mine, self._config)
        mine.settimeout(START_TIMEOUT)
        reply = _recv(mine)
        mine.settimeout(None)
        if not reply or not reply.get("ok"):
            self.stop()
            why = reply.get("error") if reply else "it exited during start-up"
            raise PagerError(f"the pager process could not start: {why}")

    def _call(self, request: dict[str, Any]) -> Any:
        if self._sock is None:
            raise PagerError("the pager process is not running")
        with self._lock:
            _send(self._sock, request)
            reply = _recv(self._sock)
        if reply is None:
            raise PagerError(f"the pager process exited (status {self._status()})")
        if "error" in reply:
            raise PagerError(reply["error"])
        return reply["result"]

    def _status(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def prefetch(self, ranges: list[tuple[int, int]]) -> int:
        """Install the ranges from the pager process in one batch."""
        return int(self._call({"op": "prefetch", "ranges": ranges}))

    def counters(self) -> dict[str, Any]:
        """The shared counters (no round trip)."""
        return self.state.counters()

    def drain_log(self) -> bytes:
        """Fault records from the shared log."""
        return self.state.drain_log()

    def error(self) -> str | None:
        """The first serving error, or the pager process's death."""
        status = self._status()
        if self.proc is not None and status is not None:
            return (f"the pager process exited with status {status}: faults on this memory "
                    "can no longer be served")
        return self.state.error()

    def stop(self) -> None:
        """Stop the supervisor and its worker; idempotent."""
        if self._sock is not None:
            try:
                with self._lock:  # never between another call's request and reply
                    _send(self._sock, {"op": "stop"})
            except OSError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.state.close()


# -- the supervisor and its worker ---------------------------------------------------------

def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` (a single-threaded process) exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # it died before the prctl: no signal will come
        os._exit(0)


def _make_server(uffd: Uffd, config: dict[str, Any], source: PageSource,
                 state: SharedState, slot_base: int) -> FaultServer:
    return FaultServer(
        uffd, config["areas"], source, page_size=config["page_size"], chunk=config["chunk"],
        readahead=config["readahead"], populate=config["populate"],
        on_error=config["on_error"], retries=config["retries"], state=state,
        slot_base=slot_base)


def _worker(uffd: Uffd, config: dict[str, Any], source: PageSource, state: SharedState,
            supervisor: int) -> None:
    _die_with_parent(supervisor)
    state.after_fork()  # the supervisor may fork us while its prefetch thread holds the lock
    server = _make_server(uffd, config, source, state, _WORKER_SLOTS)

    def serve() -> None:
        # A serving thread that dies would strand the faults it had read: take the whole
        # worker down instead, so the supervisor wakes every waiter and starts a new one.
        try:
            server.serve_forever()
        except BaseException:
            log.exception("pager worker thread failed; restarting the worker")
            os._exit(1)

    for _ in range(config["threads"] - 1):
        threading.Thread(target=serve, daemon=True).start()
    serve()


def _spawn_worker(uffd: Uffd, config: dict[str, Any], source: PageSource,
                  state: SharedState) -> int:
    supervisor = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _worker(uffd, config, source, state, supervisor)
        except BaseException:
            log.exception("pager worker failed")
            code = 1
        finally:
            os._exit(code)
    return pid


def _prefetch(helper: FaultServer, sock: socket.socket, ranges: list[tuple[int, int]]) -> None:
    try:
        _send(sock, {"result": helper.prefetch(ranges)})
    except Exception as err:
        _send(sock, {"error": f"prefetch failed: {err}"})


def main(argv: list[str] | None = None) -> int:
    """Supervisor entry point: ``SOCK_FD STATE_FD``."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="userfault pager: %(message)s")
    # Not PR_SET_PDEATHSIG here: it fires when the *thread* that started us exits, and a pager
    # may be created by a short-lived thread. Watch the parent process itself instead.
    parent = os.pidfd_open(os.getppid())
    sock = socket.socket(fileno=int(args[0]))
    state = SharedState.attach(int(args[1]))
    uffd, _ = recv_uffd(sock)
    config = _recv(sock)
    try:
        source: PageSource = pickle.loads(config["source"])
    except Exception as err:
        _send(sock, {"ok": False, "error": (
            f"the source could not be rebuilt in the pager process: {err!r}; its class must "
            "be importable there (defined in a module, not in __main__ or a function)")})
        return 1
    pid = _spawn_worker(uffd, config, source, state)
    pidfd = os.pidfd_open(pid)
    helper = _make_server(uffd, config, source, state, 0)  # serves prefetch requests
    supervisor = state.slot(1)
    _send(sock, {"ok": True})
    try:
        while True:
            ready, _, _ = select.select([sock.fileno(), pidfd, parent], [], [])
            if parent in ready:
                return 0  # the faulting process is gone: nothing left to serve
            if pidfd in ready:
                os.waitpid(pid, 0)
                os.close(pidfd)
                supervisor.add("restarts")
                supervisor.flush()
                log.warning("pager worker %d died; waking blocked threads and restarting", pid)
                for address, length, _ in config["areas"]:
                    try:
                        uffd.wake(address, length)
                    except OSError:
                        return 0  # the memory is gone: nothing left to serve
                pid = _spawn_worker(uffd, config, source, state)
                pidfd = os.pidfd_open(pid)
            if sock.fileno() in ready:
                request = _recv(sock)
                if request is None or request["op"] == "stop":
                    return 0
                # On a thread: a slow source must not keep this loop from watching the
                # worker and the parent. The parent sends one request at a time.
                threading.Thread(target=_prefetch, args=(helper, sock, request["ranges"]),
                                 daemon=True).start()
    finally:
        os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


if __name__ == "__main__":
    raise SystemExit(main())
