"""``GET /metrics`` over HTTP, on its own thread, so a scrape never runs on the asyncio loop.

The body is Prometheus' text format 0.0.4, as Triton serves it, written by ``render`` rather than
``prometheus_client.generate_latest``: the latter announces every counter as ``<name>_total``, which would
break Triton's counter names (``nv_inference_request_success`` and the others have no suffix). For the same
reason there is no content negotiation: OpenMetrics requires ``_total`` on counters.
"""
from __future__ import annotations

import gzip
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional, Tuple
from urllib.parse import urlsplit

from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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
    """Carries the registry to its handlers; IPv6 when the host is an IPv6 literal."""

    daemon_threads = True

    def __init__(self, address: Tuple[str, int], registry: Collector) -> None:
        self.registry = registry
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    timeout = 10  # a stalled scraper must not hold a thread forever
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
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

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (signature of the base class)
        _log.debug("%s " + format, self.address_string(), *args)


class MetricsServer:
    """``/metrics`` for one registry; ``start()`` binds (port 0: a free one) and returns the bound port.

    Scrapes run on the server's own threads; ``stop()`` waits for its accept loop to end (up to half a
    second, ``socketserver``'s poll interval), so call it off the event loop if that matters.
    """

    def __init__(self, registry: Collector, host: str, port: int) -> None:
        self._registry = registry
        self._host = host
        self._port = port
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> Optional[int]:
        """The bound port while started, else None."""
        return None if self._server is None else int(self._server.server_address[1])

    def start(self) -> int:
        if self._server is not None:
            raise RuntimeError("MetricsServer already started")
        server = _Server((self._host, self._port), self._registry)  # binds and listens now: the port is final
        thread = threading.Thread(target=server.serve_forever, name="trtserve-metrics", daemon=True)
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
