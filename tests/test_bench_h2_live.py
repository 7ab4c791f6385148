"""The load generator's own HTTP/2 client against real servers: the same answers and errors as
grpcio's client, 4 MB messages both ways, TLS and mutual TLS, headers, deadlines, lost connections."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
from typing import List

import grpc
import numpy as np
import pytest

from tests import models
from tests.test_security import needs_openssl, pki  # noqa: F401 - the certificate fixture
from trtserve.client.bench.h2load import H2Load
from trtserve.client.bench.h2sync import H2ThreadLoad
from trtserve.client.bench.h2target import H2Target, h2_address
from trtserve.client.bench.runner import BenchConfig, run
from trtserve.client.cli import main as client_main
from trtserve.protos import grpc_service_pb2 as pb

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _mlp_request(rows: int = 3, model: str = "mlp", datatype: str = "FP32") -> bytes:
    r = pb.ModelInferRequest(model_name=model, id="req-7")
    r.inputs.add(name="INPUT0", datatype=datatype, shape=[rows, 64])
    r.raw_input_contents.append(np.random.default_rng(rows).standard_normal((rows, 64)).astype(np.float32).tobytes())
    return r.SerializeToString()


def _grpcio(url: str, payload: bytes, metadata=None, credentials=None):
    """(status name or None, details, response bytes) from grpcio's client, for comparison."""
    ch = grpc.secure_channel(url, credentials) if credentials else grpc.insecure_channel(url)
    with ch:
        call = ch.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
        try:
            return None, "", call(payload, timeout=10, metadata=metadata)
        except grpc.RpcError as e:
            return e.code().name, e.details(), b""


async def _h2_async(url: str, payloads: List[bytes], **kw):
    async with H2Load(H2Target.from_url(url, **kw), payloads[0], 1, 10.0) as load:
        return await asyncio.gather(*(load.call(0, p) for p in payloads))


def _h2_sync(url: str, payloads: List[bytes], **kw):
    with H2ThreadLoad(H2Target.from_url(url, **kw), payloads[0], 1, 10.0) as load:
        return [load.call_result(0, p) for p in payloads]


def _both(url: str, payloads: List[bytes], **kw):
    """Every payload through the asyncio driver (all in flight at once) and the blocking one."""
    return {"asyncio": asyncio.run(_h2_async(url, payloads, **kw)), "threads": _h2_sync(url, payloads, **kw)}


def test_h2_answers_equal_grpcio_answers(example_server):
    payloads = [_mlp_request(rows) for rows in (1, 3, 17)]
    expected = [_grpcio(example_server.url, p) for p in payloads]
    assert all(status is None for status, _, _ in expected)
    for driver, results in _both(example_server.url, payloads).items():
        for r, (_, _, want) in zip(results, expected):
            assert r.status is None, (driver, r)
            got, ref = pb.ModelInferResponse.FromString(r.message), pb.ModelInferResponse.FromString(want)
            assert (got.model_name, got.id, list(got.outputs[0].shape)) == (ref.model_name, ref.id,
                                                                            list(ref.outputs[0].shape))
            assert got.raw_output_contents == ref.raw_output_contents


def test_h2_errors_carry_the_servers_status_and_message(example_server):
    bad = [_mlp_request(model="no-such-model"), _mlp_request(datatype="INT8"), b"\xff\xff not protobuf"]
    expected = [_grpcio(example_server.url, p)[:2] for p in bad]
    # (a request that is not protobuf: INVALID_ARGUMENT, see server/frontend/registration.py)
    assert [s for s, _ in expected] == ["NOT_FOUND", "INVALID_ARGUMENT", "INVALID_ARGUMENT"]
    assert "no-such-model" in expected[0][1] and "INT8" in expected[1][1]
    for driver, results in _both(example_server.url, bad + [_mlp_request()]).items():
        assert [(r.status, r.details) for r in results[:3]] == expected, driver
        assert results[3].status is None  # the connection carries on after errors


def test_h2_carries_4mb_each_way_through_flow_control(tmp_path, serve_repo):
    models.identity(tmp_path, "big", "FP32", max_batch_size=0, dims="[ -1 ]")
    s = serve_repo(tmp_path, metrics=False)
    x = np.arange(1 << 20, dtype=np.float32)  # 4 MiB: 64 times the default HTTP/2 window
    r = pb.ModelInferRequest(model_name="big")
    r.inputs.add(name="INPUT0", datatype="FP32", shape=[x.size])
    r.raw_input_contents.append(x.tobytes())
    for driver, results in _both(s.url, [r.SerializeToString()] * 3).items():
        for res in results:
            assert res.status is None, (driver, res)
            out = pb.ModelInferResponse.FromString(res.message)
            assert np.array_equal(np.frombuffer(out.raw_output_contents[0], np.float32), x), driver


