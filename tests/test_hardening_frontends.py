"""Issue 18 items 3, 9 and 10 against a real ``trtserve serve`` (one front-end process, and where cheap the
single-process mode): memory is the RSS of the server's whole process tree (tests.mp.tree + rss_kib).

- A ModelStreamInfer client that sends fast and never reads its responses is held back by flow control: the
  tree's RSS stays within STREAM_RSS_BOUND_MIB of where it started, and other clients are served meanwhile.
- 2,000 calls started at once on one connection: each answered OK or UNAVAILABLE (never CANCELLED), and every
  UNAVAILABLE from the server's own limit is counted in /metrics; a connection that opens and cancels streams
  in a tight loop (HTTP/2 rapid reset) does not make good requests on another connection fail.
- After a flood of large requests the tree's RSS comes back within FLOOD_RSS_BOUND_MIB of where it started.
"""
from __future__ import annotations

import asyncio
import os
import pathlib
import statistics as stats
import threading
import time
from typing import List, Tuple

import grpc
import numpy as np
import pytest

from tests import models
from tests.mp import Serve, rss_kib, tree
from trtserve.protos import grpc_service_pb2 as pb
from trtserve.protos import grpc_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux /proc")

MiB = 1 << 20
# a never-read stream for 5 s: the server holds at most --max-stream-inflight (64) requests of 64 KiB for it
STREAM_RSS_BOUND_MIB = 150
# after 32 clients sent 8 MiB requests for 3 s and the server went idle: without the idle trim several hundred
# MiB stayed resident
FLOOD_RSS_BOUND_MIB = 200
SMALL_DIMS = 16384  # FP32: 64 KiB per request and per response
# peak during 5 s of resets: calls grpc holds, then frees; it grows with how fast the attacker resets (the
# client's speed on the machine), so the bound is about staying bounded, well below the unbounded growth the
# issue saw, not about one rate
RESET_RSS_BOUND_MIB = 512
BIG_DIMS = 2 * MiB  # FP32: 8 MiB per request and per response


def _repo(repo: pathlib.Path) -> pathlib.Path:
    models.copy_example(repo, "mlp")
    models.identity(repo, "id64k", "FP32", max_batch_size=8, dims=f"[ {SMALL_DIMS} ]", extra="dynamic_batching { }")
    models.identity(repo, "id8m", "FP32", max_batch_size=0, dims=f"[ {BIG_DIMS} ]",
                    extra="instance_group [ { count: 2, kind: KIND_CPU } ]")
    return repo


def identity_request(model: str, n: int, i: int = 0, batch: bool = True) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=model, id=str(i))
    r.inputs.add(name="INPUT0", datatype="FP32", shape=[1, n] if batch else [n])
    r.raw_input_contents.append(np.full(n, i, np.float32).tobytes())
    return r


def mlp_request(i: int = 0) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="mlp", id=str(i))
    r.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 64])
    r.raw_input_contents.append(np.full(64, i, np.float32).tobytes())
    return r


def tree_rss_mib(s: Serve) -> float:
    return rss_kib(tree(s.proc.pid)) / 1024


class TreeRss:
    """Peak RSS of the server's process tree, sampled every 50 ms in a thread."""

    def __init__(self, s: Serve) -> None:
        self.s = s
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_mib(self.s))
            self._stop.wait(0.05)

    def __enter__(self) -> "TreeRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def failures(metrics_port: int, model: str, reason: str) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("nv_inference_request_failure", "nv_inference_request_failure_total") \
                    and sample.labels.get("model") == model and sample.labels.get("reason") == reason:
                total += sample.value
    return total


def stopped(s: Serve) -> None:
    code = s.stop()
    assert code == 0, s.output()[-4000:]


async def warm(url: str) -> None:
    async with grpc.aio.insecure_channel(url) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        for _ in range(3):
            await stub.ModelInfer(mlp_request(), timeout=30)


