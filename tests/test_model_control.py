"""Issue 19 item 3: model control as Triton does it, against a real ``trtserve serve`` (--frontends 0: one
process; 1: supervisor, engine and a front end).

none (default): every model loads at start, load/unload RPCs answer UNAVAILABLE. explicit: only --load-model's
models load at start, the RPCs work, readiness follows what was asked for, the load RPC takes Triton's ``config``
override. poll: added, changed and removed models and versions are picked up while requests flow, none lost.
"""
from __future__ import annotations

import json
import shutil
import pathlib
import threading
import time
from typing import List

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

from tests import models
from tests.conftest import spawn
from tests.mp import Serve

FRONTENDS = [0, 1]
POLICY_ALL = "version_policy: { all { } }"


@pytest.fixture
def started():
    servers: List[Serve] = []

    def start(repo: pathlib.Path, frontends: int, args) -> Serve:
        s = Serve(repo, frontends=frontends, args=args, metrics=False)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def _index(c) -> dict:
    return {(m.name, m.version): m.state for m in c.get_model_repository_index().models}


def _ident(c, model: str = "ident", version: str = "", rows: int = 2) -> None:
    x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    i = grpcclient.InferInput("INPUT0", [rows, 4], "FP32")
    i.set_data_from_numpy(x)
    out = c.infer(model, [i], model_version=version).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(out, x)


