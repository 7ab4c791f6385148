"""The KServe v2 HTTP/REST port of the multi-process server (docs/http.md) seen from outside: a real
``trtserve serve`` with two front-end processes, unmodified ``tritonclient.http`` (and raw sockets where a
client library would hide the bytes) on 127.0.0.1.

* exactly one correct answer per request under concurrency, HTTP and gRPC clients at once; statistics over
  HTTP and /metrics count exactly what was sent; HTTP and gRPC requests share batches;
* SIGTERM drains HTTP requests in flight; a SIGKILLed front end fails only the requests it held;
* perf_analyzer ``-i http`` (and ``--shared-memory system``) completes against two front ends;
* the bearer token and TLS on the HTTP port.
"""
from __future__ import annotations

import collections
import csv
import http.client
import json
import os
import pathlib
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest

from tests import models
from tests.mp import Serve, alive, client_ports, dev_shm, front_end_of, tree
from tests.test_auth_hardening import _PeakRss, _rss
from tests.test_frontends import _slow_repo, metric
from tests.test_perf_analyzer import PA
from tests.test_security import pki  # noqa: F401 - the module-scoped CA / server certificate fixture

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux /proc")

TOKEN = "s3cret-http-token"
MiB = 1 << 20


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> pathlib.Path:
    """mlp (perf_analyzer), ident (identity FP32 [16], dynamic batching with a queue delay), slow (identity
    FP32 [256] through 40 MatMuls: ~20 ms a row, one instance, batches of up to 16 rows; a 16-row request
    takes ~0.3 s)."""
    d = tmp_path_factory.mktemp("http_repo")
    models.copy_example(d)
    models.identity(d, "ident", "FP32", max_batch_size=32, dims="[ 16 ]",
                    extra="dynamic_batching { max_queue_delay_microseconds: 2000 }")
    _slow_repo(d, max_batch_size=16, extra="dynamic_batching { }")
    return d


@pytest.fixture(scope="module")
def server(repo):
    s = Serve(repo, frontends=2)
    yield s
    assert s.stop() == 0, s.output()[-3000:]


# ---- helpers -----------------------------------------------------------------------------------------------------

def _http_client(port: int, **kwargs):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(f"127.0.0.1:{port}", **kwargs)


def _input(module, name: str, data: np.ndarray):
    x = module.InferInput(name, list(data.shape), "FP32")
    x.set_data_from_numpy(data)
    return x


def _ident_data(n: int) -> np.ndarray:
    """Request n's input: 16 values no other request has (exact in FP32 for n < 2**20)."""
    return (np.arange(16, dtype=np.float32) + 16 * n)[None]


def _slow_data(n: int, rows: int) -> np.ndarray:
    return np.full((rows, 256), n, np.float32)


def _stats(port: int, model: str) -> dict:
    """The model's statistics, asked over HTTP."""
    c = _http_client(port)
    try:
        return c.get_inference_statistics(model)["model_stats"][0]
    finally:
        c.close()


