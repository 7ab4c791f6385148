"""INT64 token ids on the real server and a real TensorRT engine, one process and two front ends.

An embedding lookup exported as ONNX (Gather of a small table by INT64 ids [batch, seq] -> [batch, seq, dim], plus
NEXT = ids + 1, an INT64 output) built from model.onnx at load with a dynamic sequence dimension. TensorRT 8.6/9
turns the INT64 IO into INT32; the server keeps serving INT64 (narrowing ids after a range check, widening NEXT).
TensorRT 10+ keeps INT64 in the engine and nothing is converted: the same repository and the same answers, except
that an id outside INT32 is then valid (``test_ids_outside_int32``). Two models: ``tok_cfg`` declares its IO as
INT64 in config.pbtxt, ``tok_auto`` leaves IO to auto-complete (the ONNX file's INT64 is reported)."""
from __future__ import annotations

import concurrent.futures
import pathlib
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import pytest

from trtserve.server.engine.backends.tensorrt import compat

_OK, _WHY = compat.available()
if not _OK:
    pytest.skip(f"needs CUDA, CuPy and TensorRT: {_WHY}", allow_module_level=True)
pytest.importorskip("onnx", reason="needs the onnx package to write test models")
grpc = pytest.importorskip("grpc")

from trtserve.protos import grpc_service_pb2 as pb  # noqa: E402
from trtserve.protos import grpc_service_pb2_grpc as pbg  # noqa: E402

VOCAB, DIM, MAX_BATCH, MAX_SEQ = 1000, 8, 8, 64
TABLE = np.random.default_rng(3).standard_normal((VOCAB, DIM)).astype(np.float32)
PROFILE = f"1x1;4x16;{MAX_BATCH}x{MAX_SEQ}"  # [batch, seq]: min; opt; max

CFG = f"""
name: "tok_cfg"
platform: "tensorrt_plan"
max_batch_size: {MAX_BATCH}
input [ {{ name: "IDS", data_type: TYPE_INT64, dims: [ -1 ] }} ]
output [ {{ name: "EMB", data_type: TYPE_FP32, dims: [ -1, {DIM} ] }},
         {{ name: "NEXT", data_type: TYPE_INT64, dims: [ -1 ] }} ]
instance_group [ {{ count: 1, kind: KIND_GPU }} ]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
parameters {{ key: "trtserve.profile.0.IDS" value {{ string_value: "{PROFILE}" }} }}
"""

AUTO = f"""
name: "tok_auto"
platform: "tensorrt_plan"
max_batch_size: {MAX_BATCH}
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
parameters {{ key: "trtserve.profile.0.IDS" value {{ string_value: "{PROFILE}" }} }}
"""

NEXT_CFG = f"""
name: "ids_next"
platform: "tensorrt_plan"
max_batch_size: {MAX_BATCH}
input [ {{ name: "IDS", data_type: TYPE_INT64, dims: [ -1 ] }} ]
output [ {{ name: "NEXT", data_type: TYPE_INT64, dims: [ -1 ] }} ]
parameters {{ key: "trtserve.profile.0.IDS" value {{ string_value: "{PROFILE}" }} }}
"""


