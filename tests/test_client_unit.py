"""trtserve.client without the real server: codec round trips, errors, targets, percentiles, inputs.

Where a socket is needed the trivial grpc.aio server of client/bench/ceiling.py stands in.
"""
from __future__ import annotations

import asyncio
import json
import math
import shutil
import sys

import grpc
import numpy as np
import pytest

from tests.conftest import spawn

from trtserve import dtypes
from trtserve.client import AsyncInferenceClient, InferenceClient, InferenceServerError, bf16_to_float32, \
    float32_to_bf16
from trtserve.client import _channel, _codec
from trtserve.client._errors import from_rpc_error
from trtserve.client.bench import inputs as bench_inputs
from trtserve.client.bench import stats
from trtserve.client.bench.ceiling import TRIVIAL_MODEL, start_trivial_server
from trtserve.client.bench.load import poisson_schedule
from trtserve.client.cli import parse_input_arg
from trtserve.protos import grpc_service_pb2 as pb


def sample(wire: str, shape=(2, 3)) -> np.ndarray:
    rng = np.random.default_rng(7)
    if wire == "BYTES":
        return np.array([b"", b"a", b"\x00\xff", "h\u00e9".encode(), b"x" * 300, b"z"], dtype=object).reshape(shape)
    if wire == "BOOL":
        return rng.integers(0, 2, shape).astype(np.bool_)
    if wire == "BF16":
        return float32_to_bf16(rng.standard_normal(shape).astype(np.float32))
    dt = dtypes.BY_WIRE[wire].numpy
    if dt.kind == "f":
        return (rng.standard_normal(shape) * 100).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, shape, dtype=dt, endpoint=True)


