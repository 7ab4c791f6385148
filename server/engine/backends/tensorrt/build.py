"""ONNX -> TensorRT engine at load time, with a plan cache on disk so that a restart does not rebuild.

Build options come from config.pbtxt ``parameters`` (profiles: see profiles.py):

    trtserve.fp16 = "true"            BuilderFlag.FP16 (TensorRT < 11; 11 is strongly typed: export FP16 ONNX)
    trtserve.bf16 = "true"            BuilderFlag.BF16 (9.x-10.x)
    trtserve.tf32 = "false"           clear BuilderFlag.TF32 (on by default)
    trtserve.workspace_mb = "1024"    workspace memory pool limit
    trtserve.optimization_level = "3" builder_optimization_level (0-5; lower builds faster)
    trtserve.timing_cache = "false"   do not load/save the timing cache (saved on TensorRT >= 10 only)
    trtserve.plan_cache = "false"     always rebuild, never write a plan

The cache key is sha256 of: the ONNX bytes' sha256, the resolved build options (engine profiles included),
the TensorRT version and the GPU model, so a changed model, config, TensorRT or GPU never reuses a plan.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import tempfile
import threading
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from trtserve.server.errors import ModelLoadError

from . import compat
from .profiles import ProfileSpec, to_jsonable

log = logging.getLogger("trtserve.tensorrt.build")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def param_bool(parameters: Mapping[str, str], key: str, default: bool) -> bool:
    if key not in parameters:
        return default
    v = parameters[key].strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ModelLoadError(f"parameter '{key}': expected true/false, got {parameters[key]!r}")


def param_int(
    parameters: Mapping[str, str], key: str, default: Optional[int], lo: int = 0, hi: int = 1 << 40
) -> Optional[int]:
    if key not in parameters:
        return default
    try:
        v = int(parameters[key].strip())
    except ValueError:
        raise ModelLoadError(f"parameter '{key}': expected an integer, got {parameters[key]!r}") from None
    if not lo <= v <= hi:
        raise ModelLoadError(f"parameter '{key}': {v} is outside {lo}..{hi}")
    return v


@dataclass(frozen=True)
class BuildOptions:
    """Everything that changes the built engine besides the ONNX bytes, TensorRT and the GPU."""

    profiles: Tuple[ProfileSpec, ...]  # engine profiles in order (8.6: one copy per instance)
    fp16: bool = False
    bf16: bool = False
    tf32: bool = True
    workspace_bytes: int = 0  # 0: TensorRT's default (the device's memory)
    optimization_level: Optional[int] = None
    timing_cache: bool = True
    plan_cache: bool = True

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str], profiles: Sequence[ProfileSpec]) -> "BuildOptions":
        mb = param_int(parameters, "trtserve.workspace_mb", 0, 0, 1 << 24)
        return cls(
            profiles=tuple(profiles),
            fp16=param_bool(parameters, "trtserve.fp16", False),
            bf16=param_bool(parameters, "trtserve.bf16", False),
            tf32=param_bool(parameters, "trtserve.tf32", True),
            workspace_bytes=(mb or 0) << 20,
            optimization_level=param_int(parameters, "trtserve.optimization_level", None, 0, 5),
            timing_cache=param_bool(parameters, "trtserve.timing_cache", True),
            plan_cache=param_bool(parameters, "trtserve.plan_cache", True),
        )

    def check_version(self, v: compat.Version) -> None:
        """Refuses options this TensorRT cannot honour, instead of silently building something else."""
        if (self.fp16 or self.bf16) and not compat.has_weak_typing_flags(v):
            raise ModelLoadError(
                "trtserve.fp16/bf16 need weak typing, removed in TensorRT 11 (strongly typed): export the ONNX "
                "model with FP16/BF16 weights instead"
            )
        if self.bf16 and not compat.has_bf16(v):
            raise ModelLoadError("trtserve.bf16 needs TensorRT >= 9.0")

    def canonical(self) -> str:
        d = dataclasses.asdict(self)
        d["profiles"] = to_jsonable(self.profiles)
        d.pop("plan_cache")  # whether to cache does not change the engine
        d.pop("timing_cache")
        return json.dumps(d, sort_keys=True, separators=(",", ":"))


def plan_cache_key(onnx_sha256: str, options: BuildOptions, trt_version: str, gpu: str) -> str:
    """Content key of a built plan."""
    blob = json.dumps(
        {"onnx": onnx_sha256, "options": options.canonical(), "tensorrt": trt_version, "gpu": gpu},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def default_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "trtserve" / "plans"


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    """Write-then-rename, so a concurrent reader never sees half a plan."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


