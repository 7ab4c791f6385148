"""Faults through the real gRPC server: client cancel and deadline expiry while a request is queued,
batched with others, or executing; a backend that fails some batches; unload and reload under load;
SIGTERM drain of the ``trtserve serve`` process.

The in-process tests serve platform "gated" through ``ServerOptions.backend_factories``: a fake
backend (OUTPUT0 = 2 * INPUT0) whose batches each wait for a permit the test hands out, so every
stage is reached on purpose, not by timing. Request i carries i in every element, so the backend
and the test both know which requests shared a batch.
"""
from __future__ import annotations

import asyncio
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, Iterator, List, Sequence

import grpc
import numpy as np
import pytest

from tests import models
from tests.conftest import RunningServer
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import grpc_service_pb2_grpc as pb_grpc
from trtserve.server.app import ServerOptions, TrtServer
from trtserve.server.engine.backends.base import Backend, BackendConfig, BatchResult, TensorSpec
from trtserve.server.events import Observer

ROOT = pathlib.Path(__file__).resolve().parents[1]
GATED = """
name: "{name}" platform: "gated" max_batch_size: 8
input [ {{ name: "INPUT0", data_type: TYPE_FP32, dims: [ 4 ] }} ]
output [ {{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 4 ] }} ]
dynamic_batching {{ }}
"""


class Control:
    """Shared by the test and every GatedBackend of one server (thread-safe)."""

    def __init__(self) -> None:
        self.permits = {"gated": threading.Semaphore(0), "other": threading.Semaphore(0)}  # per model
        self.free_running = False  # True: batches need no permit
        self.batches: List[List[int]] = []  # request ids of every batch, in start order
        self.fail: Callable[[int], bool] = lambda index: False  # batch index -> raise?
        self.lock = threading.Lock()

    def allow(self, n: int = 1, model: str = "gated") -> None:
        for _ in range(n):
            self.permits[model].release()

    async def started_batch(self, ids: List[int], timeout: float = 10.0) -> None:
        """Waits until a batch of exactly these request ids has started."""
        await until(lambda: ids in self.batches, timeout)


class GatedBackend(Backend):
    platform = "gated"

    def __init__(self, config: BackendConfig, control: Control) -> None:
        super().__init__(config)
        self.control = control

    def open(self) -> None:
        pass

    def io(self):
        return ((TensorSpec("INPUT0", "FP32", (-1, 4)),), (TensorSpec("OUTPUT0", "FP32", (-1, 4)),))

    def run(self, instance: int, inputs: Dict[str, np.ndarray], outputs: Sequence[str]) -> BatchResult:
        c = self.control
        x = inputs["INPUT0"]
        with c.lock:
            index = len(c.batches)
            c.batches.append([int(v) for v in x[:, 0]])
        if not c.free_running and not c.permits[self.config.name].acquire(timeout=20):
            raise RuntimeError("test never released this batch")
        if c.fail(index):
            raise RuntimeError(f"injected failure in batch {index}")
        return BatchResult({"OUTPUT0": x * 2})

    def close(self) -> None:
        pass


class Outcomes(Observer):
    """Counts request_done per reason: every request must be reported exactly once."""

    def __init__(self) -> None:
        self.done: Dict[str, int] = {}

    def request_done(self, model, version, ok, reason, *a) -> None:
        key = "ok" if ok else reason
        self.done[key] = self.done.get(key, 0) + 1


class OptionsServer(RunningServer):
    """RunningServer for any ServerOptions (conftest's class builds its own)."""

    def __init__(self, options: ServerOptions, observers: Sequence[Observer] = ()) -> None:  # noqa: no super()
        self.repo = options.model_repository
        self.server = TrtServer(options, extra_observers=list(observers))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="trtserve-faults", daemon=True)
        self._thread.start()
        self.call(self.server.start())
        self.url = f"127.0.0.1:{self.server.grpc_port}"
        self.metrics_url = None


class Env:
    def __init__(self, server: OptionsServer, control: Control, outcomes: Outcomes) -> None:
        self.server, self.control, self.outcomes = server, control, outcomes

    def pending(self, model: str = "gated") -> int:
        return self.server.server.repository.get(model).batcher.pending  # an int read across threads


