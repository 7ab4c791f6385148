"""The serving core through the unmodified tritonclient (sync and aio) against a real server."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests import models
from tests.conftest import EXPLICIT
from trtserve.server.examples.make_mlp import reference


def _infer_mlp(client, x: np.ndarray, **kw):
    inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("mlp", [inp], **kw)


def test_health_and_metadata(triton_client):
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("mlp")
    assert triton_client.is_model_ready("mlp", "1")
    assert not triton_client.is_model_ready("nope")
    meta = triton_client.get_server_metadata()
    assert meta.name == "trtserve"
    assert "statistics" in meta.extensions and "model_configuration" in meta.extensions
    assert "cuda_shared_memory" not in meta.extensions  # only what works here (no GPU in these tests)
    m = triton_client.get_model_metadata("mlp")
    assert (m.name, list(m.versions), m.platform) == ("mlp", ["1"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in m.inputs] == [("INPUT0", "FP32", [-1, 64])]
    assert [(t.name, t.datatype, list(t.shape)) for t in m.outputs] == [("OUTPUT0", "FP32", [-1, 16])]


def test_model_config(triton_client):
    cfg = triton_client.get_model_config("mlp").config
    assert cfg.name == "mlp" and cfg.max_batch_size == 32 and cfg.platform == "onnxruntime_onnx"
    assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert [i.name for i in cfg.input] == ["INPUT0"] and list(cfg.input[0].dims) == [64]


def test_infer_raw_matches_reference_and_echoes_id(triton_client):
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    r = _infer_mlp(triton_client, x, request_id="req-42")
    np.testing.assert_allclose(r.as_numpy("OUTPUT0"), reference(x), rtol=1e-5, atol=1e-5)
    assert r.get_response().id == "req-42"
    assert r.get_response().model_version == "1"


def test_infer_typed_contents(example_server):
    """Typed fp32_contents in, raw_output_contents out (grpc stubs: tritonclient always sends raw)."""
    import grpc

    from trtserve.protos import grpc_service_pb2 as pb
    from trtserve.protos import grpc_service_pb2_grpc as pb_grpc

    x = np.arange(2 * 64, dtype=np.float32).reshape(2, 64) / 100
    req = pb.ModelInferRequest(model_name="mlp")
    t = req.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 64])
    t.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(example_server.url) as ch:
        resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req)
    assert len(resp.raw_output_contents) == 1
    out = np.frombuffer(resp.raw_output_contents[0], dtype=np.float32).reshape(2, 16)
    np.testing.assert_allclose(out, reference(x), rtol=1e-5, atol=1e-5)


def test_statistics_count_up(triton_client):
    def counts():
        s = triton_client.get_inference_statistics("mlp").model_stats[0]
        return s.inference_count, s.execution_count, s.inference_stats.success.count
    before = counts()
    _infer_mlp(triton_client, np.zeros((3, 64), np.float32))
    after = counts()
    assert after[0] == before[0] + 3 and after[1] >= before[1] + 1 and after[2] == before[2] + 1
    s = triton_client.get_inference_statistics("mlp").model_stats[0]
    assert s.version == "1" and s.inference_stats.queue.count == s.inference_stats.success.count
    assert any(b.batch_size == 3 for b in s.batch_stats)


@pytest.mark.parametrize("wire", ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                                  "FP16", "FP32", "FP64", "BYTES"])
def test_datatypes_round_trip(tmp_path, serve_repo, wire):
    models.identity(tmp_path, "ident", wire)
    s = serve_repo(tmp_path, metrics=False)
    rng = np.random.default_rng(0)
    if wire == "BYTES":
        x = np.array([[b"a", b"", b"\x00z", "h\u00e9".encode()]] * 2, dtype=object)
    elif wire == "BOOL":
        x = rng.integers(0, 2, (2, 4)).astype(bool)
    else:
        from trtserve import dtypes
        dt = dtypes.BY_WIRE[wire].numpy
        x = (rng.standard_normal((2, 4)) * 10).astype(dt) if dt.kind == "f" else \
            rng.integers(0, 100, (2, 4)).astype(dt)
    with grpcclient.InferenceServerClient(s.url) as c:
        inp = grpcclient.InferInput("INPUT0", [2, 4], wire)
        inp.set_data_from_numpy(x)
        out = c.infer("ident", [inp]).as_numpy("OUTPUT0")
    if wire == "BYTES":
        assert out.tolist() == x.tolist()
    else:
        assert out.dtype == x.dtype
        np.testing.assert_array_equal(out, x)


def test_two_inputs_two_outputs_and_requested_outputs(tmp_path, serve_repo):
    models.add_sub(tmp_path)
    s = serve_repo(tmp_path, metrics=False)
    a = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    b = np.ones((3, 16), np.float32)
    with grpcclient.InferenceServerClient(s.url) as c:
        ins = [grpcclient.InferInput("INPUT0", [3, 16], "FP32"), grpcclient.InferInput("INPUT1", [3, 16], "FP32")]
        ins[0].set_data_from_numpy(a)
        ins[1].set_data_from_numpy(b)
        r = c.infer("add_sub", ins, outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
        names = [o.name for o in r.get_response().outputs]
        assert names == ["OUTPUT1"]
        np.testing.assert_allclose(r.as_numpy("OUTPUT1"), a - b)
        r = c.infer("add_sub", ins)
        np.testing.assert_allclose(r.as_numpy("OUTPUT0"), a + b)


def test_non_batching_model(tmp_path, serve_repo):
    models.add_sub(tmp_path, name="nb", extra="", max_batch_size=0)
    s = serve_repo(tmp_path, metrics=False)
    with grpcclient.InferenceServerClient(s.url) as c:
        meta = c.get_model_metadata("nb")
        assert list(meta.inputs[0].shape) == [16]
        ins = [grpcclient.InferInput(n, [16], "FP32") for n in ("INPUT0", "INPUT1")]
        for i in ins:
            i.set_data_from_numpy(np.full(16, 2, np.float32))
        np.testing.assert_allclose(c.infer("nb", ins).as_numpy("OUTPUT0"), np.full(16, 4, np.float32))


def test_autocomplete_without_config(tmp_path, serve_repo):
    models.copy_example(tmp_path)
    (tmp_path / "mlp" / "config.pbtxt").unlink()
    s = serve_repo(tmp_path, metrics=False)
    with grpcclient.InferenceServerClient(s.url) as c:
        cfg = c.get_model_config("mlp").config
        assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size > 0
        assert [(i.name, list(i.dims)) for i in cfg.input] == [("INPUT0", [64])]
        x = np.ones((2, 64), np.float32)
        np.testing.assert_allclose(_infer_mlp(c, x).as_numpy("OUTPUT0"), reference(x), rtol=1e-5, atol=1e-5)


def test_version_policy_and_versions(tmp_path, serve_repo):
    for v in (1, 2, 3):
        models.identity(tmp_path, "ident", "INT32", version=v)
    cfg = (tmp_path / "ident" / "config.pbtxt").read_text()
    (tmp_path / "ident" / "config.pbtxt").write_text(cfg + "\nversion_policy: { specific: { versions: [1, 3] } }\n")
    s = serve_repo(tmp_path, metrics=False)
    with grpcclient.InferenceServerClient(s.url) as c:
        assert list(c.get_model_metadata("ident").versions) == ["1", "3"]
        assert c.is_model_ready("ident", "3") and not c.is_model_ready("ident", "2")
        with pytest.raises(InferenceServerException) as e:
            c.get_model_metadata("ident", "2")
        assert e.value.status() == "StatusCode.NOT_FOUND"
        index = {(m.name, m.version): m.state for m in c.get_model_repository_index().models}
        assert index == {("ident", "1"): "READY", ("ident", "3"): "READY"}


def test_load_unload_index(tmp_path, serve_repo):
    models.copy_example(tmp_path)
    s = serve_repo(tmp_path, metrics=False, **EXPLICIT)
    models.identity(tmp_path, "late", "FP32")  # appears after start
    with grpcclient.InferenceServerClient(s.url) as c:
        index = {m.name: m.state for m in c.get_model_repository_index().models}
        assert index == {"mlp": "READY", "late": ""}
        c.load_model("late")
        assert c.is_model_ready("late")
        c.unload_model("mlp")
        assert not c.is_model_ready("mlp")
        with pytest.raises(InferenceServerException) as e:
            _infer_mlp(c, np.zeros((1, 64), np.float32))
        assert e.value.status() == "StatusCode.NOT_FOUND"
        c.load_model("mlp")
        assert c.is_model_ready("mlp")
        c.unload_model("late")
        import grpc

        from trtserve.protos import grpc_service_pb2 as pb
        from trtserve.protos import grpc_service_pb2_grpc as pb_grpc

        with grpc.insecure_channel(s.url) as ch:
            ready = pb_grpc.GRPCInferenceServiceStub(ch).RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
        assert [(m.name, m.state) for m in ready.models] == [("mlp", "READY")]
        with pytest.raises(InferenceServerException) as e:
            c.load_model("does_not_exist")
        assert e.value.status() == "StatusCode.NOT_FOUND"


def test_broken_model_reports_reason(tmp_path, serve_repo):
    models.copy_example(tmp_path)
    models.write_config(tmp_path, "broken", 'name: "broken"\nplatform: "onnxruntime_onnx"\nmax_batch_size: -3\n')
    (tmp_path / "broken" / "1").mkdir()
    s = serve_repo(tmp_path, metrics=False, exit_on_error=False, **EXPLICIT)
    with grpcclient.InferenceServerClient(s.url) as c:
        assert c.is_model_ready("mlp")  # one broken model does not stop the others
        rows = {m.name: (m.state, m.reason) for m in c.get_model_repository_index().models}
        assert rows["broken"][0] == "UNAVAILABLE" and "model.onnx" in rows["broken"][1]
        with pytest.raises(InferenceServerException) as e:
            c.load_model("broken")
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_stream_infer(triton_client):
    import queue

    results: "queue.Queue" = queue.Queue()
    triton_client.start_stream(callback=lambda result, error: results.put((result, error)))
    xs = [np.full((i + 1, 64), i, np.float32) for i in range(4)]
    for i, x in enumerate(xs):
        inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        triton_client.async_stream_infer("mlp", [inp], request_id=str(i))
    bad = grpcclient.InferInput("INPUT0", [1, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
    triton_client.async_stream_infer("mlp", [bad], request_id="bad")
    got = {}
    errors = []
    for _ in range(5):
        result, error = results.get(timeout=10)
        if error is not None:
            errors.append(str(error))
        else:
            got[result.get_response().id] = result.as_numpy("OUTPUT0")
    triton_client.stop_stream()
    for i, x in enumerate(xs):
        np.testing.assert_allclose(got[str(i)], reference(x), rtol=1e-5, atol=1e-5)
    assert len(errors) == 1 and "INPUT0" in errors[0] and "INVALID_ARGUMENT" in errors[0]


async def test_aio_client(example_server):
    async with aioclient.InferenceServerClient(example_server.url) as c:
        assert await c.is_server_ready()
        xs = [np.random.default_rng(i).standard_normal((2, 64)).astype(np.float32) for i in range(16)]

        async def one(x):
            inp = aioclient.InferInput("INPUT0", [2, 64], "FP32")
            inp.set_data_from_numpy(x)
            return (await c.infer("mlp", [inp])).as_numpy("OUTPUT0")

        outs = await asyncio.gather(*(one(x) for x in xs))
        for x, out in zip(xs, outs):
            np.testing.assert_allclose(out, reference(x), rtol=1e-5, atol=1e-5)


def test_grpc_health_and_reflection(example_server):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(example_server.url) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        assert h.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
        assert h.Check(health_pb2.HealthCheckRequest(
            service="inference.GRPCInferenceService")).status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert "inference.GRPCInferenceService" in names and "grpc.health.v1.Health" in names
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="inference.GRPCInferenceService")])))
        assert resp.file_descriptor_response.file_descriptor_proto


def test_large_message(example_server):
    """Above grpcio's default 4 MiB limit: 32 x 64 FP32 is small, so send one 8 MiB BYTES-free tensor."""
    x = np.random.default_rng(3).standard_normal((32, 64)).astype(np.float32)
    import grpc

    from trtserve.protos import grpc_service_pb2 as pb
    from trtserve.protos import grpc_service_pb2_grpc as pb_grpc

    req = pb.ModelInferRequest(model_name="mlp")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[32, 64])
    req.raw_input_contents.append(x.tobytes())
    req.parameters["padding"].string_param = "x" * (6 << 20)  # unknown parameters are ignored
    opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(example_server.url, options=opts) as ch:
        resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req)
    np.testing.assert_allclose(np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(32, 16), reference(x),
                               rtol=1e-5, atol=1e-5)


