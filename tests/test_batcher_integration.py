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


def test_queue_full_rejects_with_unavailable_and_nothing_is_lost(tmp_path, serve_repo):
    models.copy_example(tmp_path, config="""
name: "mlp" platform: "onnxruntime_onnx" max_batch_size: 1
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
dynamic_batching { default_queue_policy { max_queue_size: 2 } }
""")
    s = serve_repo(tmp_path, metrics=False)
    xs = [np.full((1, 64), i, np.float32) for i in range(200)]
    outs = asyncio.run(_burst(s.url, "mlp", xs))
    rejected = [o for o in outs if isinstance(o, InferenceServerException)]
    ok = [(x, o) for x, o in zip(xs, outs) if isinstance(o, np.ndarray)]
    assert rejected, "200 concurrent requests against a queue of 2 must overflow"
    assert all(r.status() == "StatusCode.UNAVAILABLE" and "queue" in r.message() and "full" in r.message()
               for r in rejected)
    assert len(rejected) + len(ok) == 200
    for x, o in ok:
        np.testing.assert_allclose(o, reference(x), rtol=1e-4, atol=1e-4)
    st = _stats(s.url, "mlp")
    assert st.inference_stats.success.count == len(ok)
    assert st.inference_stats.fail.count == len(rejected)


def test_client_deadline_in_queue(tmp_path, serve_repo):
    """A request whose gRPC deadline passes is answered DEADLINE_EXCEEDED (by the server or grpc)."""
    models.copy_example(tmp_path)
    s = serve_repo(tmp_path, metrics=False)
    with grpcclient.InferenceServerClient(s.url) as c:
        inp = grpcclient.InferInput("INPUT0", [1, 64], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 64), np.float32))
        with pytest.raises(InferenceServerException) as e:
            c.infer("mlp", [inp], client_timeout=1e-6)
        assert "DEADLINE_EXCEEDED" in e.value.status()
        assert c.infer("mlp", [inp]).as_numpy("OUTPUT0").shape == (1, 16)