def response_echoing(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """What an identity model answers: each input as an output of the same name, raw."""
    response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
    for t, raw in zip(request.inputs, request.raw_input_contents):
        response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        response.raw_output_contents.append(raw)
    return response


# codec ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wire", list(dtypes.BY_WIRE))
def test_codec_round_trip_every_dtype(wire):
    x = sample(wire)
    request = _codec.build_infer_request("m", {"x": x}, datatypes={"x": wire} if wire == "BF16" else None)
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [("x", wire, [2, 3])]
    expected_len = sum(4 + len(b) for b in x.ravel()) if wire == "BYTES" else x.size * dtypes.BY_WIRE[wire].itemsize
    assert len(request.raw_input_contents[0]) == expected_len
    wire_request = pb.ModelInferRequest.FromString(request.SerializeToString())
    out = _codec.decode_infer_response(response_echoing(wire_request))["x"]
    assert out.shape == x.shape and out.dtype == x.dtype
    if wire == "BYTES":
        assert out.tolist() == x.tolist()
    else:
        np.testing.assert_array_equal(out, x)


def test_codec_raw_is_little_endian_and_c_order():
    x = np.arange(6, dtype=">i4").reshape(2, 3).T  # big-endian, Fortran-ordered view
    request = _codec.build_infer_request("m", {"x": x})
    assert request.inputs[0].datatype == "INT32"
    assert request.raw_input_contents[0] == np.ascontiguousarray(x, dtype="<i4").tobytes()


def test_codec_str_and_scalar_and_empty():
    request = _codec.build_infer_request("m", {"s": np.array(["a", "\u00e9"]), "k": np.float64(2.5),
                                               "e": np.zeros((0, 4), np.float32)})
    out = _codec.decode_infer_response(response_echoing(request))
    assert out["s"].tolist() == [b"a", "\u00e9".encode()]
    assert out["k"].shape == () and out["k"] == 2.5
    assert out["e"].shape == (0, 4)


def test_codec_request_fields():
    request = _codec.build_infer_request("m", {"x": np.zeros(2, np.float32)}, outputs=["a", "b"], version=3,
                                         priority=2, timeout=0.25, request_id="r1",
                                         parameters={"flag": True, "n": 3, "f": 0.5, "s": "v"})
    assert (request.model_name, request.model_version, request.id) == ("m", "3", "r1")
    assert [o.name for o in request.outputs] == ["a", "b"]
    p = request.parameters
    assert p["priority"].uint64_param == 2 and p["timeout"].int64_param == 250_000
    assert (p["flag"].bool_param, p["n"].int64_param, p["f"].double_param, p["s"].string_param) == (True, 3, 0.5, "v")


@pytest.mark.parametrize("kwargs,match", [
    ({"inputs": {"x": np.zeros(2, np.complex64)}}, "no KServe v2 datatype"),
    ({"inputs": {"x": np.zeros(2)}, "datatypes": {"y": "FP32"}}, "not among the inputs"),
    ({"inputs": {"x": np.zeros(2)}, "datatypes": {"x": "FP8"}}, "unknown datatype"),
    ({"inputs": {"x": np.array([1.5])}, "datatypes": {"x": "INT32"}}, "do not fit INT32"),
    ({"inputs": {"x": np.zeros(2)}, "datatypes": {"x": "BYTES"}}, "BYTES needs"),
    ({"inputs": {"x": np.zeros(2)}, "parameters": {"priority": 1}}, "reserved"),
])
def test_codec_refuses_bad_requests_with_the_one_error(kwargs, match):
    with pytest.raises(InferenceServerError, match=match) as e:
        _codec.build_infer_request("m", **kwargs)
    assert e.value.status == "INVALID_ARGUMENT"


def test_codec_explicit_exact_cast_and_bf16_from_float():
    request = _codec.build_infer_request("m", {"x": np.array([1, 2], np.int64), "b": np.array([1.0, -2.0])},
                                         datatypes={"x": "int32", "b": "BF16"})
    assert request.raw_input_contents[0] == np.array([1, 2], "<i4").tobytes()
    assert request.raw_input_contents[1] == np.array([0x3F80, 0xC000], "<u2").tobytes()


def test_bf16_conversion():
    x = np.array([1.0, -2.0, 0.0, 3.140625, np.inf, 1.00390625, 1.01171875], np.float32)
    bits = float32_to_bf16(x)
    # 1.00390625 is halfway between 1.0 and 1.0078125: ties to even -> 1.0; 1.01171875 -> 1.015625 (even)
    assert bits.tolist() == [0x3F80, 0xC000, 0x0000, 0x4049, 0x7F80, 0x3F80, 0x3F82]
    np.testing.assert_array_equal(bf16_to_float32(bits), [1.0, -2.0, 0.0, 3.140625, np.inf, 1.0, 1.015625])
    assert np.isnan(bf16_to_float32(float32_to_bf16(np.array([np.nan], np.float32))))[0]


def test_decode_typed_contents_and_corrupt_responses():
    response = pb.ModelInferResponse()
    t = response.outputs.add(name="y", datatype="INT32", shape=[3])
    t.contents.int_contents.extend([1, -2, 3])
    assert _codec.decode_infer_response(response)["y"].tolist() == [1, -2, 3]
    bad = pb.ModelInferResponse()
    bad.outputs.add(name="y", datatype="FP32", shape=[3])
    bad.raw_output_contents.append(b"\0" * 8)
    with pytest.raises(InferenceServerError, match="needs 12") as e:
        _codec.decode_infer_response(bad)
    assert e.value.status == "INTERNAL"
    bad.raw_output_contents.append(b"")
    with pytest.raises(InferenceServerError, match="2 raw_output_contents"):
        _codec.decode_infer_response(bad)


def test_load_request_overrides():
    r = _codec.load_request("m", config='{"max_batch_size": 4}', files={"1/model.onnx": b"\x01"})
    assert r.parameters["config"].string_param == '{"max_batch_size": 4}'
    assert r.parameters["file:1/model.onnx"].bytes_param == b"\x01"


# errors --------------------------------------------------------------------------------------------------------------

class FakeRpcError(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.NOT_FOUND

    def details(self):
        return "model 'x' is not loaded"

    def debug_error_string(self):
        return "debug"


def test_error_translation():
    e = from_rpc_error(FakeRpcError())
    assert isinstance(e, InferenceServerError)
    assert (e.status, e.message, e.debug_details, e.code) == ("NOT_FOUND", "model 'x' is not loaded", "debug",
                                                              grpc.StatusCode.NOT_FOUND)
    assert str(e) == "[StatusCode.NOT_FOUND] model 'x' is not loaded"
    assert InferenceServerError("NOT_A_CODE", "m").code == grpc.StatusCode.UNKNOWN


async def test_errors_from_a_real_channel_are_translated_once():
    server, port = await start_trivial_server()
    try:
        async with AsyncInferenceClient(f"127.0.0.1:{port}") as client:
            assert await client.is_server_live() and await client.is_server_ready()
            assert (await client.model_config(TRIVIAL_MODEL)).max_batch_size == 32
            with pytest.raises(InferenceServerError) as e:
                await client.model_metadata("nope")
            assert (e.value.status, e.value.message) == ("NOT_FOUND", "unknown model: 'nope'")
            assert e.value.__cause__ is None and e.value.__suppress_context__
            with pytest.raises(InferenceServerError) as e:
                await client.is_model_ready(TRIVIAL_MODEL)  # the trivial server has no ModelReady
            assert e.value.status == "UNIMPLEMENTED"
            out = await client.infer(TRIVIAL_MODEL, {"INPUT0": np.zeros((1, 64), np.float32)})
            assert out["OUTPUT0"].shape == (1, 16)
    finally:
        await server.stop(0)


async def test_deadline_exceeded_is_translated():
    """A server slower than the deadline: the call ends DEADLINE_EXCEEDED on time (gRPC rounds tiny deadlines
    up to its timer tick, so the server is made slow rather than the deadline tiny)."""
    from trtserve.client.bench.ceiling import SERVICE

    async def slow_live(request, context):
        await asyncio.sleep(2.0)
        return pb.ServerLiveResponse(live=True)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "ServerLive": grpc.unary_unary_rpc_method_handler(slow_live, pb.ServerLiveRequest.FromString,
                                                          lambda m: m.SerializeToString())}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AsyncInferenceClient(f"127.0.0.1:{port}") as client:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(InferenceServerError) as e:
                await client.is_server_live(timeout=0.1)
            assert e.value.status == "DEADLINE_EXCEEDED" and loop.time() - t0 < 1.5
    finally:
        await server.stop(0)


def test_unreachable_server_is_unavailable():
    with socket_closed_port() as port:
        with InferenceClient(f"127.0.0.1:{port}", retries=1) as client:
            with pytest.raises(InferenceServerError) as e:
                client.is_server_live(timeout=5)
    assert e.value.status == "UNAVAILABLE"


class socket_closed_port:
    """A loopback port nothing listens on (bound, then released)."""

    def __enter__(self) -> int:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return port

    def __exit__(self, *exc) -> None:
        pass


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
async def test_tls_with_root_cert_and_server_name(tmp_path):
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    spawn(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=trtserve-test", "-addext",
                    "subjectAltName=DNS:trtserve-test"], check=True, capture_output=True)
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server, port = await start_trivial_server(credentials=creds)
    try:
        async with AsyncInferenceClient(f"127.0.0.1:{port}", root_cert=str(cert),
                                        server_name="trtserve-test") as client:
            assert await client.is_server_live(timeout=10)
        async with AsyncInferenceClient(f"127.0.0.1:{port}", retries=0) as plain:
            with pytest.raises(InferenceServerError) as e:
                await plain.is_server_live(timeout=5)
            assert e.value.status == "UNAVAILABLE"
    finally:
        await server.stop(0)


