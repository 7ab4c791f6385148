"""The multi-process server (front-end processes + one engine process) seen from outside: one server,
exactly one answer per request, and faults of any process handled as documented (docs/architecture.md)."""
from __future__ import annotations

import asyncio
import collections
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

import grpc
import numpy as np
import pytest

from tests import models
from tests.mp import ROOT, Serve, alive, dev_shm, front_end_of, tree
from trtserve import cli
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import grpc_service_pb2_grpc as pb_grpc
from trtserve.server.examples import REPOSITORY as EXAMPLE

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux /proc")


def mlp_request(value: float, rows: int = 1, **params) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="mlp", id=str(value))
    r.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 64])
    r.raw_input_contents.append(np.full((rows, 64), value, np.float32).tobytes())
    for k, v in params.items():
        r.parameters[k].int64_param = v
    return r


def output(resp: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(list(resp.outputs[0].shape))


def reference(value: float) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(EXAMPLE / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return s.run(None, {"INPUT0": np.full((1, 64), value, np.float32)})[0]


ONE_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # per channel: gRPC shares one among channels otherwise


async def load(url: str, connections: int, per_connection: int, make=mlp_request, timeout: float = 30.0,
               ) -> List[Tuple[float, object]]:
    """Each connection its own channel and its own TCP connection (SO_REUSEPORT spreads connections, not calls;
    without a local subchannel pool, gRPC would share one connection among the channels); (value, response or
    grpc error) for every request sent."""
    results: List[Tuple[float, object]] = []

    async def one_connection(c: int) -> None:
        async with grpc.aio.insecure_channel(url, options=ONE_CONNECTION) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)

            async def call(v: float) -> None:
                try:
                    results.append((v, await stub.ModelInfer(make(v), timeout=timeout)))
                except grpc.aio.AioRpcError as e:
                    results.append((v, e))

            await asyncio.gather(*(call(c * 1000 + i) for i in range(per_connection)))

    await asyncio.gather(*(one_connection(c) for c in range(connections)))
    return results


def statistics(url: str, model: str = "mlp") -> pb.ModelStatistics:
    with grpc.insecure_channel(url) as ch:
        resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(pb.ModelStatisticsRequest(name=model))
    return resp.model_stats[0]


def metric(metrics_port: int, name: str, model: str = "mlp") -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in (name, name + "_total") and s.labels.get("model") == model:
                total += s.value
    return total


def frontend_starts(metrics_port: int) -> Dict[str, float]:
    """trtserve_frontend_starts_total by reason, parsed from /metrics."""
    from tests.test_metrics_live import scrape

    found = scrape(f"http://127.0.0.1:{metrics_port}/metrics").matching("trtserve_frontend_starts_total")
    return {labels["reason"]: value for labels, value in found}


@pytest.fixture(scope="module")
def server():
    s = Serve(EXAMPLE, frontends=2)
    yield s
    assert s.stop() == 0


def test_one_server_seen_from_every_front_end(server):
    roles = server.roles()
    assert roles["engine"] is not None and len(roles["frontend"]) == 2
    answers = set()
    for _ in range(12):  # new connections land on both front ends; every one answers alike
        with grpc.insecure_channel(server.url) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            answers.add((stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp")).SerializeToString(),
                         stub.ModelConfig(pb.ModelConfigRequest(name="mlp")).SerializeToString(),
                         stub.ServerReady(pb.ServerReadyRequest()).ready,
                         tuple(m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models)))
    assert len(answers) == 1


def _policies(pid: int) -> set:
    """The scheduling policy of every thread of ``pid``."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out.add(os.sched_getscheduler(int(tid)))
        except OSError:  # a thread that ended meanwhile
            pass
    return out


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_front_ends_run_as_sched_batch_and_the_engine_keeps_its_policy(server):
    roles = server.roles()
    started_as = os.sched_getscheduler(0)
    for pid in roles["frontend"]:  # gRPC's threads too: they start after the policy is set, and inherit it
        assert _policies(pid) == {os.SCHED_BATCH}, pid
    assert _policies(roles["engine"]) == {started_as}
    assert _policies(server.proc.pid) == {started_as}
    normal = Serve(EXAMPLE, frontends=1, args=["--frontend-scheduling", "normal"], metrics=False)
    try:
        assert _policies(normal.roles()["frontend"][0]) == {started_as}
    finally:
        assert normal.stop() == 0


def _environ(pid: int) -> Dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(): v.decode() for k, v in pairs}


@pytest.mark.parametrize("given, expected", [(None, cli.SERVE_GRPC_EXPERIMENTS), ("", ""),
                                             ("-event_engine_client", "-event_engine_client")])
def test_front_ends_serve_grpc_without_eventengine_io_unless_the_user_chose(given: Optional[str],
                                                                            expected: str) -> None:
    """``trtserve serve`` sets GRPC_EXPERIMENTS for its gRPC servers (cli._grpc_experiments) where it is not set: the
    front ends inherit it. One the user set stands, even an empty one."""
    s = Serve(EXAMPLE, frontends=1, metrics=False, env={"GRPC_EXPERIMENTS": given})
    try:
        assert _environ(s.roles()["frontend"][0]).get("GRPC_EXPERIMENTS") == expected
    finally:
        assert s.stop() == 0


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_sched_batch_skips_threads_that_ended_and_gives_up_when_refused(monkeypatch, caplog):
    from trtserve.server.process import child

    monkeypatch.setattr(os, "listdir", lambda path: ["101", "102"])
    calls = []

    def ended(tid, policy, param):
        calls.append(tid)
        if tid == 101:
            raise ProcessLookupError(3, "No such process")

    monkeypatch.setattr(os, "sched_setscheduler", ended)
    assert child.schedule_as_batch() and calls == [101, 102]

    def refused(tid, policy, param):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refused)
    assert not child.schedule_as_batch()
    assert "cannot set SCHED_BATCH" in caplog.text


def test_exactly_one_answer_each_and_totals_exact(server):
    before = statistics(server.url)
    m_before = metric(server.metrics_port, "nv_inference_request_success")
    results = asyncio.run(load(server.url, connections=16, per_connection=25))
    assert len(results) == 400
    errors = [r for _, r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert not errors, errors[:3]
    ids = sorted(r.id for _, r in results)
    assert ids == sorted(str(v) for v, _ in results)  # each request's own answer, once
    ref = {v: reference(v) for v in (0.0, 1001.0, 15024.0)}
    for v, r in results:
        if v in ref:
            np.testing.assert_allclose(output(r), ref[v], rtol=1e-5)
    after = statistics(server.url)
    assert after.inference_stats.success.count - before.inference_stats.success.count == 400
    assert after.inference_count - before.inference_count == 400
    assert after.execution_count - before.execution_count <= 400
    assert metric(server.metrics_port, "nv_inference_request_success") - m_before == 400


def test_trtserve_bench_loads_the_front_ends_through_several_connections(server):
    """SO_REUSEPORT hands each connection to one front end, so a load tester that sent everything over one would
    load one front end: ``trtserve bench`` opens a connection per six requests in flight, as perf_analyzer does."""
    from trtserve.client.bench.runner import BenchConfig, run

    fronts = server.roles()["frontend"]
    before = set(front_end_of(server.port, fronts))  # connections of earlier tests, if any are still open
    seen: Dict[int, int] = {}  # client port -> the front end holding that connection, over the whole run
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.update((port, pid) for port, pid in front_end_of(server.port, fronts).items() if port not in before)
            stop.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = asyncio.run(run(BenchConfig(url=server.url, model="mlp", concurrency=[32], duration_s=1.0,
                                             warmup_s=0.3)))
    finally:
        stop.set()
        watcher.join()
    level = result.levels[0]
    assert level.errors == 0 and level.requests > 0
    assert result.channels == 6
    # the load's six connections (and the one that read the model and the statistics), each held by a front end
    assert len(seen) >= 6 and set(seen.values()) <= set(fronts), seen
    print(f"connections per front end: {collections.Counter(seen.values())}")


def test_batches_form_across_connections(tmp_path):
    _slow_repo(tmp_path, max_batch_size=16, extra="dynamic_batching { }")
    s = Serve(tmp_path, frontends=2)
    try:
        async def run() -> List[object]:
            # a connection each, spread over both processes by SO_REUSEPORT
            chans = [grpc.aio.insecure_channel(s.url, options=ONE_CONNECTION) for _ in range(17)]
            await asyncio.gather(*(c.channel_ready() for c in chans))
            stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in chans]
            # the first one (16 rows: hundreds of ms) runs; the others queue behind it
            first = asyncio.ensure_future(stubs[0].ModelInfer(slow_request(0, rows=16), timeout=60))
            await asyncio.sleep(0.05)
            rest = [stubs[i].ModelInfer(slow_request(i, rows=1), timeout=60) for i in range(1, 17)]
            out = await asyncio.gather(first, *rest, return_exceptions=True)
            for c in chans:
                await c.close()
            return out

        results = asyncio.run(run())
        assert all(not isinstance(r, Exception) for r in results), results
        st = statistics(s.url, "slow")
        # 16 requests from 16 connections, which two processes took, ran as one batch behind the first (a front end's
        # first request asks the engine for the model's spec: the engine's loop answers while the long batch runs)
        assert st.inference_count == 32 and st.execution_count == 2, st
        assert [(b.batch_size, b.compute_infer.count) for b in st.batch_stats] == [(16, 2)]
    finally:
        assert s.stop() == 0


def test_readiness_answers_while_a_long_batch_runs(tmp_path):
    """The engine runs short batches on its own loop, but not one it knows takes long: meanwhile readiness,
    metadata and every first request of a model in a front end wait on that loop (a Kubernetes probe times out
    after a second by default)."""
    _slow_repo(tmp_path, max_batch_size=16, extra="dynamic_batching { }")
    s = Serve(tmp_path, frontends=1)
    try:
        async def run() -> Tuple[float, List[float]]:
            async with grpc.aio.insecure_channel(s.url) as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                await stub.ModelInfer(slow_request(0, rows=1), timeout=60)  # the engine learns how long a row takes
                t0 = time.monotonic()
                long = asyncio.ensure_future(stub.ModelInfer(slow_request(1, rows=16), timeout=60))
                await asyncio.sleep(0.05)
                waits = []
                while not long.done():
                    t = time.monotonic()
                    assert (await stub.ServerReady(pb.ServerReadyRequest(), timeout=30)).ready
                    waits.append(time.monotonic() - t)
                    await asyncio.sleep(0.01)
                await long
                return time.monotonic() - t0, waits

        took, waits = asyncio.run(run())
        assert took > 0.15 and len(waits) >= 3, (took, waits)  # the batch ran long enough to ask meanwhile
        assert max(waits) < took / 2, (took, waits)
    finally:
        assert s.stop() == 0


def test_shared_memory_registered_through_one_connection_is_used_from_any(server):
    from multiprocessing import shared_memory

    region = shared_memory.SharedMemory(create=True, size=64 * 4 + 16 * 4)
    try:
        x = np.full((1, 64), 0.5, np.float32)
        np.ndarray((1, 64), np.float32, region.buf)[:] = x
        with grpc.insecure_channel(server.url) as ch:
            pb_grpc.GRPCInferenceServiceStub(ch).SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                name="in_out", key=region.name, offset=0, byte_size=region.size))

        def make(v: float) -> pb.ModelInferRequest:
            r = pb.ModelInferRequest(model_name="mlp", id=str(v))
            t = r.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 64])
            t.parameters["shared_memory_region"].string_param = "in_out"
            t.parameters["shared_memory_byte_size"].int64_param = 256
            return r

        results = asyncio.run(load(server.url, connections=8, per_connection=2, make=make))
        assert all(not isinstance(r, Exception) for _, r in results), results[:2]
        for _, r in results:
            np.testing.assert_allclose(output(r), reference(0.5), rtol=1e-5)
        statuses = set()
        for _ in range(6):
            with grpc.insecure_channel(server.url) as ch:
                st = pb_grpc.GRPCInferenceServiceStub(ch).SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
                statuses.add(tuple(sorted(st.regions)))
        assert statuses == {("in_out",)}
        with grpc.insecure_channel(server.url) as ch:
            pb_grpc.GRPCInferenceServiceStub(ch).SystemSharedMemoryUnregister(
                pb.SystemSharedMemoryUnregisterRequest(name="in_out"))
        after = asyncio.run(load(server.url, connections=4, per_connection=1, make=make))
        assert all(isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.NOT_FOUND for _, r in after)
    finally:
        region.close()
        region.unlink()


def _slow_repo(repo: pathlib.Path, max_batch_size: int = 0, extra: str = "") -> None:
    """``slow``: INPUT0 FP32 [256] -> tens of ms of MatMuls per row -> OUTPUT0 FP32 [256]; with
    ``max_batch_size`` > 0 it batches (rows cost the same each)."""
    if not max_batch_size:
        from tests.test_faults import _slow_model

        _slow_model(repo)
        return
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Unsqueeze", ["INPUT0", "AXES"], ["u"]),
             helper.make_node("Expand", ["u", "SHAPE"], ["h"])]
    prev = "h"
    for k in range(40):
        nodes.append(helper.make_node("MatMul", [prev, "W"], [f"h{k}"]))
        prev = f"h{k}"
    nodes.append(helper.make_node("ReduceMean", [prev], ["OUTPUT0"], axes=[1], keepdims=0))
    graph = helper.make_graph(
        nodes, "slow", [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["N", 256])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["N", 256])],
        [numpy_helper.from_array(np.eye(256, dtype=np.float32), "W"),
         numpy_helper.from_array(np.array([1], np.int64), "AXES"),
         numpy_helper.from_array(np.array([1, 256, 256], np.int64), "SHAPE")])
    models._save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]),
                 repo / "slow" / "1" / "model.onnx")
    models.write_config(repo, "slow", f"""
name: "slow" platform: "onnxruntime_onnx" max_batch_size: {max_batch_size}
input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ 256 ] }} ]
output [ {{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 256 ] }} ]
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
parameters {{ key: "trtserve.batches_per_instance" value: {{ string_value: "1" }} }}
{extra}
""")


def slow_request(i: int, rows: Optional[int] = None, **params) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="slow", id=str(i))
    shape = [256] if rows is None else [rows, 256]
    r.inputs.add(name="INPUT0", datatype="FP32", shape=shape)
    r.raw_input_contents.append(np.full(shape, i, np.float32).tobytes())
    for k, v in params.items():
        r.parameters[k].int64_param = v
    return r


def test_sigterm_drains_every_process_and_leaves_nothing(tmp_path):
    _slow_repo(tmp_path)
    shm_before = dev_shm()
    s = Serve(tmp_path, frontends=2, drain_seconds=30)
    pids = tree(s.proc.pid)
    assert len(pids) == 4  # supervisor, engine, two front ends

    async def run() -> List[object]:
        calls = asyncio.ensure_future(load(s.url, connections=4, per_connection=3, make=slow_request))
        await asyncio.sleep(0.3)  # in flight
        s.proc.send_signal(signal.SIGTERM)
        return await calls

    results = asyncio.run(run())
    code = s.proc.wait(60)
    s.drain_output()
    assert code == 0, s.output()
    assert len(results) == 12
    assert all(not isinstance(r, Exception) for _, r in results), [r for _, r in results if isinstance(r, Exception)]
    assert not [p for p in pids if alive(p)]
    assert dev_shm() == shm_before


def test_ctrl_c_to_the_whole_process_group_drains_in_order(tmp_path):
    """SIGINT to the server's process group (Ctrl-C in a terminal, `timeout`) reaches the supervisor only: the
    front ends drain their requests before the engine stops."""
    _slow_repo(tmp_path)
    s = Serve(tmp_path, frontends=2, drain_seconds=30, new_session=True)

    async def run() -> List[object]:
        calls = asyncio.ensure_future(load(s.url, connections=4, per_connection=3, make=slow_request))
        await asyncio.sleep(0.3)
        os.killpg(s.proc.pid, signal.SIGINT)
        return await calls

    results = asyncio.run(run())
    assert s.proc.wait(60) == 0
    s.drain_output()
    assert all(not isinstance(r, Exception) for _, r in results), [r for _, r in results if isinstance(r, Exception)]
    assert "engine went away" not in s.output(), s.output()


def test_a_killed_front_end_fails_only_its_requests_and_is_restarted(tmp_path):
    _slow_repo(tmp_path)
    s = Serve(tmp_path, frontends=2)
    try:
        victim = s.roles()["frontend"][0]

        async def run() -> List[Tuple[float, object]]:
            # 16 connections: SO_REUSEPORT puts all on the victim once in 65,536 runs
            calls = asyncio.ensure_future(load(s.url, connections=16, per_connection=2, make=slow_request))
            await asyncio.sleep(0.5)
            os.kill(victim, signal.SIGKILL)
            return await calls

        results = asyncio.run(run())
        assert len(results) == 32  # every request answered once
        failed = [r for _, r in results if isinstance(r, grpc.aio.AioRpcError)]
        ok = [r for _, r in results if not isinstance(r, grpc.aio.AioRpcError)]
        assert ok, "the other front end kept serving"
        assert all(e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) for e in failed)
        deadline = time.monotonic() + 30
        while "serves again" not in s.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        fronts = s.roles()["frontend"]
        assert len(fronts) == 2 and victim not in fronts, (fronts, s.output())
        assert frontend_starts(s.metrics_port) == {"start": 2, "restart": 1, "watchdog": 0, "replacement": 0}
        again = asyncio.run(load(s.url, connections=8, per_connection=1, make=slow_request))
        assert all(not isinstance(r, Exception) for _, r in again), s.output()
    finally:
        assert s.stop() == 0


def _wait_for(s: Serve, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in s.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert text in s.output(), s.output()


def test_a_hung_front_end_is_killed_and_restarted_and_its_clients_are_answered(tmp_path):
    """A front end that stops running (SIGSTOP stands for a deadlock) keeps its share of the port: without the
    watchdog its clients would wait for their deadlines. With --watchdog-seconds 2 every call is answered within a
    few seconds (those of the stopped front end UNAVAILABLE) and the front end is replaced; the one that ran on under
    load is left alone."""
    s = Serve(EXAMPLE, frontends=2, args=["--watchdog-seconds", "2"])
    try:
        victim, other = s.roles()["frontend"]
        os.kill(victim, signal.SIGSTOP)

        async def run() -> Tuple[float, List[Tuple[float, object]]]:
            t0 = time.monotonic()
            results = await load(s.url, connections=16, per_connection=4, timeout=60.0)
            return time.monotonic() - t0, results

        took, results = asyncio.run(run())
        assert len(results) == 64 and took < 15.0, (took, s.output())
        failed = [r for _, r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert all(e.code() == grpc.StatusCode.UNAVAILABLE for e in failed), failed
        assert len(failed) < len(results), "the other front end served"
        _wait_for(s, "serves again")
        assert f"(pid {victim}) has not run its event loop" in s.output(), s.output()
        assert s.output().count("has not run its event loop") == 1, s.output()
        fronts = s.roles()["frontend"]
        assert len(fronts) == 2 and victim not in fronts and other in fronts, (fronts, s.output())
        assert frontend_starts(s.metrics_port) == {"start": 2, "restart": 0, "watchdog": 1, "replacement": 0}
        again = asyncio.run(load(s.url, connections=8, per_connection=4))
        assert all(not isinstance(r, Exception) for _, r in again), s.output()
    finally:
        assert s.stop() == 0


def test_a_hung_engine_is_killed_its_requests_answered_unavailable_and_the_server_exits_1(tmp_path):
    _slow_repo(tmp_path)
    shm_before = dev_shm()
    s = Serve(tmp_path, frontends=2, args=["--watchdog-seconds", "2"])
    pids = tree(s.proc.pid)
    stopped_at: Dict[str, float] = {}

    async def run() -> Tuple[float, List[Tuple[float, object]]]:
        calls = asyncio.ensure_future(load(s.url, connections=4, per_connection=8, make=slow_request))
        await asyncio.sleep(0.3)
        stopped_at["t"] = time.monotonic()
        os.kill(s.roles()["engine"], signal.SIGSTOP)
        results = await calls
        return time.monotonic() - stopped_at["t"], results

    took, results = asyncio.run(run())
    assert len(results) == 32 and took < 6.0, took
    failed = [r for _, r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert failed and all(e.code() == grpc.StatusCode.UNAVAILABLE for e in failed), failed
    assert s.proc.wait(30) == 1
    s.drain_output()
    assert "the engine (pid" in s.output() and "has not run its event loop" in s.output(), s.output()
    assert "was killed by the watchdog" in s.output() and "exits with code 1" in s.output(), s.output()
    time.sleep(0.2)
    assert not [p for p in pids if alive(p)]
    assert dev_shm() == shm_before


def test_a_server_frozen_whole_and_thawed_is_not_taken_for_hung(tmp_path):
    """Every process stopped at once (a paused container, a suspended VM) and the supervisor let run first: its
    children's silence was its own, and nothing is killed."""
    s = Serve(EXAMPLE, frontends=2, args=["--watchdog-seconds", "2"])
    try:
        pids = tree(s.proc.pid)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(4.0)  # twice the watchdog's limit
        os.kill(s.proc.pid, signal.SIGCONT)
        time.sleep(0.2)
        for pid in pids[1:]:
            os.kill(pid, signal.SIGCONT)
        time.sleep(2.0)
        assert "has not run its event loop" not in s.output(), s.output()
        assert all(alive(p) for p in pids)
        again = asyncio.run(load(s.url, connections=4, per_connection=4))
        assert all(not isinstance(r, Exception) for _, r in again), s.output()
    finally:
        assert s.stop() == 0


