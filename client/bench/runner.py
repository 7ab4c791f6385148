"""One benchmark run: read the model, build one request, sweep the levels, summarize each.

Separate from the CLI so tests and notebooks call ``await run(BenchConfig(...))`` directly.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import platform
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, TextIO, Tuple

import numpy as np

from trtserve import dtypes
from trtserve.client import _codec
from trtserve.client._channel import INFLIGHT_PER_CHANNEL, make_spec
from trtserve.client._errors import InferenceServerError
from trtserve.client.aio import AsyncInferenceClient
from trtserve.client.bench import inputs as bench_inputs
from trtserve.client.bench.h2load import H2Load
from trtserve.client.bench.h2sync import H2ThreadLoad
from trtserve.client.bench.h2target import H2Target, h2_address
from trtserve.client.bench.load import LevelRecords, Load, run_closed, run_open
from trtserve.client.bench.threaded import ThreadLoad, run_closed_threaded, run_open_threaded
from trtserve.client.bench.stats import LevelStats, server_view, summarize

__all__ = ["BenchConfig", "BenchResult", "Progress", "run"]


@dataclass
class BenchConfig:
    """What to load and how; exactly one of ``concurrency`` / ``request_rate`` is non-empty."""

    url: str
    model: str
    version: str = ""
    concurrency: Sequence[int] = ()
    request_rate: Sequence[float] = ()
    duration_s: float = 5.0
    warmup_s: float = 1.0
    batch: int = 1
    shapes: Mapping[str, Sequence[int]] = field(default_factory=dict)
    input_data: str = "random"  # random | zero | path to .npz
    timeout_s: Optional[float] = 30.0
    inflight_per_channel: int = INFLIGHT_PER_CHANNEL
    processes: int = 1  # generator processes (asyncio engine in each); more when one process is the limit
    shared_memory: str = "none"  # none | system | cuda: tensors in regions registered once (client/shm.py)
    output_shared_memory_size: int = 102400  # bytes per output region when its shape has -1 (perf_analyzer's)
    # auto (default): blocking calls for closed-loop levels of <= AUTO_THREADS_MAX in flight, the event loop
    # above; asyncio: one event loop throughout; threads: blocking calls throughout (see bench/threaded.py)
    engine: str = "auto"
    # auto (default): h2 when the URL is one HOST:PORT, else grpcio; h2: our own HTTP/2 client
    # (h2conn.py, ~1/4 of grpcio's CPU per call); grpcio: gRPC's Python client (resolver, balancing)
    transport: str = "auto"
    seed: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    tls: Mapping[str, object] = field(default_factory=dict)  # make_spec keyword arguments (root_cert, ...)

    def mode(self) -> str:
        if bool(self.concurrency) == bool(self.request_rate):
            raise ValueError("give exactly one of --concurrency and --request-rate")
        return "concurrency" if self.concurrency else "request_rate"


@dataclass
class BenchResult:
    """Per-level statistics plus the raw in-window latencies (s) that the plot draws."""

    config: BenchConfig
    target: str
    batch: int
    inputs: List[Tuple[str, str, Tuple[int, ...]]]
    channels: int
    levels: List[LevelStats] = field(default_factory=list)
    latencies_s: Dict[float, List[float]] = field(default_factory=dict)
    transport: str = "grpcio"  # what carried the calls (config.transport resolved)

    def as_dict(self) -> dict:
        """JSON-ready summary: run description, generator, and one entry per level."""
        c = self.config
        return {
            "model": c.model, "version": c.version, "url": c.url, "target": self.target,
            "mode": c.mode(), "batch": self.batch, "duration_s": c.duration_s, "warmup_s": c.warmup_s,
            "input_data": c.input_data, "shared_memory": c.shared_memory,
            "inputs": [{"name": n, "datatype": d, "shape": list(s)} for n, d, s in self.inputs],
            "generator": {"engine": c.engine, "transport": self.transport, "processes": c.processes,
                          "channels": self.channels,
                          "engine_per_level": [level_engine(c.engine, c.mode(), s.level) if c.processes == 1
                                               else "asyncio" for s in self.levels],
                          "inflight_per_channel": c.inflight_per_channel,
                          "python": platform.python_version(), "machine": platform.machine(),
                          "host": platform.node()},
            "levels": [s.as_dict() for s in self.levels],
        }


class Progress:
    """The progress line on a stream: redrawn in place on a terminal, one line per level otherwise."""

    def __init__(self, stream: Optional[TextIO] = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._label = ""

    def level(self, label: str) -> None:
        self._label = label
        if not self._tty:  # a log gets one line as each level starts and one as it ends
            self._stream.write(f"{label}: running\n")
            self._stream.flush()

    def update(self, phase: str, elapsed_s: float, total_s: float, ok: int, errors: int) -> None:
        if not self._tty:
            return
        width = 20
        filled = int(width * (elapsed_s / total_s if total_s > 0 else 1.0))
        bar = "#" * filled + "-" * (width - filled)
        counts = f"ok={ok} err={errors}" if ok >= 0 else ""
        self._stream.write(f"\r{self._label} {phase:7s} [{bar}] {elapsed_s:5.1f}/{total_s:.0f}s {counts}   ")
        self._stream.flush()

    def finish(self, stats: LevelStats) -> None:
        errs = ",".join(f"{k}:{v}" for k, v in stats.errors_by_status.items()) or "0"
        line = (f"{self._label}: {stats.requests_per_s:.1f} req/s, p50 {stats.p50_ms:.3f} ms, "
                f"p99 {stats.p99_ms:.3f} ms, errors {errs}")
        # on a terminal, overwrite the progress bar (padding clears what is left of it)
        self._stream.write(f"\r{line}{' ' * 10}\n" if self._tty else f"{line}\n")
        self._stream.flush()


@dataclass
class _Prepared:
    """What one run sends: the tensors, their specs and batch, and the byte size of every output."""

    data: Dict[str, np.ndarray]
    types: Dict[str, str]
    batch: int
    specs: List[bench_inputs.TensorSpec]
    output_sizes: Dict[str, int]


async def _prepare(client: AsyncInferenceClient, config: BenchConfig) -> _Prepared:
    """Reads metadata and config and builds the tensors every call reuses."""
    meta = await client.model_metadata(config.model, config.version or None)
    model_config = await client.model_config(config.model, config.version or None)
    mbs = int(model_config.max_batch_size)
    if config.input_data not in ("random", "zero"):
        with np.load(config.input_data, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        names = [t.name for t in meta.inputs]
        missing = [n for n in names if n not in arrays]
        if missing:
            raise ValueError(f"{config.input_data}: no array for input(s) {missing}; it holds {sorted(arrays)}")
        batch = int(arrays[names[0]].shape[0]) if mbs > 0 and names else 1
        shapes = {n: list(arrays[n].shape[1:] if mbs > 0 else arrays[n].shape) for n in names}
        specs = bench_inputs.plan_inputs(meta, mbs, batch, shapes)
        data = {n: arrays[n] for n in names}
    else:
        batch = config.batch
        specs = bench_inputs.plan_inputs(meta, mbs, batch, config.shapes)
        data = bench_inputs.make_data(specs, config.input_data, config.seed)
    sizes = {}
    for t in meta.outputs:  # as perf_analyzer: exact when the shape is known, else --output-shared-memory-size
        dims = ([batch] + list(t.shape[1:])) if mbs > 0 else list(t.shape)
        dt = dtypes.BY_WIRE.get(t.datatype)
        known = dt is not None and dt.itemsize > 0 and all(d >= 0 for d in dims)
        sizes[t.name] = max(1, math.prod(dims) * dt.itemsize) if known else config.output_shared_memory_size
    return _Prepared(data, {s.name: s.datatype for s in specs}, batch, specs, sizes)


async def _tick(update, warmup_s: float, duration_s: float, done: asyncio.Event, interval_s: float = 0.25) -> None:
    """Time-only progress while other processes carry the load (their counts arrive at the end)."""
    if update is None:
        return
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while not done.is_set():
        elapsed = loop.time() - t0
        if elapsed < warmup_s:
            update("warmup", elapsed, warmup_s, -1, -1)
        else:
            update("measure", min(elapsed - warmup_s, duration_s), duration_s, -1, -1)
        try:
            await asyncio.wait_for(done.wait(), interval_s)
        except asyncio.TimeoutError:
            pass


def _start_level(progress: Optional[Progress], mode: str, level: float):
    if progress is None:
        return None
    progress.level(f"concurrency {int(level)}" if mode == "concurrency" else f"rate {level:g}/s")
    return progress.update


def _finish_level(result: BenchResult, progress: Optional[Progress], mode: str, level: float,
                  rec: LevelRecords, server: Optional[Dict[str, float]] = None) -> None:
    lats, errs, lags = rec.in_window()
    stats = summarize(mode, int(level) if mode == "concurrency" else level, rec.window_s, result.batch, lats,
                      errs, lags, server)
    result.levels.append(stats)
    result.latencies_s[level] = lats
    if progress is not None:
        progress.finish(stats)


AUTO_THREADS_MAX = 4


def level_engine(engine: str, mode: str, level: float) -> str:
    """The engine one level runs on. ``auto``: a few requests in flight go through the blocking stub, which
    waits on its own thread instead of handing each completion from gRPC's poller to the event loop (one
    wake-up less per call: measured on the 2-core box at concurrency 1, 633-733 vs 571-586 req/s for
    grpc.aio against perf_analyzer's 765); many in flight go through grpc.aio, which carries more of them."""
    if engine != "auto":
        return engine
    return "threads" if mode == "concurrency" and level <= AUTO_THREADS_MAX else "asyncio"


