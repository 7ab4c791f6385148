"""Everything that differs between TensorRT 8.6, 10.x and 11.x, as named predicates, plus lazy imports.

This is the only module that reads ``trt.__version__``; the rest of the backend asks questions such as
``contexts_may_share_profile(v)`` so that a version rule lives in one place with its reason. The module
imports without TensorRT or CuPy installed: the server then reports the backend unavailable.
(Sources for each rule: shared/reference/tensorrt-api.md §1.4 and §2.1.)
"""
from __future__ import annotations

import functools
import logging
import re
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Dict, List, Tuple

from trtserve.dtypes import from_wire
from trtserve.server.errors import ModelLoadError

Version = Tuple[int, ...]

log = logging.getLogger("trtserve.tensorrt")


def parse_version(text: str) -> Version:
    """"10.3.0.26" -> (10, 3, 0, 26); non-numeric suffixes ("8.6.0.post1") are dropped."""
    parts = []
    for piece in text.split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group(0)))
    if not parts:
        raise ValueError(f"not a TensorRT version: {text!r}")
    return tuple(parts)


# ---- version rules (pure, so the CPU tests cover every branch) ----


def contexts_may_share_profile(v: Version) -> bool:
    """10.0 made profile sharing always on; on 8.6 a second context on a taken profile errors, then crashes."""
    return v >= (10, 0)


def has_weak_typing_flags(v: Version) -> bool:
    """BuilderFlag.FP16/BF16/INT8 exist before 11.0; 11.0 builds strongly typed only."""
    return v < (11, 0)


def has_bf16(v: Version) -> bool:
    """DataType.BF16 (and BuilderFlag.BF16) arrived in 9.0."""
    return v >= (9, 0)


def has_int64_io(v: Version) -> bool:
    """INT64 engine IO arrived in 10.0; 8.6's ONNX parser casts INT64 down to INT32."""
    return v >= (10, 0)


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def narrows_int64(config_wire: str, engine_wire: str) -> bool:
    """Whether a tensor the config (or the ONNX file) declares INT64 is served on an engine tensor of INT32: what
    TensorRT before 10 makes of ONNX INT64 IO. The server then takes and answers INT64 and converts at the
    engine's edge (inputs narrowed after a per-request range check, outputs widened), so one repository serves
    unchanged on 8.6/9 and on 10+, where the engine keeps INT64 and nothing is converted."""
    return config_wire == "INT64" and engine_wire == "INT32"


def int32_range_error(array: Any) -> str:
    """"" when every value of integer ``array`` (host NumPy or CuPy) fits INT32, else what lies outside."""
    if array.size == 0:
        return ""
    lo, hi = int(array.min()), int(array.max())
    if lo >= INT32_MIN and hi <= INT32_MAX:
        return ""
    bad = lo if lo < INT32_MIN else hi
    return (f"value {bad} is outside the INT32 range [{INT32_MIN}, {INT32_MAX}] that this engine takes for it "
            f"(TensorRT before 10 serves INT64 IO as INT32)")


def needs_explicit_batch_flag(v: Version) -> bool:
    """8.x needs NetworkDefinitionCreationFlag.EXPLICIT_BATCH; 10.x ignores it; 11.0 removed it."""
    return v < (10, 0)


def has_progress_monitor(v: Version) -> bool:
    """trt.IProgressMonitor (builder progress callbacks) arrived in 10.0."""
    return v >= (10, 0)


def has_user_managed_profile_memory(v: Version) -> bool:
    """USER_MANAGED contexts + get_device_memory_size_for_profile_v2 + set_device_memory: 10.1+."""
    return v >= (10, 1)


def timing_cache_reloads(v: Version) -> bool:
    """A saved timing cache loads back on 10+; 8.6.0 fails to deserialize its Myelin entries ("myelinCache.h::
    deserializeFromBuffer ... Error Code 1", then "The timing cache will not be used!"; seen on an H100), so on 8.6
    the timing cache is not persisted."""
    return v >= (10, 0)


def has_builder_optimization_level(v: Version) -> bool:
    """IBuilderConfig.builder_optimization_level arrived in 8.6."""
    return v >= (8, 6)


# ---- the one dtype table: wire name <-> TensorRT DataType member <-> NumPy storage type ----


@dataclass(frozen=True)
class TrtType:
    wire: str  # KServe v2 name, e.g. "FP32"; its NumPy storage type comes from trtserve.dtypes
    trt_name: str  # attribute of trt.DataType
    since: Version  # first TensorRT version with this IO type


