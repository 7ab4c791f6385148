"""The server: wires repository, batchers, observers, gRPC service and metrics endpoint, and runs
them in order (start: load models -> serve; stop: not ready -> finish in-flight -> unload)."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import pathlib
from typing import List, Mapping, Optional

import grpc

from trtserve.protos import grpc_service_pb2_grpc as pb_grpc
from trtserve.server.engine.backends import BackendFactory
from trtserve.server.events import Fanout, Observer
from trtserve.server.metrics.statistics import Statistics
from trtserve.server.frontend import health
from trtserve.server.engine.shm.registry import SharedMemoryRegistry
from trtserve.server.frontend.security import BearerTokenInterceptor, TlsOptions
from trtserve.server.frontend.service import InferenceService
from trtserve.server.engine.repository.registry import ModelRepository

log = logging.getLogger("trtserve")
INT32_MAX = 2**31 - 1


@dataclasses.dataclass
class ServerOptions:
    model_repository: pathlib.Path
    host: str = "127.0.0.1"
    grpc_port: int = 8001  # 0 picks a free port
    metrics_port: Optional[int] = 8002  # None disables /metrics; 0 picks a free port
    max_message_bytes: int = INT32_MAX  # Triton's limit; grpcio's default 4 MiB is too small for tensors
    drain_seconds: float = 30.0
    cache_dir: Optional[pathlib.Path] = None  # TensorRT plan cache
    gpu_metrics: bool = True
    # extra platform name -> backend factory (config.pbtxt ``platform``); for embedders and fault-injection tests
    backend_factories: Mapping[str, BackendFactory] = dataclasses.field(default_factory=dict)
    tls: Optional[TlsOptions] = None  # None: plaintext (loopback, or TLS terminated in front)
    auth_token: Optional[str] = None  # require "authorization: Bearer <token>" on every RPC but health
    max_concurrent_streams: int = 0  # per HTTP/2 connection; 0 = grpc's default
    drain_notice_seconds: float = 0.5  # on stop: NOT_SERVING this long before new calls are refused


class TrtServer:
    """Lifecycle: ``await start()`` -> serving; ``await stop()`` drains and releases everything."""

    def __init__(self, options: ServerOptions, extra_observers: Optional[List[Observer]] = None) -> None:
        self.options = options
        self.statistics = Statistics()
        self.prometheus = None
        observers: List[Observer] = [self.statistics]
        if options.metrics_port is not None:
            from trtserve.server.metrics.prometheus import PrometheusObserver

            self.prometheus = PrometheusObserver(gpu=options.gpu_metrics)
            observers.append(self.prometheus)
        observers.extend(extra_observers or [])
        self.observer = Fanout(observers)
        self.repository = ModelRepository(options.model_repository, self.observer, options.cache_dir,
                                          options.drain_seconds, options.backend_factories)
        self.shared_memory = SharedMemoryRegistry()
        self.service = InferenceService(self.repository, self.statistics, self.observer, self.shared_memory)
        self.grpc_port: Optional[int] = None
        self.metrics_port: Optional[int] = None
        self._server: Optional[grpc.aio.Server] = None
        self._health = None
        self._metrics_server = None

    async def start(self) -> int:
        """Loads every model, then starts serving; returns the bound gRPC port."""
        opts = [("grpc.max_send_message_length", self.options.max_message_bytes),
                ("grpc.max_receive_message_length", self.options.max_message_bytes),
                ("grpc.so_reuseport", 0)]
        if self.options.max_concurrent_streams > 0:
            opts.append(("grpc.max_concurrent_streams", self.options.max_concurrent_streams))
        interceptors = [BearerTokenInterceptor(self.options.auth_token)] if self.options.auth_token else []
        self._server = grpc.aio.server(options=opts, interceptors=interceptors)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.service, self._server)
        self._health = health.add_health(self._server)
        health.add_reflection(self._server)
        address = f"{self.options.host}:{self.options.grpc_port}"
        if self.options.tls is not None:
            self.grpc_port = self._server.add_secure_port(address, self.options.tls.credentials())
        else:
            self.grpc_port = self._server.add_insecure_port(address)
        if self.grpc_port == 0:
            raise OSError(f"cannot bind gRPC to {self.options.host}:{self.options.grpc_port}")
        await self.repository.load_all()
        if self.prometheus is not None and self.options.metrics_port is not None:
            from trtserve.server.metrics.http import MetricsServer

            self._metrics_server = MetricsServer(self.prometheus.registry, self.options.host, self.options.metrics_port)
            self.metrics_port = self._metrics_server.start()
        await self._server.start()
        await health.set_serving(self._health, True)
        log.info("trtserve serving gRPC on %s:%d (metrics: %s)", self.options.host, self.grpc_port,
                 self.metrics_port if self.metrics_port is not None else "off")
        return self.grpc_port

    async def stop(self, grace: Optional[float] = None) -> None:
        """Drain: readiness false first, refuse new inferences, let in-flight RPCs finish within
        ``grace`` seconds (default: drain_seconds), then unload models and stop /metrics."""
        grace = self.options.drain_seconds if grace is None else grace
        self.service.ready = False
        if self._health is not None:
            await health.set_serving(self._health, False)
            # still serving for a moment: clients that watch health (round robin with health checks,
            # load balancers) move away before calls start being refused; grpc core answers calls it
            # had received but not dispatched at shutdown with CANCELLED, which no client may retry
            await asyncio.sleep(min(self.options.drain_notice_seconds, grace / 4))
        self.service.accepting = False
        if self._server is not None:
            await self._server.stop(grace)
        await self.repository.close()
        self.shared_memory.close()  # every client region unmapped / IPC handle closed
        if self._metrics_server is not None:  # its stop() waits for the HTTP thread: not on the loop
            await asyncio.get_running_loop().run_in_executor(None, self._metrics_server.stop)
        if self.prometheus is not None:
            self.prometheus.close()  # releases NVML

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
