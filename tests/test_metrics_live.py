"""/metrics of a live server on loopback after a known number of successful, failed and rejected requests.

Two models: ``metrics_fast`` (Identity, tests/models.py) gives successes and INVALID_ARGUMENT failures;
``metrics_slow`` passes its input through after spinning ``max(INPUT0) * SPIN_PER_UNIT`` empty ONNX Loop
iterations, behind ``max_queue_size: 2`` and one instance. One slow request occupies the instance, two more
wait in the queue, and the next ones are rejected: deterministically, because the test waits (bounded) for
the queue-depth gauge to show each step before taking the next. Counters must be exact, histogram counts
must match, the text must parse with prometheus-client's parser, and ModelStatistics must agree.
"""
from __future__ import annotations

import concurrent.futures
import pathlib
import time
import urllib.request
from typing import Callable, Dict, Iterator, Optional, TypeVar

import numpy as np
import pytest

from .conftest import EXPLICIT, RunningServer
from .models import identity
from .test_metrics_unit import Scrape

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

T = TypeVar("T")
FAST, SLOW = "metrics_fast", "metrics_slow"
SPIN_PER_UNIT = 1_500_000  # Loop iterations per unit of max(INPUT0): about 1-3 s per 1.0 on one CPU core
REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")


# --- helpers, shared with test_prometheus_integration.py ---------------------------------------------


def scrape(url: str) -> Scrape:
    """GET /metrics and parse it (prometheus-client's parser raises on malformed text)."""
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return Scrape(r.read().decode())


def wait_for(probe: Callable[[], T], done: Callable[[T], bool], timeout_s: float, every_s: float = 0.05) -> T:
    """Calls ``probe`` until ``done`` holds or ``timeout_s`` passes; returns the last value either way.

    For state outside this process (a scrape, Prometheus), where there is no event to wait on.
    """
    deadline = time.monotonic() + timeout_s
    value = probe()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(every_s)
        value = probe()
    return value


def write_models(repo: pathlib.Path) -> None:
    identity(repo, FAST, "FP32", 8, "[ 4 ]", "dynamic_batching { }")
    spin(repo, SLOW, "dynamic_batching { default_queue_policy { max_queue_size: 2 } }\n"
                     "instance_group [ { count: 1, kind: KIND_CPU } ]")


