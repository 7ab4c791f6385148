"""``inference.GRPCInferenceService`` on grpc.aio: decode -> validate -> batcher -> encode.

Handlers only translate; the work happens in the repository and the batcher. The shared-memory
RPCs and the tensors that name regions go through engine/shm/registry.py; trace and log RPCs are
inherited from the generated base class, which answers UNIMPLEMENTED, and the ServerMetadata
extensions list only what works here.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Dict, Optional, Tuple

import grpc

from trtserve import __version__, dtypes
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import grpc_service_pb2_grpc as pb_grpc
from trtserve.server.errors import InvalidArgument, TrtServeError, Unavailable
from trtserve.server.events import Observer
from trtserve.server.metrics.statistics import Statistics
from trtserve.server.engine.shm import registry as shm
from trtserve.server.frontend import codec, convert
from trtserve.server.frontend.status import grpc_code, rpc
from trtserve.server.engine.repository.registry import ModelRepository
from trtserve.server.frontend.validation import output_datatypes, validate_request

log = logging.getLogger("trtserve.protocol")

EXTENSIONS = ("model_configuration", "model_repository", "schedule_policy", "statistics")
_RESERVED_IGNORED = ("binary_data_output", "headers")


def _uses_shm(request: pb.ModelInferRequest) -> bool:
    return any(shm.REGION in t.parameters for t in request.inputs) or any(
        shm.REGION in o.parameters for o in request.outputs)


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

    def __init__(self, repository: ModelRepository, statistics: Statistics, observer: Observer,
                 shared_memory: Optional[shm.SharedMemoryRegistry] = None) -> None:
        self._repo = repository
        self._stats = statistics
        self._observer = observer
        self.shared_memory = shared_memory if shared_memory is not None else shm.SharedMemoryRegistry()
        self.ready = True  # false from the start of a drain: ServerReady/ModelReady answer false
        self.accepting = True  # false once the drain stops taking work: new inferences UNAVAILABLE

    # ---- health and metadata ----------------------------------------------------------------
    @rpc
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready and self.accepting)

    @rpc
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.ready and self.accepting and self._repo.is_ready(request.name, request.version))

    @rpc
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="trtserve", version=__version__,
                                         extensions=list(EXTENSIONS) + list(self.shared_memory.extensions()))

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

    # ---- shared memory ------------------------------------------------------------------------
    @rpc
    async def SystemSharedMemoryStatus(self, request, context):
        response = pb.SystemSharedMemoryStatusResponse()
        for r in self.shared_memory.status("system", request.name):
            response.regions[r.name].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size))
        return response

    @rpc
    async def SystemSharedMemoryRegister(self, request, context):
        self.shared_memory.register_system(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc
    async def SystemSharedMemoryUnregister(self, request, context):
        self.shared_memory.unregister("system", request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @rpc
    async def CudaSharedMemoryStatus(self, request, context):
        response = pb.CudaSharedMemoryStatusResponse()
        for r in self.shared_memory.status("CUDA", request.name):
            response.regions[r.name].CopyFrom(pb.CudaSharedMemoryStatusResponse.RegionStatus(
                name=r.name, device_id=r.device_id, byte_size=r.byte_size))
        return response

    @rpc
    async def CudaSharedMemoryRegister(self, request, context):
        # opening an IPC handle can take milliseconds (peer mapping): keep it off the event loop
        await asyncio.get_running_loop().run_in_executor(
            None, self.shared_memory.register_cuda, request.name, request.raw_handle, request.device_id,
            request.byte_size)
        return pb.CudaSharedMemoryRegisterResponse()

    @rpc
    async def CudaSharedMemoryUnregister(self, request, context):
        self.shared_memory.unregister("CUDA", request.name)
        return pb.CudaSharedMemoryUnregisterResponse()

    def _decode_shm(self, request: pb.ModelInferRequest, mv, req_shm: shm.RequestShm):
        """decode + validate for a request that names shared-memory regions; resolves its output
        regions (bounds, overlap, size when the shape is known) before it is queued, and, for a backend
        that copies device to device, which outputs it may write into CUDA regions itself."""
        spec, backend = mv.spec, mv.backend
        # a backend that copies device-to-device itself takes CUDA inputs as DeviceTensor descriptors
        device_tensors = bool(getattr(backend, "accepts_device_tensors", False))
        device_id = getattr(getattr(backend, "config", None), "device_id", 0)

        def reader(t, dt: dtypes.DataType, shape: Tuple[int, ...]):
            ref = shm.shm_ref(t.parameters, f"input '{t.name}'")
            # a paddable input may be padded into a batch, which happens in host memory
            data = req_shm.read_input(t.name, dt, shape, ref, device_tensors and t.name not in spec.pad_values)
            if isinstance(data, shm.DeviceTensor) and data.device_id != device_id:
                raise InvalidArgument(f"input '{t.name}': CUDA shared memory region '{ref.region}' is on device "
                                      f"{data.device_id} but model '{spec.name}' runs on device {device_id}")
            return data

        arrays, types = codec.decode_inputs(request, reader)
        rows, names = validate_request(spec, arrays, types, codec.requested_outputs(request, allow_shm=True))
        for o in request.outputs:
            ref = shm.shm_ref(o.parameters, f"output '{o.name}'")
            if ref is not None:
                req_shm.add_output(o.name, ref)
        for t in spec.outputs:
            full = ((rows,) if spec.batches else ()) + tuple(t.dims)
            req_shm.check_output_size(t.name, dtypes.BY_WIRE[t.datatype], full)
        device_outputs = {}
        if device_tensors:
            for name in req_shm.outputs:
                dest = req_shm.device_destination(name, device_id)
                if dest is not None:
                    device_outputs[name] = dest
        return arrays, types, rows, names, device_outputs

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
        # requests without shared memory take exactly the path they took before it existed
        req_shm = self.shared_memory.request() if _uses_shm(request) else None
        cancelled = False
        try:
            device_outputs = None
            if req_shm is None:
                arrays, types = codec.decode_inputs(request)
                rows, names = validate_request(spec, arrays, types, codec.requested_outputs(request))
            else:
                arrays, types, rows, names, device_outputs = self._decode_shm(request, mv, req_shm)
            priority, timeout_us = _schedule_params(request)
            deadline = None if remaining is None else time.monotonic() + remaining
            result = await batcher.submit(arrays, names, rows, priority, timeout_us, deadline, device_outputs)
            dts = output_datatypes(spec)
            outputs: Dict[str, object] = {n: result.outputs[n] for n in names}
            if req_shm is not None:
                for name in req_shm.outputs:
                    if name not in result.delivered:  # the backend wrote those into device memory already
                        req_shm.write_output(name, dts[name], outputs[name])
            response = codec.encode_response(request, spec.name, spec.version, outputs, dts,
                                             req_shm.outputs if req_shm is not None else ())
        except TrtServeError as e:
            self._observer.request_done(spec.name, spec.version, False, e.reason, rows,
                                        time.perf_counter_ns() - t0, 0, 0, 0, 0)
            raise
        except asyncio.CancelledError:
            cancelled = True
            self._observer.request_done(spec.name, spec.version, False, "cancelled", rows,
                                        time.perf_counter_ns() - t0, 0, 0, 0, 0)
            raise
        finally:
            if req_shm is not None:
                # the region may close now if it was unregistered meanwhile; see RequestShm.release
                # for the one case (a cancelled request whose backend may still read device memory)
                # where it stays mapped instead
                req_shm.release(finished=not cancelled)
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
