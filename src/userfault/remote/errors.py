"""Errors of the page-server client: refusals by the server, and failed authentication."""

from __future__ import annotations

from ..errors import SourceError
from .protocol import ErrorCode

__all__ = ["AuthenticationError", "RemoteError"]


class RemoteError(SourceError):
    """The page server refused a request, a handshake or a connection.

    Attributes:
        code: the :class:`~userfault.remote.protocol.ErrorCode` it answered (an ``int`` for
            codes this version does not know).
    """

    def __init__(self, message: str, *, code: int = ErrorCode.IO_ERROR, source: str = "",
                 offset: int = 0, length: int = 0) -> None:
        super().__init__(message, source=source, offset=offset, length=length)
        self.code = code

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), str(self.args[0]) if self.args else "", self.code,
                           self.source, self.offset, self.length))


class AuthenticationError(RemoteError):
    """The handshake failed: the server refused our proof, or could not prove its own."""


def _rebuild(cls: type[RemoteError], message: str, code: int, source: str, offset: int,
             length: int) -> RemoteError:
    return cls(message, code=code, source=source, offset=offset, length=length)
