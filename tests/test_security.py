"""TLS, mutual TLS, bearer-token auth, and no tensor data in logs (certificates made in the test)."""
from __future__ import annotations

import logging
import pathlib
import shutil

import grpc
import numpy as np
import pytest

from tests import models
from tests.conftest import spawn
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import grpc_service_pb2_grpc as pb_grpc
from trtserve.server.frontend.security import TlsOptions

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    """openssl with every file name made absolute (spawn() cannot take a cwd)."""
    names = ("ca.key", "ca.pem", "san.ext", "server.key", "server.csr", "server.pem", "client.key", "client.csr",
             "client.pem")
    spawn(["openssl", *[str(cwd / a) if a in names else a for a in args]], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> pathlib.Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=trtserve-test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-set_serial", "1" if name == "server" else "2",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


def _request() -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="mlp")
    r.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 64])
    r.raw_input_contents.append(np.full((1, 64), 0.123456, np.float32).tobytes())
    return r


@pytest.fixture
def repo(tmp_path) -> pathlib.Path:
    models.copy_example(tmp_path)
    return tmp_path


@needs_openssl
def test_tls(repo, serve_repo, pki):
    s = serve_repo(repo, metrics=False, tls=TlsOptions(pki / "server.pem", pki / "server.key"))
    creds = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
    with grpc.secure_channel(s.url, creds) as ch:
        resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(_request(), timeout=10)
        assert len(resp.raw_output_contents) == 1
    with grpc.insecure_channel(s.url) as ch:  # plaintext against a TLS port fails
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


@needs_openssl
def test_tritonclient_over_tls(repo, serve_repo, pki):
    import tritonclient.grpc as grpcclient

    s = serve_repo(repo, metrics=False, tls=TlsOptions(pki / "server.pem", pki / "server.key"))
    with grpcclient.InferenceServerClient(s.url, ssl=True, root_certificates=str(pki / "ca.pem")) as c:
        assert c.is_model_ready("mlp")


@needs_openssl
def test_mutual_tls_requires_a_client_certificate(repo, serve_repo, pki):
    s = serve_repo(repo, metrics=False, tls=TlsOptions(pki / "server.pem", pki / "server.key", pki / "ca.pem"))
    ca = (pki / "ca.pem").read_bytes()
    with grpc.secure_channel(s.url, grpc.ssl_channel_credentials(root_certificates=ca)) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=(pki / "client.key").read_bytes(),
                                         certificate_chain=(pki / "client.pem").read_bytes())
    with grpc.secure_channel(s.url, creds) as ch:
        assert pb_grpc.GRPCInferenceServiceStub(ch).ServerLive(pb.ServerLiveRequest(), timeout=5).live


def test_bearer_token(repo, serve_repo):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    s = serve_repo(repo, metrics=False, auth_token="s3cret-token")
    with grpc.insecure_channel(s.url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        for metadata, words in ((None, "missing"), ((("authorization", "Bearer wrong"),), "invalid")):
            for call in (lambda m: stub.ModelInfer(_request(), timeout=5, metadata=m),
                         lambda m: stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5, metadata=m),
                         lambda m: list(stub.ModelStreamInfer(iter([_request()]), timeout=5, metadata=m))):
                with pytest.raises(grpc.RpcError) as e:
                    call(metadata)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and words in e.value.details()
        ok = (("authorization", "Bearer s3cret-token"),)
        assert len(stub.ModelInfer(_request(), timeout=5, metadata=ok).raw_output_contents) == 1
        streamed = list(stub.ModelStreamInfer(iter([_request()]), timeout=5, metadata=ok))
        assert len(streamed) == 1 and not streamed[0].error_message
        # health stays open for Kubernetes' gRPC probes, which cannot send headers
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert h.status == health_pb2.HealthCheckResponse.SERVING


def test_no_tensor_data_in_logs(repo, serve_repo, caplog):
    s = serve_repo(repo, metrics=False)
    caplog.set_level(logging.DEBUG)
    with grpc.insecure_channel(s.url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        stub.ModelInfer(_request(), timeout=5)
        bad = _request()
        bad.inputs[0].shape[:] = [1, 63]
        bad.raw_input_contents[0] = np.full((1, 63), 0.123456, np.float32).tobytes()
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(bad, timeout=5)
    text = caplog.text
    assert "0.123456" not in text and repr(np.float32(0.123456).tobytes())[2:10] not in text