@pytest.fixture
def env(tmp_path) -> Iterator[Env]:
    control, outcomes = Control(), Outcomes()
    for name in ("gated", "other"):
        models.write_config(tmp_path, name, GATED.format(name=name))
        (tmp_path / name / "1").mkdir()
    s = OptionsServer(ServerOptions(model_repository=tmp_path, grpc_port=0, http_port=0, metrics_port=None, drain_seconds=10.0,
                                    model_control_mode="explicit", startup_models=("*",),
                                    gpu_metrics=False,
                                    backend_factories={"gated": lambda cfg: GatedBackend(cfg, control)}),
                      [outcomes])
    try:
        yield Env(s, control, outcomes)
    finally:
        control.free_running = True
        control.allow(100)
        control.allow(100, model="other")
        s.stop()


def request(i: int, model: str = "gated", rows: int = 1) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=model, id=str(i))
    r.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 4])
    r.raw_input_contents.append(np.full((rows, 4), i, np.float32).tobytes())
    return r


def value(resp: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(list(resp.outputs[0].shape))


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        await asyncio.sleep(0.005)


async def healthy(stub, control: Control, i: int = 999) -> None:
    """The model answers a fresh request correctly (releasing its batch if needed)."""
    call = stub.ModelInfer(request(i), timeout=10)
    if not control.free_running:
        await control.started_batch([i])
        control.allow()
    np.testing.assert_array_equal(value(await call), np.full((1, 4), 2 * i, np.float32))


# ---- cancel / deadline at every stage ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cancel", "deadline"])
@pytest.mark.parametrize("stage", ["queued", "batched", "executing"])
async def test_cancel_and_deadline_at_every_stage(env, stage, kind):
    c = env.control
    async with grpc.aio.insecure_channel(env.server.url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        blocker = stub.ModelInfer(request(1), timeout=20)  # batch 0: [1], held
        await c.started_batch([1])
        short = 0.3 if kind == "deadline" else 20
        if stage == "executing":
            victim = stub.ModelInfer(request(7), timeout=short)
            others = []
            c.allow()  # the blocker finishes; [7] starts and is held
            await c.started_batch([7])
        else:
            first = stub.ModelInfer(request(5), timeout=20)
            await until(lambda: env.pending() == 1)
            victim = stub.ModelInfer(request(7), timeout=short)
            await until(lambda: env.pending() == 2)
            last = stub.ModelInfer(request(9), timeout=20)
            await until(lambda: env.pending() == 3)
            others = [(first, 5), (last, 9)]
            if stage == "batched":
                c.allow()  # the blocker finishes; [5, 7, 9] starts as one batch and is held
                await c.started_batch([5, 7, 9])
        t0 = time.monotonic()
        if kind == "cancel":
            victim.cancel()
        with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)) as e:
            await victim
        if kind == "deadline":
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - t0 < 2.0  # answered at its deadline, not when the batch ends
        if stage == "queued":
            await until(lambda: env.pending() == 2)  # the victim left the queue before running
        c.allow(3)
        if stage != "executing":
            np.testing.assert_array_equal(value(await blocker), np.full((1, 4), 2, np.float32))
        for call, i in others:
            np.testing.assert_array_equal(value(await call), np.full((1, 4), 2 * i, np.float32))
        if stage == "queued":
            assert c.batches == [[1], [5, 9]]  # the victim never ran
        else:
            await blocker
        await healthy(stub, c)
    assert env.pending() == 0
    assert sum(env.outcomes.done.values()) == len(c.batches[0]) + len(others) + 2  # blocker, others, victim, healthy
    assert env.outcomes.done.get("ok", 0) >= 2


