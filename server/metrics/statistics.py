"""Per-model-version counters behind the ModelStatistics RPC (Triton's semantics).

It is an Observer fed by the same events as the Prometheus observer, so the RPC and /metrics agree.
Triton's meanings: ``success``/``fail`` count requests and their end-to-end ns; ``queue`` and
``compute_*`` sum over successful requests; ``inference_count`` is rows, ``execution_count`` batches;
``batch_stats`` has one entry per executed batch size.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Dict, List, Sequence, Tuple

from trtserve.server.events import Done, Observer


@dataclasses.dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(0, int(ns))

    def add_many(self, count: int, ns: int) -> None:
        """``count`` durations summing to ``ns`` (each already clamped at 0)."""
        self.count += count
        self.ns += ns


@dataclasses.dataclass
class BatchStats:
    compute_input: Duration = dataclasses.field(default_factory=Duration)
    compute_infer: Duration = dataclasses.field(default_factory=Duration)
    compute_output: Duration = dataclasses.field(default_factory=Duration)


@dataclasses.dataclass
class VersionStats:
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = dataclasses.field(default_factory=Duration)
    fail: Duration = dataclasses.field(default_factory=Duration)
    queue: Duration = dataclasses.field(default_factory=Duration)
    compute_input: Duration = dataclasses.field(default_factory=Duration)
    compute_infer: Duration = dataclasses.field(default_factory=Duration)
    compute_output: Duration = dataclasses.field(default_factory=Duration)
    batches: Dict[int, BatchStats] = dataclasses.field(default_factory=dict)


class Statistics(Observer):
    """Thread-safe (events may come from instance threads in future backends)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: Dict[Tuple[str, str], VersionStats] = {}

    def _get(self, model: str, version: str) -> VersionStats:
        key = (model, version)
        if key not in self._stats:
            self._stats[key] = VersionStats()
        return self._stats[key]

    def request_done(self, model: str, version: str, ok: bool, reason: str, rows: int, request_ns: int,
                     queue_ns: int, compute_input_ns: int, compute_infer_ns: int, compute_output_ns: int) -> None:
        if ok:
            self.requests_done(model, version, ((rows, request_ns, queue_ns, compute_input_ns, compute_infer_ns,
                                                 compute_output_ns),))
            return
        with self._lock:
            self._get(model, version).fail.add(request_ns)

    def requests_done(self, model: str, version: str, done: Sequence[Done]) -> None:
        n = len(done)
        if not n:
            return
        rows = req = queue = cin = cinfer = cout = 0
        for r, a, b, c, d, e in done:  # clamped at 0 as Duration.add does
            rows += r
            req += a if a > 0 else 0
            queue += b if b > 0 else 0
            cin += c if c > 0 else 0
            cinfer += d if d > 0 else 0
            cout += e if e > 0 else 0
        with self._lock:
            s = self._get(model, version)
            s.success.add_many(n, int(req))
            s.queue.add_many(n, int(queue))
            s.compute_input.add_many(n, int(cin))
            s.compute_infer.add_many(n, int(cinfer))
            s.compute_output.add_many(n, int(cout))
            s.inference_count += rows
            s.last_inference_ms = int(time.time() * 1000)

    def batch_done(self, model: str, version: str, batch_size: int, requests: int, compute_input_ns: int,
                   compute_infer_ns: int, compute_output_ns: int, ok: bool) -> None:
        if not ok:
            return
        with self._lock:
            s = self._get(model, version)
            s.execution_count += 1
            b = s.batches.setdefault(batch_size, BatchStats())
            b.compute_input.add(compute_input_ns)
            b.compute_infer.add(compute_infer_ns)
            b.compute_output.add(compute_output_ns)

    def snapshot(self, model: str, version: str) -> VersionStats:
        """A copy, so the RPC encodes a consistent view."""
        with self._lock:
            s = self._get(model, version)
            return dataclasses.replace(
                s, success=dataclasses.replace(s.success), fail=dataclasses.replace(s.fail),
                queue=dataclasses.replace(s.queue), compute_input=dataclasses.replace(s.compute_input),
                compute_infer=dataclasses.replace(s.compute_infer),
                compute_output=dataclasses.replace(s.compute_output),
                batches={k: BatchStats(dataclasses.replace(v.compute_input), dataclasses.replace(v.compute_infer),
                                       dataclasses.replace(v.compute_output)) for k, v in s.batches.items()})

    def versions(self) -> List[Tuple[str, str]]:
        with self._lock:
            return sorted(self._stats)
