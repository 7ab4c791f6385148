"""The batcher with a pipelined backend: ``enqueue`` on the instance's thread (in the engine process: on the loop's
own thread), ``collect`` on its completion thread, so an instance's next batch starts while the previous one is
still running.

A fake backend stands in for TensorRT: ``enqueue`` logs and returns a ticket, ``collect`` waits on a gate the
test opens. Real gRPC and the real TensorRT path are covered in tests/gpu/."""
from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest

from trtserve.server.engine.backends.base import Backend, BackendConfig, BatchResult, DeviceDestination
from trtserve.server.errors import Internal, InvalidArgument, TrtServeError
from trtserve.server.events import Observer
from trtserve.server.engine.batcher.scheduler import DynamicBatcher
from trtserve.server.engine.repository.model_config import BatchingPolicy, ModelSpec
from trtserve.server.engine.backends.base import TensorSpec


class PipelinedBackend(Backend):
    """y = 2 * x. ``enqueue`` returns at once; ``collect`` of batch k waits until ``gate(k)`` is set."""

    platform = "fake"
    pipelined = True

    def __init__(self, instances: int = 1) -> None:
        super().__init__(BackendConfig("m", "1", None, "", 8, (), (), instance_count=instances))  # type: ignore
        self.log: List[Tuple[str, int, int, str]] = []  # (event, batch number, rows, thread name)
        self._lock = threading.Lock()
        self._gates: Dict[int, threading.Event] = {}
        self._count = 0
        self.open_gates = True
        self.fail_enqueue: Dict[int, BaseException] = {}  # batch number -> error
        self.fail_collect: Dict[int, BaseException] = {}
        self.ran_plain = 0
        self.enqueue_gate = threading.Event()  # enqueue waits for it (set: never waits)
        self.enqueue_gate.set()

    def gate(self, k: int) -> threading.Event:
        with self._lock:
            return self._gates.setdefault(k, threading.Event())

    def open(self) -> None:
        pass

    def io(self):
        return (), ()

    def close(self) -> None:
        pass

    def _note(self, what: str, k: int, rows: int) -> None:
        with self._lock:
            self.log.append((what, k, rows, threading.current_thread().name))

    def run(self, instance: int, inputs: Dict[str, np.ndarray], outputs) -> BatchResult:
        self.ran_plain += 1
        return self.collect(instance, self.enqueue(instance, inputs, outputs))

    def enqueue(self, instance: int, inputs: Dict[str, np.ndarray], outputs: Sequence[str],
                destinations: Sequence[DeviceDestination] = ()) -> object:
        with self._lock:
            k = self._count
            self._count += 1
        assert self.enqueue_gate.wait(10)
        x = np.array(inputs["x"], copy=True)  # the batcher may reuse its stacking buffer: keep our copy
        self._note("enqueue", k, x.shape[0])
        if k in self.fail_enqueue:
            raise self.fail_enqueue[k]
        if self.open_gates:
            self.gate(k).set()
        return (k, x)

    def collect(self, instance: int, ticket: object) -> BatchResult:
        _, x = self._released("collect", ticket, self.fail_collect)
        return BatchResult({"y": x * 2}, 1, 2, 3)

    def _released(self, what: str, ticket: object, failures: Dict[int, BaseException]) -> Tuple[int, np.ndarray]:
        """Waits for the batch's gate (the device finishing it), logs ``what``, and raises what ``failures`` holds
        for it."""
        k, x = ticket  # type: ignore[misc]
        assert self.gate(k).wait(10), f"batch {k} was never released"
        self._note(what, k, x.shape[0])
        if k in failures:
            raise failures[k]
        return k, x


def spec(depth: int = 2, preserve_ordering: bool = False) -> ModelSpec:
    return ModelSpec(name="m", version="1", platform="fake", max_batch_size=8,
                     inputs=(TensorSpec("x", "FP32", (-1,)),), outputs=(TensorSpec("y", "FP32", (-1,)),),
                     batching=BatchingPolicy(enabled=True, max_batch_size=8, preserve_ordering=preserve_ordering),
                     instance_count=1, parameters={}, pad_values={}, unpad={}, batches_per_instance=depth)


def x(rows: int, value: float) -> Dict[str, np.ndarray]:
    return {"x": np.full((rows, 4), value, np.float32)}


async def wait_for(cond, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.005)


