"""Real servers for tests and benchmarks: nginx, redis-server and Redis Cluster (3 masters,
with or without replicas).

Everything listens on 127.0.0.1 on free ports, lives in a private directory and is stopped by
:meth:`stop`. Every wait is bounded. No mocks: these are the distribution binaries.

Used by ``tests/server_fixtures.py`` (pytest fixtures) and ``benchmarks/bench_sources.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "BinaryMissing",
    "NginxServer",
    "RedisCluster",
    "RedisServer",
    "find_binary",
    "free_port",
    "in_ci",
]

HOST = "127.0.0.1"


class BinaryMissing(RuntimeError):
    """A server binary is not installed."""


def in_ci() -> bool:
    """True when running under CI (env CI=true/1): missing binaries must fail, not skip."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def find_binary(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise BinaryMissing(
            f"{name} is not installed (run .ci/install-deps as root, or "
            f"apt-get install nginx redis-server redis-tools)"
        )
    return path


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(also_plus: int = 0) -> int:
    """A port free on 127.0.0.1 right now (and ``port + also_plus`` too when nonzero)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if also_plus and (port + also_plus > 65535 or not _port_free(port + also_plus)):
            continue
        return port
    raise RuntimeError("no free port pair found on 127.0.0.1")


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, what: str,
               log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            detail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with status {proc.returncode} at start: {detail}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"{what} did not listen on {HOST}:{port} within {timeout} s")


def _terminate(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
               timeout: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout)


class NginxServer:
    """A real nginx serving ``directory`` at ``base_url`` (HTTP/1.1, keep-alive, ranges).

    Locations:
      * ``/<name>``          the file, with byte ranges (``Accept-Ranges: bytes``);
      * ``/norange/<name>``  the same file with ``max_ranges 0`` (Range ignored: 200 + full body);
      * ``/onerange/<name>`` with ``max_ranges 1`` (a multi-range GET gets 200 + full body);
      * ``/slow/<name>``     sent at 512 KB/s per connection after a 1 s burst (``limit_rate``);
      * ``/noetag/<name>``   without an ``ETag`` (``Last-Modified`` is the only validator).

    The access log (``access_log``) has one line per request:
    ``<$connection> <$connection_requests> <$status> <$request_uri> <$http_range>``.
    With one worker, ``$connection`` numbers the TCP connections, so tests count connections.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None, *,
                 workdir: str | os.PathLike[str] | None = None, tls: bool = False) -> None:
        self.binary = find_binary("nginx")
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="uf-nginx-"))
        self.directory = Path(directory) if directory else self.workdir / "www"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.access_log = self.workdir / "access.log"
        self.error_log = self.workdir / "error.log"
        self.cert: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        if tls:
            self._make_cert()

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def tls_base_url(self) -> str:
        assert self.tls_port is not None, "server started without tls=True"
        return f"https://{HOST}:{self.tls_port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name.lstrip('/')}"

    def _make_cert(self) -> None:
        openssl = find_binary("openssl")
        self.cert = self.workdir / "cert.pem"
        key = self.workdir / "key.pem"
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
             "-out", str(self.cert), "-days", "2", "-subj", f"/CN={HOST}",
             "-addext", f"subjectAltName=IP:{HOST}"],
            check=True, capture_output=True, timeout=60,
        )

    def _config(self) -> str:
        d = self.workdir
        user = "user root;" if os.geteuid() == 0 else ""
        tls = ""
        if self.tls_port is not None:
            tls = f"""
    server {{
        listen {HOST}:{self.tls_port} ssl;
        ssl_certificate {self.cert};
        ssl_certificate_key {d}/key.pem;
        root {self.directory};
        location / {{ }}
    }}"""
        return f"""
{user}
worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format uf '$connection $connection_requests $status $request_uri "$http_range"';
    access_log {self.access_log} uf;
    client_body_temp_path {d}/tmp_body;
    proxy_temp_path {d}/tmp_proxy;
    fastcgi_temp_path {d}/tmp_fastcgi;
    uwsgi_temp_path {d}/tmp_uwsgi;
    scgi_temp_path {d}/tmp_scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 1000000;
    server {{
        listen {HOST}:{self.port};
        root {self.directory};
        location / {{ }}
        location /norange/ {{
            alias {self.directory}/;
            max_ranges 0;
        }}
        location /onerange/ {{
            alias {self.directory}/;
            max_ranges 1;
        }}
        location /slow/ {{
            alias {self.directory}/;
            limit_rate 512k;
        }}
        location /noetag/ {{
            alias {self.directory}/;
            etag off;
        }}
    }}{tls}
}}
"""

    def start(self, timeout: float = 10.0) -> NginxServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        conf = self.workdir / "nginx.conf"
        conf.write_text(self._config())
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.workdir), "-e", str(self.error_log), "-c", str(conf)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            _wait_port(self.port, self.proc, timeout, "nginx", self.error_log)
            if self.tls_port is not None:
                _wait_port(self.tls_port, self.proc, timeout, "nginx (tls)", self.error_log)
        except BaseException:
            _terminate(self.proc, signal.SIGKILL)
            raise
        return self

    def stop(self) -> None:
        """Fast shutdown (SIGTERM): open connections are dropped."""
        _terminate(self.proc)
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_size(self) -> int:
        return self.access_log.stat().st_size if self.access_log.exists() else 0

    def log_entries(self, since: int = 0, *, expect: int = 0, uri: str | None = None,
                    timeout: float = 5.0) -> list[tuple[int, int, int, str, str]]:
        """Access-log entries written after byte ``since``: (conn, conn_requests, status, uri,
        range), only those for ``uri`` when it is given.

        nginx writes an entry after it sent the response, so the client may see the bytes
        first: wait (bounded) until ``expect`` entries (for ``uri``) exist. An entry of an
        earlier request can still land after ``since``: a test that counts entries gives its
        requests a ``uri`` of its own (a query string will do) and filters by it."""
        deadline = time.monotonic() + timeout
        while True:
            with open(self.access_log, "rb") as f:
                f.seek(since)
                lines = f.read().decode().splitlines()
            out = []
            for line in lines:
                conn, reqs, status, u, rng = line.split(" ", 4)
                if uri is None or u == uri:
                    out.append((int(conn), int(reqs), int(status), u, rng.strip('"')))
            if len(out) >= expect or time.monotonic() > deadline:
                return out
            time.sleep(0.02)

    def __enter__(self) -> NginxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisServer:
    """A real redis-server on a free port, no persistence (``--save "" --appendonly no``)."""

    def __init__(self, workdir: str | os.PathLike[str] | None = None, *, port: int | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.binary = find_binary("redis-server")
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="uf-redis-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.log = self.workdir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", HOST, "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no",
             "--protected-mode", "no", "--logfile", str(self.log), *self.extra_args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            _wait_port(self.port, self.proc, timeout, "redis-server", self.log)
            self._wait_ping(timeout)
        except BaseException:
            _terminate(self.proc, signal.SIGKILL)
            raise
        return self

    def _wait_ping(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.create_connection((HOST, self.port), timeout=1.0) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise TimeoutError(f"redis-server on port {self.port} did not answer PING")

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as on a crash."""
        _terminate(self.proc, signal.SIGKILL)
        self.proc = None

    def stop(self) -> None:
        _terminate(self.proc)
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def paused(node: RedisServer) -> Iterator[None]:
    """The node stopped (SIGSTOP) inside the block, resumed after it, whatever happens: a
    server that keeps its connections and answers nothing."""
    assert node.proc is not None
    os.kill(node.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(node.proc.pid, signal.SIGCONT)


class RedisCluster:
    """Redis Cluster: ``masters`` redis-server masters with ``cluster-enabled yes``, each with
    ``replicas`` replicas, joined by ``redis-cli --cluster create ... --cluster-replicas
    <replicas> --cluster-yes``. :meth:`start` returns once the cluster state is ok on every
    node and every replica's link to its master is up (fully synced)."""

    def __init__(self, workdir: str | os.PathLike[str] | None = None, masters: int = 3,
                 replicas: int = 0) -> None:
        self.cli = find_binary("redis-cli")
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="uf-rcluster-"))
        self.nodes: list[RedisServer] = []
        self.masters = masters
        self.replicas = replicas

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, n.port) for n in self.nodes]

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.nodes[0].port}/0"  # any node: clients discover the rest

    def cli_run(self, port: int, *args: str, timeout: float = 10.0) -> str:
        """``redis-cli -p port args...`` on one node (no redirects followed): its output."""
        res = subprocess.run([self.cli, "-h", HOST, "-p", str(port), *args],
                             capture_output=True, timeout=timeout, check=True)
        return res.stdout.decode(errors="replace")

    def _roles(self) -> dict[int, int | None]:
        """port -> the port of its master (``None`` for a master), from CLUSTER NODES of the
        first running node (a node stopped with SIGSTOP counts as running: ask before)."""
        live = next(n for n in self.nodes if n.proc is not None and n.proc.poll() is None)
        ids: dict[str, int] = {}
        masters: dict[int, str] = {}
        for line in self.cli_run(live.port, "cluster", "nodes").splitlines():
            fields = line.split()
            node_id, addr, flags, master = fields[0], fields[1], fields[2], fields[3]
            port = int(addr.split("@")[0].rpartition(":")[2])
            ids[node_id] = port
            masters[port] = "" if "master" in flags.split(",") else master
        return {port: (ids[m] if m else None) for port, m in masters.items()}

    def primaries(self) -> list[RedisServer]:
        """The masters (as the cluster sees them now)."""
        roles = self._roles()
        return [n for n in self.nodes if roles.get(n.port, 0) is None]

    def replicas_of(self, master: RedisServer | int) -> list[RedisServer]:
        """The replicas of ``master`` (a node or its port)."""
        port = master if isinstance(master, int) else master.port
        roles = self._roles()
        return [n for n in self.nodes if roles.get(n.port) == port]

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def node_id(self, port: int) -> str:
        return self.cli_run(port, "cluster", "myid").strip()

    def move_slot(self, slot: int, to: int, *, finish: bool = True) -> None:
        """Migrate hash slot ``slot`` with its keys to the master on port ``to`` (IMPORTING,
        MIGRATING, MIGRATE, then SETSLOT NODE on every master), as a resharding does.
        ``finish=False`` stops before SETSLOT NODE: the keys have moved, the slot is still
        the old owner's, which answers ASK for them (a resharding in progress)."""
        owner = next(int(line.split()[1].rpartition(":")[2].split("@")[0])
                     for line in self.cli_run(to, "cluster", "nodes").splitlines()
                     if "master" in line.split()[2] and _owns(line.split()[8:], slot))
        if owner == to:
            return
        dst, src = self.node_id(to), self.node_id(owner)
        def ok(port: int, *args: str) -> None:
            out = self.cli_run(port, *args).strip()
            if out != "OK":
                raise RuntimeError(f"redis-cli -p {port} {' '.join(args[:4])}...: {out[:200]}")

        ok(to, "cluster", "setslot", str(slot), "importing", src)
        ok(owner, "cluster", "setslot", str(slot), "migrating", dst)
        for _ in range(100_000):
            keys = self.cli_run(owner, "cluster", "getkeysinslot", str(slot), "100").split()
            if not keys:
                break
            ok(owner, "migrate", HOST, str(to), "", "0", "5000", "keys", *keys)
        if not finish:
            return
        for m in self.primaries():
            ok(m.port, "cluster", "setslot", str(slot), "node", dst)

    def start(self, timeout: float = 30.0) -> RedisCluster:
        used: set[int] = set()
        for _ in range(self.masters * (1 + self.replicas)):
            while True:
                port = free_port(also_plus=10000)  # the cluster bus listens on port + 10000
                if port not in used:
                    break
            used.add(port)
            d = self.workdir / str(port)
            d.mkdir(parents=True, exist_ok=True)
            node = RedisServer(d, port=port, extra_args=[
                "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                "--cluster-node-timeout", "3000",
                # a replica's first full sync starts at once, not 5 s later (the default)
                "--repl-diskless-sync-delay", "0"])
            self.nodes.append(node)
            node.start()
        cmd = [self.cli, "--cluster", "create", *(f"{HOST}:{n.port}" for n in self.nodes),
               "--cluster-replicas", str(self.replicas), "--cluster-yes"]
        res = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        if res.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed: {res.stdout[-2000:]!r} "
                               f"{res.stderr[-2000:]!r}")
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait (bounded) until every live node says cluster_state:ok and every replica's
        master link is up; raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
            if all(self._state_ok(n.port) for n in live) and all(
                    self._synced(r.port) for m in self.primaries() for r in self.replicas_of(m)
                    if r in live) and sum(len(self.replicas_of(m)) for m in self.primaries()
                                          ) == self.masters * self.replicas:
                return
            time.sleep(0.1)
        raise TimeoutError(f"Redis Cluster did not reach cluster_state:ok with every replica "
                           f"synced within {timeout} s")

    def _state_ok(self, port: int) -> bool:
        res = subprocess.run([self.cli, "-h", HOST, "-p", str(port), "cluster", "info"],
                             capture_output=True, timeout=10, check=False)
        return b"cluster_state:ok" in res.stdout

    def _synced(self, port: int) -> bool:
        info = self.cli_run(port, "info", "replication")
        return "master_link_status:up" in info and "master_sync_in_progress:0" in info

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def close(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _owns(ranges: list[str], slot: int) -> bool:
    """Whether CLUSTER NODES slot fields (``"0-5460"``, ``"7"``, ``"[..]"``) hold ``slot``."""
    for r in ranges:
        if r.startswith("["):
            continue  # a slot being migrated or imported
        lo, _, hi = r.partition("-")
        if int(lo) <= slot <= int(hi or lo):
            return True
    return False
