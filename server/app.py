"""The server as embedders and tests start it: ``TrtServer(options)``, ``await start()``, ``await stop()``.

``options.frontends == 0``: one process; the engine and the only front end share this event loop,
connected by an in-process link (the same messages as between processes, without pickling).
``options.frontends > 0``: this process supervises N front-end processes and one engine process
(server/supervisor.py) and serves nothing itself.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, List, Optional

from trtserve.server.events import Observer
from trtserve.server.options import ServerOptions

if TYPE_CHECKING:
    from trtserve.server.engine.repository.registry import ModelRepository
    from trtserve.server.engine.shm.registry import SharedMemoryRegistry
    from trtserve.server.frontend.service import InferenceService
    from trtserve.server.metrics.statistics import Statistics

log = logging.getLogger("trtserve")

__all__ = ["ServerOptions", "TrtServer"]


class TrtServer:
    """Lifecycle: ``await start()`` -> serving; ``await stop()`` drains and releases everything."""

    def __init__(self, options: ServerOptions, extra_observers: Optional[List[Observer]] = None) -> None:
        self.options = options
        self.grpc_port: Optional[int] = None
        self.http_port: Optional[int] = None
        self.metrics_port: Optional[int] = None
        self.engine = None
        self.frontend = None
        self.supervisor = None
        if options.frontends > 0:
            if extra_observers:
                raise ValueError("extra observers need the engine in this process (frontends=0)")
            from trtserve.server.supervisor import Supervisor

            self.supervisor = Supervisor(options)
            return
        if options.engine_cpus:
            raise ValueError("engine_cpus needs front-end processes (frontends > 0)")
        from trtserve.server.engine.host import EngineHost

        self.engine = EngineHost(options, extra_observers)

    # the engine's parts, for embedders and tests of the single-process server
    @property
    def repository(self) -> "ModelRepository":
        return self.engine.repository

    @property
    def statistics(self) -> "Statistics":
        return self.engine.statistics

    @property
    def shared_memory(self) -> "SharedMemoryRegistry":
        return self.engine.shared_memory

    @property
    def service(self) -> "InferenceService":
        return self.frontend.service

    async def start(self) -> int:
        """Loads every model, then starts serving; returns the bound gRPC port."""
        if self.supervisor is not None:
            self.grpc_port, self.metrics_port = await self.supervisor.start()
            self.http_port = self.supervisor.http_port
            return self.grpc_port
        from trtserve.server.frontend.engine_client import EngineClient
        from trtserve.server.frontend.server import FrontEnd
        from trtserve.server.ipc.arena import Arena
        from trtserve.server.ipc.channel import LocalLink

        assert self.engine is not None
        from trtserve.server.supervisor import reserve_port

        # a taken port is reported before the models load, not after
        if self.options.grpc_port:
            reserve_port(self.options.host, self.options.grpc_port)[0].close()
        if self.options.http_port:
            reserve_port(self.options.host, self.options.http_port, "HTTP")[0].close()
        await self.engine.start()
        self.metrics_port = self.engine.metrics_port
        engine_end, frontend_end = LocalLink.pair()
        arena = Arena.create(self.options.arena_bytes)
        self.engine.attach("local", engine_end, arena)
        client = EngineClient(frontend_end, arena)
        client.start()
        self.frontend = FrontEnd(self.options, client, reuse_port=False)
        try:
            self.grpc_port = await self.frontend.start()
            self.http_port = self.frontend.http_port
        except BaseException:
            await self.engine.stop()
            raise
        log.info("trtserve serving gRPC on %s:%d, HTTP on %s (metrics: %s)", self.options.host, self.grpc_port,
                 self.http_port if self.http_port is not None else "off",
                 self.metrics_port if self.metrics_port is not None else "off")
        return self.grpc_port

    async def stop(self, grace: Optional[float] = None) -> None:
        """Drain: readiness false first, refuse new inferences, let in-flight RPCs finish within ``grace``
        seconds (default: drain_seconds), then unload models and stop /metrics."""
        grace = self.options.drain_seconds if grace is None else grace
        if self.supervisor is not None:
            await self.supervisor.stop(grace)
            return
        if self.frontend is not None:
            await self.frontend.stop(grace)
        if self.engine is not None:
            await self.engine.stop()

    async def wait(self) -> int:
        """Returns the exit code when the server stops by itself (a supervisor whose engine died); for the CLI."""
        if self.supervisor is not None:
            return await self.supervisor.wait()
        if self.frontend is not None:
            await self.frontend.wait()
        return 0
