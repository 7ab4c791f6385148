"""trtserve.client against the real server: every helper (sync and asyncio), every dtype, the errors.

Uses the lead's fixtures from conftest.py (``example_server``: the bundled ``mlp``; ``serve_repo``:
a server on a repository this module writes).
"""
from __future__ import annotations

import asyncio
import pathlib

import numpy as np
import pytest

from tests import models
from tests.conftest import EXPLICIT
from trtserve import dtypes
from trtserve.client import AsyncInferenceClient, InferenceClient, InferenceServerError, bf16_to_float32, \
    float32_to_bf16
from trtserve.server.examples.make_mlp import reference

WIRES = [w for w in dtypes.BY_WIRE if w != "BF16"]


def _x(rows: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)


@pytest.fixture
def client(example_server):
    with InferenceClient(example_server.url) as c:
        yield c


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp") and client.is_model_ready("mlp", 1)
    assert not client.is_model_ready("nope")
    meta = client.server_metadata()
    assert meta.name == "trtserve" and "statistics" in meta.extensions
    m = client.model_metadata("mlp")
    assert (m.name, list(m.versions)) == ("mlp", ["1"])
    assert [(t.name, t.datatype, list(t.shape)) for t in m.inputs] == [("INPUT0", "FP32", [-1, 64])]
    assert [(t.name, t.datatype, list(t.shape)) for t in m.outputs] == [("OUTPUT0", "FP32", [-1, 16])]
    config = client.model_config("mlp", version="1")
    assert config.name == "mlp" and config.max_batch_size == 32 and [i.name for i in config.input] == ["INPUT0"]
    index = client.repository_index()
    assert [(m.name, m.version, m.state) for m in index] == [("mlp", "1", "READY")]
    assert [m.name for m in client.repository_index(ready=True)] == ["mlp"]


def test_infer_matches_reference_and_counts_in_statistics(client):
    def counts():
        s = client.model_statistics("mlp").model_stats[0]
        return s.inference_count, s.inference_stats.success.count

    before = counts()
    x = _x(5)
    out = client.infer("mlp", {"INPUT0": x}, outputs=["OUTPUT0"], version=1, priority=1, timeout=10,
                       request_id="r-1")
    assert list(out) == ["OUTPUT0"] and out["OUTPUT0"].shape == (5, 16) and out["OUTPUT0"].dtype == np.float32
    np.testing.assert_allclose(out["OUTPUT0"], reference(x), rtol=1e-5, atol=1e-5)
    after = counts()
    assert after[0] >= before[0] + 5 and after[1] >= before[1] + 1
    all_stats = client.model_statistics()
    assert "mlp" in {s.name for s in all_stats.model_stats}


def test_model_infer_echoes_id(client):
    from trtserve.client import _codec

    request = _codec.build_infer_request("mlp", {"INPUT0": _x(1)}, request_id="abc")
    response = client.model_infer(request)
    assert response.id == "abc" and response.model_name == "mlp"


async def test_async_client_every_helper(example_server):
    async with AsyncInferenceClient(example_server.url) as c:
        assert await c.is_server_live() and await c.is_server_ready() and await c.is_model_ready("mlp")
        assert (await c.server_metadata()).name == "trtserve"
        assert (await c.model_metadata("mlp")).inputs[0].name == "INPUT0"
        assert (await c.model_config("mlp")).max_batch_size == 32
        assert (await c.model_statistics("mlp")).model_stats[0].name == "mlp"
        assert [m.name for m in await c.repository_index()] == ["mlp"]
        xs = [_x(2, seed) for seed in range(16)]
        outs = await asyncio.gather(*(c.infer("mlp", {"INPUT0": x}) for x in xs))
        for x, out in zip(xs, outs):
            np.testing.assert_allclose(out["OUTPUT0"], reference(x), rtol=1e-5, atol=1e-5)
        response = await c.model_infer(__import__("trtserve.client._codec", fromlist=["x"]).build_infer_request(
            "mlp", {"INPUT0": xs[0]}, request_id="7"))
        assert response.id == "7"
        with pytest.raises(InferenceServerError) as e:
            await c.infer("nope", {"INPUT0": xs[0]})
        assert e.value.status == "NOT_FOUND" and "nope" in e.value.message


