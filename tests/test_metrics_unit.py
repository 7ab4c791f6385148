"""PrometheusObserver, the NVML collector and MetricsServer, driven with known events (no gRPC server).

Values are checked exactly, through prometheus-client's own text parser, plus the raw TYPE lines, because
the parser renames counter samples to ``<name>_total`` and so cannot show that Triton's names have no suffix.
"""
from __future__ import annotations

import gzip
import socket
import types
import urllib.error
import urllib.request
from typing import Dict, List, Optional, Tuple

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from trtserve.server.events import Fanout
from trtserve.server.metrics.gpu import GpuCollector, nvml_collector
from trtserve.server.metrics.http import CONTENT_TYPE, MetricsServer, render
from trtserve.server.metrics.prometheus import LATENCY_BUCKETS_S, PrometheusObserver

TRITON_COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)
HISTOGRAMS = (
    "trtserve_request_duration_seconds",
    "trtserve_queue_duration_seconds",
    "trtserve_compute_duration_seconds",
    "trtserve_batch_size",
)
MS = 1_000_000  # ns


class Scrape:
    """One parsed exposition; ``value(name, **labels)`` reads a sample by its name as written on the wire."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: Dict[str, str] = {}
        self.samples: Dict[Tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                name = s.name
                # The parser renames a Triton counter's samples to <name>_total; undo that to key by the wire name.
                if family.type == "counter" and f"\n{family.name}{{" in "\n" + text:
                    name = family.name
                self.samples[(name, frozenset(s.labels.items()))] = s.value
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, typ = line.split(" ")
                self.types[name] = typ

    def value(self, name: str, **labels: str) -> Optional[float]:
        return self.samples.get((name, frozenset(labels.items())))

    def names(self) -> set:
        return {name for name, _ in self.samples}

    def series(self, name: str) -> List[Dict[str, str]]:
        return [dict(labels) for n, labels in self.samples if n == name]

    def matching(self, name: str, **labels: str) -> List[Tuple[Dict[str, str], float]]:
        """(labels, value) of every sample of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return [(dict(lab), v) for (n, lab), v in self.samples.items() if n == name and want <= lab]


def scrape(observer: PrometheusObserver) -> Scrape:
    return Scrape(render(observer.registry).decode())


def ok(observer: PrometheusObserver, model: str = "m", version: str = "1", rows: int = 1, request_ns: int = 5 * MS,
       queue_ns: int = 1 * MS, ci: int = 100_000, cf: int = 2 * MS, co: int = 200_000) -> None:
    observer.request_done(model, version, True, "", rows, request_ns, queue_ns, ci, cf, co)


def fail(observer: PrometheusObserver, reason: str, model: str = "m", version: str = "1") -> None:
    observer.request_done(model, version, False, reason, 1, 3 * MS, 2 * MS, 0, 0, 0)


@pytest.fixture
def obs() -> PrometheusObserver:
    o = PrometheusObserver(gpu=False)
    o.model_state("m", "1", "LOADING")
    o.model_state("m", "1", "READY", load_s=2.5)
    return o


def test_triton_names_and_types_exact(obs: PrometheusObserver) -> None:
    s = scrape(obs)
    for name in TRITON_COUNTERS:
        assert s.types[name] == "counter", name
        assert f"{name}_total" not in s.text, name  # Triton's counters carry no suffix
    assert s.types["nv_inference_pending_request_count"] == "gauge"
    for name in HISTOGRAMS:
        assert s.types[name] == "histogram"
    assert s.types["trtserve_requests_rejected_total"] == "counter"
    assert s.types["trtserve_requests_timed_out_total"] == "counter"
    for name in ("trtserve_queue_depth", "trtserve_model_load_seconds", "trtserve_model_state"):
        assert s.types[name] == "gauge"
    # A READY model exports zeros from the start, so rate() sees its first request.
    assert s.value("nv_inference_request_success", model="m", version="1") == 0
    assert s.series("nv_inference_count") == [{"model": "m", "version": "1"}]
    assert s.value("trtserve_request_duration_seconds_count", model="m", version="1") == 0


