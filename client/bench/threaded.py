"""The same closed and open loops on the blocking gRPC API (``--engine threads``).

Closed loop: one thread per request in flight, each making blocking calls (perf_analyzer's sync
mode); open loop: calls started with ``.future()`` and recorded on gRPC's completion thread.
Why a second engine: grpc.aio hands every completion from gRPC's poller thread to the event loop,
one thread wake-up more per call; a blocking call waits on its own thread. That matters for the
latency of a lone request on a small or busy machine (2-core box, mlp example, concurrency 1: p50
1.22 ms with grpc.aio, 0.87 ms blocking, 0.95 ms perf_analyzer), while grpc.aio carries more
requests per second with many in flight, so asyncio stays the default. Records have the same
shape as load.py's, so stats and reports do not care which engine ran. The closed loop drives
any load with ``channels`` and ``call(index)``: ``ThreadLoad`` (grpcio) or ``h2sync.H2ThreadLoad``.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, List, Optional, Set

import grpc

from trtserve.client._channel import ChannelSpec
from trtserve.client._errors import InferenceServerError
from trtserve.client.bench.load import MODEL_INFER, LevelRecords, ProgressFn, poisson_schedule

__all__ = ["ThreadLoad", "run_closed_threaded", "run_open_threaded"]


class ThreadLoad:
    """Owns blocking channels for one run; ``with ThreadLoad(spec, payload, n)``."""

    def __init__(self, spec: ChannelSpec, payload: bytes, channels: int, timeout_s: Optional[float] = None) -> None:
        self._spec = spec
        self._payload = payload
        self._n = max(1, channels)
        self._timeout_s = timeout_s
        self._channels: List[grpc.Channel] = []
        self._calls: List[grpc.UnaryUnaryMultiCallable] = []
        self._inflight: Set[grpc.Future] = set()

    def __enter__(self) -> "ThreadLoad":
        for i in range(self._n):
            options = self._spec.options + (("trtserve.bench_channel", i),)  # one TCP connection each
            if self._spec.credentials is None:
                ch = grpc.insecure_channel(self._spec.target, options=options)
            else:
                ch = grpc.secure_channel(self._spec.target, self._spec.credentials, options=options)
            self._channels.append(ch)
            self._calls.append(ch.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None))
        try:
            for ch in self._channels:
                grpc.channel_ready_future(ch).result(timeout=30)
        except grpc.FutureTimeoutError:
            self.__exit__()
            raise InferenceServerError("UNAVAILABLE", f"could not connect to {self._spec.target} within 30 s") from None
        return self

    def __exit__(self, *exc: object) -> None:
        for ch in self._channels:
            ch.close()

    @property
    def channels(self) -> int:
        return len(self._channels)

    def call(self, index: int) -> Optional[str]:
        """One blocking ModelInfer on channel ``index % channels``; None on success, else the status name."""
        try:
            self._calls[index % len(self._calls)](self._payload, timeout=self._timeout_s,
                                                  metadata=self._spec.metadata or None)
            return None
        except grpc.RpcError as e:
            return e.code().name

    def start(self, index: int, on_done: Callable[[Optional[str]], None]) -> None:
        """Starts one ModelInfer on channel ``index % channels``; ``on_done(status or None)`` runs on completion."""
        future = self._calls[index % len(self._calls)].future(self._payload, timeout=self._timeout_s,
                                                              metadata=self._spec.metadata or None)
        self._inflight.add(future)  # a dropped call future cancels its RPC: hold it until it is done

        def done(f: grpc.Future) -> None:
            self._inflight.discard(f)
            code = f.code()
            on_done(None if code == grpc.StatusCode.OK else getattr(code, "name", "UNKNOWN"))

        future.add_done_callback(done)


def _report_until(finished: threading.Event, progress: Optional[ProgressFn], t0: float, warmup_s: float,
                  duration_s: float, rec: LevelRecords, interval_s: float = 0.25) -> None:
    """Blocks until ``finished``, calling ``progress`` every interval (Event.wait: no busy wait)."""
    while not finished.wait(interval_s if progress is not None else None):
        elapsed = time.monotonic() - t0
        if elapsed < warmup_s:
            progress("warmup", elapsed, warmup_s, len(rec.ok), len(rec.errors))
        else:
            progress("measure", min(elapsed - warmup_s, duration_s), duration_s, len(rec.ok), len(rec.errors))


def _wait_until(start_at: Optional[float]) -> float:
    """Now, or ``start_at`` (time.monotonic()) after sleeping until it, so other clocks line up."""
    if start_at is None:
        return time.monotonic()
    time.sleep(max(0.0, start_at - time.monotonic()))
    return start_at


def run_closed_threaded(load: ThreadLoad, concurrency: int, warmup_s: float, duration_s: float,
                        progress: Optional[ProgressFn] = None, start_at: Optional[float] = None) -> LevelRecords:
    """N threads, each a blocking call after another (perf_analyzer's sync mode): no hand-off per call."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    clock = time.monotonic  # the clock asyncio and the other engines use: records and windows compare
    t0 = _wait_until(start_at)
    rec = LevelRecords(t0 + warmup_s, t0 + warmup_s + duration_s)
    per_channel = -(-concurrency // load.channels)
    finished = threading.Event()
    lock = threading.Lock()
    running = [concurrency]

    def worker(i: int) -> None:
        try:
            while True:
                start = clock()
                if start >= rec.window_end:
                    return
                status = load.call(i // per_channel)
                end = clock()
                if status is None:
                    rec.ok.append((end, end - start))
                else:
                    rec.errors.append((end, status))
        finally:
            with lock:
                running[0] -= 1
                if running[0] == 0:
                    finished.set()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True, name=f"bench-{i}") for i in range(concurrency)]
    for t in threads:
        t.start()
    _report_until(finished, progress, t0, warmup_s, duration_s, rec)
    for t in threads:
        t.join()
    return rec


def run_open_threaded(load: ThreadLoad, rate: float, warmup_s: float, duration_s: float, seed: int = 0,
                      max_inflight: int = 20000, progress: Optional[ProgressFn] = None,
                      start_at: Optional[float] = None) -> LevelRecords:
    """Poisson arrivals at ``rate``/s from this thread; latency from each scheduled send time."""
    clock = time.monotonic
    schedule = poisson_schedule(rate, warmup_s + duration_s, seed)
    t0 = _wait_until(start_at) if start_at is not None else clock() + 0.01
    rec = LevelRecords(t0 + warmup_s, t0 + warmup_s + duration_s)
    slots = threading.BoundedSemaphore(max_inflight)
    lock = threading.Lock()
    pending = [len(schedule)]
    finished = threading.Event()
    if not len(schedule):
        finished.set()
    reporter = threading.Thread(target=_report_until, args=(finished, progress, t0, warmup_s, duration_s, rec),
                                daemon=True)
    reporter.start()

    def fire(i: int, due: float) -> None:
        lag = clock() - due
        in_window = rec.window_start <= due < rec.window_end
        if in_window:
            rec.send_lags.append(max(0.0, lag))

        def on_done(status: Optional[str]) -> None:
            end = clock()
            if status is None:
                rec.ok.append((due, end - due))
            else:
                rec.errors.append((due, status))
            slots.release()
            with lock:
                if in_window and end > rec.last_done:
                    rec.last_done = end
                pending[0] -= 1
                if pending[0] == 0:
                    finished.set()

        load.start(i, on_done)

    for i, offset in enumerate(schedule):
        due = t0 + float(offset)
        wait = due - clock()
        if wait > 0:
            time.sleep(wait)
        slots.acquire()  # at max_inflight, wait here; the wait counts in the latency of the late requests
        fire(i, due)
    finished.wait()
    reporter.join()
    return rec
