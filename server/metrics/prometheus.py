"""Prometheus view of the core's events: Triton's metric names, plus the histograms Triton lacks.

Everything is one custom collector over plain per-model state in the observer's own
``CollectorRegistry``, for three reasons: Triton's counters carry no ``_total`` suffix (prometheus-client's
``Counter`` would add one), a model's series must disappear together when it is unloaded, and a scrape must
see one consistent snapshot (a request counted as a success is also in the duration counters).

Serve the registry with ``http.MetricsServer``, whose renderer keeps Triton's counter names;
``prometheus_client.generate_latest`` would announce them as ``<name>_total``.

What counts where (Triton's rules, ``core`` src/infer_stats.cc, so ModelStatistics and /metrics agree):

- ``nv_inference_request_success`` and the five ``nv_inference_*_duration_us`` counters: successful requests
  only; failures add to ``nv_inference_request_failure{reason}`` and nothing else.
- ``nv_inference_count``: rows of successful requests (a request of batch n counts n, padding never
  counts); ``nv_inference_exec_count``: batches that executed successfully, as Triton's backends report
  batch statistics only when not every response failed. ``statistics.py`` counts the same way.
- ``trtserve_request/queue/compute_duration_seconds``: successful requests, so that ``_sum`` matches the
  ``*_duration_us`` counters and instant rejections do not drag the quantiles down; compute is the
  request's input + infer + output time. ``trtserve_batch_size``: every formed batch, failed or not.
- Failure ``reason`` labels (Triton's values): rejected (queue full) -> REJECTED, timeout (queue timeout;
  Triton's timeout_action REJECT) -> REJECTED, cancelled -> CANCELED, backend -> BACKEND,
  invalid and unavailable -> OTHER (anything unknown -> OTHER). All four are exported from the start as 0,
  so that ``rate()`` sees the first failure.
- A version may be loaded again while its old copy still serves (the registry reports LOADING, READY
  for the new copy, then UNLOADING, UNAVAILABLE for the old one, all under the same model and version),
  so the state is kept per copy: READY while any copy is ready, and the version's series are removed
  only when its last copy becomes UNAVAILABLE (unloaded or failed to load). ``trtserve_model_state``
  stays after that, so an operator can still see that it went away.
"""
from __future__ import annotations

import bisect
import dataclasses
import threading
from typing import TYPE_CHECKING, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..events import Done, Observer

if TYPE_CHECKING:
    from .gpu import GpuCollector

# Our observer reasons -> Triton's ``reason`` label values (REJECTED, CANCELED, BACKEND, OTHER).
FAILURE_REASONS: Mapping[str, str] = {
    "rejected": "REJECTED",
    "timeout": "REJECTED",
    "cancelled": "CANCELED",
    "backend": "BACKEND",
    "invalid": "OTHER",
    "unavailable": "OTHER",
}
TRITON_REASONS: Tuple[str, ...] = ("REJECTED", "CANCELED", "BACKEND", "OTHER")
MODEL_STATES: Tuple[str, ...] = ("LOADING", "READY", "UNLOADING", "UNAVAILABLE")

# 1-2.5-5 steps from 100 us to 10 s: quantiles within a factor of 2.5 over the whole serving range.
LATENCY_BUCKETS_S: Tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BATCH_SIZE_BUCKETS: Tuple[float, ...] = tuple(float(2 ** i) for i in range(11))  # 1, 2, 4, ..., 1024

_Key = Tuple[str, str]  # (model, version)