def test_success_counters_and_durations_exact(obs: PrometheusObserver) -> None:
    for _ in range(3):
        obs.batch_done("m", "1", 4, 2, 200_000, 4 * MS, 400_000, True)
    for _ in range(6):
        ok(obs, rows=2)
    fail(obs, "backend")  # its rows do not count
    s = scrape(obs)
    lab = {"model": "m", "version": "1"}
    assert s.value("nv_inference_request_success", **lab) == 6
    assert s.value("nv_inference_count", **lab) == 12
    assert s.value("nv_inference_exec_count", **lab) == 3
    assert s.value("nv_inference_request_duration_us", **lab) == 6 * 5000
    assert s.value("nv_inference_queue_duration_us", **lab) == 6 * 1000
    assert s.value("nv_inference_compute_input_duration_us", **lab) == 6 * 100
    assert s.value("nv_inference_compute_infer_duration_us", **lab) == 6 * 2000
    assert s.value("nv_inference_compute_output_duration_us", **lab) == 6 * 200
    for reason in ("REJECTED", "CANCELED", "OTHER"):
        assert s.value("nv_inference_request_failure", reason=reason, **lab) == 0
    assert s.value("nv_inference_request_failure", reason="BACKEND", **lab) == 1
    assert s.value("trtserve_request_duration_seconds_count", **lab) == 6
    assert s.value("trtserve_request_duration_seconds_sum", **lab) == pytest.approx(6 * 0.005)
    assert s.value("trtserve_compute_duration_seconds_sum", **lab) == pytest.approx(6 * 0.0023)
    assert s.value("trtserve_model_load_seconds", **lab) == 2.5


def test_failures_by_reason(obs: PrometheusObserver) -> None:
    for reason, n in [("rejected", 2), ("timeout", 3), ("cancelled", 1), ("backend", 4), ("invalid", 5),
                      ("unavailable", 1), ("something-new", 1)]:
        for _ in range(n):
            fail(obs, reason)
    s = scrape(obs)
    lab = {"model": "m", "version": "1"}
    assert s.value("nv_inference_request_failure", reason="REJECTED", **lab) == 2 + 3
    assert s.value("nv_inference_request_failure", reason="CANCELED", **lab) == 1
    assert s.value("nv_inference_request_failure", reason="BACKEND", **lab) == 4
    assert s.value("nv_inference_request_failure", reason="OTHER", **lab) == 5 + 1 + 1
    assert s.value("trtserve_requests_rejected_total", **lab) == 2
    assert s.value("trtserve_requests_timed_out_total", **lab) == 3
    # Failures touch nothing else (Triton's UpdateFailure): no success, no durations, no histogram counts.
    assert s.value("nv_inference_request_success", **lab) == 0
    assert s.value("nv_inference_request_duration_us", **lab) == 0
    assert s.value("nv_inference_queue_duration_us", **lab) == 0
    assert s.value("trtserve_request_duration_seconds_count", **lab) == 0
    assert s.value("trtserve_queue_duration_seconds_count", **lab) == 0


def test_negative_durations_are_clamped_like_statistics(obs: PrometheusObserver) -> None:
    ok(obs, request_ns=-5, queue_ns=-1, ci=-1, cf=-1, co=-1)
    s = scrape(obs)
    assert s.value("nv_inference_request_duration_us", model="m", version="1") == 0
    assert s.value("trtserve_request_duration_seconds_bucket", le="0.0001", model="m", version="1") == 1


