"""TensorRT backend (platform "tensorrt_plan"): serves ``model.plan``, or builds ``model.onnx`` at load time.

Imports without TensorRT or CuPy; ``open()`` then fails the model load saying the backend is unavailable.
Module map: compat (version rules, dtype table, lazy imports), profiles (config -> optimization profiles),
build (ONNX -> plan, plan cache), engine (deserialize + validate by name), context (one instance).
"""
from __future__ import annotations

import logging
import pathlib
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from trtserve.dtypes import from_wire
from trtserve.server.engine.backends.base import (Backend, BackendConfig, BatchResult, Destination, Profile,
                                                  TensorSpec, is_host)
from trtserve.server.errors import InvalidArgument, ModelLoadError

from . import compat
from .build import (BuildOptions, OnnxBuilder, PlanCache, default_cache_dir, onnx_declared_types, param_bool,
                    param_int, plan_cache_key, sha256_file)
from .context import InFlight, InstanceContext
from .engine import EngineInfo, deserialize, inspect_engine, model_specs, validate, with_served_types
from .profiles import (
    Layout,
    batch_coverage_gap,
    has_profile_parameters,
    layout_for_build,
    layout_for_plan,
    parse_profiles,
)

__all__ = ["TensorRTBackend", "LoadReport"]

log = logging.getLogger("trtserve.tensorrt")


@dataclass(frozen=True)
class LoadReport:
    """How the engine came to be: for logs, tests and the benchmark."""

    source: str  # "plan" or "onnx"
    path: pathlib.Path
    cache_key: str = ""
    cache_hit: bool = False
    build_s: float = 0.0
    tensorrt: str = ""
    graph_buckets: Tuple[Tuple[int, ...], ...] = ()  # per instance


