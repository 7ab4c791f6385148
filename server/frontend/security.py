"""Transport security for the gRPC port: TLS / mutual TLS credentials and an optional bearer-token check.

The token check is an interceptor so it covers every RPC the same way (inference, repository,
shared memory, reflection). Health checks stay open: Kubernetes' native gRPC probes cannot send
headers. Tokens are compared in constant time (``hmac.compare_digest``).
"""
from __future__ import annotations

import dataclasses
import hmac
import pathlib
import ssl
from typing import Awaitable, Callable, Optional, Sequence, Union

import grpc

from trtserve.server.tls import server_context

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

    def ssl_context(self) -> ssl.SSLContext:
        """The same certificate, key and client CA for the HTTP port."""
        return server_context(self.cert, self.key, self.client_ca)


def _deny(message: str) -> "_Handlers":
    async def abort(request_iterator, context: grpc.aio.ServicerContext):
        # The request iterator is never read: grpc has not received (nor inflated) the message, and
        # closing the call resets the rest of it (flow control keeps what is in flight to a window).
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return _Handlers(abort)


class _Handlers:
    """Builds the refusing handler for the RPC's response kind; the interceptor only knows the path.

    The request side is always *streaming*, whatever the RPC's kind: for a unary-request handler grpc
    receives and decompresses the whole message before calling it (hundreds of MiB for ModelInfer),
    while a stream-request handler is called before anything is read. The client cannot tell: on the
    wire a unary request is a stream of one message.
    """

    def __init__(self, handler) -> None:
        self.handler = handler

    def for_handler(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(self.handler)
        return grpc.stream_unary_rpc_method_handler(self.handler)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` metadata on every RPC except health checks.

    The scheme is matched case-insensitively (RFC 7235 section 2.1), the token exactly and in constant
    time. A call with more than one ``authorization`` header is refused (which one a proxy or the
    application would believe is ambiguous). A refused call is answered UNAUTHENTICATED before its
    request message is read, so unauthenticated clients cannot make the server buffer or inflate it.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("empty auth token")
        self._expected = token.encode()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        reason = self._check(handler_call_details.invocation_metadata or ())
        return handler if reason is None else _deny(reason).for_handler(handler)

    def _check(self, metadata) -> Optional[str]:
        """None when the metadata carries the token, else why not."""
        return check_bearer([value for key, value in metadata if key == "authorization"], self._expected,
                            "'authorization: Bearer <token>' metadata")


def check_bearer(values: Sequence[Union[str, bytes]], expected: bytes,
                 what: str = "'Authorization: Bearer <token>' header") -> Optional[str]:
    """None when ``values`` (every authorization header of one call) is exactly one ``Bearer <expected>``, else
    why not. Shared by the gRPC interceptor and the HTTP front end, so both ports refuse alike."""
    if not values:
        return f"missing {what}"
    if len(values) > 1:
        return "duplicate 'authorization' header: send exactly one"
    got = values[0].encode() if isinstance(values[0], str) else bytes(values[0])
    scheme, _, token = got.partition(b" ")
    ok_scheme = scheme.lower() == b"bearer"
    # compare even when the scheme is wrong, so the answer's timing does not depend on which part failed
    ok_token = hmac.compare_digest(token.strip(b" "), expected)
    if ok_scheme and ok_token:
        return None
    return "invalid bearer token"