def _in_private_network(migrate: int, *scenario: str) -> dict:
    """tests/reuseport_kill.py in a private network namespace with net.ipv4.tcp_migrate_req = ``migrate``."""
    proc = subprocess.run([sys.executable, "-m", "tests.reuseport_kill", str(migrate), *scenario], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=240)
    if proc.returncode == 3:
        pytest.skip("needs the right to create a network namespace (root or CAP_SYS_ADMIN)")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_connections_queued_at_a_killed_front_end_move_to_the_other_when_the_kernel_may_migrate_them():
    """Clients that reconnect just as their front end dies can land in its listener's queue. With
    tcp_migrate_req 0 those connections are reset and their calls fail though the other front end serves, and the
    server says so at start; with 1 they move to the other front end and every call is answered."""
    without = _in_private_network(0)
    assert without["warned"] and without["exit_code"] == 0, without
    assert without["before"] < len(without["outcomes"]), without  # some calls were queued at the victim
    assert any("Connection reset" in o for o in without["outcomes"]), without  # the failure this guards against
    moved = _in_private_network(1)
    assert not moved["warned"] and moved["exit_code"] == 0, moved
    assert moved["before"] < len(moved["outcomes"]), moved
    assert moved["outcomes"] == ["OK"] * len(moved["outcomes"]), moved


