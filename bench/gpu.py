"""GPU benchmark suite, side by side on the lent GPU machine (``python -m bench.gpu``; needs CUDA, CuPy, TensorRT).

Parts (``--parts``, default all; each merges its numbers into OUT/gpu.json, so parts may run in separate calls):
  executor  raw engine (execute_async_v3 loop) vs TensorRTBackend.run() vs DynamicBatcher + executor: ResNet-18-
            shaped conv net (inputs in host and in device memory), small and heavy MLP (CUDA graphs off/on),
            instances 1/2/4 (bench/gpu_backend.py)
  server    the full server in a child process under perf_analyzer on the same machine: heavy MLP with 1/2/4
            instances (CUDA graphs off/on; gRPC bytes and CUDA shared memory), small MLP; served rows/s vs raw
  resnet    ResNet-18-shaped FP16 model (bench/resnet.py): raw compute-only images/s at the batch size vs
            images/s through the server with CUDA shared memory (perf_analyzer, trtserve bench) at 8/32/64
Writes OUT/gpu.md and, where matplotlib is installed, OUT/gpu.png; ``--render`` redoes both from OUT/gpu.json
on another machine (the GPU kit carries no matplotlib).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import pathlib
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import AbstractSet, Any, Callable, Dict, List, Optional, Sequence, TypeVar

from trtserve.cli import DEFAULT_GIL_SWITCH_INTERVAL_US
from trtserve.server.process import placement

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
HEAVY_REQ_ROWS = 256  # rows per request for the heavy MLP (4 requests fill a batch of 1024)
RESNET_MAX_BATCH = 128
T = TypeVar("T")
# perf_analyzer's contexts per gRPC connection in the served parts (None: tritonclient's default, 6). SO_REUSEPORT
# hands each connection to one front end, so with few connections some front ends get more than others; a connection
# per context (--pa-share 1) did not change the heavy MLP's or ResNet-18's results (docs/benchmarks/gpu-frontends.md)
PA_SHARE: Optional[int] = None


def _pa() -> str:
    from bench.cpu import perf_analyzer_path

    return perf_analyzer_path()


def _stats(url: str, model: str) -> Dict[str, int]:
    from trtserve.client import InferenceClient

    with InferenceClient(url) as c:
        s = c.model_statistics(model).model_stats[0]
        i = s.inference_stats
        return {"inferences": s.inference_count, "executions": s.execution_count, "requests": i.success.count,
                "request_ns": i.success.ns, "queue_ns": i.queue.ns, "compute_input_ns": i.compute_input.ns,
                "compute_infer_ns": i.compute_infer.ns, "compute_output_ns": i.compute_output.ns}


SPLIT = ("queue", "compute_input", "compute_infer", "compute_output")


def server_split(before: Dict[str, int], after: Dict[str, int]) -> Dict[str, float]:
    """Where a successful request's time in the server went over a run, from two ModelStatistics reads: microseconds
    per request for the whole request (the front end's receipt to its answer), the queue, the three compute phases
    (the batch's, counted for each of its requests) and the rest (front end, link, engine outside the batcher)."""
    n = after["requests"] - before["requests"]
    if n <= 0:
        return {}
    us = {k: (after[f"{k}_ns"] - before[f"{k}_ns"]) / n / 1e3 for k in ("request",) + SPLIT}
    us["other"] = us["request"] - sum(us[k] for k in SPLIT)
    return us


def describe_split(us: Dict[str, float]) -> str:
    """One line of ``server_split``'s numbers."""
    if not us:
        return "server: no successful requests"
    return (f"server {us['request']:,.0f} us/request = queue {us['queue']:,.0f} + compute in {us['compute_input']:,.0f}"
            f" / infer {us['compute_infer']:,.0f} / out {us['compute_output']:,.0f} + other {us['other']:,.0f}")


def describe_client(client: Dict[str, float], server: Dict[str, float]) -> str:
    """Where perf_analyzer's mean request spent the time the server's statistics do not hold (us): its own send and
    receive work, and the transport (gRPC and the kernel, both ways, client and front end: perf_analyzer's
    network+server share less the server's time outside its queue and compute)."""
    if not client or not server:
        return ""
    return (f"; outside the server: perf_analyzer {client['send'] + client['recv']:,.0f} us, "
            f"transport {client['network_server'] - server['other']:,.0f}")


def perf_analyzer(pa: str, url: str, model: str, level: int, batch: int, shm: str = "none",
                  window_ms: int = 1500, trace_rate: int = 0, trace_dir: Optional[pathlib.Path] = None,
                  cpus: Optional[AbstractSet[int]] = None, share: Optional[int] = None) -> Optional[dict]:
    """One concurrency level (bench.cpu's runner) plus the mean formed batch from ModelStatistics; with
    ``trace_rate`` N, 1 of N requests is traced (into ``trace_dir``) and ``trace_split`` of them is added;
    ``cpus``: perf_analyzer runs on these CPUs only; ``share``: its contexts per gRPC connection."""
    from bench.cpu import load_perf_analyzer

    traces = None
    if trace_rate:
        assert trace_dir is not None
        traces = trace_dir / f"{model}-{shm}-{level}.json"
        for old in traces.parent.glob(traces.name + ".*"):  # an earlier run's, in a work folder kept between runs
            old.unlink()
        _trace_settings(url, {"trace_file": str(traces), "trace_level": "TIMESTAMPS", "trace_rate": str(trace_rate),
                              "log_frequency": "20"})
    try:
        before = _stats(url, model)
        r = load_perf_analyzer(pa, url, level, window_ms / 1000, model=model, batch=batch, shm=shm, max_trials=6,
                               cpus=cpus, share=share)
        after = _stats(url, model)
    finally:
        if traces is not None:
            _trace_settings(url, {"trace_level": "OFF"})
    if r is None:
        return None
    execs = after["executions"] - before["executions"]
    out = {"tool": "perf_analyzer", "rows_per_s": r["rows_per_s"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
           "client_cores": r["client_cores"],
           "mean_batch": (after["inferences"] - before["inferences"]) / execs if execs else float("nan"),
           "server_us": server_split(before, after)}
    if "client_us" in r:
        out["client_us"] = r["client_us"]
    if traces is not None:
        records: List[dict] = []
        for f in sorted(traces.parent.glob(traces.name + ".*")):
            if not f.name.endswith(".partial"):
                records += json.loads(f.read_text())
        out["trace_us"] = trace_split(records)
    return out


def _trace_settings(url: str, settings: Dict[str, str]) -> None:
    from trtserve.client import InferenceClient
    from trtserve.protos import grpc_service_pb2 as pb

    request = pb.TraceSettingRequest()
    for key, value in settings.items():
        request.settings[key].value.append(value)
    with InferenceClient(url) as c:
        c._call("TraceSetting", request)


def trace_split(records: Sequence[dict]) -> Dict[str, float]:
    """Medians over the traced requests of Triton's trace records (us): from REQUEST_START to QUEUE_START (the front
    end, the link, the engine before it queues the request) and from COMPUTE_END, which the engine lays after
    QUEUE_START by the measured queue and compute durations, to REQUEST_END (a batch's wait for the device, its
    collection and answer, the link back, the response); ``n`` traces."""
    stamps = [{t["name"]: t["ns"] for t in r["timestamps"]} for r in records if "timestamps" in r]
    need = {"REQUEST_START", "QUEUE_START", "COMPUTE_END", "REQUEST_END"}
    done = [s for s in stamps if need <= s.keys()]
    if not done:
        return {}
    return {"n": len(done),
            "before_queue": statistics.median((s["QUEUE_START"] - s["REQUEST_START"]) / 1e3 for s in done),
            "after_compute": statistics.median((s["REQUEST_END"] - s["COMPUTE_END"]) / 1e3 for s in done)}


def describe_trace(us: Dict[str, float]) -> str:
    """One line of ``trace_split``'s numbers (empty when nothing was traced)."""
    if not us:
        return ""
    return (f"; traced (median of {us['n']:.0f}): {us['before_queue']:,.0f} us before the queue, "
            f"{us['after_compute']:,.0f} after compute")


def trtserve_bench(url: str, model: str, level: int, batch: int, shm: str, seconds: float,
                   processes: int = 1) -> Optional[dict]:
    """``trtserve bench`` at one level; ``processes``: load-generating processes (one Python process can limit the
    load before the server does)."""
    from trtserve.client.bench.runner import BenchConfig, run

    before = _stats(url, model)
    try:
        r = asyncio.run(run(BenchConfig(url=url, model=model, concurrency=[level], duration_s=seconds,
                                        warmup_s=1.0, batch=batch, shared_memory=shm,
                                        processes=processes))).levels[0]
    except Exception as e:  # report and go on: one failed level must not lose the rest of the run
        print(f"trtserve bench failed ({model} c={level} shm={shm}): {e}", flush=True)
        return None
    after = _stats(url, model)
    execs = after["executions"] - before["executions"]
    return {"tool": "trtserve bench", "processes": processes, "rows_per_s": r.rows_per_s, "p50_ms": r.p50_ms,
            "p99_ms": r.p99_ms, "errors": r.errors,
            "mean_batch": (after["inferences"] - before["inferences"]) / execs if execs else 0,
            "server_us": server_split(before, after)}


def _pinned(cpus: Optional[AbstractSet[int]], fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with this process on ``cpus`` (None: where it is), as the processes it starts meanwhile: a
    load generator kept off the CPUs given to the server's engine."""
    mine = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        return fn(*args)
    finally:
        os.sched_setaffinity(0, mine)


# ---- parts -----------------------------------------------------------------------------------------------------

def part_executor(work: pathlib.Path, seconds: float) -> List[dict]:
    from bench.gpu_backend import _models, bench_model

    results: List[dict] = []
    models = _models()
    for name in ("conv", "heavy", "small"):
        # graphs replay captured host copies, so they never apply to the conv net's device-resident inputs
        for graphs in (False,) if name == "conv" else (False, True):
            bench_model(models[name], work, seconds, [1, 2, 4], graphs, True, results, serial_too=True)
    return results


def _open(name: str, model_dir: pathlib.Path, wire: str, dims_in: Sequence[int], dims_out: Sequence[int],
          max_batch: int, instances: int, work: pathlib.Path, params: Dict[str, str]):
    from trtserve.server.engine.backends.base import BackendConfig, TensorSpec
    from trtserve.server.engine.backends.tensorrt import TensorRTBackend

    cfg = BackendConfig(name=name, version="1", model_dir=model_dir, default_model_filename="",
                        max_batch_size=max_batch, inputs=[TensorSpec("INPUT0", wire, tuple(dims_in))],
                        outputs=[TensorSpec("OUTPUT0", wire, tuple(dims_out))], instance_count=instances,
                        cache_dir=work / "cache", parameters=params)
    backend = TensorRTBackend(cfg)
    t0 = time.monotonic()
    backend.open()
    print(f"# {name}: open {time.monotonic() - t0:.1f} s (cache hit {backend.report.cache_hit})", flush=True)
    return backend


def _plan_path(work: pathlib.Path, backend) -> pathlib.Path:
    from trtserve.server.engine.backends.tensorrt.build import PlanCache

    return PlanCache(work / "cache").path(backend.report.cache_key)


def _config(name: str, wire: str, dims_in: Sequence[int], dims_out: Sequence[int], max_batch: int, instances: int,
            graphs: bool = False, params: Optional[Dict[str, str]] = None, queue_delay_us: int = 0) -> str:
    delay = f" max_queue_delay_microseconds: {queue_delay_us} " if queue_delay_us else " "
    text = (f'name: "{name}"\nplatform: "tensorrt_plan"\nmax_batch_size: {max_batch}\n'
            f'input [ {{ name: "INPUT0", data_type: TYPE_{wire}, dims: {list(dims_in)} }} ]\n'
            f'output [ {{ name: "OUTPUT0", data_type: TYPE_{wire}, dims: {list(dims_out)} }} ]\n'
            f'instance_group [ {{ count: {instances}, kind: KIND_GPU }} ]\ndynamic_batching {{{delay}}}\n')
    if graphs:
        text += "optimization { cuda { graphs: true } }\n"
    for k, v in (params or {}).items():
        text += f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n'
    return text


@contextlib.contextmanager
def _serve(repo: pathlib.Path, work: pathlib.Path, cprofile: Optional[pathlib.Path] = None,
           engine_cpus: Optional[AbstractSet[int]] = None, frontends: Optional[int] = None):
    """``trtserve serve`` on ``repo``; with ``cprofile``, each of its processes can profile its main thread
    between SIGUSR1 and SIGUSR2 into ``cprofile``/<pid>.prof (see ``_CPROFILE_SITE``); ``engine_cpus``: its
    --engine-cpus; ``frontends``: its --frontends (None: the server's default)."""
    from bench._server import ServerProcess

    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", _CPROFILE_ENV)}
    if cprofile is not None:  # the server's processes inherit it; this one gets its own environment back below
        site = cprofile / "site"
        site.mkdir(parents=True, exist_ok=True)
        (site / "sitecustomize.py").write_text(_CPROFILE_SITE)
        os.environ["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [saved["PYTHONPATH"]] if p])
        os.environ[_CPROFILE_ENV] = str(cprofile)
    extra = ["--cache-dir", str(work / "cache")]
    if engine_cpus:
        extra += ["--engine-cpus", ",".join(map(str, sorted(engine_cpus)))]
    if frontends is not None:
        extra += ["--frontends", str(frontends)]
    server = ServerProcess(repo, extra=extra)
    try:
        server.__enter__()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield server
    finally:
        server.__exit__(None, None, None)


# Why cProfile and a sitecustomize: py-spy cannot read the engine process on the GPU host (bench/engine_cprofile.py
# says why), and the server starts its engine itself; Python imports sitecustomize in every process it starts.
_CPROFILE_ENV = "TRTSERVE_BENCH_CPROFILE_DIR"
_CPROFILE_SITE = """import os
if os.environ.get("%s"):
    import cProfile, signal
    _prof = []
    def _start(*_):
        _prof[:] = [cProfile.Profile()]
        _prof[0].enable()
    def _stop(*_):
        if _prof:
            p = _prof.pop()
            p.disable()
            p.dump_stats(os.path.join(os.environ["%s"], "%%d.prof" %% os.getpid()))
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
""" % (_CPROFILE_ENV, _CPROFILE_ENV)


def _engine_cprofile(s, cprofile: pathlib.Path, label: str, model: str, run) -> None:
    """One more pass of ``run`` (a level) with the engine's main thread under cProfile for three seconds of it; its
    busiest functions per batch and the window's requests per batch are printed (the pass is slower: its rate is not
    a result)."""
    import signal
    import threading

    from bench import engine_cprofile, frontends as fb

    pid = next((int(k.split()[1]) for k in fb.role_ticks(s.proc.pid) if k.startswith("engine ")), None)
    if pid is None:
        print(f"  cprofile of {label}: no engine process found", flush=True)
        return
    path = cprofile / f"{pid}.prof"
    if path.exists():
        path.unlink()
    window: Dict[str, Dict[str, int]] = {}

    def profile() -> None:
        time.sleep(1.5)
        window["before"] = _stats(s.url, model)
        os.kill(pid, signal.SIGUSR1)
        time.sleep(3.0)
        os.kill(pid, signal.SIGUSR2)
        window["after"] = _stats(s.url, model)

    t = threading.Thread(target=profile, daemon=True)
    t.start()
    run()
    t.join()
    for _ in range(50):  # the engine writes the profile from its signal handler
        if path.exists():
            break
        time.sleep(0.1)
    before, after = window.get("before"), window.get("after")
    batches = after["executions"] - before["executions"] if before and after else 0
    requests = after["requests"] - before["requests"] if before and after else 0
    keep = cprofile / f"{label}-engine.prof"
    if path.exists():
        path.replace(keep)
    lines = engine_cprofile.summary(str(keep), batches)
    print(f"  cprofile of {label}, the engine's main thread: {requests} requests in {batches} batches "
          f"({requests / max(1, batches):.1f} per batch)\n    " + "\n    ".join(lines), flush=True)


def _cores_and_profile(s, label: str, profile: Optional[pathlib.Path], run):
    """``run()``'s result, with the cores each role of the server used meanwhile (engine, its loop, front ends,
    the busiest front end) under "cores"; with ``profile``, py-spy samples the engine and the first front end
    for a few seconds of it and their busiest functions are printed (raw profiles kept in ``profile``)."""
    from bench import frontends as fb, pyspy
    from bench.gpu_frontends import _profile_later

    spy = pyspy.find() if profile is not None else None
    before, t0, steal0 = fb.role_ticks(s.proc.pid), time.monotonic(), fb.steal_ticks()
    profiles = _profile_later(spy, profile, label, before, 4.0) if spy and profile is not None else None
    r = run()
    after, wall, steal1 = fb.role_ticks(s.proc.pid), time.monotonic() - t0, fb.steal_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    cores = fb.role_cores(before, after, wall, hz)
    steal = fb.steal_cores(steal0, steal1, wall, hz)
    if steal is not None:  # a run slowed by the host, not by the server, shows here
        cores["steal"] = steal
    if profiles is not None:
        profiles.join()
        for role, pid, raw in profiles.records:
            print(f"  profile of {label}, {role} (pid {pid}):\n    " + "\n    ".join(pyspy.summary(raw, 24)),
                  flush=True)
    if r is not None:
        if "client_cores" in r:
            cores["client"] = r["client_cores"]
        r["cores"] = cores
    return r


def describe_cores(cores: Dict[str, float]) -> str:
    """One line of ``_cores_and_profile``'s numbers (empty when none were read)."""
    client = f", perf_analyzer {cores['client']:.2f}" if "client" in cores else ""
    steal = f", stolen by the host {cores['steal']:.2f}" if "steal" in cores else ""
    return (f"; cores: engine {cores['engine']:.2f} (loop {cores['loop']:.2f}), front ends {cores['frontends']:.2f} "
            f"(busiest {cores['frontend max']:.2f}){client}{steal}") if cores else ""


def part_server(work: pathlib.Path, seconds: float, only: Sequence[str] = (),
                heavy_levels: Sequence[int] = (4, 16), trace_rate: int = 0,
                heavy_max_batch: int = 1024, profile: Optional[pathlib.Path] = None,
                cprofile: Optional[pathlib.Path] = None,
                heavy_transports: Sequence[str] = ("none", "cuda"),
                engine_cpus: Optional[AbstractSet[int]] = None, pa_share: Optional[int] = PA_SHARE,
                heavy_tools: Sequence[str] = ("perf_analyzer",), bench_processes: int = 1,
                frontends: Optional[int] = None) -> List[dict]:
    """The full server under perf_analyzer, per setup, transport and level (the heavy MLP also under ``trtserve
    bench`` in ``bench_processes`` processes when ``heavy_tools`` names it: another load generator, for when the
    one in use may be what holds the server back); with ``profile`` the heavy MLP's
    levels are profiled (py-spy on the engine and a front end, raw profiles kept there); with ``cprofile`` each heavy
    level runs once more with the engine's main thread under cProfile; with ``engine_cpus`` the server runs its
    engine on those CPUs alone (--engine-cpus) and its front ends on the others, where perf_analyzer runs too;
    ``pa_share``: perf_analyzer's contexts per gRPC connection (PA_SHARE says why); ``frontends``: the server's
    --frontends (None: its default)."""
    from bench.gpu_backend import _models, raw_rows_per_s

    pa = _pa()
    models = _models()
    repo = work / "server_repo"
    shutil.rmtree(repo, ignore_errors=True)
    raw: Dict[str, float] = {}
    plans: Dict[str, pathlib.Path] = {}
    ref_batch = {"heavy": heavy_max_batch, "small": 256}  # also the served max_batch_size
    for key in ("heavy", "small"):
        m = models[key]
        d = work / m.name / "1"
        m.make(d / "model.onnx")
        b = _open(m.name, d, m.wire, m.dims_in, m.dims_out, ref_batch[key], 4, work, dict(m.parameters))
        try:
            raw[key] = raw_rows_per_s(b, ref_batch[key], seconds, with_io=False)
            plans[key] = _plan_path(work, b)
            print(f"  {key} raw batch {ref_batch[key]}: {raw[key]:,.0f} rows/s compute only", flush=True)
        finally:
            b.close()
    setups = [("heavy_i1", "heavy", 1, False), ("heavy_i2", "heavy", 2, False), ("heavy_i4", "heavy", 4, False),
              ("heavy_i4_graphs", "heavy", 4, True), ("small_i1", "small", 1, False), ("small_i4", "small", 4, False)]
    setups = [s for s in setups if not only or s[0] in only]
    for name, key, n, graphs in setups:
        m = models[key]
        (repo / name / "1").mkdir(parents=True)
        os.symlink(plans[key], repo / name / "1" / "model.plan")
        # a bucket per multiple of the heavy requests' rows: batches of whole requests are never padded
        buckets = ",".join(str(HEAVY_REQ_ROWS * k) for k in range(1, ref_batch[key] // HEAVY_REQ_ROWS + 1))
        params = {"trtserve.graph_batch_sizes": buckets} if graphs else {}
        (repo / name / "config.pbtxt").write_text(_config(name, m.wire, m.dims_in, m.dims_out, ref_batch[key], n,
                                                          graphs, params))
    rows: List[dict] = []
    if cprofile is not None:
        cprofile.mkdir(parents=True, exist_ok=True)
    others = set(placement.frontend_cpus(engine_cpus)) if engine_cpus else None
    with _serve(repo, work, cprofile, engine_cpus, frontends) as s:
        if engine_cpus:
            print(f"  engine on CPUs {sorted(engine_cpus)} (--engine-cpus), the front ends and perf_analyzer on "
                  f"the {len(others)} others", flush=True)
        for name, key, n, graphs in setups:
            batch = HEAVY_REQ_ROWS if key == "heavy" else 1
            levels = tuple(heavy_levels) if key == "heavy" else (1, 8, 32)
            transports = tuple(heavy_transports) if name in ("heavy_i4", "heavy_i4_graphs") else ("none",)
            tools = tuple(heavy_tools) if key == "heavy" else ("perf_analyzer",)
            for shm, tool, level in ((t, u, c) for t in transports for u in tools for c in levels):
                label = f"{name}-{shm}-{level}" + ("" if tool == "perf_analyzer" else "-trtserve-bench")
                if tool == "perf_analyzer":
                    run = functools.partial(perf_analyzer, pa, s.url, name, level, batch, shm,
                                            trace_rate=trace_rate, trace_dir=work, cpus=others, share=pa_share)
                    r = _cores_and_profile(s, label, profile if key == "heavy" else None, run) if pa else None
                else:
                    run = functools.partial(_pinned, others, trtserve_bench, s.url, name, level, batch, shm,
                                            max(3.0, seconds * 4), bench_processes)
                    r = _cores_and_profile(s, label, None, run)
                if r is None:
                    continue
                r.update(model=name, base=key, instances=n, graphs=graphs, shm=shm, concurrency=level,
                         batch=batch, raw_rows_per_s=raw[key], raw_batch=ref_batch[key])
                rows.append(r)
                by = "" if tool == "perf_analyzer" else f" ({tool})"
                print(f"  {name:16} shm={shm:4} c={level:<3} {r['rows_per_s']:12,.0f} rows/s  "
                      f"p50 {r['p50_ms']:7.2f} ms  batch {r['mean_batch']:6.1f}  "
                      f"{r['rows_per_s'] / raw[key]:.0%} of raw{by}; {describe_split(r['server_us'])}"
                      f"{describe_client(r.get('client_us', {}), r['server_us'])}"
                      f"{describe_trace(r.get('trace_us', {}))}"
                      f"{describe_cores(r.get('cores', {}))}", flush=True)
                if cprofile is not None and key == "heavy":
                    _engine_cprofile(s, cprofile, label, name, run)
    return rows


def part_resnet(work: pathlib.Path, seconds: float, images: int = 16, instances: int = 2,
                transports: Sequence[str] = ("cuda", "none", "system"), trace_rate: int = 0,
                graphs: bool = False, bench_processes: int = 1, pa_share: Optional[int] = PA_SHARE,
                engine_cpus: Optional[AbstractSet[int]] = None, frontends: Optional[int] = None) -> List[dict]:
    """``images`` per request, ``instances`` execution contexts; CUDA shared memory at 8/32/64 in flight with both
    load tools, the other transports with perf_analyzer at 32. ``graphs``: served with CUDA graphs, a bucket per
    multiple of ``images`` (batches of whole requests are never padded). ``pa_share``, ``engine_cpus``,
    ``frontends``: as for part_server."""
    from bench.gpu_backend import raw_rows_per_s
    from bench.resnet import make_resnet18

    pa = _pa()
    repo = work / "resnet_repo"
    shutil.rmtree(repo, ignore_errors=True)
    d = repo / "resnet" / "1"
    make_resnet18(d / "model.onnx")
    params = {"trtserve.fp16": "true"}
    served = dict(params)
    if graphs:
        served["trtserve.graph_batch_sizes"] = ",".join(str(k) for k in range(images, RESNET_MAX_BATCH + 1, images))
    (repo / "resnet" / "config.pbtxt").write_text(
        _config("resnet", "FP32", [3, 224, 224], [1000], RESNET_MAX_BATCH, instances, graphs, served))
    b = _open("resnet", d, "FP32", [3, 224, 224], [1000], RESNET_MAX_BATCH, instances, work, params)
    raw: Dict[int, Dict[str, float]] = {}
    try:
        for batch in sorted({images, 64, RESNET_MAX_BATCH}):
            raw[batch] = {"compute": raw_rows_per_s(b, batch, seconds, with_io=False),
                          "with_io": raw_rows_per_s(b, batch, seconds, with_io=True)}
            print(f"  resnet raw batch {batch}: {raw[batch]['compute']:,.0f} images/s compute only, "
                  f"{raw[batch]['with_io']:,.0f} with H2D/D2H", flush=True)
    finally:
        b.close()
    rows: List[dict] = [{"kind": "raw", "batch": k, **v} for k, v in raw.items()]
    others = set(placement.frontend_cpus(engine_cpus)) if engine_cpus else None
    with _serve(repo, work, engine_cpus=engine_cpus, frontends=frontends) as s:
        runs = [("cuda", tool, c) for tool in ("perf_analyzer", "trtserve bench") for c in (8, 32, 64)
                if "cuda" in transports]
        runs += [(t, "perf_analyzer", 32) for t in transports if t != "cuda"]
        for shm, tool, level in runs:
            if tool == "perf_analyzer":
                r = perf_analyzer(pa, s.url, "resnet", level, images, shm, trace_rate=trace_rate,
                                  trace_dir=work, share=pa_share, cpus=others) if pa else None
            else:
                r = _pinned(others, trtserve_bench, s.url, "resnet", level, images, shm, max(3.0, seconds * 4),
                            bench_processes)
            if r is None:
                continue
            r.update(kind="served", shm=shm, concurrency=level, batch=images, instances=instances, graphs=graphs,
                     raw_compute_max_batch=raw[RESNET_MAX_BATCH]["compute"])
            rows.append(r)
            print(f"  resnet {tool:15} shm={shm:6} c={level:<3} {r['rows_per_s']:9,.0f} images/s  "
                  f"p50 {r['p50_ms']:7.2f} ms  batch {r['mean_batch']:6.1f}  "
                  f"{r['rows_per_s'] / raw[RESNET_MAX_BATCH]['compute']:.0%} of raw at {RESNET_MAX_BATCH}; "
                  f"{describe_split(r['server_us'])}{describe_client(r.get('client_us', {}), r['server_us'])}"
                  f"{describe_trace(r.get('trace_us', {}))}", flush=True)
    return rows


# ---- report ----------------------------------------------------------------------------------------------------

def render(data: dict, out: pathlib.Path) -> None:
    """gpu.md (and gpu.png when matplotlib is there) from the collected numbers."""
    md = ["# GPU benchmarks", "", f"Measured by `python -m bench.gpu` on {data.get('machine', '?')}, "
          f"last run {data.get('when', '?')} (each part says when it ran). Load generators run on the same machine "
          "as the server. rows/s = batch rows (images for ResNet) per second. The last run's in-process parts ran "
          f"with sys.setswitchinterval {data.get('switch_interval_us', 5000):g} us (what `trtserve serve` sets where "
          "TensorRT sees a CUDA device; Python's default is 5000 us).", ""]
    when = data.get("part_when") or {}

    def measured(part: str) -> List[str]:
        return [f"Measured {when[part]}.", ""] if part in when else []

    ex = data.get("executor") or []
    if ex:
        md += ["## Engine vs executor vs batcher (in process)", ""] + measured("executor") + [
               "raw = `execute_async_v3` loop on one context, no copies; raw+io = with H2D/D2H; raw xN = the raw loop "
               "on N contexts at once; run xN = `TensorRTBackend.run()` from N instance threads (pinned staging, "
               "copies, checks, result arrays); batcher xN = `DynamicBatcher` + executor over N instances, fed "
               "requests of B/4 rows; the next batch of an instance is enqueued while the previous one runs "
               "(enqueue on the instance thread, collect on its completion thread). unpipelined = the same batcher "
               "with each batch enqueued and waited for on the instance's thread, measured right after (best of "
               "1/2/4 instances). rows/s. conv = ResNet-18-shaped (bench/resnet.py; a row is an image); its "
               "\"inputs in device memory\" rows feed run() and the batcher CuPy arrays, as CUDA shared memory "
               "does.", "",
               "| model | graphs | batch | raw | raw+io | raw x4 | run x1 | run x2 | run x4 | batcher x1 | batcher x2 "
               "| batcher x4 | best run / raw | best batcher / raw | unpipelined best / raw |",
               "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in ex:
            run = {int(k): v for k, v in r["run"].items()}
            bat = {int(k): v for k, v in r["batcher"].items()}
            where = ", inputs in device memory" if r.get("inputs") == "device" else ""
            md.append(f"| {r['model']}{where} | {'on' if r['graphs'] else 'off'} | {r['batch']} | {r['raw']:,.0f} | "
                      f"{r['raw_io']:,.0f} | {r['raw_parallel']:,.0f} | "
                      + " | ".join(f"{run[n]:,.0f}" for n in (1, 2, 4)) + " | "
                      + " | ".join(f"{bat[n]:,.0f}" for n in (1, 2, 4))
                      + f" | {max(run.values()) / r['raw']:.0%} | {max(bat.values()) / r['raw']:.0%} | "
                      + (f"{max(r['batcher_serial'].values()) / r['raw']:.0%} |" if r.get("batcher_serial") else "- |"))
    sv = data.get("server") or []
    if sv:
        md += ["", "## Full server under load (same machine)", ""] + measured("server") + [
               f"Heavy MLP: requests of {HEAVY_REQ_ROWS} rows (`-b {HEAVY_REQ_ROWS}`), max_batch_size "
               f"{_heavy_batch(sv)}; small MLP: 1 row per request. served/raw = rows/s over the raw engine loop at "
               f"batch {_heavy_batch(sv)} (heavy) or 256 (small) on one context. mean batch = rows per execution "
               "from ModelStatistics over the same window.",
               "", "| model | instances | CUDA graphs | transport | load tool | concurrency | rows/s | p50 ms | "
               "p99 ms | mean batch | served / raw |", "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in sv:
            md.append(f"| {r['base']} | {r['instances']} | {'on' if r['graphs'] else 'off'} | "
                      f"{'CUDA shm' if r['shm'] == 'cuda' else 'gRPC bytes'} | {r.get('tool', 'perf_analyzer')} | "
                      f"{r['concurrency']} | "
                      f"{r['rows_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['mean_batch']:.0f} | "
                      f"{r['rows_per_s'] / r['raw_rows_per_s']:.0%} |")
    rn = data.get("resnet") or []
    if rn:
        raw = [r for r in rn if r["kind"] == "raw"]
        md += ["", "## ResNet-18-shaped FP16 model, shared memory", ""] + measured("resnet") + [
               "Raw engine (one context, engine built for the instance count's profiles): " + "; ".join(
                   f"batch {r['batch']}: {r['compute']:,.0f} images/s compute only, {r['with_io']:,.0f} with "
                   "H2D/D2H" for r in raw) + ".", "",
               f"Served: FP32 3x224x224 inputs (602 KB per image), max_batch_size {RESNET_MAX_BATCH}; served/raw = "
               f"images/s over the raw compute-only rate at batch {RESNET_MAX_BATCH}.", "",
               "| load tool | transport | images per request | instances | concurrency | images/s | p50 ms | p99 ms | "
               "mean batch | served / raw |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        names = {"cuda": "CUDA shm", "system": "system shm", "none": "gRPC bytes"}
        for r in rn:
            if r["kind"] != "served":
                continue
            md.append(f"| {r['tool']} | {names[r['shm']]}{', CUDA graphs' if r.get('graphs') else ''} | {r['batch']} | "
                      f"{r.get('instances', 2)} | "
                      f"{r['concurrency']} | {r['rows_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                      f"{r['mean_batch']:.0f} | {r['rows_per_s'] / r['raw_compute_max_batch']:.0%} |")
    try:
        _plot(data, out / "gpu.png")
        md += ["", "![GPU benchmarks](gpu.png)"]
    except ImportError:
        print("matplotlib not installed: gpu.png not drawn (run --render elsewhere)", flush=True)
    (out / "gpu.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / 'gpu.md'}", flush=True)


def _plot(data: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    ex = data.get("executor") or []
    for model, graphs, inputs, label in (("heavy", False, "host", "heavy MLP"),
                                         ("heavy", True, "host", "heavy MLP, graphs"),
                                         ("conv", False, "host", "conv, host inputs"),
                                         ("conv", False, "device", "conv, device inputs")):
        pts = [r for r in ex if r["model"] == model and r["graphs"] == graphs and r.get("inputs", "host") == inputs]
        if pts:
            ax[0].plot([r["batch"] for r in pts], [100 * max(r["batcher"].values()) / r["raw"] for r in pts], "-o",
                       label=label)
    if ex:
        ax[0].axhline(90, color="k", ls=":", label="goal 90 %")
        ax[0].set(xscale="log", xlabel="batch", ylabel="best batcher / raw (%)", title="batcher + executor vs raw")
        ax[0].legend(fontsize=7)
    sv = [r for r in data.get("server") or [] if r["base"] == "heavy"]
    _curves(ax[1], sv, lambda r: (r["instances"], r["graphs"], r["shm"]),
            lambda k: f"x{k[0]}{' graphs' if k[1] else ''}{' CUDA shm' if k[2] == 'cuda' else ''}",
            "raw_rows_per_s", f"raw at {_heavy_batch(sv)}", "rows/s", "heavy MLP served (perf_analyzer)")
    rn = [r for r in data.get("resnet") or [] if r["kind"] == "served" and r["shm"] == "cuda"]
    _curves(ax[2], rn, lambda r: (r["tool"], r["batch"], r.get("instances", 2)),
            lambda k: f"{k[0]}, CUDA shm, {k[1]}/req, x{k[2]}", "raw_compute_max_batch", "raw compute at 128",
            "images/s", "ResNet-18-shaped served")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curves(ax, rows: List[dict], key, label, ref: str, ref_label: str, ylabel: str, title: str) -> None:
    """One throughput-vs-concurrency line per configuration, and the raw engine's rate as a reference."""
    for k in sorted({key(r) for r in rows}):
        pts = [r for r in rows if key(r) == k]
        ax.plot([r["concurrency"] for r in pts], [r["rows_per_s"] for r in pts], "-o", label=label(k))
    if rows:
        ax.axhline(rows[0][ref], color="k", ls=":", label=ref_label)
        ax.set(xlabel="concurrency", ylabel=ylabel, title=title)
        ax.legend(fontsize=7)


def _heavy_batch(rows: List[dict]) -> str:
    """The heavy MLP's max_batch_size in these rows (runs before --heavy-max-batch stored none: 1024)."""
    return "/".join(str(b) for b in sorted({r.get("raw_batch", 1024) for r in rows if r["base"] == "heavy"})) or "1024"


def _resnet_key(r: dict) -> tuple:
    return (r["kind"], r["batch"], r.get("instances"), r.get("shm"), r.get("tool"), r.get("concurrency"),
            bool(r.get("graphs")))


def _tool(name: str) -> str:
    """A --heavy-tools entry as the rows name it."""
    tools = {"perf_analyzer": "perf_analyzer", "trtserve-bench": "trtserve bench"}
    if name not in tools:
        raise SystemExit(f"--heavy-tools: {name!r} is not one of {', '.join(tools)}")
    return tools[name]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="executor,server,resnet")
    p.add_argument("--seconds", type=float, default=0.7, help="measuring time per in-process cell")
    p.add_argument("--work", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "trtserve-gpu-bench",
                   help="models and the plan cache (reused by later parts and calls)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(os.environ.get("OUT") or DOCS))
    p.add_argument("--render", action="store_true", help="only redraw gpu.md/gpu.png from OUT/gpu.json")
    p.add_argument("--server-setups", default="", help="server part: only these setups (e.g. heavy_i4,small_i4)")
    p.add_argument("--heavy-levels", default="4,16", help="server part: perf_analyzer concurrencies for the heavy MLP")
    p.add_argument("--heavy-transports", default="none,cuda",
                   help="server part: how heavy_i4 and heavy_i4_graphs requests carry tensors (none: gRPC bytes)")
    p.add_argument("--heavy-max-batch", type=int, default=1024,
                   help="server part: the heavy MLP's max_batch_size, and the batch its raw engine is measured at")
    p.add_argument("--resnet-images", type=int, default=16, help="images per request (resnet part)")
    p.add_argument("--resnet-instances", type=int, default=2, help="instance_group count (resnet part)")
    p.add_argument("--resnet-transports", default="cuda,none,system", help="cuda, none (gRPC bytes), system")
    p.add_argument("--resnet-graphs", action="store_true", help="resnet part: serve with CUDA graphs")
    p.add_argument("--bench-processes", type=int, default=1,
                   help="resnet part, and the server part's trtserve bench: its load-generating processes (one can "
                        "limit the load)")
    p.add_argument("--heavy-tools", default="perf_analyzer",
                   help="server part: the heavy MLP's load tools, perf_analyzer and/or trtserve-bench "
                        "(comma-separated)")
    p.add_argument("--trace-rate", type=int, default=0,
                   help="served perf_analyzer levels: trace 1 of N requests and print where their time went (0: off)")
    p.add_argument("--profile", type=pathlib.Path, default=None, metavar="DIR",
                   help="server part: py-spy on the engine and a front end at each heavy MLP level (needs py-spy)")
    p.add_argument("--cprofile", type=pathlib.Path, default=None, metavar="DIR",
                   help="server part: each heavy MLP level once more with the engine's main thread under cProfile")
    p.add_argument("--switch-interval-us", type=float, default=DEFAULT_GIL_SWITCH_INTERVAL_US,
                   help="sys.setswitchinterval for the in-process parts, as `trtserve serve` sets it")
    p.add_argument("--engine-cpus", type=placement.cpu_list, default=None, metavar="LIST",
                   help="server and resnet parts: serve with --engine-cpus LIST (e.g. 0-1), the load tools on the "
                        "other CPUs (default: where the OS puts them)")
    p.add_argument("--pa-share", type=int, default=PA_SHARE, metavar="N",
                   help="server and resnet parts: perf_analyzer's contexts per gRPC connection "
                        "(TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT; default: tritonclient's, 6)")
    p.add_argument("--frontends", type=int, default=None, metavar="N",
                   help="server and resnet parts: serve with --frontends N (default: the server's own default)")
    a = p.parse_args(argv)
    if a.engine_cpus:  # as `trtserve serve` will, before any model is built
        try:
            placement.checked(a.engine_cpus)
        except ValueError as e:
            p.error(f"--engine-cpus: {e}")
    if a.switch_interval_us > 0:
        sys.setswitchinterval(a.switch_interval_us / 1e6)
    a.out.mkdir(parents=True, exist_ok=True)
    store = a.out / "gpu.json"
    data = json.loads(store.read_text()) if store.exists() else {}
    if a.render:
        render(data, a.out)
        return 0
    from trtserve.server.engine.backends.tensorrt import compat

    ok, why = compat.available()
    if not ok:
        print(f"needs CUDA, CuPy and TensorRT: {why}", file=sys.stderr)
        return 2
    a.work.mkdir(parents=True, exist_ok=True)
    data["machine"] = (f"{compat.gpu_name(0)}, TensorRT {why}, {os.cpu_count()} CPU cores, "
                       f"Python {platform.python_version()}")
    data["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    data["switch_interval_us"] = a.switch_interval_us
    parts = {"executor": part_executor,
             "server": functools.partial(part_server, only=[x for x in a.server_setups.split(",") if x],
                                         heavy_levels=[int(x) for x in a.heavy_levels.split(",")],
                                         trace_rate=a.trace_rate, heavy_max_batch=a.heavy_max_batch,
                                         profile=a.profile, cprofile=a.cprofile,
                                         heavy_transports=a.heavy_transports.split(","), engine_cpus=a.engine_cpus,
                                         pa_share=a.pa_share, bench_processes=a.bench_processes,
                                         heavy_tools=[_tool(x) for x in a.heavy_tools.split(",")],
                                         frontends=a.frontends),
             "resnet": functools.partial(part_resnet, images=a.resnet_images, instances=a.resnet_instances,
                                         transports=a.resnet_transports.split(","), trace_rate=a.trace_rate,
                                         graphs=a.resnet_graphs, bench_processes=a.bench_processes,
                                         pa_share=a.pa_share, engine_cpus=a.engine_cpus, frontends=a.frontends)}
    for name in a.parts.split(","):
        t0 = time.monotonic()
        print(f"== {name}", flush=True)
        new = parts[name](a.work, a.seconds)
        if name == "resnet":  # runs with other --resnet-* settings add to the table instead of replacing it
            fresh = {_resnet_key(r) for r in new}
            new = [r for r in data.get(name) or [] if _resnet_key(r) not in fresh] + new
        data[name] = new
        data.setdefault("part_when", {})[name] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        store.write_text(json.dumps(data, indent=1))
        print(f"== {name} done in {time.monotonic() - t0:.0f} s", flush=True)
    render(data, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
