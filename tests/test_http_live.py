"""The KServe v2 HTTP/REST port against a live server (single-process mode), with the unmodified
tritonclient.http and plain HTTP: every endpoint, every datatype in JSON and binary form, shared memory,
errors with Triton's statuses, compression, model control, log and trace settings, and the curl examples of
docs/http.md run as written. The process-model side (several front ends, drain, perf_analyzer, TLS and
tokens) is tests/test_http_frontends.py.
"""
from __future__ import annotations

import gzip
import http.client
import json
import pathlib
import re
import subprocess
import uuid
import zlib
from typing import Iterator, Optional, Tuple

import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from tests import models
from tests.conftest import EXPLICIT, RunningServer
from tests.test_client_live import _bf16_identity, _ort_bf16
from trtserve import dtypes

ROOT = pathlib.Path(__file__).resolve().parent.parent
WIRES = [w for w in dtypes.BY_WIRE if w != "BF16"]
BIG = 1 << 20  # --max-message-bytes of this server: small, so the limit is cheap to reach


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("http_repo")
    models.copy_example(repo, "mlp")
    models.add_sub(repo, "add_sub")
    for wire in WIRES:
        models.identity(repo, f"ident_{wire}", wire)
    _bf16_identity(repo)
    models.identity(repo, "scores", "FP32", dims="[ 5 ]")
    models.identity(repo, "spare", "FP32")
    # BF16 needs a newer ONNX Runtime than Python 3.9 gets: that model may fail, the others serve (and the server
    # is ready without it: strict readiness would say not ready while a model that should load has failed)
    s = RunningServer(repo, exit_on_error=False, strict_readiness=False, max_message_bytes=BIG, **EXPLICIT)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> Iterator[th.InferenceServerClient]:
    c = th.InferenceServerClient(server.http_url)
    yield c
    c.close()


def raw(server, method: str, path: str, body: Optional[bytes] = None,
        headers: Optional[dict] = None) -> Tuple[int, dict, bytes]:
    """One plain HTTP request: (status, headers, body)."""
    host, port = server.http_url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def error(server, method: str, path: str, body=None, headers=None) -> Tuple[int, str]:
    status, hdrs, data = raw(server, method, path, body, headers)
    assert hdrs.get("content-type", "").startswith("application/json"), (status, data[:200])
    return status, json.loads(data)["error"]