TRT_TYPES: Tuple[TrtType, ...] = (
    TrtType("FP32", "FLOAT", (8, 0)),
    TrtType("FP16", "HALF", (8, 0)),
    TrtType("BF16", "BF16", (9, 0)),  # no NumPy type: travels as raw uint16 bit patterns
    TrtType("INT8", "INT8", (8, 0)),
    TrtType("INT32", "INT32", (8, 0)),
    TrtType("INT64", "INT64", (10, 0)),
    TrtType("BOOL", "BOOL", (8, 0)),
    TrtType("UINT8", "UINT8", (8, 5)),
)
_BY_TRT_NAME: Dict[str, TrtType] = {t.trt_name: t for t in TRT_TYPES}
_BY_WIRE: Dict[str, TrtType] = {t.wire: t for t in TRT_TYPES}


def wire_of_trt(trt_dtype: Any) -> str:
    """trt.DataType member (or its name) -> wire name; KeyError naming the type if we cannot serve it."""
    name = trt_dtype if isinstance(trt_dtype, str) else trt_dtype.name
    try:
        return _BY_TRT_NAME[name].wire
    except KeyError:
        raise KeyError(f"TensorRT type {name} is not served (supported: {', '.join(_BY_TRT_NAME)})") from None


def trt_name_of_wire(wire: str, v: Version) -> str:
    """Wire name -> trt.DataType attribute name, if this TensorRT version has that IO type."""
    row = _BY_WIRE.get(wire)
    if row is None:
        raise KeyError(f"datatype {wire} has no TensorRT IO type")
    if v < row.since:
        raise KeyError(f"datatype {wire} needs TensorRT >= {'.'.join(map(str, row.since))}")
    return row.trt_name


def supported_wire_types(v: Version) -> List[str]:
    """Wire names this TensorRT version can use for engine IO."""
    return [t.wire for t in TRT_TYPES if v >= t.since]


def itemsize_of_wire(wire: str) -> int:
    return from_wire(wire).itemsize


# ---- lazy imports ----


def import_tensorrt() -> ModuleType:
    """Imports tensorrt, or fails the model load saying the backend is unavailable here (the server runs on)."""
    try:
        import tensorrt  # noqa: PLC0415 - optional dependency, imported on first use

        return tensorrt
    except ImportError as e:  # also covers a missing libnvinfer.so behind the Python module
        raise ModelLoadError(f"TensorRT backend unavailable: cannot import tensorrt ({e})") from None


def import_cupy() -> ModuleType:
    """Imports cupy, or fails the model load saying why."""
    try:
        import cupy  # noqa: PLC0415

        return cupy
    except ImportError as e:
        raise ModelLoadError(f"TensorRT backend unavailable: cannot import cupy ({e})") from None


def available() -> Tuple[bool, str]:
    """(True, version) when tensorrt and cupy import and a CUDA device is visible, else (False, reason)."""
    try:
        trt = import_tensorrt()
        cupy = import_cupy()
        n = cupy.cuda.runtime.getDeviceCount()
    except ModelLoadError as e:
        return False, e.message
    except Exception as e:  # noqa: BLE001 - CUDA driver errors have no common base class we can import here
        return False, f"no usable CUDA device ({e})"
    if n < 1:
        return False, "no CUDA device visible"
    return True, trt.__version__


def trt_version(trt: ModuleType) -> Version:
    return parse_version(trt.__version__)


# ---- the process-wide TensorRT logger ----


@functools.lru_cache(maxsize=1)
def logger() -> Any:
    """The one trt.ILogger of the process. TensorRT keeps the first logger it is given as a library singleton,
    so a second, short-lived logger object would leave it holding a dangling pointer; hence one, kept forever.
    It forwards to Python logging and remembers each thread's last error, so our exceptions can quote it."""
    trt = import_tensorrt()

    class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.local = threading.local()

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.local.last_error = msg
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.WARNING:
                log.warning("TensorRT: %s", msg)
            elif severity == trt.ILogger.INFO:
                log.debug("TensorRT: %s", msg)

        def take_error(self) -> str:
            """This thread's last TensorRT error message ("" if none), cleared on read."""
            msg = getattr(self.local, "last_error", "")
            self.local.last_error = ""
            return msg

    return _Logger()


def last_error() -> str:
    """The calling thread's last TensorRT error, for error messages ("" if none or no logger yet)."""
    if logger.cache_info().currsize == 0:
        return ""
    return logger().take_error()


def with_trt_error(message: str) -> str:
    """Appends TensorRT's own last error text to ``message`` when there is one."""
    detail = last_error()
    return f"{message}: TensorRT said: {detail}" if detail else message


def gpu_name(device_id: int) -> str:
    """The GPU's product name and compute capability (part of the plan-cache key: plans are per GPU model)."""
    cupy = import_cupy()
    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"]
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return f"{name} sm_{props['major']}{props['minor']}"

