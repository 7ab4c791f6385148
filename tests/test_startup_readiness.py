"""Issue 19 item 1: start-up and readiness as Triton does them, against a real ``trtserve serve`` in both process
models (--frontends 0: one process; 1: supervisor, engine and a front end).

--exit-on-error (default): a model that fails at start stops the server, exit 1, one line naming the model.
--strict-readiness (default): ServerReady and grpc.health.v1 (what every probe in deploy/ calls) say ready only
while every model that should be loaded is READY. A repository that is not a folder, a taken gRPC or metrics port:
one line, exit 2.
"""
from __future__ import annotations

import pathlib
import socket
import sys
import time
from typing import List

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import EXPLICIT_ARGS, spawn
from tests.models import copy_example
from tests.mp import Serve
from trtserve.server.examples import REPOSITORY as EXAMPLE_REPOSITORY
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import grpc_service_pb2_grpc as pb_grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"
FRONTENDS = [0, 1]


def _repo(tmp_path: pathlib.Path) -> pathlib.Path:
    """One good model and one whose model file is garbage."""
    repo = tmp_path / "models"
    copy_example(repo, "good")
    copy_example(repo, "broken")
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    return repo


def _serve_cmd(repo: pathlib.Path, frontends: int, *args: str) -> List[str]:
    return [sys.executable, "-m", "trtserve", "serve", "--model-repository", str(repo), "--grpc-port", "0", "--http-port", "0",
            "--metrics-port", "0", "--no-gpu-metrics", "--frontends", str(frontends), *args]


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def _state(url: str):
    """(ServerReady, health of "" (readiness), health of the inference service (liveness), ModelReady good)."""
    with grpc.insecure_channel(url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        hstub = health_pb2_grpc.HealthStub(ch)
        ready = stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        h = [hstub.Check(health_pb2.HealthCheckRequest(service=s), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
             for s in ("", "inference.GRPCInferenceService")]
        good = stub.ModelReady(pb.ModelReadyRequest(name="good"), timeout=10).ready
    return ready, h[0], h[1], good


def _probe(url: str) -> int:
    """The Docker HEALTHCHECK script (Kubernetes' and KServe's gRPC probes call the same Health/Check)."""
    return spawn([sys.executable, str(HEALTHCHECK), "--target", url, "--timeout", "5"], capture_output=True,
                 text=True, timeout=60).returncode


def _until(fn, want, timeout: float = 10.0):
    t0 = time.monotonic()
    while True:
        got = fn()
        if got == want or time.monotonic() - t0 > timeout:
            return got
        time.sleep(0.1)


@pytest.mark.parametrize("frontends", FRONTENDS)
def test_a_model_that_fails_at_start_stops_the_server(tmp_path: pathlib.Path, frontends: int) -> None:
    out = spawn(_serve_cmd(_repo(tmp_path), frontends), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    line = _last_line(out.stderr)
    assert line.startswith("trtserve: model 'broken' failed to load"), out.stderr
    assert "ONNX Runtime cannot load" in line
    assert "Traceback" not in out.stdout + out.stderr
    assert "serving" not in out.stdout  # it never announced itself


@pytest.mark.parametrize("frontends", FRONTENDS)
def test_strict_readiness_follows_every_model_that_should_be_loaded(tmp_path: pathlib.Path, frontends: int) -> None:
    """--no-exit-on-error: the server starts, serves the good model, and is not ready while 'broken' is not; the
    health service's readiness ("") and the deploy probe agree with ServerReady while its liveness (the service's
    own name, Kubernetes' liveness probe) stays SERVING; unloading 'broken' makes it ready, a failed load makes
    it unready again."""
    repo = _repo(tmp_path)
    s = Serve(repo, frontends=frontends, args=["--no-exit-on-error", *EXPLICIT_ARGS])
    try:
        assert _state(s.url) == (False, False, True, True)
        assert _probe(s.url) == 1
        with grpc.insecure_channel(s.url) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="broken"), timeout=30)
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready  # the engine decides at once
            assert _until(lambda: _state(s.url), (True, True, True, True)) == (True, True, True, True)
            assert _probe(s.url) == 0
            with pytest.raises(grpc.RpcError):  # still garbage
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="broken"), timeout=30)
            assert _until(lambda: _state(s.url), (False, False, True, True)) == (False, False, True, True)
            assert _probe(s.url) == 1
            (repo / "broken" / "1" / "model.onnx").write_bytes((repo / "good" / "1" / "model.onnx").read_bytes())
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="broken"), timeout=60)
            assert _until(lambda: _state(s.url), (True, True, True, True)) == (True, True, True, True)
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("frontends", FRONTENDS)
def test_without_strict_readiness_ready_once_serving(tmp_path: pathlib.Path, frontends: int) -> None:
    s = Serve(_repo(tmp_path), frontends=frontends, args=["--no-exit-on-error", "--no-strict-readiness"])
    try:
        assert _state(s.url) == (True, True, True, True)
        assert _probe(s.url) == 0
        with grpc.insecure_channel(s.url) as ch:  # the model itself still says it is not ready
            assert not pb_grpc.GRPCInferenceServiceStub(ch).ModelReady(pb.ModelReadyRequest(name="broken")).ready
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("frontends", FRONTENDS)
def test_a_good_repository_is_ready_and_model_store_is_an_alias(tmp_path: pathlib.Path, frontends: int) -> None:
    repo = tmp_path / "models"
    copy_example(repo, "good")
    s = Serve(tmp_path / "unused", frontends=frontends, args=["--model-store", str(repo)])  # the last one wins
    try:
        assert _state(s.url) == (True, True, True, True)
        assert _probe(s.url) == 0
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("frontends", FRONTENDS)
@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_repository_that_is_not_a_folder(tmp_path: pathlib.Path, frontends: int, kind: str) -> None:
    path = tmp_path / "nope"
    if kind == "file":
        path.write_text("x")
    out = spawn(_serve_cmd(path, frontends), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == f"trtserve: --model-repository {path}: " + (
        "no such folder" if kind == "missing" else "not a folder")


@pytest.mark.parametrize("frontends", FRONTENDS)
@pytest.mark.parametrize("which", ["grpc", "metrics"])
def test_a_taken_port_is_one_line_naming_it(tmp_path: pathlib.Path, frontends: int, which: str) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        cmd = _serve_cmd(EXAMPLE_REPOSITORY,
                         frontends, f"--{which}-port", str(port))
        out = spawn(cmd, capture_output=True, text=True, timeout=120)
    finally:
        taken.close()
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    line = _last_line(out.stderr)
    assert line.startswith(f"trtserve: cannot use 127.0.0.1:{port} for {'gRPC' if which == 'grpc' else '/metrics'}")
    assert "(another server on this port?)" in line, line


def test_a_failed_bind_says_what_its_errno_means() -> None:
    """The hint after a bind error follows its errno: a taken port, a privileged one, an address this machine
    does not have; nothing is guessed for the others."""
    import errno

    from trtserve.server.errors import bind_hint
    from trtserve.server.supervisor import reserve_port

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        with pytest.raises(OSError) as e:
            reserve_port("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
    assert e.value.strerror.endswith("(another server on this port?)"), e.value
    with pytest.raises(OSError) as e:
        reserve_port("192.0.2.1", 0, "HTTP")  # TEST-NET-1: never an address of this machine
    assert e.value.strerror == ("cannot use 192.0.2.1:0 for HTTP: Cannot assign requested address (no interface "
                                "of this machine has that address)"), e.value
    assert bind_hint(OSError(errno.EACCES, "Permission denied")) == " (ports below 1024 need privileges)"
    assert bind_hint(OSError(errno.EINVAL, "Invalid argument")) == ""