def test_errors_carry_status_and_server_message(client):
    with pytest.raises(InferenceServerError) as e:
        client.infer("nope", {"INPUT0": _x(1)})
    assert (e.value.status, e.value.message) == ("NOT_FOUND", "model 'nope' is not loaded")
    assert e.value.__cause__ is None and e.value.__suppress_context__  # translated once, from None
    with pytest.raises(InferenceServerError) as e:
        client.model_metadata("nope")
    assert e.value.status == "NOT_FOUND"
    with pytest.raises(InferenceServerError) as e:
        client.model_metadata("mlp", version=9)
    assert e.value.status == "NOT_FOUND"
    with pytest.raises(InferenceServerError) as e:
        client.infer("mlp", {"INPUT0": np.zeros((1, 3), np.float32)})
    assert e.value.status == "INVALID_ARGUMENT" and "INPUT0" in e.value.message
    with pytest.raises(InferenceServerError) as e:
        client.infer("mlp", {"INPUT0": np.zeros((1, 64), np.int32)})
    assert e.value.status == "INVALID_ARGUMENT" and "INPUT0" in e.value.message
    with pytest.raises(InferenceServerError) as e:
        client.infer("mlp", {"INPUT0": _x(1), "EXTRA": _x(1)})
    assert e.value.status == "INVALID_ARGUMENT" and "EXTRA" in e.value.message
    with pytest.raises(InferenceServerError) as e:
        client.infer("mlp", {"INPUT0": _x(1)}, outputs=["NOPE"])
    assert e.value.status == "INVALID_ARGUMENT" and "NOPE" in e.value.message
    with pytest.raises(InferenceServerError) as e:
        client.infer("mlp", {"INPUT0": np.zeros((64, 64), np.float32)})  # over max_batch_size 32
    assert e.value.status == "INVALID_ARGUMENT"


def test_headers_are_sent(example_server):
    with InferenceClient(example_server.url, headers={"X-Test": "1"}) as c:
        assert c.infer("mlp", {"INPUT0": _x(1)}, headers={"x-other": "2"})["OUTPUT0"].shape == (1, 16)


def test_several_addresses_to_one_server(example_server):
    port = example_server.url.rsplit(":", 1)[1]
    with InferenceClient(f"127.0.0.1:{port},localhost:{port}") as c:
        assert c.target == f"ipv4:127.0.0.1:{port},127.0.0.1:{port}"
        for _ in range(4):
            assert c.infer("mlp", {"INPUT0": _x(1)})["OUTPUT0"].shape == (1, 16)
    # dns:/// resolves to every address of the name; round robin skips those that refuse (e.g. ::1 here)
    with InferenceClient(f"dns:///localhost:{port}") as c:
        for _ in range(4):
            assert c.infer("mlp", {"INPUT0": _x(1)}, timeout=10)["OUTPUT0"].shape == (1, 16)


def _ort_bf16() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return hasattr(onnxruntime.OrtValue, "ortvalue_from_numpy_with_onnx_type")


# older onnxruntime (1.19 on Python 3.9) cannot type a NumPy buffer as bfloat16: those models fail to load
# with a message saying so (test_bf16_model_on_old_onnxruntime_fails_to_load_clearly)
_NEEDS_ORT_BF16 = pytest.mark.skipif(not _ort_bf16(), reason="onnxruntime without ortvalue_from_numpy_with_onnx_type")


