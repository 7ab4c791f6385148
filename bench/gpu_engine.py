"""GPU, the engine alone beside the raw engine, in one run (issue 17's engine goals).

``python -m bench.gpu_engine [--seconds 3] [--models small,heavy]``: for each model, the raw TensorRT engine's
rows/s at the reference batch (bench.gpu_backend.raw_rows_per_s: one instance, inputs already on the device,
no host copies) and then the engine process fed by a driver (bench.engine_alone: descriptors over the link,
inputs in the driver's arena, which the engine page-locks): requests/s and rows/s at several concurrencies,
with the share of raw. small: the example MLP (64->256->256->16, FP32), 1-row requests; heavy: the deep FP16
MLP (256->4096x4->256), 256-row requests. Needs CUDA, CuPy and TensorRT (run it with the GPU kit).
"""
from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import tempfile
from typing import List, Optional, Sequence

SETUPS = {  # model -> (rows per request, reference batch = max_batch_size, instances, concurrencies)
    "small": (1, 256, 2, (64, 256, 1024)),
    "heavy": (256, 1024, 2, (4, 8, 16)),
}


_ENGINE_MODULES = {"loop": "trtserve.server.engine.process", "instance": "bench.engine_instance_enqueue",
                   "completion-collects": "bench.engine_completion_collects"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--models", default="small,heavy")
    p.add_argument("--engine-cpus", default=None, help="taskset CPU list for the engine process")
    p.add_argument("--levels", default="", help="requests in flight to measure, e.g. 256 (default: per model)")
    p.add_argument("--instances", type=int, default=0, help="instance_group count (default: per model)")
    p.add_argument("--max-batch", type=int, default=0,
                   help="max_batch_size served, and the batch the raw engine is measured at (default: per model)")
    p.add_argument("--switch-interval-us", default="",
                   help="GIL switch intervals of the engine to compare, e.g. 200,50 (default: what serve sets)")
    p.add_argument("--event-loops", default="auto",
                   help="the engine's event loops to compare in one run, e.g. uvloop,asyncio (default: auto, what "
                        "`trtserve serve` takes: uvloop where installed)")
    p.add_argument("--graphs", action="store_true", help="CUDA graphs on (optimization { cuda { graphs: true } })")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a model config parameter for the served model, e.g. trtserve.direct_copy_min_bytes=0")
    p.add_argument("--enqueue-on", default="loop",
                   help="who enqueues TensorRT batches, compared in one run: loop (the engine's, the default), "
                        "instance (each instance's thread, as before; bench/engine_instance_enqueue.py), "
                        "completion-collects (the loop, with each batch collected on the completion thread, as "
                        "before the loop collected them; bench/engine_completion_collects.py)")
    p.add_argument("--cprofile", type=pathlib.Path, default=None, metavar="DIR",
                   help="after the measured levels, one more run of the highest with cProfile on the engine's main "
                        "thread (bench/engine_cprofile.py); its busiest functions are printed and saved in DIR")
    p.add_argument("--work", type=pathlib.Path, default=None,
                   help="folder for the models and the engine cache (kept, so a second run skips the builds)")
    a = p.parse_args(list(argv) if argv is not None else None)
    extra = dict(kv.split("=", 1) for kv in a.param)
    from bench import engine_alone
    from trtserve.cli import DEFAULT_GIL_SWITCH_INTERVAL_US
    from bench.gpu import _config, _open
    from bench.gpu_backend import _models, raw_rows_per_s
    from trtserve.server.engine.backends.tensorrt import compat

    ok, why = compat.available()
    if not ok:
        print(f"needs CUDA, CuPy and TensorRT: {why}", file=sys.stderr)
        return 2
    print(f"TensorRT {why}, GPU {compat.gpu_name(0)}", flush=True)
    work = a.work or pathlib.Path(tempfile.mkdtemp(prefix="trtserve-gpu-engine-"))
    models = _models()
    rows_out: List[List[str]] = []
    for key in a.models.split(","):
        m = models[key]
        rows, ref, instances, levels = SETUPS[key]
        if a.levels:
            levels = tuple(int(x) for x in a.levels.split(","))
        instances = a.instances or instances
        ref = a.max_batch or ref
        # by default the GIL switch interval `trtserve serve` sets where TensorRT runs (trtserve/cli.py says why)
        intervals = [float(x) for x in a.switch_interval_us.split(",")] if a.switch_interval_us else \
            [DEFAULT_GIL_SWITCH_INTERVAL_US]
        onnx_dir = work / "onnx" / m.name / "1"
        m.make(onnx_dir / "model.onnx")
        backend = _open(m.name, onnx_dir, m.wire, m.dims_in, m.dims_out, ref, instances, work, dict(m.parameters))
        try:
            raw = raw_rows_per_s(backend, ref, a.seconds, with_io=False)
        finally:
            backend.close()
        repo = work / f"repo_{key}_{ref}"
        (repo / m.name / "1").mkdir(parents=True, exist_ok=True)
        (repo / m.name / "1" / "model.onnx").write_bytes((onnx_dir / "model.onnx").read_bytes())
        (repo / m.name / "config.pbtxt").write_text(
            _config(m.name, m.wire, m.dims_in, m.dims_out, ref, instances, graphs=a.graphs,
                    params={**m.parameters, **extra}))
        print(f"{key}: raw engine {raw:,.0f} rows/s at batch {ref}", flush=True)
        for interval, where, loop in [(i, w, x) for i in intervals for w in a.enqueue_on.split(",")
                                      for x in a.event_loops.split(",")]:
            engine = engine_alone.Engine(repo, a.engine_cpus, cache_dir=work / "cache",
                                         switch_interval=interval / 1e6, module=_ENGINE_MODULES[where],
                                         event_loop=loop)
            try:
                for level in levels:
                    r = asyncio.run(engine_alone._level(engine, m.name, [("INPUT0", m.wire, tuple(m.dims_in))],
                                                        rows, level, 1.0, a.seconds))
                    rows_out.append([key, where, engine.event_loop, str(instances), str(ref), f"{interval:g}",
                                     str(rows), str(level),
                                     f"{r['req_s']:,.0f}", f"{r['rows_s']:,.0f}", f"{raw:,.0f}",
                                     f"{100 * r['rows_s'] / raw:.0f} %", f"{r['mean_batch']:.0f}",
                                     f"{r['p50_ms']:.2f}", f"{r['engine_cores']:.2f}", f"{r['driver_cores']:.2f}",
                                     engine_alone._phases(r),
                                     str(r["errors"])])
                    print(" | ".join(rows_out[-1]), flush=True)
            finally:
                engine.stop()
        if a.cprofile:
            _profiled(a, repo, work, m, rows, max(levels), key)
    head = ["model", "enqueue on", "loop", "instances", "max batch", "GIL us", "rows/req", "concurrency", "req/s",
            "rows/s", "raw rows/s", "of raw", "batch", "p50 ms", "engine cores", "driver cores",
            "queue/in/infer/out us", "errors"]
    widths = [max(len(r[i]) for r in [head] + rows_out) for i in range(len(head))]
    print()
    for r in [head, ["-" * w for w in widths]] + rows_out:
        print(" | ".join(c.rjust(w) for c, w in zip(r, widths)))
    return 0


def _profiled(a: argparse.Namespace, repo: pathlib.Path, work: pathlib.Path, m, rows: int, level: int,
              key: str) -> None:
    """One more level with the engine's main thread under cProfile (slower: its rate is not a result)."""
    from bench import engine_alone, engine_cprofile
    from trtserve.cli import DEFAULT_GIL_SWITCH_INTERVAL_US

    a.cprofile.mkdir(parents=True, exist_ok=True)
    path = a.cprofile / f"engine-{key}-{level}.prof"
    engine = engine_alone.Engine(repo, a.engine_cpus, cache_dir=work / "cache",
                                 switch_interval=DEFAULT_GIL_SWITCH_INTERVAL_US / 1e6, module="bench.engine_cprofile",
                                 env={engine_cprofile.ENV: str(path)})
    try:
        r = asyncio.run(engine_alone._level(engine, m.name, [("INPUT0", m.wire, tuple(m.dims_in))], rows, level,
                                            1.0, a.seconds, window_signals=True))
    finally:
        engine.stop()
    lines = engine_cprofile.summary(str(path), int(r.get("window_batches", 0)))
    text = f"{key}, {level} in flight, under cProfile: {r['req_s']:,.0f} requests/s, mean batch " \
           f"{r['mean_batch']:.0f}\n" + "\n".join(lines)
    (a.cprofile / f"engine-{key}-{level}.txt").write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
