"""``inference.GRPCInferenceService`` on grpc.aio: decode -> validate -> batcher -> encode.

Handlers only translate; the work happens in the repository and the batcher. Shared-memory, trace
and log RPCs are inherited from the generated base class, which answers UNIMPLEMENTED, and the
ServerMetadata extensions list only what is implemented here.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Optional, Tuple

import grpc

from trtserve import __version__
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import grpc_service_pb2_grpc as pb_grpc
from trtserve.server.errors import InvalidArgument, TrtServeError, Unavailable
from trtserve.server.events import Observer
from trtserve.server.metrics.statistics import Statistics
from trtserve.server.protocol import codec, convert
from trtserve.server.protocol.status import grpc_code, rpc
from trtserve.server.repository.registry import ModelRepository
from trtserve.server.repository.validation import output_datatypes, validate_request

log = logging.getLogger("trtserve.protocol")

EXTENSIONS = ("model_configuration", "model_repository", "schedule_policy", "statistics")
_RESERVED_IGNORED = ("binary_data_output", "headers")


def _schedule_params(request: pb.ModelInferRequest) -> Tuple[int, int]:
    """(priority, timeout_us) from the request parameters, as Triton reads them."""
    priority, timeout = 0, 0
    for key, p in request.parameters.items():
        value = codec.parameter_value(p)
        if key == "priority":
            if p.WhichOneof("parameter_choice") not in ("int64_param", "uint64_param") or value < 0:
                raise InvalidArgument(f"parameter 'priority' must be a non-negative integer (int64 or uint64), "
                                      f"got {p.WhichOneof('parameter_choice')} {value!r}")
            priority = int(value)
        elif key == "timeout":
            if p.WhichOneof("parameter_choice") not in ("int64_param", "uint64_param") or value < 0:
                raise InvalidArgument(f"parameter 'timeout' must be a non-negative integer of microseconds, "
                                      f"got {p.WhichOneof('parameter_choice')} {value!r}")
            timeout = int(value)
        elif key in ("sequence_id", "sequence_start", "sequence_end"):
            if value:
                raise InvalidArgument(f"parameter '{key}': sequence batching is not supported by this server")
    return priority, timeout


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 / Triton gRPC service."""

    def __init__(self, repository: ModelRepository, statistics: Statistics, observer: Observer) -> None:
        self._repo = repository
        self._stats = statistics
        self._observer = observer
        self.accepting = True  # false while draining: ServerReady answers false, new inferences UNAVAILABLE

    # ---- health and metadata ----------------------------------------------------------------
    @rpc
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.accepting)

    @rpc
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.accepting and self._repo.is_ready(request.name, request.version))

    @rpc
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="trtserve", version=__version__, extensions=list(EXTENSIONS))

    @rpc
    async def ModelMetadata(self, request, context):
        mv = self._repo.get(request.name, request.version)
        versions = [mv] if request.version else self._repo.versions(request.name)
        return convert.model_metadata(request.name, versions)

    @rpc
    async def ModelConfig(self, request, context):
        mv = self._repo.get(request.name, request.version)
        return pb.ModelConfigResponse(config=mv.config)

    @rpc
    async def ModelStatistics(self, request, context):
        response = pb.ModelStatisticsResponse()
        if request.name:
            versions = [self._repo.get(request.name, request.version)] if request.version else [
                v for v in self._repo.versions(request.name) if v.state == "READY"]
        else:
            versions = [v for v in self._repo.loaded() if v.state == "READY"]
        for mv in versions:
            response.model_stats.append(convert.model_statistics(mv.name, mv.version,
                                                                 self._stats.snapshot(mv.name, mv.version)))
        return response

    # ---- repository ---------------------------------------------------------------------------
    @rpc
    async def RepositoryIndex(self, request, context):
        response = pb.RepositoryIndexResponse()
        for name, version, state, reason in self._repo.index():
            if request.ready and state != "READY":
                continue
            response.models.add(name=name, version=version, state=state, reason=reason)
        return response

    @rpc
    async def RepositoryModelLoad(self, request, context):
        if request.parameters:
            raise InvalidArgument("RepositoryModelLoad parameters (config overrides, files) are not supported; "
                                  "edit the model repository instead")
        await self._repo.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(self, request, context):
        await self._repo.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # ---- inference ----------------------------------------------------------------------------
    @rpc
    async def ModelInfer(self, request, context):
        remaining = context.time_remaining()
        return await self._infer(request, remaining)

    async def _infer(self, request: pb.ModelInferRequest, remaining: Optional[float]) -> pb.ModelInferResponse:
        """One inference; reports exactly one request_done for every request that names a loaded model."""
        t0 = time.perf_counter_ns()
        if not self.accepting:
            raise Unavailable("the server is shutting down and accepts no new requests")
        mv = self._repo.get(request.model_name, request.model_version)
        spec, batcher = mv.spec, mv.batcher
        assert spec is not None and batcher is not None
        rows = 0
        try:
            arrays, types = codec.decode_inputs(request)
            rows, names = validate_request(spec, arrays, types, codec.requested_outputs(request))
            priority, timeout_us = _schedule_params(request)
            deadline = None if remaining is None else time.monotonic() + remaining
            result = await batcher.submit(arrays, names, rows, priority, timeout_us, deadline)
            dts = output_datatypes(spec)
            response = codec.encode_response(request, spec.name, spec.version,
                                             {n: result.outputs[n] for n in names}, dts)
        except TrtServeError as e:
            self._observer.request_done(spec.name, spec.version, False, e.reason, rows,
                                        time.perf_counter_ns() - t0, 0, 0, 0, 0)
            raise
        except asyncio.CancelledError:
            self._observer.request_done(spec.name, spec.version, False, "cancelled", rows,
                                        time.perf_counter_ns() - t0, 0, 0, 0, 0)
            raise
        self._observer.request_done(spec.name, spec.version, True, "", rows, time.perf_counter_ns() - t0,
                                    result.queue_ns, result.compute_input_ns, result.compute_infer_ns,
                                    result.compute_output_ns)
        return response

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Bidirectional stream: requests run concurrently (through the same batcher), responses are
        written as they complete and matched by ``id``; an error answers that request only."""
        out: "asyncio.Queue[Optional[pb.ModelStreamInferResponse]]" = asyncio.Queue()
        tasks = set()

        async def one(req: pb.ModelInferRequest) -> None:
            try:
                resp = await self._infer(req, context.time_remaining())
                await out.put(pb.ModelStreamInferResponse(infer_response=resp))
            except TrtServeError as e:
                await out.put(pb.ModelStreamInferResponse(
                    error_message=f"[{grpc_code(e).name}] {e.message}",
                    infer_response=pb.ModelInferResponse(model_name=req.model_name, id=req.id)))
            except Exception as e:  # answer this request; the stream goes on
                log.exception("stream request failed")
                await out.put(pb.ModelStreamInferResponse(error_message=f"[INTERNAL] {type(e).__name__}: {e}",
                                                          infer_response=pb.ModelInferResponse(id=req.id)))

        async def reader() -> None:
            try:
                async for req in request_iterator:
                    t = asyncio.get_running_loop().create_task(one(req))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            finally:
                await out.put(None)

        read_task = asyncio.get_running_loop().create_task(reader())
        try:
            while True:
                item = await out.get()
                if item is None:
                    break
                yield item
        finally:
            read_task.cancel()
            for t in list(tasks):
                t.cancel()


__all__ = ["InferenceService", "EXTENSIONS"]
