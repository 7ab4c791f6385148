"""The engine's answers to control calls: everything but inference, for every front end alike.

Metadata, readiness, statistics, the repository and shared-memory registration live in the engine
only, so whichever front end a client reaches gives the same answer (a region registered through
one connection is usable from any). Protobuf answers travel serialized; the front end parses them
into the RPC's response type.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable, Dict, Optional, Tuple

from trtserve import __version__
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.server.engine.repository.registry import ModelRepository
from trtserve.server.engine.shm.registry import SharedMemoryRegistry
from trtserve.server.errors import InvalidArgument, NotFound, Unavailable
from trtserve.server.frontend import convert
from trtserve.server.metrics.statistics import Statistics
from trtserve.server import logsettings
from trtserve.server.tracing import TraceSettings, TraceWriter

EXTENSIONS = ("binary_tensor_data", "classification", "logging", "model_configuration", "model_repository",
              "schedule_policy", "statistics", "trace")


class Control:
    """``await control(method, args)``: one method per control call; unknown names are NotFound."""

    model_control_mode = "none"  # the load and unload RPCs are answered only in "explicit" (set by EngineHost)

    def __init__(self, repository: ModelRepository, statistics: Statistics,
                 shared_memory: SharedMemoryRegistry, run_blocking: Callable[..., Awaitable[Any]],
                 strict_readiness: bool = True) -> None:
        self._repo = repository
        self._stats = statistics
        self._shm = shared_memory
        self._blocking = run_blocking
        self.ready = True  # false once the engine drains
        self.strict_readiness = strict_readiness  # ready only while every model that should be loaded is READY
        # log and trace settings live here and are pushed to every front end (core.py, SETTINGS) on each change
        self.log_settings = logsettings.initial()
        self.trace_settings = TraceSettings()
        self.tracer = TraceWriter(self.trace_settings)
        self.broadcast: Callable[[], None] = lambda: None  # set by the host: pushes settings() to front ends
        self._methods: Dict[str, Callable[..., Awaitable[Any]]] = {
            name[3:]: getattr(self, name) for name in dir(self) if name.startswith("_m_")}

    async def __call__(self, method: str, args: Tuple[Any, ...]) -> Any:
        fn = self._methods.get(method)
        if fn is None:
            raise NotFound(f"unknown control call {method!r}")
        return await fn(*args)

    # ---- health and metadata --------------------------------------------------------------------------------------
    async def _m_server_ready(self) -> bool:
        return self.server_ready()

    def server_ready(self) -> bool:
        """The one readiness every front end reports (ServerReady and grpc.health.v1): serving, and with strict
        readiness (Triton's default) every model that should be loaded READY."""
        return self.ready and (not self.strict_readiness or self._repo.all_ready())

    async def _m_model_ready(self, name: str, version: str) -> bool:
        return self.ready and self._repo.is_ready(name, version)

    async def _m_server_metadata(self) -> bytes:
        return pb.ServerMetadataResponse(name="trtserve", version=__version__,
                                         extensions=list(EXTENSIONS) + list(self._shm.extensions())
                                         ).SerializeToString()

    async def _m_model_info(self, name: str, version: str) -> Tuple[Any, int]:
        """(ModelSpec, serial) of the version a request for (name, version) runs on: what front ends check
        requests against."""
        mv = self._repo.get(name, version)
        return mv.spec, mv.serial

    async def _m_model_metadata(self, name: str, version: str) -> bytes:
        mv = self._repo.get(name, version)
        versions = [mv] if version else self._repo.versions(name)
        return convert.model_metadata(name, versions).SerializeToString()

    async def _m_model_config(self, name: str, version: str) -> bytes:
        mv = self._repo.get(name, version)
        return pb.ModelConfigResponse(config=mv.config).SerializeToString()

    async def _m_model_statistics(self, name: str, version: str) -> bytes:
        response = pb.ModelStatisticsResponse()
        if name:
            versions = [self._repo.get(name, version)] if version else [
                v for v in self._repo.versions(name) if v.state == "READY"]
        else:
            versions = [v for v in self._repo.loaded() if v.state == "READY"]
        for mv in versions:
            response.model_stats.append(convert.model_statistics(mv.name, mv.version,
                                                                 self._stats.snapshot(mv.name, mv.version)))
        return response.SerializeToString()

    # ---- repository -----------------------------------------------------------------------------------------------
    async def _m_repository_index(self, ready: bool) -> bytes:
        response = pb.RepositoryIndexResponse()
        for name, version, state, reason in self._repo.index():
            if ready and state != "READY":
                continue
            response.models.add(name=name, version=version, state=state, reason=reason)
        return response.SerializeToString()

    def _model_control(self) -> None:
        if self.model_control_mode != "explicit":  # Triton's status and words, whichever mode refuses
            raise Unavailable("explicit model load / unload is not allowed if polling is enabled (the server runs "
                              f"with --model-control-mode {self.model_control_mode}; --model-control-mode explicit "
                              "allows it)")

    async def _m_load(self, name: str, config_json: Optional[str] = None, unsupported: Tuple[str, ...] = ()) -> None:
        """``config_json``: the RPC's ``config`` parameter (Triton's config override); ``unsupported``: the names
        of its other parameters (file overrides), refused."""
        self._model_control()
        if unsupported:
            raise InvalidArgument(f"RepositoryModelLoad parameter{'s' if len(unsupported) > 1 else ''} "
                                  f"{', '.join(repr(k) for k in unsupported)} not supported (only 'config', a "
                                  "ModelConfig in JSON; file overrides: put the files in the model repository)")
        await self._repo.load(name, config_json)

    async def _m_unload(self, name: str) -> None:
        self._model_control()
        await self._repo.unload(name)

    # ---- log and trace settings ----------------------------------------------------------------------------------
    def settings(self) -> Tuple[Dict[str, Any], Any]:
        """What every front end applies: (log settings, the trace sampler's view)."""
        return self.log_settings, self.trace_settings.view()

    async def _m_log_settings(self, updates: Dict[str, Any]) -> Dict[str, Any]:
        """LogSettings: {key: value or None}; the settings in force after the update."""
        if updates:
            new = logsettings.validate(updates, self.log_settings)
            try:
                logsettings.apply(new)
            except OSError as e:
                raise InvalidArgument(f"log setting 'log_file': cannot open {new['log_file']!r}: "
                                      f"{e.strerror or e}") from None
            if new != self.log_settings:
                self.log_settings = new
                self.broadcast()
        return dict(self.log_settings)

    async def _m_trace_settings(self, model: str, updates: Dict[str, list]) -> Dict[str, list]:
        """TraceSetting: {key: [values]} (empty: clear); the settings in force for ``model`` ("" global)."""
        if model and model not in {name for name, *_ in self._repo.index()}:
            raise NotFound(f"model '{model}' is not in the model repository")
        if updates:
            old_file = self.trace_settings.global_["trace_file"][0]
            if "trace_file" in updates or "log_frequency" in updates:
                probe = TraceSettings()
                probe.update(model, updates)  # raises before anything is written
                self.tracer.flush()
            self.trace_settings.update(model, updates)
            if self.trace_settings.global_["trace_file"][0] != old_file:
                self.tracer.restart_numbering()
            self.broadcast()
        return self.trace_settings.get(model)

    def trace_done(self, model: str, version: str, request_id: str, stamps: list) -> None:
        """One traced request is complete (core.py): recorded, and when its trace_count ran out the front ends
        stop sampling."""
        if self.tracer.add(model, version, request_id, stamps):
            self.broadcast()

    # ---- shared memory --------------------------------------------------------------------------------------------
    async def _m_shm_status(self, kind: str, name: str) -> list:
        out = []
        for r in self._shm.status(kind, name):
            if kind == "system":
                out.append((r.name, r.key, r.offset, r.byte_size))
            else:
                out.append((r.name, r.device_id, r.byte_size))
        return out

    async def _m_shm_register_system(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._shm.register_system(name, key, offset, byte_size)

    async def _m_shm_register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        # opening an IPC handle can take milliseconds (peer mapping): keep it off the event loop
        await self._blocking(self._shm.register_cuda, name, raw_handle, device_id, byte_size)

    async def _m_shm_unregister(self, kind: str, name: str) -> None:
        self._shm.unregister(kind, name)
