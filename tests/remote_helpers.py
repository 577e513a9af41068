"""Helpers of the page-server tests: secrets, real servers (a `userfault serve` subprocess or
a PageServer on a thread), throwaway TLS material and raw sockets for hostile clients."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from userfault.remote import PageServer
from userfault.remote.protocol import HELLO

SECRET = b"test-secret-0123456789-abcdefgh"
OTHER_SECRET = b"another-secret-9876543210-zyxwv"


def write_secret(path: Path, secret: bytes = SECRET) -> Path:
    """Write ``secret`` (plus a newline) to ``path``, mode 0600."""
    path.write_bytes(secret + b"\n")
    path.chmod(0o600)
    return path


class ServeProcess:
    """``python -m userfault serve`` in a subprocess; stdout parsed for the bound address."""

    def __init__(self, tmp: Path, exports: list[str], *extra: str,
                 listen: str = "tcp://127.0.0.1:0", name: str = "serve") -> None:
        self.secret_file = write_secret(tmp / f"{name}.secret")
        self.err_path = tmp / f"{name}.err"
        self._err = open(self.err_path, "wb")  # noqa: SIM115 - closed in kill()
        cmd = [sys.executable, "-m", "userfault", "serve", "--listen", listen,
               "--secret-file", str(self.secret_file), *extra, *exports]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._err)
        self.lines: list[str] = []
        try:
            self.address = self._wait_line("listening on ").split("listening on ", 1)[1]
            self.address = self.address.split(" ")[0]
        except BaseException:
            self.kill()
            raise

    def _wait_line(self, text: str, timeout: float = 20.0) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buf = b""
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self.lines.append(line.decode())
                if text in self.lines[-1]:
                    return self.lines[-1]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"serve never printed {text!r}; stderr:\n{self.stderr()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"serve exited {self.proc.wait(5)}: {self.stderr()}")
                buf += chunk

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def url(self, name: str, scheme: str = "uf") -> str:
        if self.address.startswith("unix:"):
            return f"uf+unix://{self.address[len('unix:'):]}/{name}"
        return f"{scheme}://{self.address[len('tcp://'):]}/{name}"

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_stderr(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in (err := self.stderr()):
            assert time.monotonic() < deadline, f"{text!r} never logged; stderr:\n{err}"
            time.sleep(0.01)
        return err

    def stop(self) -> int:
        """SIGTERM, then wait; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"serve ignored SIGTERM: {self.stderr()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()


@contextlib.contextmanager
def serve_process(tmp: Path, exports: list[str], *extra: str, **kw: Any
                  ) -> Iterator[ServeProcess]:
    srv = ServeProcess(tmp, exports, *extra, **kw)
    try:
        yield srv
    finally:
        srv.kill()


@contextlib.contextmanager
def thread_server(server: PageServer, listen: str = "tcp://127.0.0.1:0"
                  ) -> Iterator[tuple[PageServer, str]]:
    """Run ``server`` on a thread; yield it and its ``HOST:PORT`` (or ``unix:PATH``)."""
    (ep,) = server.start_in_thread(listen)
    try:
        yield server, (f"{ep.host}:{ep.port}" if ep.kind == "tcp" else str(ep))
    finally:
        server.close()


def connect_raw(port: int, host: str = "127.0.0.1", source: str | None = None,
                timeout: float = 10.0) -> socket.socket:
    """A plain TCP socket to the server (optionally from another loopback address)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    if source is not None:
        s.bind((source, 0))
    s.connect((host, port))
    return s


def recv_until_closed(sock: socket.socket, limit: int = 1 << 20, timeout: float = 20.0) -> bytes:
    """Everything the peer sends until it closes (bounded in bytes and time)."""
    out = b""
    deadline = time.monotonic() + timeout
    while len(out) < limit:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"the server kept the connection open ({len(out)} bytes "
                                 "received)") from None
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out


def recv_hello(sock: socket.socket) -> bytes:
    out = b""
    while len(out) < HELLO.size:
        chunk = sock.recv(HELLO.size - len(out))
        assert chunk, "closed before the HELLO"
        out += chunk
    return out


# -- TLS material ----------------------------------------------------------------------------


def make_tls(directory: Path, ips: tuple[str, ...] = ("127.0.0.1",)) -> dict[str, Path]:
    """A throwaway CA and a server certificate for ``ips`` signed by it (openssl CLI);
    also a second, unrelated CA. Returns paths: ca, cert, key, other_ca."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    p = {k: directory / f"{k}.pem" for k in ("ca", "ca_key", "cert", "key", "csr",
                                              "other_ca", "other_key")}
    ext = directory / "ext.cnf"
    san = ",".join(f"IP:{ip}" for ip in ips) + ",DNS:localhost"
    ext.write_text(f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\n"
                   "authorityKeyIdentifier=keyid,issuer\n")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca, key, cn in (("ca", "ca_key", "userfault test CA"),
                        ("other_ca", "other_key", "some other CA")):
        run("req", "-x509", *ec, "-keyout", str(p[key]), "-out", str(p[ca]), "-days", "2",
            "-subj", f"/CN={cn}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", "subjectKeyIdentifier=hash")
    run("req", *ec, "-keyout", str(p["key"]), "-out", str(p["csr"]),
        "-subj", "/CN=userfault test server")
    run("x509", "-req", "-in", str(p["csr"]), "-CA", str(p["ca"]), "-CAkey", str(p["ca_key"]),
        "-CAcreateserial", "-out", str(p["cert"]), "-days", "2", "-extfile", str(ext))
    return p