@needs_openssl
@pytest.mark.parametrize("mutual", [False, True])
def test_h2_over_tls(tmp_path, serve_repo, pki, mutual):  # noqa: F811 - pki is the imported fixture
    from trtserve.server.frontend.security import TlsOptions

    models.copy_example(tmp_path)
    s = serve_repo(tmp_path, metrics=False, tls=TlsOptions(
        cert=pki / "server.pem", key=pki / "server.key",
        client_ca=pki / "ca.pem" if mutual else None))
    tls = {"root_cert": str(pki / "ca.pem")}
    if mutual:  # as PEM bytes: the TLS context must load a chain given in memory too
        tls.update(client_cert=(pki / "client.pem").read_bytes(), client_key=(pki / "client.key").read_bytes())
    for driver, results in _both(s.url, [_mlp_request()], tls=tls).items():
        assert results[0].status is None, (driver, results[0])
    if mutual:  # no client certificate: the handshake fails, the call gets UNAVAILABLE (as with grpcio)
        results = _both(s.url, [_mlp_request()], tls={"root_cert": str(pki / "ca.pem")})
        assert {r[0].status for r in results.values()} == {"UNAVAILABLE"}


def test_h2_sends_headers(tmp_path, serve_repo):
    models.copy_example(tmp_path)
    s = serve_repo(tmp_path, metrics=False, auth_token="s3cret-token")
    ok = _both(s.url, [_mlp_request()], metadata=(("authorization", "Bearer s3cret-token"),))
    assert {r[0].status for r in ok.values()} == {None}
    refused = _both(s.url, [_mlp_request()])
    assert {(r[0].status, "missing" in r[0].details) for r in refused.values()} == {("UNAUTHENTICATED", True)}


class _SilentServer:
    """A TCP server that reads and never answers (``close_after`` bytes: then drops the connection);
    counts connections and keeps what it received."""

    def __init__(self, close_after: int = 0) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.received: List[bytearray] = []  # per connection
        self.changed = threading.Condition()
        self._close_after = close_after
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            buf = bytearray()
            self.received.append(buf)
            threading.Thread(target=self._read, args=(conn, buf), daemon=True).start()

    def _read(self, conn: socket.socket, buf: bytearray) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                with self.changed:
                    buf += data
                    self.changed.notify_all()
                if self._close_after and len(buf) >= self._close_after:
                    conn.shutdown(socket.SHUT_RDWR)
                    return

    def close(self) -> None:
        self.sock.close()


def test_h2_deadline_resets_the_stream():
    srv = _SilentServer()
    try:
        async def go():
            async with H2Load(H2Target.from_url(srv.url), b"x", 1, timeout_s=0.2) as load:
                return await load.call(0)

        r = asyncio.run(go())
        assert r.status == "DEADLINE_EXCEEDED"
        with H2ThreadLoad(H2Target.from_url(srv.url), b"x", 1, timeout_s=0.2) as tload:
            assert tload.call(0) == "DEADLINE_EXCEEDED"
        # RST_STREAM(CANCEL) on stream 1 went out on both connections (read by the server's threads)
        reset = b"\x00\x00\x04\x03\x00\x00\x00\x00\x01\x00\x00\x00\x08"
        with srv.changed:
            assert srv.changed.wait_for(lambda: [reset in bytes(b) for b in srv.received] == [True, True], 10)
    finally:
        srv.close()


def test_h2_lost_connection_fails_the_call_unavailable_and_the_next_call_reconnects():
    # the preface, settings and window update are 64 bytes: each connection drops once a call has arrived on it
    srv = _SilentServer(close_after=100)
    try:
        async def go():
            async with H2Load(H2Target.from_url(srv.url), b"x" * 100, 1, timeout_s=5.0) as load:
                first = await load.call(0)
                second = await load.call(0)
                return first, second

        first, second = asyncio.run(go())
        assert first.status == "UNAVAILABLE" and "connection lost" in first.details
        assert second.status == "UNAVAILABLE" and srv.connections == 2  # a new connection was opened
        with H2ThreadLoad(H2Target.from_url(srv.url), b"x" * 100, 1, timeout_s=5.0) as tload:
            assert tload.call(0) == "UNAVAILABLE" and tload.call(0) == "UNAVAILABLE"
        assert srv.connections == 4
    finally:
        srv.close()


