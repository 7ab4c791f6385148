"""config.pbtxt <-> ``inference.ModelConfig``: parse, auto-complete from the backend, check against it.

Parsing uses protobuf ``text_format`` on Triton's own schema, so existing Triton repositories load
unchanged. Auto-complete fills what Triton's auto-complete fills for ONNX/TensorRT models: name,
platform, inputs/outputs, max_batch_size (when the model file has a dynamic leading dimension).
"""
from __future__ import annotations

import pathlib
from typing import Optional, Sequence

from google.protobuf import json_format, text_format

from trtserve import dtypes
from trtserve.protos import model_config_pb2 as mc
from trtserve.server.engine.backends.base import TensorSpec
from trtserve.server.errors import InvalidArgument, ModelLoadError

PLATFORM_BY_FILE = {"model.onnx": "onnxruntime_onnx", "model.plan": "tensorrt_plan"}
DEFAULT_AUTOFILL_MAX_BATCH = 4  # what Triton picks for an auto-completed batching model


def read_config(model_path: pathlib.Path) -> mc.ModelConfig:
    """Parses ``config.pbtxt`` if present (empty config otherwise); names the line on syntax errors."""
    config = mc.ModelConfig()
    path = model_path / "config.pbtxt"
    if path.is_file():
        try:
            text_format.Parse(path.read_text(), config)
        except text_format.ParseError as e:
            raise ModelLoadError(f"model '{model_path.name}': cannot parse {path}: {e}") from None
    if config.name and config.name != model_path.name:
        raise ModelLoadError(f"model '{model_path.name}': config.pbtxt says name '{config.name}', "
                             f"which differs from the folder name")
    config.name = model_path.name
    return config


def config_from_json(name: str, text: str) -> mc.ModelConfig:
    """The load RPC's ``config`` parameter (Triton's config override): a ModelConfig in JSON, used instead of
    config.pbtxt. InvalidArgument when it does not parse or names another model."""
    config = mc.ModelConfig()
    try:
        json_format.Parse(text, config)
    except json_format.ParseError as e:
        raise InvalidArgument(f"model '{name}': the load parameter 'config' is not a ModelConfig in JSON: {e}") from None
    if config.name and config.name != name:
        raise InvalidArgument(f"model '{name}': the load parameter 'config' names model '{config.name}'")
    config.name = name
    return config


def guess_platform(config: mc.ModelConfig, version_dir: pathlib.Path) -> str:
    """``platform`` or ``backend`` from the config, else from the model file present."""
    if config.platform:
        return config.platform
    if config.backend:
        return {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}.get(config.backend, config.backend)
    filename = config.default_model_filename
    for f, platform in PLATFORM_BY_FILE.items():
        if (filename and filename.endswith(pathlib.Path(f).suffix) and (version_dir / filename).is_file()) or (
            version_dir / f
        ).is_file():
            return platform
    raise ModelLoadError(f"model '{config.name}': no platform in config.pbtxt and no model.onnx/model.plan in "
                         f"{version_dir}")


def autocomplete(config: mc.ModelConfig, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 model_batches: Optional[bool]) -> None:
    """Fills missing inputs/outputs/max_batch_size from what the model file declares (in place).

    ``inputs``/``outputs`` carry full model shapes (batch dim included, -1 for dynamic). When the
    config has no IO, a dynamic leading dim on every tensor means the model batches.
    """
    if not config.input and not config.output:
        batches = model_batches if model_batches is not None else all(
            t.dims and t.dims[0] == -1 for t in list(inputs) + list(outputs))
        if batches and config.max_batch_size == 0:
            config.max_batch_size = DEFAULT_AUTOFILL_MAX_BATCH
        for t in inputs:
            config.input.add(name=t.name, data_type=mc.DataType.Value(dtypes.BY_WIRE[t.datatype].config),
                             dims=list(t.dims[1:] if config.max_batch_size > 0 else t.dims))
        for t in outputs:
            config.output.add(name=t.name, data_type=mc.DataType.Value(dtypes.BY_WIRE[t.datatype].config),
                              dims=list(t.dims[1:] if config.max_batch_size > 0 else t.dims))


def check_against_model(config: mc.ModelConfig, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
    """The config's IO must match the model file's, by name, datatype and rank (full shapes given)."""
    batch = 1 if config.max_batch_size > 0 else 0
    for kind, declared, actual in (("input", config.input, inputs), ("output", config.output, outputs)):
        by_name = {t.name: t for t in actual}
        names = {t.name for t in declared}
        for t in declared:
            model_t = by_name.get(t.name)
            if model_t is None:
                raise ModelLoadError(f"model '{config.name}': config {kind} '{t.name}' is not in the model; "
                                     f"the model's {kind}s are {sorted(by_name)}")
            want = dtypes.BY_CONFIG[mc.DataType.Name(t.data_type)].wire
            if want != model_t.datatype:
                raise ModelLoadError(f"model '{config.name}': {kind} '{t.name}' is {model_t.datatype} in the model "
                                     f"but {want} in config.pbtxt")
            if len(t.dims) + batch != len(model_t.dims):
                raise ModelLoadError(
                    f"model '{config.name}': {kind} '{t.name}' has rank {len(model_t.dims)} in the model "
                    f"(shape {list(model_t.dims)}) but config.pbtxt dims {list(t.dims)} with max_batch_size "
                    f"{config.max_batch_size} give rank {len(t.dims) + batch}")
            for i, (c, m) in enumerate(zip(list(t.dims), model_t.dims[batch:])):
                if m != -1 and c != m:
                    raise ModelLoadError(f"model '{config.name}': {kind} '{t.name}' dim {i + batch} is {m} in the "
                                         f"model but {c} in config.pbtxt")
        missing = [t.name for t in actual if t.name not in names and not (kind == "output")]
        if missing:
            raise ModelLoadError(f"model '{config.name}': model {kind}s {missing} are missing from config.pbtxt")