def resolve_transport(config: BenchConfig, mode: str) -> str:
    """The transport of the whole run: ``auto`` takes h2 where it can carry it, grpcio elsewhere.

    h2 dials one HOST:PORT (several addresses and ``dns:///`` need grpcio's resolver and balancer),
    and its blocking path serves closed loops only (an open loop on ``--engine threads`` needs
    grpcio's futures). An explicit ``h2`` that cannot be honoured is a ValueError, not a fallback.
    """
    if config.transport not in ("auto", "h2", "grpcio"):
        raise ValueError(f"transport must be auto, h2 or grpcio, got {config.transport!r}")
    if config.transport == "grpcio":
        return "grpcio"
    problem = None
    if h2_address(config.url) is None:
        problem = f"--transport h2 dials one HOST:PORT, not {config.url!r}"
    elif mode == "request_rate" and config.engine == "threads" and config.processes == 1:
        problem = "--transport h2 runs an open loop on the asyncio engine only (not --engine threads)"
    if problem is None:
        return "h2"
    if config.transport == "h2":
        raise ValueError(problem)
    return "grpcio"


async def run(config: BenchConfig, progress: Optional[Progress] = None) -> BenchResult:
    """Sweeps every level in order on one set of channels and returns their statistics."""
    mode = config.mode()
    if config.engine not in ("auto", "threads", "asyncio"):
        raise ValueError(f"engine must be auto, threads or asyncio, got {config.engine!r}")
    if config.processes < 1 or (config.processes > 1 and config.engine == "threads"):
        raise ValueError(f"--processes must be >= 1 and needs the asyncio engine, got {config.processes} "
                         f"with {config.engine}")
    levels: List[float] = [float(x) for x in (config.concurrency or config.request_rate)]
    if any(x <= 0 for x in levels):
        raise ValueError(f"levels must be positive, got {levels}")
    if config.duration_s <= 0 or config.warmup_s < 0:
        raise ValueError(f"duration must be > 0 and warmup >= 0, got {config.duration_s} and {config.warmup_s}")
    if config.shared_memory not in ("none", "system", "cuda"):
        raise ValueError(f"shared memory must be none, system or cuda, got {config.shared_memory!r}")
    transport = resolve_transport(config, mode)  # before connecting: a refused --transport h2 fails fast
    async with AsyncInferenceClient(config.url, headers=config.headers, **dict(config.tls)) as client:
        prep = await _prepare(client, config)
        version = config.version or None
        if config.shared_memory == "none":
            request = _codec.build_infer_request(config.model, prep.data, version=version, datatypes=prep.types)
            return await _sweep(config, progress, mode, transport, levels, prep, request.SerializeToString(),
                                client)
        from trtserve.client import shm  # inputs written once into registered regions, outputs land in others

        async with shm.registered_request(client, config.model, prep.data, prep.output_sizes,
                                          kind=config.shared_memory, datatypes=prep.types,
                                          version=version) as request:
            return await _sweep(config, progress, mode, transport, levels, prep, request.SerializeToString(),
                                client)


