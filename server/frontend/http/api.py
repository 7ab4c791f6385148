"""The KServe v2 REST API, independent of the HTTP server library that carries it.

``HttpApi.handle(method, path, headers, body)`` -> ``Reply``. Every route is answered by the same
InferenceService the gRPC port uses (same checks, same engine calls, same errors), translated at the edge:
JSON bodies become the gRPC request messages, the gRPC responses become Triton's JSON, and a TrtServeError
becomes ``{"error": "..."}`` with Triton's HTTP status (``http_status``). Inference goes through
``infer_codec`` (JSON tensors and the binary tensor data extension) and ``InferenceService.infer``.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
import urllib.parse
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Tuple

from trtserve.protos import grpc_service_pb2 as pb
from trtserve.server.errors import InvalidArgument, TrtServeError
from trtserve.server.frontend.http import infer_codec
from trtserve.server.frontend.http.infer_codec import json_field as _field
from trtserve.server.frontend.http.jsonpb import to_json
from trtserve.server.frontend.service import InferenceService

log = logging.getLogger("trtserve.http")

JSON = "application/json"
BINARY = "application/octet-stream"
HEADER_LENGTH = "Inference-Header-Content-Length"

# Triton's mapping of its error codes to HTTP statuses, extended to the gRPC codes trtserve also uses
_HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "NOT_FOUND": 404,
                "ALREADY_EXISTS": 409, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "UNAVAILABLE": 503,
                "RESOURCE_EXHAUSTED": 503, "UNIMPLEMENTED": 501, "DEADLINE_EXCEEDED": 504, "CANCELLED": 499,
                "INTERNAL": 500, "UNKNOWN": 500}


def http_status(code: str) -> int:
    """The HTTP status for a grpc.StatusCode name (Triton's choice where it has one)."""
    return _HTTP_STATUS.get(code, 500)


@dataclasses.dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: Optional[str] = JSON
    headers: Dict[str, str] = dataclasses.field(default_factory=dict)


def json_reply(value: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(value, separators=(",", ":")).encode())


def error_reply(status: int, message: str) -> Reply:
    return json_reply({"error": message}, status)


class _Aborted(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class _Context:
    """The part of a grpc.aio context the service's methods use, for calls that came over HTTP: ``abort``
    (the @rpc wrapper turns a TrtServeError into it) and ``time_remaining`` (HTTP requests have no deadline
    of their own; the inference ``timeout`` parameter still applies)."""

    async def abort(self, code, details: str) -> None:
        raise _Aborted(getattr(code, "name", str(code)), details)

    def time_remaining(self) -> Optional[float]:
        return None


_CONTEXT = _Context()
Handler = Callable[..., Awaitable[Reply]]


def _body_json(body: bytes, what: str) -> Dict[str, Any]:
    """The request's JSON object; an empty body is an empty object (Triton allows it where nothing is needed)."""
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except ValueError as e:
        raise InvalidArgument(f"{what}: the body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what}: the body must be a JSON object, got {type(value).__name__}")
    return value


class HttpApi:
    """Routes of the v2 REST API onto one front end's InferenceService."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service
        m = r"(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
        routes: List[Tuple[str, str, Handler]] = [
            ("GET", r"/v2/health/live", self.live),
            ("GET", r"/v2/health/ready", self.ready),
            ("GET", r"/v2", self.server_metadata),
            ("GET", r"/v2/models/stats", self.statistics),
            ("GET", rf"/v2/models/{m}", self.model_metadata),
            ("GET", rf"/v2/models/{m}/ready", self.model_ready),
            ("GET", rf"/v2/models/{m}/config", self.model_config),
            ("GET", rf"/v2/models/{m}/stats", self.statistics),
            ("POST", rf"/v2/models/{m}/infer", self.infer),
            ("GET", rf"/v2/models/{m}/trace/setting", self.trace_setting),
            ("POST", rf"/v2/models/{m}/trace/setting", self.trace_setting),
            ("GET", r"/v2/trace/setting", self.trace_setting),
            ("POST", r"/v2/trace/setting", self.trace_setting),
            ("GET", r"/v2/logging", self.logging),
            ("POST", r"/v2/logging", self.logging),
            ("POST", r"/v2/repository/index", self.repository_index),
            ("POST", r"/v2/repository/models/(?P<model>[^/]+)/load", self.load),
            ("POST", r"/v2/repository/models/(?P<model>[^/]+)/unload", self.unload),
            ("GET", r"/v2/(?P<kind>systemsharedmemory|cudasharedmemory)(?:/region/(?P<region>[^/]+))?/status",
             self.shm_status),
            ("POST", r"/v2/(?P<kind>systemsharedmemory|cudasharedmemory)/region/(?P<region>[^/]+)/register",
             self.shm_register),
            ("POST", r"/v2/(?P<kind>systemsharedmemory|cudasharedmemory)(?:/region/(?P<region>[^/]+))?/unregister",
             self.shm_unregister),
        ]
        self._routes = [(method, re.compile(pattern + r"/?\Z"), handler) for method, pattern, handler in routes]

    def route(self, method: str, path: str) -> Tuple[Optional[Handler], Dict[str, str], bool]:
        """(handler, path arguments, whether the path exists for some other method)."""
        other = False
        for want, pattern, handler in self._routes:
            match = pattern.match(path)
            if match is None:
                continue
            if want == method or (want == "GET" and method == "HEAD"):
                args = {k: urllib.parse.unquote(v) for k, v in match.groupdict().items() if v is not None}
                return handler, args, False
            other = True
        return None, {}, other

    async def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Reply:
        """One HTTP request -> its reply; never raises (a bug answers 500 and is logged)."""
        handler, args, other = self.route(method, path)
        if handler is None:
            if other:
                return error_reply(405, f"method {method} is not allowed on {path}")
            return error_reply(404, f"no such endpoint: {method} {path} (the KServe v2 REST API is under /v2)")
        try:
            return await handler(headers=headers, body=body, **args)
        except TrtServeError as e:
            return error_reply(http_status(e.code), e.message)
        except _Aborted as e:
            return error_reply(http_status(e.code), e.message)
        except Exception as e:  # noqa: BLE001 - one request fails, the server goes on
            log.exception("%s %s failed", method, path)
            return error_reply(500, f"{type(e).__name__}: {e}")

    async def _call(self, method: str, request) -> Any:
        """A unary method of the gRPC service, with its checks and errors."""
        return await getattr(self.service, method)(request, _CONTEXT)

    # ---- health and metadata --------------------------------------------------------------------------------------
    async def live(self, **_: Any) -> Reply:
        live = (await self._call("ServerLive", pb.ServerLiveRequest())).live
        return Reply(200 if live else 400, content_type=None)

    async def ready(self, **_: Any) -> Reply:
        ready = (await self._call("ServerReady", pb.ServerReadyRequest())).ready
        return Reply(200 if ready else 400, content_type=None)

    async def server_metadata(self, **_: Any) -> Reply:
        return json_reply(to_json(await self._call("ServerMetadata", pb.ServerMetadataRequest())))

    async def model_metadata(self, model: str, version: str = "", **_: Any) -> Reply:
        return json_reply(to_json(await self._call("ModelMetadata", pb.ModelMetadataRequest(name=model,
                                                                                             version=version))))

    async def model_ready(self, model: str, version: str = "", **_: Any) -> Reply:
        ready = (await self._call("ModelReady", pb.ModelReadyRequest(name=model, version=version))).ready
        return Reply(200 if ready else 400, content_type=None)

    async def model_config(self, model: str, version: str = "", **_: Any) -> Reply:
        response = await self._call("ModelConfig", pb.ModelConfigRequest(name=model, version=version))
        return json_reply(to_json(response.config))

    async def statistics(self, model: str = "", version: str = "", **_: Any) -> Reply:
        return json_reply(to_json(await self._call("ModelStatistics", pb.ModelStatisticsRequest(name=model,
                                                                                                version=version))))

    # ---- inference ------------------------------------------------------------------------------------------------
    async def infer(self, model: str, headers: Mapping[str, str], body: bytes, version: str = "",
                    **_: Any) -> Reply:
        length = headers.get(HEADER_LENGTH)
        header_length = None
        if length is not None:
            try:
                header_length = int(length)
            except ValueError:
                raise InvalidArgument(f"header {HEADER_LENGTH} must be an integer, got {length[:100]!r}") from None
        request, form = infer_codec.parse_infer(model, version, body, header_length)
        response = await self.service.infer(request, None)
        payload, json_length = infer_codec.encode_infer(response, form)
        if json_length is None:
            return Reply(200, payload)
        return Reply(200, payload, BINARY, {HEADER_LENGTH: str(json_length)})

    # ---- log and trace settings -----------------------------------------------------------------------------------
    async def logging(self, body: bytes, **_: Any) -> Reply:
        request = pb.LogSettingsRequest()
        for key, value in _body_json(body, "log settings").items():
            entry = request.settings[key]
            if isinstance(value, bool):
                entry.bool_param = value
            elif isinstance(value, int) and value >= 0:
                entry.uint32_param = value
            elif isinstance(value, str):
                entry.string_param = value
            elif value is not None:
                raise InvalidArgument(f"log setting '{key}' must be a boolean, a non-negative integer or a string, "
                                      f"got {json.dumps(value)[:100]}")
        response = await self._call("LogSettings", request)
        out = {}
        for key, value in response.settings.items():
            which = value.WhichOneof("parameter_choice")
            out[key] = getattr(value, which) if which else None
        return json_reply(out)

    async def trace_setting(self, body: bytes, model: str = "", **_: Any) -> Reply:
        request = pb.TraceSettingRequest(model_name=model)
        for key, value in _body_json(body, "trace settings").items():
            values = [] if value is None else value if isinstance(value, list) else [value]
            if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
                raise InvalidArgument(f"trace setting '{key}' must be a string, a list of strings or null, got "
                                      f"{json.dumps(value)[:100]}")
            request.settings[key].value.extend(str(v) for v in values)
            if not values:
                request.settings[key].SetInParent()  # present and empty: back to the global value
        response = await self._call("TraceSetting", request)
        # Triton writes trace_level as a list and every other setting as one string
        out = {key: list(v.value) if key == "trace_level" else (v.value[0] if v.value else "")
               for key, v in response.settings.items()}
        return json_reply(out)

    # ---- repository -----------------------------------------------------------------------------------------------
    async def repository_index(self, body: bytes, **_: Any) -> Reply:
        ready = _field(_body_json(body, "repository index"), "ready", bool, "repository index") or False
        response = await self._call("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready))
        return json_reply([to_json(m) for m in response.models])

    async def load(self, model: str, body: bytes, **_: Any) -> Reply:
        what = f"load of model '{model}'"
        params = _field(_body_json(body, what), "parameters", dict, what) or {}
        request = pb.RepositoryModelLoadRequest(model_name=model)
        for key, value in params.items():
            if key == "config" and isinstance(value, (dict, list)):
                value = json.dumps(value)  # Triton takes the override as a JSON string; accept the object too
            infer_codec.set_parameter(request.parameters, key, value, what)
        await self._call("RepositoryModelLoad", request)
        return Reply(200, content_type=None)

    async def unload(self, model: str, body: bytes, **_: Any) -> Reply:
        what = f"unload of model '{model}'"
        params = _field(_body_json(body, what), "parameters", dict, what) or {}
        request = pb.RepositoryModelUnloadRequest(model_name=model)
        for key, value in params.items():
            infer_codec.set_parameter(request.parameters, key, value, what)
        await self._call("RepositoryModelUnload", request)
        return Reply(200, content_type=None)

    # ---- shared memory --------------------------------------------------------------------------------------------
    async def shm_status(self, kind: str, region: str = "", **_: Any) -> Reply:
        if kind == "systemsharedmemory":
            response = await self._call("SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest(name=region))
        else:
            response = await self._call("CudaSharedMemoryStatus", pb.CudaSharedMemoryStatusRequest(name=region))
        return json_reply([to_json(r) for r in response.regions.values()])

    async def shm_register(self, kind: str, region: str, body: bytes, **_: Any) -> Reply:
        what = f"registration of shared memory region '{region}'"
        obj = _body_json(body, what)
        byte_size = _field(obj, "byte_size", int, what) or 0
        if kind == "systemsharedmemory":
            key = _field(obj, "key", str, what) or ""
            if not key:
                raise InvalidArgument(f"{what}: 'key' (the shared memory key, e.g. /my_region) is required")
            await self._call("SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest(
                name=region, key=key, offset=_field(obj, "offset", int, what) or 0, byte_size=byte_size))
        else:
            handle = _field(obj, "raw_handle", dict, what) or {}
            encoded = _field(handle, "b64", str, what) or ""
            try:
                raw = base64.b64decode(encoded, validate=True)
            except ValueError:
                raise InvalidArgument(f"{what}: 'raw_handle.b64' is not valid base64") from None
            await self._call("CudaSharedMemoryRegister", pb.CudaSharedMemoryRegisterRequest(
                name=region, raw_handle=raw, device_id=_field(obj, "device_id", int, what) or 0,
                byte_size=byte_size))
        return Reply(200, content_type=None)

    async def shm_unregister(self, kind: str, region: str = "", **_: Any) -> Reply:
        if kind == "systemsharedmemory":
            await self._call("SystemSharedMemoryUnregister", pb.SystemSharedMemoryUnregisterRequest(name=region))
        else:
            await self._call("CudaSharedMemoryUnregister", pb.CudaSharedMemoryUnregisterRequest(name=region))
        return Reply(200, content_type=None)


__all__ = ["HttpApi", "Reply", "http_status", "HEADER_LENGTH"]
