"""Mutual challenge-response over a shared secret (HMAC-SHA256), and the secret file.

Both sides know a secret ``K``. The server's HELLO carries a fresh 32-byte nonce; the client's
AUTH carries its own nonce and::

    client proof = HMAC-SHA256(K, "userfault-remote v1 client proof\\0" || HELLO || AUTH[:48])

(``AUTH[:48]`` is the AUTH message without its proof). The server checks it in constant time,
then answers WELCOME with::

    server proof = HMAC-SHA256(K, "userfault-remote v1 server proof\\0" || HELLO || AUTH)

Each proof covers both nonces and every negotiated field (version, features), so a proof can
be neither replayed on another connection nor reused for a different negotiation, and the two
labels keep a client's proof from ever passing as the server's. The client proves first, so an
unauthenticated peer never gets the server to compute anything over its input; the client then
checks the server's proof before it sends a request, so it knows it talks to a holder of the
secret and not to an impostor.

What it does not do: without TLS the frames after the handshake are neither encrypted nor
integrity-protected, so an attacker on the path can read pages or hijack an authenticated TCP
connection. Use TLS (``ufs://``) across networks you do not control.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from dataclasses import dataclass

from .protocol import AUTH, HELLO, MAGIC, NONCE_SIZE, PROOF_SIZE, VERSION, WELCOME, ErrorCode

__all__ = [
    "GENERATE_HINT",
    "MIN_SECRET",
    "Hello",
    "auth_message",
    "check_auth",
    "check_secret",
    "check_welcome",
    "hello_message",
    "load_secret",
    "new_nonce",
    "parse_hello",
    "welcome_message",
]

#: Shortest secret accepted, in bytes.
MIN_SECRET = 16

_CLIENT_LABEL = b"userfault-remote v1 client proof\0"
_SERVER_LABEL = b"userfault-remote v1 server proof\0"
_ZERO_NONCE = bytes(NONCE_SIZE)
_ZERO_PROOF = bytes(PROOF_SIZE)
GENERATE_HINT = "generate one with: head -c 32 /dev/urandom | base64 > FILE && chmod 600 FILE"


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """The secret stored in ``path``: its bytes, trailing whitespace (the newline) removed.

    Raises:
        ValueError: the file is readable or writable by other users, or the secret is shorter
            than :data:`MIN_SECRET` bytes.
        OSError: the file cannot be read.
    """
    name = os.fspath(path)
    with open(name, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"secret file {name!r} is not a regular file")
        if st.st_mode & 0o007:
            raise ValueError(f"secret file {name!r} is accessible to other users (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}): chmod o-rwx {name}")
        secret = f.read(1 << 16).rstrip()
    return check_secret(secret, f"secret file {name!r}")


def check_secret(secret: bytes, what: str = "the secret") -> bytes:
    """``secret`` as bytes if it is long enough; ``ValueError`` otherwise."""
    if not isinstance(secret, (bytes, bytearray)):
        raise TypeError(f"{what} must be bytes, not {type(secret).__name__}")
    if len(secret) < MIN_SECRET:
        raise ValueError(f"{what} holds {len(secret)} bytes; at least {MIN_SECRET} are needed "
                         f"({GENERATE_HINT})")
    return bytes(secret)


def new_nonce() -> bytes:
    """A fresh random nonce."""
    return os.urandom(NONCE_SIZE)


@dataclass(frozen=True)
class Hello:
    """A parsed HELLO."""

    code: int
    version_min: int
    version_max: int
    features: int
    nonce: bytes


def hello_message(nonce: bytes | None, code: int = ErrorCode.OK) -> bytes:
    """The server's HELLO: a challenge, or (``code`` != 0, no nonce) a refusal."""
    return HELLO.pack(MAGIC, code, VERSION, VERSION, 0, 0,
                      _ZERO_NONCE if nonce is None else nonce)


def parse_hello(data: bytes) -> Hello:
    """Parse a HELLO; ``ValueError`` naming what is wrong (not a page server, bad fields)."""
    if len(data) != HELLO.size:
        raise ValueError(f"a {len(data)}-byte greeting instead of {HELLO.size}")
    magic, code, vmin, vmax, reserved, features, nonce = HELLO.unpack(data)
    if magic != MAGIC:
        raise ValueError(f"not a userfault page server (it greeted with {data[:16]!r})")
    if reserved or vmin > vmax:
        raise ValueError(f"a malformed HELLO (versions {vmin}..{vmax}, reserved {reserved})")
    return Hello(code, vmin, vmax, features, nonce)


def auth_message(secret: bytes, hello: bytes, nonce: bytes, version: int = VERSION,
                 features: int = 0) -> bytes:
    """The client's AUTH answering ``hello`` (the HELLO's raw bytes)."""
    head = AUTH.pack(MAGIC, version, 0, features, nonce, _ZERO_PROOF)[:-PROOF_SIZE]
    proof = hmac.new(secret, _CLIENT_LABEL + hello + head, hashlib.sha256).digest()
    return head + proof


def check_auth(secret: bytes, hello: bytes, auth: bytes) -> tuple[ErrorCode, str]:
    """Check a client's AUTH against our ``hello``: ``(OK, "")`` or ``(code, reason)``."""
    magic, version, reserved, features, _nonce, proof = AUTH.unpack(auth)
    if magic != MAGIC:
        return ErrorCode.BAD_FRAME, f"not a userfault client (it sent {auth[:16]!r})"
    if version != VERSION:
        return ErrorCode.VERSION, f"protocol version {version} (this server speaks {VERSION})"
    if reserved or features:
        return ErrorCode.BAD_FRAME, f"unsupported features {features:#x} / reserved {reserved}"
    want = hmac.new(secret, _CLIENT_LABEL + hello + auth[:-PROOF_SIZE], hashlib.sha256).digest()
    if not hmac.compare_digest(want, proof):
        return ErrorCode.AUTH_FAILED, "wrong proof (the client does not have the secret)"
    return ErrorCode.OK, ""


def welcome_message(secret: bytes | None, hello: bytes, auth: bytes,
                    code: int = ErrorCode.OK) -> bytes:
    """The server's WELCOME: its proof when ``code`` is OK, a bare refusal otherwise."""
    if code != ErrorCode.OK or secret is None:
        return WELCOME.pack(code, 0, 0, _ZERO_PROOF)
    proof = hmac.new(secret, _SERVER_LABEL + hello + auth, hashlib.sha256).digest()
    return WELCOME.pack(ErrorCode.OK, 0, 0, proof)


def check_welcome(secret: bytes, hello: bytes, auth: bytes, welcome: bytes) -> int | None:
    """The WELCOME's refusal code, ``0`` (OK) if the server's proof verifies, or ``None`` if
    it does not (the server does not have the secret: an impostor, or a different secret)."""
    code, reserved, features, proof = WELCOME.unpack(welcome)
    if code != ErrorCode.OK:
        return int(code)
    want = hmac.new(secret, _SERVER_LABEL + hello + auth, hashlib.sha256).digest()
    if reserved or features or not hmac.compare_digest(want, proof):
        return None
    return int(ErrorCode.OK)
