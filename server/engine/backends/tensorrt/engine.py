"""Deserialize a plan and check it against the config, by tensor name only (never binding indices).

The IO count rule is the v3 one: ``num_io_tensors == len(inputs) + len(outputs)``. ``num_io_tensors`` is not
multiplied by the number of profiles (that was the v2 binding model, Torch-TensorRT #2811).
``inspect_engine`` reads the engine into plain data; ``validate`` is pure, so the CPU tests cover it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, Dict, List, Mapping, Tuple

from trtserve.server.engine.backends.base import BackendConfig, ShapeRange, TensorSpec
from trtserve.server.errors import ModelLoadError

from . import compat
from .profiles import ProfileSpec, batch_coverage_gap

# Engine creation is not thread-safe (Triton serializes it with a global lock too); models load in parallel.
_DESERIALIZE_LOCK = threading.Lock()


@dataclass(frozen=True)
class IOTensor:
    name: str
    is_input: bool
    wire: str  # KServe v2 datatype
    shape: Tuple[int, ...]  # engine shape, batch dimension included, -1 where dynamic
    served: str = ""  # datatype clients see when it differs from ``wire``: "INT64" on an INT32 engine tensor

    @property
    def served_wire(self) -> str:
        """The datatype the model serves (config, metadata, requests, responses)."""
        return self.served or self.wire

    @property
    def converted(self) -> bool:
        """Narrowed on the way in (input) or widened on the way out (output) at the engine's edge."""
        return bool(self.served) and self.served != self.wire


@dataclass(frozen=True)
class EngineInfo:
    inputs: Tuple[IOTensor, ...]
    outputs: Tuple[IOTensor, ...]
    profiles: Tuple[ProfileSpec, ...]  # per engine profile: input name -> min/opt/max

    @property
    def num_io_tensors(self) -> int:
        return len(self.inputs) + len(self.outputs)


def deserialize(trt: ModuleType, runtime: Any, plan: bytes, what: str) -> Any:
    """ICudaEngine from plan bytes; ModelLoadError with TensorRT's reason (often: built by another version)."""
    with _DESERIALIZE_LOCK:
        engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise ModelLoadError(
            compat.with_trt_error(
                f"{what}: TensorRT {trt.__version__} could not deserialize the plan (plans only load on the "
                f"TensorRT version and GPU model they were built with)"
            )
        )
    return engine


def inspect_engine(trt: ModuleType, engine: Any, what: str) -> EngineInfo:
    """Reads every IO tensor and profile by name; refuses what the executor does not support."""
    inputs: List[IOTensor] = []
    outputs: List[IOTensor] = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = engine.get_tensor_mode(name)
        is_input = mode == trt.TensorIOMode.INPUT
        if not is_input and mode != trt.TensorIOMode.OUTPUT:
            continue
        try:
            wire = compat.wire_of_trt(engine.get_tensor_dtype(name))
        except KeyError as e:
            raise ModelLoadError(f"{what}: tensor '{name}': {e.args[0]}") from None
        on_host = engine.get_tensor_location(name) != trt.TensorLocation.DEVICE
        if on_host or (is_input and engine.is_shape_inference_io(name)):
            raise ModelLoadError(f"{what}: input '{name}' is a shape tensor (host memory); not supported")
        if engine.get_tensor_vectorized_dim(name) != -1:
            raise ModelLoadError(
                f"{what}: tensor '{name}' has vectorized format {engine.get_tensor_format_desc(name)}; "
                f"only LINEAR IO is supported"
            )
        t = IOTensor(name, is_input, wire, tuple(engine.get_tensor_shape(name)))
        (inputs if is_input else outputs).append(t)
    profiles: List[ProfileSpec] = []
    for p in range(engine.num_optimization_profiles):
        spec: ProfileSpec = {}
        for t in inputs:
            lo, op, hi = engine.get_tensor_profile_shape(t.name, p)  # inputs only: outputs return a -1 sentinel
            spec[t.name] = ShapeRange(tuple(lo), tuple(op), tuple(hi))
        profiles.append(spec)
    return EngineInfo(tuple(inputs), tuple(outputs), tuple(profiles))


def with_served_types(info: EngineInfo, declared: Mapping[str, str]) -> EngineInfo:
    """``info`` with ``served`` set on every INT32 engine tensor that ``declared`` (tensor name -> datatype: the
    config's IO, or the ONNX file's when the config leaves IO to auto-complete) says is INT64."""
    def one(t: IOTensor) -> IOTensor:
        d = declared.get(t.name, "")
        return replace(t, served=d) if compat.narrows_int64(d, t.wire) else t

    return EngineInfo(tuple(one(t) for t in info.inputs), tuple(one(t) for t in info.outputs), info.profiles)


