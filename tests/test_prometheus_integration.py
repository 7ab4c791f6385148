"""A real Prometheus scrapes a live trtserve on loopback; PromQL over its HTTP API returns our numbers.

Skipped only when the ``prometheus`` binary is missing (CI installs Debian's package). Prometheus scrapes
every second; the test waits (bounded) for the target to be up and for a zero sample before sending
traffic, so that ``rate()`` over the window starts from zero and ``histogram_quantile`` over it must equal
the quantile of the buckets we scrape ourselves, computed with Prometheus' own interpolation.
"""
from __future__ import annotations

import json
import math
import pathlib
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from .conftest import RunningServer
from .test_metrics_live import FAST, expect_error, infer, scrape, wait_for, write_models

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (apt-get install -y prometheus)")
grpcclient = pytest.importorskip("tritonclient.grpc")

P99 = 'histogram_quantile(0.99, sum by (le) (rate(trtserve_request_duration_seconds_bucket{model="%s"}[1m])))'


class Prometheus:
    """One ``prometheus`` process with a generated config, on a free loopback port, data in a temp dir."""

    def __init__(self, workdir: pathlib.Path, target: str) -> None:
        self.workdir = workdir
        self.config = workdir / "prometheus.yml"
        self.config.write_text(f"""
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: trtserve
    metrics_path: /metrics
    static_configs:
      - targets: ["{target}"]
""")
        self.log = workdir / "prometheus.log"
        self.url = ""
        self._proc: Optional[subprocess.Popen] = None

    def start(self, attempts: int = 3) -> None:
        """Starts and waits for /-/ready; a port taken between choosing and binding gets another try."""
        for _ in range(attempts):
            port = _free_port()
            self.url = f"http://127.0.0.1:{port}"
            with open(self.log, "ab") as log:
                self._proc = subprocess.Popen(
                    [str(PROMETHEUS), f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                    stdout=log, stderr=subprocess.STDOUT)
            if wait_for(self._ready_or_dead, bool, timeout_s=30, every_s=0.1) and self._proc.poll() is None:
                return
            self.stop()
        raise RuntimeError(f"prometheus did not start; its log:\n{self.log.read_text()[-4000:]}")

    def _ready_or_dead(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            return True
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)

    def query(self, promql: str) -> List[Tuple[Dict[str, str], float]]:
        """Instant query: (labels, value) per result element."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return [(e["metric"], float(e["value"][1])) for e in body["data"]["result"]]

    def scalar(self, promql: str) -> Optional[float]:
        """The single value of ``promql``, or None while it has no result."""
        result = self.query(promql)
        assert len(result) <= 1, result
        return result[0][1] if result else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bucket_quantile(q: float, buckets: Dict[float, float]) -> float:
    """Prometheus' histogram_quantile over cumulative ``{le: count}`` (promql/quantile.go bucketQuantile)."""
    bs = sorted(buckets.items())
    assert bs[-1][0] == math.inf
    rank = q * bs[-1][1]
    b = next(i for i, (_, count) in enumerate(bs[:-1] + [(math.inf, math.inf)]) if count >= rank)
    if b == len(bs) - 1:
        return bs[-2][0]
    start, end, count = 0.0, bs[b][0], bs[b][1]
    if b > 0:
        start = bs[b - 1][0]
        count -= bs[b - 1][1]
        rank -= bs[b - 1][1]
    return start + (end - start) * (rank / count)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[RunningServer, Prometheus]]:
    repo = tmp_path_factory.mktemp("prom_repo")
    write_models(repo)
    server = RunningServer(repo)
    try:
        prom = Prometheus(tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{server.server.metrics_port}")
        prom.start()
        try:
            yield server, prom
        finally:
            prom.stop()
    finally:
        server.stop()


def test_promql_request_count_and_p99(stack: Tuple[RunningServer, Prometheus]) -> None:
    server, prom = stack
    sel = f'model="{FAST}",version="1"'
    up = wait_for(lambda: prom.scalar('up{job="trtserve"}'), lambda v: v == 1, timeout_s=20)
    assert up == 1, f"Prometheus never scraped trtserve; targets: {prom.query('up')}"
    # A zero sample before any traffic: rate() then starts from zero for every bucket.
    assert wait_for(lambda: prom.scalar(f"trtserve_request_duration_seconds_count{{{sel}}}"),
                    lambda v: v == 0, timeout_s=20) == 0

    client = grpcclient.InferenceServerClient(server.url)
    sizes = [1, 2, 3, 4, 5, 6, 7, 8] * 3
    for rows in sizes:
        infer(client, FAST, rows)
    for _ in range(2):
        expect_error(client, FAST, 1, 5, "INVALID_ARGUMENT")
    ours = scrape(server.metrics_url)
    lab = {"model": FAST, "version": "1"}
    assert ours.value("nv_inference_request_success", **lab) == len(sizes)

    n = wait_for(lambda: prom.scalar(f"trtserve_request_duration_seconds_count{{{sel}}}"),
                 lambda v: v == len(sizes), timeout_s=20)
    assert n == len(sizes)
    assert prom.scalar(f"nv_inference_request_success{{{sel}}}") == len(sizes)
    assert prom.scalar(f'nv_inference_request_failure{{{sel},reason="OTHER"}}') == 2
    assert prom.scalar(f"nv_inference_count{{{sel}}}") == sum(sizes)
    assert prom.scalar(f"nv_inference_exec_count{{{sel}}}") == len(sizes)
    assert prom.scalar(f'sum(trtserve_batch_size_bucket{{{sel},le="4.0"}})') == 4 * 3

    buckets = {float(labels["le"]): v for labels, v in ours.matching("trtserve_request_duration_seconds_bucket", **lab)}
    expected = bucket_quantile(0.99, buckets)
    p99 = prom.scalar(P99 % FAST)
    assert p99 is not None and math.isfinite(p99) and 0 < p99 <= 10, p99
    assert p99 == pytest.approx(expected, rel=1e-6), (p99, expected, buckets)
    # Prometheus took our counters as counters: rate() of a Triton counter (no _total) works too.
    rate = prom.scalar(f"rate(nv_inference_request_success{{{sel}}}[1m])")
    assert rate is not None and rate > 0


def test_bucket_quantile_matches_prometheus_rules() -> None:
    """The reference we compare against: interpolation inside the bucket, +Inf answers the last bound."""
    buckets = {0.001: 2.0, 0.01: 6.0, 0.1: 10.0, math.inf: 10.0}
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.001 + 0.009 * (3 / 4))
    assert bucket_quantile(0.1, buckets) == pytest.approx(0.0005)
    assert bucket_quantile(0.99, {0.001: 0.0, 0.01: 1.0, math.inf: 2.0}) == 0.01
