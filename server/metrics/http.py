"""``GET /metrics`` over HTTP, on its own thread, so a scrape never runs on the asyncio loop.

The body is Prometheus' text format 0.0.4, as Triton serves it, written by ``render`` rather than
``prometheus_client.generate_latest``: the latter announces every counter as ``<name>_total``, which would
break Triton's counter names (``nv_inference_request_success`` and the others have no suffix). For the same
reason there is no content negotiation: OpenMetrics requires ``_total`` on counters.

The endpoint is plaintext and open by default, as Triton's. ``MetricsServer`` can serve it over TLS
(``metrics_tls``: the certificate and key, e.g. the gRPC port's) and require a bearer token
(``metrics_auth_token``: answered 401 with ``WWW-Authenticate: Bearer`` when missing or wrong), which
Prometheus sends with ``authorization: {credentials: ...}`` in its scrape config.
"""
from __future__ import annotations

import gzip
import hmac
import logging
import os
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional, Tuple, Union
from urllib.parse import urlsplit

from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from trtserve.server.tls import server_context

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_log = logging.getLogger(__name__)

# Samples that prometheus-client's own metrics carry for OpenMetrics; the text format puts them in gauges.
_OPENMETRICS_SUFFIXES = ("_created", "_gsum", "_gcount")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _sample_line(name: str, labels: dict, value: float, timestamp: Optional[float]) -> str:
    labelstr = ",".join(f'{k}="{_escape_value(str(v))}"' for k, v in sorted(labels.items()))
    ts = "" if timestamp is None else f" {int(float(timestamp) * 1000):d}"
    return f"{name}{{{labelstr}}} {floatToGoString(value)}{ts}\n" if labelstr else f"{name} {floatToGoString(value)}{ts}\n"


def render(registry: Collector) -> bytes:
    """Text format 0.0.4 of every family in ``registry``; a counter's TYPE line names its samples.

    So a Triton counter (samples named ``nv_inference_count``) is announced as ``nv_inference_count``,
    and a prometheus-client ``Counter`` (samples ``x_total``) as ``x_total``, as generate_latest does.
    """
    out: List[str] = []
    for metric in registry.collect():
        name, typ = metric.name, metric.type
        if typ == "counter" and any(s.name == name + "_total" for s in metric.samples):
            name += "_total"
        elif typ == "info":
            name, typ = name + "_info", "gauge"
        elif typ == "stateset":
            typ = "gauge"
        elif typ == "gaugehistogram":
            typ = "histogram"
        elif typ == "unknown":
            typ = "untyped"
        out.append(f"# HELP {name} {_escape_help(metric.documentation)}\n# TYPE {name} {typ}\n")
        extra: dict = {}
        for s in metric.samples:
            line = _sample_line(s.name, s.labels, s.value, s.timestamp)
            suffix = next((x for x in _OPENMETRICS_SUFFIXES if s.name == metric.name + x), None)
            if suffix is None:
                out.append(line)
            else:
                extra.setdefault(suffix, []).append(line)
        for suffix, lines in sorted(extra.items()):
            gname = metric.name + suffix
            out.append(f"# HELP {gname} {_escape_help(metric.documentation)}\n# TYPE {gname} gauge\n")
            out.extend(lines)
    return "".join(out).encode("utf-8")


class _Server(ThreadingHTTPServer):
    """Carries the registry (and the TLS context and token) to its handlers; IPv6 when the host is an
    IPv6 literal. The TLS handshake runs on the connection's own thread, with the handler's timeout, so a
    client that stalls it cannot hold up the accept loop."""

    daemon_threads = True

    def __init__(self, address: Tuple[str, int], registry: Collector, ssl_context: Optional[ssl.SSLContext] = None,
                 auth_token: Optional[bytes] = None) -> None:
        self.registry = registry
        self.ssl_context = ssl_context
        self.auth_token = auth_token
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def finish_request(self, request, client_address) -> None:  # type: ignore[override]
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(_Handler.timeout)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError: plaintext or bad clients
            _log.debug("metrics TLS handshake with %s failed: %s", client_address, e)
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            try:
                tls.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            tls.close()


