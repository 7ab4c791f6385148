"""Pure latency and throughput math for the load tester (no I/O, no clock), unit-tested on its own.

Percentiles are nearest-rank: the reported p99 is a latency that some request actually had, the
convention perf_analyzer and most load testers print, so the two tools can be compared directly.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = ["PERCENTILES", "LevelStats", "histogram", "nearest_rank", "percentiles", "server_view", "summarize",
           "window"]

PERCENTILES = (50.0, 90.0, 95.0, 99.0)


def nearest_rank(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 < q <= 100) of ascending values: the ceil(q/100 * n)-th smallest. NaN if empty."""
    if not 0.0 < q <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {q}")
    n = len(sorted_values)
    if n == 0:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * n - 1e-9))  # the epsilon keeps 0.99 * 100 from rounding to rank 100
    return float(sorted_values[min(rank, n) - 1])


def percentiles(values: Iterable[float], qs: Sequence[float] = PERCENTILES) -> Dict[float, float]:
    """{q: nearest-rank percentile} of unsorted ``values``."""
    ordered = sorted(values)
    return {q: nearest_rank(ordered, q) for q in qs}


def window(records: Sequence[Tuple[float, float]], start: float, end: float) -> List[float]:
    """Latencies of the (completed_at, latency) records that completed inside [start, end)."""
    return [lat for done, lat in records if start <= done < end]


def histogram(values: Sequence[float], bins: int = 50) -> Tuple[List[float], List[int]]:
    """(bin edges, counts) over [min, max] with ``bins`` equal bins; one bin when all values are equal."""
    if not values:
        return [], []
    lo, hi = min(values), max(values)
    if hi <= lo:
        return [lo, lo], [len(values)]
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    return [lo + i * width for i in range(bins + 1)], counts


@dataclass
class LevelStats:
    """What one load level measured; latencies in milliseconds, rates per second of the window."""

    mode: str  # "concurrency" or "request_rate"
    level: float  # N in flight, or requests/s asked for
    window_s: float
    batch: int
    requests: int  # successful requests completed in the window
    errors: int
    errors_by_status: Dict[str, int] = field(default_factory=dict)
    requests_per_s: float = 0.0
    rows_per_s: float = 0.0
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p95_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    mean_ms: float = math.nan
    send_lag_p99_ms: float = 0.0  # open loop: how late the generator sent (its own ceiling showing)
    # the server's own view of the same window (ModelStatistics deltas), None when it keeps none
    server_requests: Optional[int] = None
    server_latency_ms: Optional[float] = None  # mean, receipt to response, as the server counts it
    server_queue_ms: Optional[float] = None
    server_compute_ms: Optional[float] = None  # input + infer + output
    client_overhead_ms: Optional[float] = None  # mean_ms - server_latency_ms: network and client

    def as_dict(self) -> dict:
        """Plain dict for JSON (NaN becomes None, which JSON can carry)."""
        out = asdict(self)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def server_view(before: Mapping[str, Tuple[int, int]], after: Mapping[str, Tuple[int, int]]) -> Dict[str, float]:
    """Means in ms from two ModelStatistics snapshots ({field: (count, ns)}); fields without requests are left out."""
    out: Dict[str, float] = {}

    def mean_ms(name: str) -> Optional[float]:
        c0, n0 = before.get(name, (0, 0))
        c1, n1 = after.get(name, (0, 0))
        return (n1 - n0) / (c1 - c0) / 1e6 if c1 > c0 else None

    success = mean_ms("success")
    out["server_requests"] = after.get("success", (0, 0))[0] - before.get("success", (0, 0))[0]
    if success is not None:
        out["server_latency_ms"] = success
    queue = mean_ms("queue")
    if queue is not None:
        out["server_queue_ms"] = queue
    parts = [mean_ms(f) for f in ("compute_input", "compute_infer", "compute_output")]
    if any(p is not None for p in parts):
        out["server_compute_ms"] = sum(p for p in parts if p is not None)
    return out


def summarize(mode: str, level: float, window_s: float, batch: int, latencies_s: Sequence[float],
              errors_by_status: Optional[Mapping[str, int]] = None,
              send_lags_s: Sequence[float] = (), server: Optional[Mapping[str, float]] = None) -> LevelStats:
    """LevelStats from the successful latencies (seconds) and error counts of one measurement window."""
    if window_s <= 0:
        raise ValueError(f"window must be positive, got {window_s}")
    errs = dict(sorted((errors_by_status or {}).items()))
    ordered = sorted(latencies_s)
    n = len(ordered)
    stats = LevelStats(mode=mode, level=level, window_s=window_s, batch=batch, requests=n,
                       errors=sum(errs.values()), errors_by_status=errs,
                       requests_per_s=n / window_s, rows_per_s=n * batch / window_s)
    if n:
        stats.p50_ms, stats.p90_ms, stats.p95_ms, stats.p99_ms = (nearest_rank(ordered, q) * 1e3 for q in PERCENTILES)
        stats.max_ms = ordered[-1] * 1e3
        stats.mean_ms = sum(ordered) / n * 1e3
    if send_lags_s:
        stats.send_lag_p99_ms = nearest_rank(sorted(send_lags_s), 99.0) * 1e3
    if server:
        stats.server_requests = int(server.get("server_requests", 0))
        stats.server_latency_ms = server.get("server_latency_ms")
        stats.server_queue_ms = server.get("server_queue_ms")
        stats.server_compute_ms = server.get("server_compute_ms")
        if stats.server_latency_ms is not None and n:
            stats.client_overhead_ms = stats.mean_ms - stats.server_latency_ms
    return stats