def _get(port: int, path: str, headers: Sequence[Tuple[str, str]] = (), method: str = "GET", body: bytes = b"",
         context: ssl.SSLContext = None) -> Tuple[int, dict, bytes]:
    """(status, headers, body) of one request on a fresh connection; ``headers`` may repeat a name."""
    conn = (http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10) if context is not None
            else http.client.HTTPConnection("127.0.0.1", port, timeout=10))
    try:
        conn.putrequest(method, path)
        for k, v in headers:
            conn.putheader(k, v)
        if method == "POST":
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body if method == "POST" else None)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def _run_threads(target, n: int) -> None:
    threads = [threading.Thread(target=target, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a client thread hung"


# ---- 1. exactly one answer each, over both ports at once --------------------------------------------------------

HTTP_CLIENTS, GRPC_CLIENTS, PER_CLIENT = 32, 8, 150


def test_exactly_one_answer_each_over_http_and_grpc_together(server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    before = _stats(server.http_port, "ident")
    m_before = {n: metric(server.metrics_port, n, "ident")
                for n in ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count")}
    # every client its own connection (SO_REUSEPORT spreads connections over the front ends, not requests)
    http_clients = [_http_client(server.http_port) for _ in range(HTTP_CLIENTS)]
    grpc_clients = [grpcclient.InferenceServerClient(server.url) for _ in range(GRPC_CLIENTS)]
    answers: List[Tuple[str, str, np.ndarray, np.ndarray]] = []  # (sent id, answered id, expected, output)
    errors: List[BaseException] = []
    start = threading.Barrier(HTTP_CLIENTS + GRPC_CLIENTS, timeout=60)

    def worker(k: int) -> None:
        is_http = k < HTTP_CLIENTS
        client = http_clients[k] if is_http else grpc_clients[k - HTTP_CLIENTS]
        module = httpclient if is_http else grpcclient
        start.wait()
        for i in range(PER_CLIENT):
            n = k * PER_CLIENT + i
            data = _ident_data(n)
            rid = f"{'h' if is_http else 'g'}{n}"
            try:
                r = client.infer("ident", [_input(module, "INPUT0", data)], request_id=rid)
                got = r.get_response()["id"] if is_http else r.get_response().id
                answers.append((rid, got, data, r.as_numpy("OUTPUT0")))
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                errors.append(e)

    t0 = time.monotonic()
    try:
        _run_threads(worker, HTTP_CLIENTS + GRPC_CLIENTS)
        elapsed = time.monotonic() - t0
        # the HTTP connections are still open: both front-end processes hold some
        fronts = server.roles()["frontend"]
        held = collections.Counter(front_end_of(server.http_port, fronts).values())
    finally:
        for c in http_clients + grpc_clients:
            c.close()
    total = (HTTP_CLIENTS + GRPC_CLIENTS) * PER_CLIENT
    print(f"{total} requests ({HTTP_CLIENTS} HTTP + {GRPC_CLIENTS} gRPC clients) in {elapsed:.1f} s; "
          f"HTTP connections per front end {held}")
    assert not errors, errors[:3]
    assert len(answers) == total
    assert all(sent == answered for sent, answered, _, _ in answers)  # each answer names its own request
    assert len({a[0] for a in answers}) == total
    for rid, _, expected, out in answers:
        assert out.dtype == np.float32 and np.array_equal(out, expected), (rid, out, expected)
    assert len(fronts) == 2 and sum(held.values()) == HTTP_CLIENTS and len(held) == 2, held

    after = _stats(server.http_port, "ident")
    assert int(after["inference_stats"]["success"]["count"]) - int(before["inference_stats"]["success"]["count"]) == total
    assert int(after["inference_stats"]["fail"]["count"]) == int(before["inference_stats"]["fail"]["count"])
    assert int(after["inference_count"]) - int(before["inference_count"]) == total  # one row each
    m = {n: metric(server.metrics_port, n, "ident") - v for n, v in m_before.items()}
    assert m["nv_inference_request_success"] == total, m
    assert m["nv_inference_count"] == total, m
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert m["nv_inference_exec_count"] == executions, (m, executions)
    print(f"mean batch {total / executions:.1f}")
    assert total / executions > 1.0, f"no batching: {total} requests in {executions} executions"


def test_an_http_and_a_grpc_request_share_one_batch(server):
    """While a 16-row request keeps ``slow``'s one instance busy (~0.3 s), a 1-row HTTP request and a 1-row
    gRPC request queue behind it and then run together: one execution of batch size 2."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    def batches(stats: dict) -> Dict[int, int]:
        return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}

    def attempt() -> Tuple[Dict[int, int], int]:
        """(batch sizes executed, rows) while the three requests ran."""
        before = _stats(server.http_port, "slow")
        out: Dict[int, object] = {}
        connected = threading.Barrier(3, timeout=60)

        def send(k: int) -> None:
            # a client's connection belongs to the thread that opened it (geventhttpclient): open it here
            c = _http_client(server.http_port) if k < 2 else grpcclient.InferenceServerClient(server.url)
            try:
                assert c.is_server_ready()
                connected.wait()
                if k:
                    time.sleep(0.1)  # the 16-row request is running by now
                data = _slow_data(20 + k, 16 if k == 0 else 1)
                module = httpclient if k < 2 else grpcclient
                out[k] = (c.infer("slow", [_input(module, "INPUT0", data)]).as_numpy("OUTPUT0"), data)
            except Exception as e:  # noqa: BLE001
                out[k] = e
            finally:
                c.close()

        _run_threads(send, 3)
        for k in range(3):
            assert isinstance(out[k], tuple), out[k]
            np.testing.assert_allclose(*out[k], rtol=1e-6)
        after = _stats(server.http_port, "slow")
        b0, b1 = batches(before), batches(after)
        return ({size: b1[size] - b0.get(size, 0) for size in b1 if b1[size] != b0.get(size, 0)},
                int(after["inference_count"]) - int(before["inference_count"]))

    # a loaded machine may start a 1-row request before the 16-row one (then 1 + 16 cannot share a batch):
    # up to three tries; a server that does not batch the two ports together fails every one
    tries = []
    for _ in range(3):
        executed, rows = attempt()
        assert rows == 18, rows
        tries.append(executed)
        if executed == {16: 1, 2: 1}:
            break
    assert tries[-1] == {16: 1, 2: 1}, tries


# ---- 2. SIGTERM drains HTTP requests in flight ------------------------------------------------------------------

def test_sigterm_drains_http_requests_in_flight(repo):
    import tritonclient.http as httpclient

    shm_before = dev_shm()
    s = Serve(repo, frontends=2, drain_seconds=30)
    pids = tree(s.proc.pid)
    assert len(pids) == 4  # supervisor, engine, two front ends
    n = 6  # 16 rows each: ~0.3 s apiece, one at a time -> the last answers ~1.8 s after they are sent
    results: Dict[int, object] = {}
    done_at: Dict[int, float] = {}
    start = threading.Barrier(n + 1, timeout=60)

    def call(k: int) -> None:
        c = _http_client(s.http_port, network_timeout=60)  # opened in the thread that uses it (gevent)
        try:
            assert c.is_server_ready()  # connected before the load starts
            start.wait()
            data = _slow_data(100 + k, 16)
            results[k] = (c.infer("slow", [_input(httpclient, "INPUT0", data)]).as_numpy("OUTPUT0"), data)
        except Exception as e:  # noqa: BLE001
            results[k] = e
        finally:
            done_at[k] = time.monotonic()
            c.close()

    threads = [threading.Thread(target=call, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    start.wait()
    time.sleep(0.4)  # all sent; the first is running, the others queue behind it
    running = n - len(results)
    signalled = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    # readiness goes away before the requests in flight are done: 400, or the port no longer accepts
    not_ready = None
    while not_ready is None and time.monotonic() - signalled < 5:
        try:
            status = _get(s.http_port, "/v2/health/ready")[0]
        except OSError:
            status = "refused"
        if status != 200:
            not_ready = (status, time.monotonic())
        time.sleep(0.02)
    for t in threads:
        t.join(60)
    code = s.proc.wait(60)
    s.drain_output()
    assert running >= n - 2, f"only {running} of {n} requests were in flight at SIGTERM"
    assert code == 0, s.output()[-3000:]
    errors = {k: r for k, r in results.items() if not isinstance(r, tuple)}
    assert len(results) == n and not errors, errors
    for out, data in results.values():
        np.testing.assert_allclose(out, data, rtol=1e-6)
    assert not_ready is not None and not_ready[0] in (400, "refused"), not_ready
    assert not_ready[1] < max(done_at.values()), "readiness changed only after the drain"
    with pytest.raises(ConnectionRefusedError):  # nothing listens on the HTTP port any more
        socket.create_connection(("127.0.0.1", s.http_port), timeout=5).close()
    time.sleep(0.2)
    assert not [p for p in pids if alive(p)]
    assert dev_shm() == shm_before


# ---- 3. a front end killed during HTTP load ---------------------------------------------------------------------

def test_a_killed_front_end_fails_only_its_http_requests(repo):
    import tritonclient.http as httpclient

    s = Serve(repo, frontends=2)
    try:
        n, per = 8, 8
        results: List[Tuple[int, int, float, object]] = []  # (client, request, sent at, answer or error)
        fronts = s.roles()["frontend"]
        clients_of: Dict[int, set] = {pid: set() for pid in fronts}
        connecting = threading.Lock()
        connected, start = threading.Barrier(n + 1, timeout=60), threading.Barrier(n + 1, timeout=60)

        def connect(k: int):
            """A client whose connection is open, on a front end that holds at most n - 2 of them (both hold
            some); one at a time, to tell which connection is whose."""
            with connecting:
                for _ in range(20):
                    c = _http_client(s.http_port)
                    before = client_ports(s.http_port)
                    assert c.is_server_live()
                    (port,) = client_ports(s.http_port) - before
                    pid = front_end_of(s.http_port, fronts)[port]
                    if len(clients_of[pid]) < n - 2:
                        clients_of[pid].add(k)
                        return c
                    c.close()
            raise AssertionError("every connection went to one front end")

        def worker(k: int) -> None:
            c = connect(k)  # opened in the thread that uses it (gevent)
            try:
                connected.wait()
                start.wait()
                for i in range(per):
                    data = _slow_data(k * per + i, 1)
                    sent = time.monotonic()
                    try:
                        out = c.infer("slow", [_input(httpclient, "INPUT0", data)]).as_numpy("OUTPUT0")
                        results.append((k, i, sent, (out, data)))
                    except Exception as e:  # noqa: BLE001
                        results.append((k, i, sent, e))
            finally:
                c.close()

        threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(n)]
        for t in threads:
            t.start()
        connected.wait()
        victim = max(clients_of, key=lambda pid: len(clients_of[pid]))
        on_victim = clients_of[victim]
        assert len(on_victim) >= n // 2 and all(clients_of.values()), clients_of
        start.wait()
        time.sleep(0.4)  # every client has a request in flight (~0.1 s each)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert len(results) == n * per  # every request answered once, by an answer or an error
        failed = [(k, i, sent, r) for k, i, sent, r in results if not isinstance(r, tuple)]
        print(f"victim held clients {sorted(on_victim)} of {n}; failed (client, request): "
              f"{sorted((k, i) for k, i, _, _ in failed)}")
        # only clients connected to the killed process fail, at the connection (no HTTP status: every request
        # that reached the other front end was answered), and only around the kill: a client that reconnects
        # while the killed process is being torn down may land in its listening socket's queue once more. Some
        # geventhttpclient releases resend a request once when its pooled connection breaks, so the requests in
        # flight on the victim may all have been answered by the other front end instead: none failing is fine
        assert {k for k, _, _, _ in failed} <= on_victim, (on_victim, failed)
        for _, _, sent, e in failed:
            assert not hasattr(e, "status") or e.status() is None, e
            assert sent < killed_at + 1.0, (sent - killed_at, e)
        for k, i, _, r in results:
            if isinstance(r, tuple):
                np.testing.assert_allclose(*r, rtol=1e-6)
        assert all(isinstance(r, tuple) for k, i, _, r in results if i == per - 1)  # every client recovered
        deadline = time.monotonic() + 30
        while (len(s.roles()["frontend"]) < 2 or victim in s.roles()["frontend"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(s.roles()["frontend"]) == 2 and victim not in s.roles()["frontend"], s.output()[-2000:]
        answers = []
        for k in range(n):  # new connections, to either front end, the restarted one included
            c = _http_client(s.http_port)
            try:
                data = _slow_data(1000 + k, 1)
                answers.append((c.infer("slow", [_input(httpclient, "INPUT0", data)]).as_numpy("OUTPUT0"), data))
            finally:
                c.close()
        for out, data in answers:
            np.testing.assert_allclose(out, data, rtol=1e-6)
    finally:
        assert s.stop() == 0


# ---- 4. perf_analyzer -i http -------------------------------------------------------------------------------------

@pytest.mark.skipif(not PA, reason="no runnable perf_analyzer (run ../shared/perf-analyzer/setup.sh)")
@pytest.mark.parametrize("shm", ["none", "system"])
def test_perf_analyzer_over_http(server, tmp_path, shm):
    out = tmp_path / "pa.csv"
    cmd = [PA, "-m", "mlp", "-i", "http", "-u", f"127.0.0.1:{server.http_port}", "--concurrency-range", "1:4",
           "--measurement-interval", "500", "--stability-percentage", "100", "--shared-memory", shm,
           "-f", str(out)]
    # close_fds=False: posix_spawn rather than fork() from this multi-threaded process (test_perf_analyzer.py)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, close_fds=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert sorted(int(r["Concurrency"]) for r in rows) == [1, 2, 3, 4]
    assert all(float(r["Inferences/Second"]) > 0 for r in rows)
    assert "Server:" in proc.stdout and "Inference count" in proc.stdout, proc.stdout[-3000:]
    # perf_analyzer unregistered its regions over HTTP when done
    status, _, body = _get(server.http_port, "/v2/systemsharedmemory/status")
    assert status == 200 and json.loads(body) == [], body


# ---- 5. the bearer token and TLS on the HTTP port ---------------------------------------------------------------

def _raw_post(port: int, path: str, headers: Sequence[str], body_bytes: int) -> Tuple[bytes, int]:
    """POSTs a ``body_bytes`` body on a raw socket, reading the answer while the body is still being sent;
    (what the server answered, body bytes it let us send before closing)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {body_bytes}\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n")
    sock.sendall(head.encode())
    sent = [0]

    def send_body() -> None:
        chunk = bytes(MiB)
        try:
            while sent[0] < body_bytes:
                sent[0] += sock.send(chunk[:body_bytes - sent[0]])
        except OSError:  # the server closed the connection without reading the body
            pass

    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    answer = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    except OSError:
        pass
    sender.join(30)
    sock.close()
    return answer, sent[0]


def test_bearer_token_on_the_http_port(repo, tmp_path):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    (tmp_path / "token").write_text(TOKEN + "\n")
    s = Serve(repo, frontends=2, args=["--auth-token-file", str(tmp_path / "token")])
    try:
        port = s.http_port
        for headers, words in (((), "missing"), ((("Authorization", "Bearer wrong"),), "invalid"),
                               ((("Authorization", f"Basic {TOKEN}"),), "invalid"),
                               ((("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {TOKEN}")),
                                "duplicate"),
                               ((("Authorization", "Bearer wrong"), ("Authorization", f"Bearer {TOKEN}")),
                                "duplicate")):
            for method, path in (("GET", "/v2"), ("GET", "/v2/models/ident"), ("POST", "/v2/models/ident/infer"),
                                 ("POST", "/v2/repository/index"), ("GET", "/v2/models/stats")):
                status, hdrs, body = _get(port, path, headers, method=method, body=b"{}")
                assert status == 401, (headers, path, status, body)
                assert words in json.loads(body)["error"], (headers, path, body)
                assert hdrs.get("WWW-Authenticate") == "Bearer", hdrs
        for scheme in ("Bearer", "bearer", "BEARER"):
            status, _, body = _get(port, "/v2", (("Authorization", f"{scheme} {TOKEN}"),))
            assert status == 200 and json.loads(body)["name"], (scheme, status, body)
        # health stays open for Kubernetes' HTTP probes
        for path in ("/v2/health/ready", "/v2/health/live"):
            assert _get(port, path)[0] == 200, path

        # unmodified tritonclient.http, with and without the header
        data = _ident_data(42)
        c = _http_client(port)
        try:
            assert c.is_server_ready() and c.is_server_live()
            with pytest.raises(InferenceServerException) as e:
                c.infer("ident", [_input(httpclient, "INPUT0", data)])
            assert e.value.status() == "401" and "missing" in e.value.message(), e.value
            out = c.infer("ident", [_input(httpclient, "INPUT0", data)],
                          headers={"Authorization": f"bearer {TOKEN}"}).as_numpy("OUTPUT0")
            assert np.array_equal(out, data)
        finally:
            c.close()

        # 2 x 50 MiB unauthenticated bodies: refused before they are read, the server's memory stays put
        body_bytes = 50 * MiB
        time.sleep(0.2)
        before = _rss(s.proc.pid)
        answers: Dict[int, Tuple[bytes, int]] = {}
        with _PeakRss(s.proc.pid) as peak:
            def big(k: int) -> None:
                answers[k] = _raw_post(port, "/v2/models/ident/infer",
                                       [] if k == 0 else ["Authorization: Bearer wrong"], body_bytes)

            _run_threads(big, 2)
            time.sleep(0.2)
        growth = peak.peak - before
        print(f"RSS before {before / MiB:.0f} MiB, peak +{growth / MiB:.1f} MiB; body bytes sent before the "
              f"server closed: {[a[1] for a in answers.values()]}")
        for k, (answer, _) in answers.items():
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 401"), answer[:300]
            assert ("missing" if k == 0 else "invalid") in json.loads(body)["error"], answer[:300]
        assert growth < 20 * MiB, (before, peak.peak)
        # the server goes on serving authenticated requests
        status, _, _ = _get(port, "/v2/models/ident/ready", (("Authorization", f"Bearer {TOKEN}"),))
        assert status == 200
    finally:
        assert s.stop() == 0


def test_tls_on_the_http_port(repo, pki):  # noqa: F811
    import tritonclient.http as httpclient

    s = Serve(repo, frontends=2, args=["--grpc-server-cert", str(pki / "server.pem"),
                                       "--grpc-server-key", str(pki / "server.key")])
    try:
        port = s.http_port
        trusted = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        status, _, body = _get(port, "/v2", context=trusted)
        assert status == 200 and json.loads(body)["name"], body
        c = _http_client(port, ssl=True, ssl_options={"ca_certs": str(pki / "ca.pem")})
        try:
            assert c.is_server_ready()
            data = _ident_data(3)
            assert np.array_equal(c.infer("ident", [_input(httpclient, "INPUT0", data)]).as_numpy("OUTPUT0"), data)
        finally:
            c.close()
        with pytest.raises(ssl.SSLError):  # a client that does not trust the test CA refuses the certificate
            _get(port, "/v2", context=ssl.create_default_context())
        # plain HTTP to the TLS port gets no answer
        with pytest.raises((http.client.HTTPException, OSError)):
            status, _, body = _get(port, "/v2/health/ready")
            raise AssertionError(f"plain HTTP answered {status} {body[:100]!r}")
        assert _get(port, "/v2/health/ready", context=trusted)[0] == 200  # and TLS goes on working
    finally:
        assert s.stop() == 0


def test_a_second_server_on_the_same_http_port_is_refused(server):
    """SO_REUSEPORT would let a second server take half the HTTP connections: it is refused, in one line."""
    out = subprocess.run([sys.executable, "-m", "trtserve", "serve", "--grpc-port", "0", "--http-port",
                          str(server.http_port), "--metrics-port", "-1", "--frontends", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert f"{server.http_port}" in out.stderr and "HTTP" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