def _config_dims(t: IOTensor, max_batch_size: int) -> Tuple[int, ...]:
    return t.shape[1:] if max_batch_size > 0 else t.shape


def model_specs(info: EngineInfo) -> Tuple[List[TensorSpec], List[TensorSpec]]:
    """IO as the model serves it (the engine's types, INT64 where an INT32 engine tensor is served as INT64): full
    shapes, batch dimension included, -1 where dynamic (what the repository's auto-complete and config check
    expect from ``Backend.io()``)."""
    return (
        [TensorSpec(t.name, t.served_wire, t.shape) for t in info.inputs],
        [TensorSpec(t.name, t.served_wire, t.shape) for t in info.outputs],
    )


def _check_tensor(what: str, kind: str, t: IOTensor, spec: TensorSpec, max_batch_size: int) -> None:
    if spec.datatype != t.served_wire and not compat.narrows_int64(spec.datatype, t.wire):
        raise ModelLoadError(f"{what}: {kind} '{t.name}': config datatype {spec.datatype}, the engine has {t.wire}")
    batched = max_batch_size > 0
    expected_rank = len(spec.dims) + (1 if batched else 0)
    if len(t.shape) != expected_rank:
        raise ModelLoadError(
            f"{what}: {kind} '{t.name}': config dims {list(spec.dims)}"
            f"{' plus the batch dimension' if batched else ''} give rank {expected_rank}, "
            f"the engine shape {list(t.shape)} has rank {len(t.shape)}"
        )
    if batched and t.shape[0] != -1:
        raise ModelLoadError(
            f"{what}: {kind} '{t.name}': max_batch_size {max_batch_size} needs a dynamic first (batch) dimension, "
            f"the engine shape is {list(t.shape)}"
        )
    for i, (c, e) in enumerate(zip(spec.dims, _config_dims(t, max_batch_size))):
        if c != e and e != -1:
            raise ModelLoadError(
                f"{what}: {kind} '{t.name}': config dims {list(spec.dims)}, the engine fixes dim "
                f"{i + (1 if batched else 0)} to {e} (engine shape {list(t.shape)})"
            )


def validate(
    info: EngineInfo, config: BackendConfig, what: str, every_profile_covers_max_batch: bool = True
) -> None:
    """Checks the engine against the config's IO and max_batch_size; the message names the tensor."""
    mbs = config.max_batch_size
    if config.inputs or config.outputs:
        declared = len(config.inputs) + len(config.outputs)
        if info.num_io_tensors != declared:
            raise ModelLoadError(
                f"{what}: the engine has {info.num_io_tensors} IO tensors "
                f"({', '.join(t.name for t in info.inputs + info.outputs)}) but the config declares {declared} "
                f"({', '.join(s.name for s in list(config.inputs) + list(config.outputs))})"
            )
        for kind, specs, tensors in (("input", config.inputs, info.inputs), ("output", config.outputs, info.outputs)):
            by_name = {t.name: t for t in tensors}
            for spec in specs:
                t = by_name.get(spec.name)
                if t is None:
                    raise ModelLoadError(
                        f"{what}: config {kind} '{spec.name}' is not an engine {kind}; engine {kind}s: "
                        f"{sorted(by_name)}"
                    )
                _check_tensor(what, kind, t, spec, mbs)
    elif mbs > 0:
        for t in info.inputs + info.outputs:
            if not t.shape or t.shape[0] != -1:
                raise ModelLoadError(
                    f"{what}: tensor '{t.name}': max_batch_size {mbs} needs a dynamic batch dimension, "
                    f"the engine shape is {list(t.shape)}"
                )
    declared_dims: Dict[str, Tuple[int, ...]] = {s.name: tuple(s.dims) for s in config.inputs}
    for p, spec in enumerate(info.profiles):
        for name, r in spec.items():
            dims = declared_dims.get(name)
            if dims is None:
                continue
            offset = 1 if mbs > 0 else 0
            for i, d in enumerate(dims):
                if d != -1 and not r.min[i + offset] <= d <= r.max[i + offset]:
                    raise ModelLoadError(
                        f"{what}: input '{name}': config fixes dim {i + offset} to {d}, outside engine profile {p} "
                        f"(min {list(r.min)}, max {list(r.max)})"
                    )
    gap = batch_coverage_gap(list(info.profiles), mbs, every_profile_covers_max_batch)
    if gap:
        raise ModelLoadError(f"{what}: {gap}")