def _openssl(*args: str) -> None:
    spawn(["openssl", *args], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
async def test_mutual_tls_client_cert_and_key(tmp_path):
    """A server that requires a client certificate signed by its CA: served with one, refused without."""
    p = {n: str(tmp_path / n) for n in ("ca.key", "ca.pem", "s.key", "s.csr", "s.pem", "c.key", "c.csr", "c.pem",
                                        "ext")}
    (tmp_path / "ext").write_text("subjectAltName=DNS:trtserve-test\n")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", p["ca.key"], "-out", p["ca.pem"], "-days", "1",
             "-subj", "/CN=test-ca")
    for who, cn in (("s", "trtserve-test"), ("c", "client")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", p[f"{who}.key"], "-out", p[f"{who}.csr"],
                 "-subj", f"/CN={cn}")
        _openssl("x509", "-req", "-in", p[f"{who}.csr"], "-CA", p["ca.pem"], "-CAkey", p["ca.key"],
                 "-CAcreateserial", "-out", p[f"{who}.pem"], "-days", "1", "-extfile", p["ext"])
    read = lambda n: (tmp_path / n).read_bytes()  # noqa: E731
    creds = grpc.ssl_server_credentials([(read("s.key"), read("s.pem"))], root_certificates=read("ca.pem"),
                                        require_client_auth=True)
    server, port = await start_trivial_server(credentials=creds)
    try:
        async with AsyncInferenceClient(f"127.0.0.1:{port}", root_cert=p["ca.pem"], client_cert=p["c.pem"],
                                        client_key=p["c.key"], server_name="trtserve-test") as client:
            assert await client.is_server_live(timeout=10)
        async with AsyncInferenceClient(f"127.0.0.1:{port}", root_cert=read("ca.pem"), server_name="trtserve-test",
                                        retries=0) as anonymous:
            with pytest.raises(InferenceServerError) as e:
                await anonymous.is_server_live(timeout=5)
            assert e.value.status == "UNAVAILABLE"
    finally:
        await server.stop(0)


