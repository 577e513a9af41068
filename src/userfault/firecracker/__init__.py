"""Firecracker snapshot support: the UFFD handshake protocol and a turnkey pager.

Firecracker restores a snapshot with guest memory served by an external page-fault handler:
the VMM connects to a Unix socket, sends the userfaultfd and a JSON list of guest regions,
then faults on guest memory until the handler installs the pages from the snapshot file.
"""

from __future__ import annotations

from .protocol import (
    MAX_MESSAGE_BYTES,
    MAX_REGIONS,
    SUPPORTED_PAGE_SIZES,
    FirecrackerProtocolError,
    GuestRegion,
    PeerCred,
    parse_mappings,
    receive_handshake,
)
from .report import VMReport
from .server import FirecrackerPager, serve

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_REGIONS",
    "SUPPORTED_PAGE_SIZES",
    "FirecrackerPager",
    "FirecrackerProtocolError",
    "GuestRegion",
    "PeerCred",
    "VMReport",
    "parse_mappings",
    "receive_handshake",
    "serve",
]