def test_front_ends_past_their_memory_limit_are_replaced_in_turn_while_clients_are_served():
    """A limit below a new front end's size: the supervisor replaces the two front ends one after the other under
    load (a new one first, then the old one drains). No call fails but those grpc had taken off the wire and not yet
    handed to the drained front end (CANCELLED, as in any drain), and no replacement counts as a crash."""
    result = _in_private_network(1, "replace")
    outcomes = result["outcomes"]
    assert result["replacements"] >= 2 and result["new_pids"] >= 1, result
    assert result["restarts"] == 0 and result["exit_code"] == 0, result
    starts = result["starts"]  # /metrics: a replacement is counted as one, and is no restart
    assert starts["start"] == 2 and starts["restart"] == starts["watchdog"] == 0, result
    assert starts["replacement"] >= result["replacements"], result
    assert set(outcomes) <= {"OK", "CANCELLED"}, result
    assert outcomes.get("CANCELLED", 0) <= 10 * result["replacements"] < outcomes["OK"] / 10, result


def test_a_killed_engine_answers_unavailable_at_once_and_the_server_exits_1(tmp_path):
    _slow_repo(tmp_path)
    shm_before = dev_shm()
    s = Serve(tmp_path, frontends=2)
    pids = tree(s.proc.pid)
    engine = s.roles()["engine"]
    killed_at: Dict[str, float] = {}
    answered_at: List[float] = []

    async def run() -> List[Tuple[float, object]]:
        calls = asyncio.ensure_future(load(s.url, connections=8, per_connection=16, make=slow_request))
        await asyncio.sleep(0.3)  # about a seventh of them answered by now
        killed_at["t"] = time.monotonic()
        os.kill(engine, signal.SIGKILL)
        results = await calls
        answered_at.append(time.monotonic())
        return results

    results = asyncio.run(run())
    assert len(results) == 128
    assert answered_at[0] - killed_at["t"] < 1.0  # no hang: the last answer came within a second
    failed = [r for _, r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert failed and all(e.code() == grpc.StatusCode.UNAVAILABLE for e in failed)
    assert s.proc.wait(30) == 1
    s.drain_output()
    assert "exits with code 1" in s.output()
    time.sleep(0.2)
    assert not [p for p in pids if alive(p)]
    assert dev_shm() == shm_before


def test_priority_one_overtakes_priority_two_under_saturation(tmp_path):
    _slow_repo(tmp_path, max_batch_size=1,
               extra="dynamic_batching { priority_levels: 2 default_priority_level: 2 }")
    s = Serve(tmp_path, frontends=2)
    try:
        async def run() -> Dict[int, List[float]]:
            done: Dict[int, List[float]] = {1: [], 2: []}
            t0 = time.monotonic()

            async def one(stub, i: int, level: int) -> None:
                await stub.ModelInfer(slow_request(i, rows=1, priority=level), timeout=60)
                done[level].append(time.monotonic() - t0)

            chans = [grpc.aio.insecure_channel(s.url) for _ in range(8)]
            stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in chans]
            low = [asyncio.ensure_future(one(stubs[i % 8], i, 2)) for i in range(96)]
            await asyncio.sleep(0.3)  # the queue is full of priority 2 by now (each runs for milliseconds)
            high = [asyncio.ensure_future(one(stubs[i % 8], 100 + i, 1)) for i in range(4)]
            await asyncio.gather(*low, *high)
            for c in chans:
                await c.close()
            return done

        done = asyncio.run(run())
        # every priority-1 request finishes before most of the priority-2 ones queued ahead of it
        later_low = [t for t in done[2] if t > max(done[1])]
        assert len(done[2]) == 96 and len(done[1]) == 4
        assert len(later_low) >= 24, (len(later_low), max(done[1]), sorted(done[2])[-5:])
    finally:
        assert s.stop() == 0


