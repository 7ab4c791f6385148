"""Writes a BenchResult as a table, CSV, JSON and a PNG (latency-throughput curve + histogram).

matplotlib is imported only when a plot is asked for, and through its object API with the Agg
canvas, so plotting neither needs a display nor changes the caller's pyplot backend.
"""
from __future__ import annotations

import csv
import json
from typing import List, Sequence

from trtserve.client.bench.runner import BenchResult
from trtserve.client.bench.stats import LevelStats

__all__ = ["CSV_FIELDS", "format_table", "write_csv", "write_json", "write_plot"]

CSV_FIELDS = ("mode", "level", "batch", "window_s", "requests", "errors", "requests_per_s", "rows_per_s",
              "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms", "send_lag_p99_ms", "errors_by_status",
              "server_requests", "server_latency_ms", "server_queue_ms", "server_compute_ms", "client_overhead_ms")


def _row(s: LevelStats) -> List[object]:
    d = s.as_dict()
    d["errors_by_status"] = ";".join(f"{k}:{v}" for k, v in s.errors_by_status.items())
    return ["" if d[k] is None else d[k] for k in CSV_FIELDS]


def format_table(result: BenchResult) -> str:
    """A fixed-width table, one line per level, for the terminal."""
    head = f"{'level':>10} {'req/s':>10} {'rows/s':>10} {'p50 ms':>9} {'p90 ms':>9} {'p95 ms':>9} " \
           f"{'p99 ms':>9} {'max ms':>9} {'errors':>7} {'server ms':>9}"
    lines = [f"model {result.config.model}  target {result.target}  batch {result.batch}  "
             f"channels {result.channels}  window {result.config.duration_s:g}s", head]
    for s in result.levels:
        level = f"{int(s.level)}" if s.mode == "concurrency" else f"{s.level:g}/s"
        lines.append(f"{level:>10} {s.requests_per_s:10.1f} {s.rows_per_s:10.1f} {s.p50_ms:9.3f} {s.p90_ms:9.3f} "
                     f"{s.p95_ms:9.3f} {s.p99_ms:9.3f} {s.max_ms:9.3f} {s.errors:7d} "
                     f"{'-' if s.server_latency_ms is None else format(s.server_latency_ms, '.3f'):>9}")
    return "\n".join(lines)


def write_csv(result: BenchResult, path: str) -> None:
    """One row per level with CSV_FIELDS as the header."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for s in result.levels:
            w.writerow(_row(s))


def write_json(result: BenchResult, path: str) -> None:
    """The run description and every level's statistics (NaN written as null)."""
    with open(path, "w") as f:
        json.dump(result.as_dict(), f, indent=2)
        f.write("\n")


def _ms(values: Sequence[float]) -> List[float]:
    return [v * 1e3 for v in values]


def write_plot(result: BenchResult, path: str) -> None:
    """PNG: left, p50/p90/p99 latency against achieved throughput per level; right, latency histograms."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'trtserve[plot]'") from None
    fig = Figure(figsize=(12, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    levels = [s for s in result.levels if s.requests]
    xs = [s.requests_per_s for s in levels]
    for attr, style in (("p50_ms", "o-"), ("p90_ms", "s--"), ("p99_ms", "^-")):
        left.plot(xs, [getattr(s, attr) for s in levels], style, label=attr.replace("_ms", ""))
    for s in levels:
        tag = f"c={int(s.level)}" if s.mode == "concurrency" else f"{s.level:g}/s"
        left.annotate(tag, (s.requests_per_s, s.p50_ms), textcoords="offset points", xytext=(4, -12), fontsize=8)
    left.set_xlabel("throughput (requests/s)")
    left.set_ylabel("latency (ms)")
    left.set_title(f"{result.config.model}: latency vs throughput (batch {result.batch})")
    left.grid(True, alpha=0.3)
    left.legend()
    all_ms = [v for lats in result.latencies_s.values() for v in _ms(lats)]
    if all_ms:
        lo, hi = min(all_ms), max(all_ms)
        bins = [lo + (hi - lo) * i / 60 for i in range(61)] if hi > lo else 10
        for s in levels:
            lats = _ms(result.latencies_s.get(s.level, []))
            tag = f"concurrency {int(s.level)}" if s.mode == "concurrency" else f"rate {s.level:g}/s"
            right.hist(lats, bins=bins, histtype="step", label=tag)
        right.set_yscale("log")
    right.set_xlabel("latency (ms)")
    right.set_ylabel("requests")
    right.set_title("latency histogram per level")
    right.grid(True, alpha=0.3)
    if levels:
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