def test_latency_histogram_buckets_are_cumulative_and_inclusive(obs: PrometheusObserver) -> None:
    # 50 us, exactly 100 us (le is inclusive), 0.3 ms, 7 ms, 3 s, 12 s (only +Inf).
    for seconds in (0.00005, 0.0001, 0.0003, 0.007, 3.0, 12.0):
        ok(obs, request_ns=round(seconds * 1e9))
    s = scrape(obs)
    lab = {"model": "m", "version": "1"}
    expected = {"0.0001": 2, "0.00025": 2, "0.0005": 3, "0.005": 3, "0.01": 4, "2.5": 4, "5.0": 5, "10.0": 5,
                "+Inf": 6}
    for le, n in expected.items():
        assert s.value("trtserve_request_duration_seconds_bucket", le=le, **lab) == n, le
    les = [d["le"] for d in s.series("trtserve_request_duration_seconds_bucket")]
    assert les == [repr(b) for b in LATENCY_BUCKETS_S] + ["+Inf"]
    assert les[0] == "0.0001" and les[-2] == "10.0"  # resolves 100 us to 10 s
    assert s.value("trtserve_request_duration_seconds_count", **lab) == 6
    assert s.value("trtserve_request_duration_seconds_sum", **lab) == pytest.approx(15.00745)


def test_batch_size_histogram(obs: PrometheusObserver) -> None:
    for size, good in [(1, True), (3, True), (4, True), (1024, True), (2000, True), (8, False)]:
        obs.batch_done("m", "1", size, size, 0, MS, 0, good)
    s = scrape(obs)
    lab = {"model": "m", "version": "1"}
    les = [d["le"] for d in s.series("trtserve_batch_size_bucket")]
    assert les == [f"{2 ** i}.0" for i in range(11)] + ["+Inf"]
    expected = {"1.0": 1, "2.0": 1, "4.0": 3, "8.0": 4, "512.0": 4, "1024.0": 5, "+Inf": 6}
    for le, n in expected.items():
        assert s.value("trtserve_batch_size_bucket", le=le, **lab) == n, le
    assert s.value("trtserve_batch_size_count", **lab) == 6  # every formed batch ...
    assert s.value("nv_inference_exec_count", **lab) == 5  # ... but only successful executions count here
    assert s.value("nv_inference_count", **lab) == 0  # rows come from successful requests, not batches


def test_pending_gauge_and_queue_depth_per_priority(obs: PrometheusObserver) -> None:
    lab = {"model": "m", "version": "1"}
    for priority in (1, 1, 2, 0):
        obs.request_queued("m", "1", priority)
    s = scrape(obs)
    assert s.value("nv_inference_pending_request_count", **lab) == 4
    assert s.value("trtserve_queue_depth", priority="1", **lab) == 2
    assert s.value("trtserve_queue_depth", priority="2", **lab) == 1
    assert s.value("trtserve_queue_depth", priority="0", **lab) == 1
    for priority in (1, 2):
        obs.request_dequeued("m", "1", priority)
    s = scrape(obs)
    assert s.value("nv_inference_pending_request_count", **lab) == 2
    assert s.value("trtserve_queue_depth", priority="1", **lab) == 1
    assert s.value("trtserve_queue_depth", priority="2", **lab) == 0
    for priority in (1, 0):
        obs.request_dequeued("m", "1", priority)
    assert scrape(obs).value("nv_inference_pending_request_count", **lab) == 0


def test_models_and_versions_are_separate_series(obs: PrometheusObserver) -> None:
    ok(obs, model="m", version="1")
    ok(obs, model="m", version="2")
    ok(obs, model="m", version="2")
    ok(obs, model="other", version="1")
    s = scrape(obs)
    assert s.value("nv_inference_request_success", model="m", version="1") == 1
    assert s.value("nv_inference_request_success", model="m", version="2") == 2
    assert s.value("nv_inference_request_success", model="other", version="1") == 1


