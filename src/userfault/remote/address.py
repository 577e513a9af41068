"""Where a page server listens (``tcp://HOST:PORT``, ``unix:PATH``) and how clients name an
export (``uf://``, ``ufs://``, ``uf+unix://`` URLs).

Client URLs::

    uf://HOST:PORT/NAME                 TCP
    ufs://HOST:PORT/NAME                TCP + TLS (the server's certificate is verified)
    uf+unix:///path/to/socket/NAME      a Unix socket: the last path segment is the export
                                        name (names have no '/'), the rest is the socket path

An IPv6 host goes in brackets (``uf://[::1]:7000/mem``). Two query parameters are accepted,
for callers that can only pass a string (``userfault.map("uf://...")``, ``--mem-file``):
``secret_file=PATH`` and ``tls_ca=PATH`` (``ufs://`` only). The secret itself never goes in a
URL.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Literal

from .protocol import check_export_name

__all__ = ["URL_SCHEMES", "Endpoint", "ExportURL", "parse_listen", "parse_url"]

URL_SCHEMES = ("uf", "ufs", "uf+unix")
_QUERY_KEYS = ("secret_file", "tls_ca")


@dataclass(frozen=True)
class Endpoint:
    """A TCP host and port, or a Unix socket path."""

    kind: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def _host_port(netloc: str, what: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(f"//{netloc}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{what}: the port is not a number from 0 to 65535") from None
    if not parts.hostname or port is None or parts.username is not None:
        raise ValueError(f"{what}: give HOST:PORT (an IPv6 host in brackets)")
    return parts.hostname, port


def parse_listen(spec: str) -> Endpoint:
    """Parse ``tcp://HOST:PORT`` (port 0 picks a free one) or ``unix:PATH``."""
    what = f"listen address {spec!r}"
    if spec.startswith("unix:"):
        path = spec[len("unix:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path or "\0" in path:
            raise ValueError(f"{what}: give unix:PATH")
        return Endpoint("unix", path=path)
    if spec.startswith("tcp://"):
        rest = spec[len("tcp://"):]
        if "/" in rest or "?" in rest:
            raise ValueError(f"{what}: tcp://HOST:PORT takes no path")
        host, port = _host_port(rest, what)
        return Endpoint("tcp", host=host, port=port)
    raise ValueError(f"{what}: use tcp://HOST:PORT or unix:PATH")


@dataclass(frozen=True)
class ExportURL:
    """A parsed client URL: where the server is, which export, TLS, and the URL's options."""

    endpoint: Endpoint
    export: str
    tls: bool
    secret_file: str | None = None
    tls_ca: str | None = None

    def __str__(self) -> str:
        """The URL without its query (safe to log)."""
        if self.endpoint.kind == "unix":
            return f"uf+unix://{self.endpoint.path}/{self.export}"
        scheme = "ufs" if self.tls else "uf"
        return f"{scheme}://{str(self.endpoint)[len('tcp://'):]}/{self.export}"


def parse_url(url: str) -> ExportURL:
    """Parse a ``uf://``, ``ufs://`` or ``uf+unix://`` URL (see the module docstring)."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    what = f"page server URL {url.partition('?')[0]!r}"
    if scheme not in URL_SCHEMES:
        raise ValueError(f"{what}: the scheme must be uf://, ufs:// or uf+unix://")
    if parts.fragment:
        raise ValueError(f"{what}: a URL fragment ('#...') is not used")
    options: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True,
                                             strict_parsing=bool(parts.query)):
        if key not in _QUERY_KEYS:
            raise ValueError(f"{what}: unknown query parameter {key!r} (accepted: "
                             f"{', '.join(_QUERY_KEYS)})")
        if key in options or not value:
            raise ValueError(f"{what}: query parameter {key!r} is repeated or empty")
        options[key] = value
    path = urllib.parse.unquote(parts.path)
    if scheme == "uf+unix":
        if parts.netloc:
            raise ValueError(f"{what}: write uf+unix:///path/to/socket/NAME (three slashes)")
        sock, _, name = path.rpartition("/")
        if not sock:
            raise ValueError(f"{what}: give the socket path, then /NAME")
        endpoint = Endpoint("unix", path=sock)
    else:
        host, port = _host_port(parts.netloc, what)
        if port == 0:
            raise ValueError(f"{what}: port 0 is not a server's port")
        if not path.startswith("/") or "/" in path[1:]:
            raise ValueError(f"{what}: give exactly one export name after the port (/NAME)")
        name = path[1:]
        endpoint = Endpoint("tcp", host=host, port=port)
    try:
        check_export_name(name)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None
    tls = scheme == "ufs"
    if "tls_ca" in options and not tls:
        raise ValueError(f"{what}: tls_ca is for TLS; use ufs:// to connect with TLS")
    return ExportURL(endpoint, name, tls, options.get("secret_file"), options.get("tls_ca"))