# ---- item 3: ModelStreamInfer backpressure ---------------------------------------------------------------------------
@pytest.mark.parametrize("frontends", [1, 0])
def test_a_stream_never_read_is_held_back_and_others_are_served(tmp_path, frontends):
    s = Serve(_repo(tmp_path), frontends=frontends)
    try:
        asyncio.run(warm(s.url))
        before = tree_rss_mib(s)

        async def run() -> Tuple[int, List[float], List[object]]:
            sent = 0
            latencies: List[float] = []
            errors: List[object] = []
            request = identity_request("id64k", SMALL_DIMS)
            stop = time.monotonic() + 5.0
            async with grpc.aio.insecure_channel(s.url) as bad, grpc.aio.insecure_channel(s.url) as good:
                call = pb_grpc.GRPCInferenceServiceStub(bad).ModelStreamInfer()  # never read

                async def flood() -> None:
                    nonlocal sent
                    while time.monotonic() < stop:
                        await call.write(request)
                        sent += 1

                async def others() -> None:
                    stub = pb_grpc.GRPCInferenceServiceStub(good)
                    while time.monotonic() < stop:
                        t0 = time.monotonic()
                        try:
                            await stub.ModelInfer(mlp_request(1), timeout=5)
                            latencies.append(time.monotonic() - t0)
                        except grpc.aio.AioRpcError as e:
                            errors.append(e.code())
                        await asyncio.sleep(0.05)

                flooding = asyncio.ensure_future(flood())
                await others()
                await asyncio.wait([flooding], timeout=max(0.0, stop - time.monotonic()) + 0.5)
                flooding.cancel()
                call.cancel()
            return sent, latencies, errors

        with TreeRss(s) as rss:
            sent, latencies, errors = asyncio.run(run())
        growth = rss.peak - before
        print(f"\nstream never read, --frontends {frontends}: {sent} requests of 64 KiB written "
              f"({sent * 64 / 1024:.1f} MiB) in 5 s; server tree RSS {before:.0f} MiB -> peak {rss.peak:.0f} MiB "
              f"(+{growth:.0f}); other client: {len(latencies)} ok, p50 {stats.median(latencies) * 1e3:.1f} ms, "
              f"max {max(latencies) * 1e3:.1f} ms, errors {errors}")
        assert not errors
        assert len(latencies) >= 20 and max(latencies) < 1.0
        assert growth < STREAM_RSS_BOUND_MIB
        # held back: far fewer requests were taken than a client can write in 5 s without flow control
        assert sent * 64 / 1024 < 400
    finally:
        stopped(s)


# ---- item 9: overload on one connection, rapid reset ----------------------------------------------------------------
def _overload(s: Serve, calls: int) -> Tuple[dict, float]:
    before = failures(s.metrics_port, "mlp", "REJECTED")

    async def run() -> dict:
        codes: dict = {}
        async with grpc.aio.insecure_channel(s.url) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)

            async def one(i: int) -> None:
                try:
                    await stub.ModelInfer(mlp_request(i), timeout=60)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as e:
                    code = e.code()
                codes[code] = codes.get(code, 0) + 1

            await asyncio.gather(*(one(i) for i in range(calls)))
        return codes

    codes = asyncio.run(run())
    return codes, failures(s.metrics_port, "mlp", "REJECTED") - before


@pytest.mark.parametrize("frontends", [1, 0])
def test_two_thousand_calls_on_one_connection_are_ok_or_counted_unavailable(tmp_path, frontends):
    s = Serve(_repo(tmp_path), frontends=frontends)
    try:
        asyncio.run(warm(s.url))
        codes, rejected = _overload(s, 2000)
        print(f"\n2000 calls on one connection, --frontends {frontends}: {codes}; counted rejected {rejected:.0f}")
        assert sum(codes.values()) == 2000
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
        assert codes.get(grpc.StatusCode.OK, 0) > 0
        assert rejected == codes.get(grpc.StatusCode.UNAVAILABLE, 0)
        # the server's own limit answers UNAVAILABLE, and counts it: a front end that takes fewer calls at once
        # one request in flight per front end: of 256 calls that arrive together (the stream limit), all but one
        # wait for the engine's answer, which takes at least one more turn of the loop, so some are refused
        s2 = Serve(_repo(tmp_path / "small"), frontends=frontends, args=["--max-inflight", "1"])
        try:
            asyncio.run(warm(s2.url))
            codes, rejected = _overload(s2, 2000)
            print(f"2000 calls on one connection, --max-inflight 1: {codes}; counted rejected {rejected:.0f}")
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
            assert codes.get(grpc.StatusCode.UNAVAILABLE, 0) > 0
            assert rejected == codes[grpc.StatusCode.UNAVAILABLE]
        finally:
            stopped(s2)
    finally:
        stopped(s)


def _rapid_reset(url: str, seconds: float, result) -> None:
    """In its own process: one connection that starts calls and resets them (RST_STREAM) in a tight loop."""

    async def run() -> int:
        cancels = 0
        async with grpc.aio.insecure_channel(url) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            request = mlp_request()
            await stub.ModelInfer(request, timeout=30)  # connected
            stop = time.monotonic() + seconds
            while time.monotonic() < stop:
                batch = [stub.ModelInfer(request) for _ in range(200)]
                await asyncio.sleep(0)  # the calls start (HEADERS on the wire), then each is reset
                await asyncio.sleep(0)
                for call in batch:
                    call.cancel()
                cancels += len(batch)
                await asyncio.sleep(0)
        return cancels

    result.put(asyncio.run(run()))