def test_model_warmup_runs_before_ready(tmp_path, serve_repo):
    models.copy_example(tmp_path)
    text = (tmp_path / "mlp" / "config.pbtxt").read_text()
    (tmp_path / "mlp" / "config.pbtxt").write_text(text + """
model_warmup [ { name: "zeros" batch_size: 4 count: 2
  inputs { key: "INPUT0" value { data_type: TYPE_FP32 dims: [ 64 ] zero_data: true } } } ]
""")
    models.copy_example(tmp_path, "bad_warmup")
    text = (tmp_path / "bad_warmup" / "config.pbtxt").read_text()
    (tmp_path / "bad_warmup" / "config.pbtxt").write_text(text + """
model_warmup [ { name: "wrong" batch_size: 1
  inputs { key: "INPUT0" value { data_type: TYPE_FP32 dims: [ 3 ] random_data: true } } } ]
""")
    s = serve_repo(tmp_path, metrics=False, exit_on_error=False)
    with grpcclient.InferenceServerClient(s.url) as c:
        assert c.is_model_ready("mlp")
        assert not c.is_model_ready("bad_warmup")
        reasons = {m.name: m.reason for m in c.get_model_repository_index().models}
        assert "model_warmup 'wrong' failed" in reasons["bad_warmup"]
        # warm-up is not inference: statistics start at zero
        assert c.get_inference_statistics("mlp").model_stats[0].inference_count == 0