async def _two_in_flight_then_all_answered(backend: PipelinedBackend, futs: list) -> Dict[Tuple[str, int], str]:
    """Four full batches on one instance holding two: batch 0 is held on the device and batch 1 must already be
    enqueued behind it, while batch 2 waits until batch 0 is answered. Then the device lets every batch go and each
    request gets its own rows back. Returns the thread of each (event, batch)."""
    await wait_for(lambda: [e[:2] for e in backend.log] == [("enqueue", 0), ("enqueue", 1)])
    await asyncio.sleep(0.05)
    assert len(backend.log) == 2, backend.log
    for k in range(4):
        backend.gate(k).set()
    results = await asyncio.gather(*futs)
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r.outputs["y"], np.full((8, 4), 2 * i, np.float32))
    return {(w, k): t for w, k, _, t in backend.log}


async def test_next_batch_is_enqueued_while_the_previous_one_runs():
    backend = PipelinedBackend()
    backend.open_gates = False
    backend.enqueue_gate.clear()
    b = DynamicBatcher(spec(depth=2), backend, Observer())
    b.start()
    futs = [b.submit(x(8, i), ("y",), 8) for i in range(4)]  # four full batches, one instance
    await wait_for(lambda: b._pool.holds(0) == 2)  # batch 1 is queued behind batch 0 before 0 is enqueued
    backend.enqueue_gate.set()
    where = await _two_in_flight_then_all_answered(backend, futs)
    collects = [k for what, k, _, _ in backend.log if what == "collect"]
    assert collects == [0, 1, 2, 3]  # completed in the order they were enqueued
    assert all("-inst0" in where[("enqueue", k)] for k in range(4))
    # batch 0 had batch 1 behind it, so the completion thread waited for it; later ones may have been alone by
    # the time they were enqueued (then the instance thread collects them itself)
    assert "-done0" in where[("collect", 0)]
    assert all("-done0" in where[("collect", k)] or "-inst0" in where[("collect", k)] for k in range(4))
    assert backend.ran_plain == 0
    await b.stop()


async def test_a_lone_batch_is_collected_on_the_instance_thread():
    """Nothing queued behind it (one request at a time): no hand-off to the completion thread."""
    backend = PipelinedBackend()
    b = DynamicBatcher(spec(depth=2), backend, Observer())
    b.start()
    for i in range(5):
        r = await b.submit(x(2, i), ("y",), 2)
        np.testing.assert_array_equal(r.outputs["y"], np.full((2, 4), 2 * i, np.float32))
    assert [e[0] for e in backend.log] == ["enqueue", "collect"] * 5
    assert all("-inst0" in t for *_, t in backend.log), backend.log
    await b.stop()


async def test_one_batch_per_instance_runs_both_halves_on_the_instance_thread():
    backend = PipelinedBackend()
    b = DynamicBatcher(spec(depth=1), backend, Observer())
    b.start()
    results = await asyncio.gather(*[b.submit(x(8, i), ("y",), 8) for i in range(3)])
    assert [r.outputs["y"][0, 0] for r in results] == [0, 2, 4]
    assert [e[:2] for e in backend.log] == [("enqueue", 0), ("collect", 0), ("enqueue", 1), ("collect", 1),
                                             ("enqueue", 2), ("collect", 2)]
    assert {t for *_, t in backend.log} == {t for *_, t in backend.log if "-inst0" in t}
    await b.stop()


async def test_in_the_engine_process_the_loop_enqueues_and_the_completion_thread_waits():
    """inline (the engine process, whose loop serves nothing else): enqueue runs on the loop's own thread, so no
    instance thread competes with it for the GIL around each CUDA call; only the wait goes to the completion
    thread. The next batch is still enqueued while the previous one runs."""
    backend = PipelinedBackend()
    backend.open_gates = False
    b = DynamicBatcher(spec(depth=2), backend, Observer(), inline=True)
    b.start()
    loop_thread = threading.current_thread().name
    futs = [b.submit(x(8, i), ("y",), 8) for i in range(4)]  # four full batches, one instance
    where = await _two_in_flight_then_all_answered(backend, futs)
    assert all(where[("enqueue", k)] == loop_thread for k in range(4)), where
    assert all("-done0" in where[("collect", k)] for k in range(4)), where
    assert backend.ran_plain == 0
    await b.stop()