# targets and channel options ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("url,expected", [
    ("localhost:8001", ("localhost:8001", False)),
    ("127.0.0.1:8001,127.0.0.1:8002", ("ipv4:127.0.0.1:8001,127.0.0.1:8002", True)),
    (["127.0.0.1:1", " 10.0.0.2:2 "], ("ipv4:127.0.0.1:1,10.0.0.2:2", True)),
    ("[::1]:1,[::1]:2", ("ipv6:[::1]:1,[::1]:2", True)),
    ("dns:///svc.ns:8001", ("dns:///svc.ns:8001", True)),
    ("ipv4:127.0.0.1:1,127.0.0.1:2", ("ipv4:127.0.0.1:1,127.0.0.1:2", True)),
    ("unix:/tmp/s.sock", ("unix:/tmp/s.sock", False)),
])
def test_parse_target(url, expected):
    assert _channel.parse_target(url) == expected


@pytest.mark.parametrize("url,match", [
    ("", "no server address"), ("host", "HOST:PORT"), ("h:0", "HOST:PORT"), ("h:x", "HOST:PORT"),
    ("a:1,b:2", "not an IP address"), ("127.0.0.1:1,[::1]:2", "mixes IPv4 and IPv6"),
])
def test_parse_target_errors(url, match):
    with pytest.raises(ValueError, match=match):
        _channel.parse_target(url)


def test_hostnames_in_a_list_are_resolved_once():
    assert _channel.resolve_addresses("localhost:1,127.0.0.1:2") == ["127.0.0.1:1", "127.0.0.1:2"]
    assert InferenceClient(["localhost:1", "localhost:2"]).target == "ipv4:127.0.0.1:1,127.0.0.1:2"