def test_model_state_and_unload_removes_series(obs: PrometheusObserver) -> None:
    lab = {"model": "m", "version": "1"}
    s = scrape(obs)
    assert {d["state"]: s.value("trtserve_model_state", **d) for d in s.series("trtserve_model_state")} == {
        "LOADING": 0, "READY": 1, "UNLOADING": 0, "UNAVAILABLE": 0}
    ok(obs)
    obs.request_queued("m", "1", 0)
    obs.model_state("m", "1", "UNLOADING")
    s = scrape(obs)
    assert s.value("trtserve_model_state", state="UNLOADING", **lab) == 1
    assert s.value("trtserve_model_state", state="READY", **lab) == 0
    obs.model_state("m", "1", "UNAVAILABLE")
    obs.request_dequeued("m", "1", 0)  # a late dequeue must not bring back a negative gauge
    s = scrape(obs)
    for name in TRITON_COUNTERS + ("nv_inference_pending_request_count", "trtserve_queue_depth",
                                   "trtserve_model_load_seconds", "trtserve_request_duration_seconds_count"):
        assert s.series(name) == [], name
    assert s.value("trtserve_model_state", state="UNAVAILABLE", **lab) == 1  # the state itself stays visible
    # Loading again starts from zero (a counter reset, which rate() handles).
    obs.model_state("m", "1", "READY", load_s=0.5)
    s = scrape(obs)
    assert s.value("nv_inference_request_success", **lab) == 0
    assert s.value("trtserve_model_load_seconds", **lab) == 0.5


def _state(o: PrometheusObserver, model: str = "m", version: str = "1") -> Optional[str]:
    s = scrape(o)
    current = [d["state"] for d in s.series("trtserve_model_state")
               if d["model"] == model and d["version"] == version and s.value("trtserve_model_state", **d) == 1]
    assert len(current) <= 1, current
    return current[0] if current else None


def test_reload_in_place_keeps_series(obs: PrometheusObserver) -> None:
    """The registry loads the new copy of a version, then retires the old one under the same name."""
    ok(obs)
    for state, shown in [("LOADING", "READY"), ("READY", "READY"), ("UNLOADING", "READY"), ("UNAVAILABLE", "READY")]:
        obs.model_state("m", "1", state, load_s=0.25)
        assert _state(obs) == shown, state
    s = scrape(obs)
    assert s.value("nv_inference_request_success", model="m", version="1") == 1  # counting goes on
    assert s.value("trtserve_model_load_seconds", model="m", version="1") == 0.25


def test_failed_reload_and_failed_load() -> None:
    o = PrometheusObserver(gpu=False)
    o.model_state("m", "1", "LOADING")
    assert _state(o) == "LOADING"
    o.model_state("m", "1", "UNAVAILABLE")  # the first load failed
    assert _state(o) == "UNAVAILABLE"
    o.model_state("m", "1", "LOADING")
    o.model_state("m", "1", "READY", load_s=1.0)
    ok(o)
    # A reload whose new copy fails: the old copy is still retired, as the registry does.
    for state, shown in [("LOADING", "READY"), ("UNAVAILABLE", "READY"), ("UNLOADING", "UNLOADING"),
                         ("UNAVAILABLE", "UNAVAILABLE")]:
        o.model_state("m", "1", state)
        assert _state(o) == shown, state
    assert scrape(o).series("nv_inference_request_success") == []


def test_own_registry_and_fanout() -> None:
    a, b = PrometheusObserver(gpu=False), PrometheusObserver(gpu=False)
    Fanout([a]).request_done("m", "1", True, "", 1, MS, 0, 0, 0, 0)
    assert scrape(a).value("nv_inference_request_success", model="m", version="1") == 1
    assert scrape(b).series("nv_inference_request_success") == []
    assert b"nv_inference" not in generate_latest(REGISTRY)


def test_label_values_are_escaped() -> None:
    o = PrometheusObserver(gpu=False)
    weird = 'a"b\\c\nd'
    ok(o, model=weird)
    assert scrape(o).value("nv_inference_request_success", model=weird, version="1") == 1


def test_render_matches_generate_latest_for_prometheus_client_metrics() -> None:
    """Our renderer differs from generate_latest only for suffix-less (Triton) counters."""
    reg = CollectorRegistry()
    c = Counter("jobs", "Jobs done", ["kind"], registry=reg)
    c.labels("x").inc(3)
    Gauge("temp", "Temperature", registry=reg).set(1.5)
    Histogram("lat_seconds", "Latency", buckets=(0.1, 1.0), registry=reg).observe(0.5)
    assert render(reg) == generate_latest(reg)


