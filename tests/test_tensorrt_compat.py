"""CPU tests for the pure parts of the TensorRT backend: version rules, the dtype table, profile parameters,
instance layout, build options / plan-cache key, engine validation, graph buckets, import without TensorRT."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from trtserve import dtypes
from trtserve.server.engine.backends.base import BackendConfig, ShapeRange, TensorSpec
from trtserve.server.engine.backends.tensorrt import compat
from trtserve.server.engine.backends.tensorrt.build import BuildOptions, PlanCache, param_bool, param_int, plan_cache_key
from trtserve.server.engine.backends.tensorrt.engine import EngineInfo, IOTensor, model_specs, validate
from trtserve.server.engine.backends.tensorrt.profiles import (
    batch_coverage_gap,
    has_profile_parameters,
    layout_for_build,
    layout_for_plan,
    parse_profiles,
)
from trtserve.server.errors import ModelLoadError
from trtserve.server.engine.backends.tensorrt.graphs import bucket_sizes, pick_bucket

ROOT = pathlib.Path(__file__).resolve().parent.parent


# ---- versions ----


@pytest.mark.parametrize(
    "text, expected",
    [("8.6.0", (8, 6, 0)), ("10.3.0.26", (10, 3, 0, 26)), ("11.0.0.post1", (11, 0, 0)), ("10", (10,))],
)
def test_parse_version(text: str, expected: tuple) -> None:
    assert compat.parse_version(text) == expected


def test_parse_version_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        compat.parse_version("abc")


@pytest.mark.parametrize(
    "v, share, weak, explicit, monitor, user_mem",
    [
        ((8, 6, 0), False, True, True, False, False),
        ((10, 0, 1), True, True, False, True, False),
        ((10, 3, 0), True, True, False, True, True),
        ((11, 0, 0), True, False, False, True, True),
    ],
)
def test_version_predicates(v: tuple, share: bool, weak: bool, explicit: bool, monitor: bool, user_mem: bool) -> None:
    assert compat.contexts_may_share_profile(v) is share
    assert compat.has_weak_typing_flags(v) is weak
    assert compat.needs_explicit_batch_flag(v) is explicit
    assert compat.has_progress_monitor(v) is monitor
    assert compat.has_user_managed_profile_memory(v) is user_mem


# ---- dtype table ----


def test_dtype_table_rows_are_known_wire_types() -> None:
    for row in compat.TRT_TYPES:
        assert row.wire in dtypes.BY_WIRE
        assert compat.wire_of_trt(row.trt_name) == row.wire
    assert dtypes.from_wire("BF16").numpy == np.dtype(np.uint16)  # BF16 travels raw


def test_dtype_table_by_version() -> None:
    assert compat.supported_wire_types((8, 6)) == ["FP32", "FP16", "INT8", "INT32", "BOOL", "UINT8"]
    assert set(compat.supported_wire_types((10, 0))) == {"FP32", "FP16", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8"}
    assert compat.trt_name_of_wire("FP16", (8, 6)) == "HALF"
    with pytest.raises(KeyError, match="INT64 needs TensorRT >= 10.0"):
        compat.trt_name_of_wire("INT64", (8, 6))
    with pytest.raises(KeyError, match="FP64"):
        compat.trt_name_of_wire("FP64", (10, 0))
    with pytest.raises(KeyError, match="FP8"):
        compat.wire_of_trt("FP8")


# ---- profiles from parameters ----

X = [("x", (16,))]


def test_default_profile_covers_max_batch() -> None:
    [p] = parse_profiles({}, X, 64)
    assert p["x"] == ShapeRange((1, 16), (64, 16), (64, 16))
    assert not has_profile_parameters({})


def test_json_profiles_batch_and_full_ranges() -> None:
    params = {
        "trtserve.profiles": json.dumps(
            [{"batch": [1, 4, 8]}, {"x": {"min": [9, 16], "opt": [32, 16], "max": [64, 16]}}]
        )
    }
    p0, p1 = parse_profiles(params, X, 64)
    assert p0["x"] == ShapeRange((1, 16), (4, 16), (8, 16))
    assert p1["x"] == ShapeRange((9, 16), (32, 16), (64, 16))
    assert has_profile_parameters(params)
    assert batch_coverage_gap([p0, p1], 64, every_profile=False) is None
    assert "profile 0 allows at most 8 rows" in batch_coverage_gap([p0, p1], 64, every_profile=True)


def test_per_key_profiles_equal_json() -> None:
    params = {"trtserve.profile.0.batch": "1;4;8", "trtserve.profile.1.x": "9x16;32x16;64x16"}
    assert parse_profiles(params, X, 64) == parse_profiles(
        {"trtserve.profiles": '[{"batch": [1,4,8]}, {"x": "9,16;32,16;64,16"}]'}, X, 64
    )


def test_dynamic_dims_need_explicit_ranges() -> None:
    with pytest.raises(ModelLoadError, match=r"input 'x'.*variable dimension\(s\) \[1\]"):
        parse_profiles({}, [("x", (3, -1))], 8)
    [p] = parse_profiles({"trtserve.profile.0.x": "1x3x8;4x3x16;8x3x32"}, [("x", (3, -1))], 8)
    assert p["x"].max == (8, 3, 32)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"trtserve.profiles": "[{"}, "not valid JSON"),
        ({"trtserve.profiles": "{}"}, "non-empty JSON list"),
        ({"trtserve.profiles": '[{"y": "1x16;1x16;1x16"}]'}, r"unknown input\(s\) \['y'\]"),
        ({"trtserve.profiles": '[{"batch": [1, 4, 128]}]'}, "must lie within 1..max_batch_size"),
        ({"trtserve.profiles": '[{"batch": [4, 2, 8]}]'}, "min <= opt <= max"),
        ({"trtserve.profiles": '[{"x": "1x15;2x15;4x15"}]'}, "dim 1 is fixed to 16"),
        ({"trtserve.profiles": '[{"x": "1;2;4"}]'}, "has rank 1, the input has rank 2"),
        ({"trtserve.profiles": '[{"batch": [1,2,4], "x": "1x16;3x16;4x16"}]'}, "disagrees with the profile's batch"),
        ({"trtserve.profiles": "[{}]", "trtserve.profile.0.batch": "1;1;1"}, "not both"),
        ({"trtserve.profile.1.batch": "1;1;1"}, "without gaps"),
        ({"trtserve.profiles": '[{"x": "1xa;2x16;4x16"}]'}, "is not a shape"),
    ],
)
def test_profile_errors_say_what_is_wrong(params: dict, match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        parse_profiles(params, X, 64)


def test_unbatched_model_profiles() -> None:
    [p] = parse_profiles({}, [("x", (2, 3))], 0)
    assert p["x"] == ShapeRange((2, 3), (2, 3), (2, 3))
    with pytest.raises(ModelLoadError, match="'batch' needs max_batch_size > 0"):
        parse_profiles({"trtserve.profiles": '[{"batch": [1,1,1]}]'}, [("x", (2, 3))], 0)


def test_coverage_gap_lists_missing_batches() -> None:
    p = [{"x": ShapeRange((1, 16), (2, 16), (4, 16))}, {"x": ShapeRange((9, 16), (9, 16), (16, 16))}]
    assert "[5, 6, 7, 8]" in batch_coverage_gap(p, 16, every_profile=False)


# ---- instances <-> profiles ----


def test_layout_shared_profiles_round_robin() -> None:
    lay = layout_for_build(2, 4, share=True)
    assert lay.physical_to_logical == (0, 1)
    assert lay.instance_to_physical == (0, 1, 0, 1)
    assert lay.instances_of(0) == (0, 2)


def test_layout_on_86_gives_each_instance_its_own_copy() -> None:
    lay = layout_for_build(2, 3, share=False)
    assert lay.physical_to_logical == (0, 1, 0)
    assert lay.instance_to_physical == (0, 1, 2)
    assert [lay.instance_logical(i) for i in range(3)] == [0, 1, 0]
    assert layout_for_build(3, 1, share=False).physical_to_logical == (0, 1, 2)  # unserved ones still built


def test_plan_layout_on_86_refuses_more_instances_than_profiles() -> None:
    with pytest.raises(ModelLoadError, match="every live execution context needs its own profile"):
        layout_for_plan(1, 2, share=False)
    assert layout_for_plan(1, 2, share=True).instance_to_physical == (0, 0)


# ---- build options and the plan cache key ----


def test_build_options_from_parameters() -> None:
    prof = parse_profiles({}, X, 8)
    o = BuildOptions.from_parameters({"trtserve.fp16": "true", "trtserve.workspace_mb": "256"}, prof)
    assert o.fp16 and o.tf32 and o.workspace_bytes == 256 << 20
    with pytest.raises(ModelLoadError, match="removed in TensorRT 11"):
        o.check_version((11, 0))
    o.check_version((8, 6))
    with pytest.raises(ModelLoadError, match="trtserve.fp16.*expected true/false"):
        param_bool({"trtserve.fp16": "maybe"}, "trtserve.fp16", False)
    with pytest.raises(ModelLoadError, match="outside 0..5"):
        param_int({"trtserve.optimization_level": "9"}, "trtserve.optimization_level", None, 0, 5)


def test_plan_cache_key_changes_with_every_input() -> None:
    prof = parse_profiles({}, X, 8)
    base = BuildOptions.from_parameters({}, prof)
    k = plan_cache_key("aa", base, "8.6.0", "H100 sm_90")
    assert k == plan_cache_key("aa", BuildOptions.from_parameters({"trtserve.plan_cache": "false"}, prof), "8.6.0", "H100 sm_90")
    others = {
        plan_cache_key("ab", base, "8.6.0", "H100 sm_90"),
        plan_cache_key("aa", base, "10.3.0", "H100 sm_90"),
        plan_cache_key("aa", base, "8.6.0", "H200 sm_90"),
        plan_cache_key("aa", BuildOptions.from_parameters({"trtserve.fp16": "1"}, prof), "8.6.0", "H100 sm_90"),
        plan_cache_key("aa", BuildOptions.from_parameters({}, parse_profiles({}, X, 16)), "8.6.0", "H100 sm_90"),
    }
    assert k not in others and len(others) == 5


def test_plan_cache_roundtrip(tmp_path: pathlib.Path) -> None:
    cache = PlanCache(tmp_path / "plans")
    assert cache.get("k") is None
    cache.put("k", b"plan-bytes", {"model": "m"})
    assert cache.get("k") == b"plan-bytes"
    assert json.loads((tmp_path / "plans" / "k.json").read_text())["model"] == "m"


# ---- engine validation (pure: EngineInfo is plain data) ----


def _info(out_shape: tuple = (-1, 4), in_wire: str = "FP32", max_batch: int = 8) -> EngineInfo:
    r = ShapeRange((1, 16), (max_batch, 16), (max_batch, 16))
    return EngineInfo(
        inputs=(IOTensor("x", True, in_wire, (-1, 16)),),
        outputs=(IOTensor("y", False, "FP32", out_shape),),
        profiles=({"x": r}, {"x": r}),
    )


def _config(**kw: object) -> BackendConfig:
    base = dict(
        name="mlp", version="1", model_dir=pathlib.Path("/nonexistent"), default_model_filename="", max_batch_size=8,
        inputs=[TensorSpec("x", "FP32", (16,))], outputs=[TensorSpec("y", "FP32", (4,))],
    )
    base.update(kw)
    return BackendConfig(**base)  # type: ignore[arg-type]


def test_validate_accepts_matching_engine_with_two_profiles() -> None:
    validate(_info(), _config(), "m")  # 2 profiles, 2 IO tensors: the v3 count is not multiplied by profiles


@pytest.mark.parametrize(
    "info, config, match",
    [
        (_info(), _config(outputs=[]), r"engine has 2 IO tensors \(x, y\) but the config declares 1"),
        (_info(), _config(outputs=[TensorSpec("z", "FP32", (4,))]), r"config output 'z' is not an engine output"),
        (_info(in_wire="FP16"), _config(), r"input 'x': config datatype FP32, the engine has FP16"),
        (_info(), _config(inputs=[TensorSpec("x", "FP32", (4, 4))]), r"input 'x'.*rank 3.*rank 2"),
        (_info(), _config(outputs=[TensorSpec("y", "FP32", (5,))]), r"output 'y'.*fixes dim 1 to 4"),
        (_info(out_shape=(8, 4)), _config(), r"output 'y'.*needs a dynamic first \(batch\) dimension"),
        (_info(max_batch=4), _config(), r"profile 0 allows at most 4 rows but max_batch_size is 8"),
    ],
)
def test_validate_errors_name_the_tensor(info: EngineInfo, config: BackendConfig, match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        validate(info, config, "m")


def test_model_specs_are_full_engine_shapes() -> None:
    ins, outs = model_specs(_info())
    assert ins == [TensorSpec("x", "FP32", (-1, 16))] and outs == [TensorSpec("y", "FP32", (-1, 4))]
    validate(_info(), _config(inputs=[], outputs=[]), "m")  # auto-complete: no declared IO


# ---- CUDA graph buckets ----


def test_bucket_sizes() -> None:
    assert bucket_sizes(1, 64) == (1, 2, 4, 8, 16, 32, 64)
    assert bucket_sizes(9, 64) == (9, 16, 32, 64)
    assert bucket_sizes(1, 24, [1, 3, 100]) == (1, 3, 24)
    assert pick_bucket((1, 2, 4, 8), 3) == 4 and pick_bucket((1, 2), 3) is None


# ---- import without TensorRT / CuPy ----


def test_backend_imports_and_reports_unavailable_without_tensorrt(tmp_path: pathlib.Path) -> None:
    code = f"""
import sys, pathlib
sys.modules['tensorrt'] = None  # import fails as if not installed
sys.modules['cupy'] = None
from trtserve.server.engine.backends.tensorrt import TensorRTBackend, compat
from trtserve.server.engine.backends.base import BackendConfig
from trtserve.server.errors import ModelLoadError
ok, why = compat.available()
assert not ok and 'unavailable' in why, why
b = TensorRTBackend(BackendConfig('m', '1', pathlib.Path({str(tmp_path)!r}), '', 8, [], []))
try:
    b.open()
except ModelLoadError as e:
    print('REFUSED', e)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "REFUSED TensorRT backend unavailable: cannot import tensorrt" in r.stdout
