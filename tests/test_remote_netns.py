"""The page server between two namespaced hosts (tests/netns.py): a pager on host B over a
server on host A through a shaped veth link, and a link dropped in the middle of a read."""

from __future__ import annotations

import hashlib
import random
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netns import TwoHosts, read_line, two_hosts
from remote_helpers import write_secret

pytestmark = pytest.mark.timeout(120)

SIZE = (24 << 20) + 1234


@pytest.fixture(scope="module")
def blob(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    data = random.Random(41).randbytes(SIZE)
    path = tmp_path_factory.mktemp("netns") / "mem.bin"
    path.write_bytes(data)
    return path, data


class Remote:
    """`userfault serve` running on host A."""

    def __init__(self, hosts: TwoHosts, tmp: Path, path: Path) -> None:
        self.secret = write_secret(tmp / "secret")
        self.err = tmp / "serve.err"
        with open(self.err, "wb") as err:
            self.proc = hosts.popen(hosts.a, [
                sys.executable, "-m", "userfault", "serve", "--listen",
                f"tcp://{hosts.address_a}:0", "--secret-file", str(self.secret),
                f"mem={path}"], stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        while not (line := read_line(self.proc, 20)).startswith("listening on "):
            pass
        self.port = int(line.rsplit(":", 1)[1])
        self.url = f"uf://{hosts.address_a}:{self.port}/mem"


@pytest.fixture
def remote(hosts: TwoHosts, tmp_path: Path, blob: tuple[Path, bytes]) -> Iterator[Remote]:
    yield Remote(hosts, tmp_path, blob[0])


def on_b(hosts: TwoHosts, code: str, **kw: object) -> subprocess.Popen[bytes]:
    return hosts.popen(hosts.b, [sys.executable, "-c", textwrap.dedent(code)],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       **kw)


def finish(proc: subprocess.Popen[bytes], timeout: float = 60) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    return out.decode(), err.decode()


def test_two_hosts_talk_only_to_each_other_and_are_removed_even_on_failure() -> None:
    names: list[str] = []
    with pytest.raises(RuntimeError, match="a failing test"), two_hosts() as hosts:
        names += [hosts.a, hosts.b]
        listener = hosts.popen(hosts.a, [sys.executable, "-c", textwrap.dedent(f"""
            import socket
            s = socket.create_server(({hosts.address_a!r}, 7777))
            print("listening", flush=True)
            c, peer = s.accept()
            c.sendall(peer[0].encode())
        """)], stdout=subprocess.PIPE)
        assert read_line(listener, 20) == "listening"
        r = hosts.run(hosts.b, [sys.executable, "-c", textwrap.dedent(f"""
            import socket
            print(socket.create_connection(({hosts.address_a!r}, 7777), 5).recv(100).decode())
        """)])
        assert r.stdout.strip() == hosts.address_b, r.stderr  # B reached A, from B's address
        hosts.link_down()
        r = hosts.run(hosts.b, [sys.executable, "-c", textwrap.dedent(f"""
            import socket
            socket.create_connection(({hosts.address_a!r}, 7777), 1)
        """)])
        assert r.returncode != 0  # no link, no connection
        hosts.link_up()
        raise RuntimeError("a failing test")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            timeout=30).stdout
    assert not any(n in listed for n in names)


def test_pager_on_host_b_over_a_server_on_host_a(hosts: TwoHosts, remote: Remote,
                                                 blob: tuple[Path, bytes]) -> None:
    _, data = blob
    hosts.shape(rate="400mbit")
    proc = on_b(hosts, f"""
        import hashlib, random, userfault
        from userfault.remote import PageServerSource
        src = PageServerSource({remote.url!r}, secret_file={str(remote.secret)!r})
        with userfault.map(src) as mem, memoryview(mem) as v:
            rng = random.Random(3)
            picks = bytes(v[rng.randrange({SIZE})] for _ in range(300))
            print(picks.hex())
            print(hashlib.sha256(v[:{SIZE}]).hexdigest())
    """)
    out, err = finish(proc)
    assert proc.returncode == 0, err
    picks, digest = out.split()
    rng = random.Random(3)
    assert picks == bytes(data[rng.randrange(SIZE)] for _ in range(300)).hex()
    assert digest == hashlib.sha256(data).hexdigest()
    # The server is on host A only: from this (the root) namespace it is not reachable.
    with pytest.raises(OSError), socket.create_connection((hosts.address_a, remote.port), 2):
        pass
    assert "authenticated" in remote.err.read_text()


_READER = """
    import hashlib, logging, sys
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from userfault.remote import PageServerSource
    src = PageServerSource({url!r}, secret_file={secret!r}, timeout={timeout},
                           reconnect_timeout=30)
    buf = bytearray({size})
    print("start", flush=True)
    src.read_many([(0, memoryview(buf))])
    print("done", hashlib.sha256(buf).hexdigest(), flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("timeout", [30.0, 1.5], ids=["tcp-rides-it-out", "reconnect"])
def test_link_dropped_mid_read_recovers_with_exact_bytes(hosts: TwoHosts, remote: Remote,
                                                         blob: tuple[Path, bytes],
                                                         timeout: float) -> None:
    """80 Mbit/s: the 24 MiB read takes about 2.5 s. The link goes down 0.5 s in, for 4 s.
    With a 30 s socket timeout TCP retransmits across the outage; with 1.5 s the client
    declares the connection dead, reconnects with backoff once the link is back, and asks
    again. Either way the bytes are exact."""
    _, data = blob
    hosts.shape(rate="80mbit")
    proc = on_b(hosts, _READER.format(url=remote.url, secret=str(remote.secret),
                                      timeout=timeout, size=SIZE))
    assert read_line(proc, 20) == "start"
    time.sleep(0.5)
    assert proc.stdout is not None
    assert not select.select([proc.stdout], [], [], 0)[0], "the read finished too early"
    hosts.link_down()
    time.sleep(4.0)
    hosts.link_up()
    out, err = finish(proc, 90)
    assert proc.returncode == 0, err
    assert out.strip() == f"done {hashlib.sha256(data).hexdigest()}"
    if timeout < 4:
        assert "reconnecting" in err  # the dead connection was replaced


def test_link_down_for_good_poisons_never_zeros(hosts: TwoHosts, remote: Remote,
                                                blob: tuple[Path, bytes]) -> None:
    _, data = blob
    far = 20 << 20
    proc = on_b(hosts, f"""
        import sys, userfault
        from userfault.remote import PageServerSource
        src = PageServerSource({remote.url!r}, secret_file={str(remote.secret)!r}, timeout=1,
                               reconnect_timeout=2)
        pager = userfault.Pager(src, readahead=False, retries=1)
        view = memoryview(pager)
        print("ready", view[0], flush=True)
        sys.stdin.readline()
        print("read", view[{far}], flush=True)
    """)
    assert read_line(proc, 30) == f"ready {data[0]}"
    hosts.link_down()
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    out, err = finish(proc, 60)
    assert proc.returncode == -signal.SIGBUS, err
    assert "read" not in out
    assert f"(offset {far:#x} of PageServerSource" in err
    assert "gave up after 2 s of reconnecting" in err
    assert "poisoned" in err
