"""One front end: a grpc.aio server (inference service, health, reflection) and the HTTP/REST port
(http/server.py), both in front of one InferenceService and EngineClient.

With front-end processes, each one binds the same port with SO_REUSEPORT and the kernel spreads new
connections among them; with ``--frontends 0`` the only front end binds the port alone.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Optional

import grpc

from trtserve.server.frontend import health
from trtserve.server.frontend.engine_client import EngineClient
from trtserve.server.frontend.http.server import HttpFrontEnd
from trtserve.server.frontend.registration import add_inference_service
from trtserve.server.frontend.security import BearerTokenInterceptor
from trtserve.server.frontend.service import InferenceService
from trtserve.server.options import ServerOptions

log = logging.getLogger("trtserve.frontend")

PENDING_REQUESTS = 50_000  # grpc.server.max_pending_requests: see FrontEnd.start
# grpc.health.v1 follows the engine's readiness (Control.server_ready): each front end asks this often, one
# control call, so every front end's health agrees with ServerReady within this delay
HEALTH_POLL_S = 0.5


class FrontEnd:
    """``await start()`` -> serving on the port; ``await stop(grace)`` drains."""

    def __init__(self, options: ServerOptions, engine: EngineClient, reuse_port: bool) -> None:
        self.options = options
        self.engine = engine
        self.service = InferenceService(engine, options.max_message_bytes, options.max_inflight,
                                        options.max_stream_inflight)
        self._reuse_port = reuse_port
        self.port: Optional[int] = None
        self.http = HttpFrontEnd(options, self.service, reuse_port) if options.http_port is not None else None
        self._server: Optional[grpc.aio.Server] = None
        self._health = None
        self._serving: Optional[bool] = None  # what health last said
        self._follow: Optional[asyncio.Task] = None
        engine.on_lost(self._engine_lost)

    async def start(self) -> int:
        opts = [("grpc.max_send_message_length", self.options.max_message_bytes),
                ("grpc.max_receive_message_length", self.options.max_message_bytes),
                ("grpc.so_reuseport", 1 if self._reuse_port else 0),
                # grpc's overload protection answers REFUSED_STREAM (UNAVAILABLE to the client, never counted
                # here) as soon as a few streams wait for the application, far below max_concurrent_streams: it
                # failed calls of 25 per connection; overload is answered by the front end's own limit instead
                ("grpc.http.overload_protection", 0),
                # calls grpc holds before the application takes them, reset ones included until they are skipped;
                # past grpc's default (1,000, randomly refusing up to 3,000) it fails calls of every connection with
                # CANCELLED: a connection that opens and resets streams in a tight loop (HTTP/2 rapid reset)
                # cancelled good calls on another one. Held calls are headers only; admission is max_inflight's job
                ("grpc.server.max_pending_requests", PENDING_REQUESTS),
                ("grpc.server.max_pending_requests_hard_limit", 2 * PENDING_REQUESTS)]
        if self.options.max_concurrent_streams > 0:
            opts.append(("grpc.max_concurrent_streams", self.options.max_concurrent_streams))
        interceptors = [BearerTokenInterceptor(self.options.auth_token)] if self.options.auth_token else []
        self._server = grpc.aio.server(options=opts, interceptors=interceptors)
        add_inference_service(self._server, self.service)
        self._health = health.add_health(self._server)
        health.add_reflection(self._server)
        address = f"{self.options.host}:{self.options.grpc_port}"
        try:
            if self.options.tls is not None:
                port = self._server.add_secure_port(address, self.options.tls.credentials())
            else:
                port = self._server.add_insecure_port(address)
        except RuntimeError:  # grpcio >= 1.5x raises instead of returning 0
            port = 0
        if port == 0:
            # the port was bound once already (reserve_port: a taken or forbidden port fails there, with its
            # errno); grpc says no more than that it could not bind it now
            raise OSError(f"cannot use {address} for gRPC: grpc could not bind it")
        self.port = port
        await self._server.start()
        if self.http is not None:
            try:
                await self.http.start()
            except OSError:
                await self._server.stop(None)
                raise
        await health.set_live(self._health, self.engine.alive)
        await self._set_health(await self._ready())
        self._follow = asyncio.get_running_loop().create_task(self._follow_readiness())
        return port

    @property
    def http_port(self) -> Optional[int]:
        return self.http.port if self.http is not None else None

    async def _ready(self) -> bool:
        """What ServerReady answers: this front end serves and the engine says ready."""
        if not (self.service.ready and self.service.accepting and self.engine.alive):
            return False
        try:
            return bool(await self.engine.call("server_ready"))
        except Exception:  # noqa: BLE001 - the engine went away meanwhile: not ready
            return False

    async def _set_health(self, serving: bool) -> None:
        if serving != self._serving and self._health is not None:
            self._serving = serving
            await health.set_ready(self._health, serving)

    async def _follow_readiness(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            ready = await self._ready()
            if self._follow is None:  # stopped meanwhile: stop() owns health now
                return
            await self._set_health(ready)

    def _stop_following(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            self._follow = None

    def _engine_lost(self) -> None:
        self.service.ready = False
        self._stop_following()
        if self._health is not None:
            asyncio.get_running_loop().create_task(self._set_health(False))
            asyncio.get_running_loop().create_task(health.set_live(self._health, False))

    async def stop(self, grace: float) -> None:
        """Drain: readiness false first, then refuse new inferences, let in-flight RPCs finish within ``grace``."""
        self.service.ready = False
        self._stop_following()
        if self._health is not None:
            await self._set_health(False)
            await health.set_live(self._health, False)
            # still serving for a moment: clients that watch health (round robin with health checks, load
            # balancers) move away before calls start being refused; grpc core answers calls it had received but
            # not dispatched at shutdown with CANCELLED, which no client may retry
            await asyncio.sleep(min(self.options.drain_notice_seconds, grace / 4))
        stops = [self._server.stop(grace)] if self._server is not None else []
        if self.http is not None:
            stops.append(self.http.stop(grace))
        stopping = asyncio.gather(*stops)
        # after grpc's stop has begun (its listener closed, GOAWAY sent): unary calls that still reach the service
        # were sent before their clients could know, and are served; streams and HTTP requests are refused from here
        await asyncio.sleep(0)
        self.service.accepting = False
        await stopping
        self.engine.closing = True

    async def wait(self) -> None:
        if self._server is not None:
            # shielded: grpc's wait_for_termination awaits the server's own shutdown future, so cancelling this
            # wait (the CLI does when a signal comes first) would cancel that future and fail the drain in stop()
            await asyncio.shield(self._server.wait_for_termination())
