"""asyncio twin of sync.py over one ``grpc.aio.Channel``: the same methods, awaited.

Use it from the event loop that created it (grpc.aio channels belong to one loop).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import grpc
import numpy as np

from trtserve.client import _codec
from trtserve.client._channel import KeepAliveOptions, TlsOptions, Url, make_spec
from trtserve.client._codec import Version
from trtserve.client._codec import version_str as _v
from trtserve.client._errors import from_rpc_error
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import grpc_service_pb2_grpc as pb_grpc
from trtserve.protos import model_config_pb2 as mc

__all__ = ["AsyncInferenceClient"]


class AsyncInferenceClient:
    """asyncio KServe v2 / Triton gRPC client; every failure raises InferenceServerError.

    ``url``: ``"host:8001"``, ``"h1:8001,h2:8001"`` or a list (round robin over all), or
    ``"dns:///name:8001"``. TLS turns on with ``tls=True`` or any of the cert arguments (PEM bytes
    or paths). ``retries`` extra attempts happen only on UNAVAILABLE before a response started.
    ``headers`` go with every call (e.g. an authorization token).
    """

    def __init__(self, url: Url, *, tls: Union[bool, TlsOptions, None] = None,
                 root_cert: Optional[Union[bytes, str]] = None, client_cert: Optional[Union[bytes, str]] = None,
                 client_key: Optional[Union[bytes, str]] = None, server_name: Optional[str] = None,
                 keepalive: Optional[KeepAliveOptions] = None, retries: int = 2,
                 headers: Optional[Mapping[str, str]] = None,
                 channel_args: Sequence[Tuple[str, object]] = ()) -> None:
        self._spec = make_spec(url, tls, root_cert, client_cert, client_key, server_name, keepalive, retries,
                               headers, channel_args)
        if self._spec.credentials is None:
            self._channel = grpc.aio.insecure_channel(self._spec.target, options=self._spec.options)
        else:
            self._channel = grpc.aio.secure_channel(self._spec.target, self._spec.credentials,
                                                    options=self._spec.options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    @property
    def target(self) -> str:
        """The gRPC target the channel dials (after address parsing)."""
        return self._spec.target

    async def close(self) -> None:
        """Closes the channel; calls in flight end with CANCELLED."""
        await self._channel.close()

    async def __aenter__(self) -> "AsyncInferenceClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, rpc: str, request, timeout: Optional[float] = None,
                    headers: Optional[Mapping[str, str]] = None):
        """The one place RPCs are made, so grpc.RpcError is translated once."""
        meta = self._spec.metadata + tuple((k.lower(), str(v)) for k, v in (headers or {}).items())
        try:
            return await getattr(self._stub, rpc)(request, timeout=timeout, metadata=meta or None)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    # health and metadata
    async def is_server_live(self, timeout: Optional[float] = None) -> bool:
        """ServerLive: the process answers."""
        return (await self._call("ServerLive", pb.ServerLiveRequest(), timeout)).live

    async def is_server_ready(self, timeout: Optional[float] = None) -> bool:
        """ServerReady: the server accepts inferences."""
        return (await self._call("ServerReady", pb.ServerReadyRequest(), timeout)).ready

    async def is_model_ready(self, model: str, version: Version = None, timeout: Optional[float] = None) -> bool:
        """ModelReady for one model (version None: the server's default policy)."""
        return (await self._call("ModelReady", pb.ModelReadyRequest(name=model, version=_v(version)), timeout)).ready

    async def server_metadata(self, timeout: Optional[float] = None) -> pb.ServerMetadataResponse:
        """Name, version and protocol extensions of the server."""
        return await self._call("ServerMetadata", pb.ServerMetadataRequest(), timeout)

    async def model_metadata(self, model: str, version: Version = None,
                             timeout: Optional[float] = None) -> pb.ModelMetadataResponse:
        """Inputs and outputs (name, datatype, shape with -1 for variable dims) of a model."""
        return await self._call("ModelMetadata", pb.ModelMetadataRequest(name=model, version=_v(version)), timeout)

    async def model_config(self, model: str, version: Version = None,
                           timeout: Optional[float] = None) -> mc.ModelConfig:
        """The model's effective configuration (Triton's ModelConfig message)."""
        return (await self._call("ModelConfig", pb.ModelConfigRequest(name=model, version=_v(version)), timeout)).config

    async def model_statistics(self, model: str = "", version: Version = None,
                               timeout: Optional[float] = None) -> pb.ModelStatisticsResponse:
        """Per-model counts and durations (model "" = every model)."""
        return await self._call("ModelStatistics", pb.ModelStatisticsRequest(name=model, version=_v(version)), timeout)

    # repository
    async def repository_index(self, ready: bool = False,
                               timeout: Optional[float] = None) -> List[pb.RepositoryIndexResponse.ModelIndex]:
        """Every model in the repository with version, state and reason (``ready``: only ready ones)."""
        return list((await self._call("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready), timeout)).models)

    async def load_model(self, model: str, config: Optional[str] = None, files: Optional[Mapping[str, bytes]] = None,
                         timeout: Optional[float] = None) -> None:
        """Loads (or reloads) a model; ``config`` JSON and ``files`` override the repository's, as in Triton."""
        await self._call("RepositoryModelLoad", _codec.load_request(model, config, files), timeout)

    async def unload_model(self, model: str, timeout: Optional[float] = None) -> None:
        """Unloads a model; it drains its requests first."""
        await self._call("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=model), timeout)

    # inference
    async def infer(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]] = None,
                    version: Version = None, priority: Optional[int] = None, timeout: Optional[float] = None,
                    request_id: Optional[str] = None, datatypes: Optional[Mapping[str, str]] = None,
                    parameters: Optional[Mapping[str, Union[bool, int, float, str]]] = None,
                    headers: Optional[Mapping[str, str]] = None) -> Dict[str, np.ndarray]:
        """Runs ``model`` on ``inputs`` ({name: array}) and returns {output name: array}.

        ``timeout`` (s) is the call's deadline, also sent as Triton's ``timeout`` parameter;
        ``datatypes`` names types NumPy lacks (``{"x": "BF16"}``). BF16 outputs come back as uint16
        (``bf16_to_float32`` widens them); numeric outputs are read-only views of the response.
        """
        request = _codec.build_infer_request(model, inputs, outputs, version, priority, timeout, request_id,
                                             datatypes, parameters)
        return _codec.decode_infer_response(await self._call("ModelInfer", request, timeout, headers))

    async def model_infer(self, request: pb.ModelInferRequest, timeout: Optional[float] = None,
                          headers: Optional[Mapping[str, str]] = None) -> pb.ModelInferResponse:
        """The raw ModelInfer RPC, for callers that build (and reuse) the request message themselves."""
        return await self._call("ModelInfer", request, timeout, headers)
