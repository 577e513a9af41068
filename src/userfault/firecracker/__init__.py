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
from .working_set import WORKING_SET_MAGIC, coalesce, read_working_set, write_working_set

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_REGIONS",
    "SUPPORTED_PAGE_SIZES",
    "WORKING_SET_MAGIC",
    "FirecrackerPager",
    "FirecrackerProtocolError",
    "GuestRegion",
    "PeerCred",
    "VMReport",
    "coalesce",
    "parse_mappings",
    "read_working_set",
    "receive_handshake",
    "serve",
    "write_working_set",
]
