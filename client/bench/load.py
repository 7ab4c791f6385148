"""Closed-loop (N in flight) and open-loop (Poisson arrivals) load on asyncio, one process, one loop.

The loops drive any load with ``channels`` and ``send(index)``: ``Load`` here (grpc.aio, the
grpcio transport) or ``h2load.H2Load`` (the generator's own HTTP/2 client, the default).
The request is serialized once and sent as bytes, and responses are not parsed, so the generator
spends its time in gRPC rather than in protobuf. Calls spread over one channel per
``inflight_per_channel`` requests in flight (``_channel.INFLIGHT_PER_CHANNEL`` unless told).
Open-loop latency runs from each request's *scheduled* send time: when the server (or this
generator) falls behind, the wait shows up in the percentiles instead of silently thinning the
load (coordinated omission).
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import grpc
import numpy as np

from trtserve.client._channel import ChannelSpec
from trtserve.client._errors import InferenceServerError

__all__ = ["LevelRecords", "Load", "run_closed", "run_open"]

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
ProgressFn = Callable[[str, float, float, int, int], None]  # (phase, elapsed_s, phase_total_s, ok, errors)


@dataclass
class LevelRecords:
    """Raw results of one level: (key time, latency_s) per success, (key time, status) per error.

    The key time is the completion time in a closed loop and the scheduled send time in an open
    one, so an open-loop window holds every request *due* in it, however late it finished.
    """

    window_start: float
    window_end: float
    ok: List[Tuple[float, float]] = field(default_factory=list)
    errors: List[Tuple[float, str]] = field(default_factory=list)
    send_lags: List[float] = field(default_factory=list)
    last_done: float = 0.0  # open loop: when the last request due in the window finished

    @property
    def window_s(self) -> float:
        """Seconds the window's requests took: the window, or longer when answers came after it."""
        return max(self.window_end, self.last_done) - self.window_start

    def in_window(self) -> Tuple[List[float], Dict[str, int], List[float]]:
        """Latencies, errors by status, send lags of the requests keyed inside the measurement window."""
        lats = [lat for done, lat in self.ok if self.window_start <= done < self.window_end]
        errs: Dict[str, int] = {}
        for done, status in self.errors:
            if self.window_start <= done < self.window_end:
                errs[status] = errs.get(status, 0) + 1
        return lats, errs, self.send_lags


class Load:
    """Owns the channels of one benchmark run; ``async with Load(spec, payload, n_channels)``."""

    def __init__(self, spec: ChannelSpec, payload: bytes, channels: int, timeout_s: Optional[float] = None) -> None:
        self._spec = spec
        self._payload = payload
        self._n = max(1, channels)
        self._timeout_s = timeout_s
        self._channels: List[grpc.aio.Channel] = []
        self._calls: List[grpc.aio.UnaryUnaryMultiCallable] = []

    async def __aenter__(self) -> "Load":
        for _ in range(self._n):
            # a distinct channel arg keeps gRPC from sharing one subchannel (one TCP connection) among them
            options = self._spec.options + (("trtserve.bench_channel", len(self._channels)),)
            if self._spec.credentials is None:
                ch = grpc.aio.insecure_channel(self._spec.target, options=options)
            else:
                ch = grpc.aio.secure_channel(self._spec.target, self._spec.credentials, options=options)
            self._channels.append(ch)
            # identity (de)serializers: the request is bytes already and the response stays unparsed
            self._calls.append(ch.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None))
        try:
            await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in self._channels)), 30.0)
        except asyncio.TimeoutError:
            await self.__aexit__()
            raise InferenceServerError("UNAVAILABLE", f"could not connect to {self._spec.target} within 30 s") from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(ch.close() for ch in self._channels))

    @property
    def channels(self) -> int:
        return len(self._channels)

    async def send(self, index: int) -> Optional[str]:
        """One ModelInfer on channel ``index % channels``; None on success, else the status name."""
        call = self._calls[index % len(self._calls)]
        try:
            await call(self._payload, timeout=self._timeout_s, metadata=self._spec.metadata or None)
            return None
        except grpc.aio.AioRpcError as e:
            return e.code().name


