"""Issue 19 item 4: the LogSettings and TraceSetting RPCs (Triton's trace file) and the classification extension,
against a real server: in-process (--frontends 0) and the multi-process server (--frontends 1)."""
from __future__ import annotations

import contextlib
import json
import pathlib
import time
from typing import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.models import identity
from tests.mp import Serve
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import grpc_service_pb2_grpc as pb_grpc
from trtserve.server.tracing import STAMPS

LABELS = ["cat", "dog", "bird", "fish", "frog", "lynx"]


def _repo(root: pathlib.Path) -> pathlib.Path:
    repo = root / "models"
    identity(repo, "scores", "FP32", dims="[ 6 ]")
    cfg = repo / "scores" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 6 ] }',
                                           'output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 6 ], '
                                           'label_filename: "labels.txt" }'))
    assert "label_filename" in cfg.read_text()
    (repo / "scores" / "labels.txt").write_text("\n".join(LABELS) + "\n")
    identity(repo, "ints", "INT32", dims="[ 5 ]", max_batch_size=0)
    return repo


@contextlib.contextmanager
def _server(repo: pathlib.Path, frontends: int, serve_repo) -> Iterator[str]:
    if frontends == 0:
        yield serve_repo(repo, metrics=False).url
        return
    s = Serve(repo, frontends=frontends, metrics=False)
    try:
        yield s.url
    finally:
        s.stop()


def _infer(client, model: str, x: np.ndarray, class_count: int = 0, wire: str = "FP32"):
    inp = grpcclient.InferInput("INPUT0", list(x.shape), wire)
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("OUTPUT0", class_count=class_count)])


def _expected(x: np.ndarray, k: int, labels=None, floats=True) -> np.ndarray:
    rows = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)
    out = []
    for row in rows:
        idx = np.argsort(-row.astype(np.float64), kind="stable")[:k]
        out.append([(f"{float(row[i]):f}" if floats else f"{int(row[i])}") + f":{i}" +
                    (f":{labels[i]}" if labels else "") for i in idx])
    return np.array(out, dtype=object)


@pytest.mark.parametrize("frontends", [0, 1])
def test_classification_is_numpy_top_k(tmp_path: pathlib.Path, serve_repo, frontends: int) -> None:
    repo = _repo(tmp_path)
    rng = np.random.default_rng(1)
    with _server(repo, frontends, serve_repo) as url:
        client = grpcclient.InferenceServerClient(url)
        assert {"classification", "logging", "trace"} <= set(client.get_server_metadata().extensions)
        x = rng.random((3, 6)).astype(np.float32)
        for k in (1, 3, 6):
            got = _infer(client, "scores", x, k).as_numpy("OUTPUT0")
            assert got.shape == (3, k)
            want = _expected(x, k, LABELS)
            assert [[v.decode() for v in row] for row in got] == want.tolist()
        assert np.array_equal(_infer(client, "scores", x).as_numpy("OUTPUT0"), x)  # no class_count: raw output
        xi = rng.integers(-100, 100, size=5).astype(np.int32)
        got = _infer(client, "ints", xi, 2, wire="INT32").as_numpy("OUTPUT0")
        assert got.shape == (2,)
        assert [v.decode() for v in got] == _expected(xi, 2, floats=False)[0].tolist()
        for bad in (7, -1):
            with pytest.raises(InferenceServerException) as e:
                _infer(client, "scores", x, bad)
            assert "INVALID_ARGUMENT" in str(e.value.status()) and "class" in e.value.message()
        client.close()


def _traces(path: pathlib.Path) -> list:
    records = json.loads(path.read_text())
    heads = {r["id"]: r for r in records if "model_name" in r}
    out = []
    for r in records:
        if "timestamps" in r:
            names = [t["name"] for t in r["timestamps"]]
            ns = [t["ns"] for t in r["timestamps"]]
            assert names == list(STAMPS), names
            assert ns == sorted(ns) and ns[0] > 0, ns
            out.append((heads[r["id"]]["model_name"], heads[r["id"]]["request_id"], ns))
    return out


