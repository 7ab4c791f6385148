"""trtserve's Python client for the KServe v2 / Triton gRPC protocol (works against Triton too).

    from trtserve.client import InferenceClient
    with InferenceClient("localhost:8001") as client:
        out = client.infer("mlp", {"INPUT0": np.ones((4, 64), np.float32)})
        print(out["OUTPUT0"].shape)

Light dependencies only (grpcio, protobuf, numpy); nothing here imports the server.
"""
from __future__ import annotations

from trtserve.client._channel import KeepAliveOptions, TlsOptions, parse_target
from trtserve.client._codec import bf16_to_float32, float32_to_bf16
from trtserve.client._errors import InferenceServerError
from trtserve.client.aio import AsyncInferenceClient
from trtserve.client.sync import InferenceClient

__all__ = [
    "AsyncInferenceClient",
    "InferenceClient",
    "InferenceServerError",
    "KeepAliveOptions",
    "TlsOptions",
    "bf16_to_float32",
    "float32_to_bf16",
    "parse_target",
]
