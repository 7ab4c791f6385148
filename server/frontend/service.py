"""``inference.GRPCInferenceService`` on grpc.aio: check -> stage in the arena -> engine -> encode.

A front end does the protocol work of a request once, where it enters: the request is checked against
the model before anything is decoded (validation.precheck), its tensors are copied into the front end's
arena, and the engine gets a descriptor. Everything that is not inference (metadata, readiness,
repository, shared memory, statistics, log and trace settings) is answered by the engine, so every front end
answers alike.

Tracing: the front end samples (1 of trace_rate, server/tracing.py) and marks the descriptor; it knows
REQUEST_START (the descriptor's t0) and sends REQUEST_END once the response is built (TRACE); the engine adds
the queue and compute timestamps and writes the trace file. Classification (an output requested with the
``classification`` parameter, Triton's class_count) is done here on the raw output the engine returned: the
top k of each batch row as BYTES "value:index[:label]", labels from the output's label_filename.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

import grpc
import numpy as np

from trtserve import dtypes
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import grpc_service_pb2_grpc as pb_grpc
from trtserve.server.errors import InvalidArgument, ResourceExhausted, TrtServeError, Unavailable
from trtserve.server.frontend import codec
from trtserve.server.frontend.engine_client import EngineClient, RemoteError, StaleModel
from trtserve.server.frontend.memory import Trimmer
from trtserve.server.frontend.plans import Plans, layout, output_bytes, place
from trtserve.server.frontend.status import grpc_code, rpc
from trtserve.server.frontend.validation import Prechecked, precheck
from trtserve.server.ipc import messages as m
from trtserve.server.ipc.arena import ArenaFull

log = logging.getLogger("trtserve.protocol")

Context = grpc.aio.ServicerContext

# engine answers after which a front end asks for the model again instead of trusting what it cached
_FORGET_ON = ("NOT_FOUND", "UNAVAILABLE")


def _schedule_params(request: pb.ModelInferRequest) -> Tuple[int, int]:
    """(priority, timeout_us) from the request parameters, as Triton reads them. Only the keys read here are looked
    up: clients send others with every request (perf_analyzer: triton_enable_empty_final_response), and walking the
    map costs more than the lookups."""
    params = request.parameters
    priority, timeout = 0, 0
    if not params:
        return priority, timeout
    for key in _SCHEDULE_KEYS:
        if key not in params:
            continue
        p = params[key]
        which = p.WhichOneof("parameter_choice")
        value = codec.parameter_value(p)
        if key == "priority":
            if which not in ("int64_param", "uint64_param") or value < 0:
                raise InvalidArgument(f"parameter 'priority' must be a non-negative integer (int64 or uint64), "
                                      f"got {which} {value!r}")
            priority = int(value)
        elif key == "timeout":
            if which not in ("int64_param", "uint64_param") or value < 0:
                raise InvalidArgument(f"parameter 'timeout' must be a non-negative integer of microseconds, "
                                      f"got {which} {value!r}")
            timeout = int(value)
        elif value:
            raise InvalidArgument(f"parameter '{key}': sequence batching is not supported by this server")
    return priority, timeout


_SCHEDULE_KEYS = ("priority", "timeout", "sequence_id", "sequence_start", "sequence_end")


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The KServe v2 / Triton gRPC service of one front end."""

    def __init__(self, engine: EngineClient, max_input_bytes: int, max_inflight: int,
                 max_stream_inflight: int) -> None:
        self._engine = engine
        self._max_input_bytes = max_input_bytes
        self._max_inflight = max_inflight
        self._max_stream_inflight = max(1, max_stream_inflight)
        # memory back to the OS when this front end goes idle after a burst (server/frontend/memory.py). Idle means
        # no arena block held as well as nothing in flight: an answer leaves the in-flight table when it arrives,
        # and its handler reads the outputs from the arena a loop turn later (a trim between punched them to zeros)
        self._trimmer = Trimmer(lambda: engine.inflight > 0 or engine.allocator.in_use > 0, engine.arena.fd,
                                engine.arena.size)
        self._plans = Plans()  # request shapes checked and laid out once (plans.py)
        self.ready = True  # false from the start of a drain: ServerReady/ModelReady answer false
        self.accepting = True  # false once the drain stops taking work: new inferences UNAVAILABLE

    async def _forward(self, method: str, response_type: Any, *args: Any) -> Any:
        return response_type.FromString(await self._engine.call(method, *args))

    # ---- health and metadata --------------------------------------------------------------------------------------
    @rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._engine.alive)

    @rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        ready = self.ready and self.accepting and self._engine.alive and await self._engine.call("server_ready")
        return pb.ServerReadyResponse(ready=bool(ready))

    @rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        ready = self.ready and self.accepting and self._engine.alive and await self._engine.call(
            "model_ready", request.name, request.version)
        return pb.ModelReadyResponse(ready=bool(ready))

    @rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return await self._forward("server_metadata", pb.ServerMetadataResponse)

    @rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        return await self._forward("model_metadata", pb.ModelMetadataResponse, request.name, request.version)

    @rpc
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        return await self._forward("model_config", pb.ModelConfigResponse, request.name, request.version)

    @rpc
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        return await self._forward("model_statistics", pb.ModelStatisticsResponse, request.name, request.version)

    # ---- repository -----------------------------------------------------------------------------------------------
    @rpc
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        return await self._forward("repository_index", pb.RepositoryIndexResponse, request.ready)

    @rpc
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: Context) -> pb.RepositoryModelLoadResponse:
        # Triton's config override (a ModelConfig in JSON) goes to the engine as it came; other parameters (file
        # overrides) go by name, for the engine to refuse after its model-control check
        params = request.parameters
        config = params["config"].string_param if "config" in params and params["config"].WhichOneof(
            "parameter_choice") == "string_param" else None
        unsupported = tuple(sorted(k for k in params if not (k == "config" and config is not None)))
        await self._engine.call("load", request.model_name, config, unsupported)
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: Context) -> pb.RepositoryModelUnloadResponse:
        await self._engine.call("unload", request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # ---- shared memory --------------------------------------------------------------------------------------------
    @rpc
    async def SystemSharedMemoryStatus(self, request: pb.SystemSharedMemoryStatusRequest,
                                       context: Context) -> pb.SystemSharedMemoryStatusResponse:
        response = pb.SystemSharedMemoryStatusResponse()
        for name, key, offset, byte_size in await self._engine.call("shm_status", "system", request.name):
            response.regions[name].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=name, key=key, offset=offset, byte_size=byte_size))
        return response

    @rpc
    async def SystemSharedMemoryRegister(self, request: pb.SystemSharedMemoryRegisterRequest,
                                         context: Context) -> pb.SystemSharedMemoryRegisterResponse:
        await self._engine.call("shm_register_system", request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc
    async def SystemSharedMemoryUnregister(self, request: pb.SystemSharedMemoryUnregisterRequest,
                                           context: Context) -> pb.SystemSharedMemoryUnregisterResponse:
        await self._engine.call("shm_unregister", "system", request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @rpc
    async def CudaSharedMemoryStatus(self, request: pb.CudaSharedMemoryStatusRequest,
                                     context: Context) -> pb.CudaSharedMemoryStatusResponse:
        response = pb.CudaSharedMemoryStatusResponse()
        for name, device_id, byte_size in await self._engine.call("shm_status", "CUDA", request.name):
            response.regions[name].CopyFrom(pb.CudaSharedMemoryStatusResponse.RegionStatus(
                name=name, device_id=device_id, byte_size=byte_size))
        return response

    @rpc
    async def CudaSharedMemoryRegister(self, request: pb.CudaSharedMemoryRegisterRequest,
                                       context: Context) -> pb.CudaSharedMemoryRegisterResponse:
        await self._engine.call("shm_register_cuda", request.name, bytes(request.raw_handle), request.device_id,
                                request.byte_size)
        return pb.CudaSharedMemoryRegisterResponse()

    @rpc
    async def CudaSharedMemoryUnregister(self, request: pb.CudaSharedMemoryUnregisterRequest,
                                         context: Context) -> pb.CudaSharedMemoryUnregisterResponse:
        await self._engine.call("shm_unregister", "CUDA", request.name)
        return pb.CudaSharedMemoryUnregisterResponse()

    # ---- log and trace settings -----------------------------------------------------------------------------------
    @rpc
    async def LogSettings(self, request: pb.LogSettingsRequest, context: Context) -> pb.LogSettingsResponse:
        updates = {}
        for key, value in request.settings.items():
            which = value.WhichOneof("parameter_choice")
            updates[key] = getattr(value, which) if which else None
        current = await self._engine.call("log_settings", updates)
        response = pb.LogSettingsResponse()
        for key, value in current.items():
            entry = response.settings[key]
            if isinstance(value, bool):
                entry.bool_param = value
            elif isinstance(value, int):
                entry.uint32_param = value
            else:
                entry.string_param = value
        return response

    @rpc
    async def TraceSetting(self, request: pb.TraceSettingRequest, context: Context) -> pb.TraceSettingResponse:
        updates = {key: list(value.value) for key, value in request.settings.items()}
        current = await self._engine.call("trace_settings", request.model_name, updates)
        response = pb.TraceSettingResponse()
        for key, values in current.items():
            response.settings[key].value.extend(values)
        return response

    # ---- inference ------------------------------------------------------------------------------------------------
    @rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        # served even while draining: grpc takes no new call once its stop has begun, so a call that gets here
        # was on the wire before its client could see the GOAWAY, and within the drain's grace it can be answered
        return await self.infer(request, context.time_remaining(), refuse_when_draining=False)

    async def infer(self, request: pb.ModelInferRequest, remaining: Optional[float],
                    refuse_when_draining: bool = True) -> pb.ModelInferResponse:
        """One inference; the engine reports it to statistics and metrics exactly once (a request refused here
        is reported through ``report_failure``). Once the drain stops taking work, a request on a stream (or an
        HTTP connection) that stays open is refused, so that the stream ends within the drain."""
        t0 = time.monotonic_ns()
        if not self.accepting and refuse_when_draining:
            raise Unavailable("the server is shutting down and accepts no new requests")
        engine = self._engine
        name, version = request.model_name, request.model_version
        for _attempt in range(3):  # a reload between the check and the engine: check against the new version
            try:
                spec, serial = await engine.model(name, version)
            except RemoteError as e:
                if e.code in _FORGET_ON:
                    engine.forget_model(name, version)
                raise
            try:
                if engine.inflight >= self._max_inflight:
                    raise _Overloaded(f"the server is overloaded: {engine.inflight} requests in flight in this "
                                      f"front end (limit {self._max_inflight}); retry later")
                datas: List[bytes] = []
                plan = self._plans.find(spec, request, self._max_input_bytes, datas)
                if plan is not None:  # plain: no tensor parameters (so no classification), raw data
                    checked, classify = plan.checked, None
                    priority, timeout_us = _schedule_params(request)
                    block = self._alloc(plan.total)
                    inputs, outputs = plan.stage(engine.arena, block, datas)
                else:
                    checked = precheck(spec, request, self._max_input_bytes)
                    classify = _classification(spec, request, checked) if request.outputs else None
                    priority, timeout_us = _schedule_params(request)
                    block, inputs, outputs = self._stage(spec, request, checked)
            except TrtServeError as e:
                engine.report_failure(spec.name, spec.version, e.reason, 0, time.monotonic_ns() - t0)
                raise
            deadline = None if remaining is None else time.monotonic() + remaining
            trace = request.id if engine.sampler.active and engine.sampler.sample(spec.name) else None
            req_id, fut = engine.submit((spec.name, spec.version, serial, inputs, outputs, checked.rows, priority,
                                         timeout_us, deadline, t0, trace), block)
            try:
                result = await fut
                return self._response(request, spec, result, classify)
            except StaleModel:
                engine.forget_model(name, version)
                continue
            except RemoteError as e:
                if e.code in _FORGET_ON:
                    engine.forget_model(name, version)
                raise
            finally:
                if fut.done() and not fut.cancelled():
                    engine.free(block)  # answered: nothing reads the block any more
                    if trace is not None:
                        engine.trace_end(req_id, time.monotonic_ns())
                else:
                    engine.cancel(req_id)  # the engine may still read it: freed when it answers
                self._trimmer.note()
        raise Unavailable(f"model '{name}' was reloaded while the request was being checked; retry")

    def _stage(self, spec, request: pb.ModelInferRequest, checked: Prechecked) -> Tuple[Optional[int], tuple, tuple]:
        """Copies the request's tensors into one arena block, with room for the outputs whose size is known;
        returns (block, input descriptors, output descriptors)."""
        raw = request.raw_input_contents
        datas: List[Tuple[str, str, tuple, object]] = []
        shm_inputs = []
        raw_index = 0
        for t in request.inputs:
            shape = checked.shapes[t.name]
            ref = checked.input_shm.get(t.name)
            if ref is not None:
                shm_inputs.append((t.name, t.datatype, shape, (m.SHM, ref.region, ref.offset, ref.byte_size)))
                continue
            dt = dtypes.BY_WIRE[t.datatype]
            if raw:
                data = raw[raw_index]
                raw_index += 1
                if dt.wire == "BYTES":  # the length prefixes must add up: the engine decodes what passes here
                    codec.decode_raw(t.name, dt, shape, data)
            elif t.HasField("contents"):
                arr = codec.decode_contents(t.name, dt, shape, t.contents)
                data = dtypes.serialize_bytes(arr) if dt.wire == "BYTES" else np.ascontiguousarray(arr).tobytes()
            else:
                data = b""
            datas.append((t.name, t.datatype, shape, data))
        slots = []
        for out in checked.outputs:
            ref = checked.output_shm.get(out)
            slots.append((out, None if ref is None else (ref.region, ref.offset, ref.byte_size),
                          None if ref is not None else output_bytes(spec, out, checked.rows)))
        sizes = [len(d[3]) for d in datas]  # type: ignore[arg-type]
        total, offsets, slot_offsets = layout(sizes, [s[2] for s in slots])  # type: ignore[misc]
        block = self._alloc(total)
        inputs, outputs = place(
            self._engine.arena, block or 0,
            [(name, wire, shape, offset, n) for (name, wire, shape, _data), offset, n in zip(datas, offsets, sizes)],
            [d[3] for d in datas],  # type: ignore[misc]
            [(out, shm_ref, offset, size) for (out, shm_ref, size), offset in zip(slots, slot_offsets)])
        return block, inputs + tuple(shm_inputs), outputs

    def _alloc(self, total: int) -> Optional[int]:
        """A block of ``total`` bytes of this front end's arena (None for none): UNAVAILABLE while it is full,
        RESOURCE_EXHAUSTED when it could never hold that much."""
        if not total:
            return None
        try:
            return self._engine.allocator.alloc(total)
        except ArenaFull as e:
            raise Unavailable(f"the server is out of request memory right now ({e}); retry later") from None
        except ValueError:
            raise ResourceExhausted(f"the request needs {total} bytes of request memory, more than this server's "
                                    f"whole arena ({self._engine.allocator.size} bytes, --arena-bytes)") from None

    def _response(self, request: pb.ModelInferRequest, spec, result: tuple,
                  classify: Optional[Dict[str, int]] = None) -> pb.ModelInferResponse:
        """One ``raw_output_contents`` entry per output in answer order (tritonclient and perf_analyzer need it);
        outputs written to shared memory keep their name, datatype and shape with an empty entry, as in Triton."""
        response = pb.ModelInferResponse(model_name=spec.name, model_version=spec.version, id=request.id)
        buffer = self._engine.arena.buffer
        for name, wire, shape, where in result:
            if classify and name in classify:
                data = buffer[where[1]:where[1] + where[2]] if where[0] == m.ARENA else where[1]
                shape, raw = _top_k(spec, name, wire, shape, data, classify[name])
                response.outputs.add(name=name, datatype="BYTES", shape=list(shape))
                response.raw_output_contents.append(raw)
                continue
            response.outputs.add(name=name, datatype=wire, shape=list(shape))
            if where[0] == m.ARENA:
                response.raw_output_contents.append(buffer[where[1]:where[1] + where[2]].tobytes())
            elif where[0] == m.DATA:
                response.raw_output_contents.append(where[1])
            else:
                response.raw_output_contents.append(b"")
        return response

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: Context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Bidirectional stream: requests run concurrently (through the same batcher), responses are written as
        they complete and matched by ``id``; an error answers that request only. At most max_stream_inflight
        requests are read and not yet answered and written: past that the stream stops reading, so a client
        that sends without reading its responses is held back by flow control instead of growing memory."""
        out: "asyncio.Queue[object]" = asyncio.Queue()
        room = asyncio.Semaphore(self._max_stream_inflight)
        tasks = set()
        loop = asyncio.get_running_loop()

        async def one(req: pb.ModelInferRequest) -> None:
            try:
                resp = await self.infer(req, context.time_remaining())
                out.put_nowait(pb.ModelStreamInferResponse(infer_response=resp))
            except TrtServeError as e:
                out.put_nowait(pb.ModelStreamInferResponse(
                    error_message=f"[{grpc_code(e).name}] {e.message}",
                    infer_response=pb.ModelInferResponse(model_name=req.model_name, id=req.id)))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # answer this request; the stream goes on
                log.exception("stream request failed")
                out.put_nowait(pb.ModelStreamInferResponse(error_message=f"[INTERNAL] {type(e).__name__}: {e}",
                                                           infer_response=pb.ModelInferResponse(id=req.id)))

        async def reader() -> None:
            try:
                async for req in request_iterator:
                    await room.acquire()
                    t = loop.create_task(one(req))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
                out.put_nowait(None)
            except BaseException as e:  # noqa: BLE001 - ends the stream with the reader's error after the answers
                out.put_nowait(_Failure(e))
                if not isinstance(e, Exception):
                    raise

        read_task = loop.create_task(reader())
        try:
            while True:
                item = await out.get()
                if item is None:
                    break
                if isinstance(item, _Failure):
                    raise item.error
                yield item
                room.release()
        finally:
            read_task.cancel()
            for t in list(tasks):
                t.cancel()


def _classification(spec, request: pb.ModelInferRequest, checked: Prechecked) -> Optional[Dict[str, int]]:
    """{output: class_count} for the outputs requested with Triton's ``classification`` parameter; None if none.
    The count must be an integer in 1..(the output's classes, when its shape is fixed)."""
    out: Optional[Dict[str, int]] = None
    for o in request.outputs:
        if "classification" not in o.parameters:
            continue
        p = o.parameters["classification"]
        which = p.WhichOneof("parameter_choice")
        k = codec.parameter_value(p)
        if which not in ("int64_param", "uint64_param") or k <= 0:
            raise InvalidArgument(f"output '{o.name}': parameter 'classification' (class_count) must be a positive "
                                  f"integer (int64), got {which} {k!r}")
        t = spec.output(o.name)
        if t is None:  # precheck refused unknown names already
            continue
        if t.datatype == "BYTES":
            raise InvalidArgument(f"output '{o.name}': classification needs a numeric output, it is BYTES")
        if o.name in checked.output_shm:
            raise InvalidArgument(f"output '{o.name}': classification into a shared-memory region is not supported; "
                                  "request the raw output there, or the classification without the region")
        if all(d >= 0 for d in t.dims):
            classes = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
            if k > classes:
                raise InvalidArgument(f"output '{o.name}': class_count {k} is more than its {classes} classes")
        if out is None:
            out = {}
        out[o.name] = int(k)
    return out


def _top_k(spec, name: str, wire: str, shape: tuple, data, k: int) -> Tuple[Tuple[int, ...], bytes]:
    """Triton's classification of one output: per batch row (the whole tensor for a model that does not batch),
    the k largest values, largest first, as "value:index" or "value:index:label"; (shape, BYTES raw contents)."""
    dt = dtypes.BY_WIRE[wire].numpy
    arr = np.frombuffer(data, dtype=dt.newbyteorder("<") if dt.itemsize > 1 else dt)
    rows = int(shape[0]) if spec.batches and shape else 1
    arr = arr.reshape(rows, -1) if arr.size else arr.reshape(rows, 0)
    classes = arr.shape[1]
    if k > classes:
        raise InvalidArgument(f"output '{name}': class_count {k} is more than its {classes} classes")
    labels = spec.labels.get(name, ()) if getattr(spec, "labels", None) else ()
    floats = dt.kind == "f"
    order = np.argsort(-arr.astype(np.float64), axis=1, kind="stable")[:, :k]
    items = []
    for r in range(rows):
        for i in order[r]:
            value = arr[r, i]
            text = f"{float(value):f}:{int(i)}" if floats else f"{int(value)}:{int(i)}"
            if int(i) < len(labels) and labels[int(i)]:
                text += ":" + labels[int(i)]
            items.append(text.encode())
    out_shape = (rows, k) if spec.batches else (k,)
    return out_shape, dtypes.serialize_bytes(np.array(items, dtype=object))


class _Overloaded(Unavailable):
    reason = "rejected"


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


__all__ = ["InferenceService"]
