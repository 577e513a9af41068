"""Two "hosts" for network tests: network namespaces joined by a veth pair.

    with two_hosts() as hosts:                     # or the `hosts` fixture
        srv = hosts.popen(hosts.a, [sys.executable, "-m", "userfault", "serve", ...])
        hosts.shape(rate="100mbit")                # tbf on both ends (and netem delay, if any)
        hosts.link_down(); ...; hosts.link_up()    # drop and restore the link
        hosts.run(hosts.b, ["ip", "addr"])         # any command inside a namespace

Host A is ``10.231.0.1/24``, host B ``10.231.0.2/24`` (a private range; each pair lives in
namespaces of its own, so concurrent pairs do not collide on addresses). Namespace and
interface names carry the pid of the test process and a counter, so parallel runs do not
collide on names either, and pairs left behind by a killed run (their pid is gone) are removed
when the next pair is made. Everything is removed on exit, even when the test fails: the
processes started with :meth:`TwoHosts.popen` are killed, then both namespaces are deleted
(which destroys the veth pair).

Needs root (``ip netns`` and ``tc``); :func:`require_two_hosts` skips the test otherwise. The
kernel may lack ``sch_netem`` (this CI VM does): :meth:`TwoHosts.shape` with ``delay``
raises :class:`ShapingUnavailable`, which tests turn into a skip.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import select
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

ADDRESS_A = "10.231.0.1"
ADDRESS_B = "10.231.0.2"
_PREFIX = "ufns"
_STALE = re.compile(rf"^{_PREFIX}-(\d+)-\d+-[ab]$")
_counter = itertools.count()


class ShapingUnavailable(RuntimeError):
    """The kernel does not offer the queueing discipline asked for."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          check=check)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> None:
    """Delete namespaces made by test processes that no longer exist."""
    out = _ip("netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _STALE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _ip("netns", "del", name, check=False)


class TwoHosts:
    """Namespaces ``a`` and ``b`` joined by veth ``dev_a`` <-> ``dev_b`` (see the module)."""

    def __init__(self) -> None:
        n = next(_counter)
        pid = os.getpid()
        self.a = f"{_PREFIX}-{pid}-{n}-a"
        self.b = f"{_PREFIX}-{pid}-{n}-b"
        tag = f"{pid % 100000}{n}"
        self.dev_a, self.dev_b = f"ufv{tag}a"[:15], f"ufv{tag}b"[:15]
        self.address_a, self.address_b = ADDRESS_A, ADDRESS_B
        self._procs: list[subprocess.Popen[Any]] = []
        self._made: list[str] = []

    # -- lifetime ------------------------------------------------------------------------------

    def create(self) -> TwoHosts:
        remove_stale()
        try:
            for ns in (self.a, self.b):
                _ip("netns", "add", ns)
                self._made.append(ns)
            _ip("link", "add", self.dev_a, "netns", self.a, "type", "veth", "peer", "name",
                self.dev_b, "netns", self.b)
            for ns, dev, addr in ((self.a, self.dev_a, ADDRESS_A),
                                  (self.b, self.dev_b, ADDRESS_B)):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", dev, "up")
            self.wait_link(up=True)
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        """Kill our processes, delete both namespaces; never raises, idempotent."""
        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
        self._procs.clear()
        for ns in self._made:
            _ip("netns", "del", ns, check=False)
        self._made.clear()

    def __enter__(self) -> TwoHosts:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # -- running things inside -----------------------------------------------------------------

    def command(self, ns: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns, *argv]

    def run(self, ns: str, argv: Sequence[str], timeout: float = 60,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``ns`` to completion (output captured as text)."""
        return subprocess.run(self.command(ns, argv), capture_output=True, text=True,
                              timeout=timeout, **kw)

    def popen(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``ns``; it is killed when the hosts are destroyed."""
        p = subprocess.Popen(self.command(ns, argv), **kw)
        self._procs.append(p)
        return p

    # -- the link ------------------------------------------------------------------------------

    def link_down(self) -> None:
        """Cut the link (host A's end down: B sees no carrier; packets are dropped)."""
        _ip("-n", self.a, "link", "set", self.dev_a, "down")
        self.wait_link(up=False)

    def link_up(self) -> None:
        """Restore the link."""
        _ip("-n", self.a, "link", "set", self.dev_a, "up")
        self.wait_link(up=True)

    def wait_link(self, *, up: bool, timeout: float = 10.0) -> None:
        """Wait until both ends report the carrier as ``up`` (or not)."""
        deadline = time.monotonic() + timeout
        while True:
            states = [_ip("-n", ns, "-o", "link", "show", "dev", dev).stdout
                      for ns, dev in ((self.a, self.dev_a), (self.b, self.dev_b))]
            if all(("LOWER_UP" in s) == up for s in states):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the veth link did not go {'up' if up else 'down'}: "
                                   f"{states}")
            time.sleep(0.01)

    def shape(self, *, rate: str | None = None, delay: str | None = None,
              burst: str = "256kb") -> None:
        """Shape both directions: ``rate`` (``"100mbit"``) with tbf, ``delay`` (``"5ms"``)
        with netem. Replaces any earlier shaping."""
        for ns, dev in ((self.a, self.dev_a), (self.b, self.dev_b)):
            tc = ["tc", "qdisc", "replace", "dev", dev, "root"]
            if delay is not None:
                args = [*tc, "netem", "delay", delay] + (["rate", rate] if rate else [])
            elif rate is not None:
                args = [*tc, "tbf", "rate", rate, "burst", burst, "latency", "100ms"]
            else:
                args = ["tc", "qdisc", "del", "dev", dev, "root"]
            r = self.run(ns, args)
            if r.returncode != 0:
                if "Specified qdisc kind is unknown" in r.stderr:
                    raise ShapingUnavailable(f"{args[6]} is not available in this kernel")
                if rate is None and delay is None:
                    continue  # nothing to delete
                raise RuntimeError(f"{' '.join(args)} failed: {r.stderr.strip()}")


def require_two_hosts() -> None:
    """Skip unless network namespaces can be made here (root, ``ip``, ``tc``)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            pytest.skip(f"the {tool} command (iproute2) is needed for network namespaces")
    probe = f"{_PREFIX}-{os.getpid()}-probe-a"
    r = _ip("netns", "add", probe, check=False)
    _ip("netns", "del", probe, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {r.stderr.strip()}")


@contextlib.contextmanager
def two_hosts() -> Iterator[TwoHosts]:
    """A fresh :class:`TwoHosts`, removed afterwards (also on failure)."""
    require_two_hosts()
    with TwoHosts() as hosts:
        yield hosts


@pytest.fixture
def hosts() -> Iterator[TwoHosts]:
    """Two namespaced hosts for one test."""
    with two_hosts() as h:
        yield h


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The next line ``proc`` prints (its stdout a pipe), or ``AssertionError`` after
    ``timeout`` seconds."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        if not ready:
            raise AssertionError(f"no line within {timeout} s (got {line!r})")
        ch = os.read(fd, 1)
        if not ch:
            raise AssertionError(f"the process exited ({proc.poll()}) after {line!r}")
        line += ch
    return line.decode().rstrip("\n")