_POLL_S = 0.1


class _Handler(BaseHTTPRequestHandler):
    timeout = 10  # a stalled scraper must not hold a thread forever
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._authorized():
            return
        if urlsplit(self.path).path != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        try:
            body = render(self.server.registry)
        except Exception:  # a broken collector must not kill the endpoint; say so and log why
            _log.exception("rendering /metrics failed")
            self.send_error(500, "rendering metrics failed")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        if "gzip" in self.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body)
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        """True without a token, or with exactly one ``Authorization: Bearer <token>`` header (scheme
        case-insensitive, RFC 7235; token compared in constant time); else answers 401."""
        expected = self.server.auth_token
        if expected is None:
            return True
        values = self.headers.get_all("Authorization") or []
        if len(values) == 1:
            scheme, _, token = values[0].strip().partition(" ")
            ok_token = hmac.compare_digest(token.strip().encode("latin-1", "replace"), expected)  # http.client decodes latin-1
            if scheme.lower() == "bearer" and ok_token:
                return True
        challenge = 'Bearer realm="trtserve-metrics"' + ('' if not values else ', error="invalid_token"')
        body = (b"missing 'Authorization: Bearer <token>' header\n" if not values else
                b"duplicate 'Authorization' header\n" if len(values) > 1 else b"invalid bearer token\n")
        self.send_response(401)
        self.send_header("WWW-Authenticate", challenge)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return False

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (signature of the base class)
        _log.debug("%s " + format, self.address_string(), *args)


PathLike = Union[str, "os.PathLike[str]"]


def _ssl_context(tls) -> ssl.SSLContext:
    """/metrics uses the gRPC port's certificate and key, without asking scrapers for client certificates."""
    cert, key = (tls.cert, tls.key) if hasattr(tls, "cert") else tls
    return server_context(cert, key)


class MetricsServer:
    """``/metrics`` for one registry; ``start()`` binds (port 0: a free one) and returns the bound port.

    Scrapes run on the server's own threads; ``stop()`` waits for its accept loop to end (up to half a
    second, ``socketserver``'s poll interval), so call it off the event loop if that matters.
    """

    def __init__(self, registry: Collector, host: str, port: int,
                 metrics_tls: Optional[Tuple[PathLike, PathLike]] = None,
                 metrics_auth_token: Optional[str] = None) -> None:
        """``metrics_tls``: (certificate, private key) PEM files, or an object with ``cert`` and ``key``
        (``TlsOptions``: the gRPC port's pair); read now, so a bad file fails here. ``metrics_auth_token``:
        the bearer token every scrape must send."""
        self._registry = registry
        self._host = host
        self._port = port
        self._ssl_context = _ssl_context(metrics_tls) if metrics_tls is not None else None
        if metrics_auth_token is not None and not metrics_auth_token:
            raise ValueError("empty metrics auth token")
        self._auth_token = metrics_auth_token.encode("utf-8") if metrics_auth_token else None
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def scheme(self) -> str:
        """"https" with TLS, else "http"."""
        return "http" if self._ssl_context is None else "https"

    @property
    def port(self) -> Optional[int]:
        """The bound port while started, else None."""
        return None if self._server is None else int(self._server.server_address[1])

    def start(self) -> int:
        if self._server is not None:
            raise RuntimeError("MetricsServer already started")
        server = _Server((self._host, self._port), self._registry, self._ssl_context, self._auth_token)  # binds and listens now: the port is final
        # shutdown() returns once serve_forever's next poll sees it: a tenth of a second instead of the default
        # half bounds how long every stop waits here, for ten idle wake-ups a second
        thread = threading.Thread(target=server.serve_forever, args=(_POLL_S,), name="trtserve-metrics", daemon=True)
        thread.start()
        self._server, self._thread = server, thread
        return int(server.server_address[1])

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.server_close()
        thread.join()
