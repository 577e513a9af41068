"""The pager process: Python sources served by the C engine in a process of their own.

Python cannot serve faults of a process whose faulting thread holds the GIL, so a Python
source is served from another process, by the same engine as everything else::

    your process ──uffd + setup (SCM_RIGHTS)──▶ supervisor ──fork──▶ worker (the engine,
          │  ▲                                      │                 calling your source)
          │  └─── shared memory: counters, errors, fault log, reads in progress ◀──┘
          └─ watchdog (C thread): the supervisor died → a standby engine poisons every fault

The worker runs the engine with the source; the engine's threads call the source with the
*worker's* GIL. The supervisor is single-threaded and only watches:

* a worker that dies (a crashing source) or hangs (a read longer than ``timeout``, then it is
  killed) is replaced with backoff; the pages it was reading are tried again, a batch one page
  at a time, and a page that keeps killing it is *condemned*: it fails without being read,
  and ``on_error`` decides. After ``max_restarts`` deaths in a row the supervisor gives up and
  every fault gets SIGBUS;
* it exits with your process (a pidfd on its parent), and the worker with it
  (PR_SET_PDEATHSIG, safe there: the supervisor is single-threaded).

Your process keeps a native watchdog on the supervisor: if it dies, a standby engine on your
process's uffd takes over, and every blocked and later fault ends in a logged SIGBUS.

A source class may be defined in your script (``__main__``) or in a module beside it: as with
``multiprocessing``'s spawn start method, the pager process gets your ``sys.path`` and imports
your script as ``__mp_main__`` (so code that maps memory at import must sit under
``if __name__ == "__main__":``).

Starting a pager process costs an interpreter and its imports (~0.1 s, more on a loaded
machine), paid by the first fault's wait unless it is paid ahead: :func:`prestart` starts a
*spare* supervisor that imports everything and waits; the next pager of a Python source takes
it, so that ``userfault.map`` only hands it the uffd. The next spare starts a second later
(:data:`NEXT_SPARE_DELAY`), not at once: its ~0.1 s of CPU would otherwise compete with the
first faults of the pager that just started.

``python -m userfault.serving.process SOCK_FD`` is the supervisor's entry point; the uffd,
the shared state and the other descriptors come over ``SOCK_FD`` (SCM_RIGHTS).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import logging
import mmap
import multiprocessing.spawn
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .. import _native
from ..errors import PagerError
from ..sources.base import PageSource
from .config import ServeConfig
from .runtime import ServingError, engine_args, flush_result, prefetch_result, source_name

__all__ = ["IN_PAGER_PROCESS", "ProcessRuntime", "main", "prestart"]

log = logging.getLogger("userfault.pager")

#: Set in the pager process: importing the user's script there must not map memory again.
IN_PAGER_PROCESS = "USERFAULT_PAGER_PROCESS"
START_TIMEOUT = 30.0
_FRAME = struct.Struct("<I")
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_POLL_S = 0.05          # how often the supervisor looks for reads that hang
_LIVED_S = 10.0         # a worker that lived this long resets the restart backoff
_BACKOFF_S = (0.05, 5.0)
_SOURCE_MODULES = ("userfault.sources.http", "userfault.sources.redis",
                   "userfault.sources.snapshot")
#: what a spare imports too while it waits: this module under its own name (the supervisor
#: runs it as ``__main__``, and unpickling the ``_Setup`` would import it again, ~7 ms), and
#: the IDNA codec that a socket's first connect to a host name imports (~2 ms)
_SPARE_MODULES = (*_SOURCE_MODULES, "userfault.serving.process", "encodings.idna")
#: seconds after a pager takes the spare before the next spare starts. Started at once, its
#: imports (~0.1 s of CPU) ran beside the new pager's first faults: on 2 vCPUs that made the
#: first 64 MiB tensor of a checkpoint over HTTP 83 ms instead of 63 (medians of 12).
NEXT_SPARE_DELAY = 1.0


@dataclass(frozen=True)
class _Setup:
    """What the supervisor needs, sent once after the uffd."""

    areas: list[tuple[int, int, int]]
    page_size: int
    config: ServeConfig
    source: bytes
    name: str
    prepare: dict[str, Any]
    evict_advice: int
    pool_fd: int
    shared: bool
    trace_fd: int
    preload: list[tuple[int, int]]
    agent_fds: tuple[int, int]  # the engine asks this process to madvise through these
    beacon: int  # forked children find their uffd through these (serving/forks.py)
    fork_table: int


def _setup_fds(setup: _Setup) -> tuple[int, ...]:
    """The descriptors a setup names besides the uffd and the state (-1: none), in the order
    they are sent."""
    return (*setup.agent_fds, setup.pool_fd, setup.trace_fd, setup.fork_table)


def _with_received_fds(setup: _Setup, fds: list[int]) -> _Setup:
    """``setup`` naming the descriptors as received here (``fds``, in :func:`_setup_fds`
    order, only those that were not -1)."""
    it = iter(fds)
    agent0, agent1, pool, trace, forks = (next(it) if fd >= 0 else -1 for fd in _setup_fds(setup))
    return replace(setup, agent_fds=(agent0, agent1), pool_fd=pool, trace_fd=trace,
                   fork_table=forks)


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
        try:
            part = sock.recv(n - got)
        except ConnectionError:
            return None
        if not part:
            return None
        chunks.append(part)
        got += len(part)
    return b"".join(chunks)


def _pickle_source(source: PageSource) -> tuple[bytes, dict[str, Any]]:
    """The pickled source and what the pager process needs to unpickle it: this process's
    ``sys.path`` and, when the source's class lives in ``__main__``, the script to import."""
    try:
        data = pickle.dumps(source)
    except Exception as err:
        raise PagerError(
            f"{type(source).__name__} cannot be sent to the pager process ({err}): keep only "
            "picklable constructor arguments and open connections lazily") from err
    prepare = multiprocessing.spawn.get_preparation_data("userfault-pager")
    if b"__main__" in data:
        main = sys.modules.get("__main__")
        if "init_main_from_path" not in prepare and "init_main_from_name" not in prepare:
            where = getattr(main, "__file__", None) or "an interactive session or `python -c`"
            raise PagerError(
                f"{type(source).__name__} is defined in __main__ of {where}, which the pager "
                "process cannot import: define the class in a .py file (a script run with "
                "`python script.py` or a module)")
    else:
        prepare.pop("init_main_from_path", None)
        prepare.pop("init_main_from_name", None)
    prepare.pop("authkey", None)
    return data, prepare


