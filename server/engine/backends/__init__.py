"""Backends run one whole batch of NumPy arrays; see base.py for the contract.

``create_backend`` maps a platform name to an implementation, importing it lazily so that the
server starts on machines without TensorRT/CuPy (or without ONNX Runtime).
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

from trtserve.server.engine.backends.base import Backend, BackendConfig
from trtserve.server.errors import ModelLoadError

PLATFORMS = ("onnxruntime_onnx", "tensorrt_plan")
BackendFactory = Callable[[BackendConfig], Backend]


def create_backend(platform: str, config: BackendConfig,
                   extra: Optional[Mapping[str, BackendFactory]] = None) -> Backend:
    """A backend for ``platform``; ModelLoadError when unknown or not installed here. ``extra`` maps
    more platform names to factories (ServerOptions.backend_factories: embedders, fault-injection tests)."""
    if extra and platform in extra:
        return extra[platform](config)
    if platform == "onnxruntime_onnx":
        from trtserve.server.engine.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(config)
    if platform == "tensorrt_plan":
        try:
            from trtserve.server.engine.backends.tensorrt import TensorRTBackend
        except ImportError as e:
            raise ModelLoadError(f"model '{config.name}': the TensorRT backend is unavailable here ({e})") from None
        return TensorRTBackend(config)
    raise ModelLoadError(f"model '{config.name}': unsupported platform '{platform}'; supported: {', '.join(PLATFORMS + tuple(extra or ()))}")
