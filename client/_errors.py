"""The client's one exception type and the one place a ``grpc.RpcError`` becomes it.

Callers catch a single type whatever went wrong (a server status, a dead channel, a request the
client refused to build), and read the gRPC status name and the server's own message from it.
"""
from __future__ import annotations

from typing import Optional

import grpc

__all__ = ["InferenceServerError", "from_rpc_error"]


class InferenceServerError(Exception):
    """A failed call: ``status`` is a grpc.StatusCode name ("NOT_FOUND"), ``message`` the server's text.

    Client-side refusals (a dtype with no wire type, a malformed response) use the status the
    server would have answered with, usually INVALID_ARGUMENT or INTERNAL, so one handler fits all.
    """

    def __init__(self, status: str, message: str, debug_details: Optional[str] = None) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.debug_details = debug_details

    @property
    def code(self) -> grpc.StatusCode:
        """The status as a grpc.StatusCode (UNKNOWN for a name gRPC does not know)."""
        return getattr(grpc.StatusCode, self.status, grpc.StatusCode.UNKNOWN)

    def __str__(self) -> str:
        return f"[StatusCode.{self.status}] {self.message}"

    def __repr__(self) -> str:
        return f"InferenceServerError({self.status!r}, {self.message!r})"


def from_rpc_error(error: grpc.RpcError) -> InferenceServerError:
    """Translates a grpc (or grpc.aio) RpcError; callers ``raise from_rpc_error(e) from None``."""
    code = error.code() if hasattr(error, "code") else None
    status = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    details = error.details() if hasattr(error, "details") else None
    debug = error.debug_error_string() if hasattr(error, "debug_error_string") else None
    return InferenceServerError(status, details or str(error), debug)
