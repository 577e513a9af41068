"""Remote memory: an authenticated page server and its client source.

* :class:`PageServer` (``userfault serve``) exports files, compressed snapshots, live buffers
  of a running process and any page source over TCP (optionally TLS) or a Unix socket, to
  clients that prove they hold a shared secret (HMAC-SHA256 challenge-response, both ways).
* :class:`PageServerSource` reads an export (``uf://HOST:PORT/NAME``) wherever a page source is
  used: ``userfault.map``, the Firecracker pager, your own code.

The wire protocol is documented in :mod:`userfault.remote.protocol`; the how-to is
``docs/remote.md``.
"""

from __future__ import annotations

from .address import Endpoint, ExportURL, parse_listen, parse_url
from .auth import MIN_SECRET, load_secret
from .errors import AuthenticationError, RemoteError
from .exports import BufferExport, Export, FileExport, SourceExport, open_export
from .protocol import VERSION, ErrorCode, ExportInfo, ProtocolError
from .ratelimit import RateLimit
from .server import PageServer, ServerLimits, tls_server_context
from .source import ENV_SECRET_FILE, ENV_TLS_CA, PageServerSource, list_exports

__all__ = [
    "ENV_SECRET_FILE",
    "ENV_TLS_CA",
    "MIN_SECRET",
    "VERSION",
    "AuthenticationError",
    "BufferExport",
    "Endpoint",
    "ErrorCode",
    "Export",
    "ExportInfo",
    "ExportURL",
    "FileExport",
    "PageServer",
    "PageServerSource",
    "ProtocolError",
    "RateLimit",
    "RemoteError",
    "ServerLimits",
    "SourceExport",
    "list_exports",
    "load_secret",
    "open_export",
    "parse_listen",
    "parse_url",
    "tls_server_context",
]
