"""The real server on a GPU: a TensorRT model (platform tensorrt_plan, model.onnx built at load, two profiles,
two instances, dynamic batching) answers concurrent mixed-size requests like ONNX Runtime, and bad requests get
INVALID_ARGUMENT while it keeps serving. The client is the generated gRPC stubs (trtserve.protos), so the test
needs no tritonclient (whose current release wants a newer grpcio than Python 3.9 has)."""
from __future__ import annotations

import concurrent.futures
import pathlib
from typing import Iterator, List, Tuple

import numpy as np
import pytest

from trtserve.server.engine.backends.tensorrt import compat

_OK, _WHY = compat.available()
if not _OK:
    pytest.skip(f"needs CUDA, CuPy and TensorRT: {_WHY}", allow_module_level=True)
pytest.importorskip("onnx", reason="needs the onnx package to write test models")
pytest.importorskip("onnxruntime", reason="needs onnxruntime for reference outputs")
grpc = pytest.importorskip("grpc")

from trtserve.protos import grpc_service_pb2 as pb  # noqa: E402
from trtserve.protos import grpc_service_pb2_grpc as pbg  # noqa: E402

from .gpu_models import TWO_PROFILES, make_mlp, ort_run, ort_session  # noqa: E402

N_IN, HIDDEN, N_OUT = 64, 256, 16
TF32_TOL = dict(rtol=1e-2, atol=1e-2)

MLP_CONFIG = f"""
name: "mlp_trt"
platform: "tensorrt_plan"
max_batch_size: 64
input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ {N_IN} ] }} ]
output [ {{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ {N_OUT} ] }} ]
instance_group [ {{ count: 2, kind: KIND_GPU }} ]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
parameters {{ key: "trtserve.profiles" value {{ string_value: '{TWO_PROFILES}' }} }}
parameters {{ key: "trtserve.direct_copy_min_bytes" value {{ string_value: "1024" }} }}
"""
# direct copies from 1 KiB: requests of 4+ rows are read from the page-locked arena and requests of 16+ rows get
# their outputs written there by the device, so the mixed batches below take both paths and the staged one

# elementwise x*2 with a variable feature dimension: its profile allows 8..64 features
VAR_CONFIG = """
name: "var_trt"
platform: "tensorrt_plan"
max_batch_size: 16
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
instance_group [ { count: 1, kind: KIND_GPU } ]
parameters { key: "trtserve.profile.0.INPUT0" value { string_value: "1x8;8x32;16x64" } }
"""


