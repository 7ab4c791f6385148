"""INT64 served on an INT32 engine (what TensorRT 8.6/9 builds from ONNX INT64 IO), on the CPU: the config check,
the served types, the per-request range check, narrowing on the way in and widening on the way out, through the
simulated stream and context of test_tensorrt_context_sim. The real engine: tests/gpu/test_tensorrt_int64.py."""
from __future__ import annotations

import ctypes
import pathlib
import types
from typing import Dict, List, Tuple

import numpy as np
import pytest

from tests.test_tensorrt_context_sim import SimStream, _Mem, make_cupy
from trtserve.server.engine.backends.base import BackendConfig, DeviceDestination, Gather, ShapeRange, TensorSpec
from trtserve.server.engine.backends.tensorrt import TensorRTBackend, compat, staging
from trtserve.server.engine.backends.tensorrt.context import InstanceContext
from trtserve.server.engine.backends.tensorrt.engine import EngineInfo, IOTensor, model_specs, validate, with_served_types
from trtserve.server.errors import InvalidArgument, ModelLoadError

MAX_ROWS, MAX_SEQ = 8, 16
RANGE = ShapeRange((1, 1), (4, 8), (MAX_ROWS, MAX_SEQ))


def _engine_info() -> EngineInfo:
    """TensorRT 8.6's engine for an ONNX model with INT64 ids in and INT64 out: both INT32."""
    return EngineInfo(inputs=(IOTensor("IDS", True, "INT32", (-1, -1)),),
                      outputs=(IOTensor("OUT", False, "INT32", (-1, -1)),), profiles=({"IDS": RANGE},))


def _config(dtype: str = "INT64", inputs: bool = True) -> BackendConfig:
    io_in = [TensorSpec("IDS", dtype, (-1,))] if inputs else []
    io_out = [TensorSpec("OUT", dtype, (-1,))] if inputs else []
    return BackendConfig("tok", "1", pathlib.Path("."), "", MAX_ROWS, io_in, io_out)


# ---- rules ----


def test_only_int64_on_int32_is_converted() -> None:
    assert compat.narrows_int64("INT64", "INT32")
    for config, engine in (("INT64", "INT64"), ("INT32", "INT32"), ("INT32", "INT64"), ("INT64", "FP32"),
                           ("FP32", "INT32")):
        assert not compat.narrows_int64(config, engine)


def test_int32_range_error_names_the_value_outside() -> None:
    assert compat.int32_range_error(np.array([-(2**31), 0, 2**31 - 1], np.int64)) == ""
    assert compat.int32_range_error(np.zeros((0, 3), np.int64)) == ""
    assert "value 2147483648 is outside the INT32 range" in compat.int32_range_error(np.array([1, 2**31], np.int64))
    assert "value -2147483649 " in compat.int32_range_error(np.array([-(2**31) - 1, 5], np.int64))


def test_validate_accepts_an_int64_config_on_an_int32_engine_and_serves_int64() -> None:
    info = _engine_info()
    validate(info, _config("INT64"), "m")
    validate(info, _config("INT32"), "m")  # a config that says what the engine has loads as before
    served = with_served_types(info, {"IDS": "INT64", "OUT": "INT64"})
    assert [t.served_wire for t in served.inputs + served.outputs] == ["INT64", "INT64"]
    assert all(t.converted for t in served.inputs + served.outputs)
    ins, outs = model_specs(served)
    assert (ins[0].datatype, outs[0].datatype) == ("INT64", "INT64")
    validate(served, _config("INT64"), "m")  # the served info checks against the same config (a reload)
    plain = with_served_types(info, {"IDS": "INT32"})
    assert [t.served_wire for t in plain.inputs + plain.outputs] == ["INT32", "INT32"]
    assert model_specs(plain)[0][0].datatype == "INT32"


def test_other_datatype_mismatches_are_still_refused() -> None:
    with pytest.raises(ModelLoadError, match=r"input 'IDS': config datatype FP32, the engine has INT32"):
        validate(_engine_info(), _config("FP32"), "m")
    int64_engine = EngineInfo(inputs=(IOTensor("IDS", True, "INT64", (-1, -1)),),
                              outputs=(IOTensor("OUT", False, "INT64", (-1, -1)),), profiles=({"IDS": RANGE},))
    validate(int64_engine, _config("INT64"), "m")  # TensorRT 10+: nothing to convert
    assert not with_served_types(int64_engine, {"IDS": "INT64"}).inputs[0].converted
    with pytest.raises(ModelLoadError, match=r"config datatype INT32, the engine has INT64"):
        validate(int64_engine, _config("INT32"), "m")