def _save(path: pathlib.Path, nodes: list, outputs: list, inits: list) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "tok", [helper.make_tensor_value_info("IDS", TensorProto.INT64, ["b", "s"])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def make_embedding(path: pathlib.Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    _save(path,
          [helper.make_node("Gather", ["table", "IDS"], ["EMB"], axis=0),
           helper.make_node("Add", ["IDS", "one"], ["NEXT"])],
          [helper.make_tensor_value_info("EMB", TensorProto.FLOAT, ["b", "s", DIM]),
           helper.make_tensor_value_info("NEXT", TensorProto.INT64, ["b", "s"])],
          [numpy_helper.from_array(TABLE, "table"), numpy_helper.from_array(np.array(1, np.int64), "one")])


def make_next(path: pathlib.Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    _save(path, [helper.make_node("Add", ["IDS", "one"], ["NEXT"])],
          [helper.make_tensor_value_info("NEXT", TensorProto.INT64, ["b", "s"])],
          [numpy_helper.from_array(np.array(1, np.int64), "one")])


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("int64_repo")
    for name, config in (("tok_cfg", CFG), ("tok_auto", AUTO)):
        make_embedding(root / name / "1" / "model.onnx")
        (root / name / "config.pbtxt").write_text(config)
    make_next(root / "ids_next" / "1" / "model.onnx")
    (root / "ids_next" / "config.pbtxt").write_text(NEXT_CFG)
    return root


@pytest.fixture(scope="module", params=[0, 2], ids=["one-process", "two-frontends"])
def stub(request, repo: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    from tests.conftest import RunningServer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        server = RunningServer(repo, metrics=False, frontends=request.param)
        channel = grpc.insecure_channel(server.url)
        try:
            yield pbg.GRPCInferenceServiceStub(channel)
        finally:
            channel.close()
            server.stop()


_NP = {"FP32": np.float32, "INT64": np.int64, "INT32": np.int32}


def _infer(stub, model: str, ids: np.ndarray, outputs: Sequence[str] = ("EMB", "NEXT"),
           datatype: str = "INT64") -> Dict[str, np.ndarray]:
    req = pb.ModelInferRequest(model_name=model)
    t = req.inputs.add()
    t.name, t.datatype = "IDS", datatype
    t.shape.extend(ids.shape)
    req.raw_input_contents.append(np.ascontiguousarray(ids).tobytes())
    for name in outputs:
        req.outputs.add().name = name
    resp = stub.ModelInfer(req, timeout=60)
    return {o.name: np.frombuffer(raw, _NP[o.datatype]).reshape(tuple(o.shape))
            for o, raw in zip(resp.outputs, resp.raw_output_contents)}


def _ids(rows: int, seq: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (rows, seq), dtype=np.int64)


@pytest.mark.parametrize("model", ["tok_cfg", "tok_auto"])
def test_metadata_says_int64_as_the_config_and_the_onnx_do(stub, model: str) -> None:
    m = stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=10)
    assert [(t.name, t.datatype, list(t.shape)) for t in m.inputs] == [("IDS", "INT64", [-1, -1])]
    assert sorted((t.name, t.datatype, list(t.shape)) for t in m.outputs) == [
        ("EMB", "FP32", [-1, -1, DIM]), ("NEXT", "INT64", [-1, -1])]


@pytest.mark.parametrize("model", ["tok_cfg", "tok_auto"])
def test_concurrent_int64_ids_of_every_length_equal_numpy(stub, model: str) -> None:
    rng = np.random.default_rng(11)
    shapes = [(int(rng.integers(1, MAX_BATCH + 1)), int(rng.choice([1, 2, 7, 16, 33, MAX_SEQ]))) for _ in range(120)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        jobs: List[Tuple[np.ndarray, concurrent.futures.Future]] = []
        for k, (rows, seq) in enumerate(shapes):
            ids = _ids(rows, seq, k)
            jobs.append((ids, pool.submit(_infer, stub, model, ids)))
        for ids, fut in jobs:
            out = fut.result(timeout=120)
            assert out["NEXT"].dtype == np.int64
            np.testing.assert_array_equal(out["NEXT"], ids + 1)
            np.testing.assert_array_equal(out["EMB"], TABLE[ids])  # a lookup: exact


def test_ids_outside_int32(stub) -> None:
    """TensorRT < 10: INVALID_ARGUMENT naming IDS, and serving goes on. 10+: INT64 end to end, so they are fine."""
    big = np.array([[5, 2**31 + 7, 9]], np.int64)
    narrowed = not compat.has_int64_io(compat.parse_version(compat.import_tensorrt().__version__))
    if narrowed:
        for bad in (big, -big):
            with pytest.raises(grpc.RpcError) as e:
                _infer(stub, "ids_next", bad, ("NEXT",))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert "'IDS'" in e.value.details() and "INT32" in e.value.details(), e.value.details()
    else:
        np.testing.assert_array_equal(_infer(stub, "ids_next", big, ("NEXT",))["NEXT"], big + 1)
    edge = np.array([[2**31 - 2, -(2**31), 0]], np.int64)  # the INT32 limits themselves pass everywhere
    np.testing.assert_array_equal(_infer(stub, "ids_next", edge, ("NEXT",))["NEXT"], edge + 1)
    with pytest.raises(grpc.RpcError) as e:  # INT32 from the client: the model's type is INT64
        _infer(stub, "tok_cfg", _ids(1, 3, 0).astype(np.int32), datatype="INT32")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    ids = _ids(2, 5, 1)
    np.testing.assert_array_equal(_infer(stub, "tok_cfg", ids)["EMB"], TABLE[ids])
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
