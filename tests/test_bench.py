"""The load tester end to end: on the real server's ``mlp`` (short runs; fields and files, not speed),
on stand-in servers for error counting and open-loop lateness, and the ceiling entry point."""
from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys

import grpc
import numpy as np
import pytest

from trtserve.client.bench import report
from trtserve.client.bench.ceiling import SERVICE, _config, _metadata, start_trivial_server
from trtserve.client.bench.runner import BenchConfig, run
from trtserve.client.cli import main as client_main
from trtserve.protos import grpc_service_pb2 as pb

LEVEL_FIELDS = {"mode", "level", "window_s", "batch", "requests", "errors", "errors_by_status", "requests_per_s",
                "rows_per_s", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms", "send_lag_p99_ms",
                "server_requests", "server_latency_ms", "server_queue_ms", "server_compute_ms", "client_overhead_ms"}


def _png_shape(path) -> tuple:
    from matplotlib.image import imread

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return imread(str(path)).shape


def test_bench_closed_loop_on_mlp_writes_csv_json_png(example_server, tmp_path, capsys):
    out = {k: tmp_path / f"b.{k}" for k in ("csv", "json", "png")}
    code = client_main(["bench", "--url", example_server.url, "-m", "mlp", "--concurrency", "1,4", "--duration", "0.6",
                        "--warmup", "0.2", "--batch", "2", "--csv", str(out["csv"]), "--json", str(out["json"]),
                        "--plot", str(out["png"])])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "concurrency 1:" in captured.err and "concurrency 4:" in captured.err  # progress/summary on stderr
    table = captured.out.splitlines()
    assert table[1].split()[:3] == ["level", "req/s", "rows/s"] and table[1].endswith("server ms")
    assert len(table) == 4

    with open(out["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == report.CSV_FIELDS
    assert [(r["mode"], r["level"], r["batch"]) for r in rows] == [("concurrency", "1", "2"), ("concurrency", "4", "2")]
    for r in rows:
        assert int(r["requests"]) > 0 and r["errors"] == "0" and r["errors_by_status"] == ""
        assert float(r["rows_per_s"]) == pytest.approx(2 * float(r["requests_per_s"]))
        p = [float(r[k]) for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms")]
        assert 0 < p[0] <= p[1] <= p[2] <= p[3] <= p[4]
        # the server's ModelStatistics over the same window: same requests (give or take the edges)
        assert abs(int(r["server_requests"]) - int(r["requests"])) <= 8
        assert 0 < float(r["server_latency_ms"]) <= float(r["mean_ms"])
        assert float(r["client_overhead_ms"]) == pytest.approx(float(r["mean_ms"]) - float(r["server_latency_ms"]))

    doc = json.loads(out["json"].read_text())
    assert (doc["model"], doc["mode"], doc["batch"], doc["url"]) == ("mlp", "concurrency", 2, example_server.url)
    assert doc["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 64]}]
    assert doc["generator"]["channels"] == 1 and doc["generator"]["engine"] == "auto"
    assert doc["generator"]["transport"] == "h2"  # one HOST:PORT: the generator's own HTTP/2 client
    assert doc["generator"]["engine_per_level"] == ["threads", "threads"]  # levels 1 and 4: the blocking stub
    assert [lv["level"] for lv in doc["levels"]] == [1, 4] and set(doc["levels"][0]) == LEVEL_FIELDS
    assert doc["levels"][1]["requests"] == int(rows[1]["requests"])

    h, w, _ = _png_shape(out["png"])
    assert (w, h) == (1200, 480)


@pytest.mark.parametrize("engine", ["asyncio", "threads"])
async def test_bench_open_loop_on_mlp(example_server, engine):
    result = await run(BenchConfig(url=example_server.url, model="mlp", request_rate=[50.0, 150.0], duration_s=0.8,
                                   warmup_s=0.2, input_data="zero", seed=3, engine=engine))
    assert [s.mode for s in result.levels] == ["request_rate", "request_rate"]
    for stats, rate in zip(result.levels, (50.0, 150.0)):
        assert stats.errors == 0 and stats.requests > 0
        assert stats.requests_per_s == pytest.approx(rate, rel=0.6)  # Poisson over 0.8 s: loose on purpose
        assert stats.p50_ms <= stats.p99_ms <= stats.max_ms
        assert len(result.latencies_s[rate]) == stats.requests


async def test_auto_sweep_runs_each_level_on_its_engine(example_server):
    result = await run(BenchConfig(url=example_server.url, model="mlp", concurrency=[1, 8], duration_s=0.6,
                                   warmup_s=0.2, input_data="zero"))
    assert result.as_dict()["generator"]["engine_per_level"] == ["threads", "asyncio"]
    for stats in result.levels:
        assert stats.errors == 0 and stats.requests > 0 and stats.server_requests is not None
        # Both windows line up with the server's view. Each edge may differ by the calls in flight at it and by
        # those finishing while the statistics call travels; a window misplaced by the warm-up would be off by
        # about a third of the level's requests.
        assert abs(stats.server_requests - stats.requests) <= 2 * stats.level + 0.03 * stats.requests


async def test_bench_input_file_and_shape_rules(example_server, tmp_path):
    np.savez(tmp_path / "in.npz", INPUT0=np.ones((3, 64), np.float32))
    result = await run(BenchConfig(url=example_server.url, model="mlp", concurrency=[2], duration_s=0.3,
                                   warmup_s=0.0, input_data=str(tmp_path / "in.npz")))
    assert result.batch == 3 and result.inputs == [("INPUT0", "FP32", (3, 64))] and result.levels[0].errors == 0
    with pytest.raises(ValueError, match="exceeds"):
        await run(BenchConfig(url=example_server.url, model="mlp", concurrency=[1], batch=64))
    with pytest.raises(ValueError, match="exactly one"):
        await run(BenchConfig(url=example_server.url, model="mlp"))


async def test_bench_in_several_processes(example_server):
    """Two generator processes share each level; their records merge into one window."""
    result = await run(BenchConfig(url=example_server.url, model="mlp", concurrency=[1, 4], request_rate=[],
                                   duration_s=0.5, warmup_s=0.2, processes=2))
    assert [s.level for s in result.levels] == [1, 4] and all(s.requests > 0 and s.errors == 0 for s in result.levels)
    assert result.as_dict()["generator"]["processes"] == 2 and result.channels == 2
    rated = await run(BenchConfig(url=example_server.url, model="mlp", request_rate=[100.0], duration_s=0.8,
                                  warmup_s=0.1, processes=2))
    assert rated.levels[0].errors == 0 and rated.levels[0].requests_per_s == pytest.approx(100, rel=0.6)
    with pytest.raises(ValueError, match="asyncio engine"):
        await run(BenchConfig(url=example_server.url, model="mlp", concurrency=[1], processes=2, engine="threads"))


def test_split_shares():
    from trtserve.client.bench.procs import split

    assert split(5, 2, integer=True) == [3, 2] and split(1, 3, integer=True) == [1, 0, 0]
    assert split(300.0, 3, integer=False) == [100.0, 100.0, 100.0]


def test_bench_cli_errors(example_server, capsys):
    assert client_main(["bench", "--url", example_server.url, "-m", "nope", "--duration", "0.2"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert client_main(["bench", "--url", example_server.url, "-m", "mlp", "--shape", "INPUT0:65"]) == 2
    assert "does not match" in capsys.readouterr().err


async def test_bench_with_system_shared_memory(example_server):
    from trtserve.client import AsyncInferenceClient

    from .mp import dev_shm

    async with AsyncInferenceClient(example_server.url) as c:
        if "system_shared_memory" not in (await c.server_metadata()).extensions:
            pytest.skip("server does not offer system shared memory")
    before = dev_shm()  # less the regions of other tests' clients, which may run beside this one
    result = await run(BenchConfig(url=example_server.url, model="mlp", concurrency=[2], duration_s=0.4,
                                   warmup_s=0.1, batch=4, shared_memory="system"))
    stats = result.levels[0]
    assert stats.errors == 0 and stats.requests > 0 and stats.rows_per_s == pytest.approx(4 * stats.requests_per_s)
    assert result.as_dict()["shared_memory"] == "system"
    assert not {n for n in dev_shm() - before if n.startswith("trtserve_")}  # regions unregistered and unlinked
    async with AsyncInferenceClient(example_server.url) as c:
        from trtserve.client import shm

        assert not (await shm.status(c)).regions


def _failing_every_other_handler() -> grpc.GenericRpcHandler:
    """ModelInfer alternates success and RESOURCE_EXHAUSTED; metadata/config as the trivial model."""
    calls = {"n": 0}  # per-server state, owned by this handler

    async def infer(request: bytes, context):
        calls["n"] += 1
        if calls["n"] % 2:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        response = pb.ModelInferResponse(model_name="trivial")
        return response.SerializeToString()

    async def metadata(request, context):
        return _metadata()

    async def config(request, context):
        return pb.ModelConfigResponse(config=_config())

    def unary(fn, req_type):
        return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=req_type.FromString,
                                                   response_serializer=lambda m: m.SerializeToString())

    return grpc.method_handlers_generic_handler(SERVICE, {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
        "ModelMetadata": unary(metadata, pb.ModelMetadataRequest),
        "ModelConfig": unary(config, pb.ModelConfigRequest),
    })


@pytest.mark.parametrize("engine", ["asyncio", "threads"])
async def test_errors_are_counted_by_status(tmp_path, engine):
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_failing_every_other_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        result = await run(BenchConfig(url=f"127.0.0.1:{port}", model="trivial", concurrency=[4], duration_s=0.4,
                                       warmup_s=0.1, engine=engine))
    finally:
        await server.stop(0)
    stats = result.levels[0]
    assert set(stats.errors_by_status) == {"RESOURCE_EXHAUSTED"} and stats.errors > 0 and stats.requests > 0
    assert abs(stats.errors - stats.requests) <= 8  # every other call fails
    report.write_csv(result, str(tmp_path / "e.csv"))
    with open(tmp_path / "e.csv") as f:
        row = next(csv.DictReader(f))
    assert row["errors_by_status"] == f"RESOURCE_EXHAUSTED:{stats.errors}"


def _slow_handler(delay_s: float) -> grpc.GenericRpcHandler:
    """One request at a time, each taking ``delay_s``: a server that cannot keep up with the offered rate."""
    lock = asyncio.Lock()

    async def infer(request: bytes, context):
        async with lock:
            await asyncio.sleep(delay_s)
        return pb.ModelInferResponse(model_name="trivial").SerializeToString()

    async def metadata(request, context):
        return _metadata()

    async def config(request, context):
        return pb.ModelConfigResponse(config=_config())

    def unary(fn, req_type):
        return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=req_type.FromString,
                                                   response_serializer=lambda m: m.SerializeToString())

    return grpc.method_handlers_generic_handler(SERVICE, {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
        "ModelMetadata": unary(metadata, pb.ModelMetadataRequest),
        "ModelConfig": unary(config, pb.ModelConfigRequest),
    })


@pytest.mark.parametrize("engine", ["asyncio", "threads"])
async def test_open_loop_latency_counts_queueing_from_the_scheduled_time(engine):
    """Offered 200/s to a server doing 50/s: latency grows with the backlog instead of hiding it."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_slow_handler(0.02),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        result = await run(BenchConfig(url=f"127.0.0.1:{port}", model="trivial", request_rate=[200.0],
                                       duration_s=1.0, warmup_s=0.0, seed=1, engine=engine))
    finally:
        await server.stop(0)
    stats = result.levels[0]
    assert stats.errors == 0
    # ~200 requests at 20 ms each take ~4 s; the last one waited ~3 s behind the others
    assert 25 < stats.requests_per_s < 55  # the server's pace, not the offered 200/s (in-process server: slack)
    assert stats.max_ms > 2000 and stats.p50_ms > 500


@pytest.mark.parametrize("engine", ["asyncio", "threads"])
async def test_trivial_server_answers_the_bench(engine):
    server, port = await start_trivial_server()
    try:
        result = await run(BenchConfig(url=f"127.0.0.1:{port}", model="trivial", concurrency=[1, 16],
                                       duration_s=0.3, warmup_s=0.1, inflight_per_channel=8, engine=engine))
    finally:
        await server.stop(0)
    assert result.channels == 2 and all(s.requests > 0 and s.errors == 0 for s in result.levels)


def test_ceiling_entry_point():
    run_ = subprocess.run([sys.executable, "-m", "trtserve.client.bench.ceiling", "--concurrency", "1,4",
                           "--duration", "0.3", "--warmup", "0.1", "--servers", "1", "--processes", "2"],
                          capture_output=True, text=True, timeout=90)
    assert run_.returncode == 0, run_.stderr
    last = run_.stdout.strip().splitlines()[-1]
    assert last.startswith("load generator ceiling: ") and float(last.split()[3]) > 0


def test_auto_engine_picks_blocking_calls_for_few_in_flight():
    from trtserve.client.bench.runner import level_engine

    assert [level_engine("auto", "concurrency", n) for n in (1, 4, 5, 128)] == ["threads", "threads", "asyncio",
                                                                                   "asyncio"]
    assert level_engine("auto", "request_rate", 1) == "asyncio"  # open loop: grpc.aio schedules the sends
    assert level_engine("threads", "concurrency", 64) == "threads" and level_engine("asyncio", "concurrency", 1) == \
        "asyncio"