def test_auto_complete_serves_what_the_onnx_declares(tmp_path: pathlib.Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    table = helper.make_tensor("table", TensorProto.FLOAT, [4, 2], [0.0] * 8)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "IDS"], ["EMB"], axis=0),
         helper.make_node("Identity", ["IDS"], ["IDS_OUT"])], "g",
        [helper.make_tensor_value_info("IDS", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("EMB", TensorProto.FLOAT, ["b", "s", 2]),
         helper.make_tensor_value_info("IDS_OUT", TensorProto.INT64, ["b", "s"])], [table])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    from trtserve.server.engine.backends.tensorrt.build import onnx_declared_types

    assert onnx_declared_types(path) == {"IDS": "INT64", "IDS_OUT": "INT64"}
    backend = TensorRTBackend(_config(inputs=False))
    info = EngineInfo(inputs=(IOTensor("IDS", True, "INT32", (-1, -1)),),
                      outputs=(IOTensor("EMB", False, "FP32", (-1, -1, 2)),
                               IOTensor("IDS_OUT", False, "INT32", (-1, -1))), profiles=({"IDS": RANGE},))
    declared = backend._declared_types(info, path)
    served = with_served_types(info, declared)
    assert [s.datatype for s in model_specs(served)[0] + model_specs(served)[1]] == ["INT64", "FP32", "INT64"]
    assert backend._declared_types(info, tmp_path / "model.plan") == {}  # a plan alone: the engine's types


def test_check_request_refuses_out_of_range_ids_naming_the_tensor() -> None:
    backend = TensorRTBackend(_config())
    backend._info = with_served_types(_engine_info(), {"IDS": "INT64", "OUT": "INT64"})
    backend.check_request({"IDS": np.array([[1, 2, 2**31 - 1]], np.int64)})
    with pytest.raises(InvalidArgument, match=r"input 'IDS': value 2147483648 is outside the INT32 range"):
        backend.check_request({"IDS": np.array([[1, 2**31]], np.int64)})
    with pytest.raises(InvalidArgument, match=r"input 'IDS': datatype int32 does not match the model's INT64"):
        backend.check_request({"IDS": np.array([[1]], np.int32)})


# ---- the instance on the simulated stream ----


def _ints_at(ptr: int, shape: Tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_int32 * n).from_address(ptr)).reshape(shape)


class IntContext:
    """OUT = 3 * IDS + 1 in INT32 (wrapping as TensorRT's INT32 would) over the shapes set at enqueue."""

    def __init__(self) -> None:
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.addresses: Dict[str, int] = {}

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        return True

    def set_input_shape(self, name: str, shape: Tuple[int, ...]) -> bool:
        if not RANGE.contains(tuple(shape)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def infer_shapes(self) -> List[str]:
        return []

    def get_tensor_shape(self, name: str) -> Tuple[int, ...]:
        return self.shapes["IDS"]

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_ptr: int) -> bool:
        shape = self.shapes["IDS"]
        src, dst = self.addresses["IDS"], self.addresses["OUT"]

        def run() -> None:
            _ints_at(dst, shape)[:] = _ints_at(src, shape) * np.int32(3) + np.int32(1)
        SimStream.registry[stream_ptr].enqueue(run)
        return True


@pytest.fixture()
def narrowed(monkeypatch: pytest.MonkeyPatch):
    cupy = make_cupy()
    monkeypatch.setattr(compat, "import_cupy", lambda: cupy)
    monkeypatch.setattr(staging, "_cupy", lambda: cupy)
    trt = types.SimpleNamespace(__version__="8.6.1")
    engine = types.SimpleNamespace(create_execution_context=lambda *a: IntContext())
    info = with_served_types(_engine_info(), {"IDS": "INT64", "OUT": "INT64"})
    inst = InstanceContext(trt, engine, info, 0, 0, 0, True, "model 'tok'", slots=2)  # type: ignore[arg-type]
    inst.open()
    yield inst
    inst.close()


def _ids(rows: int, seq: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-(2**31), 2**31 - 1, (rows, seq), dtype=np.int64) // 4  # 3x+1 stays inside INT32


def test_int64_in_int64_out_with_a_dynamic_sequence_two_batches_in_flight(narrowed) -> None:
    inst = narrowed
    assert "IDS" not in (inst.staging({"IDS": (2, 5)}) or {})  # narrowed inputs are stacked in their INT64
    pending = []
    for k, (rows, seq) in enumerate([(1, 1), (3, 7), (8, 16), (2, 5), (5, 16), (1, 9)]):
        x = _ids(rows, seq, k)
        pending.append((x, inst.enqueue({"IDS": x}, ["OUT"])))
        if len(pending) == 2:
            x0, t = pending.pop(0)
            out = inst.collect(t).outputs["OUT"]
            assert out.dtype == np.int64 and out.shape == x0.shape
            np.testing.assert_array_equal(out, x0 * 3 + 1)
    for x0, t in pending:
        np.testing.assert_array_equal(inst.collect(t).outputs["OUT"], x0 * 3 + 1)
    with pytest.raises(InvalidArgument, match=r"input 'IDS': datatype int32 does not match the model's INT64"):
        inst.enqueue({"IDS": np.zeros((1, 2), np.int32)}, ["OUT"])


def test_host_pieces_of_a_gather_are_narrowed_and_widened_outputs_are_not_written_device_to_device(narrowed) -> None:
    inst = narrowed
    xs = [_ids(2, 4, 1), _ids(3, 4, 2)]
    batch = Gather(tuple(xs), (5, 4), np.dtype(np.int64))
    region = _Mem(2 * 4 * 8)
    ticket = inst.enqueue({"IDS": batch}, ["OUT"], [DeviceDestination(0, 0, 2, {"OUT": (region.ptr, 64)})])  # type: ignore[dict-item]
    result = inst.collect(ticket)
    np.testing.assert_array_equal(result.outputs["OUT"], np.concatenate(xs) * 3 + 1)
    assert result.delivered == {}  # the server writes the widened INT64 rows from the host result
