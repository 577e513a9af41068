"""pytest plugin: session-scoped real servers (nginx, redis-server, Redis Cluster).

Register it in ``tests/conftest.py`` with one line::

    pytest_plugins = ["server_fixtures"]

(``tests/`` is on ``sys.path`` while pytest imports ``tests/conftest.py``), or on the command
line with ``python -m pytest -p tests.server_fixtures``.

A missing binary skips the test with the reason, except under CI (env ``CI=true``), where it
fails: CI must not skip silently.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)

import servers  # noqa: E402

__all__ = ["fresh_servers", "nginx_server", "redis_cluster", "redis_cluster_replicas",
           "redis_server", "require_servers"]

T = TypeVar("T")


def require_servers(factory: Callable[[], T]) -> T:
    """Build and start a server; skip (or fail under CI) when its binary is missing."""
    try:
        return factory()
    except servers.BinaryMissing as err:
        if servers.in_ci():
            pytest.fail(f"CI=true and a server binary is missing: {err}", pytrace=False)
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def nginx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.NginxServer]:
    """A real nginx on 127.0.0.1: ``.base_url``, ``.directory`` (served), ``.access_log``.

    Put files in ``.directory`` and fetch ``.url(name)``; ``/norange/<name>`` ignores Range.
    The server also listens with TLS (self-signed, ``.cert``) at ``.tls_base_url`` when
    openssl is available.
    """
    work = tmp_path_factory.mktemp("nginx")

    def make() -> servers.NginxServer:
        try:
            servers.find_binary("openssl")
            tls = True
        except servers.BinaryMissing:
            tls = False
        return servers.NginxServer(work / "www", workdir=work, tls=tls).start()

    srv = require_servers(make)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.RedisServer]:
    """A real redis-server on 127.0.0.1 (``.url``, ``.port``), no persistence."""
    work = tmp_path_factory.mktemp("redis")
    srv = require_servers(lambda: servers.RedisServer(work).start())
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.RedisCluster]:
    """Three real redis-server masters joined into a cluster (``.startup_nodes``, ``.url``)."""
    work = tmp_path_factory.mktemp("rcluster")
    cluster = require_servers(lambda: servers.RedisCluster(work).start())
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster_replicas(tmp_path_factory: pytest.TempPathFactory
                           ) -> Iterator[servers.RedisCluster]:
    """Three real masters with one replica each, every replica synced (``.primaries()``,
    ``.replicas_of(master)``). Tests that stop or kill a node use ``fresh_servers.cluster``."""
    work = tmp_path_factory.mktemp("rcluster-replicas")
    cluster = require_servers(lambda: servers.RedisCluster(work, replicas=1).start())
    yield cluster
    cluster.stop()


class FreshServers:
    """Private servers for one test (tests that stop, kill or restart them); closed after it."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp = tmp_path
        self._started: list[servers.NginxServer | servers.RedisServer | servers.RedisCluster] = []

    def nginx(self, **kwargs: Any) -> servers.NginxServer:
        d = self._tmp / f"nginx{len(self._started)}"
        srv = require_servers(lambda: servers.NginxServer(workdir=d, **kwargs).start())
        self._started.append(srv)
        return srv

    def redis(self) -> servers.RedisServer:
        d = self._tmp / f"redis{len(self._started)}"
        srv = require_servers(lambda: servers.RedisServer(d).start())
        self._started.append(srv)
        return srv

    def cluster(self, replicas: int = 0) -> servers.RedisCluster:
        d = self._tmp / f"cluster{len(self._started)}"
        srv = require_servers(lambda: servers.RedisCluster(d, replicas=replicas).start())
        self._started.append(srv)
        return srv

    def close(self) -> None:
        for srv in reversed(self._started):
            srv.stop()


@pytest.fixture
def fresh_servers(tmp_path: Path) -> Iterator[FreshServers]:
    """A factory of private servers: ``fresh_servers.nginx()``, ``.redis()``,
    ``.cluster(replicas=0)``."""
    factory = FreshServers(tmp_path)
    yield factory
    factory.close()


def pytest_report_header(config: Any) -> str:
    found = []
    for name in ("nginx", "redis-server", "redis-cli"):
        try:
            found.append(f"{name}={servers.find_binary(name)}")
        except servers.BinaryMissing:
            found.append(f"{name}=MISSING")
    return "servers: " + ", ".join(found) + (" (CI: missing binaries fail)" if servers.in_ci()
                                            else "")