def _state_buffer(log_capacity: int, fd: int | None = None) -> tuple[int, mmap.mmap]:
    size = _native.state_size(log_capacity)
    if fd is None:
        fd = os.memfd_create("userfault-state", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
    buf = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return fd, buf


@dataclass
class _Spare:
    """A supervisor started ahead: its imports done (or under way), waiting on ``sock``."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket
    env: dict[str, str]
    owner: int
    ready: bool = False  # its imports are done: it sent _READY
    # one reader of _READY at a time (prestart(wait=...) and a pager taking the spare)
    waiting: threading.Lock = field(default_factory=threading.Lock)


#: what a spare sends once its imports are done, before it waits for a uffd
_READY = b"R"
#: waits this long or longer are waits for ever (a socket timeout must fit a time_t)
_FOREVER = 1e9


def _await_ready(spare: _Spare, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds (``math.inf``: for ever) for the spare's imports; False
    if it is not ready by then. A spare that exited (or sent anything else) is a
    :class:`PagerError`."""
    with spare.waiting:
        if spare.ready:
            return True
        spare.sock.settimeout(None if timeout >= _FOREVER else timeout)
        try:
            got = spare.sock.recv(1)
        except TimeoutError:
            return False
        except OSError:
            got = b""  # reset: it exited
        finally:
            spare.sock.settimeout(None)
        if got != _READY:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spare.proc.wait(1)  # reaped, for its status
            raise PagerError(f"the spare pager process (pid {spare.proc.pid}) ended before its "
                             f"imports were done (exit status {spare.proc.returncode}); its "
                             "error is on stderr")
        spare.ready = True
        return True


_spare: _Spare | None = None
_spare_lock = threading.Lock()
_next_spare: threading.Timer | None = None  # the spare to start NEXT_SPARE_DELAY from now


def _spawn_supervisor(env: dict[str, str], *, spare: bool = False
                      ) -> tuple[subprocess.Popen[bytes], socket.socket]:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # A spare starts with SIGINT blocked (it inherits this thread's mask) and unblocks it once
    # it ignores it: a Ctrl-C meant for your program must not end it with a traceback, even
    # during the interpreter's first imports.
    masked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if spare else None
    try:
        with theirs:
            proc = subprocess.Popen(
                [sys.executable, "-m", "userfault.serving.process", str(theirs.fileno()),
                 *(["--spare"] if spare else [])],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
    finally:
        if masked is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, masked)
    return proc, mine


def _pager_env() -> dict[str, str]:
    return dict(os.environ, **{IN_PAGER_PROCESS: "1"})


def _drop_spare(spare: _Spare) -> None:
    spare.sock.close()
    spare.proc.kill()  # it serves nothing yet
    spare.proc.wait()


def prestart(keep: bool = True, *, wait: float = 0.0) -> bool:
    """Start a pager process ahead, so that the next pager of a Python source (HTTP, Redis,
    a snapshot, your own) does not wait for an interpreter to start and import userfault:
    it takes this spare, and a new spare is started for the one after, :data:`NEXT_SPARE_DELAY`
    (1 s) later so that its imports do not compete with that pager's first faults; a map in
    that second starts its pager process itself, or takes the spare of an explicit
    ``prestart()``. Call it early (while your program does other work); calling it again is
    harmless. ``prestart(False)`` stops the spare and keeping one. A spare exits with this
    process.

    A spare takes a few hundred milliseconds of CPU to import what it needs; a pager that
    takes it before then waits for the rest. ``wait=SECONDS`` waits up to that long for the
    spare to be ready (a server about to take requests, a benchmark about to time a map).
    Returns whether a spare is ready (``False`` after ``prestart(False)``).

    Raises:
        PagerError: with ``wait``, the spare exited during its imports.

    Example::

        userfault.prestart()
        ...                                   # parse arguments, build the model, ...
        weights = userfault.map("http://host/model.safetensors")   # starts in milliseconds
    """
    global _spare
    if os.environ.get(IN_PAGER_PROCESS):
        return False
    with _spare_lock:
        _cancel_next_spare()  # started now, or not kept
        spare = _keep_spare_locked(keep)
    if spare is None:
        return False
    if spare.ready or wait <= 0:
        return spare.ready
    # Not under _spare_lock: a fork meanwhile would leave the child's copy of it held.
    try:
        return _await_ready(spare, wait)
    except PagerError:
        with _spare_lock:
            if _spare is spare:
                _spare = None
        _drop_spare(spare)
        raise


def _keep_spare_locked(keep: bool) -> _Spare | None:
    """Under ``_spare_lock``: the spare, started now if there is none that fits (``keep``),
    or none (stopped, if there was one)."""
    global _spare
    spare = _spare
    if spare is None or spare.owner != os.getpid() or spare.proc.poll() is not None \
            or not keep:
        _spare = None
        if spare is not None and spare.owner == os.getpid():
            _drop_spare(spare)
        if not keep:
            return None
        env = _pager_env()
        proc, sock = _spawn_supervisor(env, spare=True)
        spare = _spare = _Spare(proc, sock, env, os.getpid())
    return spare


def _cancel_next_spare() -> None:
    """Under ``_spare_lock``: forget the spare that was to start later."""
    global _next_spare
    if _next_spare is not None:
        _next_spare.cancel()
        _next_spare = None


def _start_next_spare_later() -> None:
    """Start the next spare :data:`NEXT_SPARE_DELAY` seconds from now (a pager took the last
    one), unless one is already due."""
    global _next_spare
    with _spare_lock:
        if _next_spare is None and _spare is None:
            _next_spare = threading.Timer(NEXT_SPARE_DELAY, _start_next_spare)
            _next_spare.daemon = True  # never holds up the interpreter's exit
            _next_spare.start()


def _start_next_spare() -> None:
    global _next_spare
    with _spare_lock:  # held while it starts: a prestart(False) meanwhile comes after
        if _next_spare is not threading.current_thread():
            return  # cancelled while it fired
        _next_spare = None
        try:
            _keep_spare_locked(True)
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            # the pager that took the last spare is up: say so, go on (RuntimeError: the
            # interpreter is shutting down)
            log.warning("userfault: could not start the next spare pager process: %s", err)


def _forget_spare_in_child() -> None:
    # The parent's spare is never ours to take or stop: close our copy of its socket (the
    # parent's stays open). A new lock, in case another thread of the parent held it. The
    # parent's timer thread for the next spare does not exist here.
    global _spare, _spare_lock, _next_spare
    if _spare is not None:
        with contextlib.suppress(OSError):
            _spare.sock.close()
    _spare = None
    _next_spare = None
    _spare_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_spare_in_child)