async def _report(progress: Optional[ProgressFn], t0: float, warmup_s: float, duration_s: float,
                  rec: LevelRecords, done: asyncio.Event, interval_s: float = 0.25) -> None:
    """Calls ``progress`` every interval until ``done``; sleeps in between (no busy wait)."""
    if progress is None:
        return
    loop = asyncio.get_running_loop()
    while not done.is_set():
        elapsed = loop.time() - t0
        phase, total = ("warmup", warmup_s) if elapsed < warmup_s else ("measure", duration_s)
        progress(phase, min(elapsed if phase == "warmup" else elapsed - warmup_s, total), total,
                 len(rec.ok), len(rec.errors))
        try:
            await asyncio.wait_for(done.wait(), interval_s)
        except asyncio.TimeoutError:
            pass


async def _start_time(start_at: Optional[float]) -> float:
    """Now, or ``start_at`` (time.monotonic(), the loop's clock) after sleeping until it: aligns processes."""
    loop = asyncio.get_running_loop()
    if start_at is None:
        return loop.time()
    await asyncio.sleep(max(0.0, start_at - loop.time()))
    return start_at


async def run_closed(load: Load, concurrency: int, warmup_s: float, duration_s: float,
                     progress: Optional[ProgressFn] = None, start_at: Optional[float] = None) -> LevelRecords:
    """N workers each send, await the answer, send again; measures completions in [warmup, warmup+duration)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    loop = asyncio.get_running_loop()
    t0 = await _start_time(start_at)
    rec = LevelRecords(t0 + warmup_s, t0 + warmup_s + duration_s)
    stop_at = rec.window_end
    per_channel = math.ceil(concurrency / load.channels)

    async def worker(i: int) -> None:
        channel = i // per_channel  # workers 0..k-1 share channel 0, and so on: ~k in flight per channel
        while True:
            start = loop.time()
            if start >= stop_at:
                return
            status = await load.send(channel)
            end = loop.time()
            if status is None:
                rec.ok.append((end, end - start))
            else:
                rec.errors.append((end, status))

    done = asyncio.Event()
    reporter = asyncio.ensure_future(_report(progress, t0, warmup_s, duration_s, rec, done))
    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        done.set()
        await reporter
    return rec


def poisson_schedule(rate: float, duration_s: float, seed: int = 0) -> np.ndarray:
    """Send offsets (s from start) of a Poisson process at ``rate``/s over ``duration_s``; pure, seeded."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    rng = np.random.default_rng(seed)
    n = int(rate * duration_s * 1.2) + 16
    offsets = np.cumsum(rng.exponential(1.0 / rate, n))
    while offsets[-1] < duration_s:  # rare: the draw ran short
        offsets = np.concatenate([offsets, offsets[-1] + np.cumsum(rng.exponential(1.0 / rate, n))])
    return offsets[offsets < duration_s]


async def run_open(load: Load, rate: float, warmup_s: float, duration_s: float, seed: int = 0,
                   max_inflight: int = 20000, progress: Optional[ProgressFn] = None,
                   start_at: Optional[float] = None) -> LevelRecords:
    """Poisson arrivals at ``rate``/s; each latency counts from the scheduled send time.

    At ``max_inflight`` outstanding requests the scheduler waits for one to finish; the waiting
    still counts in the latency of the requests that were due (that is the queueing a user sees).
    """
    loop = asyncio.get_running_loop()
    schedule = poisson_schedule(rate, warmup_s + duration_s, seed)
    t0 = await _start_time(start_at) if start_at is not None else loop.time() + 0.01
    rec = LevelRecords(t0 + warmup_s, t0 + warmup_s + duration_s)
    slots = asyncio.Semaphore(max_inflight)
    tasks = set()

    async def fire(i: int, due: float) -> None:
        try:
            lag = loop.time() - due
            if due >= rec.window_start:
                rec.send_lags.append(max(0.0, lag))
            status = await load.send(i)
            end = loop.time()
            if status is None:
                rec.ok.append((due, end - due))
            else:
                rec.errors.append((due, status))
            if rec.window_start <= due < rec.window_end:
                rec.last_done = max(rec.last_done, end)
        finally:
            slots.release()

    done = asyncio.Event()
    reporter = asyncio.ensure_future(_report(progress, t0, warmup_s, duration_s, rec, done))
    try:
        for i, offset in enumerate(schedule):
            due = t0 + float(offset)
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await slots.acquire()
            task = asyncio.ensure_future(fire(i, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        done.set()
        await reporter
    return rec