class WaitsApart(PipelinedBackend):
    """Waits for the device apart from collecting (as TensorRT does: ``Backend.wait``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_wait: Dict[int, BaseException] = {}  # batch number -> error

    def wait(self, instance: int, ticket: object) -> bool:
        self._released("wait", ticket, self.fail_wait)
        return True


async def test_a_backend_that_waits_apart_is_collected_on_the_loop_and_only_waited_for_on_the_completion_thread():
    """The completion thread holds the GIL for as little as it can: it waits for the device and hands the batch
    back; the loop, which enqueues every batch, collects and splits it (no wait left by then)."""
    backend = WaitsApart()
    backend.open_gates = False
    b = DynamicBatcher(spec(depth=2), backend, Observer(), inline=True)
    b.start()
    loop_thread = threading.current_thread().name
    futs = [b.submit(x(8, i), ("y",), 8) for i in range(4)]
    where = await _two_in_flight_then_all_answered(backend, futs)
    assert all(where[("enqueue", k)] == loop_thread for k in range(4)), where
    assert all("-done0" in where[("wait", k)] for k in range(4)), where
    assert all(where[("collect", k)] == loop_thread for k in range(4)), where
    order = [(w, k) for w, k, _, _ in backend.log]
    assert all(order.index(("wait", k)) < order.index(("collect", k)) for k in range(4)), order
    assert [k for w, k in order if w == "collect"] == [0, 1, 2, 3]
    await b.stop()


async def test_a_wait_that_fails_leaves_the_error_to_collect_and_fails_that_batch_alone():
    backend = WaitsApart()
    backend.fail_wait = {1: RuntimeError("synchronize failed")}
    backend.fail_collect[1] = RuntimeError("CUDA went away")  # what collect finds when it waits again
    b = DynamicBatcher(spec(depth=2), backend, Observer(), inline=True)
    b.start()
    results = await asyncio.gather(*[b.submit(x(8, i), ("y",), 8) for i in range(4)], return_exceptions=True)
    assert isinstance(results[1], TrtServeError) and "CUDA went away" in str(results[1]), results[1]
    for i in (0, 2, 3):
        np.testing.assert_array_equal(results[i].outputs["y"], np.full((8, 4), 2 * i, np.float32))
    assert ("collect", 1) in [e[:2] for e in backend.log]  # collected all the same: the instance's slot is freed
    await b.stop()


class RowTimed(PipelinedBackend):
    """Not pipelined; each batch computes for ``row_s`` seconds per row (on the CPU, as ONNX Runtime does: the
    batcher measures a batch by its thread's CPU time)."""

    pipelined = False

    def __init__(self, row_s: float) -> None:
        super().__init__()
        self.row_s = row_s

    def enqueue(self, instance: int, inputs: Dict[str, np.ndarray], outputs: Sequence[str],
                destinations: Sequence[DeviceDestination] = ()) -> object:
        end = time.thread_time() + self.row_s * inputs["x"].shape[0]
        while time.thread_time() < end:
            pass
        return super().enqueue(instance, inputs, outputs, destinations)


@pytest.mark.parametrize("row_s, later_on_loop", [(0.0, True), (0.005, False)], ids=["short", "long"])
async def test_in_the_engine_process_only_batches_known_to_be_short_run_on_the_loop(row_s, later_on_loop):
    import gc

    backend = RowTimed(row_s)
    b = DynamicBatcher(spec(depth=1), backend, Observer(), inline=True)
    b.start()
    # a batch is timed by its thread's CPU time: a collection of the whole test session's objects inside a "short"
    # one can take more than INLINE_MAX_S, and the next batch then rightly goes to the instance thread (the likely
    # cause of a CI failure: the fourth batch went there)
    gc.disable()
    try:
        for i in range(4):  # one at a time
            r = await b.submit(x(1, i), ("y",), 1)
            np.testing.assert_array_equal(r.outputs["y"], np.full((1, 4), 2 * i, np.float32))
    finally:
        gc.enable()
        await b.stop()  # a failure here must not leave the instance thread to the tests after it
    loop_thread = threading.current_thread().name
    threads = [t for what, _, _, t in backend.log if what == "enqueue"]
    assert threads[0] != loop_thread  # the first batch: how long a row takes is not known yet
    assert [t == loop_thread for t in threads[1:]] == [later_on_loop] * 3, threads


@pytest.mark.parametrize("inline", [False, True], ids=["instance-thread", "engine-loop"])
@pytest.mark.parametrize("stage", ["enqueue", "collect"])
@pytest.mark.parametrize("error,status", [(InvalidArgument("input 'x': bad shape"), "INVALID_ARGUMENT"),
                                          (RuntimeError("CUDA went away"), "INTERNAL")])
async def test_a_failing_batch_fails_alone_and_the_instance_goes_on(stage, error, status, inline):
    backend = PipelinedBackend()
    getattr(backend, f"fail_{stage}")[1] = error
    b = DynamicBatcher(spec(depth=2), backend, Observer(), inline=inline)
    b.start()
    futs = [b.submit(x(8, i), ("y",), 8) for i in range(4)]
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert isinstance(results[1], TrtServeError) and results[1].code == status, results[1]
    if status == "INTERNAL":
        assert "CUDA went away" in str(results[1])
    for i in (0, 2, 3):
        np.testing.assert_array_equal(results[i].outputs["y"], np.full((8, 4), 2 * i, np.float32))
    await b.stop()


async def test_preserve_ordering_holds_with_pipelining():
    backend = PipelinedBackend(instances=2)
    backend.open_gates = False
    backend.enqueue_gate.clear()
    s = spec(depth=2, preserve_ordering=True)
    s = ModelSpec(**{**s.__dict__, "instance_count": 2})
    b = DynamicBatcher(s, backend, Observer())
    b.start()
    futs = [b.submit(x(8, i), ("y",), 8) for i in range(4)]
    await wait_for(lambda: b._pool.holds(0) == b._pool.holds(1) == 2)
    backend.enqueue_gate.set()
    await wait_for(lambda: len(backend.log) == 4)  # two instances x two batches enqueued
    order: List[int] = []
    for i, f in enumerate(futs):
        f.add_done_callback(lambda _f, i=i: order.append(i))
    for k in (3, 2, 1, 0):  # the device finishes them in reverse
        backend.gate(k).set()
        await asyncio.sleep(0.02)
    await asyncio.gather(*futs)
    assert order == [0, 1, 2, 3]
    await b.stop()


@pytest.mark.parametrize("inline", [False, True], ids=["instance-thread", "engine-loop"])
async def test_every_request_gets_exactly_one_answer_under_random_failures(inline):
    rng = random.Random(7)
    backend = PipelinedBackend(instances=2)
    for k in range(400):
        roll = rng.random()
        if roll < 0.1:
            backend.fail_enqueue[k] = RuntimeError(f"enqueue {k}")
        elif roll < 0.2:
            backend.fail_collect[k] = InvalidArgument(f"collect {k}")
    s = spec(depth=2)
    s = ModelSpec(**{**s.__dict__, "instance_count": 2})
    b = DynamicBatcher(s, backend, Observer(), inline=inline)
    b.start()
    answers: Dict[int, int] = {}
    futs = []
    for i in range(300):
        rows = rng.randint(1, 8)
        f = b.submit(x(rows, i), ("y",), rows)
        f.add_done_callback(lambda _f, i=i: answers.__setitem__(i, answers.get(i, 0) + 1))
        futs.append((i, rows, f))
        if i % 17 == 0:
            await asyncio.sleep(0)
    done = await asyncio.gather(*[f for _, _, f in futs], return_exceptions=True)
    assert sorted(answers) == list(range(300)) and set(answers.values()) == {1}
    ok = 0
    for (i, rows, _), r in zip(futs, done):
        if isinstance(r, BaseException):
            assert isinstance(r, (Internal, InvalidArgument)), r
        else:
            ok += 1
            np.testing.assert_array_equal(r.outputs["y"], np.full((rows, 4), 2 * i, np.float32))
    assert 0 < ok < 300
    await b.stop()


async def test_stop_waits_for_batches_in_flight_and_queued_requests_get_unavailable():
    """A timed-out stop answers what is still queued UNAVAILABLE, waits for the batches on the device, then shuts
    both threads of the instance down."""
    backend = PipelinedBackend()
    backend.open_gates = False
    backend.enqueue_gate.clear()
    b = DynamicBatcher(spec(depth=2), backend, Observer())
    b.start()
    running = [b.submit(x(8, i), ("y",), 8) for i in range(2)]  # one running, one enqueued behind it
    await wait_for(lambda: b._pool.holds(0) == 2)
    backend.enqueue_gate.set()
    await wait_for(lambda: len(backend.log) == 2)
    queued = b.submit(x(8, 9), ("y",), 8)  # no room on the instance: stays in the queue
    stopping = asyncio.ensure_future(b.stop(timeout=0.1))
    await asyncio.sleep(0.3)
    assert not stopping.done()  # the two batches on the device are still being waited for
    with pytest.raises(TrtServeError) as e:
        await queued
    assert e.value.code == "UNAVAILABLE"
    for k in range(2):
        backend.gate(k).set()
    await asyncio.wait_for(stopping, 10)
    results = await asyncio.gather(*running)
    assert [r.outputs["y"][0, 0] for r in results] == [0, 2]
    assert not [t for t in threading.enumerate() if t.name.startswith("m-inst0") or t.name.startswith("m-done0")]