def test_a_second_server_on_the_same_port_is_refused(server):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "trtserve", "serve", "--grpc-port", str(server.port),
                          "--http-port", "-1", "--metrics-port", "-1", "--frontends", "1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"{server.port}" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_frontends_auto_follows_cpu_affinity_and_quota(tmp_path):
    from trtserve.cli import frontends_from, usable_cpus

    cpus = len(os.sched_getaffinity(0))
    assert frontends_from("auto", usable_cpus(str(tmp_path))) == min(8, max(min(2, cpus), cpus // 2))  # no cgroups
    assert [frontends_from("auto", n) for n in (1, 2, 3, 4, 5, 12, 16, 64)] == [1, 2, 2, 2, 2, 6, 8, 8]
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # a Kubernetes limit of 2.5 CPUs
    assert usable_cpus(str(tmp_path)) == min(cpus, 3)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(str(tmp_path)) == cpus
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1, 1 CPU
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(str(tmp_path)) == 1
    assert frontends_from("3") == 3
    with pytest.raises(ValueError, match="must be auto or a number"):
        frontends_from("-1")


def _affinities(pid: int) -> set:
    """The CPU sets of every thread of ``pid``."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out.add(frozenset(os.sched_getaffinity(int(tid))))
        except OSError:  # a thread that ended meanwhile
            pass
    return out


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two CPUs")
def test_engine_cpus_places_the_engine_and_the_front_ends_apart_also_after_a_restart():
    """--engine-cpus: every thread of the engine (its loop, the instances', ONNX Runtime's) on the CPUs named,
    every thread of each front end on the others, the supervisor where it was started; a front end started again
    after a SIGKILL is placed as the first was, and the server answers throughout."""
    allowed = frozenset(os.sched_getaffinity(0))
    engine_cpu = min(allowed)
    s = Serve(EXAMPLE, frontends=2, args=["--engine-cpus", str(engine_cpu)], metrics=False)
    try:
        roles = s.roles()
        assert _affinities(roles["engine"]) == {frozenset({engine_cpu})}
        for pid in roles["frontend"]:
            assert _affinities(pid) == {allowed - {engine_cpu}}, pid
        assert _affinities(s.proc.pid) == {allowed}
        killed = roles["frontend"][0]
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            fresh = [p for p in s.roles()["frontend"] if p not in roles["frontend"]]
            if fresh:
                break
            time.sleep(0.1)
        assert fresh, "the killed front end was not started again"
        while _affinities(fresh[0]) != {allowed - {engine_cpu}} and time.monotonic() < deadline:
            time.sleep(0.05)  # found before it read its boot payload, which places it
        assert _affinities(fresh[0]) == {allowed - {engine_cpu}}
        with grpc.insecure_channel(s.url) as ch:
            resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(mlp_request(0.5), timeout=30)
        np.testing.assert_allclose(output(resp), reference(0.5), rtol=1e-5, atol=1e-5)
    finally:
        assert s.stop() == 0


def test_engine_cpus_is_checked_before_anything_starts(monkeypatch):
    from trtserve import cli
    from trtserve.server.process import placement

    assert placement.cpu_list("0-2,5, 7") == {0, 1, 2, 5, 7} and placement.cpu_list("") == set()
    for bad in ("a", "3-1", "-1", "1-x"):
        with pytest.raises(ValueError, match="is not a CPU or a range"):
            placement.cpu_list(bad)
    assert placement.engine_cpus("1,0", {0, 1, 2, 3}) == (0, 1)
    with pytest.raises(ValueError, match=r"^CPU 9 is not among the CPUs this server may use \(0, 1, 2, 3\)"):
        placement.engine_cpus("0,9", {0, 1, 2, 3})
    with pytest.raises(ValueError, match="leaves no CPU for the front ends"):
        placement.engine_cpus("0-3", {0, 1, 2, 3})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(cli, "usable_cpus", lambda: 8)
    options = cli.server_options(cli.build_parser().parse_args(["serve", "--engine-cpus", "0-1"]))
    assert options.engine_cpus == (0, 1) and options.frontends == 3  # auto: one per two of the six left
    monkeypatch.setenv("TRTSERVE_ENGINE_CPUS", "0,12")
    with pytest.raises(cli.OptionError, match=r"^TRTSERVE_ENGINE_CPUS=0,12: CPU 12 is not among"):
        cli.server_options(cli.build_parser().parse_args(["serve"]))
    with pytest.raises(cli.OptionError, match=r"^--engine-cpus 0: needs front-end processes \(--frontends 0 "):
        cli.server_options(cli.build_parser().parse_args(["serve", "--engine-cpus", "0", "--frontends", "0"]))


def test_an_embedders_engine_cpus_are_checked_before_anything_starts():
    """ServerOptions built without the CLI: the supervisor refuses CPUs it may not use before it takes a port or
    starts a child, and the single-process server refuses the option (it has no engine process to place)."""
    from trtserve.server.app import TrtServer
    from trtserve.server.options import ServerOptions
    from trtserve.server.supervisor import StartError, Supervisor

    supervisor = Supervisor(ServerOptions(model_repository=EXAMPLE, frontends=1, engine_cpus=(4096,)))
    with pytest.raises(StartError, match=r"^engine_cpus \[4096\]: CPU 4096 is not among the CPUs") as e:
        asyncio.run(supervisor.start())
    assert e.value.code == 2 and supervisor.engine is None and supervisor.grpc_port is None
    with pytest.raises(ValueError, match="engine_cpus needs front-end processes"):
        TrtServer(ServerOptions(model_repository=EXAMPLE, frontends=0, engine_cpus=(0,)))


def test_a_full_arena_answers_unavailable_and_a_request_larger_than_it_resource_exhausted(tmp_path):
    _slow_repo(tmp_path, max_batch_size=16, extra="dynamic_batching { }")
    # 16 rows in and out: 32 KiB of arena; 48 KiB hold one such request at a time
    s = Serve(tmp_path, frontends=1, args=["--arena-bytes", str(48 << 10)])
    try:
        async def run():
            async with grpc.aio.insecure_channel(s.url) as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                first = asyncio.ensure_future(stub.ModelInfer(slow_request(0, rows=16), timeout=60))
                await asyncio.sleep(0.05)  # running for hundreds of ms, holding its block
                with pytest.raises(grpc.aio.AioRpcError) as full:
                    await stub.ModelInfer(slow_request(1, rows=16), timeout=60)
                assert (await first).id == "0"
                again = await stub.ModelInfer(slow_request(2, rows=16), timeout=60)  # the space came back
                return full.value, again

        full, again = asyncio.run(run())
        assert full.code() == grpc.StatusCode.UNAVAILABLE and "out of request memory" in full.details()
        assert again.id == "2"
        s.stop()
        s = Serve(tmp_path, frontends=1, args=["--arena-bytes", str(16 << 10)])
        with grpc.insecure_channel(s.url) as ch:
            with pytest.raises(grpc.RpcError) as big:
                pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(slow_request(3, rows=16), timeout=60)
        assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--arena-bytes" in big.value.details()
    finally:
        assert s.stop() == 0