def _take_supervisor() -> tuple[subprocess.Popen[bytes], socket.socket, bool]:
    """The spare if :func:`prestart` left one that fits, else a supervisor started now; and
    whether a spare is kept (one was there, fit or not: the next starts later)."""
    global _spare
    env = _pager_env()
    with _spare_lock:
        spare, _spare = _spare, None
    kept = spare is not None and spare.owner == os.getpid()
    if spare is not None and spare.owner != os.getpid():
        spare = None  # the parent's (this is a forked child): not ours to use or stop
    elif spare is not None and (spare.env != env or spare.proc.poll() is not None):
        _drop_spare(spare)  # started under another environment, or gone
        spare = None
    if spare is not None and not spare.ready:
        try:  # its imports, which it would finish before serving anyway
            ready = _await_ready(spare, START_TIMEOUT)
        except PagerError:
            ready = False
        if not ready:
            _drop_spare(spare)
            spare = None
    if spare is None:
        return (*_spawn_supervisor(env), kept)
    return spare.proc, spare.sock, True


class ProcessRuntime:
    """Serves ``uffd`` from a Python source through a pager process (a :class:`Runtime`).

    ``uffd`` stays the caller's; the pager process gets a copy. Counters, errors and the fault
    log are read from shared memory, with no round trip.
    """

    def __init__(self, uffd: int, areas: Sequence[tuple[int, int, int]], page_size: int,
                 source: PageSource, config: ServeConfig, *,
                 evict_advice: int = mmap.MADV_DONTNEED, pool_fd: int = -1,
                 shared: bool = False, trace_fd: int = -1,
                 preload: Sequence[tuple[int, int]] = (), beacon: int = 0,
                 fork_table: int = -1) -> None:
        if os.environ.get(IN_PAGER_PROCESS):
            raise PagerError(
                "a pager was created while the pager process imported your script to find "
                "your source's class: put the code that maps memory under "
                "`if __name__ == '__main__':` (as multiprocessing's spawn start method "
                "requires)")
        data, prepare = _pickle_source(source)
        self._owner = os.getpid()
        self._call_lock = threading.Lock()
        self._uffd = uffd
        # A budget evicts with madvise, which only this process can call on its memory.
        self._agent_fds = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
                           os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)) \
            if config.max_resident or config.writable else (-1, -1)
        self._setup = _Setup([(int(a), int(n), int(o)) for a, n, o in areas], page_size, config,
                             data, source_name(source), prepare, evict_advice, pool_fd,
                             shared, trace_fd, list(preload), self._agent_fds, beacon,
                             fork_table)
        self.state: mmap.mmap | bytearray  # shared with the worker; a copy once stopped
        self._state_fd, self.state = _state_buffer(config.log_faults)
        _native.state_init(self.state, config.log_faults)
        # Started by the watchdog if the pager process dies: every fault then gets SIGBUS.
        self._standby: Any = _native.Engine(
            uffd, list(areas), page_size, _native.SRC_FAIL, _native.INST_COPY,
            fail_errno=errno.EPIPE, fail_message="the pager process serving it died",
            name=self._setup.name, retries=0, state=self.state, **self._fork_args(self._setup))
        self._sock: socket.socket | None = None
        self._watchdog: Any = None
        self._pidfd = -1
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Spawn the supervisor (or take the spare, see :func:`prestart`), hand it the uffd
        and the other descriptors, and wait until its worker serves."""
        self.proc, mine, keep_spare = _take_supervisor()
        self._sock = mine
        try:
            socket.send_fds(mine, [b"U"], [self._uffd, self._state_fd, *(
                fd for fd in _setup_fds(self._setup) if fd >= 0)])
            _send(mine, self._setup)
            mine.settimeout(START_TIMEOUT)
            reply = _recv(mine)
            mine.settimeout(None)
        except OSError as err:
            reply = {"ok": False, "error": f"talking to it failed: {err}"}
        if not reply or not reply.get("ok"):
            self.stop()
            why = reply.get("error") if reply else "it exited during start-up"
            raise PagerError(f"the pager process could not start: {why}")
        self._pidfd = os.pidfd_open(self.proc.pid)
        self._watchdog = _native.Watchdog(
            self._pidfd, self._standby, self.proc.pid, agent_fds=self._agent_fds,
            pool_fd=self._setup.pool_fd, pool_len=sum(n for _, n, _ in self._setup.areas))
        if keep_spare:
            _start_next_spare_later()

    def _check_owner(self, what: str) -> None:
        if os.getpid() != self._owner:
            raise PagerError(f"{what} from a forked child is not supported: the pager process "
                             "belongs to the parent (the child's faults are served anyway)")

    def _call(self, request: dict[str, Any]) -> Any:
        self._check_owner(str(request["op"]))
        if self._sock is None:
            raise PagerError("the pager process is not running")
        with self._call_lock:  # one request and its reply at a time (threads share the socket)
            _send(self._sock, request)
            reply = _recv(self._sock)
        if reply is None:
            status = None if self.proc is None else self.proc.poll()
            raise PagerError(f"the pager process exited (status {status})")
        if "error" in reply:
            raise PagerError(reply["error"])
        return reply["result"]

    def prefetch(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Install the ranges from the pager process in one batch."""
        return prefetch_result(self._call({"op": "prefetch", "ranges": list(ranges)}))

    def willneed(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Queue the ranges for the pager process's background threads; bytes queued."""
        return int(self._call({"op": "willneed", "ranges": list(ranges)}))

    def flush(self) -> int:
        """Write every dirty page back, durably (the worker does it); bytes written."""
        return flush_result(self._call({"op": "flush"}))

    def at_exit(self) -> None:
        """Have the worker write the trace so far. (The pager process sees this process exit
        and stops the worker, which poisons what forked children never loaded.)"""
        self._call({"op": "trace_sync"})

    def counters(self) -> dict[str, Any]:
        """The shared counters (no round trip)."""
        return dict(_native.state_counters(self.state))

    def drain_log(self) -> bytes:
        """Fault records from the shared log."""
        return bytes(_native.state_drain_log(self.state))

    def error(self) -> ServingError | None:
        """The first serving error, or the pager process's death."""
        err = ServingError.from_state(_native.state_error(self.state))
        if err is None and self.proc is not None and self.proc.poll() is not None \
                and os.getpid() == self._owner:
            return ServingError(errno.ESRCH, f"the pager process exited with status "
                                f"{self.proc.returncode}: faults on this memory get SIGBUS")
        return err

    @property
    def process_exited(self) -> bool:
        """Whether the process whose memory is served is gone."""
        return bool(_native.state_process_exited(self.state))

    @property
    def keeper_pid(self) -> int:
        """The supervisor: it holds forked children's uffds (its worker may be replaced)."""
        if self.proc is None:
            raise PagerError("the pager process is not running")
        return self.proc.pid

    @staticmethod
    def _fork_args(setup: _Setup) -> dict[str, int]:
        """Every engine over this memory answers forked children's beacon."""
        return {"beacon": setup.beacon, "fork_table": setup.fork_table}

    def stop(self) -> None:
        """Stop the pager process; idempotent. In a forked child, let go of the copies only."""
        owner = os.getpid() == self._owner
        if self._watchdog is not None:
            self._watchdog.stop()  # before the supervisor exits on purpose
            self._watchdog = None
        if owner and self._sock is not None:
            with contextlib.suppress(OSError):
                _send(self._sock, {"op": "stop"})
        if owner and self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._standby is not None:
            self._standby.stop()
            self._standby = None  # it holds the state buffer
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        for fd in self._agent_fds:
            if fd >= 0:
                os.close(fd)
        self._agent_fds = (-1, -1)
        if self._state_fd >= 0:
            # counters, errors and the log stay readable after the stop, from a copy
            shared, self.state = self.state, bytearray(self.state)
            assert isinstance(shared, mmap.mmap)
            shared.close()
            os.close(self._state_fd)
            self._state_fd = -1


# -- the supervisor and its worker ---------------------------------------------------------


class _Limiter:
    """At most ``burst`` log lines, then ``rate`` a second; the rest are counted."""

    def __init__(self, burst: int = 10, rate: float = 1.0) -> None:
        self.tokens, self.burst, self.rate = float(burst), burst, rate
        self.last = time.monotonic()
        self.quiet = 0

    def line(self, level: int, msg: str) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            self.quiet += 1
            return
        self.tokens -= 1
        if self.quiet:
            msg += f" ({self.quiet} similar lines were left out)"
            self.quiet = 0
        log.log(level, "%s", msg)


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` (a single-threaded process) exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # it died before the prctl: no signal will come
        os._exit(0)


#: A forked child a worker served: its uffd (the supervisor's copy), key and areas.
_Child = tuple[int, int, list[tuple[int, int, int]]]
#: kind (1: a child's uffd, 2: its end, 3: its areas after an mremap), areas, key
_FORK_HEAD = struct.Struct("<IIQ")
_FORK_AREA = struct.Struct("<QQQ")


def _worker(uffd: int, setup: _Setup, source: PageSource, state: mmap.mmap,
            ctl: socket.socket, supervisor: int, forks: socket.socket, generation: int,
            children: list[_Child]) -> None:
    """The worker: the engine over the source (and over the forked children an earlier
    worker served), and requests from the supervisor."""
    _die_with_parent(supervisor)
    engine = _native.Engine(uffd, setup.areas, state=state, log_fd=2,
                            fork_sock=forks.fileno(), key_base=generation << 32,
                            children=children,
                            **engine_args(source, setup.config, setup.page_size,
                                          evict_advice=setup.evict_advice, pool_fd=setup.pool_fd,
                                          shared=setup.shared, agent_fds=setup.agent_fds,
                                          trace_fd=setup.trace_fd, preload=setup.preload,
                                          beacon=setup.beacon, fork_table=setup.fork_table))
    engine.start()
    while True:
        request = _recv(ctl)
        if request is None:  # the supervisor stops us: let go of forked children cleanly
            engine.stop()
            del engine
            os._exit(0)
        op = request["op"]
        try:
            if op in ("prefetch", "willneed"):
                result = getattr(engine, op)(request["ranges"])
            else:  # "flush", "trace_sync"
                result = getattr(engine, op)()
            _send(ctl, {"result": result})
        except Exception as err:  # reported to the caller
            _send(ctl, {"error": f"{op} failed: {err}"})


@dataclass
class _Worker:
    pid: int
    pidfd: int
    ctl: socket.socket
    started: float
    timed_out: str = ""


class _Supervisor:
    def __init__(self, sock: socket.socket, uffd: int, setup: _Setup, source: PageSource,
                 state: mmap.mmap) -> None:
        self.sock, self.uffd, self.setup, self.source, self.state = sock, uffd, setup, source, state
        self.config = setup.config
        self.page = setup.page_size
        self.parent = os.pidfd_open(os.getppid())
        self.worker: _Worker | None = None
        self.restart_at: float | None = None
        self.consecutive = 0
        self.failures: dict[int, int] = {}
        self.condemned: list[tuple[int, int]] = []
        self.suspect: list[tuple[int, int]] = []
        self.pending: dict[str, Any] | None = None  # a prefetch waiting for the worker
        self.fallback: Any = None
        self.say = _Limiter()
        # Forked children's uffds, held here so that a worker that dies does not take them
        # along (the kernel would drop the child's registration: zeros); the next worker
        # serves them. The worker tells us of each child and of its end.
        self.forks, self.worker_forks = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.forks.setblocking(False)
        self.children: dict[int, tuple[int, list[tuple[int, int, int]]]] = {}
        self.generation = 0

    def spawn(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        supervisor = os.getpid()
        self.generation += 1
        children = [(fd, key, areas) for key, (fd, areas) in self.children.items()]
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                mine.close()
                self.sock.close()
                self.forks.close()
                _worker(self.uffd, self.setup, self.source, self.state, theirs, supervisor,
                        self.worker_forks, self.generation, children)
            except BaseException:
                log.exception("pager worker failed")
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        self.worker = _Worker(pid, os.pidfd_open(pid), mine, time.monotonic())
        if self.pending is not None:
            _send(mine, self.pending)

    def run(self) -> int:
        self.spawn()
        _send(self.sock, {"ok": True})
        try:
            while True:
                w = self.worker
                watched = [self.sock.fileno(), self.parent, self.forks.fileno()]
                if w:
                    watched += [w.pidfd, w.ctl.fileno()]
                timeout = _POLL_S if w else None if self.restart_at is None else max(
                    0.0, self.restart_at - time.monotonic())
                ready, _, _ = select.select(watched, [], [], timeout)
                if self.parent in ready:
                    return 0  # the faulting process is gone: nothing left to serve
                if self.forks.fileno() in ready:
                    self.read_forks()
                if w and w.pidfd in ready:
                    if w.ctl.fileno() in ready:  # a reply sent before it died still counts
                        self.reply_from_worker(w)
                    self.worker_died(w)
                elif w and w.ctl.fileno() in ready:
                    self.reply_from_worker(w)
                if self.sock.fileno() in ready and not self.request():
                    return 0
                if self.restart_at is not None and time.monotonic() >= self.restart_at:
                    self.restart()
                if self.worker:
                    self.cut_hung_reads(self.worker)
        finally:
            self.stop_worker()

    def stop_worker(self) -> None:
        """Ask the worker to stop (it poisons what forked children still miss), then kill it
        if it does not. Without a worker, the children's missing pages are poisoned here."""
        w = self.worker
        if w is None:
            self.read_forks()
            if self.children and self.fallback is None:
                # an engine that never starts: letting it go poisons its children's pages
                _native.Engine(self.uffd, self.setup.areas, self.page, _native.SRC_FAIL,
                               _native.INST_COPY, name=self.setup.name, retries=0,
                               children=self.dup_children(),
                               **ProcessRuntime._fork_args(self.setup))
            return
        w.ctl.close()
        ready, _, _ = select.select([w.pidfd], [], [], 5.0)
        if not ready:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(w.pid, 0)
        os.close(w.pidfd)
        self.worker = None

    # -- forked children ---------------------------------------------------------------------

    def read_forks(self) -> None:
        """The workers' news of forked children: a child's uffd to hold, or its end."""
        while True:
            try:
                msg, fds, _, _ = socket.recv_fds(self.forks, 1 << 18, 1)
            except BlockingIOError:
                return
            kind, n, key = _FORK_HEAD.unpack_from(msg)
            areas = [(int(a), int(b), int(c)) for a, b, c in (
                _FORK_AREA.unpack_from(msg, _FORK_HEAD.size + i * _FORK_AREA.size)
                for i in range(n))]
            if kind == 1 and fds:
                self.children[key] = (fds[0], areas)
            elif kind == 2 and key in self.children:
                os.close(self.children.pop(key)[0])
            elif kind == 3 and key in self.children:  # the child moved memory (mremap)
                self.children[key] = (self.children[key][0], areas)

    def dup_children(self) -> list[_Child]:
        """The children, with descriptors of their own (an engine closes those it adopts)."""
        return [(os.dup(fd), key, areas) for key, (fd, areas) in self.children.items()]

    # -- requests from the faulting process --------------------------------------------------

    def request(self) -> bool:
        req = _recv(self.sock)
        if req is None or req.get("op") == "stop":
            return False
        if self.fallback is not None:
            _send(self.sock, {"error": f"{req.get('op')} failed: the pager process gave up "
                                       "serving (its worker kept dying; see the log)"})
        else:
            self.pending = req
            if self.worker is not None:
                _send(self.worker.ctl, req)
        return True

    def reply_from_worker(self, w: _Worker) -> None:
        reply = _recv(w.ctl)
        if reply is not None and self.pending is not None:
            self.pending = None
            _send(self.sock, reply)

    # -- workers that die or hang ------------------------------------------------------------

    def cut_hung_reads(self, w: _Worker) -> None:
        if w.timed_out:
            return
        now = _native.now_ns()
        for _slot, start, off, length, _addr in _native.state_inflight(self.state):
            if now - start > self.config.timeout * 1e9:
                w.timed_out = (f"reading {length} bytes at offset {off:#x} of {self.setup.name} "
                               f"took longer than timeout={self.config.timeout:g} s")
                _native.state_add(self.state, "timeouts", 1)
                self.say.line(logging.WARNING, f"{w.timed_out}: cutting it, the pager worker "
                              "is replaced")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
                return

    def worker_died(self, w: _Worker) -> None:
        _, status = os.waitpid(w.pid, 0)
        os.close(w.pidfd)
        w.ctl.close()
        self.worker = None
        code = os.waitstatus_to_exitcode(status)
        how = w.timed_out or (f"was killed by {signal.Signals(-code).name}" if code < 0
                              else f"exited with status {code}")
        reads = _native.state_inflight(self.state)
        _native.state_clear_inflight(self.state)
        _native.state_add(self.state, "restarts", 1)
        self.blame(reads)
        if time.monotonic() - w.started >= _LIVED_S:
            self.consecutive = 0
        self.consecutive += 1
        where = "; ".join(f"offset {off:#x}..+{n}" for _, _, off, n, _ in reads)
        what = f"while reading {where} of {self.setup.name}" if where else "(it was not reading)"
        if self.pending is not None:
            op, self.pending = self.pending.get("op"), None
            _send(self.sock, {"error": f"{op} failed: the pager worker {how} {what}"})
        lost = self.follow_moves()  # first: a give-up wakes and poisons where the parts are
        if self.consecutive > self.config.max_restarts:
            self.give_up(f"pager worker {w.pid} {how} {what}")
            return
        if lost:
            self.give_up(f"pager worker {w.pid} {how} {what}, after {lost} was moved (mremap): "
                         "a new worker would not know where its parts are now")
            return
        delay = min(_BACKOFF_S[0] * 2 ** (self.consecutive - 1), _BACKOFF_S[1])
        self.say.line(logging.WARNING, (
            f"pager worker {w.pid} {how} {what}: waking blocked threads and restarting it in "
            f"{delay:.2f} s (restart {self.consecutive} of at most {self.config.max_restarts} "
            "in a row)"))
        self.restart_at = time.monotonic() + delay

    def follow_moves(self) -> str:
        """Start new workers from where the process has moved its memory to (mremap), as the
        engine keeps it in the state; a worker starting from the pager's first areas would
        serve another part's bytes there. Returns what moved without being kept, or ""."""
        kept, areas, children_unsent = _native.state_moved_areas(self.state)
        if children_unsent:
            return "a forked child's mapping"  # and the worker could not tell us where to
        if kept < 0:
            return (f"the mapping (into more than {_native.UF_KEPT_AREAS} parts, or the worker "
                    "died between reading an mremap and noting where)")
        if kept:
            self.setup = replace(self.setup, areas=areas)
        return ""

    def blame(self, reads: list[tuple[int, int, int, int, int]]) -> None:
        """What the dead worker was reading: a batch is read page by page from now on; a page
        that killed it more than ``retries`` times is condemned (fails unread)."""
        for _, _, off, length, _ in reads:
            if length > self.page:
                if (off, length) not in self.suspect:
                    self.suspect = ([*self.suspect, (off, length)])[-_native.UF_MAX_MARKS:]
                continue
            self.failures[off] = self.failures.get(off, 0) + 1
            if self.failures[off] > self.config.retries and (off, length) not in self.condemned:
                self.condemned = ([*self.condemned, (off, length)])[-_native.UF_MAX_MARKS:]
                self.say.line(logging.ERROR, (
                    f"offset {off:#x}..+{length} of {self.setup.name} killed or hung the pager "
                    f"worker {self.failures[off]} times: it fails from now on without being "
                    f"read (on_error={self.config.on_error!r})"))
        _native.state_set_marks(self.state, self.condemned, self.suspect)

    def restart(self) -> None:
        self.restart_at = None
        self.read_forks()  # every child the dead worker served
        self.spawn()
        self.wake_blocked()

    def wake_blocked(self) -> None:
        """Wake the threads whose faults the dead worker had read: they fault again, to the
        next worker or the fallback. One wake covers every address of each uffd, so memory
        moved where no area we know reaches (more parts than the state keeps) is woken too,
        and so is a fault the worker had read but not started a read for."""
        for fd in (self.uffd, *(fd for fd, _ in self.children.values())):
            _native.wake_all(fd)

    def give_up(self, last: str) -> None:
        msg = (f"the pager worker died {self.consecutive} times in a row (last: {last}): "
               "giving up; faults on pages not loaded yet get SIGBUS")
        self.say.line(logging.ERROR, msg)
        _native.state_set_error(self.state, errno.EIO, msg)
        for job in ("populate_over", "preload_over"):  # ends their progress bars
            _native.state_add(self.state, job, 1)
        self.read_forks()
        self.fallback = _native.Engine(
            self.uffd, self.setup.areas, self.page, _native.SRC_FAIL, _native.INST_COPY,
            fail_errno=errno.EIO, fail_message=f"the pager worker kept dying ({last})",
            name=self.setup.name, retries=0, state=self.state, children=self.dup_children(),
            **ProcessRuntime._fork_args(self.setup))
        self.fallback.start()
        self.wake_blocked()


def _owner_alive_while_waiting(sock: socket.socket) -> bool:
    """A spare waits for a pager to take it: True once the socket has something (a uffd, or
    its end), False if the process that started it exits first. The socket alone would not
    say so while a child forked by that process holds its end (a fork while the spare was
    being started, before the child's at-fork hook could know that socket)."""
    owner = os.getppid()
    try:
        pidfd = os.pidfd_open(owner)
    except OSError:
        return True  # no pidfd here (or the owner is gone: the socket says so too)
    try:
        if owner == 1 or os.getppid() != owner:
            return False  # it exited before we looked
        poll = select.poll()
        poll.register(sock, select.POLLIN)
        poll.register(pidfd, select.POLLIN)
        while True:
            ready = dict(poll.poll())
            if sock.fileno() in ready:
                return True
            if pidfd in ready:
                return False
    finally:
        os.close(pidfd)


def main(argv: list[str] | None = None) -> int:
    """Supervisor entry point: ``SOCK_FD [--spare]``."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="userfault pager: %(message)s")
    sock = socket.socket(fileno=int(args[0]))
    spare = "--spare" in args[1:]
    # ps and top show "uf-pager" (its threads, named after it until the engine names its own)
    ctypes.CDLL(None).prctl(_PR_SET_NAME, b"uf-pager", 0, 0, 0)
    if spare:
        # a Ctrl-C meant for your program must not end a spare with a traceback (it came
        # with SIGINT blocked, see _spawn_supervisor)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        # waiting anyway: import the modules of the sources open_source makes, which
        # unpickling the source would import on the way to the first fault
        for name in _SPARE_MODULES:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        with contextlib.suppress(OSError):  # gone: recv_fds below finds it so
            sock.sendall(_READY)
        if not _owner_alive_while_waiting(sock):
            return 0  # a spare nobody took: its process exited
    try:
        _, fds, _, _ = socket.recv_fds(sock, 16, 8)
    except ConnectionResetError:  # closed with _READY unread (a spare nobody took)
        fds = []
    if spare:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as a supervisor started now
    if len(fds) < 2:
        return 0  # a spare nobody took: its process exited
    uffd, state_fd = fds[0], fds[1]
    setup: _Setup | None = _recv(sock)
    if setup is None:
        return 1
    setup = _with_received_fds(setup, fds[2:])
    try:
        multiprocessing.spawn.prepare(setup.prepare)
        source: PageSource = pickle.loads(setup.source)
    except BaseException as err:
        _send(sock, {"ok": False, "error": (
            f"the source could not be rebuilt in the pager process: {err!r}; its class must "
            "be importable there (defined in a module or your script, not inside a function)")})
        return 1
    _, state = _state_buffer(setup.config.log_faults, state_fd)
    os.set_blocking(uffd, False)
    # Not PR_SET_PDEATHSIG here: it fires when the *thread* that started us exits, and a pager
    # may be created by a short-lived thread. The supervisor watches the process instead.
    return _Supervisor(sock, uffd, setup, source, state).run()


if __name__ == "__main__":
    raise SystemExit(main())
