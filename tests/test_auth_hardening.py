"""Issue 18 items 2 and 10 (token part): the bearer-token check.

* The ``Bearer`` scheme is case-insensitive (RFC 7235), two ``authorization`` headers are refused.
* Memory before authentication: an unauthenticated call is refused before its request message is read,
  so large (or gzip-inflating) unauthenticated ModelInfer requests do not grow the server. Measured as
  the VmRSS of a real ``trtserve serve`` process tree (``/proc/PID/status``).
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import threading
import time
from typing import Tuple

import grpc
import numpy as np
import pytest

from tests import models
from tests.mp import rss_kib, tree
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import grpc_service_pb2_grpc as pb_grpc

TOKEN = "s3cret-token"
MiB = 1 << 20
# Growth of the server's resident memory allowed while it refuses ~900 MiB of unauthenticated requests
# (4 x 100 MiB raw, one gzip message inflating to 500 MiB). Refused before reading, the server holds at
# most grpc's per-stream flow-control windows (a few MiB) plus allocator noise; reading them first grew
# it by 400+ MiB.
RSS_GROWTH_BOUND = 150 * MiB


def _request(rows: int = 1) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="mlp")
    r.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 64])
    r.raw_input_contents.append(np.full((rows, 64), 0.5, np.float32).tobytes())
    return r


def _big_request(nbytes: int) -> pb.ModelInferRequest:
    rows = nbytes // (64 * 4)
    r = pb.ModelInferRequest(model_name="mlp")
    r.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 64])
    r.raw_input_contents.append(bytes(rows * 64 * 4))
    return r


@pytest.fixture
def repo(tmp_path) -> pathlib.Path:
    models.copy_example(tmp_path / "repo")
    return tmp_path / "repo"


def test_bearer_scheme_is_case_insensitive_and_duplicates_are_refused(repo, serve_repo):
    s = serve_repo(repo, metrics=False, auth_token=TOKEN)
    with grpc.insecure_channel(s.url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
            md = (("authorization", f"{scheme} {TOKEN}"),)
            assert len(stub.ModelInfer(_request(), timeout=5, metadata=md).raw_output_contents) == 1, scheme
            assert stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5, metadata=md).name
        for bad in (f"Basic {TOKEN}", f"Bearer{TOKEN}", TOKEN, f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer "):
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(_request(), timeout=5, metadata=(("authorization", bad),))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, bad
        for twice in ((("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")),
                      (("authorization", "Bearer wrong"), ("authorization", f"Bearer {TOKEN}")),
                      (("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer wrong"))):
            for call in (lambda m: stub.ModelInfer(_request(), timeout=5, metadata=m),
                         lambda m: stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5, metadata=m),
                         lambda m: list(stub.ModelStreamInfer(iter([_request()]), timeout=5, metadata=m))):
                with pytest.raises(grpc.RpcError) as e:
                    call(twice)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "duplicate" in e.value.details(), e.value.details()


def test_refusals_answer_every_rpc_kind(repo, serve_repo):
    """The refusing handler is always request-streaming; unary and streaming RPCs still get the status."""
    s = serve_repo(repo, metrics=False, auth_token=TOKEN)
    with grpc.insecure_channel(s.url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        calls = (lambda: stub.ServerLive(pb.ServerLiveRequest(), timeout=5),
                 lambda: stub.ModelInfer(_request(), timeout=5),
                 lambda: list(stub.ModelStreamInfer(iter([_request()] * 3), timeout=5)),
                 lambda: list(stub.ModelStreamInfer(iter(()), timeout=5)))
        for call in calls:
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "missing" in e.value.details()
        ok = (("authorization", f"Bearer {TOKEN}"),)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5, metadata=ok).live


# ---- memory before authentication (real server process) ------------------------------------------

def _rss(pid: int) -> int:
    """VmRSS of ``pid`` and all its descendants, in bytes."""
    return rss_kib(tree(pid)) * 1024


class _PeakRss:
    """Samples the process tree's RSS every few milliseconds while active."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss(self.pid))
            time.sleep(0.005)

    def __enter__(self) -> "_PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss(self.pid))


def _start_serve(repo: pathlib.Path, tmp: pathlib.Path) -> Tuple[subprocess.Popen, str, pathlib.Path]:
    (tmp / "token").write_text(TOKEN + "\n")
    log = tmp / "serve.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trtserve", "serve", "--model-repository", str(repo), "--grpc-port", "0", "--http-port", "0",
             "--metrics-port", "-1", "--no-gpu-metrics", "--log-level", "info", "--auth-token-file", str(tmp / "token"),
             # far above the requests: this test is about refusing before reading, not about the limit
             "--max-message-bytes", str(1 << 30)],
            stdout=out, stderr=subprocess.STDOUT, env=env, close_fds=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = re.search(r" on 127\.0\.0\.1:(\d+) ", log.read_text())
        if m:
            return proc, f"127.0.0.1:{m.group(1)}", log
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("trtserve serve did not start: " + log.read_text()[-2000:])


def test_unauthenticated_requests_are_refused_before_they_are_read(repo, tmp_path):
    proc, url, log = _start_serve(repo, tmp_path)
    try:
        big = _big_request(100 * MiB).SerializeToString()
        inflating = _big_request(500 * MiB).SerializeToString()
        with grpc.insecure_channel(url) as ch:
            infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=lambda b: b, response_deserializer=pb.ModelInferResponse.FromString)
            ok = (("authorization", f"Bearer {TOKEN}"),)
            assert len(infer(_request().SerializeToString(), timeout=10, metadata=ok).raw_output_contents) == 1
            time.sleep(0.2)
            before = _rss(proc.pid)
            t0 = time.monotonic()
            with _PeakRss(proc.pid) as peak:
                futures = [infer.future(big, timeout=30) for _ in range(4)]
                futures.append(infer.future(inflating, timeout=30, compression=grpc.Compression.Gzip,
                                            metadata=(("authorization", "Bearer wrong"),)))
                codes = []
                for f in futures:
                    with pytest.raises(grpc.RpcError) as e:
                        f.result()
                    codes.append(e.value.code())
                time.sleep(0.2)
            elapsed = time.monotonic() - t0
            assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 5, codes
            # the server goes on answering authenticated calls
            assert len(infer(_request().SerializeToString(), timeout=10, metadata=ok).raw_output_contents) == 1
        growth = peak.peak - before
        print(f"RSS before {before / MiB:.0f} MiB, peak {peak.peak / MiB:.0f} MiB (+{growth / MiB:.0f} MiB) "
              f"while refusing 4 x 100 MiB + 1 gzip 500 MiB in {elapsed:.2f} s")
        assert growth < RSS_GROWTH_BOUND, (before, peak.peak)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