# --- NVML ---------------------------------------------------------------------------------------------


class _FakeNvml(types.SimpleNamespace):
    """Just the pynvml calls gpu.py makes; GPU 1 does not report power, as some boards do not."""

    class NVMLError(Exception):
        pass

    def __init__(self, count: int = 2, init_error: Optional[Exception] = None) -> None:
        super().__init__(inits=0, shutdowns=0, energy_mj=[10_000, 50_000])
        self._count, self._init_error = count, init_error

    def nvmlInit(self) -> None:
        if self._init_error is not None:
            raise self._init_error
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return self._count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> bytes:
        return f"GPU-0000-{h}".encode()

    def nvmlDeviceGetUtilizationRates(self, h: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(gpu=37, memory=5)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(total=80 << 30, used=(h + 1) << 30, free=0)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if h == 1:
            raise self.NVMLError("not supported")
        return 123_456

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        if h == 1:
            raise self.NVMLError("not supported")
        return 700_000

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        return self.energy_mj[h]


def test_gpu_collector_triton_names() -> None:
    nvml = _FakeNvml()
    collector = nvml_collector(nvml)
    assert isinstance(collector, GpuCollector)
    reg = CollectorRegistry()
    reg.register(collector)
    nvml.energy_mj = [10_000 + 2_500, 50_000]  # 2.5 J used by GPU 0 since the server started
    s = Scrape(render(reg).decode())
    g0, g1 = {"gpu_uuid": "GPU-0000-0"}, {"gpu_uuid": "GPU-0000-1"}
    assert s.value("nv_gpu_utilization", **g0) == 0.37
    assert s.value("nv_gpu_memory_total_bytes", **g1) == 80 << 30
    assert s.value("nv_gpu_memory_used_bytes", **g1) == 2 << 30
    assert s.value("nv_gpu_power_usage", **g0) == pytest.approx(123.456)
    assert s.value("nv_gpu_power_limit", **g0) == 700.0
    assert s.value("nv_gpu_power_usage", **g1) is None  # unsupported: left out, not an error
    assert s.value("nv_energy_consumption", **g0) == 2.5
    assert s.value("nv_energy_consumption", **g1) == 0
    assert s.types["nv_energy_consumption"] == "counter" and s.types["nv_gpu_utilization"] == "gauge"
    collector.close()
    collector.close()
    assert (nvml.inits, nvml.shutdowns) == (1, 1)
    assert render(reg) == b""  # closed: no series


@pytest.mark.parametrize("nvml", [_FakeNvml(init_error=RuntimeError("driver not loaded")), _FakeNvml(count=0)])
def test_gpu_collector_absent_without_gpu(nvml: _FakeNvml) -> None:
    assert nvml_collector(nvml) is None
    assert nvml.inits == nvml.shutdowns


def test_observer_without_nvml_exports_no_gpu_series() -> None:
    """On this box (CPU, or no nvidia-ml-py) gpu=True must be silent; with a GPU the series appear."""
    o = PrometheusObserver(gpu=True)
    try:
        names = Scrape(render(o.registry).decode()).types
        if o._gpu is None:
            assert not any(n.startswith(("nv_gpu_", "nv_energy_")) for n in names)
        else:
            assert "nv_gpu_memory_total_bytes" in names
    finally:
        o.close()


# --- HTTP ---------------------------------------------------------------------------------------------


def _get(url: str, headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_metrics_server_lifecycle(obs: PrometheusObserver) -> None:
    ok(obs)
    server = MetricsServer(obs.registry, "127.0.0.1", 0)
    port = server.start()
    try:
        assert port > 0 and server.port == port
        with pytest.raises(RuntimeError):
            server.start()
        status, headers, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert headers["Content-Type"] == CONTENT_TYPE
        assert Scrape(body.decode()).value("nv_inference_request_success", model="m", version="1") == 1
        status, headers, zipped = _get(f"http://127.0.0.1:{port}/metrics", {"Accept-Encoding": "gzip"})
        assert headers.get("Content-Encoding") == "gzip" and gzip.decompress(zipped) == body
        assert _get(f"http://127.0.0.1:{port}/other")[0] == 404
    finally:
        server.stop()
    server.stop()  # idempotent
    assert server.port is None
    with pytest.raises(OSError):  # the port is released, nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_metrics_server_fixed_port_and_restart(obs: PrometheusObserver) -> None:
    first = MetricsServer(obs.registry, "127.0.0.1", 0)
    port = first.start()
    first.stop()
    again = MetricsServer(obs.registry, "127.0.0.1", port)  # SO_REUSEADDR: the same port right after stop
    assert again.start() == port
    try:
        assert _get(f"http://127.0.0.1:{port}/metrics")[0] == 200
        with pytest.raises(OSError):  # a port in use fails loudly at start, not later
            MetricsServer(obs.registry, "127.0.0.1", port).start()
    finally:
        again.stop()


def test_requests_done_in_one_call_equals_one_call_per_request() -> None:
    """The engine reports a batch's successes in one call: /metrics and ModelStatistics must read exactly as if
    each request had been reported alone (negative durations clamped the same way)."""
    from trtserve.server.metrics.statistics import Statistics

    done = [(1, 5 * MS, 1 * MS, 100_000, 2 * MS, 200_000), (4, 7 * MS, -3, 0, 3 * MS, 1),
            (2, 2 * MS, 4 * MS, -1, 5, 9), (1, 300 * MS, 0, 1, 1, 1)]
    one, many = PrometheusObserver(gpu=False), PrometheusObserver(gpu=False)
    stats_one, stats_many = Statistics(), Statistics()
    for o in (one, many):
        o.model_state("m", "1", "READY")
    for row in done:
        one.request_done("m", "1", True, "", *row)
        stats_one.request_done("m", "1", True, "", *row)
    Fanout([many, stats_many]).requests_done("m", "1", done)
    assert scrape(many).samples == scrape(one).samples
    a, b = stats_many.snapshot("m", "1"), stats_one.snapshot("m", "1")
    assert a.inference_count == b.inference_count == 8
    for field in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(a, field) == getattr(b, field), field
    assert a.success.count == 4 and a.queue.ns == 5 * MS


def test_pending_counts_arrive_in_bulk(obs: PrometheusObserver) -> None:
    obs.request_queued("m", "1", 1, count=5)
    obs.request_dequeued("m", "1", 1, count=3)
    assert scrape(obs).value("nv_inference_pending_request_count", model="m", version="1") == 2


def test_histograms_place_nanoseconds_as_the_seconds_they_are() -> None:
    """The latency histograms bucket durations in whole ns against bounds turned into ns: every duration must land
    where its value in seconds would (le inclusive), right at each bound and one ns either side of it."""
    import bisect
    import random

    rng = random.Random(7)
    durations = [int(round(b * 1e9)) + d for b in LATENCY_BUCKETS_S for d in (-1, 0, 1)]
    durations += [rng.randrange(0, 12 * 10**9) for _ in range(500)] + [0]
    obs = PrometheusObserver(gpu=False)
    obs.model_state("m", "1", "READY")
    obs.requests_done("m", "1", [(1, ns, ns, ns, 0, 0) for ns in durations])
    s = scrape(obs)
    for name in ("trtserve_request_duration_seconds", "trtserve_queue_duration_seconds",
                 "trtserve_compute_duration_seconds"):
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            want = sum(1 for ns in durations if bisect.bisect_left(LATENCY_BUCKETS_S, ns / 1e9) <= i)
            assert s.value(name + "_bucket", le=repr(bound), model="m", version="1") == want, (name, bound)
        assert s.value(name + "_count", model="m", version="1") == len(durations)
        assert s.value(name + "_sum", model="m", version="1") == pytest.approx(sum(durations) / 1e9)
