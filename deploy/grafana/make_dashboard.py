#!/usr/bin/env python3
"""Generates deploy/grafana/dashboards/trtserve.json, the Grafana dashboard for trtserve.

The JSON is committed; edit this script and run it (``python deploy/grafana/make_dashboard.py``)
rather than editing the JSON by hand. tests/test_deploy.py checks that the two agree and that
every PromQL expression names only metrics listed in deploy/metrics-used.txt.
"""
import json
import pathlib
import sys
from typing import Any, Dict, List, Optional, Tuple

OUT = pathlib.Path(__file__).resolve().parent / "dashboards" / "trtserve.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'model=~"$model",instance=~"$instance"'
GPU_SEL = 'instance=~"$instance"'
RI = "$__rate_interval"

Target = Tuple[str, str]  # (PromQL, legend)


class Layout:
    """Places panels on Grafana's 24-column grid, left to right, top to bottom."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1

    def place(self, w: int, h: int) -> Dict[str, int]:
        """Grid position for a panel of width w and height h."""
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def new_id(self) -> int:
        """A fresh panel id."""
        pid = self.next_id
        self.next_id += 1
        return pid


def row(lay: Layout, title: str) -> Dict[str, Any]:
    """A collapsible row header across the full width."""
    if lay.x:
        lay.x, lay.y, lay.row_h = 0, lay.y + lay.row_h, 0
    pos = lay.place(24, 1)
    lay.x, lay.y, lay.row_h = 0, lay.y + 1, 0
    return {"type": "row", "id": lay.new_id(), "title": title, "collapsed": False, "gridPos": pos, "panels": []}


def targets(items: List[Target], fmt: str = "time_series") -> List[Dict[str, Any]]:
    """Grafana query targets, refIds A, B, C..."""
    out = []
    for i, (expr, legend) in enumerate(items):
        out.append({"datasource": DS, "refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
                    "range": True, "format": fmt})
    return out


def timeseries(lay: Layout, title: str, desc: str, items: List[Target], unit: str, w: int = 12, h: int = 8,
               stack: bool = False, min_zero: bool = True) -> Dict[str, Any]:
    """A time-series panel."""
    defaults: Dict[str, Any] = {
        "unit": unit,
        "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                   "stacking": {"mode": "normal" if stack else "none", "group": "A"}},
    }
    if min_zero:
        defaults["min"] = 0
    return {
        "type": "timeseries", "id": lay.new_id(), "title": title, "description": desc, "datasource": DS,
        "gridPos": lay.place(w, h), "targets": targets(items),
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def stat(lay: Layout, title: str, desc: str, expr: str, unit: str, w: int = 6, h: int = 4,
         thresholds: Optional[List[Tuple[Optional[float], str]]] = None) -> Dict[str, Any]:
    """A single-value stat panel."""
    steps = [{"value": v, "color": c} for v, c in (thresholds or [(None, "green")])]
    return {
        "type": "stat", "id": lay.new_id(), "title": title, "description": desc, "datasource": DS,
        "gridPos": lay.place(w, h), "targets": targets([(expr, "")]),
        "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto"},
    }


def heatmap(lay: Layout, title: str, desc: str, expr: str, w: int = 12, h: int = 8) -> Dict[str, Any]:
    """A heatmap of a histogram's per-interval bucket counts."""
    return {
        "type": "heatmap", "id": lay.new_id(), "title": title, "description": desc, "datasource": DS,
        "gridPos": lay.place(w, h), "targets": targets([(expr, "{{le}}")], fmt="heatmap"),
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"calculate": False, "yAxis": {"axisPlacement": "left"}, "cellGap": 1,
                    "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
                    "tooltip": {"mode": "single", "yHistogram": True}},
    }