@pytest.mark.parametrize("frontends", [0, 1])
def test_trace_file_per_request_timestamps(tmp_path: pathlib.Path, serve_repo, frontends: int) -> None:
    repo = _repo(tmp_path)
    trace = tmp_path / "trace.json"
    x = np.ones((1, 6), np.float32)
    with _server(repo, frontends, serve_repo) as url:
        client = grpcclient.InferenceServerClient(url)
        start = client.get_trace_settings(as_json=True)["settings"]
        assert start["trace_level"]["value"] == ["OFF"] and start["trace_file"]["value"] == [""]
        for _ in range(3):
            _infer(client, "scores", x)
        got = client.update_trace_settings(settings={"trace_file": str(trace), "trace_level": ["TIMESTAMPS"],
                                                     "trace_rate": "3", "log_frequency": "0"}, as_json=True)
        assert got["settings"]["trace_rate"]["value"] == ["3"]
        for i in range(9):  # 1 of 3 traced
            inp = grpcclient.InferInput("INPUT0", [1, 6], "FP32")
            inp.set_data_from_numpy(x)
            client.infer("scores", [inp], request_id=f"r{i}")
        # per model: every request of 'ints', at most 2 of them (trace_count counts down)
        got = client.update_trace_settings(model_name="ints", settings={"trace_rate": "1", "trace_count": "2"},
                                           as_json=True)
        assert got["settings"]["trace_rate"]["value"] == ["1"]
        assert client.get_trace_settings(as_json=True)["settings"]["trace_rate"]["value"] == ["3"]
        for _ in range(4):
            _infer(client, "ints", np.arange(5, dtype=np.int32), wire="INT32")
        deadline = time.monotonic() + 10
        while client.get_trace_settings(model_name="ints", as_json=True)["settings"]["trace_count"]["value"] != ["0"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # a new file: what was collected goes to the old one (log_frequency 0)
        client.update_trace_settings(settings={"trace_file": str(tmp_path / "second.json"), "log_frequency": "2"})
        traces = _traces(trace)
        assert [t[1] for t in traces if t[0] == "scores"] == ["r2", "r5", "r8"]
        assert len([t for t in traces if t[0] == "ints"]) == 2
        # log_frequency 2: every 2 traces a numbered file
        client.update_trace_settings(settings={"trace_rate": "1"})
        for _ in range(4):
            _infer(client, "scores", x)
        deadline = time.monotonic() + 10
        while not (tmp_path / "second.json.1").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert len(_traces(tmp_path / "second.json.0")) == 2 and len(_traces(tmp_path / "second.json.1")) == 2
        for settings, key in (({"trace_level": ["TENSORS"]}, "trace_level"), ({"trace_rate": "0"}, "trace_rate"),
                              ({"trace_count": "-2"}, "trace_count"), ({"nope": "1"}, "nope")):
            with pytest.raises(InferenceServerException) as e:
                client.update_trace_settings(settings=settings)
            assert "INVALID_ARGUMENT" in str(e.value.status()) and key in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            client.update_trace_settings(model_name="ints", settings={"trace_file": "x.json"})
        assert "trace_file" in e.value.message()
        client.update_trace_settings(settings={"trace_level": ["OFF"]})
        client.close()


def test_log_settings_change_every_process(tmp_path: pathlib.Path) -> None:
    repo = _repo(tmp_path)
    log_file = tmp_path / "server.log"
    s = Serve(repo, frontends=1, metrics=False)
    try:
        client = grpcclient.InferenceServerClient(s.url)
        start = client.get_log_settings().settings
        assert start["log_info"].bool_param is True and start["log_format"].string_param == "default"
        got = client.update_log_settings({"log_verbose_level": 1, "log_info": False, "log_format": "ISO8601"}).settings
        assert got["log_verbose_level"].uint32_param == 1 and got["log_info"].bool_param is False
        for bad, key in (({"log_format": "xml"}, "log_format"), ({"log_colour": True}, "log_colour")):
            with pytest.raises(InferenceServerException) as e:
                client.update_log_settings(bad)
            assert "INVALID_ARGUMENT" in str(e.value.status()) and key in e.value.message()
        with grpc.insecure_channel(s.url) as ch:  # a string for a boolean (tritonclient cannot send that)
            request = pb.LogSettingsRequest()
            request.settings["log_info"].string_param = "yes"
            with pytest.raises(grpc.RpcError) as rpc_error:
                pb_grpc.GRPCInferenceServiceStub(ch).LogSettings(request, timeout=10)
            assert rpc_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "log_info" in rpc_error.value.details()
        client.update_log_settings({"log_file": str(log_file)})
        deadline = time.monotonic() + 10
        while "frontend-0" not in (log_file.read_text() if log_file.exists() else ""):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client.close()
    finally:
        assert s.stop() == 0
    out = "".join(s.lines)
    # verbose records from the engine and the front end (before the log file), in ISO8601 time
    for role in ("engine", "frontend-0"):
        assert any(f"DEBUG {role}: trtserve.logsettings" in line for line in s.lines), (role, out[-3000:])
    text = log_file.read_text()
    for role in ("engine", "frontend-0"):
        assert f"DEBUG {role}: trtserve.logsettings: log settings applied" in text, text
    assert "Z DEBUG engine" in text  # ISO8601 timestamps
    # info is off: the engine's and the front end's shutdown lines are gone
    assert "engine stopping" not in out + text and "the engine went away" not in out + text
