"""The HTTP port of one front end: aiohttp carries the KServe v2 REST API (api.HttpApi).

aiohttp parses HTTP (its C parser), bounds and inflates bodies (``Content-Encoding: gzip``/``deflate``,
``client_max_size`` counted after inflating), and runs each request as a task on the front end's event
loop, beside grpc.aio; a client that disconnects cancels its task, so its request is cancelled in the
engine like a cancelled gRPC call. Why aiohttp: docs/architecture.md (measured against uvicorn).

With front-end processes every one binds the port with SO_REUSEPORT, as for gRPC.
"""
from __future__ import annotations

import logging
from typing import Optional

from aiohttp import web

from trtserve.server.errors import bind_hint
from trtserve.server.frontend.http.api import HttpApi, Reply, error_reply
from trtserve.server.frontend.security import check_bearer
from trtserve.server.frontend.service import InferenceService
from trtserve.server.options import ServerOptions

log = logging.getLogger("trtserve.http")

OPEN_PREFIX = "/v2/health/"  # Kubernetes' HTTP probes send no token


class HttpFrontEnd:
    """``await start()`` -> bound port; ``await stop(grace)`` drains the requests in flight."""

    def __init__(self, options: ServerOptions, service: InferenceService, reuse_port: bool) -> None:
        self.options = options
        self.api = HttpApi(service)
        self._reuse_port = reuse_port
        self._token = options.auth_token.encode() if options.auth_token else None
        self._runner: Optional[web.AppRunner] = None
        self.port: Optional[int] = None

    async def start(self) -> int:
        app = web.Application(client_max_size=self.options.max_message_bytes)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=self.options.drain_seconds)
        await self._runner.setup()
        ssl_context = self.options.tls.ssl_context() if self.options.tls is not None else None
        site = web.TCPSite(self._runner, self.options.host, self.options.http_port, ssl_context=ssl_context,
                           reuse_port=self._reuse_port, backlog=1024)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            raise OSError(e.errno, f"cannot use {self.options.host}:{self.options.http_port} for HTTP: "
                                   f"{e.strerror}{bind_hint(e)}; --http-port -1 turns HTTP off") from None
        server = site._server  # aiohttp keeps the listening sockets there; the port matters when it was 0
        self.port = server.sockets[0].getsockname()[1] if server is not None else self.options.http_port
        return self.port

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.rel_url.raw_path  # still percent-encoded: the API decodes each path argument once
        if self._token is not None and not path.startswith(OPEN_PREFIX):
            reason = check_bearer(request.headers.getall("Authorization", []), self._token)
            if reason is not None:
                # refused before the body is read: aiohttp discards what the client still sends (never buffered,
                # for at most its lingering time, so a client that writes its whole body still reads the 401)
                # and the connection closes
                response = _response(error_reply(401, reason))
                response.headers["WWW-Authenticate"] = "Bearer"
                response.force_close()
                return response
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            response = _response(error_reply(413, f"the request body is larger than {self.options.max_message_bytes}"
                                                  " bytes (--max-message-bytes), counted after inflating it"))
            response.force_close()
            return response
        except Exception as e:  # noqa: BLE001 - a body that does not inflate (bad gzip), or cut short
            cause = e.__cause__ or e
            response = _response(error_reply(400, f"cannot read the request body "
                                                  f"({request.headers.get('Content-Encoding', 'identity')}): "
                                                  f"{type(cause).__name__}: {cause}"))
            response.force_close()
            return response
        reply = await self.api.handle(request.method, path, request.headers, body)
        response = _response(reply)
        if len(reply.body) > 1024 and request.headers.get("Accept-Encoding"):
            response.enable_compression()  # gzip or deflate, as the client asked
        return response

    async def stop(self, grace: float) -> None:
        """Stops listening, lets requests in flight finish within ``grace`` seconds, closes idle connections."""
        if self._runner is not None:
            if hasattr(self._runner, "_shutdown_timeout"):  # set at construction; the drain's grace may be shorter
                self._runner._shutdown_timeout = grace  # noqa: SLF001
            await self._runner.cleanup()
            self._runner = None


def _response(reply: Reply) -> web.Response:
    response = web.Response(status=reply.status, body=reply.body, headers=reply.headers)
    if reply.content_type is not None:
        response.content_type = reply.content_type
    return response


__all__ = ["HttpFrontEnd"]