async def _server_window(client: AsyncInferenceClient, config: BenchConfig, start: float,
                         end: float) -> Optional[Dict[str, float]]:
    """ModelStatistics snapshots at the window's edges (loop clock), turned into the server's means."""
    loop = asyncio.get_running_loop()

    async def snapshot() -> Dict[str, Tuple[int, int]]:
        response = await client.model_statistics(config.model, config.version or None, timeout=10)
        totals: Dict[str, Tuple[int, int]] = {}
        for ms in response.model_stats:
            if ms.name != config.model:
                continue
            for name in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
                d = getattr(ms.inference_stats, name)
                count, ns = totals.get(name, (0, 0))
                totals[name] = (count + int(d.count), ns + int(d.ns))
        return totals

    try:
        await asyncio.sleep(max(0.0, start - loop.time()))
        before = await snapshot()
        await asyncio.sleep(max(0.0, end - loop.time()))
        after = await snapshot()
    except InferenceServerError:
        return None
    return server_view(before, after)


async def _sweep(config: BenchConfig, progress: Optional[Progress], mode: str, transport: str, levels: List[float],
                 prep: _Prepared, payload: bytes, client: AsyncInferenceClient) -> BenchResult:
    """Every level in order on one set of channels, each call sending ``payload``; the server's
    statistics for the same window are read beside the load when it keeps them."""
    # retries=0: a load tester counts an UNAVAILABLE, it must not hide it behind a retry
    spec = make_spec(config.url, headers=config.headers, retries=0, **dict(config.tls))
    if mode == "concurrency":
        peak_inflight = max(levels)
    else:  # Little's law with a 50 ms latency budget; more channels than needed cost little
        peak_inflight = max(levels) * 0.05
    channels = max(1, math.ceil(peak_inflight / max(1, config.inflight_per_channel)))
    result = BenchResult(config, spec.target, prep.batch, [(s.name, s.datatype, s.shape) for s in prep.specs],
                         channels, transport=transport)
    target = H2Target.from_url(config.url, spec.metadata, config.tls) if transport == "h2" else None
    try:
        keeps_stats = "statistics" in (await client.server_metadata(timeout=10)).extensions
    except InferenceServerError:
        keeps_stats = False
    loop = asyncio.get_running_loop()
    w, d = config.warmup_s, config.duration_s
    async with contextlib.AsyncExitStack() as stack:
        if config.processes > 1:
            from trtserve.client.bench.procs import ProcessPool, channels_each

            spec_kwargs = dict(config.tls, url=config.url, headers=dict(config.headers), retries=0)
            each = channels_each(channels, config.processes)
            result.channels = each * config.processes
            pool = ProcessPool(config.processes, spec_kwargs, payload, each, config.timeout_s, transport)
            await loop.run_in_executor(None, pool.__enter__)
            stack.push_async_callback(loop.run_in_executor, None, pool.__exit__)
            lead_s = 0.5  # the processes need the command before the start

            async def one(level: float, start_at: float, update) -> LevelRecords:
                done = asyncio.Event()
                ticker = asyncio.ensure_future(_tick(update, w, d, done))
                try:
                    return await loop.run_in_executor(None, pool.run_level, mode, level, w, d, config.seed, start_at)
                finally:
                    done.set()
                    await ticker
        else:
            loads: Dict[str, object] = {}  # made on first use: an auto sweep may need both engines
            lead_s = 0.02

            async def one(level: float, start_at: float, update) -> LevelRecords:
                engine = level_engine(config.engine, mode, level)
                if engine == "asyncio":
                    if "asyncio" not in loads:
                        loads["asyncio"] = await stack.enter_async_context(
                            H2Load(target, payload, channels, config.timeout_s) if target is not None
                            else Load(spec, payload, channels, config.timeout_s))
                        start_at = max(start_at, loop.time() + lead_s)
                    load = loads["asyncio"]
                    if mode == "concurrency":
                        return await run_closed(load, int(level), w, d, update, start_at)  # type: ignore[arg-type]
                    return await run_open(load, level, w, d, config.seed, progress=update,  # type: ignore[arg-type]
                                          start_at=start_at)
                if "threads" not in loads:
                    tload = (H2ThreadLoad(target, payload, channels, config.timeout_s) if target is not None
                             else ThreadLoad(spec, payload, channels, config.timeout_s))
                    await loop.run_in_executor(None, tload.__enter__)
                    stack.callback(tload.__exit__)
                    loads["threads"] = tload
                    start_at = max(start_at, loop.time() + lead_s)
                tl = loads["threads"]
                if mode == "concurrency":
                    return await loop.run_in_executor(None, run_closed_threaded, tl, int(level), w, d, update,
                                                      start_at)
                return await loop.run_in_executor(
                    None, functools.partial(run_open_threaded, tl, level, w, d, config.seed, progress=update,
                                            start_at=start_at))

        for level in levels:
            update = _start_level(progress, mode, level)
            start_at = loop.time() + lead_s
            server = (asyncio.ensure_future(_server_window(client, config, start_at + w, start_at + w + d))
                      if keeps_stats else None)
            try:
                rec = await one(level, start_at, update)
            finally:
                server_view_ = await server if server is not None else None
            _finish_level(result, progress, mode, level, rec, server_view_)
    return result