def quantiles(metric: str, qs: Tuple[float, ...], by: str = "model") -> List[Target]:
    """histogram_quantile targets over a *_bucket series, one per quantile."""
    items = []
    for q in qs:
        expr = "histogram_quantile(%g, sum by (le, %s) (rate(%s{%s}[%s])))" % (q, by, metric, SEL, RI)
        items.append((expr, "{{%s}} p%g" % (by, q * 100)))
    return items


def panels() -> List[Dict[str, Any]]:
    """All panels, in order."""
    lay = Layout()
    out: List[Dict[str, Any]] = []

    out.append(row(lay, "Traffic"))
    out.append(stat(lay, "Requests/s", "Successful requests per second (a batched request counts once).",
                    "sum(rate(nv_inference_request_success{%s}[%s]))" % (SEL, RI), "reqps"))
    out.append(stat(lay, "Inferences/s", "Inferences per second: a request of batch n counts n.",
                    "sum(rate(nv_inference_count{%s}[%s]))" % (SEL, RI), "short"))
    out.append(stat(lay, "Failure ratio", "Failed / all requests over the interval.",
                    "sum(rate(nv_inference_request_failure{%s}[%s])) / (sum(rate(nv_inference_request_success{%s}[%s]))"
                    " + sum(rate(nv_inference_request_failure{%s}[%s])))" % (SEL, RI, SEL, RI, SEL, RI),
                    "percentunit", thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")]))
    out.append(stat(lay, "Pending requests", "Requests queued and not yet executing, all servers.",
                    "sum(nv_inference_pending_request_count{%s})" % SEL, "short",
                    thresholds=[(None, "green"), (32, "orange"), (64, "red")]))
    out.append(timeseries(lay, "Throughput by model",
                          "rate(nv_inference_request_success) requests/s and rate(nv_inference_count) inferences/s.",
                          [("sum by (model) (rate(nv_inference_request_success{%s}[%s]))" % (SEL, RI),
                            "{{model}} requests/s"),
                           ("sum by (model) (rate(nv_inference_count{%s}[%s]))" % (SEL, RI),
                            "{{model}} inferences/s")], "short"))
    out.append(timeseries(lay, "Failures by reason",
                          "rate(nv_inference_request_failure) by reason: REJECTED (queue timeout/full), "
                          "CANCELED, BACKEND (execution error), OTHER.",
                          [("sum by (model, reason) (rate(nv_inference_request_failure{%s}[%s]))" % (SEL, RI),
                            "{{model}} {{reason}}")], "reqps", stack=True))
    out.append(timeseries(lay, "Rejected and timed-out requests",
                          "trtserve_requests_rejected_total (queue full) and trtserve_requests_timed_out_total "
                          "(queue timeout) per second.",
                          [("sum by (model) (rate(trtserve_requests_rejected_total{%s}[%s]))" % (SEL, RI),
                            "{{model}} rejected"),
                           ("sum by (model) (rate(trtserve_requests_timed_out_total{%s}[%s]))" % (SEL, RI),
                            "{{model}} timed out")], "reqps"))
    out.append(timeseries(lay, "Model state",
                          "1 while a model version is in the state (trtserve_model_state), and its last load time "
                          "in seconds (trtserve_model_load_seconds).",
                          [('max by (model, version, state) (trtserve_model_state{%s} == 1)' % SEL,
                            "{{model}} v{{version}} {{state}}"),
                           ("max by (model, version) (trtserve_model_load_seconds{%s})" % SEL,
                            "{{model}} v{{version}} load s")], "short"))
    out.append(timeseries(lay, "Front-end processes started again",
                          "trtserve_frontend_starts_total by reason, starts with the server left out: restart (one "
                          "died), watchdog (its event loop stopped and the supervisor killed it), replacement (one "
                          "passed --frontend-max-memory-mib). Each restart or watchdog kill failed that front end's "
                          "requests in flight.",
                          [('sum by (instance, reason) (increase(trtserve_frontend_starts_total{%s,reason!="start"}'
                            '[%s]))' % (GPU_SEL, RI), "{{instance}} {{reason}}")], "short", stack=True))
    out.append(timeseries(lay, "Throughput by server",
                          "Requests/s per trtserve instance: shows how evenly clients spread the load.",
                          [("sum by (instance) (rate(nv_inference_request_success{%s}[%s]))" % (SEL, RI),
                            "{{instance}}")], "reqps", stack=True))

    out.append(row(lay, "Latency"))
    out.append(timeseries(lay, "Request latency p50 / p95 / p99",
                          "End-to-end time in the server, from histogram_quantile over "
                          "trtserve_request_duration_seconds.",
                          quantiles("trtserve_request_duration_seconds_bucket", (0.5, 0.95, 0.99)), "s"))
    out.append(timeseries(lay, "Queue time p50 / p99",
                          "Time from arrival to the start of execution (batching delay included), from "
                          "trtserve_queue_duration_seconds.",
                          quantiles("trtserve_queue_duration_seconds_bucket", (0.5, 0.99)), "s"))
    out.append(timeseries(lay, "Compute time p50 / p99",
                          "Compute time (input + infer + output) of the batch that served each request, from "
                          "trtserve_compute_duration_seconds.",
                          quantiles("trtserve_compute_duration_seconds_bucket", (0.5, 0.99)), "s"))
    out.append(timeseries(lay, "Queue share of latency",
                          "Fraction of end-to-end time spent waiting in the queue (Triton counters).",
                          [("sum by (model) (rate(nv_inference_queue_duration_us{%s}[%s])) / sum by (model) "
                            "(rate(nv_inference_request_duration_us{%s}[%s]))" % (SEL, RI, SEL, RI), "{{model}}")],
                          "percentunit"))
    out.append(timeseries(lay, "Average time per request by phase (Triton counters)",
                          "Cumulative microsecond counters divided by successful requests, as Triton users chart "
                          "them: request, queue, compute input/infer/output.",
                          [("sum by (model) (rate(nv_inference_request_duration_us{%s}[%s])) / sum by (model) "
                            "(rate(nv_inference_request_success{%s}[%s]))" % (SEL, RI, SEL, RI), "{{model}} request"),
                           ("sum by (model) (rate(nv_inference_queue_duration_us{%s}[%s])) / sum by (model) "
                            "(rate(nv_inference_request_success{%s}[%s]))" % (SEL, RI, SEL, RI), "{{model}} queue"),
                           ("sum by (model) (rate(nv_inference_compute_input_duration_us{%s}[%s])) / sum by (model) "
                            "(rate(nv_inference_request_success{%s}[%s]))" % (SEL, RI, SEL, RI),
                            "{{model}} compute input"),
                           ("sum by (model) (rate(nv_inference_compute_infer_duration_us{%s}[%s])) / sum by (model) "
                            "(rate(nv_inference_request_success{%s}[%s]))" % (SEL, RI, SEL, RI),
                            "{{model}} compute infer"),
                           ("sum by (model) (rate(nv_inference_compute_output_duration_us{%s}[%s])) / sum by (model) "
                            "(rate(nv_inference_request_success{%s}[%s]))" % (SEL, RI, SEL, RI),
                            "{{model}} compute output")], "µs", w=24))
    out.append(heatmap(lay, "Request latency distribution",
                       "Per-interval counts of trtserve_request_duration_seconds buckets.",
                       "sum by (le) (increase(trtserve_request_duration_seconds_bucket{%s}[%s]))" % (SEL, RI), w=24))

    out.append(row(lay, "Queue and batching"))
    out.append(timeseries(lay, "Queue depth per server",
                          "nv_inference_pending_request_count: requests enqueued but not yet started. "
                          "The HorizontalPodAutoscaler scales on its per-pod average.",
                          [("sum by (instance, model) (nv_inference_pending_request_count{%s})" % SEL,
                            "{{instance}} {{model}}")], "short"))
    out.append(timeseries(lay, "Queue depth by priority",
                          "trtserve_queue_depth per priority level of the dynamic batcher.",
                          [("sum by (model, priority) (trtserve_queue_depth{%s})" % SEL,
                            "{{model}} priority {{priority}}")], "short", stack=True))
    out.append(timeseries(lay, "Formed batch size",
                          "Average = inferences / executions (Triton's nv_inference_count / nv_inference_exec_count); "
                          "p50 and p95 from the trtserve_batch_size histogram.",
                          [("sum by (model) (rate(nv_inference_count{%s}[%s])) / sum by (model) "
                            "(rate(nv_inference_exec_count{%s}[%s]))" % (SEL, RI, SEL, RI), "{{model}} average")]
                          + quantiles("trtserve_batch_size_bucket", (0.5, 0.95)), "short"))
    out.append(heatmap(lay, "Formed batch size distribution",
                       "Per-interval counts of trtserve_batch_size buckets: how full the batches are.",
                       "sum by (le) (increase(trtserve_batch_size_bucket{%s}[%s]))" % (SEL, RI)))

    out.append(row(lay, "GPU"))
    out.append(timeseries(lay, "GPU utilization", "nv_gpu_utilization (0-1) per GPU; absent on CPU-only servers.",
                          [("nv_gpu_utilization{%s}" % GPU_SEL, "{{instance}} {{gpu_uuid}}")], "percentunit", w=8))
    out.append(timeseries(lay, "GPU memory", "nv_gpu_memory_used_bytes against nv_gpu_memory_total_bytes per GPU.",
                          [("nv_gpu_memory_used_bytes{%s}" % GPU_SEL, "{{instance}} {{gpu_uuid}} used"),
                           ("nv_gpu_memory_total_bytes{%s}" % GPU_SEL, "{{instance}} {{gpu_uuid}} total")],
                          "bytes", w=8))
    out.append(timeseries(lay, "GPU power", "nv_gpu_power_usage in watts per GPU.",
                          [("nv_gpu_power_usage{%s}" % GPU_SEL, "{{instance}} {{gpu_uuid}}")], "watt", w=8))
    return out


def templating() -> Dict[str, Any]:
    """Dashboard variables: data source, model and instance."""
    return {"list": [
        {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
         "current": {"text": "Prometheus", "value": "prometheus"}, "hide": 0, "refresh": 1, "options": []},
        {"type": "query", "name": "model", "label": "Model", "datasource": DS,
         "definition": "label_values(nv_inference_request_success, model)",
         "query": {"query": "label_values(nv_inference_request_success, model)", "refId": "model"},
         "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2, "sort": 1,
         "current": {"text": "All", "value": "$__all"}, "options": []},
        {"type": "query", "name": "instance", "label": "Server", "datasource": DS,
         "definition": 'label_values(nv_inference_request_success{model=~"$model"}, instance)',
         "query": {"query": 'label_values(nv_inference_request_success{model=~"$model"}, instance)',
                   "refId": "instance"},
         "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2, "sort": 1,
         "current": {"text": "All", "value": "$__all"}, "options": []},
    ]}


def dashboard() -> Dict[str, Any]:
    """The whole dashboard model."""
    return {
        "uid": "trtserve-overview",
        "title": "trtserve",
        "description": "Throughput, latency percentiles, queue depth, formed batch size, failures and GPU for trtserve "
                       "(Triton-compatible metrics).",
        "tags": ["trtserve", "triton", "inference"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "schemaVersion": 39,
        "version": 1,
        "templating": templating(),
        "annotations": {"list": []},
        "links": [],
        "panels": panels(),
    }


def render() -> str:
    """The dashboard as the JSON text that is committed."""
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    """Write the JSON (or, with --check, exit 1 when the committed file is stale)."""
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in args:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if current != text:
            print("%s is stale: run %s" % (OUT, pathlib.Path(__file__).name), file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print("wrote %s" % OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