class PlanCache:
    """Built plans on disk: <dir>/<key>.plan plus a JSON note saying what was built."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory

    def path(self, key: str) -> pathlib.Path:
        return self.directory / f"{key}.plan"

    def get(self, key: str) -> Optional[bytes]:
        p = self.path(key)
        try:
            return p.read_bytes()
        except FileNotFoundError:
            return None

    def put(self, key: str, plan: bytes, note: Mapping[str, Any]) -> None:
        try:
            _write_atomic(self.path(key), plan)
            _write_atomic(self.directory / f"{key}.json", json.dumps(dict(note), indent=1, sort_keys=True).encode())
        except OSError as e:  # a read-only cache must not fail the load: the engine is built already
            log.warning("could not write plan cache %s: %s", self.directory, e)

    def timing_cache_path(self, trt_version: str, gpu: str) -> pathlib.Path:
        return self.directory / f"timing-{_slug(trt_version)}-{_slug(gpu)}.cache"


class _Heartbeat:
    """Logs "still building" every ``period_s`` while a blocking build runs (8.6 has no progress monitor)."""

    def __init__(self, what: str, period_s: float = 15.0) -> None:
        self._what = what
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="trt-build-heartbeat", daemon=True)
        self._t0 = time.monotonic()

    def _loop(self) -> None:
        while not self._stop.wait(self._period_s):
            log.info("%s: still building (%.0f s)", self._what, time.monotonic() - self._t0)

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _progress_monitor(trt: ModuleType, what: str) -> Any:
    """A trt.IProgressMonitor logging top-level build phases (TensorRT >= 10)."""

    class _Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: Optional[str], num_steps: int) -> None:
            if parent_phase is None:
                log.info("%s: %s (%d steps)", what, phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            log.debug("%s: %s done", what, phase_name)

    return _Monitor()


@dataclass(frozen=True)
class NetworkInput:
    name: str
    wire: str
    shape: Tuple[int, ...]  # full shape, -1 where dynamic


class OnnxBuilder:
    """Parses one ONNX file into a TensorRT network and builds serialized plans from it.

    Keep it for one build only: builder, network and parser must live together and are used by one thread."""

    def __init__(self, trt: ModuleType, onnx_path: pathlib.Path, what: str) -> None:
        self._trt = trt
        self._path = onnx_path
        self._what = what
        v = compat.trt_version(trt)
        self._builder = trt.Builder(compat.logger())
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if compat.needs_explicit_batch_flag(v) else 0
        self._network = self._builder.create_network(flags)
        self._parser = trt.OnnxParser(self._network, compat.logger())
        t0 = time.monotonic()
        log.info("%s: parsing %s", what, onnx_path)
        if not self._parser.parse_from_file(str(onnx_path)):
            errors = [str(self._parser.get_error(i)) for i in range(self._parser.num_errors)]
            detail = "; ".join(errors or ["no detail"])
            raise ModelLoadError(f"{what}: TensorRT could not parse {onnx_path.name}: {detail}")
        log.info("%s: parsed in %.1f s (%d layers)", what, time.monotonic() - t0, self._network.num_layers)

    def inputs(self) -> List[NetworkInput]:
        out = []
        for i in range(self._network.num_inputs):
            t = self._network.get_input(i)
            try:
                wire = compat.wire_of_trt(t.dtype)
            except KeyError as e:
                raise ModelLoadError(f"{self._what}: input '{t.name}': {e.args[0]}") from None
            out.append(NetworkInput(t.name, wire, tuple(t.shape)))
        return out

    def build(self, options: BuildOptions, timing_cache_path: Optional[pathlib.Path]) -> bytes:
        trt = self._trt
        v = compat.trt_version(trt)
        options.check_version(v)
        config = self._builder.create_builder_config()
        for spec in options.profiles:
            profile = self._builder.create_optimization_profile()
            for name, r in spec.items():
                profile.set_shape(name, r.min, r.opt, r.max)
            if config.add_optimization_profile(profile) < 0:
                raise ModelLoadError(f"{self._what}: TensorRT rejected optimization profile {to_jsonable([spec])[0]}")
        if options.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if options.bf16:
            config.set_flag(trt.BuilderFlag.BF16)
        if not options.tf32:
            config.clear_flag(trt.BuilderFlag.TF32)
        if options.workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
        if options.optimization_level is not None and compat.has_builder_optimization_level(v):
            config.builder_optimization_level = options.optimization_level
        cache = None
        if timing_cache_path is not None:
            blob = timing_cache_path.read_bytes() if timing_cache_path.exists() else b""
            cache = config.create_timing_cache(blob)
            if not config.set_timing_cache(cache, False):
                log.warning("%s: timing cache %s does not fit this GPU; starting a new one", self._what,
                            timing_cache_path)
                cache = config.create_timing_cache(b"")
                config.set_timing_cache(cache, False)
        if compat.has_progress_monitor(v):
            config.progress_monitor = _progress_monitor(trt, self._what)
        log.info(
            "%s: building engine (%d profile(s), fp16=%s, tf32=%s); this can take minutes",
            self._what, len(options.profiles), options.fp16, options.tf32,
        )
        t0 = time.monotonic()
        with _Heartbeat(self._what):
            plan = self._builder.build_serialized_network(self._network, config)
        if plan is None:
            raise ModelLoadError(compat.with_trt_error(f"{self._what}: TensorRT failed to build the engine"))
        data = bytes(memoryview(plan))
        log.info("%s: built in %.1f s (%.1f MiB plan)", self._what, time.monotonic() - t0, len(data) / 2**20)
        if cache is not None and timing_cache_path is not None:
            try:
                _write_atomic(timing_cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
            except OSError as e:
                log.warning("%s: could not save timing cache: %s", self._what, e)
        return data


def onnx_declared_types(path: pathlib.Path) -> Dict[str, str]:
    """Graph input/output name -> "INT64" for the tensors the ONNX file declares INT64 (what TensorRT before 10
    turns into INT32 engine IO); {} when the ``onnx`` package is not installed (then the engine's types are
    served). Weights stored outside the file are not read."""
    try:
        import onnx  # noqa: PLC0415 - optional here (the gpu extras install it)
    except ImportError:
        log.warning("%s: the onnx package is not installed; INT64 IO that TensorRT narrowed to INT32 is served as "
                    "INT32 unless config.pbtxt declares it INT64", path)
        return {}
    model = onnx.load(str(path), load_external_data=False)
    return {v.name: "INT64" for v in list(model.graph.input) + list(model.graph.output)
            if v.type.tensor_type.elem_type == onnx.TensorProto.INT64}


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