def test_rapid_reset_on_one_connection_does_not_fail_good_requests_on_another(tmp_path):
    import multiprocessing

    s = Serve(_repo(tmp_path), frontends=1)
    try:
        asyncio.run(warm(s.url))
        before = tree_rss_mib(s)
        ctx = multiprocessing.get_context("spawn")
        result = ctx.Queue()
        attacker = ctx.Process(target=_rapid_reset, args=(s.url, 5.0, result), daemon=True)
        attacker.start()
        time.sleep(1.0)  # the attacker is up and resetting

        async def good() -> Tuple[List[float], List[object]]:
            latencies: List[float] = []
            errors: List[object] = []
            stop = time.monotonic() + 3.5
            async with grpc.aio.insecure_channel(s.url) as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)

                async def client(c: int) -> None:
                    while time.monotonic() < stop:
                        t0 = time.monotonic()
                        try:
                            await stub.ModelInfer(mlp_request(c), timeout=20)
                            latencies.append(time.monotonic() - t0)
                        except grpc.aio.AioRpcError as e:
                            errors.append((e.code(), e.details()))

                await asyncio.gather(*(client(c) for c in range(8)))
            return latencies, errors

        with TreeRss(s) as rss:
            latencies, errors = asyncio.run(good())
        cancels = result.get(timeout=60)
        attacker.join(10)
        print(f"\nrapid reset: {cancels} calls started and reset on one connection in 5 s; another connection "
              f"meanwhile: {len(latencies)} ok, p50 {stats.median(latencies) * 1e3:.1f} ms, "
              f"max {max(latencies) * 1e3:.0f} ms, errors {errors[:3]} ({len(errors)}); server tree RSS "
              f"{before:.0f} MiB -> peak {rss.peak:.0f} MiB")
        assert cancels >= 5000  # 8,800-46,000 on the 2-core box, client and server sharing it
        assert rss.peak - before < RESET_RSS_BOUND_MIB
        assert not errors
        assert len(latencies) >= 8
        asyncio.run(warm(s.url))  # and the server answers afterwards
    finally:
        stopped(s)


# ---- item 10: memory returned after bursts --------------------------------------------------------------------------
@pytest.mark.parametrize("frontends", [1, 0])
def test_memory_comes_back_after_a_flood_of_large_requests(tmp_path, frontends):
    s = Serve(_repo(tmp_path), frontends=frontends)
    try:
        asyncio.run(warm(s.url))
        before = tree_rss_mib(s)

        async def flood() -> Tuple[int, List[object]]:
            done = 0
            errors: List[object] = []
            stop = time.monotonic() + 3.0
            async with grpc.aio.insecure_channel(s.url, options=[("grpc.max_receive_message_length", 64 * MiB),
                                                                ("grpc.max_send_message_length", 64 * MiB)]) as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)

                async def client(c: int) -> None:
                    nonlocal done
                    request = identity_request("id8m", BIG_DIMS, c, batch=False)
                    while time.monotonic() < stop:
                        try:
                            await stub.ModelInfer(request, timeout=60)
                            done += 1
                        except grpc.aio.AioRpcError as e:
                            errors.append(e.code())

                await asyncio.gather(*(client(c) for c in range(32)))
            return done, errors

        with TreeRss(s) as rss:
            done, errors = asyncio.run(flood())
        settled = time.monotonic()
        after = tree_rss_mib(s)
        while after - before >= FLOOD_RSS_BOUND_MIB and time.monotonic() - settled < 20.0:
            time.sleep(0.5)  # the trimmers run once the server is idle, at most once a second each
            after = tree_rss_mib(s)
        print(f"\nflood, --frontends {frontends}: {done} requests of 8 MiB ({done * 8} MiB each way) from 32 clients "
              f"in 3 s, errors {errors[:3]}; server tree RSS {before:.0f} MiB -> peak {rss.peak:.0f} MiB -> "
              f"{after:.0f} MiB {time.monotonic() - settled:.1f} s later (+{after - before:.0f})")
        assert done >= 32 and set(errors) <= {grpc.StatusCode.UNAVAILABLE}
        assert after - before < FLOOD_RSS_BOUND_MIB
        asyncio.run(warm(s.url))
    finally:
        stopped(s)