def test_channel_options_and_service_config():
    opts = dict(_channel.channel_options(round_robin=True, retries=2, extra=[("grpc.max_send_message_length", 7)]))
    assert opts["grpc.max_receive_message_length"] == 2**31 - 1
    assert opts["grpc.max_send_message_length"] == 7  # extra options win
    assert opts["grpc.lb_policy_name"] == "round_robin" and opts["grpc.keepalive_time_ms"] == 2**31 - 1
    config = json.loads(opts["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "inference.GRPCInferenceService"}
    policy = config["methodConfig"][0]["retryPolicy"]
    assert policy["maxAttempts"] == 3 and policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    no_retry = dict(_channel.channel_options(retries=0))
    assert no_retry["grpc.enable_retries"] == 0 and json.loads(no_retry["grpc.service_config"]) == {}
    ka = dict(_channel.channel_options(keepalive=_channel.KeepAliveOptions(time_ms=10_000)))
    assert ka["grpc.keepalive_time_ms"] == 10_000


def test_make_spec_tls_and_headers():
    spec = _channel.make_spec("h:1", server_name="x", headers={"Authorization": "Bearer t"})
    assert spec.credentials is not None and ("grpc.ssl_target_name_override", "x") in spec.options
    assert spec.metadata == (("authorization", "Bearer t"),)
    assert _channel.make_spec("h:1").credentials is None
    with pytest.raises(ValueError, match="go together"):
        _channel.make_spec("h:1", client_cert=b"c")
    with pytest.raises(ValueError, match="retries"):
        _channel.make_spec("h:1", retries=-1)


# percentiles and stats -----------------------------------------------------------------------------------------------

def test_nearest_rank_percentiles():
    values = list(range(1, 101))
    assert stats.percentiles(values) == {50.0: 50.0, 90.0: 90.0, 95.0: 95.0, 99.0: 99.0}
    assert stats.nearest_rank([5.0], 99) == 5.0
    assert stats.nearest_rank([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert stats.nearest_rank([1.0, 2.0, 3.0, 4.0], 51) == 3.0
    assert stats.nearest_rank(list(range(10)), 100) == 9
    assert math.isnan(stats.nearest_rank([], 50))
    for bad in (0, -1, 100.1):
        with pytest.raises(ValueError):
            stats.nearest_rank([1.0], bad)
    shuffled = np.random.default_rng(0).permutation(1000).tolist()
    assert stats.percentiles(shuffled, (99.9,)) == {99.9: 998.0}


def test_summarize_and_window():
    records = [(0.5, 9.0), (1.0, 0.001), (1.5, 0.002), (2.0, 0.003), (2.5, 9.0)]
    lats = stats.window(records, 1.0, 2.5)
    assert lats == [0.001, 0.002, 0.003]
    s = stats.summarize("concurrency", 4, 2.0, 8, lats, {"UNAVAILABLE": 2, "INTERNAL": 1}, [0.0, 0.004])
    assert (s.requests, s.errors, s.requests_per_s, s.rows_per_s) == (3, 3, 1.5, 12.0)
    assert s.errors_by_status == {"INTERNAL": 1, "UNAVAILABLE": 2}
    assert s.p50_ms == pytest.approx(2.0) and s.p99_ms == pytest.approx(3.0) and s.max_ms == pytest.approx(3.0)
    assert s.mean_ms == pytest.approx(2.0) and s.send_lag_p99_ms == pytest.approx(4.0)
    empty = stats.summarize("request_rate", 10.0, 1.0, 1, [])
    assert empty.requests == 0 and empty.as_dict()["p50_ms"] is None
    with pytest.raises(ValueError):
        stats.summarize("concurrency", 1, 0.0, 1, [])


def test_server_view_from_statistics_snapshots():
    before = {"success": (10, 10_000_000), "queue": (10, 1_000_000), "compute_infer": (4, 4_000_000)}
    after = {"success": (30, 50_000_000), "queue": (30, 3_000_000), "compute_infer": (8, 8_000_000),
             "compute_input": (20, 2_000_000)}
    view = stats.server_view(before, after)
    assert view == {"server_requests": 20, "server_latency_ms": 2.0, "server_queue_ms": 0.1,
                    "server_compute_ms": pytest.approx(1.0 + 0.1)}
    assert stats.server_view(before, before) == {"server_requests": 0}
    s = stats.summarize("concurrency", 1, 1.0, 1, [0.003, 0.003], server=view)
    assert s.server_requests == 20 and s.client_overhead_ms == pytest.approx(1.0)


def test_histogram():
    edges, counts = stats.histogram([0.0, 1.0, 2.0, 3.0, 4.0], bins=4)
    assert edges == [0.0, 1.0, 2.0, 3.0, 4.0] and counts == [1, 1, 1, 2]
    assert stats.histogram([2.0, 2.0]) == ([2.0, 2.0], [2])
    assert stats.histogram([]) == ([], [])


def test_poisson_schedule_rate_and_determinism():
    offsets = poisson_schedule(1000.0, 10.0, seed=1)
    assert np.all(np.diff(offsets) > 0) and offsets[-1] < 10.0
    assert abs(len(offsets) - 10_000) < 400  # 4 sigma of a Poisson count
    gaps = np.diff(offsets)
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # exponential gaps: coefficient of variation 1
    np.testing.assert_array_equal(offsets, poisson_schedule(1000.0, 10.0, seed=1))
    with pytest.raises(ValueError):
        poisson_schedule(0.0, 1.0)


# load tester inputs and CLI parsing ----------------------------------------------------------------------------------

def _meta(shape=(-1, 64), datatype="FP32") -> pb.ModelMetadataResponse:
    m = pb.ModelMetadataResponse(name="m")
    m.inputs.add(name="x", datatype=datatype, shape=list(shape))
    return m


def test_plan_inputs_follows_perf_analyzer_shape_rules():
    assert bench_inputs.plan_inputs(_meta(), 32, 4)[0].shape == (4, 64)
    assert bench_inputs.plan_inputs(_meta((-1, -1)), 8, 2, {"x": [7]})[0].shape == (2, 7)
    assert bench_inputs.plan_inputs(_meta((3, 5)), 0, 1)[0].shape == (3, 5)
    for args, match in [((_meta((-1, -1)), 8, 1), "variable dims"), ((_meta(), 0, 2), "does not batch"),
                        ((_meta(), 4, 8), "exceeds"), ((_meta(), 8, 1, {"y": [1]}), "not inputs"),
                        ((_meta(), 8, 1, {"x": [65]}), "does not match"), ((_meta(), 8, 0), ">= 1")]:
        with pytest.raises(ValueError, match=match):
            bench_inputs.plan_inputs(*args)


def test_parse_shapes_and_input_args():
    assert bench_inputs.parse_shapes(["a:1,2", "b:3"]) == {"a": [1, 2], "b": [3]}
    for bad in ("a", "a:x", ":1", "a:-1"):
        with pytest.raises(ValueError):
            bench_inputs.parse_shapes([bad])
    assert parse_input_arg("x=random") == ("x", "random", None)
    assert parse_input_arg("x=random:2,64") == ("x", "random", [2, 64])
    assert parse_input_arg("x=/tmp/a.npy") == ("x", "/tmp/a.npy", None)
    for bad in ("x", "=a.npy", "x=", "x=random:a"):
        with pytest.raises(ValueError):
            parse_input_arg(bad)


@pytest.mark.parametrize("wire", list(dtypes.BY_WIRE))
def test_make_data_every_dtype_encodes(wire):
    spec = bench_inputs.TensorSpec("x", wire, (2, 3))
    for kind in ("random", "zero"):
        x = bench_inputs.make_data([spec], kind)["x"]
        assert x.shape == (2, 3)
        _codec.build_infer_request("m", {"x": x}, datatypes={"x": wire})
    with pytest.raises(ValueError):
        bench_inputs.make_data([spec], "ones")


def test_client_imports_nothing_from_the_server():
    code = ("import sys, trtserve.client, trtserve.client.cli, trtserve.client.bench.runner, "
            "trtserve.client.bench.report, trtserve.client.bench.ceiling; "
            "bad = sorted(m for m in sys.modules if m.startswith('trtserve.server') or m == 'matplotlib'); "
            "print(bad); sys.exit(1 if bad else 0)")
    run = spawn([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
