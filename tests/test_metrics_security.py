"""Issue 18 item 10 (metrics part): /metrics can be served over TLS and behind a bearer token.

MetricsServer is started directly and queried with real HTTP(S) requests on 127.0.0.1; the TLS certificate
is made by openssl in the test (``pki`` from test_security). Without the options it stays plain and open.
"""
from __future__ import annotations

import http.client
import socket
import ssl
import time
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
from prometheus_client import CollectorRegistry, Gauge

from tests.test_security import needs_openssl, pki  # noqa: F401 (pki is a fixture)
from trtserve.server.frontend.security import TlsOptions
from trtserve.server.metrics.http import CONTENT_TYPE, MetricsServer

TOKEN = "scrape-s3cret"


@pytest.fixture
def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Gauge("trtserve_test_gauge", "a gauge for the test", registry=reg).set(7)
    return reg


@pytest.fixture
def start(registry) -> Iterator:
    servers: List[MetricsServer] = []

    def run(**kwargs) -> int:
        s = MetricsServer(registry, "127.0.0.1", 0, **kwargs)
        servers.append(s)
        return s.start()

    yield run
    for s in servers:
        s.stop()


def _get(port: int, headers: List[Tuple[str, str]] = (), tls: Optional[ssl.SSLContext] = None,
         path: str = "/metrics") -> Tuple[int, Dict[str, str], bytes]:
    """GET with headers sent as given (a header may repeat)."""
    conn = (http.client.HTTPSConnection("127.0.0.1", port, context=tls, timeout=5) if tls is not None
            else http.client.HTTPConnection("127.0.0.1", port, timeout=5))
    try:
        conn.putrequest("GET", path)
        for k, v in headers:
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_bearer_token_on_metrics(start):
    port = start(metrics_auth_token=TOKEN)
    status, headers, body = _get(port)
    assert status == 401 and headers["www-authenticate"].startswith("Bearer") and b"missing" in body
    assert b"trtserve_test_gauge" not in body
    for bad in ("Bearer wrong", f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN}x", "Bearer"):
        status, headers, body = _get(port, [("Authorization", bad)])
        assert status == 401 and headers["www-authenticate"].startswith("Bearer"), bad
        assert 'error="invalid_token"' in headers["www-authenticate"] and b"trtserve_test_gauge" not in body
    status, _, body = _get(port, [("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {TOKEN}")])
    assert status == 401 and b"duplicate" in body
    assert _get(port, path="/other")[0] == 401  # nothing is answered without the token
    for scheme in ("Bearer", "bearer", "BEARER"):  # RFC 7235: the scheme is case-insensitive
        status, headers, body = _get(port, [("Authorization", f"{scheme} {TOKEN}")])
        assert status == 200 and headers["content-type"] == CONTENT_TYPE
        assert b"trtserve_test_gauge 7.0" in body
    assert _get(port, [("Authorization", f"Bearer {TOKEN}")], path="/other")[0] == 404


def test_metrics_stay_open_without_options(start):
    port = start()
    status, _, body = _get(port)
    assert status == 200 and b"trtserve_test_gauge 7.0" in body
    with pytest.raises(ValueError):
        MetricsServer(CollectorRegistry(), "127.0.0.1", 0, metrics_auth_token="")


@needs_openssl
def test_metrics_over_tls(start, pki):  # noqa: F811
    client = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    for tls in ((pki / "server.pem", pki / "server.key"), TlsOptions(pki / "server.pem", pki / "server.key")):
        port = start(metrics_tls=tls)
        status, headers, body = _get(port, tls=client)
        assert status == 200 and b"trtserve_test_gauge 7.0" in body
        # plaintext HTTP to the TLS port gets no metrics, and the server goes on serving TLS
        with pytest.raises((http.client.HTTPException, OSError)):
            status, _, body = _get(port)
            assert b"trtserve_test_gauge" not in body
            raise http.client.HTTPException(f"plaintext answered {status}")
        assert _get(port, tls=client)[0] == 200


@needs_openssl
def test_metrics_over_tls_with_token(start, pki):  # noqa: F811
    client = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    port = start(metrics_tls=(pki / "server.pem", pki / "server.key"), metrics_auth_token=TOKEN)
    assert _get(port, tls=client)[0] == 401
    status, _, body = _get(port, [("Authorization", f"Bearer {TOKEN}")], tls=client)
    assert status == 200 and b"trtserve_test_gauge 7.0" in body


@needs_openssl
def test_a_stalled_tls_handshake_does_not_block_other_scrapes(start, pki):  # noqa: F811
    client = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    port = start(metrics_tls=(pki / "server.pem", pki / "server.key"))
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]  # never say hello
    try:
        t0 = time.monotonic()
        assert _get(port, tls=client)[0] == 200
        assert time.monotonic() - t0 < 2
    finally:
        for s in idle:
            s.close()


def test_bad_tls_files_fail_at_construction(tmp_path, registry):
    (tmp_path / "cert.pem").write_text("not a certificate")
    with pytest.raises((OSError, ssl.SSLError)):
        MetricsServer(registry, "127.0.0.1", 0, metrics_tls=(tmp_path / "cert.pem", tmp_path / "cert.pem"))