def test_h2_nothing_listening_is_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there

    async def go():
        async with H2Load(H2Target("127.0.0.1", port), b"x", 1):
            pass

    from trtserve.client._errors import InferenceServerError

    with pytest.raises(InferenceServerError, match="could not connect"):
        asyncio.run(go())


def test_h2_address_takes_one_host_port_only():
    assert h2_address("127.0.0.1:8001") == ("127.0.0.1", 8001)
    assert h2_address("[::1]:8001") == ("::1", 8001)
    assert h2_address("localhost:8001") == ("localhost", 8001)
    for url in ("127.0.0.1:1,127.0.0.2:1", "dns:///localhost:8001", "unix:/tmp/s", "nonsense"):
        assert h2_address(url) is None, url
        with pytest.raises(ValueError, match="one HOST:PORT"):
            H2Target.from_url(url)
    assert H2Target.from_url("[::1]:8001").authority == "[::1]:8001"
    assert H2Target.from_url("127.0.0.1:1", tls={"tls": True, "server_name": "svc"}).server_hostname == "svc"


async def _bench(url: str, **kw):
    return await run(BenchConfig(url=url, model="mlp", duration_s=0.4, warmup_s=0.1, **kw))


@pytest.mark.parametrize("kw, transport, engines", [
    ({"concurrency": [1, 8]}, "h2", ["threads", "asyncio"]),
    ({"request_rate": [200]}, "h2", ["asyncio"]),
    ({"concurrency": [2], "processes": 2}, "h2", ["asyncio"]),
    ({"concurrency": [1], "transport": "grpcio"}, "grpcio", ["threads"]),
    ({"request_rate": [100], "engine": "threads"}, "grpcio", ["threads"]),  # h2 has no blocking open loop
])
def test_bench_runs_each_transport_end_to_end(example_server, kw, transport, engines):
    result = asyncio.run(_bench(example_server.url, **kw))
    doc = result.as_dict()
    assert doc["generator"]["transport"] == transport and doc["generator"]["engine_per_level"] == engines
    for level in doc["levels"]:
        assert level["requests"] > 0 and level["errors"] == 0, level


def test_bench_auto_falls_back_to_grpcio_for_address_lists(example_server):
    result = asyncio.run(_bench(f"{example_server.url},{example_server.url}", concurrency=[1]))
    assert result.transport == "grpcio" and result.levels[0].requests > 0


def test_bench_cli_refuses_h2_it_cannot_honour(example_server, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert client_main(["bench", "--url", example_server.url, "-m", "mlp", "--duration", "0.3", "--warmup", "0.1",
                        "--transport", "h2", "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["generator"]["transport"] == "h2"
    code = client_main(["bench", "--url", f"dns:///{example_server.url}", "-m", "mlp", "--transport", "h2"])
    assert code == 2 and "dials one HOST:PORT" in capsys.readouterr().err
    code = client_main(["bench", "--url", example_server.url, "-m", "mlp", "--transport", "h2", "--engine",
                        "threads", "--request-rate", "10"])
    assert code == 2 and "open loop on the asyncio engine only" in capsys.readouterr().err


def test_h2_spent_stream_ids_move_the_next_call_to_a_new_connection(example_server):
    """A connection that takes no new call (stream ids spent, GOAWAY) costs no request: the call never
    went out, so the driver opens a new connection and sends it there."""
    from trtserve.client.bench.h2conn import MAX_STREAM_ID

    payload = _mlp_request()

    async def go():
        async with H2Load(H2Target.from_url(example_server.url), payload, 1, 10.0) as load:
            first = load._conns[0]
            first.state._next_sid = MAX_STREAM_ID
            results = [await load.call(0) for _ in range(3)]
            return results, load._conns[0] is not first

    results, replaced = asyncio.run(go())
    assert [r.status for r in results] == [None, None, None] and replaced
    with H2ThreadLoad(H2Target.from_url(example_server.url), payload, 1, 10.0) as tload:
        tload._local.conn.state._next_sid = MAX_STREAM_ID
        assert [tload.call(0) for _ in range(3)] == [None, None, None]
        assert len(tload._all) == 1  # the spent connection was closed and dropped
