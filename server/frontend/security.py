"""Transport security for the gRPC port: TLS / mutual TLS credentials and an optional bearer-token check.

The token check is an interceptor so it covers every RPC the same way (inference, repository,
shared memory, reflection). Health checks stay open: Kubernetes' native gRPC probes cannot send
headers. Tokens are compared in constant time (``hmac.compare_digest``).
"""
from __future__ import annotations

import dataclasses
import hmac
import pathlib
from typing import Awaitable, Callable, Optional

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


@dataclasses.dataclass(frozen=True)
class TlsOptions:
    """PEM files; ``client_ca`` set means clients must present a certificate it signed (mutual TLS)."""

    cert: pathlib.Path
    key: pathlib.Path
    client_ca: Optional[pathlib.Path] = None

    def credentials(self) -> grpc.ServerCredentials:
        pair = [(self.key.read_bytes(), self.cert.read_bytes())]
        if self.client_ca is None:
            return grpc.ssl_server_credentials(pair)
        return grpc.ssl_server_credentials(pair, root_certificates=self.client_ca.read_bytes(),
                                           require_client_auth=True)


def _deny(message: str) -> "_Handlers":
    async def abort_unary(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return _Handlers(abort_unary, abort_stream)


class _Handlers:
    """Builds the right handler kind lazily: the interceptor only knows the method path."""

    def __init__(self, unary, stream) -> None:
        self.unary, self.stream = unary, stream

    def for_handler(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(self.stream)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(self.stream)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(self.unary)
        return grpc.unary_unary_rpc_method_handler(self.unary)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` metadata on every RPC except health checks."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("empty auth token")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        got = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
        if hmac.compare_digest(got, self._expected):
            return handler
        reason = "missing 'authorization: Bearer <token>' metadata" if not got else "invalid bearer token"
        return _deny(reason).for_handler(handler)