async def test_cancelled_stream_requests_are_answered_once_and_the_stream_goes_on(env):
    """A stream whose client goes away mid-flight: the server cleans up and keeps serving others."""
    c = env.control
    async with grpc.aio.insecure_channel(env.server.url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        call = stub.ModelStreamInfer(timeout=20)
        await call.write(request(1))
        await c.started_batch([1])  # running alone (written together, the three could share one batch)
        for i in range(2, 4):
            await call.write(request(i))
        await until(lambda: env.pending() == 2)
        call.cancel()
        c.allow(3)
        await until(lambda: env.pending() == 0)
        await healthy(stub, c)


# ---- a backend that fails some batches ----------------------------------------------------------------
async def test_failing_batches_answer_internal_the_rest_succeed_and_the_model_stays_ready(env):
    c = env.control
    c.free_running = True
    c.fail = lambda index: index % 3 == 1
    n = 120
    async with grpc.aio.insecure_channel(env.server.url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        results = await asyncio.gather(*(stub.ModelInfer(request(i), timeout=20) for i in range(1, n + 1)),
                                       return_exceptions=True)
        failed_ids = {i for k, b in enumerate(c.batches) if c.fail(k) for i in b}
        assert failed_ids, "some batches must have failed"
        for i, r in zip(range(1, n + 1), results):
            if i in failed_ids:
                assert isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.INTERNAL, r
                assert "gated" in r.details() and "injected failure" in r.details()
            else:
                np.testing.assert_array_equal(value(r), np.full((1, 4), 2 * i, np.float32))
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="gated"))).ready
        c.fail = lambda index: False
        await healthy(stub, c)
    assert env.outcomes.done == {"ok": n - len(failed_ids) + 1, "backend": len(failed_ids)}


# ---- unload / reload under load ------------------------------------------------------------------------
async def test_unload_under_load_finishes_in_flight_then_refuses_until_loaded_again(env):
    c = env.control
    async with grpc.aio.insecure_channel(env.server.url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        running = stub.ModelInfer(request(1), timeout=20)
        await c.started_batch([1])
        queued = [stub.ModelInfer(request(i), timeout=20) for i in (2, 3, 4)]
        await until(lambda: env.pending() == 3)
        unload = asyncio.ensure_future(stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="gated")))
        await until(lambda: not env.server.server.repository.is_ready("gated"))
        with pytest.raises(grpc.aio.AioRpcError) as e:  # unloading: refused, with the reason
            await stub.ModelInfer(request(50), timeout=5)
        assert e.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
        assert "gated" in e.value.details() and "not loaded" in e.value.details()
        assert not unload.done()  # still draining the in-flight requests
        other = stub.ModelInfer(request(77, model="other"), timeout=10)  # other models keep serving
        await c.started_batch([77])
        c.allow(model="other")
        np.testing.assert_array_equal(value(await other), np.full((1, 4), 2 * 77, np.float32))
        c.allow(10)
        for call, i in zip([running] + queued, (1, 2, 3, 4)):
            np.testing.assert_array_equal(value(await call), np.full((1, 4), 2 * i, np.float32))
        await unload
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ModelInfer(request(51), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'gated' is not loaded (it is in the repository: load it first)" in e.value.details()
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="gated"))).ready
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="gated"))
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="gated"))).ready
        await healthy(stub, c)


async def test_reload_under_load_keeps_answering(env):
    """Load on a loaded model swaps in new instances; in-flight requests finish on the old ones and
    requests sent during the reload all succeed."""
    c = env.control
    async with grpc.aio.insecure_channel(env.server.url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        running = stub.ModelInfer(request(1), timeout=20)
        await c.started_batch([1])
        queued = [stub.ModelInfer(request(i), timeout=20) for i in (2, 3)]
        await until(lambda: env.pending() == 2)
        old = env.server.server.repository.get("gated").batcher
        reload = asyncio.ensure_future(stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="gated")))
        await until(lambda: env.server.server.repository.get("gated").batcher is not old)
        c.free_running = True
        during = [stub.ModelInfer(request(i), timeout=20) for i in range(10, 30)]
        c.allow(10)
        await reload
        for call, i in zip([running] + queued + during, [1, 2, 3] + list(range(10, 30))):
            np.testing.assert_array_equal(value(await call), np.full((1, 4), 2 * i, np.float32))
    assert env.outcomes.done == {"ok": 23}