@pytest.fixture(scope="module")
def dtype_server(tmp_path_factory):
    """One server with an identity model per datatype (and BF16, which needs its own ONNX type)."""
    from tests.conftest import RunningServer

    repo = tmp_path_factory.mktemp("dtypes")
    for wire in WIRES:
        models.identity(repo, f"ident_{wire}", wire)
    _bf16_identity(repo)
    _bf16_scale(repo)
    # BF16 needs a newer ONNX Runtime than Python 3.9 gets: its models may fail, the others serve on
    s = RunningServer(repo, metrics=False, exit_on_error=False)
    yield s
    s.stop()


def _bf16_identity(repo: pathlib.Path) -> None:
    from onnx import TensorProto, helper

    shape = ["batch", 4]
    graph = helper.make_graph([helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], "ident_BF16",
                              [helper.make_tensor_value_info("INPUT0", TensorProto.BFLOAT16, shape)],
                              [helper.make_tensor_value_info("OUTPUT0", TensorProto.BFLOAT16, shape)])
    models._save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]),
                 repo / "ident_BF16" / "1" / "model.onnx")
    models.write_config(repo, "ident_BF16", 'name: "ident_BF16"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
                        'input [ { name: "INPUT0", data_type: TYPE_BF16, dims: [ 4 ] } ]\n'
                        'output [ { name: "OUTPUT0", data_type: TYPE_BF16, dims: [ 4 ] } ]\n')