class _Histogram:
    """Cumulative-on-read histogram; the caller holds the observer's lock."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last slot is +Inf
        self.sum = 0.0
        # each bound as the largest whole number of nanoseconds at or under it: a duration in ns finds its bucket
        # without a division (ns <= bound_ns exactly when ns / 1e9 <= bound)
        self.bounds_ns = tuple(_ns_at_most(b) for b in self.bounds)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.sum += value

    def buckets(self) -> List[Tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            running += n
            out.append(("+Inf" if bound == float("inf") else _float_str(bound), float(running)))
        return out


def _ns_at_most(bound_s: float) -> int:
    """The largest integer ns with ns / 1e9 <= ``bound_s``."""
    ns = int(bound_s * 1e9)
    while (ns + 1) / 1e9 <= bound_s:
        ns += 1
    while ns / 1e9 > bound_s:
        ns -= 1
    return ns


@dataclasses.dataclass
class _Series:
    """Every number one model version exports, except its state (which outlives an unload)."""

    success: int = 0
    failure: Dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(TRITON_REASONS, 0))
    inference_count: int = 0
    exec_count: int = 0
    request_ns: int = 0
    queue_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0
    pending: Dict[int, int] = dataclasses.field(default_factory=dict)  # priority -> queued requests
    rejected: int = 0
    timed_out: int = 0
    load_s: Optional[float] = None
    request_s: _Histogram = dataclasses.field(default_factory=lambda: _Histogram(LATENCY_BUCKETS_S))
    queue_s: _Histogram = dataclasses.field(default_factory=lambda: _Histogram(LATENCY_BUCKETS_S))
    compute_s: _Histogram = dataclasses.field(default_factory=lambda: _Histogram(LATENCY_BUCKETS_S))
    batch_size: _Histogram = dataclasses.field(default_factory=lambda: _Histogram(BATCH_SIZE_BUCKETS))


class PrometheusObserver(Observer):
    """Keeps per-model numbers from the core's events and exports them from ``self.registry``.

    Events arrive on the event loop thread and scrapes on the HTTP server's thread, so one lock guards
    the state; every event is a few dictionary updates under it.
    """

    def __init__(self, gpu: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._lock = threading.Lock()
        self._series: Dict[_Key, _Series] = {}
        self._copies: Dict[_Key, List[str]] = {}  # state of each loaded copy of a version, oldest first
        self._states: Dict[_Key, str] = {}
        self.registry.register(_ModelCollector(self))
        self._gpu: Optional[GpuCollector] = None
        if gpu:
            from .gpu import nvml_collector  # NVML is optional: no pynvml, no GPU -> no collector, no series

            self._gpu = nvml_collector()
            if self._gpu is not None:
                self.registry.register(self._gpu)

    def close(self) -> None:
        """Releases NVML (if it was opened); the registry keeps exporting the model series."""
        if self._gpu is not None:
            self.registry.unregister(self._gpu)
            self._gpu.close()
            self._gpu = None

    def _get(self, model: str, version: str) -> _Series:
        series = self._series.get((model, version))
        if series is None:
            series = self._series[(model, version)] = _Series()
        return series

    # --- events.Observer -------------------------------------------------------------------------

    def request_queued(self, model: str, version: str, priority: int, count: int = 1) -> None:
        with self._lock:
            pending = self._get(model, version).pending
            pending[priority] = pending.get(priority, 0) + count

    def request_dequeued(self, model: str, version: str, priority: int, count: int = 1) -> None:
        with self._lock:
            series = self._series.get((model, version))
            if series is None:  # unloaded while queued: its series are already gone, do not revive them
                return
            series.pending[priority] = series.pending.get(priority, 0) - count

    def request_done(
        self, model: str, version: str, ok: bool, reason: str, rows: int, request_ns: int, queue_ns: int,
        compute_input_ns: int, compute_infer_ns: int, compute_output_ns: int,
    ) -> None:
        if ok:
            self.requests_done(model, version, ((rows, request_ns, queue_ns, compute_input_ns, compute_infer_ns,
                                                 compute_output_ns),))
            return
        with self._lock:
            s = self._get(model, version)
            s.failure[FAILURE_REASONS.get(reason, "OTHER")] += 1
            if reason == "rejected":
                s.rejected += 1
            elif reason == "timeout":
                s.timed_out += 1

    def requests_done(self, model: str, version: str, done: Sequence[Done]) -> None:
        # one pass with the histograms' lists at hand: the engine calls this per loop turn with every request a
        # batch answered, and a method call and a division per histogram and request cost more than the counting
        n = len(done)
        if not n:
            return
        rows = req = queue = cin = cinfer = cout = 0
        find = bisect.bisect_left
        with self._lock:
            s = self._get(model, version)
            rq, qu, co = s.request_s, s.queue_s, s.compute_s
            rq_counts, qu_counts, co_counts = rq.counts, qu.counts, co.counts
            rq_bounds, qu_bounds, co_bounds = rq.bounds_ns, qu.bounds_ns, co.bounds_ns
            last_compute, compute_at = -1, 0  # a batch's members share their compute time: looked up once
            for n_rows, request_ns, queue_ns, input_ns, infer_ns, output_ns in done:
                # clamped at 0 as statistics.py does, so both report the same sums
                request_ns = request_ns if request_ns > 0 else 0
                queue_ns = queue_ns if queue_ns > 0 else 0
                input_ns = input_ns if input_ns > 0 else 0
                infer_ns = infer_ns if infer_ns > 0 else 0
                output_ns = output_ns if output_ns > 0 else 0
                rows += n_rows
                req += request_ns
                queue += queue_ns
                cin += input_ns
                cinfer += infer_ns
                cout += output_ns
                rq_counts[find(rq_bounds, request_ns)] += 1
                qu_counts[find(qu_bounds, queue_ns)] += 1
                compute = input_ns + infer_ns + output_ns
                if compute != last_compute:
                    last_compute, compute_at = compute, find(co_bounds, compute)
                co_counts[compute_at] += 1
            rq.sum += req / 1e9
            qu.sum += queue / 1e9
            co.sum += (cin + cinfer + cout) / 1e9
            s.inference_count += rows
            s.request_ns += req
            s.queue_ns += queue
            s.compute_input_ns += cin
            s.compute_infer_ns += cinfer
            s.compute_output_ns += cout
            s.success += n

    def batch_done(
        self, model: str, version: str, batch_size: int, requests: int, compute_input_ns: int,
        compute_infer_ns: int, compute_output_ns: int, ok: bool,
    ) -> None:
        with self._lock:
            s = self._get(model, version)
            s.batch_size.observe(batch_size)
            if ok:
                s.exec_count += 1

    def model_state(self, model: str, version: str, state: str, load_s: float = 0.0) -> None:
        key = (model, version)
        with self._lock:
            copies = self._copies.setdefault(key, [])
            _apply_state(copies, state)
            self._states[key] = _shown_state(copies)
            if not copies:  # the last copy is gone: so are its series
                del self._copies[key]
                self._series.pop(key, None)
            elif state == "READY":
                self._get(model, version).load_s = load_s

    # --- export ----------------------------------------------------------------------------------

    def _snapshot(self) -> Tuple[Dict[_Key, _Series], Dict[_Key, str]]:
        """Deep enough copy to render outside the lock."""
        with self._lock:
            series = {k: _copy_series(s) for k, s in self._series.items()}
            return series, dict(self._states)


def _apply_state(copies: List[str], state: str) -> None:
    """Moves the copy that ``state`` is about: LOADING starts a copy, READY ends the newest load,
    UNLOADING starts retiring the oldest ready copy, UNAVAILABLE ends a retiring copy (else a failed
    load, else the oldest copy)."""

    def find(wanted: str, newest: bool = False) -> Optional[int]:
        order = range(len(copies) - 1, -1, -1) if newest else range(len(copies))
        return next((i for i in order if copies[i] == wanted), None)

    if state == "LOADING":
        copies.append(state)
        return
    if state not in ("READY", "UNLOADING", "UNAVAILABLE"):  # unknown to this module: the only copy shows it
        copies[:] = [state]
        return
    if state == "READY":
        i = find("LOADING", newest=True)
    elif state == "UNLOADING":
        i = find("READY")
        i = find("LOADING") if i is None else i
    else:
        i = find("UNLOADING")
        i = find("LOADING", newest=True) if i is None else i
        i = (0 if copies else None) if i is None else i
        if i is not None:
            del copies[i]
        return
    if i is None:
        copies.append(state)
    else:
        copies[i] = state


def _shown_state(copies: List[str]) -> str:
    """READY while any copy serves; otherwise what the copies are doing; UNAVAILABLE with none."""
    for state in ("READY", "LOADING", "UNLOADING"):
        if state in copies:
            return state
    return copies[0] if copies else "UNAVAILABLE"


def _copy_series(s: _Series) -> _Series:
    out = dataclasses.replace(s, failure=dict(s.failure), pending=dict(s.pending))
    for name in ("request_s", "queue_s", "compute_s", "batch_size"):
        src = getattr(s, name)
        h = _Histogram(src.bounds)
        h.counts, h.sum = list(src.counts), src.sum
        setattr(out, name, h)
    return out


def _float_str(x: float) -> str:
    """``le`` values as Prometheus clients write them (1.0, 0.00025, +Inf)."""
    return repr(float(x))


def _counter(name: str, doc: str) -> Metric:
    """A counter exported under ``name`` itself, as Triton does (no ``_total``)."""
    return Metric(name, doc, "counter")


class _ModelCollector(Collector):
    """Renders one snapshot of a ``PrometheusObserver`` as metric families."""

    def __init__(self, observer: PrometheusObserver) -> None:
        self._observer = observer

    def collect(self) -> Iterator[Metric]:
        series, states = self._observer._snapshot()
        labels = ["model", "version"]

        simple = [
            ("nv_inference_request_success", "Number of successful inference requests, all batch sizes",
             lambda s: s.success),
            ("nv_inference_count", "Number of inferences performed (a request of batch n counts n)",
             lambda s: s.inference_count),
            ("nv_inference_exec_count", "Number of model executions performed (batches)",
             lambda s: s.exec_count),
            ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds",
             lambda s: s.request_ns / 1e3),
            ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds",
             lambda s: s.queue_ns / 1e3),
            ("nv_inference_compute_input_duration_us",
             "Cumulative compute input duration in microseconds", lambda s: s.compute_input_ns / 1e3),
            ("nv_inference_compute_infer_duration_us",
             "Cumulative compute inference duration in microseconds", lambda s: s.compute_infer_ns / 1e3),
            ("nv_inference_compute_output_duration_us",
             "Cumulative compute output duration in microseconds", lambda s: s.compute_output_ns / 1e3),
        ]
        for name, doc, value in simple:
            m = _counter(name, doc)
            for (model, version), s in series.items():
                m.add_sample(name, {"model": model, "version": version}, float(value(s)))
            yield m

        m = _counter("nv_inference_request_failure", "Number of failed inference requests, all batch sizes")
        for (model, version), s in series.items():
            for reason in TRITON_REASONS:
                m.add_sample("nv_inference_request_failure",
                             {"model": model, "version": version, "reason": reason}, float(s.failure[reason]))
        yield m

        g = GaugeMetricFamily("nv_inference_pending_request_count",
                              "Instantaneous number of pending requests awaiting execution per-model", labels=labels)
        for (model, version), s in series.items():
            g.add_metric([model, version], float(sum(s.pending.values())))
        yield g

        hists = [
            ("trtserve_request_duration_seconds", "End-to-end time in the server of successful requests",
             "request_s"),
            ("trtserve_queue_duration_seconds", "Time successful requests waited in the batcher's queue",
             "queue_s"),
            ("trtserve_compute_duration_seconds",
             "Compute time (input + infer + output) of the batch that served each successful request", "compute_s"),
            ("trtserve_batch_size", "Rows in each formed batch", "batch_size"),
        ]
        for name, doc, attr in hists:
            h = HistogramMetricFamily(name, doc, labels=labels)
            for (model, version), s in series.items():
                hist = getattr(s, attr)
                h.add_metric([model, version], hist.buckets(), hist.sum)
            yield h

        g = GaugeMetricFamily("trtserve_queue_depth", "Requests waiting in the batcher's queue, per priority level",
                              labels=["model", "version", "priority"])
        for (model, version), s in series.items():
            for priority, n in sorted(s.pending.items()):
                g.add_metric([model, version, str(priority)], float(n))
        yield g

        for name, doc, attr in [
            ("trtserve_requests_rejected", "Requests refused because the queue was full", "rejected"),
            ("trtserve_requests_timed_out", "Requests that timed out in the queue", "timed_out"),
        ]:
            m = Metric(name, doc, "counter")
            for (model, version), s in series.items():
                m.add_sample(name + "_total", {"model": model, "version": version}, float(getattr(s, attr)))
            yield m

        g = GaugeMetricFamily("trtserve_model_load_seconds", "Seconds the last load of this version took",
                              labels=labels)
        for (model, version), s in series.items():
            if s.load_s is not None:
                g.add_metric([model, version], float(s.load_s))
        yield g

        g = GaugeMetricFamily("trtserve_model_state", "1 for the version's current state, 0 for the others",
                              labels=["model", "version", "state"])
        for (model, version), current in sorted(states.items()):
            known = MODEL_STATES if current in MODEL_STATES else MODEL_STATES + (current,)
            for state in known:
                g.add_metric([model, version, state], 1.0 if state == current else 0.0)
        yield g