# ---- SIGTERM drain of the real process --------------------------------------------------------------------
def _slow_model(repo: pathlib.Path) -> None:
    """INPUT0 FP32 [256] -> 256 rows -> 40 chained 256x256 MatMuls (identity) -> mean of rows: tens of
    ms of work per request for 1 KiB in and out (small messages: all arrive at once)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Expand", ["INPUT0", "SHAPE"], ["h"])]
    prev = "h"
    for k in range(40):
        nodes.append(helper.make_node("MatMul", [prev, "W"], [f"h{k}"]))
        prev = f"h{k}"
    nodes.append(helper.make_node("ReduceMean", [prev], ["OUTPUT0"], axes=[0], keepdims=0))
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [256])],
                              [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [256])],
                              [numpy_helper.from_array(np.eye(256, dtype=np.float32), "W"),
                               numpy_helper.from_array(np.array([256, 256], np.int64), "SHAPE")])
    models._save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), repo / "slow" / "1" / "model.onnx")
    models.write_config(repo, "slow", """
name: "slow" platform: "onnxruntime_onnx" max_batch_size: 0
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 256 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 256 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
""")


def _slow_request(i: int) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="slow", id=str(i))
    r.inputs.add(name="INPUT0", datatype="FP32", shape=[256])
    r.raw_input_contents.append(np.full(256, i, np.float32).tobytes())
    return r


def _start_serve(repo: pathlib.Path, drain_seconds: float):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "trtserve", "serve", "--model-repository", str(repo),
                             "--grpc-port", "0", "--http-port", "0", "--metrics-port", "-1", "--no-gpu-metrics",
                             "--drain-seconds", str(drain_seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT), env=env)
    t0 = time.monotonic()
    assert proc.stdout is not None
    while time.monotonic() - t0 < 60:
        line = proc.stdout.readline()
        m = re.search(r" on 127\.0\.0\.1:(\d+) ", line)
        if m:
            return proc, f"127.0.0.1:{m.group(1)}"
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("trtserve serve did not start")


@pytest.mark.parametrize("drain_seconds,n", [(15.0, 12), (1.0, 200)], ids=["drains-all", "deadline-cuts"])
def test_sigterm_drains_in_flight_refuses_new_and_exits_within_the_deadline(tmp_path, drain_seconds, n):
    _slow_model(tmp_path)
    proc, url = _start_serve(tmp_path, drain_seconds)
    try:
        with grpc.insecure_channel(url) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            t0 = time.monotonic()
            stub.ModelInfer(_slow_request(0), timeout=30)
            one = time.monotonic() - t0
            futures = [stub.ModelInfer.future(_slow_request(i), timeout=60) for i in range(1, n + 1)]
            while not any(f.done() for f in futures):  # requests are running and queued
                time.sleep(0.005)
            in_flight = sum(not f.done() for f in futures)
            assert in_flight >= n // 2, (in_flight, one)
            t_term = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.1)  # readiness goes false at once ...
            assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
            time.sleep(0.7)  # ... and after the 0.5 s drain notice new work is refused
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(_slow_request(999), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
            outcomes: Dict[str, int] = {}
            details = set()
            for i, f in enumerate(futures, 1):
                try:
                    out = np.frombuffer(f.result().raw_output_contents[0], np.float32)
                    assert out[0] == i and out[-1] == i  # identity weights: OUTPUT0 == INPUT0
                    outcomes["ok"] = outcomes.get("ok", 0) + 1
                except grpc.RpcError as err:
                    outcomes[err.code().name] = outcomes.get(err.code().name, 0) + 1
                    details.add(err.details())
        proc.wait(timeout=drain_seconds + 20)
        exit_s = time.monotonic() - t_term
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read() if proc.stdout else ""
    print(f"SIGTERM drain {drain_seconds} s: {in_flight} in flight, outcomes {outcomes}, exit after {exit_s:.2f} s, "
          f"one request {one * 1e3:.0f} ms; {sorted(d[:60] for d in details)}")
    assert proc.returncode == 0, out[-2000:]
    assert "trtserve: stopped" in out
    assert sum(outcomes.values()) == n  # every request answered exactly once
    if drain_seconds > 10:
        assert outcomes == {"ok": n}, (outcomes, details, one)  # everything in flight finished
        assert exit_s < drain_seconds
    else:
        # more work than the deadline allows: what ran finished, the rest was told, and the process
        # was gone soon after the deadline (grace + unload of the one model + the batch in progress)
        assert outcomes.get("ok", 0) >= 1 and set(outcomes) <= {"ok", "UNAVAILABLE", "CANCELLED"}, outcomes
        assert exit_s < drain_seconds + 3 + one, (exit_s, one)