def values(wire: str, shape) -> np.ndarray:
    n = int(np.prod(shape))
    if wire == "BYTES":
        return np.array([f"s{i}-é".encode() for i in range(n)], dtype=np.object_).reshape(shape)
    if wire == "BOOL":
        return (np.arange(n) % 2 == 0).reshape(shape)
    dt = dtypes.BY_WIRE[wire].numpy
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return np.array([info.min, info.max, 0, 1, info.max - 1, info.min + 1, 7, 3][:n] * (n // 8 + 1),
                        dt)[:n].reshape(shape)
    return (np.arange(n) * 0.25 - 1).astype(dt).reshape(shape)


# ---- health, metadata, configuration, statistics ------------------------------------------------------------------
def test_health_metadata_config(server, client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp") and client.is_model_ready("mlp", "1")
    assert not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta["name"] == "trtserve" and {"binary_tensor_data", "statistics"} <= set(meta["extensions"])
    md = client.get_model_metadata("mlp", "1")
    assert md["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 64]}]
    assert md["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, 16]}]
    config = client.get_model_config("add_sub")
    assert config["name"] == "add_sub" and config["max_batch_size"] == 8
    assert [i["dims"] for i in config["input"]] == [[16], [16]]  # numbers, not protobuf's strings
    assert "dynamic_batching" in config
    # plain HTTP: status codes and bodies as Triton sends them
    assert raw(server, "GET", "/v2/health/live")[0] == 200
    assert raw(server, "GET", "/v2/models/mlp/versions/1/ready")[0] == 200
    assert raw(server, "GET", "/v2/models/nope/ready")[0] == 400
    # path arguments are percent-decoded once; a query string is ignored
    assert raw(server, "GET", "/v2/models/ml%70?verbose=1")[0] == 200
    status, message = error(server, "GET", "/v2/models/a%2Fb")
    assert status == 404 and "'a/b'" in message


def test_statistics_count_http_requests(client):
    def count() -> int:
        return client.get_inference_statistics("spare")["model_stats"][0]["inference_stats"]["success"]["count"]

    before = count()
    x = th.InferInput("INPUT0", [2, 4], "FP32")
    x.set_data_from_numpy(np.ones((2, 4), np.float32))
    for _ in range(3):
        client.infer("spare", [x])
    assert count() == before + 3
    everything = client.get_inference_statistics()
    assert {"mlp", "spare"} <= {m["name"] for m in everything["model_stats"]}


def test_repository_index_load_unload(client):
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["mlp"]["state"] == "READY"
    client.unload_model("spare")
    assert not client.is_model_ready("spare")
    assert {m["name"]: m["state"] for m in client.get_model_repository_index()}["spare"] != "READY"
    client.load_model("spare")
    assert client.is_model_ready("spare")
    # a config override as Triton's load takes it (a JSON string)
    client.load_model("spare", config=json.dumps({"max_batch_size": 4, "input": [{"name": "INPUT0",
                      "data_type": "TYPE_FP32", "dims": [4]}], "output": [{"name": "OUTPUT0", "data_type":
                      "TYPE_FP32", "dims": [4]}]}))
    assert client.get_model_config("spare")["max_batch_size"] == 4
    client.load_model("spare")
    with pytest.raises(InferenceServerException) as e:
        client.load_model("does_not_exist")
    assert "does_not_exist" in e.value.message()


# ---- tensors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("wire", WIRES + ["BF16"])
def test_every_datatype_round_trips(server, client, wire, binary):
    name = f"ident_{wire}"
    if wire == "BF16":
        if not _ort_bf16() or not client.is_model_ready(name):
            pytest.skip("this ONNX Runtime cannot run BF16 models")
        import ml_dtypes  # what tritonclient takes for BF16 (older releases took float32)

        x = np.array([[1.5, -2.0, 0.25, 3.0], [0.0, 1.0, -1.0, 8.0]], ml_dtypes.bfloat16)
        if not binary:  # tritonclient sends BF16 in binary only; JSON numbers work over plain HTTP
            body = {"inputs": [{"name": "INPUT0", "shape": [2, 4], "datatype": "BF16",
                                "data": x.astype(np.float32).tolist()}]}
            status, _, data = raw(server, "POST", f"/v2/models/{name}/infer", json.dumps(body).encode())
            assert status == 200, data
            out = json.loads(data)["outputs"][0]
            assert out["datatype"] == "BF16" and out["data"] == x.astype(np.float32).ravel().tolist()
            return
    else:
        x = values(wire, (2, 4))
    i = th.InferInput("INPUT0", [2, 4], wire)
    i.set_data_from_numpy(x, binary_data=binary)
    r = client.infer(name, [i], outputs=[th.InferRequestedOutput("OUTPUT0", binary_data=binary)])
    got = r.as_numpy("OUTPUT0")
    assert got.shape == (2, 4)
    if wire == "BYTES":
        assert [bytes(v) if not isinstance(v, str) else v.encode() for v in got.ravel()] == list(x.ravel())
    elif wire == "BF16":
        assert np.array_equal(np.asarray(got, np.float32), x.astype(np.float32))
    else:
        assert np.array_equal(got, x)
        assert got.dtype == x.dtype


def test_nested_json_and_binary_data_output(server):
    body = {"id": "n1", "parameters": {"binary_data_output": True},
            "inputs": [{"name": "INPUT0", "shape": [2, 4], "datatype": "INT32",
                        "data": [[1, 2, 3, 4], [5, 6, 7, 8]]}]}
    status, hdrs, data = raw(server, "POST", "/v2/models/ident_INT32/infer", json.dumps(body).encode())
    assert status == 200 and hdrs["content-type"] == "application/octet-stream"
    n = int(hdrs["inference-header-content-length"])
    header = json.loads(data[:n])
    assert header["id"] == "n1" and header["outputs"][0]["parameters"]["binary_data_size"] == 32
    assert np.frombuffer(data[n:], "<i4").tolist() == list(range(1, 9))


def test_classification(client):
    x = th.InferInput("INPUT0", [1, 5], "FP32")
    x.set_data_from_numpy(np.array([[0.1, 0.9, 0.3, 0.7, 0.5]], np.float32))
    r = client.infer("scores", [x], outputs=[th.InferRequestedOutput("OUTPUT0", class_count=2)])
    got = [v.decode() if isinstance(v, bytes) else v for v in r.as_numpy("OUTPUT0").ravel()]
    assert [g.split(":")[1] for g in got] == ["1", "3"]


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_answers(client, algorithm):
    x = np.random.default_rng(0).random((4, 64), np.float32)
    i = th.InferInput("INPUT0", [4, 64], "FP32")
    i.set_data_from_numpy(x)
    plain = client.infer("mlp", [i]).as_numpy("OUTPUT0")
    squeezed = client.infer("mlp", [i], request_compression_algorithm=algorithm,
                            response_compression_algorithm=algorithm).as_numpy("OUTPUT0")
    assert np.array_equal(plain, squeezed)


def test_shared_memory_inputs_and_outputs(client):
    try:
        import tritonclient.utils.shared_memory as tshm
    except Exception as e:  # older tritonclient (Python 3.9) needs pkg_resources, which new setuptools lack
        pytest.skip(f"tritonclient's shared-memory helpers are unusable here: {type(e).__name__}: {e}")
    x = np.arange(2 * 64, dtype=np.float32).reshape(2, 64) / 100
    key = f"/trtserve_test_{uuid.uuid4().hex[:12]}"
    h = tshm.create_shared_memory_region("http_in", key, x.nbytes + 2 * 16 * 4)
    try:
        tshm.set_shared_memory_region(h, [x])
        client.register_system_shared_memory("http_region", key, x.nbytes + 2 * 16 * 4)
        status = client.get_system_shared_memory_status()
        assert [(r["name"], r["byte_size"]) for r in status] == [("http_region", x.nbytes + 2 * 16 * 4)]
        assert client.get_system_shared_memory_status("http_region")[0]["key"] == key
        i = th.InferInput("INPUT0", [2, 64], "FP32")
        i.set_shared_memory("http_region", x.nbytes)
        o = th.InferRequestedOutput("OUTPUT0")
        o.set_shared_memory("http_region", 2 * 16 * 4, offset=x.nbytes)
        r = client.infer("mlp", [i], outputs=[o])
        out = r.get_output("OUTPUT0")  # the output went to the region: name, datatype and shape only, as Triton
        assert out == {"name": "OUTPUT0", "datatype": "FP32", "shape": [2, 16]}
        in_message = th.InferInput("INPUT0", [2, 64], "FP32")
        in_message.set_data_from_numpy(x)
        expected = client.infer("mlp", [in_message]).as_numpy("OUTPUT0")
        got = tshm.get_contents_as_numpy(h, np.float32, [2, 16], offset=x.nbytes)
        assert np.allclose(got, expected)
        client.unregister_system_shared_memory("http_region")
        assert client.get_system_shared_memory_status() == []
        with pytest.raises(InferenceServerException) as e:
            client.infer("mlp", [i])
        assert e.value.status() == "404" and "http_region" in e.value.message()  # NOT_FOUND, as over gRPC
    finally:
        client.unregister_system_shared_memory()
        tshm.destroy_shared_memory_region(h)


# ---- errors -------------------------------------------------------------------------------------------------------
def _infer_body(datatype="FP32", shape=(1, 64), data=None, name="INPUT0") -> bytes:
    data = [0.5] * int(np.prod(shape)) if data is None else data
    return json.dumps({"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}]}).encode()


@pytest.mark.parametrize("path, body, status, words", [
    ("/v2/models/mlp/infer", _infer_body(shape=(1, 3), data=[1, 2, 3]), 400, ["INPUT0", "[1, 3]", "64"]),
    ("/v2/models/mlp/infer", _infer_body(datatype="INT32", data=[1] * 64), 400, ["INPUT0", "INT32", "FP32"]),
    ("/v2/models/mlp/infer", _infer_body(name="WRONG"), 400, ["WRONG", "INPUT0"]),
    ("/v2/models/mlp/infer", _infer_body(data=[1] * 63), 400, ["INPUT0", "63", "64"]),
    ("/v2/models/mlp/infer", _infer_body(data=["a"] * 64), 400, ["INPUT0"]),
    ("/v2/models/mlp/infer", b"{not json", 400, ["JSON"]),
    ("/v2/models/ident_INT8/infer", _infer_body("INT8", (1, 4), [1, 2, 3, 300]), 400, ["INPUT0", "300"]),
    ("/v2/models/nope/infer", _infer_body(), 404, ["nope"]),
    ("/v2/models/nope", None, 404, ["nope"]),
    ("/v2/models/mlp/versions/7", None, 404, ["7"]),
    ("/v3/anything", None, 404, ["/v2"]),
])
def test_errors_name_the_tensor_with_tritons_status(server, path, body, status, words):
    got, message = error(server, "POST" if body is not None else "GET", path, body)
    assert got == status, message
    for w in words:
        assert w in message, (w, message)


def test_unknown_output_and_method(server):
    body = json.loads(_infer_body())
    body["outputs"] = [{"name": "NOPE"}]
    status, message = error(server, "POST", "/v2/models/mlp/infer", json.dumps(body).encode())
    assert status == 400 and "NOPE" in message and "OUTPUT0" in message
    status, message = error(server, "DELETE", "/v2/models/mlp")
    assert status == 405
    status, message = error(server, "GET", "/v2/models/mlp/infer")
    assert status == 405


def test_body_limits_apply_after_inflating(server):
    status, message = error(server, "POST", "/v2/models/mlp/infer", b" " * (BIG + 1))
    assert status == 413 and str(BIG) in message
    bomb = gzip.compress(b" " * (8 * BIG))  # small on the wire, 8x the limit inflated
    assert len(bomb) < BIG
    status, message = error(server, "POST", "/v2/models/mlp/infer", bomb, {"Content-Encoding": "gzip"})
    assert status == 413
    status, _ = error(server, "POST", "/v2/models/mlp/infer", b"\x1f\x8bnot gzip", {"Content-Encoding": "gzip"})
    assert status == 400
    # the server is fine afterwards
    ok = zlib.compress(_infer_body())
    status, _, data = raw(server, "POST", "/v2/models/mlp/infer", ok, {"Content-Encoding": "deflate"})
    assert status == 200 and json.loads(data)["outputs"][0]["shape"] == [1, 16]


def test_binary_header_length_errors(server):
    header = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 64], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 256}}]}).encode()
    payload = header + np.zeros(64, np.float32).tobytes()
    status, _, _ = raw(server, "POST", "/v2/models/mlp/infer", payload,
                       {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200
    for bad in ("abc", str(len(payload) + 1), "-1"):
        status, message = error(server, "POST", "/v2/models/mlp/infer", payload,
                                {"Inference-Header-Content-Length": bad})
        assert status == 400 and "Inference-Header-Content-Length" in message or "header" in message
    status, message = error(server, "POST", "/v2/models/mlp/infer", payload[:-4],
                            {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "INPUT0" in message


# ---- log and trace settings ---------------------------------------------------------------------------------------
def test_log_and_trace_settings(client):
    before = client.get_log_settings()
    assert {"log_info", "log_verbose_level", "log_format"} <= set(before)
    updated = client.update_log_settings({"log_verbose_level": 1})
    assert updated["log_verbose_level"] == 1
    client.update_log_settings({"log_verbose_level": before["log_verbose_level"]})
    trace = client.get_trace_settings()
    assert trace["trace_level"] == ["OFF"] and isinstance(trace["trace_rate"], str)
    changed = client.update_trace_settings("mlp", {"trace_rate": "7"})
    assert changed["trace_rate"] == "7"
    assert client.get_trace_settings("mlp")["trace_rate"] == "7"
    assert client.update_trace_settings("mlp", {"trace_rate": None})["trace_rate"] == trace["trace_rate"]
    with pytest.raises(InferenceServerException) as e:
        client.update_log_settings({"log_verbose_level": -3})
    assert e.value.status() == "400"


def _json(server, method: str, path: str, body=None) -> Tuple[int, object]:
    """A plain HTTP call with a JSON body (a dict is encoded; bytes go as they are): (status, decoded answer)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    status, hdrs, answer = raw(server, method, path, data, {"Content-Type": "application/json"} if data else None)
    assert hdrs.get("content-type", "").startswith("application/json"), (status, answer[:200])
    return status, json.loads(answer)


LOG_KEYS = {"log_file", "log_info", "log_warning", "log_error", "log_verbose_level", "log_format"}


def test_log_settings_over_plain_http_read_change_and_read_back(server):
    status, before = _json(server, "GET", "/v2/logging")
    assert status == 200 and set(before) == LOG_KEYS and before["log_format"] == "default"
    assert isinstance(before["log_info"], bool) and isinstance(before["log_verbose_level"], int)
    change = {"log_format": "ISO8601", "log_verbose_level": 2, "log_warning": not before["log_warning"]}
    try:
        status, changed = _json(server, "POST", "/v2/logging", change)
        assert status == 200 and changed == dict(before, **change)
        assert _json(server, "GET", "/v2/logging") == (200, changed)
        assert _json(server, "POST", "/v2/logging", {"log_format": None}) == (200, changed)  # null: as it is
        assert _json(server, "POST", "/v2/logging", b"") == (200, changed)  # no body: a read
    finally:
        _json(server, "POST", "/v2/logging", {k: before[k] for k in change})
    assert _json(server, "GET", "/v2/logging") == (200, before)


@pytest.mark.parametrize("body, words", [
    ({"log_format": "xml"}, "log_format"),
    ({"log_verbose_level": -1}, "log_verbose_level"),
    ({"log_info": "yes"}, "log_info"),
    ({"log_verbose_level": 1.5}, "log_verbose_level"),
    ({"no_such_setting": True}, "no_such_setting"),
    ({"log_file": "/proc/no/such/dir/log"}, "log_file"),
    ({"log_info": False, "log_format": "xml"}, "log_format"),  # all or nothing: log_info stays as it was
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
])
def test_a_bad_log_setting_is_400_with_an_error(server, body, words):
    _, before = _json(server, "GET", "/v2/logging")
    status, answer = _json(server, "POST", "/v2/logging", body)
    assert status == 400 and list(answer) == ["error"] and words in answer["error"], answer
    assert _json(server, "GET", "/v2/logging") == (200, before)


TRACE_KEYS = {"trace_file", "trace_level", "trace_rate", "trace_count", "log_frequency"}
TRACE_DEFAULTS = {"trace_file": "", "trace_level": ["OFF"], "trace_rate": "1000", "trace_count": "-1",
                  "log_frequency": "0"}


def test_trace_settings_over_plain_http_global_and_per_model(server):
    status, first = _json(server, "GET", "/v2/trace/setting")
    assert status == 200 and first == TRACE_DEFAULTS
    try:
        status, changed = _json(server, "POST", "/v2/trace/setting", {"trace_rate": "50", "trace_count": 10})
        assert status == 200 and changed == dict(TRACE_DEFAULTS, trace_rate="50", trace_count="10")
        assert _json(server, "GET", "/v2/trace/setting") == (200, changed)
        # a model's settings: its overrides over the global ones, which it does not change
        status, model = _json(server, "POST", "/v2/models/mlp/trace/setting",
                              {"trace_level": ["TIMESTAMPS"], "trace_rate": "3"})
        assert status == 200 and model == dict(changed, trace_level=["TIMESTAMPS"], trace_rate="3")
        assert _json(server, "GET", "/v2/models/mlp/trace/setting") == (200, model)
        assert _json(server, "GET", "/v2/models/spare/trace/setting") == (200, changed)
        assert _json(server, "GET", "/v2/trace/setting") == (200, changed)
        # a global change shows through where the model has no override
        _json(server, "POST", "/v2/trace/setting", {"trace_count": "20"})
        assert _json(server, "GET", "/v2/models/mlp/trace/setting")[1]["trace_count"] == "20"
        # null clears: a model's override goes back to the global value, a global one to its default
        status, cleared = _json(server, "POST", "/v2/models/mlp/trace/setting", {"trace_rate": None})
        assert status == 200 and cleared["trace_rate"] == "50" and cleared["trace_level"] == ["TIMESTAMPS"]
    finally:
        _json(server, "POST", "/v2/models/mlp/trace/setting", {"trace_level": None, "trace_rate": None})
        _json(server, "POST", "/v2/trace/setting", {"trace_rate": None, "trace_count": None})
    assert _json(server, "GET", "/v2/trace/setting") == (200, TRACE_DEFAULTS)
    assert _json(server, "GET", "/v2/models/mlp/trace/setting") == (200, TRACE_DEFAULTS)


@pytest.mark.parametrize("path, body, status, words", [
    ("/v2/trace/setting", {"trace_level": "BOGUS"}, 400, "trace_level"),
    ("/v2/trace/setting", {"trace_level": ["TENSORS"]}, 400, "TENSORS"),
    ("/v2/trace/setting", {"trace_rate": "0"}, 400, "trace_rate"),
    ("/v2/trace/setting", {"trace_rate": "abc"}, 400, "trace_rate"),
    ("/v2/trace/setting", {"trace_count": "-2"}, 400, "trace_count"),
    ("/v2/trace/setting", {"log_frequency": ["1", "2"]}, 400, "log_frequency"),
    ("/v2/trace/setting", {"trace_rate": {"n": 5}}, 400, "trace_rate"),
    ("/v2/trace/setting", {"trace_rate": True}, 400, "trace_rate"),
    ("/v2/trace/setting", {"no_such_setting": "1"}, 400, "no_such_setting"),
    ("/v2/trace/setting", {"trace_rate": "5", "trace_level": ["BOGUS"]}, 400, "trace_level"),  # all or nothing
    ("/v2/trace/setting", b"{not json", 400, "not valid JSON"),
    ("/v2/models/mlp/trace/setting", {"trace_file": "/tmp/x.json"}, 400, "global only"),
    ("/v2/models/mlp/trace/setting", {"log_frequency": "2"}, 400, "global only"),
    ("/v2/models/mlp/trace/setting", {"trace_rate": "-5"}, 400, "trace_rate"),
    ("/v2/models/nope/trace/setting", {"trace_rate": "5"}, 404, "'nope'"),
    ("/v2/models/nope/trace/setting", None, 404, "'nope'"),
])
def test_a_bad_trace_setting_is_an_error_that_changes_nothing(server, path, body, status, words):
    before = _json(server, "GET", "/v2/trace/setting"), _json(server, "GET", "/v2/models/mlp/trace/setting")
    got, answer = _json(server, "POST" if body is not None else "GET", path, body)
    assert got == status and list(answer) == ["error"] and words in answer["error"], answer
    assert (_json(server, "GET", "/v2/trace/setting"), _json(server, "GET", "/v2/models/mlp/trace/setting")) == before


# ---- the docs' curl examples, as written --------------------------------------------------------------------------
def test_curl_examples_in_the_docs_run_as_written(server):
    if subprocess.run(["bash", "-c", "command -v curl"], capture_output=True).returncode != 0:
        pytest.skip("no curl")
    text = (ROOT / "docs" / "http.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert len(blocks) >= 4
    outputs = []
    for block in blocks:
        cmd = block.replace("localhost:8000", server.http_url)
        out = subprocess.run(["bash", "-c", "set -euo pipefail\n" + cmd], capture_output=True, text=True, timeout=60,
                             cwd=ROOT)
        assert out.returncode == 0, (block, out.stderr)
        outputs.append(out.stdout.strip())
    assert outputs[0] == "200"
    assert json.loads(outputs[1])["name"] == "mlp"
    assert json.loads(outputs[2])["outputs"][0]["shape"] == [1, 16]
    assert json.loads(outputs[3])["model_stats"][0]["name"] == "mlp"
    # the error example prints what the page says it prints
    shown = re.search(r"prints `(\{\"error\".*?\})`", text).group(1)
    assert outputs[4] == shown


def test_unloaded_model_answers_like_grpc(server, client):
    """An inference for a model that is not loaded gets the gRPC path's status, as Triton's HTTP status."""
    import tritonclient.grpc as tg

    client.unload_model("spare")
    try:
        status, message = error(server, "POST", "/v2/models/spare/infer", _infer_body(shape=(1, 4), data=[1] * 4))
        g = tg.InferenceServerClient(server.url)
        x = tg.InferInput("INPUT0", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        with pytest.raises(InferenceServerException) as e:
            g.infer("spare", [x])
        expected = {"StatusCode.NOT_FOUND": 404, "StatusCode.UNAVAILABLE": 503}[str(e.value.status())]
        assert status == expected and "spare" in message
    finally:
        client.load_model("spare")


def test_overload_answers_503(tmp_path):
    """Past --max-inflight the HTTP port answers 503 with the gRPC path's message, and serves again after."""
    import threading

    from tests.test_frontends import _slow_repo

    _slow_repo(tmp_path)
    s = RunningServer(tmp_path, metrics=False, max_inflight=1)
    try:
        body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [256], "datatype": "FP32",
                                       "data": [0.5] * 256}]}).encode()
        answers: list = []
        together = threading.Barrier(8)  # all at once: the slow model holds the one slot for tens of ms

        def one() -> None:
            together.wait(10)
            answers.append(raw(s, "POST", "/v2/models/slow/infer", body))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        statuses = sorted(a[0] for a in answers)
        assert len(statuses) == 8 and 200 in statuses and 503 in statuses, statuses
        for status, _, data in answers:
            if status == 503:
                assert "overloaded" in json.loads(data)["error"]
        assert raw(s, "POST", "/v2/models/slow/infer", body)[0] == 200
    finally:
        s.stop()


def test_cuda_shared_memory_endpoints_without_a_gpu(server):
    """The CUDA endpoints exist; without a usable GPU a registration says so (400), status lists nothing."""
    import base64

    assert raw(server, "GET", "/v2/cudasharedmemory/status")[:3:2] == (200, b"[]")
    handle = base64.b64encode(b"\0" * 64).decode()
    body = json.dumps({"raw_handle": {"b64": handle}, "device_id": 0, "byte_size": 16}).encode()
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed: the GPU tests cover CUDA regions")
    except ImportError:
        pass
    status, message = error(server, "POST", "/v2/cudasharedmemory/region/r/register", body)
    assert status == 400 and "'r'" in message and "GPU" in message
    status, message = error(server, "POST", "/v2/cudasharedmemory/region/r/register",
                            json.dumps({"raw_handle": {"b64": "!!"}, "byte_size": 16}).encode())
    assert status == 400 and "base64" in message
    assert raw(server, "POST", "/v2/cudasharedmemory/unregister")[0] == 200
    status, message = error(server, "POST", "/v2/systemsharedmemory/region/r/register", b"[]")
    assert status == 400 and "JSON object" in message
