"""A request's arena memory and its one answer, whatever the client does (cancel, deadline) and wherever the
request is (queued, running): checked in the single-process server, where the arena is visible."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from tests.test_frontends import _slow_repo, slow_request
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import grpc_service_pb2_grpc as pb_grpc


def _stats(url: str) -> pb.ModelStatistics:
    with grpc.insecure_channel(url) as ch:
        return pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(
            pb.ModelStatisticsRequest(name="slow")).model_stats[0]


def _in_use(s) -> int:
    return s.server.frontend.engine.allocator.in_use


async def _until(predicate, timeout: float = 10.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_a_request_given_up_while_queued_never_runs_and_frees_its_memory(tmp_path, serve_repo, how):
    _slow_repo(tmp_path, max_batch_size=16, extra="dynamic_batching { }")
    s = serve_repo(tmp_path, metrics=False)

    async def run():
        async with grpc.aio.insecure_channel(s.url) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            running = asyncio.ensure_future(stub.ModelInfer(slow_request(0, rows=16), timeout=60))
            batcher = s.server.repository.get("slow").batcher
            await _until(lambda: bool(batcher._running))  # dispatched: running now, for about 100 ms or more
            if how == "deadline":
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.ModelInfer(slow_request(1, rows=1), timeout=0.02)
                assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            else:
                call = stub.ModelInfer(slow_request(1, rows=1), timeout=60)
                await _until(lambda: batcher.pending == 1)  # queued behind the running batch
                call.cancel()
            await _until(lambda: _in_use(s) <= 16 * 256 * 4 * 2)  # only the running request's block is held
            await running
            await _until(lambda: _in_use(s) == 0)

    asyncio.run(run())
    st = _stats(s.url)
    assert st.execution_count == 1 and st.inference_count == 16  # the given-up request never ran
    assert st.inference_stats.fail.count == 1


def test_a_request_cancelled_while_its_batch_runs_keeps_its_memory_until_the_batch_ends(tmp_path, serve_repo):
    _slow_repo(tmp_path, max_batch_size=16, extra="dynamic_batching { }")
    s = serve_repo(tmp_path, metrics=False)

    async def run():
        async with grpc.aio.insecure_channel(s.url) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            call = stub.ModelInfer(slow_request(0, rows=16), timeout=60)
            await asyncio.sleep(0.05)  # its batch is running
            held = _in_use(s)
            assert held > 0
            call.cancel()
            await asyncio.sleep(0.02)
            assert _in_use(s) == held  # the backend may still read it
            await _until(lambda: _in_use(s) == 0)  # freed once the engine answered
            # and the server goes on
            resp = await stub.ModelInfer(slow_request(2, rows=1), timeout=60)
            assert resp.id == "2"

    asyncio.run(run())
