"""The batcher through the real server, ONNX Runtime backend and tritonclient."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests import models
from trtserve.server.examples.make_mlp import reference


async def _burst(url: str, model: str, xs, **kw):
    async with aioclient.InferenceServerClient(url) as c:
        async def one(x):
            inp = aioclient.InferInput("INPUT0", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            try:
                return (await c.infer(model, [inp], **kw)).as_numpy("OUTPUT0")
            except InferenceServerException as e:
                return e
        return await asyncio.gather(*(one(x) for x in xs))


def _stats(url, model):
    with grpcclient.InferenceServerClient(url) as c:
        return c.get_inference_statistics(model).model_stats[0]


def test_concurrent_requests_form_batches_with_correct_outputs(tmp_path, serve_repo):
    models.copy_example(tmp_path, config="""
name: "mlp" platform: "onnxruntime_onnx" max_batch_size: 32
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group [ { count: 2 kind: KIND_CPU } ]
""")
    s = serve_repo(tmp_path, metrics=False)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((int(rng.integers(1, 4)), 64)).astype(np.float32) for _ in range(64)]
    outs = asyncio.run(_burst(s.url, "mlp", xs))
    for x, out in zip(xs, outs):
        np.testing.assert_allclose(out, reference(x), rtol=1e-4, atol=1e-5)
    st = _stats(s.url, "mlp")
    assert st.inference_count == sum(x.shape[0] for x in xs)
    assert st.inference_stats.success.count == 64
    assert st.execution_count < 64  # requests shared batches
    assert sum(b.compute_infer.count for b in st.batch_stats) == st.execution_count
    assert max(b.batch_size for b in st.batch_stats) > 3


def test_padding_variable_lengths_share_a_batch(tmp_path, serve_repo):
    models.sequence_scale(tmp_path, extra="dynamic_batching { max_queue_delay_microseconds: 20000 }\n"
                                          "instance_group [ { count: 2 kind: KIND_CPU } ]")
    s = serve_repo(tmp_path, metrics=False)
    xs = [np.arange(1, n + 1, dtype=np.float32)[None] for n in (3, 7, 1, 12, 5, 9, 2, 4) * 4]
    outs = asyncio.run(_burst(s.url, "seq", xs))
    for x, out in zip(xs, outs):
        np.testing.assert_array_equal(out, 2 * x)  # each gets its own length back
    st = _stats(s.url, "seq")
    assert st.execution_count < len(xs)


def test_priority_parameter_and_bad_priority(tmp_path, serve_repo):
    models.copy_example(tmp_path, config="""
name: "mlp" platform: "onnxruntime_onnx" max_batch_size: 32
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
dynamic_batching { priority_levels: 2 default_priority_level: 2 }
""")
    s = serve_repo(tmp_path, metrics=False)
    x = np.ones((1, 64), np.float32)
    out = asyncio.run(_burst(s.url, "mlp", [x] * 4, priority=1))
    assert all(isinstance(o, np.ndarray) for o in out)
    bad = asyncio.run(_burst(s.url, "mlp", [x], priority=3))[0]
    assert isinstance(bad, InferenceServerException) and bad.status() == "StatusCode.INVALID_ARGUMENT"
    assert "priority 3" in bad.message()


async def test_queue_full_rejects_with_unavailable_and_nothing_is_lost(tmp_path):
    """A held batch, a queue of 2 filled behind it, then 3 more: those are rejected at once with
    UNAVAILABLE; the rest finish correctly once released, and statistics count both (deterministic:
    the gated test backend runs a batch only when the test allows it)."""
    import grpc

    from tests.test_faults import GATED, Control, GatedBackend, OptionsServer, request, until
    from trtserve.protos import grpc_service_pb2_grpc as pb_grpc
    from trtserve.server.app import ServerOptions

    control = Control()
    models.write_config(tmp_path, "gated", GATED.format(name="gated").replace(
        "dynamic_batching { }", "dynamic_batching { default_queue_policy { max_queue_size: 2 } }"))
    (tmp_path / "gated" / "1").mkdir()
    s = OptionsServer(ServerOptions(model_repository=tmp_path, grpc_port=0, http_port=0, metrics_port=None, gpu_metrics=False,
                                    backend_factories={"gated": lambda cfg: GatedBackend(cfg, control)}))
    try:
        async with grpc.aio.insecure_channel(s.url) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            first = stub.ModelInfer(request(0), timeout=20)
            await control.started_batch([0])
            queued = [stub.ModelInfer(request(i), timeout=20) for i in (1, 2)]
            await until(lambda: s.server.repository.get("gated").batcher.pending == 2)
            for i in (3, 4, 5):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.ModelInfer(request(i), timeout=20)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "queue" in e.value.details() and "full" in e.value.details()
            control.free_running = True
            control.allow(3)
            for i, call in enumerate([first] + queued):
                out = np.frombuffer((await call).raw_output_contents[0], np.float32)
                np.testing.assert_array_equal(out, np.full(4, 2 * i, np.float32))
        st = _stats(s.url, "gated")
        assert (st.inference_stats.success.count, st.inference_stats.fail.count) == (3, 3)
    finally:
        control.free_running = True
        control.allow(10)
        s.stop()