def _bf16_scale(repo: pathlib.Path) -> None:
    """OUTPUT0 (BF16) = INPUT0 (BF16) * SCALE (FP32), computed in FP32: BF16 and FP32 inputs in one request,
    a BF16 output that is not its input."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["INPUT0"], ["x32"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["x32", "SCALE"], ["y32"]),
         helper.make_node("Cast", ["y32"], ["OUTPUT0"], to=TensorProto.BFLOAT16)], "scale_BF16",
        [helper.make_tensor_value_info("INPUT0", TensorProto.BFLOAT16, ["batch", 4]),
         helper.make_tensor_value_info("SCALE", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.BFLOAT16, ["batch", 4])])
    models._save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]),
                 repo / "scale_BF16" / "1" / "model.onnx")
    models.write_config(repo, "scale_BF16", 'name: "scale_BF16"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
                        'input [ { name: "INPUT0", data_type: TYPE_BF16, dims: [ 4 ] },'
                        ' { name: "SCALE", data_type: TYPE_FP32, dims: [ 1 ] } ]\n'
                        'output [ { name: "OUTPUT0", data_type: TYPE_BF16, dims: [ 4 ] } ]\n'
                        'dynamic_batching { }\n')


def _sample(wire: str) -> np.ndarray:
    rng = np.random.default_rng(5)
    if wire == "BYTES":
        return np.array([[b"a", b"", b"\x00z", "h\u00e9".encode()], [b"x" * 100, b"b", b"c", b"d"]], dtype=object)
    if wire == "BOOL":
        return rng.integers(0, 2, (2, 4)).astype(bool)
    dt = dtypes.BY_WIRE[wire].numpy
    if dt.kind == "f":
        return (rng.standard_normal((2, 4)) * 10).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, (2, 4), dtype=dt, endpoint=True)


@pytest.mark.parametrize("wire", WIRES)
def test_every_dtype_round_trips(dtype_server, wire):
    x = _sample(wire)
    with InferenceClient(dtype_server.url) as c:
        meta = c.model_metadata(f"ident_{wire}")
        assert meta.inputs[0].datatype == wire
        out = c.infer(f"ident_{wire}", {"INPUT0": x})["OUTPUT0"]
    if wire == "BYTES":
        assert out.tolist() == x.tolist()
    else:
        assert out.dtype == x.dtype
        np.testing.assert_array_equal(out, x)


async def test_every_dtype_round_trips_async(dtype_server):
    async with AsyncInferenceClient(dtype_server.url) as c:
        for wire in WIRES:
            x = _sample(wire)
            out = (await c.infer(f"ident_{wire}", {"INPUT0": x}))["OUTPUT0"]
            assert out.tolist() == x.tolist(), wire


@_NEEDS_ORT_BF16
def test_bf16_round_trips(dtype_server):
    x = np.array([[1.0, -2.5, 3.140625, 0.0], [7.0, 8.0, -0.5, 1e-3]], np.float32)
    with InferenceClient(dtype_server.url) as c:
        assert c.model_metadata("ident_BF16").inputs[0].datatype == "BF16"
        out = c.infer("ident_BF16", {"INPUT0": x}, datatypes={"INPUT0": "BF16"})["OUTPUT0"]
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, float32_to_bf16(x))
    np.testing.assert_allclose(bf16_to_float32(out), x, rtol=1e-2)


@_NEEDS_ORT_BF16
def test_bf16_computes_with_fp32_inputs_beside_it(dtype_server):
    x = np.array([[1.0, -2.5, 3.140625, 0.5], [7.0, 8.0, -0.5, 1e-3]], np.float32)
    scale = np.array([[2.0], [-4.0]], np.float32)
    with InferenceClient(dtype_server.url) as c:
        out = c.infer("scale_BF16", {"INPUT0": x, "SCALE": scale}, datatypes={"INPUT0": "BF16"})["OUTPUT0"]
    assert out.dtype == np.uint16 and out.shape == (2, 4)
    np.testing.assert_allclose(bf16_to_float32(out), bf16_to_float32(float32_to_bf16(x)) * scale, rtol=1e-2)


@pytest.mark.skipif(_ort_bf16(), reason="this onnxruntime serves BF16")
def test_bf16_model_on_old_onnxruntime_fails_to_load_clearly(dtype_server):
    with InferenceClient(dtype_server.url) as c:
        assert not c.is_model_ready("ident_BF16")
        index = {m.name: m for m in c.repository_index()}
        assert "onnxruntime" in index["ident_BF16"].reason and "BF16" in index["ident_BF16"].reason
        assert c.is_model_ready("ident_FP32")  # the other models load and serve


def test_load_unload(tmp_path, serve_repo):
    models.copy_example(tmp_path)
    s = serve_repo(tmp_path, metrics=False, **EXPLICIT)
    models.identity(tmp_path, "late", "FP32")  # appears after start
    with InferenceClient(s.url) as c:
        assert {m.name: m.state for m in c.repository_index()} == {"mlp": "READY", "late": ""}
        c.load_model("late")
        assert c.is_model_ready("late")
        np.testing.assert_array_equal(c.infer("late", {"INPUT0": np.ones((1, 4), np.float32)})["OUTPUT0"],
                                      np.ones((1, 4), np.float32))
        c.unload_model("mlp")
        assert not c.is_model_ready("mlp")
        with pytest.raises(InferenceServerError) as e:
            c.infer("mlp", {"INPUT0": _x(1)})
        assert e.value.status == "NOT_FOUND"
        c.load_model("mlp")
        assert c.is_model_ready("mlp")
        with pytest.raises(InferenceServerError) as e:
            c.load_model("does_not_exist")
        assert e.value.status == "NOT_FOUND"
        c.load_model("mlp", config='{"max_batch_size": 4}')  # Triton's config override: served
        assert c.model_config("mlp").max_batch_size == 4
        with pytest.raises(InferenceServerError) as e:  # file overrides: refused
            c.load_model("mlp", config='{"max_batch_size": 4}', files={"file:1/model.onnx": b"x"})
        assert e.value.status == "INVALID_ARGUMENT" and "not supported" in e.value.message


async def test_async_load_unload(tmp_path, serve_repo):
    models.copy_example(tmp_path)
    s = serve_repo(tmp_path, metrics=False, **EXPLICIT)
    async with AsyncInferenceClient(s.url) as c:
        await c.unload_model("mlp")
        assert not await c.is_model_ready("mlp")
        await c.load_model("mlp")
        assert await c.is_model_ready("mlp")