def _wait(what, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while not what():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s: {what.__doc__ or what}")
        time.sleep(0.05)


@pytest.mark.parametrize("frontends", FRONTENDS)
def test_none_loads_everything_and_refuses_load_and_unload(tmp_path, started, frontends):
    models.identity(tmp_path, "ident", "FP32")
    models.identity(tmp_path, "other", "FP32")
    s = started(tmp_path, frontends, [])
    with grpcclient.InferenceServerClient(s.url) as c:
        assert _index(c) == {("ident", "1"): "READY", ("other", "1"): "READY"}
        for call in (lambda: c.load_model("ident"), lambda: c.unload_model("other")):
            with pytest.raises(InferenceServerException) as e:
                call()
            assert e.value.status() == "StatusCode.UNAVAILABLE"  # Triton's status and words
            assert "explicit model load / unload is not allowed" in e.value.message()
        assert c.is_server_ready() and c.is_model_ready("other")
        models.identity(tmp_path, "late", "FP32")  # changes to the repository are not followed
        time.sleep(1.0)
        assert ("late", "") in _index(c) and not c.is_model_ready("late")


@pytest.mark.parametrize("frontends", FRONTENDS)
def test_explicit_starts_with_load_model_only_and_readiness_follows_what_was_asked(tmp_path, started, frontends):
    models.identity(tmp_path, "ident", "FP32")
    models.identity(tmp_path, "other", "FP32")
    models.write_config(tmp_path, "broken", 'name: "broken"\nplatform: "onnxruntime_onnx"\nmax_batch_size: -3\n')
    (tmp_path / "broken" / "1").mkdir()
    s = started(tmp_path, frontends, ["--model-control-mode", "explicit", "--load-model", "ident"])
    with grpcclient.InferenceServerClient(s.url) as c:
        # the index lists the whole repository; only the named model is loaded; a broken one not asked for
        # does not hold readiness back
        assert _index(c) == {("broken", ""): "", ("ident", "1"): "READY", ("other", ""): ""}
        assert c.is_server_ready() and c.is_model_ready("ident") and not c.is_model_ready("other")
        _ident(c)
        c.load_model("other")
        _ident(c, "other")
        c.unload_model("ident")
        assert not c.is_model_ready("ident") and c.is_server_ready()
        with pytest.raises(InferenceServerException):
            c.load_model("broken")  # asked for and failed: the server is not ready ...
        assert not c.is_server_ready()
        c.unload_model("broken")  # ... until it is no longer wanted
        assert c.is_server_ready()


def test_explicit_with_no_load_model_starts_empty_and_star_loads_all(tmp_path, started):
    models.identity(tmp_path, "ident", "FP32")
    models.identity(tmp_path, "other", "FP32")
    s = started(tmp_path, 0, ["--model-control-mode", "explicit"])
    with grpcclient.InferenceServerClient(s.url) as c:
        assert _index(c) == {("ident", ""): "", ("other", ""): ""}
        assert c.is_server_ready()
        with pytest.raises(InferenceServerException) as e:
            _ident(c)
        assert e.value.status() == "StatusCode.NOT_FOUND"
    s = started(tmp_path, 1, ["--model-control-mode", "explicit", "--load-model", "*"])
    with grpcclient.InferenceServerClient(s.url) as c:
        assert _index(c) == {("ident", "1"): "READY", ("other", "1"): "READY"}


def test_explicit_load_model_that_is_not_in_the_repository_stops_the_server(tmp_path):
    models.identity(tmp_path, "ident", "FP32")
    out = spawn(_serve(tmp_path, "--model-control-mode", "explicit", "--load-model", "nope"), capture_output=True,
                text=True, timeout=120)
    assert out.returncode == 1 and "'nope'" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("frontends", FRONTENDS)
def test_load_with_a_config_override(tmp_path, started, frontends):
    models.copy_example(tmp_path)
    s = started(tmp_path, frontends, ["--model-control-mode", "explicit", "--load-model", "mlp"])
    with grpcclient.InferenceServerClient(s.url) as c:
        config = c.get_model_config("mlp").config
        assert config.max_batch_size == 32
        config.max_batch_size = 8
        config.ClearField("instance_group")
        c.load_model("mlp", config=json_format.MessageToJson(config, preserving_proto_field_name=True))
        assert c.get_model_config("mlp").config.max_batch_size == 8
        x = grpcclient.InferInput("INPUT0", [9, 64], "FP32")
        x.set_data_from_numpy(np.zeros((9, 64), np.float32))
        with pytest.raises(InferenceServerException) as e:
            c.infer("mlp", [x])  # the override is what serves
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        # a JSON override with only some fields: the rest is auto-completed from the model, as Triton does
        c.load_model("mlp", config=json.dumps({"max_batch_size": 4, "platform": "onnxruntime_onnx"}))
        served = c.get_model_config("mlp").config
        assert served.max_batch_size == 4 and [t.name for t in served.input] == ["INPUT0"]
        # a load without override reads config.pbtxt again
        c.load_model("mlp")
        assert c.get_model_config("mlp").config.max_batch_size == 32
        for bad in ("{not json", json.dumps({"name": "other"}), json.dumps({"max_batch_size": "many"})):
            with pytest.raises(InferenceServerException) as e:
                c.load_model("mlp", config=bad)
            assert e.value.status() == "StatusCode.INVALID_ARGUMENT", bad
            assert "config" in e.value.message()
        assert c.is_model_ready("mlp") and c.is_server_ready()  # a refused override changes nothing
        with pytest.raises(InferenceServerException) as e:  # file overrides are not supported
            c.load_model("mlp", config=json.dumps({"max_batch_size": 4}), files={"file:1/model.onnx": b"x"})
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "file:1/model.onnx" in e.value.message() and "not supported" in e.value.message()
        assert c.get_model_config("mlp").config.max_batch_size == 32


def _publish(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Puts a folder built elsewhere into the repository in one rename (what Triton's docs ask of users too)."""
    src.rename(dst)


class _Traffic:
    """Client threads that send requests back to back and count every answer; ``errors`` must stay empty."""

    def __init__(self, url: str, targets) -> None:
        self.ok = 0
        self.errors: List[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(url, model, version), daemon=True)
                         for model, version in targets]
        for t in self._threads:
            t.start()

    def _run(self, url: str, model: str, version: str) -> None:
        with grpcclient.InferenceServerClient(url) as c:
            while not self._stop.is_set():
                try:
                    _ident(c, model, version)
                except Exception as e:  # noqa: BLE001 - every failure is the test's finding
                    with self._lock:
                        self.errors.append(f"{model}:{version or 'latest'}: {e}")
                else:
                    with self._lock:
                        self.ok += 1

    def count(self) -> int:
        with self._lock:
            return self.ok

    def flowing(self, more: int = 20) -> None:
        start = self.count()
        _wait(lambda: self.count() >= start + more, 30)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


@pytest.mark.parametrize("frontends", FRONTENDS)
def test_poll_follows_the_repository_while_requests_flow(tmp_path, started, frontends):
    repo, staging = tmp_path / "repo", tmp_path / "staging"
    repo.mkdir()
    models.identity(repo, "ident", "FP32", extra=POLICY_ALL)
    s = started(repo, frontends, ["--model-control-mode", "poll", "--repository-poll-secs", "0.5"])
    with grpcclient.InferenceServerClient(s.url) as c:
        with pytest.raises(InferenceServerException) as e:
            c.load_model("ident")
        assert e.value.status() == "StatusCode.UNAVAILABLE"
        traffic = _Traffic(s.url, [("ident", ""), ("ident", ""), ("ident", "1")])
        try:
            traffic.flowing()
            # an added model
            models.identity(staging, "late", "FP32")
            _publish(staging / "late", repo / "late")
            _wait(lambda: c.is_model_ready("late"))
            _ident(c, "late")
            traffic.flowing()
            # an added version: latest now goes to 2, version 1 keeps its instance
            models.identity(staging, "ident", "FP32", version=2)
            _publish(staging / "ident" / "2", repo / "ident" / "2")
            _wait(lambda: c.is_model_ready("ident", "2"))
            assert _index(c)[("ident", "1")] == "READY"
            traffic.flowing()
            # a removed version: its requests finish, latest goes back to 1
            (repo / "ident" / "2").rename(staging / "removed_2")
            _wait(lambda: ("ident", "2") not in _index(c))
            assert not c.is_model_ready("ident", "2")
            traffic.flowing()
            # a changed config: every version reloads, the old instances drain
            cfg = repo / "ident" / "config.pbtxt"
            cfg.write_text(cfg.read_text().replace("max_batch_size: 8", "max_batch_size: 4"))
            _wait(lambda: c.get_model_config("ident").config.max_batch_size == 4)
            traffic.flowing()
            # a removed model
            (repo / "late").rename(staging / "removed_late")
            _wait(lambda: ("late", "1") not in _index(c))
            assert not c.is_model_ready("late")
            traffic.flowing()
        finally:
            traffic.stop()
        assert traffic.errors == [], traffic.errors[:5]
        assert traffic.ok > 100
        assert c.is_server_ready()
        assert _index(c) == {("ident", "1"): "READY"}


def test_poll_retries_a_broken_version_once_it_is_fixed(tmp_path, started):
    repo, staging = tmp_path / "repo", tmp_path / "staging"
    repo.mkdir()
    models.identity(repo, "ident", "FP32", extra=POLICY_ALL)
    s = started(repo, 0, ["--model-control-mode", "poll", "--repository-poll-secs", "0.3"])
    with grpcclient.InferenceServerClient(s.url) as c:
        (staging / "2").mkdir(parents=True)
        (staging / "2" / "model.onnx").write_bytes(b"garbage")
        _publish(staging / "2", repo / "ident" / "2")
        _wait(lambda: _index(c).get(("ident", "2")) == "UNAVAILABLE")
        _ident(c, "ident")  # version 1 serves on
        models.identity(staging, "fixed", "FP32", version=2)
        (staging / "fixed" / "2" / "model.onnx").replace(repo / "ident" / "2" / "model.onnx")
        _wait(lambda: c.is_model_ready("ident", "2"))
        _ident(c, "ident", "2")


def test_poll_unloads_a_model_whose_last_version_folder_is_removed(tmp_path, started):
    repo = tmp_path / "repo"
    repo.mkdir()
    models.identity(repo, "ident", "FP32")
    s = started(repo, 1, ["--model-control-mode", "poll", "--repository-poll-secs", "0.3"])
    with grpcclient.InferenceServerClient(s.url) as c:
        _ident(c, "ident")
        shutil.rmtree(repo / "ident" / "1")  # the folder and its config.pbtxt stay
        _wait(lambda: not c.is_model_ready("ident"))
        assert c.is_server_ready()  # nothing that should be loaded is missing: the model is gone, not broken
        with pytest.raises(InferenceServerException):
            _ident(c, "ident")
        models.identity(tmp_path / "staging", "ident", "FP32", version=3)
        _publish(tmp_path / "staging" / "ident" / "3", repo / "ident" / "3")
        _wait(lambda: c.is_model_ready("ident"))
        _ident(c, "ident")


def _serve(repo: pathlib.Path, *args: str) -> List[str]:
    import sys

    return [sys.executable, "-m", "trtserve", "serve", "--model-repository", str(repo), "--grpc-port", "0", "--http-port", "0",
            "--metrics-port", "-1", "--no-gpu-metrics", "--frontends", "0", *args]


@pytest.mark.parametrize("args, env, words", [
    (["--load-model", "ident"], {}, "--load-model ident: needs --model-control-mode explicit"),
    (["--model-control-mode", "explicit", "--load-model", "*", "--load-model", "ident"], {}, "must be the only"),
    (["--model-control-mode", "poll", "--repository-poll-secs", "0"], {}, "--repository-poll-secs"),
    ([], {"TRTSERVE_MODEL_CONTROL_MODE": "sometimes"}, "TRTSERVE_MODEL_CONTROL_MODE"),
    ([], {"TRTSERVE_REPOSITORY_POLL_SECS": "5s"}, "TRTSERVE_REPOSITORY_POLL_SECS"),
    ([], {"TRTSERVE_LOAD_MODEL": "ident"}, "TRTSERVE_LOAD_MODEL=ident: needs --model-control-mode explicit"),
])
def test_bad_model_control_flags_are_one_line(tmp_path, args, env, words):
    import os

    models.identity(tmp_path, "ident", "FP32")
    out = spawn(_serve(tmp_path, *args), capture_output=True, text=True, timeout=60, env=dict(os.environ, **env))
    assert out.returncode == 2, out.stderr
    assert words in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_help_names_the_flags():
    out = spawn(_serve(pathlib.Path("."), "--help"), capture_output=True, text=True, timeout=60)
    for flag in ("--model-control-mode", "--load-model", "--repository-poll-secs"):
        assert flag in out.stdout



@pytest.mark.parametrize("name", ["", "..", "../x", "/etc/passwd", "mlp/", "a" * 300, "a" * 100000])
def test_explicit_load_and_unload_of_unknown_names(tmp_path, serve_repo, name):
    """NOT_FOUND, short, and no probe outside the repository (names as test_bad_inputs sends them)."""
    import grpc

    from trtserve.protos import grpc_service_pb2 as pb
    from trtserve.protos import grpc_service_pb2_grpc as pb_grpc

    from tests.conftest import EXPLICIT

    models.copy_example(tmp_path)
    s = serve_repo(tmp_path, metrics=False, **EXPLICIT)
    with grpc.insecure_channel(s.url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        for call in (lambda: stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=10),
                     lambda: stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name), timeout=10)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and len(e.value.details()) < 5000
        assert stub.ModelReady(pb.ModelReadyRequest(name="mlp"), timeout=10).ready