def spin(repo: pathlib.Path, name: str, extra: str) -> None:
    """OUTPUT0 = INPUT0 (FP32 [-1, 4], max_batch_size 8) after ``max(INPUT0) * SPIN_PER_UNIT`` Loop
    iterations: a request of zeros is instant, a request of ones keeps the instance busy for a while."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    def scalar(name: str, value: object, dtype: type) -> object:
        return numpy_helper.from_array(np.array(value, dtype=dtype), name)

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "spin", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [])], [scalar("one", 1.0, np.float32)])
    nodes = [
        helper.make_node("ReduceMax", ["INPUT0"], ["mx"], keepdims=0),
        helper.make_node("Mul", ["mx", "k"], ["mk"]),
        helper.make_node("Cast", ["mk"], ["trip"], to=TensorProto.INT64),
        helper.make_node("Loop", ["trip", "true", "zero"], ["spun"], body=body),
        helper.make_node("Mul", ["spun", "zero"], ["nothing"]),  # the output depends on the loop: not pruned
        helper.make_node("Add", ["INPUT0", "nothing"], ["OUTPUT0"]),
    ]
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", 4])],
        [scalar("k", float(SPIN_PER_UNIT), np.float32), scalar("true", True, np.bool_),
         scalar("zero", 0.0, np.float32)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.onnx").write_bytes(model.SerializeToString())
    (repo / name / "config.pbtxt").write_text(f"""
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 4 ] }} ]
{extra}
""")


def infer(client, model: str, rows: int, cols: int = 4, fill: Optional[float] = None):
    """One request of ``rows`` x ``cols`` FP32; both models echo their input."""
    if fill is None:
        x = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    else:
        x = np.full((rows, cols), fill, dtype=np.float32)
    inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("OUTPUT0")], client_timeout=60)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)
    return result


def expect_error(client, model: str, rows: int, cols: int, status: str, fill: Optional[float] = None) -> None:
    with pytest.raises(InferenceServerException) as info:
        infer(client, model, rows, cols, fill)
    assert info.value.status() == f"StatusCode.{status}", info.value


def load_and_send(grpc_url: str, metrics_url: str) -> Dict[str, Dict[str, float]]:
    """The known traffic; returns what /metrics must then show, per model.

    fast: 5 successes of 1, 2, 3, 4, 1 rows (sequential: one batch each) and 3 wrong shapes.
    slow: A (ones) runs alone; B and C (zeros) wait in the queue and run as one batch of 2; 4 rejected.
    """
    client = grpcclient.InferenceServerClient(grpc_url)
    for rows in (1, 2, 3, 4, 1):
        infer(client, FAST, rows)
    for _ in range(3):
        expect_error(client, FAST, 1, 5, "INVALID_ARGUMENT")

    lab = {"model": SLOW, "version": "1"}

    def depth_series() -> list:
        return scrape(metrics_url).matching("trtserve_queue_depth", **lab)

    def depth() -> float:
        return sum(v for _, v in depth_series())

    clients = [grpcclient.InferenceServerClient(grpc_url) for _ in range(3)]  # one call in flight each
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        a = pool.submit(infer, clients[0], SLOW, 1, 4, 1.0)
        # A was queued (the depth series exists) and has left the queue for the instance.
        assert wait_for(depth_series, lambda v: bool(v) and sum(x for _, x in v) == 0, timeout_s=5)
        bc = [pool.submit(infer, c, SLOW, 1, 4, 0.0) for c in clients[1:]]
        assert wait_for(depth, lambda v: v == 2, timeout_s=5) == 2
        assert scrape(metrics_url).value("nv_inference_pending_request_count", **lab) == 2
        assert not a.done(), "the slow request finished too early: raise SPIN_PER_UNIT"
        for _ in range(4):  # queue full: UNAVAILABLE, as Triton answers; reason REJECTED
            expect_error(client, SLOW, 1, 4, "UNAVAILABLE", fill=0.0)
        for f in [a] + bc:
            f.result(timeout=60)
    return {
        FAST: {"success": 5, "OTHER": 3, "REJECTED": 0, "rows": 11, "exec": 5},
        SLOW: {"success": 3, "OTHER": 0, "REJECTED": 4, "rows": 3, "exec": 2},
    }


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server of its own (module-wide), so that its counters start at zero."""
    repo = tmp_path_factory.mktemp("metrics_repo")
    write_models(repo)
    server = RunningServer(repo)
    try:
        yield server
    finally:
        server.stop()


def test_counters_histograms_and_statistics_agree(live: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(live.url)
    fast, slow = {"model": FAST, "version": "1"}, {"model": SLOW, "version": "1"}
    before = scrape(live.metrics_url)
    for lab in (fast, slow):  # READY models export zeros at once, so rate() sees the first request
        assert before.value("nv_inference_request_success", **lab) == 0
        assert before.value("trtserve_model_state", state="READY", **lab) == 1
        assert before.value("trtserve_model_load_seconds", **lab) > 0

    expected = load_and_send(live.url, live.metrics_url)
    # request_done is reported before the response is sent; the bounded wait only guards a slow scrape.
    s = wait_for(lambda: scrape(live.metrics_url),
                 lambda m: m.value("nv_inference_request_success", **slow) == 3, timeout_s=5)
    for model, lab in ((FAST, fast), (SLOW, slow)):
        want = expected[model]
        assert s.value("nv_inference_request_success", **lab) == want["success"], model
        for reason in REASONS:
            assert s.value("nv_inference_request_failure", reason=reason, **lab) == want.get(reason, 0), reason
        assert s.value("trtserve_requests_rejected_total", **lab) == want["REJECTED"]
        assert s.value("trtserve_requests_timed_out_total", **lab) == 0
        assert s.value("nv_inference_count", **lab) == want["rows"]
        assert s.value("nv_inference_exec_count", **lab) == want["exec"]
        for h in ("request", "queue", "compute"):
            assert s.value(f"trtserve_{h}_duration_seconds_count", **lab) == want["success"], h
            assert s.value(f"trtserve_{h}_duration_seconds_bucket", le="+Inf", **lab) == want["success"], h
        assert s.value("trtserve_batch_size_count", **lab) == want["exec"]
        assert s.value("nv_inference_pending_request_count", **lab) == 0
        assert sum(v for _, v in s.matching("trtserve_queue_depth", **lab)) == 0
        assert s.value("nv_inference_request_duration_us", **lab) > 0
        check_statistics_agree(client.get_inference_statistics(model, as_json=True), s, lab)
    for le, n in {"1.0": 2, "2.0": 3, "4.0": 5, "8.0": 5, "+Inf": 5}.items():
        assert s.value("trtserve_batch_size_bucket", le=le, **fast) == n, le
    for le, n in {"1.0": 1, "2.0": 2, "+Inf": 2}.items():
        assert s.value("trtserve_batch_size_bucket", le=le, **slow) == n, le


def check_statistics_agree(stats: dict, s: Scrape, lab: Dict[str, str]) -> None:
    """ModelStatistics and /metrics come from the same events: every number they share must be equal."""
    (st,) = stats["model_stats"]
    inf = st["inference_stats"]

    def count(d: str) -> int:
        return int(inf.get(d, {}).get("count", 0))

    def us(d: str) -> float:
        return int(inf.get(d, {}).get("ns", 0)) / 1e3

    assert count("success") == s.value("nv_inference_request_success", **lab)
    assert count("fail") == sum(s.value("nv_inference_request_failure", reason=r, **lab) for r in REASONS)
    assert int(st.get("inference_count", 0)) == s.value("nv_inference_count", **lab)
    assert int(st.get("execution_count", 0)) == s.value("nv_inference_exec_count", **lab)
    assert us("success") == pytest.approx(s.value("nv_inference_request_duration_us", **lab), rel=1e-9)
    for d in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert us(d) == pytest.approx(s.value(f"nv_inference_{d}_duration_us", **lab), rel=1e-9), d
    # batch_stats (one entry per executed batch size) is the exact form of the batch-size histogram.
    per_size = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in st.get("batch_stats", [])}
    assert sum(per_size.values()) == s.value("nv_inference_exec_count", **lab)
    for labels, n in s.matching("trtserve_batch_size_bucket", **lab):
        assert n == sum(c for size, c in per_size.items() if size <= float(labels["le"])), labels