class TensorRTBackend(Backend):
    """One model version on one GPU: an engine shared by ``instance_count`` contexts, each on its own stream."""

    platform = "tensorrt_plan"
    accepts_device_tensors = True  # CUDA shared-memory inputs are copied device to device (context.py)
    pipelined = True  # the next batch is enqueued behind the running one on the instance's stream (context.py)

    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        self._what = f"model '{config.name}' version {config.version}"
        self._runtime: Any = None
        self._engine: Any = None
        self._info: Optional[EngineInfo] = None
        # what check_request compares each request against, resolved once per engine info rather than per request
        self._request_checks: Tuple[Tuple[str, np.dtype, str, bool], ...] = ()
        self._checks_of: Optional[EngineInfo] = None
        self._layout: Optional[Layout] = None
        self._instances: List[InstanceContext] = []
        self._io: Optional[Tuple[Sequence[TensorSpec], Sequence[TensorSpec]]] = None
        self._profiles: Tuple[Profile, ...] = ()
        self.report: Optional[LoadReport] = None

    # ---- loading ----

    def _model_path(self) -> pathlib.Path:
        d = self.config.model_dir
        if self.config.default_model_filename:
            p = d / self.config.default_model_filename
            if not p.is_file():
                raise ModelLoadError(f"{self._what}: {p} does not exist")
            return p
        for name in ("model.plan", "model.onnx"):
            if (d / name).is_file():
                return d / name
        raise ModelLoadError(f"{self._what}: neither model.plan nor model.onnx in {d}")

    def _plan_from_onnx(self, trt: Any, path: pathlib.Path, share: bool) -> Tuple[bytes, Layout, bool, LoadReport]:
        """Builds (or takes from the cache) the plan; returns (plan, layout, every-profile-covers-max, report)."""
        cfg = self.config
        v = compat.trt_version(trt)
        builder: Optional[OnnxBuilder] = None
        if cfg.inputs:
            inputs = [(s.name, tuple(s.dims)) for s in cfg.inputs]
        else:  # auto-complete: the network says what the inputs are
            builder = OnnxBuilder(trt, path, self._what)
            inputs = [(i.name, i.shape[1:] if cfg.max_batch_size > 0 else i.shape) for i in builder.inputs()]
        logical = parse_profiles(cfg.parameters, inputs, cfg.max_batch_size)
        every = not has_profile_parameters(cfg.parameters)
        gap = batch_coverage_gap(logical, cfg.max_batch_size, every)
        if gap:
            raise ModelLoadError(f"{self._what}: {gap}")
        layout = layout_for_build(len(logical), cfg.instance_count, share)
        options = BuildOptions.from_parameters(cfg.parameters, [logical[i] for i in layout.physical_to_logical])
        options.check_version(v)
        gpu = compat.gpu_name(cfg.device_id)
        key = plan_cache_key(sha256_file(path), options, trt.__version__, gpu)
        cache = PlanCache(cfg.cache_dir or default_cache_dir())
        plan = cache.get(key) if options.plan_cache else None
        if plan is not None:
            log.info("%s: plan cache hit %s", self._what, cache.path(key))
            return plan, layout, every, LoadReport("onnx", path, key, True, 0.0, trt.__version__)
        t0 = time.monotonic()
        builder = builder or OnnxBuilder(trt, path, self._what)
        persist = options.timing_cache and compat.timing_cache_reloads(v)
        timing = cache.timing_cache_path(trt.__version__, gpu) if persist else None
        plan = builder.build(options, timing)
        build_s = time.monotonic() - t0
        if options.plan_cache:
            cache.put(key, plan, {"model": cfg.name, "onnx": str(path), "tensorrt": trt.__version__, "gpu": gpu,
                                  "options": options.canonical(), "build_s": round(build_s, 2)})
        return plan, layout, every, LoadReport("onnx", path, key, False, build_s, trt.__version__)

    def open(self) -> None:
        trt = compat.import_tensorrt()
        cupy = compat.import_cupy()
        cfg = self.config
        v = compat.trt_version(trt)
        share = compat.contexts_may_share_profile(v)
        path = self._model_path()
        self.direct_copy_min_bytes = _direct_copy_min_bytes(cfg)
        with cupy.cuda.Device(cfg.device_id):
            layout: Optional[Layout] = None
            if path.suffix == ".onnx":
                plan, layout, every, report = self._plan_from_onnx(trt, path, share)
            else:
                plan = path.read_bytes()
                every = not param_bool(cfg.parameters, "trtserve.split_batch_profiles", False)
                report = LoadReport("plan", path, tensorrt=trt.__version__)
            self._runtime = trt.Runtime(compat.logger())
            self._engine = deserialize(trt, self._runtime, plan, self._what)
            info = inspect_engine(trt, self._engine, self._what)
            validate(info, cfg, self._what, every)
            info = with_served_types(info, self._declared_types(info, path))
            if layout is None:
                layout = layout_for_plan(len(info.profiles), cfg.instance_count, share)
            self._info, self._layout = info, layout
            buckets = _graph_buckets(cfg)
            captured = []
            try:
                for i in range(cfg.instance_count):  # in order: on 8.6 instance 0 must take profile 0 first
                    inst = InstanceContext(trt, self._engine, info, i, layout.instance_to_physical[i], cfg.device_id,
                                           cfg.max_batch_size > 0, self._what, slots=cfg.batches_per_instance,
                                           busy_wait=param_bool(cfg.parameters, "trtserve.busy_wait", False))
                    self._instances.append(inst)
                    inst.open()
                    captured.append(inst.capture_graphs(buckets) if cfg.cuda_graphs else ())
            except BaseException:
                self.close()
                raise
        self.report = LoadReport(report.source, report.path, report.cache_key, report.cache_hit, report.build_s,
                                 report.tensorrt, tuple(captured))
        self._io = model_specs(info)
        self._profiles = self._make_profiles(info, layout)
        log.info("%s: ready, %d instance(s), %s", self._what, cfg.instance_count,
                 "; ".join(p.describe() + f" -> instances {list(p.instances)}" for p in self._profiles))

    def _declared_types(self, info: EngineInfo, path: pathlib.Path) -> Dict[str, str]:
        """Datatypes the model serves where they may differ from the engine's: the config's IO; without IO in the
        config (auto-complete), the ONNX file's declared types when TensorRT built INT32 IO from it, so that the
        model reports INT64 as the ONNX says (and as TensorRT 10+ builds it), the same on every version. A .plan
        without config IO serves the engine's own types."""
        cfg = self.config
        if cfg.inputs or cfg.outputs:
            return {s.name: s.datatype for s in list(cfg.inputs) + list(cfg.outputs)}
        if path.suffix == ".onnx" and any(t.wire == "INT32" for t in info.inputs + info.outputs):
            return onnx_declared_types(path)
        return {}

    @staticmethod
    def _make_profiles(info: EngineInfo, layout: Layout) -> Tuple[Profile, ...]:
        """Logical profiles that at least one instance serves, with their instances."""
        out = []
        for logical in sorted(set(layout.physical_to_logical)):
            instances = layout.instances_of(logical)
            if not instances:
                continue
            physical = layout.instance_to_physical[instances[0]]
            out.append(Profile(logical, dict(info.profiles[physical]), instances))
        return tuple(out)

    # ---- the contract ----

    def io(self) -> Tuple[Sequence[TensorSpec], Sequence[TensorSpec]]:
        """Engine IO with full shapes (batch dimension included, -1 where dynamic)."""
        if self._io is None:
            raise RuntimeError(f"{self._what}: io() before open()")
        return self._io

    def profiles(self) -> Sequence[Profile]:
        return self._profiles

    def check_request(self, inputs: Mapping[str, np.ndarray]) -> None:
        """Exact dtypes before batching: TensorRT never casts, and one bad request must not fail its batch."""
        info = self._info
        if info is None:
            return
        if self._checks_of is not info:
            self._request_checks = tuple((t.name, from_wire(t.served_wire).numpy, t.served_wire, t.converted)
                                         for t in info.inputs)
            self._checks_of = info
        for name, want, wire, converted in self._request_checks:
            a = inputs.get(name)
            if a is None:
                continue
            if a.dtype != want:
                raise InvalidArgument(f"{self._what}: input '{name}': datatype {a.dtype} does not match the "
                                      f"model's {wire} ({want})")
            if converted:  # INT64 narrowed to the engine's INT32: every value must fit
                bad = compat.int32_range_error(a) if is_host(a) else self._device_range_error(a)
                if bad:
                    raise InvalidArgument(f"{self._what}: input '{name}': {bad}")

    def _device_range_error(self, a: Any) -> str:
        """``int32_range_error`` of a request's CUDA shared-memory input (or a batch of pieces), read on the GPU."""
        cupy = compat.import_cupy()
        with cupy.cuda.Device(self.config.device_id):
            parts = getattr(a, "parts", (a,))
            return next((e for e in (compat.int32_range_error(p if is_host(p) else cupy.asarray(p)) for p in parts)
                         if e), "")

    def staging(self, instance: int, shapes: Mapping[str, Tuple[int, ...]]) -> Optional[Dict[str, np.ndarray]]:
        if not 0 <= instance < len(self._instances):
            return None
        return self._instances[instance].staging(shapes)

    def run(self, instance: int, inputs: Dict[str, np.ndarray], outputs: Sequence[str]) -> BatchResult:
        return self.run_to_device(instance, inputs, outputs, ())

    def run_to_device(self, instance: int, inputs: Dict[str, np.ndarray], outputs: Sequence[str],
                      destinations: Sequence[Destination]) -> BatchResult:
        return self._instance(instance).run(inputs, outputs, destinations)

    def enqueue(self, instance: int, inputs: Dict[str, np.ndarray], outputs: Sequence[str],
                destinations: Sequence[Destination] = ()) -> InFlight:
        return self._instance(instance).enqueue(inputs, outputs, destinations)

    def collect(self, instance: int, ticket: object) -> BatchResult:
        assert isinstance(ticket, InFlight)
        return self._instance(instance).collect(ticket)

    def wait(self, instance: int, ticket: object) -> bool:
        assert isinstance(ticket, InFlight)
        return self._instance(instance).wait(ticket)

    def _instance(self, instance: int) -> InstanceContext:
        if not 0 <= instance < len(self._instances):
            raise InvalidArgument(f"{self._what}: no instance {instance} (have {len(self._instances)})")
        return self._instances[instance]

    def close(self) -> None:
        """Reverse order of construction: contexts (and their graphs, buffers), engine, runtime."""
        for inst in reversed(self._instances):
            inst.close()
        self._instances = []
        self._engine = None
        self._runtime = None


def _graph_buckets(config: BackendConfig) -> Optional[List[int]]:
    """Explicit graph batch sizes from parameter trtserve.graph_batch_sizes ("1,2,4,8"), else None (powers of 2)."""
    raw = config.parameters.get("trtserve.graph_batch_sizes", "").strip()
    if not raw:
        return None
    try:
        return [int(x) for x in raw.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise ModelLoadError(f"parameter 'trtserve.graph_batch_sizes': expected '1,2,4,...', got {raw!r}") from None


# Below this a request's tensor goes through the instance's pinned buffer with the rest of its batch: one more
# cudaMemcpyAsync call from Python per request costs more than the host copies it saves for small tensors, and
# the 1-row requests of small models would pay it hundreds of times per batch. The value sits between those two
# cases (a 1-row request of a small model, a 256-row request of a wide one); the crossover itself is not measured.
DIRECT_COPY_MIN_BYTES = 16384


def _direct_copy_min_bytes(config: BackendConfig) -> Optional[int]:
    """Parameter trtserve.direct_copy_min_bytes (bytes; 0 = never copy a request's tensor directly), else the
    default."""
    return param_int(config.parameters, "trtserve.direct_copy_min_bytes", DIRECT_COPY_MIN_BYTES) or None