def _make_double(path: pathlib.Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["INPUT0", "two"], ["OUTPUT0"])], "double",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", "n"])],
        [numpy_helper.from_array(np.array(2, np.float32), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("trt_repo")
    make_mlp(root / "mlp_trt" / "1" / "model.onnx", N_IN, HIDDEN, N_OUT)
    (root / "mlp_trt" / "config.pbtxt").write_text(MLP_CONFIG)
    _make_double(root / "var_trt" / "1" / "model.onnx")
    (root / "var_trt" / "config.pbtxt").write_text(VAR_CONFIG)
    return root


@pytest.fixture(scope="module", params=[0, 2], ids=["one-process", "two-frontends"])
def stub(request, repo: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One server per process model (the engine builds once each), with its own plan cache: the engine in
    this process, and the engine in its own process behind two front-end processes (its arenas page-locked)."""
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


def _request(model: str, x: np.ndarray, datatype: str = "FP32") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    t = req.inputs.add()
    t.name, t.datatype = "INPUT0", datatype
    t.shape.extend(x.shape)
    req.raw_input_contents.append(np.ascontiguousarray(x).tobytes())
    req.outputs.add().name = "OUTPUT0"
    return req


def _infer(stub, model: str, x: np.ndarray, datatype: str = "FP32") -> np.ndarray:
    resp = stub.ModelInfer(_request(model, x, datatype), timeout=60)
    out = resp.outputs[0]
    assert out.name == "OUTPUT0" and out.datatype == "FP32"
    return np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(tuple(out.shape))


def _x(rows: int, seed: int, n: int = N_IN) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, n)).astype(np.float32)


def test_metadata_says_tensorrt(stub) -> None:
    m = stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp_trt"), timeout=10)
    assert m.platform == "tensorrt_plan"
    assert [(t.name, t.datatype, list(t.shape)) for t in m.inputs] == [("INPUT0", "FP32", [-1, N_IN])]
    assert stub.ModelReady(pb.ModelReadyRequest(name="mlp_trt"), timeout=10).ready


def test_concurrent_mixed_batches_match_onnxruntime(stub, repo: pathlib.Path) -> None:
    ort = ort_session(repo / "mlp_trt" / "1" / "model.onnx")
    rng = np.random.default_rng(7)
    sizes = [int(s) for s in rng.choice([1, 2, 3, 5, 8, 13, 21, 40, 64], size=240)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        jobs: List[Tuple[np.ndarray, concurrent.futures.Future]] = []
        for k, rows in enumerate(sizes):
            x = _x(rows, k)
            jobs.append((x, pool.submit(_infer, stub, "mlp_trt", x)))
        worst = 0.0
        for x, fut in jobs:
            y = fut.result(timeout=120)
            ref = ort_run(ort, {"INPUT0": x})["OUTPUT0"]
            assert y.shape == ref.shape
            np.testing.assert_allclose(y, ref, **TF32_TOL)
            worst = max(worst, float(np.abs(y - ref).max()))
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp_trt"), timeout=10).model_stats[0]
    batches = sum(b.compute_infer.count for b in stats.batch_stats)
    print(f"\n{len(sizes)} requests ({sum(sizes)} rows) over 32 threads: max |trt - ort| = {worst:.2e}; "
          f"{batches} batches, sizes {sorted(b.batch_size for b in stats.batch_stats)}")
    assert stats.inference_count == sum(sizes)


def test_alike_large_requests_grouped_in_the_engine_match_onnxruntime(stub, repo: pathlib.Path) -> None:
    """32-row requests read 8 KiB and write 2 KiB, both past the model's direct-copy size (1 KiB): behind two front
    ends, a front end's alike ones are queued as one entry whose input stays in the page-locked arena in pieces and
    whose members each get their rows written by the device into their own slots (engine/group.py)."""
    ort = ort_session(repo / "mlp_trt" / "1" / "model.onnx")
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        xs = [_x(32, 1000 + k) for k in range(192)]
        for x, y in zip(xs, pool.map(lambda x: _infer(stub, "mlp_trt", x), xs)):
            np.testing.assert_allclose(y, ort_run(ort, {"INPUT0": x})["OUTPUT0"], **TF32_TOL)


@pytest.mark.parametrize(
    "model, x, datatype, match",
    [
        ("mlp_trt", _x(65, 0), "FP32", "65"),  # more rows than max_batch_size
        ("mlp_trt", _x(2, 0, 63), "FP32", "63"),  # wrong feature count
        ("mlp_trt", _x(2, 0).astype(np.float64), "FP64", "FP64"),  # wrong datatype
        ("var_trt", _x(2, 0, 100), "FP32", "profile"),  # 100 features: outside every profile (8..64)
        ("var_trt", _x(2, 0, 4), "FP32", "profile"),  # 4 features: below every profile
    ],
)
def test_bad_requests_get_invalid_argument_and_serving_goes_on(stub, model: str, x: np.ndarray, datatype: str,
                                                               match: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(_request(model, x, datatype), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert match in e.value.details(), e.value.details()
    print(f"\n{model} {datatype} {list(x.shape)} -> {e.value.code().name}: {e.value.details()}")
    good = _x(3, 1, 20)
    np.testing.assert_allclose(_infer(stub, "var_trt", good), good * 2, rtol=1e-6)
    assert _infer(stub, "mlp_trt", _x(9, 2)).shape == (9, N_OUT)
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