def test_exposition_parses_and_has_every_name_deploy_uses(live: RunningServer) -> None:
    """Every name the dashboard and HPA use (deploy/metrics-used.txt) is in the live output."""
    s = scrape(live.metrics_url)  # parses with prometheus-client's parser, or fails here
    used = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "metrics-used.txt"
    if not used.is_file():
        pytest.skip("deploy/metrics-used.txt is not there yet")
    names = [n.strip() for n in used.read_text().splitlines() if n.strip() and not n.startswith("#")]
    exported = s.names() | set(s.types)  # samples (x_bucket, x_count, ...) and family names
    gpu_present = any(n.startswith("nv_gpu_") for n in exported)
    missing = [n for n in names if n not in exported
               and not (n.startswith(("nv_gpu_", "nv_energy_")) and not gpu_present)]  # absent without a GPU
    assert not missing, f"deploy/metrics-used.txt names metrics the server does not export: {missing}"
    assert s.types["nv_inference_request_success"] == "counter"  # Triton's name, no _total


def test_model_state_follows_reload_and_unload(serve_repo, tmp_path: pathlib.Path) -> None:
    """trtserve_model_state agrees with the repository index through a reload in place and an unload."""
    identity(tmp_path, "metrics_state", "FP32", 8, "[ 4 ]", "dynamic_batching { }")
    server = serve_repo(tmp_path, **EXPLICIT)
    client = grpcclient.InferenceServerClient(server.url)
    lab = {"model": "metrics_state", "version": "1"}

    def shown() -> Dict[str, float]:
        return {d["state"]: v for d, v in scrape(server.metrics_url).matching("trtserve_model_state", **lab)}

    def indexed() -> str:
        (entry,) = [m for m in client.get_model_repository_index(as_json=True)["models"]
                    if m["name"] == "metrics_state"]
        return entry.get("state", "")  # proto3 JSON leaves out an empty state

    infer(client, "metrics_state", 2)
    client.load_model("metrics_state")  # a new copy of version 1, then the old one retires
    assert indexed() == "READY" and shown()["READY"] == 1
    infer(client, "metrics_state", 1)
    s = scrape(server.metrics_url)
    assert s.value("nv_inference_request_success", **lab) == 2  # the series survived the reload
    assert s.value("nv_inference_count", **lab) == 3
    client.unload_model("metrics_state")
    assert indexed() in ("UNAVAILABLE", ""), client.get_model_repository_index(as_json=True)
    assert shown() == {"LOADING": 0, "READY": 0, "UNLOADING": 0, "UNAVAILABLE": 1}
    s = scrape(server.metrics_url)
    assert s.matching("nv_inference_request_success", **lab) == []  # an unloaded version's series are gone
    assert s.matching("trtserve_batch_size_count", **lab) == []
