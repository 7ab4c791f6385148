"""Overload: open-loop load at 2-5x a model's capacity against a bounded queue, over loopback.

The model runs on a fake backend with a fixed service time (50 ms per batch of at most 2 rows, one
instance: 40 requests/s), so capacity is known and the run is short. Checked: the excess is
rejected fast with UNAVAILABLE and a message naming the full queue; every admitted request meets
its deadline; the server keeps its throughput; RSS sampled during the run stays bounded; every
request gets exactly one answer (unary calls, and a bidirectional stream counted per request id).
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Dict, List, Sequence, Tuple

import grpc
import numpy as np
import pytest

from tests import models
from tests.test_faults import OptionsServer, Outcomes
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import grpc_service_pb2_grpc as pb_grpc
from trtserve.server.app import ServerOptions
from trtserve.server.engine.backends.base import Backend, BackendConfig, BatchResult, TensorSpec

SERVICE_S = 0.05
MAX_BATCH = 2
QUEUE = 8
CAPACITY = MAX_BATCH / SERVICE_S  # requests per second
DEADLINE_S = 2.0


class FixedTimeBackend(Backend):
    """OUTPUT0 = INPUT0 + 1 after a fixed service time per batch (sleep: releases the GIL)."""

    platform = "fixed"

    def open(self) -> None:
        pass

    def io(self):
        return ((TensorSpec("INPUT0", "FP32", (-1, 4)),), (TensorSpec("OUTPUT0", "FP32", (-1, 4)),))

    def run(self, instance: int, inputs, outputs: Sequence[str]) -> BatchResult:
        time.sleep(SERVICE_S)
        return BatchResult({"OUTPUT0": inputs["INPUT0"] + 1})

    def close(self) -> None:
        pass


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class RssSampler:
    """Samples this process's RSS (server and client both live here) every 20 ms."""

    def __init__(self) -> None:
        self.samples: List[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(rss_bytes())
            self._stop.wait(0.02)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def overloaded(tmp_path):
    models.write_config(tmp_path, "fixed", f"""
name: "fixed" platform: "fixed" max_batch_size: {MAX_BATCH}
input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 4 ] }} ]
dynamic_batching {{ default_queue_policy {{ max_queue_size: {QUEUE} }} }}
""")
    (tmp_path / "fixed" / "1").mkdir()
    outcomes = Outcomes()
    s = OptionsServer(ServerOptions(model_repository=tmp_path, grpc_port=0, http_port=0, metrics_port=None, gpu_metrics=False,
                                    drain_seconds=5.0, backend_factories={"fixed": FixedTimeBackend}), [outcomes])
    yield s, outcomes
    s.stop()


def request(i: int) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="fixed", id=str(i))
    r.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    r.raw_input_contents.append(np.full((1, 4), i, np.float32).tobytes())
    return r


async def open_loop(url: str, rate: float, seconds: float) -> Tuple[List[Tuple[str, float, str]], float]:
    """Sends at ``rate``/s on schedule whatever the answers do; returns (outcome, latency s, detail) per request."""
    results: List[Tuple[str, float, str]] = []
    async with grpc.aio.insecure_channel(url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        await stub.ServerReady(pb.ServerReadyRequest())

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            try:
                resp = await stub.ModelInfer(request(i), timeout=DEADLINE_S)
                out = np.frombuffer(resp.raw_output_contents[0], np.float32)
                assert resp.id == str(i) and (out == i + 1).all()
                results.append(("OK", time.perf_counter() - t0, ""))
            except grpc.aio.AioRpcError as e:
                results.append((e.code().name, time.perf_counter() - t0, e.details()))

        loop = asyncio.get_running_loop()
        n = int(rate * seconds)
        start = loop.time()
        tasks = []
        for i in range(n):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(one(i)))
        await asyncio.gather(*tasks)
        return results, loop.time() - start


@pytest.mark.parametrize("factor", [2, 5])
def test_overload_rejects_excess_fast_and_admitted_meet_deadlines(overloaded, factor):
    server, outcomes = overloaded
    seconds = 2.5
    with RssSampler() as rss:
        results, wall = asyncio.run(open_loop(server.url, factor * CAPACITY, seconds))
    n = len(results)
    ok = [lat for code, lat, _ in results if code == "OK"]
    rejected = [(lat, d) for code, lat, d in results if code == "UNAVAILABLE"]
    others = {code for code, _, _ in results} - {"OK", "UNAVAILABLE"}
    goodput = len(ok) / wall
    reject_p99 = float(np.percentile([lat for lat, _ in rejected], 99))
    growth = max(rss.samples) - rss.samples[0]
    print(f"overload x{factor}: {n} sent in {wall:.2f} s, {len(ok)} ok ({goodput:.0f}/s of {CAPACITY:.0f}/s "
          f"capacity), {len(rejected)} rejected (p50 {np.median([lat for lat, _ in rejected]) * 1e3:.1f} ms, "
          f"p99 {reject_p99 * 1e3:.1f} ms), admitted max latency {max(ok) * 1e3:.0f} ms, "
          f"RSS growth {growth / 2**20:.1f} MiB over {len(rss.samples)} samples")
    assert not others, others  # nothing timed out, failed or got lost
    assert len(rejected) >= n * (1 - 1 / factor) * 0.7, "the excess must be rejected"
    assert all("queue" in d and "full" in d and "max_queue_size 8" in d for _, d in rejected)
    assert reject_p99 < 0.25  # fast: no waiting in line to be told no
    assert max(ok) < DEADLINE_S / 2  # admitted requests wait at most a full queue, well inside the deadline
    assert goodput > 0.7 * CAPACITY  # the server stays productive under overload
    assert growth < 64 * 2**20
    assert sum(outcomes.done.values()) == n  # the server reported each request exactly once
    assert outcomes.done.get("ok", 0) == len(ok) and outcomes.done.get("rejected", 0) == len(rejected)


async def _stream_burst(url: str, n: int, rate: float) -> Dict[str, List[str]]:
    answers: Dict[str, List[str]] = {}
    async with grpc.aio.insecure_channel(url) as ch:
        call = pb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(timeout=30)

        async def write() -> None:
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i in range(n):
                delay = start + i / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await call.write(request(i))
            await call.done_writing()

        writer = asyncio.ensure_future(write())
        async for msg in call:
            rid = msg.infer_response.id
            answers.setdefault(rid, []).append(msg.error_message or "OK")
        await writer
    return answers


def test_stream_under_overload_answers_every_id_exactly_once(overloaded):
    server, _ = overloaded
    n = 360
    answers = asyncio.run(_stream_burst(server.url, n, 3 * CAPACITY))
    assert sorted(answers, key=int) == [str(i) for i in range(n)]  # none lost
    assert all(len(a) == 1 for a in answers.values()), "duplicate answers"
    kinds = {a[0].split("]")[0] for a in answers.values()}
    assert kinds <= {"OK", "[UNAVAILABLE"}, kinds
    rejected = sum(a[0].startswith("[UNAVAILABLE]") for a in answers.values())
    assert rejected > n / 3 and all("full" in a[0] for a in answers.values() if a[0] != "OK")
    print(f"stream x3: {n} ids, {n - rejected} ok, {rejected} rejected, 0 lost, 0 duplicated")
