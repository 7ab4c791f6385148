"""The one place where trtserve errors become gRPC statuses."""
from __future__ import annotations

import functools
import logging
from typing import Any, Awaitable, Callable, TypeVar

import grpc

from trtserve.server.errors import TrtServeError

log = logging.getLogger("trtserve.protocol")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


# gRPC carries the status message in a trailer; clients drop trailers over 16 KiB (8 KiB soft limit) and then
# report RESOURCE_EXHAUSTED instead of our status, so messages echoing a huge name are cut to this length.
MAX_MESSAGE_CHARS = 4096


def _bounded(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[:MAX_MESSAGE_CHARS] + f"... ({len(message) - MAX_MESSAGE_CHARS} more characters cut)"


def grpc_code(error: TrtServeError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


def rpc(method: F) -> F:
    """Wraps a unary servicer method: TrtServeError -> its status; any other exception -> INTERNAL
    with the exception text (logged), so a bug answers one RPC instead of taking the server down."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except TrtServeError as e:
            await context.abort(grpc_code(e), _bounded(e.message))
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            log.exception("%s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, _bounded(f"{method.__name__}: {type(e).__name__}: {e}"))

    return wrapper  # type: ignore[return-value]
